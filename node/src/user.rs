//! The user actor: one per online (or recently active) user.
//!
//! It refreshes the user's profile from token claims on connect, tracks the user's sessions
//! (which gateway, which dialect, which device) and so their presence: online while any session
//! is connected, `last_seen` stored when the last one closes.
//!
//! The session list lives in the node's [`SessionTable`], written only by this actor, so a crashed
//! user actor restarts with its sessions intact (the gateways are the truth behind the table and
//! re-register after a ring change).

use crate::NodeCtx;
use crate::ids::unix_ms;
use dashmap::DashMap;
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use schema::{Error, GatewayId, Profile, RoomId, SessionId, User, UserId};
use std::sync::Arc;
use std::time::Instant;

/// One connected session of a user.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SessionInfo {
    /// The gateway holding the socket.
    pub gateway: GatewayId,
    /// The session on that gateway.
    pub session: SessionId,
    /// The wire dialect ("native", ...).
    pub dialect: String,
    /// The client's device id, if it named one.
    pub device: Option<String>,
    /// Whether the session shows pending notifications: connecting takes (and so clears) them
    /// only then. A dialect with no event for them (the Socket.IO ones) leaves them for a
    /// device that can show them.
    #[serde(default = "yes")]
    pub takes_pending: bool,
}

fn yes() -> bool {
    true
}

/// User -> connected sessions, for the users this node owns.
#[derive(Default)]
pub struct SessionTable {
    users: DashMap<UserId, Vec<SessionInfo>>,
}

impl SessionTable {
    /// The sessions of `user`.
    pub fn sessions(&self, user: &UserId) -> Vec<SessionInfo> {
        self.users.get(user).map(|s| s.clone()).unwrap_or_default()
    }

    /// The gateways hosting sessions of `user`.
    pub fn gateways(&self, user: &UserId) -> Vec<GatewayId> {
        let mut g: Vec<GatewayId> = self
            .users
            .get(user)
            .map(|s| s.iter().map(|s| s.gateway.clone()).collect())
            .unwrap_or_default();
        g.sort();
        g.dedup();
        g
    }

    /// Whether `user` has a connected session.
    pub fn is_online(&self, user: &UserId) -> bool {
        self.users.get(user).is_some_and(|s| !s.is_empty())
    }

    /// Forgets the sessions of users for which `keep` is false (users this node no longer owns).
    pub fn retain(&self, keep: impl Fn(&UserId) -> bool) {
        self.users.retain(|u, _| keep(u));
    }

    /// Number of users with a connected session.
    pub fn online_users(&self) -> usize {
        self.users.len()
    }

    fn add(&self, user: &UserId, s: SessionInfo) {
        let mut e = self.users.entry(user.clone()).or_default();
        e.retain(|x| !(x.gateway == s.gateway && x.session == s.session));
        e.push(s);
    }

    /// Removes a session; returns whether the user has none left.
    fn remove(&self, user: &UserId, gateway: &GatewayId, session: SessionId) -> bool {
        self.users
            .remove_if_mut(user, |_, v| {
                v.retain(|x| !(&x.gateway == gateway && x.session == session));
                v.is_empty()
            })
            .is_some()
            || !self.users.contains_key(user)
    }
}

/// What a connecting session learns.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Connected {
    /// The user's rooms (the gateway subscribes them).
    pub rooms: Vec<RoomId>,
    /// Notifications recorded while the user had no session viewing their rooms; taken (so
    /// cleared) by this connect.
    #[serde(default)]
    pub pending: Vec<schema::Notification>,
    /// This session is the user's only one: the user just came online.
    #[serde(default)]
    pub first: bool,
}

/// Messages of a user actor.
pub enum UserMsg {
    /// A session of the user connected: refresh the profile, record the session, answer the
    /// user's room ids.
    Connect {
        /// Claims of the token.
        profile: Profile,
        /// The session.
        session: SessionInfo,
        /// The user's rooms and pending notifications.
        reply: RpcReplyPort<Result<Connected, Error>>,
    },
    /// A session closed.
    Disconnect {
        /// Its gateway.
        gateway: GatewayId,
        /// The session.
        session: SessionId,
        /// When the user went offline, if this was the last session.
        reply: RpcReplyPort<Option<schema::Millis>>,
    },
    /// Periodic idle check.
    Tick,
}

/// Builds user actors for the directory.
pub struct UserSpec {
    pub(crate) ctx: Arc<NodeCtx>,
}

impl crate::directory::ChildSpec for UserSpec {
    type Key = UserId;
    type Child = UserActor;
    const KIND: &'static str = "user";
    fn make(&self, key: &UserId) -> (UserActor, UserId) {
        (
            UserActor {
                ctx: self.ctx.clone(),
            },
            key.clone(),
        )
    }
}

/// The user actor.
pub struct UserActor {
    ctx: Arc<NodeCtx>,
}

/// A user actor's state.
pub struct UserState {
    id: UserId,
    user: Option<User>,
    last_activity: Instant,
    ticker: tokio::task::JoinHandle<()>,
}

impl Actor for UserActor {
    type Msg = UserMsg;
    type State = UserState;
    type Arguments = UserId;

    async fn pre_start(
        &self,
        myself: ActorRef<UserMsg>,
        id: UserId,
    ) -> Result<UserState, ActorProcessingErr> {
        let user = self.ctx.store.user(&id).await?;
        let every = self
            .ctx
            .config
            .user_idle_timeout
            .min(self.ctx.config.idle_timeout)
            / 2;
        let ticker = myself.send_interval(every, || UserMsg::Tick);
        Ok(UserState {
            id,
            user,
            last_activity: Instant::now(),
            ticker,
        })
    }

    async fn post_stop(
        &self,
        _myself: ActorRef<UserMsg>,
        st: &mut UserState,
    ) -> Result<(), ActorProcessingErr> {
        st.ticker.abort();
        Ok(())
    }

    async fn handle(
        &self,
        myself: ActorRef<UserMsg>,
        msg: UserMsg,
        st: &mut UserState,
    ) -> Result<(), ActorProcessingErr> {
        if !matches!(msg, UserMsg::Tick) {
            // The idle check itself is no activity (it used to be, and user actors never
            // stopped).
            st.last_activity = Instant::now();
        }
        match msg {
            UserMsg::Connect {
                profile,
                session,
                reply,
            } => {
                let res = self.connect(st, profile, session).await;
                if reply.send(res).is_err() {
                    tracing::debug!(user = %st.id, "connect caller went away");
                }
            }
            UserMsg::Disconnect {
                gateway,
                session,
                reply,
            } => {
                let mut offline = None;
                if self.ctx.sessions.remove(&st.id, &gateway, session) {
                    // Last session gone: the user is offline from now.
                    let now = unix_ms();
                    offline = Some(now);
                    if let Err(e) = self.ctx.store.set_last_seen(&st.id, now).await {
                        tracing::warn!(user = %st.id, error = %e, "cannot store last_seen");
                    }
                }
                if reply.send(offline).is_err() {
                    tracing::debug!(user = %st.id, "disconnect caller went away");
                }
            }
            UserMsg::Tick => {
                // Offline users keep their actor for `idle_timeout`; online ones for
                // `user_idle_timeout` (their sessions stay in the session table).
                let idle = st.last_activity.elapsed();
                let limit = if self.ctx.sessions.is_online(&st.id) {
                    self.ctx.config.user_idle_timeout
                } else {
                    self.ctx.config.idle_timeout
                };
                if idle >= limit {
                    myself.stop(Some("idle".into()));
                }
            }
        }
        Ok(())
    }
}

impl UserActor {
    async fn connect(
        &self,
        st: &mut UserState,
        profile: Profile,
        session: SessionInfo,
    ) -> Result<Connected, Error> {
        // A claim the token does not carry keeps the stored value (an admin import, say); the
        // stored user is reread because an import may have changed it behind this actor.
        st.user = self.ctx.store.user(&st.id).await?;
        let mut profile = profile;
        if let Some(u) = &st.user {
            let old = &u.profile;
            profile.username = profile.username.or_else(|| old.username.clone());
            profile.name = profile.name.or_else(|| old.name.clone());
            profile.avatar = profile.avatar.or_else(|| old.avatar.clone());
        }
        if st.user.as_ref().map(|u| &u.profile) != Some(&profile) {
            st.user = Some(self.ctx.store.upsert_user(&profile, unix_ms()).await?);
        }
        let rooms = self.ctx.store.room_ids_of(&st.id).await?;
        let pending = if session.takes_pending {
            self.ctx.store.take_pending(&st.id).await?
        } else {
            Vec::new()
        };
        let first = !self.ctx.sessions.is_online(&st.id);
        self.ctx.sessions.add(&st.id, session);
        Ok(Connected {
            rooms,
            pending,
            first,
        })
    }
}
