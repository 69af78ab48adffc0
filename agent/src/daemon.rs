//! The agent's daemon: connect, announce, and route what arrives to [`Jobs`], the
//! outbox and the state. Everything it starts runs inside its span, which carries
//! `agent.id`: a simulated fleet runs many agents in one process.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::Context as _;
use drover_protocol::agent::{Hello, Presence};
use drover_protocol::enroll::Heartbeat;
use drover_protocol::link::{self, LinkOptions, OnConnect, Publication};
use drover_protocol::signed::Signed;
use drover_protocol::topics::{self, Down, Up};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;

use crate::config::Config;
use crate::durable::outbox::{Limits as OutboxLimits, Outbox};
use crate::durable::state::State;
use crate::facts::HostFacts;
use crate::identity::{self, Enrollment, Identity};
use crate::jobs::Jobs;
use crate::jobs::fetch::Fetcher;
use crate::sandbox::Sandbox;

/// The agent's version, announced in `Hello`.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// Largest message the agent accepts: far above envelopes and chunks, because an
/// oversized packet would kill the connection and come back with the session.
const MAX_INCOMING: usize = 16 << 20;
/// Largest message the agent sends: a result with full output and capped streams.
pub const MAX_OUTGOING: usize = 16 << 20;

/// How often a signed heartbeat goes out while connected.
const HEARTBEAT: Duration = Duration::from_secs(30);

async fn heartbeats(
    id: String,
    link: drover_protocol::link::LinkHandle,
    jobs: Arc<Jobs>,
    identity: Arc<Identity>,
    stop: CancellationToken,
) {
    let topic = topics::up(&id, Up::Heartbeat);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(HEARTBEAT) => {}
        }
        if !link.is_connected() {
            continue;
        }
        let hb = Heartbeat {
            agent_id: id.clone(),
            at_ms: drover_protocol::now_ms(),
            jobs_run: jobs.stats.ran.load(Ordering::Relaxed),
            jobs_refused: jobs.stats.refused.load(Ordering::Relaxed),
        };
        let body = serde_json::to_vec(&Signed::sign(&hb, &identity.signing))
            .expect("heartbeats serialise");
        if let Err(e) = link.publish(topic.clone(), body, false).await {
            tracing::debug!(error = %e, "heartbeat not sent");
        }
    }
}

/// Fills in what enrollment provides (enrolling first if the config says how), and
/// refuses to run an agent the server would not recognise.
async fn resolve(
    mut c: Config,
    identity: &Arc<Identity>,
    hostname: &str,
) -> anyhow::Result<Config> {
    let enrollment = match Enrollment::load(&c.data_dir)? {
        Some(e) => e,
        None => {
            let Some(settings) = c.enroll.clone() else {
                anyhow::bail!(
                    "agent {} is not enrolled: run `drover-agent enroll`, or put an [enroll] section in the config",
                    c.id
                );
            };
            let (data_dir, id, ident) = (c.data_dir.clone(), c.id.clone(), identity.clone());
            let hostname = hostname.to_string();
            let e = tokio::task::spawn_blocking(move || {
                identity::enroll(&data_dir, &settings, Some(&id), &ident, &hostname)
            })
            .await??;
            tracing::info!(server = %c.enroll.as_ref().map(|s| s.server.as_str()).unwrap_or(""), "enrolled");
            e
        }
    };
    anyhow::ensure!(
        enrollment.agent_id == c.id,
        "this data directory is enrolled as agent {:?}, not {:?}",
        enrollment.agent_id,
        c.id
    );
    if c.broker.is_none() {
        c.broker = Some(enrollment.broker.parse().map_err(anyhow::Error::msg)?);
    }
    if c.password.is_none() {
        c.password = enrollment.password.clone();
    }
    if c.roots.is_empty() {
        c.roots = enrollment.roots.clone();
        c.root_threshold = enrollment.root_threshold;
    }
    if c.keyset_file.is_none() {
        c.keyset_file = Some(enrollment.keyset_file.clone());
    }
    for (k, v) in enrollment.tags {
        c.tags.entry(k).or_insert(v);
    }
    anyhow::ensure!(
        !c.roots.is_empty(),
        "no trust roots: the agent would trust nothing"
    );
    Ok(c)
}

/// What agents in one process may share: the wasm engine and compiled plugins, and host facts.
#[derive(Clone)]
pub struct Shared {
    /// The wasmtime engine, its epoch ticker and the precompiled-plugin cache.
    pub sandbox: Arc<Sandbox>,
    /// Host facts, gathered once: the hostname for enrollment and `Hello`.
    pub facts: HostFacts,
    /// Counters summed over every agent run with this `Shared`.
    pub counters: Arc<Counters>,
}

impl Shared {
    /// Starts a sandbox whose precompiled cache is `compiled_dir`, and gathers host facts.
    pub fn new(compiled_dir: &Path) -> anyhow::Result<Shared> {
        Ok(Shared {
            sandbox: Arc::new(Sandbox::new(compiled_dir).context("starting the wasm sandbox")?),
            facts: HostFacts::gather(),
            counters: Arc::default(),
        })
    }
}

/// Counters over the agents sharing one [`Shared`] (one, for `drover-agent`).
#[derive(Debug, Default)]
pub struct Counters {
    /// Agents past start-up and in their message loop.
    pub running: AtomicUsize,
    /// Job envelopes received (before any check).
    pub jobs_received: AtomicU64,
}

/// Runs the agent until `shutdown` is cancelled.
pub async fn run(config: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("creating data dir {}", config.data_dir.display()))?;
    let shared = Shared::new(&config.data_dir.join("compiled"))?;
    run_with(config, shared, shutdown).await
}

/// Runs the agent until `shutdown` is cancelled, with an engine and facts that other
/// agents in this process may share.
pub async fn run_with(
    config: Config,
    shared: Shared,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let span = tracing::info_span!("agent", agent.id = %config.id);
    serve(config, shared, shutdown).instrument(span).await
}

async fn serve(config: Config, shared: Shared, shutdown: CancellationToken) -> anyhow::Result<()> {
    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("creating data dir {}", config.data_dir.display()))?;
    let Shared {
        sandbox,
        facts,
        counters,
    } = shared;
    let identity = Arc::new(Identity::load_or_create(&config.data_dir)?);
    let config = Arc::new(resolve(config, &identity, &facts.hostname).await?);
    let broker_url = config
        .broker
        .clone()
        .context("no broker: set `broker` in the config file or enroll")?;

    let state = Arc::new(
        State::open(
            &config.data_dir.join("state"),
            &config.roots,
            config.root_threshold,
            config.keyset_file.as_deref(),
            drover_protocol::now_ms(),
        )
        .context("opening the agent's state")?,
    );
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
        keyset_version: state.keyset().version,
        sent_at_ms: 0,
    };
    let presence = |p: Presence| serde_json::to_vec(&p).expect("presence serialises");
    let status_topic = topics::up(&config.id, Up::Status);
    let opts = LinkOptions {
        broker: broker_url.clone(),
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
        subscriptions: topics::down_topics(&config.id),
        unsubscriptions: vec![topics::down_filter(&config.id)],
        // Signed afresh at every connect: the server takes a hello only if it is newer
        // than the last one it took, so a broker cannot replay an old one.
        on_connect: {
            let (hello, identity, state) = (hello, identity.clone(), state.clone());
            let (hello_topic, status_topic) =
                (topics::up(&config.id, Up::Hello), status_topic.clone());
            OnConnect::new(move || {
                let mut hello = hello.clone();
                hello.sent_at_ms = drover_protocol::now_ms();
                hello.keyset_version = state.keyset().version;
                let signed = Signed::sign(&hello, &identity.signing);
                vec![
                    Publication {
                        topic: hello_topic.clone(),
                        payload: serde_json::to_vec(&signed).expect("hellos serialise"),
                        retain: false,
                    },
                    Publication {
                        topic: status_topic.clone(),
                        payload: presence(Presence::Online),
                        retain: true,
                    },
                ]
            })
        },
        incoming_capacity: 256,
    };
    let link_shutdown = CancellationToken::new();
    let (link, mut incoming, link_task) =
        link::spawn(opts, link_shutdown.clone()).map_err(anyhow::Error::msg)?;

    let fetcher = Fetcher::default();
    let outbox = Arc::new(
        Outbox::open(&config.data_dir.join("outbox"), OutboxLimits::default())
            .context("opening the result outbox")?,
    );
    let jobs = Jobs::new(
        config.clone(),
        sandbox,
        link.clone(),
        fetcher.clone(),
        state.clone(),
        identity.clone(),
        outbox.clone(),
    )?;
    jobs.recover_interrupted().await;
    let outbox_task = {
        let outbox = outbox.clone();
        let link = link.clone();
        let topic = topics::up(&config.id, Up::Result);
        let stop = link_shutdown.clone();
        tokio::spawn(async move { outbox.run(link, topic, stop).await }.in_current_span())
    };
    let heartbeat_task = tokio::spawn(
        heartbeats(
            config.id.clone(),
            link.clone(),
            jobs.clone(),
            identity.clone(),
            link_shutdown.clone(),
        )
        .in_current_span(),
    );
    let (job_tx, job_rx) = mpsc::channel(config.job_queue);
    let jobs_task = tokio::spawn(jobs.clone().serve(job_rx).in_current_span());

    tracing::info!(
        broker = %broker_url,
        data_dir = %config.data_dir.display(),
        "agent started"
    );
    counters.running.fetch_add(1, Ordering::Relaxed);
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
                counters.jobs_received.fetch_add(1, Ordering::Relaxed);
                if let Err(e) = job_tx.try_send(msg.payload) {
                    let payload = match e {
                        mpsc::error::TrySendError::Full(p)
                        | mpsc::error::TrySendError::Closed(p) => p,
                    };
                    let jobs = jobs.clone();
                    tokio::spawn(async move { jobs.refuse_busy(&payload).await }.in_current_span());
                }
            }
            Some((id, Down::Chunk)) if id == config.id => fetcher.deliver(msg.payload),
            Some((id, Down::Keyset)) if id == config.id => {
                match serde_json::from_slice(&msg.payload)
                    .map_err(|e| e.to_string())
                    .and_then(|s| state.offer_keyset(&s).map_err(|e| e.to_string()))
                {
                    Ok(true) => {
                        tracing::info!(version = state.keyset().version, "adopted a new key set")
                    }
                    Ok(false) => tracing::debug!("key set already current"),
                    Err(e) => tracing::warn!("key set refused: {e}"),
                }
            }
            Some((id, Down::Cancel)) if id == config.id => {
                jobs.cancel(&msg.payload, drover_protocol::now_ms())
            }
            Some((id, Down::Ack)) if id == config.id => jobs.acknowledged(&msg.payload),
            _ => tracing::warn!(topic = %msg.topic, "ignoring message on unexpected topic"),
        }
    }

    tracing::info!("agent stopping");
    counters.running.fetch_sub(1, Ordering::Relaxed);
    drop(job_tx);
    // Running jobs get a bounded grace period to finish and report.
    let _ = tokio::time::timeout(Duration::from_secs(5), jobs_task).await;
    let _ = link
        .publish(status_topic, presence(Presence::Offline), true)
        .await;
    link_shutdown.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(3), link_task).await;
    let _ = heartbeat_task.await;
    let _ = outbox_task.await;
    if outbox.pending() > 0 {
        tracing::info!(
            pending = outbox.pending(),
            "results stay in the outbox until the next start"
        );
    }
    Ok(())
}
