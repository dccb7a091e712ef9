//! The HTTP server: axum router on `PALAVER_HTTP_ADDR`, start-up wiring and graceful drain.
//!
//! [`Palaver::start`] wires one process together (`palaver serve`): embedded store, in-process
//! bus, a node alone on its ring, this gateway's hub and the router. [`Palaver::shutdown`] drains:
//! stop accepting, close every socket with 1001 "going away", wait for sessions (up to the grace
//! period), stop the actors after they finish their mailboxes, close the bus, flush and close the
//! store.

use crate::auth::{Auth, AuthError};
use crate::config::{Config, StoreChoice};
use crate::hub::Hub;
use crate::rest;
use crate::session;
use crate::ws;
use axum::Router;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use node::Node;
use node::api::NodeApi;
use node::bus::Bus;
use node::bus::kafka::KafkaBus;
use node::bus::local::LocalBus;
use node::bus::metered::MeteredBus;
use node::cluster::Cluster;
use node::cluster::remote::RemoteNodes;
use node::ring::RingKey;
use node::store::Store;
use node::store::embedded::EmbeddedStore;
use node::store::metered::MeteredStore;
use node::store::postgres::PostgresStore;
use node::store::scylla::ScyllaStore;
use node::user::SessionInfo;
use schema::RoomId;
use schema::{Error, ErrorCode, Profile};
use serde::Deserialize;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Deliveries queued per gateway on the in-process bus.
const BUS_QUEUE: usize = 65_536;

/// How often cluster members are health-checked.
pub const HEALTH_EVERY: std::time::Duration = std::time::Duration::from_millis(500);

/// After each ring change, registers again the local sessions whose user moved to another owner
/// (or whose owner restarted, losing its session table), and subscribes again the followed rooms
/// that moved likewise. Keys that stayed put cost nothing.
async fn follow_ring(app: Arc<App>, cluster: Arc<Cluster>, stop: CancellationToken) {
    let mut watch = cluster.watch();
    let mut prev = watch.borrow_and_update().clone();
    let mut prev_inc = cluster.incarnations();
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            changed = watch.changed() => if changed.is_err() { return },
        }
        let ring = watch.borrow_and_update().clone();
        let inc = cluster.incarnations();
        let moved = |key: &RingKey| {
            let owner = ring.owner(key);
            owner != prev.owner(key) || owner.is_some_and(|n| inc.get(n) != prev_inc.get(n))
        };
        let sessions: Vec<_> = app
            .hub
            .snapshot()
            .into_iter()
            .filter(|(_, p, _)| moved(&RingKey::User(p.id.clone())))
            .collect();
        let rooms: Vec<RoomId> = app
            .hub
            .rooms()
            .into_iter()
            .filter(|r| moved(&RingKey::Room(*r)))
            .collect();
        tracing::info!(
            version = ring.version(),
            sessions = sessions.len(),
            rooms = rooms.len(),
            "ring changed; re-registering what moved"
        );
        for (id, profile, dialect) in sessions {
            let info = SessionInfo {
                gateway: app.hub.gateway().clone(),
                session: id,
                takes_pending: dialect == "native",
                dialect: dialect.into(),
                device: None,
            };
            match app.node.connect(profile, info).await {
                Ok(c) => {
                    app.hub.follow_rooms(id, &c.rooms).await;
                    crate::session::deliver_pending(&app, id, c.pending);
                }
                Err(e) => tracing::warn!(session = id.0, error = %e, "re-register failed"),
            }
        }
        app.hub.resubscribe(rooms).await;
        prev = ring;
        prev_inc = inc;
    }
}

/// What request handlers share.
pub struct App {
    /// Configuration.
    pub config: Config,
    /// Token verification.
    pub auth: Auth,
    /// The nodes: the local node in `serve`, the cluster client in `gateway`.
    pub node: Arc<dyn NodeApi>,
    /// Local sessions.
    pub hub: Arc<Hub>,
    /// Session tasks, waited for on shutdown.
    pub sessions: TaskTracker,
    /// True once draining started.
    pub draining: AtomicBool,
    /// What the Socket.IO dialects share.
    pub socketio: crate::dialect::socketio::Shared,
    /// Profiles and usernames the dialects that name people look up.
    pub people: crate::people::People,
    /// The push worker's counters (zero where no worker runs), shown by `GET /metrics`.
    pub push_metrics: Arc<crate::push::PushMetrics>,
    /// Whether the store, the bus and (for a gateway) the nodes answer, for `/readyz`.
    pub ready: Arc<crate::ready::Readiness>,
    /// What the web console shows (busiest rooms, recent errors, ring shares).
    pub console: Arc<crate::console::Console>,
    /// Open connections per client address, across this gateway's listeners.
    pub conn_limits: Arc<crate::listen::ConnLimits>,
    /// Session teardowns (hub, node, store) running at once; see [`App::teardown`].
    pub teardowns: tokio::sync::Semaphore,
    /// Session openings (hub, node, store) running at once; see [`App::opening`].
    pub openings: tokio::sync::Semaphore,
}

/// Session teardowns that may run at once by default per CPU core
/// (`PALAVER_SESSION_TEARDOWNS`): 16 on two cores.
pub const TEARDOWNS_PER_CORE: usize = 8;
/// Session openings that may run at once by default per CPU core (`PALAVER_SESSION_OPENINGS`):
/// 8 on two cores.
///
/// A slot is the cost of a connect storm to everyone else: `palaver-load abuse`'s storm of
/// 10,000 sessions, three runs each on two cores, put the probe's p99 at 4.7 to 6.2 ms with 64
/// openings and 128 teardowns (the defaults until 2026-12-07), 3.8 to 4.5 ms with 16 and 16, and
/// 3.1 to 3.2 ms with 8 and 16, for sessions opened at 4,600 to 5,100 a second instead of 6,400
/// and the bench's reconnect storm at 935 to 1,454 a second instead of 1,232 to 1,354 (a slot
/// also waits for the store's commit of what the connect writes). More teardown slots than 16
/// cleared the reset no sooner (0.5 to 0.6 s for 10,000 either way).
pub const OPENINGS_PER_CORE: usize = 4;

/// CPU cores this process may run on (1 when unknown).
fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get)
}

/// Default session-opening slots: [`OPENINGS_PER_CORE`] per core.
pub fn default_openings() -> usize {
    OPENINGS_PER_CORE * cores()
}

/// Default session-teardown slots: [`TEARDOWNS_PER_CORE`] per core.
pub fn default_teardowns() -> usize {
    TEARDOWNS_PER_CORE * cores()
}

impl App {
    /// Waits for a teardown slot. Ten thousand connections reset at once end ten thousand
    /// sessions in the same instant; each then unregisters from the hub, tells its user's
    /// actor and, for a user's last session, writes the last-seen time. Run all at once, those
    /// steps fill the runtime's queues and every other session's next step waits behind them
    /// (the storm of `palaver-load abuse` held ordinary chat for half a second). Waiting for a
    /// slot parks a session instead, so at most [`default_teardowns`] run and the rest of the server
    /// keeps its pace; the storm takes as long as before to clear.
    pub async fn teardown(&self) -> Option<tokio::sync::SemaphorePermit<'_>> {
        self.teardowns.acquire().await.ok()
    }

    /// Waits for a session-opening slot, the mirror of [`App::teardown`] for a connect storm:
    /// an authenticated session registers with the hub, connects its user on the owner node
    /// (which reads the user's rooms and pending notifications from the store) and follows its rooms.
    /// Thousands of handshakes arriving together would run those steps all at once and fill
    /// the runtime's queues ahead of every other session's next step; at most [`default_openings`] run,
    /// the others wait their turn in arrival order (each still bounded by its client's own
    /// connect timeout).
    pub async fn opening(&self) -> Option<tokio::sync::SemaphorePermit<'_>> {
        self.openings.acquire().await.ok()
    }
}

/// A running Palaver gateway: `serve` (with a local node) or `gateway` (cluster client).
pub struct Palaver {
    addr: SocketAddr,
    app: Arc<App>,
    stop: CancellationToken,
    serve: JoinHandle<std::io::Result<()>>,
    compat: Vec<(SocketAddr, JoinHandle<std::io::Result<()>>)>,
    hub_stop: CancellationToken,
    hub_task: JoinHandle<()>,
    local: Option<Arc<Node>>,
    store: Option<Arc<dyn Store>>,
    bus: Arc<dyn Bus>,
    push: Option<crate::push::PushWorker>,
}

/// Opens the configured store, measured ([`MeteredStore`]: time and failures per operation).
pub async fn open_store(config: &Config) -> anyhow::Result<Arc<dyn Store>> {
    let store: Arc<dyn Store> = match &config.store {
        StoreChoice::Embedded => {
            Arc::new(EmbeddedStore::open(&config.data_dir, config.durability)?)
        }
        StoreChoice::Postgres { url, pool } => Arc::new(PostgresStore::connect(url, *pool).await?),
        StoreChoice::Scylla(c) => Arc::new(ScyllaStore::connect(c).await?),
    };
    Ok(Arc::new(MeteredStore::new(store)))
}

/// The bus, measured ([`MeteredBus`]: publish time, failures, envelopes consumed).
pub fn metered_bus(bus: Arc<dyn Bus>) -> Arc<dyn Bus> {
    Arc::new(MeteredBus::new(bus))
}

impl Palaver {
    /// `palaver serve`: everything in one process (with the push worker when a provider is
    /// configured); returns once it accepts connections.
    pub async fn start(config: Config) -> anyhow::Result<Self> {
        crate::telemetry::metrics::install();
        let auth = Auth::new(&config.jwt, &config.data_dir).map_err(anyhow::Error::msg)?;
        let store = open_store(&config).await?;
        let bus: Arc<dyn Bus> = metered_bus(match &config.kafka {
            Some(k) => KafkaBus::connect(k.clone()).await?,
            None => Arc::new(LocalBus::new(BUS_QUEUE)),
        });
        let local = Node::start(config.node.clone(), store.clone(), bus.clone()).await?;
        let node: Arc<dyn NodeApi> = local.clone();
        let mut palaver = Self::launch(
            config,
            auth,
            node,
            bus.clone(),
            Some(local),
            Some(store.clone()),
            None,
        )
        .await?;
        // Pushes are sent in process when a provider is configured.
        let push = crate::push::PushWorker::start(
            &palaver.app.config.push,
            store,
            bus,
            palaver.app.push_metrics.clone(),
        )
        .await;
        match push {
            Ok(push) => {
                palaver.push = push;
                Ok(palaver)
            }
            Err(e) => {
                if let Err(stop) = palaver.shutdown().await {
                    tracing::warn!(error = %stop, "stopping after a failed start");
                }
                Err(e.context("starting the push worker"))
            }
        }
    }

    /// `palaver gateway`: sockets only; every call goes to the node owning its key, deliveries
    /// arrive over Kafka.
    pub async fn start_gateway(config: Config) -> anyhow::Result<Self> {
        crate::telemetry::metrics::install();
        let auth = Auth::new(&config.jwt, &config.data_dir).map_err(anyhow::Error::msg)?;
        let members = config
            .nodes
            .clone()
            .ok_or_else(|| anyhow::anyhow!("PALAVER_NODES is required for `palaver gateway`"))?;
        let kafka = config.kafka.clone().ok_or_else(|| {
            anyhow::anyhow!("PALAVER_KAFKA_BROKERS is required for `palaver gateway`")
        })?;
        let cluster = Cluster::new(members, config.node.call_timeout)?;
        cluster.refresh().await;
        let bus = metered_bus(KafkaBus::connect(kafka).await?);
        let node: Arc<dyn NodeApi> = Arc::new(RemoteNodes::new(cluster.clone()));
        Self::launch(config, auth, node, bus, None, None, Some(cluster)).await
    }

    async fn launch(
        config: Config,
        auth: Auth,
        node: Arc<dyn NodeApi>,
        bus: Arc<dyn Bus>,
        local: Option<Arc<Node>>,
        store: Option<Arc<dyn Store>>,
        cluster: Option<Arc<Cluster>>,
    ) -> anyhow::Result<Self> {
        // Every call to the nodes goes through the console's observer (sends, refusals).
        let console = Arc::new(crate::console::Console::new());
        let node: Arc<dyn NodeApi> = Arc::new(crate::console::Observed::new(node, console.clone()));
        // A `gateway.receive` span around every command when tracing is on.
        let node = crate::telemetry::otel::traced(node);
        // And through the metrics (send -> ack latency, error answers by code).
        crate::telemetry::metrics::install();
        let node: Arc<dyn NodeApi> = Arc::new(crate::telemetry::metrics::MeteredNode::new(node));
        if let Some(local) = &local {
            console.set_ring(crate::console::RingSource::Local(local.clone()));
        } else if let Some(cluster) = &cluster {
            console.set_ring(crate::console::RingSource::Cluster(cluster.clone()));
        }
        let hub = Hub::new(
            config.gateway_id.clone(),
            node.clone(),
            config.outbound_queue,
        );
        hub.set_max_per_user(config.max_connections_per_user);
        hub.set_reorder_hold(config.reorder_hold);
        hub.set_lane_sessions(config.fanout_lane_sessions);
        console.set_hub(&hub);
        let deliveries = bus.subscribe(&config.gateway_id).await?;
        let hub_stop = CancellationToken::new();
        let hub_task = tokio::spawn(hub.clone().run(deliveries, hub_stop.clone()));

        let mut checks = vec![crate::ready::bus_check(bus.clone())];
        if let Some(store) = &store {
            checks.push(crate::ready::store_check(store.clone()));
        }
        if let Some(cluster) = &cluster {
            checks.push(crate::ready::nodes_check(cluster.clone()));
        }
        let ready = crate::ready::Readiness::start(checks, hub_stop.clone()).await;
        let listener = tokio::net::TcpListener::bind(config.http_addr).await?;
        let addr = listener.local_addr()?;
        let conn_limits = crate::listen::ConnLimits::new(
            config.max_connections_per_ip,
            config.header_timeout,
            config.ws_send_buffer,
        );
        let teardowns = tokio::sync::Semaphore::new(config.session_teardowns);
        let openings = tokio::sync::Semaphore::new(config.session_openings);
        let app = Arc::new(App {
            config,
            auth,
            node,
            hub,
            sessions: TaskTracker::new(),
            draining: AtomicBool::new(false),
            socketio: Default::default(),
            people: Default::default(),
            push_metrics: Default::default(),
            ready,
            console,
            conn_limits,
            teardowns,
            openings,
        });
        if let Some(cluster) = cluster {
            cluster.spawn_health(HEALTH_EVERY, hub_stop.clone());
            tokio::spawn(follow_ring(app.clone(), cluster, hub_stop.clone()));
        }
        let stop = CancellationToken::new();
        let signal = {
            let app = app.clone();
            let stop = stop.clone();
            async move {
                stop.cancelled().await;
                app.draining.store(true, Ordering::SeqCst);
                // Each dialect's own "reconnect elsewhere": close 1001 on plain WebSockets
                // (native, Phoenix, type-tagged, event/data clients reconnect on it), a
                // transport close on Socket.IO.
                let sio = app.clone();
                tokio::spawn(async move {
                    crate::dialect::socketio::close_transports(&sio).await;
                });
                app.hub.kick_all(&session::going_away());
            }
        };
        let mut compat = Vec::new();
        for (dialect, at) in app.config.compat_listen.clone() {
            let listener = tokio::net::TcpListener::bind(at).await.map_err(|e| {
                anyhow::anyhow!("PALAVER_COMPAT_LISTEN {}={at}: {e}", dialect.name())
            })?;
            let bound = listener.local_addr()?;
            tracing::info!(dialect = dialect.name(), addr = %bound, "compat listener");
            let router = compat_router(app.clone(), dialect);
            let signal = {
                let stop = stop.clone();
                async move { stop.cancelled().await }
            };
            let limits = app.conn_limits.clone();
            compat.push((
                bound,
                tokio::spawn(crate::listen::serve(listener, router, limits, signal)),
            ));
        }
        let serve = tokio::spawn(crate::listen::serve(
            listener,
            router(app.clone()),
            app.conn_limits.clone(),
            signal,
        ));
        Ok(Self {
            addr,
            app,
            stop,
            serve,
            compat,
            hub_stop,
            hub_task,
            local,
            store,
            bus,
            push: None,
        })
    }

    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The bound addresses of the dedicated dialect listeners, in configuration order.
    pub fn compat_addrs(&self) -> Vec<SocketAddr> {
        self.compat.iter().map(|(a, _)| *a).collect()
    }

    /// Shared state (for tests and embedding).
    pub fn app(&self) -> &Arc<App> {
        &self.app
    }

    /// The store, in `serve` (a gateway has none).
    pub fn store(&self) -> Option<&Arc<dyn Store>> {
        self.store.as_ref()
    }

    /// Drains and stops: no new connections, every socket closed with 1001, sessions waited for
    /// (up to the grace period), actors stopped after their mailboxes, bus closed, store
    /// flushed and closed.
    pub async fn shutdown(self) -> anyhow::Result<()> {
        let grace = self.app.config.shutdown_grace;
        self.stop.cancel();
        self.app.sessions.close();
        let deadline = tokio::time::Instant::now() + grace;
        if tokio::time::timeout_at(deadline, self.app.sessions.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                left = self.app.hub.len(),
                "sessions still open after the grace period"
            );
        }
        match tokio::time::timeout_at(deadline, self.serve).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(e))) => tracing::warn!(error = %e, "http server ended with an error"),
            Ok(Err(e)) => tracing::warn!(error = %e, "http server task failed"),
            Err(_) => tracing::warn!("http connections still open after the grace period"),
        }
        for (_, listener) in self.compat {
            if !matches!(
                tokio::time::timeout_at(deadline, listener).await,
                Ok(Ok(Ok(())))
            ) {
                tracing::warn!("a compat listener did not stop cleanly");
            }
        }
        if let Some(local) = &self.local {
            local.shutdown().await;
        }
        // After the actors: no job is published any more; the jobs in hand finish (up to the
        // grace period) before the store closes.
        if let Some(push) = self.push {
            push.shutdown(tokio::time::Instant::now() + grace).await;
        }
        self.hub_stop.cancel();
        if let Err(e) = self.hub_task.await {
            tracing::warn!(error = %e, "delivery loop failed");
        }
        self.bus.close().await;
        if let Some(store) = &self.store {
            store.close().await?;
        }
        tracing::info!("palaver stopped");
        Ok(())
    }
}

/// Builds the router.
pub fn router(app: Arc<App>) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/ws", get(native_ws))
        .nest("/v1", rest::routes())
        .merge(crate::console::routes())
        .merge(crate::dialect::socketio::syarah::routes())
        .merge(crate::dialect::phoenix::routes())
        .merge(crate::dialect::rt::routes())
        .merge(crate::dialect::events::routes())
        .merge(crate::uploads::routes())
        .layer(axum::extract::DefaultBodyLimit::max(
            app.config.max_frame_bytes,
        ))
        .layer(axum::middleware::from_fn(count_too_large))
        .with_state(app.clone())
        .layer(crate::dialect::socketio::layer(&app))
        .layer(axum::middleware::from_fn(
            crate::dialect::socketio::own_request_head,
        ))
}

/// The router of a dedicated listener: one dialect at `/` (plus health checks).
pub fn compat_router(app: Arc<App>, dialect: crate::config::CompatDialect) -> Router {
    use crate::config::CompatDialect;
    let root = match dialect {
        CompatDialect::RtChat => crate::dialect::rt::chat_at_root(),
        CompatDialect::RtPresence => crate::dialect::rt::presence_at_root(),
        CompatDialect::Events => crate::dialect::events::at_root(),
    };
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .merge(root)
        .layer(axum::extract::DefaultBodyLimit::max(
            app.config.max_frame_bytes,
        ))
        .layer(axum::middleware::from_fn(count_too_large))
        .with_state(app)
}

/// Counts every `413` a route answers in `palaver_limit_refusals_total`: `upload` on the
/// upload routes (a file over its kind's limit), `payload` elsewhere (a body over
/// `PALAVER_MAX_FRAME_BYTES`, refused by the body limit or by the route).
async fn count_too_large(
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let upload = request.uri().path().contains("upload");
    let response = next.run(request).await;
    if response.status() == StatusCode::PAYLOAD_TOO_LARGE {
        crate::telemetry::metrics::limit_refused(if upload { "upload" } else { "payload" });
    }
    response
}

async fn healthz() -> &'static str {
    "ok"
}

/// `GET /metrics`: Prometheus text (0.0.4).
async fn metrics(State(app): State<Arc<App>>) -> Response {
    crate::telemetry::metrics::response(&app.push_metrics.render())
}

async fn readyz(State(app): State<Arc<App>>) -> Response {
    app.ready.response(app.draining.load(Ordering::SeqCst))
}

/// An error as an HTTP response: the code's status and `{"error":{"code","message"}}`.
pub fn error_response(e: &Error) -> Response {
    let status =
        StatusCode::from_u16(e.code.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let body = serde_json::json!({ "error": { "code": e.code, "message": e.message } });
    let mut resp = (status, axum::Json(body)).into_response();
    if e.code == ErrorCode::Unauthorized {
        resp.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            header::HeaderValue::from_static("Bearer"),
        );
    }
    resp
}

/// The bearer token of a request: `Authorization: Bearer`, else `?token=`.
pub fn bearer<'a>(headers: &'a HeaderMap, query_token: Option<&'a str>) -> Option<&'a str> {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        })
        .or(query_token)
}

/// Authenticates a request, or answers 401 with the reason.
pub fn authenticate(app: &App, token: Option<&str>) -> Result<Profile, ApiError> {
    let token = token.unwrap_or_default();
    app.auth.verify(token).map_err(|e| {
        let msg = match e {
            AuthError::Missing => {
                "missing token: send Authorization: Bearer <jwt> or ?token=<jwt>".into()
            }
            other => other.to_string(),
        };
        let e = Error::new(ErrorCode::Unauthorized, msg);
        app.console.record(None, Some("auth"), None, &e);
        ApiError(e)
    })
}

/// An error answered as an HTTP response (see [`error_response`]).
#[derive(Debug)]
pub struct ApiError(pub Error);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        error_response(&self.0)
    }
}

/// The authenticated user of a REST request (`Authorization: Bearer`). As an extractor it runs
/// before the body is read, so a request without a valid token is a 401 whatever its body.
pub struct Caller(pub Profile);

impl axum::extract::FromRequestParts<Arc<App>> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        app: &Arc<App>,
    ) -> Result<Self, ApiError> {
        authenticate(app, bearer(&parts.headers, None)).map(Caller)
    }
}

#[derive(Deserialize)]
struct TokenQuery {
    token: Option<String>,
}

async fn native_ws(
    State(app): State<Arc<App>>,
    Query(q): Query<TokenQuery>,
    headers: HeaderMap,
    upgrade: Result<ws::Upgrade, ws::NotUpgrade>,
) -> Response {
    // Authenticate before anything else: a bad token is a 401, never an upgraded socket.
    let token = bearer(&headers, q.token.as_deref());
    let profile = match crate::console::sync_scoped("native", || authenticate(&app, token)) {
        Ok(p) => p,
        Err(e) => return e.into_response(),
    };
    if app.draining.load(Ordering::SeqCst) {
        return error_response(&Error::unavailable(
            "server is shutting down; reconnect elsewhere",
        ));
    }
    let upgrade = match upgrade {
        Ok(u) => u,
        Err(rej) => return rej.into_response(),
    };
    // Register before answering 101: once connected, the user exists for everyone else.
    let opened = match session::open(&app, profile, "native").await {
        Ok(o) => o,
        Err(e) => return error_response(&e),
    };
    let limit = app.config.max_frame_bytes;
    let tracker = app.sessions.clone();
    let task_app = app.clone();
    let failed = opened.clone_for_failure(&app);
    upgrade.on_upgrade(
        limit,
        None,
        move |socket, dropped| {
            tracker.track_future(crate::console::scoped(
                "native",
                session::run_native(socket, task_app, opened, dropped),
            ))
        },
        move || failed.abandon(),
    )
}
