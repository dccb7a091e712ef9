//! The event/data JSON dialect (seed 004) and its `*.php` REST against a real Palaver.
//!
//! - `events_dialect_with_ws_and_fetch` runs `gateway/tests/dialects/events.test.mjs` under
//!   `node --test`: the real npm `ws` client and Node's `fetch`/`FormData` against the server,
//!   which also has an `events` compat listener (`PALAVER_EVENTS_URL`). The file checks every
//!   frame, event, error string and REST call of the seed, the authorization cases, media
//!   through the upload service and, through `PALAVER_DATA_DIR`, that refused uploads leave no
//!   file behind. Needs Node.js (>= 20) and `npm ci --prefix gateway/tests/dialects`.
//! - The other tests speak to the socket with `tokio-tungstenite` and raw HTTP from Rust: the
//!   upgrade's refusals with their JSON bodies, `chat:connected` as the first frame, errors and
//!   `ping` on the socket, and a message from the REST route to a socket.
#![allow(clippy::unwrap_used)]

mod common;

use common::node_suite::run_node_suite;
use common::*;
use futures::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn events_dialect_with_ws_and_fetch() {
    let server =
        TestServer::start_with(|b| b.compat_listen = Some("events=127.0.0.1:0".into())).await;
    let compat = server.palaver.as_ref().unwrap().compat_addrs()[0];
    let env = [
        ("PALAVER_EVENTS_URL", format!("ws://{compat}")),
        (
            "PALAVER_DATA_DIR",
            server.dir.path().to_string_lossy().into_owned(),
        ),
    ];
    run_node_suite("dialects", &["ws"], "events.test.mjs", &server, &env).await;
    server.shutdown().await;
}

/// One raw HTTP/1.1 exchange: the status and the body parsed as JSON.
async fn http(addr: std::net::SocketAddr, request: String) -> (u16, Value) {
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    tcp.write_all(request.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    tokio::time::timeout(WAIT, tcp.read_to_end(&mut buf))
        .await
        .expect("an answer in time")
        .unwrap();
    let text = String::from_utf8(buf).unwrap();
    let status: u16 = text[9..12].parse().unwrap();
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
    (status, serde_json::from_str(body).unwrap_or(Value::Null))
}

fn upgrade_request(addr: std::net::SocketAddr, target: &str) -> String {
    format!(
        "GET {target} HTTP/1.1\r\nHost: {addr}\r\nConnection: Upgrade, close\r\nUpgrade: websocket\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
    )
}

/// The next text frame as JSON.
async fn frame(ws: &mut Ws) -> Value {
    loop {
        let m = tokio::time::timeout(WAIT, ws.next())
            .await
            .expect("a frame in time")
            .expect("open")
            .expect("no error");
        match m {
            Message::Text(t) => return serde_json::from_str(t.as_str()).unwrap(),
            Message::Ping(_) | Message::Pong(_) => continue,
            other => panic!("unexpected {other:?}"),
        }
    }
}

async fn open(url: &str, bearer: Option<&str>) -> Ws {
    let mut req = url.into_client_request().unwrap();
    if let Some(t) = bearer {
        req.headers_mut()
            .insert("authorization", format!("Bearer {t}").parse().unwrap());
    }
    tokio_tungstenite::connect_async(req).await.unwrap().0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upgrade_refusals_are_json() {
    let server = TestServer::start().await;
    let addr = server.addr;
    let (status, body) = http(addr, upgrade_request(addr, "/events?user_id=7")).await;
    assert_eq!(status, 401);
    assert_eq!(
        body,
        json!({"status": "error",
               "message": "missing token: send Authorization: Bearer <jwt> or ?token=<jwt>"})
    );
    let expired = token_with("7", 1);
    let (status, body) = http(
        addr,
        upgrade_request(addr, &format!("/events?token={expired}")),
    )
    .await;
    assert_eq!(status, 401);
    assert_eq!(
        body,
        json!({"status": "error", "message": "access token has expired"})
    );
    let (status, body) = http(
        addr,
        upgrade_request(addr, &format!("/events?token={}&user_id=8", token("7"))),
    )
    .await;
    assert_eq!(status, 403);
    assert_eq!(
        body,
        json!({"status": "error", "message": "user_id does not match the authenticated user"})
    );
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn socket_frames_and_a_rest_message() {
    let server = TestServer::start().await;
    // Bearer, and the seed's user_id (the token's own).
    let mut b = open(&server.url("/events?user_id=902"), Some(&token("902"))).await;
    let hello = frame(&mut b).await;
    assert_eq!(hello["event"], "chat:connected");
    assert_eq!(hello["data"]["user_id"], json!(902));
    assert_eq!(
        hello["data"]["message"],
        "Successfully connected to chat server"
    );
    assert_eq!(hello["data"]["connected_users"], json!(1));

    let mut a = open(
        &server.url(&format!("/events?token={}", token("901"))),
        None,
    )
    .await;
    let hello = frame(&mut a).await;
    assert_eq!(hello["data"]["user_id"], json!(901));
    assert_eq!(hello["data"]["connected_users"], json!(2));

    a.send(Message::text(r#"{"event":"ping"}"#)).await.unwrap();
    assert_eq!(frame(&mut a).await, json!({"event": "pong", "data": {}}));
    a.send(Message::text(
        r#"{"event":"chat:read","data":{"message_id":"zero"}}"#,
    ))
    .await
    .unwrap();
    assert_eq!(
        frame(&mut a).await,
        json!({"event": "chat:error", "data": {
            "message": "message_id must be a positive integer",
            "code": "invalid_field", "event": "chat:read"}})
    );

    // A text over the REST route, form-encoded with ?token=, reaches both sockets.
    let body = "sender_id=901&receiver_id=902&message=hi%20there";
    let req = format!(
        "POST /send_chat_message.php?token={} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\
         Content-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\n\r\n{body}",
        token("901"),
        body.len()
    );
    let (status, answer) = http(server.addr, req).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["status"], "success");
    assert_eq!(answer["message"], "Message sent successfully");
    let id = answer["data"]["message_id"].as_u64().unwrap();
    for ws in [&mut b, &mut a] {
        let ev = frame(ws).await;
        assert_eq!(ev["event"], "chat:message");
        let d = &ev["data"];
        assert_eq!(d["message_id"], json!(id));
        assert_eq!(d["sender_id"], json!(901));
        assert_eq!(d["receiver_id"], json!(902));
        assert_eq!(d["message_type"], "text");
        assert_eq!(d["message"], "hi there");
        assert_eq!(
            d["sender"],
            json!({"user_id": 901, "username": "user901", "name": "User 901", "profile_url": null})
        );
        assert_eq!(d["created_at"], answer["data"]["created_at"]);
    }
    // The reader's chat:read reaches the sender.
    b.send(Message::text(format!(
        r#"{{"event":"chat:read","data":{{"message_id":{id}}}}}"#
    )))
    .await
    .unwrap();
    let ev = frame(&mut a).await;
    assert_eq!(ev["event"], "chat:read");
    assert_eq!(ev["data"]["message_id"], json!(id));
    assert_eq!(ev["data"]["read_by"], json!(902));
    server.shutdown().await;
}
