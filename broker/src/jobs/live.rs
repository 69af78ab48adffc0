//! What followers see as it happens: targets starting, output as it is written, state
//! changes. A view, best effort: the stored results are the record.

use drover_protocol::job::{Progress, ProgressEvent};
use tokio::sync::broadcast;

use super::types::{LiveEvent, LiveWhat, TargetState};
use super::{Jobs, store};

/// Largest piece of live output accepted (agents send at most 16 KiB), which bounds the
/// followers' backlog to about 256 MiB at worst.
const MAX_LIVE_TEXT: usize = 64 << 10;

impl Jobs {
    /// Live output and state changes of every job, for followers.
    pub fn live(&self) -> broadcast::Receiver<LiveEvent> {
        self.shared.live.subscribe()
    }

    pub(super) fn emit(&self, job_id: &str, agent_id: &str, what: LiveWhat) {
        // No followers is fine: live events are a view, the store is the record.
        let _ = self.shared.live.send(LiveEvent {
            job_id: job_id.to_string(),
            agent_id: agent_id.to_string(),
            what,
        });
    }

    /// An agent's progress report: it started a job, or a program wrote output.
    pub async fn progress(&self, agent: &str, payload: &[u8]) -> anyhow::Result<()> {
        // Live output with nobody following costs nothing: not even a signature check.
        // Started reports always count.
        if self.shared.live.receiver_count() == 0
            && serde_json::from_slice::<Progress>(payload)
                .is_ok_and(|p| matches!(p.event, ProgressEvent::Output { .. }))
        {
            return Ok(());
        }
        let p: Progress = self.shared.fleet.verify(agent, payload).await?;
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
                let now = self.now();
                if store::mark_started(self.db(), &p.job_id, agent, now).await? {
                    if let Some(a) = self.active().get_mut(&p.job_id) {
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
        Ok(())
    }
}
