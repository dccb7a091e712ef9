//! The type-tagged JSON dialect (seed 003) against a real Palaver: `/rt/chat`, `/rt/presence`
//! and the compat listeners `rt-chat`/`rt-presence` at `/`.
//!
//! The scenarios with several clients are `gateway/tests/dialects/rt.test.mjs`, run with the npm
//! `ws` client under `node --test` (every client frame, event and error; authorization;
//! presence; compat listeners). The cases about time and shutdown, which need the server in
//! hand, are here with a raw `tokio-tungstenite` client.
//!
//! Needs Node.js (>= 20) and the npm packages: `npm ci --prefix gateway/tests/dialects`.
#![allow(clippy::unwrap_used)]

mod common;

use common::node_suite::run_node_suite;
use common::*;
use futures::{SinkExt, StreamExt};
use palaver_gateway::dialect::rt::AUTH_WAIT;
use serde_json::{Value, json};
use std::time::{Duration, Instant};
use tokio_tungstenite::tungstenite::Message;

/// The admin token the node tests import their users with.
const ADMIN: &str = "rt-admin-token-0123456789";

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rt_dialect_with_ws_clients() {
    let server = TestServer::start_with(|b| {
        b.compat_listen = Some("rt-chat=127.0.0.1:0,rt-presence=127.0.0.1:0".into());
        b.admin_token = Some(ADMIN.into());
    })
    .await;
    let compat = server.palaver.as_ref().unwrap().compat_addrs();
    assert_eq!(compat.len(), 2);
    let env = [
        ("PALAVER_RT_CHAT_URL", format!("ws://{}/", compat[0])),
        ("PALAVER_RT_PRESENCE_URL", format!("ws://{}/", compat[1])),
        ("PALAVER_ADMIN_TOKEN", ADMIN.to_owned()),
    ];
    run_node_suite("dialects", &["ws"], "rt.test.mjs", &server, &env).await;
    server.shutdown().await;
}

/// The next text frame, as JSON.
async fn frame(ws: &mut Ws, wait: Duration) -> Value {
    loop {
        let m = tokio::time::timeout(wait, ws.next())
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

/// The code of the close frame that ends the connection.
async fn close_code(ws: &mut Ws) -> Option<u16> {
    loop {
        match tokio::time::timeout(WAIT, ws.next())
            .await
            .expect("no close in time")
        {
            Some(Ok(Message::Close(Some(f)))) => return Some(f.code.into()),
            Some(Ok(Message::Close(None))) | None | Some(Err(_)) => return None,
            Some(Ok(_)) => continue,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_socket_is_closed_after_the_auth_timeout() {
    let server = TestServer::start().await;
    let (mut ws, _) = tokio_tungstenite::connect_async(server.url("/rt/chat"))
        .await
        .unwrap();
    let started = Instant::now();
    let err = frame(&mut ws, AUTH_WAIT + Duration::from_secs(5)).await;
    let waited = started.elapsed();
    assert_eq!(
        err,
        json!({"type": "ERROR", "msg": "authentication timeout"})
    );
    assert!(
        waited >= AUTH_WAIT - Duration::from_millis(500),
        "closed after {waited:?}, before the {AUTH_WAIT:?} allowed"
    );
    assert_eq!(close_code(&mut ws).await, Some(4001));
    assert_eq!(server.sessions(), 0, "nothing was registered");
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_closes_sockets_waiting_for_auth_and_authenticated_ones() {
    let server = TestServer::start().await;
    let (mut waiting, _) = tokio_tungstenite::connect_async(server.url("/rt/presence"))
        .await
        .unwrap();
    let (mut chat, _) = tokio_tungstenite::connect_async(server.url("/rt/chat"))
        .await
        .unwrap();
    let auth = json!({"type": "AUTH", "token": token("7")}).to_string();
    chat.send(Message::text(auth)).await.unwrap();
    assert_eq!(
        frame(&mut chat, WAIT).await,
        json!({"type": "SUCCESS", "msg": "Authenticated as user7"})
    );
    assert_eq!(server.sessions(), 1);
    let started = Instant::now();
    let stop = tokio::spawn(server.shutdown());
    assert_eq!(
        frame(&mut waiting, WAIT).await,
        json!({"type": "ERROR", "msg": "server shutting down; reconnect"})
    );
    assert_eq!(close_code(&mut waiting).await, Some(1001));
    assert_eq!(close_code(&mut chat).await, Some(1001));
    stop.await.unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "shutdown waited {:?} for a socket that never authenticated",
        started.elapsed()
    );
}
