//! The Socket.IO dialects against a real Palaver, driven by the real `socket.io-client` in Node:
//! NotifyHub (namespace `/chats`, seed 000), Syarah (namespace `/`, seed 001) and their interop
//! with each other and with the native protocol. The scenarios are the `node:test` files in
//! `gateway/tests/socketio/`; each test here starts a server, runs one file with
//! `node --test --test-concurrency=1` (bounded by [`LIMIT`]), prints its report and requires
//! exit status 0. The files get the server as `PALAVER_URL` and its HS256 secret as
//! `PALAVER_JWT_SECRET`, and mint their own tokens (valid, expired, wrongly signed).
//!
//! Needs Node.js (>= 20) and the npm packages: `npm ci --prefix gateway/tests/socketio`.
#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::process::Command;

/// Longest one test file may run.
const LIMIT: Duration = Duration::from_secs(120);

fn suite_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/socketio")
}

/// Reads a pipe to its end in the background.
fn drain(pipe: Option<impl AsyncRead + Unpin + Send + 'static>) -> tokio::task::JoinHandle<String> {
    tokio::spawn(async move {
        let mut buf = Vec::new();
        if let Some(mut p) = pipe {
            let _ = p.read_to_end(&mut buf).await;
        }
        String::from_utf8_lossy(&buf).into_owned()
    })
}

/// Kills the whole process group of `pid` (`node --test` runs each file in a child process).
async fn kill_group(pid: u32) {
    let _ = Command::new("kill")
        .args(["-s", "KILL", "--", &format!("-{pid}")])
        .status()
        .await;
}

/// Starts a server, runs `file` against it and asserts that every scenario passed.
async fn run(file: &str) {
    let dir = suite_dir();
    assert!(
        dir.join("node_modules/socket.io-client").is_dir() && dir.join("node_modules/ws").is_dir(),
        "the Socket.IO tests need their npm packages: run \
         `npm ci --prefix gateway/tests/socketio` (from the repository root) first"
    );
    let server = TestServer::start().await;
    let started = Instant::now();
    let mut child = Command::new("node")
        .args([
            "--test",
            "--test-concurrency=1",
            "--test-reporter=spec",
            file,
        ])
        .current_dir(&dir)
        .env("PALAVER_URL", server.http(""))
        .env("PALAVER_JWT_SECRET", SECRET)
        .env("NO_COLOR", "1")
        .env("FORCE_COLOR", "0")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run `node` (Node.js >= 20 is required): {e}"));
    let pid = child.id().unwrap();
    let stdout = drain(child.stdout.take());
    let stderr = drain(child.stderr.take());
    let status = match tokio::time::timeout(LIMIT, child.wait()).await {
        Ok(status) => Some(status.unwrap()),
        Err(_) => {
            kill_group(pid).await;
            let _ = child.wait().await;
            None
        }
    };
    // The pipes close once every process of the group is gone; kill stragglers after a grace.
    let grace = Duration::from_secs(5);
    let out = match tokio::time::timeout(grace, stdout).await {
        Ok(o) => o.unwrap(),
        Err(_) => {
            kill_group(pid).await;
            String::from("(stdout not closed: stray processes killed)")
        }
    };
    let err = match tokio::time::timeout(grace, stderr).await {
        Ok(e) => e.unwrap(),
        Err(_) => String::from("(stderr not closed)"),
    };
    let elapsed = started.elapsed();
    println!(
        "---- node --test {file} ({:.1} s) ----\n{out}",
        elapsed.as_secs_f64()
    );
    if !err.trim().is_empty() {
        println!("---- stderr ----\n{err}");
    }
    server.shutdown().await;
    match status {
        None => panic!("{file} did not finish within {LIMIT:?}"),
        Some(s) => assert!(s.success(), "{file} failed ({s}); node's report is above"),
    }
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
