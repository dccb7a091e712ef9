//! # palaver-load: the instrument that measures Palaver
//!
//! A run connects many clients (spread over several loopback source addresses to get past the
//! ephemeral-port limit), arranges them into rooms (`dm`: pairs; `group`: rooms of `group_size`),
//! then every client sends at a fixed rate for a fixed time, each client's sends offset in phase so
//! the offered load is steady rather than bursts of everyone at once. Each message carries its
//! sender, sequence number and send time in its text (padded to `message_bytes`), so receivers
//! measure send-to-deliver latency and detect loss and duplication; replies give send-to-ack
//! latency. The server's RSS and CPU come from `/proc/<pid>`. Everything is bounded in count and
//! time and targets loopback.
//!
//! Two protocols: Palaver's native one, and Socket.IO v4 (Engine.IO v4, websocket transport) with
//! the event vocabulary of the Node.js peer in `load/peer-socketio/` (`join`, `send` with an ack,
//! `message`). The Socket.IO framing is the few lines in [`socketio`], over the same sockets as
//! the native client, so both protocols are measured by the same code path.
//!
//! `reconnect-storm` holds sessions chatting at a trickle, drops `drop` of them abruptly (the TCP
//! socket closes without a WebSocket close frame), reconnects them all at the same instant, and
//! has each fetch what it missed with `history {after: <last message id seen>}`; a message that a
//! member neither got live nor by history counts as lost.
//!
//! Data flow: [`run`] -> one task per client (a loop over paced sends and incoming frames into
//! per-client counters and histograms) -> merged into a [`Report`]. [`bench`] runs a suite of
//! these against a freshly started server and writes `load/RESULTS.md`.

pub mod abuse;
pub mod bench;
mod socketio;

use futures::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use serde::Serialize;
use serde_json::{Value, json};
use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tokio::net::TcpSocket;
use tokio_tungstenite::tungstenite::Message;

/// What the clients do.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum Workload {
    /// Pairs chatting in direct rooms.
    Dm,
    /// Rooms of `group_size` members, every member sending.
    Group,
    /// Hold the sessions for the duration; report server memory per session and CPU per idle
    /// session per second.
    Idle,
    /// Open the sessions as fast as the server takes them; report connections per second.
    ConnectStorm,
    /// Chat at a trickle, drop `drop` sessions abruptly, reconnect them all at once and catch up
    /// with `history`; report reconnect latency and rate, and loss counted across the outage.
    ReconnectStorm,
}

/// The wire protocol the clients speak.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum Protocol {
    /// Palaver's native JSON protocol (`/ws`).
    #[default]
    Native,
    /// Socket.IO v4 with the peer's events (`/socket.io/`); `dm` and `group` only.
    Socketio,
}

/// How `reconnect-storm` arranges its clients into rooms.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum RoomKind {
    /// Direct rooms of two.
    #[default]
    Dm,
    /// Groups of `group_size`.
    Group,
}

/// One run's settings.
#[derive(Clone, Debug)]
pub struct RunConfig {
    /// `ws://host:port/ws` (native) or `ws://host:port/socket.io/` (Socket.IO); the host must be
    /// a loopback address.
    pub url: String,
    /// HS256 secret to mint tokens with.
    pub secret: String,
    /// What the clients do.
    pub workload: Workload,
    /// Wire protocol.
    pub protocol: Protocol,
    /// Number of clients (rounded down to whole rooms).
    pub clients: usize,
    /// Members per group room.
    pub group_size: usize,
    /// Messages per second per sending client.
    pub rate: f64,
    /// How long clients send.
    pub duration: Duration,
    /// Loopback source addresses to spread connections over (127.0.0.1 ..).
    pub sources: u8,
    /// Server process to read RSS and CPU from.
    pub server_pid: Option<u32>,
    /// User id prefix, so concurrent runs do not share users.
    pub prefix: String,
    /// Message text length in bytes (the header `sender:seq:time:` is padded up to it).
    pub message_bytes: usize,
    /// `reconnect-storm`: sessions dropped and reconnected.
    pub drop: usize,
    /// `reconnect-storm`: time between the drop and the reconnect.
    pub outage: Duration,
    /// `reconnect-storm`: room arrangement.
    pub storm_rooms: RoomKind,
}

impl Default for RunConfig {
    fn default() -> Self {
        Self {
            url: "ws://127.0.0.1:8080/ws".into(),
            secret: String::new(),
            workload: Workload::Dm,
            protocol: Protocol::Native,
            clients: 100,
            group_size: 10,
            rate: 10.0,
            duration: Duration::from_secs(10),
            sources: 8,
            server_pid: None,
            prefix: "load-".into(),
            message_bytes: 100,
            drop: 0,
            outage: Duration::from_secs(1),
            storm_rooms: RoomKind::Dm,
        }
    }
}

/// Latency summary in microseconds.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Latency {
    /// Samples.
    pub count: u64,
    /// Percentiles.
    pub p50: u64,
    /// 90th.
    pub p90: u64,
    /// 99th.
    pub p99: u64,
    /// 99.9th.
    pub p999: u64,
    /// Worst.
    pub max: u64,
}

impl Latency {
    fn of(h: &Histogram<u64>) -> Self {
        Self {
            count: h.len(),
            p50: h.value_at_quantile(0.5),
            p90: h.value_at_quantile(0.9),
            p99: h.value_at_quantile(0.99),
            p999: h.value_at_quantile(0.999),
            max: h.max(),
        }
    }
}

/// What a run measured.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Report {
    /// Workload.
    pub workload: Option<Workload>,
    /// Protocol.
    pub protocol: Protocol,
    /// Clients connected.
    pub clients: usize,
    /// Rooms.
    pub rooms: usize,
    /// Seconds of sending.
    pub seconds: f64,
    /// Messages sent.
    pub sent: u64,
    /// Messages acknowledged.
    pub acked: u64,
    /// Message events delivered live to clients (duplicates included).
    pub delivered: u64,
    /// Messages a member missed live and fetched with `history` after reconnecting.
    pub recovered: u64,
    /// Deliveries that never arrived: acknowledged messages a member got neither live nor by
    /// history.
    pub lost: u64,
    /// Deliveries that arrived twice.
    pub duplicated: u64,
    /// Errors by kind (error reply codes, connection failures).
    pub errors: HashMap<String, u64>,
    /// Send to acknowledgement.
    pub ack_us: Latency,
    /// Send to live delivery at the other members.
    pub deliver_us: Latency,
    /// Server resident memory at the end, bytes.
    pub server_rss_bytes: Option<u64>,
    /// Server CPU seconds used during the run.
    pub server_cpu_seconds: Option<f64>,
    /// Time to open one session (TCP, upgrade, authentication, registration).
    pub connect_us: Latency,
    /// Sessions opened per second.
    pub connects_per_second: f64,
    /// Server RSS growth per connected session, bytes (idle workload).
    pub rss_per_session_bytes: Option<f64>,
    /// Server CPU per idle session per second, microseconds (idle workload).
    pub idle_cpu_us_per_session_second: Option<f64>,
    /// Sessions dropped (reconnect-storm).
    pub dropped: usize,
    /// Dropped sessions that reconnected.
    pub reconnected: usize,
    /// From the reconnect instant to the session open again, retries included.
    pub reconnect_us: Latency,
    /// Reconnected sessions per second, from the reconnect instant to the last one open.
    pub reconnects_per_second: f64,
    /// From the reconnect instant to the missed messages fetched.
    pub catchup_us: Latency,
    /// Connections the kernel dropped because a listen queue was full during the run
    /// (`TcpExt ListenOverflows`, machine-wide): each costs the client a SYN retransmit (1 s).
    pub listen_overflows: Option<u64>,
}

impl Report {
    /// Live deliveries per server CPU-second, when the server's CPU was read.
    pub fn delivered_per_cpu_second(&self) -> Option<f64> {
        self.server_cpu_seconds
            .filter(|c| *c > 0.0)
            .map(|c| self.delivered as f64 / c)
    }
}

/// Reads `/proc/<pid>`: (RSS bytes, CPU seconds so far).
pub fn proc_stats(pid: u32) -> Option<(u64, f64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let rss_kb: u64 = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the ")" that closes the command name; utime and stime are 14 and 15.
    let rest = stat.rsplit_once(')')?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
    Some((rss_kb * 1024, ticks / 100.0))
}

/// Mints an HS256 token for `sub`, valid for an hour.
pub fn token(secret: &str, sub: &str) -> anyhow::Result<String> {
    let exp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs()
        + 3600;
    Ok(jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &json!({"sub": sub, "exp": exp, "name": sub}),
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
    )?)
}

type Ws = tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>;

/// Opens one session: TCP from a spread loopback source, WebSocket upgrade, and for Socket.IO
/// the Engine.IO open and namespace connect with the token.
async fn connect(cfg: &RunConfig, i: usize, user: &str) -> anyhow::Result<Ws> {
    let hostport = cfg
        .url
        .strip_prefix("ws://")
        .and_then(|r| r.split('/').next())
        .ok_or_else(|| anyhow::anyhow!("url must be ws://host:port/..."))?;
    let server: SocketAddr = tokio::net::lookup_host(hostport)
        .await?
        .next()
        .ok_or_else(|| anyhow::anyhow!("cannot resolve {hostport}"))?;
    anyhow::ensure!(
        server.ip().is_loopback(),
        "palaver-load only targets loopback addresses"
    );
    let token = token(&cfg.secret, user)?;
    let url = match cfg.protocol {
        Protocol::Native => format!("{}?token={token}", cfg.url),
        Protocol::Socketio => format!("{}?EIO=4&transport=websocket", cfg.url),
    };
    let socket = TcpSocket::new_v4()?;
    let source = IpAddr::from([127, 0, 0, 1 + (i % usize::from(cfg.sources.max(1))) as u8]);
    socket.bind(SocketAddr::new(source, 0))?;
    let stream = socket.connect(server).await?;
    stream.set_nodelay(true)?;
    let (mut ws, _) = tokio_tungstenite::client_async(url, stream).await?;
    if cfg.protocol == Protocol::Socketio {
        socketio::handshake(&mut ws, &token).await?;
    }
    Ok(ws)
}

/// Creates group `r` of `users` (the first owns it) over the native protocol at `/ws` of the
/// Socket.IO target's host; `None` when the server has no native protocol.
async fn create_group_natively(cfg: &RunConfig, r: usize, users: &[String]) -> Option<Value> {
    let base = cfg.url.split("/socket.io").next()?;
    let token = token(&cfg.secret, users.first()?).ok()?;
    let url = format!("{base}/ws?token={token}");
    let host = base.strip_prefix("ws://")?;
    let stream = tokio::net::TcpStream::connect(host).await.ok()?;
    let (mut ws, _) = tokio_tungstenite::client_async(url, stream).await.ok()?;
    let req = json!({"op": "create_group", "name": format!("load {r}"), "members": &users[1..]});
    let data = request(&mut ws, "setup", req).await.ok()?;
    let _closed = ws.close(None).await;
    Some(data["room"]["id"].clone()).filter(|v| v.is_u64())
}

/// Sends a native request and waits for its reply.
async fn request(ws: &mut Ws, id: &str, mut req: Value) -> anyhow::Result<Value> {
    req["id"] = json!(id);
    ws.send(Message::text(req.to_string())).await?;
    loop {
        let Some(m) = tokio::time::timeout(Duration::from_secs(30), ws.next()).await? else {
            anyhow::bail!("connection closed during set-up");
        };
        if let Message::Text(t) = m? {
            let v: Value = serde_json::from_str(t.as_str())?;
            if v["type"] == "reply" && v["id"] == id {
                anyhow::ensure!(v["ok"] == true, "set-up request failed: {v}");
                return Ok(v["data"].clone());
            }
        }
    }
}

fn histogram() -> anyhow::Result<Histogram<u64>> {
    Ok(Histogram::new_with_bounds(1, 60_000_000, 3)?)
}

fn micros(d: Duration) -> u64 {
    (d.as_micros() as u64).max(1)
}

/// Raises the open-file limit (one descriptor per session): to the kernel's `fs.nr_open` where
/// the hard limit may be raised (root), else to the hard limit. Returns the new soft limit.
pub fn raise_fd_limit() -> u64 {
    use rlimit::Resource;
    let want = std::fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .unwrap_or(1 << 20);
    if rlimit::setrlimit(Resource::NOFILE, want, want).is_ok() {
        return want;
    }
    rlimit::increase_nofile_limit(u64::MAX).unwrap_or(0)
}

/// A short name for what went wrong, for the errors-by-kind table.
fn error_kind(e: &anyhow::Error) -> String {
    use tokio_tungstenite::tungstenite::Error as WsError;
    fn io_kind(e: &std::io::Error) -> String {
        let mut out = String::from("io_");
        for (k, c) in format!("{:?}", e.kind()).chars().enumerate() {
            if c.is_uppercase() && k > 0 {
                out.push('_');
            }
            out.push(c.to_ascii_lowercase());
        }
        out
    }
    if let Some(w) = e.downcast_ref::<WsError>() {
        return match w {
            WsError::Http(r) => format!("http_{}", r.status().as_u16()),
            WsError::Io(io) => io_kind(io),
            WsError::ConnectionClosed | WsError::AlreadyClosed => "closed".into(),
            WsError::Protocol(_) => "ws_protocol".into(),
            _ => "ws_other".into(),
        };
    }
    if let Some(io) = e.downcast_ref::<std::io::Error>() {
        return io_kind(io);
    }
    if e.is::<tokio::time::error::Elapsed>() {
        return "timeout".into();
    }
    "other".into()
}

/// Opens `n` sessions in index order, at most 256 handshakes at a time; returns them and the
/// connect latencies.
async fn open_all(cfg: &RunConfig, n: usize) -> anyhow::Result<(Vec<Ws>, Histogram<u64>, f64)> {
    use futures::stream::{self, StreamExt as _};
    let start = Instant::now();
    let results: Vec<anyhow::Result<(Ws, u64)>> = stream::iter(0..n)
        .map(|i| async move {
            let t = Instant::now();
            let ws = connect(cfg, i, &format!("{}{i}", cfg.prefix)).await?;
            Ok((ws, micros(t.elapsed())))
        })
        .buffered(256)
        .collect()
        .await;
    let secs = start.elapsed().as_secs_f64();
    let mut h = histogram()?;
    let mut sockets = Vec::with_capacity(n);
    for r in results {
        let (ws, us) = r?;
        h.saturating_record(us);
        sockets.push(ws);
    }
    Ok((sockets, h, secs))
}

/// Holds sessions open and answering pings, then closes them.
async fn hold(sockets: Vec<Ws>, until: Instant) {
    let tasks: Vec<_> = sockets
        .into_iter()
        .map(|mut ws| {
            tokio::spawn(async move {
                // Reading answers the server's WebSocket pings; an Engine.IO ping (`2`, Socket.IO
                // sessions) is answered with its pong (`3`).
                while let Ok(Some(Ok(m))) = tokio::time::timeout_at(until.into(), ws.next()).await {
                    if let Message::Text(t) = &m
                        && t.as_str() == "2"
                        && ws.send(Message::text("3")).await.is_err()
                    {
                        break;
                    }
                }
                let _closed = ws.close(None).await;
            })
        })
        .collect();
    for t in tasks {
        let _done = t.await;
    }
}

/// The connection-only workloads: `idle` and `connect-storm`.
async fn run_sessions(cfg: RunConfig) -> anyhow::Result<Report> {
    let n = cfg.clients;
    let before = cfg.server_pid.and_then(proc_stats);
    let (sockets, connect, secs) = open_all(&cfg, n).await?;
    let connected = cfg.server_pid.and_then(proc_stats);
    let mut report = Report {
        workload: Some(cfg.workload),
        protocol: cfg.protocol,
        clients: n,
        connect_us: Latency::of(&connect),
        connects_per_second: n as f64 / secs.max(1e-9),
        ..Report::default()
    };
    if cfg.workload == Workload::Idle {
        hold(sockets, Instant::now() + cfg.duration).await;
        let after = cfg.server_pid.and_then(proc_stats);
        report.seconds = cfg.duration.as_secs_f64();
        report.rss_per_session_bytes = before
            .zip(connected)
            .map(|(b, c)| c.0.saturating_sub(b.0) as f64 / n as f64);
        report.idle_cpu_us_per_session_second = connected
            .zip(after)
            .map(|(c, a)| (a.1 - c.1) * 1e6 / (n as f64 * report.seconds.max(1e-9)));
        report.server_rss_bytes = after.map(|a| a.0);
        report.server_cpu_seconds = connected.zip(after).map(|(c, a)| a.1 - c.1);
    } else {
        report.seconds = secs;
        report.server_rss_bytes = connected.map(|a| a.0);
        report.server_cpu_seconds = before.zip(connected).map(|(b, a)| a.1 - b.1);
        hold(sockets, Instant::now()).await;
    }
    Ok(report)
}

/// `TcpExt ListenOverflows` from `/proc/net/netstat` (machine-wide).
pub fn listen_overflows() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/net/netstat").ok()?;
    let mut lines = text.lines();
    while let (Some(names), Some(values)) = (lines.next(), lines.next()) {
        if !names.starts_with("TcpExt:") {
            continue;
        }
        let i = names
            .split_whitespace()
            .position(|n| n == "ListenOverflows")?;
        return values.split_whitespace().nth(i)?.parse().ok();
    }
    None
}

/// Runs one workload and reports.
pub async fn run(cfg: RunConfig, progress: bool) -> anyhow::Result<Report> {
    let before = listen_overflows();
    let mut report = run_inner(cfg, progress).await?;
    report.listen_overflows = before
        .zip(listen_overflows())
        .map(|(b, a)| a.saturating_sub(b));
    Ok(report)
}

async fn run_inner(cfg: RunConfig, progress: bool) -> anyhow::Result<Report> {
    anyhow::ensure!(
        cfg.protocol == Protocol::Native
            || matches!(
                cfg.workload,
                Workload::Dm | Workload::Group | Workload::Idle | Workload::ConnectStorm
            ),
        "the socketio protocol drives the dm, group, idle and connect-storm workloads only"
    );
    if matches!(cfg.workload, Workload::Idle | Workload::ConnectStorm) {
        anyhow::ensure!(cfg.clients > 0, "need at least one client");
        return run_sessions(cfg).await;
    }
    run_chat(cfg, progress).await
}

/// Room arrangement: members per room and whether rooms are direct.
fn arrangement(cfg: &RunConfig) -> (usize, bool) {
    match (cfg.workload, cfg.storm_rooms) {
        (Workload::Dm, _) | (Workload::ReconnectStorm, RoomKind::Dm) => (2, true),
        _ => (cfg.group_size.max(2), false),
    }
}

/// Creates (native) or joins (Socket.IO) one room for the members in `chunk`.
async fn set_up_room(
    cfg: &RunConfig,
    r: usize,
    users: &[String],
    chunk: &mut [Ws],
    direct: bool,
) -> anyhow::Result<Value> {
    match cfg.protocol {
        Protocol::Native => {
            let req = if direct {
                json!({"op": "open_direct", "user": users[1]})
            } else {
                json!({"op": "create_group", "name": format!("load {r}"), "members": &users[1..]})
            };
            let ws = chunk
                .first_mut()
                .ok_or_else(|| anyhow::anyhow!("empty room"))?;
            let data = request(ws, "setup", req).await?;
            let room = data["room"]["id"]
                .as_u64()
                .ok_or_else(|| anyhow::anyhow!("no room id in {data}"))?;
            Ok(json!(room))
        }
        Protocol::Socketio => {
            let (first, rest) = chunk
                .split_first_mut()
                .ok_or_else(|| anyhow::anyhow!("empty room"))?;
            let room = if direct {
                socketio::join(first, json!({"otherUserId": users[1]})).await?
            } else {
                // Syarah cannot create groups: on Palaver the first member creates it over the
                // native protocol; a server without one (the peer) makes rooms on first join.
                let id = match create_group_natively(cfg, r, users).await {
                    Some(id) => id,
                    None => json!(1_000_000 + r),
                };
                socketio::join(first, json!({"chatHeaderId": id})).await?
            };
            for ws in rest.iter_mut() {
                socketio::join(ws, json!({"chatHeaderId": room})).await?;
            }
            Ok(room)
        }
    }
}

/// What the chat workloads share between clients.
struct Shared {
    start: Instant,
    stop_at: Instant,
    rate: f64,
    clients: usize,
    protocol: Protocol,
    message_bytes: usize,
    sent_total: AtomicU64,
    /// reconnect-storm: (drop at, reconnect at).
    storm: Option<(Instant, Instant)>,
}

/// `dm`, `group` and `reconnect-storm`.
async fn run_chat(cfg: RunConfig, progress: bool) -> anyhow::Result<Report> {
    use futures::stream::{self, StreamExt as _};
    let (per_room, direct) = arrangement(&cfg);
    let rooms_n = cfg.clients / per_room;
    anyhow::ensure!(rooms_n > 0, "need at least {per_room} clients");
    let n = rooms_n * per_room;
    let storm = cfg.workload == Workload::ReconnectStorm;
    if storm {
        anyhow::ensure!(
            cfg.drop > 0 && cfg.drop <= n,
            "reconnect-storm drops between 1 and {n} sessions"
        );
        anyhow::ensure!(
            cfg.duration >= cfg.outage + Duration::from_secs(2),
            "reconnect-storm needs a duration of at least the outage plus 2 s"
        );
    }
    let users: Vec<String> = (0..n).map(|i| format!("{}{i}", cfg.prefix)).collect();
    // Connect everyone first: a user exists once connected.
    let (mut sockets, connect_h, connect_secs) = open_all(&cfg, n).await?;
    // Arrange rooms, 64 at a time.
    let rooms: Vec<anyhow::Result<Value>> = stream::iter(
        sockets
            .chunks_mut(per_room)
            .zip(users.chunks(per_room))
            .enumerate(),
    )
    .map(|(r, (chunk, members))| set_up_room(&cfg, r, members, chunk, direct))
    .buffered(64)
    .collect()
    .await;
    let mut room_ids = Vec::with_capacity(rooms_n);
    for r in rooms {
        room_ids.push(r?);
    }
    let before = cfg.server_pid.and_then(proc_stats);
    let start = Instant::now();
    let stop_at = start + cfg.duration;
    let drop_at = start + cfg.duration / 3;
    let shared = Arc::new(Shared {
        start,
        stop_at,
        rate: cfg.rate,
        clients: n,
        protocol: cfg.protocol,
        message_bytes: cfg.message_bytes,
        sent_total: AtomicU64::new(0),
        storm: storm.then(|| (drop_at, drop_at + cfg.outage)),
    });
    // reconnect-storm: drop `drop` clients spread evenly over the index range.
    let dropped: HashSet<usize> = if storm {
        (0..cfg.drop).map(|k| k * n / cfg.drop).collect()
    } else {
        HashSet::new()
    };
    let cfg = Arc::new(cfg);
    let bar = progress.then(|| {
        let b = indicatif::ProgressBar::new(cfg.duration.as_secs().max(1));
        b.set_style(
            indicatif::ProgressStyle::with_template(
                "{elapsed_precise} [{bar:40}] {pos}/{len} s  {msg}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        b
    });
    let mut tasks = Vec::with_capacity(n);
    for (i, ws) in sockets.into_iter().enumerate() {
        let client = Client::new(i, room_ids[i / per_room].clone(), shared.clone())?;
        let drops = dropped.contains(&i);
        let user = users[i].clone();
        let cfg = cfg.clone();
        tasks.push(tokio::spawn(client.run(ws, drops, cfg, user)));
    }
    if let Some(b) = &bar {
        while Instant::now() < stop_at {
            tokio::time::sleep(Duration::from_millis(250)).await;
            b.set_position(start.elapsed().as_secs());
            b.set_message(format!(
                "{} sent",
                shared.sent_total.load(Ordering::Relaxed)
            ));
        }
        b.finish_and_clear();
    }
    let mut results = Vec::with_capacity(n);
    for t in tasks {
        results.push(t.await??);
    }
    let after = cfg.server_pid.and_then(proc_stats);
    let mut report = Report {
        workload: Some(cfg.workload),
        protocol: cfg.protocol,
        clients: n,
        rooms: rooms_n,
        seconds: cfg.duration.as_secs_f64(),
        server_rss_bytes: after.map(|a| a.0),
        server_cpu_seconds: before.zip(after).map(|(b, a)| a.1 - b.1),
        connect_us: Latency::of(&connect_h),
        connects_per_second: n as f64 / connect_secs.max(1e-9),
        dropped: dropped.len(),
        ..Report::default()
    };
    let mut ack = histogram()?;
    let mut deliver = histogram()?;
    let mut reconnect = histogram()?;
    let mut catchup = histogram()?;
    let mut last_reconnect: Option<Instant> = None;
    for r in &results {
        report.sent += r.seq;
        report.acked += r.acked.len() as u64;
        report.delivered += r.live;
        report.duplicated += r.duplicated;
        report.recovered += r.recovered;
        for (k, v) in &r.errors {
            *report.errors.entry(k.clone()).or_default() += v;
        }
        ack.add(&r.ack)?;
        deliver.add(&r.deliver)?;
        if let Some((us, at)) = r.reconnected {
            report.reconnected += 1;
            reconnect.saturating_record(us);
            last_reconnect = Some(last_reconnect.map_or(at, |l| l.max(at)));
        }
        if let Some(us) = r.caught_up_us {
            catchup.saturating_record(us);
        }
    }
    // Loss: every member of a room should have every acknowledged message of every member,
    // live or fetched with history.
    for (i, r) in results.iter().enumerate() {
        let first = (i / per_room) * per_room;
        for (sender, from) in results.iter().enumerate().skip(first).take(per_room) {
            report.lost += from
                .acked
                .iter()
                .filter(|s| !r.seen.contains(&(sender, **s)))
                .count() as u64;
        }
    }
    report.ack_us = Latency::of(&ack);
    report.deliver_us = Latency::of(&deliver);
    report.reconnect_us = Latency::of(&reconnect);
    report.catchup_us = Latency::of(&catchup);
    if let (Some((_, reconnect_at)), Some(last)) = (shared.storm, last_reconnect) {
        let secs = last.saturating_duration_since(reconnect_at).as_secs_f64();
        report.reconnects_per_second = report.reconnected as f64 / secs.max(1e-6);
    }
    Ok(report)
}

/// One chat client's state, kept across a reconnect.
struct Client {
    me: usize,
    room: Value,
    shared: Arc<Shared>,
    /// Sequence number of the last message sent.
    seq: u64,
    /// Send instants of unanswered sends, by sequence number.
    pending: HashMap<u64, Instant>,
    /// Sequence numbers the server acknowledged.
    acked: Vec<u64>,
    errors: HashMap<String, u64>,
    ack: Histogram<u64>,
    deliver: Histogram<u64>,
    /// Live message events received (duplicates included).
    live: u64,
    duplicated: u64,
    recovered: u64,
    /// (sender index, sequence number) of every message received, live or by history.
    seen: HashSet<(usize, u64)>,
    /// (sender index, sequence number) of every message received live: a second live copy is a
    /// duplicate; a live copy of a message history already brought is not (a message committed
    /// before the history read can be fanned out to the new session just after).
    seen_live: HashSet<(usize, u64)>,
    /// Highest message id seen live.
    last_id: u64,
    /// History catch-up in progress: (cursor, started at, page).
    catchup: Option<(u64, Instant, u32)>,
    /// Reconnect latency and the instant the session was open again.
    reconnected: Option<(u64, Instant)>,
    caught_up_us: Option<u64>,
}

/// `sender:seq:send time in us since start:` parsed from a message text.
fn parse_text(text: &str) -> Option<(usize, u64, u64)> {
    let mut parts = text.split(':');
    let s = parts.next()?.parse().ok()?;
    let n = parts.next()?.parse().ok()?;
    let at = parts.next()?.parse().ok()?;
    Some((s, n, at))
}

impl Client {
    fn new(me: usize, room: Value, shared: Arc<Shared>) -> anyhow::Result<Self> {
        Ok(Self {
            me,
            room,
            shared,
            seq: 0,
            pending: HashMap::new(),
            acked: Vec::new(),
            errors: HashMap::new(),
            ack: histogram()?,
            deliver: histogram()?,
            live: 0,
            duplicated: 0,
            recovered: 0,
            seen: HashSet::new(),
            seen_live: HashSet::new(),
            last_id: 0,
            catchup: None,
            reconnected: None,
            caught_up_us: None,
        })
    }

    fn error(&mut self, kind: impl Into<String>) {
        *self.errors.entry(kind.into()).or_default() += 1;
    }

    async fn run(
        mut self,
        mut ws: Ws,
        drops: bool,
        cfg: Arc<RunConfig>,
        user: String,
    ) -> anyhow::Result<Self> {
        let stop_at = self.shared.stop_at;
        let drain_until = stop_at + Duration::from_secs(3);
        if let (true, Some((drop_at, reconnect_at))) = (drops, self.shared.storm) {
            // Stop sending a little before the drop so that what was sent is answered.
            self.drive(&mut ws, drop_at - Duration::from_millis(250), drop_at)
                .await?;
            for _ in self.pending.drain() {
                *self.errors.entry("unacked_at_drop".into()).or_default() += 1;
            }
            // Abrupt: the TCP socket closes without a close frame.
            drop(ws);
            tokio::time::sleep_until(reconnect_at.into()).await;
            let Some(new) = self.reconnect(&cfg, &user, reconnect_at).await else {
                return Ok(self);
            };
            ws = new;
            self.start_catchup(&mut ws, reconnect_at).await?;
        }
        self.drive(&mut ws, stop_at, drain_until).await?;
        if !self.pending.is_empty() {
            let n = self.pending.len() as u64;
            *self.errors.entry("unacked".into()).or_default() += n;
        }
        let _closed = ws.close(None).await;
        Ok(self)
    }

    /// Reconnects with bounded retries; counts failures by kind.
    async fn reconnect(&mut self, cfg: &RunConfig, user: &str, from: Instant) -> Option<Ws> {
        let mut backoff = Duration::from_millis(100);
        for _ in 0..8 {
            let attempt =
                tokio::time::timeout(Duration::from_secs(10), connect(cfg, self.me, user))
                    .await
                    .map_err(anyhow::Error::from)
                    .and_then(|r| r);
            match attempt {
                Ok(ws) => {
                    let now = Instant::now();
                    self.reconnected = Some((micros(now - from), now));
                    return Some(ws);
                }
                Err(e) => {
                    self.error(format!("reconnect_{}", error_kind(&e)));
                    if Instant::now() + backoff >= self.shared.stop_at {
                        break;
                    }
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                }
            }
        }
        self.error("reconnect_gave_up");
        None
    }

    async fn start_catchup(&mut self, ws: &mut Ws, from: Instant) -> anyhow::Result<()> {
        self.catchup = Some((self.last_id, from, 0));
        self.request_history(ws).await
    }

    async fn request_history(&mut self, ws: &mut Ws) -> anyhow::Result<()> {
        let Some((cursor, _, page)) = self.catchup else {
            return Ok(());
        };
        // A client that saw nothing yet reads from the room's start: ids begin above 1, and 0 is
        // not a message id.
        let req = json!({"id": format!("h{page}"), "op": "history", "room": self.room,
                         "after": cursor.max(1), "limit": 200});
        ws.send(Message::text(req.to_string())).await?;
        Ok(())
    }

    /// Sends at the paced rate until `send_until` and handles incoming frames until `read_until`.
    async fn drive(
        &mut self,
        ws: &mut Ws,
        send_until: Instant,
        read_until: Instant,
    ) -> anyhow::Result<()> {
        let rate = self.shared.rate;
        let period = Duration::from_secs_f64(1.0 / rate.max(1e-3));
        // Offset each client's phase so the offered load is steady.
        let offset =
            period.mul_f64((self.me % self.shared.clients) as f64 / self.shared.clients as f64);
        let mut tick = tokio::time::interval_at((Instant::now() + offset).into(), period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            if Instant::now() >= read_until {
                return Ok(());
            }
            let sending = rate > 0.0 && Instant::now() < send_until;
            tokio::select! {
                _ = tick.tick(), if sending => {
                    if Instant::now() < send_until && !self.send(ws).await {
                        return Ok(());
                    }
                }
                m = tokio::time::timeout_at(read_until.into(), ws.next()) => {
                    match m {
                        Err(_) => return Ok(()),
                        Ok(None) => {
                            self.error("closed_by_server");
                            return Ok(());
                        }
                        Ok(Some(Err(e))) => {
                            self.error(error_kind(&e.into()));
                            return Ok(());
                        }
                        Ok(Some(Ok(Message::Text(t)))) => self.handle(ws, t.as_str()).await?,
                        Ok(Some(Ok(_))) => {}
                    }
                }
            }
        }
    }

    /// Sends the next message; false when the connection is gone.
    async fn send(&mut self, ws: &mut Ws) -> bool {
        self.seq += 1;
        let seq = self.seq;
        let at = self.shared.start.elapsed().as_micros();
        let mut text = format!("{}:{seq}:{at}:", self.me);
        while text.len() < self.shared.message_bytes {
            text.push('x');
        }
        let client_ref = format!("{}-{seq}", self.me);
        let frame = match self.shared.protocol {
            Protocol::Native => json!({"id": seq, "op": "send", "room": self.room, "text": text, "client_ref": client_ref}).to_string(),
            Protocol::Socketio => socketio::send_frame(seq, &self.room, &text, &client_ref),
        };
        self.pending.insert(seq, Instant::now());
        if ws.send(Message::text(frame)).await.is_err() {
            self.pending.remove(&seq);
            self.seq -= 1;
            self.error("send_failed");
            return false;
        }
        self.shared.sent_total.fetch_add(1, Ordering::Relaxed);
        true
    }

    fn on_ack(&mut self, seq: u64, error: Option<String>) -> anyhow::Result<()> {
        let sent_at = self.pending.remove(&seq);
        match error {
            None => {
                self.acked.push(seq);
                if let Some(at) = sent_at {
                    self.ack.saturating_record(micros(at.elapsed()));
                }
            }
            Some(code) => self.error(code),
        }
        Ok(())
    }

    fn on_live(&mut self, text: &str, id: u64) -> anyhow::Result<()> {
        let Some((s, n, at)) = parse_text(text) else {
            return Ok(());
        };
        self.last_id = self.last_id.max(id);
        self.live += 1;
        self.seen.insert((s, n));
        if !self.seen_live.insert((s, n)) {
            self.duplicated += 1;
        }
        if s != self.me {
            let now = self.shared.start.elapsed().as_micros() as u64;
            self.deliver
                .saturating_record(now.saturating_sub(at).max(1));
        }
        Ok(())
    }

    async fn on_history(&mut self, ws: &mut Ws, data: &Value) -> anyhow::Result<()> {
        let Some((cursor, started, page)) = self.catchup else {
            return Ok(());
        };
        let mut top = cursor;
        for m in data["messages"].as_array().map_or(&[][..], Vec::as_slice) {
            top = top.max(m["id"].as_u64().unwrap_or(0));
            if let Some((s, n, _)) = m["text"].as_str().and_then(parse_text)
                && self.seen.insert((s, n))
            {
                self.recovered += 1;
            }
        }
        if data["has_more"] == true && top > cursor {
            self.catchup = Some((top, started, page + 1));
            self.request_history(ws).await
        } else {
            self.catchup = None;
            self.caught_up_us = Some(micros(started.elapsed()));
            Ok(())
        }
    }

    async fn handle(&mut self, ws: &mut Ws, text: &str) -> anyhow::Result<()> {
        if self.shared.protocol == Protocol::Socketio {
            return match socketio::parse(text) {
                socketio::Frame::Ping => {
                    ws.send(Message::text("3")).await?;
                    Ok(())
                }
                socketio::Frame::Ack { id, error } => self.on_ack(id, error),
                socketio::Frame::Message { text, id } => self.on_live(&text, id),
                socketio::Frame::Other => Ok(()),
            };
        }
        let v: Value = serde_json::from_str(text)?;
        if v["type"] == "reply" {
            let error = (v["ok"] != true)
                .then(|| v["error"]["code"].as_str().unwrap_or("unknown").to_owned());
            if let Some(seq) = v["id"].as_u64() {
                self.on_ack(seq, error)?;
            } else if v["id"].as_str().is_some_and(|s| s.starts_with('h')) {
                match error {
                    None => self.on_history(ws, &v["data"]).await?,
                    Some(code) => {
                        self.error(format!("history_{code}"));
                        self.catchup = None;
                    }
                }
            } else if let Some(code) = error {
                self.error(code);
            }
        } else if v["event"] == "message" {
            let m = &v["data"]["message"];
            if let Some(text) = m["text"].as_str() {
                self.on_live(text, m["id"].as_u64().unwrap_or(0))?;
            }
        }
        Ok(())
    }
}

/// Renders a report as a table.
pub fn table(r: &Report) -> String {
    let mut out = String::new();
    let ms = |us: u64| format!("{:.2}", us as f64 / 1000.0);
    out.push_str(&format!(
        "workload {:?} ({:?}): {} clients in {} rooms, {:.0} s\n",
        r.workload.unwrap_or(Workload::Dm),
        r.protocol,
        r.clients,
        r.rooms,
        r.seconds
    ));
    out.push_str(&format!(
        "sent {} ({:.0}/s)  acked {} ({:.0}/s)  delivered {} ({:.0}/s)  recovered {}  lost {}  duplicated {}  errors {:?}\n",
        r.sent,
        r.sent as f64 / r.seconds,
        r.acked,
        r.acked as f64 / r.seconds,
        r.delivered,
        r.delivered as f64 / r.seconds,
        r.recovered,
        r.lost,
        r.duplicated,
        r.errors
    ));
    out.push_str("latency (ms)      p50     p90     p99   p99.9     max\n");
    let mut rows = vec![("send->ack", &r.ack_us), ("send->deliver", &r.deliver_us)];
    if r.dropped > 0 {
        rows.push(("reconnect", &r.reconnect_us));
        rows.push(("catch-up", &r.catchup_us));
    }
    for (name, l) in rows {
        out.push_str(&format!(
            "{name:<14} {:>7} {:>7} {:>7} {:>7} {:>7}\n",
            ms(l.p50),
            ms(l.p90),
            ms(l.p99),
            ms(l.p999),
            ms(l.max)
        ));
    }
    if r.dropped > 0 {
        out.push_str(&format!(
            "reconnect-storm: {} dropped, {} reconnected ({:.0}/s)\n",
            r.dropped, r.reconnected, r.reconnects_per_second
        ));
    }
    if r.connect_us.count > 0 {
        out.push_str(&format!(
            "connect: {:.0} sessions/s, p50 {} ms, p99 {} ms, max {} ms\n",
            r.connects_per_second,
            ms(r.connect_us.p50),
            ms(r.connect_us.p99),
            ms(r.connect_us.max)
        ));
    }
    if let Some(b) = r.rss_per_session_bytes {
        out.push_str(&format!("server RSS per session: {:.0} bytes\n", b));
    }
    if let Some(us) = r.idle_cpu_us_per_session_second {
        out.push_str(&format!("server CPU per idle session: {us:.2} us/s\n"));
    }
    if let Some(n) = r.listen_overflows.filter(|n| *n > 0) {
        out.push_str(&format!(
            "listen queue overflows during the run (machine-wide): {n}\n"
        ));
    }
    if let Some(rss) = r.server_rss_bytes {
        out.push_str(&format!("server RSS {:.1} MiB", rss as f64 / 1_048_576.0));
        if let Some(cpu) = r.server_cpu_seconds {
            out.push_str(&format!(
                ", CPU {cpu:.2} s ({:.0}% of one core)",
                100.0 * cpu / r.seconds
            ));
        }
        out.push('\n');
    }
    out
}
