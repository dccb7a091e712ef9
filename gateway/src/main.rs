//! The `palaver` binary: `serve` (the default: everything in one process), `node`, `gateway`
//! and `push-worker` (the processes of a cluster), `migrate` and `token`.

use anyhow::Context;
use clap::{Parser, Subcommand};
use palaver_gateway::auth::{Auth, Claims, now_secs};
use palaver_gateway::config::Config;
use palaver_gateway::node_process::NodeProcess;
use palaver_gateway::push::PushWorkerProcess;
use palaver_gateway::{Palaver, telemetry};
use std::collections::HashMap;
use std::path::PathBuf;

/// Palaver: a real-time chat backend.
#[derive(Parser)]
#[command(name = "palaver", version, about)]
struct Cli {
    /// TOML configuration file; `PALAVER_*` environment variables override it.
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Cmd>,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run everything in one process: gateway, node, embedded store, in-process bus (default).
    Serve,
    /// Run one node of a cluster (needs PALAVER_NODES, PALAVER_NODE_ID, PALAVER_CLUSTER_ADDR,
    /// PALAVER_KAFKA_BROKERS and a shared store).
    Node,
    /// Run one gateway of a cluster (needs PALAVER_NODES and PALAVER_KAFKA_BROKERS).
    Gateway,
    /// Run a push worker of a cluster: sends the push jobs of `palaver.push` (needs
    /// PALAVER_KAFKA_BROKERS, the shared store and PALAVER_PUSH_FCM_CREDENTIALS or
    /// PALAVER_PUSH_WEBHOOK_URL).
    PushWorker,
    /// Apply the store's schema migrations: the CQL of `schema/cql/` on ScyllaDB
    /// (PALAVER_SCYLLA_NODES), the SQL migrations on PostgreSQL (PALAVER_POSTGRES_URL).
    Migrate,
    /// Print a JWT signed with the configured HS256 secret.
    Token {
        /// User id (`sub`).
        #[arg(long)]
        sub: String,
        /// Display name (`name`).
        #[arg(long)]
        name: Option<String>,
        /// Handle (`username`).
        #[arg(long)]
        username: Option<String>,
        /// Avatar URL (`picture`).
        #[arg(long)]
        picture: Option<String>,
        /// Lifetime in seconds.
        #[arg(long, default_value_t = 3600)]
        ttl: u64,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let env: HashMap<String, String> = std::env::vars().collect();
    let config = Config::load(cli.config.as_deref(), &env)?;
    match cli.command.unwrap_or(Cmd::Serve) {
        Cmd::Serve => run(&config, &env, "serve", serve(config.clone(), false)),
        Cmd::Gateway => run(&config, &env, "gateway", serve(config.clone(), true)),
        Cmd::Node => run(&config, &env, "node", node(config.clone())),
        Cmd::PushWorker => run(&config, &env, "push-worker", push_worker(config.clone())),
        Cmd::Migrate => run(&config, &env, "migrate", migrate(config.clone())),
        Cmd::Token {
            sub,
            name,
            username,
            picture,
            ttl,
        } => {
            let auth = Auth::new(&config.jwt, &config.data_dir).map_err(anyhow::Error::msg)?;
            let now = now_secs();
            let claims = Claims {
                sub,
                exp: now + ttl,
                iat: Some(now),
                name,
                username,
                picture,
            };
            println!("{}", auth.mint(&claims).map_err(anyhow::Error::msg)?);
            Ok(())
        }
    }
}

async fn migrate(config: Config) -> anyhow::Result<()> {
    use palaver_gateway::config::StoreChoice;
    match &config.store {
        StoreChoice::Scylla(c) => {
            let v = node::store::scylla::migrate(c).await?;
            println!("keyspace {} at schema version {v}", c.keyspace);
        }
        StoreChoice::Postgres { url, .. } => {
            node::store::postgres::PostgresStore::connect(url, 1).await?;
            println!("postgres schema up to date");
        }
        StoreChoice::Embedded => {
            node::store::embedded::EmbeddedStore::open(&config.data_dir, config.durability)?;
            println!("embedded store in {} up to date", config.data_dir.display());
        }
    }
    Ok(())
}

/// Runs one subcommand on a fresh runtime with logs and traces installed for its `role`, then
/// exports the spans still queued.
fn run(
    config: &Config,
    env: &HashMap<String, String>,
    role: &str,
    command: impl std::future::Future<Output = anyhow::Result<()>>,
) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("palaver")
        .build()?;
    let instance = match role {
        "node" => Some(config.node.node_id.to_string()),
        "serve" | "gateway" => Some(config.gateway_id.to_string()),
        _ => None,
    };
    {
        // The trace exporter runs on this runtime.
        let _entered = rt.enter();
        telemetry::init(config.log_format, role, instance.as_deref(), env)
            .map_err(anyhow::Error::msg)?;
    }
    raise_nofile();
    let result = rt.block_on(command);
    rt.block_on(telemetry::shutdown());
    // The command has drained and closed what it runs (the store included). Whatever task is
    // left is dropped, and a thread stuck in a library call does not hold the exit: closing a
    // Kafka consumer whose brokers are gone can block in librdkafka for good, and dropping the
    // runtime would wait for it.
    rt.shutdown_timeout(RUNTIME_SHUTDOWN);
    result
}

/// Longest wait for the runtime's threads once a command has finished.
const RUNTIME_SHUTDOWN: std::time::Duration = std::time::Duration::from_secs(5);

async fn node(config: Config) -> anyhow::Result<()> {
    let id = config.node.node_id.clone();
    let process = NodeProcess::start(config)
        .await
        .with_context(|| format!("starting node {id}"))?;
    tracing::info!(node = %id, http = %process.http_addr(), cluster = %process.cluster_addr(), "node listening");
    println!(
        "listening on {} cluster {}",
        process.http_addr(),
        process.cluster_addr()
    );
    wait_for_signal().await?;
    tracing::info!("shutting down");
    process.shutdown().await
}

async fn push_worker(config: Config) -> anyhow::Result<()> {
    let process = PushWorkerProcess::start(config)
        .await
        .context("starting the push worker")?;
    tracing::info!(http = %process.http_addr(), "push worker running");
    println!("listening on {}", process.http_addr());
    wait_for_signal().await?;
    tracing::info!("shutting down");
    process.shutdown().await
}

async fn serve(config: Config, gateway_only: bool) -> anyhow::Result<()> {
    let data_dir = config.data_dir.clone();
    let palaver = if gateway_only {
        Palaver::start_gateway(config)
            .await
            .context("starting the gateway")?
    } else {
        Palaver::start(config)
            .await
            .with_context(|| format!("starting palaver (data dir {})", data_dir.display()))?
    };
    tracing::info!(addr = %palaver.addr(), data_dir = %data_dir.display(), "palaver listening");
    // One machine-readable line on stdout, for scripts and tests.
    println!("listening on {}", palaver.addr());
    wait_for_signal().await?;
    tracing::info!("shutting down");
    palaver.shutdown().await
}

async fn wait_for_signal() -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    Ok(())
}

/// Every client socket is a descriptor: raises the open-file limit as far as allowed, to the
/// kernel's `fs.nr_open` where the process may raise its hard limit (root, CAP_SYS_RESOURCE),
/// else to the hard limit.
fn raise_nofile() {
    use rlimit::Resource;
    let want = std::fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .unwrap_or(1 << 20);
    let Ok((soft, hard)) = rlimit::getrlimit(Resource::NOFILE) else {
        return;
    };
    if soft >= want {
        return;
    }
    let raised = rlimit::setrlimit(Resource::NOFILE, want, want.max(hard))
        .map(|()| want)
        .or_else(|_| rlimit::setrlimit(Resource::NOFILE, hard, hard).map(|()| hard));
    match raised {
        Ok(n) => tracing::debug!(from = soft, to = n, "open-file limit raised"),
        Err(e) => tracing::warn!(limit = soft, error = %e, "cannot raise the open-file limit"),
    }
}
