//! `palaver-load bench`: the standard suite against a freshly started `palaver serve` (and the
//! Node.js Socket.IO peer when it is installed), written to `load/RESULTS.md`.
//!
//! It builds nothing: it starts the given release binary on a free loopback port with a
//! temporary data directory and a generated secret, runs each workload in turn, reads the
//! server's RSS and CPU (utime + stime of the server's pid, so the load generator's own CPU is
//! not counted), stops the server, and renders the numbers, the machine, the commit and the
//! command, and a comparison with the bar set in the load issue.

use crate::{Protocol, Report, RoomKind, RunConfig, Workload, proc_stats, run, table};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

/// Sizes of the suite's workloads.
#[derive(Clone, Debug)]
pub struct Sizes {
    /// `dm`: clients.
    pub dm_clients: usize,
    /// `dm`: messages per second per client.
    pub dm_rate: f64,
    /// `group`: clients.
    pub group_clients: usize,
    /// `group`: members per room.
    pub group_size: usize,
    /// `group`: messages per second per client.
    pub group_rate: f64,
    /// Seconds of sending for `dm` and `group` (both servers).
    pub seconds: u64,
    /// `idle`: sessions held.
    pub idle_sessions: usize,
    /// `idle`: seconds held.
    pub idle_seconds: u64,
    /// `connect-storm`: sessions opened.
    pub connect_storm: usize,
    /// `reconnect-storm`: sessions held.
    pub storm_clients: usize,
    /// `reconnect-storm`: sessions dropped and reconnected.
    pub storm_drop: usize,
    /// `reconnect-storm`: messages per second per client (the trickle).
    pub storm_rate: f64,
    /// `reconnect-storm`: seconds.
    pub storm_seconds: u64,
    /// Clients of the durable-send run at 20 messages/s each (1,000 for 20,000 messages/s);
    /// 0 skips it.
    pub ack_clients: usize,
}

impl Sizes {
    /// The standard suite (a few minutes).
    pub fn full() -> Self {
        Self {
            dm_clients: 200,
            dm_rate: 20.0,
            group_clients: 200,
            group_size: 10,
            group_rate: 10.0,
            seconds: 10,
            idle_sessions: 10_000,
            idle_seconds: 40,
            connect_storm: 10_000,
            storm_clients: 5_000,
            storm_drop: 2_000,
            storm_rate: 0.5,
            storm_seconds: 12,
            ack_clients: 1_000,
        }
    }

    /// About a minute.
    pub fn quick() -> Self {
        Self {
            dm_clients: 100,
            group_clients: 100,
            seconds: 4,
            idle_sessions: 2_000,
            idle_seconds: 3,
            connect_storm: 2_000,
            storm_clients: 1_000,
            storm_drop: 400,
            storm_rate: 1.0,
            storm_seconds: 6,
            ack_clients: 0,
            ..Self::full()
        }
    }
}

/// What `bench` needs.
#[derive(Clone, Debug)]
pub struct BenchConfig {
    /// The release `palaver` binary.
    pub palaver: PathBuf,
    /// Directory of the Node.js peer (`server.js`, `node_modules/`).
    pub peer_dir: PathBuf,
    /// Where to write the results.
    pub out: PathBuf,
    /// Workload sizes.
    pub sizes: Sizes,
    /// Loopback source addresses to spread connections over.
    pub sources: u8,
    /// Skip the peer even when it is installed.
    pub skip_peer: bool,
    /// The command line, recorded in the results.
    pub command: String,
}

/// One measured run.
#[derive(Debug)]
pub struct Row {
    /// What ran.
    pub name: String,
    /// `palaver` or `node peer`.
    pub server: &'static str,
    /// The numbers.
    pub report: Report,
}

/// A server process the bench started; killed if dropped.
pub(crate) struct Server {
    child: tokio::process::Child,
    pub(crate) pid: u32,
    port: u16,
    log: PathBuf,
}

pub(crate) fn free_port() -> anyhow::Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}

pub(crate) fn random_secret() -> anyhow::Result<String> {
    use std::io::Read as _;
    let mut b = [0u8; 24];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut b)?;
    Ok(b.iter().map(|x| format!("{x:02x}")).collect())
}

impl Server {
    pub(crate) async fn start(
        mut cmd: tokio::process::Command,
        port: u16,
        log: PathBuf,
    ) -> anyhow::Result<Self> {
        let out = std::fs::File::create(&log)?;
        cmd.stdout(out.try_clone()?)
            .stderr(out)
            .stdin(Stdio::null())
            .kill_on_drop(true);
        let mut child = cmd.spawn()?;
        let pid = child
            .id()
            .ok_or_else(|| anyhow::anyhow!("server exited at once"))?;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = child.try_wait()? {
                let text = std::fs::read_to_string(&log).unwrap_or_default();
                anyhow::bail!("server exited with {status}: {text}");
            }
            if tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_ok()
            {
                return Ok(Self {
                    child,
                    pid,
                    port,
                    log,
                });
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "server did not listen on port {port} within 30 s (log: {})",
                log.display()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// SIGTERM, then SIGKILL after 10 s.
    pub(crate) async fn stop(mut self) -> anyhow::Result<()> {
        let _sent = tokio::process::Command::new("kill")
            .arg("-TERM")
            .arg(self.pid.to_string())
            .status()
            .await;
        if tokio::time::timeout(Duration::from_secs(10), self.child.wait())
            .await
            .is_err()
        {
            self.child.kill().await?;
        }
        Ok(())
    }
}

/// `VmHWM` (peak RSS) of a process, bytes.
fn peak_rss(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kb: u64 = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    Some(kb * 1024)
}

fn shell(cmd: &str, args: &[&str]) -> Option<String> {
    let out = std::process::Command::new(cmd).args(args).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// The machine, as a sentence.
pub(crate) fn machine() -> String {
    let cores = shell("nproc", &[]).unwrap_or_else(|| "?".into());
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find(|l| l.starts_with("MemTotal:"))?
                .split_whitespace()
                .nth(1)?
                .parse::<f64>()
                .ok()
        })
        .map_or("?".into(), |kb| format!("{:.1} GiB", kb / 1_048_576.0));
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let kernel = shell("uname", &["-r"]).unwrap_or_else(|| "?".into());
    format!("{cores} cores ({cpu}), {mem} RAM, Linux {kernel}")
}

fn commit() -> String {
    let head = shell("git", &["rev-parse", "--short", "HEAD"]).unwrap_or_else(|| "unknown".into());
    let dirty = shell("git", &["status", "--porcelain"]).is_some_and(|s| !s.is_empty());
    if dirty { format!("{head}-dirty") } else { head }
}

/// Why the peer cannot run, if it cannot.
fn peer_missing(dir: &Path) -> Option<String> {
    if shell("node", &["--version"]).is_none() {
        return Some("`node` is not on PATH".into());
    }
    if !dir.join("server.js").is_file() {
        return Some(format!("{} has no server.js", dir.display()));
    }
    for p in ["socket.io", "jsonwebtoken"] {
        if !dir
            .join("node_modules")
            .join(p)
            .join("package.json")
            .is_file()
        {
            return Some(format!(
                "npm package `{p}` is not installed (run `npm ci --prefix {}`)",
                dir.display()
            ));
        }
    }
    None
}

/// Runs the suite and writes the results file; returns the rows.
pub async fn bench(cfg: BenchConfig) -> anyhow::Result<Vec<Row>> {
    anyhow::ensure!(
        cfg.palaver.is_file(),
        "{} not found: build it first with `cargo build --release -p palaver-gateway`",
        cfg.palaver.display()
    );
    let s = &cfg.sizes;
    let secret = random_secret()?;
    let dir = tempfile::tempdir()?;
    let data = dir.path().join("data");
    std::fs::create_dir_all(&data)?;
    let mut rows = Vec::new();

    // Palaver, native protocol.
    let port = free_port()?;
    let mut cmd = tokio::process::Command::new(&cfg.palaver);
    cmd.arg("serve");
    for (k, _) in std::env::vars() {
        if k.starts_with("PALAVER_") {
            cmd.env_remove(k);
        }
    }
    cmd.env("PALAVER_HTTP_ADDR", format!("127.0.0.1:{port}"))
        .env("PALAVER_DATA_DIR", &data)
        .env("PALAVER_JWT_SECRET", &secret)
        // Throughput is under test, not the per-user rate limit (20/s by default).
        .env("PALAVER_MESSAGES_PER_SECOND", "100000")
        // Every client connects from a handful of loopback addresses: the per-address
        // connection limit (a protection against one host, not a capacity) is off.
        .env("PALAVER_MAX_CONNECTIONS_PER_IP", "0")
        .env("RUST_LOG", "warn");
    eprintln!(
        "bench: starting {} serve on 127.0.0.1:{port}",
        cfg.palaver.display()
    );
    let server = Server::start(cmd, port, dir.path().join("palaver.log")).await?;
    let base = RunConfig {
        url: format!("ws://127.0.0.1:{}/ws", server.port),
        secret: secret.clone(),
        sources: cfg.sources,
        server_pid: Some(server.pid),
        ..RunConfig::default()
    };
    let cpu_start = proc_stats(server.pid).map(|p| p.1);
    let mut plan: Vec<(String, RunConfig)> = vec![
        (
            format!(
                "idle, {} sessions held {} s",
                s.idle_sessions, s.idle_seconds
            ),
            RunConfig {
                workload: Workload::Idle,
                clients: s.idle_sessions,
                duration: Duration::from_secs(s.idle_seconds),
                prefix: "idle-".into(),
                ..base.clone()
            },
        ),
        (
            format!("connect-storm, {} sessions", s.connect_storm),
            RunConfig {
                workload: Workload::ConnectStorm,
                clients: s.connect_storm,
                prefix: "cstorm-".into(),
                ..base.clone()
            },
        ),
    ];
    let chat = |proto: Protocol, url: String, pid: Option<u32>, tag: &str| {
        vec![
            (
                format!(
                    "dm, {} clients x {}/s, {} s",
                    s.dm_clients, s.dm_rate, s.seconds
                ),
                RunConfig {
                    url: url.clone(),
                    protocol: proto,
                    server_pid: pid,
                    workload: Workload::Dm,
                    clients: s.dm_clients,
                    rate: s.dm_rate,
                    duration: Duration::from_secs(s.seconds),
                    prefix: format!("{tag}dm-"),
                    ..base.clone()
                },
            ),
            (
                format!(
                    "group of {}, {} clients x {}/s, {} s",
                    s.group_size, s.group_clients, s.group_rate, s.seconds
                ),
                RunConfig {
                    url,
                    protocol: proto,
                    server_pid: pid,
                    workload: Workload::Group,
                    clients: s.group_clients,
                    group_size: s.group_size,
                    rate: s.group_rate,
                    duration: Duration::from_secs(s.seconds),
                    prefix: format!("{tag}group-"),
                    ..base.clone()
                },
            ),
        ]
    };
    plan.extend(chat(
        Protocol::Native,
        base.url.clone(),
        base.server_pid,
        "",
    ));
    plan.push((
        format!(
            "reconnect-storm, {} of {} dm sessions x {}/s, {} s",
            s.storm_drop, s.storm_clients, s.storm_rate, s.storm_seconds
        ),
        RunConfig {
            workload: Workload::ReconnectStorm,
            clients: s.storm_clients,
            drop: s.storm_drop,
            rate: s.storm_rate,
            storm_rooms: RoomKind::Dm,
            duration: Duration::from_secs(s.storm_seconds),
            prefix: "rstorm-".into(),
            ..base.clone()
        },
    ));
    if s.ack_clients > 0 {
        plan.push((
            format!(
                "durable send, dm {} clients x 20/s, {} s",
                s.ack_clients, s.seconds
            ),
            RunConfig {
                workload: Workload::Dm,
                clients: s.ack_clients,
                rate: 20.0,
                duration: Duration::from_secs(s.seconds),
                prefix: "ack-".into(),
                ..base.clone()
            },
        ));
    }
    let mut result = run_plan(plan, "palaver", &mut rows).await;
    if result.is_ok() {
        // The same Socket.IO workload the peer gets, on Palaver's Syarah dialect.
        let sio = chat(
            Protocol::Socketio,
            format!("ws://127.0.0.1:{}/socket.io/", server.port),
            base.server_pid,
            "sio",
        );
        result = run_plan(sio, "palaver socket.io", &mut rows).await;
    }
    let cpu_total = proc_stats(server.pid)
        .map(|p| p.1)
        .zip(cpu_start)
        .map(|(a, b)| a - b);
    let peak = peak_rss(server.pid);
    if let Err(e) = &result {
        let log = std::fs::read_to_string(&server.log).unwrap_or_default();
        eprintln!("bench: server log:\n{log}");
        eprintln!("bench: run failed: {e:#}");
    }
    server.stop().await?;
    result?;

    // The Node.js peer, Socket.IO.
    let peer_skip = if cfg.skip_peer {
        Some("skipped with --skip-peer".to_owned())
    } else {
        peer_missing(&cfg.peer_dir)
    };
    let mut peer_version = None;
    if let Some(why) = &peer_skip {
        eprintln!("bench: skipping the Node.js Socket.IO peer: {why}");
    } else {
        let port = free_port()?;
        let mut cmd = tokio::process::Command::new("node");
        cmd.arg("server.js")
            .current_dir(&cfg.peer_dir)
            .env("PORT", port.to_string())
            .env("HOST", "127.0.0.1")
            .env("JWT_SECRET", &secret);
        eprintln!("bench: starting the Node.js peer on 127.0.0.1:{port}");
        let peer = Server::start(cmd, port, dir.path().join("peer.log")).await?;
        peer_version = shell("node", &["--version"]);
        let plan = chat(
            Protocol::Socketio,
            format!("ws://127.0.0.1:{port}/socket.io/"),
            Some(peer.pid),
            "sio",
        );
        let result = run_plan(plan, "node peer", &mut rows).await;
        if let Err(e) = &result {
            let log = std::fs::read_to_string(&peer.log).unwrap_or_default();
            eprintln!("bench: peer log:\n{log}\nbench: peer run failed: {e:#}");
        }
        peer.stop().await?;
        result?;
    }
    let md = render(
        &cfg,
        &rows,
        cpu_total,
        peak,
        peer_skip.as_deref(),
        peer_version,
    );
    std::fs::write(&cfg.out, md)?;
    eprintln!("bench: wrote {}", cfg.out.display());
    Ok(rows)
}

async fn run_plan(
    plan: Vec<(String, RunConfig)>,
    server: &'static str,
    rows: &mut Vec<Row>,
) -> anyhow::Result<()> {
    for (name, c) in plan {
        eprintln!("bench: {server}: {name} ...");
        let url = c.url.clone();
        let report = run(c, false).await?;
        eprint!("{}", table(&report));
        rows.push(Row {
            name,
            server,
            report,
        });
        settle(&url).await;
    }
    Ok(())
}

/// Waits until the server counts none of the previous run's sessions (at most 15 s), so that
/// their teardowns (a limited number run at once) are not charged to the next run; a server
/// without `/metrics` (the Node peer) gets 1 s.
async fn settle(url: &str) {
    let authority = url
        .split("://")
        .nth(1)
        .and_then(|rest| rest.split('/').next())
        .unwrap_or_default()
        .to_owned();
    let until = std::time::Instant::now() + Duration::from_secs(15);
    tokio::time::sleep(Duration::from_millis(200)).await;
    while std::time::Instant::now() < until {
        match crate::abuse::sessions_at(&authority).await {
            Some(n) if n > 0.0 => tokio::time::sleep(Duration::from_millis(100)).await,
            Some(_) => break,
            None => {
                tokio::time::sleep(Duration::from_millis(800)).await;
                break;
            }
        }
    }
    // A moment for the last teardowns' store writes.
    tokio::time::sleep(Duration::from_millis(300)).await;
}

fn ms(us: u64) -> String {
    format!("{:.2}", us as f64 / 1000.0)
}

fn thousands(x: f64) -> String {
    let n = x.round() as i64;
    let s = n.abs().to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    if n < 0 { format!("-{out}") } else { out }
}

fn cpu_cell(r: &Report) -> String {
    r.server_cpu_seconds.map_or("-".into(), |c| {
        format!(
            "{c:.2} s ({:.0}% of a core)",
            100.0 * c / r.seconds.max(1e-9)
        )
    })
}

fn more_cell(r: &Report) -> String {
    let mut parts = Vec::new();
    if let Some(b) = r.rss_per_session_bytes {
        parts.push(format!("RSS/session {} B", thousands(b)));
    }
    if let Some(us) = r.idle_cpu_us_per_session_second {
        parts.push(format!("CPU/idle session {us:.2} us/s"));
    }
    if r.workload == Some(Workload::ConnectStorm) || r.workload == Some(Workload::Idle) {
        parts.push(format!(
            "{} sessions/s, connect p50/p99/max {} / {} / {} ms",
            thousands(r.connects_per_second),
            ms(r.connect_us.p50),
            ms(r.connect_us.p99),
            ms(r.connect_us.max)
        ));
    }
    if r.dropped > 0 {
        let l = &r.reconnect_us;
        parts.push(format!(
            "{} dropped, {} reconnected at {} /s; reconnect p50/p90/p99/p99.9/max {} / {} / {} / {} / {} ms; catch-up p50/p99 {} / {} ms; {} recovered by history",
            r.dropped,
            r.reconnected,
            thousands(r.reconnects_per_second),
            ms(l.p50),
            ms(l.p90),
            ms(l.p99),
            ms(l.p999),
            ms(l.max),
            ms(r.catchup_us.p50),
            ms(r.catchup_us.p99),
            r.recovered
        ));
    }
    if let Some(n) = r.listen_overflows.filter(|n| *n > 0) {
        parts.push(format!("{n} listen-queue overflows (machine-wide)"));
    }
    if let Some(f) = r.delivered_per_cpu_second()
        && r.delivered > 0
    {
        parts.push(format!("{} deliveries per server CPU-s", thousands(f)));
    }
    parts.join("; ")
}

fn errors_cell(r: &Report) -> String {
    if r.errors.is_empty() {
        return "0".into();
    }
    let mut e: Vec<_> = r.errors.iter().collect();
    e.sort();
    e.iter()
        .map(|(k, v)| format!("{k}: {v}"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn latency_cell(l: &crate::Latency) -> String {
    if l.count == 0 {
        return "-".into();
    }
    format!(
        "{} / {} / {} / {}",
        ms(l.p50),
        ms(l.p99),
        ms(l.p999),
        ms(l.max)
    )
}

fn find<'a>(rows: &'a [Row], server: &str, w: Workload) -> Option<&'a Report> {
    rows.iter()
        .find(|r| r.server == server && r.report.workload == Some(w))
        .map(|r| &r.report)
}

fn yes_no(ok: bool) -> &'static str {
    if ok { "yes" } else { "no" }
}

/// Renders `RESULTS.md`.
fn render(
    cfg: &BenchConfig,
    rows: &[Row],
    server_cpu: Option<f64>,
    peak: Option<u64>,
    peer_skip: Option<&str>,
    peer_version: Option<String>,
) -> String {
    let mut o = String::new();
    let date = shell("date", &["-u", "+%Y-%m-%d %H:%M UTC"]).unwrap_or_else(|| "?".into());
    let _ = writeln!(o, "# palaver-load results\n");
    let _ = writeln!(
        o,
        "Written by `palaver-load bench`; rerun it to refresh (benchmarks are not tests: CI runs only a smoke).\n"
    );
    let _ = writeln!(o, "- date: {date}");
    let _ = writeln!(o, "- commit: `{}`", commit());
    let _ = writeln!(o, "- command: `{}`", cfg.command);
    let _ = writeln!(o, "- machine: {}", machine());
    let _ = writeln!(
        o,
        "- server: `{} serve` (release), fresh temporary data directory, default settings (`full` durability), on a free loopback port; the load generator runs on the same machine. Server CPU is utime + stime of the server's pid from `/proc`, read before and after each run, so the load generator's CPU is not in it.{}",
        cfg.palaver.display(),
        match (server_cpu, peak) {
            (Some(c), Some(p)) => format!(
                " Over the whole suite the server used {c:.1} CPU-s and peaked at {:.0} MiB RSS.",
                p as f64 / 1_048_576.0
            ),
            _ => String::new(),
        }
    );
    let _ = writeln!(
        o,
        "- peer: {}",
        match (peer_skip, peer_version) {
            (Some(why), _) => format!("not run: {why}"),
            (None, v) => format!(
                "`load/peer-socketio` (Node.js {}, socket.io 4.8.4, default settings, one process), driven over Socket.IO v4 websocket transport",
                v.unwrap_or_default()
            ),
        }
    );
    let _ = writeln!(
        o,
        "- messages are {} bytes of text; senders are offset in phase so the offered load is steady. Latencies in ms.\n",
        RunConfig::default().message_bytes
    );
    let _ = writeln!(o, "## Runs\n");
    let _ = writeln!(
        o,
        "| run | server | protocol | clients | sent/s | delivered/s | lost | dup | errors | send->ack p50 / p99 / p99.9 / max | send->deliver p50 / p99 / p99.9 / max | server CPU | server RSS | more |"
    );
    let _ = writeln!(
        o,
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
    );
    for row in rows {
        let r = &row.report;
        let chat = r.rooms > 0;
        let per_s = |x: u64| {
            if chat {
                thousands(x as f64 / r.seconds.max(1e-9))
            } else {
                "-".into()
            }
        };
        let _ = writeln!(
            o,
            "| {} | {} | {:?} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            row.name,
            row.server,
            r.protocol,
            thousands(r.clients as f64),
            per_s(r.sent),
            per_s(r.delivered),
            if chat { r.lost.to_string() } else { "-".into() },
            if chat {
                r.duplicated.to_string()
            } else {
                "-".into()
            },
            errors_cell(r),
            latency_cell(&r.ack_us),
            latency_cell(&r.deliver_us),
            cpu_cell(r),
            r.server_rss_bytes
                .map_or("-".into(), |b| format!("{:.0} MiB", b as f64 / 1_048_576.0)),
            more_cell(r),
        );
    }

    let _ = writeln!(
        o,
        "\n`unacked`: sends still without a reply when the run's 3 s drain ended (the server fell behind the offered load); in such a run `lost` includes deliveries still queued at that moment. Listen-queue overflows (`TcpExt ListenOverflows`, machine-wide) each cost a client a 1 s SYN retransmit: they are where connect and reconnect tails near 1 s come from."
    );

    // Native vs the peer.
    let _ = writeln!(o, "\n## Palaver vs the Node.js Socket.IO peer\n");
    let mut peer_ratio: Option<(f64, bool)> = None;
    if peer_skip.is_some() {
        let _ = writeln!(o, "Not run: {}.", peer_skip.unwrap_or_default());
    } else {
        let _ = writeln!(
            o,
            "Same workload, same offered load, same load generator. At a fixed offered load both servers deliver about the same messages per second when they keep up, so the throughput comparison is deliveries per server CPU-second (the rate a server could reach per core). p99 ratio = Palaver's p99 / the peer's (below 1 is better for Palaver).\n"
        );
        let _ = writeln!(
            o,
            "| workload | Palaver protocol | delivered/s Palaver / peer | throughput ratio (delivered/s) | deliveries per server CPU-s Palaver / peer | efficiency ratio | send->deliver p99 Palaver / peer | p99 ratio | send->ack p99 Palaver / peer |"
        );
        let _ = writeln!(o, "|---|---|---|---|---|---|---|---|---|");
        for (w, proto, name) in [
            (Workload::Dm, "Socket.IO (same frames)", "palaver socket.io"),
            (
                Workload::Group,
                "Socket.IO (same frames)",
                "palaver socket.io",
            ),
            (Workload::Dm, "native", "palaver"),
            (Workload::Group, "native", "palaver"),
        ] {
            let (Some(a), Some(b)) = (find(rows, name, w), find(rows, "node peer", w)) else {
                continue;
            };
            let tput = |r: &Report| r.delivered as f64 / r.seconds.max(1e-9);
            let eff_a = a.delivered_per_cpu_second().unwrap_or(0.0);
            let eff_b = b.delivered_per_cpu_second().unwrap_or(0.0);
            let eff_ratio = eff_a / eff_b.max(1e-9);
            let p99_ratio = a.deliver_us.p99 as f64 / (b.deliver_us.p99.max(1)) as f64;
            if w == Workload::Group && name == "palaver socket.io" {
                peer_ratio = Some((eff_ratio, a.deliver_us.p99 <= b.deliver_us.p99));
            }
            let _ = writeln!(
                o,
                "| {w:?} | {proto} | {} / {} | {:.2}x | {} / {} | {:.1}x | {} / {} ms | {:.2} | {} / {} ms |",
                thousands(tput(a)),
                thousands(tput(b)),
                tput(a) / tput(b).max(1e-9),
                thousands(eff_a),
                thousands(eff_b),
                eff_ratio,
                ms(a.deliver_us.p99),
                ms(b.deliver_us.p99),
                p99_ratio,
                ms(a.ack_us.p99),
                ms(b.ack_us.p99),
            );
        }
        let _ = writeln!(
            o,
            "\nThe peer keeps messages in memory only and acknowledges before relaying; Palaver commits each message to its store (`full` durability) before acknowledging."
        );
    }

    // Against the bar.
    let _ = writeln!(o, "\n## Against the bar (issue 4)\n");
    let _ = writeln!(o, "| measure | target | measured | met? |");
    let _ = writeln!(o, "|---|---|---|---|");
    let idle = find(rows, "palaver", Workload::Idle);
    let fd_limit = rlimit::getrlimit(rlimit::Resource::NOFILE).map_or(0, |(soft, _)| soft);
    let _ = writeln!(
        o,
        "| idle sessions held | 250,000 now, 1,000,000 next | {} held | not measurable here: every \
         process is capped at {} open files (hard limit, which root may not raise on this \
         machine), so neither the server nor the load generator can hold more than that many \
         sockets |",
        idle.map_or("-".into(), |r| thousands(r.clients as f64)),
        thousands(fd_limit as f64)
    );
    let rss = idle.and_then(|r| r.rss_per_session_bytes);
    let _ = writeln!(
        o,
        "| server RSS per idle session | <= 4 KB | {} | {} |",
        rss.map_or("-".into(), |b| format!("{} B", thousands(b))),
        rss.map_or("not measured", |b| yes_no(b <= 4096.0))
    );
    let group = find(rows, "palaver", Workload::Group);
    let fan = group.and_then(Report::delivered_per_cpu_second);
    let _ = writeln!(
        o,
        "| fan-out, groups of {}, {}-byte messages | >= 1,000,000 frames delivered per server CPU-s | {} | {} |",
        cfg.sizes.group_size,
        RunConfig::default().message_bytes,
        fan.map_or("-".into(), thousands),
        match fan {
            Some(f) if cfg.sizes.group_size == 10 => yes_no(f >= 1e6),
            Some(_) => "not measured (group size is not 10)",
            None => "not measured",
        }
    );
    let dm = rows
        .iter()
        .find(|r| {
            r.server == "palaver"
                && r.report.workload == Some(Workload::Dm)
                && r.name.starts_with("dm")
        })
        .map(|r| &r.report);
    let _ = writeln!(
        o,
        "| latency at half the maximum rate | p99 send->deliver <= 10 ms | {} | {} |",
        dm.map_or("-".into(), |r| format!(
            "{} ms at {} msg/s (the suite's fixed rate; the maximum rate is not measured)",
            ms(r.deliver_us.p99),
            thousands(r.acked as f64 / r.seconds.max(1e-9))
        )),
        dm.map_or("not measured".into(), |r| format!(
            "{} at this rate",
            yes_no(r.deliver_us.p99 <= 10_000)
        ))
    );
    let durable = rows
        .iter()
        .find(|r| r.name.starts_with("durable send"))
        .map(|r| &r.report);
    let _ = writeln!(
        o,
        "| durable send | p99 send->ack <= 5 ms at 20,000 msg/s | {} | {} |",
        durable.map_or("-".into(), |r| format!(
            "{} ms at {} msg/s acknowledged",
            ms(r.ack_us.p99),
            thousands(r.acked as f64 / r.seconds.max(1e-9))
        )),
        durable.map_or("not measured (--quick)".into(), |r| {
            let rate = r.acked as f64 / r.seconds.max(1e-9);
            if rate < 19_000.0 {
                format!("no (reached {} msg/s)", thousands(rate))
            } else {
                yes_no(r.ack_us.p99 <= 5_000).into()
            }
        })
    );
    let _ = writeln!(
        o,
        "| one room with 200,000 online members | broadcast complete <= 200 ms p99 | - | not measurable here: 200,000 online members need 200,000 sockets, over the per-process open-file cap above |"
    );
    let _ = writeln!(
        o,
        "| versus the Node.js Socket.IO peer, same workload | >= 10x throughput at equal or better p99 | {} | {} |",
        peer_ratio.map_or("-".into(), |(r, p)| format!(
            "{r:.1}x deliveries per server CPU-s (groups of 10, the same Socket.IO frames to both), p99 {}",
            if p { "equal or better" } else { "worse" }
        )),
        peer_ratio.map_or("not measured", |(r, p)| yes_no(r >= 10.0 && p))
    );
    let _ = writeln!(
        o,
        "\nReproduce: `cargo build --release -p palaver-gateway -p palaver-load && npm ci --prefix load/peer-socketio && {}`",
        cfg.command
    );
    o
}
