//! Randomized fault runs against the single-process `palaver serve` (the real binary, embedded
//! store): concurrent senders in a group and a direct room, each retrying with its `client_ref`
//! whenever its connection breaks or a reply does not come, while faults drawn from a seeded RNG
//! hit the process: `kill -9` and a restart on the same data directory and port, or a pause
//! (`SIGSTOP`, then `SIGCONT` after 0.2 to 2 s). After each run every user reconnects, resumes
//! its rooms from history, and the history checker (`cluster/checker.rs`) judges the run: no
//! acknowledged message lost, none stored twice, one order per room identical for all readers,
//! every resume gap-free.
//!
//! - `PALAVER_FAULT_RUNS` (default 4: what CI runs), `PALAVER_FAULT_SEED` (first seed, default
//!   1; run `k` uses seed + k). A failing run prints its seed and schedule; rerun it alone with
//!   `PALAVER_FAULT_SEED=<seed> PALAVER_FAULT_RUNS=1`.
//! - The summary (runs, fault mix, messages, retries, violations) is printed and written to
//!   `target/fault-runs.txt`.
#![allow(clippy::unwrap_used)]

mod common;
#[path = "../../node/tests/support/kafka.rs"]
mod kafka;
#[path = "../../node/tests/support/pg.rs"]
mod pg;
mod cluster {
    pub mod checker;
    pub mod sandbox;
}

use cluster::checker::{Acked, ClientLog, Seen, check};
use cluster::sandbox::{Proc, free_port, spawn};
use common::{SECRET, token};
use futures::{SinkExt, StreamExt};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tokio::sync::Mutex;
use tokio_tungstenite::tungstenite::Message;

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// How long a reply may take before the sender gives up on the connection and retries.
const REPLY_WAIT: Duration = Duration::from_secs(4);
/// Longest a run may take before it is declared stuck.
const RUN_LIMIT: Duration = Duration::from_secs(120);

fn seen(m: &Value) -> Seen {
    Seen {
        room: m["room"].as_u64().unwrap(),
        id: m["id"].as_u64().unwrap(),
        seq: m["seq"].as_u64().unwrap(),
        client_ref: m["client_ref"].as_str().map(str::to_owned),
    }
}

/// The server under test: one `palaver serve` process, restarted on the same data dir and port.
struct Server {
    proc: Option<Proc>,
    dir: tempfile::TempDir,
    port: u16,
    paused: bool,
}

impl Server {
    async fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let mut s = Self {
            proc: None,
            dir,
            port,
            paused: false,
        };
        s.spawn().await;
        s
    }

    async fn spawn(&mut self) {
        let env = vec![
            ("PALAVER_HTTP_ADDR", format!("127.0.0.1:{}", self.port)),
            ("PALAVER_DATA_DIR", self.dir.path().display().to_string()),
            ("PALAVER_JWT_SECRET", SECRET.to_owned()),
            ("PALAVER_MESSAGES_PER_SECOND", "10000".to_owned()),
        ];
        self.proc = Some(spawn(&["serve"], env).await);
    }

    fn pid(&self) -> String {
        self.proc.as_ref().unwrap().child.id().to_string()
    }

    fn signal(&self, sig: &str) {
        let ok = std::process::Command::new("kill")
            .args(["-s", sig, &self.pid()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -s {sig} failed");
    }

    async fn kill_and_restart(&mut self) {
        if self.paused {
            self.resume();
        }
        if let Some(mut p) = self.proc.take() {
            p.kill9();
        }
        self.spawn().await;
    }

    fn pause(&mut self) {
        self.signal("STOP");
        self.paused = true;
    }

    fn resume(&mut self) {
        self.signal("CONT");
        self.paused = false;
    }

    fn url(&self, user: &str) -> String {
        format!("ws://127.0.0.1:{}/ws?token={}", self.port, token(user))
    }
}

/// A native client that survives its server: every operation reports a broken connection as an
/// error, and the caller reconnects.
struct Resilient {
    url: String,
    ws: Option<Ws>,
    next: u64,
    log: ClientLog,
    retries: u64,
}

#[derive(Debug)]
enum Failure {
    /// The connection broke or the reply did not come in time: reconnect and retry.
    Connection(String),
    /// The server answered an error.
    Refused(Value),
}

impl Resilient {
    fn new(name: &str, url: String) -> Self {
        Self {
            url,
            ws: None,
            next: 0,
            log: ClientLog {
                name: name.into(),
                ..Default::default()
            },
            retries: 0,
        }
    }

    async fn connected(&mut self) -> Result<&mut Ws, Failure> {
        if self.ws.is_none() {
            let c = tokio::time::timeout(REPLY_WAIT, tokio_tungstenite::connect_async(&self.url))
                .await
                .map_err(|_| Failure::Connection("connect timed out".into()))?
                .map_err(|e| Failure::Connection(format!("connect: {e}")))?;
            self.ws = Some(c.0);
        }
        Ok(self.ws.as_mut().unwrap())
    }

    /// Sends one request and waits for its reply, logging message events seen meanwhile.
    async fn request(&mut self, op: &str, mut args: Value) -> Result<Value, Failure> {
        self.next += 1;
        let id = format!("r{}", self.next);
        args["id"] = json!(id);
        args["op"] = json!(op);
        let ws = self.connected().await?;
        if let Err(e) = ws.send(Message::text(args.to_string())).await {
            self.ws = None;
            return Err(Failure::Connection(format!("send: {e}")));
        }
        let deadline = tokio::time::Instant::now() + REPLY_WAIT;
        loop {
            let ws = self.ws.as_mut().unwrap();
            let frame = match tokio::time::timeout_at(deadline, ws.next()).await {
                Err(_) => {
                    self.ws = None;
                    return Err(Failure::Connection("no reply in time".into()));
                }
                Ok(None) => {
                    self.ws = None;
                    return Err(Failure::Connection("closed".into()));
                }
                Ok(Some(Err(e))) => {
                    self.ws = None;
                    return Err(Failure::Connection(e.to_string()));
                }
                Ok(Some(Ok(Message::Text(t)))) => t,
                Ok(Some(Ok(_))) => continue,
            };
            let v: Value = serde_json::from_str(frame.as_str()).unwrap();
            if v["type"] == "event" {
                if v["event"] == "message" {
                    self.log.received.push(seen(&v["data"]["message"]));
                }
                continue;
            }
            if v["type"] == "reply" && v["id"] == json!(id) {
                return if v["ok"] == true {
                    Ok(v["data"].clone())
                } else {
                    Err(Failure::Refused(v))
                };
            }
        }
    }

    /// Sends `cref` to `room` until it is acknowledged, retrying with the same `client_ref`.
    async fn send(&mut self, room: u64, cref: &str) {
        let started = Instant::now();
        let mut last = String::new();
        loop {
            let args = json!({"room": room, "text": cref, "client_ref": cref});
            match self.request("send", args).await {
                Ok(d) => {
                    let m = seen(&d["message"]);
                    self.log.acked.push(Acked {
                        room,
                        client_ref: cref.into(),
                        id: m.id,
                        seq: m.seq,
                    });
                    return;
                }
                Err(Failure::Refused(r)) => {
                    let code = r["error"]["code"].as_str().unwrap_or_default();
                    assert!(
                        ["unavailable", "timeout", "not_owner"].contains(&code),
                        "send {cref} refused for good: {r}"
                    );
                }
                Err(Failure::Connection(why)) => last = why,
            }
            self.retries += 1;
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "send {cref} never acknowledged (last: {last})"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// A request that must succeed eventually (set-up and final reads).
    async fn must(&mut self, op: &str, args: Value) -> Value {
        let started = Instant::now();
        loop {
            match self.request(op, args.clone()).await {
                Ok(d) => return d,
                Err(Failure::Refused(r)) => {
                    let code = r["error"]["code"].as_str().unwrap_or_default();
                    assert!(
                        ["unavailable", "timeout", "not_owner"].contains(&code),
                        "{op} refused: {r}"
                    );
                }
                Err(Failure::Connection(_)) => {}
            }
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "{op} never succeeded"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The whole history of `room`, oldest first.
    async fn history(&mut self, room: u64) -> Vec<Seen> {
        let mut out = Vec::new();
        let mut after = 0u64;
        loop {
            let mut q = json!({"room": room, "limit": 200});
            if after > 0 {
                q["after"] = json!(after);
            }
            let d = self.must("history", q).await;
            let mut page: Vec<Seen> = d["messages"].as_array().unwrap().iter().map(seen).collect();
            page.reverse();
            let Some(last) = page.last() else { break };
            after = last.id;
            out.extend(page);
            if d["has_more"] != true {
                break;
            }
        }
        out
    }

    /// Fills the log's gaps from history the way a reconnecting client does: everything after
    /// the last message of its unbroken run of `seq`s.
    async fn resume(&mut self, room: u64) -> Vec<Seen> {
        let mut have: Vec<&Seen> = self
            .log
            .received
            .iter()
            .filter(|s| s.room == room)
            .collect();
        have.sort_by_key(|s| s.seq);
        let mut last_id = 0;
        for (i, s) in have.iter().enumerate() {
            if s.seq != i as u64 + 1 {
                break;
            }
            last_id = s.id;
        }
        let all = self.history(room).await;
        self.log
            .resumed
            .extend(all.iter().filter(|s| s.id > last_id).cloned());
        all
    }
}

/// What a run did, for the summary.
#[derive(Default)]
struct Tally {
    runs: u64,
    kills: u64,
    pauses: u64,
    acked: u64,
    retries: u64,
    violations: Vec<String>,
}

/// One run: set-up, concurrent senders and faults, then the checker's verdict.
async fn run(seed: u64, tally: &mut Tally) {
    let mut rng = StdRng::seed_from_u64(seed);
    let server = Arc::new(Mutex::new(Server::start().await));
    let url = |u: &str| {
        let s = server.clone();
        let u = u.to_owned();
        async move { s.lock().await.url(&u) }
    };
    let users = ["a", "b", "c"];
    let mut clients = Vec::new();
    for u in users {
        let mut c = Resilient::new(u, url(u).await);
        c.must("ping", json!({})).await;
        clients.push(c);
    }
    let group = clients[0]
        .must("create_group", json!({"name": "g", "members": ["b", "c"]}))
        .await["room"]["id"]
        .as_u64()
        .unwrap();
    let direct = clients[0].must("open_direct", json!({"user": "b"})).await["room"]["id"]
        .as_u64()
        .unwrap();
    let per_sender: Vec<u32> = users.iter().map(|_| rng.random_range(15..40)).collect();
    // 1 to 3 faults, at random moments of a ~3 s window.
    let faults: Vec<(u64, bool, u64)> = (0..rng.random_range(1..=3))
        .map(|_| {
            (
                rng.random_range(0..3000),
                rng.random_bool(0.5),
                rng.random_range(200..2000),
            )
        })
        .collect();
    let mut schedule = String::new();
    for (at, kill, pause) in &faults {
        if *kill {
            let _ = write!(schedule, " kill9@{at}ms");
        } else {
            let _ = write!(schedule, " stop@{at}ms+{pause}ms");
        }
    }
    eprintln!("fault run seed {seed}: senders {per_sender:?},{schedule}");

    let done = Arc::new(AtomicBool::new(false));
    let fault_task = {
        let server = server.clone();
        let faults = faults.clone();
        let done = done.clone();
        tokio::spawn(async move {
            let start = tokio::time::Instant::now();
            let mut sorted = faults;
            sorted.sort();
            let (mut kills, mut pauses) = (0u64, 0u64);
            for (at, kill, pause) in sorted {
                tokio::time::sleep_until(start + Duration::from_millis(at)).await;
                if done.load(Ordering::SeqCst) && at > 0 {
                    // Senders finished early: still apply the fault, the reads must survive it.
                }
                let mut s = server.lock().await;
                if kill {
                    s.kill_and_restart().await;
                    kills += 1;
                } else {
                    s.pause();
                    drop(s);
                    tokio::time::sleep(Duration::from_millis(pause)).await;
                    server.lock().await.resume();
                    pauses += 1;
                }
            }
            (kills, pauses)
        })
    };
    let counter = Arc::new(AtomicU64::new(0));
    let mut senders = Vec::new();
    for (i, mut c) in clients.into_iter().enumerate() {
        let n = per_sender[i];
        let counter = counter.clone();
        let mut rng = StdRng::seed_from_u64(seed * 31 + i as u64);
        senders.push(tokio::spawn(async move {
            for k in 0..n {
                // a and b also talk in their direct room; c only in the group.
                let room = if i < 2 && rng.random_bool(0.3) {
                    direct
                } else {
                    group
                };
                let cref = format!("s{seed}-{}-{k}", c.log.name);
                c.send(room, &cref).await;
                counter.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(rng.random_range(0..60))).await;
            }
            c
        }));
    }
    let mut clients = Vec::new();
    for s in senders {
        clients.push(
            tokio::time::timeout(RUN_LIMIT, s)
                .await
                .unwrap_or_else(|_| panic!("seed {seed}: senders stuck"))
                .unwrap(),
        );
    }
    done.store(true, Ordering::SeqCst);
    let (kills, pauses) = tokio::time::timeout(RUN_LIMIT, fault_task)
        .await
        .unwrap_or_else(|_| panic!("seed {seed}: faults stuck"))
        .unwrap();

    // Every reader catches up from history; the final history is read once per reader and
    // must be the same for all.
    let mut history: BTreeMap<u64, Vec<Seen>> = BTreeMap::new();
    let mut orders: Vec<String> = Vec::new();
    for c in &mut clients {
        let rooms: &[u64] = if c.log.name == "c" {
            &[group]
        } else {
            &[group, direct]
        };
        for &room in rooms {
            let all = c.resume(room).await;
            if c.log.name == "a" || (room == group && c.log.name == "c") {
                orders.push(format!(
                    "{room}:{:?}",
                    all.iter().map(|s| s.id).collect::<Vec<_>>()
                ));
            }
            history.entry(room).or_insert(all);
        }
    }
    let mut v = check(&clients.iter().map(take_log).collect::<Vec<_>>(), &history);
    // One order per room for every reader: the group as a and c read it.
    let group_orders: Vec<&String> = orders
        .iter()
        .filter(|o| o.starts_with(&format!("{group}:")))
        .collect();
    if group_orders.windows(2).any(|w| w[0] != w[1]) {
        v.push(format!(
            "readers disagree on the group's order: {group_orders:?}"
        ));
    }
    let acked: u64 = clients.iter().map(|c| c.log.acked.len() as u64).sum();
    let expected: u64 = per_sender.iter().map(|&n| u64::from(n)).sum();
    if acked != expected {
        v.push(format!("{acked} acknowledged of {expected} sent"));
    }
    let stored: usize = history.values().map(Vec::len).sum();
    if stored as u64 != expected {
        v.push(format!("{stored} stored of {expected} acknowledged"));
    }
    for violation in &v {
        eprintln!("seed {seed}: VIOLATION {violation}");
    }
    tally.runs += 1;
    tally.kills += kills;
    tally.pauses += pauses;
    tally.acked += acked;
    tally.retries += clients.iter().map(|c| c.retries).sum::<u64>();
    tally
        .violations
        .extend(v.into_iter().map(|x| format!("seed {seed}: {x}")));
    let mut s = server.lock().await;
    if s.paused {
        s.resume();
    }
    if let Some(mut p) = s.proc.take() {
        p.kill9();
    }
}

fn take_log(c: &Resilient) -> ClientLog {
    ClientLog {
        name: c.log.name.clone(),
        acked: c.log.acked.clone(),
        received: c.log.received.clone(),
        resumed: c.log.resumed.clone(),
    }
}

fn env_u64(key: &str, default: u64) -> u64 {
    std::env::var(key)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn randomized_faults_against_serve_lose_and_duplicate_nothing() {
    let runs = env_u64("PALAVER_FAULT_RUNS", 4);
    let first = env_u64("PALAVER_FAULT_SEED", 1);
    let started = Instant::now();
    let mut tally = Tally::default();
    for k in 0..runs {
        run(first + k, &mut tally).await;
    }
    let summary = format!(
        "fault runs against `palaver serve`: seeds {first}..{}\n\
         runs: {}\nfaults: {} kill -9 + restart, {} SIGSTOP/SIGCONT pauses\n\
         messages acknowledged: {}\nretries (same client_ref): {}\nviolations: {}\n\
         wall time: {:.0} s\n{}",
        first + runs - 1,
        tally.runs,
        tally.kills,
        tally.pauses,
        tally.acked,
        tally.retries,
        tally.violations.len(),
        started.elapsed().as_secs_f64(),
        tally.violations.join("\n")
    );
    eprintln!("{summary}");
    let out = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/fault-runs.txt");
    let _ = std::fs::write(out, &summary);
    assert!(tally.violations.is_empty(), "{summary}");
}
