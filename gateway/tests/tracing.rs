//! OpenTelemetry traces end to end: a small OTLP/HTTP receiver on loopback decodes the
//! `ExportTraceServiceRequest`s real `palaver` processes post, and the tests check that one
//! message is one trace across every hop (gateway receive, room actor, store write, bus publish,
//! gateway deliver, push job and provider call), across processes in a cluster, that spans
//! queued at exit are flushed, and that JSON log lines carry the trace ids.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
#[path = "../../node/tests/support/kafka.rs"]
mod kafka;
#[path = "../../node/tests/support/pg.rs"]
mod pg;
mod cluster {
    pub mod sandbox;
}

use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use common::{Client, SECRET, token};
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value;
use parking_lot::Mutex;
use prost::Message as _;
use serde_json::{Value, json};
use std::collections::{BTreeSet, HashMap};
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

/// One exported span, flattened.
#[derive(Clone, Debug)]
struct Span {
    trace: String,
    id: String,
    parent: String,
    name: String,
    service: String,
    instance: String,
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn text_of(v: &Option<opentelemetry_proto::tonic::common::v1::AnyValue>) -> String {
    match v.as_ref().and_then(|v| v.value.as_ref()) {
        Some(any_value::Value::StringValue(s)) => s.clone(),
        _ => String::new(),
    }
}

/// An OTLP/HTTP receiver: `POST /v1/traces` with a protobuf body.
#[derive(Clone, Default)]
struct Receiver {
    spans: Arc<Mutex<Vec<Span>>>,
    requests: Arc<Mutex<usize>>,
}

async fn traces(State(r): State<Receiver>, body: Bytes) -> (StatusCode, Vec<u8>) {
    let Ok(req) = ExportTraceServiceRequest::decode(body) else {
        return (StatusCode::BAD_REQUEST, Vec::new());
    };
    *r.requests.lock() += 1;
    let mut out = r.spans.lock();
    for rs in req.resource_spans {
        let attr = |k: &str| {
            rs.resource
                .as_ref()
                .and_then(|res| res.attributes.iter().find(|a| a.key == k))
                .map(|a| text_of(&a.value))
                .unwrap_or_default()
        };
        let (service, instance) = (attr("service.name"), attr("service.instance.id"));
        for ss in rs.scope_spans {
            for s in ss.spans {
                out.push(Span {
                    trace: hex(&s.trace_id),
                    id: hex(&s.span_id),
                    parent: hex(&s.parent_span_id),
                    name: s.name,
                    service: service.clone(),
                    instance: instance.clone(),
                });
            }
        }
    }
    // An empty `ExportTraceServiceResponse`.
    (StatusCode::OK, Vec::new())
}

impl Receiver {
    async fn start() -> (Self, String) {
        let r = Receiver::default();
        let app = axum::Router::new()
            .route("/v1/traces", axum::routing::post(traces))
            .with_state(r.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        (r, format!("http://{addr}"))
    }

    fn spans(&self) -> Vec<Span> {
        self.spans.lock().clone()
    }

    /// Waits until the trace of the (only) span named `root` holds every name of `want`.
    async fn trace_with(&self, root: &str, want: &[&str], limit: Duration) -> Vec<Span> {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let spans = self.spans();
            if let Some(r) = spans.iter().find(|s| s.name == root) {
                let trace: Vec<Span> = spans
                    .iter()
                    .filter(|s| s.trace == r.trace)
                    .cloned()
                    .collect();
                if want.iter().all(|w| trace.iter().any(|s| s.name == *w)) {
                    return trace;
                }
            }
            if tokio::time::Instant::now() > deadline {
                let names: Vec<(String, String, String)> = spans
                    .iter()
                    .map(|s| (s.name.clone(), s.trace.clone(), s.instance.clone()))
                    .collect();
                panic!("no trace of {root} with all of {want:?}; spans: {names:#?}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// A webhook push receiver: counts posts.
async fn hook_receiver() -> (Arc<Mutex<usize>>, String) {
    let n = Arc::new(Mutex::new(0usize));
    let app = axum::Router::new()
        .route(
            "/hook",
            axum::routing::post(|State(n): State<Arc<Mutex<usize>>>| async move {
                *n.lock() += 1;
                StatusCode::OK
            }),
        )
        .with_state(n.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (n, format!("http://{addr}/hook"))
}

fn assert_parent(trace: &[Span], child: &str, parent: &str) {
    let ids: HashMap<&str, &str> = trace
        .iter()
        .map(|s| (s.id.as_str(), s.name.as_str()))
        .collect();
    for c in trace.iter().filter(|s| s.name == child) {
        assert_eq!(
            ids.get(c.parent.as_str()).copied(),
            Some(parent),
            "{child} {} is not a child of a {parent} span: {trace:#?}",
            c.id
        );
    }
}

async fn until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !f() {
        assert!(tokio::time::Instant::now() < deadline, "{what}: timed out");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// `palaver serve` (the binary, JSON logs), a webhook push and an OTLP receiver: one message is
/// one trace from the sender's frame to the sender's own delivery and to the push provider
/// call; spans queued at SIGTERM are exported before the exit (the batch delay is 60 s, so
/// nothing else would send them); log lines inside spans carry that trace's id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_one_message_is_one_trace_through_push_and_logs_carry_it() {
    let (receiver, otlp) = Receiver::start().await;
    let (hooks, hook_url) = hook_receiver().await;
    let data = tempfile::tempdir().unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_palaver"))
        .arg("serve")
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("PALAVER_HTTP_ADDR", "127.0.0.1:0")
        .env("PALAVER_DATA_DIR", data.path())
        .env("PALAVER_JWT_SECRET", SECRET)
        .env("PALAVER_PUSH_WEBHOOK_URL", &hook_url)
        .env("PALAVER_PUSH_WEBHOOK_SECRET", "webhook-secret-0123456789")
        .env("PALAVER_LOG_FORMAT", "json")
        .env(
            "PALAVER_LOG",
            "info,palaver_gateway=debug,palaver_node=debug",
        )
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", &otlp)
        .env("OTEL_BSP_SCHEDULE_DELAY", "60000")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn palaver");
    let logs = Arc::new(Mutex::new(Vec::<String>::new()));
    let stderr = child.stderr.take().unwrap();
    let sink = logs.clone();
    let log_reader = std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            sink.lock().push(line);
        }
    });
    let mut first = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut first)
        .unwrap();
    let addr = first
        .trim()
        .strip_prefix("listening on ")
        .unwrap_or_else(|| panic!("unexpected first line {first:?}"))
        .to_owned();

    // User 1 is known and has a webhook device, and is offline: a message to them is pushed.
    let mut one = Client::connect(&format!("ws://{addr}/ws?token={}", token("1"))).await;
    one.ok("ping", json!({})).await;
    let resp = reqwest::Client::builder()
        .no_proxy()
        .build()
        .unwrap()
        .post(format!("http://{addr}/v1/devices"))
        .bearer_auth(token("1"))
        .json(&json!({"platform": "webhook", "token": "hook-1"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 201);
    drop(one);
    let mut two = Client::connect(&format!("ws://{addr}/ws?token={}", token("2"))).await;
    let room = two.ok("open_direct", json!({"user": "1"})).await["room"]["id"]
        .as_u64()
        .unwrap();
    two.ok(
        "send",
        json!({"room": room, "text": "hello", "client_ref": "t-1"}),
    )
    .await;
    two.event_named("message").await;
    until("the push", || *hooks.lock() == 1).await;
    assert!(
        receiver.spans().is_empty(),
        "with a 60 s batch delay nothing is exported before the exit"
    );

    // SIGTERM: the process drains and flushes its spans before exiting.
    let status = Command::new("kill")
        .args(["-s", "TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let code = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s.code();
        }
        assert!(std::time::Instant::now() < deadline, "palaver did not exit");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(code, Some(0));
    log_reader.join().unwrap();

    let want = [
        "gateway.receive",
        "room.send",
        "store.write",
        "bus.publish",
        "gateway.deliver",
        "push.job",
        "push.send",
    ];
    let trace = receiver
        .trace_with("room.send", &want, Duration::from_secs(5))
        .await;
    assert_parent(&trace, "room.send", "gateway.receive");
    assert_parent(&trace, "store.write", "room.send");
    assert_parent(&trace, "bus.publish", "room.send");
    assert_parent(&trace, "gateway.deliver", "bus.publish");
    assert_parent(&trace, "push.job", "bus.publish");
    assert_parent(&trace, "push.send", "push.job");
    assert!(
        trace.iter().all(|s| s.service == "palaver-serve"),
        "{trace:#?}"
    );
    let trace_id = trace[0].trace.clone();
    let span_ids: BTreeSet<&str> = trace.iter().map(|s| s.id.as_str()).collect();

    // Logs: JSON lines; every line made inside one of our spans carries trace and span ids, and
    // the push worker's line carries this message's trace.
    let logs = logs.lock().clone();
    let json: Vec<Value> = logs
        .iter()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    let ours = |v: &Value| {
        v["spans"].as_array().is_some_and(|spans| {
            spans
                .iter()
                .any(|s| want.contains(&s["name"].as_str().unwrap_or_default()))
        })
    };
    let in_spans: Vec<&Value> = json.iter().filter(|v| ours(v)).collect();
    assert!(!in_spans.is_empty(), "no log line inside a span: {logs:#?}");
    for v in &in_spans {
        assert!(
            v["trace_id"].as_str().is_some_and(|t| t.len() == 32)
                && v["span_id"].as_str().is_some_and(|t| t.len() == 16),
            "a line inside a span without trace ids: {v}"
        );
    }
    // (That line has a field named `message` too: find it by its text.)
    let sent = logs
        .iter()
        .position(|l| l.contains("\"push sent\""))
        .map(|i| &json[i])
        .unwrap_or_else(|| panic!("no `push sent` line: {logs:#?}"));
    assert_eq!(sent["trace_id"], json!(trace_id), "{sent}");
    assert!(
        span_ids.contains(sent["span_id"].as_str().unwrap_or_default()),
        "{sent}"
    );
    // Lines outside any span have none.
    let outside = json
        .iter()
        .find(|v| v["message"] == "palaver listening")
        .unwrap_or_else(|| panic!("no start line: {logs:#?}"));
    assert!(outside.get("trace_id").is_none(), "{outside}");
}

/// Two nodes, two gateways, PostgreSQL and Kafka: a message sent on gateway 0 to a room whose
/// other member is on gateway 1 is one trace across gateway 0 (receive), the room's owner
/// (the RPC, the room actor, the store write, the Kafka publish) and gateway 1 (the delivery,
/// parented to the publish through the record's `traceparent` header).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_one_message_is_one_trace_across_processes() {
    let (receiver, otlp) = Receiver::start().await;
    let sb = cluster::sandbox::Sandbox::start_with_env(
        2,
        2,
        2,
        vec![
            ("OTEL_EXPORTER_OTLP_ENDPOINT", otlp),
            ("OTEL_BSP_SCHEDULE_DELAY", "100".into()),
        ],
    )
    .await;
    let mut a = sb.connect(0, "1").await;
    let mut b = sb.connect(1, "2").await;
    let room = common::group(&mut a, "traced", &["2"]).await;
    // Wait for b to follow the room (the delivery reaches gateway 1).
    b.event_named("room_joined").await;
    a.ok(
        "send",
        json!({"room": room, "text": "across", "client_ref": "x-1"}),
    )
    .await;
    let got = b.event_named("message").await;
    assert_eq!(got["data"]["message"]["client_ref"], "x-1", "{got}");

    let want = [
        "gateway.receive",
        "node.call",
        "room.send",
        "store.write",
        "bus.publish",
        "gateway.deliver",
    ];
    let trace = receiver
        .trace_with("room.send", &want, Duration::from_secs(20))
        .await;
    // Gateway 1's delivery must be there too (gateway 0 also delivers to the sender).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let trace = loop {
        let t: Vec<Span> = receiver
            .spans()
            .into_iter()
            .filter(|s| s.trace == trace[0].trace)
            .collect();
        if t.iter()
            .any(|s| s.name == "gateway.deliver" && s.instance == "g1")
        {
            break t;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no delivery span from gateway 1: {t:#?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_parent(&trace, "node.call", "gateway.receive");
    assert_parent(&trace, "room.send", "node.call");
    assert_parent(&trace, "store.write", "room.send");
    assert_parent(&trace, "bus.publish", "room.send");
    assert_parent(&trace, "gateway.deliver", "bus.publish");
    let at = |name: &str| -> BTreeSet<(String, String)> {
        trace
            .iter()
            .filter(|s| s.name == name)
            .map(|s| (s.service.clone(), s.instance.clone()))
            .collect()
    };
    assert_eq!(
        at("gateway.receive"),
        BTreeSet::from([("palaver-gateway".into(), "g0".into())])
    );
    let owner = at("room.send");
    assert_eq!(owner.len(), 1, "{owner:?}");
    assert!(
        owner
            .iter()
            .all(|(s, i)| s == "palaver-node" && (i == "n0" || i == "n1")),
        "{owner:?}"
    );
    assert_eq!(at("store.write"), owner);
    assert_eq!(at("node.call"), owner);
    assert!(at("gateway.deliver").contains(&("palaver-gateway".into(), "g1".into())));
    let processes: BTreeSet<(String, String)> = trace
        .iter()
        .map(|s| (s.service.clone(), s.instance.clone()))
        .collect();
    assert!(processes.len() >= 3, "{processes:?}");
}
