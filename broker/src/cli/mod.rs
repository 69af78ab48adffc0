//! The `drover` command line: flags checked once into types, one module per command group.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};

use crate::paths::DataDir;

mod activation;
mod agents;
mod audit;
mod broker;
mod command;
mod keygen;
mod keyset;
mod plugin;
mod run;
mod serve;

/// Drover: manage fleets of machines with signed WebAssembly plugins over MQTT.
#[derive(Debug, Parser)]
#[command(name = "drover", version, about)]
pub struct Cli {
    /// The data directory: database, keys, operator token.
    #[arg(
        long,
        global = true,
        env = "DROVER_DATA_DIR",
        default_value = "drover-data"
    )]
    pub data_dir: PathBuf,
    /// The server's API URL; found through the data directory when absent.
    #[arg(long, global = true, env = "DROVER_SERVER")]
    pub server: Option<String>,
    /// Output format.
    #[arg(long, global = true, value_enum, default_value_t = Output::Text)]
    pub output: Output,
    /// The command.
    #[command(subcommand)]
    pub command: Command,
}

/// Output formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    /// For people.
    Text,
    /// For programs.
    Json,
}

/// The commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the server: embedded MQTT broker, control plane, store and HTTP API.
    Serve(serve::ServeArgs),
    /// Create the publisher and control-plane keys.
    Keygen(keygen::KeygenArgs),
    /// Mint, list and revoke activation codes agents enroll with.
    #[command(subcommand)]
    Activation(activation::ActivationCommand),
    /// The audit log: every operator action and every job execution.
    Audit(audit::AuditArgs),
    /// Show or rotate the key set agents trust.
    #[command(subcommand)]
    Keyset(keyset::KeysetCommand),
    /// Sign, publish and list plugins.
    #[command(subcommand)]
    Plugin(plugin::PluginCommand),
    /// List agents (the default), add them, show their events.
    Agents {
        /// What to do; `list` when absent.
        #[command(subcommand)]
        command: Option<agents::AgentsCommand>,
    },
    /// Run a plugin on agents and print each result as it arrives.
    Run(run::RunArgs),
    /// Show, cancel or list jobs.
    #[command(subcommand)]
    Job(run::JobCommand),
    /// Run a command or shell script across agents, with rate control, timeouts,
    /// cancellation and full output.
    RunCommand(command::RunCommandArgs),
    /// Show, cancel or list commands.
    #[command(subcommand)]
    Command(command::CommandCmd),
    /// Configure an external broker like the embedded one: logins and topic ACLs.
    #[command(subcommand)]
    Broker(broker::BrokerCommand),
}

/// Shared context for commands.
#[derive(Debug)]
pub struct Ctx {
    /// The data directory.
    pub data: DataDir,
    /// `--server`.
    pub server: Option<String>,
    /// `--output`.
    pub output: Output,
}

impl Ctx {
    /// A client for the running server.
    pub fn client(&self) -> anyhow::Result<crate::client::Client> {
        crate::client::Client::connect(&self.data, self.server.as_deref())
    }
}

/// Runs the parsed command; returns the process exit code.
pub fn run(cli: Cli) -> anyhow::Result<i32> {
    let ctx = Ctx {
        data: DataDir::new(cli.data_dir),
        server: cli.server,
        output: cli.output,
    };
    match cli.command {
        Command::Serve(a) => serve::run(&ctx, a),
        Command::Keygen(a) => keygen::run(&ctx, a),
        Command::Keyset(c) => keyset::run(&ctx, c),
        Command::Activation(c) => activation::run(&ctx, c),
        Command::Audit(a) => audit::run(&ctx, a),
        Command::Plugin(c) => plugin::run(&ctx, c),
        Command::Agents { command } => {
            agents::run(&ctx, command.unwrap_or(agents::AgentsCommand::List))
        }
        Command::Run(a) => run::run(&ctx, a),
        Command::Job(c) => run::job(&ctx, c),
        Command::RunCommand(a) => command::run_command(&ctx, a),
        Command::Command(c) => command::command(&ctx, c),
        Command::Broker(c) => broker::run(&ctx, c),
    }
}

/// Parses `90s`, `10m`, `24h`, `30d`, or plain seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = match s.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => s.split_at(i),
        None => (s, "s"),
    };
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration like 30s, 10m, 24h or 90d"))?;
    let secs = match unit {
        "ms" => return Ok(Duration::from_millis(n)),
        "s" => n,
        "m" => n * 60,
        "h" => n * 3600,
        "d" => n * 86400,
        _ => {
            return Err(format!(
                "{s:?}: unknown unit {unit:?}; use ms, s, m, h or d"
            ));
        }
    };
    Ok(Duration::from_secs(secs))
}

/// Parses `KEY=VALUE`.
pub fn parse_tag(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(format!("{s:?} must be KEY=VALUE")),
    }
}

/// Parses a socket address.
pub fn parse_addr(s: &str) -> Result<SocketAddr, String> {
    s.parse().map_err(|e| format!("{s:?}: {e}"))
}

/// Prints a value as pretty JSON.
pub fn print_json(v: &impl serde::Serialize) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

/// "3s ago", "5m ago", ...
pub fn ago(ms: u64) -> String {
    let now = drover_protocol::now_ms();
    if ms == 0 {
        return "never".into();
    }
    let d = now.saturating_sub(ms) / 1000;
    match d {
        0..=59 => format!("{d}s ago"),
        60..=3599 => format!("{}m ago", d / 60),
        3600..=86399 => format!("{}h ago", d / 3600),
        _ => format!("{}d ago", d / 86400),
    }
}

/// Prints rows as aligned columns.
pub fn print_table(header: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            widths[i] = widths[i].max(c.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let mut s = String::new();
        for (i, c) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                s.push_str(c);
            } else {
                s.push_str(&format!("{c:<w$}  ", w = widths[i]));
            }
        }
        println!("{}", s.trim_end());
    };
    line(header.to_vec());
    for r in rows {
        line(r.iter().map(String::as_str).collect());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("90").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_duration("10m").unwrap(), Duration::from_secs(600));
        assert_eq!(parse_duration("2d").unwrap(), Duration::from_secs(172800));
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert!(parse_duration("soon").is_err());
        assert!(parse_duration("5y").is_err());
    }
}
