//! Envelopes and cancel requests out to agents, recorded before they go, and out again
//! to an agent that comes back from away.

use drover_protocol::job::{CancelRequest, JobEnvelope};
use drover_protocol::signed::Signed;
use drover_protocol::topics::{self, Down};

use super::rollout::RESULT_GRACE_MS;
use super::types::{LiveWhat, TargetState};
use super::{Jobs, envelope, store};
use crate::mqtt::publisher::Delivery;

/// The shortest a cancel request is valid, from when it is sent.
const CANCEL_VALID_MIN_MS: u64 = 60_000;

impl Jobs {
    /// The attempt a cancel request for `agent`'s target of `job` stops, and until when
    /// it holds: as long as that attempt may still start (the job's expiry) and run (its
    /// timeout, and the grace the server gives its result).
    async fn cancel_terms(&self, job: &str, agent: &str) -> anyhow::Result<(u32, u64)> {
        let attempt = store::attempt_of(self.db(), job, agent).await?.unwrap_or(1);
        let expires = store::job(self.db(), job)
            .await?
            .map_or(0, |j| j.expires_ms);
        let timeout = store::rollout(self.db(), job)
            .await
            .ok()
            .flatten()
            .map_or(0, |r| r.spec.limits.timeout_ms);
        Ok((attempt, expires + timeout + RESULT_GRACE_MS))
    }

    /// Whether `agent` may fetch the plugin blob `sha256`: only if a job whose plugin it
    /// is was sent to it and its target there is not final yet.
    pub async fn delivered_blob(&self, agent: &str, sha256: &str) -> anyhow::Result<bool> {
        store::delivered_blob(self.db(), agent, sha256).await
    }

    /// Signs the envelopes (of one job), records their targets as sent in one store
    /// write, then publishes them. Returns the targets that could not be sent, and why.
    pub(super) async fn send_envelopes(
        &self,
        envs: Vec<JobEnvelope>,
    ) -> Vec<(String, anyhow::Error)> {
        let Some(job) = envs.first().map(|e| e.job_id.clone()) else {
            return Vec::new();
        };
        debug_assert!(envs.iter().all(|e| e.job_id == job));
        let mut failed = Vec::new();
        let mut signed = Vec::with_capacity(envs.len());
        for env in envs {
            match envelope::sign(&env, &self.shared.signer) {
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
        if let Err(e) = store::mark_sent(self.db(), &job, &sent, self.now()).await {
            let why = format!("{e:#}");
            failed.extend(
                signed
                    .into_iter()
                    .map(|(a, _)| (a, anyhow::anyhow!("{why}"))),
            );
            return failed;
        }
        for (agent, body) in signed {
            let topic = topics::down(&agent, Down::Job);
            match self
                .shared
                .link
                .publish(topic, body, Delivery::AtLeastOnce)
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
                Err(e) => failed.push((agent, e)),
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
    pub(super) async fn redeliver(&self, agent: &str, since: u64) {
        // Cancel requests first: the agent remembers one for a job it has not seen yet.
        match store::unanswered_cancels(self.db(), agent).await {
            Ok(jobs) => {
                for job in jobs {
                    self.send_cancel(&job, agent).await;
                }
            }
            Err(e) => {
                tracing::error!(agent.id = %agent, error = %format!("{e:#}"), "could not read the cancel requests to send again");
            }
        }
        let envelopes = match store::unanswered_envelopes(self.db(), agent, since, self.now()).await
        {
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
            let body = match envelope::resent_copy(&body, &self.shared.signer) {
                Ok(b) => b,
                Err(e) => {
                    tracing::error!(job.id = %job, agent.id = %agent, error = %format!("{e:#}"), "a kept envelope could not be read; not sent again");
                    continue;
                }
            };
            let topic = topics::down(agent, Down::Job);
            if let Err(e) = self
                .shared
                .link
                .publish(topic, body, Delivery::AtLeastOnce)
                .await
            {
                tracing::warn!(job.id = %job, agent.id = %agent, error = %format!("{e:#}"), "could not send a job envelope again");
            }
        }
    }

    /// Asks `agent` to stop its target of `job`, and keeps the request until the target
    /// has its answer.
    pub(super) async fn send_cancel(&self, job: &str, agent: &str) {
        let now = self.now();
        let (attempt, expires_at_ms) = match self.cancel_terms(job, agent).await {
            Ok(terms) => terms,
            Err(e) => {
                tracing::warn!(job.id = %job, agent.id = %agent, error = %format!("{e:#}"), "no cancel request: the target is unreadable");
                return;
            }
        };
        let req = CancelRequest {
            job_id: job.to_string(),
            agent_id: agent.to_string(),
            attempt,
            at_ms: now,
            expires_at_ms: expires_at_ms.max(now + CANCEL_VALID_MIN_MS),
        };
        let body = serde_json::to_vec(&Signed::sign(&req, &self.shared.signer))
            .expect("cancel requests serialise");
        let topic = topics::down(agent, Down::Cancel);
        match self
            .shared
            .link
            .publish(topic, body, Delivery::AtLeastOnce)
            .await
        {
            Ok(()) => tracing::info!(job.id = %job, agent.id = %agent, "cancel request sent"),
            Err(e) => {
                tracing::warn!(job.id = %job, agent.id = %agent, error = %format!("{e:#}"), "could not send cancel request")
            }
        }
        // Kept, like envelopes, for an agent whose broker loses the request: it is sent
        // again when the agent next says hello, until the target has its answer.
        if let Err(e) = store::mark_cancel_sent(self.db(), job, agent, self.now()).await {
            tracing::warn!(job.id = %job, agent.id = %agent, error = %format!("{e:#}"), "could not record a cancel request");
        }
    }
}
