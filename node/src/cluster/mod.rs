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

/// How the node set is found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Discovery {
    /// A fixed list of every node that may run.
    Static(Vec<Member>),
    /// A DNS name (a Kubernetes headless Service) resolved at every refresh; each address is
    /// asked for its node id.
    Dns {
        /// The name to resolve.
        host: String,
        /// The nodes' cluster port.
        port: u16,
    },
}

/// Parses `PALAVER_NODES`: `id@host:port,id@host:port,...`, or `host:port` where `host` is a DNS
/// name listing every node (a headless Service).
pub fn parse_nodes(spec: &str) -> Result<Discovery, String> {
    let spec = spec.trim();
    if !spec.contains('@') {
        let (host, port) = spec
            .rsplit_once(':')
            .ok_or_else(|| format!("{spec:?} is neither id@host:port,... nor dns-name:port"))?;
        let port = port.parse().map_err(|e| format!("{spec:?}: port: {e}"))?;
        if host.is_empty() || spec.contains(',') {
            return Err(format!(
                "{spec:?} is neither id@host:port,... nor dns-name:port"
            ));
        }
        return Ok(Discovery::Dns {
            host: host.to_owned(),
            port,
        });
    }
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
    Ok(Discovery::Static(out))
}

/// The id-generator slot of node `me`: its position in a static list, else the number ending
/// its id (`palaver-node-3` -> 3, as a StatefulSet names its pods), else a hash of the id.
pub fn slot_of(discovery: &Discovery, me: &NodeId) -> Result<u16, String> {
    let slot = match discovery {
        Discovery::Static(members) => {
            let mut ids: Vec<&NodeId> = members.iter().map(|m| &m.id).collect();
            ids.sort();
            let i = ids
                .iter()
                .position(|id| *id == me)
                .ok_or_else(|| format!("node {me} is not in PALAVER_NODES"))?;
            u16::try_from(i).map_err(|_| "too many nodes".to_owned())?
        }
        Discovery::Dns { .. } => match me
            .as_str()
            .rsplit_once('-')
            .and_then(|(_, n)| n.parse::<u16>().ok())
        {
            Some(n) => n,
            None => {
                let mut h = siphasher::sip::SipHasher::new();
                me.as_str().as_bytes().hash(&mut h);
                u16::try_from(h.finish() % u64::from(crate::ids::SLOTS)).unwrap_or(0)
            }
        },
    };
    if slot >= crate::ids::SLOTS {
        return Err(format!(
            "a cluster has at most {} nodes (slot {slot})",
            crate::ids::SLOTS
        ));
    }
    Ok(slot)
}

/// The version of the ring built from a live set: a stable hash of the sorted ids and their
/// incarnations, so every process that sees the same live set names the same version, and a node
/// that restarted makes a new version even when placement does not change.
pub fn ring_version(nodes: &[(NodeId, u64)]) -> u64 {
    let mut sorted: Vec<&(NodeId, u64)> = nodes.iter().collect();
    sorted.sort();
    let mut h = siphasher::sip::SipHasher::new();
    for (n, incarnation) in sorted {
        n.as_str().as_bytes().hash(&mut h);
        h.write(&incarnation.to_le_bytes());
    }
    // Keep 0 for "unrouted".
    h.finish().max(1)
}

/// Builds the ring for a set of nodes (incarnations unknown).
pub fn ring_of(nodes: Vec<NodeId>) -> Ring {
    let v = ring_version(&nodes.iter().map(|n| (n.clone(), 0)).collect::<Vec<_>>());
    Ring::new(v, nodes)
}

/// Client side of the cluster: membership, ring, routed calls.
pub struct Cluster {
    discovery: Discovery,
    clients: DashMap<String, ClusterClient<Channel>>,
    addrs: RwLock<std::collections::HashMap<NodeId, String>>,
    incarnations: RwLock<std::collections::HashMap<NodeId, u64>>,
    ring: watch::Sender<Arc<Ring>>,
    call_timeout: Duration,
    refreshing: tokio::sync::Mutex<()>,
    /// How many nodes answered the last health round (draining ones do not count).
    live: std::sync::atomic::AtomicUsize,
    /// When a caller last asked for an out-of-round refresh.
    last_forced: parking_lot::Mutex<Option<tokio::time::Instant>>,
}

/// Per-attempt bound, so one hung node cannot eat a whole call deadline.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(3);
/// Health-check ping deadline.
const PING_TIMEOUT: Duration = Duration::from_millis(400);

impl Cluster {
    /// A cluster client. With a static list the initial ring holds every member; the first
    /// [`Cluster::refresh`] narrows it to the live ones.
    pub fn new(discovery: Discovery, call_timeout: Duration) -> Result<Arc<Self>, Error> {
        let mut addrs = std::collections::HashMap::new();
        if let Discovery::Static(members) = &discovery {
            for m in members {
                addrs.insert(m.id.clone(), m.addr.clone());
            }
        }
        let ring = ring_of(addrs.keys().cloned().collect());
        let cluster = Arc::new(Self {
            discovery,
            clients: DashMap::new(),
            addrs: RwLock::new(addrs),
            incarnations: RwLock::new(std::collections::HashMap::new()),
            ring: watch::channel(Arc::new(ring)).0,
            call_timeout,
            refreshing: tokio::sync::Mutex::new(()),
            live: std::sync::atomic::AtomicUsize::new(0),
            last_forced: parking_lot::Mutex::new(None),
        });
        let known: Vec<String> = cluster.addrs.read().values().cloned().collect();
        for addr in known {
            cluster.client(&addr)?;
        }
        Ok(cluster)
    }

    fn client(&self, addr: &str) -> Result<ClusterClient<Channel>, Error> {
        if let Some(c) = self.clients.get(addr) {
            return Ok(c.clone());
        }
        let endpoint = Endpoint::from_shared(format!("http://{addr}"))
            .map_err(|e| Error::invalid(format!("node address {addr}: {e}")))?
            .connect_timeout(Duration::from_millis(500))
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(10))
            .keep_alive_timeout(Duration::from_secs(5));
        let c = ClusterClient::new(endpoint.connect_lazy());
        self.clients.insert(addr.to_owned(), c.clone());
        Ok(c)
    }

    /// The current ring.
    pub fn ring(&self) -> Arc<Ring> {
        self.ring.borrow().clone()
    }

    /// A receiver that sees every ring change.
    pub fn watch(&self) -> watch::Receiver<Arc<Ring>> {
        self.ring.subscribe()
    }

    /// How the node set is found.
    pub fn discovery(&self) -> &Discovery {
        &self.discovery
    }

    /// The incarnation of every live node, as last seen.
    pub fn incarnations(&self) -> std::collections::HashMap<NodeId, u64> {
        self.incarnations.read().clone()
    }

    /// The ring version each live node (other than a draining one) runs now, by asking it;
    /// `None` for one that does not answer.
    pub async fn peer_ring_versions(&self) -> Vec<Option<u64>> {
        let ring = self.ring();
        let addrs: Vec<String> = {
            let known = self.addrs.read();
            ring.nodes()
                .iter()
                .filter_map(|n| known.get(n).cloned())
                .collect()
        };
        let asks = addrs.iter().map(|addr| async move {
            match self.pong(addr).await {
                Some(NodeResponse::Pong { ring_version, .. }) => Some(ring_version),
                _ => None,
            }
        });
        futures::future::join_all(asks).await
    }

    /// The node at `addr`'s answer to a health ping, if it answers in time.
    async fn pong(&self, addr: &str) -> Option<NodeResponse> {
        let mut c = self.client(addr).ok()?;
        let mut req = tonic::Request::new(CallRequest {
            ring_version: 0,
            traceparent: None,
            body: NodeRequest::Ping,
        });
        req.set_timeout(PING_TIMEOUT);
        match tokio::time::timeout(PING_TIMEOUT, c.call(req)).await {
            Ok(Ok(r)) => r.into_inner().result.ok(),
            _ => None,
        }
    }

    /// True (and remembered) when no out-of-round refresh was asked for within `every`.
    pub fn refresh_due(&self, every: Duration) -> bool {
        let now = tokio::time::Instant::now();
        let mut last = self.last_forced.lock();
        match *last {
            Some(t) if now.duration_since(t) < every => false,
            _ => {
                *last = Some(now);
                true
            }
        }
    }

    /// How many nodes answered the last health round as serving (not draining).
    pub fn live_nodes(&self) -> usize {
        self.live.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Asks the node at `addr` who it is (id and incarnation); `None` if it does not answer or
    /// is draining (handing its keys over before it exits).
    async fn ping(&self, addr: &str) -> Option<(NodeId, u64)> {
        match self.pong(addr).await? {
            NodeResponse::Pong {
                node,
                incarnation,
                draining: false,
                ..
            } => Some((node, incarnation)),
            _ => None,
        }
    }

    /// The addresses to probe: the static list, or what the DNS name resolves to now.
    async fn targets(&self) -> Vec<(Option<NodeId>, String)> {
        match &self.discovery {
            Discovery::Static(members) => members
                .iter()
                .map(|m| (Some(m.id.clone()), m.addr.clone()))
                .collect(),
            Discovery::Dns { host, port } => {
                match tokio::net::lookup_host((host.as_str(), *port)).await {
                    Ok(addrs) => addrs.map(|a| (None, a.to_string())).collect(),
                    Err(e) => {
                        tracing::warn!(%host, error = %e, "cannot resolve the node set");
                        Vec::new()
                    }
                }
            }
        }
    }

    /// Finds the live nodes (pinging each) and rebuilds the ring if the live set changed.
    /// Concurrent callers share one refresh.
    pub async fn refresh(&self) {
        let Ok(_guard) = self.refreshing.try_lock() else {
            // Someone is refreshing now; wait for them.
            let _wait = self.refreshing.lock().await;
            return;
        };
        let targets = self.targets().await;
        let pings = targets.iter().map(|(want, addr)| async move {
            let got = self.ping(addr).await;
            match (want, got) {
                (Some(w), Some((g, _))) if w != &g => {
                    tracing::error!(%addr, expected = %w, answered = %g, "wrong node at a listed address");
                    None
                }
                (_, got) => got.map(|(id, inc)| (id, inc, addr.clone())),
            }
        });
        let live: Vec<(NodeId, u64, String)> = futures::future::join_all(pings)
            .await
            .into_iter()
            .flatten()
            .collect();
        self.live
            .store(live.len(), std::sync::atomic::Ordering::Relaxed);
        if live.is_empty() {
            tracing::warn!("no node answers; keeping the last ring");
            return;
        }
        {
            let mut addrs = self.addrs.write();
            for (id, _, addr) in &live {
                addrs.insert(id.clone(), addr.clone());
            }
        }
        let with_inc: Vec<(NodeId, u64)> =
            live.iter().map(|(id, inc, _)| (id.clone(), *inc)).collect();
        *self.incarnations.write() = with_inc.iter().cloned().collect();
        let ids: Vec<NodeId> = live.into_iter().map(|(id, _, _)| id).collect();
        let version = ring_version(&with_inc);
        if self.ring().version() != version {
            tracing::info!(nodes = ?ids, version, "ring changed");
            self.ring.send_replace(Arc::new(Ring::new(version, ids)));
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
        let addr = self
            .addrs
            .read()
            .get(node)
            .cloned()
            .ok_or_else(|| tonic::Status::unavailable(format!("unknown node {node}")))?;
        let mut c = self
            .client(&addr)
            .map_err(|e| tonic::Status::unavailable(e.message))?;
        // W3C trace context as gRPC metadata (what interceptors and meshes read), and in the
        // body for peers that predate the header.
        let traceparent = req
            .traceparent
            .as_deref()
            .and_then(|t| tonic::metadata::MetadataValue::try_from(t).ok());
        let mut r = tonic::Request::new(req);
        if let Some(t) = traceparent {
            r.metadata_mut().insert("traceparent", t);
        }
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
        // One trace context for the call and all its retries: the caller's span, when tracing
        // is on (nothing is formatted when it is off).
        let traceparent = crate::trace::current();
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
                traceparent: traceparent.clone(),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_lists_and_dns_names() {
        let d = parse_nodes("n0@h:1, n1@h:2").unwrap_or_else(|e| panic!("{e}"));
        assert!(matches!(&d, Discovery::Static(m) if m.len() == 2));
        assert_eq!(slot_of(&d, &NodeId::new("n1")), Ok(1));
        assert!(slot_of(&d, &NodeId::new("n9")).is_err());
        let d = parse_nodes("palaver-node.ns.svc:7000").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            d,
            Discovery::Dns {
                host: "palaver-node.ns.svc".into(),
                port: 7000
            }
        );
        assert_eq!(slot_of(&d, &NodeId::new("palaver-node-3")), Ok(3));
        assert!(slot_of(&d, &NodeId::new("palaver-node-99")).is_err());
        assert!(parse_nodes("a@h:1,a@h:2").is_err());
        assert!(parse_nodes("nonsense").is_err());
        assert!(parse_nodes("").is_err());
    }

    #[tokio::test]
    async fn dns_discovery_learns_ids_from_the_nodes() {
        // `localhost` resolves, but nothing listens on port 1: no live node, the ring stays empty.
        let c = Cluster::new(
            Discovery::Dns {
                host: "localhost".into(),
                port: 1,
            },
            Duration::from_secs(1),
        )
        .unwrap_or_else(|e| panic!("{e}"));
        c.refresh().await;
        assert!(c.ring().nodes().is_empty());
    }
}
