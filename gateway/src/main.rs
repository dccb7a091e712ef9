//! The `palaver` binary: `serve` (the default: everything in one process) and `token`.

use anyhow::Context;
use clap::{Parser, Subcommand};
use palaver_gateway::auth::{Auth, Claims, now_secs};
use palaver_gateway::config::Config;
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
        Cmd::Serve => {
            telemetry::init(config.log_format);
            let rt = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .thread_name("palaver")
                .build()?;
            rt.block_on(serve(config))
        }
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

async fn serve(config: Config) -> anyhow::Result<()> {
    let data_dir = config.data_dir.clone();
    let palaver = Palaver::start(config)
        .await
        .with_context(|| format!("starting palaver (data dir {})", data_dir.display()))?;
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
