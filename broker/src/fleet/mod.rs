//! The fleet: which agents exist, who they are, whether they are online, how they
//! enroll, and how they are cut off.
//!
//! - [`presence`]: hello, status and heartbeats from agents.
//! - [`identity`]: checking what agents sign against the keys they enrolled.
//! - [`enrollment`]: activation codes, and agents enrolling with them.
//! - [`credentials`]: broker logins, checked by the embedded broker.
//! - [`targets`]: which agents a job's targets name.
//! - [`lifecycle`]: the events the fleet appends to the log (enrolled, online, offline,
//!   deregistered).
//! - [`agent_events`]: how much of what agents send is recorded in their event log.
//! - [`store`], [`types`], [`routes`], [`cli`]: its tables, API types, routes and CLI
//!   groups (`drover agents`, `drover activation`).

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use drover_protocol::signed::Signable;
use drover_protocol::topics::Up;

use crate::audit::Audit;
use crate::capability::Capability;
use crate::clock::Clock;
use crate::events::EventLog;
use crate::mqtt::broker::BrokerAccess;
use crate::rate::Take;
use crate::store::Db;
use crate::trust::Trust;

pub mod agent_events;
pub mod cli;
pub mod credentials;
pub mod enrollment;
pub mod identity;
pub mod lifecycle;
pub mod presence;
pub mod routes;
pub mod store;
pub mod targets;
pub mod types;

#[cfg(test)]
mod tests;

pub use lifecycle::Lifecycle;
pub use types::Agent;

/// How long deregistering waits for what must follow it (its targets settled).
const SETTLE_WAIT: Duration = Duration::from_secs(10);

struct Shared {
    db: Db,
    events: EventLog,
    audit: Audit,
    trust: Trust,
    clock: Clock,
    /// The embedded broker, to drop deregistered agents; None with an external broker.
    broker: Option<BrokerAccess>,
    /// The broker URL enrolling agents are told to dial.
    broker_url: String,
    /// The per-agent event log's allowances.
    intake: agent_events::Intake,
}

/// The fleet's handle; clones share it.
#[derive(Clone)]
pub struct Fleet {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Fleet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Fleet")
    }
}

/// What the fleet is made of.
#[derive(Debug, Clone)]
pub struct FleetParts {
    /// The database.
    pub db: Db,
    /// Where lifecycle events go.
    pub events: EventLog,
    /// The audit log.
    pub audit: Audit,
    /// The key set agents hold.
    pub trust: Trust,
    /// The time.
    pub clock: Clock,
    /// The embedded broker, if the server runs one.
    pub broker: Option<BrokerAccess>,
    /// The broker URL enrolling agents are told to dial.
    pub broker_url: String,
}

impl Capability for Fleet {
    fn routes(&self) -> utoipa_axum::router::OpenApiRouter {
        routes::routes(self.clone())
    }

    fn public_routes(&self) -> Option<utoipa_axum::router::OpenApiRouter> {
        Some(routes::public_routes(self.clone()))
    }
}

impl Fleet {
    /// The fleet.
    pub fn new(p: FleetParts) -> Fleet {
        Fleet {
            shared: Arc::new(Shared {
                db: p.db,
                events: p.events,
                audit: p.audit,
                trust: p.trust,
                clock: p.clock,
                broker: p.broker,
                broker_url: p.broker_url,
                intake: agent_events::Intake::default(),
            }),
        }
    }

    fn db(&self) -> &Db {
        &self.shared.db
    }

    fn now(&self) -> u64 {
        self.shared.clock.now_ms()
    }

    /// The audit log.
    pub fn audit(&self) -> &Audit {
        &self.shared.audit
    }

    /// The key set agents hold.
    pub fn trust(&self) -> &Trust {
        &self.shared.trust
    }

    /// All agents, by id.
    pub async fn agents(&self) -> anyhow::Result<Vec<Agent>> {
        store::agents(self.db()).await
    }

    /// The sealing keys of `agents`, by agent; agents that have not enrolled one are
    /// left out.
    pub async fn sealing_keys(
        &self,
        agents: &[String],
    ) -> anyhow::Result<std::collections::HashMap<String, String>> {
        store::sealing_keys(self.db(), agents).await
    }

    /// Parses a message `agent` signed, checked against the key it enrolled.
    pub async fn verify<T: Signable>(&self, agent: &str, payload: &[u8]) -> anyhow::Result<T> {
        identity::verify(self.db(), agent, payload).await
    }

    /// Notes that an agent was heard from.
    pub async fn touch(&self, agent: &str) -> anyhow::Result<()> {
        store::touch(self.db(), agent, self.now()).await
    }

    /// Records something an agent reported outside any job (`drover agents events`),
    /// within the agent's allowance (see [`agent_events`]).
    pub async fn record(&self, agent: &str, kind: &str, message: &str) {
        let now = self.now();
        match self.shared.intake.admit(agent, now) {
            Take::Granted {
                refused_before: suppressed,
            } => {
                if suppressed > 0 {
                    let note = format!(
                        "{suppressed} events were not recorded before this one: more than {} at once, then more than one a second",
                        agent_events::BURST
                    );
                    self.write_event(agent, "dropped", &note, now).await;
                }
                self.write_event(agent, kind, message, now).await;
            }
            Take::Refused { first: true } => {
                let total = self.shared.intake.stats.suppressed.load(Ordering::Relaxed);
                tracing::warn!(agent.id = %agent, suppressed_total = total, "agent events over the rate: counted, not recorded");
                let note = format!(
                    "more than {} events at once: from now on they are counted, not recorded, until they come at most one a second",
                    agent_events::BURST
                );
                self.write_event(agent, "dropped", &note, now).await;
            }
            Take::Refused { first: false } => {}
        }
    }

    async fn write_event(&self, agent: &str, kind: &str, message: &str, now: u64) {
        match store::add_agent_event(self.db(), agent, kind, message, now).await {
            Ok(0) => {}
            Ok(n) => {
                let stats = &self.shared.intake.stats;
                let total = stats.deleted.fetch_add(n, Ordering::Relaxed) + n;
                tracing::info!(agent.id = %agent, deleted = n, deleted_total = total, "older agent events deleted");
            }
            Err(e) => {
                tracing::error!(agent.id = %agent, error = %format!("{e:#}"), "could not record an agent event")
            }
        }
    }

    /// Logs and records a message from `agent` that was not taken, under the kind its
    /// [`identity::Refusal`] gives, or `bad-message`.
    pub async fn refused(&self, agent: &str, kind: Up, e: &anyhow::Error) {
        let event = e
            .downcast_ref::<identity::Refusal>()
            .map_or("bad-message", |r| r.kind);
        tracing::warn!(agent.id = %agent, kind = kind.as_str(), event, error = %format!("{e:#}"), "agent message refused");
        self.record(
            agent,
            event,
            &format!("{} message refused: {e:#}", kind.as_str()),
        )
        .await;
    }

    /// Deregisters agent `id`: deletes its broker credential, drops its connection to
    /// the embedded broker, and waits (a bounded time) until every capability has
    /// handled the `deregistered` event, so that its open targets are settled when this
    /// returns. None if the server knows no such agent.
    pub async fn deregister(&self, id: &str) -> anyhow::Result<Option<types::Deregistered>> {
        // The credential first, so the agent cannot log in again once dropped.
        let Some(event) = store::deregister(self.db(), &self.shared.events, id, self.now()).await?
        else {
            return Ok(None);
        };
        self.shared.events.committed(event);
        let disconnected = match &self.shared.broker {
            Some(broker) => broker.revoke_agent(id).await,
            None => false,
        };
        tracing::info!(agent.id = %id, disconnected, "agent deregistered");
        if !self.shared.events.wait_handled(event, SETTLE_WAIT).await {
            tracing::warn!(agent.id = %id, "not every capability has handled the deregistration yet");
        }
        Ok(Some(types::Deregistered {
            id: id.to_string(),
            embedded_broker: self.shared.broker.is_some(),
            disconnected,
        }))
    }

    /// Changes agent `id`'s tags (removes, then sets); returns the agent as it is then,
    /// or None if the server knows no agent by that id.
    pub async fn retag(
        &self,
        id: &str,
        change: &types::TagChange,
    ) -> anyhow::Result<Option<Agent>> {
        if store::retag(self.db(), id, &change.set, &change.remove)
            .await?
            .is_none()
        {
            return Ok(None);
        }
        tracing::info!(agent.id = %id, "agent tags changed");
        store::agent(self.db(), id).await
    }

    /// Mints (replacing) agent `id`'s broker credential; returns it.
    pub async fn create_credentials(&self, id: &str) -> anyhow::Result<types::Credentials> {
        let password = credentials::BrokerAuth::create_agent(self.db(), id, self.now()).await?;
        tracing::info!(agent.id = %id, "agent broker credential created");
        Ok(types::Credentials {
            username: id.to_string(),
            password,
        })
    }

    /// Adopts the next key set and sends it to every known agent; agents that are
    /// offline get it when they next say hello.
    pub async fn rotate_keyset(
        &self,
        next: drover_protocol::signed::Signed<drover_protocol::keyset::KeySet>,
    ) -> Result<types::KeysetRotated, crate::trust::AdoptError> {
        let ks = self.shared.trust.adopt(next)?;
        let agents = self
            .agents()
            .await
            .map_err(crate::trust::AdoptError::Internal)?;
        for a in &agents {
            self.shared.trust.send_to(&a.id).await;
        }
        tracing::info!(
            version = ks.version,
            agents = agents.len(),
            "key set rotated"
        );
        Ok(types::KeysetRotated {
            version: ks.version,
            sent_to: agents.len(),
        })
    }

    /// Mints an activation.
    pub async fn create_activation(
        &self,
        req: types::ActivationRequest,
    ) -> anyhow::Result<types::ActivationCreated> {
        let now = self.now();
        enrollment::create_activation(
            self.db(),
            now + req.expires_secs.saturating_mul(1000),
            req.max_uses,
            req.tags,
            req.agent_id,
            now,
        )
        .await
    }

    /// All activations, newest first.
    pub async fn activations(&self) -> anyhow::Result<Vec<types::Activation>> {
        store::activations(self.db()).await
    }

    /// Revokes an activation; false if there is no active one by that id.
    pub async fn revoke_activation(&self, id: &str) -> anyhow::Result<bool> {
        store::revoke_activation(self.db(), id, self.now()).await
    }

    /// Enrolls an agent with an activation code.
    pub async fn enroll(
        &self,
        req: &drover_protocol::enroll::EnrollRequest,
    ) -> Result<drover_protocol::enroll::EnrollResponse, enrollment::EnrollError> {
        enrollment::enroll(
            self.db(),
            &self.shared.events,
            &self.shared.trust.keyset(),
            &self.shared.broker_url,
            req,
            self.now(),
        )
        .await
    }

    /// Agent events, newest last; optionally for one agent.
    pub async fn agent_events(
        &self,
        agent: Option<&str>,
        limit: u32,
    ) -> anyhow::Result<Vec<types::AgentEvent>> {
        store::agent_events(self.db(), agent, limit).await
    }
}
