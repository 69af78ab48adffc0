//! Broker credentials: who may connect to the embedded broker, and as what.
//!
//! Passwords are random 32-byte tokens the server mints, never chosen by people, so a
//! salted SHA-256 is enough to keep the database from holding usable secrets; a slow
//! password hash would only slow down 10,000 agents reconnecting at once.

use ring::digest::{SHA256, digest};
use ring::rand::{SecureRandom as _, SystemRandom};

pub use crate::tokens::{new_password, random_token};

use super::store;
use crate::mqtt::auth::{Authenticator, CONTROL_USER, Principal};
use crate::mqtt::mosquitto;
use crate::store::Db;

/// Checks broker logins against the store, plus the control plane's session credential.
pub struct BrokerAuth {
    db: Db,
    control_password_hash: Vec<u8>,
}

impl std::fmt::Debug for BrokerAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("BrokerAuth")
    }
}

fn hash(salt: &[u8], password: &[u8]) -> Vec<u8> {
    let mut m = Vec::with_capacity(salt.len() + password.len());
    m.extend_from_slice(salt);
    m.extend_from_slice(password);
    digest(&SHA256, &m).as_ref().to_vec()
}

impl BrokerAuth {
    /// `control_password` is the control plane's credential for this run of the server.
    pub fn new(db: Db, control_password: &str) -> BrokerAuth {
        BrokerAuth {
            db,
            control_password_hash: hash(b"control", control_password.as_bytes()),
        }
    }

    /// Creates or replaces the broker credential of agent `id`; returns the password.
    pub async fn create_agent(db: &Db, id: &str, now: u64) -> anyhow::Result<String> {
        let (password, c) = BrokerAuth::mint(id)?;
        store::put_broker_user(
            db,
            id,
            "agent",
            &c.salt,
            &c.hash,
            Some(&c.mosquitto_hash),
            now,
        )
        .await?;
        Ok(password)
    }

    /// A new broker credential for agent `id`, not stored yet: the password, and what
    /// the store keeps of it.
    pub fn mint(id: &str) -> anyhow::Result<(String, store::NewCredential)> {
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
        let mosquitto_hash = mosquitto::password_hash(&password)?;
        let credential = store::NewCredential {
            salt: salt.to_vec(),
            hash: hash(&salt, password.as_bytes()),
            mosquitto_hash,
        };
        Ok((password, credential))
    }
}

impl Authenticator for BrokerAuth {
    fn authenticate(&self, client_id: &str, username: &str, password: &[u8]) -> Option<Principal> {
        if username == CONTROL_USER {
            return (hash(b"control", password) == self.control_password_hash)
                .then_some(Principal::Control);
        }
        // The broker runs this on its blocking pool: waiting here holds no async worker.
        let lookup = store::broker_user(&self.db, username);
        match tokio::runtime::Handle::current().block_on(lookup) {
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
    use std::sync::Arc;

    use super::*;
    use crate::clock::Clock;
    use crate::events::EventLog;

    /// As the broker calls it: on the blocking pool.
    async fn login(auth: &Arc<BrokerAuth>, user: &str, pw: &str) -> Option<Principal> {
        let (auth, user, pw) = (auth.clone(), user.to_string(), pw.to_string());
        tokio::task::spawn_blocking(move || auth.authenticate(&user, &user, pw.as_bytes()))
            .await
            .unwrap()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn deregistration_kills_the_credential_and_a_new_one_registers_again() {
        let db = Db::in_memory().unwrap();
        db.migrate(&crate::server::SCHEMAS).await.unwrap();
        let events = EventLog::new(db.clone(), Clock::system());
        let auth = Arc::new(BrokerAuth::new(db.clone(), "control-pw"));
        let pw = BrokerAuth::create_agent(&db, "web-1", 10).await.unwrap();
        let other = BrokerAuth::create_agent(&db, "web-2", 10).await.unwrap();
        assert_eq!(
            login(&auth, "web-1", &pw).await,
            Some(Principal::Agent("web-1".into()))
        );
        assert_eq!(
            login(&auth, CONTROL_USER, "control-pw").await,
            Some(Principal::Control)
        );
        // The Mosquitto hash is of the same password.
        let logins = store::agent_broker_logins(&db).await.unwrap();
        assert_eq!(logins.len(), 2);
        let (id, h) = &logins[0];
        assert_eq!(id, "web-1");
        assert!(mosquitto::verify(h.as_deref().unwrap(), &pw).unwrap());

        assert!(!store::is_deregistered(&db, "web-1").await.unwrap());
        assert!(
            store::deregister(&db, &events, "web-1", 1000)
                .await
                .unwrap()
                .is_some()
        );
        assert!(store::is_deregistered(&db, "web-1").await.unwrap());
        assert_eq!(login(&auth, "web-1", &pw).await, None);
        let ids: Vec<String> = store::agent_broker_logins(&db)
            .await
            .unwrap()
            .into_iter()
            .map(|(id, _)| id)
            .collect();
        assert_eq!(ids, ["web-2"]);
        // Never connected, yet listed, as deregistered.
        let row = store::agents(&db)
            .await
            .unwrap()
            .into_iter()
            .next()
            .unwrap();
        assert_eq!(row.id, "web-1");
        assert_eq!(row.deregistered_ms, Some(1000));
        assert!(!row.online);
        // Again: still the first time. Unknown: nothing.
        assert!(
            store::deregister(&db, &events, "web-1", 2000)
                .await
                .unwrap()
                .is_some()
        );
        assert_eq!(
            store::agents(&db).await.unwrap()[0].deregistered_ms,
            Some(1000)
        );
        assert!(
            store::deregister(&db, &events, "nobody", 2000)
                .await
                .unwrap()
                .is_none()
        );
        assert!(!store::is_deregistered(&db, "nobody").await.unwrap());

        // A new credential registers it again.
        let pw2 = BrokerAuth::create_agent(&db, "web-1", 3000).await.unwrap();
        assert!(!store::is_deregistered(&db, "web-1").await.unwrap());
        assert!(login(&auth, "web-1", &pw2).await.is_some());
        assert!(login(&auth, "web-2", &other).await.is_some());
    }
}
