//! The `drover` command line: every capability's command groups (`fleet::cli`,
//! `plugins::cli`, `jobs::cli`, `run_command::cli`, `audit::cli`, `trust::cli`,
//! `server::cli`), composed. What they share is in [`crate::cli`].

use std::path::PathBuf;

use clap::{Parser, Subcommand};

use crate::cli::context::{Ctx, Output};
use crate::paths::DataDir;
use crate::{audit, fleet, jobs, plugins, run_command, server, trust};

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

/// The commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the server: embedded MQTT broker, control plane, store and HTTP API.
    Serve(server::cli::ServeArgs),
    /// Create the root, publisher and control-plane keys, and the first key set.
    Keygen(trust::cli::KeygenArgs),
    /// Mint, list and revoke activation codes agents enroll with.
    #[command(subcommand)]
    Activation(fleet::cli::activation::ActivationCommand),
    /// The audit log: every operator action and every job execution.
    Audit(audit::cli::AuditArgs),
    /// Show or rotate the key set agents trust.
    #[command(subcommand)]
    Keyset(trust::cli::KeysetCommand),
    /// Sign, publish and list plugins.
    #[command(subcommand)]
    Plugin(plugins::cli::PluginCommand),
    /// List agents (the default), add them, show their events.
    Agents {
        /// What to do; `list` when absent.
        #[command(subcommand)]
        command: Option<fleet::cli::agents::AgentsCommand>,
    },
    /// Run a plugin on agents and print each result as it arrives.
    Run(jobs::cli::RunArgs),
    /// Show, cancel or list jobs.
    #[command(subcommand)]
    Job(jobs::cli::JobCommand),
    /// Run a command or shell script across agents, with rate control, timeouts,
    /// cancellation and full output.
    RunCommand(run_command::cli::RunCommandArgs),
    /// Show, cancel or list commands.
    #[command(subcommand)]
    Command(run_command::cli::CommandCmd),
    /// Configure an external broker like the embedded one: logins and topic ACLs.
    #[command(subcommand)]
    Broker(fleet::cli::broker_acl::BrokerCommand),
}

/// Runs the parsed command; returns the process exit code.
pub fn run(cli: Cli) -> anyhow::Result<i32> {
    let ctx = Ctx {
        data: DataDir::new(cli.data_dir),
        server: cli.server,
        output: cli.output,
    };
    match cli.command {
        Command::Serve(a) => server::cli::run(&ctx, a),
        Command::Keygen(a) => trust::cli::keygen(&ctx, a),
        Command::Keyset(c) => trust::cli::run(&ctx, c),
        Command::Activation(c) => fleet::cli::activation::run(&ctx, c),
        Command::Audit(a) => audit::cli::run(&ctx, a),
        Command::Plugin(c) => plugins::cli::run(&ctx, c),
        Command::Agents { command } => fleet::cli::agents::run(
            &ctx,
            command.unwrap_or(fleet::cli::agents::AgentsCommand::List),
        ),
        Command::Run(a) => jobs::cli::run(&ctx, a),
        Command::Job(c) => jobs::cli::job(&ctx, c),
        Command::RunCommand(a) => run_command::cli::run_command(&ctx, a),
        Command::Command(c) => run_command::cli::command(&ctx, c),
        Command::Broker(c) => fleet::cli::broker_acl::run(&ctx, c),
    }
}
