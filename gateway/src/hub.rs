//! The gateway's local session registry and its delivery loop.
//!
//! The hub knows which local sessions belong to which user and which rooms each session
//! follows. It consumes this gateway's deliveries from the bus and puts each event on the
//! outbound queue of every local session it targets, without ever waiting: a session whose
//! bounded queue is full is disconnected as a slow consumer, so one stalled client never slows a
//! room. The hub subscribes a room at the node when its first local session follows it and
//! unsubscribes when the last one leaves.

use crate::reorder::{Outcome, Reorder};
use crate::telemetry::metrics::{DialectMetrics, Dialects};
use dashmap::DashMap;
use futures::StreamExt;
use node::api::NodeApi;
use node::bus::DeliveryStream;
use parking_lot::Mutex;
use schema::{
    Delivery, Error, ErrorCode, Event, GatewayId, Profile, RoomId, SessionId, Target, UserId,
};
use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

/// Why a session is being closed by the server.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CloseReason {
    /// WebSocket close code.
    pub code: u16,
    /// Short human reason (at most 123 bytes on the wire).
    pub reason: String,
}

/// What the session writer sends.
#[derive(Debug)]
pub enum Outbound {
    /// An event, encoded by the session's dialect (once per dialect, shared by every session).
    Event(Arc<SharedEvent>),
    /// A frame already encoded (replies).
    Text(String),
}

/// An event on its way to many sessions, with each dialect's encoding made once, by the first
/// session of that dialect to write it, and shared by the others.
#[derive(Debug)]
pub struct SharedEvent {
    /// The event.
    pub event: Event,
    native: std::sync::OnceLock<tokio_tungstenite::tungstenite::Utf8Bytes>,
    dialects: [std::sync::OnceLock<Option<Arc<crate::dialect::socketio::Emit>>>; DIALECT_SLOTS],
    texts: [std::sync::OnceLock<Option<tokio_tungstenite::tungstenite::Utf8Bytes>>; TEXT_SLOTS],
}

/// Number of [`TextSlot`]s.
const TEXT_SLOTS: usize = 6;

/// Which cached text encoding of a [`SharedEvent`] a plain-WebSocket dialect uses. A dialect
/// whose frame differs per session (Phoenix puts the session's join reference in it) caches the
/// part that does not, its payload, and frames it per session.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TextSlot {
    /// Phoenix: a payload shown on a `chat:` channel.
    PhoenixChat = 0,
    /// Phoenix: a payload shown on the `notifications:` channel.
    PhoenixNotification = 1,
    /// Type-tagged JSON, `/rt/chat`.
    RtChat = 2,
    /// Type-tagged JSON, `/rt/presence`.
    RtPresence = 3,
    /// Event/data JSON, `/events`.
    Events = 4,
    /// Spare, for a dialect that needs a second encoding.
    Spare = 5,
}

/// Number of [`DialectSlot`]s.
const DIALECT_SLOTS: usize = 2;

/// Which cached encoding of a [`SharedEvent`] a dialect uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DialectSlot {
    /// NotifyHub (Socket.IO `/chats`).
    NotifyHub = 0,
    /// Syarah (Socket.IO `/`).
    Syarah = 1,
}

impl SharedEvent {
    /// Wraps an event.
    pub fn new(event: Event) -> Arc<Self> {
        Arc::new(Self {
            event,
            native: std::sync::OnceLock::new(),
            dialects: Default::default(),
            texts: Default::default(),
        })
    }

    /// The event's text encoding for `slot`, if one was made (`Some(None)`: the dialect does not
    /// show this event).
    pub fn cached_text(
        &self,
        slot: TextSlot,
    ) -> Option<Option<tokio_tungstenite::tungstenite::Utf8Bytes>> {
        self.texts[slot as usize].get().cloned()
    }

    /// The event's text encoding for `slot`, made by `encode` on first use and shared by every
    /// session that uses the slot. For an encoding that needs lookups first, look them up, then
    /// call this (a race makes the encoding twice and keeps one; both are the same).
    pub fn text(
        &self,
        slot: TextSlot,
        encode: impl FnOnce(&Event) -> Option<String>,
    ) -> Option<tokio_tungstenite::tungstenite::Utf8Bytes> {
        self.texts[slot as usize]
            .get_or_init(|| encode(&self.event).map(Into::into))
            .clone()
    }

    /// The event in a dialect's encoding, made by `encode` on first use and shared by every
    /// session of that dialect (`None`: the dialect does not show this event).
    pub fn dialect(
        &self,
        slot: DialectSlot,
        encode: impl FnOnce(&Event) -> Option<crate::dialect::socketio::Emit>,
    ) -> Option<Arc<crate::dialect::socketio::Emit>> {
        self.dialects[slot as usize]
            .get_or_init(|| encode(&self.event).map(Arc::new))
            .clone()
    }

    /// The native protocol frame text, encoded on first use.
    pub fn native(&self) -> tokio_tungstenite::tungstenite::Utf8Bytes {
        self.native
            .get_or_init(|| crate::dialect::native::encode_event(&self.event).into())
            .clone()
    }
}

/// The hub's handle on one session.
pub struct SessionHandle {
    /// Whose session.
    pub user: UserId,
    /// The claims it connected with (to register again with a new owner after a ring change).
    pub profile: Profile,
    /// Its wire dialect.
    pub dialect: &'static str,
    metrics: Arc<DialectMetrics>,
    tx: crate::outbox::Sender<Outbound>,
    /// Set once the session is asked to close.
    close: CloseSignal,
    reason: Mutex<Option<CloseReason>>,
    rooms: Mutex<Vec<RoomId>>,
    /// Commands refused for rate in a row (see [`SessionHandle::tarpit`]).
    refusals: AtomicU32,
}

/// A one-way signal, set once, that any number of tasks can wait for. What a
/// `CancellationToken` does for a session, inline: a token is an allocation of its own (about
/// 110 bytes) in every session.
#[derive(Default)]
pub struct CloseSignal {
    set: AtomicBool,
    wake: tokio::sync::Notify,
}

impl CloseSignal {
    /// Sets the signal and wakes every waiter (now and later ones return at once).
    pub fn set(&self) {
        self.set.store(true, Ordering::SeqCst);
        self.wake.notify_waiters();
    }

    /// Whether it is set.
    pub fn is_set(&self) -> bool {
        self.set.load(Ordering::SeqCst)
    }

    /// Resolves once the signal is set.
    pub async fn wait(&self) {
        loop {
            // Made before the flag is read: `notify_waiters` wakes a `Notified` made before it
            // even if it was not polled yet, so a `set` between the two is not missed.
            let woken = self.wake.notified();
            if self.is_set() {
                return;
            }
            woken.await;
        }
    }
}

/// First pause of a client refused for rate; it doubles with each refusal in a row.
const TARPIT_FIRST: std::time::Duration = std::time::Duration::from_millis(25);
/// Longest pause of a client refused for rate.
const TARPIT_MAX: std::time::Duration = std::time::Duration::from_secs(1);

impl SessionHandle {
    /// Asks the session to close with `reason` (the first reason wins).
    pub fn kick(&self, reason: CloseReason) {
        let mut r = self.reason.lock();
        if r.is_none() {
            *r = Some(reason);
        }
        self.close();
    }

    /// Marks the session closed and wakes every waiter of [`SessionHandle::closed`].
    fn close(&self) {
        self.close.set();
    }

    /// Closes the session as a slow consumer (code 1008, `reason`), counted once per session.
    pub fn slow_consumer(&self, reason: String) {
        let first = {
            let mut r = self.reason.lock();
            let first = r.is_none();
            if first {
                *r = Some(CloseReason { code: 1008, reason });
            }
            first
        };
        if first {
            self.metrics.slow_consumer();
        }
        self.close();
    }

    /// Resolves once the session has been cut off as a slow consumer, and never otherwise: a
    /// writer blocked on the client's full socket gives up at once instead of after its write
    /// timeout, so the session's queue, socket and registration go with the cut (a writer that
    /// ends for any other reason still finishes its write and says goodbye).
    pub async fn cut_off(&self) {
        self.closed().await;
        if self.close_reason().is_some_and(|r| r.code == 1008) {
            return;
        }
        std::future::pending::<()>().await;
    }

    /// How long the session stops listening after a command answered `result`: a client
    /// refused for its rate (`rate_limited`, `typing_rate_limited`) is a tarpit's, 25 ms after
    /// the first refusal, doubling with each refusal in a row up to 1 s; any other answer ends
    /// the streak. While the reader waits, the client's frames stay in the socket buffers, so a
    /// flood costs the server nothing (TCP holds the sender back) instead of a decode, a node
    /// round trip and an error per frame. Counted by `palaver_tarpit_pauses_total`.
    pub fn tarpit<T>(&self, result: &Result<T, Error>) -> Option<std::time::Duration> {
        let refused = matches!(
            result,
            Err(e) if matches!(e.code, ErrorCode::RateLimited | ErrorCode::TypingRateLimited)
        );
        if !refused {
            self.refusals.store(0, Ordering::Relaxed);
            return None;
        }
        let n = self.refusals.fetch_add(1, Ordering::Relaxed).min(16);
        crate::telemetry::metrics::tarpit_pause();
        Some(TARPIT_FIRST.saturating_mul(1 << n).min(TARPIT_MAX))
    }

    /// Waits the pause [`SessionHandle::tarpit`] sets for `result`, or until the session is
    /// asked to close.
    pub async fn tarpit_wait<T>(&self, result: &Result<T, Error>) {
        if let Some(pause) = self.tarpit(result) {
            tokio::select! {
                () = self.closed() => {}
                () = tokio::time::sleep(pause) => {}
            }
        }
    }

    /// The instruments of this session's dialect.
    pub fn metrics(&self) -> &DialectMetrics {
        &self.metrics
    }

    /// Resolves when the session has been asked to close.
    pub async fn closed(&self) {
        self.close.wait().await;
    }

    /// Whether the session has been asked to close.
    pub fn is_closed(&self) -> bool {
        self.close.is_set()
    }

    /// The reason it was asked to close, if it was.
    pub fn close_reason(&self) -> Option<CloseReason> {
        self.reason.lock().clone()
    }

    /// Queues a frame the session itself asked for in bulk (a resume's replay), waiting while
    /// the queue is more than half full: the writer, in the same task, drains it meanwhile, and
    /// the other half stays free for live events, which are never waited for (a full queue cuts
    /// the session off). Without the wait, a resume of more events than the queue holds cut its
    /// own session off as a slow consumer, and the client, resuming again, was cut again. A
    /// client that stops reading meanwhile is cut off by the writer's timeout, which ends the
    /// wait. False when the session is closing.
    pub async fn offer_paced(&self, mut out: Outbound) -> bool {
        let half = self.tx.max_capacity().div_ceil(2);
        loop {
            if self.is_closed() {
                return false;
            }
            if self.tx.max_capacity() - self.tx.capacity() < half {
                match self.tx.try_send(out) {
                    Ok(()) => {
                        self.metrics
                            .queued(self.tx.max_capacity() - self.tx.capacity());
                        return true;
                    }
                    Err(mpsc::error::TrySendError::Full(back)) => out = back,
                    Err(mpsc::error::TrySendError::Closed(_)) => return false,
                }
            }
            // The writer takes up to a batch per socket write; a millisecond is many batches.
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
        }
    }

    /// Queues a frame without waiting. A full queue means the client stopped reading: the
    /// session is closed as a slow consumer. False when the frame was not queued.
    pub fn offer(&self, out: Outbound) -> bool {
        match self.tx.try_send(out) {
            Ok(()) => {
                self.metrics
                    .queued(self.tx.max_capacity() - self.tx.capacity());
                true
            }
            Err(mpsc::error::TrySendError::Full(_)) => {
                self.slow_consumer(format!(
                    "slow consumer: {} frames queued and unread",
                    self.tx.max_capacity()
                ));
                false
            }
            Err(mpsc::error::TrySendError::Closed(_)) => false,
        }
    }
}

/// A change of this gateway's room subscriptions, applied in order by one task.
enum SubChange {
    Subscribe(Vec<RoomId>),
    Unsubscribe(Vec<RoomId>),
}

/// Pending subscription changes before `follow` waits.
const SUB_QUEUE: usize = 4096;

/// A room with more local sessions than this gets a delivery lane of its own (see
/// [`Hub::to_lane`]); `PALAVER_FANOUT_LANE_SESSIONS` sets it.
pub const LANE_SESSIONS: usize = 256;
/// Sessions a lane hands an event to before it lets the other tasks run.
const LANE_CHUNK: usize = 64;
/// A lane with nothing to deliver for this long ends (the room goes back to the hub loop).
const LANE_IDLE: std::time::Duration = std::time::Duration::from_secs(5);

/// Events waiting in one lane beyond which the hub loop waits for it: a big room that cannot
/// keep up holds every delivery back (and through the bus, the senders) instead of queueing
/// without bound. Large, because holding the hub loop is what the lane is there to avoid: a
/// lane falls behind only while the gateway is saturated, and 4096 shared events are a few
/// megabytes; `palaver-load abuse` measured a bound of 64 reached within seconds of a flood,
/// and every room's p99 going from 42 ms to 6 s.
const LANE_BACKLOG: usize = 4096;

/// What a lane hands on: an event of its room to every session following it, or an event for
/// some users about the room (joined, left), kept in order with the room's events.
enum LaneWork {
    Room(Arc<SharedEvent>),
    Users(Vec<UserId>, Arc<SharedEvent>),
}

/// Work on its way to a room's lane, with the moment the hub received it.
type LaneItem = (LaneWork, std::time::Instant);

/// A big room's delivery lane: its queue and how many events wait in it.
struct Lane {
    tx: mpsc::UnboundedSender<LaneItem>,
    depth: Arc<AtomicUsize>,
}

/// Local sessions of this gateway.
pub struct Hub {
    gateway: GatewayId,
    subs: mpsc::Sender<SubChange>,
    queue: usize,
    next_id: AtomicU64,
    sessions: DashMap<SessionId, Arc<SessionHandle>>,
    by_user: DashMap<UserId, Vec<SessionId>>,
    /// A set, not a list: each of a 5,000-session room's closing sessions walked the list to
    /// leave it.
    by_room: DashMap<RoomId, HashSet<SessionId>>,
    metrics: Dialects,
    /// Most sessions one user may have here (0: no limit).
    max_per_user: AtomicUsize,
    /// `palaver_fanout_seconds{stage="gateway"}`.
    fanout: metrics::Histogram,
    /// Each room's live stream handed out in `seq` order (see [`crate::reorder`]).
    order: Mutex<Reorder>,
    /// The delivery lanes of big rooms, by room.
    lanes: DashMap<RoomId, Lane>,
    /// Local sessions of a room above which it gets a lane (0: never).
    lane_sessions: AtomicUsize,
    /// This hub, for the lanes it spawns.
    me: std::sync::Weak<Hub>,
}

/// A session registered with the hub: its id, handle and the receiving end of its queue.
pub struct Registered {
    /// Session id.
    pub id: SessionId,
    /// Handle (close signal).
    pub handle: Arc<SessionHandle>,
    /// Outbound queue.
    pub rx: crate::outbox::Receiver<Outbound>,
}

impl Hub {
    /// A hub for `gateway` with per-session queues of `queue` events. Subscription changes are
    /// sent to `node` in order by a task that ends when the hub is dropped.
    pub fn new(gateway: GatewayId, node: Arc<dyn NodeApi>, queue: usize) -> Arc<Self> {
        let (subs, mut rx) = mpsc::channel::<SubChange>(SUB_QUEUE);
        let gw = gateway.clone();
        tokio::spawn(async move {
            while let Some(change) = rx.recv().await {
                match change {
                    SubChange::Subscribe(rooms) => node.subscribe(&gw, rooms).await,
                    SubChange::Unsubscribe(rooms) => node.unsubscribe(&gw, rooms).await,
                }
            }
        });
        Arc::new_cyclic(|me| Self {
            gateway,
            subs,
            queue,
            next_id: AtomicU64::new(1),
            sessions: DashMap::new(),
            by_user: DashMap::new(),
            by_room: DashMap::new(),
            metrics: Dialects::default(),
            max_per_user: AtomicUsize::new(0),
            fanout: metrics::histogram!("palaver_fanout_seconds", "stage" => "gateway"),
            order: Mutex::new(Reorder::new(crate::reorder::DEFAULT_HOLD)),
            lanes: DashMap::new(),
            lane_sessions: AtomicUsize::new(LANE_SESSIONS),
            me: me.clone(),
        })
    }

    /// How long a room's event may wait for a missing predecessor before it is delivered past
    /// the gap (`PALAVER_REORDER_HOLD_MS`; zero: never wait, only drop duplicates).
    pub fn set_reorder_hold(&self, hold: std::time::Duration) {
        *self.order.lock() = Reorder::new(hold);
    }

    /// Sets the local sessions of a room above which it gets a delivery lane (0: never).
    pub fn set_lane_sessions(&self, sessions: usize) {
        self.lane_sessions.store(sessions, Ordering::Relaxed);
    }

    /// Sets the most sessions one user may have on this gateway (0: no limit).
    pub fn set_max_per_user(&self, max: usize) {
        self.max_per_user.store(max, Ordering::Relaxed);
    }

    /// The instruments of `dialect` (sessions hold theirs; REST handlers ask here).
    pub fn dialect_metrics(&self, dialect: &str) -> Arc<DialectMetrics> {
        self.metrics.get(dialect)
    }

    /// This gateway's id.
    pub fn gateway(&self) -> &GatewayId {
        &self.gateway
    }

    /// A fresh session id.
    pub fn next_session_id(&self) -> SessionId {
        SessionId(self.next_id.fetch_add(1, Ordering::Relaxed))
    }

    /// Number of connected sessions.
    pub fn len(&self) -> usize {
        self.sessions.len()
    }

    /// Whether no session is connected.
    pub fn is_empty(&self) -> bool {
        self.sessions.is_empty()
    }

    /// Number of distinct users with a session here (the event/data dialect's
    /// `connected_users`).
    pub fn user_count(&self) -> usize {
        self.by_user.len()
    }

    /// Connected sessions per dialect (the web console's overview).
    pub fn dialect_counts(&self) -> std::collections::BTreeMap<String, usize> {
        let mut counts = std::collections::BTreeMap::new();
        for s in self.sessions.iter() {
            *counts.entry(s.dialect.to_owned()).or_insert(0) += 1;
        }
        counts
    }

    /// The dialect of `user`'s sessions here: one name, several joined by `+` (sorted), or
    /// `None` when the user has no session on this gateway (the web console's recent errors).
    pub fn dialect_of(&self, user: &UserId) -> Option<String> {
        let ids = self.by_user.get(user).map(|v| v.clone())?;
        let mut names: Vec<String> = ids
            .iter()
            .filter_map(|id| self.sessions.get(id).map(|s| s.dialect.to_owned()))
            .collect();
        names.sort();
        names.dedup();
        (!names.is_empty()).then(|| names.join("+"))
    }

    /// Registers a session of `user` following `rooms`.
    pub async fn register(
        &self,
        id: SessionId,
        profile: Profile,
        dialect: &'static str,
        rooms: Vec<RoomId>,
    ) -> Result<Registered, Error> {
        let user = profile.id.clone();
        // Counted and claimed under the user's entry lock: two sessions racing for the last
        // place cannot both get it.
        {
            let max = self.max_per_user.load(Ordering::Relaxed);
            let mut mine = self.by_user.entry(user.clone()).or_default();
            if max != 0 && mine.len() >= max {
                let open = mine.len();
                drop(mine);
                self.by_user.remove_if(&user, |_, v| v.is_empty());
                crate::telemetry::metrics::limit_refused("conn_user");
                return Err(Error::new(
                    ErrorCode::TooManyConnections,
                    format!(
                        "user {user} already has {open} sessions on this gateway \
                         (PALAVER_MAX_CONNECTIONS_PER_USER); close one and retry"
                    ),
                ));
            }
            mine.push(id);
        }
        let (tx, rx) = crate::outbox::channel(self.queue);
        let metrics = self.metrics.get(dialect);
        metrics.opened();
        let handle = Arc::new(SessionHandle {
            user: user.clone(),
            profile,
            dialect,
            metrics,
            tx,
            close: CloseSignal::default(),
            reason: Mutex::new(None),
            rooms: Mutex::new(Vec::new()),
            refusals: AtomicU32::new(0),
        });
        self.sessions.insert(id, handle.clone());
        self.follow(id, &handle, &rooms).await;
        Ok(Registered { id, handle, rx })
    }

    /// Makes session `id` follow `rooms` (see [`Hub::register`]).
    pub async fn follow_rooms(&self, id: SessionId, rooms: &[RoomId]) {
        let handle = self.sessions.get(&id).map(|h| h.clone());
        if let Some(h) = handle {
            self.follow(id, &h, rooms).await;
        }
    }

    /// Adds rooms to a session, subscribing the ones new to this gateway.
    async fn follow(&self, id: SessionId, handle: &SessionHandle, rooms: &[RoomId]) {
        let mut new_here = Vec::new();
        {
            let mut mine = handle.rooms.lock();
            for &room in rooms {
                if mine.contains(&room) {
                    continue;
                }
                mine.push(room);
                let mut e = self.by_room.entry(room).or_default();
                if e.is_empty() {
                    new_here.push(room);
                }
                e.insert(id);
            }
        }
        if !new_here.is_empty() {
            self.change(SubChange::Subscribe(new_here)).await;
        }
    }

    /// Removes rooms from a session (its user left them), unsubscribing the ones no local
    /// session follows any more.
    async fn unfollow(&self, id: SessionId, handle: &SessionHandle, rooms: &[RoomId]) {
        let mut gone = Vec::new();
        {
            let mut mine = handle.rooms.lock();
            mine.retain(|r| !rooms.contains(r));
        }
        for &room in rooms {
            if self
                .by_room
                .remove_if_mut(&room, |_, v| {
                    v.remove(&id);
                    v.is_empty()
                })
                .is_some()
            {
                gone.push(room);
            }
        }
        if !gone.is_empty() {
            {
                let mut order = self.order.lock();
                for room in &gone {
                    order.forget(*room);
                }
            }
            self.change(SubChange::Unsubscribe(gone)).await;
        }
    }

    /// The handle of a local session.
    pub fn session(&self, id: SessionId) -> Option<Arc<SessionHandle>> {
        self.sessions.get(&id).map(|s| s.clone())
    }

    /// Queues an event for one session without waiting (pending notifications at connect; a
    /// replay is paced instead, see [`SessionHandle::offer_paced`]).
    pub fn offer_event(&self, id: SessionId, event: Event) -> bool {
        match self.sessions.get(&id).map(|s| s.clone()) {
            Some(s) => s.offer(Outbound::Event(SharedEvent::new(event))),
            None => false,
        }
    }

    /// Removes a session; unsubscribes rooms no local session follows any more.
    pub async fn unregister(&self, id: SessionId) {
        let Some((_, handle)) = self.sessions.remove(&id) else {
            return;
        };
        handle.metrics.closed();
        self.by_user.remove_if_mut(&handle.user, |_, v| {
            v.retain(|s| *s != id);
            v.is_empty()
        });
        let rooms = std::mem::take(&mut *handle.rooms.lock());
        let mut gone = Vec::new();
        for room in rooms {
            if self
                .by_room
                .remove_if_mut(&room, |_, v| {
                    v.remove(&id);
                    v.is_empty()
                })
                .is_some()
            {
                gone.push(room);
            }
        }
        if !gone.is_empty() {
            {
                let mut order = self.order.lock();
                for room in &gone {
                    order.forget(*room);
                }
            }
            self.change(SubChange::Unsubscribe(gone)).await;
        }
    }

    async fn change(&self, c: SubChange) {
        if self.subs.send(c).await.is_err() {
            tracing::warn!(gateway = %self.gateway, "subscription task stopped");
        }
    }

    /// Every room a local session follows.
    pub fn rooms(&self) -> Vec<RoomId> {
        self.by_room.iter().map(|e| *e.key()).collect()
    }

    /// Subscribes `rooms` again (after the ring changed, their new owners do not know this
    /// gateway yet).
    pub async fn resubscribe(&self, rooms: Vec<RoomId>) {
        for chunk in rooms.chunks(512) {
            self.change(SubChange::Subscribe(chunk.to_vec())).await;
        }
    }

    /// Every session: id, profile and dialect.
    pub fn snapshot(&self) -> Vec<(SessionId, Profile, &'static str)> {
        self.sessions
            .iter()
            .map(|s| (*s.key(), s.profile.clone(), s.dialect))
            .collect()
    }

    /// Asks every session to close with `reason`.
    pub fn kick_all(&self, reason: &CloseReason) {
        for s in self.sessions.iter() {
            s.kick(reason.clone());
        }
    }

    fn sessions_of_room(&self, room: RoomId) -> Vec<Arc<SessionHandle>> {
        self.by_room
            .get(&room)
            .map(|ids| {
                ids.iter()
                    .filter_map(|id| self.sessions.get(id).map(|s| s.clone()))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Delivers one envelope to the local sessions it targets; a room's sequenced events in
    /// `seq` order ([`crate::reorder`]), so one may be held for a moment or dropped as stale.
    pub async fn deliver(&self, d: Delivery) {
        if let (Target::Room { room }, Some(seq)) = (&d.target, d.event.seq()) {
            let room = *room;
            let mut ready = Vec::new();
            let outcome =
                self.order
                    .lock()
                    .accept(room, seq, d, std::time::Instant::now(), &mut ready);
            match outcome {
                Outcome::InOrder => {}
                Outcome::Held => crate::telemetry::metrics::reordered("held"),
                Outcome::Stale => crate::telemetry::metrics::reordered("stale"),
            }
            for d in ready {
                self.deliver_now(d).await;
            }
        } else {
            self.deliver_now(d).await;
        }
    }

    /// Delivers, past their gaps, the held events whose hold expired.
    async fn release_expired(&self) {
        let mut ready = Vec::new();
        let gaps = self
            .order
            .lock()
            .expire(std::time::Instant::now(), &mut ready);
        for _ in 0..gaps {
            crate::telemetry::metrics::reordered("gap_skipped");
        }
        for d in ready {
            self.deliver_now(d).await;
        }
    }

    async fn deliver_now(&self, d: Delivery) {
        let received = std::time::Instant::now();
        let event = SharedEvent::new(d.event);
        match d.target {
            Target::Room { room } => {
                while self
                    .lanes
                    .get(&room)
                    .is_some_and(|l| l.depth.load(Ordering::Relaxed) >= LANE_BACKLOG)
                {
                    tokio::time::sleep(std::time::Duration::from_millis(1)).await;
                }
                if self.to_lane(room, &event, received) {
                    return;
                }
                for s in self.sessions_of_room(room) {
                    s.offer(Outbound::Event(event.clone()));
                }
            }
            Target::Users { users } => {
                // Joining or leaving a room that has a lane goes through the lane, after the
                // room's earlier events: a member who leaves still gets the messages sent
                // before the leave, one who joins none from before the join.
                let about = match &event.event {
                    Event::RoomJoined { room } => Some(room.room.id),
                    Event::RoomLeft { room } => Some(*room),
                    _ => None,
                };
                if let Some(room) = about {
                    let work = (LaneWork::Users(users, event), received);
                    match self.queue_on_lane(room, work) {
                        Ok(()) => return,
                        Err((LaneWork::Users(users, event), _)) => {
                            self.deliver_to_users(&users, &event).await;
                        }
                        Err((LaneWork::Room(_), _)) => {}
                    }
                } else {
                    self.deliver_to_users(&users, &event).await;
                }
            }
        }
        self.fanout.record(received.elapsed());
    }

    /// Hands `event` to every session of `users`, following or leaving the room it names.
    async fn deliver_to_users(&self, users: &[UserId], event: &Arc<SharedEvent>) {
        for user in users {
            let ids = self
                .by_user
                .get(user)
                .map(|v| v.clone())
                .unwrap_or_default();
            for id in ids {
                let Some(s) = self.sessions.get(&id).map(|s| s.clone()) else {
                    continue;
                };
                match &event.event {
                    Event::RoomJoined { room } => {
                        self.follow(id, &s, &[room.room.id]).await;
                    }
                    Event::RoomLeft { room } => self.unfollow(id, &s, &[*room]).await,
                    _ => {}
                }
                s.offer(Outbound::Event(event.clone()));
            }
        }
    }

    /// Queues `work` on `room`'s lane if the room has one (gives it back if not).
    fn queue_on_lane(&self, room: RoomId, work: LaneItem) -> Result<(), LaneItem> {
        let Some(lane) = self.lanes.get(&room) else {
            return Err(work);
        };
        // Sent under the map's lock: the lane cannot end in between (see `run_lane`).
        lane.depth.fetch_add(1, Ordering::Relaxed);
        match lane.tx.send(work) {
            Ok(()) => {
                metrics::counter!("palaver_hub_lane_events_total").increment(1);
                Ok(())
            }
            Err(mpsc::error::SendError(work)) => {
                lane.depth.fetch_sub(1, Ordering::Relaxed);
                drop(lane);
                self.lanes.remove(&room);
                Err(work)
            }
        }
    }

    /// Hands a room event to the room's lane when the room has one or is big (more than
    /// [`LANE_SESSIONS`] local sessions by default); false when the hub loop should deliver it itself.
    ///
    /// Handing an event to thousands of sessions wakes thousands of session tasks at once, and
    /// an event of a small room that comes next would wait behind all of them: a big room in
    /// full flow would set every other room's latency. A lane delivers its room's events in
    /// order, [`LANE_CHUNK`] sessions at a time, yielding in between, so the hub loop goes on
    /// with other rooms' events and their writers run between a big room's chunks: a big room's
    /// delivery costs the same but no longer comes first. A lane more than [`LANE_BACKLOG`]
    /// events behind holds the hub loop back until it catches up. While a room has a lane, all its
    /// events go through it (so they stay in order), and so do users' joins and leaves of it
    /// (a leaving member gets every message sequenced before the leave); the lane ends after [`LANE_IDLE`] with
    /// nothing to deliver. Counted by `palaver_hub_lane_events_total`.
    fn to_lane(
        &self,
        room: RoomId,
        event: &Arc<SharedEvent>,
        received: std::time::Instant,
    ) -> bool {
        if self.lanes.contains_key(&room) {
            return self
                .queue_on_lane(room, (LaneWork::Room(event.clone()), received))
                .is_ok();
        }
        let threshold = self.lane_sessions.load(Ordering::Relaxed);
        if threshold == 0 || self.by_room.get(&room).map_or(0, |ids| ids.len()) <= threshold {
            return false;
        }
        let Some(me) = self.me.upgrade() else {
            return false;
        };
        let (tx, rx) = mpsc::unbounded_channel();
        // Cannot fail: `rx` is alive.
        let _sent = tx.send((LaneWork::Room(event.clone()), received));
        metrics::counter!("palaver_hub_lane_events_total").increment(1);
        let depth = Arc::new(AtomicUsize::new(1));
        self.lanes.insert(
            room,
            Lane {
                tx,
                depth: depth.clone(),
            },
        );
        tokio::spawn(run_lane(me, room, rx, depth));
        true
    }

    /// Runs the delivery loop until the stream ends or `stop` fires.
    pub async fn run(self: Arc<Self>, mut stream: DeliveryStream, stop: CancellationToken) {
        loop {
            let deadline = self.order.lock().next_deadline();
            tokio::select! {
                _ = stop.cancelled() => break,
                () = sleep_until_some(deadline) => self.release_expired().await,
                d = stream.next() => match d {
                    Some(d) => {
                        // Joins the trace of the publish that sent it (when tracing is on).
                        let span = node::span!("gateway.deliver", event = d.event.name());
                        node::trace::set_parent(&span, d.traceparent.as_deref());
                        self.deliver(d).instrument(span).await;
                    }
                    None => {
                        tracing::warn!(gateway = %self.gateway, "delivery stream ended");
                        break;
                    }
                },
            }
        }
    }
}

/// A big room's delivery lane (see [`Hub::to_lane`]): its events in order, a chunk of sessions
/// at a time.
async fn run_lane(
    hub: Arc<Hub>,
    room: RoomId,
    mut rx: mpsc::UnboundedReceiver<LaneItem>,
    depth: Arc<AtomicUsize>,
) {
    loop {
        match tokio::time::timeout(LANE_IDLE, rx.recv()).await {
            Ok(Some((work, received))) => {
                match work {
                    LaneWork::Room(event) => {
                        let sessions = hub.sessions_of_room(room);
                        for chunk in sessions.chunks(LANE_CHUNK) {
                            for s in chunk {
                                s.offer(Outbound::Event(event.clone()));
                            }
                            tokio::task::yield_now().await;
                        }
                    }
                    LaneWork::Users(users, event) => hub.deliver_to_users(&users, &event).await,
                }
                depth.fetch_sub(1, Ordering::Relaxed);
                hub.fanout.record(received.elapsed());
            }
            Ok(None) => return,
            Err(_idle) => {
                // The hub sends while holding the entry, so an empty queue here means nothing
                // is on its way: the next event of the room goes to the hub loop or a new lane.
                if hub.lanes.remove_if(&room, |_, _| rx.is_empty()).is_some() {
                    return;
                }
            }
        }
    }
}

/// Sleeps until `deadline`, or forever without one.
async fn sleep_until_some(deadline: Option<std::time::Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d.into()).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_event_is_encoded_once_for_all_sessions_of_a_dialect() {
        let room = schema::RoomSummary {
            room: schema::Room {
                id: RoomId(3),
                kind: schema::RoomKind::Group,
                name: Some("g".into()),
                created_by: UserId::parse("1").expect("uid"),
                created_at: 0,
                last_seq: 0,
                last_message_id: None,
                avatar: None,
                public: false,
            },
            members: vec![],
            last_message: None,
        };
        let e = SharedEvent::new(Event::RoomJoined { room });
        let (a, b) = (e.native(), e.native());
        assert_eq!(a, b);
        assert_eq!(
            a.as_str().as_ptr(),
            b.as_str().as_ptr(),
            "one buffer, shared"
        );
        assert!(a.as_str().contains("\"room_joined\""));
    }

    #[tokio::test]
    async fn a_close_signal_wakes_every_waiter_and_stays_set() {
        let signal = Arc::new(CloseSignal::default());
        assert!(!signal.is_set());
        // Two waiters parked before the signal, one made (not polled) just before it.
        let parked: Vec<_> = (0..2)
            .map(|_| {
                let s = signal.clone();
                tokio::spawn(async move { s.wait().await })
            })
            .collect();
        tokio::task::yield_now().await;
        let early = signal.wait();
        let not_yet = tokio::time::timeout(std::time::Duration::from_millis(20), signal.wait());
        assert!(not_yet.await.is_err(), "an unset signal does not resolve");
        signal.set();
        for p in parked {
            tokio::time::timeout(std::time::Duration::from_secs(5), p)
                .await
                .expect("a parked waiter is woken")
                .expect("waiter task");
        }
        tokio::time::timeout(std::time::Duration::from_secs(5), early)
            .await
            .expect("a waiter made before the set resolves");
        tokio::time::timeout(std::time::Duration::from_secs(5), signal.wait())
            .await
            .expect("a waiter made after the set resolves at once");
        assert!(signal.is_set());
    }
}
