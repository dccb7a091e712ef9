//! The Socket.IO dialects against a real Palaver, driven by the real `socket.io-client` in Node:
//! NotifyHub (namespace `/chats`, seed 000), Syarah (namespace `/`, seed 001) and their interop
//! with each other and with the native protocol. The scenarios are the `node:test` files in
//! `gateway/tests/socketio/`; each test here starts a server, runs one file with
//! `node --test --test-concurrency=1` (bounded by `common::node_suite::LIMIT`), prints its report and requires
//! exit status 0. The files get the server as `PALAVER_URL` and its HS256 secret as
//! `PALAVER_JWT_SECRET`, and mint their own tokens (valid, expired, wrongly signed).
//!
//! Needs Node.js (>= 20) and the npm packages: `npm ci --prefix gateway/tests/socketio`.
#![allow(clippy::unwrap_used)]

mod common;

use common::node_suite::run_node_suite;
use common::*;

/// Starts a server, runs `file` against it and asserts that every scenario passed.
async fn run(file: &str) {
    let server = TestServer::start().await;
    run_node_suite("socketio", &["socket.io-client", "ws"], file, &server, &[]).await;
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn notifyhub() {
    run("notifyhub.test.mjs").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn syarah() {
    run("syarah.test.mjs").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn interop() {
    run("interop.test.mjs").await;
}
