//! `GET /metrics` against a real Palaver: native and type-tagged (`/rt/chat`) clients connect,
//! send and receive, one stops reading and is cut off; the exposition is parsed (types, labels,
//! histogram buckets) and the series must have moved by exactly what the clients did.
//!
//! The recorder is one per process, so this file holds one test: the numbers it asserts are
//! its own.
#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use futures::{SinkExt, StreamExt};
use serde_json::{Value, json};
use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};
use tokio_tungstenite::tungstenite::Message;

/// One parsed sample: metric name, labels, value.
#[derive(Debug, Clone)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

/// A parsed text exposition (format 0.0.4).
#[derive(Debug, Default)]
struct Exposition {
    types: HashMap<String, String>,
    samples: Vec<Sample>,
}

impl Exposition {
    /// Parses `text`, failing on anything the format does not allow: a sample without a `# TYPE`
    /// for its family, a family typed twice, a malformed label set or value.
    fn parse(text: &str) -> Self {
        let mut out = Exposition::default();
        for line in text.lines() {
            if line.is_empty() {
                continue;
            }
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, kind) = rest.split_once(' ').expect("TYPE line");
                assert!(
                    ["counter", "gauge", "histogram", "summary", "untyped"].contains(&kind),
                    "bad type in {line:?}"
                );
                let before = out.types.insert(name.to_owned(), kind.to_owned());
                assert!(before.is_none(), "{name} typed twice");
                continue;
            }
            if line.starts_with('#') {
                continue;
            }
            out.samples.push(parse_sample(line));
        }
        for s in &out.samples {
            let family = out.family_of(&s.name);
            assert!(family.is_some(), "no TYPE for {}", s.name);
        }
        out
    }

    /// The family (typed name) a sample name belongs to.
    fn family_of(&self, name: &str) -> Option<(&str, &str)> {
        if let Some((n, t)) = self.types.get_key_value(name) {
            return Some((n.as_str(), t.as_str()));
        }
        for suffix in ["_bucket", "_sum", "_count"] {
            if let Some(base) = name.strip_suffix(suffix)
                && let Some((n, t)) = self.types.get_key_value(base)
                && (t == "histogram" || t == "summary")
            {
                return Some((n.as_str(), t.as_str()));
            }
        }
        None
    }

    fn kind(&self, name: &str) -> &str {
        self.types
            .get(name)
            .map(String::as_str)
            .unwrap_or_else(|| panic!("{name} has no TYPE"))
    }

    /// The value of the sample `name` whose labels include `labels`, if present (exactly one).
    fn get(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let found: Vec<&Sample> = self
            .samples
            .iter()
            .filter(|s| {
                s.name == name
                    && labels
                        .iter()
                        .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
            })
            .collect();
        assert!(
            found.len() <= 1,
            "{name} {labels:?} is ambiguous: {found:?}"
        );
        found.first().map(|s| s.value)
    }

    /// Like [`Exposition::get`], but the series must exist.
    fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.get(name, labels)
            .unwrap_or_else(|| panic!("no series {name} {labels:?}"))
    }

    /// A histogram's `_count`, after checking its buckets: cumulative, ending in `+Inf` equal to
    /// the count.
    fn histogram_count(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        assert_eq!(self.kind(name), "histogram", "{name}");
        let count = self.value(&format!("{name}_count"), labels);
        let mut buckets: Vec<(f64, f64)> = self
            .samples
            .iter()
            .filter(|s| {
                s.name == format!("{name}_bucket")
                    && labels
                        .iter()
                        .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
            })
            .map(|s| {
                let le = s.labels.get("le").expect("le label");
                let bound = if le == "+Inf" {
                    f64::INFINITY
                } else {
                    le.parse().unwrap()
                };
                (bound, s.value)
            })
            .collect();
        assert!(buckets.len() > 2, "{name} {labels:?} has no buckets");
        buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
        for w in buckets.windows(2) {
            assert!(
                w[0].1 <= w[1].1,
                "{name} buckets not cumulative: {buckets:?}"
            );
        }
        let last = buckets.last().unwrap();
        assert!(last.0.is_infinite(), "{name}: no +Inf bucket");
        assert_eq!(last.1, count, "{name}: +Inf bucket differs from _count");
        count
    }
}

/// `name{a="b",c="d"} value` (a timestamp after the value is allowed and ignored).
fn parse_sample(line: &str) -> Sample {
    let (name, rest) = match line.find(['{', ' ']) {
        Some(i) => line.split_at(i),
        None => panic!("sample without value: {line:?}"),
    };
    assert!(
        !name.is_empty()
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':'),
        "bad metric name in {line:?}"
    );
    let mut labels = BTreeMap::new();
    let mut rest = rest;
    if let Some(body) = rest.strip_prefix('{') {
        let mut chars = body.char_indices().peekable();
        let end = loop {
            // A label name, '=', a quoted value with \\, \" and \n escapes, then ',' or '}'.
            let Some(&(i, c)) = chars.peek() else {
                panic!("unterminated labels in {line:?}")
            };
            if c == '}' {
                break i;
            }
            let mut key = String::new();
            while let Some(&(_, c)) = chars.peek() {
                if c == '=' {
                    break;
                }
                key.push(c);
                chars.next();
            }
            assert!(chars.next().is_some_and(|(_, c)| c == '='), "{line:?}");
            assert!(chars.next().is_some_and(|(_, c)| c == '"'), "{line:?}");
            let mut value = String::new();
            loop {
                match chars.next() {
                    Some((_, '\\')) => match chars.next() {
                        Some((_, 'n')) => value.push('\n'),
                        Some((_, c)) => value.push(c),
                        None => panic!("bad escape in {line:?}"),
                    },
                    Some((_, '"')) => break,
                    Some((_, c)) => value.push(c),
                    None => panic!("unterminated value in {line:?}"),
                }
            }
            assert!(
                !key.is_empty() && key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'),
                "bad label name {key:?} in {line:?}"
            );
            assert!(labels.insert(key, value).is_none(), "label twice: {line:?}");
            match chars.next() {
                Some((_, ',')) => continue,
                Some((i, '}')) => break i,
                other => panic!("unexpected {other:?} in {line:?}"),
            }
        };
        rest = &body[end + 1..];
    }
    let mut parts = rest.split_whitespace();
    let raw = parts.next().unwrap_or_else(|| panic!("no value: {line:?}"));
    let value = match raw {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        "NaN" => f64::NAN,
        v => v
            .parse()
            .unwrap_or_else(|_| panic!("bad value {v:?} in {line:?}")),
    };
    if let Some(ts) = parts.next() {
        ts.parse::<i64>()
            .unwrap_or_else(|_| panic!("bad timestamp in {line:?}"));
    }
    assert!(parts.next().is_none(), "trailing text in {line:?}");
    Sample {
        name: name.to_owned(),
        labels,
        value,
    }
}

fn http() -> reqwest::Client {
    reqwest::Client::builder().no_proxy().build().unwrap()
}

async fn scrape(server: &TestServer) -> Exposition {
    let resp = http().get(server.http("/metrics")).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(
        resp.headers()["content-type"],
        "text/plain; version=0.0.4; charset=utf-8"
    );
    Exposition::parse(&resp.text().await.unwrap())
}

/// Scrapes until `ok` holds (gauges move when sessions finish closing), with a deadline.
async fn scrape_until(
    server: &TestServer,
    what: &str,
    ok: impl Fn(&Exposition) -> bool,
) -> Exposition {
    let deadline = Instant::now() + WAIT;
    loop {
        let m = scrape(server).await;
        if ok(&m) {
            return m;
        }
        assert!(Instant::now() < deadline, "{what} never held");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The next text frame of a raw WebSocket, as JSON.
async fn rt_frame(ws: &mut Ws) -> Value {
    loop {
        let m = tokio::time::timeout(WAIT, ws.next())
            .await
            .expect("no frame in time")
            .expect("connection ended")
            .expect("websocket error");
        match m {
            Message::Text(t) => return serde_json::from_str(t.as_str()).unwrap(),
            Message::Ping(_) | Message::Pong(_) => continue,
            other => panic!("unexpected frame {other:?}"),
        }
    }
}

/// The next `GROUP_CHAT` frame of an `/rt/chat` socket (INFO frames skipped).
async fn rt_message(ws: &mut Ws) -> Value {
    loop {
        let f = rt_frame(ws).await;
        if f["type"] == "GROUP_CHAT" {
            return f;
        }
        assert_eq!(f["type"], "INFO", "{f}");
    }
}

fn counter(m: &Exposition, name: &str, labels: &[(&str, &str)]) -> f64 {
    assert_eq!(m.kind(name), "counter", "{name}");
    m.value(name, labels)
}

fn gauge(m: &Exposition, name: &str, labels: &[(&str, &str)]) -> f64 {
    assert_eq!(m.kind(name), "gauge", "{name}");
    m.value(name, labels)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_follow_what_clients_do() {
    // Durability is not under test; `normal` keeps the slow-consumer flood quick.
    let server = TestServer::start_with(|b| {
        b.outbound_queue = Some(32);
        // At most half the queue (a connect queues them all at once).
        b.pending_per_user = Some(16);
        b.store_durability = Some("normal".into());
        b.messages_per_second = Some(100_000);
    })
    .await;

    // Before anyone connects: every dialect at zero, the ring of one node owning everything.
    let m = scrape(&server).await;
    for d in [
        "native",
        "notifyhub",
        "syarah",
        "phoenix",
        "rt-chat",
        "rt-presence",
        "events",
    ] {
        assert_eq!(
            gauge(&m, "palaver_connections", &[("dialect", d)]),
            0.0,
            "{d}"
        );
        assert_eq!(
            counter(&m, "palaver_messages_received_total", &[("dialect", d)]),
            0.0
        );
    }
    assert_eq!(gauge(&m, "palaver_ring_owned_share", &[]), 1.0);
    assert_eq!(gauge(&m, "palaver_ring_nodes", &[]), 1.0);
    assert_eq!(gauge(&m, "palaver_ring_info", &[("version", "1")]), 1.0);
    // The push worker's counters are part of the same exposition.
    assert_eq!(
        counter(&m, "palaver_push_sent_total", &[("provider", "fcm")]),
        0.0
    );

    // Two native clients and one on /rt/chat.
    let mut ann = server.connect("1").await;
    let mut bob = server.connect("2").await;
    let (mut cat, _) = tokio_tungstenite::connect_async(server.url("/rt/chat"))
        .await
        .unwrap();
    cat.send(Message::text(
        json!({"type": "AUTH", "token": token("3")}).to_string(),
    ))
    .await
    .unwrap();
    assert_eq!(rt_frame(&mut cat).await["type"], "SUCCESS");
    let m = scrape(&server).await;
    assert_eq!(
        gauge(&m, "palaver_connections", &[("dialect", "native")]),
        2.0
    );
    assert_eq!(
        gauge(&m, "palaver_connections", &[("dialect", "rt-chat")]),
        1.0
    );
    assert_eq!(
        counter(
            &m,
            "palaver_connections_opened_total",
            &[("dialect", "native")]
        ),
        2.0
    );
    assert_eq!(
        counter(
            &m,
            "palaver_connections_opened_total",
            &[("dialect", "rt-chat")]
        ),
        1.0
    );

    // Three sends from ann, two from cat; bob and cat see all five.
    let room = group(&mut ann, "metrics", &["2", "3"]).await;
    bob.event_named("room_joined").await;
    for i in 0..3 {
        ann.ok(
            "send",
            json!({"room": room, "text": format!("a{i}"), "client_ref": format!("a{i}")}),
        )
        .await;
    }
    for i in 0..2 {
        cat.send(Message::text(
            json!({"type": "GROUP_CHAT", "groupId": room.to_string(), "content": format!("c{i}")})
                .to_string(),
        ))
        .await
        .unwrap();
    }
    for _ in 0..5 {
        bob.event_named("message").await;
        rt_message(&mut cat).await;
    }
    // One refusal: bob is not a member of a room he was never added to.
    let other = group(&mut ann, "private", &[]).await;
    let (code, _) = bob
        .err(
            "send",
            json!({"room": other, "text": "no", "client_ref": "x"}),
        )
        .await;
    assert_eq!(code, "not_member");

    let m = scrape(&server).await;
    assert_eq!(
        counter(
            &m,
            "palaver_messages_received_total",
            &[("dialect", "native")]
        ),
        4.0,
        "three sends from ann, the refused one from bob"
    );
    assert_eq!(
        counter(
            &m,
            "palaver_messages_received_total",
            &[("dialect", "rt-chat")]
        ),
        2.0
    );
    // Events written: bob got room_joined and five messages (at least), cat five messages.
    assert!(
        counter(
            &m,
            "palaver_messages_delivered_total",
            &[("dialect", "native")]
        ) >= 6.0
    );
    assert!(
        counter(
            &m,
            "palaver_messages_delivered_total",
            &[("dialect", "rt-chat")]
        ) >= 5.0
    );
    assert_eq!(
        counter(&m, "palaver_errors_total", &[("code", "not_member")]),
        1.0
    );
    assert_eq!(m.histogram_count("palaver_send_ack_seconds", &[]), 6.0);
    assert!(m.histogram_count("palaver_fanout_seconds", &[("stage", "node")]) >= 5.0);
    assert!(m.histogram_count("palaver_fanout_seconds", &[("stage", "gateway")]) >= 5.0);
    assert!(m.histogram_count("palaver_store_seconds", &[("op", "apply_room")]) >= 5.0);
    assert!(m.histogram_count("palaver_store_seconds", &[("op", "upsert_user")]) >= 3.0);
    assert_eq!(
        counter(&m, "palaver_store_errors_total", &[("op", "apply_room")]),
        0.0
    );
    assert!(
        m.histogram_count(
            "palaver_bus_publish_seconds",
            &[("topic", "palaver.deliver")]
        ) >= 5.0
    );
    assert!(
        counter(
            &m,
            "palaver_bus_consumed_total",
            &[("topic", "palaver.deliver")]
        ) >= 5.0
    );
    assert!(m.histogram_count("palaver_session_queue_depth", &[("dialect", "native")]) >= 6.0);
    assert!(gauge(&m, "palaver_actors", &[("kind", "room")]) >= 2.0);
    assert_eq!(
        counter(
            &m,
            "palaver_slow_consumer_disconnects_total",
            &[("dialect", "native")]
        ),
        0.0
    );

    // Bob stops reading; large messages fill his socket and then his queue of 32.
    let text = "z".repeat(4000);
    let mut sent = 0u64;
    while server.sessions() == 3 {
        sent += 1;
        ann.ok(
            "send",
            json!({"room": room, "text": text, "client_ref": format!("flood{sent}")}),
        )
        .await;
        // Keep cat's socket drained so that only bob falls behind.
        rt_message(&mut cat).await;
        assert!(sent < 20_000, "the slow consumer was never disconnected");
    }
    let m = scrape_until(&server, "bob's session is gone", |m| {
        m.get("palaver_connections", &[("dialect", "native")]) == Some(1.0)
    })
    .await;
    assert_eq!(
        counter(
            &m,
            "palaver_slow_consumer_disconnects_total",
            &[("dialect", "native")]
        ),
        1.0
    );
    let depth = m.histogram_count("palaver_session_queue_depth", &[("dialect", "native")]);
    assert!(
        m.value(
            "palaver_session_queue_depth_bucket",
            &[("dialect", "native"), ("le", "16")]
        ) < depth,
        "some enqueue found more than 16 frames waiting"
    );
    drop(bob);

    // Closing the others brings the gauges back to zero; the opened counters stay.
    drop(ann);
    cat.close(None).await.unwrap();
    let m = scrape_until(&server, "every session closed", |m| {
        m.get("palaver_connections", &[("dialect", "native")]) == Some(0.0)
            && m.get("palaver_connections", &[("dialect", "rt-chat")]) == Some(0.0)
    })
    .await;
    assert_eq!(
        counter(
            &m,
            "palaver_connections_opened_total",
            &[("dialect", "native")]
        ),
        2.0
    );
    server.shutdown().await;
}
