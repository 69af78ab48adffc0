//! `drover run` and `drover job show|cancel|list`, and what other groups that submit
//! jobs share: rate-control flags, waiting for targets, exit codes.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use drover_protocol::job::{JobResult, ResultStatus};
use drover_protocol::worlds::inventory::Inventory;

use super::types::{
    CancelOutcome, JobCreated, JobRequest, JobSummary, JobView, RateRequest, Target, TargetState,
};
use crate::cli::args::{parse_duration, parse_tag};
use crate::cli::client::Client;
use crate::cli::context::{Ctx, Output};
use crate::cli::print::print_json;

/// Exit code when every target succeeded.
pub const EXIT_OK: i32 = 0;
/// Exit code when some target failed or refused the job.
pub const EXIT_FAILED: i32 = 1;
/// Exit code when the wait ended before every result was in.
pub const EXIT_TIMEOUT: i32 = 2;

/// Flags of `drover run`.
#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// The plugin's name.
    plugin: String,
    /// `all`, `tag:KEY=VALUE`, or comma-separated agent ids.
    #[arg(long, short)]
    targets: String,
    /// The plugin's input, JSON.
    #[arg(long, default_value = "{}")]
    input: String,
    /// A specific plugin version; the newest by default.
    #[arg(long)]
    version: Option<u64>,
    /// The plugin's deadline on each agent.
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    timeout: Duration,
    /// The plugin's memory limit, MiB.
    #[arg(long)]
    memory_mib: Option<u64>,
    /// The cap on each output stream, KiB.
    #[arg(long)]
    output_kib: Option<u64>,
    /// How long agents that are offline may still receive the job.
    #[arg(long, default_value = "10m", value_parser = parse_duration)]
    delivery_timeout: Duration,
    /// How long to wait for results; defaults to the plugin deadline plus 30 s.
    #[arg(long, value_parser = parse_duration)]
    wait: Option<Duration>,
    /// A parameter NAME=VALUE for the plugin's `parameters` import; repeatable.
    #[arg(long = "param", value_parser = parse_tag)]
    params: Vec<(String, String)>,
    /// A secret parameter NAME=VALUE, sealed to each target agent's key; repeatable.
    /// Use NAME=@FILE to read the value from a file.
    #[arg(long = "secret", value_parser = parse_tag)]
    secrets: Vec<(String, String)>,
    /// Print the job id and exit without waiting.
    #[arg(long)]
    no_wait: bool,
    #[command(flatten)]
    rate: RateArgs,
}

/// Rate-control flags, shared by `run` and `run-command`.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct RateArgs {
    /// Most targets in flight at once: a count, or a percentage of the targets such as
    /// 10%. All at once by default.
    #[arg(long, value_parser = parse_amount)]
    pub max_concurrency: Option<String>,
    /// Errors (failed, timed out, undeliverable) tolerated before no new target starts:
    /// a count or a percentage. No limit by default.
    #[arg(long, value_parser = parse_amount)]
    pub max_errors: Option<String>,
    /// `exponential`: one target first, then doubling up to --max-concurrency.
    #[arg(long, value_parser = ["none", "exponential"])]
    pub ramp: Option<String>,
}

impl RateArgs {
    /// Whether any flag was given.
    pub fn given(&self) -> bool {
        self.max_concurrency.is_some() || self.max_errors.is_some() || self.ramp.is_some()
    }

    /// As the API takes it.
    pub fn request(&self) -> RateRequest {
        RateRequest {
            max_concurrency: self.max_concurrency.clone(),
            max_errors: self.max_errors.clone(),
            ramp: self.ramp.clone(),
        }
    }
}

fn parse_amount(s: &str) -> Result<String, String> {
    super::rollout::Amount::parse(s).map(|a| a.to_string())
}

/// Job commands.
#[derive(Debug, clap::Subcommand)]
pub enum JobCommand {
    /// Show a job: its status counts and each target's result.
    Show {
        /// The job id.
        id: String,
    },
    /// Cancel a job: targets not started never will be, running ones are stopped.
    Cancel {
        /// The job id.
        id: String,
    },
    /// List recent jobs with their state counts.
    List {
        /// How many.
        #[arg(long, default_value_t = 20)]
        limit: u32,
    },
}

/// `drover run`.
pub fn run(ctx: &Ctx, a: RunArgs) -> anyhow::Result<i32> {
    let input: serde_json::Value = serde_json::from_str(&a.input)
        .map_err(|e| anyhow::anyhow!("--input is not valid JSON: {e}"))?;
    let client = ctx.client()?;
    let started = Instant::now();
    let created: JobCreated = client.post(
        "run",
        "/api/v1/jobs",
        &JobRequest {
            plugin: a.plugin.clone(),
            version: a.version,
            targets: a.targets.clone(),
            input,
            timeout_secs: Some(a.timeout.as_secs().max(1)),
            memory_mib: a.memory_mib,
            output_kib: a.output_kib,
            delivery_secs: Some(a.delivery_timeout.as_secs().max(1)),
            parameters: a.params.into_iter().collect(),
            secrets: a
                .secrets
                .into_iter()
                .map(|(k, v)| match v.strip_prefix('@') {
                    Some(path) => std::fs::read_to_string(path)
                        .map(|s| (k, s.trim_end_matches('\n').to_string()))
                        .map_err(|e| anyhow::anyhow!("--secret {path}: {e}")),
                    None => Ok((k, v)),
                })
                .collect::<anyhow::Result<_>>()?,
            rate: a.rate.given().then(|| a.rate.request()),
        },
    )?;
    if ctx.output == Output::Text {
        eprintln!(
            "job {} : {} v{} on {} agent(s)",
            created.job_id,
            a.plugin,
            created.version,
            created.agents.len()
        );
    }
    if a.no_wait {
        return print_created(ctx.output, &created);
    }
    // A rate-controlled job may spend its whole delivery timeout waiting for slots.
    let wait = a.wait.unwrap_or(if a.rate.given() {
        a.delivery_timeout + a.timeout + Duration::from_secs(30)
    } else {
        a.timeout + Duration::from_secs(30)
    });
    let deadline = started + wait;
    let mut summary = Summary::default();
    let view = wait_for_targets(&client, "job status", &created.job_id, deadline, |t| {
        summary.add(t);
        match &t.result {
            Some(r) => print_result(ctx.output, r)?,
            // Settled by the server (undeliverable, cancelled, timed out): no result.
            None if ctx.output == Output::Json => println!("{}", serde_json::to_string(t)?),
            None => println!(
                "{:<20} {:<9} {:>6}     {}",
                t.agent_id,
                t.state.as_str(),
                "",
                t.detail.as_deref().unwrap_or("")
            ),
        }
        Ok(())
    })?;
    let (total, done) = (view.total(), view.done());
    summary.waiting = total - done;
    if ctx.output == Output::Text {
        eprintln!(
            "{} of {} in after {:.1}s: {} succeeded, {} failed, {} rejected{}",
            done,
            total,
            started.elapsed().as_secs_f64(),
            summary.succeeded,
            summary.failed,
            summary.rejected,
            if summary.waiting > 0 {
                format!(
                    ", {} still waiting (see `drover job show {}`)",
                    summary.waiting, created.job_id
                )
            } else {
                String::new()
            }
        );
    }
    Ok(summary.exit_code())
}

/// For `--no-wait`: the new job, as JSON or as its id alone.
pub fn print_created(output: Output, created: &JobCreated) -> anyhow::Result<i32> {
    if output == Output::Json {
        print_json(created)?;
    } else {
        println!("{}", created.job_id);
    }
    Ok(EXIT_OK)
}

/// How often, at most, a waiting CLI asks for a job's progress: results that arrive
/// together are fetched together.
const MIN_POLL: Duration = Duration::from_millis(250);

/// How far back of the newest `updated_ms` seen each poll asks again, for a target whose
/// state was stamped just before, but stored just after, the previous answer.
const SINCE_MARGIN_MS: u64 = 1000;

/// Waits until every target of a job is done or `deadline` passes, and calls `finished`
/// once for each target as it becomes done. Each poll fetches only the targets that
/// changed since the previous one, so a job's outputs cross the wire about once, however
/// many targets it has. Returns the last view: its counts cover every target, its
/// `targets` only the last changes.
pub fn wait_for_targets(
    client: &Client,
    what: &str,
    job_id: &str,
    deadline: Instant,
    mut finished: impl FnMut(&Target) -> anyhow::Result<()>,
) -> anyhow::Result<JobView> {
    let mut handed: std::collections::HashSet<String> = std::collections::HashSet::new();
    let (mut since, mut done) = (0u64, 0usize);
    loop {
        let polled = Instant::now();
        let left = deadline.saturating_duration_since(polled);
        let view: JobView = client.get(
            what,
            &format!(
                "/api/v1/jobs/{job_id}?done={done}&wait_ms={}&since_ms={since}",
                left.as_millis().min(30_000)
            ),
        )?;
        for t in &view.targets {
            since = since.max(t.updated_ms.saturating_sub(SINCE_MARGIN_MS));
            if t.is_done() && handed.insert(t.agent_id.clone()) {
                finished(t)?;
            }
        }
        done = view.done();
        if done == view.total() || Instant::now() >= deadline {
            if handed.len() < done {
                // Counted but not yet listed: fetch them all once more.
                let all: JobView = client.get(what, &format!("/api/v1/jobs/{job_id}"))?;
                for t in all.targets.iter().filter(|t| t.is_done()) {
                    if handed.insert(t.agent_id.clone()) {
                        finished(t)?;
                    }
                }
            }
            return Ok(view);
        }
        std::thread::sleep(MIN_POLL.saturating_sub(polled.elapsed()).min(left));
    }
}

/// Counts of target outcomes.
#[derive(Debug, Default)]
struct Summary {
    succeeded: usize,
    failed: usize,
    rejected: usize,
    waiting: usize,
}

impl Summary {
    fn of(targets: &[Target]) -> Summary {
        let mut s = Summary::default();
        for t in targets {
            if t.is_done() {
                s.add(t);
            } else {
                s.waiting += 1;
            }
        }
        s
    }

    /// Counts a target that is done.
    fn add(&mut self, t: &Target) {
        match t.result.as_ref().map(|r| r.status) {
            Some(ResultStatus::Succeeded) => self.succeeded += 1,
            Some(ResultStatus::Failed) => self.failed += 1,
            Some(ResultStatus::Rejected) => self.rejected += 1,
            // Settled by the server without a result: undeliverable, cancelled.
            None => self.failed += 1,
        }
    }

    fn exit_code(&self) -> i32 {
        if self.waiting > 0 {
            EXIT_TIMEOUT
        } else if self.failed + self.rejected > 0 {
            EXIT_FAILED
        } else {
            EXIT_OK
        }
    }
}

/// One line about a result's output, for people: an inventory in brief, anything else
/// as JSON, cut at 160 bytes.
pub fn summarize_output(v: &serde_json::Value) -> String {
    if let Ok(inv) = serde_json::from_value::<Inventory>(v.clone()) {
        let os = &inv.os;
        return format!(
            "{} {} ({}, kernel {}), {} packages",
            os.name,
            os.version,
            os.architecture,
            os.kernel_version,
            inv.packages.len()
        );
    }
    let s = v.to_string();
    if s.len() > 160 {
        let mut end = 160;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        format!("{}...", &s[..end])
    } else {
        s
    }
}

fn print_result(output: Output, r: &JobResult) -> anyhow::Result<()> {
    if output == Output::Json {
        println!("{}", serde_json::to_string(r)?);
        return Ok(());
    }
    let detail = match (&r.failure, &r.output) {
        (Some(f), _) => format!("{:?}: {}", f.kind, f.message),
        (None, Some(v)) => summarize_output(v),
        (None, None) => String::new(),
    };
    println!(
        "{:<20} {:<9} {:>6} ms  {}",
        r.agent_id,
        r.status.as_str(),
        r.duration_ms,
        detail
    );
    for (name, c) in [("stdout", &r.stdout), ("stderr", &r.stderr)] {
        if c.truncated {
            println!(
                "{:<20} {name}: {} bytes written, first {} kept (truncated)",
                "",
                c.total_bytes,
                c.text.len()
            );
        }
    }
    Ok(())
}

/// `drover job`.
pub fn job(ctx: &Ctx, cmd: JobCommand) -> anyhow::Result<i32> {
    let id = match cmd {
        JobCommand::Show { id } => id,
        JobCommand::Cancel { id } => return cancel(ctx, &id),
        JobCommand::List { limit } => return list(ctx, limit),
    };
    let view: JobView = ctx
        .client()?
        .get("job status", &format!("/api/v1/jobs/{id}"))?;
    if ctx.output == Output::Json {
        print_json(&view)?;
        return Ok(0);
    }
    let s = Summary::of(&view.targets);
    println!(
        "job {}  plugin {} v{}  targets {:?}",
        view.job.id, view.job.plugin, view.job.version, view.job.targets
    );
    println!(
        "{} targets: {} succeeded, {} failed, {} rejected, {} waiting",
        view.targets.len(),
        s.succeeded,
        s.failed,
        s.rejected,
        s.waiting
    );
    println!("states: {}", counts_line(&view));
    for t in &view.targets {
        match &t.result {
            Some(r) => print_result(Output::Text, r)?,
            None => println!(
                "{:<20} {:<13} {}",
                t.agent_id,
                t.state.as_str(),
                t.detail.as_deref().unwrap_or("")
            ),
        }
    }
    Ok(0)
}

/// `3 success, 1 failed, 2 pending`: the states that have targets.
pub fn counts_line(view: &JobView) -> String {
    let parts: Vec<String> = TargetState::ALL
        .iter()
        .filter_map(|s| {
            let n = view.counts.get(s.as_str()).copied().unwrap_or(0);
            (n > 0).then(|| format!("{n} {}", s.as_str()))
        })
        .collect();
    if parts.is_empty() {
        "no targets".into()
    } else {
        parts.join(", ")
    }
}

/// `drover job cancel` (and `drover command cancel`).
pub fn cancel(ctx: &Ctx, id: &str) -> anyhow::Result<i32> {
    let outcome: CancelOutcome = ctx.client()?.post(
        "cancel",
        &format!("/api/v1/jobs/{id}/cancel"),
        &serde_json::json!({}),
    )?;
    if ctx.output == Output::Json {
        print_json(&outcome)?;
    } else {
        println!(
            "{}: {} target(s) will not start, {} running target(s) asked to stop",
            outcome.job_id, outcome.not_started, outcome.stop_requests
        );
    }
    Ok(0)
}

/// `drover job list`.
pub fn list(ctx: &Ctx, limit: u32) -> anyhow::Result<i32> {
    let jobs: Vec<JobSummary> = ctx
        .client()?
        .get("jobs", &format!("/api/v1/jobs?limit={limit}"))?;
    if ctx.output == Output::Json {
        print_json(&jobs)?;
        return Ok(0);
    }
    for j in &jobs {
        let states: BTreeSet<String> = j
            .counts
            .iter()
            .filter(|(_, n)| **n > 0)
            .map(|(s, n)| format!("{n} {s}"))
            .collect();
        println!(
            "{}  {:<12} {:<20} {}",
            j.job.id,
            j.job.plugin,
            j.job.targets,
            states.into_iter().collect::<Vec<_>>().join(", ")
        );
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inventory_summary_reads_the_keys_the_plugin_writes() {
        let pkg = |n: &str| serde_json::json!({"name": n, "version": "1", "architecture": "all", "source": "dpkg"});
        let v = serde_json::json!({
            "os": {"name": "Debian GNU/Linux", "version": "12", "kernel_version": "6.1.0",
                   "architecture": "x86_64", "family": "linux", "hostname": "h"},
            "packages": [pkg("a"), pkg("b")],
            "custom": [],
            "warnings": [],
        });
        assert_eq!(
            summarize_output(&v),
            "Debian GNU/Linux 12 (x86_64, kernel 6.1.0), 2 packages"
        );
        assert_eq!(summarize_output(&serde_json::json!({"x": 1})), r#"{"x":1}"#);
    }
}
