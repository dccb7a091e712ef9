//! The bad-input corpus (`tests/fixtures/bad-input/corpus.jsonl`, documented in its README):
//! every case is sent to a real server in its dialect, and must be answered with its precise
//! error; the session must survive every case (a bad frame is never a reason to close), and a
//! message acknowledged before the corpus ran is still there, once, afterwards.
#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use futures::{SinkExt, StreamExt};
use serde_json::{Value, json};
use std::time::Duration;
use tokio_tungstenite::tungstenite::Message;

const CORPUS: &str = include_str!("fixtures/bad-input/corpus.jsonl");

fn cases(dialect: &str) -> Vec<Value> {
    CORPUS
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter(|c| c["dialect"] == dialect)
        .collect()
}

/// The case's input with `$ROOM`, `$PAD` and `$TOKEN` filled in.
fn input(case: &Value, room: u64) -> String {
    let pad = "x".repeat(case["pad"].as_u64().unwrap_or(0) as usize);
    case["send"]
        .as_str()
        .unwrap()
        .replace("$ROOM", &room.to_string())
        .replace("$PAD", &pad)
        .replace("$TOKEN", &token("1"))
}

/// Whether `answer` is what the case expects; the expectation, for the failure message.
fn matches(case: &Value, answer: &str) -> bool {
    if let Some(any) = case["expect_any"].as_array() {
        return any.iter().any(|e| answer.contains(e.as_str().unwrap()));
    }
    answer.contains(case["expect"].as_str().unwrap())
}

/// The next text frame for which `relevant` holds, skipping the others (events).
async fn answer(ws: &mut Ws, relevant: impl Fn(&str) -> bool) -> Option<String> {
    loop {
        let m = tokio::time::timeout(Duration::from_secs(5), ws.next())
            .await
            .ok()??
            .ok()?;
        match m {
            Message::Text(t) if relevant(t.as_str()) => return Some(t.as_str().to_owned()),
            Message::Close(_) => return None,
            _ => {}
        }
    }
}

/// Frames sent as they are.
fn plain(text: String, _: usize) -> String {
    text
}

/// Reads whatever arrives within 300 ms (greetings, presence) and drops it.
async fn settle(ws: &mut Ws) {
    while let Ok(Some(_)) = tokio::time::timeout(Duration::from_millis(300), ws.next()).await {}
}

async fn run_ws_cases(
    dialect: &str,
    ws: &mut Ws,
    room: u64,
    relevant: impl Fn(&str) -> bool + Copy,
    wrap: impl Fn(String, usize) -> String,
    failures: &mut Vec<String>,
) -> usize {
    let list = cases(dialect);
    for (i, case) in list.iter().enumerate() {
        let text = wrap(input(case, room), i);
        let msg = if case["binary"] == true {
            Message::binary(text.into_bytes())
        } else {
            Message::text(text)
        };
        ws.send(msg).await.unwrap();
        match answer(ws, relevant).await {
            Some(a) if matches(case, &a) => {}
            Some(a) => failures.push(format!(
                "{dialect}: {}: expected {} in {}",
                case["why"],
                case.get("expect_any").unwrap_or(&case["expect"]),
                a.chars().take(300).collect::<String>()
            )),
            None => failures.push(format!(
                "{dialect}: {}: no answer (the session ended)",
                case["why"]
            )),
        }
    }
    list.len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_bad_input_gets_its_precise_error_and_loses_nothing() {
    let server = TestServer::start_with(|b| {
        b.messages_per_second = Some(1000);
        b.typing_per_second = Some(1000);
    })
    .await;
    let mut failures = Vec::new();
    let mut total = 0;

    // A conversation with a message acknowledged before any bad input.
    let mut one = server.connect("1").await;
    let mut two = server.connect("2").await;
    two.ok("ping", json!({})).await;
    let room = group(&mut one, "corpus", &["2"]).await;
    let before = one
        .ok(
            "send",
            json!({"room": room, "text": "before", "client_ref": "before"}),
        )
        .await;

    // Native.
    let (mut ws, _) =
        tokio_tungstenite::connect_async(format!("{}?token={}", server.url("/ws"), token("1")))
            .await
            .unwrap();
    settle(&mut ws).await;
    total += run_ws_cases(
        "native",
        &mut ws,
        room,
        |t| t.contains("\"type\":\"reply\""),
        plain,
        &mut failures,
    )
    .await;
    ws.send(Message::text(r#"{"id":"probe","op":"ping"}"#))
        .await
        .unwrap();
    let probe = answer(&mut ws, |t| t.contains("probe")).await;
    assert!(
        probe.as_deref().is_some_and(|p| p.contains("\"ok\":true")),
        "native session did not survive: {probe:?}"
    );

    // Type-tagged.
    let (mut ws, _) = tokio_tungstenite::connect_async(server.url("/rt/chat"))
        .await
        .unwrap();
    ws.send(Message::text(
        json!({"type": "AUTH", "token": token("1")}).to_string(),
    ))
    .await
    .unwrap();
    settle(&mut ws).await;
    total += run_ws_cases(
        "rt",
        &mut ws,
        room,
        |t| t.contains("\"type\":\"ERROR\"") || t.contains("\"type\":\"INFO\""),
        plain,
        &mut failures,
    )
    .await;
    ws.send(Message::text(r#"{"type":"PROBE"}"#)).await.unwrap();
    let probe = answer(&mut ws, |t| t.contains("PROBE")).await;
    assert!(probe.is_some(), "type-tagged session did not survive");

    // Event/data.
    let (mut ws, _) =
        tokio_tungstenite::connect_async(format!("{}?token={}", server.url("/events"), token("1")))
            .await
            .unwrap();
    settle(&mut ws).await;
    total += run_ws_cases(
        "events",
        &mut ws,
        room,
        |t| t.contains("chat:error"),
        plain,
        &mut failures,
    )
    .await;
    ws.send(Message::text(r#"{"event":"ping","data":{}}"#))
        .await
        .unwrap();
    let probe = answer(&mut ws, |t| t.contains("pong")).await;
    assert!(probe.is_some(), "event/data session did not survive");

    // Phoenix.
    let (mut ws, _) = tokio_tungstenite::connect_async(format!(
        "{}?vsn=2.0.0&token={}",
        server.url("/socket/websocket"),
        token("1")
    ))
    .await
    .unwrap();
    settle(&mut ws).await;
    total += run_ws_cases("phoenix", &mut ws, room, |_| true, plain, &mut failures).await;
    ws.send(Message::text(r#"[null,"probe","phoenix","heartbeat",{}]"#))
        .await
        .unwrap();
    let probe = answer(&mut ws, |t| t.contains("probe")).await;
    assert!(
        probe.as_deref().is_some_and(|p| p.contains("\"ok\"")),
        "Phoenix session did not survive: {probe:?}"
    );

    // Socket.IO, NotifyHub (namespace /chats, token in the query): raw Engine.IO v4 frames; an
    // error comes back as the `error` event.
    let (mut ws, _) = tokio_tungstenite::connect_async(format!(
        "{}?EIO=4&transport=websocket&access_token={}",
        server.url("/socket.io/"),
        token("1")
    ))
    .await
    .unwrap();
    assert!(answer(&mut ws, |t| t.starts_with('0')).await.is_some());
    ws.send(Message::text("40/chats,")).await.unwrap();
    assert!(
        answer(&mut ws, |t| t.starts_with("40/chats,"))
            .await
            .is_some(),
        "NotifyHub namespace connect"
    );
    total += run_ws_cases(
        "notifyhub",
        &mut ws,
        room,
        |t| t.starts_with("42/chats,[\"error\""),
        |event, _| format!("42/chats,{event}"),
        &mut failures,
    )
    .await;

    // Socket.IO, Syarah (namespace /, token in the auth payload): each event with an ack id;
    // the error comes back in the ack.
    let (mut ws, _) = tokio_tungstenite::connect_async(format!(
        "{}?EIO=4&transport=websocket",
        server.url("/socket.io/")
    ))
    .await
    .unwrap();
    assert!(answer(&mut ws, |t| t.starts_with('0')).await.is_some());
    ws.send(Message::text(format!("40{}", json!({"token": token("1")}))))
        .await
        .unwrap();
    assert!(
        answer(&mut ws, |t| t.starts_with("40{")).await.is_some(),
        "Syarah namespace connect"
    );
    total += run_ws_cases(
        "syarah",
        &mut ws,
        room,
        |t| t.starts_with("43"),
        |event, i| format!("42{}{event}", i + 1),
        &mut failures,
    )
    .await;

    // HTTP.
    let http = reqwest::Client::new();
    for case in cases("http") {
        let path = input(&json!({"send": case["path"]}), room);
        let method = case["method"].as_str().unwrap().parse().unwrap();
        let mut req = http.request(method, server.http(&path));
        match &case["auth"] {
            Value::Bool(true) => req = req.bearer_auth(token("1")),
            Value::String(_) => req = req.bearer_auth("x.y.z"),
            _ => {}
        }
        if let Some(ct) = case["content_type"].as_str() {
            req = req.header("content-type", ct);
        }
        let r = req.body(input(&case, room)).send().await.unwrap();
        let status = r.status().as_u16();
        let body = r.text().await.unwrap();
        if Some(u64::from(status)) != case["status"].as_u64() || !matches(&case, &body) {
            failures.push(format!(
                "http: {}: expected {} with {}, got {status} {}",
                case["why"],
                case["status"],
                case["expect"],
                body.chars().take(300).collect::<String>()
            ));
        }
        total += 1;
    }

    // Nothing acknowledged was lost or doubled.
    let history = one.ok("history", json!({"room": room, "limit": 50})).await;
    let texts: Vec<&str> = history["messages"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|m| m["text"].as_str())
        .collect();
    assert_eq!(
        texts.iter().filter(|t| **t == "before").count(),
        1,
        "the message acknowledged before the corpus: {history}"
    );
    assert!(before["message"]["id"].is_u64());

    eprintln!(
        "bad-input corpus: {total} cases, {} failures",
        failures.len()
    );
    assert!(
        failures.is_empty(),
        "{} of {total} cases failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
    assert_eq!(
        total,
        CORPUS.lines().filter(|l| !l.trim().is_empty()).count()
    );
    server.shutdown().await;
}
