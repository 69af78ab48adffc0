//! The sandbox: one wasmtime `Engine`, compiled components cached on disk, and a fresh
//! `Store` with limits for every run.
//!
//! Deadlines: an epoch ticker thread bumps the engine's epoch every [`TICK`]; each store
//! yields to tokio at every tick, and the call runs under `tokio::time::timeout`. Guest code
//! in a loop yields at the next tick; a guest blocked in a WASI call (sleep, poll) is an
//! async host future that the timeout simply drops. Either way the deadline holds.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use drover_protocol::job::{Captured, Failure, FailureKind, Limits};
use drover_protocol::manifest::{Capabilities, World};
use drover_protocol::signed::SignatureMemo;
use wasmtime::component::{Component, HasSelf, Linker, ResourceTable};
use wasmtime::{Config, Engine, Store};
use wasmtime_wasi::{FsPerms, WasiCtx, WasiCtxBuilder, WasiCtxView, WasiView};

use crate::capped::CappedPipe;
use crate::exec::LiveSink;
use crate::facts::HostFacts;

/// How often the epoch advances: the granularity of deadlines and of yielding to tokio.
pub const TICK: Duration = Duration::from_millis(10);

/// Most log lines one run may write to the agent's log; the rest are counted and dropped.
const MAX_LOG_LINES: u32 = 1000;
/// Longest log line kept, in bytes.
const MAX_LOG_LINE: usize = 4096;

mod bindings {
    pub mod inventory {
        wasmtime::component::bindgen!({
            path: "../wit",
            world: "inventory-collector",
            // Running a program waits on it: the only host import that is async.
            imports: { "drover:plugin/process.run": async },
            exports: { default: async },
            additional_derives: [serde::Serialize],
        });
    }
    pub mod task {
        wasmtime::component::bindgen!({
            path: "../wit",
            world: "task",
            exports: { default: async },
            with: {
                "drover:plugin/types": super::inventory::drover::plugin::types,
                "drover:plugin/logging": super::inventory::drover::plugin::logging,
                "drover:plugin/host-facts": super::inventory::drover::plugin::host_facts,
                "drover:plugin/process": super::inventory::drover::plugin::process,
                "drover:plugin/parameters": super::inventory::drover::plugin::parameters,
            },
        });
    }
}

use bindings::inventory::drover::plugin::{
    host_facts, inventory, logging, parameters, process, types,
};

/// Everything a run may touch. One per run, dropped with the store.
struct Host {
    wasi: WasiCtx,
    table: ResourceTable,
    limiter: MemoryLimiter,
    facts: Option<HostFacts>,
    /// Programs the `process` import may run.
    exec: Vec<String>,
    /// Users those programs may run as: the agent policy's `run_as`.
    run_as: Vec<String>,
    /// Where programs' output goes live, for commands that ask to stream it.
    live: Option<LiveSink>,
    /// The job's deadline: no program runs past it.
    deadline: Instant,
    /// Most bytes kept of each of a program's output streams.
    output_cap: usize,
    /// The granted parameters' values. Never logged.
    parameters: BTreeMap<String, String>,
    agent_id: String,
    job_id: String,
    plugin: String,
    log_lines: u32,
    log_dropped: u32,
}

impl WasiView for Host {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

impl types::Host for Host {}
impl inventory::Host for Host {}

impl logging::Host for Host {
    fn log(&mut self, level: logging::Level, message: String) {
        if self.log_lines >= MAX_LOG_LINES {
            self.log_dropped += 1;
            return;
        }
        self.log_lines += 1;
        let mut msg = message;
        if msg.len() > MAX_LOG_LINE {
            let mut end = MAX_LOG_LINE;
            while !msg.is_char_boundary(end) {
                end -= 1;
            }
            msg.truncate(end);
        }
        let (job, plugin) = (&self.job_id, &self.plugin);
        match level {
            logging::Level::Trace => tracing::trace!(job.id = %job, plugin = %plugin, "{msg}"),
            logging::Level::Debug => tracing::debug!(job.id = %job, plugin = %plugin, "{msg}"),
            logging::Level::Info => tracing::info!(job.id = %job, plugin = %plugin, "{msg}"),
            logging::Level::Warn => tracing::warn!(job.id = %job, plugin = %plugin, "{msg}"),
            logging::Level::Error => tracing::error!(job.id = %job, plugin = %plugin, "{msg}"),
        }
    }
}

impl host_facts::Host for Host {
    fn get(&mut self) -> Option<host_facts::Facts> {
        let f = self.facts.as_ref()?;
        Some(host_facts::Facts {
            hostname: f.hostname.clone(),
            os_family: f.os_family.clone(),
            os_name: f.os_name.clone(),
            os_version: f.os_version.clone(),
            kernel_version: f.kernel_version.clone(),
            architecture: f.architecture.clone(),
            cpu_count: f.cpu_count,
            memory_total_bytes: f.memory_total_bytes,
            uptime_seconds: f.uptime_seconds,
            agent_id: self.agent_id.clone(),
        })
    }
}

impl parameters::Host for Host {
    fn get(&mut self, name: String) -> Option<String> {
        self.parameters.get(&name).cloned()
    }
}

impl process::Host for Host {
    async fn run(
        &mut self,
        request: process::Command,
    ) -> Result<process::CommandOutput, types::PluginError> {
        let to_plugin = |e: crate::exec::ExecError| types::PluginError {
            message: e.message,
            retryable: e.retryable,
        };
        if let Err(e) = crate::exec::check_granted(&self.exec, &request.program) {
            tracing::warn!(
                job.id = %self.job_id,
                plugin = %self.plugin,
                program = %request.program,
                "plugin asked to run a program it was not granted; refused"
            );
            return Err(to_plugin(e));
        }
        let run_as = match request.run_as.as_deref() {
            None => None,
            Some(name) => match crate::exec::run_as_user(name, &self.run_as) {
                Ok(user) => Some(user),
                Err(e) => {
                    tracing::warn!(
                        job.id = %self.job_id,
                        plugin = %self.plugin,
                        program = %request.program,
                        run_as = %name,
                        "plugin asked to run a program as a user it may not; refused: {}",
                        e.message
                    );
                    return Err(to_plugin(e));
                }
            },
        };
        let remaining = self.deadline.saturating_duration_since(Instant::now());
        let timeout = request.timeout_ms.map_or(remaining, |ms| {
            remaining.min(Duration::from_millis(ms.into()))
        });
        let program = crate::exec::Program {
            path: request.program,
            args: request.args,
            working_dir: request.working_dir,
            env: request.env,
            run_as,
        };
        let live = self.live.as_ref().map(|l| {
            if request.stream_output {
                l.clone()
            } else {
                l.keep_only()
            }
        });
        let live = live.as_ref();
        let started = Instant::now();
        // Arguments and the environment are not logged: they may carry parameters.
        let result = crate::exec::run(&program, timeout, self.output_cap, live).await;
        let (job, plugin) = (&self.job_id, &self.plugin);
        let user = program.run_as.as_ref().map_or("", |u| u.name.as_str());
        match &result {
            Ok(out) => tracing::info!(
                job.id = %job,
                plugin = %plugin,
                program = %program.path,
                run_as = %user,
                exit_code = out.exit_code,
                ms = started.elapsed().as_millis() as u64,
                "plugin ran a program"
            ),
            Err(e) => tracing::warn!(
                job.id = %job,
                plugin = %plugin,
                program = %program.path,
                run_as = %user,
                "plugin's program did not run: {}",
                e.message
            ),
        }
        let out = result.map_err(to_plugin)?;
        Ok(process::CommandOutput {
            exit_code: out.exit_code,
            stdout: out.stdout,
            stderr: out.stderr,
            stdout_truncated: out.stdout_truncated,
            stderr_truncated: out.stderr_truncated,
            stdout_bytes: out.stdout_bytes,
            stderr_bytes: out.stderr_bytes,
        })
    }
}

/// The values of the parameters named in `granted`, and no others.
fn granted_parameters(
    all: &BTreeMap<String, String>,
    granted: &[String],
) -> BTreeMap<String, String> {
    granted
        .iter()
        .filter_map(|name| Some((name.clone(), all.get(name)?.clone())))
        .collect()
}

/// Refuses memory growth past the limit and remembers that it did, so the result can
/// say why the guest died (a Rust guest aborts when allocation fails).
struct MemoryLimiter {
    max_bytes: usize,
    hit: Arc<AtomicBool>,
}

impl wasmtime::ResourceLimiter for MemoryLimiter {
    fn memory_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if desired > self.max_bytes {
            self.hit.store(true, Ordering::Relaxed);
            return Ok(false);
        }
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(desired <= 100_000)
    }
}

/// A compiled plugin, ready to instantiate.
#[derive(Clone)]
pub struct LoadedPlugin {
    pre: wasmtime::component::InstancePre<Host>,
    world: World,
}

/// What a run produced.
#[derive(Debug)]
pub struct RunOutcome {
    /// The plugin's output, or why there is none.
    pub output: Result<serde_json::Value, Failure>,
    /// Captured stdout.
    pub stdout: Captured,
    /// Captured stderr.
    pub stderr: Captured,
    /// Time spent instantiating and running.
    pub run_time: Duration,
}

/// One run: who asked, with what, under which grant.
#[derive(Debug, Clone)]
pub struct RunRequest<'a> {
    /// This agent's id, for the host-facts import.
    pub agent_id: &'a str,
    /// The job, for log lines.
    pub job_id: &'a str,
    /// The plugin's name, for log lines.
    pub plugin_name: &'a str,
    /// The job's input.
    pub input: &'a serde_json::Value,
    /// The job's parameters, secrets already opened. Handed only to a plugin granted
    /// them; never logged.
    pub parameters: &'a std::collections::BTreeMap<String, String>,
    /// What the run may use.
    pub grant: &'a Grant,
    /// Where live output of programs goes when a command asks to stream it; `None`
    /// drops it (the command's output still comes back whole, up to the cap).
    pub live: Option<LiveSink>,
}

/// Where a run's side channels land.
struct Sinks {
    stdout: CappedPipe,
    stderr: CappedPipe,
    memory_limit_hit: Arc<AtomicBool>,
}

/// What a run is allowed.
#[derive(Debug, Clone)]
pub struct Grant {
    /// The granted capabilities (already intersected with policy).
    pub capabilities: Capabilities,
    /// The limits.
    pub limits: Limits,
    /// Users granted programs may run as: the agent policy's `run_as`. Not part of
    /// the manifest: a command names its user, and the policy alone decides.
    pub run_as: Vec<String>,
}

/// Manifest signatures remembered as checked (a few per plugin version).
const MANIFEST_MEMO: usize = 256;

/// The sandbox runtime: one engine, shared by all runs.
pub struct Runtime {
    engine: Engine,
    linker: Linker<Host>,
    cache_dir: PathBuf,
    compat: String,
    loaded: Mutex<HashMap<String, LoadedPlugin>>,
    ticker: Arc<Ticker>,
    manifests: SignatureMemo,
}

impl Drop for Runtime {
    fn drop(&mut self) {
        let mut g = self.ticker.state.lock().unwrap_or_else(|e| e.into_inner());
        g.stop = true;
        self.ticker.wake.notify_all();
    }
}

/// The epoch ticker's state: it ticks only while some plugin runs, and sleeps (no
/// wake-ups at all) while the agent is idle.
#[derive(Default)]
struct Ticker {
    state: Mutex<TickerState>,
    wake: std::sync::Condvar,
}

#[derive(Default)]
struct TickerState {
    running: usize,
    stop: bool,
}

/// Keeps the ticker going while a run is in progress.
struct Ticking(Arc<Ticker>);

impl Ticking {
    fn start(t: &Arc<Ticker>) -> Ticking {
        t.state.lock().unwrap_or_else(|e| e.into_inner()).running += 1;
        t.wake.notify_all();
        Ticking(t.clone())
    }
}

impl Drop for Ticking {
    fn drop(&mut self) {
        let mut g = self.0.state.lock().unwrap_or_else(|e| e.into_inner());
        g.running = g.running.saturating_sub(1);
    }
}

/// Feeds `Hash` output into SHA-256, to turn wasmtime's compatibility hash into a
/// stable file-name component.
struct Sha256Hasher(ring::digest::Context);

impl std::hash::Hasher for Sha256Hasher {
    fn finish(&self) -> u64 {
        0
    }
    fn write(&mut self, bytes: &[u8]) {
        self.0.update(bytes);
    }
}

impl Runtime {
    /// Creates the engine, the linker and the epoch ticker. `cache_dir` holds precompiled
    /// components; it must be private to the agent (the files are native code).
    pub fn new(cache_dir: &Path) -> anyhow::Result<Runtime> {
        let mut config = Config::new();
        config.epoch_interruption(true);
        // Limits apply per store; keep reservations modest for small devices.
        config.memory_reservation(64 << 20);
        config.memory_reservation_for_growth(16 << 20);
        config.max_wasm_stack(1 << 20);
        let engine = Engine::new(&config)?;

        let mut linker: Linker<Host> = Linker::new(&engine);
        wasmtime_wasi::p2::add_to_linker_async(&mut linker)?;
        logging::add_to_linker::<Host, HasSelf<Host>>(&mut linker, |h| h)?;
        host_facts::add_to_linker::<Host, HasSelf<Host>>(&mut linker, |h| h)?;
        process::add_to_linker::<Host, HasSelf<Host>>(&mut linker, |h| h)?;
        parameters::add_to_linker::<Host, HasSelf<Host>>(&mut linker, |h| h)?;

        std::fs::create_dir_all(cache_dir)?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            std::fs::set_permissions(cache_dir, std::fs::Permissions::from_mode(0o700))?;
        }

        let mut h = Sha256Hasher(ring::digest::Context::new(&ring::digest::SHA256));
        std::hash::Hash::hash(&engine.precompile_compatibility_hash(), &mut h);
        let compat = hex::encode(&h.0.finish().as_ref()[..8]);

        let ticker = Arc::new(Ticker::default());
        {
            let engine = engine.clone();
            let ticker = ticker.clone();
            std::thread::Builder::new()
                .name("drover-epoch".into())
                .spawn(move || {
                    loop {
                        {
                            let mut g = ticker.state.lock().unwrap_or_else(|e| e.into_inner());
                            while g.running == 0 && !g.stop {
                                g = ticker.wake.wait(g).unwrap_or_else(|e| e.into_inner());
                            }
                            if g.stop {
                                return;
                            }
                        }
                        std::thread::sleep(TICK);
                        engine.increment_epoch();
                    }
                })?;
        }

        Ok(Runtime {
            engine,
            linker,
            cache_dir: cache_dir.to_path_buf(),
            compat,
            loaded: Mutex::default(),
            ticker,
            manifests: SignatureMemo::new(MANIFEST_MEMO),
        })
    }

    /// Manifest signatures already checked, shared by every agent on this runtime: a
    /// plugin's manifest comes with every job that runs it, and is checked once.
    pub fn manifest_signatures(&self) -> &SignatureMemo {
        &self.manifests
    }

    fn compiled_path(&self, sha256: &str) -> PathBuf {
        self.cache_dir
            .join(format!("{sha256}-{}.cwasm", self.compat))
    }

    /// Whether a precompiled artifact for this digest is in memory or on disk.
    pub fn is_cached(&self, sha256: &str) -> bool {
        self.loaded
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains_key(sha256)
            || self.compiled_path(sha256).exists()
    }

    /// The plugin, if it is loaded in memory already: no disk, no compiling, so callers
    /// need not leave the async workers for it.
    pub fn loaded(&self, sha256: &str) -> Option<LoadedPlugin> {
        self.loaded
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(sha256)
            .cloned()
    }

    /// Loads a plugin: from memory, else the on-disk precompiled cache, else by compiling
    /// `bytes()` (which the caller has already verified) and caching the result.
    /// Returns the plugin and whether a cache was used.
    pub fn load(
        &self,
        sha256: &str,
        world: World,
        bytes: impl FnOnce() -> anyhow::Result<Vec<u8>>,
    ) -> Result<(LoadedPlugin, bool), Failure> {
        if let Some(p) = self.loaded(sha256) {
            return Ok((p, true));
        }
        let compile_failed = |e: String| Failure {
            kind: FailureKind::CompileFailed,
            message: e,
            retryable: false,
        };
        let path = self.compiled_path(sha256);
        let mut cached = false;
        let component = match self.deserialize(&path) {
            Some(c) => {
                cached = true;
                c
            }
            None => {
                let bytes = bytes().map_err(|e| Failure {
                    kind: FailureKind::AgentError,
                    message: format!("{e:#}"),
                    retryable: true,
                })?;
                let compiled = self
                    .engine
                    .precompile_component(&bytes)
                    .map_err(|e| compile_failed(format!("plugin does not compile: {e:#}")))?;
                if let Err(e) = write_atomic(&path, &compiled) {
                    tracing::warn!(path = %path.display(), error = %e, "could not cache compiled plugin");
                }
                self.deserialize_bytes(&compiled)
                    .map_err(|e| compile_failed(format!("plugin does not load: {e:#}")))?
            }
        };
        let pre = self.linker.instantiate_pre(&component).map_err(|e| {
            compile_failed(format!(
                "plugin imports something this agent does not provide: {e:#}"
            ))
        })?;
        let plugin = LoadedPlugin { pre, world };
        // Check the exports now, so a world mismatch is a refusal, not a run failure.
        match world {
            World::InventoryCollector => {
                bindings::inventory::InventoryCollectorPre::new(plugin.pre.clone()).map_err(
                    |e| {
                        compile_failed(format!(
                            "plugin does not implement inventory-collector: {e:#}"
                        ))
                    },
                )?;
            }
            World::Task => {
                bindings::task::TaskPre::new(plugin.pre.clone()).map_err(|e| {
                    compile_failed(format!("plugin does not implement task: {e:#}"))
                })?;
            }
        }
        self.loaded
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(sha256.to_string(), plugin.clone());
        Ok((plugin, cached))
    }

    fn deserialize(&self, path: &Path) -> Option<Component> {
        if !path.exists() {
            return None;
        }
        // SAFETY: the file was written by `precompile_component` of an engine with the
        // same compatibility hash (it is in the file name), into a directory only this
        // agent can write (created 0700 in `new`). wasmtime also checks the header.
        #[allow(unsafe_code)]
        let r = unsafe { Component::deserialize_file(&self.engine, path) };
        match r {
            Ok(c) => Some(c),
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "discarding unusable compiled plugin");
                let _ = std::fs::remove_file(path);
                None
            }
        }
    }

    fn deserialize_bytes(&self, bytes: &[u8]) -> wasmtime::Result<Component> {
        // SAFETY: the bytes come from `precompile_component` on this very engine.
        #[allow(unsafe_code)]
        unsafe {
            Component::deserialize(&self.engine, bytes)
        }
    }

    /// Runs a loaded plugin.
    pub async fn run(&self, plugin: &LoadedPlugin, req: &RunRequest<'_>) -> RunOutcome {
        let started = Instant::now();
        let out_cap = req.grant.limits.output_bytes as usize;
        let sinks = Sinks {
            stdout: CappedPipe::new(out_cap),
            stderr: CappedPipe::new(out_cap),
            memory_limit_hit: Arc::new(AtomicBool::new(false)),
        };
        let output = self.run_inner(plugin, req, &sinks).await;
        RunOutcome {
            output,
            stdout: sinks.stdout.captured(),
            stderr: sinks.stderr.captured(),
            run_time: started.elapsed(),
        }
    }

    async fn run_inner(
        &self,
        plugin: &LoadedPlugin,
        req: &RunRequest<'_>,
        sinks: &Sinks,
    ) -> Result<serde_json::Value, Failure> {
        let RunRequest {
            agent_id,
            job_id,
            plugin_name,
            input,
            grant,
            parameters,
            ref live,
        } = *req;
        let (stdout, stderr, mem_hit) = (&sinks.stdout, &sinks.stderr, &sinks.memory_limit_hit);
        let mut wasi = WasiCtxBuilder::new();
        wasi.stdout(stdout.clone()).stderr(stderr.clone());
        for path in &grant.capabilities.read_paths {
            wasi.preopened_dir(path, path, FsPerms::ReadOnly)
                .map_err(|e| Failure {
                    kind: FailureKind::AgentError,
                    message: format!("granted path {path} cannot be opened on this host: {e}"),
                    retryable: false,
                })?;
        }
        let deadline = Duration::from_millis(grant.limits.timeout_ms);
        // No sockets at all unless some address is granted.
        if !grant.capabilities.network.is_empty() {
            let lookup_timeout = deadline.min(Duration::from_secs(5));
            crate::net::NetGrant::resolve(&grant.capabilities.network, lookup_timeout)
                .await
                .apply(&mut wasi);
        }
        let host = Host {
            wasi: wasi.build(),
            table: ResourceTable::new(),
            limiter: MemoryLimiter {
                max_bytes: grant.limits.memory_bytes as usize,
                hit: mem_hit.clone(),
            },
            facts: grant.capabilities.host_facts.then(HostFacts::gather),
            exec: grant.capabilities.exec.clone(),
            run_as: grant.run_as.clone(),
            live: live.clone(),
            deadline: Instant::now() + deadline,
            output_cap: usize::try_from(grant.limits.output_bytes).unwrap_or(usize::MAX),
            parameters: granted_parameters(parameters, &grant.capabilities.parameters),
            agent_id: agent_id.to_string(),
            job_id: job_id.to_string(),
            plugin: plugin_name.to_string(),
            log_lines: 0,
            log_dropped: 0,
        };
        let mut store = Store::new(&self.engine, host);
        store.limiter(|h| &mut h.limiter);
        store.set_epoch_deadline(1);
        store.epoch_deadline_async_yield_and_update(1);

        let _ticking = Ticking::start(&self.ticker);
        let call = call_world(plugin, &mut store, input);
        let result = match tokio::time::timeout(deadline, call).await {
            Err(_) => Err(Failure {
                kind: FailureKind::Timeout,
                message: format!(
                    "plugin did not finish within its {} ms deadline and was stopped",
                    grant.limits.timeout_ms
                ),
                retryable: true,
            }),
            Ok(Ok(Ok(value))) => Ok(value),
            Ok(Ok(Err(guest_err))) => Err(Failure {
                kind: FailureKind::PluginError,
                message: guest_err.message,
                retryable: guest_err.retryable,
            }),
            Ok(Err(trap)) => {
                if mem_hit.load(Ordering::Relaxed) {
                    Err(Failure {
                        kind: FailureKind::MemoryLimit,
                        message: format!(
                            "plugin tried to grow memory past its {} byte limit and stopped: {}",
                            grant.limits.memory_bytes,
                            first_line(&trap)
                        ),
                        retryable: false,
                    })
                } else {
                    Err(Failure {
                        kind: FailureKind::Trap,
                        message: format!("plugin trapped: {}", first_line(&trap)),
                        retryable: false,
                    })
                }
            }
        };
        let dropped = store.data().log_dropped;
        if dropped > 0 {
            tracing::warn!(job.id = %job_id, plugin = %plugin_name, dropped, "plugin log lines dropped");
        }
        let value = result?;
        let size = serde_json::to_vec(&value).map(|v| v.len()).unwrap_or(0);
        let limit = returned_output_limit(&grant.limits);
        if size as u64 > limit {
            return Err(Failure {
                kind: FailureKind::OutputLimit,
                message: format!(
                    "plugin returned {size} bytes of output, over its {limit} byte limit"
                ),
                retryable: false,
            });
        }
        Ok(value)
    }
}

/// Most bytes of JSON a plugin may return: twelve times `output_bytes`, plus 64 KiB.
///
/// A program's stdout and stderr are each kept up to `output_bytes`; a plugin that
/// returns both, as text in a JSON document with a few fields around them (the command
/// plugin does), needs room for two full streams, escaped: JSON writes a control byte
/// as six (`\u0000`), so binary output grows up to six times. With the agent's default
/// output ceiling of 1 MiB that is at most 12 MiB, under the 16 MiB the agent and the
/// server accept per message.
pub fn returned_output_limit(limits: &Limits) -> u64 {
    limits
        .output_bytes
        .saturating_mul(12)
        .saturating_add(64 << 10)
}

fn first_line(e: &wasmtime::Error) -> String {
    format!("{e:#}").lines().next().unwrap_or("").to_string()
}

/// A guest-reported error, before it becomes a [`Failure`].
struct GuestError {
    message: String,
    retryable: bool,
}

async fn call_world(
    plugin: &LoadedPlugin,
    store: &mut Store<Host>,
    input: &serde_json::Value,
) -> wasmtime::Result<Result<serde_json::Value, GuestError>> {
    match plugin.world {
        World::InventoryCollector => {
            let pre = bindings::inventory::InventoryCollectorPre::new(plugin.pre.clone())?;
            let instance = pre.instantiate_async(&mut *store).await?;
            let request = inventory::CollectRequest {
                packages: input
                    .get("packages")
                    .and_then(|v| v.as_bool())
                    .unwrap_or(true),
                extra: input.to_string(),
            };
            let r = instance.call_collect(&mut *store, &request).await?;
            Ok(match r {
                Ok(inv) => Ok(serde_json::to_value(&inv)?),
                Err(e) => Err(GuestError {
                    message: e.message,
                    retryable: e.retryable,
                }),
            })
        }
        World::Task => {
            let pre = bindings::task::TaskPre::new(plugin.pre.clone())?;
            let instance = pre.instantiate_async(&mut *store).await?;
            let r = instance.call_run(&mut *store, &input.to_string()).await?;
            Ok(match r {
                Ok(text) => match serde_json::from_str(&text) {
                    Ok(v) => Ok(v),
                    Err(e) => Err(GuestError {
                        message: format!("plugin returned output that is not JSON: {e}"),
                        retryable: false,
                    }),
                },
                Err(e) => Err(GuestError {
                    message: e.message,
                    retryable: e.retryable,
                }),
            })
        }
    }
}

/// Writes `bytes` to `path` via a temporary file and a rename, so readers never see a
/// partial file.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write as _;
    // Unique per writer: runs in one process (and agents sharing an engine) may write
    // the same file at once.
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let tmp = path.with_extension(format!("tmp{}.{n}", std::process::id()));
    {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use parameters::Host as _;
    use process::Host as _;

    fn host(exec: &[&str], params: &[(&str, &str)], granted: &[&str]) -> Host {
        let all: BTreeMap<String, String> = params
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let granted: Vec<String> = granted.iter().map(|s| s.to_string()).collect();
        Host {
            wasi: WasiCtxBuilder::new().build(),
            table: ResourceTable::new(),
            limiter: MemoryLimiter {
                max_bytes: 1 << 20,
                hit: Arc::default(),
            },
            facts: None,
            exec: exec.iter().map(|s| s.to_string()).collect(),
            run_as: Vec::new(),
            live: None,
            deadline: Instant::now() + Duration::from_secs(30),
            output_cap: 1024,
            parameters: granted_parameters(&all, &granted),
            agent_id: "a".into(),
            job_id: "j".into(),
            plugin: "p".into(),
            log_lines: 0,
            log_dropped: 0,
        }
    }

    #[test]
    fn parameters_get_returns_only_granted_names_that_are_set() {
        let mut h = host(
            &[],
            &[("region", "eu"), ("token", "s3cret"), ("other", "x")],
            &["region", "token", "unset"],
        );
        assert_eq!(h.get("region".into()).as_deref(), Some("eu"));
        assert_eq!(h.get("token".into()).as_deref(), Some("s3cret"));
        assert_eq!(h.get("other".into()), None, "set but not granted");
        assert_eq!(h.get("unset".into()), None, "granted but not set");
        assert_eq!(h.parameters.len(), 2, "only granted values are kept");
        let mut none = host(&[], &[("region", "eu")], &[]);
        assert_eq!(none.get("region".into()), None);
    }

    fn command(program: &str, args: &[&str], timeout_ms: Option<u32>) -> process::Command {
        process::Command {
            program: program.into(),
            args: args.iter().map(|s| s.to_string()).collect(),
            timeout_ms,
            working_dir: None,
            env: Vec::new(),
            run_as: None,
            stream_output: false,
        }
    }

    #[tokio::test]
    async fn process_run_runs_only_granted_programs() {
        let mut h = host(&["/bin/echo"], &[], &[]);
        let out = h.run(command("/bin/echo", &["hello"], None)).await.unwrap();
        assert_eq!((out.exit_code, out.stdout), (0, b"hello\n".to_vec()));
        let e = h
            .run(command("/bin/sh", &["-c", "echo hi"], None))
            .await
            .unwrap_err();
        assert_eq!(e.message, "program /bin/sh is not granted");
        assert!(!e.retryable);
    }

    #[tokio::test]
    async fn process_run_stops_at_the_job_deadline() {
        let mut h = host(&["/bin/sleep"], &[], &[]);
        h.deadline = Instant::now() + Duration::from_millis(300);
        let t = Instant::now();
        let e = h
            .run(command("/bin/sleep", &["30"], Some(60_000)))
            .await
            .unwrap_err();
        assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
        assert!(e.message.contains("did not finish"), "{}", e.message);
        // The request's own timeout applies when it is the shorter one.
        h.deadline = Instant::now() + Duration::from_secs(60);
        let e = h
            .run(command("/bin/sleep", &["30"], Some(200)))
            .await
            .unwrap_err();
        assert!(e.message.contains("within 200 ms"), "{}", e.message);
    }

    #[tokio::test]
    async fn process_run_applies_the_working_directory_and_environment() {
        let mut h = host(&["/bin/sh"], &[], &[]);
        let mut c = command("/bin/sh", &["-c", "pwd; echo \"$FOO\"; echo $PATH"], None);
        c.working_dir = Some("/usr".into());
        c.env = vec![("FOO".into(), "bar".into())];
        let out = h.run(c.clone()).await.unwrap();
        assert_eq!(out.exit_code, 0);
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            format!("/usr\nbar\n{}\n", crate::exec::PATH)
        );
        c.env = vec![("A=B".into(), "x".into())];
        let e = h.run(c.clone()).await.unwrap_err();
        assert!(e.message.contains("environment variable name"), "{e:?}");
        assert!(!e.retryable);
        c.env.clear();
        c.working_dir = Some("/no/such/dir".into());
        let e = h.run(c).await.unwrap_err();
        assert_eq!(
            e.message,
            "working directory /no/such/dir does not exist on this host"
        );
    }

    #[tokio::test]
    async fn process_run_reports_totals_when_output_is_cut() {
        let mut h = host(&["/bin/sh"], &[], &[]);
        let out = h
            .run(command(
                "/bin/sh",
                &["-c", "head -c 5000 /dev/zero; head -c 3000 /dev/zero >&2"],
                None,
            ))
            .await
            .unwrap();
        assert_eq!((out.stdout.len(), out.stderr.len()), (1024, 1024));
        assert!(out.stdout_truncated && out.stderr_truncated);
        assert_eq!((out.stdout_bytes, out.stderr_bytes), (5000, 3000));
    }

    #[tokio::test]
    async fn process_run_streams_live_output_only_when_asked() {
        let mut h = host(&["/bin/echo"], &[], &[]);
        let (sink, mut rx) = LiveSink::new(16);
        h.live = Some(sink);
        let mut c = command("/bin/echo", &["quiet"], None);
        h.run(c.clone()).await.unwrap();
        assert!(rx.try_recv().is_err(), "streamed without being asked");
        c.args = vec!["loud".into()];
        c.stream_output = true;
        let out = h.run(c).await.unwrap();
        let chunk = rx.try_recv().unwrap();
        assert_eq!(chunk.stream, drover_protocol::job::StreamName::Stdout);
        assert_eq!(chunk.data, b"loud\n");
        assert_eq!(out.stdout, b"loud\n", "the output comes back whole too");
    }

    #[tokio::test]
    async fn process_run_under_an_any_program_grant() {
        let mut h = host(&[crate::exec::ANY_PROGRAM], &[], &[]);
        let out = h.run(command("/bin/echo", &["any"], None)).await.unwrap();
        assert_eq!(out.stdout, b"any\n");
        for program in ["echo", "*", "/bin/../bin/echo"] {
            let e = h.run(command(program, &[], None)).await.unwrap_err();
            assert!(
                e.message.contains("not an absolute path"),
                "{program}: {e:?}"
            );
        }
    }

    #[tokio::test]
    async fn process_run_as_a_user_needs_the_policy() {
        let mut h = host(&["/usr/bin/id"], &[], &[]);
        let mut c = command("/usr/bin/id", &["-un"], None);
        c.run_as = Some("nobody".into());
        let e = h.run(c.clone()).await.unwrap_err();
        assert_eq!(
            e.message,
            "run-as user nobody is not allowed by this agent's policy"
        );
        assert!(!e.retryable);
        h.run_as = vec!["nobody".into()];
        match h.run(c).await {
            Ok(out) => assert_eq!(out.stdout, b"nobody\n"),
            // Not root: only the agent's own user may be named.
            Err(e) => assert!(
                e.message.contains("needs the agent to run as root"),
                "{e:?}"
            ),
        }
    }

    #[test]
    fn returned_output_has_room_for_two_full_streams() {
        let limits = Limits {
            output_bytes: 1 << 20,
            ..Limits::default()
        };
        assert_eq!(returned_output_limit(&limits), (12 << 20) + (64 << 10));
        // The worst case of the ceiling still fits in one message.
        assert!(returned_output_limit(&limits) < crate::agent::MAX_OUTGOING as u64);
    }
}
