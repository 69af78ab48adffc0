//! Ed25519 keys: generation, storage on disk, and public keys as wire values.
//!
//! Private keys are PKCS#8 v2 documents as `ring` produces them, stored base64-encoded in
//! files only their owner can read. Public keys are the raw 32 bytes, written as hex
//! (ring parses no PEM or SPKI, and 64 hex characters are easy to paste into a config).

use std::fmt;
use std::path::Path;

use base64::Engine as _;
use ring::rand::SystemRandom;
use ring::signature::{self, Ed25519KeyPair, KeyPair as _};
use serde::{Deserialize, Serialize};

/// Errors loading or parsing keys.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// The key file could not be read or written.
    #[error("key file {path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The cause.
        source: std::io::Error,
    },
    /// The file or text is not a key.
    #[error("not a valid Ed25519 key: {0}")]
    Invalid(String),
}

/// An Ed25519 public key: 32 raw bytes, written as 64 hex characters.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PublicKey(pub [u8; 32]);

impl PublicKey {
    /// Parses 64 hex characters.
    pub fn from_hex(s: &str) -> Result<PublicKey, KeyError> {
        let bytes = hex::decode(s.trim()).map_err(|e| KeyError::Invalid(e.to_string()))?;
        let arr: [u8; 32] = bytes.try_into().map_err(|_| {
            KeyError::Invalid("a public key is 32 bytes (64 hex characters)".into())
        })?;
        Ok(PublicKey(arr))
    }

    /// The key as 64 hex characters.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    /// A short form for logs: the first 8 bytes in hex.
    pub fn short(&self) -> String {
        hex::encode(&self.0[..8])
    }

    /// Checks `sig` over `message`.
    pub fn verify(&self, message: &[u8], sig: &[u8]) -> bool {
        signature::UnparsedPublicKey::new(&signature::ED25519, &self.0)
            .verify(message, sig)
            .is_ok()
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({})", self.short())
    }
}

impl fmt::Display for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl std::str::FromStr for PublicKey {
    type Err = KeyError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        PublicKey::from_hex(s)
    }
}

impl Serialize for PublicKey {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_hex())
    }
}

impl<'de> Deserialize<'de> for PublicKey {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        PublicKey::from_hex(&s).map_err(serde::de::Error::custom)
    }
}

/// An Ed25519 key pair that can sign.
pub struct SigningKey {
    pair: Ed25519KeyPair,
    pkcs8: Vec<u8>,
}

impl fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SigningKey({})", self.public().short())
    }
}

impl SigningKey {
    /// Generates a new key from the system's random source.
    pub fn generate() -> SigningKey {
        let rng = SystemRandom::new();
        let doc = Ed25519KeyPair::generate_pkcs8(&rng).expect("system random source failed");
        SigningKey::from_pkcs8(doc.as_ref()).expect("ring produced an invalid key")
    }

    /// Parses a PKCS#8 document (v2 as ring writes it, or v1 as OpenSSL does).
    pub fn from_pkcs8(der: &[u8]) -> Result<SigningKey, KeyError> {
        let pair = Ed25519KeyPair::from_pkcs8(der)
            .or_else(|_| Ed25519KeyPair::from_pkcs8_maybe_unchecked(der))
            .map_err(|e| KeyError::Invalid(e.to_string()))?;
        Ok(SigningKey {
            pair,
            pkcs8: der.to_vec(),
        })
    }

    /// The public half.
    pub fn public(&self) -> PublicKey {
        let mut out = [0u8; 32];
        out.copy_from_slice(self.pair.public_key().as_ref());
        PublicKey(out)
    }

    /// Signs `message`.
    pub fn sign(&self, message: &[u8]) -> Vec<u8> {
        self.pair.sign(message).as_ref().to_vec()
    }

    /// Reads a key written by [`SigningKey::save`].
    pub fn load(path: &Path) -> Result<SigningKey, KeyError> {
        let text = std::fs::read_to_string(path).map_err(|source| KeyError::Io {
            path: path.display().to_string(),
            source,
        })?;
        let der = base64::engine::general_purpose::STANDARD
            .decode(text.trim())
            .map_err(|e| KeyError::Invalid(format!("{}: {e}", path.display())))?;
        SigningKey::from_pkcs8(&der)
    }

    /// Writes the private key (mode 0600) and, beside it, `<path>.pub` with the public key
    /// in hex. Refuses to overwrite an existing key.
    pub fn save(&self, path: &Path) -> Result<(), KeyError> {
        let io = |source| KeyError::Io {
            path: path.display().to_string(),
            source,
        };
        let text = base64::engine::general_purpose::STANDARD.encode(&self.pkcs8);
        write_private(path, text.as_bytes()).map_err(io)?;
        let pub_path = public_path(path);
        std::fs::write(&pub_path, format!("{}\n", self.public())).map_err(|source| KeyError::Io {
            path: pub_path.display().to_string(),
            source,
        })
    }
}

/// `<key>.pub`, where [`SigningKey::save`] writes the public half.
pub fn public_path(key_path: &Path) -> std::path::PathBuf {
    let mut s = key_path.as_os_str().to_owned();
    s.push(".pub");
    s.into()
}

/// Reads a public key file (64 hex characters).
pub fn load_public(path: &Path) -> Result<PublicKey, KeyError> {
    let text = std::fs::read_to_string(path).map_err(|source| KeyError::Io {
        path: path.display().to_string(),
        source,
    })?;
    PublicKey::from_hex(&text)
}

/// Creates `path` with mode 0600 and writes `bytes`, durably; fails if it exists.
pub fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    crate::durable::create_private(path, bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sign_verify_and_hex_round_trip() {
        let k = SigningKey::generate();
        let sig = k.sign(b"hello");
        assert!(k.public().verify(b"hello", &sig));
        assert!(!k.public().verify(b"hellO", &sig));
        let hex = k.public().to_hex();
        assert_eq!(PublicKey::from_hex(&hex).unwrap(), k.public());
        assert!(PublicKey::from_hex("abcd").is_err());
    }

    #[test]
    fn save_and_load() {
        let dir = std::env::temp_dir().join(format!("drover-keytest-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("k");
        let _ = std::fs::remove_file(&path);
        let _ = std::fs::remove_file(public_path(&path));
        let k = SigningKey::generate();
        k.save(&path).unwrap();
        assert!(k.save(&path).is_err(), "overwrote a key");
        let back = SigningKey::load(&path).unwrap();
        assert_eq!(back.public(), k.public());
        assert_eq!(load_public(&public_path(&path)).unwrap(), k.public());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
