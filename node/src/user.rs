//! Users on their owner node: connects and disconnects, the session table, presence.
//!
//! A connect refreshes the user's profile from the token's claims and records the session
//! (which gateway, which dialect, which device); a disconnect removes it, and the last one
//! stores `last_seen`. Presence follows: online while any session is connected.
//!
//! One user's connects and disconnects run one at a time, under the user's entry in
//! [`UserLocks`], which exists only while one of them runs or waits. (They ran in a `ractor`
//! actor per user before: its two unbounded mailboxes, processing loop and idle ticker cost
//! about 7 KB per online user, 40% of an idle session's memory, and an actor start per connect
//! for nothing a lock does not do; the state it held was reread from the store on every
//! connect anyway.)
//!
//! The session list lives in the node's [`SessionTable`]; the gateways are the truth behind it
//! and re-register after a ring change.

use crate::NodeCtx;
use crate::ids::unix_ms;
use dashmap::DashMap;
use schema::{Error, GatewayId, Profile, RoomId, SessionId, UserId};
use std::sync::Arc;

/// One connected session of a user.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SessionInfo {
    /// The gateway holding the socket.
    pub gateway: GatewayId,
    /// The session on that gateway.
    pub session: SessionId,
    /// The wire dialect ("native", ...); borrowed from the gateway's static names (no
    /// allocation per session), owned when it arrives over the cluster transport.
    pub dialect: std::borrow::Cow<'static, str>,
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
        // Most users have one session: room for exactly one more, not the four a first push
        // reserves (80 bytes each, per online user).
        e.reserve_exact(1);
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

/// The per-user locks that serialize a user's connects and disconnects on its owner node. An
/// entry exists only while its user's connect or disconnect runs or waits, so an idle online
/// user costs nothing here.
#[derive(Default)]
pub struct UserLocks {
    locks: DashMap<UserId, Arc<tokio::sync::Mutex<()>>>,
}

/// Holds a user's lock; dropping it forgets the entry when nobody else holds or waits for it.
pub struct UserGuard<'a> {
    locks: &'a UserLocks,
    user: UserId,
    guard: Option<tokio::sync::OwnedMutexGuard<()>>,
}

impl UserLocks {
    /// Waits for `user`'s turn.
    pub async fn lock(&self, user: &UserId) -> UserGuard<'_> {
        let lock = self.locks.entry(user.clone()).or_default().clone();
        // Built before the wait, so that a wait given up (a caller's deadline) forgets the
        // entry too.
        let mut held = UserGuard {
            locks: self,
            user: user.clone(),
            guard: None,
        };
        held.guard = Some(lock.lock_owned().await);
        held
    }

    /// Users whose connect or disconnect runs or waits, with how many (the running one
    /// included), most first (at most `max`).
    pub fn busy(&self, max: usize) -> Vec<(UserId, usize)> {
        let mut out: Vec<(UserId, usize)> = self
            .locks
            .iter()
            .map(|e| {
                (
                    e.key().clone(),
                    Arc::strong_count(e.value()).saturating_sub(1),
                )
            })
            .filter(|(_, n)| *n > 0)
            .collect();
        out.sort_by_key(|e| std::cmp::Reverse(e.1));
        out.truncate(max);
        out
    }

    /// Number of users with a connect or disconnect running or waiting.
    pub fn len(&self) -> usize {
        self.locks.len()
    }

    /// Whether no connect or disconnect runs.
    pub fn is_empty(&self) -> bool {
        self.locks.is_empty()
    }
}

impl Drop for UserGuard<'_> {
    fn drop(&mut self) {
        drop(self.guard.take());
        // The map's own reference is the only one left: nobody holds or waits. (A caller
        // about to wait clones the entry under the same shard lock this check takes.)
        self.locks
            .locks
            .remove_if(&self.user, |_, l| Arc::strong_count(l) == 1);
    }
}

/// Records a connecting session of `user` (the caller holds the user's lock): refreshes the
/// profile from the token's claims, reads the user's rooms and takes the pending
/// notifications. The session enters the table last, after every store call, so a connect
/// given up half way (its caller's deadline) leaves no session behind.
pub(crate) async fn connect(
    ctx: &NodeCtx,
    profile: Profile,
    session: SessionInfo,
) -> Result<Connected, Error> {
    let id = profile.id.clone();
    // A claim the token does not carry keeps the stored value (an admin import, say).
    let stored = ctx.store.user(&id).await?;
    let mut profile = profile;
    if let Some(u) = &stored {
        let old = &u.profile;
        profile.username = profile.username.or_else(|| old.username.clone());
        profile.name = profile.name.or_else(|| old.name.clone());
        profile.avatar = profile.avatar.or_else(|| old.avatar.clone());
    }
    if stored.as_ref().map(|u| &u.profile) != Some(&profile) {
        ctx.store.upsert_user(&profile, unix_ms()).await?;
    }
    let rooms = ctx.store.room_ids_of(&id).await?;
    let pending = if session.takes_pending {
        ctx.store.take_pending(&id).await?
    } else {
        Vec::new()
    };
    let first = !ctx.sessions.is_online(&id);
    ctx.sessions.add(&id, session);
    Ok(Connected {
        rooms,
        pending,
        first,
    })
}

/// Removes a closed session of `user` (the caller holds the user's lock); when it was the
/// last, stores `last_seen` and answers when the user went offline.
pub(crate) async fn disconnect(
    ctx: &NodeCtx,
    user: &UserId,
    gateway: &GatewayId,
    session: SessionId,
) -> Option<schema::Millis> {
    if !ctx.sessions.remove(user, gateway, session) {
        return None;
    }
    // Last session gone: the user is offline from now.
    let now = unix_ms();
    if let Err(e) = ctx.store.set_last_seen(user, now).await {
        tracing::warn!(%user, error = %e, "cannot store last_seen");
    }
    Some(now)
}
