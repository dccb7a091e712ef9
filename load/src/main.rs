//! `palaver-load`: drives a running Palaver over the native protocol and reports throughput,
//! latency percentiles, loss and duplication, and the server's RSS and CPU.

use clap::Parser;
use palaver_load::{RunConfig, Workload, run, table};
use std::time::Duration;

/// Load generator for Palaver (loopback only, bounded in count and time).
#[derive(Parser)]
#[command(name = "palaver-load", version, about)]
struct Cli {
    /// Native protocol URL.
    #[arg(long, default_value = "ws://127.0.0.1:8080/ws")]
    url: String,
    /// HS256 secret the server verifies tokens with (`PALAVER_JWT_SECRET`).
    #[arg(long, env = "PALAVER_JWT_SECRET")]
    secret: String,
    /// Room arrangement.
    #[arg(long, value_enum, default_value = "dm")]
    workload: Workload,
    /// Clients (at most 100,000).
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

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    anyhow::ensure!(cli.clients <= 100_000, "at most 100,000 clients");
    anyhow::ensure!(cli.duration <= 600, "at most 600 s");
    let prefix = format!("load{}-", std::process::id());
    let cfg = RunConfig {
        url: cli.url,
        secret: cli.secret,
        workload: cli.workload,
        clients: cli.clients,
        group_size: cli.group_size,
        rate: cli.rate,
        duration: Duration::from_secs(cli.duration),
        sources: cli.sources,
        server_pid: cli.pid,
        prefix,
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let report = rt.block_on(run(cfg, !cli.json))?;
    if cli.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", table(&report));
    }
    Ok(())
}
