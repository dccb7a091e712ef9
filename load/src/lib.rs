//! # palaver-load: the instrument that measures Palaver
//!
//! A run connects many native-protocol clients (spread over several loopback source addresses to
//! get past the ephemeral-port limit), arranges them into rooms (`dm`: pairs; `group`: rooms of
//! `group_size`), then every client sends at a fixed rate for a fixed time. Each message carries
//! its sender, sequence number and send time in its text, so receivers measure send-to-deliver
//! latency and detect loss and duplication; replies give send-to-ack latency. The server's RSS and
//! CPU come from `/proc/<pid>`. Everything is bounded in count and time and targets loopback.
//!
//! Data flow: [`run`] -> one task per client (writer: paced sends; reader: replies and events into
//! per-client counters and histograms) -> merged into a [`Report`].

use futures::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use serde::Serialize;
use serde_json::{Value, json};
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tokio::net::TcpSocket;
use tokio_tungstenite::tungstenite::Message;

/// How clients are arranged into rooms.
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
}

/// One run's settings.
#[derive(Clone, Debug)]
pub struct RunConfig {
    /// `ws://host:port/ws`; the host must be a loopback address.
    pub url: String,
    /// HS256 secret to mint tokens with.
    pub secret: String,
    /// Room arrangement.
    pub workload: Workload,
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
}

/// Latency summary in microseconds.
#[derive(Debug, Default, Serialize)]
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
#[derive(Debug, Default, Serialize)]
pub struct Report {
    /// Workload.
    pub workload: Option<Workload>,
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
    /// Message events delivered to clients.
    pub delivered: u64,
    /// Deliveries that never arrived (acknowledged messages a member did not get).
    pub lost: u64,
    /// Deliveries that arrived twice.
    pub duplicated: u64,
    /// Error replies by code.
    pub errors: HashMap<String, u64>,
    /// Send to acknowledgement.
    pub ack_us: Latency,
    /// Send to delivery at the other members.
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

fn token(secret: &str, sub: &str) -> anyhow::Result<String> {
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

async fn connect(cfg: &RunConfig, i: usize, user: &str) -> anyhow::Result<Ws> {
    let url = format!("{}?token={}", cfg.url, token(&cfg.secret, user)?);
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
    let socket = TcpSocket::new_v4()?;
    let source = IpAddr::from([127, 0, 0, 1 + (i % usize::from(cfg.sources.max(1))) as u8]);
    socket.bind(SocketAddr::new(source, 0))?;
    let stream = socket.connect(server).await?;
    stream.set_nodelay(true)?;
    let (ws, _) = tokio_tungstenite::client_async(url, stream).await?;
    Ok(ws)
}

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

/// Per-client results, merged at the end.
struct ClientResult {
    sent: u64,
    acked: u64,
    errors: HashMap<String, u64>,
    ack: Histogram<u64>,
    deliver: Histogram<u64>,
    /// (sender index) -> sequence numbers received from it.
    received: HashMap<usize, Vec<u64>>,
}

fn histogram() -> anyhow::Result<Histogram<u64>> {
    Ok(Histogram::new_with_bounds(1, 60_000_000, 3)?)
}

/// Raises the open-file limit to the hard limit (one descriptor per session).
pub fn raise_fd_limit() -> u64 {
    rlimit::increase_nofile_limit(u64::MAX).unwrap_or(0)
}

/// Opens `n` sessions, at most 256 handshakes at a time; returns them and the connect latencies.
async fn open_all(cfg: &RunConfig, n: usize) -> anyhow::Result<(Vec<Ws>, Histogram<u64>, f64)> {
    use futures::stream::{self, StreamExt as _};
    let start = Instant::now();
    let results: Vec<anyhow::Result<(Ws, u64)>> = stream::iter(0..n)
        .map(|i| async move {
            let t = Instant::now();
            let ws = connect(cfg, i, &format!("{}{i}", cfg.prefix)).await?;
            Ok((ws, t.elapsed().as_micros().max(1) as u64))
        })
        .buffer_unordered(256)
        .collect()
        .await;
    let secs = start.elapsed().as_secs_f64();
    let mut h = histogram()?;
    let mut sockets = Vec::with_capacity(n);
    for r in results {
        let (ws, us) = r?;
        h.record(us)?;
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
                // Reading answers the server's pings.
                while let Ok(Some(Ok(_))) = tokio::time::timeout_at(until.into(), ws.next()).await {
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

/// Runs one workload and reports.
pub async fn run(cfg: RunConfig, progress: bool) -> anyhow::Result<Report> {
    if matches!(cfg.workload, Workload::Idle | Workload::ConnectStorm) {
        anyhow::ensure!(cfg.clients > 0, "need at least one client");
        return run_sessions(cfg).await;
    }
    let per_room = match cfg.workload {
        Workload::Dm => 2,
        _ => cfg.group_size.max(2),
    };
    let rooms_n = cfg.clients / per_room;
    anyhow::ensure!(rooms_n > 0, "need at least {per_room} clients");
    let n = rooms_n * per_room;
    let users: Vec<String> = (0..n).map(|i| format!("{}{i}", cfg.prefix)).collect();
    // Connect everyone first: a user exists once connected.
    let mut sockets = Vec::with_capacity(n);
    for (i, u) in users.iter().enumerate() {
        sockets.push(connect(&cfg, i, u).await?);
    }
    // Arrange rooms.
    let mut room_of = vec![0u64; n];
    for r in 0..rooms_n {
        let first = r * per_room;
        let data = match cfg.workload {
            Workload::Dm | Workload::Idle | Workload::ConnectStorm => {
                request(
                    &mut sockets[first],
                    "setup",
                    json!({"op": "open_direct", "user": users[first + 1]}),
                )
                .await?
            }
            Workload::Group => {
                let members: Vec<&String> = users[first + 1..first + per_room].iter().collect();
                request(
                    &mut sockets[first],
                    "setup",
                    json!({"op": "create_group", "name": format!("load {r}"), "members": members}),
                )
                .await?
            }
        };
        let room = data["room"]["id"]
            .as_u64()
            .ok_or_else(|| anyhow::anyhow!("no room id"))?;
        for slot in room_of.iter_mut().skip(first).take(per_room) {
            *slot = room;
        }
    }
    let before = cfg.server_pid.and_then(proc_stats);
    let start = Instant::now();
    let stop_at = start + cfg.duration;
    let sent_total = Arc::new(AtomicU64::new(0));
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
        let room = room_of[i];
        let rate = cfg.rate;
        let sent_total = sent_total.clone();
        tasks.push(tokio::spawn(client(
            i, ws, room, rate, start, stop_at, sent_total,
        )));
    }
    if let Some(b) = &bar {
        while Instant::now() < stop_at {
            tokio::time::sleep(Duration::from_millis(250)).await;
            b.set_position(start.elapsed().as_secs());
            b.set_message(format!("{} sent", sent_total.load(Ordering::Relaxed)));
        }
        b.finish_and_clear();
    }
    let mut results = Vec::with_capacity(n);
    for t in tasks {
        results.push(t.await??);
    }
    let seconds = cfg.duration.as_secs_f64();
    let after = cfg.server_pid.and_then(proc_stats);
    let mut report = Report {
        workload: Some(cfg.workload),
        clients: n,
        rooms: rooms_n,
        seconds,
        server_rss_bytes: after.map(|a| a.0),
        server_cpu_seconds: before.zip(after).map(|(b, a)| a.1 - b.1),
        ..Report::default()
    };
    let mut ack = histogram()?;
    let mut deliver = histogram()?;
    for r in &results {
        report.sent += r.sent;
        report.acked += r.acked;
        for (k, v) in &r.errors {
            *report.errors.entry(k.clone()).or_default() += v;
        }
        ack.add(&r.ack)?;
        deliver.add(&r.deliver)?;
    }
    // Loss and duplication: every member of a room should get every acknowledged message of
    // every other member exactly once.
    for (i, r) in results.iter().enumerate() {
        let first = (i / per_room) * per_room;
        for (sender, from) in results.iter().enumerate().skip(first).take(per_room) {
            let expected = from.acked;
            let got = r.received.get(&sender).map_or(&[][..], Vec::as_slice);
            let mut seen = std::collections::HashSet::new();
            for s in got {
                if !seen.insert(*s) {
                    report.duplicated += 1;
                }
            }
            report.delivered += got.len() as u64;
            report.lost += expected.saturating_sub(seen.len() as u64);
        }
    }
    report.ack_us = Latency::of(&ack);
    report.deliver_us = Latency::of(&deliver);
    Ok(report)
}

async fn client(
    me: usize,
    ws: Ws,
    room: u64,
    rate: f64,
    start: Instant,
    stop_at: Instant,
    sent_total: Arc<AtomicU64>,
) -> anyhow::Result<ClientResult> {
    let (mut sink, mut stream) = ws.split();
    let pending = Arc::new(parking_lot_free::Queue::default());
    let writer_pending = pending.clone();
    let writer = tokio::spawn(async move {
        let mut sent = 0u64;
        if rate > 0.0 {
            let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            while Instant::now() < stop_at {
                tick.tick().await;
                sent += 1;
                let at = start.elapsed().as_micros();
                let text = format!("{me}:{sent}:{at}");
                let req = json!({"id": sent, "op": "send", "room": room, "text": text, "client_ref": format!("{me}-{sent}")});
                writer_pending.push(Instant::now());
                if sink.send(Message::text(req.to_string())).await.is_err() {
                    break;
                }
                sent_total.fetch_add(1, Ordering::Relaxed);
            }
        }
        (sent, sink)
    });
    let mut res = ClientResult {
        sent: 0,
        acked: 0,
        errors: HashMap::new(),
        ack: histogram()?,
        deliver: histogram()?,
        received: HashMap::new(),
    };
    // Read until everything sent is answered and deliveries have had time to arrive.
    let drain_until = stop_at + Duration::from_secs(3);
    loop {
        let left = drain_until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        let m = match tokio::time::timeout(left, stream.next()).await {
            Err(_) | Ok(None) => break,
            Ok(Some(m)) => m?,
        };
        let Message::Text(t) = m else { continue };
        let v: Value = serde_json::from_str(t.as_str())?;
        if v["type"] == "reply" {
            let sent_at = pending.pop();
            if v["ok"] == true {
                res.acked += 1;
                if let Some(at) = sent_at {
                    res.ack.record(at.elapsed().as_micros().max(1) as u64)?;
                }
            } else {
                let code = v["error"]["code"].as_str().unwrap_or("unknown").to_owned();
                *res.errors.entry(code).or_default() += 1;
            }
        } else if v["event"] == "message" {
            let text = v["data"]["message"]["text"].as_str().unwrap_or_default();
            let mut parts = text.split(':');
            let (Some(s), Some(n), Some(at)) = (parts.next(), parts.next(), parts.next()) else {
                continue;
            };
            let (Ok(s), Ok(n), Ok(at)) = (s.parse::<usize>(), n.parse::<u64>(), at.parse::<u128>())
            else {
                continue;
            };
            if s != me {
                let now = start.elapsed().as_micros();
                res.deliver.record(now.saturating_sub(at).max(1) as u64)?;
            }
            res.received.entry(s).or_default().push(n);
        }
    }
    let (sent, mut sink) = writer.await?;
    res.sent = sent;
    let _closed = sink.close().await;
    Ok(res)
}

/// A tiny FIFO of send instants shared by a client's writer and reader (replies come back in
/// request order on one connection).
mod parking_lot_free {
    use std::collections::VecDeque;
    use std::sync::Mutex;
    use std::time::Instant;

    /// The queue.
    #[derive(Default)]
    pub struct Queue(Mutex<VecDeque<Instant>>);

    impl Queue {
        pub fn push(&self, i: Instant) {
            if let Ok(mut q) = self.0.lock() {
                q.push_back(i);
            }
        }

        pub fn pop(&self) -> Option<Instant> {
            self.0.lock().ok().and_then(|mut q| q.pop_front())
        }
    }
}

/// Renders a report as a table.
pub fn table(r: &Report) -> String {
    let mut out = String::new();
    let ms = |us: u64| format!("{:.2}", us as f64 / 1000.0);
    out.push_str(&format!(
        "workload {:?}: {} clients in {} rooms, {:.0} s\n",
        r.workload.unwrap_or(Workload::Dm),
        r.clients,
        r.rooms,
        r.seconds
    ));
    out.push_str(&format!(
        "sent {} ({:.0}/s)  acked {} ({:.0}/s)  delivered {} ({:.0}/s)  lost {}  duplicated {}  errors {:?}\n",
        r.sent,
        r.sent as f64 / r.seconds,
        r.acked,
        r.acked as f64 / r.seconds,
        r.delivered,
        r.delivered as f64 / r.seconds,
        r.lost,
        r.duplicated,
        r.errors
    ));
    out.push_str("latency (ms)      p50     p90     p99   p99.9     max\n");
    for (name, l) in [("send->ack", &r.ack_us), ("send->deliver", &r.deliver_us)] {
        out.push_str(&format!(
            "{name:<14} {:>7} {:>7} {:>7} {:>7} {:>7}\n",
            ms(l.p50),
            ms(l.p90),
            ms(l.p99),
            ms(l.p999),
            ms(l.max)
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
