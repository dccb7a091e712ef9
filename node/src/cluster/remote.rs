//! [`NodeApi`] for gateway processes: every call routed to the owner of its key.

use super::Cluster;
use super::wire::{NodeRequest, NodeResponse};
use crate::api::NodeApi;
use crate::ring::RingKey;
use crate::user::{Connected, SessionInfo};
use async_trait::async_trait;
use schema::{Command, Error, GatewayId, Profile, Reply, RoomId, SessionId, UserId};
use std::collections::BTreeMap;
use std::sync::Arc;

/// The nodes of a cluster, seen from a gateway.
pub struct RemoteNodes {
    cluster: Arc<Cluster>,
}

impl RemoteNodes {
    /// Routes through `cluster`.
    pub fn new(cluster: Arc<Cluster>) -> Self {
        Self { cluster }
    }
}

fn unexpected(r: NodeResponse) -> Error {
    Error::internal(format!("unexpected node answer {r:?}"))
}

/// The ring key a command is routed by: the room for room commands (its single writer), the
/// pair's smaller user id for friendship changes (one node serialises a pair's changes), the
/// caller otherwise.
pub fn command_key(caller: &UserId, cmd: &Command) -> RingKey {
    if let Some(room) = cmd.room() {
        return RingKey::Room(room);
    }
    match cmd {
        Command::Friend { peer, .. } => RingKey::User(caller.min(peer).clone()),
        _ => RingKey::User(caller.clone()),
    }
}

impl RemoteNodes {
    async fn per_owner(&self, gateway: &GatewayId, rooms: Vec<RoomId>, subscribe: bool) {
        let ring = self.cluster.ring();
        let mut groups: BTreeMap<schema::NodeId, Vec<RoomId>> = BTreeMap::new();
        for room in rooms {
            if let Some(owner) = ring.owner(&RingKey::Room(room)) {
                groups.entry(owner.clone()).or_default().push(room);
            }
        }
        for (_, rooms) in groups {
            let key = RingKey::Room(rooms[0]);
            let body = if subscribe {
                NodeRequest::Subscribe {
                    gateway: gateway.clone(),
                    rooms: rooms.clone(),
                }
            } else {
                NodeRequest::Unsubscribe {
                    gateway: gateway.clone(),
                    rooms: rooms.clone(),
                }
            };
            if let Err(e) = self.cluster.call(&key, body, true).await {
                // A not_owner mid-change: one room at a time finds each owner.
                tracing::debug!(error = %e, "batched (un)subscribe failed; going room by room");
                for room in rooms {
                    let body = if subscribe {
                        NodeRequest::Subscribe {
                            gateway: gateway.clone(),
                            rooms: vec![room],
                        }
                    } else {
                        NodeRequest::Unsubscribe {
                            gateway: gateway.clone(),
                            rooms: vec![room],
                        }
                    };
                    if let Err(e) = self.cluster.call(&RingKey::Room(room), body, true).await {
                        tracing::warn!(%room, error = %e, "(un)subscribe failed");
                    }
                }
            }
        }
    }
}

#[async_trait]
impl NodeApi for RemoteNodes {
    async fn connect(&self, profile: Profile, session: SessionInfo) -> Result<Connected, Error> {
        let key = RingKey::User(profile.id.clone());
        match self
            .cluster
            .call(&key, NodeRequest::Connect { profile, session }, true)
            .await?
        {
            NodeResponse::Connected { connected } => Ok(*connected),
            other => Err(unexpected(other)),
        }
    }

    async fn import_users(&self, users: Vec<Profile>) -> Result<usize, Error> {
        // Users live in the shared store: any node can write them; route by the first id.
        let Some(first) = users.first() else {
            return Ok(0);
        };
        let key = RingKey::User(first.id.clone());
        match self
            .cluster
            .call(&key, NodeRequest::ImportUsers { users }, true)
            .await?
        {
            NodeResponse::Imported { count } => Ok(count),
            other => Err(unexpected(other)),
        }
    }

    async fn disconnect(&self, user: &UserId, gateway: &GatewayId, session: SessionId) {
        let key = RingKey::User(user.clone());
        let body = NodeRequest::Disconnect {
            user: user.clone(),
            gateway: gateway.clone(),
            session,
        };
        if let Err(e) = self.cluster.call(&key, body, true).await {
            tracing::warn!(%user, error = %e, "disconnect not recorded");
        }
    }

    async fn execute(&self, caller: &UserId, cmd: Command) -> Result<Reply, Error> {
        let key = command_key(caller, &cmd);
        // Creating a group twice, or leaving twice, is not harmless: retry those only when they
        // surely did not run.
        let idempotent = !matches!(
            cmd,
            Command::CreateGroup { .. }
                | Command::Leave { .. }
                | Command::RemoveMember { .. }
                | Command::Friend { .. }
        );
        let auto_ref = match &cmd {
            Command::Send {
                client_ref: None, ..
            } => Some(format!("{:016x}", rand_u64())),
            _ => None,
        };
        let body = NodeRequest::Execute {
            caller: caller.clone(),
            command: cmd,
            auto_ref,
        };
        match self.cluster.call(&key, body, idempotent).await? {
            NodeResponse::Reply { reply } => Ok(*reply),
            other => Err(unexpected(other)),
        }
    }

    async fn subscribe(&self, gateway: &GatewayId, rooms: Vec<RoomId>) {
        self.per_owner(gateway, rooms, true).await;
    }

    async fn unsubscribe(&self, gateway: &GatewayId, rooms: Vec<RoomId>) {
        self.per_owner(gateway, rooms, false).await;
    }
}

fn rand_u64() -> u64 {
    use std::hash::{BuildHasher, RandomState};
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    RandomState::new().hash_one(N.fetch_add(1, Ordering::Relaxed))
}
