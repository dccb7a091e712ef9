//! # palaver-node: where the business rules live
//!
//! A node hosts the actors that own Palaver's state and enforces every rule once, for every
//! dialect:
//!
//! - [`ring`]: the consistent-hash ring. Every call to an actor is routed by
//!   `ring.owner(key)`; a key owned elsewhere answers `not_owner`.
//! - [`room`]: one actor per active room, its single writer: validates, deduplicates by
//!   `client_ref`, assigns ids and sequence numbers, writes to the store, acknowledges, then fans
//!   out to the gateways subscribed to the room.
//! - [`user`]: one actor per online user: profile from token claims, sessions, presence.
//! - [`directory`]: starts actors on first use, stops them when idle, restarts them when they
//!   crash (state is reloaded from the store).
//! - [`store`]: the `Store` trait and the embedded SQLite backend.
//! - [`bus`]: the `Bus` trait and the in-process backend; carries deliveries to gateways.
//! - [`subscriptions`]: which gateways want which room's events.
//! - [`trace`]: the message's trace context (W3C `traceparent`) across RPC calls, the bus and
//!   the room actor, when the binary exports spans.
//!
//! Data flow of a message: the gateway calls [`Node::execute`] with a `Command::Send` -> the
//! room actor checks membership -> its sequencer writes a batch to the store -> ack -> one
//! `Delivery` per subscribed gateway on the bus -> each gateway writes to its sessions.

pub mod api;
pub mod bus;
pub mod cluster;
pub mod directory;
mod domain;
pub mod ids;
pub mod limits;
pub mod ring;
pub mod room;
pub mod store;
pub mod subscriptions;
pub mod trace;
pub mod user;

use bus::Bus;
use directory::Directory;
use ids::{IdGenerator, unix_ms};
use parking_lot::RwLock;
use ring::{Ring, RingKey};
use room::{RoomMsg, RoomSpec};
use schema::command::check_client_ref;
use schema::{
    Command, Delivery, Error, ErrorCode, Event, GatewayId, HistoryQuery, Member, Message, NodeId,
    Profile, Reply, Role, Room, RoomId, RoomKind, RoomSummary, SessionId, Target, UserId,
};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;
use store::{NewRoom, Store};
use subscriptions::Subscriptions;
use tokio_util::task::TaskTracker;
use user::{Connected, SessionInfo, SessionTable, UserLocks};

/// Prefix of the `client_ref` the node generates for a send that came without one (so that
/// internal retries stay idempotent). It starts with a control character, which client refs may
/// not contain, and is never shown to clients.
pub const AUTO_REF_PREFIX: &str = "\u{1}auto:";

/// Users of one admin import written at once (the embedded store commits them together).
const IMPORT_CONCURRENCY: usize = 64;

/// A message as clients see it: without a node-generated `client_ref`.
pub fn public(mut m: Message) -> Message {
    if m.client_ref
        .as_deref()
        .is_some_and(|r| r.starts_with(AUTO_REF_PREFIX))
    {
        m.client_ref = None;
    }
    m
}

/// Tunables of a node. Every field has a production default ([`NodeConfig::default`]).
#[derive(Clone, Debug)]
pub struct NodeConfig {
    /// This node's id on the ring. Default `local`.
    pub node_id: NodeId,
    /// Id generator slot, 0..64, unique per node. Default 0.
    pub id_slot: u16,
    /// An actor with nothing to do for this long stops. Default 5 minutes.
    pub idle_timeout: Duration,
    /// Deadline of one call to an actor. Default 10 s.
    pub call_timeout: Duration,
    /// Calls in flight per actor before callers wait (bounds each mailbox). Default 4096.
    pub actor_mailbox: usize,
    /// Sends queued between a room actor and its sequencer. Default 4096.
    pub sequencer_queue: usize,
    /// Most messages written in one store call by a room. Default 256.
    pub sequencer_batch: usize,
    /// Recent `(sender, client_ref)` kept per active room before asking the store. Default 4096.
    pub dedup_window: usize,
    /// Longest text message, in characters. Default 4096.
    pub max_text_chars: usize,
    /// Most members of a group, creator included. Default 10 000.
    pub group_max_members: usize,
    /// History page size when the client gives none. Default 50.
    pub history_default_limit: u32,
    /// Largest history page; bigger requests are clamped. Default 200.
    pub history_max_limit: u32,
    /// Longest media caption, in characters. Default 1024.
    pub max_caption_chars: usize,
    /// Longest media reference or avatar, in bytes. Default 1024.
    pub max_media_ref_len: usize,
    /// Most rooms one user may belong to. Default 10 000.
    pub max_rooms_per_user: usize,
    /// Messages per second per user (token bucket refill). Default 20.
    pub messages_per_second: u32,
    /// Messages a user may send in a burst. Default 40.
    pub message_burst: u32,
    /// Typing events per second per user. Default 2.
    pub typing_per_second: u32,
    /// Typing events in a burst. Default 5.
    pub typing_burst: u32,
    /// A typing state without a refresh ends after this long. Default 5 s.
    pub typing_ttl: Duration,
    /// Deliveries per second one room may cause (its fan-out budget): a room takes messages at
    /// most this divided by its member count per second (one message at any size after a
    /// quiet spell), so one busy big room cannot take every gateway's delivery capacity; a
    /// send past it is refused `rate_limited`. 0: unlimited. Default 50 000 (a 10 000-member
    /// group takes 5 messages/s, a 100-member one 500).
    pub room_fanout_per_second: u32,
    /// Presence changes go to co-members of groups up to this size. Default 50.
    pub presence_group_max: usize,
    /// Pending notifications kept per user (the oldest go). Default 100.
    pub pending_per_user: u32,
    /// Pending notifications are recorded for rooms up to this many members. Default 1000.
    pub pending_room_max: usize,
    /// Push jobs are made for rooms up to this many members. Default 10000.
    pub push_room_max: usize,
    /// Most events one replay returns; further behind, the client must resync. Default 1000.
    pub replay_max: u32,
    /// Unread counts stop at this number. Default 999.
    pub unread_cap: u32,
    /// Chat list page size when the client gives none. Default 50 (max 200).
    pub chats_default_limit: u32,
}

impl Default for NodeConfig {
    fn default() -> Self {
        Self {
            node_id: NodeId::new("local"),
            id_slot: 0,
            idle_timeout: Duration::from_secs(300),
            call_timeout: Duration::from_secs(10),
            actor_mailbox: 4096,
            sequencer_queue: 4096,
            sequencer_batch: 256,
            dedup_window: 4096,
            max_text_chars: 4096,
            group_max_members: 10_000,
            history_default_limit: 50,
            history_max_limit: 200,
            max_caption_chars: 1024,
            max_media_ref_len: 1024,
            max_rooms_per_user: 10_000,
            messages_per_second: 20,
            message_burst: 40,
            typing_per_second: 2,
            typing_burst: 5,
            typing_ttl: Duration::from_secs(5),
            room_fanout_per_second: 50_000,
            presence_group_max: 50,
            pending_per_user: 100,
            pending_room_max: 1000,
            push_room_max: 10_000,
            replay_max: 1000,
            unread_cap: 999,
            chats_default_limit: 50,
        }
    }
}

/// What the actors of a node share.
pub struct NodeCtx {
    /// Tunables.
    pub config: NodeConfig,
    /// The store.
    pub store: Arc<dyn Store>,
    /// The bus.
    pub bus: Arc<dyn Bus>,
    /// The id generator.
    pub ids: IdGenerator,
    /// Room -> subscribed gateways.
    pub subscriptions: Subscriptions,
    /// User -> sessions.
    pub sessions: SessionTable,
    /// Background tasks (room sequencers) to wait for on shutdown.
    pub tasks: TaskTracker,
    /// Per-user rate limits.
    pub limits: limits::Limits,
    room_locks: dashmap::DashMap<RoomId, Arc<tokio::sync::Mutex<()>>>,
    pair_locks: dashmap::DashMap<String, Arc<tokio::sync::Mutex<()>>>,
    /// The node these actors run in (set once it exists), for what needs the cluster view,
    /// such as which users are online anywhere.
    node: std::sync::OnceLock<std::sync::Weak<Node>>,
}

/// Checks a push token: 1 to 4096 printable ASCII bytes.
fn check_device_token(token: &str) -> Result<(), Error> {
    if token.is_empty() || token.len() > 4096 {
        return Err(Error::invalid("token must be 1 to 4096 bytes"));
    }
    if !token.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(Error::invalid(
            "token must be printable ASCII without spaces",
        ));
    }
    Ok(())
}

impl NodeCtx {
    /// Which of `users` have a session anywhere in the cluster (asking their owners). While
    /// the node is not fully started, or shutting down, nobody counts as online.
    pub async fn online_of(&self, users: &[UserId]) -> std::collections::HashMap<UserId, bool> {
        match self.node.get().and_then(std::sync::Weak::upgrade) {
            Some(node) => node.online_of(users).await,
            None => users.iter().map(|u| (u.clone(), false)).collect(),
        }
    }

    /// The lock a room's sequencer holds for its lifetime.
    fn room_lock(&self, room: RoomId) -> Arc<tokio::sync::Mutex<()>> {
        self.room_locks.entry(room).or_default().clone()
    }

    /// Forgets a room's lock when nobody holds or waits for it.
    fn release_room_lock(&self, room: RoomId) {
        self.room_locks
            .remove_if(&room, |_, l| Arc::strong_count(l) == 1);
    }
}

/// A node: the actors and the routing in front of them.
pub struct Node {
    ctx: Arc<NodeCtx>,
    /// Set when the process begins to shut down: peers leave it out of the ring.
    draining: std::sync::atomic::AtomicBool,
    ring: RwLock<Arc<Ring>>,
    peers: std::sync::OnceLock<Arc<cluster::Cluster>>,
    rooms: Directory<RoomSpec>,
    /// One connect or disconnect at a time per user.
    users: UserLocks,
}

impl Node {
    /// Starts a node alone on its ring (single-process mode).
    pub async fn start(
        config: NodeConfig,
        store: Arc<dyn Store>,
        bus: Arc<dyn Bus>,
    ) -> Result<Arc<Self>, Error> {
        let ring = Ring::new(1, [config.node_id.clone()]);
        ring.export_metrics(&config.node_id, None);
        let ctx = Arc::new(NodeCtx {
            ids: IdGenerator::new(config.id_slot),
            store,
            bus,
            subscriptions: Subscriptions::default(),
            sessions: SessionTable::default(),
            tasks: TaskTracker::new(),
            limits: limits::Limits::new(&config),
            room_locks: dashmap::DashMap::new(),
            pair_locks: dashmap::DashMap::new(),
            node: std::sync::OnceLock::new(),
            config,
        });
        let timeout = ctx.config.call_timeout;
        let mailbox = ctx.config.actor_mailbox;
        let rooms = Directory::start(RoomSpec { ctx: ctx.clone() }, mailbox, timeout).await?;
        let node = Arc::new(Self {
            ctx,
            draining: std::sync::atomic::AtomicBool::new(false),
            ring: RwLock::new(Arc::new(ring)),
            peers: std::sync::OnceLock::new(),
            rooms,
            users: UserLocks::default(),
        });
        let _first = node.ctx.node.set(Arc::downgrade(&node));
        Ok(node)
    }

    /// The shared context (store, bus, tables).
    pub fn ctx(&self) -> &Arc<NodeCtx> {
        &self.ctx
    }

    /// The current ring.
    pub fn ring(&self) -> Arc<Ring> {
        self.ring.read().clone()
    }

    /// Replaces the ring (membership change). Calls routed from now on use the new ring; keys
    /// this node no longer owns answer `not_owner`.
    ///
    /// Actors, sessions and subscriptions of keys this node no longer owns are dropped: their new
    /// owner reloads them from the store, and gateways re-register with it.
    pub fn set_ring(&self, ring: Arc<Ring>) {
        let me = self.ctx.config.node_id.clone();
        let owns = |k: &RingKey| ring.owner(k) == Some(&me);
        self.rooms.retain(|r| owns(&RingKey::Room(*r)));
        self.ctx
            .sessions
            .retain(|u| owns(&RingKey::User(u.clone())));
        self.ctx.subscriptions.retain(|r| owns(&RingKey::Room(r)));
        ring.export_metrics(&me, Some(self.ring().version()));
        *self.ring.write() = ring;
    }

    /// Starts the hand-over before a shutdown: health pings answer `draining`, so every
    /// process (this one included) builds its ring without this node, and its actors stop as
    /// their keys move.
    pub fn begin_drain(&self) {
        self.draining
            .store(true, std::sync::atomic::Ordering::SeqCst);
    }

    /// Whether [`Node::begin_drain`] was called.
    pub fn is_draining(&self) -> bool {
        self.draining.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// What the node is doing now, for an operator looking at a stuck room (`GET /debug/state`
    /// of a node process): its ring, its actors, the busiest ones (calls in flight), and the
    /// rooms whose sequencer lock is held or awaited (a restarted room actor's sequencer waits
    /// there for the previous one to finish).
    pub fn debug_state(&self) -> serde_json::Value {
        let ring = self.ring();
        let locks: Vec<serde_json::Value> = self
            .ctx
            .room_locks
            .iter()
            .map(|e| {
                let lock = e.value();
                serde_json::json!({
                    "room": e.key(),
                    "held": lock.try_lock().is_err(),
                    // The map's own reference and this one aside.
                    "users": Arc::strong_count(lock).saturating_sub(1),
                })
            })
            .collect();
        let busy = |v: Vec<(String, usize)>| -> Vec<serde_json::Value> {
            v.into_iter()
                .map(|(k, n)| serde_json::json!({"key": k, "calls": n}))
                .collect()
        };
        serde_json::json!({
            "node": self.ctx.config.node_id,
            "draining": self.is_draining(),
            "ring": {"version": ring.version(), "nodes": ring.nodes()},
            "rooms": self.rooms.len(),
            "users": self.ctx.sessions.online_users(),
            "busy_rooms": busy(self.rooms.busy(50).into_iter().map(|(k, n)| (k.to_string(), n)).collect()),
            "busy_users": busy(self.users.busy(50).into_iter().map(|(k, n)| (k.to_string(), n)).collect()),
            "room_locks": locks,
        })
    }

    /// Called with the ring version a caller routed by: when it differs from ours, refreshes
    /// the live set now (at most every 100 ms) instead of waiting for the next health round,
    /// and adopts the result.
    pub async fn sync_ring(&self, seen: u64) {
        if seen == 0 || seen == self.ring().version() {
            return;
        }
        let Some(peers) = self.peers.get() else {
            return;
        };
        if !peers.refresh_due(std::time::Duration::from_millis(100)) {
            return;
        }
        peers.refresh().await;
        let ring = peers.ring();
        if ring.version() != self.ring().version() {
            tracing::debug!(
                version = ring.version(),
                "ring caught up on a caller's version"
            );
            self.set_ring(ring);
        }
    }

    /// Joins this node to a cluster: `peers` reaches the owners of keys this node does not own.
    pub fn set_peers(&self, peers: Arc<cluster::Cluster>) {
        if self.peers.set(peers).is_err() {
            tracing::warn!("cluster peers were already set");
        }
    }

    fn owns(&self, key: &RingKey) -> bool {
        self.ring().owner(key) == Some(&self.ctx.config.node_id)
    }

    /// The running actor of `room`, if any (operations and tests).
    pub fn room_actor(&self, room: RoomId) -> Option<ractor::ActorRef<RoomMsg>> {
        self.rooms.get(&room)
    }

    /// Number of running room actors.
    pub fn active_rooms(&self) -> usize {
        self.rooms.len()
    }

    /// Number of users whose connect or disconnect runs or waits (operations and tests).
    pub fn busy_users(&self) -> usize {
        self.users.len()
    }

    /// Checks that this node owns `key` on the current ring.
    fn route(&self, key: &RingKey) -> Result<(), Error> {
        let ring = self.ring();
        match ring.owner(key) {
            Some(owner) if owner == &self.ctx.config.node_id => Ok(()),
            Some(owner) => Err(Error::new(
                ErrorCode::NotOwner,
                format!(
                    "{key:?} is owned by node {owner} (ring version {})",
                    ring.version()
                ),
            )),
            None => Err(Error::unavailable("the ring has no nodes")),
        }
    }

    async fn call_room<R, F>(&self, room: RoomId, build: F) -> Result<R, Error>
    where
        R: Send + 'static,
        F: Fn(ractor::RpcReplyPort<R>) -> RoomMsg,
    {
        self.route(&RingKey::Room(room))?;
        self.rooms.call(&room, build).await
    }

    /// A session connected: refreshes the user from the token's claims, records the session and
    /// answers the user's room ids (which the gateway subscribes). The user's connects and
    /// disconnects run one at a time, so presence changes go out in the order they happened.
    pub async fn connect(
        &self,
        profile: Profile,
        session: SessionInfo,
    ) -> Result<Connected, Error> {
        let user = profile.id.clone();
        self.route(&RingKey::User(user.clone()))?;
        let deadline = tokio::time::Instant::now() + self.ctx.config.call_timeout;
        let _turn = self.user_turn(&user, deadline).await?;
        let connected =
            tokio::time::timeout_at(deadline, user::connect(&self.ctx, profile, session))
                .await
                .map_err(|_| {
                    Error::new(
                        ErrorCode::Timeout,
                        format!("connecting user {user} did not finish in time"),
                    )
                })??;
        if connected.first {
            self.presence_changed(&user, true, None).await;
        }
        Ok(connected)
    }

    /// Waits (until `deadline`) for `user`'s turn to connect or disconnect.
    async fn user_turn(
        &self,
        user: &UserId,
        deadline: tokio::time::Instant,
    ) -> Result<user::UserGuard<'_>, Error> {
        tokio::time::timeout_at(deadline, self.users.lock(user))
            .await
            .map_err(|_| {
                Error::new(
                    ErrorCode::Unavailable,
                    format!("user {user} is overloaded; retry later"),
                )
            })
    }

    /// Creates or updates users (admin import). Any node may run it: users live in the store.
    pub async fn import_users(&self, users: Vec<Profile>) -> Result<usize, Error> {
        const MAX: usize = 10_000;
        if users.len() > MAX {
            return Err(Error::new(
                ErrorCode::LimitExceeded,
                format!("import at most {MAX} users per call"),
            ));
        }
        for p in &users {
            for (field, v) in [
                ("username", &p.username),
                ("name", &p.name),
                ("avatar", &p.avatar),
            ] {
                if v.as_ref().is_some_and(|v| v.len() > 1024) {
                    return Err(Error::invalid(format!(
                        "user {}: {field} is longer than 1024 bytes",
                        p.id
                    )));
                }
            }
        }
        let now = unix_ms();
        // Concurrently, so that the store commits them in groups: one at a time, each user
        // was a commit (and an fsync) of its own, and an import of 200,000 users took minutes.
        use futures::{StreamExt, TryStreamExt};
        let n = users.len();
        futures::stream::iter(users)
            .map(|p| {
                let store = self.ctx.store.clone();
                async move { store.upsert_user(&p, now).await }
            })
            .buffer_unordered(IMPORT_CONCURRENCY)
            .try_for_each(|_| async { Ok(()) })
            .await?;
        Ok(n)
    }

    /// A session closed. Once its turn came, it runs to the end even if its caller goes away,
    /// so that `last_seen` and the offline presence are not lost half way.
    pub async fn disconnect(&self, user: &UserId, gateway: &GatewayId, session: SessionId) {
        if let Err(e) = self.route(&RingKey::User(user.clone())) {
            tracing::warn!(%user, error = %e, "disconnect not recorded");
            return;
        }
        let deadline = tokio::time::Instant::now() + self.ctx.config.call_timeout;
        let _turn = match self.user_turn(user, deadline).await {
            Ok(t) => t,
            Err(e) => {
                tracing::warn!(%user, error = %e, "disconnect not recorded");
                return;
            }
        };
        if let Some(at) = user::disconnect(&self.ctx, user, gateway, session).await {
            self.presence_changed(user, false, Some(at)).await;
        }
    }

    /// Executes `cmd` for `caller` (the authenticated user; nothing in the command can change
    /// who is speaking).
    pub async fn execute(&self, caller: &UserId, cmd: Command) -> Result<Reply, Error> {
        self.execute_with_ref(caller, cmd, None).await
    }

    /// [`Node::execute`], with the idempotency key a gateway chose for a send that came without
    /// `client_ref` (so that the gateway's retries of it stay idempotent).
    pub async fn execute_with_ref(
        &self,
        caller: &UserId,
        cmd: Command,
        auto_ref: Option<String>,
    ) -> Result<Reply, Error> {
        match cmd {
            Command::Send {
                room,
                body,
                client_ref,
                reply_to,
            } => {
                let client_ref = match client_ref {
                    Some(r) => {
                        check_client_ref(&r).map_err(Error::invalid)?;
                        r
                    }
                    None => match auto_ref {
                        Some(r) => format!("{AUTO_REF_PREFIX}{r}"),
                        None => format!("{AUTO_REF_PREFIX}{}", self.ctx.ids.next()),
                    },
                };
                self.route(&RingKey::Room(room))?;
                // Posting a stored file shares it with the room: only someone who may read it
                // (its uploader, or a member of a room it was posted in) may post it.
                if let Some(path) = body.media().map(|m| m.media.as_str())
                    && path.starts_with("/uploads/")
                {
                    self.media_access(caller, path).await.map_err(|e| {
                        Error::new(e.code, format!("cannot post {path}: {}", e.message))
                    })?;
                }
                self.ctx.limits.message(caller)?;
                // The room actor's part of the message's trace: it lives until the sequencer
                // has written, acknowledged and published the message.
                let span = crate::span!("room.send", room = %room, sender = %caller);
                let message = self
                    .call_room(room, |reply| RoomMsg::Send {
                        sender: caller.clone(),
                        body: body.clone(),
                        reply_to,
                        client_ref: client_ref.clone(),
                        span: span.clone(),
                        reply,
                    })
                    .await??;
                Ok(Reply::Message { message })
            }
            Command::Typing { room, .. } => {
                self.route(&RingKey::Room(room))?;
                self.ctx.limits.typing(caller)?;
                self.room_local(caller, room, cmd).await
            }
            Command::View { room, .. }
            | Command::MarkRead { room, .. }
            | Command::Mute { room, .. } => self.room_local(caller, room, cmd).await,
            Command::Members { room } | Command::Room { room } => {
                let reply = self.room_local(caller, room, cmd).await?;
                match reply {
                    Reply::Members { mut members } => {
                        self.fill_online(caller, &mut members).await;
                        Ok(Reply::Members { members })
                    }
                    Reply::Room { mut room, created } => {
                        self.fill_online(caller, &mut room.members).await;
                        Ok(Reply::Room { room, created })
                    }
                    other => Ok(other),
                }
            }
            Command::Edit { room, .. }
            | Command::Delete { room, .. }
            | Command::React { room, .. } => {
                self.route(&RingKey::Room(room))?;
                self.ctx.limits.message(caller)?;
                self.room_change(caller, room, cmd).await
            }
            Command::UpdateGroup { room, .. }
            | Command::AddMembers { room, .. }
            | Command::RemoveMember { room, .. }
            | Command::SetRole { room, .. }
            | Command::Join { room }
            | Command::Leave { room } => self.room_change(caller, room, cmd).await,
            Command::History { room, query } => self.history(caller, room, query).await,
            Command::Replay { room, after_seq } => self.replay(caller, room, after_seq).await,
            Command::OpenDirect { peer } => self.open_direct(caller, peer).await,
            Command::CreateGroup {
                name,
                members,
                avatar,
                public,
            } => {
                self.create_group(caller, name, members, avatar, public)
                    .await
            }
            Command::ListRooms => {
                let mut rooms = self.ctx.store.rooms_of(caller).await?;
                for r in &mut rooms {
                    r.last_message = r.last_message.take().map(public);
                }
                Ok(Reply::Rooms { rooms })
            }
            Command::Chats {
                direct_only,
                skip,
                limit,
            } => self.chats(caller, direct_only, skip, limit).await,
            Command::Friend { peer, action } => self.friend(caller, peer, action).await,
            Command::Friendships { all } => self.friendships(caller, all).await,
            Command::User { id, username } => self.lookup_user(caller, id, username).await,
            Command::TakePending => Ok(Reply::Notifications {
                notifications: self.ctx.store.take_pending(caller).await?,
            }),
            Command::AddUpload { upload } => {
                if &upload.uploader != caller {
                    return Err(Error::new(
                        schema::ErrorCode::Forbidden,
                        "an upload is recorded for its uploader only",
                    ));
                }
                self.ctx.store.add_upload(&upload).await?;
                Ok(Reply::Done)
            }
            Command::MediaAccess { path } => self.media_access(caller, &path).await,
            Command::AddDevice {
                platform,
                token,
                device_id,
            } => {
                check_device_token(&token)?;
                if let Some(d) = &device_id
                    && (d.is_empty() || d.len() > 128 || d.chars().any(char::is_control))
                {
                    return Err(Error::invalid(
                        "device_id must be 1 to 128 printable characters",
                    ));
                }
                let device = schema::Device {
                    user: caller.clone(),
                    platform,
                    token,
                    device_id,
                    created_at: crate::ids::unix_ms(),
                };
                self.ctx.store.add_device(&device).await?;
                Ok(Reply::Done)
            }
            Command::RemoveDevice { token } => {
                if self.ctx.store.remove_device(caller, &token).await? {
                    Ok(Reply::Done)
                } else {
                    Err(Error::not_found("no device of yours has this token"))
                }
            }
            Command::DirectHistory { peer, query } => {
                self.direct_history(caller, peer, query).await
            }
        }
    }

    /// May `caller` read the media at `path`: its uploader, or a member of a room it was
    /// posted in.
    async fn media_access(&self, caller: &UserId, path: &str) -> Result<Reply, Error> {
        let store = &self.ctx.store;
        let Some(upload) = store.upload(path).await? else {
            return Err(Error::not_found(format!("no upload at {path}")));
        };
        if &upload.uploader == caller {
            return Ok(Reply::Done);
        }
        let posted = store.media_rooms(path).await?;
        if !posted.is_empty() {
            let mine: std::collections::HashSet<RoomId> =
                store.room_ids_of(caller).await?.into_iter().collect();
            if posted.iter().any(|r| mine.contains(r)) {
                return Ok(Reply::Done);
            }
        }
        Err(Error::new(
            schema::ErrorCode::Forbidden,
            "this file was not shared in any of your rooms",
        ))
    }

    async fn room_local(
        &self,
        caller: &UserId,
        room: RoomId,
        cmd: Command,
    ) -> Result<Reply, Error> {
        self.call_room(room, |reply| RoomMsg::Local {
            caller: caller.clone(),
            cmd: cmd.clone(),
            reply,
        })
        .await?
    }

    async fn room_change(
        &self,
        caller: &UserId,
        room: RoomId,
        cmd: Command,
    ) -> Result<Reply, Error> {
        let outcome = self
            .call_room(room, |reply| RoomMsg::Change {
                caller: caller.clone(),
                cmd: cmd.clone(),
                reply,
            })
            .await??;
        if !outcome.joined.is_empty() || !outcome.left.is_empty() {
            self.membership_changed(room, &outcome.joined, &outcome.left)
                .await;
        }
        Ok(outcome.reply)
    }

    /// The page size of a history query, or why the query is wrong.
    fn history_limit(&self, query: &HistoryQuery) -> Result<u32, Error> {
        let cfg = &self.ctx.config;
        let limit = match query.limit {
            None => cfg.history_default_limit,
            Some(0) => return Err(Error::invalid("limit must be at least 1")),
            Some(n) => n.min(cfg.history_max_limit),
        };
        if let (Some(a), Some(b)) = (query.after, query.before)
            && a >= b
        {
            return Err(Error::invalid("after must be smaller than before"));
        }
        Ok(limit)
    }

    /// Reads a history page, first paging past `query.skip` messages from the anchor.
    pub(crate) async fn history_page(
        &self,
        room: RoomId,
        mut query: HistoryQuery,
        limit: u32,
    ) -> Result<store::HistoryPage, Error> {
        const MAX_SKIP: u32 = 10_000;
        let mut skip = query.skip.take().unwrap_or(0);
        if skip > MAX_SKIP {
            return Err(Error::invalid(format!("skip is at most {MAX_SKIP}")));
        }
        let forward = query.after.is_some();
        while skip > 0 {
            let n = skip.min(self.ctx.config.history_max_limit.max(1));
            let page = self.ctx.store.history(room, &query, n).await?;
            // Pages are newest first: forward, the newest is the new lower bound; backward,
            // the oldest is the new upper bound.
            let edge = if forward {
                page.messages.first()
            } else {
                page.messages.last()
            };
            let Some(edge) = edge else {
                return Ok(store::HistoryPage::default());
            };
            if forward {
                query.after = Some(edge.id);
            } else {
                query.before = Some(edge.id);
            }
            skip -= u32::try_from(page.messages.len()).unwrap_or(n).min(skip);
            if !page.has_more {
                return Ok(store::HistoryPage::default());
            }
        }
        if let (Some(a), Some(b)) = (query.after, query.before)
            && a >= b
        {
            return Ok(store::HistoryPage::default());
        }
        Ok(self.ctx.store.history(room, &query, limit).await?)
    }

    async fn history(
        &self,
        caller: &UserId,
        room: RoomId,
        query: HistoryQuery,
    ) -> Result<Reply, Error> {
        let limit = self.history_limit(&query)?;
        self.call_room(room, |reply| RoomMsg::Authorize {
            user: caller.clone(),
            reply,
        })
        .await??;
        // Read beside the actor: every acknowledged message is already committed.
        let page = self.history_page(room, query, limit).await?;
        Ok(Reply::History {
            messages: page.messages.into_iter().map(public).collect(),
            has_more: page.has_more,
        })
    }

    async fn open_direct(&self, caller: &UserId, peer: UserId) -> Result<Reply, Error> {
        if &peer == caller {
            return Err(Error::invalid("cannot open a direct room with yourself"));
        }
        if self.ctx.store.user(&peer).await?.is_none() {
            return Err(Error::not_found(format!("user {peer} not found")));
        }
        if let Some(id) = self.ctx.store.direct_room(caller, &peer).await?
            && let Some(room) = self.ctx.store.room(id).await?
        {
            let summary = self.summary(room).await?;
            return Ok(Reply::Room {
                room: summary,
                created: false,
            });
        }
        // No new conversation across a block, either way (an existing one stays readable, and
        // refuses messages): the blocker is not even told a room was attempted.
        if self
            .ctx
            .store
            .blocks_of(caller)
            .await?
            .iter()
            .any(|(a, b)| (a == caller && b == &peer) || (a == &peer && b == caller))
        {
            return Err(crate::room::blocked_error());
        }
        for u in [caller, &peer] {
            self.check_room_count(u).await?;
        }
        let now = unix_ms();
        let candidate = NewRoom {
            room: Room {
                id: RoomId(self.ctx.ids.next()),
                kind: RoomKind::Direct,
                name: None,
                avatar: None,
                public: false,
                created_by: caller.clone(),
                created_at: now,
                last_seq: 0,
                last_message_id: None,
            },
            members: [caller, &peer]
                .into_iter()
                .map(|u| Member {
                    user: u.clone(),
                    role: Role::Member,
                    joined_at: now,
                    online: None,
                })
                .collect(),
        };
        let (room, created) = self.ctx.store.get_or_create_direct(candidate).await?;
        let summary = self.summary(room).await?;
        if created {
            self.announce(&summary).await;
        }
        Ok(Reply::Room {
            room: summary,
            created,
        })
    }

    /// Refuses when `user` already belongs to the configured maximum of rooms.
    async fn check_room_count(&self, user: &UserId) -> Result<(), Error> {
        let max = self.ctx.config.max_rooms_per_user;
        if self.ctx.store.room_ids_of(user).await?.len() >= max {
            return Err(room::too_many_rooms(user, max));
        }
        Ok(())
    }

    async fn create_group(
        &self,
        caller: &UserId,
        name: String,
        members: Vec<UserId>,
        avatar: Option<String>,
        public_group: bool,
    ) -> Result<Reply, Error> {
        let name = room::check_group_name(&name)?;
        let avatar = avatar.filter(|a| !a.is_empty());
        if avatar
            .as_ref()
            .is_some_and(|a| a.len() > self.ctx.config.max_media_ref_len)
        {
            return Err(Error::invalid("avatar is too long"));
        }
        let mut set: BTreeMap<UserId, Role> = BTreeMap::new();
        for m in members {
            set.insert(m, Role::Member);
        }
        set.insert(caller.clone(), Role::Owner);
        let max = self.ctx.config.group_max_members;
        if set.len() > max {
            return Err(Error::new(
                ErrorCode::GroupFull,
                format!("a group has at most {max} members"),
            ));
        }
        for user in set.keys() {
            if user != caller && self.ctx.store.user(user).await?.is_none() {
                return Err(Error::not_found(format!("user {user} not found")));
            }
            self.check_room_count(user).await?;
        }
        let now = unix_ms();
        let room = Room {
            id: RoomId(self.ctx.ids.next()),
            kind: RoomKind::Group,
            name: Some(name),
            avatar,
            public: public_group,
            created_by: caller.clone(),
            created_at: now,
            last_seq: 0,
            last_message_id: None,
        };
        let members: Vec<Member> = set
            .into_iter()
            .map(|(user, role)| Member {
                user,
                role,
                joined_at: now,
                online: None,
            })
            .collect();
        self.ctx
            .store
            .create_room(NewRoom {
                room: room.clone(),
                members: members.clone(),
            })
            .await?;
        let summary = RoomSummary {
            room,
            members,
            last_message: None,
        };
        self.announce(&summary).await;
        Ok(Reply::Room {
            room: summary,
            created: true,
        })
    }

    async fn summary(&self, room: Room) -> Result<RoomSummary, Error> {
        let members = self.ctx.store.members(room.id).await?;
        let last_message = match room.last_message_id {
            Some(id) => self.ctx.store.message(room.id, id).await?.map(public),
            None => None,
        };
        Ok(RoomSummary {
            room,
            members,
            last_message,
        })
    }

    /// Tells the members of a new room about it: subscribes the gateways of their sessions first
    /// (so the room's first message reaches them), then sends `room_joined` to those sessions.
    /// In a cluster, members' sessions and the room's subscriptions may live on other nodes.
    async fn announce(&self, summary: &RoomSummary) {
        let users: Vec<UserId> = summary.members.iter().map(|m| m.user.clone()).collect();
        self.announce_to(summary, &users).await;
    }

    /// [`Node::announce`] to some of the members only (those who just joined).
    async fn announce_to(&self, summary: &RoomSummary, users: &[UserId]) {
        let by_gateway = self.gateways_of_users(users).await;
        self.announce_at(summary, by_gateway).await;
    }

    /// [`Node::announce_to`], with the users' gateways already known.
    async fn announce_at(
        &self,
        summary: &RoomSummary,
        by_gateway: BTreeMap<GatewayId, Vec<UserId>>,
    ) {
        let room = summary.room.id;
        if by_gateway.is_empty() {
            return;
        }
        let gateways: Vec<GatewayId> = by_gateway.keys().cloned().collect();
        self.subscribe_room(room, &gateways).await;
        for (gateway, users) in by_gateway {
            let d = Delivery {
                gateway,
                target: Target::Users { users },
                event: Event::RoomJoined {
                    room: summary.clone(),
                },
                traceparent: None,
            };
            if let Err(e) = self.ctx.bus.publish(d).await {
                tracing::warn!(%room, error = %e, "room_joined publish failed");
            }
        }
    }

    /// The gateways hosting sessions of `users`, with the users each hosts.
    async fn gateways_of_users(&self, users: &[UserId]) -> BTreeMap<GatewayId, Vec<UserId>> {
        let mut by_gateway: BTreeMap<GatewayId, Vec<UserId>> = BTreeMap::new();
        for u in users {
            for gw in self.user_gateways(u).await {
                by_gateway.entry(gw).or_default().push(u.clone());
            }
        }
        by_gateway
    }

    /// Sends `event` to every session of `users`, wherever they are connected.
    async fn deliver_to_users(&self, users: &[UserId], event: Event) {
        for (gateway, users) in self.gateways_of_users(users).await {
            let d = Delivery {
                gateway,
                target: Target::Users { users },
                event: event.clone(),
                traceparent: None,
            };
            if let Err(e) = self.ctx.bus.publish(d).await {
                tracing::warn!(error = %e, event = event.name(), "user delivery failed");
            }
        }
    }

    /// The gateways hosting sessions of `user`, asking its owner if that is another node.
    async fn user_gateways(&self, user: &UserId) -> Vec<GatewayId> {
        let key = RingKey::User(user.clone());
        match self.peers.get() {
            Some(peers) if !self.owns(&key) => {
                let req = cluster::wire::NodeRequest::UserGateways { user: user.clone() };
                match peers.call(&key, req, true).await {
                    Ok(cluster::wire::NodeResponse::Gateways { gateways }) => gateways,
                    Ok(other) => {
                        tracing::warn!(?other, "unexpected answer to user_gateways");
                        Vec::new()
                    }
                    Err(e) => {
                        tracing::warn!(%user, error = %e, "cannot learn the user's gateways");
                        Vec::new()
                    }
                }
            }
            _ => self.ctx.sessions.gateways(user),
        }
    }

    /// Subscribes `gateways` to `room` at the room's owner.
    async fn subscribe_room(&self, room: RoomId, gateways: &[GatewayId]) {
        let key = RingKey::Room(room);
        match self.peers.get() {
            Some(peers) if !self.owns(&key) => {
                for gateway in gateways {
                    let req = cluster::wire::NodeRequest::Subscribe {
                        gateway: gateway.clone(),
                        rooms: vec![room],
                    };
                    if let Err(e) = peers.call(&key, req, true).await {
                        tracing::warn!(%room, error = %e, "cannot subscribe a member's gateway");
                    }
                }
            }
            _ => {
                for gateway in gateways {
                    self.ctx.subscriptions.add(room, gateway);
                }
            }
        }
    }

    /// The gateways hosting sessions of `user`, if this node owns the user.
    pub fn local_user_gateways(&self, user: &UserId) -> Result<Vec<GatewayId>, Error> {
        self.route(&RingKey::User(user.clone()))?;
        Ok(self.ctx.sessions.gateways(user))
    }

    /// Subscribes `gateway` to `rooms`, all of which this node must own.
    pub fn subscribe_owned(&self, gateway: &GatewayId, rooms: &[RoomId]) -> Result<(), Error> {
        for &room in rooms {
            self.route(&RingKey::Room(room))?;
        }
        self.subscribe_local(gateway, rooms);
        Ok(())
    }

    /// Subscribes `gateway` to the events of `rooms`.
    pub fn subscribe_local(&self, gateway: &GatewayId, rooms: &[RoomId]) {
        for &room in rooms {
            self.ctx.subscriptions.add(room, gateway);
        }
    }

    /// Unsubscribes `gateway` from the events of `rooms`.
    pub fn unsubscribe_local(&self, gateway: &GatewayId, rooms: &[RoomId]) {
        for &room in rooms {
            self.ctx.subscriptions.remove(room, gateway);
            // No session of that gateway wants the room any more, so none views it.
            if let Some(actor) = self.rooms.get(&room)
                && actor
                    .send_message(RoomMsg::GatewayGone(gateway.clone()))
                    .is_err()
            {
                tracing::debug!(%room, "room actor stopped");
            }
        }
    }

    /// Stops every actor after it has handled its mailbox, and waits for room sequencers to
    /// finish their writes. The store and bus are closed by their owner afterwards.
    pub async fn shutdown(&self) {
        self.rooms.shutdown().await;
        self.ctx.tasks.close();
        self.ctx.tasks.wait().await;
    }
}

#[async_trait::async_trait]
impl api::NodeApi for Node {
    async fn connect(&self, profile: Profile, session: SessionInfo) -> Result<Connected, Error> {
        Node::connect(self, profile, session).await
    }

    async fn import_users(&self, users: Vec<Profile>) -> Result<usize, Error> {
        Node::import_users(self, users).await
    }

    async fn disconnect(&self, user: &UserId, gateway: &GatewayId, session: SessionId) {
        Node::disconnect(self, user, gateway, session).await;
    }

    async fn execute(&self, caller: &UserId, cmd: Command) -> Result<Reply, Error> {
        Node::execute(self, caller, cmd).await
    }

    async fn subscribe(&self, gateway: &GatewayId, rooms: Vec<RoomId>) {
        self.subscribe_local(gateway, &rooms);
    }

    async fn unsubscribe(&self, gateway: &GatewayId, rooms: Vec<RoomId>) {
        self.unsubscribe_local(gateway, &rooms);
    }
}
