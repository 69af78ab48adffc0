//! What agents say about themselves: hello on every connection, online/offline status
//! (the offline one often as their last will), and signed heartbeats.
//!
//! A hello and a heartbeat carry the time the agent signed them, and are taken only if
//! that is after the last one taken from the agent (kept in the store) and near the
//! server's clock: a broker that saved one cannot play it again to show a dead agent
//! online or to bring back what it once reported.

use drover_protocol::agent::{Hello, Presence};
use drover_protocol::enroll::Heartbeat;

use super::identity::refusal;
use super::store::Fresh;
use super::{Fleet, store};

/// How far the time a hello or heartbeat was signed may be from the server's clock.
pub const MAX_SKEW_MS: u64 = 5 * 60_000;

/// Refuses a message signed at `at_ms` that is too far from `now` to be fresh.
fn near(what: &str, at_ms: u64, now: u64) -> anyhow::Result<()> {
    let skew = at_ms.abs_diff(now);
    if skew > MAX_SKEW_MS {
        return Err(refusal(
            "replayed",
            format!(
                "{what} signed at {at_ms} is {} s {} the server's clock (at most {} s): a replay, or a clock to set right",
                skew / 1000,
                if at_ms < now { "behind" } else { "ahead of" },
                MAX_SKEW_MS / 1000
            ),
        ));
    }
    Ok(())
}

/// Refuses a message the store found not newer than the last one taken.
fn newer<T>(what: &str, at_ms: u64, fresh: Fresh<T>) -> anyhow::Result<T> {
    match fresh {
        Fresh::Taken(v) => Ok(v),
        Fresh::NotNewer { last_ms } => Err(refusal(
            "replayed",
            format!(
                "{what} signed at {at_ms} is not newer than the last one taken (signed at {last_ms})"
            ),
        )),
    }
}

impl Fleet {
    /// An agent's status message. Unsigned: presence only ever changes a status flag.
    pub async fn status(&self, agent: &str, payload: &[u8]) -> anyhow::Result<()> {
        if store::is_deregistered(self.db(), agent).await? {
            return Err(refusal(
                "deregistered",
                format!("agent {agent} is deregistered; presence ignored"),
            ));
        }
        let p: Presence = serde_json::from_slice(payload)?;
        let online = p == Presence::Online;
        let event =
            store::record_presence(self.db(), &self.shared.events, agent, online, self.now())
                .await?;
        if let Some(id) = event {
            self.shared.events.committed(id);
        }
        tracing::info!(agent.id = %agent, online, "agent presence");
        Ok(())
    }

    /// An agent's signed hello, on each new connection: it is online, and whatever was
    /// sent to it before may have been lost with the old connection (the `online` event
    /// says since when).
    pub async fn hello(&self, agent: &str, payload: &[u8]) -> anyhow::Result<()> {
        let hello: Hello = self.verify(agent, payload).await?;
        anyhow::ensure!(
            hello.agent_id == agent,
            "hello claims to be agent {:?}",
            hello.agent_id
        );
        let now = self.now();
        near("hello", hello.sent_at_ms, now)?;
        let recorded = store::record_hello(self.db(), &self.shared.events, &hello, now).await?;
        let event = newer("hello", hello.sent_at_ms, recorded)?;
        self.shared.events.committed(event);
        let current = self.shared.trust.version();
        if hello.keyset_version < current {
            tracing::info!(agent.id = %agent, from = hello.keyset_version, to = current, "sending newer key set");
            let (trust, agent) = (self.shared.trust.clone(), agent.to_string());
            tokio::spawn(async move { trust.send_to(&agent).await });
        }
        tracing::info!(agent.id = %agent, hostname = %hello.hostname, version = %hello.agent_version, "agent announced");
        Ok(())
    }

    /// An agent's signed heartbeat.
    pub async fn heartbeat(&self, agent: &str, payload: &[u8]) -> anyhow::Result<()> {
        let hb: Heartbeat = self.verify(agent, payload).await?;
        anyhow::ensure!(
            hb.agent_id == agent,
            "heartbeat claims to be agent {:?}",
            hb.agent_id
        );
        let now = self.now();
        near("heartbeat", hb.at_ms, now)?;
        let recorded = store::record_heartbeat(self.db(), agent, hb.at_ms, now).await?;
        newer("heartbeat", hb.at_ms, recorded)
    }
}
