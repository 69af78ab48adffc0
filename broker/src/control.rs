//! The control plane: turns requests into signed job envelopes, serves plugin chunks, and
//! records what agents report.
//!
//! It is an ordinary MQTT client of whatever broker it is given, embedded or external, so
//! nothing here assumes the embedded broker.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use drover_protocol::agent::{Hello, Presence};
use drover_protocol::chunk::{self, ChunkHeader, FetchRequest};
use drover_protocol::enroll::Heartbeat;
use drover_protocol::job::{
    CancelRequest, FailureKind, JobEnvelope, JobResult, Limits, Parameter, Progress, ProgressEvent,
    ResultAck, StreamName,
};
use drover_protocol::keys::SigningKey;
use drover_protocol::keyset::KeySet;
use drover_protocol::link::{Incoming, LinkHandle};
use drover_protocol::manifest::Manifest;
use drover_protocol::now_ms;
use drover_protocol::secret::SealedBox;
use drover_protocol::signed::{Signable, Signed};
use drover_protocol::topics::{self, Down, Up};
use serde::{Deserialize, Serialize};
use tokio::sync::{broadcast, mpsc, watch};

use crate::rollout::{Action, Amount, Ramp, RatePolicy, Restored, Rollout, TargetState};
use crate::store::{JobRow, Recorded, RolloutRow, Store};

/// How long an envelope stays valid when the request does not say.
pub const DEFAULT_DELIVERY_SECS: u64 = 600;

/// An operator's request to run a plugin.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JobRequest {
    /// The plugin's name.
    pub plugin: String,
    /// Its version; the newest when absent.
    #[serde(default)]
    pub version: Option<u64>,
    /// `all`, `tag:KEY=VALUE`, or comma-separated agent ids.
    pub targets: String,
    /// Parameters for the plugin.
    #[serde(default)]
    pub input: serde_json::Value,
    /// The plugin's deadline, seconds.
    #[serde(default)]
    pub timeout_secs: Option<u64>,
    /// The plugin's memory limit, MiB.
    #[serde(default)]
    pub memory_mib: Option<u64>,
    /// The output cap per stream, KiB.
    #[serde(default)]
    pub output_kib: Option<u64>,
    /// How long the job may wait for offline agents, seconds.
    #[serde(default)]
    pub delivery_secs: Option<u64>,
    /// Named parameters for the plugin's `parameters` import.
    #[serde(default)]
    pub parameters: std::collections::BTreeMap<String, String>,
    /// Secret parameters: sealed to each target agent's key, never stored or logged.
    #[serde(default)]
    pub secrets: std::collections::BTreeMap<String, String>,
    /// Rate control; without it every target gets the job at once.
    #[serde(default)]
    pub rate: Option<RateRequest>,
}

/// Rate control as an operator asks for it.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct RateRequest {
    /// `N` or `N%` of the targets in flight at once; all when absent.
    #[serde(default)]
    pub max_concurrency: Option<String>,
    /// `N` or `N%` errors tolerated before the job stops spreading; no limit when absent.
    #[serde(default)]
    pub max_errors: Option<String>,
    /// `none` or `exponential`.
    #[serde(default)]
    pub ramp: Option<String>,
}

/// What a rate-controlled job needs, beyond the job row, to send envelopes later; stored
/// so that a restarted server carries on. Secret values are never stored: their names
/// are, so that a restart can say why the remaining targets cannot get them.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RolloutSpec {
    /// The rules.
    pub policy: RatePolicy,
    /// Limits for each run.
    pub limits: Limits,
    /// Plain parameters.
    #[serde(default)]
    pub parameters: BTreeMap<String, String>,
    /// Names of secret parameters.
    #[serde(default)]
    pub secret_names: Vec<String>,
}

/// Something live about a job, for followers: output as it is written, and state changes.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LiveEvent {
    /// The job.
    pub job_id: String,
    /// The agent.
    pub agent_id: String,
    /// What happened.
    #[serde(flatten)]
    pub what: LiveWhat,
}

/// What a [`LiveEvent`] says.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "event")]
pub enum LiveWhat {
    /// Output a running command wrote.
    Output {
        /// Which stream.
        stream: StreamName,
        /// The text.
        text: String,
        /// The agent's sequence number, to show gaps.
        seq: u64,
    },
    /// The target moved to a new state.
    State {
        /// The state.
        state: TargetState,
        /// Why, for failures and server decisions.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        detail: Option<String>,
    },
    /// The follower fell behind and this many events were skipped; the stored results
    /// still have everything.
    Lagged {
        /// How many.
        skipped: u64,
    },
    /// Nothing new; sent every few seconds so a follower knows the stream is alive.
    Keepalive,
    /// Every target is final; nothing more will come.
    End,
}

/// What cancelling a job did.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CancelOutcome {
    /// The job.
    pub job_id: String,
    /// Targets that had not been sent the job and never will.
    pub not_started: usize,
    /// Targets in flight that were asked to stop.
    pub stop_requests: usize,
}

/// A rate-controlled job in progress.
struct Active {
    rollout: Rollout,
    manifest: Signed<Manifest>,
    input: serde_json::Value,
    limits: Limits,
    expires_ms: u64,
    /// Plain parameters, and secrets already sealed to each agent.
    plain: BTreeMap<String, String>,
    sealed: HashMap<String, BTreeMap<String, SealedBox>>,
}

/// What submitting a job produced.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JobCreated {
    /// The job's id.
    pub job_id: String,
    /// The plugin version chosen.
    pub version: u64,
    /// The agents it was sent to.
    pub agents: Vec<String>,
}

/// Why a request was refused. The message is for the operator.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// The request is wrong.
    #[error("{0}")]
    BadRequest(String),
    /// Something named does not exist.
    #[error("{0}")]
    NotFound(String),
    /// The server failed.
    #[error(transparent)]
    Internal(#[from] anyhow::Error),
}

struct Shared {
    store: Store,
    link: LinkHandle,
    signer: SigningKey,
    keyset: std::sync::RwLock<Signed<KeySet>>,
    results: watch::Sender<u64>,
    live: broadcast::Sender<LiveEvent>,
    /// By job id, which sorts by creation time: an agent that comes back gets its jobs
    /// in the order they were made.
    rollouts: Mutex<BTreeMap<String, Active>>,
}

/// How often deadlines of rate-controlled jobs are checked.
const TICK: Duration = Duration::from_millis(250);
/// Most incoming messages taken at once; the results among them are stored together.
const INCOMING_BATCH: usize = 256;

/// A result whose signature and sender checked out, with its audit text.
struct CheckedResult {
    result: JobResult,
    audit: String,
}

/// Live events kept for slow followers before they skip ahead.
const LIVE_BACKLOG: usize = 4096;

/// Largest piece of live output accepted (agents send at most 16 KiB), which bounds the
/// followers' backlog to about 256 MiB at worst.
const MAX_LIVE_TEXT: usize = 64 << 10;

/// The control plane handle; clones share state.
#[derive(Clone)]
pub struct ControlPlane {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for ControlPlane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ControlPlane")
    }
}

/// Parses `all`, `tag:K=V` or `id,id,...` against the known agents.
pub fn resolve_targets(
    selector: &str,
    agents: &[crate::store::AgentRow],
) -> Result<Vec<String>, ControlError> {
    let selector = selector.trim();
    // Deregistered agents are never targets.
    let all = agents;
    let agents: Vec<&crate::store::AgentRow> =
        all.iter().filter(|a| a.deregistered_ms.is_none()).collect();
    let ids: Vec<String> = if selector == "all" {
        agents.iter().map(|a| a.id.clone()).collect()
    } else if let Some(tag) = selector.strip_prefix("tag:") {
        let (k, v) = tag.split_once('=').ok_or_else(|| {
            ControlError::BadRequest(format!("target {selector:?} must be tag:KEY=VALUE"))
        })?;
        agents
            .iter()
            .filter(|a| a.tags.get(k).map(String::as_str) == Some(v))
            .map(|a| a.id.clone())
            .collect()
    } else {
        let mut ids = Vec::new();
        for id in selector.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            if !agents.iter().any(|a| a.id == id) {
                let why = if all.iter().any(|a| a.id == id) {
                    "is deregistered"
                } else {
                    "is unknown"
                };
                return Err(ControlError::NotFound(format!("agent {id:?} {why}")));
            }
            if !ids.iter().any(|x| x == id) {
                ids.push(id.to_string());
            }
        }
        ids
    };
    if ids.is_empty() {
        return Err(ControlError::NotFound(format!(
            "no agents match targets {selector:?}"
        )));
    }
    Ok(ids)
}

impl ControlPlane {
    /// Starts handling `incoming` from the link. Returns the handle and the task, which
    /// ends when `incoming` closes.
    pub fn start(
        store: Store,
        link: LinkHandle,
        signer: SigningKey,
        keyset: Signed<KeySet>,
        incoming: mpsc::Receiver<Incoming>,
    ) -> (ControlPlane, tokio::task::JoinHandle<()>) {
        let (results, _) = watch::channel(0);
        let (live, _) = broadcast::channel(LIVE_BACKLOG);
        let cp = ControlPlane {
            shared: Arc::new(Shared {
                store,
                link,
                signer,
                keyset: std::sync::RwLock::new(keyset),
                results,
                live,
                rollouts: Mutex::new(BTreeMap::new()),
            }),
        };
        if let Err(e) = cp.restore_rollouts() {
            tracing::error!(error = %format!("{e:#}"), "could not resume rate-controlled jobs");
        }
        let ticker = {
            let cp = cp.clone();
            tokio::spawn(async move {
                let mut every = tokio::time::interval(TICK);
                every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    every.tick().await;
                    cp.tick_rollouts().await;
                }
            })
        };
        let cp2 = cp.clone();
        let task = tokio::spawn(async move {
            cp2.handle_incoming(incoming).await;
            ticker.abort();
        });
        (cp, task)
    }

    /// Live output and state changes of every job, for followers.
    pub fn live(&self) -> broadcast::Receiver<LiveEvent> {
        self.shared.live.subscribe()
    }

    fn emit(&self, job_id: &str, agent_id: &str, what: LiveWhat) {
        // No followers is fine: live events are a view, the store is the record.
        let _ = self.shared.live.send(LiveEvent {
            job_id: job_id.to_string(),
            agent_id: agent_id.to_string(),
            what,
        });
    }

    fn rollouts(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Active>> {
        self.shared
            .rollouts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// Picks up rate-controlled jobs a previous run of the server left unfinished.
    fn restore_rollouts(&self) -> anyhow::Result<()> {
        let store = &self.shared.store;
        let online: HashMap<String, bool> = store
            .agents()?
            .into_iter()
            .map(|a| (a.id, a.online && a.deregistered_ms.is_none()))
            .collect();
        let now = now_ms();
        for row in store.active_rollouts()? {
            // A job that cannot be resumed is ended, with the reason on every target
            // that was still open, rather than left open for ever.
            let row = match row {
                Ok(r) => r,
                Err((job, why)) => {
                    self.abandon(&job, &why, now)?;
                    continue;
                }
            };
            let Some(job) = store.job(&row.job_id)? else {
                self.abandon(&row.job_id, "the job is gone from the store", now)?;
                continue;
            };
            let Some(plugin) = store.plugin(&job.plugin, Some(job.version))? else {
                let why = format!(
                    "plugin {} v{} is gone from the store",
                    job.plugin, job.version
                );
                self.abandon(&job.id, &why, now)?;
                continue;
            };
            let mut restored = Vec::new();
            for t in store.targets(&job.id)? {
                let mut state = match &t.result {
                    Some(r) if !t.state.is_final() => crate::rollout::state_of(r).0,
                    _ => t.state,
                };
                // Secret values are not kept: targets not yet sent cannot get them now.
                if state == TargetState::Pending && !row.spec.secret_names.is_empty() {
                    let why = "the job has secret parameters, which are not kept across a server restart; run it again";
                    store.settle(&job.id, &t.agent_id, TargetState::Failed, why, now)?;
                    state = TargetState::Failed;
                }
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
            tracing::info!(job.id = %job.id, in_flight = rollout.in_flight(), "resuming rate-controlled job");
            self.rollouts().insert(
                job.id.clone(),
                Active {
                    rollout,
                    manifest: plugin.manifest,
                    input: job.input,
                    limits: row.spec.limits,
                    expires_ms: job.expires_ms,
                    plain: row.spec.parameters,
                    sealed: HashMap::new(),
                },
            );
        }
        Ok(())
    }

    /// Ends a rate-controlled job that cannot be resumed after a restart.
    fn abandon(&self, job: &str, why: &str, now: u64) -> anyhow::Result<()> {
        let store = &self.shared.store;
        let why = format!("the server could not resume this job after a restart: {why}");
        tracing::error!(job.id = %job, "{why}");
        for (agent, _, _, done) in store.target_states(job)? {
            if !done {
                store.settle(job, &agent, TargetState::Failed, &why, now)?;
            }
        }
        store.finish_rollout(job, now)
    }

    /// Applies deadlines to every rate-controlled job, and starts what they allow.
    async fn tick_rollouts(&self) {
        let now = now_ms();
        let work: Vec<(String, Vec<Action>)> = self
            .rollouts()
            .iter_mut()
            .map(|(id, a)| (id.clone(), a.rollout.tick(now)))
            .filter(|(_, a)| !a.is_empty())
            .collect();
        for (job, actions) in work {
            self.apply(&job, actions).await;
        }
        let done: Vec<String> = self
            .rollouts()
            .iter()
            .filter(|(_, a)| a.rollout.is_done())
            .map(|(id, _)| id.clone())
            .collect();
        for job in done {
            self.finish_rollout(&job);
        }
    }

    fn finish_rollout(&self, job: &str) {
        let Some(a) = self.rollouts().remove(job) else {
            return;
        };
        if let Err(e) = self.shared.store.finish_rollout(job, now_ms()) {
            tracing::warn!(job.id = %job, error = %e, "could not record a finished job");
        }
        tracing::info!(job.id = %job, peak_in_flight = a.rollout.peak_in_flight(), max_concurrency = a.rollout.max_concurrency(), stopped_by_errors = a.rollout.stopped_by_errors(), "rate-controlled job finished");
    }

    /// Carries out what a rollout decided.
    async fn apply(&self, job: &str, actions: Vec<Action>) {
        let mut settled = false;
        // Dispatches go first and together: one store write for all of them.
        let mut ready = Vec::new();
        let mut rest = Vec::new();
        for action in actions {
            match action {
                Action::Dispatch(agent) => match self.envelope(job, &agent) {
                    Ok(env) => ready.push(env),
                    Err(e) => {
                        self.dispatch_failed(job, &agent, &e);
                        settled = true;
                    }
                },
                other => rest.push(other),
            }
        }
        for (agent, e) in self.send_envelopes(ready).await {
            self.dispatch_failed(job, &agent, &e);
            settled = true;
        }
        for action in rest {
            match action {
                Action::Dispatch(_) => {}
                Action::Cancel(agent) => self.send_cancel(job, &agent).await,
                Action::Settle(agent, state, why) => {
                    self.settle(job, &agent, state, &why);
                    settled = true;
                }
            }
        }
        if settled {
            self.shared.results.send_modify(|n| *n += 1);
        }
    }

    fn settle(&self, job: &str, agent: &str, state: TargetState, why: &str) {
        tracing::info!(job.id = %job, agent.id = %agent, state = state.as_str(), "{why}");
        if let Err(e) = self.shared.store.settle(job, agent, state, why, now_ms()) {
            tracing::error!(job.id = %job, agent.id = %agent, error = %e, "could not record a target's state");
        }
        {
            let mut r = self.rollouts();
            if let Some(a) = r.get_mut(job) {
                // In line with the store; what follows from it waits for the next tick.
                a.rollout.mark(agent, state);
            }
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

    fn dispatch_failed(&self, job: &str, agent: &str, e: &anyhow::Error) {
        let why = format!("the job could not be sent: {e:#}");
        tracing::error!(job.id = %job, agent.id = %agent, "{why}");
        self.settle(job, agent, TargetState::Failed, &why);
    }

    /// One target's envelope of a rate-controlled job.
    fn envelope(&self, job: &str, agent: &str) -> anyhow::Result<JobEnvelope> {
        let r = self.rollouts();
        let a = r
            .get(job)
            .ok_or_else(|| anyhow::anyhow!("job {job} is no longer active"))?;
        let mut parameters: BTreeMap<String, Parameter> = a
            .plain
            .iter()
            .map(|(k, v)| (k.clone(), Parameter::Plain { value: v.clone() }))
            .collect();
        if let Some(sealed) = a.sealed.get(agent) {
            for (k, v) in sealed {
                parameters.insert(k.clone(), Parameter::Secret { sealed: v.clone() });
            }
        }
        Ok(JobEnvelope {
            job_id: job.to_string(),
            agent_id: agent.to_string(),
            attempt: 1,
            plugin: a.manifest.clone(),
            input: a.input.clone(),
            parameters,
            limits: a.limits,
            not_before_ms: now_ms(),
            expires_at_ms: a.expires_ms,
            resent: false,
        })
    }

    /// Signs the envelopes (of one job), records their targets as sent in one store
    /// write, then publishes them. Returns the targets that could not be sent, and why.
    async fn send_envelopes(&self, envs: Vec<JobEnvelope>) -> Vec<(String, anyhow::Error)> {
        let Some(job) = envs.first().map(|e| e.job_id.clone()) else {
            return Vec::new();
        };
        debug_assert!(envs.iter().all(|e| e.job_id == job));
        let mut failed = Vec::new();
        let mut signed = Vec::with_capacity(envs.len());
        for env in envs {
            match serde_json::to_vec(&Signed::sign(&env, &self.shared.signer)) {
                Ok(body) => signed.push((env.agent_id, body)),
                Err(e) => failed.push((env.agent_id, e.into())),
            }
        }
        // Recorded before they go out: an agent may answer before `publish` returns.
        // The store keeps each body until its agent answers, to send again when the
        // agent next says hello (see `redeliver`).
        let sent: Vec<(&str, &[u8])> = signed
            .iter()
            .map(|(a, body)| (a.as_str(), body.as_slice()))
            .collect();
        if let Err(e) = self.shared.store.mark_sent(&job, &sent, now_ms()) {
            let why = format!("{e:#}");
            failed.extend(
                signed
                    .into_iter()
                    .map(|(a, _)| (a, anyhow::anyhow!("{why}"))),
            );
            return failed;
        }
        for (agent, body) in signed {
            match self
                .shared
                .link
                .publish(topics::down(&agent, Down::Job), body, false)
                .await
            {
                Ok(()) => self.emit(
                    &job,
                    &agent,
                    LiveWhat::State {
                        state: TargetState::Delivered,
                        detail: None,
                    },
                ),
                Err(e) => failed.push((agent, e.into())),
            }
        }
        failed
    }

    /// Sends `agent` again every cancel request for a target it has not answered, then
    /// every envelope it was sent before `since` (when it said hello on this connection;
    /// later ones go over it) and has not answered. The broker may have lost them (a
    /// restart of the server and its embedded broker, which keeps sessions in memory,
    /// or an external broker that had not saved them yet), and nothing else would ever
    /// send them again. An agent that already has a job ignores the copy (marked
    /// `resent`) quietly; it never runs a job twice.
    async fn redeliver(&self, agent: &str, since: u64) {
        // Cancel requests first: the agent remembers one for a job it has not seen yet.
        match self.shared.store.unanswered_cancels(agent) {
            Ok(jobs) => {
                for job in jobs {
                    self.send_cancel(&job, agent).await;
                }
            }
            Err(e) => {
                tracing::error!(agent.id = %agent, error = %format!("{e:#}"), "could not read the cancel requests to send again");
            }
        }
        let unanswered = self
            .shared
            .store
            .unanswered_envelopes(agent, since, now_ms());
        let envelopes = match unanswered {
            Ok(e) => e,
            Err(e) => {
                tracing::error!(agent.id = %agent, error = %format!("{e:#}"), "could not read the envelopes to send again");
                return;
            }
        };
        if envelopes.is_empty() {
            return;
        }
        tracing::info!(agent.id = %agent, count = envelopes.len(), "sending unanswered job envelopes again");
        for (job, body) in envelopes {
            // Our own signed envelope, marked as a copy and signed again.
            let copy = serde_json::from_slice::<Signed<JobEnvelope>>(&body)
                .map_err(anyhow::Error::from)
                .and_then(|s| s.unverified().map_err(anyhow::Error::from))
                .and_then(|mut env| {
                    env.resent = true;
                    Ok(serde_json::to_vec(&Signed::sign(
                        &env,
                        &self.shared.signer,
                    ))?)
                });
            let body = match copy {
                Ok(b) => b,
                Err(e) => {
                    tracing::error!(job.id = %job, agent.id = %agent, error = %format!("{e:#}"), "a kept envelope could not be read; not sent again");
                    continue;
                }
            };
            if let Err(e) = self
                .shared
                .link
                .publish(topics::down(agent, Down::Job), body, false)
                .await
            {
                tracing::warn!(job.id = %job, agent.id = %agent, error = %e, "could not send a job envelope again");
            }
        }
    }

    async fn send_cancel(&self, job: &str, agent: &str) {
        let req = CancelRequest {
            job_id: job.to_string(),
            agent_id: agent.to_string(),
            at_ms: now_ms(),
        };
        let body = serde_json::to_vec(&Signed::sign(&req, &self.shared.signer))
            .expect("cancel requests serialise");
        match self
            .shared
            .link
            .publish(topics::down(agent, Down::Cancel), body, false)
            .await
        {
            Ok(()) => tracing::info!(job.id = %job, agent.id = %agent, "cancel request sent"),
            Err(e) => {
                tracing::warn!(job.id = %job, agent.id = %agent, error = %e, "could not send cancel request")
            }
        }
        // Kept, like envelopes, for an agent whose broker loses the request: it is sent
        // again when the agent next says hello, until the target has its answer.
        if let Err(e) = self.shared.store.mark_cancel_sent(job, agent, now_ms()) {
            tracing::warn!(job.id = %job, agent.id = %agent, error = %format!("{e:#}"), "could not record a cancel request");
        }
    }

    /// Cancels a job: targets not sent yet never will be, and agents running it are asked
    /// to stop, killing what it started. Their results say `cancelled`.
    pub async fn cancel(&self, job_id: &str) -> Result<CancelOutcome, ControlError> {
        let store = &self.shared.store;
        if store.job(job_id)?.is_none() {
            return Err(ControlError::NotFound(format!("no job {job_id}")));
        }
        let now = now_ms();
        // Nothing of a cancelled job is sent again, even to an agent whose broker lost
        // the cancel request.
        store.forget_envelopes(job_id)?;
        let actions = self
            .rollouts()
            .get_mut(job_id)
            .map(|a| a.rollout.cancel(now));
        let actions = match actions {
            Some(a) => {
                store.cancel_rollout(job_id, now)?;
                a
            }
            // Not rate-controlled (or already done): every target without a final state
            // is in flight.
            None => store
                .targets(job_id)?
                .into_iter()
                .filter(|t| !t.is_done())
                .map(|t| Action::Cancel(t.agent_id))
                .collect(),
        };
        let outcome = CancelOutcome {
            job_id: job_id.to_string(),
            not_started: actions
                .iter()
                .filter(|a| matches!(a, Action::Settle(..)))
                .count(),
            stop_requests: actions
                .iter()
                .filter(|a| matches!(a, Action::Cancel(_)))
                .count(),
        };
        self.apply(job_id, actions).await;
        Ok(outcome)
    }

    fn spawn_agent_online(&self, agent: &str, online: bool) {
        let (me, agent) = (self.clone(), agent.to_string());
        tokio::spawn(async move { me.agent_online(&agent, online).await });
    }

    /// An agent was deregistered: it gets nothing more, and its targets that are not
    /// final become undeliverable.
    pub async fn agent_deregistered(&self, agent: &str) -> anyhow::Result<()> {
        let now = now_ms();
        for a in self.rollouts().values_mut() {
            let _ = a.rollout.set_online(agent, false, now);
        }
        for job in self.shared.store.open_targets_of(agent)? {
            self.settle(
                &job,
                agent,
                TargetState::Undeliverable,
                "the agent was deregistered",
            );
        }
        self.shared.results.send_modify(|n| *n += 1);
        // Slots it held are free now.
        self.tick_rollouts().await;
        Ok(())
    }

    /// Tells rate-controlled jobs that an agent came online or went offline.
    async fn agent_online(&self, agent: &str, online: bool) {
        let now = now_ms();
        let work: Vec<(String, Vec<Action>)> = self
            .rollouts()
            .iter_mut()
            .filter(|(_, a)| a.rollout.has(agent))
            .map(|(id, a)| (id.clone(), a.rollout.set_online(agent, online, now)))
            .filter(|(_, a)| !a.is_empty())
            .collect();
        for (job, actions) in work {
            self.apply(&job, actions).await;
        }
    }

    /// Changes whenever a result is stored.
    pub fn results_changed(&self) -> watch::Receiver<u64> {
        self.shared.results.subscribe()
    }

    /// The store.
    pub fn store(&self) -> &Store {
        &self.shared.store
    }

    /// The key set agents should hold.
    pub fn keyset(&self) -> Signed<KeySet> {
        self.shared
            .keyset
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Adopts a new key set (already checked as a successor) and sends it to every
    /// known agent; agents that are offline get it when they next announce themselves.
    pub async fn set_keyset(&self, signed: Signed<KeySet>) -> anyhow::Result<usize> {
        *self
            .shared
            .keyset
            .write()
            .unwrap_or_else(|e| e.into_inner()) = signed;
        let agents = self.shared.store.agents()?;
        for a in &agents {
            self.send_keyset(&a.id).await;
        }
        Ok(agents.len())
    }

    async fn send_keyset(&self, agent: &str) {
        let body = serde_json::to_vec(&self.keyset()).expect("key sets serialise");
        if let Err(e) = self
            .shared
            .link
            .publish(topics::down(agent, Down::Keyset), body, false)
            .await
        {
            tracing::warn!(agent.id = %agent, error = %e, "could not send key set");
        }
    }

    /// Stores a job and sends each target its signed envelope.
    pub async fn submit(&self, req: JobRequest) -> Result<JobCreated, ControlError> {
        let store = &self.shared.store;
        let plugin = store
            .plugin(&req.plugin, req.version)?
            .ok_or_else(|| match req.version {
                Some(v) => ControlError::NotFound(format!("no plugin {} version {v}", req.plugin)),
                None => ControlError::NotFound(format!("no plugin named {}", req.plugin)),
            })?;
        let agents = resolve_targets(&req.targets, &store.agents()?)?;
        let defaults = Limits::default();
        let limits = Limits {
            timeout_ms: req
                .timeout_secs
                .map(|s| s.saturating_mul(1000))
                .unwrap_or(defaults.timeout_ms),
            memory_bytes: req
                .memory_mib
                .map(|m| m.saturating_mul(1 << 20))
                .unwrap_or(defaults.memory_bytes),
            output_bytes: req
                .output_kib
                .map(|k| k.saturating_mul(1 << 10))
                .unwrap_or(defaults.output_bytes),
        };
        if limits.timeout_ms == 0 {
            return Err(ControlError::BadRequest("timeout must be positive".into()));
        }
        let now = now_ms();
        let delivery = req.delivery_secs.unwrap_or(DEFAULT_DELIVERY_SECS).max(1);
        let job = JobRow {
            id: new_job_id(),
            plugin: plugin.name.clone(),
            version: plugin.version,
            targets: req.targets.clone(),
            input: req.input.clone(),
            created_ms: now,
            expires_ms: now + delivery * 1000,
        };
        for name in req.secrets.keys() {
            if req.parameters.contains_key(name) {
                return Err(ControlError::BadRequest(format!(
                    "parameter {name:?} is given both plain and secret"
                )));
            }
        }
        // Every target needs an enrolled sealing key before anything is stored or sent.
        let mut sealing = std::collections::HashMap::new();
        if !req.secrets.is_empty() {
            for agent in &agents {
                let keys = store.agent_keys(agent)?.ok_or_else(|| {
                    ControlError::BadRequest(format!(
                        "agent {agent} has not enrolled a key, so secrets cannot be sealed to it"
                    ))
                })?;
                let key: [u8; 32] = hex::decode(&keys.sealing_key)
                    .ok()
                    .and_then(|v| v.try_into().ok())
                    .ok_or_else(|| anyhow::anyhow!("agent {agent}'s sealing key is malformed"))?;
                sealing.insert(agent.clone(), key);
            }
        }
        let rollout_row = match &req.rate {
            None => None,
            Some(rate) => {
                let policy = RatePolicy {
                    max_concurrency: rate
                        .max_concurrency
                        .as_deref()
                        .map(Amount::parse)
                        .transpose()
                        .map_err(ControlError::BadRequest)?,
                    max_errors: rate
                        .max_errors
                        .as_deref()
                        .map(Amount::parse)
                        .transpose()
                        .map_err(ControlError::BadRequest)?,
                    ramp: rate
                        .ramp
                        .as_deref()
                        .map(Ramp::parse)
                        .transpose()
                        .map_err(ControlError::BadRequest)?
                        .unwrap_or_default(),
                    delivery_timeout_ms: delivery * 1000,
                    run_timeout_ms: limits.timeout_ms,
                };
                if policy.max_concurrency == Some(Amount::Count(0))
                    || policy.max_concurrency == Some(Amount::Percent(0))
                {
                    return Err(ControlError::BadRequest(
                        "max-concurrency must be at least 1".into(),
                    ));
                }
                let spec = RolloutSpec {
                    policy,
                    limits,
                    parameters: req.parameters.clone(),
                    secret_names: req.secrets.keys().cloned().collect(),
                };
                Some(RolloutRow {
                    job_id: job.id.clone(),
                    spec,
                    created_ms: now,
                    cancelled_ms: None,
                    done_ms: None,
                })
            }
        };
        // The job, its targets and its rate control go in together, or not at all.
        store.create_job(&job, &agents, rollout_row.as_ref())?;
        if let Some(row) = rollout_row {
            let policy = row.spec.policy;
            let online: HashMap<String, bool> = store
                .agents()?
                .into_iter()
                .map(|a| (a.id, a.online))
                .collect();
            let mut sealed = HashMap::new();
            for agent in &agents {
                let mut mine = BTreeMap::new();
                for (name, value) in &req.secrets {
                    let aad = drover_protocol::secret::parameter_aad(&job.id, name);
                    mine.insert(
                        name.clone(),
                        drover_protocol::secret::seal(&sealing[agent], &aad, value.as_bytes()),
                    );
                }
                sealed.insert(agent.clone(), mine);
            }
            let mut rollout = Rollout::new(policy, now, &agents, |a| {
                online.get(a).copied().unwrap_or(false)
            });
            let actions = rollout.start(now);
            self.rollouts().insert(
                job.id.clone(),
                Active {
                    rollout,
                    manifest: plugin.manifest.clone(),
                    input: job.input.clone(),
                    limits,
                    expires_ms: job.expires_ms,
                    plain: req.parameters.clone(),
                    sealed,
                },
            );
            tracing::info!(
                job.id = %job.id,
                plugin = %plugin.name,
                targets = agents.len(),
                max_concurrency = ?policy.max_concurrency,
                max_errors = ?policy.max_errors,
                "rate-controlled job created"
            );
            self.apply(&job.id, actions).await;
            return Ok(JobCreated {
                job_id: job.id,
                version: plugin.version,
                agents,
            });
        }
        let mut envelopes = Vec::with_capacity(agents.len());
        for agent in &agents {
            let mut parameters: std::collections::BTreeMap<String, Parameter> = req
                .parameters
                .iter()
                .map(|(k, v)| (k.clone(), Parameter::Plain { value: v.clone() }))
                .collect();
            for (name, value) in &req.secrets {
                let aad = drover_protocol::secret::parameter_aad(&job.id, name);
                let sealed = drover_protocol::secret::seal(&sealing[agent], &aad, value.as_bytes());
                parameters.insert(name.clone(), Parameter::Secret { sealed });
            }
            let env = JobEnvelope {
                job_id: job.id.clone(),
                agent_id: agent.clone(),
                attempt: 1,
                plugin: plugin.manifest.clone(),
                input: job.input.clone(),
                parameters,
                limits,
                not_before_ms: now,
                expires_at_ms: job.expires_ms,
                resent: false,
            };
            envelopes.push(env);
        }
        let failed = self.send_envelopes(envelopes).await;
        for (agent, e) in &failed {
            self.dispatch_failed(&job.id, agent, e);
        }
        if !failed.is_empty() {
            self.shared.results.send_modify(|n| *n += 1);
        }
        tracing::info!(
            job.id = %job.id,
            plugin = %plugin.name,
            version = plugin.version,
            targets = agents.len(),
            "job sent"
        );
        Ok(JobCreated {
            job_id: job.id,
            version: plugin.version,
            agents,
        })
    }

    async fn handle_incoming(self, mut incoming: mpsc::Receiver<Incoming>) {
        let mut batch = Vec::with_capacity(INCOMING_BATCH);
        let mut results = Vec::new();
        while incoming.recv_many(&mut batch, INCOMING_BATCH).await > 0 {
            for msg in batch.drain(..) {
                let Some((agent, kind)) = topics::parse_up(&msg.topic) else {
                    tracing::warn!(topic = %msg.topic, "ignoring message on unexpected topic");
                    continue;
                };
                let agent = agent.to_string();
                // Results are checked one by one and stored together; anything else
                // waits for the results before it, so each agent's messages keep their order.
                let outcome = if kind == Up::Result {
                    self.check_result(&agent, &msg.payload)
                        .map(|r| results.extend(r))
                } else {
                    self.store_results(std::mem::take(&mut results));
                    self.handle(&agent, kind, &msg.payload).await
                };
                if let Err(e) = outcome {
                    self.refused(&agent, kind, &e);
                }
            }
            self.store_results(std::mem::take(&mut results));
        }
    }

    /// Logs and records a message from `agent` that was not taken.
    fn refused(&self, agent: &str, kind: Up, e: &anyhow::Error) {
        let event = e.downcast_ref::<Refusal>().map_or("bad-message", |r| r.0);
        tracing::warn!(agent.id = %agent, kind = kind.as_str(), event, error = %format!("{e:#}"), "agent message refused");
        let _ = self.shared.store.add_event(
            agent,
            event,
            &format!("{} message refused: {e:#}", kind.as_str()),
            now_ms(),
        );
    }

    /// Checks a result's signature and sender. `None`: it was an agent's refusal of an
    /// envelope it could not authenticate, recorded as an event, never as a result.
    fn check_result(&self, agent: &str, payload: &[u8]) -> anyhow::Result<Option<CheckedResult>> {
        let result: JobResult = self.verify_from(agent, payload)?;
        anyhow::ensure!(
            result.agent_id == agent,
            "result on agent {agent}'s topic claims to be from {:?}",
            result.agent_id
        );
        // An agent's refusal of an envelope it could not authenticate (or had seen
        // before) speaks for no job it took on: whoever sent that envelope chose
        // the job id. It is recorded as an event, never as a target's result.
        if let Some(f) = result.failure.as_ref().filter(|f| {
            result.status == drover_protocol::job::ResultStatus::Rejected
                && matches!(
                    f.kind,
                    FailureKind::BadEnvelope | FailureKind::Misaddressed | FailureKind::Replayed
                )
        }) {
            let msg = format!(
                "refused an envelope claiming job {:?} attempt {}: {}",
                result.job_id, result.attempt, f.message
            );
            tracing::warn!(agent.id = %agent, "{msg}");
            let now = now_ms();
            self.shared.store.touch(agent, now)?;
            self.shared
                .store
                .add_event(agent, "refused-envelope", &msg, now)?;
            return Ok(None);
        }
        let audit = match &result.failure {
            Some(f) => format!(
                "{} v{}: {:?}: {}",
                result.plugin, result.plugin_version, f.kind, f.message
            ),
            None => format!("{} v{}", result.plugin, result.plugin_version),
        };
        Ok(Some(CheckedResult { result, audit }))
    }

    /// Stores checked results in one transaction, then acts on each: rollouts, live
    /// events, acks. Results that could not be stored are not acked, so their agents
    /// send them again.
    fn store_results(&self, results: Vec<CheckedResult>) {
        if results.is_empty() {
            return;
        }
        let store = &self.shared.store;
        let now = now_ms();
        let items: Vec<(&JobResult, &str)> = results
            .iter()
            .map(|c| (&c.result, c.audit.as_str()))
            .collect();
        let outcomes = match store.record_results(&items, now) {
            Ok(o) => o,
            Err(e) => {
                let e = e.context(format!("storing {} result(s)", results.len()));
                for c in &results {
                    self.refused(&c.result.agent_id, Up::Result, &e);
                }
                return;
            }
        };
        let mut stored = false;
        for (CheckedResult { result, .. }, recorded) in results.into_iter().zip(outcomes) {
            let agent = result.agent_id.as_str();
            match recorded {
                Recorded::Stored => {
                    stored = true;
                    tracing::info!(agent.id = %agent, job.id = %result.job_id, status = result.status.as_str(), "result stored");
                    let (state, detail) = crate::rollout::state_of(&result);
                    let actions = self
                        .rollouts()
                        .get_mut(&result.job_id)
                        .map(|a| a.rollout.finished(agent, state, now));
                    self.emit(&result.job_id, agent, LiveWhat::State { state, detail });
                    // Publishing happens off this loop: waiting here on a full
                    // outgoing queue while the link waits on this loop would stall both.
                    let me = self.clone();
                    tokio::spawn(async move {
                        let job = &result.job_id;
                        me.ack(&result.agent_id, job, result.attempt).await;
                        if let Some(actions) = actions {
                            me.apply(job, actions).await;
                            let done = me.rollouts().get(job).is_some_and(|a| a.rollout.is_done());
                            if done {
                                me.finish_rollout(job);
                            }
                        }
                    });
                }
                Recorded::Duplicate => {
                    tracing::debug!(agent.id = %agent, job.id = %result.job_id, "duplicate result ignored");
                    let me = self.clone();
                    tokio::spawn(async move {
                        me.ack(&result.agent_id, &result.job_id, result.attempt)
                            .await
                    });
                }
                Recorded::NoTarget => {
                    let what = match &result.failure {
                        Some(f) => format!("{}: {}", result.status.as_str(), f.message),
                        None => result.status.as_str().to_string(),
                    };
                    let msg = format!(
                        "report for job {:?} attempt {} that is not awaiting this agent: {what}",
                        result.job_id, result.attempt
                    );
                    tracing::warn!(agent.id = %agent, "{msg}");
                    let _ = store.add_event(agent, "unmatched-result", &msg, now);
                }
            }
        }
        if stored {
            self.shared.results.send_modify(|n| *n += 1);
        }
    }

    async fn handle(&self, agent: &str, kind: Up, payload: &[u8]) -> anyhow::Result<()> {
        let store = &self.shared.store;
        let now = now_ms();
        match kind {
            Up::Status => {
                if store.is_deregistered(agent)? {
                    return Err(refusal(
                        "deregistered",
                        format!("agent {agent} is deregistered; presence ignored"),
                    ));
                }
                let p: Presence = serde_json::from_slice(payload)?;
                let online = p == Presence::Online;
                store.set_online(agent, online, now)?;
                tracing::info!(agent.id = %agent, online, "agent presence");
                self.spawn_agent_online(agent, online);
            }
            Up::Hello => {
                let hello: Hello = self.verify_from(agent, payload)?;
                anyhow::ensure!(
                    hello.agent_id == agent,
                    "hello claims to be agent {:?}",
                    hello.agent_id
                );
                store.upsert_hello(&hello, now)?;
                let current = self.keyset().unverified().map(|k| k.version).unwrap_or(0);
                if hello.keyset_version < current {
                    tracing::info!(agent.id = %agent, from = hello.keyset_version, to = current, "sending newer key set");
                    let (me, agent) = (self.clone(), agent.to_string());
                    tokio::spawn(async move { me.send_keyset(&agent).await });
                }
                tracing::info!(agent.id = %agent, hostname = %hello.hostname, version = %hello.agent_version, "agent announced");
                // A connection says hello before it says it is online, so what is sent
                // from now on (including what its coming online starts) goes over it.
                let (me, id) = (self.clone(), agent.to_string());
                tokio::spawn(async move { me.redeliver(&id, now).await });
                self.spawn_agent_online(agent, true);
            }
            Up::Heartbeat => {
                let hb: Heartbeat = self.verify_from(agent, payload)?;
                anyhow::ensure!(
                    hb.agent_id == agent,
                    "heartbeat claims to be agent {:?}",
                    hb.agent_id
                );
                store.touch(agent, now)?;
            }
            Up::Result => {
                let checked = self.check_result(agent, payload)?;
                self.store_results(checked.into_iter().collect());
            }
            Up::Progress => {
                // Live output with nobody following costs nothing: not even a signature
                // check. Started reports always count.
                if self.shared.live.receiver_count() == 0
                    && serde_json::from_slice::<Progress>(payload)
                        .is_ok_and(|p| matches!(p.event, ProgressEvent::Output { .. }))
                {
                    return Ok(());
                }
                let p: Progress = self.verify_from(agent, payload)?;
                if let ProgressEvent::Output { text, .. } = &p.event {
                    anyhow::ensure!(
                        text.len() <= MAX_LIVE_TEXT,
                        "live output piece of {} bytes is over {MAX_LIVE_TEXT}",
                        text.len()
                    );
                }
                anyhow::ensure!(
                    p.agent_id == agent,
                    "progress on agent {agent}'s topic claims to be from {:?}",
                    p.agent_id
                );
                match p.event {
                    ProgressEvent::Started => {
                        if store.mark_started(&p.job_id, agent, now)? {
                            if let Some(a) = self.rollouts().get_mut(&p.job_id) {
                                a.rollout.started(agent, now);
                            }
                            self.emit(
                                &p.job_id,
                                agent,
                                LiveWhat::State {
                                    state: TargetState::InProgress,
                                    detail: None,
                                },
                            );
                        }
                    }
                    ProgressEvent::Output { stream, text } => self.emit(
                        &p.job_id,
                        agent,
                        LiveWhat::Output {
                            stream,
                            text,
                            seq: p.seq,
                        },
                    ),
                }
            }
            Up::Fetch => {
                let req: FetchRequest = serde_json::from_slice(payload)?;
                store.touch(agent, now)?;
                let me = self.clone();
                let agent = agent.to_string();
                tokio::spawn(async move { me.serve_chunks(&agent, req).await });
            }
        }
        Ok(())
    }

    /// Parses a message an agent signed, checking it against the key it enrolled with.
    fn verify_from<T: Signable>(&self, agent: &str, payload: &[u8]) -> anyhow::Result<T> {
        let key = match self.shared.store.signing_key_of(agent)? {
            Some((_, true)) => {
                return Err(refusal(
                    "deregistered",
                    format!("agent {agent} is deregistered"),
                ));
            }
            Some((key, false)) => key,
            None => {
                return Err(refusal(
                    "unenrolled",
                    format!("agent {agent} has not enrolled a key"),
                ));
            }
        };
        let signed: Signed<T> = serde_json::from_slice(payload)?;
        signed.verify(&[key]).map_err(|e| {
            refusal(
                "forged",
                format!("not signed by agent {agent}'s enrolled key: {e}"),
            )
        })
    }

    async fn ack(&self, agent: &str, job_id: &str, attempt: u32) {
        let ack = ResultAck {
            job_id: job_id.to_string(),
            attempt,
        };
        let body = serde_json::to_vec(&ack).expect("acks serialise");
        // At most once: a lost ack costs only a resent result, acknowledged again.
        if let Err(e) = self
            .shared
            .link
            .publish_at_most_once(topics::down(agent, Down::Ack), body)
            .await
        {
            tracing::warn!(agent.id = %agent, error = %e, "could not send result ack");
        }
    }

    async fn serve_chunks(&self, agent: &str, req: FetchRequest) {
        let topic = topics::down(agent, Down::Chunk);
        let chunk_size = req
            .chunk_size
            .clamp(chunk::MIN_CHUNK_SIZE, chunk::MAX_CHUNK_SIZE);
        let blob = match self.shared.store.blob(&req.sha256) {
            Ok(Some(b)) => b,
            other => {
                let reason = match other {
                    Err(e) => format!("store error: {e:#}"),
                    _ => "no such plugin blob".to_string(),
                };
                tracing::warn!(agent.id = %agent, sha256 = %req.sha256, %reason, "cannot serve plugin");
                let h = ChunkHeader {
                    request_id: req.request_id,
                    sha256: req.sha256,
                    index: 0,
                    count: 0,
                    total_len: 0,
                    chunk_size,
                    error: Some(reason),
                };
                let _ = self
                    .shared
                    .link
                    .publish(topic, chunk::encode(&h, &[]), false)
                    .await;
                return;
            }
        };
        let count = chunk::chunk_count(blob.len() as u64, chunk_size);
        let indices: Vec<u32> = match req.indices {
            Some(v) => v.into_iter().filter(|i| *i < count).collect(),
            None => (0..count).collect(),
        };
        tracing::debug!(agent.id = %agent, sha256 = %req.sha256, chunks = indices.len(), "serving plugin");
        for index in indices {
            let start = index as usize * chunk_size as usize;
            let end = (start + chunk_size as usize).min(blob.len());
            let h = ChunkHeader {
                request_id: req.request_id.clone(),
                sha256: req.sha256.clone(),
                index,
                count,
                total_len: blob.len() as u64,
                chunk_size,
                error: None,
            };
            if let Err(e) = self
                .shared
                .link
                .publish(topic.clone(), chunk::encode(&h, &blob[start..end]), false)
                .await
            {
                tracing::warn!(agent.id = %agent, error = %e, "could not send chunk");
                return;
            }
        }
    }
}

/// A refused agent message: the event kind it is recorded under, and why.
#[derive(Debug, thiserror::Error)]
#[error("{1}")]
struct Refusal(&'static str, String);

fn refusal(kind: &'static str, why: String) -> anyhow::Error {
    Refusal(kind, why).into()
}

/// A new job id: time-ordered prefix and random suffix.
pub fn new_job_id() -> String {
    let mut b = [0u8; 6];
    let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b);
    format!("{:011x}-{}", now_ms(), hex::encode(b))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::AgentRow;

    fn agent(id: &str, env: &str, deregistered: bool) -> AgentRow {
        AgentRow {
            id: id.into(),
            hostname: String::new(),
            os: String::new(),
            os_version: String::new(),
            arch: String::new(),
            agent_version: String::new(),
            tags: [("env".to_string(), env.to_string())].into(),
            online: true,
            first_seen_ms: 0,
            last_seen_ms: 0,
            status_changed_ms: 0,
            deregistered_ms: deregistered.then_some(1),
        }
    }

    #[test]
    fn targets_resolve_by_all_tag_and_id_and_skip_deregistered_agents() {
        let agents = [
            agent("a", "prod", false),
            agent("b", "dev", false),
            agent("gone", "prod", true),
        ];
        assert_eq!(resolve_targets("all", &agents).unwrap(), ["a", "b"]);
        assert_eq!(resolve_targets("tag:env=prod", &agents).unwrap(), ["a"]);
        assert_eq!(resolve_targets("b, a,b", &agents).unwrap(), ["b", "a"]);
        let e = resolve_targets("a,gone", &agents).unwrap_err().to_string();
        assert!(e.contains("deregistered"), "{e}");
        let e = resolve_targets("nobody", &agents).unwrap_err().to_string();
        assert!(e.contains("unknown"), "{e}");
        assert!(resolve_targets("tag:env=qa", &agents).is_err());
        assert!(resolve_targets("tag:env", &agents).is_err());
    }
}
