//! `drover serve`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use drover_protocol::link::BrokerUrl;
use tokio_util::sync::CancellationToken;

use super::ServeConfig;
use crate::cli::args::parse_addr;
use crate::cli::context::Ctx;
use crate::mqtt::broker::TlsListener;

/// Flags of `drover serve`.
#[derive(Debug, clap::Args)]
pub struct ServeArgs {
    /// The HTTP API's address (port 0 picks one; see server.json).
    #[arg(long, default_value = "127.0.0.1:8080", value_parser = parse_addr)]
    api_listen: SocketAddr,
    /// The embedded broker's address.
    #[arg(long, default_value = "127.0.0.1:1883", value_parser = parse_addr)]
    mqtt_listen: SocketAddr,
    /// Also listen for MQTT over TLS here.
    #[arg(long, value_parser = parse_addr, requires_all = ["tls_cert", "tls_key"])]
    mqtt_tls_listen: Option<SocketAddr>,
    /// The TLS certificate chain (PEM).
    #[arg(long)]
    tls_cert: Option<PathBuf>,
    /// The TLS private key (PEM).
    #[arg(long)]
    tls_key: Option<PathBuf>,
    /// Use this external broker (mqtt://HOST:PORT or mqtts://HOST:PORT) instead of the
    /// embedded one.
    #[arg(long)]
    broker: Option<String>,
    /// Username on the external broker.
    #[arg(long, requires = "broker")]
    broker_username: Option<String>,
    /// File holding the password on the external broker.
    #[arg(long, requires = "broker_username")]
    broker_password_file: Option<PathBuf>,
    /// CA certificates (PEM) for an external mqtts:// broker.
    #[arg(long)]
    ca_file: Option<PathBuf>,
    /// The broker URL to give enrolling agents, if not the one the server uses.
    #[arg(long)]
    advertise_broker: Option<String>,
    /// The most MQTT clients the embedded broker lets connect at once (from any one
    /// address too).
    #[arg(long, default_value_t = 100_000, value_parser = clap::value_parser!(u64).range(1..))]
    max_connections: u64,
    /// The most connections the HTTP API holds at once; at the bound, a new one closes
    /// the oldest idle one. Both bounds are cut to fit the open-file limit.
    #[arg(long, default_value_t = 512, value_parser = clap::value_parser!(u64).range(1..))]
    api_max_connections: u64,
}

/// `drover serve`.
pub fn run(ctx: &Ctx, a: ServeArgs) -> anyhow::Result<i32> {
    let external_broker = a
        .broker
        .as_deref()
        .map(str::parse::<BrokerUrl>)
        .transpose()
        .map_err(anyhow::Error::msg)?;
    let external_credentials = match (a.broker_username, a.broker_password_file) {
        (Some(u), Some(p)) => Some((
            u,
            std::fs::read_to_string(&p)
                .with_context(|| format!("reading {}", p.display()))?
                .trim()
                .to_string(),
        )),
        (Some(u), None) => Some((u, String::new())),
        _ => None,
    };
    let mqtt_tls = match (a.mqtt_tls_listen, a.tls_cert, a.tls_key) {
        (Some(listen), Some(cert_pem), Some(key_pem)) => Some(TlsListener {
            listen,
            cert_pem,
            key_pem,
            handshake_timeout: Duration::from_secs(10),
        }),
        _ => None,
    };
    let config = ServeConfig {
        data: ctx.data.clone(),
        api_listen: a.api_listen,
        mqtt_listen: a.mqtt_listen,
        mqtt_tls,
        external_broker,
        external_credentials,
        ca_file: a.ca_file,
        advertise_broker: a.advertise_broker,
        max_connections: usize::try_from(a.max_connections).unwrap_or(usize::MAX),
        api_max_connections: usize::try_from(a.api_max_connections).unwrap_or(usize::MAX),
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let shutdown = CancellationToken::new();
        let s = shutdown.clone();
        tokio::spawn(async move {
            drover_protocol::link::terminated().await;
            s.cancel();
        });
        super::serve(config, shutdown).await
    })?;
    Ok(0)
}
