//! `drover serve`: the store, the embedded broker (unless an external one is given),
//! the capabilities and the HTTP API, composed and stopped together. Nothing here
//! decides anything; it wires.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use drover_protocol::keys::SigningKey;
use drover_protocol::link::{self, BrokerUrl, LinkOptions};
use drover_protocol::topics;
use tokio_util::sync::CancellationToken;

use crate::audit::Audit;
use crate::capability::Capability;
use crate::clock::Clock;
use crate::events::EventLog;
use crate::fleet::credentials::{BrokerAuth, new_password};
use crate::fleet::{Fleet, FleetParts};
use crate::ingress::Ingress;
use crate::jobs::{Jobs, JobsParts};
use crate::mqtt::auth::CONTROL_USER;
use crate::mqtt::broker::{BrokerConfig, EmbeddedBroker, TlsListener};
use crate::mqtt::publisher::Link;
use crate::paths::{DataDir, ServerInfo};
use crate::plugins::Plugins;
use crate::run_command::RunCommand;
use crate::store::{Db, Schema};
use crate::trust::Trust;

pub mod cli;
pub mod descriptors;

/// The largest MQTT packet the control plane and embedded broker accept: a result with
/// full output and capped streams fits.
pub const MAX_PACKET: usize = 16 << 20;

/// Every capability's tables, in the order they are migrated (a capability after those
/// whose tables its migrations read).
pub const SCHEMAS: [Schema; 6] = [
    crate::events::store::SCHEMA,
    crate::audit::store::SCHEMA,
    crate::fleet::store::SCHEMA,
    crate::plugins::store::SCHEMA,
    crate::jobs::store::SCHEMA,
    crate::run_command::store::SCHEMA,
];

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
    /// The most connections the HTTP API holds at once.
    pub api_max_connections: usize,
}

/// How long an API client has to send a request's headers.
const API_HEADER_READ: Duration = Duration::from_secs(10);

/// Opens the database in `data` and brings every capability's tables up to date.
pub async fn open_db(data: &DataDir) -> anyhow::Result<Db> {
    let db = Db::open(&data.database())?;
    db.migrate(&SCHEMAS).await?;
    Ok(db)
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
    let (keyset, ks) = crate::trust::files::load(data)?;
    if !ks.control_plane.contains(&signer.public()) {
        anyhow::bail!(
            "the control-plane key {} is not in key set version {}: agents would refuse every job",
            signer.public().short(),
            ks.version
        );
    }
    let db = open_db(data).await?;
    let token = data.ensure_api_token()?;
    let clock = Clock::system();
    let nofile = descriptors::raise_nofile();
    let budget = descriptors::budget(nofile, config.api_max_connections, config.max_connections);
    tracing::info!(
        open_files = nofile,
        api_connections = budget.api,
        broker_connections = budget.broker,
        "descriptor budgets"
    );
    if config.external_broker.is_none() && budget.broker < config.max_connections {
        tracing::warn!(
            asked = config.max_connections,
            allowed = budget.broker,
            "the embedded broker takes fewer connections than --max-connections: raise the open-file limit (ulimit -n) for more"
        );
    }

    // The broker: embedded, or external.
    let control_password = new_password();
    let (broker, broker_url, credentials) = match &config.external_broker {
        Some(url) => (None, url.clone(), config.external_credentials.clone()),
        None => {
            let auth = Arc::new(BrokerAuth::new(db.clone(), &control_password));
            let broker = EmbeddedBroker::start(
                BrokerConfig {
                    listen: config.mqtt_listen,
                    tls: config.mqtt_tls.clone(),
                    // Sessions and queued messages in memory: what must outlive a
                    // restart is in the store, and the engine sends unanswered envelopes
                    // again when their agent says hello. A broker on disk wrote (and
                    // deleted) a file per unacknowledged message.
                    data_dir: None,
                    max_packet_size: MAX_PACKET,
                    max_connections: budget.broker,
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
    let (link_handle, incoming, link_task) = link::spawn(
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
            on_connect: link::OnConnect::none(),
            incoming_capacity: 4096,
        },
        link_shutdown.clone(),
    )
    .map_err(anyhow::Error::msg)?;
    let link: Link = Arc::new(link_handle);

    // The capabilities, each on those below it.
    let events = EventLog::new(db.clone(), clock.clone());
    let audit = Audit::new(db.clone(), clock.clone());
    let trust = Trust::new(data.clone(), keyset, link.clone());
    let fleet = Fleet::new(FleetParts {
        db: db.clone(),
        events: events.clone(),
        audit: audit.clone(),
        trust,
        clock: clock.clone(),
        broker: broker.as_ref().map(EmbeddedBroker::access),
        broker_url: config
            .advertise_broker
            .clone()
            .unwrap_or_else(|| broker_url.to_string()),
    });
    let plugins = Plugins::new(db.clone(), link.clone(), audit.clone(), clock.clone());
    let engine_shutdown = CancellationToken::new();
    let (jobs, jobs_task) = Jobs::start(
        JobsParts {
            db: db.clone(),
            link,
            signer,
            clock,
            events: events.clone(),
            audit: audit.clone(),
            fleet: fleet.clone(),
            plugins: plugins.clone(),
        },
        engine_shutdown.clone(),
    )
    .await;
    let run_command = RunCommand::new(db.clone(), jobs.clone(), plugins.clone(), audit.clone());
    let capabilities: [&dyn Capability; 5] = [&fleet, &plugins, &jobs, &audit, &run_command];

    let consumers = capabilities.iter().flat_map(|c| c.consumers()).collect();
    let mut consumer_tasks = events.start(consumers, engine_shutdown.clone()).await?;
    let ingress = Ingress {
        fleet: fleet.clone(),
        jobs: jobs.clone(),
        plugins: plugins.clone(),
    };
    let ingress_task = tokio::spawn(ingress.run(incoming));

    let listener = tokio::net::TcpListener::bind(config.api_listen)
        .await
        .with_context(|| format!("binding the API to {}", config.api_listen))?;
    let api_addr = listener.local_addr()?;
    let (app, _) = crate::api::router(token, &capabilities);
    let limits = crate::api::listener::Limits {
        max_connections: budget.api,
        header_read: API_HEADER_READ,
    };
    let api_task = tokio::spawn(crate::api::listener::serve(
        listener,
        app,
        limits,
        shutdown.clone(),
    ));

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
    let _ = tokio::time::timeout(Duration::from_secs(1), ingress_task).await;
    engine_shutdown.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(1), jobs_task).await;
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        while consumer_tasks.join_next().await.is_some() {}
    })
    .await;
    if let Some(b) = broker {
        b.shutdown().await?;
    }
    data.remove_server_info();
    Ok(())
}
