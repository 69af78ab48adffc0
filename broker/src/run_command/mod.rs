//! Run Command: a program or shell script across the fleet, as a job of the command
//! runner plugin (`plugins/command`, the `command-runner` world).
//!
//! A command is an ordinary job, so it carries every guarantee a job does: a signed
//! envelope, the agent's capability policy (the plugin asks for `exec: ["*"]`, which an
//! agent's policy must allow explicitly), a deadline that kills the process tree, rate
//! control, and a result stored once and acknowledged end to end. What Run Command adds
//! is its request, its views (exit codes, output), and [`ledger`]: a consumer of the
//! engine's events that keeps what each command did on each target.
//!
//! - [`request`]: a command as the engine's job.
//! - [`store`], [`types`], [`routes`], [`cli`]: its table, API types, routes and CLI
//!   groups (`drover run-command`, `drover command`).

use drover_protocol::manifest::World;

use std::sync::Arc;

use crate::audit::Audit;
use crate::capability::Capability;
use crate::events::Consumer;
use crate::jobs::Jobs;
use crate::jobs::submit::SubmitError;
use crate::jobs::types::JobCreated;
use crate::plugins::Plugins;
use crate::store::Db;

pub mod cli;
pub mod ledger;
pub mod request;
pub mod routes;
pub mod store;
pub mod types;

use types::{CommandRequest, CommandSummary};

/// Run Command's handle; clones share what it holds.
#[derive(Clone, Debug)]
pub struct RunCommand {
    db: Db,
    jobs: Jobs,
    plugins: Plugins,
    audit: Audit,
}

impl Capability for RunCommand {
    fn routes(&self) -> utoipa_axum::router::OpenApiRouter {
        routes::routes(self.clone())
    }

    fn consumers(&self) -> Vec<Arc<dyn Consumer>> {
        vec![self.ledger()]
    }
}

impl RunCommand {
    /// Run Command on the engine `jobs`, keeping its records in `db`.
    pub fn new(db: Db, jobs: Jobs, plugins: Plugins, audit: Audit) -> RunCommand {
        RunCommand {
            db,
            jobs,
            plugins,
            audit,
        }
    }

    /// Its consumer of the engine's events.
    pub fn ledger(&self) -> Arc<ledger::Ledger> {
        ledger::Ledger::new(self.db.clone(), self.jobs.clone())
    }

    /// Runs a command: checks it, and submits it as a job of a `command-runner` plugin.
    pub async fn create(&self, req: CommandRequest) -> Result<JobCreated, SubmitError> {
        let plugin_name = req
            .plugin
            .clone()
            .unwrap_or_else(|| types::COMMAND_PLUGIN.to_string());
        let job = req.into_job().map_err(SubmitError::BadRequest)?;
        if let Some(p) = self.plugins.get(&plugin_name, None).await?
            && p.world != World::CommandRunner.as_str()
        {
            return Err(SubmitError::BadRequest(format!(
                "plugin {} v{} implements the {} world, not command-runner: publish a build of plugins/command signed with --world command-runner",
                p.name, p.version, p.world
            )));
        }
        self.jobs.submit(job).await
    }

    /// Recent commands, newest first: what they ran, and how their targets ended.
    pub async fn list(&self, limit: u32) -> anyhow::Result<Vec<CommandSummary>> {
        let mut out = Vec::new();
        for s in self.jobs.list_of_world(World::CommandRunner, limit).await? {
            out.push(self.summary(s.job, s.counts).await?);
        }
        Ok(out)
    }

    /// One command's summary; None if there is no such command.
    pub async fn get(&self, id: &str) -> anyhow::Result<Option<CommandSummary>> {
        let Some(view) = self.jobs.view(id, Some(u64::MAX)).await? else {
            return Ok(None);
        };
        if view.job.world != World::CommandRunner.as_str() {
            return Ok(None);
        }
        Ok(Some(self.summary(view.job, view.counts).await?))
    }

    async fn summary(
        &self,
        job: crate::jobs::types::Job,
        counts: std::collections::BTreeMap<String, usize>,
    ) -> anyhow::Result<CommandSummary> {
        let (exit_codes, partial) = store::exit_codes(&self.db, &job.id).await?;
        Ok(CommandSummary {
            what: request::describe_input(&job.input).unwrap_or_default(),
            id: job.id,
            targets: job.targets,
            created_ms: job.created_ms,
            counts,
            exit_codes,
            partial,
        })
    }
}
