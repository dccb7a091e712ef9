//! Runs a `node:test` file of one of the npm test packages under `gateway/tests/<package>/`
//! against a running [`super::TestServer`], bounded in time, and requires exit status 0.
//!
//! The file gets the server as `PALAVER_URL` (`http://127.0.0.1:<port>`) and its HS256 secret
//! as `PALAVER_JWT_SECRET`, plus any `env` given, and mints its own tokens.

use super::{SECRET, TestServer};
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::process::Command;

/// Longest one test file may run.
pub const LIMIT: Duration = Duration::from_secs(120);

/// The directory of npm test package `package`.
pub fn package_dir(package: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests")
        .join(package)
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

/// Runs `file` of npm package `package` (which must have `modules` installed) against
/// `server`, prints node's report and panics unless every scenario passed.
pub async fn run_node_suite(
    package: &str,
    modules: &[&str],
    file: &str,
    server: &TestServer,
    env: &[(&str, String)],
) {
    let mut all = vec![("PALAVER_URL", server.http(""))];
    all.extend(env.iter().cloned());
    run_node_file(package, modules, file, &all).await;
}

/// Runs `file` of npm package `package` with `env` (which must give `PALAVER_URL` for the
/// packages' helpers) and the test secret, prints node's report and panics unless every
/// scenario passed. For files that start and stop servers themselves.
#[allow(dead_code)]
pub async fn run_node_file(package: &str, modules: &[&str], file: &str, env: &[(&str, String)]) {
    let dir = package_dir(package);
    for m in modules {
        assert!(
            dir.join("node_modules").join(m).is_dir(),
            "these tests need their npm packages: run \
             `npm ci --prefix gateway/tests/{package}` (from the repository root) first"
        );
    }
    let started = Instant::now();
    let mut cmd = Command::new("node");
    cmd.args([
        "--test",
        "--test-concurrency=1",
        "--test-reporter=spec",
        file,
    ])
    .current_dir(&dir)
    .env("PALAVER_JWT_SECRET", SECRET)
    .env("NO_COLOR", "1")
    .env("FORCE_COLOR", "0");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd
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
    println!(
        "---- node --test {package}/{file} ({:.1} s) ----\n{out}",
        started.elapsed().as_secs_f64()
    );
    if !err.trim().is_empty() {
        println!("---- stderr ----\n{err}");
    }
    match status {
        None => panic!("{file} did not finish within {LIMIT:?}"),
        Some(s) => assert!(s.success(), "{file} failed ({s}); node's report is above"),
    }
}
