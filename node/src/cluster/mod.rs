//! How gateways and nodes reach actors on other nodes: a gRPC service (`tonic`), one unary method
//! `Call` carrying a [`wire::NodeRequest`] and answering a [`wire::CallResponse`].
//!
//! - [`Cluster`] (client side, used by gateways and by nodes to reach peers): knows the node set
//!   (a static `id@host:port` list), health-checks every node, builds the same
//!   [`crate::ring::Ring`] from the live set as every other process, and routes each call to the
//!   owner of its key with a deadline; on a transport failure or a `not_owner` answer it refreshes
//!   the live set and retries until the deadline. Retried sends stay idempotent through their
//!   `client_ref`.
//! - [`server`]: the node side; dispatches requests to the local [`crate::Node`], which checks
//!   ownership on its own ring and answers `not_owner` (naming the owner it knows) for keys it does
//!   not own.
//!
//! Why not `ractor_cluster`: by its own README it is not production ready, it has no reconnect,
//! and it numbers message variants on the wire, which breaks rolling upgrades. gRPC gives
//! deadlines, HTTP/2 flow control (back-pressure) and reconnecting channels; the JSON payload
//! ([`codec`]) names every field and variant.

pub mod codec;
pub mod remote;
pub mod server;
pub mod wire;

#[allow(missing_docs, clippy::all)]
mod generated {
    include!(concat!(env!("OUT_DIR"), "/palaver.cluster.v1.Cluster.rs"));
}

pub use generated::cluster_client::ClusterClient;
pub use generated::cluster_server::{Cluster as ClusterService, ClusterServer};

use crate::ring::{Ring, RingKey};
use dashmap::DashMap;
use parking_lot::RwLock;
use schema::{Error, ErrorCode, NodeId};
use std::hash::{Hash, Hasher};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tonic::transport::{Channel, Endpoint};
use wire::{CallRequest, NodeRequest, NodeResponse};

/// A node of the static list.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Member {
    /// Its id (`PALAVER_NODE_ID` of that node).
    pub id: NodeId,
    /// Where its cluster service listens, `host:port`.
    pub addr: String,
}

/// Parses `PALAVER_NODES`: `id@host:port,id@host:port,...`.
pub fn parse_nodes(spec: &str) -> Result<Vec<Member>, String> {
    let mut out: Vec<Member> = Vec::new();
    for part in spec.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (id, addr) = part
            .split_once('@')
            .ok_or_else(|| format!("{part:?} is not id@host:port"))?;
        if id.is_empty() || !addr.contains(':') {
            return Err(format!("{part:?} is not id@host:port"));
        }
        if out.iter().any(|m| m.id.as_str() == id) {
            return Err(format!("node id {id:?} appears twice"));
        }
        out.push(Member {
            id: NodeId::new(id),
            addr: addr.to_owned(),
        });
    }
    if out.is_empty() {
        return Err("no nodes listed".into());
    }
    Ok(out)
}

/// The version of the ring built from a live set: a stable hash of the sorted ids, so every
/// process that sees the same live set names the same version.
pub fn ring_version(nodes: &[NodeId]) -> u64 {
    let mut sorted: Vec<&NodeId> = nodes.iter().collect();
    sorted.sort();
    let mut h = siphasher::sip::SipHasher::new();
    for n in sorted {
        n.as_str().as_bytes().hash(&mut h);
    }
    // Keep 0 for "unrouted".
    h.finish().max(1)
}

/// Builds the ring for a live set.
pub fn ring_of(nodes: Vec<NodeId>) -> Ring {
    let v = ring_version(&nodes);
    Ring::new(v, nodes)
}

/// Client side of the cluster: membership, ring, routed calls.
pub struct Cluster {
    members: Vec<Member>,
    clients: DashMap<NodeId, ClusterClient<Channel>>,
    ring: watch::Sender<Arc<Ring>>,
    call_timeout: Duration,
    refreshing: tokio::sync::Mutex<()>,
    suspects: RwLock<Vec<NodeId>>,
}

/// Per-attempt bound, so one hung node cannot eat a whole call deadline.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(3);
/// Health-check ping deadline.
const PING_TIMEOUT: Duration = Duration::from_millis(400);

impl Cluster {
    /// A cluster client over `members`. The initial ring holds every member; the first
    /// [`Cluster::refresh`] narrows it to the live ones.
    pub fn new(members: Vec<Member>, call_timeout: Duration) -> Result<Arc<Self>, Error> {
        let clients = DashMap::new();
        for m in &members {
            let endpoint = Endpoint::from_shared(format!("http://{}", m.addr))
                .map_err(|e| Error::invalid(format!("node {} address {}: {e}", m.id, m.addr)))?
                .connect_timeout(Duration::from_millis(500))
                .tcp_nodelay(true)
                .http2_keep_alive_interval(Duration::from_secs(10))
                .keep_alive_timeout(Duration::from_secs(5));
            clients.insert(m.id.clone(), ClusterClient::new(endpoint.connect_lazy()));
        }
        let ring = ring_of(members.iter().map(|m| m.id.clone()).collect());
        Ok(Arc::new(Self {
            members,
            clients,
            ring: watch::channel(Arc::new(ring)).0,
            call_timeout,
            refreshing: tokio::sync::Mutex::new(()),
            suspects: RwLock::new(Vec::new()),
        }))
    }

    /// The current ring.
    pub fn ring(&self) -> Arc<Ring> {
        self.ring.borrow().clone()
    }

    /// A receiver that sees every ring change.
    pub fn watch(&self) -> watch::Receiver<Arc<Ring>> {
        self.ring.subscribe()
    }

    /// The configured members.
    pub fn members(&self) -> &[Member] {
        &self.members
    }

    async fn ping(&self, id: &NodeId) -> bool {
        let Some(mut c) = self.clients.get(id).map(|c| c.clone()) else {
            return false;
        };
        let mut req = tonic::Request::new(CallRequest {
            ring_version: 0,
            body: NodeRequest::Ping,
        });
        req.set_timeout(PING_TIMEOUT);
        matches!(
            tokio::time::timeout(PING_TIMEOUT, c.call(req)).await,
            Ok(Ok(r)) if r.get_ref().result.is_ok()
        )
    }

    /// Pings every member and rebuilds the ring from the live set if it changed. Concurrent
    /// callers share one refresh.
    pub async fn refresh(&self) {
        let Ok(_guard) = self.refreshing.try_lock() else {
            // Someone is refreshing now; wait for them.
            let _wait = self.refreshing.lock().await;
            return;
        };
        let pings = self
            .members
            .iter()
            .map(|m| async move { (m.id.clone(), self.ping(&m.id).await) });
        let results = futures::future::join_all(pings).await;
        let live: Vec<NodeId> = results
            .iter()
            .filter(|(_, up)| *up)
            .map(|(id, _)| id.clone())
            .collect();
        *self.suspects.write() = results
            .into_iter()
            .filter(|(_, up)| !up)
            .map(|(id, _)| id)
            .collect();
        if live.is_empty() {
            tracing::warn!("no node answers; keeping the last ring");
            return;
        }
        let version = ring_version(&live);
        if self.ring().version() != version {
            tracing::info!(nodes = ?live, version, "ring changed");
            self.ring.send_replace(Arc::new(Ring::new(version, live)));
        }
    }

    /// Refreshes the live set every `every` until `stop`.
    pub fn spawn_health(self: &Arc<Self>, every: Duration, stop: CancellationToken) {
        let this = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    () = stop.cancelled() => break,
                    _ = tick.tick() => this.refresh().await,
                }
            }
        });
    }

    async fn attempt(
        &self,
        node: &NodeId,
        req: CallRequest,
        timeout: Duration,
    ) -> Result<Result<NodeResponse, Error>, tonic::Status> {
        let mut c = self
            .clients
            .get(node)
            .map(|c| c.clone())
            .ok_or_else(|| tonic::Status::unavailable(format!("unknown node {node}")))?;
        let mut r = tonic::Request::new(req);
        r.set_timeout(timeout);
        match tokio::time::timeout(timeout, c.call(r)).await {
            Ok(res) => res.map(|r| r.into_inner().result),
            Err(_) => Err(tonic::Status::deadline_exceeded("attempt timed out")),
        }
    }

    /// Calls the owner of `key`. On a transport failure or `not_owner`, refreshes the live set
    /// and retries until the call deadline. `idempotent` calls are also retried after a timeout
    /// (the first attempt may or may not have run); others only when they surely did not run.
    pub async fn call(
        &self,
        key: &RingKey,
        body: NodeRequest,
        idempotent: bool,
    ) -> Result<NodeResponse, Error> {
        let deadline = tokio::time::Instant::now() + self.call_timeout;
        let mut backoff = Duration::from_millis(20);
        let mut last = Error::unavailable("no node could be reached");
        loop {
            let now = tokio::time::Instant::now();
            if now >= deadline {
                return Err(last);
            }
            let ring = self.ring();
            let Some(owner) = ring.owner(key).cloned() else {
                self.refresh().await;
                tokio::time::sleep(backoff).await;
                continue;
            };
            let req = CallRequest {
                ring_version: ring.version(),
                body: body.clone(),
            };
            let left = deadline - now;
            match self.attempt(&owner, req, left.min(ATTEMPT_TIMEOUT)).await {
                Ok(Ok(r)) => return Ok(r),
                Ok(Err(e)) if e.code == ErrorCode::NotOwner => {
                    tracing::debug!(%owner, error = %e, "not owner; refreshing the ring");
                    last = e;
                }
                Ok(Err(e)) => return Err(e),
                Err(status) => {
                    let ran_maybe = status.code() == tonic::Code::DeadlineExceeded;
                    last = Error::unavailable(format!("node {owner}: {}", status.message()));
                    if ran_maybe && !idempotent {
                        return Err(Error::new(ErrorCode::Timeout, last.message));
                    }
                    tracing::debug!(%owner, status = %status, "node call failed; refreshing");
                }
            }
            self.refresh().await;
            tokio::time::sleep(
                backoff.min(deadline.saturating_duration_since(tokio::time::Instant::now())),
            )
            .await;
            backoff = (backoff * 2).min(Duration::from_millis(500));
        }
    }
}
