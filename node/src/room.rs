//! The room actor: the single writer of one room.
//!
//! The actor validates (membership, message content) in its mailbox order and hands each
//! accepted send to the room's **sequencer**, a task the actor owns. The sequencer takes every
//! send waiting for it (a batch), drops retries it has seen (`(sender, client_ref)`, checked in a
//! recent-window cache and then in the store), assigns ids and sequence numbers, writes the batch
//! in one durable store call, *then* answers every sender (the ack), *then* publishes the new
//! messages to the gateways subscribed to the room. Batching keeps a hot room fast: one store
//! round trip carries many messages, and the order is the sequencer's one order.
//!
//! If a write fails, the sequencer answers the batch with `unavailable` and tells the actor,
//! which fails; its supervisor restarts it and the new actor reloads the room from the store, so
//! nothing half-known survives. Senders retry with the same `client_ref` and get no duplicate.

use crate::NodeCtx;
use crate::ids::unix_ms;
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use schema::{
    Delivery, Error, Event, Message, MessageBody, MessageId, Role, Room, RoomId, Target, UserId,
};
use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;
use tokio::sync::mpsc;

/// Messages of a room actor.
pub enum RoomMsg {
    /// Post a message as `sender`.
    Send {
        /// The authenticated sender.
        sender: UserId,
        /// The content.
        body: MessageBody,
        /// Idempotency key (the router supplies one when the client did not).
        client_ref: String,
        /// The ack.
        reply: RpcReplyPort<Result<Message, Error>>,
    },
    /// Check that `user` may read the room; answers the room.
    Authorize {
        /// The reader.
        user: UserId,
        /// The room, or `not_member`.
        reply: RpcReplyPort<Result<Room, Error>>,
    },
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

/// A room actor's state, built from the store in `pre_start`.
pub struct RoomState {
    room: Room,
    members: HashMap<UserId, Role>,
    to_sequencer: mpsc::Sender<SeqItem>,
    inflight: Arc<AtomicUsize>,
    last_activity: Instant,
    ticker: tokio::task::JoinHandle<()>,
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
        let store = &self.ctx.store;
        let room = store
            .room(id)
            .await?
            .ok_or_else(|| Error::not_found(format!("room {id} does not exist")))?;
        let members = store
            .members(id)
            .await?
            .into_iter()
            .map(|m| (m.user, m.role))
            .collect();
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
        };
        self.ctx.tasks.spawn(seq.run(rx));
        let ticker = myself.send_interval(self.ctx.config.idle_timeout / 2, || RoomMsg::Tick);
        Ok(RoomState {
            room,
            members,
            to_sequencer: tx,
            inflight,
            last_activity: Instant::now(),
            ticker,
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
                client_ref,
                reply,
            } => {
                st.last_activity = Instant::now();
                if let Err(e) = self.check_send(st, &sender, &body) {
                    answer(reply, Err(e));
                    return Ok(());
                }
                st.inflight.fetch_add(1, Ordering::SeqCst);
                let item = SeqItem {
                    sender,
                    body,
                    client_ref,
                    reply,
                };
                if let Err(mpsc::error::SendError(item)) = st.to_sequencer.send(item).await {
                    answer(
                        item.reply,
                        Err(Error::unavailable("room sequencer stopped")),
                    );
                    return Err("room sequencer stopped".into());
                }
            }
            RoomMsg::Authorize { user, reply } => {
                st.last_activity = Instant::now();
                let res = if st.members.contains_key(&user) {
                    Ok(st.room.clone())
                } else {
                    Err(Error::not_member(st.room.id))
                };
                answer(reply, res);
            }
            RoomMsg::SequencerFailed(reason) => {
                return Err(format!("room {}: store write failed: {reason}", st.room.id).into());
            }
            RoomMsg::Tick => {
                if st.inflight.load(Ordering::SeqCst) == 0
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
    fn check_send(&self, st: &RoomState, sender: &UserId, body: &MessageBody) -> Result<(), Error> {
        if !st.members.contains_key(sender) {
            return Err(Error::not_member(st.room.id));
        }
        match body {
            MessageBody::Text { text } => {
                if text.trim().is_empty() {
                    return Err(Error::invalid("text must not be empty"));
                }
                let max = self.ctx.config.max_text_chars;
                if text.chars().count() > max {
                    return Err(Error::invalid(format!(
                        "text is longer than {max} characters"
                    )));
                }
            }
        }
        Ok(())
    }
}

fn answer<T: Send + 'static>(reply: RpcReplyPort<T>, value: T) {
    if reply.send(value).is_err() {
        tracing::debug!("caller went away before the answer");
    }
}

struct SeqItem {
    sender: UserId,
    body: MessageBody,
    client_ref: String,
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
}

enum Outcome {
    New(usize),
    Dup(Message),
    DupOfNew(usize),
}

impl Sequencer {
    async fn run(mut self, mut rx: mpsc::Receiver<SeqItem>) {
        // One sequencer per room at a time: a restarted actor's sequencer waits here until the
        // previous one (killed actor, still finishing its queue) is done, then reads the room's
        // position from the store.
        let lock = self.ctx.room_lock(self.room);
        let guard = lock.clone().lock_owned().await;
        let loaded = self.ctx.store.room(self.room).await;
        match loaded {
            Ok(Some(room)) => {
                self.last_seq = room.last_seq;
                self.last_id = room.last_message_id.map_or(0, |m| m.0);
                self.sequence(&mut rx).await;
            }
            Ok(None) => tracing::error!(room = %self.room, "room vanished from the store"),
            Err(e) => {
                let reason = format!("cannot load the room: {e}");
                if self
                    .actor
                    .send_message(RoomMsg::SequencerFailed(reason))
                    .is_err()
                {
                    tracing::debug!(room = %self.room, "room actor already stopped");
                }
            }
        }
        drop(guard);
        drop(lock);
        self.ctx.release_room_lock(self.room);
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
                if self
                    .actor
                    .send_message(RoomMsg::SequencerFailed(reason))
                    .is_err()
                {
                    tracing::debug!(room = %self.room, "room actor already stopped");
                }
                return;
            }
        }
    }

    async fn process(&mut self, batch: &mut Vec<SeqItem>) -> Result<(), String> {
        let key = |i: &SeqItem| (i.sender.clone(), i.client_ref.clone());
        // Keys neither in the recent window nor repeated within this batch: ask the store.
        let mut unknown = Vec::new();
        for item in batch.iter() {
            let k = key(item);
            if self.recent.get(&k).is_none() && !unknown.contains(&k) {
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
                Err(e) => return Err(self.fail_all(batch, e.into())),
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
        for item in batch.iter() {
            let k = key(item);
            if let Some(m) = self.recent.get(&k) {
                outcomes.push(Outcome::Dup(m.clone()));
            } else if let Some(&i) = fresh_keys.get(&k) {
                outcomes.push(Outcome::DupOfNew(i));
            } else {
                seq += 1;
                last_id = self.ctx.ids.next_after(last_id);
                fresh_keys.insert(k, fresh.len());
                outcomes.push(Outcome::New(fresh.len()));
                fresh.push(Message {
                    id: MessageId(last_id),
                    room: self.room,
                    seq,
                    sender: item.sender.clone(),
                    body: item.body.clone(),
                    client_ref: Some(item.client_ref.clone()),
                    created_at: unix_ms(),
                });
            }
        }
        if let Err(e) = self
            .ctx
            .store
            .append_messages(self.room, fresh.clone())
            .await
        {
            return Err(self.fail_all(batch, e.into()));
        }
        self.last_seq = seq;
        self.last_id = last_id;
        // The ack, strictly after the durable write.
        for (item, outcome) in batch.drain(..).zip(outcomes) {
            let msg = match outcome {
                Outcome::New(i) | Outcome::DupOfNew(i) => fresh[i].clone(),
                Outcome::Dup(m) => m,
            };
            answer(item.reply, Ok(crate::public(msg)));
        }
        // Then the fan-out, in sequence order.
        for m in fresh {
            let cref = m.client_ref.clone().unwrap_or_default();
            self.recent.insert((m.sender.clone(), cref), m.clone());
            self.fan_out(crate::public(m)).await;
        }
        Ok(())
    }

    fn fail_all(&self, batch: &mut Vec<SeqItem>, e: Error) -> String {
        tracing::error!(room = %self.room, error = %e, "room write failed");
        for item in batch.drain(..) {
            answer(item.reply, Err(e.clone()));
        }
        e.message
    }

    async fn fan_out(&self, message: Message) {
        let room = self.room;
        let event = Event::Message { message };
        for gateway in self.ctx.subscriptions.gateways(room) {
            let d = Delivery {
                gateway,
                target: Target::Room { room },
                event: event.clone(),
            };
            if let Err(e) = self.ctx.bus.publish(d).await {
                // The message is stored and acknowledged; a client that missed it gets it from
                // history when it resumes.
                tracing::warn!(%room, error = %e, "fan-out publish failed");
            }
        }
    }
}
