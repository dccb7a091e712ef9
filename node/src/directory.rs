//! Where a node's actors are found: start on first use, supervised, restarted after a crash.
//!
//! A [`Directory`] maps keys (room ids, user ids) to running actors. The first call for a key
//! asks the directory's supervisor actor to spawn the child (linked to it); the child loads its
//! state from the store in `pre_start`. The supervisor forgets a child that stopped (idle) and
//! restarts one that failed, so the next call finds a fresh actor that reloaded from the store.
//!
//! Mailboxes in `ractor` are unbounded, so each entry carries a semaphore: at most
//! `mailbox` calls are in flight per actor, and a caller waits (up to its deadline) for a slot.
//! That bounds every actor queue and turns overload into back-pressure and then a clear error.

use dashmap::DashMap;
use ractor::rpc::CallResult;
use ractor::{Actor, ActorId, ActorProcessingErr, ActorRef, RpcReplyPort, SupervisionEvent};
use schema::{Error, ErrorCode};
use std::collections::HashMap;
use std::fmt::Debug;
use std::hash::Hash;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Semaphore;

/// How to build the child actor for a key.
pub trait ChildSpec: Send + Sync + 'static {
    /// The key (room id, user id).
    type Key: Clone + Eq + Hash + Debug + Send + Sync + 'static;
    /// The child actor.
    type Child: Actor;
    /// A name for logs ("room", "user").
    const KIND: &'static str;
    /// The actor and its start-up arguments for `key`.
    fn make(&self, key: &Self::Key) -> (Self::Child, <Self::Child as Actor>::Arguments);
}

type ChildMsg<S> = <<S as ChildSpec>::Child as Actor>::Msg;

/// A running child and its in-flight bound.
pub struct Entry<M: ractor::Message> {
    /// The actor.
    pub actor: ActorRef<M>,
    permits: Arc<Semaphore>,
}

impl<M: ractor::Message> Clone for Entry<M> {
    fn clone(&self) -> Self {
        Self {
            actor: self.actor.clone(),
            permits: self.permits.clone(),
        }
    }
}

/// Actors of one kind on this node.
pub struct Directory<S: ChildSpec> {
    entries: Arc<DashMap<S::Key, Entry<ChildMsg<S>>>>,
    supervisor: ActorRef<SupervisorMsg<S>>,
    mailbox: usize,
    timeout: Duration,
}

impl<S: ChildSpec> Directory<S> {
    /// Starts the directory's supervisor. `mailbox` bounds in-flight calls per actor; `timeout`
    /// is the deadline of one call, including the wait for a slot.
    pub async fn start(spec: S, mailbox: usize, timeout: Duration) -> Result<Self, Error> {
        let entries = Arc::new(DashMap::new());
        let mailbox = mailbox.max(1);
        let sup = Supervisor::<S> {
            spec: Arc::new(spec),
            entries: entries.clone(),
            mailbox,
            actors: metrics::gauge!("palaver_actors", "kind" => S::KIND),
        };
        let (supervisor, _) = Actor::spawn(None, sup, ()).await.map_err(|e| {
            Error::internal(format!("cannot start the {} supervisor: {e}", S::KIND))
        })?;
        Ok(Self {
            entries,
            supervisor,
            mailbox,
            timeout,
        })
    }

    /// The running actor for `key`, if any (never starts one).
    pub fn get(&self, key: &S::Key) -> Option<ActorRef<ChildMsg<S>>> {
        self.entries.get(key).map(|e| e.actor.clone())
    }

    /// The running actors with calls in flight, and how many, busiest first (at most `max`).
    pub fn busy(&self, max: usize) -> Vec<(S::Key, usize)> {
        let mut out: Vec<(S::Key, usize)> = self
            .entries
            .iter()
            .filter_map(|e| {
                let calls = self.mailbox.saturating_sub(e.permits.available_permits());
                (calls > 0).then(|| (e.key().clone(), calls))
            })
            .collect();
        out.sort_by_key(|e| std::cmp::Reverse(e.1));
        out.truncate(max);
        out
    }

    /// Number of running actors.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether no actor is running.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    async fn entry(&self, key: &S::Key) -> Result<Entry<ChildMsg<S>>, Error> {
        if let Some(e) = self.entries.get(key) {
            return Ok(e.clone());
        }
        let key = key.clone();
        match self
            .supervisor
            .call(|reply| SupervisorMsg::Spawn(key, reply), Some(self.timeout))
            .await
        {
            Ok(CallResult::Success(r)) => r,
            Ok(CallResult::Timeout) => Err(Error::new(
                ErrorCode::Timeout,
                format!("starting the {} actor timed out", S::KIND),
            )),
            Ok(CallResult::SenderError) | Err(_) => Err(Error::unavailable(format!(
                "the {} supervisor is not running",
                S::KIND
            ))),
        }
    }

    /// Calls the actor for `key`, starting it if needed. A call that finds its actor stopped
    /// (idle, or crashed before answering) is retried on a fresh actor, so the message must be
    /// safe to repeat (sends carry a `client_ref`).
    pub async fn call<R, F>(&self, key: &S::Key, build: F) -> Result<R, Error>
    where
        R: Send + 'static,
        F: Fn(RpcReplyPort<R>) -> ChildMsg<S>,
    {
        let deadline = tokio::time::Instant::now() + self.timeout;
        for _attempt in 0..3 {
            let entry = self.entry(key).await?;
            let permit = tokio::time::timeout_at(deadline, entry.permits.clone().acquire_owned())
                .await
                .map_err(|_| {
                    Error::new(
                        ErrorCode::Unavailable,
                        format!("{} {key:?} is overloaded; retry later", S::KIND),
                    )
                })?
                .map_err(|_| Error::unavailable("actor closed"))?;
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let res = entry.actor.call(&build, Some(left)).await;
            drop(permit);
            match res {
                Ok(CallResult::Success(r)) => return Ok(r),
                Ok(CallResult::Timeout) => {
                    return Err(Error::new(
                        ErrorCode::Timeout,
                        format!("{} {key:?} did not answer in time", S::KIND),
                    ));
                }
                Ok(CallResult::SenderError) | Err(_) => {
                    // The actor stopped before answering; forget it and go again.
                    let id = entry.actor.get_id();
                    self.entries.remove_if(key, |_, e| e.actor.get_id() == id);
                }
            }
        }
        Err(Error::unavailable(format!(
            "{} {key:?} keeps stopping",
            S::KIND
        )))
    }

    /// Stops the actors whose key `keep` rejects (keys this node no longer owns), after they
    /// handle their mailboxes. A later call for such a key starts a fresh actor that reloads from
    /// the store, so no stale state survives a move away and back.
    pub fn retain(&self, keep: impl Fn(&S::Key) -> bool) {
        let gone: Vec<(S::Key, Entry<ChildMsg<S>>)> = self
            .entries
            .iter()
            .filter(|e| !keep(e.key()))
            .map(|e| (e.key().clone(), e.value().clone()))
            .collect();
        for (key, entry) in gone {
            let id = entry.actor.get_id();
            self.entries.remove_if(&key, |_, e| e.actor.get_id() == id);
            if entry.actor.drain().is_err() {
                tracing::debug!(kind = S::KIND, ?key, "actor already stopped");
            }
        }
    }

    /// Stops every child after it has handled what is already in its mailbox, then the
    /// supervisor.
    pub async fn shutdown(&self) {
        self.supervisor
            .drain_children_and_wait(Some(Duration::from_secs(10)))
            .await;
        if let Err(e) = self
            .supervisor
            .stop_and_wait(Some("shutdown".into()), Some(Duration::from_secs(5)))
            .await
        {
            tracing::warn!(kind = S::KIND, error = %e, "supervisor did not stop cleanly");
        }
        self.entries.clear();
    }
}

/// Messages of the supervisor.
pub enum SupervisorMsg<S: ChildSpec> {
    /// Start (or find) the child for a key.
    Spawn(S::Key, RpcReplyPort<Result<Entry<ChildMsg<S>>, Error>>),
}

struct Supervisor<S: ChildSpec> {
    spec: Arc<S>,
    entries: Arc<DashMap<S::Key, Entry<ChildMsg<S>>>>,
    mailbox: usize,
    /// `palaver_actors{kind}`: children running (all directories of the process together).
    actors: metrics::Gauge,
}

impl<S: ChildSpec> Supervisor<S> {
    async fn spawn_child(
        &self,
        myself: &ActorRef<SupervisorMsg<S>>,
        children: &mut HashMap<ActorId, S::Key>,
        key: &S::Key,
    ) -> Result<Entry<ChildMsg<S>>, Error> {
        // At most one actor per key: never replace a running one.
        if let Some(e) = self.entries.get(key) {
            return Ok(e.clone());
        }
        let (child, args) = self.spec.make(key);
        match Actor::spawn_linked(None, child, args, myself.get_cell()).await {
            Ok((actor, _)) => {
                let entry = Entry {
                    actor,
                    permits: Arc::new(Semaphore::new(self.mailbox)),
                };
                children.insert(entry.actor.get_id(), key.clone());
                self.entries.insert(key.clone(), entry.clone());
                self.actors.increment(1.0);
                Ok(entry)
            }
            Err(ractor::SpawnErr::StartupFailed(e)) => Err(startup_error(S::KIND, key, &e)),
            Err(e) => Err(Error::internal(format!(
                "cannot start {} {key:?}: {e}",
                S::KIND
            ))),
        }
    }
}

fn startup_error(kind: &str, key: &dyn Debug, e: &ActorProcessingErr) -> Error {
    // A child refuses to start with a schema::Error (e.g. not_found) that the caller should see.
    if let Some(err) = e.downcast_ref::<Error>() {
        return err.clone();
    }
    Error::unavailable(format!("cannot start {kind} {key:?}: {e}"))
}

impl<S: ChildSpec> Actor for Supervisor<S> {
    type Msg = SupervisorMsg<S>;
    type State = HashMap<ActorId, S::Key>;
    type Arguments = ();

    async fn pre_start(
        &self,
        _myself: ActorRef<Self::Msg>,
        _args: (),
    ) -> Result<Self::State, ActorProcessingErr> {
        Ok(HashMap::new())
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        msg: Self::Msg,
        children: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            SupervisorMsg::Spawn(key, reply) => {
                let res = self.spawn_child(&myself, children, &key).await;
                if reply.send(res).is_err() {
                    tracing::debug!(kind = S::KIND, ?key, "spawn caller went away");
                }
            }
        }
        Ok(())
    }

    async fn handle_supervisor_evt(
        &self,
        myself: ActorRef<Self::Msg>,
        evt: SupervisionEvent,
        children: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match evt {
            SupervisionEvent::ActorTerminated(cell, _, reason) => {
                if let Some(key) = children.remove(&cell.get_id()) {
                    self.actors.decrement(1.0);
                    self.entries
                        .remove_if(&key, |_, e| e.actor.get_id() == cell.get_id());
                    tracing::debug!(kind = S::KIND, ?key, ?reason, "actor stopped");
                }
            }
            SupervisionEvent::ActorFailed(cell, err) => {
                if let Some(key) = children.remove(&cell.get_id()) {
                    self.actors.decrement(1.0);
                    let current = self
                        .entries
                        .remove_if(&key, |_, e| e.actor.get_id() == cell.get_id())
                        .is_some();
                    tracing::warn!(kind = S::KIND, ?key, error = %err, "actor failed");
                    // Restart at once (the new actor reloads its state from the store), but
                    // only an actor that was still the key's current one: a caller that saw
                    // this one stop may have started its successor already, and a second
                    // actor for the key would sit idle holding what the first needs (a room's
                    // sequencer lock) while callers wait on the first. If it cannot start
                    // (store down), the next call tries again.
                    if current
                        && !self.entries.contains_key(&key)
                        && let Err(e) = self.spawn_child(&myself, children, &key).await
                    {
                        tracing::warn!(kind = S::KIND, ?key, error = %e, "restart failed");
                    }
                }
            }
            SupervisionEvent::ActorStarted(_) | SupervisionEvent::ProcessGroupChanged(_) => {}
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// An actor whose first incarnation drops its caller's reply and then fails; later ones
    /// answer their incarnation number.
    struct Toy {
        started: Arc<AtomicUsize>,
        alive: Arc<AtomicUsize>,
    }

    enum ToyMsg {
        Ask(RpcReplyPort<usize>),
        Fail,
    }

    struct ToyState {
        n: usize,
        alive: Arc<AtomicUsize>,
    }

    impl Drop for ToyState {
        fn drop(&mut self) {
            self.alive.fetch_sub(1, Ordering::SeqCst);
        }
    }

    impl Actor for Toy {
        type Msg = ToyMsg;
        type State = ToyState;
        type Arguments = ();

        async fn pre_start(
            &self,
            _myself: ActorRef<ToyMsg>,
            _args: (),
        ) -> Result<ToyState, ActorProcessingErr> {
            self.alive.fetch_add(1, Ordering::SeqCst);
            Ok(ToyState {
                n: self.started.fetch_add(1, Ordering::SeqCst),
                alive: self.alive.clone(),
            })
        }

        async fn handle(
            &self,
            myself: ActorRef<ToyMsg>,
            msg: ToyMsg,
            st: &mut ToyState,
        ) -> Result<(), ActorProcessingErr> {
            match msg {
                ToyMsg::Ask(reply) if st.n == 0 => {
                    // Like a room whose sequencer failed: the queued caller's reply is
                    // dropped at once, the actor fails a moment later.
                    drop(reply);
                    myself.send_after(Duration::from_millis(50), || ToyMsg::Fail);
                }
                ToyMsg::Ask(reply) => {
                    let _ = reply.send(st.n);
                }
                ToyMsg::Fail => return Err("boom".into()),
            }
            Ok(())
        }
    }

    struct ToySpec {
        started: Arc<AtomicUsize>,
        alive: Arc<AtomicUsize>,
    }

    impl ChildSpec for ToySpec {
        type Key = u32;
        type Child = Toy;
        const KIND: &'static str = "toy";
        fn make(&self, _key: &u32) -> (Toy, ()) {
            (
                Toy {
                    started: self.started.clone(),
                    alive: self.alive.clone(),
                },
                (),
            )
        }
    }

    /// A caller that finds its actor stopped starts the successor; when the old actor then
    /// fails, the supervisor must not start a third one over it. (Seen in the cluster fault
    /// runs: the orphaned room actor held the room's sequencer lock and every send to the
    /// room went unanswered.)
    #[tokio::test]
    async fn a_failed_actor_already_replaced_is_not_restarted_over_its_successor() {
        let (started, alive) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let dir = Directory::start(
            ToySpec {
                started: started.clone(),
                alive: alive.clone(),
            },
            16,
            Duration::from_secs(5),
        )
        .await
        .unwrap_or_else(|e| panic!("{e}"));
        let first = dir.call(&7, ToyMsg::Ask).await;
        assert_eq!(first, Ok(1), "the retry went to a fresh actor");
        // The first actor fails meanwhile; give the supervisor time to react.
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(alive.load(Ordering::SeqCst), 1, "one actor for the key");
        assert_eq!(started.load(Ordering::SeqCst), 2);
        assert_eq!(dir.len(), 1);
        assert_eq!(
            dir.call(&7, ToyMsg::Ask).await,
            Ok(1),
            "the successor serves"
        );
        dir.shutdown().await;
    }

    /// An actor that fails while it is the key's current one is restarted at once.
    #[tokio::test]
    async fn a_failed_current_actor_is_restarted() {
        let (started, alive) = (Arc::new(AtomicUsize::new(1)), Arc::new(AtomicUsize::new(0)));
        let dir = Directory::start(
            ToySpec {
                started: started.clone(),
                alive: alive.clone(),
            },
            16,
            Duration::from_secs(5),
        )
        .await
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(dir.call(&7, ToyMsg::Ask).await, Ok(1));
        let Some(actor) = dir.get(&7) else {
            panic!("no actor")
        };
        actor
            .send_message(ToyMsg::Fail)
            .unwrap_or_else(|_| panic!("send"));
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while started.load(Ordering::SeqCst) < 3 {
            assert!(tokio::time::Instant::now() < deadline, "not restarted");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(alive.load(Ordering::SeqCst), 1);
        assert_eq!(dir.call(&7, ToyMsg::Ask).await, Ok(2));
        dir.shutdown().await;
    }
}
