//! What the server believes of what an agent says: only what the agent signed with the
//! key it enrolled, and nothing from a deregistered agent.

use drover_protocol::signed::{Signable, Signed};

use super::store;
use crate::store::Db;

/// A refused agent message: the agent event kind it is recorded under, and why.
#[derive(Debug, thiserror::Error)]
#[error("{why}")]
pub struct Refusal {
    /// `forged`, `deregistered`, `unenrolled`, ...
    pub kind: &'static str,
    /// For the operator.
    pub why: String,
}

/// A refusal of `kind`, as an error.
pub fn refusal(kind: &'static str, why: String) -> anyhow::Error {
    Refusal { kind, why }.into()
}

/// Parses a message `agent` signed, checking it against the key the agent enrolled.
pub async fn verify<T: Signable>(db: &Db, agent: &str, payload: &[u8]) -> anyhow::Result<T> {
    let key = match store::signing_key_of(db, agent).await? {
        Some((_, true)) => {
            return Err(refusal(
                "deregistered",
                format!("agent {agent} is deregistered"),
            ));
        }
        Some((key, false)) => key,
        None => {
            return Err(refusal(
                "unenrolled",
                format!("agent {agent} has not enrolled a key"),
            ));
        }
    };
    let signed: Signed<T> = serde_json::from_slice(payload)?;
    signed.verify(&[key]).map_err(|e| {
        refusal(
            "forged",
            format!("not signed by agent {agent}'s enrolled key: {e}"),
        )
    })
}
