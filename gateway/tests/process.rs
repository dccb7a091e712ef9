//! The real `palaver` binary as a process: durability across `kill -9`, and SIGTERM drain.
#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use serde_json::json;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

struct Proc {
    child: Child,
    addr: String,
}

fn spawn(dir: &std::path::Path) -> Proc {
    let mut child = Command::new(env!("CARGO_BIN_EXE_palaver"))
        .arg("serve")
        .env("PALAVER_HTTP_ADDR", "127.0.0.1:0")
        .env("PALAVER_DATA_DIR", dir)
        .env("PALAVER_JWT_SECRET", SECRET)
        // The durability test sends as fast as it can; the rate limit is not under test.
        .env("PALAVER_MESSAGES_PER_SECOND", "100000")
        .env("PALAVER_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn palaver");
    let stdout = child.stdout.take().expect("stdout");
    // The first stdout line names the bound address (the read ends if the process dies).
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = BufReader::new(stdout).read_line(&mut line);
        let _ = tx.send(line);
    });
    let line = rx
        .recv_timeout(Duration::from_secs(30))
        .expect("palaver did not start");
    let addr = line
        .trim()
        .strip_prefix("listening on ")
        .expect("listening line")
        .to_owned();
    Proc { child, addr }
}

impl Proc {
    async fn connect(&self, sub: &str) -> Client {
        Client::connect(&format!("ws://{}/ws?token={}", self.addr, token(sub))).await
    }

    async fn wait_exit(&mut self, within: Duration) -> std::process::ExitStatus {
        let deadline = std::time::Instant::now() + within;
        loop {
            if let Some(st) = self.child.try_wait().expect("wait") {
                return st;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "palaver did not exit in time"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn all_texts(c: &mut Client, room: u64) -> Vec<String> {
    let mut out = Vec::new();
    let mut before: Option<u64> = None;
    loop {
        let mut q = json!({"room": room, "limit": 200});
        if let Some(b) = before {
            q["before"] = json!(b);
        }
        let d = c.ok("history", q).await;
        let msgs = d["messages"].as_array().expect("messages").clone();
        for m in &msgs {
            out.push(m["text"].as_str().expect("text").to_owned());
        }
        if d["has_more"] != true || msgs.is_empty() {
            break;
        }
        before = msgs.last().and_then(|m| m["id"].as_u64());
    }
    out
}

#[tokio::test]
async fn acknowledged_messages_survive_kill_9() {
    let dir = tempfile::tempdir().expect("tempdir");
    let p = spawn(dir.path());
    let mut owner = p.connect("1").await;
    let _peer = p.connect("2").await;
    let room = group(&mut owner, "durable", &["2"]).await;
    // Four concurrent senders (so commits are grouped), each waiting for every ack.
    let mut tasks = Vec::new();
    for t in 0..4 {
        let mut c = p.connect(if t % 2 == 0 { "1" } else { "2" }).await;
        tasks.push(tokio::spawn(async move {
            let mut acked = Vec::new();
            for n in 0..100 {
                let text = format!("t{t}-n{n}");
                c.ok(
                    "send",
                    json!({"room": room, "text": text, "client_ref": text}),
                )
                .await;
                acked.push(text);
            }
            acked
        }));
    }
    let mut acked = Vec::new();
    for t in tasks {
        acked.extend(t.await.expect("sender"));
    }
    // kill -9 right after the last acknowledgement.
    drop(p);
    let p = spawn(dir.path());
    let mut reader = p.connect("2").await;
    let mut stored = all_texts(&mut reader, room).await;
    stored.sort();
    acked.sort();
    assert_eq!(stored.len(), 400);
    assert_eq!(
        stored, acked,
        "every acknowledged message is in history after kill -9"
    );
    // The room goes on where it stopped: the next message is seq 401.
    let d = reader
        .ok("send", json!({"room": room, "text": "after restart"}))
        .await;
    assert_eq!(d["message"]["seq"], 401);
}

#[tokio::test]
async fn sigterm_drains_and_exits_zero() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut p = spawn(dir.path());
    let mut a = p.connect("1").await;
    let room = group(&mut a, "g", &[]).await;
    a.ok("send", json!({"room": room, "text": "before sigterm"}))
        .await;
    let status = Command::new("kill")
        .args(["-TERM", &p.child.id().to_string()])
        .status()
        .expect("kill");
    assert!(status.success());
    let (code, reason) = a.closed().await.expect("a close frame");
    assert_eq!(code, 1001, "{reason}");
    let st = p.wait_exit(Duration::from_secs(20)).await;
    assert_eq!(st.code(), Some(0), "exit status {st:?}");
    // Everything is there after a restart, and the WAL was checkpointed on the way out.
    let wal = dir.path().join("palaver.db-wal");
    assert!(!wal.exists() || std::fs::metadata(&wal).map(|m| m.len()).unwrap_or(0) == 0);
    let p = spawn(dir.path());
    let mut a = p.connect("1").await;
    assert_eq!(
        all_texts(&mut a, room).await,
        vec!["before sigterm".to_owned()]
    );
}

#[test]
fn token_subcommand_prints_only_a_token_signed_with_the_data_dir_secret() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = Command::new(env!("CARGO_BIN_EXE_palaver"))
        .args([
            "token",
            "--sub",
            "42",
            "--name",
            "Ann",
            "--username",
            "ann",
            "--ttl",
            "60",
        ])
        .env("PALAVER_DATA_DIR", dir.path())
        .env_remove("PALAVER_JWT_SECRET")
        .output()
        .expect("run token");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout).expect("utf8");
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 1, "{stdout}");
    assert_eq!(lines[0].split('.').count(), 3, "a JWT");
    // The secret was created in the data dir; a server using it accepts the token.
    let secret = palaver_gateway::auth::secret_from_data_dir(dir.path()).expect("secret");
    let auth = palaver_gateway::auth::Auth::new(
        &palaver_gateway::config::JwtKey::Secret(secret),
        dir.path(),
    )
    .expect("auth");
    let p = auth.verify(lines[0]).expect("valid token");
    assert_eq!(
        (p.id.as_str(), p.name.as_deref(), p.username.as_deref()),
        ("42", Some("Ann"), Some("ann"))
    );
}
