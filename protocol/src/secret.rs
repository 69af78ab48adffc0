//! Secrets sealed to one agent: X25519 key agreement, HKDF-SHA256, ChaCha20-Poly1305.
//!
//! The sender makes a fresh X25519 key for every secret, agrees a shared secret with the
//! agent's static X25519 public key, derives a one-time AEAD key, and seals. Only the
//! agent's static private key opens it; the broker and the server's store see ciphertext.
//! `aad` binds the box to its context (the job and the parameter's name), so a box cannot
//! be moved to another job or parameter.
//!
//! ring has no static X25519 private keys, so the key agreement uses `x25519-dalek`;
//! ring still does HKDF and the AEAD.

use base64::Engine as _;
use ring::aead::{self, Aad, LessSafeKey, Nonce, UnboundKey};
use ring::hkdf;
use serde::{Deserialize, Serialize};

/// A sealed secret.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SealedBox {
    /// The sender's one-time X25519 public key, hex.
    pub ephemeral: String,
    /// The AEAD nonce, base64.
    pub nonce: String,
    /// Ciphertext and tag, base64.
    pub ciphertext: String,
}

/// Why a box could not be sealed or opened.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SecretError {
    /// A field is not well formed.
    #[error("malformed sealed secret: {0}")]
    Malformed(&'static str),
    /// Wrong key, altered ciphertext, or wrong context.
    #[error(
        "sealed secret does not open with this agent's key (altered, or sealed to another agent or job)"
    )]
    Open,
}

/// An agent's static X25519 key.
pub struct AgentSecretKey(x25519_dalek::StaticSecret);

impl std::fmt::Debug for AgentSecretKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "AgentSecretKey({})", hex::encode(self.public()))
    }
}

impl AgentSecretKey {
    /// A new random key.
    pub fn generate() -> AgentSecretKey {
        let mut b = [0u8; 32];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b)
            .expect("system random source failed");
        AgentSecretKey(x25519_dalek::StaticSecret::from(b))
    }

    /// From its 32 bytes.
    pub fn from_bytes(b: [u8; 32]) -> AgentSecretKey {
        AgentSecretKey(x25519_dalek::StaticSecret::from(b))
    }

    /// Its 32 bytes, for storage.
    pub fn to_bytes(&self) -> [u8; 32] {
        self.0.to_bytes()
    }

    /// The public half.
    pub fn public(&self) -> [u8; 32] {
        x25519_dalek::PublicKey::from(&self.0).to_bytes()
    }

    /// Opens a box sealed to this key with the same `aad`.
    pub fn open(&self, b: &SealedBox, aad: &[u8]) -> Result<Vec<u8>, SecretError> {
        let eph: [u8; 32] = hex::decode(&b.ephemeral)
            .ok()
            .and_then(|v| v.try_into().ok())
            .ok_or(SecretError::Malformed("ephemeral key"))?;
        let nonce: [u8; 12] = b64(&b.nonce)
            .and_then(|v| v.try_into().ok())
            .ok_or(SecretError::Malformed("nonce"))?;
        let mut data = b64(&b.ciphertext).ok_or(SecretError::Malformed("ciphertext"))?;
        let shared = self.0.diffie_hellman(&x25519_dalek::PublicKey::from(eph));
        let key = derive(shared.as_bytes(), &eph, &self.public());
        let plain = key
            .open_in_place(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(aad),
                &mut data,
            )
            .map_err(|_| SecretError::Open)?;
        Ok(plain.to_vec())
    }
}

fn b64(s: &str) -> Option<Vec<u8>> {
    base64::engine::general_purpose::STANDARD.decode(s).ok()
}

fn derive(shared: &[u8; 32], eph: &[u8; 32], recipient: &[u8; 32]) -> LessSafeKey {
    let mut salt_input = Vec::with_capacity(64);
    salt_input.extend_from_slice(eph);
    salt_input.extend_from_slice(recipient);
    let salt = hkdf::Salt::new(hkdf::HKDF_SHA256, &salt_input);
    let prk = salt.extract(shared);
    let okm = prk
        .expand(&[b"drover:sealed-secret-v1"], &aead::CHACHA20_POLY1305)
        .expect("HKDF output length matches the AEAD key");
    LessSafeKey::new(UnboundKey::from(okm))
}

/// Seals `plaintext` to the agent whose X25519 public key is `recipient`.
pub fn seal(recipient: &[u8; 32], aad: &[u8], plaintext: &[u8]) -> SealedBox {
    let eph_secret = AgentSecretKey::generate();
    let eph_public = eph_secret.public();
    let shared = eph_secret
        .0
        .diffie_hellman(&x25519_dalek::PublicKey::from(*recipient));
    let key = derive(shared.as_bytes(), &eph_public, recipient);
    let mut nonce = [0u8; 12];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut nonce)
        .expect("system random source failed");
    let mut data = plaintext.to_vec();
    key.seal_in_place_append_tag(
        Nonce::assume_unique_for_key(nonce),
        Aad::from(aad),
        &mut data,
    )
    .expect("sealing cannot fail for these sizes");
    let e = base64::engine::general_purpose::STANDARD;
    SealedBox {
        ephemeral: hex::encode(eph_public),
        nonce: e.encode(nonce),
        ciphertext: e.encode(data),
    }
}

/// The associated data binding a secret parameter to its job and name.
pub fn parameter_aad(job_id: &str, name: &str) -> Vec<u8> {
    format!("drover:parameter:{job_id}:{name}").into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seals_to_one_key_and_context_only() {
        let agent = AgentSecretKey::generate();
        let other = AgentSecretKey::generate();
        let b = seal(&agent.public(), b"job-1:db-password", b"hunter2");
        assert!(!b.ciphertext.contains("hunter2"));
        assert_eq!(agent.open(&b, b"job-1:db-password").unwrap(), b"hunter2");
        assert_eq!(other.open(&b, b"job-1:db-password"), Err(SecretError::Open));
        assert_eq!(agent.open(&b, b"job-2:db-password"), Err(SecretError::Open));
        let mut t = b.clone();
        t.ciphertext = base64::engine::general_purpose::STANDARD.encode(b"garbage garbage garbage");
        assert_eq!(agent.open(&t, b"job-1:db-password"), Err(SecretError::Open));
        let back = AgentSecretKey::from_bytes(agent.to_bytes());
        assert_eq!(back.public(), agent.public());
    }
}
