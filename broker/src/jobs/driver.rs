//! Carries out what rollouts decide: dispatches, cancel requests and the server's own
//! verdicts (undeliverable, timed out, cancelled), and resumes unfinished jobs after a
//! restart.

use std::collections::HashMap;

use drover_protocol::job::JobEnvelope;

use super::envelope::{self, JobTerms};
use super::rollout::{Action, Restored, Rollout, state_of};
use super::types::{LiveWhat, TargetState};
use super::{Active, Jobs, store};

impl Jobs {
    /// Picks up the jobs a previous run of the server left unfinished.
    pub(super) async fn restore(&self) -> anyhow::Result<()> {
        let online: HashMap<String, bool> = self
            .shared
            .fleet
            .agents()
            .await?
            .into_iter()
            .map(|a| (a.id, a.online && a.deregistered_ms.is_none()))
            .collect();
        for row in store::active_rollouts(self.db()).await? {
            // A job that cannot be resumed is ended, with the reason on every target
            // that was still open, rather than left open for ever.
            let row = match row {
                Ok(r) => r,
                Err((job, why)) => {
                    self.abandon(&job, &why).await?;
                    continue;
                }
            };
            let Some(job) = store::job(self.db(), &row.job_id).await? else {
                self.abandon(&row.job_id, "the job is gone from the store")
                    .await?;
                continue;
            };
            let Some(plugin) = self
                .shared
                .plugins
                .get(&job.plugin, Some(job.version))
                .await?
            else {
                let why = format!(
                    "plugin {} v{} is gone from the store",
                    job.plugin, job.version
                );
                self.abandon(&job.id, &why).await?;
                continue;
            };
            let world = job
                .world
                .parse()
                .unwrap_or(drover_protocol::manifest::World::Task);
            let mut restored = Vec::new();
            for t in store::targets(self.db(), &job.id, 0).await? {
                let state = match &t.result {
                    Some(r) if !t.state.is_final() => state_of(r, world).0,
                    _ => t.state,
                };
                restored.push(Restored {
                    online: online.get(&t.agent_id).copied().unwrap_or(false),
                    since_ms: t.started_ms.or(t.dispatched_ms).unwrap_or(row.created_ms),
                    agent: t.agent_id,
                    state,
                });
            }
            let rollout = Rollout::restore(
                row.spec.policy,
                row.created_ms,
                restored,
                row.cancelled_ms.is_some(),
            );
            tracing::info!(job.id = %job.id, in_flight = rollout.in_flight(), "resuming job");
            self.active().insert(
                job.id.clone(),
                Active {
                    rollout,
                    manifest: plugin.manifest,
                    input: job.input,
                    limits: row.spec.limits,
                    expires_ms: job.expires_ms,
                    plain: row.spec.parameters,
                    has_secrets: !row.spec.secret_names.is_empty(),
                },
            );
        }
        Ok(())
    }

    /// Ends a job that cannot be resumed after a restart.
    async fn abandon(&self, job: &str, why: &str) -> anyhow::Result<()> {
        let why = format!("the server could not resume this job after a restart: {why}");
        tracing::error!(job.id = %job, "{why}");
        for (agent, _, _, done) in store::target_states(self.db(), job).await? {
            if !done {
                self.settle(job, &agent, TargetState::Failed, &why).await;
            }
        }
        store::finish_rollout(self.db(), job, self.now()).await
    }

    /// Applies deadlines to every job, and starts what they allow.
    pub(super) async fn tick(&self) {
        let now = self.now();
        let work: Vec<(String, Vec<Action>)> = self
            .active()
            .iter_mut()
            .map(|(id, a)| (id.clone(), a.rollout.tick(now)))
            .filter(|(_, a)| !a.is_empty())
            .collect();
        for (job, actions) in work {
            self.apply(&job, actions).await;
        }
        let done: Vec<String> = self
            .active()
            .iter()
            .filter(|(_, a)| a.rollout.is_done())
            .map(|(id, _)| id.clone())
            .collect();
        for job in done {
            self.finish(&job).await;
        }
    }

    /// Forgets a job whose targets are all final, and records it done.
    pub(super) async fn finish(&self, job: &str) {
        let Some(a) = self.active().remove(job) else {
            return;
        };
        if let Err(e) = store::finish_rollout(self.db(), job, self.now()).await {
            tracing::warn!(job.id = %job, error = %format!("{e:#}"), "could not record a finished job");
        }
        tracing::info!(job.id = %job, peak_in_flight = a.rollout.peak_in_flight(), max_concurrency = a.rollout.max_concurrency(), stopped_by_errors = a.rollout.stopped_by_errors(), "job finished");
    }

    /// Finishes `job` if its targets are all final now.
    pub(super) async fn finish_if_done(&self, job: &str) {
        let done = self.active().get(job).is_some_and(|a| a.rollout.is_done());
        if done {
            self.finish(job).await;
        }
    }

    /// Carries out what a rollout decided.
    pub(super) async fn apply(&self, job: &str, actions: Vec<Action>) {
        let mut settled = false;
        // Dispatches go first and together: one store write for all of them.
        let mut dispatch = Vec::new();
        let mut rest = Vec::new();
        for action in actions {
            match action {
                Action::Dispatch(agent) => dispatch.push(agent),
                other => rest.push(other),
            }
        }
        if !dispatch.is_empty() {
            let (ready, unready) = self.envelopes(job, dispatch).await;
            for (agent, e) in unready.into_iter().chain(self.send_envelopes(ready).await) {
                self.dispatch_failed(job, &agent, &e).await;
                settled = true;
            }
        }
        for action in rest {
            match action {
                Action::Dispatch(_) => {}
                Action::Cancel(agent) => self.send_cancel(job, &agent).await,
                Action::Settle(agent, state, why) => {
                    self.settle(job, &agent, state, &why).await;
                    settled = true;
                }
            }
        }
        if settled {
            self.results_moved();
        }
    }

    /// The envelopes of `job` for `agents`, with their sealed secrets from the store;
    /// and the agents whose envelope could not be made, with why.
    async fn envelopes(
        &self,
        job: &str,
        agents: Vec<String>,
    ) -> (Vec<JobEnvelope>, Vec<(String, anyhow::Error)>) {
        let has_secrets = self.active().get(job).map(|a| a.has_secrets);
        let sealed = match has_secrets {
            None => {
                let why = || anyhow::anyhow!("job {job} is no longer active");
                return (Vec::new(), agents.into_iter().map(|a| (a, why())).collect());
            }
            Some(false) => HashMap::new(),
            Some(true) => {
                let refs: Vec<&str> = agents.iter().map(String::as_str).collect();
                match store::sealed_parameters(self.db(), job, &refs).await {
                    Ok(s) => s,
                    Err(e) => {
                        let why = format!("{e:#}");
                        return (
                            Vec::new(),
                            agents
                                .into_iter()
                                .map(|a| (a, anyhow::anyhow!("reading its secrets: {why}")))
                                .collect(),
                        );
                    }
                }
            }
        };
        let now = self.now();
        let active = self.active();
        let Some(a) = active.get(job) else {
            let why = || anyhow::anyhow!("job {job} is no longer active");
            return (Vec::new(), agents.into_iter().map(|a| (a, why())).collect());
        };
        let terms = JobTerms {
            job_id: job,
            manifest: &a.manifest,
            input: &a.input,
            plain: &a.plain,
            limits: a.limits,
            expires_ms: a.expires_ms,
        };
        let mut ready = Vec::with_capacity(agents.len());
        let mut unready = Vec::new();
        for agent in agents {
            let secrets = sealed.get(&agent);
            if a.has_secrets && secrets.is_none() {
                unready.push((
                    agent,
                    anyhow::anyhow!("its secret parameters are missing from the store"),
                ));
                continue;
            }
            ready.push(envelope::build(&terms, &agent, 1, secrets, now));
        }
        (ready, unready)
    }

    /// Records a final state the server decided for a target that has no result.
    pub(super) async fn settle(&self, job: &str, agent: &str, state: TargetState, why: &str) {
        tracing::info!(job.id = %job, agent.id = %agent, state = state.as_str(), "{why}");
        match store::settle(
            self.db(),
            &self.shared.events,
            job,
            agent,
            state,
            why,
            self.now(),
        )
        .await
        {
            Ok(Some(event)) => self.shared.events.committed(event),
            Ok(None) => {}
            Err(e) => {
                tracing::error!(job.id = %job, agent.id = %agent, error = %format!("{e:#}"), "could not record a target's state");
            }
        }
        if let Some(a) = self.active().get_mut(job) {
            // In line with the store; what follows from it waits for the next tick.
            a.rollout.mark(agent, state);
        }
        self.emit(
            job,
            agent,
            LiveWhat::State {
                state,
                detail: Some(why.to_string()),
            },
        );
    }

    async fn dispatch_failed(&self, job: &str, agent: &str, e: &anyhow::Error) {
        let why = format!("the job could not be sent: {e:#}");
        tracing::error!(job.id = %job, agent.id = %agent, "{why}");
        self.settle(job, agent, TargetState::Failed, &why).await;
    }

    /// Tells every job that an agent came online (or went offline).
    pub(super) async fn agent_online(&self, agent: &str, online: bool) {
        let now = self.now();
        let work: Vec<(String, Vec<Action>)> = self
            .active()
            .iter_mut()
            .filter(|(_, a)| a.rollout.has(agent))
            .map(|(id, a)| (id.clone(), a.rollout.set_online(agent, online, now)))
            .filter(|(_, a)| !a.is_empty())
            .collect();
        for (job, actions) in work {
            self.apply(&job, actions).await;
        }
    }

    /// An agent was deregistered: it gets nothing more, and its targets that are not
    /// final become undeliverable.
    pub(super) async fn agent_deregistered(&self, agent: &str) -> anyhow::Result<()> {
        let now = self.now();
        for a in self.active().values_mut() {
            let _ = a.rollout.set_online(agent, false, now);
        }
        for job in store::open_targets_of(self.db(), agent).await? {
            self.settle(
                &job,
                agent,
                TargetState::Undeliverable,
                "the agent was deregistered",
            )
            .await;
        }
        self.results_moved();
        // Slots it held are free now.
        self.tick().await;
        Ok(())
    }
}
