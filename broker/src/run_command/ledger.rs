//! Run Command as a consumer of the engine's events: for every target of a
//! `command-runner` job that reaches a final state, it records what the command did.

use std::sync::Arc;

use drover_protocol::manifest::World;
use drover_protocol::worlds::Output;

use super::store::{self, CommandResult};
use crate::events::{BoxFuture, Consumer, Event};
use crate::jobs::Jobs;
use crate::jobs::events::TARGET_FINISHED;
use crate::store::Db;

/// The consumer.
pub struct Ledger {
    db: Db,
    jobs: Jobs,
}

impl Ledger {
    /// Records into `db` what `jobs`' command-runner targets did.
    pub fn new(db: Db, jobs: Jobs) -> Arc<Ledger> {
        Arc::new(Ledger { db, jobs })
    }
}

impl Consumer for Ledger {
    fn name(&self) -> &'static str {
        "run_command"
    }

    fn wants(&self, kind: &str) -> bool {
        kind == TARGET_FINISHED
    }

    fn handle<'a>(&'a self, events: &'a [Event]) -> BoxFuture<'a, anyhow::Result<()>> {
        Box::pin(async move {
            let none = drover_protocol::job::Captured::default();
            let mut rows = Vec::new();
            for f in self
                .jobs
                .finished_in_world(events, World::CommandRunner)
                .await?
            {
                let (exit_code, partial, stdout, stderr) = match &f.output {
                    Some(Output::Command(o)) => (o.exit_code, o.partial, &o.stdout, &o.stderr),
                    _ => (None, false, &none, &none),
                };
                rows.push(CommandResult {
                    job_id: f.target.job_id,
                    agent_id: f.target.agent_id,
                    attempt: f.target.attempt,
                    state: f.target.state.as_str().to_string(),
                    exit_code,
                    partial,
                    stdout_bytes: stdout.total_bytes,
                    stderr_bytes: stderr.total_bytes,
                    truncated: stdout.truncated || stderr.truncated,
                    finished_ms: f.at_ms,
                });
            }
            if !rows.is_empty() {
                store::record(&self.db, &rows).await?;
            }
            Ok(())
        })
    }
}
