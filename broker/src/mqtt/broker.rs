//! The MQTT broker embedded in `drover`, built on mqtt5's broker.
//!
//! - **Authentication**: every client must present a username and password, checked by the
//!   [`Authenticator`] we are given; it decides the client's [`Principal`].
//! - **ACLs** (`acl.rs`): the control plane may use everything under `drover/v1/` (and
//!   read `$SYS/`); an agent must connect with its own id as client id, may publish only
//!   under its own `up/`, subscribe only under its own `down/`, and retain only its status.
//!   Wills are checked at CONNECT. Denials are logged and counted
//!   ([`EmbeddedBroker::denied_count`]).
//! - **Sessions**: persistent sessions (MQTT 3.1.1 `clean_session=false`, MQTT 5 session
//!   expiry, capped at [`MAX_SESSION_EXPIRY`]) keep their subscriptions and queue QoS 1/2
//!   messages while the client is away. With [`BrokerConfig::data_dir`] they (and retained
//!   messages) are stored on disk and survive a restart; without it, in memory. `drover
//!   serve` keeps them in memory: the control plane keeps what must outlive a restart in
//!   its store and sends it again (see `jobs::dispatch::redeliver`).
//! - **Listeners** (`listener.rs`): MQTT 3.1.1 and 5 on one plain TCP port, plus
//!   optionally TLS on another. We run the accept loops ourselves and hand each
//!   connection to mqtt5's connection handler: TLS handshakes run in their own task with
//!   a timeout, and every connection can be aborted at shutdown.
//! - **Revocation**: [`BrokerAccess::revoke_agent`] (for a deregistered agent) closes the
//!   agent's connection at once and refuses it from then on, even if its credential check
//!   raced the revocation.
//! - **Shutdown**: [`EmbeddedBroker::shutdown`] is bounded by [`SHUTDOWN_TIMEOUT`] and
//!   releases the ports and the data directory, so a broker can be restarted in-process.
//!
//! mqtt5 refuses to run without a listener of its own, so it is given one on an
//! ephemeral loopback port that nothing is told about. It serves the same auth and ACL;
//! all real traffic goes through our listeners.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, Weak};
use std::time::Duration;

use anyhow::{anyhow, bail};
use mqtt5::broker::auth::AuthProvider;
use mqtt5::broker::config::{
    BrokerConfig as MqttConfig, StorageBackend as MqttStorageBackend, StorageConfig,
};
use mqtt5::broker::events::BrokerEventHandler;
use mqtt5::broker::resource_monitor::ResourceLimits;
use mqtt5::broker::server::{BrokerShutdownHandle, MqttBroker};
use mqtt5::broker::storage::DynamicStorage;
use tokio::sync::{broadcast, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::acl::Gate;
use super::auth::Authenticator;
use super::listener::{Listener, Security, Shared};

/// How long [`EmbeddedBroker::shutdown`] may take in all.
pub const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(5);

/// The longest a persistent session (with its queued messages) outlives its connection.
/// A client asking for more (MQTT 3.1.1 persistent sessions ask for "forever") gets this.
pub const MAX_SESSION_EXPIRY: Duration = Duration::from_secs(7 * 24 * 3600);

/// How long connections get to leave at shutdown before they are aborted. Connected
/// clients leave at once; this bounds the ones still before CONNECT, which mqtt5 does not
/// tell about the shutdown.
const CONNECTION_GRACE: Duration = Duration::from_secs(1);

/// How long [`EmbeddedBroker::start`] waits for the broker to start accepting.
const START_TIMEOUT: Duration = Duration::from_secs(10);

/// A TLS listener.
#[derive(Debug, Clone)]
pub struct TlsListener {
    /// Where to listen (port 0 picks one; see [`EmbeddedBroker::tls_addr`]).
    pub listen: SocketAddr,
    /// PEM certificate chain, leaf first.
    pub cert_pem: PathBuf,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub key_pem: PathBuf,
    /// How long a client has to complete the TLS handshake before it is dropped.
    pub handshake_timeout: Duration,
}

/// How to run the broker.
#[derive(Debug, Clone)]
pub struct BrokerConfig {
    /// The plain MQTT listener (3.1.1 and 5); port 0 picks one.
    pub listen: SocketAddr,
    /// An optional TLS listener.
    pub tls: Option<TlsListener>,
    /// Where sessions, queued messages and retained messages are stored; the broker owns
    /// this directory (it creates `sessions/`, `queues/`, `inflight/`, `retained/` and a
    /// `.lock` in it; one broker at a time). None keeps them in memory only.
    pub data_dir: Option<PathBuf>,
    /// The largest MQTT packet accepted, in bytes (at least 1024).
    pub max_packet_size: usize,
    /// The most clients connected at once (at least 1), from any one address too: a
    /// fleet behind one NAT is one address. Also the most sockets the listeners hold,
    /// counting those that have not sent CONNECT yet (each for at most 10 s): the
    /// broker's budget of descriptors.
    pub max_connections: usize,
}

/// A running broker. Call [`EmbeddedBroker::shutdown`] to stop it; dropping it stops it
/// too, but without waiting.
pub struct EmbeddedBroker {
    local_addr: SocketAddr,
    tls_addr: Option<SocketAddr>,
    listeners: Vec<Listener>,
    shared: Option<Arc<Shared>>,
    gate: Arc<Gate>,
    shutdown: BrokerShutdownHandle,
    run: Option<JoinHandle<mqtt5::Result<()>>>,
    storage: Option<Weak<DynamicStorage>>,
}

/// Revokes agents on a running [`EmbeddedBroker`]; clones share the broker. After the
/// broker stops, revoking changes nothing (its connections are gone anyway).
#[derive(Clone)]
pub struct BrokerAccess {
    gate: Arc<Gate>,
}

impl std::fmt::Debug for BrokerAccess {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("BrokerAccess")
    }
}

impl BrokerAccess {
    /// Revokes agent `id`, whose credential the caller has just deleted from what the
    /// [`Authenticator`] checks: its live connection is closed now, without a DISCONNECT,
    /// and its subscriptions dropped; a connection whose credential check began before
    /// the revocation is refused (or dropped, if it got registered); until it connects
    /// with a new credential it is denied every publish and subscription; and its status
    /// topic gets a retained `offline`. True if it was connected.
    pub async fn revoke_agent(&self, id: &str) -> bool {
        self.gate.revoke(id).await
    }
}

impl std::fmt::Debug for EmbeddedBroker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmbeddedBroker")
            .field("local_addr", &self.local_addr)
            .field("tls_addr", &self.tls_addr)
            .finish_non_exhaustive()
    }
}

impl EmbeddedBroker {
    /// Binds the listeners, recovers stored sessions and starts accepting clients.
    pub async fn start(
        config: BrokerConfig,
        auth: Arc<dyn Authenticator>,
    ) -> anyhow::Result<EmbeddedBroker> {
        // mqtt5 builds some rustls configs with the process-wide provider.
        let _ = tokio_rustls::rustls::crypto::ring::default_provider().install_default();
        if config.max_packet_size < 1024 {
            bail!(
                "max_packet_size {} is below the minimum of 1024 bytes",
                config.max_packet_size
            );
        }
        if config.max_connections == 0 {
            bail!("max_connections must be at least 1");
        }
        let tls_acceptor = match &config.tls {
            Some(t) if t.handshake_timeout.is_zero() => {
                bail!("the TLS handshake timeout must not be zero")
            }
            Some(t) => Some(super::listener::load_acceptor(&t.cert_pem, &t.key_pem)?),
            None => None,
        };

        let gate = Arc::new(Gate::new(auth));
        let mqtt_config = mqtt_config(&config, &gate);
        let broker = MqttBroker::with_config(mqtt_config.clone())
            .await
            .map_err(|e| anyhow!("starting the MQTT broker: {e}"))?
            .with_auth_provider(Arc::clone(&gate) as Arc<dyn AuthProvider>);

        gate.set_router(&broker.router());
        // mqtt5 takes the global limit from `max_clients` but caps each address at
        // 10,000 on its own; lift that to the global limit.
        broker.resource_monitor().update_limits(ResourceLimits {
            max_connections: config.max_connections,
            max_connections_per_ip: config.max_connections,
            max_message_rate_per_client: mqtt_config.max_message_rate_per_client,
            max_bandwidth_per_client: mqtt_config.max_bandwidth_per_client,
            max_connection_rate: 10_000,
            rate_limit_window: Duration::from_secs(1),
        });
        let shared = Arc::new(Shared {
            config: Arc::new(mqtt_config),
            router: broker.router(),
            auth: broker.auth_provider(),
            storage: broker.storage(),
            stats: broker.stats(),
            resource_monitor: broker.resource_monitor(),
            stop: watch::channel(false).0,
            client_shutdown: broadcast::channel(1).0,
            sockets: Arc::new(tokio::sync::Semaphore::new(config.max_connections)),
        });
        let storage = broker.storage().map(|s| Arc::downgrade(&s));
        let shutdown = broker.shutdown_handle();
        let mut ready = broker.ready_receiver();

        // Bound before mqtt5 runs, so a taken port fails `start` cleanly; accepting only
        // once mqtt5 has recovered the stored sessions and initialised its router.
        let mut listeners = vec![Listener::bind(config.listen, Security::Plain).await?];
        let mut tls_addr = None;
        if let (Some(t), Some(acceptor)) = (&config.tls, tls_acceptor) {
            let security = Security::Tls {
                acceptor,
                handshake_timeout: t.handshake_timeout,
            };
            let tls = Listener::bind(t.listen, security).await?;
            tls_addr = Some(tls.addr);
            listeners.push(tls);
        }
        let local_addr = listeners[0].addr;

        let mut broker = broker;
        let mut run = tokio::spawn(async move { broker.run().await });
        let waited = tokio::time::timeout(START_TIMEOUT, ready.wait_for(|r| *r))
            .await
            .map(|ready| ready.is_ok());
        let (failure, run) = match waited {
            Ok(true) => (None, Some(run)),
            // `run` ended without becoming ready.
            Ok(false) => {
                let e = match (&mut run).await {
                    Ok(Err(e)) => anyhow!("the MQTT broker failed to start: {e}"),
                    Ok(Ok(())) => anyhow!("the MQTT broker stopped while starting"),
                    Err(e) => anyhow!("the MQTT broker task failed: {e}"),
                };
                (Some(e), None)
            }
            Err(_) => (
                Some(anyhow!(
                    "the MQTT broker did not start within {START_TIMEOUT:?}"
                )),
                Some(run),
            ),
        };

        if failure.is_none() {
            for listener in &mut listeners {
                listener.run(&shared);
            }
        }
        let broker = EmbeddedBroker {
            local_addr,
            tls_addr,
            listeners,
            shared: Some(shared),
            gate,
            shutdown,
            run,
            storage,
        };
        if let Some(e) = failure {
            let _ = broker.shutdown().await;
            return Err(e);
        }
        tracing::info!(
            %local_addr,
            tls = ?tls_addr,
            data_dir = ?config.data_dir,
            "MQTT broker ready"
        );
        Ok(broker)
    }

    /// The plain listener's actual address.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The TLS listener's actual address, if there is one.
    pub fn tls_addr(&self) -> Option<SocketAddr> {
        self.tls_addr
    }

    /// A handle for revoking agents while the broker runs.
    pub fn access(&self) -> BrokerAccess {
        BrokerAccess {
            gate: Arc::clone(&self.gate),
        }
    }

    /// Revokes agent `id` now (see [`BrokerAccess::revoke_agent`]).
    pub async fn revoke_agent(&self, id: &str) -> bool {
        self.access().revoke_agent(id).await
    }

    /// How many CONNECTs, publishes, subscriptions, retained publishes and wills the ACL
    /// has refused (wrong credentials are not counted).
    pub fn denied_count(&self) -> u64 {
        self.gate.denied_count()
    }

    /// Closes the listeners, disconnects every client (MQTT 5 clients get a "server
    /// shutting down" DISCONNECT; persistent sessions are kept), flushes storage and waits
    /// for the broker's tasks, all within [`SHUTDOWN_TIMEOUT`]. If mqtt5 has not stopped
    /// by then it is aborted and an error returned; the ports are closed either way.
    pub async fn shutdown(mut self) -> anyhow::Result<()> {
        let started = Instant::now();
        let deadline = started + SHUTDOWN_TIMEOUT;
        let mut outcome = Ok(());

        // Our connections first: their handlers use mqtt5's router and storage.
        if let Some(shared) = self.shared.take() {
            shared.stop();
            let grace = deadline.min(started + CONNECTION_GRACE);
            let mut aborted = false;
            for listener in std::mem::take(&mut self.listeners) {
                aborted |= !listener.join(grace).await;
            }
            if aborted {
                tracing::debug!("aborted MQTT connections that did not leave in time");
            }
        }

        self.shutdown.shutdown();
        if let Some(mut run) = self.run.take() {
            match tokio::time::timeout_at(deadline, &mut run).await {
                Ok(Ok(Ok(()))) => {}
                Ok(Ok(Err(e))) => outcome = Err(anyhow!("the MQTT broker stopped with: {e}")),
                Ok(Err(e)) => outcome = Err(anyhow!("the MQTT broker task failed: {e}")),
                Err(_) => {
                    run.abort();
                    let _ = run.await;
                    outcome = Err(anyhow!(
                        "the MQTT broker did not stop within {SHUTDOWN_TIMEOUT:?}; aborted"
                    ));
                }
            }
        }

        // The data directory stays locked until the last user of the storage is gone.
        if let Some(storage) = self.storage.take() {
            while storage.strong_count() > 0 && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            if storage.strong_count() > 0 && outcome.is_ok() {
                outcome = Err(anyhow!(
                    "the MQTT broker's storage is still in use after shutdown"
                ));
            }
        }

        match &outcome {
            Ok(()) => tracing::info!(took = ?started.elapsed(), "MQTT broker stopped"),
            Err(e) => tracing::warn!("MQTT broker shutdown: {e:#}"),
        }
        outcome
    }
}

impl Drop for EmbeddedBroker {
    fn drop(&mut self) {
        // Not shut down: stop without waiting. The listeners abort their connections
        // when dropped.
        if let Some(shared) = self.shared.take() {
            shared.stop();
        }
        if self.run.is_some() {
            self.shutdown.shutdown();
        }
    }
}

/// The mqtt5 configuration for `config`.
fn mqtt_config(config: &BrokerConfig, gate: &Arc<Gate>) -> MqttConfig {
    // mqtt5 grants persistent sessions only when it has a storage backend.
    let storage = match &config.data_dir {
        Some(dir) => StorageConfig::new()
            .with_backend(MqttStorageBackend::File)
            .with_base_dir(dir.clone()),
        None => StorageConfig::new().with_backend(MqttStorageBackend::Memory),
    }
    .with_persistence(true);

    let mut mqtt = MqttConfig::new()
        // mqtt5's own (unused) listener; see the module documentation.
        .with_bind_address((Ipv4Addr::LOCALHOST, 0))
        .with_max_packet_size(config.max_packet_size)
        .with_max_clients(config.max_connections)
        .with_session_expiry(MAX_SESSION_EXPIRY)
        .with_storage(storage)
        .with_event_handler(Arc::clone(gate) as Arc<dyn BrokerEventHandler>);
    // Authentication is entirely ours (`with_auth_provider` replaces mqtt5's provider
    // before any client is accepted). mqtt5's per-IP failure lockout would let one
    // misconfigured agent behind a NAT lock out its neighbours, so it is off.
    mqtt.auth_config.rate_limit.enabled = false;
    mqtt
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mqtt::auth::Principal;
    use drover_protocol::topics::{self, Down, UP_FILTER, Up};
    use rumqttc::{AsyncClient, Event, MqttOptions, NetworkOptions, Packet, QoS};
    use std::sync::atomic::{AtomicU64, Ordering};
    use tokio::io::AsyncReadExt as _;
    use tokio::sync::mpsc;

    const STEP: Duration = Duration::from_secs(3);
    const QUIET: Duration = Duration::from_millis(400);

    /// Fails the test if `body` runs for more than 10 s.
    async fn bounded<F: std::future::Future<Output = ()>>(body: F) {
        tokio::time::timeout(Duration::from_secs(10), body)
            .await
            .expect("test took longer than 10 s");
    }

    struct TestAuth;

    impl Authenticator for TestAuth {
        fn authenticate(
            &self,
            _client_id: &str,
            username: &str,
            password: &[u8],
        ) -> Option<Principal> {
            match (username, password) {
                ("control", b"control-pw") => Some(Principal::Control),
                ("agent-a", b"pw-a") => Some(Principal::Agent("agent-a".into())),
                ("agent-b", b"pw-b") => Some(Principal::Agent("agent-b".into())),
                _ => None,
            }
        }
    }

    fn password(user: &str) -> &'static str {
        match user {
            "control" => "control-pw",
            "agent-a" => "pw-a",
            "agent-b" => "pw-b",
            _ => "nope",
        }
    }

    fn config() -> BrokerConfig {
        BrokerConfig {
            listen: "127.0.0.1:0".parse().unwrap(),
            tls: None,
            data_dir: None,
            max_packet_size: 1 << 20,
            max_connections: 1000,
        }
    }

    async fn start(config: BrokerConfig) -> EmbeddedBroker {
        EmbeddedBroker::start(config, Arc::new(TestAuth))
            .await
            .expect("broker starts")
    }

    struct TempDir(PathBuf);

    impl TempDir {
        fn new(tag: &str) -> TempDir {
            static N: AtomicU64 = AtomicU64::new(0);
            let dir = std::env::temp_dir().join(format!(
                "drover-embedded-{tag}-{}-{}",
                std::process::id(),
                N.fetch_add(1, Ordering::Relaxed)
            ));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            TempDir(dir)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    /// A rumqttc (MQTT 3.1.1) client whose event loop runs in its own task.
    struct Client {
        client: AsyncClient,
        events: mpsc::UnboundedReceiver<Result<Packet, String>>,
        task: JoinHandle<()>,
        session_present: bool,
    }

    fn options(addr: SocketAddr, client_id: &str, user: &str, clean: bool) -> MqttOptions {
        let mut opts = MqttOptions::new(client_id, addr.ip().to_string(), addr.port());
        opts.set_credentials(user, password(user))
            .set_clean_session(clean)
            .set_keep_alive(Duration::from_secs(5))
            .set_max_packet_size(1 << 20, 1 << 20);
        opts
    }

    async fn connect(
        addr: SocketAddr,
        client_id: &str,
        user: &str,
        clean: bool,
    ) -> Result<Client, String> {
        connect_with(options(addr, client_id, user, clean)).await
    }

    async fn connect_with(opts: MqttOptions) -> Result<Client, String> {
        let (client, mut eventloop) = AsyncClient::new(opts, 64);
        let mut net = NetworkOptions::new();
        net.set_tcp_nodelay(true);
        net.set_connection_timeout(3);
        eventloop.set_network_options(net);
        let (tx, mut events) = mpsc::unbounded_channel();
        let task = tokio::spawn(async move {
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(packet)) => {
                        if tx.send(Ok(packet)).is_err() {
                            break;
                        }
                    }
                    Ok(Event::Outgoing(_)) => {}
                    Err(e) => {
                        let _ = tx.send(Err(e.to_string()));
                        break;
                    }
                }
            }
        });
        match tokio::time::timeout(STEP, events.recv()).await {
            Ok(Some(Ok(Packet::ConnAck(ack)))) => Ok(Client {
                client,
                events,
                task,
                session_present: ack.session_present,
            }),
            other => {
                task.abort();
                Err(format!("{other:?}"))
            }
        }
    }

    impl Client {
        /// The next packet matching `pred`, within `STEP`.
        async fn expect(&mut self, what: &str, pred: impl Fn(&Packet) -> bool) -> Packet {
            let deadline = Instant::now() + STEP;
            loop {
                match tokio::time::timeout_at(deadline, self.events.recv()).await {
                    Ok(Some(Ok(p))) if pred(&p) => return p,
                    Ok(Some(Ok(_))) => {}
                    other => panic!("waiting for {what}: {other:?}"),
                }
            }
        }

        async fn subscribe(&mut self, filter: &str) {
            self.client
                .subscribe(filter, QoS::AtLeastOnce)
                .await
                .unwrap();
            self.expect("SUBACK", |p| matches!(p, Packet::SubAck(_)))
                .await;
        }

        async fn publish(&mut self, topic: &str, retain: bool, payload: &str) {
            self.client
                .publish(topic, QoS::AtLeastOnce, retain, payload.as_bytes().to_vec())
                .await
                .unwrap();
            self.expect("PUBACK", |p| matches!(p, Packet::PubAck(_)))
                .await;
        }

        /// The (topic, payload) of every publish received until `sentinel` arrives (or
        /// `STEP` passes), and for `QUIET` after it.
        async fn publishes_until(&mut self, sentinel: &str) -> Vec<(String, String)> {
            let mut got = Vec::new();
            let mut deadline = Instant::now() + STEP;
            let mut seen = false;
            while let Ok(Some(event)) = tokio::time::timeout_at(deadline, self.events.recv()).await
            {
                if let Ok(Packet::Publish(p)) = event {
                    let payload = String::from_utf8_lossy(&p.payload).into_owned();
                    if !seen && payload == sentinel {
                        seen = true;
                        deadline = Instant::now() + QUIET;
                    }
                    got.push((p.topic.clone(), payload));
                }
            }
            got
        }

        async fn disconnect(self) {
            let _ = self.client.disconnect().await;
            let mut task = self.task;
            if tokio::time::timeout(STEP, &mut task).await.is_err() {
                task.abort();
            }
        }

        /// True once the connection is gone (the event loop reported an error).
        async fn closed_within(&mut self, within: Duration) -> bool {
            let deadline = Instant::now() + within;
            loop {
                match tokio::time::timeout_at(deadline, self.events.recv()).await {
                    Ok(Some(Ok(_))) => {}
                    Ok(Some(Err(_)) | None) => return true,
                    Err(_) => return false,
                }
            }
        }
    }

    #[test]
    fn start_and_shutdown_futures_are_send() {
        fn assert_send<T: Send>(_: &T) {}
        let start = EmbeddedBroker::start(config(), Arc::new(TestAuth));
        assert_send(&start);
        fn shutdown_is_send(b: EmbeddedBroker) {
            assert_send(&b.shutdown());
        }
        let _ = shutdown_is_send;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn wrong_password_is_refused_right_one_connects() {
        bounded(async {
            let broker = start(config()).await;
            let addr = broker.local_addr();

            let mut wrong = options(addr, "control-1", "control", true);
            wrong.set_credentials("control", "not-the-password");
            assert!(
                connect_with(wrong).await.is_err(),
                "wrong password accepted"
            );

            let mut unknown = options(addr, "mallory", "control", true);
            unknown.set_credentials("mallory", "control-pw");
            assert!(
                connect_with(unknown).await.is_err(),
                "unknown user accepted"
            );

            let mut anonymous = MqttOptions::new("anon", addr.ip().to_string(), addr.port());
            anonymous.set_keep_alive(Duration::from_secs(5));
            assert!(
                connect_with(anonymous).await.is_err(),
                "anonymous client accepted"
            );

            let control = connect(addr, "control-1", "control", true)
                .await
                .expect("control connects");
            let agent = connect(addr, "agent-a", "agent-a", true)
                .await
                .expect("agent connects");
            control.disconnect().await;
            agent.disconnect().await;
            broker.shutdown().await.unwrap();
        })
        .await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn agent_cannot_read_another_agents_down_topics() {
        bounded(async {
            let broker = start(config()).await;
            let addr = broker.local_addr();
            let mut control = connect(addr, "control-1", "control", true).await.unwrap();
            let mut a = connect(addr, "agent-a", "agent-a", true).await.unwrap();
            let mut b = connect(addr, "agent-b", "agent-b", true).await.unwrap();

            let denied_before = broker.denied_count();
            // Each may be acknowledged (with a failure code): what counts is what arrives.
            for filter in [
                "drover/v1/agents/+/down/#",
                "#",
                "drover/#",
                "drover/v1/agents/agent-b/down/#",
            ] {
                a.subscribe(filter).await;
            }
            a.subscribe(&topics::down_filter("agent-a")).await;
            b.subscribe(&topics::down_filter("agent-b")).await;
            assert!(
                broker.denied_count() >= denied_before + 4,
                "denials not counted"
            );

            control
                .publish(&topics::down("agent-b", Down::Job), false, "for-b")
                .await;
            control
                .publish(&topics::down("agent-a", Down::Job), false, "for-a")
                .await;

            let got_a = a.publishes_until("for-a").await;
            assert_eq!(
                got_a,
                vec![(topics::down("agent-a", Down::Job), "for-a".to_string())],
                "agent A received something other than exactly its own message"
            );
            let got_b = b.publishes_until("for-b").await;
            assert_eq!(
                got_b,
                vec![(topics::down("agent-b", Down::Job), "for-b".to_string())]
            );

            for c in [control, a, b] {
                c.disconnect().await;
            }
            broker.shutdown().await.unwrap();
        })
        .await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn agent_cannot_publish_as_another_agent_or_retain_outside_status() {
        bounded(async {
            let broker = start(config()).await;
            let addr = broker.local_addr();
            let mut control = connect(addr, "control-1", "control", true).await.unwrap();
            control.subscribe(UP_FILTER).await;
            let mut a = connect(addr, "agent-a", "agent-a", true).await.unwrap();

            let denied_before = broker.denied_count();
            a.publish(&topics::up("agent-b", Up::Result), false, "forged")
                .await;
            a.publish(&topics::down("agent-b", Down::Job), false, "forged-down")
                .await;
            a.publish(&topics::up("agent-a", Up::Hello), true, "retained-hello")
                .await;
            a.publish(&topics::up("agent-a", Up::Status), true, "online")
                .await;
            a.publish(&topics::up("agent-a", Up::Result), false, "mine")
                .await;
            assert_eq!(broker.denied_count(), denied_before + 3);

            let got = control.publishes_until("mine").await;
            assert_eq!(
                got,
                vec![
                    (topics::up("agent-a", Up::Status), "online".to_string()),
                    (topics::up("agent-a", Up::Result), "mine".to_string()),
                ],
                "control received a forged or forbidden message"
            );

            // Only the status was retained: a late subscriber sees just that.
            let mut late = connect(addr, "control-2", "control", true).await.unwrap();
            late.subscribe(UP_FILTER).await;
            let retained = late.publishes_until("online").await;
            assert_eq!(
                retained,
                vec![(topics::up("agent-a", Up::Status), "online".to_string())]
            );

            for c in [control, a, late] {
                c.disconnect().await;
            }
            broker.shutdown().await.unwrap();
        })
        .await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn agent_client_id_is_bound_to_its_credential() {
        bounded(async {
            let broker = start(config()).await;
            let addr = broker.local_addr();
            assert!(
                connect(addr, "agent-b", "agent-a", true).await.is_err(),
                "agent-a connected as agent-b"
            );
            assert!(
                connect(addr, "something-else", "agent-a", true)
                    .await
                    .is_err()
            );
            assert!(broker.denied_count() >= 2);
            let a = connect(addr, "agent-a", "agent-a", true)
                .await
                .expect("own id connects");
            a.disconnect().await;
            broker.shutdown().await.unwrap();
        })
        .await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn forbidden_last_will_is_refused_at_connect() {
        bounded(async {
            let broker = start(config()).await;
            let addr = broker.local_addr();
            let mut opts = options(addr, "agent-a", "agent-a", true);
            opts.set_last_will(rumqttc::LastWill::new(
                topics::up("agent-b", Up::Status),
                "offline",
                QoS::AtLeastOnce,
                true,
            ));
            assert!(
                connect_with(opts).await.is_err(),
                "will on another agent's topic accepted"
            );

            let mut opts = options(addr, "agent-a", "agent-a", true);
            opts.set_last_will(rumqttc::LastWill::new(
                topics::up("agent-a", Up::Result),
                "x",
                QoS::AtLeastOnce,
                true,
            ));
            assert!(
                connect_with(opts).await.is_err(),
                "retained will outside status accepted"
            );

            // The presence will: retained `offline` on its own status topic.
            let mut control = connect(addr, "control-1", "control", true).await.unwrap();
            control.subscribe(UP_FILTER).await;
            let mut opts = options(addr, "agent-a", "agent-a", true);
            opts.set_last_will(rumqttc::LastWill::new(
                topics::up("agent-a", Up::Status),
                "offline",
                QoS::AtLeastOnce,
                true,
            ));
            let a = connect_with(opts).await.expect("presence will accepted");
            a.task.abort(); // vanish without DISCONNECT: the will fires
            let got = control.publishes_until("offline").await;
            assert_eq!(
                got,
                vec![(topics::up("agent-a", Up::Status), "offline".to_string())]
            );
            control.disconnect().await;
            broker.shutdown().await.unwrap();
        })
        .await;
    }

    /// Agent subscribes with a persistent session, leaves; control publishes; the agent
    /// comes back and gets it.
    async fn queued_while_offline(addr: SocketAddr) -> Client {
        let mut a = connect(addr, "agent-a", "agent-a", false).await.unwrap();
        a.subscribe(&topics::down_filter("agent-a")).await;
        a.disconnect().await;
        let mut control = connect(addr, "control-1", "control", true).await.unwrap();
        control
            .publish(&topics::down("agent-a", Down::Job), false, "queued-job")
            .await;
        control.disconnect().await;
        a = connect(addr, "agent-a", "agent-a", false).await.unwrap();
        assert!(a.session_present, "session not resumed");
        a
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn persistent_session_gets_messages_queued_while_offline() {
        bounded(async {
            let broker = start(config()).await;
            let mut a = queued_while_offline(broker.local_addr()).await;
            let got = a.publishes_until("queued-job").await;
            assert_eq!(
                got,
                vec![(topics::down("agent-a", Down::Job), "queued-job".to_string())]
            );
            a.disconnect().await;
            broker.shutdown().await.unwrap();
        })
        .await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn persistent_session_and_queue_survive_a_restart_with_data_dir() {
        bounded(async {
            let dir = TempDir::new("restart");
            let cfg = BrokerConfig {
                data_dir: Some(dir.0.clone()),
                ..config()
            };
            let broker = start(cfg.clone()).await;
            let addr = broker.local_addr();
            let mut a = connect(addr, "agent-a", "agent-a", false).await.unwrap();
            a.subscribe(&topics::down_filter("agent-a")).await;
            a.disconnect().await;
            let mut control = connect(addr, "control-1", "control", true).await.unwrap();
            control
                .publish(&topics::down("agent-a", Down::Job), false, "survives")
                .await;
            control.disconnect().await;
            broker.shutdown().await.unwrap();

            // Same data directory: the lock must have been released.
            let broker = start(cfg).await;
            let mut a = connect(broker.local_addr(), "agent-a", "agent-a", false)
                .await
                .unwrap();
            assert!(a.session_present, "session lost in the restart");
            let got = a.publishes_until("survives").await;
            assert_eq!(
                got,
                vec![(topics::down("agent-a", Down::Job), "survives".to_string())]
            );
            a.disconnect().await;
            broker.shutdown().await.unwrap();
        })
        .await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn mqtt5_and_mqtt311_clients_share_the_port() {
        use rumqttc::v5::mqttbytes::QoS as QoS5;
        use rumqttc::v5::mqttbytes::v5::Packet as Packet5;
        use rumqttc::v5::{
            AsyncClient as AsyncClient5, Event as Event5, MqttOptions as MqttOptions5,
        };

        bounded(async {
            let broker = start(config()).await;
            let addr = broker.local_addr();

            // The control plane speaks MQTT 5.
            let mut opts = MqttOptions5::new("control-5", addr.ip().to_string(), addr.port());
            opts.set_credentials("control", "control-pw");
            opts.set_keep_alive(Duration::from_secs(5));
            let mut net = NetworkOptions::new();
            net.set_tcp_nodelay(true);
            net.set_connection_timeout(3);
            opts.set_network_options(net);
            let (control, mut eventloop) = AsyncClient5::new(opts, 64);
            let (tx, mut events) = mpsc::unbounded_channel();
            let task = tokio::spawn(async move {
                while let Ok(event) = eventloop.poll().await {
                    if let Event5::Incoming(p) = event
                        && tx.send(p).is_err()
                    {
                        break;
                    }
                }
            });
            let mut next5 = async |what: &str, pred: &dyn Fn(&Packet5) -> bool| -> Packet5 {
                let deadline = Instant::now() + STEP;
                loop {
                    match tokio::time::timeout_at(deadline, events.recv()).await {
                        Ok(Some(p)) if pred(&p) => return p,
                        Ok(Some(_)) => {}
                        other => panic!("waiting for {what}: {other:?}"),
                    }
                }
            };
            next5("CONNACK", &|p| matches!(p, Packet5::ConnAck(_))).await;
            control
                .subscribe(UP_FILTER, QoS5::AtLeastOnce)
                .await
                .unwrap();
            next5("SUBACK", &|p| matches!(p, Packet5::SubAck(_))).await;

            // The agent speaks MQTT 3.1.1.
            let mut a = connect(addr, "agent-a", "agent-a", true).await.unwrap();
            a.subscribe(&topics::down_filter("agent-a")).await;

            control
                .publish(
                    topics::down("agent-a", Down::Job),
                    QoS5::AtLeastOnce,
                    false,
                    "job-from-v5",
                )
                .await
                .unwrap();
            let got = a.publishes_until("job-from-v5").await;
            assert_eq!(
                got,
                vec![(
                    topics::down("agent-a", Down::Job),
                    "job-from-v5".to_string()
                )]
            );

            a.publish(
                &topics::up("agent-a", Up::Result),
                false,
                "result-from-v311",
            )
            .await;
            let p = next5("PUBLISH", &|p| matches!(p, Packet5::Publish(_))).await;
            let Packet5::Publish(p) = p else {
                unreachable!()
            };
            assert_eq!(&p.topic[..], topics::up("agent-a", Up::Result).as_bytes());
            assert_eq!(&p.payload[..], b"result-from-v311");
            // The broker stamps the authenticated sender on MQTT 5 deliveries.
            let sender = p
                .properties
                .as_ref()
                .map(|props| props.user_properties.clone())
                .unwrap_or_default()
                .into_iter()
                .find(|(k, _)| k == "x-mqtt-sender");
            assert_eq!(
                sender,
                Some(("x-mqtt-sender".to_string(), "agent:agent-a".to_string()))
            );

            let _ = control.disconnect().await;
            task.abort();
            a.disconnect().await;
            broker.shutdown().await.unwrap();
        })
        .await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn shutdown_is_bounded_and_frees_the_port() {
        bounded(async {
            let broker = start(config()).await;
            let addr = broker.local_addr();
            let mut control = connect(addr, "control-1", "control", true).await.unwrap();
            control.subscribe(UP_FILTER).await;
            // An idle socket that never sends CONNECT must not hold the shutdown up.
            let _idle = tokio::net::TcpStream::connect(addr).await.unwrap();

            let started = Instant::now();
            broker.shutdown().await.expect("clean shutdown");
            let took = started.elapsed();
            assert!(took < SHUTDOWN_TIMEOUT, "shutdown took {took:?}");
            assert!(
                control.closed_within(STEP).await,
                "client still connected after shutdown"
            );

            // The same port can be bound again at once.
            let again = start(BrokerConfig {
                listen: addr,
                ..config()
            })
            .await;
            assert_eq!(again.local_addr(), addr);
            let c = connect(addr, "control-1", "control", true)
                .await
                .expect("connects to the new broker");
            c.disconnect().await;
            again.shutdown().await.unwrap();
        })
        .await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn tls_listener_is_not_blocked_by_an_idle_socket() {
        use rumqttc::{TlsConfiguration, Transport};
        use tokio_rustls::rustls;

        bounded(async {
            let dir = TempDir::new("tls");
            let cert = rcgen::generate_simple_self_signed(vec![
                "localhost".to_string(),
                "127.0.0.1".to_string(),
            ])
            .unwrap();
            let (cert_pem, key_pem) = (dir.0.join("cert.pem"), dir.0.join("key.pem"));
            std::fs::write(&cert_pem, cert.cert.pem()).unwrap();
            std::fs::write(&key_pem, cert.signing_key.serialize_pem()).unwrap();

            let handshake_timeout = Duration::from_secs(2);
            let broker = start(BrokerConfig {
                tls: Some(TlsListener {
                    listen: "127.0.0.1:0".parse().unwrap(),
                    cert_pem,
                    key_pem,
                    handshake_timeout,
                }),
                ..config()
            })
            .await;
            let tls_addr = broker.tls_addr().expect("TLS listener");

            // A socket that connects and then says nothing.
            let mut idle = tokio::net::TcpStream::connect(tls_addr).await.unwrap();
            let idle_since = Instant::now();

            let mut roots = rustls::RootCertStore::empty();
            roots.add(cert.cert.der().clone()).unwrap();
            let client_config = rustls::ClientConfig::builder_with_provider(Arc::new(
                rustls::crypto::ring::default_provider(),
            ))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();

            let started = Instant::now();
            let mut opts = options(tls_addr, "agent-a", "agent-a", true);
            opts.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(
                Arc::new(client_config),
            )));
            let mut a = connect_with(opts)
                .await
                .expect("TLS client connects past the idle socket");
            a.subscribe(&topics::down_filter("agent-a")).await;

            // Round trip through the plain listener and back over TLS.
            let mut control = connect(broker.local_addr(), "control-1", "control", true)
                .await
                .unwrap();
            control.subscribe(UP_FILTER).await;
            control
                .publish(&topics::down("agent-a", Down::Job), false, "over-tls")
                .await;
            let got = a.publishes_until("over-tls").await;
            assert_eq!(
                got,
                vec![(topics::down("agent-a", Down::Job), "over-tls".to_string())]
            );
            a.publish(&topics::up("agent-a", Up::Result), false, "from-tls")
                .await;
            let got = control.publishes_until("from-tls").await;
            assert_eq!(
                got,
                vec![(topics::up("agent-a", Up::Result), "from-tls".to_string())]
            );
            let took = started.elapsed();
            assert!(
                took < Duration::from_secs(3),
                "TLS round trip took {took:?}"
            );
            assert!(
                idle_since.elapsed() < handshake_timeout,
                "the idle socket timed out before the check"
            );

            // The ACL applies over TLS as well.
            let denied_before = broker.denied_count();
            a.publish(&topics::up("agent-b", Up::Result), false, "forged")
                .await;
            assert_eq!(broker.denied_count(), denied_before + 1);

            // The idle socket is dropped once the handshake timeout passes.
            let mut buf = [0u8; 16];
            let read = tokio::time::timeout(
                handshake_timeout + Duration::from_secs(2),
                idle.read(&mut buf),
            )
            .await
            .expect("idle socket still open after the handshake timeout");
            assert!(
                matches!(read, Ok(0) | Err(_)),
                "unexpected data on the idle socket: {read:?}"
            );
            assert!(idle_since.elapsed() >= handshake_timeout);

            a.disconnect().await;
            control.disconnect().await;
            let started = Instant::now();
            broker.shutdown().await.unwrap();
            assert!(started.elapsed() < SHUTDOWN_TIMEOUT);
        })
        .await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn start_refuses_bad_config() {
        bounded(async {
            let err = EmbeddedBroker::start(
                BrokerConfig {
                    max_packet_size: 10,
                    ..config()
                },
                Arc::new(TestAuth),
            )
            .await
            .unwrap_err();
            assert!(err.to_string().contains("max_packet_size"), "{err:#}");

            let err = EmbeddedBroker::start(
                BrokerConfig {
                    tls: Some(TlsListener {
                        listen: "127.0.0.1:0".parse().unwrap(),
                        cert_pem: "/nonexistent/cert.pem".into(),
                        key_pem: "/nonexistent/key.pem".into(),
                        handshake_timeout: Duration::from_secs(1),
                    }),
                    ..config()
                },
                Arc::new(TestAuth),
            )
            .await
            .unwrap_err();
            assert!(err.to_string().contains("cert.pem"), "{err:#}");
        })
        .await;
    }

    /// [`TestAuth`] behind a credential store that can delete users and be slow.
    #[derive(Default)]
    struct StoreAuth {
        deleted: std::sync::Mutex<std::collections::HashSet<String>>,
        delay_ms: AtomicU64,
        checks: AtomicU64,
    }

    impl StoreAuth {
        fn set_deleted(&self, user: &str, deleted: bool) {
            let mut d = self.deleted.lock().unwrap();
            if deleted {
                d.insert(user.to_string());
            } else {
                d.remove(user);
            }
        }
    }

    impl Authenticator for StoreAuth {
        fn authenticate(&self, client_id: &str, user: &str, password: &[u8]) -> Option<Principal> {
            self.checks.fetch_add(1, Ordering::SeqCst);
            std::thread::sleep(Duration::from_millis(self.delay_ms.load(Ordering::SeqCst)));
            if self.deleted.lock().unwrap().contains(user) {
                return None;
            }
            TestAuth.authenticate(client_id, user, password)
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_revoked_agent_is_dropped_refused_and_marked_offline() {
        bounded(async {
            let auth = Arc::new(StoreAuth::default());
            let broker = EmbeddedBroker::start(config(), Arc::clone(&auth) as _)
                .await
                .unwrap();
            let addr = broker.local_addr();
            let mut control = connect(addr, "control-1", "control", true).await.unwrap();
            control.subscribe(UP_FILTER).await;
            let mut a = connect(addr, "agent-a", "agent-a", false).await.unwrap();
            a.subscribe(&topics::down_filter("agent-a")).await;
            let mut b = connect(addr, "agent-b", "agent-b", true).await.unwrap();

            // Deregistration: the credential goes, then the broker revokes.
            auth.set_deleted("agent-a", true);
            assert!(
                broker.revoke_agent("agent-a").await,
                "agent-a was connected"
            );
            assert!(
                a.closed_within(STEP).await,
                "still connected after revocation"
            );
            // The status its will would have set, retained; the will itself is denied.
            let offline = r#"{"state":"offline"}"#;
            let got = control.publishes_until(offline).await;
            assert_eq!(
                got,
                vec![(topics::up("agent-a", Up::Status), offline.to_string())]
            );
            assert!(connect(addr, "agent-a", "agent-a", true).await.is_err());

            // A credential check that began before the revocation (and so still saw the
            // credential) does not let it in.
            auth.set_deleted("agent-a", false);
            auth.delay_ms.store(1500, Ordering::SeqCst);
            let checks = auth.checks.load(Ordering::SeqCst);
            let racing = tokio::spawn(connect(addr, "agent-a", "agent-a", true));
            while auth.checks.load(Ordering::SeqCst) == checks {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            broker.revoke_agent("agent-a").await;
            assert!(
                racing.await.unwrap().is_err(),
                "a connection authenticated before the revocation got in"
            );
            auth.delay_ms.store(0, Ordering::SeqCst);
            assert_eq!(control.publishes_until(offline).await.len(), 1);

            // A check that began after it passed with a new credential: admitted again.
            let mut a = connect(addr, "agent-a", "agent-a", true)
                .await
                .expect("a new credential is accepted");
            a.publish(&topics::up("agent-a", Up::Result), false, "back")
                .await;
            let got = control.publishes_until("back").await;
            assert_eq!(
                got,
                vec![(topics::up("agent-a", Up::Result), "back".into())]
            );

            // Others were never touched.
            b.publish(&topics::up("agent-b", Up::Result), false, "b-still-here")
                .await;
            control.publishes_until("b-still-here").await;
            assert!(!broker.revoke_agent("nobody").await);
            for c in [a, b, control] {
                c.disconnect().await;
            }
            broker.shutdown().await.unwrap();
        })
        .await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn connections_beyond_max_connections_are_refused() {
        bounded(async {
            let broker = start(BrokerConfig {
                max_connections: 1,
                ..config()
            })
            .await;
            let addr = broker.local_addr();
            let mut a = connect(addr, "agent-a", "agent-a", true).await.unwrap();
            // mqtt5 counts a client after its CONNACK; a SUBACK comes after that.
            a.subscribe(&topics::down_filter("agent-a")).await;
            assert!(connect(addr, "agent-b", "agent-b", true).await.is_err());
            a.disconnect().await;
            broker.shutdown().await.unwrap();
        })
        .await;
    }
}
