//! `palaver-load`: drives a running Palaver (native protocol) or the Node.js Socket.IO peer and
//! reports throughput, latency percentiles, loss and duplication, and the server's RSS and CPU;
//! `palaver-load bench` runs the standard suite against a fresh server and writes
//! `load/RESULTS.md`.

use clap::{Args, Parser, Subcommand};
use palaver_load::abuse::{AbuseConfig, abuse, render};
use palaver_load::bench::{BenchConfig, Sizes, bench};
use palaver_load::{Protocol, RoomKind, RunConfig, Workload, raise_fd_limit, run, table};
use std::path::PathBuf;
use std::time::Duration;

/// Load generator for Palaver (loopback only, bounded in count and time).
///
/// Without a subcommand it runs one workload (the same as `palaver-load run`).
#[derive(Parser)]
#[command(
    name = "palaver-load",
    version,
    about,
    args_conflicts_with_subcommands = true
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(Subcommand)]
enum Command {
    /// Run one workload against a running server.
    Run(RunArgs),
    /// Start a fresh `palaver serve` (and the Node.js peer), run the standard suite, write the
    /// results table.
    Bench(BenchArgs),
    /// Start a fresh `palaver serve`, run a probe of ordinary chat, and add one attack per
    /// phase (clients that never read, slowloris, a connect-and-reset storm, a huge group
    /// flooded by one sender); print the probe's latency and the server's memory per phase.
    Abuse(AbuseArgs),
}

#[derive(Args)]
struct AbuseArgs {
    /// The release server binary.
    #[arg(long, default_value = "target/release/palaver")]
    palaver: PathBuf,
    /// Loopback source addresses to spread connections over.
    #[arg(long, default_value_t = 16)]
    sources: u8,
    /// Seconds per phase.
    #[arg(long, default_value_t = 15)]
    phase_seconds: u64,
    /// Direct rooms of the probe.
    #[arg(long, default_value_t = 20)]
    probe_pairs: usize,
    /// Messages per second per probe sender.
    #[arg(long, default_value_t = 10.0)]
    probe_rate: f64,
    /// never-read: members that never read.
    #[arg(long, default_value_t = 500)]
    silent: usize,
    /// slowloris: connections dribbling a request head (half as many dribble a frame).
    #[arg(long, default_value_t = 1000)]
    slowloris: usize,
    /// connect-drop: sessions opened and reset at once.
    #[arg(long, default_value_t = 10_000)]
    storm: usize,
    /// big-group: members of the group.
    #[arg(long, default_value_t = 200_000)]
    group_members: usize,
    /// big-group: members online and reading.
    #[arg(long, default_value_t = 5_000)]
    group_online: usize,
    /// The server's per-user message rate for the run (the flooders meet it); default: the
    /// server's default (20/s, bursts of 40).
    #[arg(long)]
    flood_limit: Option<u32>,
    /// The attack phases to run, comma-separated (never-read, slowloris, connect-drop,
    /// big-group); the baseline always runs first.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "never-read,slowloris,connect-drop,big-group"
    )]
    phases: Vec<String>,
    /// The nice value of this generator's own threads (the attackers' client side; the probe
    /// keeps -10 and the server 0), so that on a machine shared with the server they use only
    /// what it leaves; 0 leaves them at the server's priority. Needs root; ignored without.
    #[arg(long, default_value_t = 0, allow_negative_numbers = true)]
    attackers_nice: i32,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct RunArgs {
    /// Server URL: `ws://host:port/ws` (native) or `ws://host:port/socket.io/` (socketio).
    #[arg(long, default_value = "ws://127.0.0.1:8080/ws")]
    url: String,
    /// HS256 secret the server verifies tokens with (`PALAVER_JWT_SECRET`).
    #[arg(long, env = "PALAVER_JWT_SECRET", hide_env_values = true)]
    secret: Option<String>,
    /// What the clients do.
    #[arg(long, value_enum, default_value = "dm")]
    workload: Workload,
    /// Wire protocol (socketio: dm, group, idle and connect-storm, against load/peer-socketio or
    /// Palaver's `/socket.io/`).
    #[arg(long, value_enum, default_value = "native")]
    protocol: Protocol,
    /// Clients (at most 300,000).
    #[arg(long, default_value_t = 100)]
    clients: usize,
    /// Members per group room.
    #[arg(long, default_value_t = 10)]
    group_size: usize,
    /// Messages per second per client.
    #[arg(long, default_value_t = 10.0)]
    rate: f64,
    /// Seconds of sending (at most 600).
    #[arg(long, default_value_t = 10)]
    duration: u64,
    /// Message text length in bytes.
    #[arg(long, default_value_t = 100)]
    message_bytes: usize,
    /// reconnect-storm: sessions dropped and reconnected.
    #[arg(long, default_value_t = 0)]
    drop: usize,
    /// reconnect-storm: milliseconds between the drop and the reconnect.
    #[arg(long, default_value_t = 1000)]
    outage_ms: u64,
    /// reconnect-storm: room arrangement.
    #[arg(long, value_enum, default_value = "dm")]
    storm_rooms: RoomKind,
    /// Loopback source addresses to spread connections over.
    #[arg(long, default_value_t = 8)]
    sources: u8,
    /// Server pid, for RSS and CPU.
    #[arg(long)]
    pid: Option<u32>,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct BenchArgs {
    /// The release server binary (built beforehand: `cargo build --release -p palaver-gateway`).
    #[arg(long, default_value = "target/release/palaver")]
    palaver: PathBuf,
    /// The Node.js Socket.IO peer's directory (`npm ci` done there).
    #[arg(long, default_value = "load/peer-socketio")]
    peer_dir: PathBuf,
    /// Where to write the results.
    #[arg(long, default_value = "load/RESULTS.md")]
    out: PathBuf,
    /// About a minute instead of a few: smaller sizes, no 20,000 msg/s run.
    #[arg(long)]
    quick: bool,
    /// Do not run the peer.
    #[arg(long)]
    skip_peer: bool,
    /// Loopback source addresses to spread connections over.
    #[arg(long, default_value_t = 8)]
    sources: u8,
    /// dm: clients [200; quick 100].
    #[arg(long)]
    dm_clients: Option<usize>,
    /// dm: messages per second per client [20].
    #[arg(long)]
    dm_rate: Option<f64>,
    /// group: clients [200; quick 100].
    #[arg(long)]
    group_clients: Option<usize>,
    /// group: members per room [10].
    #[arg(long)]
    group_size: Option<usize>,
    /// group: messages per second per client [10].
    #[arg(long)]
    group_rate: Option<f64>,
    /// dm and group: seconds [10; quick 4].
    #[arg(long)]
    seconds: Option<u64>,
    /// idle: sessions [10,000; quick 2,000].
    #[arg(long)]
    idle_sessions: Option<usize>,
    /// idle: seconds held [10; quick 3].
    #[arg(long)]
    idle_seconds: Option<u64>,
    /// connect-storm: sessions [10,000; quick 2,000].
    #[arg(long)]
    connect_storm: Option<usize>,
    /// reconnect-storm: sessions held [5,000; quick 1,000].
    #[arg(long)]
    storm_clients: Option<usize>,
    /// reconnect-storm: sessions dropped [2,000; quick 400].
    #[arg(long)]
    storm_drop: Option<usize>,
    /// reconnect-storm: messages per second per client [0.5; quick 1].
    #[arg(long)]
    storm_rate: Option<f64>,
    /// reconnect-storm: seconds [12; quick 6].
    #[arg(long)]
    storm_seconds: Option<u64>,
    /// Durable-send run: clients at 20 msg/s each [1,000, i.e. 20,000 msg/s; quick 0 = skip].
    #[arg(long)]
    ack_clients: Option<usize>,
}

fn sizes(a: &BenchArgs) -> Sizes {
    let d = if a.quick {
        Sizes::quick()
    } else {
        Sizes::full()
    };
    Sizes {
        dm_clients: a.dm_clients.unwrap_or(d.dm_clients),
        dm_rate: a.dm_rate.unwrap_or(d.dm_rate),
        group_clients: a.group_clients.unwrap_or(d.group_clients),
        group_size: a.group_size.unwrap_or(d.group_size),
        group_rate: a.group_rate.unwrap_or(d.group_rate),
        seconds: a.seconds.unwrap_or(d.seconds),
        idle_sessions: a.idle_sessions.unwrap_or(d.idle_sessions),
        idle_seconds: a.idle_seconds.unwrap_or(d.idle_seconds),
        connect_storm: a.connect_storm.unwrap_or(d.connect_storm),
        storm_clients: a.storm_clients.unwrap_or(d.storm_clients),
        storm_drop: a.storm_drop.unwrap_or(d.storm_drop),
        storm_rate: a.storm_rate.unwrap_or(d.storm_rate),
        storm_seconds: a.storm_seconds.unwrap_or(d.storm_seconds),
        ack_clients: a.ack_clients.unwrap_or(d.ack_clients),
    }
}

fn check_bounds(clients: usize, seconds: u64) -> anyhow::Result<()> {
    anyhow::ensure!(clients <= 300_000, "at most 300,000 clients");
    anyhow::ensure!(seconds <= 600, "at most 600 s");
    // One descriptor per client here (and one per session in the server): refuse up front
    // rather than fail half-way with EMFILE.
    let limit = rlimit::getrlimit(rlimit::Resource::NOFILE).map_or(0, |(soft, _)| soft);
    let need = clients as u64 + 64;
    anyhow::ensure!(
        limit >= need,
        "{clients} clients need about {need} open files; the limit is {limit} and this process \
         may not raise it (raise the hard limit, `ulimit -Hn`, as a privileged user)"
    );
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    raise_fd_limit();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    match cli.command {
        Some(Command::Bench(a)) => {
            let s = sizes(&a);
            for (c, secs) in [
                (s.dm_clients, s.seconds),
                (s.group_clients, s.seconds),
                (s.idle_sessions, s.idle_seconds),
                (s.connect_storm, 0),
                (s.storm_clients, s.storm_seconds),
                (s.ack_clients, s.seconds),
            ] {
                check_bounds(c, secs)?;
            }
            let command = std::env::args().collect::<Vec<_>>().join(" ");
            let cfg = BenchConfig {
                palaver: a.palaver,
                peer_dir: a.peer_dir,
                out: a.out,
                sizes: s,
                sources: a.sources,
                skip_peer: a.skip_peer,
                command,
            };
            rt.block_on(bench(cfg))?;
            Ok(())
        }
        Some(Command::Abuse(a)) => {
            check_bounds(
                a.storm.max(a.group_online + a.silent) + a.slowloris * 2,
                a.phase_seconds,
            )?;
            anyhow::ensure!(
                a.group_members <= 1_000_000,
                "at most 1,000,000 group members"
            );
            let cfg = AbuseConfig {
                palaver: a.palaver,
                sources: a.sources,
                phase: Duration::from_secs(a.phase_seconds),
                probe_pairs: a.probe_pairs,
                probe_rate: a.probe_rate,
                silent: a.silent,
                slowloris: a.slowloris,
                storm: a.storm,
                group_members: a.group_members.max(2),
                group_online: a.group_online.min(a.group_members.saturating_sub(1)),
                flood_limit: a.flood_limit,
                phases: a.phases,
                attackers_nice: a.attackers_nice,
            };
            if let Some(bad) = cfg
                .phases
                .iter()
                .find(|p| !palaver_load::abuse::PHASES.contains(&p.as_str()))
            {
                anyhow::bail!(
                    "unknown phase {bad:?}: the phases are {}",
                    palaver_load::abuse::PHASES.join(", ")
                );
            }
            let report = rt.block_on(abuse(cfg))?;
            if a.json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{}", render(&report));
            }
            Ok(())
        }
        Some(Command::Run(a)) => run_one(&rt, a),
        None => run_one(&rt, cli.run),
    }
}

fn run_one(rt: &tokio::runtime::Runtime, a: RunArgs) -> anyhow::Result<()> {
    check_bounds(a.clients, a.duration)?;
    let secret = a.secret.ok_or_else(|| {
        anyhow::anyhow!("the server's secret is needed: --secret or PALAVER_JWT_SECRET")
    })?;
    let cfg = RunConfig {
        url: a.url,
        secret,
        workload: a.workload,
        protocol: a.protocol,
        clients: a.clients,
        group_size: a.group_size,
        rate: a.rate,
        duration: Duration::from_secs(a.duration),
        sources: a.sources,
        server_pid: a.pid,
        prefix: format!("load{}-", std::process::id()),
        message_bytes: a.message_bytes,
        drop: a.drop,
        outage: Duration::from_millis(a.outage_ms),
        storm_rooms: a.storm_rooms,
    };
    let report = rt.block_on(run(cfg, !a.json))?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", table(&report));
    }
    Ok(())
}
