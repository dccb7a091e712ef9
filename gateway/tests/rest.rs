//! The native REST routes share the node with the WebSocket protocol.
#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// One HTTP/1.1 request over a raw socket; returns (status, JSON body).
async fn http(
    s: &TestServer,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<&str>,
) -> (u16, Value) {
    let mut sock = tokio::net::TcpStream::connect(s.addr).await.unwrap();
    let auth = token
        .map(|t| format!("authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    let body = body.unwrap_or("");
    let req = format!(
        "{method} {path} HTTP/1.1\r\nhost: x\r\n{auth}content-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    sock.write_all(req.as_bytes()).await.unwrap();
    let mut out = String::new();
    sock.read_to_string(&mut out).await.unwrap();
    let status: u16 = out[9..12].parse().unwrap();
    let (head, rest) = out.split_once("\r\n\r\n").unwrap();
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        // Undo chunked encoding.
        let mut b = String::new();
        let mut r = rest;
        while let Some((len, tail)) = r.split_once("\r\n") {
            let n = usize::from_str_radix(len.trim(), 16).unwrap();
            if n == 0 {
                break;
            }
            b.push_str(&tail[..n]);
            r = &tail[n + 2..];
        }
        b
    } else {
        rest.to_owned()
    };
    (
        status,
        serde_json::from_str(&body).unwrap_or(Value::String(body)),
    )
}

#[tokio::test]
async fn rest_and_websocket_see_the_same_rooms() {
    let s = TestServer::start().await;
    let mut ws_b = s.connect("2").await;
    let _a = s.connect("1").await;
    let ta = s.token("1");
    let (st, body) = http(
        &s,
        "POST",
        "/v1/rooms/direct",
        Some(&ta),
        Some(r#"{"user":"2"}"#),
    )
    .await;
    assert_eq!(st, 201, "{body}");
    let room = body["room"]["id"].as_u64().unwrap();
    ws_b.event_named("room_joined").await;
    let (st, body) = http(
        &s,
        "POST",
        &format!("/v1/rooms/{room}/messages"),
        Some(&ta),
        Some(r#"{"text":"over http","client_ref":"h1"}"#),
    )
    .await;
    assert_eq!(st, 201, "{body}");
    assert_eq!(body["message"]["seq"], 1);
    let e = ws_b.event_named("message").await;
    assert_eq!(e["data"]["message"]["text"], "over http");
    let (st, body) = http(
        &s,
        "GET",
        &format!("/v1/rooms/{room}/messages?limit=10"),
        Some(&ta),
        None,
    )
    .await;
    assert_eq!(st, 200);
    assert_eq!(body["messages"][0]["text"], "over http");
    let (st, body) = http(&s, "GET", "/v1/rooms", Some(&ta), None).await;
    assert_eq!((st, body["rooms"][0]["id"].as_u64()), (200, Some(room)));
    // Errors: no token (before the body is even read), bad body, non-member, bad path.
    let (st, body) = http(&s, "POST", "/v1/rooms/direct", None, Some("{nope")).await;
    assert_eq!(
        (st, body["error"]["code"].as_str()),
        (401, Some("unauthorized"))
    );
    let (st, body) = http(&s, "POST", "/v1/rooms/direct", Some(&ta), Some("{nope")).await;
    assert_eq!(
        (st, body["error"]["code"].as_str()),
        (400, Some("malformed_json")),
        "{body}"
    );
    let (st, body) = http(
        &s,
        "POST",
        "/v1/rooms/direct",
        Some(&ta),
        Some(r#"{"usr":"2"}"#),
    )
    .await;
    assert_eq!(
        (st, body["error"]["code"].as_str()),
        (400, Some("invalid_field")),
        "{body}"
    );
    let tc = s.token("3");
    let (st, body) = http(
        &s,
        "GET",
        &format!("/v1/rooms/{room}/messages"),
        Some(&tc),
        None,
    )
    .await;
    assert_eq!(
        (st, body["error"]["code"].as_str()),
        (403, Some("not_member"))
    );
    let (st, _) = http(&s, "GET", "/v1/rooms/abc/messages", Some(&ta), None).await;
    assert_eq!(st, 400);
    let _ = json!({});
    s.shutdown().await;
}
