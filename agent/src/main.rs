//! `drover-agent`: parse flags, start logging, run the agent until a signal.

use std::path::PathBuf;

use anyhow::Context as _;
use clap::Parser;
use drover_agent::config::{Config, Overrides};
use drover_agent::identity::EnrollSettings;
use tokio_util::sync::CancellationToken;

/// The Drover agent: runs signed WebAssembly plugins received over MQTT.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// The configuration file (TOML).
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// The agent's id (overrides the file).
    #[arg(long)]
    id: Option<String>,
    /// The broker, mqtt://HOST:PORT or mqtts://HOST:PORT (overrides the file).
    #[arg(long)]
    broker: Option<String>,
    /// Where the agent keeps its caches and state (overrides the file).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// A file holding the MQTT password (overrides the file).
    #[arg(long)]
    password_file: Option<PathBuf>,
    /// A tag KEY=VALUE to announce; repeatable; added to the file's tags.
    #[arg(long = "tag", value_parser = parse_tag)]
    tags: Vec<(String, String)>,
    /// Log format: text or json.
    #[arg(long, default_value = "text")]
    log_format: drover_protocol::telemetry::Format,
    /// Enroll instead of running.
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, clap::Subcommand)]
enum Command {
    /// Enroll with an activation code: make this agent's keys, register their public
    /// halves, and store the broker credential and trust roots in the data directory.
    Enroll {
        /// The server's API, http://HOST:PORT.
        #[arg(long)]
        server: String,
        /// The activation id.
        #[arg(long)]
        activation_id: String,
        /// The activation code.
        #[arg(long)]
        code: String,
    },
}

fn parse_tag(s: &str) -> Result<(String, String), String> {
    let (k, v) = s
        .split_once('=')
        .ok_or_else(|| format!("tag {s:?} must be KEY=VALUE"))?;
    if k.is_empty() {
        return Err(format!("tag {s:?} has an empty key"));
    }
    Ok((k.to_string(), v.to_string()))
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    drover_protocol::telemetry::init("info", args.log_format);
    let config = Config::load(
        args.config.as_deref(),
        Overrides {
            id: args.id,
            broker: args.broker,
            data_dir: args.data_dir,
            password_file: args.password_file,
            tags: args.tags,
        },
    )?;
    if let Some(Command::Enroll {
        server,
        activation_id,
        code,
    }) = &args.command
    {
        let settings = EnrollSettings {
            server: server.clone(),
            activation_id: activation_id.clone(),
            code: code.clone(),
        };
        let e = drover_agent::identity::enroll_here(&config.data_dir, &config.id, &settings)?;
        println!(
            "enrolled as {} (broker {}, {} root key(s)); start with: drover-agent --id {} --data-dir {}",
            e.agent_id,
            e.broker,
            e.roots.len(),
            e.agent_id,
            config.data_dir.display()
        );
        return Ok(());
    }
    // Two worker threads: the agent is small; plugins compile on the blocking pool.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    rt.block_on(async {
        let shutdown = CancellationToken::new();
        let s = shutdown.clone();
        tokio::spawn(async move {
            drover_protocol::link::terminated().await;
            s.cancel();
        });
        drover_agent::run(config, shutdown).await
    })
    .map_err(|e| {
        tracing::error!("{e:#}");
        e
    })
}
