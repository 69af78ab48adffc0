//! Which keys an agent trusts, and how that changes.
//!
//! An agent is anchored by **root keys** (given at enrollment). The roots sign a
//! [`KeySet`]: the publisher keys that sign plugin manifests (with a k-of-n threshold),
//! the control-plane keys that sign job envelopes, and the next set of roots. A new key
//! set is accepted only with a higher version and signatures from `root_threshold`
//! distinct keys of the **current** roots, so rotation is signed by the old root and a
//! stolen publisher key cannot rotate itself in.

use serde::{Deserialize, Serialize};

use crate::keys::PublicKey;
use crate::signed::{Signable, SignatureError, Signed};

/// The trusted keys, as signed by the roots.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct KeySet {
    /// Strictly increasing.
    pub version: u64,
    /// The roots that may sign the next key set.
    pub roots: Vec<PublicKey>,
    /// How many distinct roots must sign the next key set.
    pub root_threshold: u32,
    /// Keys that sign plugin manifests.
    pub publishers: Vec<PublicKey>,
    /// How many distinct publishers must sign a manifest.
    pub publisher_threshold: u32,
    /// Keys that sign job envelopes.
    pub control_plane: Vec<PublicKey>,
    /// When it was signed, Unix seconds.
    pub issued_at: u64,
}

impl Signable for KeySet {
    const CONTEXT: &'static str = "keyset-v1";
}

/// Why a key set was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum KeySetError {
    /// Not signed by enough current roots.
    #[error("key set not signed by enough current root keys: {0}")]
    Signature(SignatureError),
    /// Not newer than the current one.
    #[error("key set version {offered} is not newer than the current version {current}")]
    NotNewer {
        /// The offered version.
        offered: u64,
        /// The current version.
        current: u64,
    },
    /// Thresholds that can never be met, or no keys.
    #[error("key set is unusable: {0}")]
    Invalid(String),
}

impl KeySet {
    /// Checks thresholds against key counts.
    pub fn validate(&self) -> Result<(), KeySetError> {
        let distinct = |v: &[PublicKey]| {
            let mut d = v.to_vec();
            d.sort();
            d.dedup();
            d.len()
        };
        if self.roots.is_empty() || self.publishers.is_empty() || self.control_plane.is_empty() {
            return Err(KeySetError::Invalid(
                "roots, publishers and control_plane must each have a key".into(),
            ));
        }
        if self.root_threshold == 0 || self.root_threshold as usize > distinct(&self.roots) {
            return Err(KeySetError::Invalid(format!(
                "root threshold {} with {} distinct roots",
                self.root_threshold,
                distinct(&self.roots)
            )));
        }
        if self.publisher_threshold == 0
            || self.publisher_threshold as usize > distinct(&self.publishers)
        {
            return Err(KeySetError::Invalid(format!(
                "publisher threshold {} with {} distinct publishers",
                self.publisher_threshold,
                distinct(&self.publishers)
            )));
        }
        Ok(())
    }

    /// Verifies a first key set against the roots an agent was enrolled with.
    pub fn verify_initial(
        signed: &Signed<KeySet>,
        roots: &[PublicKey],
        root_threshold: u32,
    ) -> Result<KeySet, KeySetError> {
        let ks = signed
            .verify_threshold(roots, root_threshold as usize)
            .map_err(KeySetError::Signature)?;
        ks.validate()?;
        Ok(ks)
    }

    /// Verifies a proposed successor of `self`: newer, and signed by enough of *our* roots.
    pub fn verify_successor(&self, signed: &Signed<KeySet>) -> Result<KeySet, KeySetError> {
        let next = signed
            .verify_threshold(&self.roots, self.root_threshold as usize)
            .map_err(KeySetError::Signature)?;
        if next.version <= self.version {
            return Err(KeySetError::NotNewer {
                offered: next.version,
                current: self.version,
            });
        }
        next.validate()?;
        Ok(next)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::SigningKey;

    fn set(version: u64, roots: &[&SigningKey], threshold: u32) -> KeySet {
        KeySet {
            version,
            roots: roots.iter().map(|k| k.public()).collect(),
            root_threshold: threshold,
            publishers: vec![SigningKey::generate().public()],
            publisher_threshold: 1,
            control_plane: vec![SigningKey::generate().public()],
            issued_at: 0,
        }
    }

    #[test]
    fn rotation_needs_the_old_roots_and_a_higher_version() {
        let (r1, r2, r3) = (
            SigningKey::generate(),
            SigningKey::generate(),
            SigningKey::generate(),
        );
        let v1 = set(1, &[&r1, &r2], 2);
        let signed_v1 = {
            let mut s = Signed::sign(&v1, &r1);
            s.add_signature(&r2);
            s
        };
        let current = KeySet::verify_initial(&signed_v1, &[r1.public(), r2.public()], 2).unwrap();

        // 2-of-2 old roots sign v2, which moves to a new root r3.
        let v2 = set(2, &[&r3], 1);
        let mut s = Signed::sign(&v2, &r1);
        assert!(matches!(
            current.verify_successor(&s),
            Err(KeySetError::Signature(SignatureError::Threshold {
                have: 1,
                need: 2
            }))
        ));
        // The same root twice is still one root.
        s.signatures.push(s.signatures[0].clone());
        assert!(current.verify_successor(&s).is_err());
        s.add_signature(&r2);
        assert_eq!(current.verify_successor(&s).unwrap(), v2);

        // The new root alone cannot sign for the old set, and versions never go back.
        let rogue = Signed::sign(&set(3, &[&r3], 1), &r3);
        assert!(current.verify_successor(&rogue).is_err());
        let mut old = Signed::sign(&v1, &r1);
        old.add_signature(&r2);
        assert!(matches!(
            current.verify_successor(&old),
            Err(KeySetError::NotNewer { .. })
        ));
    }

    #[test]
    fn impossible_thresholds_are_refused() {
        let r = SigningKey::generate();
        assert!(set(1, &[&r], 2).validate().is_err());
        assert!(set(1, &[&r, &r], 2).validate().is_err());
        assert!(set(1, &[&r], 1).validate().is_ok());
    }
}
