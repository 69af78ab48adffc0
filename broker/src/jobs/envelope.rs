//! The one way a job becomes what an agent receives: secret parameters sealed to each
//! target's key, an envelope addressed to one agent, signed by the control-plane key.

use std::collections::BTreeMap;

use drover_protocol::job::{JobEnvelope, Limits, Parameter};
use drover_protocol::keys::SigningKey;
use drover_protocol::manifest::Manifest;
use drover_protocol::secret::{self, SealedBox};
use drover_protocol::signed::Signed;

/// What every envelope of one job shares.
#[derive(Debug, Clone, Copy)]
pub struct JobTerms<'a> {
    /// The job.
    pub job_id: &'a str,
    /// The plugin, as its publisher signed it.
    pub manifest: &'a Signed<Manifest>,
    /// The plugin's input.
    pub input: &'a serde_json::Value,
    /// Plain parameters.
    pub plain: &'a BTreeMap<String, String>,
    /// Limits for each run.
    pub limits: Limits,
    /// When the job expires, Unix ms.
    pub expires_ms: u64,
}

/// Seals each secret to one agent's X25519 key, bound to the job and the name.
pub fn seal(
    job_id: &str,
    secrets: &BTreeMap<String, String>,
    sealing_key: &[u8; 32],
) -> BTreeMap<String, SealedBox> {
    secrets
        .iter()
        .map(|(name, value)| {
            let aad = secret::parameter_aad(job_id, name);
            (
                name.clone(),
                secret::seal(sealing_key, &aad, value.as_bytes()),
            )
        })
        .collect()
}

/// Reads a sealing key as the store keeps it (hex).
pub fn sealing_key(hex_key: &str) -> Option<[u8; 32]> {
    hex::decode(hex_key).ok()?.try_into().ok()
}

/// The envelope of `terms` for `agent`, with its sealed secrets, valid from `now_ms`.
pub fn build(
    terms: &JobTerms<'_>,
    agent: &str,
    attempt: u32,
    sealed: Option<&BTreeMap<String, SealedBox>>,
    now_ms: u64,
) -> JobEnvelope {
    let mut parameters: BTreeMap<String, Parameter> = terms
        .plain
        .iter()
        .map(|(k, v)| (k.clone(), Parameter::Plain { value: v.clone() }))
        .collect();
    for (k, v) in sealed.into_iter().flatten() {
        parameters.insert(k.clone(), Parameter::Secret { sealed: v.clone() });
    }
    JobEnvelope {
        job_id: terms.job_id.to_string(),
        agent_id: agent.to_string(),
        attempt,
        plugin: terms.manifest.clone(),
        input: terms.input.clone(),
        parameters,
        limits: terms.limits,
        not_before_ms: now_ms,
        expires_at_ms: terms.expires_ms,
        resent: false,
    }
}

/// An envelope, signed, as sent.
pub fn sign(env: &JobEnvelope, signer: &SigningKey) -> serde_json::Result<Vec<u8>> {
    serde_json::to_vec(&Signed::sign(env, signer))
}

/// A kept envelope (as [`sign`] made it) marked as a copy sent again, and signed again.
pub fn resent_copy(body: &[u8], signer: &SigningKey) -> anyhow::Result<Vec<u8>> {
    let signed: Signed<JobEnvelope> = serde_json::from_slice(body)?;
    let mut env = signed.unverified()?;
    env.resent = true;
    Ok(sign(&env, signer)?)
}
