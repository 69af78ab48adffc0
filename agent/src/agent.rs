//! The agent's main loop: connect, announce, and route what arrives.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use drover_protocol::agent::{Hello, Presence};
use drover_protocol::link::{self, LinkOptions, Publication};
use drover_protocol::topics::{self, Down, Up};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::executor::Executor;
use crate::facts::HostFacts;
use crate::fetch::Fetcher;
use crate::runtime::Runtime;

/// The agent's version, announced in `Hello`.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// Largest message the agent accepts: far above envelopes and chunks, because an
/// oversized packet would kill the connection and come back with the session.
const MAX_INCOMING: usize = 16 << 20;
/// Largest message the agent sends: a result with full output and capped streams.
const MAX_OUTGOING: usize = 16 << 20;

/// Runs the agent until `shutdown` is cancelled.
pub async fn run(config: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    let config = Arc::new(config);
    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("creating data dir {}", config.data_dir.display()))?;
    let runtime = Arc::new(
        Runtime::new(&config.data_dir.join("compiled")).context("starting the wasm runtime")?,
    );

    let facts = HostFacts::gather();
    let hello = Hello {
        agent_id: config.id.clone(),
        hostname: facts.hostname.clone(),
        os: facts.os_family.clone(),
        os_version: format!("{} {}", facts.os_name, facts.os_version)
            .trim()
            .to_string(),
        arch: facts.architecture.clone(),
        agent_version: VERSION.to_string(),
        tags: config.tags.clone(),
        started_at_ms: drover_protocol::now_ms(),
    };
    let presence = |p: Presence| serde_json::to_vec(&p).expect("presence serialises");
    let status_topic = topics::up(&config.id, Up::Status);
    let opts = LinkOptions {
        broker: config.broker.clone(),
        ca_file: config.ca_file.clone(),
        client_id: config.id.clone(),
        credentials: config
            .password
            .clone()
            .map(|p| (config.username.clone(), p)),
        keep_alive: config.keep_alive,
        max_incoming_packet: MAX_INCOMING,
        max_outgoing_packet: MAX_OUTGOING,
        persistent_session: true,
        last_will: Some(Publication {
            topic: status_topic.clone(),
            payload: presence(Presence::Offline),
            retain: true,
        }),
        subscriptions: vec![topics::down_filter(&config.id)],
        on_connect: vec![
            Publication {
                topic: topics::up(&config.id, Up::Hello),
                payload: serde_json::to_vec(&hello)?,
                retain: false,
            },
            Publication {
                topic: status_topic.clone(),
                payload: presence(Presence::Online),
                retain: true,
            },
        ],
        incoming_capacity: 256,
    };
    let link_shutdown = CancellationToken::new();
    let (link, mut incoming, link_task) =
        link::spawn(opts, link_shutdown.clone()).map_err(anyhow::Error::msg)?;

    let fetcher = Fetcher::default();
    let executor = Executor::new(config.clone(), runtime, link.clone(), fetcher.clone())?;
    let (job_tx, job_rx) = mpsc::channel(config.job_queue);
    let exec_task = tokio::spawn(executor.clone().serve(job_rx));

    tracing::info!(
        agent.id = %config.id,
        broker = %config.broker,
        data_dir = %config.data_dir.display(),
        "agent started"
    );
    loop {
        let msg = tokio::select! {
            _ = shutdown.cancelled() => break,
            m = incoming.recv() => match m {
                Some(m) => m,
                None => break,
            },
        };
        match topics::parse_down(&msg.topic) {
            Some((id, Down::Job)) if id == config.id => {
                if let Err(e) = job_tx.try_send(msg.payload) {
                    let payload = match e {
                        mpsc::error::TrySendError::Full(p)
                        | mpsc::error::TrySendError::Closed(p) => p,
                    };
                    let ex = executor.clone();
                    tokio::spawn(async move { ex.refuse_busy(&payload).await });
                }
            }
            Some((id, Down::Chunk)) if id == config.id => fetcher.deliver(msg.payload),
            Some((id, Down::Ack)) if id == config.id => {
                tracing::debug!(topic = %msg.topic, "result acknowledged");
            }
            _ => tracing::warn!(topic = %msg.topic, "ignoring message on unexpected topic"),
        }
    }

    tracing::info!("agent stopping");
    drop(job_tx);
    // Running jobs get a bounded grace period to finish and report.
    let _ = tokio::time::timeout(Duration::from_secs(5), exec_task).await;
    let _ = link
        .publish(status_topic, presence(Presence::Offline), true)
        .await;
    link_shutdown.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(3), link_task).await;
    Ok(())
}
