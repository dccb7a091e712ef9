//! `palaver-load abuse`: hostile clients and overload against a freshly started release
//! `palaver serve`, while a probe of ordinary chat runs throughout.
//!
//! The probe is `probe_pairs` direct rooms, one member of each sending at `probe_rate`; its
//! send-to-deliver latency is recorded per phase. The first phase is the baseline (nothing but
//! the probe); each later phase adds one attack:
//!
//! - `never-read`: `silent` members of a group never read their sockets while its owner floods
//!   the group with 1 KB messages as fast as acknowledgements come back. The server must cut
//!   them loose (slow consumer, close 1008) instead of buffering without bound.
//! - `slowloris`: `slowloris` connections send an HTTP upgrade request one byte every 250 ms,
//!   and half as many WebSocket sessions send a 4 KB frame one byte every 250 ms, never answering
//!   a ping. The first must be closed by the request-head timeout, the second by the keepalive
//!   (no complete frame for two ping intervals). The server runs with short bounds (5 s heads,
//!   3 s pings) so that both show within a phase.
//! - `connect-drop`: `storm` WebSocket sessions opened, then all dropped at once with a TCP reset;
//!   the time until the server counts them gone.
//! - `big-group`: a group of `group_members` members (imported with the admin API, added in
//!   batches before anyone connects), `group_online` of them online and reading, and one sender
//!   flooding it: messages acknowledged and delivered per second.
//!
//! The flooders meet the server's per-user message rate (`--flood-limit`, default the server's
//! own default, 20 messages per second): an abusive client is one that sends as fast as it can
//! and is refused (`rate_limited`); with a high limit the phases measure raw fan-out instead.
//!
//! Each phase reports the probe's p50/p99/max and the server's peak RSS (sampled every 50 ms
//! from `/proc/<pid>/status`) and RSS after the phase; the run, the probe messages lost.

use crate::bench::{Server, free_port, machine, random_secret};
use crate::{Latency, Protocol, RunConfig, Ws, connect, histogram, micros, proc_stats, request};
use futures::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use serde::Serialize;
use serde_json::{Value, json};
use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::Message;

/// Settings of an abuse run.
#[derive(Clone, Debug)]
pub struct AbuseConfig {
    /// The release server binary.
    pub palaver: PathBuf,
    /// Loopback source addresses.
    pub sources: u8,
    /// Seconds per phase.
    pub phase: Duration,
    /// Direct rooms of the probe.
    pub probe_pairs: usize,
    /// Messages per second per probe sender.
    pub probe_rate: f64,
    /// `never-read`: members that never read.
    pub silent: usize,
    /// `slowloris`: connections dribbling a request head (and half as many dribbling a frame).
    pub slowloris: usize,
    /// `connect-drop`: sessions opened and dropped at once.
    pub storm: usize,
    /// `big-group`: members of the group.
    pub group_members: usize,
    /// `big-group`: members online and reading.
    pub group_online: usize,
    /// The server's per-user message rate (`PALAVER_MESSAGES_PER_SECOND`) for the run: the
    /// flooders meet it. `None`: the server's default.
    pub flood_limit: Option<u32>,
    /// The attack phases to run, of [`PHASES`], in their fixed order (the baseline always
    /// runs first).
    pub phases: Vec<String>,
    /// The nice value of the load generator's own threads (the attackers' client side; the
    /// probe keeps [`PROBE_NICE`] and the server 0): on a machine where they share the
    /// server's cores, a positive value lets them use only what the server leaves. 0: leave
    /// it. Needs root (the server is started at 0 again); ignored without.
    pub attackers_nice: i32,
}

/// The attack phases, in the order they run.
pub const PHASES: [&str; 4] = ["never-read", "slowloris", "connect-drop", "big-group"];

/// One phase's numbers.
#[derive(Clone, Debug, Serialize)]
pub struct Phase {
    /// Phase name.
    pub name: &'static str,
    /// What the attack did and what the server did about it.
    pub attack: String,
    /// The probe's send-to-deliver latency during the phase (microseconds).
    pub probe: Latency,
    /// The probe's messages sent after the attack ended while the harness was still checking
    /// what the server did (in never-read: reading everything the silent members were sent,
    /// hundreds of MB, on the same cores); not in `probe`. `None` in the other phases.
    pub probe_after: Option<Latency>,
    /// Peak server RSS during the phase.
    pub peak_rss: u64,
    /// Server RSS after the phase (attackers gone).
    pub rss_after: u64,
    /// Peak bytes in the kernel's TCP buffers during the phase, machine-wide (both ends of
    /// every loopback connection).
    pub peak_tcp_buffers: u64,
    /// Peak bytes the server had written to its sockets and its clients had not taken (the
    /// `tx_queue` of the server's end of every connection, from `/proc/net/tcp`): the server's
    /// own share of the kernel's buffers, sampled every 250 ms. Only in the never-read phase:
    /// reading the tables of 20,000 sockets four times a second delays the probe in the
    /// connect-drop phase (p99 3.5 and 4.6 ms against 2.9 and 2.4 without).
    pub peak_send_queues: Option<u64>,
}

/// Latency of the probe, reset per phase.
struct Probe {
    start: Instant,
    hist: parking_lot::Mutex<Histogram<u64>>,
    /// This phase's deliveries slower than [`SLOW_US`]: (sent at, latency), µs since `start`.
    slow: parking_lot::Mutex<Vec<(u64, u64)>>,
    /// When this phase began, µs since `start`.
    phase_at: AtomicU64,
    /// When this phase's attack ended, µs since `start` (`u64::MAX`: not yet): messages sent
    /// later go to `after`, not `hist`.
    until: AtomicU64,
    /// The latency of messages sent after `until`.
    after: parking_lot::Mutex<Histogram<u64>>,
    /// Over the whole run (a phase's last sends are delivered in the next).
    sent: AtomicU64,
    delivered: AtomicU64,
    stop: AtomicBool,
    tasks: parking_lot::Mutex<Vec<tokio::task::JoinHandle<()>>>,
    /// The probe's own runtime.
    rt: parking_lot::Mutex<Option<tokio::runtime::Runtime>>,
}

/// A probe delivery slower than this goes on the phase's timeline (printed to stderr).
/// `PALAVER_LOAD_SLOW_MS` sets it, to see when the deliveries behind a p99 come.
static SLOW_US: std::sync::LazyLock<u64> = std::sync::LazyLock::new(|| {
    std::env::var("PALAVER_LOAD_SLOW_MS")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
        .map_or(10_000, |ms| ms.max(1) * 1000)
});

impl Probe {
    fn take(&self) -> Latency {
        let mut h = self.hist.lock();
        let lat = Latency::of(&h);
        h.reset();
        self.after.lock().reset();
        self.until.store(u64::MAX, Ordering::SeqCst);
        self.slow.lock().clear();
        self.phase_at
            .store(micros(self.start.elapsed()), Ordering::SeqCst);
        lat
    }

    /// Ends the phase's window now: what the probe sends from here on (while the harness checks
    /// the attack's outcome) is kept apart, in [`Probe::take_after`].
    fn end_window(&self) {
        self.until
            .store(micros(self.start.elapsed()), Ordering::SeqCst);
    }

    /// The latency of the messages sent after [`Probe::end_window`] (`None`: it was not called,
    /// or none came); read before [`Probe::take`].
    fn take_after(&self) -> Option<Latency> {
        let h = self.after.lock();
        (self.until.load(Ordering::SeqCst) != u64::MAX && !h.is_empty()).then(|| Latency::of(&h))
    }

    /// Records one delivery of a message sent at `at` (µs since `start`).
    fn record(&self, at: u64, lat: u64) {
        if at > self.until.load(Ordering::Relaxed) {
            self.after.lock().saturating_record(lat);
            return;
        }
        self.hist.lock().saturating_record(lat);
        if lat > *SLOW_US {
            self.slow.lock().push((at, lat));
        }
    }

    /// The phase's slow deliveries by when they were sent, in 250 ms windows from the phase's
    /// start (`+1.25 s: 7 (max 41 ms)`): whether they cluster, and when.
    fn timeline(&self) -> String {
        let at0 = self.phase_at.load(Ordering::SeqCst);
        let mut windows: BTreeMap<u64, (u64, u64)> = BTreeMap::new();
        for &(at, lat) in self.slow.lock().iter() {
            let w = windows.entry(at.saturating_sub(at0) / 250_000).or_default();
            w.0 += 1;
            w.1 = w.1.max(lat);
        }
        windows
            .iter()
            .map(|(w, (n, max))| format!("+{:.2} s: {n} (max {} ms)", *w as f64 * 0.25, max / 1000))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// Peak RSS sampler, reset per phase; with it, the peak of the kernel's TCP buffers and of the
/// server's send queues.
struct Rss {
    pid: u32,
    /// The server's port (its end of every connection).
    port: u16,
    peak: AtomicU64,
    tcp_peak: AtomicU64,
    queued_peak: AtomicU64,
    /// Whether the send queues are sampled now.
    queues_on: AtomicBool,
}

impl Rss {
    fn now(&self) -> u64 {
        proc_stats(self.pid).map_or(0, |s| s.0)
    }

    fn take(&self) -> u64 {
        self.peak.swap(self.now(), Ordering::SeqCst)
    }

    fn sample(&self) {
        self.peak.fetch_max(self.now(), Ordering::Relaxed);
        self.tcp_peak.fetch_max(tcp_memory(), Ordering::Relaxed);
    }

    fn take_tcp(&self) -> u64 {
        self.tcp_peak.swap(tcp_memory(), Ordering::SeqCst)
    }

    /// Less often than [`Rss::sample`]: with 10,000 connections the tables are a few MB.
    fn sample_queues(&self) {
        if !self.queues_on.load(Ordering::Relaxed) {
            return;
        }
        self.queued_peak
            .fetch_max(send_queues(self.port), Ordering::Relaxed);
    }

    /// The phase's peak, if it was sampled; sampling stops.
    fn take_queues(&self) -> Option<u64> {
        self.queues_on
            .swap(false, Ordering::SeqCst)
            .then(|| self.queued_peak.swap(0, Ordering::SeqCst))
    }
}

/// Bytes written by the server's end of every TCP connection on `port` and not yet taken by
/// the peer: the sum of `tx_queue` over `/proc/net/tcp` and `/proc/net/tcp6`. Payload bytes,
/// without the kernel's bookkeeping (which `tcp_memory` counts).
fn send_queues(port: u16) -> u64 {
    let local = format!(":{port:04X}");
    ["/proc/net/tcp", "/proc/net/tcp6"]
        .iter()
        .filter_map(|p| std::fs::read_to_string(p).ok())
        .map(|t| {
            t.lines()
                .skip(1)
                .filter_map(|l| {
                    let mut f = l.split_whitespace();
                    let (_sl, addr, _rem, state, queues) =
                        (f.next()?, f.next()?, f.next()?, f.next()?, f.next()?);
                    // 0A: listening (its "queue" is the accept backlog).
                    if !addr.ends_with(&local) || state == "0A" {
                        return None;
                    }
                    u64::from_str_radix(queues.split(':').next()?, 16).ok()
                })
                .sum::<u64>()
        })
        .sum()
}

/// Bytes in the kernel's TCP buffers, machine-wide (`mem` of `/proc/net/sockstat`, in pages):
/// what a client that never reads costs beyond the server's RSS, the data written to it and
/// queued in the socket. It counts both ends of every loopback connection (the load
/// generator's receive queues too), so it is an upper bound of the server's share.
fn tcp_memory() -> u64 {
    std::fs::read_to_string("/proc/net/sockstat")
        .ok()
        .and_then(|t| {
            t.lines().find(|l| l.starts_with("TCP:")).and_then(|l| {
                let mut words = l.split_whitespace();
                words.find(|w| *w == "mem")?;
                words.next()?.parse::<u64>().ok()
            })
        })
        .map_or(0, |pages| pages * 4096)
}

/// What an abuse run measured.
#[derive(Clone, Debug, Serialize)]
pub struct AbuseReport {
    /// The phases, baseline first.
    pub phases: Vec<Phase>,
    /// Probe messages sent over the whole run.
    pub probe_sent: u64,
    /// Probe messages sent and never delivered (after a 3 s drain at the end).
    pub probe_lost: u64,
    /// The machine, as a sentence.
    pub machine: String,
}

/// A server to abuse: where it listens, its process, its secrets.
#[derive(Clone, Debug)]
pub struct Target {
    /// HTTP port on 127.0.0.1.
    pub port: u16,
    /// Its process (RSS is read from `/proc/<pid>`).
    pub pid: u32,
    /// `PALAVER_JWT_SECRET`.
    pub secret: String,
    /// `PALAVER_ADMIN_TOKEN` (the big group's users are imported with it).
    pub admin: String,
}

/// Starts a fresh release `palaver serve` with the bounds the phases need, and runs every phase
/// against it.
pub async fn abuse(cfg: AbuseConfig) -> anyhow::Result<AbuseReport> {
    let port = free_port()?;
    let secret = random_secret()?;
    let admin = random_secret()?;
    let data = tempfile::tempdir()?;
    let nice = cfg.attackers_nice;
    if nice != 0 && renice_self(nice) {
        ATTACKERS_NICE.store(nice, Ordering::SeqCst);
    }
    // The server back at nice 0 (`nice` adds its adjustment to the inherited value).
    let mut cmd = if ATTACKERS_NICE.load(Ordering::SeqCst) == 0 {
        tokio::process::Command::new(&cfg.palaver)
    } else {
        let mut c = tokio::process::Command::new("nice");
        c.args(["-n", &(-nice).to_string()]).arg(&cfg.palaver);
        c
    };
    cmd.arg("serve")
        .env("PALAVER_HTTP_ADDR", format!("127.0.0.1:{port}"))
        .env("PALAVER_DATA_DIR", data.path())
        .env("PALAVER_JWT_SECRET", &secret)
        .env("PALAVER_ADMIN_TOKEN", &admin)
        .env("PALAVER_LOG", "warn");
    for (k, v) in server_env(&cfg) {
        cmd.env(k, v);
    }
    let log = data.path().join("server.log");
    let server = Server::start(cmd, port, log).await?;
    let target = Target {
        port,
        pid: server.pid,
        secret,
        admin,
    };
    let report = abuse_against(&cfg, &target).await;
    server.stop().await?;
    report
}

/// The settings the phases need beyond the defaults, as environment variables.
pub fn server_env(cfg: &AbuseConfig) -> Vec<(&'static str, String)> {
    let mut env = vec![
        (
            "PALAVER_GROUP_MAX_MEMBERS",
            cfg.group_members.max(10).to_string(),
        ),
        ("PALAVER_MAX_ROOMS_PER_USER", "100000".into()),
        // Short enough to be seen within a phase.
        ("PALAVER_HEADER_TIMEOUT_SECS", "5".into()),
        ("PALAVER_PING_INTERVAL_SECS", "3".into()),
    ];
    if let Some(limit) = cfg.flood_limit {
        env.push(("PALAVER_MESSAGES_PER_SECOND", limit.to_string()));
    }
    env
}

/// Runs every phase against a running server.
pub async fn abuse_against(cfg: &AbuseConfig, target: &Target) -> anyhow::Result<AbuseReport> {
    let (port, admin) = (target.port, target.admin.clone());
    let rss = Arc::new(Rss {
        pid: target.pid,
        port,
        peak: AtomicU64::new(0),
        tcp_peak: AtomicU64::new(0),
        queued_peak: AtomicU64::new(0),
        queues_on: AtomicBool::new(false),
    });
    let sampler = {
        let rss = rss.clone();
        tokio::spawn(async move {
            for tick in 0u64.. {
                rss.sample();
                if tick % 5 == 0 {
                    rss.sample_queues();
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
    };
    let run = RunConfig {
        url: format!("ws://127.0.0.1:{port}/ws"),
        secret: target.secret.clone(),
        sources: cfg.sources,
        protocol: Protocol::Native,
        ..RunConfig::default()
    };
    let probe = start_probe(&run, cfg.probe_pairs, cfg.probe_rate).await?;
    let mut phases = Vec::new();
    let settle = Duration::from_secs(2);

    // Baseline.
    rss.take();
    probe.take();
    tokio::time::sleep(cfg.phase).await;
    phases.push(
        finish(
            "baseline",
            "nothing but the probe".into(),
            &probe,
            &rss,
            settle,
        )
        .await,
    );

    let runs = |name: &str| cfg.phases.iter().any(|p| p == name);
    if runs("never-read") {
        rss.queues_on.store(true, Ordering::SeqCst);
        let attack = never_read(&run, cfg.silent, cfg.phase, &probe).await?;
        phases.push(finish("never-read", attack, &probe, &rss, settle).await);
    }
    if runs("slowloris") {
        let attack = slowloris(&run, port, cfg.slowloris, cfg.phase).await?;
        phases.push(finish("slowloris", attack, &probe, &rss, settle).await);
    }
    if runs("connect-drop") {
        let attack = connect_drop(&run, port, cfg.storm, cfg.phase).await?;
        phases.push(finish("connect-drop", attack, &probe, &rss, settle).await);
    }
    if runs("big-group") {
        let attack = big_group(
            &run,
            port,
            &admin,
            cfg.group_members,
            cfg.group_online,
            cfg.phase,
            &probe,
            &rss,
        )
        .await?;
        phases.push(finish("big-group", attack, &probe, &rss, settle).await);
    }

    probe.stop.store(true, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let probe_sent = probe.sent.load(Ordering::SeqCst);
    let probe_lost = probe_sent.saturating_sub(probe.delivered.load(Ordering::SeqCst));
    for t in probe.tasks.lock().drain(..) {
        t.abort();
    }
    if let Some(rt) = probe.rt.lock().take() {
        rt.shutdown_background();
    }
    sampler.abort();
    Ok(AbuseReport {
        phases,
        probe_sent,
        probe_lost,
        machine: machine(),
    })
}

async fn finish(
    name: &'static str,
    attack: String,
    probe: &Probe,
    rss: &Rss,
    settle: Duration,
) -> Phase {
    // Late probe deliveries of the phase still count as delivered.
    tokio::time::sleep(settle).await;
    eprintln!(
        "abuse: {name}: probe deliveries over {} ms by send time: {}",
        *SLOW_US / 1000,
        probe.timeline()
    );
    let after = probe.take_after();
    let lat = probe.take();
    let peak = rss.take();
    let tcp = rss.take_tcp();
    let queued = rss.take_queues();
    Phase {
        name,
        attack,
        probe: lat,
        probe_after: after,
        peak_rss: peak,
        rss_after: rss.now(),
        peak_tcp_buffers: tcp,
        peak_send_queues: queued,
    }
}

/// The nice value the probe's thread asks for (see [`start_probe`]).
pub const PROBE_NICE: i32 = -10;

/// Whether the probe's thread got [`PROBE_NICE`] (it needs root or `CAP_SYS_NICE`).
pub static PROBE_RAISED: AtomicBool = AtomicBool::new(false);

/// The nice value the load generator's threads run at (see [`AbuseConfig::attackers_nice`]).
pub static ATTACKERS_NICE: AtomicI32 = AtomicI32::new(0);

/// Sets the nice value of one thread (Linux keeps one per thread), by its id.
fn renice(tid: &str, nice: i32) -> bool {
    std::process::Command::new("renice")
        .args(["-n", &nice.to_string(), "-p", tid])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Sets the nice value of every thread of this process; the threads started later inherit it
/// from the thread that starts them. Only as root, who can also start the server at 0 again.
fn renice_self(nice: i32) -> bool {
    let root = std::fs::read_to_string("/proc/self/status").is_ok_and(|s| {
        s.lines()
            .find_map(|l| l.strip_prefix("Uid:"))
            .and_then(|ids| ids.split_whitespace().nth(1).map(|e| e == "0"))
            .unwrap_or(false)
    });
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return false;
    };
    root && tasks
        .flatten()
        .all(|t| renice(&t.file_name().to_string_lossy(), nice))
}

/// Starts the probe pairs; each pair's task runs until `stop`. The probe runs on a runtime of
/// its own (one thread): the attackers' client side (thousands of sockets read, written and
/// reset in this process) must not queue the probe's reads, or the probe would measure the
/// load generator instead of the server. On a machine where the load generator shares the
/// server's cores, the attackers' client threads would still take the CPU from the probe's
/// thread (a 5,000-session broadcast wakes 5,000 reader tasks here): the probe's thread asks
/// the kernel for a higher priority (nice [`PROBE_NICE`]), so that it measures the server's
/// answer rather than its own wait for a core. The server keeps the default priority.
async fn start_probe(run: &RunConfig, pairs: usize, rate: f64) -> anyhow::Result<Arc<Probe>> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("probe")
        .on_thread_start(|| {
            // Linux keeps a nice value per thread: renice this thread's id, read from
            // /proc/thread-self (`<pid>/task/<tid>`).
            let tid = std::fs::read_link("/proc/thread-self")
                .ok()
                .and_then(|p| p.file_name().map(|t| t.to_string_lossy().into_owned()));
            let raised = tid.is_some_and(|tid| renice(&tid, PROBE_NICE));
            if raised {
                PROBE_RAISED.store(true, Ordering::SeqCst);
            }
        })
        .enable_all()
        .build()?;
    let probe = Arc::new(Probe {
        start: Instant::now(),
        hist: parking_lot::Mutex::new(histogram()?),
        slow: parking_lot::Mutex::new(Vec::new()),
        phase_at: AtomicU64::new(0),
        until: AtomicU64::new(u64::MAX),
        after: parking_lot::Mutex::new(histogram()?),
        sent: AtomicU64::new(0),
        delivered: AtomicU64::new(0),
        stop: AtomicBool::new(false),
        tasks: parking_lot::Mutex::new(Vec::new()),
        rt: parking_lot::Mutex::new(None),
    });
    for p in 0..pairs {
        let (a, b) = (format!("probe-a{p}"), format!("probe-b{p}"));
        let run = run.clone();
        // Connected from the probe's runtime, so that its sockets are driven by it.
        let (wa, wb, room) = rt
            .spawn(async move {
                let mut wa = connect(&run, p, &a).await?;
                let wb = connect(&run, p + 1, &b).await?;
                let room = request(&mut wa, "open", json!({"op": "open_direct", "user": b}))
                    .await?["room"]["id"]
                    .clone();
                anyhow::Ok((wa, wb, room))
            })
            .await??;
        let period = Duration::from_secs_f64(1.0 / rate.max(0.1));
        // Spread the pairs' sends over the period.
        let offset = period.mul_f64(p as f64 / pairs.max(1) as f64);
        let task = rt.spawn({
            let probe = probe.clone();
            async move {
                let _ = probe_pair(wa, wb, room, period, offset, probe).await;
            }
        });
        probe.tasks.lock().push(task);
    }
    *probe.rt.lock() = Some(rt);
    Ok(probe)
}

async fn probe_pair(
    mut wa: Ws,
    mut wb: Ws,
    room: Value,
    period: Duration,
    offset: Duration,
    probe: Arc<Probe>,
) -> anyhow::Result<std::convert::Infallible> {
    let mut tick = tokio::time::interval_at((Instant::now() + offset).into(), period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut n = 0u64;
    loop {
        tokio::select! {
            _ = tick.tick(), if !probe.stop.load(Ordering::Relaxed) => {
                n += 1;
                let at = micros(probe.start.elapsed());
                let text = format!("probe:{n}:{at}:");
                let frame = json!({"id": n, "op": "send", "room": room, "text": text});
                wa.send(Message::text(frame.to_string())).await?;
                probe.sent.fetch_add(1, Ordering::Relaxed);
            }
            m = wa.next() => { m.ok_or_else(|| anyhow::anyhow!("probe sender closed"))??; }
            m = wb.next() => {
                let m = m.ok_or_else(|| anyhow::anyhow!("probe reader closed"))??;
                if let Message::Text(t) = m {
                    let v: Value = serde_json::from_str(t.as_str()).unwrap_or_default();
                    if v["event"] == "message"
                        && let Some(at) = v["data"]["message"]["text"]
                            .as_str()
                            .and_then(|s| s.split(':').nth(2))
                            .and_then(|s| s.parse::<u64>().ok())
                    {
                        let now = micros(probe.start.elapsed());
                        let lat = now.saturating_sub(at).max(1);
                        probe.record(at, lat);
                        probe.delivered.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }
    }
}

/// Opens sessions for users `{prefix}{i}`, `i` in `range`, at most 128 handshakes at a time;
/// the sessions, and the failures by kind.
async fn open_many(
    run: &RunConfig,
    prefix: &str,
    range: std::ops::Range<usize>,
) -> (Vec<Ws>, HashMap<String, u64>) {
    let results = futures::stream::iter(range)
        .map(|i| async move { connect(run, i, &format!("{prefix}{i}")).await })
        .buffered(128)
        .collect::<Vec<_>>()
        .await;
    let mut sessions = Vec::with_capacity(results.len());
    let mut failed: HashMap<String, u64> = HashMap::new();
    for r in results {
        match r {
            Ok(ws) => sessions.push(ws),
            Err(e) => *failed.entry(crate::error_kind(&e)).or_default() += 1,
        }
    }
    (sessions, failed)
}

/// ", N failed to connect (kinds)" or nothing.
fn failed_text(failed: &HashMap<String, u64>) -> String {
    if failed.is_empty() {
        String::new()
    } else {
        let n: u64 = failed.values().sum();
        format!(", {n} failed to connect ({})", errors_text(failed))
    }
}

/// Sends 1 KB messages into `room` for `phase`, up to `window` unanswered; (acked, errors).
async fn flood(
    ws: &mut Ws,
    room: &Value,
    phase: Duration,
    window: u64,
) -> anyhow::Result<(u64, HashMap<String, u64>)> {
    let until = Instant::now() + phase;
    let text = "f".repeat(1024);
    let (mut sent, mut answered, mut acked) = (0u64, 0u64, 0u64);
    let mut errors: HashMap<String, u64> = HashMap::new();
    let started = Instant::now();
    // When the acknowledgements came, in 250 ms windows from the start (for the timeline).
    let mut acks: BTreeMap<u64, u64> = BTreeMap::new();
    loop {
        while sent - answered < window && Instant::now() < until {
            sent += 1;
            let f = json!({"id": sent, "op": "send", "room": room, "text": text});
            ws.send(Message::text(f.to_string())).await?;
        }
        if answered == sent {
            break;
        }
        let m = tokio::time::timeout(Duration::from_secs(10), ws.next())
            .await?
            .ok_or_else(|| anyhow::anyhow!("flooder closed"))??;
        if let Message::Text(t) = m {
            let v: Value = serde_json::from_str(t.as_str())?;
            if v["type"] == "reply" && v["id"].is_u64() {
                answered += 1;
                if v["ok"] == true {
                    acked += 1;
                    *acks
                        .entry(started.elapsed().as_millis() as u64 / 250)
                        .or_default() += 1;
                } else {
                    let code = v["error"]["code"].as_str().unwrap_or("unknown").to_owned();
                    *errors.entry(code).or_default() += 1;
                }
            }
        }
    }
    let acks: Vec<String> = acks
        .iter()
        .map(|(w, n)| format!("+{:.2} s: {n}", *w as f64 * 0.25))
        .collect();
    eprintln!("abuse: flood acknowledgements by time: {}", acks.join(", "));
    Ok((acked, errors))
}

fn errors_text(errors: &HashMap<String, u64>) -> String {
    if errors.is_empty() {
        return "no errors".into();
    }
    let mut v: Vec<_> = errors.iter().map(|(k, n)| format!("{k} {n}")).collect();
    v.sort();
    v.join(", ")
}

async fn never_read(
    run: &RunConfig,
    silent: usize,
    phase: Duration,
    probe: &Probe,
) -> anyhow::Result<String> {
    let mut owner = connect(run, 0, "nr-owner").await?;
    let (readers, failed) = open_many(run, "nr-silent-", 0..silent).await;
    anyhow::ensure!(
        !readers.is_empty() || silent == 0,
        "no silent member connected{}",
        failed_text(&failed)
    );
    let members: Vec<String> = (0..silent).map(|i| format!("nr-silent-{i}")).collect();
    let room = request(
        &mut owner,
        "g",
        json!({"op": "create_group", "name": "never read", "members": members}),
    )
    .await?["room"]["id"]
        .clone();
    let (acked, errors) = flood(&mut owner, &room, phase, 64).await?;
    // The attack ends with the flood. Reading what the silent members were sent (500 × 366 KB
    // through 500 WebSocket decoders, in this process, on the server's cores) is the harness's
    // own work: the probe's messages from here on are reported apart.
    probe.end_window();
    // What did the server do with the silent ones? Read what they were sent, to the end.
    let cut = Arc::new(AtomicU64::new(0));
    let framed = Arc::new(AtomicU64::new(0));
    let open = Arc::new(AtomicU64::new(0));
    let tasks: Vec<_> = readers
        .into_iter()
        .map(|mut ws| {
            let (cut, framed, open) = (cut.clone(), framed.clone(), open.clone());
            tokio::spawn(async move {
                loop {
                    match tokio::time::timeout(Duration::from_secs(2), ws.next()).await {
                        Ok(Some(Ok(Message::Close(Some(f))))) if u16::from(f.code) == 1008 => {
                            framed.fetch_add(1, Ordering::Relaxed);
                            cut.fetch_add(1, Ordering::Relaxed);
                            return;
                        }
                        Ok(Some(Ok(_))) => {}
                        // Closed without a close frame: the server could not write one into a
                        // socket that was full.
                        Ok(_) => {
                            cut.fetch_add(1, Ordering::Relaxed);
                            return;
                        }
                        Err(_) => {
                            open.fetch_add(1, Ordering::Relaxed);
                            return;
                        }
                    }
                }
            })
        })
        .collect();
    for t in tasks {
        let _ = t.await;
    }
    let _ = owner.close(None).await;
    Ok(format!(
        "{silent} members never read while the owner sent {acked} × 1 KB ({}/s; {}); \
         {} cut off by the server ({} of them got the 1008 close frame, the others' sockets \
         were full), {} still open{}",
        acked / phase.as_secs().max(1),
        errors_text(&errors),
        cut.load(Ordering::Relaxed),
        framed.load(Ordering::Relaxed),
        open.load(Ordering::Relaxed),
        failed_text(&failed)
    ))
}

async fn slowloris(
    run: &RunConfig,
    port: u16,
    n: usize,
    phase: Duration,
) -> anyhow::Result<String> {
    let started = Instant::now();
    let until = started + phase;
    let closed_at = Arc::new(parking_lot::Mutex::new(Vec::<Duration>::new()));
    let mut tasks = Vec::new();
    for i in 0..n {
        let closed_at = closed_at.clone();
        let token = crate::token(&run.secret, &format!("sl-{i}"))?;
        let sources = run.sources.max(1);
        tasks.push(tokio::spawn(async move {
            let req = format!(
                "GET /ws?token={token} HTTP/1.1\r\nhost: 127.0.0.1\r\nupgrade: websocket\r\n\
                 connection: upgrade\r\nsec-websocket-version: 13\r\n\
                 sec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
            );
            let sock = tokio::net::TcpSocket::new_v4().ok()?;
            let src = std::net::IpAddr::from([127, 0, 0, 1 + (i % usize::from(sources)) as u8]);
            sock.bind(std::net::SocketAddr::new(src, 0)).ok()?;
            let mut s = sock
                .connect(std::net::SocketAddr::from(([127, 0, 0, 1], port)))
                .await
                .ok()?;
            let mut buf = [0u8; 512];
            for b in req.bytes() {
                if Instant::now() >= until {
                    return None;
                }
                if s.write_all(&[b]).await.is_err() {
                    break;
                }
                // A closed connection shows as a read of 0 (or an error) within the pause.
                let read = tokio::time::timeout(Duration::from_millis(250), s.read(&mut buf)).await;
                if let Ok(Ok(0) | Err(_)) = read {
                    break;
                }
            }
            closed_at.lock().push(started.elapsed());
            Some(())
        }));
    }
    // Half as many sessions dribbling one WebSocket frame.
    let frames = n / 2;
    let (sessions, failed) = open_many(run, "sl-frame-", 0..frames).await;
    let frame_closed = Arc::new(parking_lot::Mutex::new(Vec::<Duration>::new()));
    let frames_from = Instant::now();
    let mut frame_tasks = Vec::new();
    for ws in sessions {
        let frame_closed = frame_closed.clone();
        frame_tasks.push(tokio::spawn(async move {
            let mut ws = ws;
            // A masked 4 KB text frame: FIN|text, MASK|126, length, mask key, payload. The
            // client never answers the server's pings either (a pong is a frame).
            let mut frame = vec![0x81, 0x80 | 126, 0x10, 0x00, 1, 2, 3, 4];
            frame.extend(std::iter::repeat_n(b'x' ^ 1, 4096));
            let mut buf = [0u8; 512];
            for b in frame {
                if Instant::now() >= until {
                    return;
                }
                let s = ws.get_mut();
                if s.write_all(&[b]).await.is_err() {
                    break;
                }
                let read = tokio::time::timeout(Duration::from_millis(250), s.read(&mut buf)).await;
                if let Ok(Ok(0) | Err(_)) = read {
                    break;
                }
            }
            frame_closed.lock().push(frames_from.elapsed());
        }));
    }
    let mut times = Vec::new();
    for t in tasks {
        let _ = t.await;
    }
    for t in frame_tasks {
        let _ = t.await;
    }
    times.extend(closed_at.lock().iter().copied());
    let (closed, median) = median_of(times);
    let (fclosed, fmedian) = median_of(frame_closed.lock().clone());
    Ok(format!(
        "{n} request heads sent a byte per 250 ms: {closed} closed by the server (median after \
         {median:.1} s; PALAVER_HEADER_TIMEOUT_SECS=5); {frames} sessions sending a 4 KB frame \
         a byte per 250 ms and never answering pings: {fclosed} closed (median after \
         {fmedian:.1} s; PALAVER_PING_INTERVAL_SECS=3){}",
        failed_text(&failed)
    ))
}

/// How many, and the median in seconds.
fn median_of(mut times: Vec<Duration>) -> (usize, f64) {
    times.sort();
    let n = times.len();
    (n, times.get(n / 2).map_or(0.0, Duration::as_secs_f64))
}

/// Sessions the server counts now (`palaver_connections`, all dialects).
async fn server_sessions(port: u16) -> Option<f64> {
    sessions_at(&format!("127.0.0.1:{port}")).await
}

/// Sessions the Palaver server at `host:port` counts now; `None` when it does not say within
/// 2 s (the Node peer has no `/metrics`, and its HTTP server never answers a path that is not
/// Socket.IO's).
pub(crate) async fn sessions_at(authority: &str) -> Option<f64> {
    let get = async {
        reqwest::get(format!("http://{authority}/metrics"))
            .await
            .ok()?
            .text()
            .await
            .ok()
    };
    let text = tokio::time::timeout(Duration::from_secs(2), get)
        .await
        .ok()??;
    let mut total = None;
    for line in text.lines() {
        if line.starts_with("palaver_connections{")
            && let Some(v) = line.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok())
        {
            *total.get_or_insert(0.0) += v;
        }
    }
    total
}

async fn connect_drop(
    run: &RunConfig,
    port: u16,
    n: usize,
    phase: Duration,
) -> anyhow::Result<String> {
    let before = server_sessions(port).await.unwrap_or(0.0);
    let t = Instant::now();
    let (sessions, failed) = open_many(run, "cd-", 0..n).await;
    let opened = t.elapsed();
    let n = sessions.len();
    for ws in &sessions {
        // A reset, not a goodbye.
        let _ = ws.get_ref().set_zero_linger();
    }
    let dropped = Instant::now();
    drop(sessions);
    let mut gone = None;
    while dropped.elapsed() < phase {
        if server_sessions(port).await.is_some_and(|s| s <= before) {
            gone = Some(dropped.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    if let Some(rest) = phase.checked_sub(dropped.elapsed()) {
        tokio::time::sleep(rest).await;
    }
    Ok(format!(
        "{n} sessions opened in {:.1} s ({:.0}/s{}), then reset at once: {}",
        opened.as_secs_f64(),
        n as f64 / opened.as_secs_f64().max(1e-9),
        failed_text(&failed),
        gone.map_or("still counted at the end of the phase".into(), |g| format!(
            "the server counted them gone after {:.0} ms",
            g.as_secs_f64() * 1000.0
        ))
    ))
}

#[allow(clippy::too_many_arguments)]
async fn big_group(
    run: &RunConfig,
    port: u16,
    admin: &str,
    members: usize,
    online: usize,
    phase: Duration,
    probe: &Probe,
    rss: &Rss,
) -> anyhow::Result<String> {
    let set_up = Instant::now();
    let http = reqwest::Client::new();
    let name = |i: usize| format!("bg-{i}");
    // Import the users (the admin API takes bodies up to the frame limit: 1,000 at a time).
    for chunk in (0..members).collect::<Vec<_>>().chunks(1000) {
        let users: Vec<Value> = chunk.iter().map(|&i| json!({"id": name(i)})).collect();
        let r = http
            .put(format!("http://127.0.0.1:{port}/v1/admin/users"))
            .bearer_auth(admin)
            .json(&users)
            .send()
            .await?;
        anyhow::ensure!(r.status().is_success(), "import refused: {}", r.status());
    }
    let mut owner = connect(run, 0, &name(0)).await?;
    let room = request(
        &mut owner,
        "g",
        json!({"op": "create_group", "name": "big", "members": []}),
    )
    .await?["room"]["id"]
        .clone();
    for (k, chunk) in (1..members).collect::<Vec<_>>().chunks(1000).enumerate() {
        let users: Vec<String> = chunk.iter().map(|&i| name(i)).collect();
        request(
            &mut owner,
            &format!("add{k}"),
            json!({"op": "add_members", "room": room, "users": users}),
        )
        .await?;
    }
    let connecting = Instant::now();
    let (readers, failed) = open_many(run, "bg-", 1..online + 1).await;
    let connecting = connecting.elapsed();
    let online = readers.len();
    let set_up = set_up.elapsed();
    // The set-up (imports, member events) is not the attack: measure from here.
    tokio::time::sleep(Duration::from_secs(2)).await;
    probe.take();
    rss.take();
    let delivered = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let tasks: Vec<_> = readers
        .into_iter()
        .map(|mut ws| {
            let (delivered, stop) = (delivered.clone(), stop.clone());
            tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    match tokio::time::timeout(Duration::from_millis(500), ws.next()).await {
                        Ok(Some(Ok(Message::Text(t)))) => {
                            if t.as_str().contains("\"event\":\"message\"") {
                                delivered.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                        Ok(Some(Ok(_))) | Err(_) => {}
                        Ok(_) => return,
                    }
                }
            })
        })
        .collect();
    let t = Instant::now();
    let (acked, errors) = flood(&mut owner, &room, phase, 16).await?;
    let secs = t.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        let _ = t.await;
    }
    let _ = owner.close(None).await;
    let d = delivered.load(Ordering::Relaxed);
    Ok(format!(
        "{members} members ({online} online, connected in {:.1} s{}; set up in {:.0} s); one \
         sender: {acked} messages acknowledged in {secs:.1} s ({:.0}/s; {}), {d} delivered \
         ({:.0}/s, {:.1}% of acknowledged × online)",
        connecting.as_secs_f64(),
        failed_text(&failed),
        set_up.as_secs_f64(),
        acked as f64 / secs.max(1e-9),
        errors_text(&errors),
        d as f64 / secs.max(1e-9),
        100.0 * d as f64 / (acked as f64 * online as f64).max(1.0)
    ))
}

/// The phases as a Markdown table.
pub fn render(report: &AbuseReport) -> String {
    let (phases, machine) = (&report.phases, &report.machine);
    let mb = |b: u64| format!("{:.0} MB", b as f64 / 1_048_576.0);
    let ms = |us: u64| format!("{:.1}", us as f64 / 1000.0);
    let base = phases.first().map_or(0, |p| p.probe.p99);
    let mut priority = if PROBE_RAISED.load(Ordering::SeqCst) {
        format!("the probe's thread at nice {PROBE_NICE}")
    } else {
        "the probe's thread at the default priority (raising it needs root)".to_owned()
    };
    match ATTACKERS_NICE.load(Ordering::SeqCst) {
        0 => priority.push_str(", the attackers' client threads at nice 0 like the server"),
        n => priority.push_str(&format!(
            ", the attackers' client threads at nice {n}, the server at 0"
        )),
    }
    let mut out = format!(
        "Machine: {machine}; {priority}. Probe latency is send-to-deliver in ms; ratio is the \
         phase's p99 over the baseline's.\n\n\
         | phase | probe p50 / p99 / max | p99 ratio | samples | server peak RSS | RSS after | peak kernel TCP buffers (machine) | peak server send queues | what happened |\n\
         |---|---|---|---|---|---|---|---|---|\n"
    );
    for p in phases {
        let after = p.probe_after.as_ref().map_or_else(String::new, |a| {
            format!(
                "; afterwards, while this harness read what they had been sent (not in the \
                 probe's figures): probe p50 / p99 / max {} / {} / {} ms over {} samples",
                ms(a.p50),
                ms(a.p99),
                ms(a.max),
                a.count
            )
        });
        out.push_str(&format!(
            "| {} | {} / {} / {} | {:.2} | {} | {} | {} | {} | {} | {}{after} |\n",
            p.name,
            ms(p.probe.p50),
            ms(p.probe.p99),
            ms(p.probe.max),
            p.probe.p99 as f64 / base.max(1) as f64,
            p.probe.count,
            mb(p.peak_rss),
            mb(p.rss_after),
            mb(p.peak_tcp_buffers),
            p.peak_send_queues.map_or_else(|| "-".into(), mb),
            p.attack
        ));
    }
    out.push_str(&format!(
        "\nProbe messages over the whole run: {} sent, {} never delivered.\n",
        report.probe_sent, report.probe_lost
    ));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::{TcpListener, TcpStream};

    /// What the probe sends after a phase's window ended is kept apart from the phase's
    /// figures, and the next phase starts with an open window.
    #[test]
    fn a_probe_message_sent_after_the_window_is_kept_apart() {
        let probe = Probe {
            start: Instant::now(),
            hist: parking_lot::Mutex::new(histogram().expect("histogram")),
            slow: parking_lot::Mutex::new(Vec::new()),
            phase_at: AtomicU64::new(0),
            until: AtomicU64::new(u64::MAX),
            after: parking_lot::Mutex::new(histogram().expect("histogram")),
            sent: AtomicU64::new(0),
            delivered: AtomicU64::new(0),
            stop: AtomicBool::new(false),
            tasks: parking_lot::Mutex::new(Vec::new()),
            rt: parking_lot::Mutex::new(None),
        };
        probe.record(0, 1_000);
        assert!(probe.take_after().is_none(), "no window ended");
        probe.end_window();
        let until = probe.until.load(Ordering::SeqCst);
        probe.record(until, 2_000);
        probe.record(until + 1, 50_000);
        probe.record(until + 2, 60_000);
        let after = probe.take_after().expect("kept apart");
        assert_eq!(after.count, 2);
        assert!(after.max >= 60_000, "{after:?}");
        let phase = probe.take();
        assert_eq!(
            phase.count, 2,
            "sent within the window, delivered late or not"
        );
        assert!(phase.max < 10_000, "{phase:?}");
        assert!(
            probe.take_after().is_none(),
            "the next phase's window is open"
        );
        probe.record(until + 3, 3_000);
        assert_eq!(probe.take().count, 1);
    }

    #[tokio::test]
    async fn send_queues_count_what_the_peer_has_not_taken() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let _client = TcpStream::connect(("127.0.0.1", port))
            .await
            .expect("connect");
        let (mut server, _) = listener.accept().await.expect("accept");
        assert_eq!(send_queues(port), 0, "nothing written yet");
        // The client never reads: once its receive window is full, the rest waits in the
        // server's send queue.
        let chunk = vec![7u8; 64 * 1024];
        let mut written = 0usize;
        while let Ok(Ok(())) =
            tokio::time::timeout(Duration::from_millis(200), server.write_all(&chunk)).await
        {
            written += chunk.len();
        }
        let queued = send_queues(port);
        assert!(queued > 0, "{written} bytes written, none queued");
        assert!(
            queued as usize <= written + chunk.len(),
            "{queued} > {written}"
        );
    }
}
