//! The control plane: turns requests into signed job envelopes, serves plugin chunks, and
//! records what agents report.
//!
//! It is an ordinary MQTT client of whatever broker it is given, embedded or external, so
//! nothing here assumes the embedded broker.

use std::sync::Arc;

use drover_protocol::agent::{Hello, Presence};
use drover_protocol::chunk::{self, ChunkHeader, FetchRequest};
use drover_protocol::enroll::Heartbeat;
use drover_protocol::job::{JobEnvelope, JobResult, Limits, Parameter, ResultAck};
use drover_protocol::keys::SigningKey;
use drover_protocol::keyset::KeySet;
use drover_protocol::link::{Incoming, LinkHandle};
use drover_protocol::now_ms;
use drover_protocol::signed::{Signable, Signed};
use drover_protocol::topics::{self, Down, Up};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, watch};

use crate::store::{JobRow, Recorded, Store};

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
}

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
        let cp = ControlPlane {
            shared: Arc::new(Shared {
                store,
                link,
                signer,
                keyset: std::sync::RwLock::new(keyset),
                results,
            }),
        };
        let task = tokio::spawn(cp.clone().handle_incoming(incoming));
        (cp, task)
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
        store.create_job(&job, &agents)?;
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
            };
            let signed = Signed::sign(&env, &self.shared.signer);
            let body = serde_json::to_vec(&signed).map_err(anyhow::Error::from)?;
            self.shared
                .link
                .publish(topics::down(agent, Down::Job), body, false)
                .await
                .map_err(anyhow::Error::from)?;
            store.mark_sent(&job.id, agent, now_ms())?;
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
        while let Some(msg) = incoming.recv().await {
            let Some((agent, kind)) = topics::parse_up(&msg.topic) else {
                tracing::warn!(topic = %msg.topic, "ignoring message on unexpected topic");
                continue;
            };
            let agent = agent.to_string();
            if let Err(e) = self.handle(&agent, kind, &msg.payload).await {
                let event = e.downcast_ref::<Refusal>().map_or("bad-message", |r| r.0);
                tracing::warn!(agent.id = %agent, kind = kind.as_str(), event, error = %format!("{e:#}"), "agent message refused");
                let _ = self.shared.store.add_event(
                    &agent,
                    event,
                    &format!("{} message refused: {e:#}", kind.as_str()),
                    now_ms(),
                );
            }
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
                    self.send_keyset(agent).await;
                }
                tracing::info!(agent.id = %agent, hostname = %hello.hostname, version = %hello.agent_version, "agent announced");
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
                let result: JobResult = self.verify_from(agent, payload)?;
                store.touch(agent, now)?;
                anyhow::ensure!(
                    result.agent_id == agent,
                    "result on agent {agent}'s topic claims to be from {:?}",
                    result.agent_id
                );
                match store.record_result(&result, now)? {
                    Recorded::Stored => {
                        tracing::info!(agent.id = %agent, job.id = %result.job_id, status = result.status.as_str(), "result stored");
                        let detail = match &result.failure {
                            Some(f) => format!(
                                "{} v{}: {:?}: {}",
                                result.plugin, result.plugin_version, f.kind, f.message
                            ),
                            None => format!("{} v{}", result.plugin, result.plugin_version),
                        };
                        store.audit(
                            &format!("agent:{agent}"),
                            "job.execute",
                            &result.job_id,
                            result.status.as_str(),
                            &detail,
                            now,
                        )?;
                        self.shared.results.send_modify(|n| *n += 1);
                        self.ack(agent, &result).await;
                    }
                    Recorded::Duplicate => {
                        tracing::debug!(agent.id = %agent, job.id = %result.job_id, "duplicate result ignored");
                        self.ack(agent, &result).await;
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
                        store.add_event(agent, "unmatched-result", &msg, now)?;
                    }
                }
            }
            Up::Progress => {
                let _p: drover_protocol::job::Progress = self.verify_from(agent, payload)?;
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
        let store = &self.shared.store;
        if store.is_deregistered(agent)? {
            return Err(refusal(
                "deregistered",
                format!("agent {agent} is deregistered"),
            ));
        }
        let Some(keys) = store.agent_keys(agent)? else {
            return Err(refusal(
                "unenrolled",
                format!("agent {agent} has not enrolled a key"),
            ));
        };
        let signed: Signed<T> = serde_json::from_slice(payload)?;
        signed.verify(&[keys.signing_key]).map_err(|e| {
            refusal(
                "forged",
                format!("not signed by agent {agent}'s enrolled key: {e}"),
            )
        })
    }

    async fn ack(&self, agent: &str, r: &JobResult) {
        let ack = ResultAck {
            job_id: r.job_id.clone(),
            attempt: r.attempt,
        };
        let body = serde_json::to_vec(&ack).expect("acks serialise");
        if let Err(e) = self
            .shared
            .link
            .publish(topics::down(agent, Down::Ack), body, false)
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
