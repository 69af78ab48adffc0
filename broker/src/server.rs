//! `drover serve`: the embedded broker (unless an external one is given), the control
//! plane, the store and the HTTP API, wired together and stopped together.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use drover_protocol::keys::SigningKey;
use drover_protocol::link::{self, BrokerUrl, LinkOptions};
use drover_protocol::topics;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::control::ControlPlane;
use crate::credentials::{BrokerAuth, CONTROL_USER, new_password};
use crate::embedded::{BrokerConfig, EmbeddedBroker, TlsListener};
use crate::paths::DataDir;
use crate::store::Store;

/// The largest MQTT packet the control plane and embedded broker accept: a result with
/// full output and capped streams fits.
pub const MAX_PACKET: usize = 16 << 20;

/// How to run the server.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    /// The data directory.
    pub data: DataDir,
    /// The HTTP API's address.
    pub api_listen: SocketAddr,
    /// Where the embedded broker listens; ignored with `external_broker`.
    pub mqtt_listen: SocketAddr,
    /// An optional TLS listener for the embedded broker.
    pub mqtt_tls: Option<TlsListener>,
    /// Use this broker instead of the embedded one.
    pub external_broker: Option<BrokerUrl>,
    /// Credentials for the external broker.
    pub external_credentials: Option<(String, String)>,
    /// CA file for an external `mqtts://` broker.
    pub ca_file: Option<PathBuf>,
    /// The broker URL enrolling agents are told to dial, when not the one the server
    /// itself uses (a public address, say).
    pub advertise_broker: Option<String>,
    /// The most clients the embedded broker lets connect at once.
    pub max_connections: usize,
}

/// What a running server tells the CLI and tests: written to `server.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ServerInfo {
    /// The HTTP API's base URL.
    pub api: String,
    /// The broker agents should connect to.
    pub broker: String,
    /// The embedded broker's TLS address, if any.
    pub broker_tls: Option<String>,
    /// The server's process id.
    pub pid: u32,
}

/// Runs the server until `shutdown` is cancelled.
pub async fn serve(config: ServeConfig, shutdown: CancellationToken) -> anyhow::Result<()> {
    let data = &config.data;
    data.create()?;
    let signer = SigningKey::load(&data.control_plane_key()).with_context(|| {
        format!(
            "loading the control-plane key {} (run `drover keygen` first)",
            data.control_plane_key().display()
        )
    })?;
    let (keyset, ks) = crate::trust::load(data)?;
    if !ks.control_plane.contains(&signer.public()) {
        anyhow::bail!(
            "the control-plane key {} is not in key set version {}: agents would refuse every job",
            signer.public().short(),
            ks.version
        );
    }
    let store = Store::open(&data.database())?;
    let token = data.ensure_api_token()?;

    // The broker: embedded, or external.
    let control_password = new_password();
    let (broker, broker_url, credentials) = match &config.external_broker {
        Some(url) => (None, url.clone(), config.external_credentials.clone()),
        None => {
            let auth = Arc::new(BrokerAuth::new(store.clone(), &control_password));
            let broker = EmbeddedBroker::start(
                BrokerConfig {
                    listen: config.mqtt_listen,
                    tls: config.mqtt_tls.clone(),
                    // Sessions and queued messages in memory: what must outlive a
                    // restart is in the store, and the control plane sends unanswered
                    // envelopes again when their agent says hello. A broker on disk
                    // wrote (and deleted) a file per unacknowledged message.
                    data_dir: None,
                    max_packet_size: MAX_PACKET,
                    max_connections: config.max_connections,
                },
                auth,
            )
            .await
            .context("starting the embedded broker")?;
            let addr = broker.local_addr();
            let url = BrokerUrl {
                host: addr.ip().to_string(),
                port: addr.port(),
                tls: false,
            };
            (
                Some(broker),
                url,
                Some((CONTROL_USER.to_string(), control_password.clone())),
            )
        }
    };

    let link_shutdown = CancellationToken::new();
    let (link, incoming, link_task) = link::spawn(
        LinkOptions {
            broker: broker_url.clone(),
            ca_file: config.ca_file.clone(),
            client_id: CONTROL_USER.to_string(),
            credentials,
            keep_alive: Duration::from_secs(15),
            max_incoming_packet: MAX_PACKET,
            max_outgoing_packet: MAX_PACKET,
            persistent_session: true,
            last_will: None,
            subscriptions: vec![topics::UP_FILTER.to_string()],
            unsubscriptions: Vec::new(),
            on_connect: vec![],
            incoming_capacity: 4096,
        },
        link_shutdown.clone(),
    )
    .map_err(anyhow::Error::msg)?;
    let (control, control_task) =
        ControlPlane::start(store.clone(), link, signer, keyset, incoming);

    let listener = tokio::net::TcpListener::bind(config.api_listen)
        .await
        .with_context(|| format!("binding the API to {}", config.api_listen))?;
    let api_addr = listener.local_addr()?;
    let app = crate::api::router(crate::api::ApiState {
        control: control.clone(),
        token,
        data: data.clone(),
        broker: broker.as_ref().map(EmbeddedBroker::access),
        broker_url: config
            .advertise_broker
            .clone()
            .unwrap_or_else(|| broker_url.to_string()),
    });
    let api_shutdown = shutdown.clone();
    let api_task = tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(async move { api_shutdown.cancelled().await })
            .await
    });

    let info = ServerInfo {
        api: format!("http://{api_addr}"),
        broker: broker_url.to_string(),
        broker_tls: broker
            .as_ref()
            .and_then(|b| b.tls_addr())
            .map(|a| format!("mqtts://{a}")),
        pid: std::process::id(),
    };
    data.write_server_info(&info)?;
    tracing::info!(api = %info.api, broker = %info.broker, data_dir = %data.root().display(), "drover server ready");

    shutdown.cancelled().await;
    tracing::info!("server stopping");
    let _ = tokio::time::timeout(Duration::from_secs(5), api_task).await;
    link_shutdown.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(3), link_task).await;
    let _ = tokio::time::timeout(Duration::from_secs(1), control_task).await;
    if let Some(b) = broker {
        b.shutdown().await?;
    }
    data.remove_server_info();
    Ok(())
}
