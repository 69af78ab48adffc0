//! The job engine: a plugin run on agents, from the operator's request to every
//! target's final state. It knows nothing of what a job means; capabilities (Run
//! Command, and those to come) submit jobs and react to its events.
//!
//! - [`submit`]: a request checked into a job, stored with its targets and rollout.
//! - [`envelope`]: the one way envelopes are built, secrets sealed and envelopes signed.
//! - [`rollout`]: rate control as a pure state machine; [`driver`] carries out what it
//!   decides, and a plain job is a rollout with every target at once.
//! - [`dispatch`]: envelopes and cancel requests out, and out again to an agent back
//!   from away.
//! - [`results`]: results in: checked, stored once, acknowledged.
//! - [`live`]: progress reports and live output, for followers.
//! - [`cancel`]: stopping a job.
//! - [`events`]: `job.target_finished`, appended with every final state, for
//!   capabilities; [`consumer`]: what the engine does with the fleet's events.
//! - [`store`], [`types`], [`routes`], [`cli`]: its tables, API types, routes and CLI
//!   groups (`drover run`, `drover job`).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use drover_protocol::job::Limits;
use drover_protocol::keys::SigningKey;
use drover_protocol::manifest::Manifest;
use drover_protocol::signed::Signed;
use tokio::sync::{broadcast, watch};
use tokio_util::sync::CancellationToken;

use crate::audit::Audit;
use crate::capability::Capability;
use crate::clock::Clock;
use crate::events::{Consumer, EventLog};
use crate::fleet::Fleet;
use crate::mqtt::publisher::Link;
use crate::plugins::Plugins;
use crate::store::Db;

pub mod cancel;
pub mod cli;
pub mod consumer;
pub mod dispatch;
pub mod driver;
pub mod envelope;
pub mod events;
pub mod live;
pub mod results;
pub mod rollout;
pub mod routes;
pub mod store;
pub mod submit;
pub mod types;

pub use types::{JobRequest, TargetState};

/// How often rollouts' deadlines are checked.
const TICK: Duration = Duration::from_millis(250);
/// Live events kept for slow followers before they skip ahead.
const LIVE_BACKLOG: usize = 4096;

/// A job whose targets are not all final, as the engine drives it.
struct Active {
    rollout: rollout::Rollout,
    manifest: Signed<Manifest>,
    input: serde_json::Value,
    limits: Limits,
    expires_ms: u64,
    /// Plain parameters; secret ones are in the store, sealed to each target's agent.
    plain: BTreeMap<String, String>,
    has_secrets: bool,
}

struct Shared {
    db: Db,
    link: Link,
    signer: SigningKey,
    clock: Clock,
    events: EventLog,
    audit: Audit,
    fleet: Fleet,
    plugins: Plugins,
    /// Bumped whenever targets reach final states, for long-polls.
    results: watch::Sender<u64>,
    live: broadcast::Sender<types::LiveEvent>,
    /// By job id, which sorts by creation time: an agent that comes back gets its jobs
    /// in the order they were made.
    active: Mutex<BTreeMap<String, Active>>,
}

/// The engine's handle; clones share it.
#[derive(Clone)]
pub struct Jobs {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Jobs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Jobs")
    }
}

/// What the engine works with.
pub struct JobsParts {
    /// The database.
    pub db: Db,
    /// Where envelopes, cancel requests and acks go.
    pub link: Link,
    /// The control-plane key envelopes are signed with.
    pub signer: SigningKey,
    /// The time.
    pub clock: Clock,
    /// Where `job.target_finished` events go.
    pub events: EventLog,
    /// The audit log, for operators' actions on jobs.
    pub audit: Audit,
    /// The agents.
    pub fleet: Fleet,
    /// The plugins.
    pub plugins: Plugins,
}

impl Jobs {
    /// Starts the engine: resumes the jobs a previous run left unfinished, and checks
    /// their deadlines every [`TICK`] until `shutdown`.
    pub async fn start(
        parts: JobsParts,
        shutdown: CancellationToken,
    ) -> (Jobs, tokio::task::JoinHandle<()>) {
        let (results, _) = watch::channel(0);
        let (live, _) = broadcast::channel(LIVE_BACKLOG);
        let jobs = Jobs {
            shared: Arc::new(Shared {
                db: parts.db,
                link: parts.link,
                signer: parts.signer,
                clock: parts.clock,
                events: parts.events,
                audit: parts.audit,
                fleet: parts.fleet,
                plugins: parts.plugins,
                results,
                live,
                active: Mutex::new(BTreeMap::new()),
            }),
        };
        if let Err(e) = jobs.restore().await {
            tracing::error!(error = %format!("{e:#}"), "could not resume unfinished jobs");
        }
        let me = jobs.clone();
        let ticker = tokio::spawn(async move {
            let mut every = tokio::time::interval(TICK);
            every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = every.tick() => me.tick().await,
                }
            }
        });
        (jobs, ticker)
    }

    fn db(&self) -> &Db {
        &self.shared.db
    }

    fn now(&self) -> u64 {
        self.shared.clock.now_ms()
    }

    fn active(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Active>> {
        self.shared.active.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Changes whenever targets reach final states.
    pub fn results_changed(&self) -> watch::Receiver<u64> {
        self.shared.results.subscribe()
    }

    fn results_moved(&self) {
        self.shared.results.send_modify(|n| *n += 1);
    }

    /// Jobs whose targets are not all final.
    pub fn active_count(&self) -> usize {
        self.active().len()
    }
}

impl Capability for Jobs {
    fn routes(&self) -> utoipa_axum::router::OpenApiRouter {
        routes::routes(self.clone())
    }

    fn consumers(&self) -> Vec<Arc<dyn Consumer>> {
        vec![self.consumer()]
    }
}

/// A new job id: a time-ordered prefix and a random suffix.
pub fn new_job_id(now_ms: u64) -> String {
    let mut b = [0u8; 6];
    let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b);
    format!("{now_ms:011x}-{}", hex::encode(b))
}

#[cfg(test)]
mod tests;
