//! `drover audit`: the audit log, filtered.

use std::time::Duration;

use super::AuditEntry;
use crate::cli::args::{parse_duration, query_value};
use crate::cli::context::{Ctx, Output};
use crate::cli::print::{ago, print_json, print_table};

/// Flags of `drover audit`.
#[derive(Debug, clap::Args)]
pub struct AuditArgs {
    /// Only this actor: `operator`, `agent:ID`, `enroll:ACTIVATION`.
    #[arg(long)]
    actor: Option<String>,
    /// Only actions starting with this, such as `job.` or `plugin.publish`.
    #[arg(long)]
    action: Option<String>,
    /// Only this target (a job id, an agent id, ...).
    #[arg(long)]
    target: Option<String>,
    /// Only this outcome: `ok`, `refused`, `succeeded`, `failed`, `rejected`.
    #[arg(long)]
    outcome: Option<String>,
    /// Only entries newer than this.
    #[arg(long, value_parser = parse_duration)]
    since: Option<Duration>,
    /// At most this many, newest last.
    #[arg(long, default_value_t = 100)]
    limit: u32,
}

pub fn run(ctx: &Ctx, a: AuditArgs) -> anyhow::Result<i32> {
    let mut q = vec![format!("limit={}", a.limit)];
    for (k, v) in [
        ("actor", &a.actor),
        ("action", &a.action),
        ("target", &a.target),
        ("outcome", &a.outcome),
    ] {
        if let Some(v) = v {
            q.push(format!("{k}={}", query_value(v)));
        }
    }
    if let Some(d) = a.since {
        let since = drover_protocol::now_ms().saturating_sub(d.as_millis() as u64);
        q.push(format!("since_ms={since}"));
    }
    let rows: Vec<AuditEntry> = ctx
        .client()?
        .get("audit log", &format!("/api/v1/audit?{}", q.join("&")))?;
    if ctx.output == Output::Json {
        print_json(&rows)?;
        return Ok(0);
    }
    let table: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            vec![
                ago(r.at_ms),
                r.actor.clone(),
                r.action.clone(),
                r.target.clone(),
                r.outcome.clone(),
                r.detail.clone(),
            ]
        })
        .collect();
    print_table(
        &["WHEN", "ACTOR", "ACTION", "TARGET", "OUTCOME", "DETAIL"],
        &table,
    );
    Ok(0)
}
