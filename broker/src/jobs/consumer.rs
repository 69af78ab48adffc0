//! What the engine does with the fleet's lifecycle events: an agent back online gets
//! what it was owed and what waited for it; one that went offline holds no slot for new
//! targets; a deregistered one gets nothing more, and its open targets are settled.

use std::sync::Arc;

use tracing::Instrument as _;

use super::Jobs;
use crate::events::{BoxFuture, Consumer, Event};
use crate::fleet::Lifecycle;
use crate::fleet::lifecycle::PREFIX;

/// The engine as a consumer of the event log.
pub struct EngineConsumer(pub Jobs);

impl Jobs {
    /// The engine's consumer of agent lifecycle events, for the event log.
    pub fn consumer(&self) -> Arc<dyn Consumer> {
        Arc::new(EngineConsumer(self.clone()))
    }
}

impl Consumer for EngineConsumer {
    fn name(&self) -> &'static str {
        "jobs"
    }

    fn wants(&self, kind: &str) -> bool {
        kind.starts_with(PREFIX)
    }

    fn handle<'a>(&'a self, events: &'a [Event]) -> BoxFuture<'a, anyhow::Result<()>> {
        Box::pin(async move {
            for e in events {
                let Some(event) = Lifecycle::from_event(e) else {
                    continue;
                };
                match event? {
                    Lifecycle::Online {
                        agent_id, since_ms, ..
                    } => {
                        // Sending waits on the link: off the consumer's path, as the
                        // next agent's events should not wait for this one's envelopes.
                        let jobs = self.0.clone();
                        let span = tracing::info_span!("agent_online", agent.id = %agent_id);
                        tokio::spawn(
                            async move {
                                jobs.redeliver(&agent_id, since_ms).await;
                                jobs.agent_online(&agent_id, true).await;
                            }
                            .instrument(span),
                        );
                    }
                    Lifecycle::Offline { agent_id } => self.0.agent_online(&agent_id, false).await,
                    Lifecycle::Deregistered { agent_id } => {
                        self.0.agent_deregistered(&agent_id).await?
                    }
                    Lifecycle::Enrolled { .. } => {}
                }
            }
            Ok(())
        })
    }
}
