//! Results in: checked against the agent's enrolled key, stored once per (agent, job,
//! attempt) with their audit entry and `finished` event, then acknowledged end to end.
//! And out to capabilities: finished targets with their results and typed outputs.

use drover_protocol::job::{FailureKind, JobResult, ResultAck, ResultStatus};
use drover_protocol::manifest::{World, sha256_hex};
use drover_protocol::signed::Signed;
use drover_protocol::topics::{self, Down, Up};
use drover_protocol::worlds::Output;
use tracing::Instrument as _;

use super::Jobs;
use super::events::{Finished, TARGET_FINISHED, TargetFinished};
use super::rollout::state_of;
use super::store::{self, Incoming, Recorded};
use super::types::LiveWhat;
use crate::events::Event;
use crate::mqtt::publisher::Delivery;

/// A result whose signature and sender checked out, with its audit text and the
/// digest of the message as the agent sent it (which its ack names).
#[derive(Debug)]
pub struct CheckedResult {
    result: JobResult,
    audit: String,
    digest: String,
}

impl Jobs {
    /// Checks a result's signature and sender. `None`: it was an agent's refusal of an
    /// envelope it could not authenticate, recorded as an agent event, never as a
    /// result.
    pub async fn check_result(
        &self,
        agent: &str,
        payload: &[u8],
    ) -> anyhow::Result<Option<CheckedResult>> {
        let fleet = &self.shared.fleet;
        let result: JobResult = fleet.verify(agent, payload).await?;
        anyhow::ensure!(
            result.agent_id == agent,
            "result on agent {agent}'s topic claims to be from {:?}",
            result.agent_id
        );
        // An agent's refusal of an envelope it could not authenticate (or had seen
        // before) speaks for no job it took on: whoever sent that envelope chose the
        // job id. It is recorded as an event, never as a target's result.
        if let Some(f) = result.failure.as_ref().filter(|f| {
            result.status == ResultStatus::Rejected
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
            fleet.touch(agent).await?;
            fleet.record(agent, "refused-envelope", &msg).await;
            return Ok(None);
        }
        let audit = match &result.failure {
            Some(f) => format!(
                "{} v{}: {:?}: {}",
                result.plugin, result.plugin_version, f.kind, f.message
            ),
            None => format!("{} v{}", result.plugin, result.plugin_version),
        };
        Ok(Some(CheckedResult {
            result,
            audit,
            digest: sha256_hex(payload),
        }))
    }

    /// Stores checked results in one transaction, then acts on each: rollouts, live
    /// events, acks. Results that could not be stored are not acked, so their agents
    /// send them again.
    pub async fn store_results(&self, results: Vec<CheckedResult>) {
        if results.is_empty() {
            return;
        }
        let fleet = &self.shared.fleet;
        let now = self.now();
        let items: Vec<Incoming<'_>> = results
            .iter()
            .map(|c| Incoming {
                result: &c.result,
                audit: &c.audit,
            })
            .collect();
        let outcomes = match store::record_results(
            self.db(),
            &self.shared.events,
            &items,
            state_of,
            now,
        )
        .await
        {
            Ok(o) => o,
            Err(e) => {
                let e = e.context(format!("storing {} result(s)", results.len()));
                for c in &results {
                    fleet.refused(&c.result.agent_id, Up::Result, &e).await;
                }
                return;
            }
        };
        let mut last_event = None;
        for (CheckedResult { result, digest, .. }, recorded) in results.into_iter().zip(outcomes) {
            let agent = result.agent_id.as_str();
            match recorded {
                Recorded::Stored(state, detail, event) => {
                    last_event = Some(event);
                    tracing::info!(agent.id = %agent, job.id = %result.job_id, status = result.status.as_str(), "result stored");
                    let actions = self
                        .active()
                        .get_mut(&result.job_id)
                        .map(|a| a.rollout.finished(agent, state, now));
                    self.emit(&result.job_id, agent, LiveWhat::State { state, detail });
                    // Publishing happens off this loop: waiting here on a full outgoing
                    // queue while the link waits on this loop would stall both.
                    let me = self.clone();
                    let span = tracing::info_span!("result", agent.id = %agent, job.id = %result.job_id, plugin = %result.plugin);
                    tokio::spawn(
                        async move {
                            let job = &result.job_id;
                            me.ack(&result.agent_id, job, result.attempt, digest).await;
                            if let Some(actions) = actions {
                                me.apply(job, actions).await;
                                me.finish_if_done(job).await;
                            }
                        }
                        .instrument(span),
                    );
                }
                Recorded::Duplicate => {
                    tracing::debug!(agent.id = %agent, job.id = %result.job_id, "duplicate result ignored");
                    let me = self.clone();
                    tokio::spawn(async move {
                        me.ack(&result.agent_id, &result.job_id, result.attempt, digest)
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
                    fleet.record(agent, "unmatched-result", &msg).await;
                }
            }
        }
        if let Some(event) = last_event {
            self.shared.events.committed(event);
            self.results_moved();
        }
    }

    /// Tells the agent its result is stored, so it may delete it from its outbox. The
    /// ack is signed, and names the very message stored: a broker can neither forge one
    /// nor ack a result it kept from the server.
    async fn ack(&self, agent: &str, job_id: &str, attempt: u32, result_sha256: String) {
        let ack = ResultAck {
            agent_id: agent.to_string(),
            job_id: job_id.to_string(),
            attempt,
            result_sha256,
        };
        let body =
            serde_json::to_vec(&Signed::sign(&ack, &self.shared.signer)).expect("acks serialise");
        // At most once: a lost ack costs only a resent result, acknowledged again.
        let topic = topics::down(agent, Down::Ack);
        if let Err(e) = self
            .shared
            .link
            .publish(topic, body, Delivery::AtMostOnce)
            .await
        {
            tracing::warn!(agent.id = %agent, error = %format!("{e:#}"), "could not send result ack");
        }
    }

    /// The `job.target_finished` events among `events`, with their results and typed
    /// outputs, in order. For a consumer's `handle`.
    pub async fn finished(&self, events: &[Event]) -> anyhow::Result<Vec<Finished>> {
        self.finished_of(events, |_| true).await
    }

    /// [`Jobs::finished`], only for plugins of `world`: the results of others are not
    /// read at all.
    pub async fn finished_in_world(
        &self,
        events: &[Event],
        world: World,
    ) -> anyhow::Result<Vec<Finished>> {
        self.finished_of(events, |t| t.world == world.as_str())
            .await
    }

    async fn finished_of(
        &self,
        events: &[Event],
        wanted: impl Fn(&TargetFinished) -> bool,
    ) -> anyhow::Result<Vec<Finished>> {
        let mut out = Vec::new();
        for e in events.iter().filter(|e| e.kind == TARGET_FINISHED) {
            let target: TargetFinished = e.decode()?;
            if !wanted(&target) {
                continue;
            }
            let result =
                store::result_of(self.db(), &target.job_id, &target.agent_id, target.attempt)
                    .await?;
            let output = result.as_ref().and_then(|r| {
                let world: World = target.world.parse().ok()?;
                Output::parse(world, r.output.as_ref()?).ok()
            });
            out.push(Finished {
                event_id: e.id,
                at_ms: e.at_ms,
                target,
                result,
                output,
            });
        }
        Ok(out)
    }
}
