//! The Phoenix Channels dialect (seed 002, `/socket/websocket`) against a real Palaver.
//!
//! `phoenix_js` runs `gateway/tests/dialects/phoenix.test.mjs` with the real npm `phoenix` 1.8
//! client (needs Node.js >= 20 and `npm ci --prefix gateway/tests/dialects`). The other tests
//! speak raw V2 frames with `tokio_tungstenite`, for what phoenix.js never sends: malformed
//! frames, binary and oversized frames, stale leaves, hand-made subprotocols.
#![allow(clippy::unwrap_used)]

mod common;

use common::node_suite::run_node_suite;
use common::*;
use futures::SinkExt;
use serde_json::{Value, json};
use std::time::Duration;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn phoenix_js() {
    let server = TestServer::start().await;
    run_node_suite(
        "dialects",
        &["phoenix", "ws"],
        "phoenix.test.mjs",
        &server,
        &[],
    )
    .await;
    server.shutdown().await;
}

/// A raw V2 client of `sub`.
async fn phx(s: &TestServer, sub: &str) -> Client {
    let url = format!(
        "{}?vsn=2.0.0&token={}",
        s.url("/socket/websocket"),
        token(sub)
    );
    Client::connect(&url).await
}

/// Sends one V2 frame.
async fn push(c: &mut Client, frame: Value) {
    c.send_text(frame.to_string()).await;
}

/// Status and body of an upgrade request to `url` with extra headers.
async fn upgrade(url: &str, headers: &[(&'static str, &str)]) -> (u16, Option<String>, String) {
    let mut req = url.into_client_request().unwrap();
    for (k, v) in headers {
        req.headers_mut().insert(*k, v.parse().unwrap());
    }
    match tokio_tungstenite::connect_async(req).await {
        Ok((_, resp)) => {
            let proto = resp
                .headers()
                .get("sec-websocket-protocol")
                .map(|v| v.to_str().unwrap().to_owned());
            (resp.status().as_u16(), proto, String::new())
        }
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
            let body = resp
                .body()
                .as_ref()
                .map(|b| String::from_utf8_lossy(b).into_owned())
                .unwrap_or_default();
            (resp.status().as_u16(), None, body)
        }
        Err(e) => panic!("{e}"),
    }
}

#[tokio::test]
async fn connects_are_refused_before_the_upgrade() {
    let s = TestServer::start().await;
    let ep = s.url("/socket/websocket");
    let t = token("1");
    let (st, _, body) = upgrade(&format!("{ep}?token={t}"), &[]).await;
    assert_eq!(st, 400, "{body}");
    assert!(body.contains("missing vsn"), "{body}");
    let (st, _, body) = upgrade(&format!("{ep}?vsn=1.0.0&token={t}"), &[]).await;
    assert_eq!(st, 400);
    assert!(body.contains(r#"unsupported vsn \"1.0.0\""#), "{body}");
    let (st, _, body) = upgrade(&format!("{ep}?vsn=2.0.0"), &[]).await;
    assert_eq!(st, 403);
    assert!(body.contains("missing token"), "{body}");
    let (st, _, body) = upgrade(&format!("{ep}?vsn=2.0.0&token=garbage"), &[]).await;
    assert_eq!(st, 403);
    assert!(body.contains("access token is invalid"), "{body}");
    let expired = token_with("1", palaver_gateway::auth::now_secs() - 3600);
    let (st, _, body) = upgrade(&format!("{ep}?vsn=2.0.0&token={expired}"), &[]).await;
    assert_eq!(st, 403);
    assert!(body.contains("access token has expired"), "{body}");
    let (st, _, body) = upgrade(
        &format!("{ep}?vsn=2.0.0&token={t}&preferred_language=english%20please"),
        &[],
    )
    .await;
    assert_eq!(st, 400);
    assert!(body.contains("preferred_language must be"), "{body}");
    let long = "d".repeat(129);
    let (st, _, body) = upgrade(
        &format!("{ep}?vsn=2.0.0&token={t}&device_unique_id={long}"),
        &[],
    )
    .await;
    assert_eq!(st, 400);
    assert!(body.contains("device_unique_id must be"), "{body}");
    let (st, _, body) = upgrade(
        &format!("{ep}?vsn=2.0.0"),
        &[(
            "sec-websocket-protocol",
            "phoenix, base64url.bearer.phx.***",
        )],
    )
    .await;
    assert_eq!(st, 403);
    assert!(body.contains("not valid base64"), "{body}");
    assert_eq!(s.sessions(), 0, "no session was opened");
    s.shutdown().await;
}

#[tokio::test]
async fn auth_token_subprotocol_in_either_alphabet() {
    use base64::Engine as _;
    let s = TestServer::start().await;
    let ep = format!("{}?vsn=2.0.0", s.url("/socket/websocket"));
    let t = token("7");
    for engine in [
        base64::engine::general_purpose::STANDARD_NO_PAD,
        base64::engine::general_purpose::STANDARD,
        base64::engine::general_purpose::URL_SAFE_NO_PAD,
    ] {
        let offered = format!("phoenix, base64url.bearer.phx.{}", engine.encode(&t));
        let (st, proto, body) = upgrade(&ep, &[("sec-websocket-protocol", &offered)]).await;
        assert_eq!(st, 101, "{offered}: {body}");
        assert_eq!(proto.as_deref(), Some("phoenix"));
    }
    // The params token needs no subprotocol, and none is answered.
    let (st, proto, _) = upgrade(&format!("{ep}&token={t}"), &[]).await;
    assert_eq!((st, proto), (101, None));
    s.shutdown().await;
}

#[tokio::test]
async fn malformed_binary_and_oversized_frames_are_answered_and_the_socket_survives() {
    let s = TestServer::start_with(|b| b.max_frame_bytes = Some(4096)).await;
    let mut c = phx(&s, "1").await;
    let socket_error = |f: &Value| {
        assert_eq!(f[0], Value::Null, "{f}");
        assert_eq!(f[1], Value::Null, "{f}");
        assert_eq!(f[2], "phoenix", "{f}");
        assert_eq!(f[3], "phx_error", "{f}");
        f[4]["reason"].as_str().unwrap().to_owned()
    };
    c.send_text("{not json".into()).await;
    let r = socket_error(&c.frame().await);
    assert!(r.starts_with("malformed frame: not JSON ("), "{r}");
    push(&mut c, json!({"topic": "phoenix"})).await;
    assert_eq!(
        socket_error(&c.frame().await),
        "malformed frame: expected a JSON array [join_ref, ref, topic, event, payload]"
    );
    push(&mut c, json!(["1", "2", "phoenix", "heartbeat"])).await;
    assert_eq!(
        socket_error(&c.frame().await),
        "malformed frame: expected 5 elements [join_ref, ref, topic, event, payload]"
    );
    push(&mut c, json!(["1", "2", "chat:1", 5, {}])).await;
    assert_eq!(
        c.frame().await,
        json!(["1", "2", "chat:1", "phx_reply", {"status": "error", "response": {
            "reason": "malformed frame: event must be a non-empty string of at most 255 bytes"}}])
    );
    push(&mut c, json!([null, "3", "chat:1", "phx_join", []])).await;
    assert_eq!(
        c.frame().await,
        json!([null, "3", "chat:1", "phx_reply", {"status": "error", "response": {
            "reason": "malformed frame: payload must be a JSON object"}}])
    );
    c.ws.send(Message::binary(vec![0u8, 1, 2])).await.unwrap();
    let r = socket_error(&c.frame().await);
    assert!(r.starts_with("binary frames are not accepted"), "{r}");
    let big = json!([null, "4", "phoenix", "heartbeat", {"pad": "x".repeat(10_000)}]);
    push(&mut c, big).await;
    let r = socket_error(&c.frame().await);
    assert!(r.contains("exceeds the 4096-byte limit"), "{r}");
    // Still open and answering.
    push(&mut c, json!([null, 5, "phoenix", "heartbeat", {}])).await;
    assert_eq!(
        c.frame().await,
        json!([null, 5, "phoenix", "phx_reply", {"status": "ok", "response": {}}])
    );
    s.shutdown().await;
}

#[tokio::test]
async fn joins_leaves_and_pushes_follow_phoenix() {
    let s = TestServer::start().await;
    // User 2 speaks the native protocol; user 1 Phoenix.
    let mut native = s.connect("2").await;
    let mut c = phx(&s, "1").await;
    let d = native.ok("open_direct", json!({"user": "1"})).await;
    let room = d["room"]["id"].as_u64().unwrap();
    let topic = format!("chat:{room}");

    // A push to a topic not joined, and a join of a topic nobody serves.
    push(
        &mut c,
        json!(["1", "1", topic, "send_message", {"content": "x", "mobile_ref_id": 1}]),
    )
    .await;
    assert_eq!(
        c.frame().await,
        json!([null, "1", topic, "phx_reply",
            {"status": "error", "response": {"reason": "unmatched topic"}}])
    );
    push(&mut c, json!(["2", "2", "rooms:lobby", "phx_join", {}])).await;
    assert_eq!(
        c.frame().await,
        json!([null, "2", "rooms:lobby", "phx_reply",
            {"status": "error", "response": {"reason": "unmatched topic"}}])
    );
    push(&mut c, json!(["3", "3", "chat:abc", "phx_join", {}])).await;
    assert_eq!(
        c.frame().await,
        json!(["3", "3", "chat:abc", "phx_reply",
            {"status": "error", "response": {"reason": "not_found"}}])
    );

    // Join, then join again: the old join is closed first.
    push(&mut c, json!(["4", "4", topic, "phx_join", {}])).await;
    assert_eq!(
        c.frame().await,
        json!(["4", "4", topic, "phx_reply", {"status": "ok", "response": {}}])
    );
    push(
        &mut c,
        json!(["5", "5", topic, "phx_join", {"ignored": true}]),
    )
    .await;
    assert_eq!(c.frame().await, json!(["4", "4", topic, "phx_close", {}]));
    assert_eq!(
        c.frame().await,
        json!(["5", "5", topic, "phx_reply", {"status": "ok", "response": {}}])
    );

    // A leave of the old join is answered but leaves the current join alone.
    push(&mut c, json!(["4", "6", topic, "phx_leave", {}])).await;
    assert_eq!(
        c.frame().await,
        json!(["4", "6", topic, "phx_reply", {"status": "ok", "response": {}}])
    );
    native
        .ok(
            "send",
            json!({"room": room, "text": "from native", "client_ref": "n1"}),
        )
        .await;
    assert_eq!(
        c.frame().await,
        json!(["5", null, topic, "receive_message",
            {"chat_id": room.to_string(), "content": "from native", "sender_id": "2"}])
    );

    // An unknown event on a joined channel.
    push(&mut c, json!(["5", "7", topic, "shout", {}])).await;
    assert_eq!(
        c.frame().await,
        json!(["5", "7", topic, "phx_reply",
            {"status": "error", "response": {"reason": "unknown event"}}])
    );

    // send_message: the reply, then message_sent; the native peer sees the message.
    push(
        &mut c,
        json!(["5", "8", topic, "send_message", {"content": "from phoenix", "mobile_ref_id": "m1"}]),
    )
    .await;
    let reply = c.frame().await;
    assert_eq!(reply[3], "phx_reply", "{reply}");
    assert_eq!(reply[4]["status"], "ok", "{reply}");
    let id = reply[4]["response"]["message_id"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(
        reply,
        json!(["5", "8", topic, "phx_reply", {"status": "ok", "response":
            {"mobile_ref_id": "m1", "chat_id": room.to_string(), "message_id": id}}])
    );
    assert_eq!(
        c.frame().await,
        json!(["5", null, topic, "message_sent",
            {"mobile_ref_id": "m1", "status": "sent", "chat_id": room.to_string()}])
    );
    let ev = loop {
        let ev = native.event_named("message").await;
        if ev["data"]["message"]["text"] != "from native" {
            break ev;
        }
    };
    assert_eq!(ev["data"]["message"]["text"], "from phoenix");
    assert_eq!(ev["data"]["message"]["id"].to_string(), id);
    assert_eq!(ev["data"]["message"]["sender"], "1");
    // Not echoed to the sending socket.
    c.no_event_within(Duration::from_millis(300)).await;

    // Leave the current join: ok, then phx_close.
    push(&mut c, json!(["5", "9", topic, "phx_leave", {}])).await;
    assert_eq!(
        c.frame().await,
        json!(["5", "9", topic, "phx_reply", {"status": "ok", "response": {}}])
    );
    assert_eq!(c.frame().await, json!(["5", "5", topic, "phx_close", {}]));
    // Now a push is an unmatched topic again, and nothing of the room is shown.
    native
        .ok("send", json!({"room": room, "text": "unseen"}))
        .await;
    push(
        &mut c,
        json!(["5", "10", topic, "send_message", {"content": "x", "mobile_ref_id": 2}]),
    )
    .await;
    assert_eq!(
        c.frame().await,
        json!([null, "10", topic, "phx_reply",
            {"status": "error", "response": {"reason": "unmatched topic"}}])
    );
    s.shutdown().await;
}
