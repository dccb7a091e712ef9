//! Lifecycle: drain on SIGTERM, each dialect's clients told to reconnect elsewhere (driven by
//! the real socket.io-client and phoenix.js in `dialects/lifecycle.test.mjs`), and readiness
//! following the store.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
#[path = "../../node/tests/support/pg.rs"]
mod pg;

use common::node_suite::run_node_file;
use std::time::{Duration, Instant};

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_tells_every_dialect_to_reconnect_and_the_clients_do() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    run_node_file(
        "dialects",
        &["phoenix", "ws", "socket.io-client"],
        "lifecycle.test.mjs",
        &[
            ("PALAVER_URL", format!("http://127.0.0.1:{port}")),
            ("PALAVER_BIN", env!("CARGO_BIN_EXE_palaver").to_owned()),
            ("PALAVER_DATA_DIR", dir.path().display().to_string()),
        ],
    )
    .await;
}

/// `GET /readyz` of `addr`: status and body.
async fn readyz(addr: &str) -> (u16, String) {
    let r = reqwest::get(format!("http://{addr}/readyz")).await.unwrap();
    (r.status().as_u16(), r.text().await.unwrap())
}

/// Polls `/readyz` until `pred` holds, for up to 10 s; returns the last answer.
async fn ready_until(addr: &str, pred: impl Fn(u16, &str) -> bool) -> (u16, String) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (status, body) = readyz(addr).await;
        if pred(status, &body) || Instant::now() > deadline {
            return (status, body);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_follows_the_store() {
    let pg = pg::TestPostgres::start();
    let url = pg.database();
    let server = common::TestServer::start_with(|b| b.postgres_url = Some(url.clone())).await;
    let addr = server.http("").trim_start_matches("http://").to_owned();
    assert_eq!(readyz(&addr).await, (200, "ready".to_owned()));
    pg.stop();
    let (status, body) = ready_until(&addr, |s, _| s == 503).await;
    assert_eq!(status, 503, "{body}");
    assert!(body.starts_with("store unreachable"), "{body}");
    pg.restart();
    let (status, body) = ready_until(&addr, |s, _| s == 200).await;
    assert_eq!((status, body.as_str()), (200, "ready"));
    server.shutdown().await;
}
