//! Interop across every dialect, with the real clients of each (npm `phoenix`, `ws`,
//! `socket.io-client`): a message sent in each dialect reaches the users of every other dialect,
//! and all read the same history. The scenarios are in `gateway/tests/dialects/interop.test.mjs`.
//!
//! Needs Node.js (>= 20) and the npm packages of both test packages:
//! `npm ci --prefix gateway/tests/dialects` and `npm ci --prefix gateway/tests/socketio`.
#![allow(clippy::unwrap_used)]

mod common;

use common::node_suite::{package_dir, run_node_suite};
use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_dialect_reaches_every_other() {
    assert!(
        package_dir("socketio")
            .join("node_modules/socket.io-client")
            .is_dir(),
        "run `npm ci --prefix gateway/tests/socketio` first"
    );
    let server = TestServer::start_with(|b| b.messages_per_second = Some(1000)).await;
    run_node_suite(
        "dialects",
        &["phoenix", "ws", "socket.io-client"],
        "interop.test.mjs",
        &server,
        &[],
    )
    .await;
    server.shutdown().await;
}
