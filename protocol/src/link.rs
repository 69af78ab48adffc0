//! The MQTT connection both `drover-agent` and `drover` use (feature `link`).
//!
//! rumqttc reconnects inside `EventLoop::poll()` with no backoff of its own, so one task
//! owns the event loop: it polls, backs off with jitter when the broker is away,
//! re-subscribes and re-publishes the on-connect messages after every CONNACK, and hands
//! incoming publishes to the owner over a bounded channel. Everyone else talks to the
//! connection through a cloneable [`LinkHandle`].

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::Bytes;
use rumqttc::{
    AsyncClient, Event, EventLoop, LastWill, MqttOptions, Packet, QoS, SubscribeFilter, Transport,
};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// Where the broker is: `mqtt://host:port` or `mqtts://host:port`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerUrl {
    /// Host name or address.
    pub host: String,
    /// TCP port.
    pub port: u16,
    /// Whether to speak TLS.
    pub tls: bool,
}

impl std::str::FromStr for BrokerUrl {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (tls, rest) = if let Some(r) = s.strip_prefix("mqtts://") {
            (true, r)
        } else if let Some(r) = s.strip_prefix("mqtt://") {
            (false, r)
        } else {
            return Err(format!(
                "broker URL {s:?} must start with mqtt:// or mqtts://"
            ));
        };
        let rest = rest.trim_end_matches('/');
        let (host, port) = match rest.rsplit_once(':') {
            Some((h, p)) if !h.ends_with(']') || h.starts_with('[') => (
                h,
                p.parse::<u16>()
                    .map_err(|_| format!("bad port in broker URL {s:?}"))?,
            ),
            _ => (rest, if tls { 8883 } else { 1883 }),
        };
        let host = host.trim_start_matches('[').trim_end_matches(']');
        if host.is_empty() {
            return Err(format!("no host in broker URL {s:?}"));
        }
        Ok(BrokerUrl {
            host: host.to_string(),
            port,
            tls,
        })
    }
}

impl std::fmt::Display for BrokerUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let scheme = if self.tls { "mqtts" } else { "mqtt" };
        if self.host.contains(':') {
            write!(f, "{scheme}://[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{scheme}://{}:{}", self.host, self.port)
        }
    }
}

/// A message published every time the connection comes up.
#[derive(Debug, Clone)]
pub struct Publication {
    /// The topic.
    pub topic: String,
    /// The payload.
    pub payload: Vec<u8>,
    /// Whether the broker keeps it.
    pub retain: bool,
}

/// What to publish each time the connection comes up, made afresh at each connect (so a
/// signed announcement can carry the time it was sent).
#[derive(Clone)]
pub struct OnConnect(Arc<dyn Fn() -> Vec<Publication> + Send + Sync>);

impl OnConnect {
    /// Nothing.
    pub fn none() -> OnConnect {
        OnConnect::new(Vec::new)
    }

    /// What `make` returns, called at every connect.
    pub fn new(make: impl Fn() -> Vec<Publication> + Send + Sync + 'static) -> OnConnect {
        OnConnect(Arc::new(make))
    }

    /// The publications for this connect.
    pub fn make(&self) -> Vec<Publication> {
        (self.0)()
    }
}

impl std::fmt::Debug for OnConnect {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("OnConnect")
    }
}

/// How to connect.
#[derive(Debug, Clone)]
pub struct LinkOptions {
    /// The broker.
    pub broker: BrokerUrl,
    /// CA certificates (PEM) to trust for `mqtts://`; the system has none built in here.
    pub ca_file: Option<PathBuf>,
    /// The MQTT client id.
    pub client_id: String,
    /// Username and password, if the broker wants them.
    pub credentials: Option<(String, String)>,
    /// Keep-alive interval: how fast a dead link is noticed.
    pub keep_alive: Duration,
    /// Largest packet accepted. A larger incoming packet kills the connection (and a
    /// persistent session redelivers it forever), so be generous.
    pub max_incoming_packet: usize,
    /// Largest packet sent; larger publishes fail.
    pub max_outgoing_packet: usize,
    /// Whether to keep the session (and queued QoS 1 messages) across disconnects.
    pub persistent_session: bool,
    /// Published by the broker if the connection dies.
    pub last_will: Option<Publication>,
    /// Subscribed (QoS 1, in one SUBSCRIBE) after every connect.
    pub subscriptions: Vec<String>,
    /// Unsubscribed after every connect, once `subscriptions` are in place: filters that
    /// an older version left in a persistent session.
    pub unsubscriptions: Vec<String>,
    /// Published (QoS 1) after every connect, after subscribing; made afresh each time.
    pub on_connect: OnConnect,
    /// Capacity of the incoming-message channel.
    pub incoming_capacity: usize,
}

/// A publish received from the broker.
#[derive(Debug, Clone)]
pub struct Incoming {
    /// The topic.
    pub topic: String,
    /// The payload.
    pub payload: Bytes,
}

/// A cloneable handle for publishing on the connection.
#[derive(Clone, Debug)]
pub struct LinkHandle {
    client: AsyncClient,
    connected: Arc<AtomicBool>,
}

/// Why a publish could not be queued.
#[derive(Debug, thiserror::Error)]
#[error("could not queue MQTT publish: {0}")]
pub struct PublishError(String);

impl LinkHandle {
    /// Queues a QoS 1 publish. Returns once rumqttc has it, not when the broker does.
    pub async fn publish(
        &self,
        topic: impl Into<String>,
        payload: impl Into<Vec<u8>>,
        retain: bool,
    ) -> Result<(), PublishError> {
        self.publish_with(topic.into(), payload.into(), QoS::AtLeastOnce, retain)
            .await
    }

    /// Queues a QoS 0 publish: at most once, with no broker state and no PUBACK. Only for
    /// messages whose loss the other side repairs by asking again (a result's ack: an
    /// unacknowledged result is sent again, and acknowledged again).
    pub async fn publish_at_most_once(
        &self,
        topic: impl Into<String>,
        payload: impl Into<Vec<u8>>,
    ) -> Result<(), PublishError> {
        self.publish_with(topic.into(), payload.into(), QoS::AtMostOnce, false)
            .await
    }

    async fn publish_with(
        &self,
        topic: String,
        payload: Vec<u8>,
        qos: QoS,
        retain: bool,
    ) -> Result<(), PublishError> {
        self.client
            .publish(topic, qos, retain, payload)
            .await
            .map_err(|e| PublishError(e.to_string()))
    }

    /// Queues a QoS 1 publish without waiting: fails at once when the client's queue is
    /// full. For what may be dropped (progress, live output), never for results.
    pub fn try_publish(
        &self,
        topic: impl Into<String>,
        payload: impl Into<Vec<u8>>,
    ) -> Result<(), PublishError> {
        let payload: Vec<u8> = payload.into();
        self.client
            .try_publish(topic.into(), QoS::AtLeastOnce, false, payload)
            .map_err(|e| PublishError(e.to_string()))
    }

    /// Whether the last thing the event loop saw was a successful connect.
    pub fn is_connected(&self) -> bool {
        self.connected.load(Ordering::Relaxed)
    }

    /// Sends DISCONNECT, so the broker does not publish the last will.
    pub async fn disconnect(&self) {
        let _ = self.client.disconnect().await;
    }
}

fn tls_config(
    ca_file: Option<&PathBuf>,
) -> Result<Arc<tokio_rustls::rustls::ClientConfig>, String> {
    use rustls_pki_types::CertificateDer;
    use rustls_pki_types::pem::PemObject as _;
    use tokio_rustls::rustls;

    let mut roots = rustls::RootCertStore::empty();
    if let Some(path) = ca_file {
        let certs = CertificateDer::pem_file_iter(path)
            .map_err(|e| format!("CA file {}: {e}", path.display()))?;
        for cert in certs {
            let cert = cert.map_err(|e| format!("CA file {}: {e}", path.display()))?;
            roots
                .add(cert)
                .map_err(|e| format!("CA file {}: {e}", path.display()))?;
        }
    }
    if roots.is_empty() {
        return Err("mqtts:// needs a CA file (--ca-file) to trust the broker".into());
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// Starts the connection task. It runs until `shutdown` is cancelled, then disconnects
/// cleanly (so the last will is not sent) and ends.
pub fn spawn(
    opts: LinkOptions,
    shutdown: CancellationToken,
) -> Result<
    (
        LinkHandle,
        mpsc::Receiver<Incoming>,
        tokio::task::JoinHandle<()>,
    ),
    String,
> {
    let mut mqtt = MqttOptions::new(
        opts.client_id.clone(),
        opts.broker.host.clone(),
        opts.broker.port,
    );
    mqtt.set_keep_alive(opts.keep_alive)
        .set_clean_session(!opts.persistent_session)
        .set_max_packet_size(opts.max_incoming_packet, opts.max_outgoing_packet)
        .set_inflight(100)
        .set_request_channel_capacity(1024);
    if let Some((user, pass)) = &opts.credentials {
        mqtt.set_credentials(user.clone(), pass.clone());
    }
    if let Some(will) = &opts.last_will {
        mqtt.set_last_will(LastWill::new(
            will.topic.clone(),
            will.payload.clone(),
            QoS::AtLeastOnce,
            will.retain,
        ));
    }
    if opts.broker.tls {
        mqtt.set_transport(Transport::tls_with_config(
            rumqttc::TlsConfiguration::Rustls(tls_config(opts.ca_file.as_ref())?),
        ));
    }
    let (client, mut eventloop) = AsyncClient::new(mqtt, 1024);
    let mut net = rumqttc::NetworkOptions::new();
    net.set_tcp_nodelay(true);
    net.set_connection_timeout(10);
    eventloop.set_network_options(net);

    let (tx, rx) = mpsc::channel(opts.incoming_capacity.max(1));
    let connected = Arc::new(AtomicBool::new(false));
    let handle = LinkHandle {
        client: client.clone(),
        connected: connected.clone(),
    };
    // In the caller's span: its log lines say whose connection it is (a simulated fleet
    // runs many in one process).
    let task = tokio::spawn(tracing::Instrument::in_current_span(run(
        eventloop, client, opts, tx, connected, shutdown,
    )));
    Ok((handle, rx, task))
}

/// Exponential backoff, 100 ms doubling to 30 s, with ±50 % jitter.
fn backoff(attempt: u32) -> Duration {
    let base = 100u64.saturating_mul(1u64 << attempt.min(9)).min(30_000);
    let mut b = [0u8; 2];
    let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b);
    let jitter = u16::from_be_bytes(b) as u64 % (base + 1);
    Duration::from_millis(base / 2 + jitter)
}

async fn run(
    mut eventloop: EventLoop,
    client: AsyncClient,
    opts: LinkOptions,
    tx: mpsc::Sender<Incoming>,
    connected: Arc<AtomicBool>,
    shutdown: CancellationToken,
) {
    let mut failures: u32 = 0;
    loop {
        let event = tokio::select! {
            _ = shutdown.cancelled() => break,
            ev = eventloop.poll() => ev,
        };
        match event {
            Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                failures = 0;
                connected.store(true, Ordering::Relaxed);
                tracing::info!(
                    broker = %opts.broker,
                    client_id = %opts.client_id,
                    session_present = ack.session_present,
                    "connected to broker"
                );
                // Never await the client from this task: its request channel is drained
                // by this very loop.
                let client = client.clone();
                let subs = opts.subscriptions.clone();
                let unsubs = opts.unsubscriptions.clone();
                let pubs = opts.on_connect.make();
                tokio::spawn(tracing::Instrument::in_current_span(async move {
                    if !subs.is_empty() {
                        let filters = subs
                            .iter()
                            .map(|f| SubscribeFilter::new(f.clone(), QoS::AtLeastOnce));
                        if let Err(e) = client.subscribe_many(filters).await {
                            tracing::warn!(filters = ?subs, error = %e, "subscribe failed");
                        }
                    }
                    for filter in unsubs {
                        if let Err(e) = client.unsubscribe(filter.clone()).await {
                            tracing::warn!(%filter, error = %e, "unsubscribe failed");
                        }
                    }
                    for p in pubs {
                        if let Err(e) = client
                            .publish(p.topic.clone(), QoS::AtLeastOnce, p.retain, p.payload)
                            .await
                        {
                            tracing::warn!(topic = %p.topic, error = %e, "publish failed");
                        }
                    }
                }));
            }
            Ok(Event::Incoming(Packet::Publish(p))) => {
                let topic = p.topic;
                let msg = Incoming {
                    topic,
                    payload: p.payload,
                };
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    r = tx.send(msg) => if r.is_err() { break },
                }
            }
            Ok(Event::Incoming(Packet::Disconnect)) => {
                connected.store(false, Ordering::Relaxed);
                tracing::warn!(broker = %opts.broker, "broker sent DISCONNECT");
            }
            Ok(_) => {}
            Err(e) => {
                connected.store(false, Ordering::Relaxed);
                let wait = backoff(failures);
                failures = failures.saturating_add(1);
                if failures <= 3 || failures.is_power_of_two() {
                    tracing::warn!(
                        broker = %opts.broker,
                        error = %e,
                        retry_in_ms = wait.as_millis() as u64,
                        attempt = failures,
                        "broker connection failed"
                    );
                }
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tokio::time::sleep(wait) => {}
                }
            }
        }
    }
    connected.store(false, Ordering::Relaxed);
    // A clean DISCONNECT: the broker drops the last will. Drive the loop until the
    // packet is out, bounded so a dead broker cannot hold shutdown up.
    if client.try_disconnect().is_ok() {
        let _ = tokio::time::timeout(Duration::from_secs(2), async {
            loop {
                match eventloop.poll().await {
                    Ok(Event::Outgoing(rumqttc::Outgoing::Disconnect)) | Err(_) => break,
                    Ok(_) => {}
                }
            }
        })
        .await;
    }
}

/// Resolves on SIGINT or SIGTERM: how both daemons learn to shut down.
pub async fn terminated() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "cannot watch SIGTERM; only Ctrl-C stops this process");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn broker_urls() {
        let u: BrokerUrl = "mqtt://127.0.0.1:1884".parse().unwrap();
        assert_eq!(u.host, "127.0.0.1");
        assert_eq!(u.port, 1884);
        assert!(!u.tls);
        let u: BrokerUrl = "mqtts://broker.example".parse().unwrap();
        assert_eq!(u.port, 8883);
        assert!(u.tls);
        assert_eq!(u.to_string(), "mqtts://broker.example:8883");
        let u: BrokerUrl = "mqtt://[::1]:1883".parse().unwrap();
        assert_eq!(u.host, "::1");
        assert!("tcp://x".parse::<BrokerUrl>().is_err());
        assert!("mqtt://x:notaport".parse::<BrokerUrl>().is_err());
    }

    #[test]
    fn backoff_grows_and_is_bounded() {
        for _ in 0..100 {
            assert!(backoff(0) <= Duration::from_millis(150));
            assert!(backoff(0) >= Duration::from_millis(50));
            assert!(backoff(30) <= Duration::from_secs(45));
        }
        assert!(backoff(30) >= Duration::from_secs(15));
    }
}
