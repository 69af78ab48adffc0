//! Submitting a job: the request checked, the job stored with its targets and rollout in
//! one transaction, and its first envelopes sent.

use std::collections::HashMap;

use drover_protocol::job::Limits;
use tracing::Instrument as _;

use super::envelope;
use super::rollout::{Amount, Ramp, RatePolicy, Rollout};
use super::types::{DEFAULT_DELIVERY_SECS, Job, JobCreated, JobRequest, RolloutInfo, RolloutSpec};
use super::{Active, Jobs, new_job_id, store};
use crate::fleet::targets::{self, TargetError};

/// Why a job was not created. The message is for the operator.
#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    /// The request is wrong.
    #[error("{0}")]
    BadRequest(String),
    /// No such plugin, or version of it.
    #[error("{0}")]
    NoSuchPlugin(String),
    /// The targets name no agent, or one that cannot be a target.
    #[error(transparent)]
    Targets(#[from] TargetError),
    /// The server failed.
    #[error(transparent)]
    Internal(#[from] anyhow::Error),
}

/// Limits as the request asks for them, defaults for the rest.
fn limits_of(req: &JobRequest) -> Limits {
    let defaults = Limits::default();
    Limits {
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
    }
}

/// The rate policy a request asks for; every target at once without one.
fn policy_of(req: &JobRequest, delivery_ms: u64, run_ms: u64) -> Result<RatePolicy, SubmitError> {
    let rate = req.rate.clone().unwrap_or_default();
    let amount = |s: &Option<String>| {
        s.as_deref()
            .map(Amount::parse)
            .transpose()
            .map_err(SubmitError::BadRequest)
    };
    let policy = RatePolicy {
        max_concurrency: amount(&rate.max_concurrency)?,
        max_errors: amount(&rate.max_errors)?,
        ramp: rate
            .ramp
            .as_deref()
            .map(Ramp::parse)
            .transpose()
            .map_err(SubmitError::BadRequest)?
            .unwrap_or_default(),
        delivery_timeout_ms: delivery_ms,
        run_timeout_ms: run_ms,
        // Without rate control nothing waits: the broker queues what offline agents
        // will find when they connect, and the store keeps it for them too.
        send_to_offline: req.rate.is_none(),
    };
    if matches!(
        policy.max_concurrency,
        Some(Amount::Count(0) | Amount::Percent(0))
    ) {
        return Err(SubmitError::BadRequest(
            "max-concurrency must be at least 1".into(),
        ));
    }
    Ok(policy)
}

impl Jobs {
    /// Stores a job and starts it: each target gets its signed envelope as its rollout
    /// allows (at once, without rate control), online agents first.
    pub async fn submit(&self, req: JobRequest) -> Result<JobCreated, SubmitError> {
        let plugin = self
            .shared
            .plugins
            .get(&req.plugin, req.version)
            .await?
            .ok_or_else(|| {
                SubmitError::NoSuchPlugin(match req.version {
                    Some(v) => format!("no plugin {} version {v}", req.plugin),
                    None => format!("no plugin named {}", req.plugin),
                })
            })?;
        let fleet = &self.shared.fleet;
        let known = fleet.agents().await?;
        let agents = targets::resolve(&req.targets, &known)?;
        let limits = limits_of(&req);
        if limits.timeout_ms == 0 {
            return Err(SubmitError::BadRequest("timeout must be positive".into()));
        }
        for name in req.secrets.keys() {
            if req.parameters.contains_key(name) {
                return Err(SubmitError::BadRequest(format!(
                    "parameter {name:?} is given both plain and secret"
                )));
            }
        }
        let now = self.now();
        let delivery = req.delivery_secs.unwrap_or(DEFAULT_DELIVERY_SECS).max(1);
        let policy = policy_of(&req, delivery * 1000, limits.timeout_ms)?;
        let job = Job {
            id: new_job_id(now),
            plugin: plugin.name.clone(),
            version: plugin.version,
            world: plugin.world.clone(),
            targets: req.targets.clone(),
            input: req.input.clone(),
            created_ms: now,
            expires_ms: now + delivery * 1000,
        };
        // Every target needs an enrolled sealing key before anything is stored or sent;
        // what is stored of a secret is sealed to its agent.
        let mut sealed = HashMap::new();
        if !req.secrets.is_empty() {
            let keys = fleet.sealing_keys(&agents).await?;
            for agent in &agents {
                let hex_key = keys.get(agent).ok_or_else(|| {
                    SubmitError::BadRequest(format!(
                        "agent {agent} has not enrolled a key, so secrets cannot be sealed to it"
                    ))
                })?;
                let key = envelope::sealing_key(hex_key)
                    .ok_or_else(|| anyhow::anyhow!("agent {agent}'s sealing key is malformed"))?;
                sealed.insert(agent.clone(), envelope::seal(&job.id, &req.secrets, &key));
            }
        }
        let info = RolloutInfo {
            job_id: job.id.clone(),
            spec: RolloutSpec {
                policy,
                limits,
                parameters: req.parameters.clone(),
                secret_names: req.secrets.keys().cloned().collect(),
                rate_controlled: req.rate.is_some(),
            },
            created_ms: now,
            cancelled_ms: None,
            done_ms: None,
        };
        // The job, its targets and its rollout go in together, or not at all.
        store::create(self.db(), &job, &agents, &sealed, &info).await?;
        let online: HashMap<String, bool> = known
            .into_iter()
            .map(|a| (a.id, a.online && a.deregistered_ms.is_none()))
            .collect();
        let mut rollout = Rollout::new(policy, now, &agents, |a| {
            online.get(a).copied().unwrap_or(false)
        });
        let actions = rollout.start(now);
        self.active().insert(
            job.id.clone(),
            Active {
                rollout,
                manifest: plugin.manifest.clone(),
                input: job.input.clone(),
                limits,
                expires_ms: job.expires_ms,
                plain: req.parameters.clone(),
                has_secrets: !req.secrets.is_empty(),
            },
        );
        let span = tracing::info_span!("job", job.id = %job.id, plugin = %plugin.name);
        async {
            tracing::info!(
                version = plugin.version,
                targets = agents.len(),
                max_concurrency = ?policy.max_concurrency,
                max_errors = ?policy.max_errors,
                "job created"
            );
            self.apply(&job.id, actions).await;
        }
        .instrument(span)
        .await;
        Ok(JobCreated {
            job_id: job.id,
            version: plugin.version,
            agents,
        })
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    fn req(rate: Option<super::super::types::RateRequest>) -> JobRequest {
        JobRequest {
            plugin: "p".into(),
            version: None,
            targets: "all".into(),
            input: serde_json::Value::Null,
            timeout_secs: Some(5),
            memory_mib: None,
            output_kib: Some(2),
            delivery_secs: None,
            parameters: BTreeMap::new(),
            secrets: BTreeMap::new(),
            rate,
        }
    }

    #[test]
    fn a_plain_job_is_every_target_at_once_and_rate_control_is_checked() {
        let plain = policy_of(&req(None), 1000, 5000).unwrap();
        assert_eq!(plain.max_concurrency, None);
        assert_eq!(plain.max_errors, None);
        assert_eq!(plain.ramp, Ramp::None);
        assert!(plain.send_to_offline);
        let l = limits_of(&req(None));
        assert_eq!((l.timeout_ms, l.output_bytes), (5000, 2048));
        let zero = super::super::types::RateRequest {
            max_concurrency: Some("0%".into()),
            ..Default::default()
        };
        assert!(matches!(
            policy_of(&req(Some(zero)), 1000, 5000),
            Err(SubmitError::BadRequest(_))
        ));
        let bad = super::super::types::RateRequest {
            ramp: Some("sideways".into()),
            ..Default::default()
        };
        assert!(policy_of(&req(Some(bad)), 1000, 5000).is_err());
    }
}
