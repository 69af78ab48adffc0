//! Broker credentials: who may connect to the embedded broker, and as what.
//!
//! Passwords are random 32-byte tokens the server mints, never chosen by people, so a
//! salted SHA-256 is enough to keep the database from holding usable secrets; a slow
//! password hash would only slow down 10,000 agents reconnecting at once.

use ring::digest::{SHA256, digest};
use ring::rand::{SecureRandom as _, SystemRandom};

use crate::embedded::{Authenticator, Principal};
use crate::store::Store;

/// The control plane's own username on the embedded broker.
pub const CONTROL_USER: &str = "drover-control";

/// Checks broker logins against the store, plus the control plane's session credential.
pub struct BrokerAuth {
    store: Store,
    control_password_hash: Vec<u8>,
}

impl std::fmt::Debug for BrokerAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("BrokerAuth")
    }
}

/// A new random password.
pub fn new_password() -> String {
    random_token(32)
}

/// `bytes` random bytes as lowercase hex: safe in URLs, files and shells, and never
/// starting with `-`, so it can follow a flag on a command line (`--code TOKEN`) without
/// being taken for another flag, as base64url can be one time in 64.
pub fn random_token(bytes: usize) -> String {
    let mut b = vec![0u8; bytes];
    SystemRandom::new()
        .fill(&mut b)
        .expect("system random source failed");
    hex::encode(b)
}

fn hash(salt: &[u8], password: &[u8]) -> Vec<u8> {
    let mut m = Vec::with_capacity(salt.len() + password.len());
    m.extend_from_slice(salt);
    m.extend_from_slice(password);
    digest(&SHA256, &m).as_ref().to_vec()
}

impl BrokerAuth {
    /// `control_password` is the control plane's credential for this run of the server.
    pub fn new(store: Store, control_password: &str) -> BrokerAuth {
        BrokerAuth {
            store,
            control_password_hash: hash(b"control", control_password.as_bytes()),
        }
    }

    /// Creates or replaces the broker credential of agent `id`; returns the password.
    pub fn create_agent(store: &Store, id: &str) -> anyhow::Result<String> {
        anyhow::ensure!(
            drover_protocol::topics::is_valid_agent_id(id),
            "agent id {id:?} is invalid: use 1-64 characters of A-Z a-z 0-9 . _ -"
        );
        anyhow::ensure!(id != CONTROL_USER, "agent id {id:?} is reserved");
        let password = new_password();
        let mut salt = [0u8; 16];
        SystemRandom::new()
            .fill(&mut salt)
            .map_err(|_| anyhow::anyhow!("system random source failed"))?;
        // The same password as Mosquitto's hash, for `drover broker acl`: the store keeps
        // no way back to the password.
        let mosquitto_hash = crate::mosquitto::password_hash(&password)?;
        store.put_broker_user(
            id,
            "agent",
            &salt,
            &hash(&salt, password.as_bytes()),
            Some(&mosquitto_hash),
            drover_protocol::now_ms(),
        )?;
        Ok(password)
    }
}

impl Authenticator for BrokerAuth {
    fn authenticate(&self, client_id: &str, username: &str, password: &[u8]) -> Option<Principal> {
        if username == CONTROL_USER {
            return (hash(b"control", password) == self.control_password_hash)
                .then_some(Principal::Control);
        }
        match self.store.broker_user(username) {
            Ok(Some(user)) if user.role == "agent" => (hash(&user.salt, password) == user.hash)
                .then(|| Principal::Agent(username.to_string())),
            Ok(_) => None,
            Err(e) => {
                tracing::error!(%client_id, error = %format!("{e:#}"), "credential lookup failed");
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_hex_and_can_follow_a_flag() {
        for _ in 0..1000 {
            let t = random_token(24);
            assert_eq!(t.len(), 48);
            assert!(
                t.bytes()
                    .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()),
                "{t}"
            );
        }
        assert_ne!(random_token(24), random_token(24));
    }

    #[test]
    fn deregistration_kills_the_credential_and_a_new_one_registers_again() {
        let store = Store::open(std::path::Path::new(":memory:")).unwrap();
        let auth = BrokerAuth::new(store.clone(), "control-pw");
        let pw = BrokerAuth::create_agent(&store, "web-1").unwrap();
        let other = BrokerAuth::create_agent(&store, "web-2").unwrap();
        assert_eq!(
            auth.authenticate("web-1", "web-1", pw.as_bytes()),
            Some(Principal::Agent("web-1".into()))
        );
        // The Mosquitto hash is of the same password.
        let logins = store.agent_broker_logins().unwrap();
        assert_eq!(logins.len(), 2);
        let (id, h) = &logins[0];
        assert_eq!(id, "web-1");
        assert!(crate::mosquitto::verify(h.as_deref().unwrap(), &pw).unwrap());

        assert!(!store.is_deregistered("web-1").unwrap());
        assert!(store.deregister_agent("web-1", 1000).unwrap());
        assert!(store.is_deregistered("web-1").unwrap());
        assert_eq!(auth.authenticate("web-1", "web-1", pw.as_bytes()), None);
        let ids: Vec<String> = store
            .agent_broker_logins()
            .unwrap()
            .into_iter()
            .map(|(id, _)| id)
            .collect();
        assert_eq!(ids, ["web-2"]);
        // Never connected, yet listed, as deregistered.
        let row = store.agents().unwrap().into_iter().next().unwrap();
        assert_eq!(row.id, "web-1");
        assert_eq!(row.deregistered_ms, Some(1000));
        assert!(!row.online);
        // Again: still the first time. Unknown: false.
        assert!(store.deregister_agent("web-1", 2000).unwrap());
        assert_eq!(store.agents().unwrap()[0].deregistered_ms, Some(1000));
        assert!(!store.deregister_agent("nobody", 2000).unwrap());
        assert!(!store.is_deregistered("nobody").unwrap());

        // A new credential registers it again.
        let pw2 = BrokerAuth::create_agent(&store, "web-1").unwrap();
        assert!(!store.is_deregistered("web-1").unwrap());
        let back = auth.authenticate("web-1", "web-1", pw2.as_bytes());
        assert!(back.is_some());
        let untouched = auth.authenticate("web-2", "web-2", other.as_bytes());
        assert!(untouched.is_some());
    }
}
