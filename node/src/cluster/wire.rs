//! The messages of the cluster service.

use crate::user::{Connected, SessionInfo};
use schema::{Command, Error, GatewayId, NodeId, Profile, Reply, RoomId, SessionId, UserId};
use serde::{Deserialize, Serialize};

/// One call to a node.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CallRequest {
    /// The ring version the caller routed with (0: not routed, e.g. a ping).
    pub ring_version: u64,
    /// W3C trace context (`traceparent`) of the call, so one trace follows a message across
    /// processes. Absent from older callers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traceparent: Option<String>,
    /// What to do.
    pub body: NodeRequest,
}

/// What a gateway (or a peer node) can ask a node.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum NodeRequest {
    /// Liveness and identity.
    Ping,
    /// A session connected (owner of the user).
    Connect {
        /// Claims of the token.
        profile: Profile,
        /// The session.
        session: SessionInfo,
    },
    /// A session closed (owner of the user).
    Disconnect {
        /// The user.
        user: UserId,
        /// Its gateway.
        gateway: GatewayId,
        /// The session.
        session: SessionId,
    },
    /// A command (owner of the room for room commands, of the caller otherwise).
    Execute {
        /// The authenticated caller.
        caller: UserId,
        /// The command.
        command: Command,
        /// For a send without `client_ref`: the idempotency key the gateway chose, the same on
        /// every retry.
        #[serde(default)]
        auto_ref: Option<String>,
    },
    /// A gateway wants these rooms' events (owner of the rooms).
    Subscribe {
        /// The gateway.
        gateway: GatewayId,
        /// The rooms.
        rooms: Vec<RoomId>,
    },
    /// A gateway no longer wants these rooms' events (owner of the rooms).
    Unsubscribe {
        /// The gateway.
        gateway: GatewayId,
        /// The rooms.
        rooms: Vec<RoomId>,
    },
    /// The gateways hosting sessions of a user (owner of the user).
    UserGateways {
        /// The user.
        user: UserId,
    },
    /// Whether these users have a connected session (owner of the users).
    Online {
        /// The users.
        users: Vec<UserId>,
    },
    /// Reread a room from the store (owner of the room), after a block changed.
    ReloadRoom {
        /// The room.
        room: RoomId,
    },
    /// Create or update users (any node).
    ImportUsers {
        /// Their profiles.
        users: Vec<Profile>,
    },
}

/// A node's answer.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum NodeResponse {
    /// To `Ping`.
    Pong {
        /// The node's id.
        node: NodeId,
        /// Its current ring version.
        ring_version: u64,
        /// Changes every time the node process starts: a node that restarted lost its sessions
        /// and subscriptions, even if nobody saw it gone.
        #[serde(default)]
        incarnation: u64,
        /// The node is shutting down: it is no longer part of the live ring, and answers
        /// `not_owner` for the keys it handed over.
        #[serde(default)]
        draining: bool,
    },
    /// To `Connect`: the user's rooms and pending notifications.
    Connected {
        /// What the session learns.
        connected: Box<Connected>,
    },
    /// To `Online`, in the order asked.
    Online {
        /// Online or not.
        online: Vec<bool>,
    },
    /// To `ImportUsers`.
    Imported {
        /// How many.
        count: usize,
    },
    /// To `Execute`.
    Reply {
        /// The reply.
        reply: Box<Reply>,
    },
    /// To `UserGateways`.
    Gateways {
        /// Gateway ids.
        gateways: Vec<GatewayId>,
    },
    /// Done (disconnect, subscribe, unsubscribe).
    Done,
}

/// The answer to a [`CallRequest`]: a response or a Palaver error (a `not_owner` error names the
/// owner this node knows).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CallResponse {
    /// Outcome.
    pub result: Result<NodeResponse, Error>,
}
