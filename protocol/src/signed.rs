//! Signed documents and their one canonical encoding.
//!
//! A signed document carries the exact bytes that were signed (`payload`, JSON text) next
//! to the signature. Verifiers check the signature over those bytes and only then parse
//! them, so there is no re-serialisation and no canonical-JSON question: the canonical
//! encoding of a signed value is the payload as sent. The signed message is
//! `"drover:" + Kind::CONTEXT + "\0" + payload`, so a signature made for one kind of
//! document (a manifest) can never be passed off as another (a job envelope).

use std::collections::{HashSet, VecDeque};
use std::marker::PhantomData;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use base64::Engine as _;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::keys::{PublicKey, SigningKey};

/// A kind of document that can be signed.
pub trait Signable: Serialize + DeserializeOwned {
    /// Domain separation: distinct for every kind.
    const CONTEXT: &'static str;
}

/// Why a signed document was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SignatureError {
    /// There is no signature at all.
    #[error("the document is not signed")]
    Unsigned,
    /// No signing key is one the verifier trusts.
    #[error("signed by an untrusted key {0}")]
    UnknownKey(String),
    /// A trusted key's signature does not match the payload.
    #[error("bad signature: the document was altered or not signed by {0}")]
    BadSignature(String),
    /// Valid signatures from too few distinct trusted keys.
    #[error("signed by {have} distinct trusted key(s), {need} needed")]
    Threshold {
        /// Distinct trusted keys with valid signatures.
        have: usize,
        /// How many are needed.
        need: usize,
    },
    /// A signature is not valid base64.
    #[error("malformed signature encoding")]
    Malformed,
    /// The payload verified but is not a valid document of this kind.
    #[error("signed payload is not a valid document: {0}")]
    Payload(String),
}

/// One signature over a document.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Signature {
    /// The key that signed.
    pub key: PublicKey,
    /// The Ed25519 signature, base64.
    pub signature: String,
}

/// A document of kind `T` with its signatures.
#[derive(Serialize, Deserialize)]
#[serde(bound = "")]
pub struct Signed<T: Signable> {
    /// The signed bytes: the document as JSON text.
    pub payload: String,
    /// One or more signatures over `payload`.
    pub signatures: Vec<Signature>,
    #[serde(skip)]
    _kind: PhantomData<fn() -> T>,
}

impl<T: Signable> Clone for Signed<T> {
    fn clone(&self) -> Self {
        Signed {
            payload: self.payload.clone(),
            signatures: self.signatures.clone(),
            _kind: PhantomData,
        }
    }
}

impl<T: Signable> std::fmt::Debug for Signed<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Signed")
            .field("kind", &T::CONTEXT)
            .field(
                "keys",
                &self.signatures.iter().map(|s| s.key).collect::<Vec<_>>(),
            )
            .field("payload_len", &self.payload.len())
            .finish()
    }
}

fn message(context: &str, payload: &[u8]) -> Vec<u8> {
    let mut m = Vec::with_capacity(8 + context.len() + payload.len());
    m.extend_from_slice(b"drover:");
    m.extend_from_slice(context.as_bytes());
    m.push(0);
    m.extend_from_slice(payload);
    m
}

impl<T: Signable> Signed<T> {
    /// Serialises and signs `value`.
    pub fn sign(value: &T, key: &SigningKey) -> Signed<T> {
        let payload = serde_json::to_string(value).expect("signable types serialise");
        let mut s = Signed {
            payload,
            signatures: Vec::new(),
            _kind: PhantomData,
        };
        s.add_signature(key);
        s
    }

    /// Adds `key`'s signature (a co-signature) over the same payload.
    pub fn add_signature(&mut self, key: &SigningKey) {
        let sig = key.sign(&message(T::CONTEXT, self.payload.as_bytes()));
        self.signatures.push(Signature {
            key: key.public(),
            signature: base64::engine::general_purpose::STANDARD.encode(sig),
        });
    }

    /// Checks for one valid signature by a trusted key, then parses the payload.
    pub fn verify(&self, trusted: &[PublicKey]) -> Result<T, SignatureError> {
        self.verify_threshold(trusted, 1)
    }

    /// Checks for valid signatures by at least `threshold` *distinct* trusted keys, then
    /// parses the payload. The same key signing twice counts once.
    pub fn verify_threshold(
        &self,
        trusted: &[PublicKey],
        threshold: usize,
    ) -> Result<T, SignatureError> {
        self.verify_threshold_with(trusted, threshold, None)
    }

    /// As [`verify_threshold`](Self::verify_threshold), remembering in `memo` the
    /// signatures that checked out, so the same signed document is checked once: for
    /// documents that come again and again, such as a plugin's manifest in every job.
    pub fn verify_threshold_memo(
        &self,
        trusted: &[PublicKey],
        threshold: usize,
        memo: &SignatureMemo,
    ) -> Result<T, SignatureError> {
        self.verify_threshold_with(trusted, threshold, Some(memo))
    }

    fn verify_threshold_with(
        &self,
        trusted: &[PublicKey],
        threshold: usize,
        memo: Option<&SignatureMemo>,
    ) -> Result<T, SignatureError> {
        if self.signatures.is_empty() {
            return Err(SignatureError::Unsigned);
        }
        let msg = message(T::CONTEXT, self.payload.as_bytes());
        let mut good: Vec<PublicKey> = Vec::new();
        let mut bad: Option<PublicKey> = None;
        let mut malformed = false;
        for s in &self.signatures {
            if !trusted.contains(&s.key) || good.contains(&s.key) {
                continue;
            }
            match base64::engine::general_purpose::STANDARD.decode(&s.signature) {
                Ok(sig)
                    if memo.map_or_else(
                        || s.key.verify(&msg, &sig),
                        |m| m.verify(&s.key, &msg, &sig),
                    ) =>
                {
                    good.push(s.key)
                }
                Ok(_) => bad = bad.or(Some(s.key)),
                Err(_) => malformed = true,
            }
        }
        let need = threshold.max(1);
        if good.len() >= need {
            return serde_json::from_str(&self.payload)
                .map_err(|e| SignatureError::Payload(e.to_string()));
        }
        if let Some(k) = bad {
            return Err(SignatureError::BadSignature(k.short()));
        }
        if malformed {
            return Err(SignatureError::Malformed);
        }
        if good.is_empty() {
            return Err(SignatureError::UnknownKey(self.signatures[0].key.short()));
        }
        Err(SignatureError::Threshold {
            have: good.len(),
            need,
        })
    }

    /// Parses the payload without checking anything: for display of documents whose
    /// signature was already checked, or to explain why one was refused.
    pub fn unverified(&self) -> Result<T, serde_json::Error> {
        serde_json::from_str(&self.payload)
    }
}

/// Signatures that were checked and found valid, by the digest of key, signed message
/// and signature together: a valid signature stays valid, so checking it again can be
/// skipped. Bounded; the oldest are forgotten first, and counted.
#[derive(Debug)]
pub struct SignatureMemo {
    inner: Mutex<MemoInner>,
    capacity: usize,
    /// Entries forgotten to stay within the bound.
    pub forgotten: AtomicU64,
}

#[derive(Debug, Default)]
struct MemoInner {
    known: HashSet<[u8; 32]>,
    order: VecDeque<[u8; 32]>,
}

impl SignatureMemo {
    /// A memo of at most `capacity` signatures.
    pub fn new(capacity: usize) -> SignatureMemo {
        SignatureMemo {
            inner: Mutex::default(),
            capacity: capacity.max(1),
            forgotten: AtomicU64::new(0),
        }
    }

    fn digest(key: &PublicKey, msg: &[u8], sig: &[u8]) -> [u8; 32] {
        let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
        // Lengths first, so that no two different triples hash the same bytes.
        ctx.update(&(msg.len() as u64).to_le_bytes());
        ctx.update(&(sig.len() as u64).to_le_bytes());
        ctx.update(&key.0);
        ctx.update(msg);
        ctx.update(sig);
        let mut out = [0u8; 32];
        out.copy_from_slice(ctx.finish().as_ref());
        out
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, MemoInner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether `sig` is `key`'s valid signature of `msg`: answered from memory when the
    /// same triple checked out before, otherwise checked, and remembered if valid.
    fn verify(&self, key: &PublicKey, msg: &[u8], sig: &[u8]) -> bool {
        let d = Self::digest(key, msg, sig);
        if self.lock().known.contains(&d) {
            return true;
        }
        // Checked without the lock held: other agents' checks go on meanwhile.
        if !key.verify(msg, sig) {
            return false;
        }
        let mut g = self.lock();
        if g.known.insert(d) {
            g.order.push_back(d);
            while g.order.len() > self.capacity {
                if let Some(old) = g.order.pop_front() {
                    g.known.remove(&old);
                    self.forgotten.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        true
    }

    /// How many signatures it holds.
    pub fn len(&self) -> usize {
        self.lock().order.len()
    }

    /// Whether it holds none.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Serialize, Deserialize, Debug, PartialEq)]
    struct Doc {
        n: u32,
    }
    impl Signable for Doc {
        const CONTEXT: &'static str = "test-doc";
    }
    #[derive(Serialize, Deserialize, Debug, PartialEq)]
    struct Other {
        n: u32,
    }
    impl Signable for Other {
        const CONTEXT: &'static str = "test-other";
    }

    #[test]
    fn the_memo_skips_only_signatures_it_saw_valid_and_stays_bounded() {
        let memo = SignatureMemo::new(2);
        let k = SigningKey::generate();
        let s = Signed::sign(&Doc { n: 7 }, &k);
        assert_eq!(
            s.verify_threshold_memo(&[k.public()], 1, &memo).unwrap(),
            Doc { n: 7 }
        );
        assert_eq!(memo.len(), 1);
        // Seen before: still the same answer, nothing new remembered.
        assert_eq!(
            s.verify_threshold_memo(&[k.public()], 1, &memo).unwrap(),
            Doc { n: 7 }
        );
        assert_eq!(memo.len(), 1);
        // A changed payload under the remembered signature is still refused...
        let mut t = s.clone();
        t.payload = r#"{"n":8}"#.into();
        assert!(matches!(
            t.verify_threshold_memo(&[k.public()], 1, &memo),
            Err(SignatureError::BadSignature(_))
        ));
        // ...as is the remembered signature when its key is no longer trusted.
        assert!(matches!(
            s.verify_threshold_memo(&[SigningKey::generate().public()], 1, &memo),
            Err(SignatureError::UnknownKey(_))
        ));
        // Refusals are not remembered; the bound holds and what it forgot is counted.
        assert_eq!(memo.len(), 1);
        for n in 0..3 {
            Signed::sign(&Doc { n }, &k)
                .verify_threshold_memo(&[k.public()], 1, &memo)
                .unwrap();
        }
        assert_eq!(memo.len(), 2);
        assert_eq!(memo.forgotten.load(Ordering::Relaxed), 2);
    }

    #[test]
    fn verifies_only_untampered_documents_from_trusted_keys() {
        let k = SigningKey::generate();
        let s = Signed::sign(&Doc { n: 7 }, &k);
        assert_eq!(s.verify(&[k.public()]).unwrap(), Doc { n: 7 });

        let other = SigningKey::generate();
        assert!(matches!(
            s.verify(&[other.public()]),
            Err(SignatureError::UnknownKey(_))
        ));

        let mut t = s.clone();
        t.payload = r#"{"n":8}"#.into();
        assert!(matches!(
            t.verify(&[k.public()]),
            Err(SignatureError::BadSignature(_))
        ));

        // Thresholds count distinct trusted keys only.
        let k2 = SigningKey::generate();
        let mut dup = s.clone();
        dup.signatures.push(dup.signatures[0].clone());
        assert_eq!(
            dup.verify_threshold(&[k.public(), k2.public()], 2),
            Err(SignatureError::Threshold { have: 1, need: 2 })
        );
        let mut two = s.clone();
        two.add_signature(&k2);
        assert_eq!(
            two.verify_threshold(&[k.public(), k2.public()], 2).unwrap(),
            Doc { n: 7 }
        );
        let mut none = s.clone();
        none.signatures.clear();
        assert_eq!(none.verify(&[k.public()]), Err(SignatureError::Unsigned));

        // A signature made for one kind does not verify as another.
        let json = serde_json::to_string(&s).unwrap();
        let as_other: Signed<Other> = serde_json::from_str(&json).unwrap();
        assert!(matches!(
            as_other.verify(&[k.public()]),
            Err(SignatureError::BadSignature(_))
        ));
    }
}
