//! Prometheus metrics: one recorder per process, rendered by our own `GET /metrics` routes.
//!
//! [`install`] installs the `metrics` crate's global recorder (a `metrics-exporter-prometheus`
//! recorder without its HTTP listener) the first time it is called and returns its handle; later
//! calls, from a second server started in the same process (tests do that), reuse the first
//! handle. A background thread runs the exporter's upkeep every few seconds (it folds histogram
//! samples into their buckets, so memory stays bounded between scrapes).
//!
//! Instruments are `metrics` handles registered once and kept where they are used, so the hot
//! path pays an atomic add, never a label lookup:
//!
//! - per dialect ([`DialectMetrics`], one per dialect name, cached by the hub): connections,
//!   sends received, events delivered, outbound queue depth, slow-consumer disconnects;
//! - [`MeteredNode`] wraps the gateway's [`NodeApi`]: send -> ack latency and error answers by
//!   code;
//! - the node crate measures its own parts (store and bus decorators, actors, ring, fan-out).
//!
//! Handles registered before [`install`] would do nothing, so every process entry point
//! (`serve`, `gateway`, `node`, `push-worker`) installs first. Every series is listed, with its
//! type and labels, in the README ("Operations").

use async_trait::async_trait;
use dashmap::DashMap;
use metrics::{Counter, Gauge, Histogram, Unit};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use node::api::NodeApi;
use node::user::{Connected, SessionInfo};
use schema::{Command, Error, ErrorCode, GatewayId, Profile, Reply, RoomId, SessionId, UserId};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

/// Bucket bounds (seconds) of every `_seconds` histogram: 0.5 ms to 10 s, chat latencies.
pub const LATENCY_BUCKETS: [f64; 15] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 7.5, 10.0,
];

/// Bucket bounds of `palaver_session_queue_depth` (frames queued, counting the new one).
pub const DEPTH_BUCKETS: [f64; 14] = [
    1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0, 4096.0, 8192.0,
];

/// The `dialect` label values shown from the start (at zero): the session dialects, the native
/// REST API (`rest`) and the event/data dialect's REST (`events-rest`).
pub const DIALECTS: [&str; 9] = [
    "native",
    "notifyhub",
    "syarah",
    "phoenix",
    "rt-chat",
    "rt-presence",
    "events",
    "rest",
    "events-rest",
];

/// How often the upkeep thread runs.
const UPKEEP_EVERY: Duration = Duration::from_secs(5);

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Installs the process's recorder (once) and returns its handle.
pub fn install() -> &'static PrometheusHandle {
    HANDLE.get_or_init(|| {
        let handle = match builder().install_recorder() {
            Ok(handle) => handle,
            Err(e) => {
                // Another recorder owns the process (an embedding application): ours stays
                // empty rather than failing the server.
                tracing::warn!(error = %e, "metrics recorder not installed; /metrics stays empty");
                builder().build_recorder().handle()
            }
        };
        describe();
        let upkeep = handle.clone();
        if let Err(e) = std::thread::Builder::new()
            .name("metrics-upkeep".into())
            .spawn(move || upkeep_loop(&upkeep))
        {
            tracing::warn!(error = %e, "metrics upkeep thread not started");
        }
        for dialect in DIALECTS {
            // Registered now so that every dialect shows from the first scrape, at zero.
            drop(DialectMetrics::new(dialect));
        }
        handle
    })
}

/// The upkeep thread's body, for the life of the process. A plain thread of its own (not an
/// async worker), so sleeping in it blocks nothing else.
#[allow(clippy::disallowed_methods)]
fn upkeep_loop(handle: &PrometheusHandle) {
    loop {
        std::thread::sleep(UPKEEP_EVERY);
        handle.run_upkeep();
    }
}

fn builder() -> PrometheusBuilder {
    let with = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &LATENCY_BUCKETS)
        .and_then(|b| {
            b.set_buckets_for_metric(
                Matcher::Full("palaver_session_queue_depth".into()),
                &DEPTH_BUCKETS,
            )
        });
    match with {
        Ok(b) => b,
        Err(e) => {
            tracing::warn!(error = %e, "histogram buckets refused; histograms become summaries");
            PrometheusBuilder::new()
        }
    }
}

/// The `# HELP` text and unit of every series.
fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram};
    describe_gauge!(
        "palaver_connections",
        "Client sessions connected to this gateway, by dialect."
    );
    describe_counter!(
        "palaver_connections_opened_total",
        "Client sessions opened, by dialect."
    );
    describe_counter!(
        "palaver_messages_received_total",
        "Message sends received from clients, by dialect (before the node's verdict)."
    );
    describe_counter!(
        "palaver_messages_delivered_total",
        "Events (messages, receipts, typing, presence, ...) written to client sockets, by dialect."
    );
    describe_histogram!(
        "palaver_send_ack_seconds",
        Unit::Seconds,
        "Gateway: a send handed to the node until its answer (the ack or an error)."
    );
    describe_histogram!(
        "palaver_fanout_seconds",
        Unit::Seconds,
        "Fan-out. stage=node: durable write until the message's deliveries are on the bus; stage=gateway: delivery received until queued to every local session."
    );
    describe_counter!(
        "palaver_errors_total",
        "Error answers from the node to gateway requests, by error code (rate limits included)."
    );
    describe_counter!(
        "palaver_limit_refusals_total",
        "Requests, frames and connections refused by a configured limit, by limit (conn_ip, conn_user, frame, payload, message_rate, typing_rate, upload, text, group_size, rooms)."
    );
    describe_histogram!(
        "palaver_session_queue_depth",
        "Frames in a session's outbound queue, sampled at each enqueue, by dialect."
    );
    describe_counter!(
        "palaver_slow_consumer_disconnects_total",
        "Sessions closed because the client did not read (queue full or socket write timeout), by dialect."
    );
    describe_gauge!(
        "palaver_actors",
        "Actors running on this process's node(s), by kind (room, user)."
    );
    describe_gauge!(
        "palaver_ring_info",
        "The ring version this node routes with (1), earlier versions 0."
    );
    describe_gauge!("palaver_ring_nodes", "Nodes on this node's ring.");
    describe_gauge!(
        "palaver_ring_owned_share",
        "Fraction of the keys this node owns on its ring (0 to 1)."
    );
    describe_histogram!(
        "palaver_store_seconds",
        Unit::Seconds,
        "Time of one store call, by operation."
    );
    describe_counter!(
        "palaver_store_errors_total",
        "Store calls that failed, by operation (a duplicate client_ref is not a failure)."
    );
    describe_gauge!(
        "palaver_store_inflight",
        "Store calls in flight, by operation (one that stays up is a stuck call)."
    );
    describe_histogram!(
        "palaver_bus_publish_seconds",
        Unit::Seconds,
        "Time to publish one envelope on the bus, by topic."
    );
    describe_counter!(
        "palaver_bus_errors_total",
        "Failed bus publishes and subscriptions, by topic."
    );
    describe_counter!(
        "palaver_bus_consumed_total",
        "Envelopes consumed from the bus by this process, by topic."
    );
}

/// The process's series in the Prometheus text format, followed by `extra` (series kept
/// elsewhere, such as the push worker's counters).
pub fn render(extra: &str) -> String {
    let mut text = install().render();
    if !text.is_empty() && !text.ends_with('\n') {
        text.push('\n');
    }
    text.push_str(extra);
    text
}

/// A `GET /metrics` answer: [`render`] as `text/plain; version=0.0.4`.
pub fn response(extra: &str) -> axum::response::Response {
    crate::push::metrics_response(render(extra))
}

/// The instruments of one dialect.
pub struct DialectMetrics {
    connections: Gauge,
    opened: Counter,
    received: Counter,
    delivered: Counter,
    slow: Counter,
    queue_depth: Histogram,
}

impl DialectMetrics {
    /// Registers (or finds) the series of `dialect`.
    pub fn new(dialect: &str) -> Self {
        let d = dialect.to_owned();
        Self {
            connections: metrics::gauge!("palaver_connections", "dialect" => d.clone()),
            opened: metrics::counter!("palaver_connections_opened_total", "dialect" => d.clone()),
            received: metrics::counter!("palaver_messages_received_total", "dialect" => d.clone()),
            delivered: metrics::counter!("palaver_messages_delivered_total", "dialect" => d.clone()),
            slow: metrics::counter!("palaver_slow_consumer_disconnects_total", "dialect" => d.clone()),
            queue_depth: metrics::histogram!("palaver_session_queue_depth", "dialect" => d),
        }
    }

    /// A session opened.
    pub fn opened(&self) {
        self.opened.increment(1);
        self.connections.increment(1.0);
    }

    /// A session closed.
    pub fn closed(&self) {
        self.connections.decrement(1.0);
    }

    /// A client command arrived: counted when it is a message send.
    pub fn command(&self, cmd: &Command) {
        if matches!(cmd, Command::Send { .. }) {
            self.received.increment(1);
        }
    }

    /// `n` events were written to a client.
    pub fn delivered(&self, n: u64) {
        if n > 0 {
            self.delivered.increment(n);
        }
    }

    /// A frame was queued; `depth` frames are now in the queue.
    pub fn queued(&self, depth: usize) {
        self.queue_depth.record(depth as f64);
    }

    /// A session was closed as a slow consumer.
    pub fn slow_consumer(&self) {
        self.slow.increment(1);
    }
}

/// [`DialectMetrics`] by dialect name, registered on first use.
#[derive(Default)]
pub struct Dialects {
    by_name: DashMap<String, Arc<DialectMetrics>>,
}

impl Dialects {
    /// The instruments of `dialect`.
    pub fn get(&self, dialect: &str) -> Arc<DialectMetrics> {
        if let Some(m) = self.by_name.get(dialect) {
            return m.clone();
        }
        self.by_name
            .entry(dialect.to_owned())
            .or_insert_with(|| Arc::new(DialectMetrics::new(dialect)))
            .clone()
    }
}

/// Counts one refusal by the configured limit `limit` (`palaver_limit_refusals_total`).
pub fn limit_refused(limit: &'static str) {
    metrics::counter!("palaver_limit_refusals_total", "limit" => limit).increment(1);
}

/// Counts one pause of a session refused for its rate (`palaver_tarpit_pauses_total`).
pub fn tarpit_pause() {
    metrics::counter!("palaver_tarpit_pauses_total").increment(1);
}

/// Counts one live room event the hub held for a missing predecessor (`held`), dropped as
/// already delivered (`stale`), or one gap it delivered past when a hold expired
/// (`gap_skipped`): `palaver_reordered_events_total{outcome}`.
pub fn reordered(outcome: &'static str) {
    metrics::counter!("palaver_reordered_events_total", "outcome" => outcome).increment(1);
}

/// The limit a node error reports, if it is one.
fn limit_of(err: &Error) -> Option<&'static str> {
    Some(match err.code {
        ErrorCode::RateLimited if err.message.contains(node::room::ROOM_FANOUT_REFUSAL) => {
            "room_fanout"
        }
        ErrorCode::RateLimited => "message_rate",
        ErrorCode::TypingRateLimited => "typing_rate",
        ErrorCode::TextTooLong | ErrorCode::CaptionTooLong => "text",
        ErrorCode::GroupFull => "group_size",
        ErrorCode::TooManyRooms => "rooms",
        _ => return None,
    })
}

/// The gateway's [`NodeApi`], measured: the time from a send handed to the node to its answer
/// (`palaver_send_ack_seconds`) and error answers by code (`palaver_errors_total`).
pub struct MeteredNode {
    inner: Arc<dyn NodeApi>,
    ack: Histogram,
    errors: DashMap<&'static str, Counter>,
}

impl MeteredNode {
    /// Wraps `inner`.
    pub fn new(inner: Arc<dyn NodeApi>) -> Self {
        Self {
            inner,
            ack: metrics::histogram!("palaver_send_ack_seconds"),
            errors: DashMap::new(),
        }
    }

    fn error(&self, e: &Error) {
        if let Some(limit) = limit_of(e) {
            limit_refused(limit);
        }
        let code = e.code.as_str();
        if let Some(c) = self.errors.get(code) {
            c.increment(1);
            return;
        }
        self.errors
            .entry(code)
            .or_insert_with(|| metrics::counter!("palaver_errors_total", "code" => code))
            .increment(1);
    }
}

#[async_trait]
impl NodeApi for MeteredNode {
    async fn connect(&self, profile: Profile, session: SessionInfo) -> Result<Connected, Error> {
        let r = self.inner.connect(profile, session).await;
        if let Err(e) = &r {
            self.error(e);
        }
        r
    }

    async fn import_users(&self, users: Vec<Profile>) -> Result<usize, Error> {
        self.inner.import_users(users).await
    }

    async fn disconnect(&self, user: &UserId, gateway: &GatewayId, session: SessionId) {
        self.inner.disconnect(user, gateway, session).await
    }

    async fn execute(&self, caller: &UserId, cmd: Command) -> Result<Reply, Error> {
        let send = matches!(cmd, Command::Send { .. });
        let started = Instant::now();
        let r = self.inner.execute(caller, cmd).await;
        if send {
            self.ack.record(started.elapsed());
        }
        if let Err(e) = &r {
            self.error(e);
        }
        r
    }

    async fn subscribe(&self, gateway: &GatewayId, rooms: Vec<RoomId>) {
        self.inner.subscribe(gateway, rooms).await
    }

    async fn unsubscribe(&self, gateway: &GatewayId, rooms: Vec<RoomId>) {
        self.inner.unsubscribe(gateway, rooms).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A second install reuses the first recorder; series render with their types and buckets.
    #[test]
    fn installs_once_and_renders_histograms_with_buckets() {
        let a = install() as *const PrometheusHandle;
        let b = install() as *const PrometheusHandle;
        assert_eq!(a, b);
        metrics::histogram!("palaver_store_seconds", "op" => "unit_test").record(0.003);
        let m = DialectMetrics::new("unit-test");
        m.opened();
        let text = render("extra_total 1\n");
        assert!(
            text.contains("# TYPE palaver_store_seconds histogram"),
            "{text}"
        );
        assert!(
            text.contains("palaver_store_seconds_bucket{op=\"unit_test\",le=\"0.005\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("palaver_connections{dialect=\"unit-test\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("palaver_connections{dialect=\"phoenix\"} 0"),
            "{text}"
        );
        assert!(text.ends_with("extra_total 1\n"), "{text}");
    }
}
