//! `palaver node`: one shard of the cluster. Hosts the room actors and the users (sessions,
//! presence) of its share of the ring, serves them to gateways and peers over gRPC on `PALAVER_CLUSTER_ADDR`, publishes
//! deliveries to Kafka, and stores everything in the shared store. `/healthz`, `/readyz`,
//! `/ring` (this node's view of the live ring) and `/metrics` (Prometheus text) are on
//! `PALAVER_HTTP_ADDR`.

use crate::config::{Config, StoreChoice};
use crate::server::{HEALTH_EVERY, open_store};
use axum::Router;
use axum::extract::State;
use axum::response::IntoResponse;
use axum::routing::get;
use node::Node;
use node::bus::Bus;
use node::bus::kafka::KafkaBus;
use node::cluster::server::NodeService;
use node::cluster::{Cluster, ClusterServer};
use node::store::Store;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// A running node process.
pub struct NodeProcess {
    http_addr: SocketAddr,
    cluster_addr: SocketAddr,
    node: Arc<Node>,
    store: Arc<dyn Store>,
    bus: Arc<dyn Bus>,
    cluster: Arc<Cluster>,
    stop: CancellationToken,
    draining: Arc<AtomicBool>,
    grpc: JoinHandle<Result<(), tonic::transport::Error>>,
    http: JoinHandle<std::io::Result<()>>,
}

#[derive(Clone)]
struct Health {
    draining: Arc<AtomicBool>,
    ready: Arc<crate::ready::Readiness>,
}

async fn readyz(State(h): State<Health>) -> impl IntoResponse {
    h.ready.response(h.draining.load(Ordering::SeqCst))
}

/// The longest a draining node waits for its peers to adopt the ring without it.
const HANDOVER_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

impl NodeProcess {
    /// Starts the node: store, bus, actors, membership, gRPC and health endpoints.
    pub async fn start(mut config: Config) -> anyhow::Result<Self> {
        let members = config
            .nodes
            .clone()
            .ok_or_else(|| anyhow::anyhow!("PALAVER_NODES is required for `palaver node`"))?;
        let me = config.node.node_id.clone();
        config.node.id_slot = node::cluster::slot_of(&members, &me).map_err(anyhow::Error::msg)?;
        let several = !matches!(&members, node::cluster::Discovery::Static(m) if m.len() == 1);
        if config.store == StoreChoice::Embedded && several {
            anyhow::bail!("a cluster needs a shared store: set PALAVER_POSTGRES_URL");
        }
        let kafka = config.kafka.clone().ok_or_else(|| {
            anyhow::anyhow!("PALAVER_KAFKA_BROKERS is required for `palaver node`")
        })?;
        let cluster_addr = config.cluster_addr.ok_or_else(|| {
            anyhow::anyhow!("PALAVER_CLUSTER_ADDR is required for `palaver node`")
        })?;

        crate::telemetry::metrics::install();
        let store = open_store(&config).await?;
        let bus = crate::server::metered_bus(KafkaBus::connect(kafka).await?);
        let node = Node::start(config.node.clone(), store.clone(), bus.clone()).await?;
        let cluster = Cluster::new(members, config.node.call_timeout)?;
        node.set_peers(cluster.clone());

        let stop = CancellationToken::new();
        let listener = tokio::net::TcpListener::bind(cluster_addr).await?;
        let cluster_addr = listener.local_addr()?;
        let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
        let grpc_stop = stop.clone();
        let service = ClusterServer::new(NodeService::new(node.clone()));
        let grpc = tokio::spawn(
            tonic::transport::Server::builder()
                .tcp_nodelay(true)
                .add_service(service)
                .serve_with_incoming_shutdown(incoming, grpc_stop.cancelled_owned()),
        );

        // Our own ring from the live set, kept current.
        cluster.refresh().await;
        node.set_ring(cluster.ring());
        cluster.spawn_health(HEALTH_EVERY, stop.clone());
        let mut watch = cluster.watch();
        let ring_node = node.clone();
        let ring_stop = stop.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    () = ring_stop.cancelled() => return,
                    changed = watch.changed() => if changed.is_err() { return },
                }
                let ring = watch.borrow_and_update().clone();
                tracing::info!(version = ring.version(), nodes = ?ring.nodes(), "node: new ring");
                ring_node.set_ring(ring);
            }
        });

        let draining = Arc::new(AtomicBool::new(false));
        let ready = crate::ready::Readiness::start(
            vec![
                crate::ready::store_check(store.clone()),
                crate::ready::bus_check(bus.clone()),
            ],
            stop.clone(),
        )
        .await;
        let health = Health {
            draining: draining.clone(),
            ready,
        };
        let ring_view = node.clone();
        let debug_view = node.clone();
        let router = Router::new()
            .route("/healthz", get(|| async { "ok" }))
            .route(
                "/ring",
                get(move || {
                    let node = ring_view.clone();
                    async move {
                        let ring = node.ring();
                        axum::Json(serde_json::json!({
                            "node": node.ctx().config.node_id,
                            "version": ring.version(),
                            "nodes": ring.nodes(),
                        }))
                    }
                }),
            )
            .route("/readyz", get(readyz))
            .route(
                "/debug/state",
                get(move || {
                    let node = debug_view.clone();
                    async move { axum::Json(node.debug_state()) }
                }),
            )
            .route(
                "/metrics",
                get(|| async { crate::telemetry::metrics::response("") }),
            )
            .with_state(health);
        let http_listener = tokio::net::TcpListener::bind(config.http_addr).await?;
        let http_addr = http_listener.local_addr()?;
        let http_stop = stop.clone();
        let http = tokio::spawn(async move {
            axum::serve(http_listener, router)
                .with_graceful_shutdown(http_stop.cancelled_owned())
                .await
        });
        Ok(Self {
            http_addr,
            cluster_addr,
            node,
            store,
            bus,
            cluster,
            stop,
            draining,
            grpc,
            http,
        })
    }

    async fn handover(&self) {
        let me = self.node.ctx().config.node_id.clone();
        self.node.begin_drain();
        self.cluster.refresh().await;
        let ring = self.cluster.ring();
        if !ring.nodes().iter().any(|n| n != &me) {
            tracing::info!("no other node to hand over to");
            return;
        }
        // Our own ring (the watcher applies it; do it now so no new actor starts here).
        self.node.set_ring(ring.clone());
        let started = tokio::time::Instant::now();
        let deadline = started + HANDOVER_WAIT;
        loop {
            let peers = self.cluster.peer_ring_versions().await;
            if peers.iter().all(|v| *v == Some(ring.version())) {
                break;
            }
            if tokio::time::Instant::now() >= deadline {
                tracing::warn!(
                    ?peers,
                    "peers did not adopt the ring in time; stopping anyway"
                );
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        // Gateways learn the ring on the same health interval: give them a round.
        tokio::time::sleep(HEALTH_EVERY + HEALTH_EVERY / 2).await;
        tracing::info!(
            after_ms = started.elapsed().as_millis() as u64,
            version = ring.version(),
            "keys handed over"
        );
    }

    /// Where `/healthz` listens.
    pub fn http_addr(&self) -> SocketAddr {
        self.http_addr
    }

    /// Where the cluster service listens.
    pub fn cluster_addr(&self) -> SocketAddr {
        self.cluster_addr
    }

    /// Hands the node's keys over, then stops: health pings answer `draining`, so this node
    /// and its peers build the ring without it (its actors stop as their keys move, finishing
    /// the writes in hand, and callers are sent to the new owners with `not_owner`); once the
    /// peers run that ring (or after [`HANDOVER_WAIT`]) and gateways had a health round to
    /// follow, it stops serving, lets the actors finish, flushes the bus and closes the store.
    pub async fn shutdown(self) -> anyhow::Result<()> {
        self.draining.store(true, Ordering::SeqCst);
        self.handover().await;
        self.stop.cancel();
        match self.grpc.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "cluster service ended with an error"),
            Err(e) => tracing::warn!(error = %e, "cluster service task failed"),
        }
        self.node.shutdown().await;
        if let Err(e) = self.http.await {
            tracing::warn!(error = %e, "health endpoint task failed");
        }
        self.bus.close().await;
        self.store.close().await?;
        Ok(())
    }
}
