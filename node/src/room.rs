//! The room actor: the single writer of one room.
//!
//! The actor checks what it can check at once (membership, content limits, typing, viewing,
//! read markers) in its mailbox order and hands everything that changes the room's ordered
//! stream to the room's **sequencer**, a task the actor owns: sends, edits, deletions, reactions
//! and membership or group changes. The sequencer takes every item waiting for it (a batch);
//! consecutive sends are deduplicated (`(sender, client_ref)`, in a recent-window cache and then
//! in the store), given ids and sequence numbers and written in one durable store call; every
//! other change is validated against the current state, given its sequence number(s) and written
//! in its own store call. Only *after* the write does the sequencer answer (the ack), then it
//! publishes the events to the gateways subscribed to the room, and records pending
//! notifications for the members who are offline (no session anywhere).
//!
//! State shared by the actor and its sequencer (members and their roles, the room, whether a
//! direct room's pair is blocked, which sessions view the room) sits behind one lock; only the
//! sequencer writes members and the room, only the actor writes viewers.
//!
//! If a write fails, the sequencer answers the batch with `unavailable` and tells the actor,
//! which fails; its supervisor restarts it and the new actor reloads the room from the store, so
//! nothing half-known survives. Senders retry with the same `client_ref` and get no duplicate.

use crate::NodeCtx;
use crate::ids::unix_ms;
use crate::store::{RoomPatch, RoomWrite};
use parking_lot::RwLock;
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use schema::{
    Command, Delivery, Error, ErrorCode, Event, Member, Message, MessageBody, MessageId,
    Notification, PushJob, Reply, Role, Room, RoomId, RoomKind, SessionRef, Target, UserId,
};
use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;
use tokio::sync::mpsc;
use tracing::Instrument;

/// Most other sends of a batch whose traces the batch's store write links to.
const MAX_LINKS: usize = 32;

/// Most messages one `delete` may name.
pub const MAX_DELETE: usize = 100;
/// Longest reaction emoji, in bytes.
pub const MAX_EMOJI_BYTES: usize = 32;
/// Most distinct emoji on one message.
pub const MAX_EMOJI_PER_MESSAGE: usize = 50;

/// What a change to the room produced, for the node to finish: the reply, and who joined or
/// left (the node tells their sessions and subscribes or unsubscribes their gateways).
#[derive(Debug)]
pub struct ChangeOutcome {
    /// The caller's answer.
    pub reply: Reply,
    /// Users who became members.
    pub joined: Vec<UserId>,
    /// Users who stopped being members.
    pub left: Vec<UserId>,
}

/// Messages of a room actor.
pub enum RoomMsg {
    /// Post a message as `sender`.
    Send {
        /// The authenticated sender.
        sender: UserId,
        /// The content.
        body: MessageBody,
        /// The message it answers.
        reply_to: Option<MessageId>,
        /// Idempotency key (the router supplies one when the client did not).
        client_ref: String,
        /// The `room.send` span (the message's trace; [`tracing::Span::none`] when tracing is
        /// off): the store write and the publishes are its children.
        span: tracing::Span,
        /// The ack.
        reply: RpcReplyPort<Result<Message, Error>>,
    },
    /// A change to the room's ordered stream other than a send (edit, delete, react, membership
    /// and group changes).
    Change {
        /// The authenticated caller.
        caller: UserId,
        /// The command.
        cmd: Command,
        /// The outcome.
        reply: RpcReplyPort<Result<ChangeOutcome, Error>>,
    },
    /// A command answered by the actor itself (typing, view, mark read, members).
    Local {
        /// The authenticated caller.
        caller: UserId,
        /// The command.
        cmd: Command,
        /// The answer.
        reply: RpcReplyPort<Result<Reply, Error>>,
    },
    /// Check that `user` may read the room; answers the room.
    Authorize {
        /// The reader.
        user: UserId,
        /// The room, or `not_member`.
        reply: RpcReplyPort<Result<Room, Error>>,
    },
    /// Something outside the room changed (a block between the members of a direct room):
    /// reread it from the store.
    Reload,
    /// The sessions of a gateway went away: forget what they were viewing.
    GatewayGone(schema::GatewayId),
    /// A typing state may have expired.
    TypingExpired(UserId),
    /// The sequencer's write failed; the actor fails so that it restarts from the store.
    SequencerFailed(String),
    /// Periodic idle check.
    Tick,
}

/// Builds room actors for the directory.
pub struct RoomSpec {
    pub(crate) ctx: Arc<NodeCtx>,
}

impl crate::directory::ChildSpec for RoomSpec {
    type Key = RoomId;
    type Child = RoomActor;
    const KIND: &'static str = "room";
    fn make(&self, key: &RoomId) -> (RoomActor, RoomId) {
        (
            RoomActor {
                ctx: self.ctx.clone(),
            },
            *key,
        )
    }
}

/// The room actor.
pub struct RoomActor {
    ctx: Arc<NodeCtx>,
}

/// What the actor and its sequencer share.
pub struct Shared {
    room: Room,
    members: HashMap<UserId, Member>,
    /// Direct rooms: one of the pair blocks the other.
    blocked: bool,
    /// Sessions viewing the room, by user.
    viewers: HashMap<UserId, HashSet<SessionRef>>,
    /// Members who muted the room (no push).
    muted: HashSet<UserId>,
}

impl Shared {
    fn role(&self, u: &UserId) -> Option<Role> {
        self.members.get(u).map(|m| m.role)
    }
}

/// A room actor's state, built from the store in `pre_start`.
pub struct RoomState {
    shared: Arc<RwLock<Shared>>,
    to_sequencer: mpsc::Sender<SeqItem>,
    inflight: Arc<AtomicUsize>,
    typing: HashMap<UserId, Instant>,
    last_activity: Instant,
    ticker: tokio::task::JoinHandle<()>,
    budget: FanoutBudget,
}

/// Says what a send refused for a room's fan-out budget is (the gateway counts it under
/// `palaver_limit_refusals_total{limit="room_fanout"}`).
pub const ROOM_FANOUT_REFUSAL: &str = "room fan-out budget";

/// A room's fan-out budget ([`crate::NodeConfig::room_fanout_per_second`]): a token bucket of
/// deliveries, refilled at the configured rate, holding at most one second of it or one
/// message to every member, whichever is more; each message takes one delivery per member.
/// Members are counted, not online sessions: the budget does not depend on who is connected
/// where, and a room's rate is the same on every node that may own it.
struct FanoutBudget {
    tokens: f64,
    at: Instant,
}

impl FanoutBudget {
    fn new() -> Self {
        Self {
            tokens: f64::INFINITY,
            at: Instant::now(),
        }
    }

    fn take(&mut self, config: &crate::NodeConfig, sh: &Shared) -> Result<(), Error> {
        let rate = f64::from(config.room_fanout_per_second);
        if rate <= 0.0 {
            return Ok(());
        }
        let cost = sh.members.len().max(1) as f64;
        let cap = rate.max(cost);
        let now = Instant::now();
        let elapsed = now.duration_since(self.at).as_secs_f64();
        self.at = now;
        self.tokens = (self.tokens + elapsed * rate).min(cap);
        if self.tokens >= cost {
            self.tokens -= cost;
            return Ok(());
        }
        let wait_ms = ((cost - self.tokens) / rate * 1000.0).ceil();
        Err(Error::new(
            ErrorCode::RateLimited,
            format!(
                "room {} is over its {ROOM_FANOUT_REFUSAL}: with {} members it takes {:.2} \
                 messages per second; retry in {wait_ms} ms",
                sh.room.id,
                sh.members.len(),
                rate / cost
            ),
        ))
    }
}

async fn load_shared(ctx: &NodeCtx, id: RoomId) -> Result<Shared, Error> {
    let store = &ctx.store;
    let room = store
        .room(id)
        .await?
        .ok_or_else(|| Error::not_found(format!("room {id} does not exist")))?;
    let members: HashMap<UserId, Member> = store
        .members(id)
        .await?
        .into_iter()
        .map(|m| (m.user.clone(), m))
        .collect();
    let blocked = if room.kind == RoomKind::Direct {
        match members.keys().next() {
            Some(a) => {
                let blocks = store.blocks_of(a).await?;
                blocks
                    .iter()
                    .any(|(x, y)| members.contains_key(x) && members.contains_key(y) && x != y)
            }
            None => false,
        }
    } else {
        false
    };
    let muted = store.muted_in(id).await?.into_iter().collect();
    Ok(Shared {
        room,
        members,
        blocked,
        viewers: HashMap::new(),
        muted,
    })
}

impl Actor for RoomActor {
    type Msg = RoomMsg;
    type State = RoomState;
    type Arguments = RoomId;

    async fn pre_start(
        &self,
        myself: ActorRef<RoomMsg>,
        id: RoomId,
    ) -> Result<RoomState, ActorProcessingErr> {
        let shared = Arc::new(RwLock::new(load_shared(&self.ctx, id).await?));
        let (tx, rx) = mpsc::channel(self.ctx.config.sequencer_queue);
        let inflight = Arc::new(AtomicUsize::new(0));
        let seq = Sequencer {
            ctx: self.ctx.clone(),
            room: id,
            last_seq: 0,
            last_id: 0,
            recent: Recent::new(self.ctx.config.dedup_window),
            inflight: inflight.clone(),
            actor: myself.clone(),
            shared: shared.clone(),
        };
        self.ctx.tasks.spawn(seq.run(rx));
        let ticker = myself.send_interval(self.ctx.config.idle_timeout / 2, || RoomMsg::Tick);
        Ok(RoomState {
            shared,
            to_sequencer: tx,
            inflight,
            typing: HashMap::new(),
            last_activity: Instant::now(),
            ticker,
            budget: FanoutBudget::new(),
        })
    }

    async fn post_stop(
        &self,
        _myself: ActorRef<RoomMsg>,
        state: &mut RoomState,
    ) -> Result<(), ActorProcessingErr> {
        state.ticker.abort();
        Ok(())
    }

    async fn handle(
        &self,
        myself: ActorRef<RoomMsg>,
        msg: RoomMsg,
        st: &mut RoomState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            RoomMsg::Send {
                sender,
                body,
                reply_to,
                client_ref,
                span,
                reply,
            } => {
                st.last_activity = Instant::now();
                if let Err(e) = self.check_send(st, &sender, &body) {
                    answer(reply, Err(e));
                    return Ok(());
                }
                if let Err(e) = st.budget.take(&self.ctx.config, &st.shared.read()) {
                    answer(reply, Err(e));
                    return Ok(());
                }
                let item = SeqItem::Send {
                    sender,
                    body,
                    reply_to,
                    client_ref,
                    span,
                    reply,
                };
                self.enqueue(st, item).await?;
            }
            RoomMsg::Change { caller, cmd, reply } => {
                st.last_activity = Instant::now();
                let item = SeqItem::Change { caller, cmd, reply };
                self.enqueue(st, item).await?;
            }
            RoomMsg::Local { caller, cmd, reply } => {
                st.last_activity = Instant::now();
                let res = self.local(&myself, st, caller, cmd).await;
                answer(reply, res);
            }
            RoomMsg::Authorize { user, reply } => {
                st.last_activity = Instant::now();
                let sh = st.shared.read();
                let res = if sh.members.contains_key(&user) {
                    Ok(sh.room.clone())
                } else {
                    Err(Error::not_member(sh.room.id))
                };
                drop(sh);
                answer(reply, res);
            }
            RoomMsg::Reload => {
                let id = st.shared.read().room.id;
                let fresh = load_shared(&self.ctx, id).await?;
                let mut sh = st.shared.write();
                sh.members = fresh.members;
                sh.blocked = fresh.blocked;
                sh.room = fresh.room;
            }
            RoomMsg::GatewayGone(gw) => {
                let mut sh = st.shared.write();
                for sessions in sh.viewers.values_mut() {
                    sessions.retain(|s| s.gateway != gw);
                }
                sh.viewers.retain(|_, s| !s.is_empty());
            }
            RoomMsg::TypingExpired(user) => {
                if st
                    .typing
                    .get(&user)
                    .is_some_and(|&until| until <= Instant::now())
                {
                    st.typing.remove(&user);
                    let room = st.shared.read().room.id;
                    let name = self.display_name(&user).await;
                    let ev = Event::Typing {
                        room,
                        user,
                        name,
                        typing: false,
                    };
                    publish_room(&self.ctx, room, ev).await;
                }
            }
            RoomMsg::SequencerFailed(reason) => {
                let id = st.shared.read().room.id;
                return Err(format!("room {id}: store write failed: {reason}").into());
            }
            RoomMsg::Tick => {
                let viewing = !st.shared.read().viewers.is_empty();
                if st.inflight.load(Ordering::SeqCst) == 0
                    && !viewing
                    && st.typing.is_empty()
                    && st.last_activity.elapsed() >= self.ctx.config.idle_timeout
                {
                    myself.stop(Some("idle".into()));
                }
            }
        }
        Ok(())
    }
}

impl RoomActor {
    async fn enqueue(&self, st: &mut RoomState, item: SeqItem) -> Result<(), ActorProcessingErr> {
        st.inflight.fetch_add(1, Ordering::SeqCst);
        if let Err(mpsc::error::SendError(item)) = st.to_sequencer.send(item).await {
            item.fail(Error::unavailable("room sequencer stopped"));
            return Err("room sequencer stopped".into());
        }
        Ok(())
    }

    fn check_send(&self, st: &RoomState, sender: &UserId, body: &MessageBody) -> Result<(), Error> {
        let sh = st.shared.read();
        if !sh.members.contains_key(sender) {
            return Err(Error::not_member(sh.room.id));
        }
        if sh.blocked {
            return Err(blocked_error());
        }
        drop(sh);
        check_body(&self.ctx.config, body)
    }

    async fn display_name(&self, user: &UserId) -> Option<String> {
        match self.ctx.store.user(user).await {
            Ok(Some(u)) => u.profile.name.or(u.profile.username),
            _ => None,
        }
    }

    async fn local(
        &self,
        myself: &ActorRef<RoomMsg>,
        st: &mut RoomState,
        caller: UserId,
        cmd: Command,
    ) -> Result<Reply, Error> {
        let room = {
            let sh = st.shared.read();
            if !sh.members.contains_key(&caller) {
                return Err(Error::not_member(sh.room.id));
            }
            sh.room.clone()
        };
        match cmd {
            Command::Typing { typing, .. } => {
                if st.shared.read().blocked {
                    return Err(blocked_error());
                }
                let was = st.typing.contains_key(&caller);
                if typing {
                    let ttl = self.ctx.config.typing_ttl;
                    st.typing.insert(caller.clone(), Instant::now() + ttl);
                    let who = caller.clone();
                    myself.send_after(ttl, move || RoomMsg::TypingExpired(who));
                } else {
                    st.typing.remove(&caller);
                }
                // Refreshes of an ongoing state are not broadcast again.
                if was != typing {
                    let name = self.display_name(&caller).await;
                    let ev = Event::Typing {
                        room: room.id,
                        user: caller,
                        name,
                        typing,
                    };
                    publish_room(&self.ctx, room.id, ev).await;
                }
                Ok(Reply::Done)
            }
            Command::View {
                viewing, session, ..
            } => {
                let session = session
                    .ok_or_else(|| Error::invalid("view needs the session (set by the gateway)"))?;
                let mut sh = st.shared.write();
                if viewing {
                    sh.viewers.entry(caller).or_default().insert(session);
                } else if let Some(s) = sh.viewers.get_mut(&caller) {
                    s.remove(&session);
                    if s.is_empty() {
                        sh.viewers.remove(&caller);
                    }
                }
                Ok(Reply::Done)
            }
            Command::Mute { muted, .. } => {
                self.ctx.store.set_muted(room.id, &caller, muted).await?;
                let mut sh = st.shared.write();
                if muted {
                    sh.muted.insert(caller);
                } else {
                    sh.muted.remove(&caller);
                }
                Ok(Reply::Done)
            }
            Command::MarkRead { message, .. } => {
                let up_to = match message {
                    Some(id) => {
                        let m = self.ctx.store.message(room.id, id).await?;
                        if m.is_none() {
                            return Err(Error::not_found(format!(
                                "message {id} not found in room {}",
                                room.id
                            )));
                        }
                        id
                    }
                    None => match self
                        .ctx
                        .store
                        .room(room.id)
                        .await?
                        .and_then(|r| r.last_message_id)
                    {
                        Some(id) => id,
                        None => return Ok(Reply::Done),
                    },
                };
                self.ctx
                    .store
                    .set_read_marker(room.id, &caller, up_to)
                    .await?;
                let ev = Event::Read {
                    room: room.id,
                    user: caller,
                    message_id: up_to,
                };
                publish_room(&self.ctx, room.id, ev).await;
                Ok(Reply::Done)
            }
            Command::Room { .. } => {
                let mut members: Vec<Member> = st.shared.read().members.values().cloned().collect();
                members.sort_by(|a, b| {
                    (a.joined_at, a.user.as_str()).cmp(&(b.joined_at, b.user.as_str()))
                });
                let room = self.ctx.store.room(room.id).await?.unwrap_or(room);
                let last_message = match room.last_message_id {
                    Some(id) => self
                        .ctx
                        .store
                        .message(room.id, id)
                        .await?
                        .map(crate::public),
                    None => None,
                };
                Ok(Reply::Room {
                    room: schema::RoomSummary {
                        room,
                        members,
                        last_message,
                    },
                    created: false,
                })
            }
            Command::Members { .. } => {
                let mut members: Vec<Member> = st.shared.read().members.values().cloned().collect();
                members.sort_by(|a, b| {
                    (a.joined_at, a.user.as_str()).cmp(&(b.joined_at, b.user.as_str()))
                });
                Ok(Reply::Members { members })
            }
            other => Err(Error::internal(format!(
                "{} is not a room-local command",
                other.name()
            ))),
        }
    }
}

/// The error of a direct room whose pair is blocked.
pub fn blocked_error() -> Error {
    Error::new(
        ErrorCode::Blocked,
        "you cannot message this user: one of you blocked the other",
    )
}

/// Checks a message body against the configured limits.
pub fn check_body(cfg: &crate::NodeConfig, body: &MessageBody) -> Result<(), Error> {
    match body {
        MessageBody::Text { text } => check_text(cfg, text),
        MessageBody::Deleted {} => Err(Error::invalid("a message cannot be sent as deleted")),
        other => {
            let Some(m) = other.media() else {
                return Ok(());
            };
            let r = m.media.trim();
            if r.is_empty() {
                return Err(Error::invalid("media must name an upload"));
            }
            if r.len() > cfg.max_media_ref_len || r.chars().any(char::is_control) {
                return Err(Error::invalid(format!(
                    "media must be a printable upload reference of at most {} bytes",
                    cfg.max_media_ref_len
                )));
            }
            if let Some(c) = &m.caption {
                check_caption(cfg, c)?;
            }
            Ok(())
        }
    }
}

fn check_text(cfg: &crate::NodeConfig, text: &str) -> Result<(), Error> {
    if text.trim().is_empty() {
        return Err(Error::invalid("text must not be empty"));
    }
    let max = cfg.max_text_chars;
    if text.chars().count() > max {
        return Err(Error::new(
            ErrorCode::TextTooLong,
            format!("text is longer than {max} characters"),
        ));
    }
    Ok(())
}

fn check_caption(cfg: &crate::NodeConfig, caption: &str) -> Result<(), Error> {
    let max = cfg.max_caption_chars;
    if caption.chars().count() > max {
        return Err(Error::new(
            ErrorCode::CaptionTooLong,
            format!("caption is longer than {max} characters"),
        ));
    }
    Ok(())
}

fn answer<T: Send + 'static>(reply: RpcReplyPort<T>, value: T) {
    if reply.send(value).is_err() {
        tracing::debug!("caller went away before the answer");
    }
}

/// Publishes `event` to every gateway subscribed to `room`.
pub(crate) async fn publish_room(ctx: &NodeCtx, room: RoomId, event: Event) {
    for gateway in ctx.subscriptions.gateways(room) {
        let d = Delivery {
            gateway,
            target: Target::Room { room },
            event: event.clone(),
            traceparent: None,
        };
        if let Err(e) = ctx.bus.publish(d).await {
            // Stored events are replayed to a client that resumes; ephemeral ones are lost.
            tracing::warn!(%room, error = %e, "room publish failed");
        }
    }
}

enum SeqItem {
    Send {
        sender: UserId,
        body: MessageBody,
        reply_to: Option<MessageId>,
        client_ref: String,
        span: tracing::Span,
        reply: RpcReplyPort<Result<Message, Error>>,
    },
    Change {
        caller: UserId,
        cmd: Command,
        reply: RpcReplyPort<Result<ChangeOutcome, Error>>,
    },
}

impl SeqItem {
    fn fail(self, e: Error) {
        match self {
            SeqItem::Send { reply, .. } => answer(reply, Err(e)),
            SeqItem::Change { reply, .. } => answer(reply, Err(e)),
        }
    }
}

struct SendItem {
    sender: UserId,
    body: MessageBody,
    reply_to: Option<MessageId>,
    client_ref: String,
    span: tracing::Span,
    reply: RpcReplyPort<Result<Message, Error>>,
}

/// A bounded first-in-first-out map of recently sequenced `(sender, client_ref)`.
struct Recent {
    cap: usize,
    map: HashMap<(UserId, String), Message>,
    order: VecDeque<(UserId, String)>,
}

impl Recent {
    fn new(cap: usize) -> Self {
        Self {
            cap: cap.max(1),
            map: HashMap::new(),
            order: VecDeque::new(),
        }
    }

    fn get(&self, k: &(UserId, String)) -> Option<&Message> {
        self.map.get(k)
    }

    fn insert(&mut self, k: (UserId, String), m: Message) {
        if self.map.insert(k.clone(), m).is_none() {
            self.order.push_back(k);
            while self.order.len() > self.cap {
                if let Some(old) = self.order.pop_front() {
                    self.map.remove(&old);
                }
            }
        }
    }
}

struct Sequencer {
    ctx: Arc<NodeCtx>,
    room: RoomId,
    last_seq: u64,
    last_id: u64,
    recent: Recent,
    inflight: Arc<AtomicUsize>,
    actor: ActorRef<RoomMsg>,
    shared: Arc<RwLock<Shared>>,
}

/// A written batch: the new messages, one outcome per send, and the new position.
type SendsWritten = (Vec<Message>, Vec<Result<Outcome, Error>>, u64, u64);

enum Outcome {
    New(usize),
    Dup(Box<Message>),
    DupOfNew(usize),
}

impl Sequencer {
    async fn run(mut self, mut rx: mpsc::Receiver<SeqItem>) {
        // One sequencer per room at a time: a restarted actor's sequencer waits here until the
        // previous one (killed actor, still finishing its queue) is done, then reads the room's
        // position from the store.
        let lock = self.ctx.room_lock(self.room);
        let guard = match lock.clone().try_lock_owned() {
            Ok(guard) => guard,
            Err(_) => {
                let waiting = lock.clone().lock_owned();
                tokio::pin!(waiting);
                match tokio::time::timeout(self.ctx.config.call_timeout, &mut waiting).await {
                    Ok(guard) => guard,
                    Err(_) => {
                        // Normal for a moment (a drained actor finishing its queue); for long,
                        // an actor of this room that does not stop (see `GET /debug/state`).
                        tracing::warn!(room = %self.room, "room sequencer still waits for the previous one");
                        waiting.await
                    }
                }
            }
        };
        let loaded = self.ctx.store.room(self.room).await;
        match loaded {
            Ok(Some(room)) => {
                self.last_seq = room.last_seq;
                self.last_id = room.last_message_id.map_or(0, |m| m.0);
                self.sequence(&mut rx).await;
            }
            Ok(None) => tracing::error!(room = %self.room, "room vanished from the store"),
            Err(e) => self.failed(format!("cannot load the room: {e}")),
        }
        drop(guard);
        drop(lock);
        self.ctx.release_room_lock(self.room);
    }

    fn failed(&self, reason: String) {
        if self
            .actor
            .send_message(RoomMsg::SequencerFailed(reason))
            .is_err()
        {
            tracing::debug!(room = %self.room, "room actor already stopped");
        }
    }

    async fn sequence(&mut self, rx: &mut mpsc::Receiver<SeqItem>) {
        let mut batch = Vec::with_capacity(self.ctx.config.sequencer_batch);
        while rx
            .recv_many(&mut batch, self.ctx.config.sequencer_batch)
            .await
            > 0
        {
            let n = batch.len();
            let ok = self.process(&mut batch).await;
            self.inflight.fetch_sub(n, Ordering::SeqCst);
            if let Err(reason) = ok {
                // Drop the queue: callers see the actor gone and retry on the restarted one.
                self.failed(reason);
                return;
            }
        }
    }

    /// Processes a batch in order: runs of sends share one write; every change has its own.
    async fn process(&mut self, batch: &mut Vec<SeqItem>) -> Result<(), String> {
        let mut sends: Vec<SendItem> = Vec::new();
        let mut items = std::mem::take(batch).into_iter();
        while let Some(item) = items.next() {
            match item {
                SeqItem::Send {
                    sender,
                    body,
                    reply_to,
                    client_ref,
                    span,
                    reply,
                } => sends.push(SendItem {
                    sender,
                    body,
                    reply_to,
                    client_ref,
                    span,
                    reply,
                }),
                SeqItem::Change { caller, cmd, reply } => {
                    if !sends.is_empty()
                        && let Err(r) = self.process_sends(&mut sends).await
                    {
                        answer(reply, Err(Error::unavailable(r.clone())));
                        items.for_each(|i| i.fail(Error::unavailable(r.clone())));
                        return Err(r);
                    }
                    match self.change(&caller, cmd).await {
                        Ok(Ok((outcome, events))) => {
                            answer(reply, Ok(outcome));
                            for e in events {
                                publish_room(&self.ctx, self.room, e).await;
                            }
                        }
                        Ok(Err(e)) => answer(reply, Err(e)),
                        Err(e) => {
                            let r = e.message.clone();
                            answer(reply, Err(e));
                            items.for_each(|i| i.fail(Error::unavailable(r.clone())));
                            return Err(r);
                        }
                    }
                }
            }
        }
        if !sends.is_empty() {
            self.process_sends(&mut sends).await?;
        }
        Ok(())
    }

    async fn process_sends(&mut self, batch: &mut Vec<SendItem>) -> Result<(), String> {
        // Keys missing from the recent window are written without a lookup first: the store
        // refuses a stored key atomically with the write (`DuplicateRef`), and only then does
        // the batch look its keys up and go again. A retry of an old message costs one extra
        // round; a new message (nearly all of them) costs no read.
        let (fresh, outcomes, seq, last_id) = match self.write_sends(batch, false).await? {
            Some(done) => done,
            None => match self.write_sends(batch, true).await? {
                Some(done) => done,
                None => {
                    return Err(fail_all(
                        self.room,
                        batch,
                        Error::internal("client_ref refused as stored, yet not found".to_owned()),
                    ));
                }
            },
        };
        self.last_seq = seq;
        self.last_id = last_id;
        self.ack_and_publish(batch, fresh, outcomes).await;
        Ok(())
    }

    /// Assigns ids and sequence numbers to the batch's new messages and writes them. With
    /// `look_up`, keys missing from the recent window are first looked up in the store;
    /// without, a key the store already holds makes this return `None` with nothing written.
    async fn write_sends(
        &mut self,
        batch: &mut Vec<SendItem>,
        look_up: bool,
    ) -> Result<Option<SendsWritten>, String> {
        let key = |i: &SendItem| (i.sender.clone(), i.client_ref.clone());
        // Keys neither in the recent window nor repeated within this batch: ask the store.
        let mut unknown = Vec::new();
        for item in batch.iter() {
            let k = key(item);
            if look_up && self.recent.get(&k).is_none() && !unknown.contains(&k) {
                unknown.push(k);
            }
        }
        let stored = if unknown.is_empty() {
            Vec::new()
        } else {
            match self
                .ctx
                .store
                .messages_by_client_ref(self.room, unknown)
                .await
            {
                Ok(found) => found,
                Err(e) => return Err(fail_all(self.room, batch, e.into())),
            }
        };
        for m in stored {
            if let Some(cref) = m.client_ref.clone() {
                self.recent.insert((m.sender.clone(), cref), m);
            }
        }
        let mut fresh: Vec<Message> = Vec::new();
        let mut fresh_keys: HashMap<(UserId, String), usize> = HashMap::new();
        let mut outcomes = Vec::with_capacity(batch.len());
        let (mut seq, mut last_id) = (self.last_seq, self.last_id);
        let now = unix_ms();
        for item in batch.iter() {
            let k = key(item);
            if let Some(m) = self.recent.get(&k) {
                outcomes.push(Ok(Outcome::Dup(Box::new(m.clone()))));
            } else if let Some(&i) = fresh_keys.get(&k) {
                outcomes.push(Ok(Outcome::DupOfNew(i)));
            } else if let Some(e) = self.check_reply_to(item.reply_to, &fresh).await {
                outcomes.push(Err(e));
            } else {
                seq += 1;
                last_id = self.ctx.ids.next_after(last_id);
                fresh_keys.insert(k, fresh.len());
                outcomes.push(Ok(Outcome::New(fresh.len())));
                let mut m = Message::new(
                    MessageId(last_id),
                    self.room,
                    seq,
                    item.sender.clone(),
                    item.body.clone(),
                    now,
                );
                m.reply_to = item.reply_to;
                m.client_ref = Some(item.client_ref.clone());
                fresh.push(m);
            }
        }
        if !fresh.is_empty() {
            // Members may read a posted file as soon as they can see the message: record the
            // post before the message (a failure fails the batch; the client retries).
            for m in &fresh {
                if let Some(path) = m.body.media().map(|x| x.media.as_str())
                    && path.starts_with("/uploads/")
                    && let Err(e) = self.ctx.store.add_media_post(path, self.room).await
                {
                    return Err(fail_all(self.room, batch, e.into()));
                }
            }
            let write = RoomWrite {
                new_messages: fresh.clone(),
                last_seq: seq,
                last_message_id: Some(MessageId(last_id)),
                at: now,
                ..RoomWrite::default()
            };
            // One write for the batch: a child of the first send's trace, linked to the others.
            let span = match batch.first() {
                Some(first) if crate::trace::enabled() => {
                    let span = tracing::info_span!(
                        parent: &first.span,
                        "store.write",
                        room = %self.room,
                        messages = fresh.len(),
                    );
                    for other in batch.iter().skip(1).take(MAX_LINKS) {
                        crate::trace::link(&span, &other.span);
                    }
                    span
                }
                _ => tracing::Span::none(),
            };
            let written = self
                .ctx
                .store
                .apply_room(self.room, write)
                .instrument(span)
                .await;
            match written {
                Ok(()) => {}
                Err(crate::store::StoreError::DuplicateRef(why)) if !look_up => {
                    tracing::debug!(room = %self.room, %why, "retried send: looking its key up");
                    return Ok(None);
                }
                // Another node wrote this room's next seq: during a ring change two nodes can
                // hold the room for a moment, and the store fences the second writer. Nothing
                // of this batch was stored; the actor stops and the room restarts from the
                // store, so the senders must retry (same client_ref): a retryable error, not
                // an internal one.
                Err(crate::store::StoreError::Conflict(why)) => {
                    return Err(fail_all(
                        self.room,
                        batch,
                        Error::unavailable(format!(
                            "room {} was written by another node during a ring change; \
                             retry: {why}",
                            self.room
                        )),
                    ));
                }
                Err(e) => return Err(fail_all(self.room, batch, e.into())),
            }
        }
        Ok(Some((fresh, outcomes, seq, last_id)))
    }

    /// Acks the batch (strictly after its durable write), then publishes the new messages in
    /// sequence order with their push jobs and pending notifications.
    async fn ack_and_publish(
        &mut self,
        batch: &mut Vec<SendItem>,
        fresh: Vec<Message>,
        outcomes: Vec<Result<Outcome, Error>>,
    ) {
        // `palaver_fanout_seconds{stage="node"}`: from the durable write to each message's
        // deliveries handed to the bus (acks and earlier messages of the batch included).
        let committed = std::time::Instant::now();
        let fanout = metrics::histogram!("palaver_fanout_seconds", "stage" => "node");
        // Each new message is published within its sender's `room.send` span.
        let mut spans = vec![tracing::Span::none(); fresh.len()];
        for (item, outcome) in batch.drain(..).zip(outcomes) {
            if let Ok(Outcome::New(i)) = &outcome
                && let Some(slot) = spans.get_mut(*i)
            {
                *slot = item.span.clone();
            }
            let res = outcome.map(|o| match o {
                Outcome::New(i) | Outcome::DupOfNew(i) => fresh[i].clone(),
                Outcome::Dup(m) => *m,
            });
            answer(item.reply, res.map(crate::public));
        }
        // Then the fan-out, in sequence order, the push jobs and the pending notifications.
        let mut candidates: Vec<(UserId, usize)> = Vec::new();
        let mut pushes = Vec::new();
        let wants_push = self.ctx.bus.wants_push();
        let mut notes: Vec<Notification> = Vec::new();
        let mut push_spans: Vec<tracing::Span> = Vec::new();
        for (m, span) in fresh.into_iter().zip(spans) {
            let cref = m.client_ref.clone().unwrap_or_default();
            self.recent.insert((m.sender.clone(), cref), m.clone());
            let m = crate::public(m);
            let before = candidates.len();
            self.pending_candidates(&m, notes.len(), &mut candidates);
            if candidates.len() > before {
                notes.push(Notification {
                    room: m.room,
                    message_id: m.id,
                    seq: m.seq,
                    sender: m.sender.clone(),
                    preview: m.body.preview(),
                    created_at: m.created_at,
                });
            }
            if wants_push {
                self.collect_pushes(&m, &mut pushes);
                push_spans.resize(pushes.len(), span.clone());
            }
            publish_room(&self.ctx, self.room, Event::Message { message: m })
                .instrument(span)
                .await;
            fanout.record(committed.elapsed());
        }
        for (job, span) in pushes.into_iter().zip(push_spans) {
            if let Err(e) = self.ctx.bus.publish_push(job).instrument(span).await {
                tracing::warn!(room = %self.room, error = %e, "push job not published");
            }
        }
        if !candidates.is_empty() {
            // Only members with no session anywhere keep a pending notification: one who is
            // online saw the message arrive (in the room, or as a live notification).
            let mut users: Vec<UserId> = candidates.iter().map(|(u, _)| u.clone()).collect();
            users.sort_unstable();
            users.dedup();
            let online = self.ctx.online_of(&users).await;
            candidates.retain(|(u, _)| !online.get(u).copied().unwrap_or(false));
        }
        let pending: Vec<(UserId, Notification)> = candidates
            .into_iter()
            .map(|(user, i)| (user, notes[i].clone()))
            .collect();
        if !pending.is_empty() {
            let cap = self.ctx.config.pending_per_user;
            if let Err(e) = self.ctx.store.add_pending(pending, cap).await {
                tracing::warn!(room = %self.room, error = %e, "pending notifications not stored");
            }
        }
    }

    /// A `reply_to` must name a message of this room (stored, or earlier in this batch).
    async fn check_reply_to(
        &self,
        reply_to: Option<MessageId>,
        fresh: &[Message],
    ) -> Option<Error> {
        let id = reply_to?;
        if fresh.iter().any(|m| m.id == id) {
            return None;
        }
        match self.ctx.store.message(self.room, id).await {
            Ok(Some(_)) => None,
            Ok(None) => Some(Error::not_found(format!(
                "reply_to: message {id} not found in room {}",
                self.room
            ))),
            Err(e) => Some(e.into()),
        }
    }

    /// A push job for each member who is not the sender, has no session viewing the room and
    /// did not mute it (rooms up to the configured size). The worker sends it to each of the
    /// member's devices; the room's id is the collapse key, so a burst shows as one
    /// notification per device.
    fn collect_pushes(&self, m: &Message, out: &mut Vec<PushJob>) {
        let sh = self.shared.read();
        if sh.members.len() > self.ctx.config.push_room_max {
            return;
        }
        let group = (sh.room.kind == RoomKind::Group).then(|| sh.room.name.clone());
        let mut shared: Option<(String, String)> = None;
        for user in sh.members.keys() {
            if user == &m.sender || sh.viewers.contains_key(user) || sh.muted.contains(user) {
                continue;
            }
            let (preview, collapse_key) = shared
                .get_or_insert_with(|| (m.body.preview(), format!("room-{}", m.room)))
                .clone();
            out.push(PushJob {
                user: user.clone(),
                room: m.room,
                message: m.id,
                sender: m.sender.clone(),
                preview,
                kind: m.body.kind().to_owned(),
                room_name: group.clone().flatten(),
                collapse_key,
                created_at: m.created_at,
                traceparent: None,
            });
        }
    }

    /// Members with no session viewing the room are the candidates for a pending notification
    /// of message number `index` (rooms up to the configured size, so one message never costs
    /// more than that many writes); the caller keeps those who are offline.
    fn pending_candidates(&self, m: &Message, index: usize, out: &mut Vec<(UserId, usize)>) {
        let sh = self.shared.read();
        if sh.members.len() > self.ctx.config.pending_room_max {
            return;
        }
        for user in sh.members.keys() {
            if user == &m.sender || sh.viewers.contains_key(user) {
                continue;
            }
            out.push((user.clone(), index));
        }
    }

    /// Validates and applies one change. The outer error is a store failure (the sequencer
    /// stops); the inner one is the caller's mistake.
    async fn change(
        &mut self,
        caller: &UserId,
        cmd: Command,
    ) -> Result<Result<(ChangeOutcome, Vec<Event>), Error>, Error> {
        let plan = match self.plan(caller, cmd).await? {
            Ok(p) => p,
            Err(e) => return Ok(Err(e)),
        };
        let Plan {
            mut write,
            events,
            outcome,
            members_after,
            room_after,
        } = plan;
        if events.is_empty() && write.upsert_members.is_empty() && write.remove_members.is_empty() {
            return Ok(Ok((outcome, events)));
        }
        write.last_seq = self.last_seq + events.len() as u64;
        write.last_message_id = (self.last_id > 0).then_some(MessageId(self.last_id));
        write.at = unix_ms();
        write.log = events
            .iter()
            .filter_map(|e| e.seq().map(|s| (s, e.clone())))
            .collect();
        self.ctx.store.apply_room(self.room, write).await?;
        self.last_seq += events.len() as u64;
        let mut sh = self.shared.write();
        if let Some(members) = members_after {
            sh.members = members;
            let keep: HashSet<UserId> = sh.members.keys().cloned().collect();
            sh.viewers.retain(|u, _| keep.contains(u));
        }
        if let Some(room) = room_after {
            sh.room = room;
        }
        sh.room.last_seq = self.last_seq;
        drop(sh);
        Ok(Ok((outcome, events)))
    }

    /// Works out what a change does. `Ok(Err(_))`: refused.
    async fn plan(&self, caller: &UserId, cmd: Command) -> Result<Result<Plan, Error>, Error> {
        let (room, members, role) = {
            let sh = self.shared.read();
            (sh.room.clone(), sh.members.clone(), sh.role(caller))
        };
        let refuse = |e: Error| Ok(Err(e));
        let is_group = room.kind == RoomKind::Group;
        let mut seq = self.last_seq;
        let mut next = || {
            seq += 1;
            seq
        };
        let now = unix_ms();
        let cfg = &self.ctx.config;
        // Joining is the one change a non-member may make.
        if !matches!(cmd, Command::Join { .. }) && role.is_none() {
            return refuse(Error::not_member(room.id));
        }
        let admin = matches!(role, Some(Role::Owner | Role::Admin));
        let mut plan = Plan::done();
        match cmd {
            Command::Edit { message, text, .. } => {
                let Some(mut m) = self.ctx.store.message(room.id, message).await? else {
                    return refuse(not_found_msg(message, room.id));
                };
                if &m.sender != caller {
                    return refuse(Error::new(
                        ErrorCode::Forbidden,
                        "only the author can edit a message",
                    ));
                }
                match &mut m.body {
                    MessageBody::Deleted {} => {
                        return refuse(Error::new(
                            ErrorCode::Conflict,
                            format!("message {message} was deleted"),
                        ));
                    }
                    MessageBody::Text { text: t } => {
                        if let Err(e) = check_text(cfg, &text) {
                            return refuse(e);
                        }
                        *t = text;
                    }
                    MessageBody::Image(md)
                    | MessageBody::Audio(md)
                    | MessageBody::Video(md)
                    | MessageBody::File(md) => {
                        if let Err(e) = check_caption(cfg, &text) {
                            return refuse(e);
                        }
                        md.caption = (!text.is_empty()).then_some(text);
                    }
                }
                m.edited_at = Some(now);
                let m = crate::public(m);
                plan.write.changed_messages.push(m.clone());
                plan.events.push(Event::MessageEdited {
                    seq: next(),
                    message: m.clone(),
                });
                plan.outcome.reply = Reply::Message { message: m };
            }
            Command::Delete { messages, .. } => {
                if messages.is_empty() || messages.len() > MAX_DELETE {
                    return refuse(Error::invalid(format!(
                        "delete names 1 to {MAX_DELETE} messages"
                    )));
                }
                let mut seen = HashSet::new();
                let mut out = Vec::new();
                for id in messages {
                    if !seen.insert(id) {
                        continue;
                    }
                    let Some(mut m) = self.ctx.store.message(room.id, id).await? else {
                        return refuse(not_found_msg(id, room.id));
                    };
                    let may = &m.sender == caller || (is_group && admin);
                    if !may {
                        return refuse(Error::new(
                            ErrorCode::Forbidden,
                            format!("message {id}: only its author or a group admin can delete it"),
                        ));
                    }
                    if m.deleted_at.is_some() {
                        out.push(crate::public(m));
                        continue;
                    }
                    m.body = MessageBody::Deleted {};
                    m.reactions.clear();
                    m.edited_at = None;
                    m.deleted_at = Some(now);
                    let m = crate::public(m);
                    plan.write.changed_messages.push(m.clone());
                    plan.events.push(Event::MessageDeleted {
                        seq: next(),
                        room: room.id,
                        message_id: id,
                        by: caller.clone(),
                    });
                    out.push(m);
                }
                plan.outcome.reply = Reply::Messages { messages: out };
            }
            Command::React {
                message,
                emoji,
                add,
                ..
            } => {
                let e = emoji.trim();
                if e.is_empty()
                    || e.len() > MAX_EMOJI_BYTES
                    || e.chars().any(|c| c.is_control() || c.is_whitespace())
                {
                    return refuse(Error::invalid(format!(
                        "emoji must be 1 to {MAX_EMOJI_BYTES} bytes without spaces"
                    )));
                }
                let Some(mut m) = self.ctx.store.message(room.id, message).await? else {
                    return refuse(not_found_msg(message, room.id));
                };
                if m.deleted_at.is_some() {
                    return refuse(Error::new(
                        ErrorCode::Conflict,
                        format!("message {message} was deleted"),
                    ));
                }
                let changed = if add {
                    if !m.reactions.contains_key(e) && m.reactions.len() >= MAX_EMOJI_PER_MESSAGE {
                        return refuse(Error::new(
                            ErrorCode::LimitExceeded,
                            format!("a message has at most {MAX_EMOJI_PER_MESSAGE} emoji"),
                        ));
                    }
                    let users = m.reactions.entry(e.to_owned()).or_default();
                    if users.contains(caller) {
                        false
                    } else {
                        users.push(caller.clone());
                        true
                    }
                } else {
                    let had = m.reactions.get(e).is_some_and(|u| u.contains(caller));
                    if let Some(users) = m.reactions.get_mut(e) {
                        users.retain(|u| u != caller);
                        if users.is_empty() {
                            m.reactions.remove(e);
                        }
                    }
                    had
                };
                let m = crate::public(m);
                if changed {
                    plan.write.changed_messages.push(m.clone());
                    plan.events.push(Event::Reaction {
                        seq: next(),
                        message: m.clone(),
                        user: caller.clone(),
                        emoji: e.to_owned(),
                        added: add,
                    });
                }
                plan.outcome.reply = Reply::Message { message: m };
            }
            Command::UpdateGroup {
                name,
                avatar,
                public,
                ..
            } => {
                if !is_group {
                    return refuse(Error::invalid("direct rooms have no name or avatar"));
                }
                if !admin {
                    return refuse(Error::new(
                        ErrorCode::Forbidden,
                        "only the owner or an admin can change the group",
                    ));
                }
                let mut r = room.clone();
                if let Some(n) = name {
                    match check_group_name(&n) {
                        Ok(n) => r.name = Some(n),
                        Err(e) => return refuse(e),
                    }
                }
                if let Some(a) = avatar {
                    if a.len() > cfg.max_media_ref_len {
                        return refuse(Error::invalid("avatar is too long"));
                    }
                    r.avatar = (!a.is_empty()).then_some(a);
                }
                if let Some(p) = public {
                    r.public = p;
                }
                if (&r.name, &r.avatar, r.public) != (&room.name, &room.avatar, room.public) {
                    plan.write.patch = Some(RoomPatch {
                        name: r.name.clone(),
                        avatar: r.avatar.clone(),
                        public: r.public,
                    });
                    let s = next();
                    r.last_seq = s;
                    plan.events.push(Event::RoomUpdated {
                        seq: s,
                        room: r.clone(),
                    });
                    plan.room_after = Some(r.clone());
                }
                plan.outcome.reply = Reply::Room {
                    room: schema::RoomSummary {
                        room: r,
                        members: sorted(&members),
                        last_message: None,
                    },
                    created: false,
                };
            }
            Command::AddMembers { .. } | Command::Join { .. } if !is_group => {
                return refuse(Error::invalid("direct rooms have exactly their two users"));
            }
            Command::AddMembers { users, .. } => {
                if !admin {
                    return refuse(Error::new(
                        ErrorCode::Forbidden,
                        "only the owner or an admin can add members",
                    ));
                }
                let mut after = members.clone();
                let mut added = Vec::new();
                for u in users {
                    if after.contains_key(&u) || added.contains(&u) {
                        continue;
                    }
                    if let Err(e) = self.may_join(&u, after.len() + added.len()).await? {
                        return refuse(e);
                    }
                    added.push(u);
                }
                for u in &added {
                    let m = Member {
                        user: u.clone(),
                        role: Role::Member,
                        joined_at: now,
                        online: None,
                    };
                    after.insert(u.clone(), m.clone());
                    plan.write.upsert_members.push(m.clone());
                    plan.events.push(Event::MemberJoined {
                        seq: next(),
                        room: room.id,
                        member: m,
                        by: caller.clone(),
                    });
                }
                plan.outcome.reply = Reply::Members {
                    members: sorted(&after),
                };
                plan.outcome.joined = added;
                plan.members_after = Some(after);
            }
            Command::Join { .. } => {
                if members.contains_key(caller) {
                    plan.outcome.reply = Reply::Members {
                        members: sorted(&members),
                    };
                    return Ok(Ok(plan));
                }
                if !room.public {
                    return refuse(Error::new(
                        ErrorCode::Forbidden,
                        "this group is private: ask an admin to add you",
                    ));
                }
                if let Err(e) = self.may_join(caller, members.len()).await? {
                    return refuse(e);
                }
                let m = Member {
                    user: caller.clone(),
                    role: Role::Member,
                    joined_at: now,
                    online: None,
                };
                let mut after = members.clone();
                after.insert(caller.clone(), m.clone());
                plan.write.upsert_members.push(m.clone());
                plan.events.push(Event::MemberJoined {
                    seq: next(),
                    room: room.id,
                    member: m,
                    by: caller.clone(),
                });
                plan.outcome.reply = Reply::Members {
                    members: sorted(&after),
                };
                plan.outcome.joined = vec![caller.clone()];
                plan.members_after = Some(after);
            }
            Command::RemoveMember { user, .. } => {
                if !is_group {
                    return refuse(Error::invalid("direct rooms have exactly their two users"));
                }
                if &user == caller {
                    return refuse(Error::invalid("use leave to leave a group"));
                }
                let Some(target) = members.get(&user) else {
                    return refuse(Error::not_found(format!(
                        "{user} is not a member of room {}",
                        room.id
                    )));
                };
                let may = match role {
                    Some(Role::Owner) => true,
                    Some(Role::Admin) => target.role == Role::Member,
                    _ => false,
                };
                if !may {
                    return refuse(Error::new(
                        ErrorCode::Forbidden,
                        "only the owner, or an admin removing a plain member, can remove members",
                    ));
                }
                let mut after = members.clone();
                after.remove(&user);
                plan.write.remove_members.push(user.clone());
                plan.events.push(Event::MemberLeft {
                    seq: next(),
                    room: room.id,
                    user: user.clone(),
                    by: caller.clone(),
                });
                plan.outcome.reply = Reply::Members {
                    members: sorted(&after),
                };
                plan.outcome.left = vec![user];
                plan.members_after = Some(after);
            }
            Command::SetRole { user, role: to, .. } => {
                if !is_group {
                    return refuse(Error::invalid("direct rooms have no roles"));
                }
                if role != Some(Role::Owner) {
                    return refuse(Error::new(
                        ErrorCode::Forbidden,
                        "only the owner can change roles",
                    ));
                }
                if to == Role::Owner {
                    return refuse(Error::invalid("role must be admin or member"));
                }
                let Some(target) = members.get(&user) else {
                    return refuse(Error::not_found(format!(
                        "{user} is not a member of room {}",
                        room.id
                    )));
                };
                if target.role == Role::Owner {
                    return refuse(Error::invalid("the owner's role cannot change"));
                }
                let mut after = members.clone();
                if target.role != to {
                    let mut m = target.clone();
                    m.role = to;
                    after.insert(user.clone(), m.clone());
                    plan.write.upsert_members.push(m.clone());
                    plan.events.push(Event::MemberUpdated {
                        seq: next(),
                        room: room.id,
                        member: m,
                    });
                    plan.members_after = Some(after.clone());
                }
                plan.outcome.reply = Reply::Members {
                    members: sorted(&after),
                };
            }
            Command::Leave { .. } => {
                if !is_group {
                    return refuse(Error::invalid(
                        "a direct room cannot be left; block the user instead",
                    ));
                }
                let mut after = members.clone();
                after.remove(caller);
                if role == Some(Role::Owner) {
                    // Hand the group to the oldest admin, else the oldest member.
                    let heir = after
                        .values()
                        .min_by_key(|m| (m.role != Role::Admin, m.joined_at, m.user.clone()))
                        .cloned();
                    if let Some(mut h) = heir {
                        h.role = Role::Owner;
                        after.insert(h.user.clone(), h.clone());
                        plan.write.upsert_members.push(h.clone());
                        plan.events.push(Event::MemberUpdated {
                            seq: next(),
                            room: room.id,
                            member: h,
                        });
                    }
                }
                plan.write.remove_members.push(caller.clone());
                plan.events.push(Event::MemberLeft {
                    seq: next(),
                    room: room.id,
                    user: caller.clone(),
                    by: caller.clone(),
                });
                plan.outcome.reply = Reply::Done;
                plan.outcome.left = vec![caller.clone()];
                plan.members_after = Some(after);
            }
            other => {
                return refuse(Error::internal(format!(
                    "{} is not a room change",
                    other.name()
                )));
            }
        }
        Ok(Ok(plan))
    }

    /// Whether `user` may join a group that has `count` members: the user exists, the group
    /// has room, the user is in fewer rooms than the limit. Outer error: store failure.
    async fn may_join(&self, user: &UserId, count: usize) -> Result<Result<(), Error>, Error> {
        let cfg = &self.ctx.config;
        if count >= cfg.group_max_members {
            return Ok(Err(Error::new(
                ErrorCode::GroupFull,
                format!("a group has at most {} members", cfg.group_max_members),
            )));
        }
        if self.ctx.store.user(user).await?.is_none() {
            return Ok(Err(Error::not_found(format!("user {user} not found"))));
        }
        let rooms = self.ctx.store.room_ids_of(user).await?.len();
        if rooms >= cfg.max_rooms_per_user {
            return Ok(Err(too_many_rooms(user, cfg.max_rooms_per_user)));
        }
        Ok(Ok(()))
    }
}

/// The error of a user already in the configured maximum of rooms.
pub fn too_many_rooms(user: &UserId, max: usize) -> Error {
    Error::new(
        ErrorCode::TooManyRooms,
        format!("user {user} is already in {max} rooms, the most allowed"),
    )
}

/// Checks and trims a group name: 1 to 100 characters.
pub fn check_group_name(name: &str) -> Result<String, Error> {
    let n = name.trim();
    let chars = n.chars().count();
    if chars == 0 || chars > 100 {
        return Err(Error::invalid("name must be 1 to 100 characters"));
    }
    Ok(n.to_owned())
}

fn not_found_msg(id: MessageId, room: RoomId) -> Error {
    Error::not_found(format!("message {id} not found in room {room}"))
}

fn sorted(members: &HashMap<UserId, Member>) -> Vec<Member> {
    let mut v: Vec<Member> = members.values().cloned().collect();
    v.sort_by(|a, b| (a.joined_at, a.user.as_str()).cmp(&(b.joined_at, b.user.as_str())));
    v
}

/// What a change will do.
struct Plan {
    write: RoomWrite,
    events: Vec<Event>,
    outcome: ChangeOutcome,
    members_after: Option<HashMap<UserId, Member>>,
    room_after: Option<Room>,
}

impl Plan {
    fn done() -> Self {
        Self {
            write: RoomWrite::default(),
            events: Vec::new(),
            outcome: ChangeOutcome {
                reply: Reply::Done,
                joined: Vec::new(),
                left: Vec::new(),
            },
            members_after: None,
            room_after: None,
        }
    }
}

fn fail_all(room: RoomId, batch: &mut Vec<SendItem>, e: Error) -> String {
    tracing::error!(%room, error = %e, "room write failed");
    for item in batch.drain(..) {
        answer(item.reply, Err(e.clone()));
    }
    e.message
}
