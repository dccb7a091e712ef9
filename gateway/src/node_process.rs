//! `palaver node`: one shard of the cluster. Hosts the room and user actors of its share of the
//! ring, serves them to gateways and peers over gRPC on `PALAVER_CLUSTER_ADDR`, publishes
//! deliveries to Kafka, and stores everything in the shared store. `/healthz`, `/readyz` and
//! `/ring` (this node's view of the live ring) are on `PALAVER_HTTP_ADDR`.

use crate::config::{Config, StoreChoice};
use crate::server::{HEALTH_EVERY, open_store};
use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
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
    stop: CancellationToken,
    draining: Arc<AtomicBool>,
    grpc: JoinHandle<Result<(), tonic::transport::Error>>,
    http: JoinHandle<std::io::Result<()>>,
}

async fn readyz(State(draining): State<Arc<AtomicBool>>) -> impl IntoResponse {
    if draining.load(Ordering::SeqCst) {
        (StatusCode::SERVICE_UNAVAILABLE, "draining")
    } else {
        (StatusCode::OK, "ready")
    }
}

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

        let store = open_store(&config).await?;
        let bus: Arc<dyn Bus> = KafkaBus::connect(kafka).await?;
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
        let ring_view = node.clone();
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
            .with_state(draining.clone());
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
            stop,
            draining,
            grpc,
            http,
        })
    }

    /// Where `/healthz` listens.
    pub fn http_addr(&self) -> SocketAddr {
        self.http_addr
    }

    /// Where the cluster service listens.
    pub fn cluster_addr(&self) -> SocketAddr {
        self.cluster_addr
    }

    /// Stops serving, lets the actors finish their mailboxes, flushes the bus, closes the store.
    /// Peers see the node leave the live set and take its keys over.
    pub async fn shutdown(self) -> anyhow::Result<()> {
        self.draining.store(true, Ordering::SeqCst);
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
