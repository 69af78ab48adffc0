//! `drover run-command` and `drover command show|cancel|list`.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use drover_protocol::job::Captured;
use drover_protocol::worlds::command::CommandOutput;

use super::types::{COMMAND_PLUGIN, CommandRequest, CommandSummary};
use crate::cli::args::{parse_duration, parse_tag};
use crate::cli::context::{Ctx, Output};
use crate::cli::print::{ago, print_json, print_table};
use crate::jobs::cli::{
    EXIT_FAILED, EXIT_OK, EXIT_TIMEOUT, RateArgs, cancel, counts_line, print_created,
    wait_for_targets,
};
use crate::jobs::types::{JobCreated, JobView, LiveEvent, LiveWhat, Target, TargetState};

/// Flags of `drover run-command`.
#[derive(Debug, clap::Args)]
pub struct RunCommandArgs {
    /// `all`, `tag:KEY=VALUE`, or comma-separated agent ids.
    #[arg(long, short)]
    targets: String,
    /// A shell script to run instead of a program and its arguments.
    #[arg(long)]
    script: Option<String>,
    /// The shell for --script.
    #[arg(long, requires = "script")]
    shell: Option<String>,
    /// The working directory on each agent.
    #[arg(long)]
    cwd: Option<String>,
    /// An environment variable KEY=VALUE for the command; repeatable.
    #[arg(long = "env", value_parser = parse_tag)]
    env: Vec<(String, String)>,
    /// Run as this user (the agent must run as root and allow it in `[policy] run_as`).
    #[arg(long)]
    run_as: Option<String>,
    /// The command's deadline on each agent; its whole process tree is killed then.
    #[arg(long, default_value = "10m", value_parser = parse_duration)]
    timeout: Duration,
    /// How long offline agents may still receive the command; after that they are
    /// undeliverable.
    #[arg(long, default_value = "10m", value_parser = parse_duration)]
    delivery_timeout: Duration,
    /// The cap on each of stdout and stderr per target, such as 1MiB or 64KiB. A cut
    /// is flagged with the byte count.
    #[arg(long, default_value = "1MiB", value_parser = parse_size)]
    output_cap: u64,
    #[command(flatten)]
    rate: RateArgs,
    /// Stream output live as the agents write it.
    #[arg(long, conflicts_with = "no_wait")]
    follow: bool,
    /// Print the command id and exit without waiting.
    #[arg(long)]
    no_wait: bool,
    /// How long to wait for every target; by default the delivery timeout plus the
    /// command's timeout plus 30 s.
    #[arg(long, value_parser = parse_duration)]
    wait: Option<Duration>,
    /// The command runner plugin.
    #[arg(long, default_value = COMMAND_PLUGIN)]
    plugin: String,
    /// The program and its arguments, after `--`.
    #[arg(last = true)]
    argv: Vec<String>,
}

/// `drover command ...`.
#[derive(Debug, clap::Subcommand)]
pub enum CommandCmd {
    /// Show a command: state counts, and each target's state and exit code; with
    /// --agent, that target's full output.
    Show {
        /// The command id.
        id: String,
        /// Show this agent's full stdout and stderr.
        #[arg(long)]
        agent: Option<String>,
    },
    /// Cancel a command: targets not started never will be, and running ones are
    /// stopped with their whole process tree.
    Cancel {
        /// The command id.
        id: String,
    },
    /// List recent commands: what each ran, its targets' states and exit codes.
    List {
        /// How many.
        #[arg(long, default_value_t = 20)]
        limit: u32,
    },
}

/// Parses `1048576`, `64KiB`, `1MiB`, `2M`, `512k`.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a size like 1MiB or 64KiB"))?;
    let mult = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        _ => return Err(format!("{s:?}: unknown unit {unit:?}; use B, KiB or MiB")),
    };
    if n == 0 {
        return Err("the output cap must be positive".into());
    }
    Ok(n * mult)
}

/// `drover run-command`.
pub fn run_command(ctx: &Ctx, a: RunCommandArgs) -> anyhow::Result<i32> {
    if a.script.is_none() && a.argv.is_empty() {
        anyhow::bail!("give the command after `--`, or a --script");
    }
    if a.script.is_some() && !a.argv.is_empty() {
        anyhow::bail!("give either a command after `--` or a --script, not both");
    }
    let client = ctx.client()?;
    let started = Instant::now();
    let req = CommandRequest {
        targets: a.targets.clone(),
        argv: a.argv.clone(),
        script: a.script.clone(),
        shell: a.shell.clone(),
        cwd: a.cwd.clone(),
        env: a.env.iter().cloned().collect(),
        run_as: a.run_as.clone(),
        timeout_secs: Some(a.timeout.as_secs().max(1)),
        delivery_secs: Some(a.delivery_timeout.as_secs().max(1)),
        output_kib: Some(a.output_cap.div_ceil(1024)),
        rate: a.rate.request(),
        plugin: Some(a.plugin.clone()),
        stream: Some(true),
    };
    let created: JobCreated = client.post("run-command", "/api/v1/commands", &req)?;
    if ctx.output == Output::Text {
        eprintln!(
            "command {} : {} target(s){}",
            created.job_id,
            created.agents.len(),
            match (&a.rate.max_concurrency, &a.rate.max_errors) {
                (None, None) => String::new(),
                (c, e) => format!(
                    ", max-concurrency {}, max-errors {}",
                    c.as_deref().unwrap_or("all"),
                    e.as_deref().unwrap_or("none")
                ),
            }
        );
    }
    if a.no_wait {
        return print_created(ctx.output, &created);
    }
    let deadline = started
        + a.wait
            .unwrap_or(a.delivery_timeout + a.timeout + Duration::from_secs(30));

    // Agents whose output was seen live, so it is not printed twice.
    let mut streamed: HashSet<String> = HashSet::new();
    if a.follow {
        let path = format!("/api/v1/jobs/{}/live", created.job_id);
        let json = ctx.output == Output::Json;
        let r = client.stream_lines("follow", &path, |line| {
            let Ok(e) = serde_json::from_str::<LiveEvent>(line) else {
                return Ok(true);
            };
            if json {
                if !matches!(e.what, LiveWhat::Keepalive) {
                    println!("{line}");
                }
            } else {
                print_live(&e, &mut streamed);
            }
            Ok(!matches!(e.what, LiveWhat::End) && Instant::now() < deadline)
        });
        if let Err(e) = r {
            eprintln!("live output stopped ({e:#}); waiting for the results");
        }
    }

    let text = ctx.output == Output::Text;
    let view = wait_for_targets(&client, "command status", &created.job_id, deadline, |t| {
        if text {
            print_target(t, !streamed.contains(&t.agent_id));
        }
        Ok(())
    })?;
    if ctx.output == Output::Json {
        let full: JobView = client.get(
            "command status",
            &format!("/api/v1/jobs/{}", created.job_id),
        )?;
        print_json(&full)?;
    } else {
        eprintln!(
            "{} after {:.1}s: {}",
            created.job_id,
            started.elapsed().as_secs_f64(),
            counts_line(&view)
        );
        if view.done() < view.total() {
            eprintln!(
                "still running: see `drover command show {}`",
                created.job_id
            );
        }
    }
    Ok(exit_code(&view))
}

/// 0 when every target succeeded, 1 when some did not, 2 when some are not final.
fn exit_code(view: &JobView) -> i32 {
    let success = view
        .counts
        .get(TargetState::Success.as_str())
        .copied()
        .unwrap_or(0);
    if view.done() < view.total() {
        EXIT_TIMEOUT
    } else if success == view.total() {
        EXIT_OK
    } else {
        EXIT_FAILED
    }
}

fn print_live(e: &LiveEvent, streamed: &mut HashSet<String>) {
    match &e.what {
        LiveWhat::Output { stream, text, .. } => {
            streamed.insert(e.agent_id.clone());
            let mark = match stream {
                drover_protocol::job::StreamName::Stdout => "|",
                drover_protocol::job::StreamName::Stderr => "!",
            };
            for line in text.lines() {
                println!("{} {mark} {line}", e.agent_id);
            }
        }
        LiveWhat::State { state, detail } => {
            if !matches!(state, TargetState::Pending) {
                eprintln!(
                    "{}: {}{}",
                    e.agent_id,
                    state.as_str(),
                    detail
                        .as_deref()
                        .map(|d| format!(" ({d})"))
                        .unwrap_or_default()
                );
            }
        }
        LiveWhat::Lagged { skipped } => {
            eprintln!("({skipped} live events skipped; the stored output has everything)")
        }
        LiveWhat::Keepalive | LiveWhat::End => {}
    }
}

/// One line for a target: state, exit code, time, and why.
fn target_line(t: &Target) -> String {
    let out = output_of(t);
    let exit = match out.as_ref().and_then(|o| o.exit_code) {
        Some(code) => format!("exit {code}"),
        None => String::new(),
    };
    let ms = t
        .result
        .as_ref()
        .map(|r| format!("{} ms", r.duration_ms))
        .unwrap_or_default();
    let detail = match (&out, &t.detail) {
        (Some(o), _) if o.exit_code == Some(0) => String::new(),
        (_, Some(d)) => d.clone(),
        _ => String::new(),
    };
    format!(
        "{:<20} {:<13} {:<8} {:>8}  {}",
        t.agent_id,
        t.state.as_str(),
        exit,
        ms,
        detail
    )
    .trim_end()
    .to_string()
}

fn print_stream(name: &str, s: &Captured) {
    if s.text.is_empty() && s.total_bytes == 0 {
        return;
    }
    println!("  --- {name} ---");
    for line in s.text.lines() {
        println!("  {line}");
    }
    if s.truncated {
        println!(
            "  [{name} truncated: {} bytes written, {} kept]",
            s.total_bytes,
            s.text.len()
        );
    }
}

fn print_target(t: &Target, with_output: bool) {
    println!("{}", target_line(t));
    if with_output && let Some(o) = output_of(t) {
        if o.partial {
            println!("  [stopped before it ended: the output it had written]");
        }
        print_stream("stdout", &o.stdout);
        print_stream("stderr", &o.stderr);
    }
}

/// `drover command`.
pub fn command(ctx: &Ctx, cmd: CommandCmd) -> anyhow::Result<i32> {
    match cmd {
        CommandCmd::Show { id, agent } => show(ctx, &id, agent.as_deref()),
        CommandCmd::Cancel { id } => cancel(ctx, &id),
        CommandCmd::List { limit } => list(ctx, limit),
    }
}

fn show(ctx: &Ctx, id: &str, agent: Option<&str>) -> anyhow::Result<i32> {
    let view: JobView = ctx
        .client()?
        .get("command status", &format!("/api/v1/jobs/{id}"))?;
    if ctx.output == Output::Json {
        match agent {
            Some(a) => print_json(
                &view
                    .targets
                    .iter()
                    .find(|t| t.agent_id == a)
                    .ok_or_else(|| anyhow::anyhow!("agent {a} is not a target of {id}"))?,
            )?,
            None => print_json(&view)?,
        }
        return Ok(0);
    }
    if let Some(a) = agent {
        let t = view
            .targets
            .iter()
            .find(|t| t.agent_id == a)
            .ok_or_else(|| anyhow::anyhow!("agent {a} is not a target of {id}"))?;
        print_target(t, true);
        return Ok(0);
    }
    println!(
        "command {}  plugin {} v{}  targets {:?}",
        view.job.id, view.job.plugin, view.job.version, view.job.targets
    );
    if let Some(input) = view.job.input.as_object() {
        if let Some(argv) = input.get("argv") {
            println!("argv: {argv}");
        }
        if let Some(script) = input.get("script").and_then(|s| s.as_str()) {
            println!("script: {script}");
        }
    }
    if let Some(r) = &view.rollout {
        let p = &r.spec.policy;
        println!(
            "max-concurrency {}  max-errors {}  ramp {:?}{}",
            p.max_concurrency
                .map(|a| a.to_string())
                .unwrap_or_else(|| "all".into()),
            p.max_errors
                .map(|a| a.to_string())
                .unwrap_or_else(|| "none".into()),
            p.ramp,
            if r.cancelled_ms.is_some() {
                "  (cancelled)"
            } else {
                ""
            }
        );
    }
    println!("{} targets: {}", view.targets.len(), counts_line(&view));
    // What Run Command recorded of each target: exit codes at a glance.
    if let Ok(summary) = ctx
        .client()?
        .get::<CommandSummary>("command summary", &format!("/api/v1/commands/{id}"))
    {
        let codes = exit_codes(&summary);
        if !codes.is_empty() {
            println!("exit codes: {codes}");
        }
    }
    for t in &view.targets {
        let first = output_of(t)
            .and_then(|o| o.stdout.text.lines().next().map(str::to_string))
            .unwrap_or_default();
        let line = target_line(t);
        if first.is_empty() {
            println!("{line}");
        } else {
            println!("{line}  | {first}");
        }
    }
    Ok(0)
}

fn list(ctx: &Ctx, limit: u32) -> anyhow::Result<i32> {
    let commands: Vec<CommandSummary> = ctx
        .client()?
        .get("commands", &format!("/api/v1/commands?limit={limit}"))?;
    if ctx.output == Output::Json {
        print_json(&commands)?;
        return Ok(0);
    }
    let rows: Vec<Vec<String>> = commands
        .iter()
        .map(|c| {
            vec![
                c.id.clone(),
                ago(c.created_ms),
                c.targets.clone(),
                states(&c.counts),
                exit_codes(c),
                c.what.clone(),
            ]
        })
        .collect();
    print_table(
        &[
            "ID",
            "CREATED",
            "TARGETS",
            "STATES",
            "EXIT CODES",
            "COMMAND",
        ],
        &rows,
    );
    Ok(0)
}

/// `3 success, 1 failed`: the states that have targets.
fn states(counts: &std::collections::BTreeMap<String, usize>) -> String {
    TargetState::ALL
        .iter()
        .filter_map(|s| {
            let n = counts.get(s.as_str()).copied().unwrap_or(0);
            (n > 0).then(|| format!("{n} {}", s.as_str()))
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// `0 x3, 1 x1, 2 stopped`: targets per exit code, and those stopped early.
fn exit_codes(c: &CommandSummary) -> String {
    let mut parts: Vec<String> = c
        .exit_codes
        .iter()
        .map(|(code, n)| format!("{code} x{n}"))
        .collect();
    if c.partial > 0 {
        parts.push(format!("{} stopped", c.partial));
    }
    parts.join(", ")
}

/// A target's command output, if it has one.
fn output_of(t: &Target) -> Option<CommandOutput> {
    let v = t.result.as_ref()?.output.as_ref()?;
    serde_json::from_value(v.clone()).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_size("1MiB"), Ok(1 << 20));
        assert_eq!(parse_size("64KiB"), Ok(64 << 10));
        assert_eq!(parse_size("512k"), Ok(512 << 10));
        assert_eq!(parse_size("1000"), Ok(1000));
        assert!(parse_size("0").is_err());
        assert!(parse_size("1GiB").is_err());
        assert!(parse_size("lots").is_err());
    }
}
