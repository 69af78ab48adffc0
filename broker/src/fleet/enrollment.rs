//! Activations and enrollment, like Systems Manager's hybrid activations: an operator
//! mints a code with an expiry, a use count and default tags; an agent presents it with
//! the public keys it made on the device and gets its broker credential and trust roots.

use std::collections::BTreeMap;

use drover_protocol::enroll::{EnrollRequest, EnrollResponse};
use drover_protocol::keyset::KeySet;
use drover_protocol::signed::Signed;
use drover_protocol::topics::is_valid_agent_id;
use ring::digest::{SHA256, digest};
use ring::rand::{SecureRandom as _, SystemRandom};

use super::credentials::BrokerAuth;
use super::store::{self, AgentKeys};
use super::types::{Activation, ActivationCreated};
use crate::events::EventLog;
use crate::mqtt::auth::CONTROL_USER;
use crate::store::Db;

/// Why enrollment was refused; the message is for whoever enrolls.
#[derive(Debug, thiserror::Error)]
pub enum EnrollError {
    /// Unknown activation or wrong code (not told apart, so codes cannot be probed).
    #[error("unknown activation or wrong code")]
    BadCode,
    /// Revoked, expired, or used up.
    #[error("{0}")]
    Unusable(String),
    /// The request is wrong.
    #[error("{0}")]
    BadRequest(String),
    /// The agent id is taken.
    #[error("{0}")]
    Conflict(String),
    /// The server failed.
    #[error(transparent)]
    Internal(#[from] anyhow::Error),
}

fn random(n: usize) -> Vec<u8> {
    let mut b = vec![0u8; n];
    SystemRandom::new()
        .fill(&mut b)
        .expect("system random source failed");
    b
}

fn code_hash(salt: &[u8], code: &str) -> Vec<u8> {
    let mut m = salt.to_vec();
    m.extend_from_slice(code.as_bytes());
    digest(&SHA256, &m).as_ref().to_vec()
}

/// Mints an activation.
pub async fn create_activation(
    db: &Db,
    expires_ms: u64,
    max_uses: u32,
    tags: BTreeMap<String, String>,
    agent_id: Option<String>,
    now: u64,
) -> anyhow::Result<ActivationCreated> {
    anyhow::ensure!(max_uses > 0, "max uses must be at least 1");
    if let Some(id) = &agent_id {
        anyhow::ensure!(
            is_valid_agent_id(id) && id != CONTROL_USER,
            "agent id {id:?} is invalid or reserved"
        );
    }
    let activation = Activation {
        id: format!("act-{}", hex::encode(random(8))),
        agent_id,
        tags,
        max_uses,
        uses: 0,
        created_ms: now,
        expires_ms,
        revoked_ms: None,
    };
    let code = super::credentials::random_token(24);
    let salt = random(16);
    store::create_activation(db, &activation, &salt, &code_hash(&salt, &code)).await?;
    Ok(ActivationCreated { activation, code })
}

/// Enrolls an agent.
pub async fn enroll(
    db: &Db,
    events: &EventLog,
    keyset: &Signed<KeySet>,
    broker: &str,
    req: &EnrollRequest,
    now: u64,
) -> Result<EnrollResponse, EnrollError> {
    let (act, salt, hash) = store::activation(db, &req.activation_id)
        .await?
        .ok_or(EnrollError::BadCode)?;
    if code_hash(&salt, &req.code) != hash {
        return Err(EnrollError::BadCode);
    }
    if act.revoked_ms.is_some() {
        return Err(EnrollError::Unusable("activation was revoked".into()));
    }
    if now > act.expires_ms {
        return Err(EnrollError::Unusable("activation has expired".into()));
    }
    let agent_id = match (&act.agent_id, &req.agent_id) {
        (Some(bound), Some(asked)) if bound != asked => {
            return Err(EnrollError::BadRequest(format!(
                "this activation is for agent {bound:?}, not {asked:?}"
            )));
        }
        (Some(bound), _) => bound.clone(),
        (None, Some(asked)) => asked.clone(),
        (None, None) => {
            return Err(EnrollError::BadRequest(
                "an agent id is required (--id)".into(),
            ));
        }
    };
    if !is_valid_agent_id(&agent_id) || agent_id == CONTROL_USER {
        return Err(EnrollError::BadRequest(format!(
            "agent id {agent_id:?} is invalid or reserved"
        )));
    }
    if store::is_deregistered(db, &agent_id).await? {
        return Err(EnrollError::Conflict(format!(
            "agent {agent_id} was deregistered"
        )));
    }
    let sealing: [u8; 32] = hex::decode(&req.sealing_key)
        .ok()
        .and_then(|v| v.try_into().ok())
        .ok_or_else(|| EnrollError::BadRequest("sealing key must be 32 bytes of hex".into()))?;
    // An open activation is for new ids only: one the server knows in any way (added by
    // an operator and not enrolled yet, enrolled, or seen) is not its to give, and its
    // credential is never replaced. A bound activation was made for its id, which keeps
    // the credential minted beside it.
    let open = act.agent_id.is_none();
    let minted = if open || store::broker_user(db, &agent_id).await?.is_none() {
        Some(BrokerAuth::mint(&agent_id)?)
    } else {
        None
    };
    let keys = AgentKeys {
        agent_id: agent_id.clone(),
        signing_key: req.signing_key,
        sealing_key: hex::encode(sealing),
        activation_id: act.id.clone(),
    };
    let credential = minted.as_ref().map(|(_, c)| c);
    let done = store::enroll(db, events, &keys, &act.tags, open, credential, now).await?;
    let password = match done {
        store::Enrolled::Known => {
            return Err(EnrollError::Conflict(format!(
                "agent id {agent_id} is already known to the server: an open activation enrolls new ids only"
            )));
        }
        store::Enrolled::UsedUp => {
            return Err(EnrollError::Unusable("activation has no uses left".into()));
        }
        store::Enrolled::Done { event, credential } => {
            events.committed(event);
            minted.filter(|_| credential).map(|(password, _)| password)
        }
    };
    let ks = keyset.unverified().map_err(anyhow::Error::from)?;
    Ok(EnrollResponse {
        agent_id: agent_id.clone(),
        broker: broker.to_string(),
        username: agent_id,
        password,
        roots: ks.roots.clone(),
        root_threshold: ks.root_threshold,
        keyset: keyset.clone(),
        tags: act.tags,
    })
}
