//! N real agents in one process.
//!
//! Each simulated agent is the real thing: its own keys and data directory, its own
//! enrollment through the server's HTTP endpoint, its own MQTT connection, key set,
//! replay log and outbox, and [`drover_agent::daemon::run_with`] unchanged. What they
//! share is what [`Shared`] holds: the wasmtime engine (one epoch ticker), the compiled
//! plugins in memory and on disk, and host facts. One consequence: once one agent has
//! loaded a plugin, the others find it in the shared runtime and skip fetching the blob,
//! so a first run across the fleet fetches far less than N real machines would.
//!
//! Data directories go under `/dev/shm` by default, so the fsyncs of N agents (the
//! seen-envelope log, the running marker, the outbox) cost what they cost on one machine's
//! RAM, and what is measured is the server and the broker, not this machine's disk.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use drover_agent::config::{Config, ConfigFile, Overrides, PolicyFile};
use drover_agent::daemon::{Shared, run_with};
use drover_agent::identity::{self, EnrollSettings, Enrollment, Identity};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::api::Api;

/// How to start a fleet.
#[derive(Clone)]
pub struct FleetOptions {
    /// The server's HTTP API, `http://HOST:PORT` (enrollment goes there).
    pub api: String,
    /// A multi-use activation (`drover activation create --max-uses N`).
    pub activation_id: String,
    /// Its code.
    pub code: String,
    /// How many agents.
    pub count: usize,
    /// The index of the first agent: agents are `{prefix}{index:05}`, so fleets with
    /// the same prefix and disjoint ranges can run side by side.
    pub first: usize,
    /// Agent id prefix.
    pub prefix: String,
    /// Root of the agents' data directories (`{data_dir}/{id}`). An agent whose
    /// directory is already enrolled is not enrolled again.
    pub data_dir: PathBuf,
    /// `[policy] exec`: programs plugins may be granted.
    pub policy_exec: Vec<String>,
    /// `[policy] host_facts`.
    pub host_facts: bool,
    /// `[policy] read_paths`.
    pub read_paths: Vec<PathBuf>,
    /// Tags each agent announces (besides the activation's).
    pub tags: BTreeMap<String, String>,
    /// Enrollments in flight at once.
    pub enroll_parallelism: usize,
    /// Agents started per second; 0 starts them all at once.
    pub start_rate: usize,
    /// The engine and facts to share; a new one (compiling into
    /// `{data_dir}/compiled`) when absent.
    pub shared: Option<Shared>,
}

impl FleetOptions {
    /// Defaults for everything but the server and the activation.
    pub fn new(api: &str, activation_id: &str, code: &str, count: usize) -> FleetOptions {
        FleetOptions {
            api: api.to_string(),
            activation_id: activation_id.to_string(),
            code: code.to_string(),
            count,
            first: 0,
            prefix: "sim-".to_string(),
            data_dir: default_data_dir(),
            policy_exec: Vec::new(),
            host_facts: false,
            read_paths: Vec::new(),
            tags: BTreeMap::new(),
            enroll_parallelism: 8,
            start_rate: 2000,
            shared: None,
        }
    }

    /// The id of agent `index`.
    pub fn id(&self, index: usize) -> String {
        agent_id(&self.prefix, index)
    }

    /// The agent's configuration, as if read from a file with a `[policy]` section.
    pub fn config(&self, id: &str) -> anyhow::Result<Config> {
        let file = ConfigFile {
            id: Some(id.to_string()),
            data_dir: Some(self.data_dir.join(id)),
            tags: self.tags.clone(),
            policy: PolicyFile {
                host_facts: self.host_facts,
                read_paths: self.read_paths.clone(),
                exec: self.policy_exec.clone(),
                ..PolicyFile::default()
            },
            ..ConfigFile::default()
        };
        Config::from_file(file, Overrides::default())
    }
}

/// The id of agent `index` in a fleet with this prefix.
pub fn agent_id(prefix: &str, index: usize) -> String {
    format!("{prefix}{index:05}")
}

/// `/dev/shm/drover-sim` when `/dev/shm` exists (RAM: the agents' fsyncs cost nothing
/// measurable), else `drover-sim` in the temporary directory.
pub fn default_data_dir() -> PathBuf {
    let shm = Path::new("/dev/shm");
    if shm.is_dir() {
        shm.join("drover-sim")
    } else {
        std::env::temp_dir().join("drover-sim")
    }
}

/// A running fleet. [`Fleet::stop`] stops it; dropping it cancels the agents without
/// waiting.
pub struct Fleet {
    ids: Vec<String>,
    tasks: Vec<JoinHandle<()>>,
    shutdown: CancellationToken,
    shared: Shared,
    failed: Arc<AtomicUsize>,
    /// How long enrollment took (zero when every agent was enrolled already).
    pub enroll_time: Duration,
    /// How many agents were enrolled now (the rest had enrolled before).
    pub enrolled: usize,
}

impl std::fmt::Debug for Fleet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fleet")
            .field("agents", &self.ids.len())
            .field("running", &self.running())
            .field("failed", &self.failed())
            .finish()
    }
}

/// How a fleet stopped.
#[derive(Debug, Clone, Copy)]
pub struct Stopped {
    /// Agents that ended within the timeout.
    pub stopped: usize,
    /// Agents still running at the timeout (then aborted).
    pub aborted: usize,
    /// How long it took.
    pub took: Duration,
}

impl Fleet {
    /// Enrolls the agents that are not enrolled yet (through the real HTTP endpoint, at
    /// most `enroll_parallelism` at once), then starts every agent on the current tokio
    /// runtime. Returns once they are started, not connected: see
    /// [`Fleet::wait_connected`].
    pub async fn start(opts: FleetOptions) -> anyhow::Result<Fleet> {
        std::fs::create_dir_all(&opts.data_dir)
            .with_context(|| format!("creating {}", opts.data_dir.display()))?;
        let shared = match &opts.shared {
            Some(s) => s.clone(),
            None => Shared::new(&opts.data_dir.join("compiled"))?,
        };
        let ids: Vec<String> = (opts.first..opts.first + opts.count)
            .map(|i| opts.id(i))
            .collect();
        let configs = ids
            .iter()
            .map(|id| opts.config(id))
            .collect::<anyhow::Result<Vec<_>>>()?;

        let t = Instant::now();
        let enrolled = {
            let (opts, hostname) = (opts.clone(), shared.facts.hostname.clone());
            let dirs: Vec<(String, PathBuf)> = configs
                .iter()
                .map(|c| (c.id.clone(), c.data_dir.clone()))
                .collect();
            tokio::task::spawn_blocking(move || enroll_all(&opts, &dirs, &hostname))
                .await
                .context("enrollment task")??
        };
        let enroll_time = if enrolled > 0 {
            t.elapsed()
        } else {
            Duration::ZERO
        };
        if enrolled > 0 {
            tracing::info!(
                enrolled,
                secs = enroll_time.as_secs_f64(),
                "simulated agents enrolled"
            );
        }

        let shutdown = CancellationToken::new();
        let failed = Arc::new(AtomicUsize::new(0));
        let mut tasks = Vec::with_capacity(configs.len());
        let batch = if opts.start_rate == 0 {
            usize::MAX
        } else {
            (opts.start_rate / 20).max(1)
        };
        for (n, config) in configs.into_iter().enumerate() {
            if n > 0 && n % batch == 0 {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            let (shared, stop, failed) = (shared.clone(), shutdown.child_token(), failed.clone());
            tasks.push(tokio::spawn(async move {
                let id = config.id.clone();
                if let Err(e) = run_with(config, shared, stop).await {
                    failed.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(agent.id = %id, "simulated agent stopped: {e:#}");
                }
            }));
        }
        Ok(Fleet {
            ids,
            tasks,
            shutdown,
            shared,
            failed,
            enroll_time,
            enrolled,
        })
    }

    /// The agents' ids.
    pub fn ids(&self) -> &[String] {
        &self.ids
    }

    /// What the agents share (engine, facts, counters); pass it to another fleet to
    /// share one engine across fleets.
    pub fn shared(&self) -> &Shared {
        &self.shared
    }

    /// Agents in their message loop, over every fleet sharing this fleet's engine.
    pub fn running(&self) -> usize {
        self.shared.counters.running.load(Ordering::Relaxed)
    }

    /// Agents that ended with an error (failed to start, mostly).
    pub fn failed(&self) -> usize {
        self.failed.load(Ordering::Relaxed)
    }

    /// Waits until the server lists every agent of this fleet online, polling the
    /// agent list (`GET /api/v1/agents`). `progress` sees each count. Returns how long
    /// it took.
    pub async fn wait_connected(
        &self,
        api: &Api,
        timeout: Duration,
        progress: impl FnMut(usize) + Send + 'static,
    ) -> anyhow::Result<Duration> {
        let (api, ids) = (api.clone(), self.ids.clone());
        let failed = self.failed.clone();
        tokio::task::spawn_blocking(move || wait_online(&api, &ids, timeout, &failed, progress))
            .await
            .context("wait task")?
    }

    /// Cancels every agent and waits up to `timeout` for them to say goodbye (each
    /// publishes its offline status and disconnects cleanly); aborts the rest.
    pub async fn stop(mut self, timeout: Duration) -> Stopped {
        let t = Instant::now();
        self.shutdown.cancel();
        let deadline = tokio::time::Instant::now() + timeout;
        let (mut stopped, mut aborted) = (0, 0);
        for mut task in std::mem::take(&mut self.tasks) {
            // `timeout_at` polls the task once even past the deadline.
            match tokio::time::timeout_at(deadline, &mut task).await {
                Ok(_) => stopped += 1,
                Err(_) => {
                    task.abort();
                    aborted += 1;
                }
            }
        }
        Stopped {
            stopped,
            aborted,
            took: t.elapsed(),
        }
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

fn wait_online(
    api: &Api,
    ids: &[String],
    timeout: Duration,
    failed: &AtomicUsize,
    mut progress: impl FnMut(usize),
) -> anyhow::Result<Duration> {
    let t = Instant::now();
    loop {
        let online = api.online_among(ids)?;
        progress(online);
        if online >= ids.len() {
            return Ok(t.elapsed());
        }
        let failed = failed.load(Ordering::Relaxed);
        anyhow::ensure!(
            failed == 0,
            "{failed} simulated agent(s) failed to start (see the log); {online} of {} online",
            ids.len()
        );
        anyhow::ensure!(
            t.elapsed() < timeout,
            "only {online} of {} agents online after {:.0?}",
            ids.len(),
            t.elapsed()
        );
        let pause = if ids.len() > 1000 { 1000 } else { 200 };
        std::thread::sleep(Duration::from_millis(pause));
    }
}

/// Enrolls every agent whose directory has no enrollment yet, `enroll_parallelism` at a
/// time; returns how many it enrolled.
fn enroll_all(
    opts: &FleetOptions,
    agents: &[(String, PathBuf)],
    hostname: &str,
) -> anyhow::Result<usize> {
    let mut todo = Vec::new();
    for (id, dir) in agents {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        match Enrollment::load(dir)? {
            Some(e) if e.agent_id == *id => {}
            Some(e) => anyhow::bail!(
                "{} is enrolled as {:?}, not {id:?}: use another --data-dir",
                dir.display(),
                e.agent_id
            ),
            None => todo.push((id.as_str(), dir.as_path())),
        }
    }
    let settings = EnrollSettings {
        server: opts.api.clone(),
        activation_id: opts.activation_id.clone(),
        code: opts.code.clone(),
    };
    let next = AtomicUsize::new(0);
    let workers = opts.enroll_parallelism.clamp(1, 64).min(todo.len().max(1));
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..workers)
            .map(|_| {
                s.spawn(|| -> anyhow::Result<()> {
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        let Some((id, dir)) = todo.get(i) else {
                            return Ok(());
                        };
                        enroll_one(dir, id, &settings, hostname)?;
                    }
                })
            })
            .collect();
        for h in handles {
            match h.join() {
                Ok(r) => r?,
                Err(_) => anyhow::bail!("an enrollment thread panicked"),
            }
        }
        Ok(())
    })?;
    Ok(todo.len())
}

/// One enrollment, tried three times: a server busy with thousands of them may time out.
fn enroll_one(
    dir: &Path,
    id: &str,
    settings: &EnrollSettings,
    hostname: &str,
) -> anyhow::Result<()> {
    let identity = Identity::load_or_create(dir)?;
    let mut attempt = 0;
    loop {
        attempt += 1;
        match identity::enroll(dir, settings, Some(id), &identity, hostname) {
            Ok(_) => return Ok(()),
            // Refusals (a used-up or wrong code) are final; only transport errors retry.
            Err(e) if attempt < 3 && format!("{e:#}").contains("cannot reach") => {
                tracing::debug!(agent.id = %id, "enrollment retried: {e:#}");
                std::thread::sleep(Duration::from_millis(500 * attempt));
            }
            Err(e) => return Err(e.context(format!("enrolling {id}"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_sort_in_index_order_and_configs_carry_the_policy() {
        let mut o = FleetOptions::new("http://127.0.0.1:1", "act", "code", 3);
        o.data_dir = PathBuf::from("/nonexistent/sim");
        o.policy_exec = vec!["/bin/true".into()];
        assert_eq!(o.id(7), "sim-00007");
        assert!(o.id(9) < o.id(10));
        let c = o.config(&o.id(1)).unwrap();
        assert_eq!(c.id, "sim-00001");
        assert_eq!(c.data_dir, PathBuf::from("/nonexistent/sim/sim-00001"));
        assert_eq!(c.policy.exec, vec!["/bin/true".to_string()]);
        assert!(c.enroll.is_none(), "the fleet enrolls, not the agent");
        // A relative program is a config error, as in a config file.
        o.policy_exec = vec!["true".into()];
        assert!(o.config("sim-00001").is_err());
    }
}
