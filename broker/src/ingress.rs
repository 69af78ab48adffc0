//! What agents send, routed to the capability it is for: presence, hello and heartbeats
//! to the fleet, results and progress to the job engine, fetch requests to the plugin
//! catalogue (for the blobs of jobs the engine says are in flight to the agent, as the
//! catalogue, below the engine, cannot ask it). Anything refused is logged and recorded
//! against the agent.

use drover_protocol::link::Incoming;
use drover_protocol::topics::{self, Up};
use tokio::sync::mpsc;
use tracing::Instrument as _;

use crate::fleet::Fleet;
use crate::fleet::identity::refusal;
use crate::jobs::Jobs;
use crate::plugins::Plugins;
use crate::plugins::chunks::FetchRefused;

/// Most incoming messages taken at once; the results among them are stored together.
const BATCH: usize = 256;

/// Where agents' messages go.
#[derive(Clone, Debug)]
pub struct Ingress {
    /// Presence, hello, heartbeats.
    pub fleet: Fleet,
    /// Results and progress.
    pub jobs: Jobs,
    /// Fetch requests.
    pub plugins: Plugins,
}

impl Ingress {
    /// Handles `incoming` until it closes.
    pub async fn run(self, mut incoming: mpsc::Receiver<Incoming>) {
        let mut batch = Vec::with_capacity(BATCH);
        let mut results = Vec::new();
        while incoming.recv_many(&mut batch, BATCH).await > 0 {
            for msg in batch.drain(..) {
                let Some((agent, kind)) = topics::parse_up(&msg.topic) else {
                    tracing::warn!(topic = %msg.topic, "ignoring message on unexpected topic");
                    continue;
                };
                let agent = agent.to_string();
                let span = tracing::debug_span!("message", agent.id = %agent, kind = kind.as_str());
                // Results are checked one by one and stored together; anything else
                // waits for the results before it, so each agent's messages keep their
                // order.
                let outcome = if kind == Up::Result {
                    self.jobs
                        .check_result(&agent, &msg.payload)
                        .instrument(span)
                        .await
                        .map(|r| results.extend(r))
                } else {
                    self.jobs.store_results(std::mem::take(&mut results)).await;
                    self.route(&agent, kind, &msg.payload)
                        .instrument(span)
                        .await
                };
                if let Err(e) = outcome {
                    self.fleet.refused(&agent, kind, &e).await;
                }
            }
            self.jobs.store_results(std::mem::take(&mut results)).await;
        }
    }

    /// A fetch request: within the agent's rate, and only for the blob of a job in
    /// flight to it.
    async fn fetch(&self, agent: &str, payload: &[u8]) -> anyhow::Result<()> {
        let refused = |e: FetchRefused| refusal(e.kind(), e.to_string());
        let req = self
            .plugins
            .fetch_request(agent, payload)
            .map_err(refused)?;
        self.fleet.touch(agent).await?;
        if !self.jobs.delivered_blob(agent, &req.sha256).await? {
            let why = format!(
                "plugin blob {} is the plugin of no job in flight to agent {agent}",
                req.sha256
            );
            self.plugins.refuse_fetch(agent, req, why.clone());
            return Err(refusal("refused-fetch", why));
        }
        self.plugins.serve_chunks(agent, req).map_err(refused)
    }

    async fn route(&self, agent: &str, kind: Up, payload: &[u8]) -> anyhow::Result<()> {
        match kind {
            Up::Status => self.fleet.status(agent, payload).await,
            Up::Hello => self.fleet.hello(agent, payload).await,
            Up::Heartbeat => self.fleet.heartbeat(agent, payload).await,
            Up::Progress => self.jobs.progress(agent, payload).await,
            Up::Fetch => self.fetch(agent, payload).await,
            // Taken apart in `run`, to be stored together.
            Up::Result => {
                let checked = self.jobs.check_result(agent, payload).await?;
                self.jobs.store_results(checked.into_iter().collect()).await;
                Ok(())
            }
        }
    }
}
