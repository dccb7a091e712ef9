//! What a gateway needs from the nodes.
//!
//! [`NodeApi`] is implemented by the local [`crate::Node`] (single process: `palaver serve`) and
//! by the cluster client (`palaver gateway`, which routes each call over gRPC to the node that
//! owns its key). The gateway is written against this trait only, so both modes run the same
//! gateway code.

use crate::user::{Connected, SessionInfo};
use async_trait::async_trait;
use schema::{Command, Error, GatewayId, Profile, Reply, RoomId, SessionId, UserId};

/// The node-side operations a gateway uses.
#[async_trait]
pub trait NodeApi: Send + Sync + 'static {
    /// A session connected: refresh the user from the token, record the session, answer the
    /// user's rooms and pending notifications.
    async fn connect(&self, profile: Profile, session: SessionInfo) -> Result<Connected, Error>;

    /// Creates or updates users (the admin import).
    async fn import_users(&self, users: Vec<Profile>) -> Result<usize, Error>;

    /// A session closed.
    async fn disconnect(&self, user: &UserId, gateway: &GatewayId, session: SessionId);

    /// Executes a command for the authenticated `caller`.
    async fn execute(&self, caller: &UserId, cmd: Command) -> Result<Reply, Error>;

    /// `gateway` wants the events of `rooms`.
    async fn subscribe(&self, gateway: &GatewayId, rooms: Vec<RoomId>);

    /// `gateway` no longer wants the events of `rooms`.
    async fn unsubscribe(&self, gateway: &GatewayId, rooms: Vec<RoomId>);
}
