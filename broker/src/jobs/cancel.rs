//! Stopping a job: targets not sent yet never will be, and agents running it are asked
//! to stop, killing what it started. Their results say `cancelled`.

use super::rollout::Action;
use super::types::CancelOutcome;
use super::{Jobs, store};

impl Jobs {
    /// Cancels a job; None if there is no such job.
    pub async fn cancel(&self, job_id: &str) -> anyhow::Result<Option<CancelOutcome>> {
        if store::job(self.db(), job_id).await?.is_none() {
            return Ok(None);
        }
        let now = self.now();
        // Nothing of a cancelled job is sent again, even to an agent whose broker lost
        // the cancel request.
        store::forget_envelopes(self.db(), job_id).await?;
        let actions = self.active().get_mut(job_id).map(|a| a.rollout.cancel(now));
        let actions = match actions {
            Some(a) => {
                store::cancel_rollout(self.db(), job_id, now).await?;
                a
            }
            // Not driven by this server (finished, or from before rollouts were kept):
            // every target without a final state is in flight.
            None => store::targets(self.db(), job_id, 0)
                .await?
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
        Ok(Some(outcome))
    }
}
