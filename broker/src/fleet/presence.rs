//! What agents say about themselves: hello on every connection, online/offline status
//! (the offline one often as their last will), and signed heartbeats.

use drover_protocol::agent::{Hello, Presence};
use drover_protocol::enroll::Heartbeat;

use super::identity::refusal;
use super::{Fleet, store};

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
        let event = store::record_hello(self.db(), &self.shared.events, &hello, self.now()).await?;
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
        self.touch(agent).await
    }
}
