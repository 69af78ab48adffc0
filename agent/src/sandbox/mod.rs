//! The sandbox: one wasmtime `Engine`, compiled components cached on disk, and a fresh
//! `Store` with limits for every run.
//!
//! - `bindings`: the generated bindings of both contract versions.
//! - [`engine`]: the engine's configuration and its epoch ticker (deadlines).
//! - [`cache`]: precompiled components on disk, loaded plugins in memory.
//! - [`limits`]: the memory limiter and the bound on returned output.
//! - [`worlds`]: the `drover:plugin@0.2.0` worlds: bindings and typed conversions.
//! - [`compat`]: the `drover:plugin@0.1.0` worlds, so plugins built against them keep
//!   running.
//! - [`host`]: the host interfaces plugins import, at both versions, and a run's state.
//! - [`exec`]: granted programs, for the `process` interface.
//! - [`host_dir`]: host directories a plugin or a job names, opened without following
//!   links below what the operator wrote, and used through the open handle.
//! - [`net`]: the socket check for granted addresses.
//! - [`capped`]: capped stdout/stderr.
//!
//! Which contract a component was built against is found once, when it is loaded (from
//! the versions of the `drover:plugin` interfaces it imports), and kept with it as typed
//! bindings; a run only calls them.

mod bindings;
mod cache;
pub mod capped;
mod compat;
pub mod engine;
pub mod exec;
pub mod host;
pub mod host_dir;
pub mod limits;
pub mod net;
mod worlds;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use drover_protocol::job::{Captured, Failure, FailureKind, Limits};
use drover_protocol::manifest::{Capabilities, World};
use drover_protocol::signed::SignatureMemo;
use wasmtime::component::{Component, InstancePre, Linker};
use wasmtime::{Engine, Store};
use wasmtime_wasi::{FsPerms, WasiCtxBuilder};

use self::cache::Cache;
use self::capped::CappedPipe;
use self::engine::Ticker;
use self::exec::LiveSink;
use self::host::Host;
use self::host_dir::HostDir;
use self::limits::{MemoryLimiter, returned_output_limit};

/// Manifest signatures remembered as checked (a few per plugin version).
const MANIFEST_MEMO: usize = 256;

/// A compiled plugin, ready to instantiate, with the bindings of the contract it was
/// built against.
#[derive(Clone)]
pub struct LoadedPlugin {
    world: World,
    contract: Contract,
}

/// The typed exports of a plugin, per contract version.
#[derive(Clone)]
enum Contract {
    /// `drover:plugin@0.2.0`.
    Current(worlds::Exports),
    /// `drover:plugin@0.1.0`.
    V0_1(compat::Exports),
}

impl LoadedPlugin {
    /// Finds which contract `component` was built against and checks that it exports
    /// `world` there.
    fn new(
        engine: &Engine,
        component: &Component,
        pre: InstancePre<Host>,
        world: World,
    ) -> Result<LoadedPlugin, String> {
        let does_not_implement =
            |e: wasmtime::Error| format!("plugin does not implement {}: {e:#}", world.as_str());
        let contract = match imported_version(engine, component).as_deref() {
            Some(compat::VERSION) => {
                Contract::V0_1(compat::Exports::new(pre, world).map_err(|e| match e {
                    compat::Unsupported::World => format!(
                        "plugin is built against drover:plugin@{}, which has no {} world",
                        compat::VERSION,
                        world.as_str()
                    ),
                    compat::Unsupported::Exports(e) => does_not_implement(e),
                })?)
            }
            Some(worlds::VERSION) => {
                Contract::Current(worlds::Exports::new(pre, world).map_err(does_not_implement)?)
            }
            Some(other) => {
                return Err(format!(
                    "plugin is built against drover:plugin@{other}, which this agent does not provide"
                ));
            }
            // It imports nothing of ours: its exports alone say which contract it is.
            None => match worlds::Exports::new(pre.clone(), world) {
                Ok(e) => Contract::Current(e),
                Err(current) => match compat::Exports::new(pre, world) {
                    Ok(e) => Contract::V0_1(e),
                    Err(_) => return Err(does_not_implement(current)),
                },
            },
        };
        Ok(LoadedPlugin { world, contract })
    }

    /// The WIT world it implements.
    pub fn world(&self) -> World {
        self.world
    }

    /// The version of `drover:plugin` it was built against.
    pub fn contract_version(&self) -> &'static str {
        match self.contract {
            Contract::Current(_) => worlds::VERSION,
            Contract::V0_1(_) => compat::VERSION,
        }
    }

    /// Instantiates the plugin in `store` and calls its world's export with `input`.
    async fn call(
        &self,
        store: &mut Store<Host>,
        input: worlds::Input,
    ) -> wasmtime::Result<Result<drover_protocol::worlds::Output, Failure>> {
        match &self.contract {
            Contract::Current(e) => e.call(store, input).await,
            Contract::V0_1(e) => e.call(store, input).await,
        }
    }
}

/// The `drover:plugin` version of the first of its interfaces a component imports, if
/// it imports any.
fn imported_version(engine: &Engine, component: &Component) -> Option<String> {
    component
        .component_type()
        .imports(engine)
        .find_map(|(name, _)| {
            let rest = name.strip_prefix("drover:plugin/")?;
            Some(rest.split_once('@').map_or("", |(_, v)| v).to_string())
        })
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
    /// This agent's id, for the host-facts interface.
    pub agent_id: &'a str,
    /// The job's input.
    pub input: &'a serde_json::Value,
    /// The job's parameters, secrets already opened. Handed only to a plugin granted
    /// them; never logged.
    pub parameters: &'a BTreeMap<String, String>,
    /// What the run may use.
    pub grant: &'a Grant,
    /// Where programs' output goes while they run: live to followers when a command
    /// asks to stream it, and kept until each ends, so a run cut short can report what
    /// they wrote. `None` drops it (a command's output still comes back whole, up to
    /// the cap).
    pub live: Option<LiveSink>,
}

/// What a run is allowed.
#[derive(Debug, Clone)]
pub struct Grant {
    /// The granted capabilities (already intersected with policy).
    pub capabilities: Capabilities,
    /// The granted read paths, already opened (see [`host_dir`]): the sandbox preopens
    /// these, never `capabilities.read_paths` by name.
    pub read_dirs: Vec<HostDir>,
    /// The limits.
    pub limits: Limits,
    /// Users granted programs may run as: the agent policy's `run_as`. Not part of
    /// the manifest: a command names its user, and the policy alone decides.
    pub run_as: Vec<String>,
}

/// The sandbox: one engine, shared by all runs (and by all agents of a simulated fleet).
pub struct Sandbox {
    engine: Engine,
    linker: Linker<Host>,
    cache: Cache,
    ticker: Ticker,
    manifests: SignatureMemo,
}

impl Sandbox {
    /// Creates the engine, the linker and the epoch ticker. `cache_dir` holds precompiled
    /// components; it must be private to the agent (the files are native code).
    pub fn new(cache_dir: &Path) -> anyhow::Result<Sandbox> {
        let engine = engine::new()?;
        let linker = host::linker(&engine)?;
        let cache = Cache::open(cache_dir, engine::compatibility(&engine)).with_context(|| {
            format!("opening the compiled-plugin cache {}", cache_dir.display())
        })?;
        let ticker = Ticker::start(&engine).context("starting the epoch ticker")?;
        Ok(Sandbox {
            engine,
            linker,
            cache,
            ticker,
            manifests: SignatureMemo::new(MANIFEST_MEMO),
        })
    }

    /// Manifest signatures already checked, shared by every agent on this sandbox: a
    /// plugin's manifest comes with every job that runs it, and is checked once.
    pub fn manifest_signatures(&self) -> &SignatureMemo {
        &self.manifests
    }

    /// Whether a precompiled artifact for this digest is in memory or on disk.
    pub fn is_cached(&self, sha256: &str) -> bool {
        self.cache.is_cached(sha256)
    }

    /// The plugin, if it is loaded in memory already as `world`: no disk, no compiling,
    /// so callers need not leave the async workers for it.
    pub fn loaded(&self, sha256: &str, world: World) -> Option<LoadedPlugin> {
        self.cache.loaded(sha256, world)
    }

    /// Loads a plugin: from memory, else the on-disk precompiled cache, else by compiling
    /// `bytes()` (which the caller has already verified) and caching the result.
    /// Returns the plugin and whether a cache was used. Blocking: compiling takes CPU.
    pub fn load(
        &self,
        sha256: &str,
        world: World,
        bytes: impl FnOnce() -> anyhow::Result<Vec<u8>>,
    ) -> Result<(LoadedPlugin, bool), Failure> {
        if let Some(p) = self.loaded(sha256, world) {
            return Ok((p, true));
        }
        let compile_failed = |e: String| Failure::new(FailureKind::CompileFailed, e);
        let (component, cached) = match self.cache.read(&self.engine, sha256) {
            Some(c) => (c, true),
            None => {
                let bytes = bytes().map_err(|e| Failure {
                    retryable: true,
                    ..Failure::new(FailureKind::AgentError, format!("{e:#}"))
                })?;
                let compiled = self
                    .engine
                    .precompile_component(&bytes)
                    .map_err(|e| compile_failed(format!("plugin does not compile: {e:#}")))?;
                self.cache.write(sha256, &compiled);
                let component = cache::deserialize(&self.engine, &compiled)
                    .map_err(|e| compile_failed(format!("plugin does not load: {e:#}")))?;
                (component, false)
            }
        };
        let pre = self.linker.instantiate_pre(&component).map_err(|e| {
            compile_failed(format!(
                "plugin imports something this agent does not provide: {e:#}"
            ))
        })?;
        // The exports are checked now, so a world mismatch is a refusal, not a run failure.
        let plugin =
            LoadedPlugin::new(&self.engine, &component, pre, world).map_err(compile_failed)?;
        tracing::debug!(
            sha256,
            world = world.as_str(),
            contract = plugin.contract_version(),
            cached,
            "plugin loaded"
        );
        self.cache.remember(sha256, plugin.clone());
        Ok((plugin, cached))
    }

    /// Runs a loaded plugin.
    pub async fn run(&self, plugin: &LoadedPlugin, req: &RunRequest<'_>) -> RunOutcome {
        let started = Instant::now();
        let out_cap = usize::try_from(req.grant.limits.output_bytes).unwrap_or(usize::MAX);
        let (stdout, stderr) = (CappedPipe::new(out_cap), CappedPipe::new(out_cap));
        let output = self.run_inner(plugin, req, &stdout, &stderr).await;
        RunOutcome {
            output,
            stdout: stdout.captured(),
            stderr: stderr.captured(),
            run_time: started.elapsed(),
        }
    }

    async fn run_inner(
        &self,
        plugin: &LoadedPlugin,
        req: &RunRequest<'_>,
        stdout: &CappedPipe,
        stderr: &CappedPipe,
    ) -> Result<serde_json::Value, Failure> {
        let RunRequest {
            agent_id,
            input,
            parameters,
            grant,
            ref live,
        } = *req;
        // Input that does not fit the world is refused before anything is instantiated.
        let input = worlds::Input::parse(plugin.world, input)?;
        let mut wasi = WasiCtxBuilder::new();
        wasi.stdout(stdout.clone()).stderr(stderr.clone());
        // wasmtime-wasi opens the open directory again through its `/proc/self/fd`
        // name: the path the manifest gave is not resolved a second time.
        for dir in &grant.read_dirs {
            wasi.preopened_dir(dir.handle_path(), dir.path(), FsPerms::ReadOnly)
                .map_err(|e| {
                    Failure::new(
                        FailureKind::AgentError,
                        format!(
                            "granted path {} cannot be opened on this host (through /proc/self/fd): {e}",
                            dir.path()
                        ),
                    )
                })?;
        }
        let deadline = Duration::from_millis(grant.limits.timeout_ms);
        // No sockets at all unless some address is granted.
        if !grant.capabilities.network.is_empty() {
            let lookup_timeout = deadline.min(Duration::from_secs(5));
            net::NetGrant::resolve(&grant.capabilities.network, lookup_timeout)
                .await
                .apply(&mut wasi);
        }
        let (limiter, mem_hit) = MemoryLimiter::new(grant.limits.memory_bytes);
        let host = Host::new(
            wasi.build(),
            limiter,
            grant,
            parameters,
            agent_id,
            live.clone(),
        );
        let mut store = Store::new(&self.engine, host);
        store.limiter(|h| h.limiter());
        store.set_epoch_deadline(1);
        store.epoch_deadline_async_yield_and_update(1);

        let _ticking = self.ticker.ticking();
        let call = plugin.call(&mut store, input);
        let result = match tokio::time::timeout(deadline, call).await {
            Err(_) => Err(Failure {
                retryable: true,
                ..Failure::new(
                    FailureKind::Timeout,
                    format!(
                        "plugin did not finish within its {} ms deadline and was stopped",
                        grant.limits.timeout_ms
                    ),
                )
            }),
            Ok(Ok(returned)) => returned,
            // Instantiating counts too: a component's memories and tables are created
            // at their initial sizes against the same limit.
            Ok(Err(trap)) => Err(if mem_hit.load(Ordering::Relaxed) {
                Failure::new(
                    FailureKind::MemoryLimit,
                    format!(
                        "plugin tried to grow memory past its {} byte limit (all its memories and tables together) and stopped: {}",
                        grant.limits.memory_bytes,
                        first_line(&trap)
                    ),
                )
            } else if limits::is_count_limit(&trap) {
                Failure::new(
                    FailureKind::MemoryLimit,
                    format!(
                        "plugin needs more than a run may have (at most {} instances, {} memories and {} tables): {}",
                        limits::MAX_INSTANCES,
                        limits::MAX_MEMORIES,
                        limits::MAX_TABLES,
                        first_line(&trap)
                    ),
                )
            } else {
                Failure::new(
                    FailureKind::Trap,
                    format!("plugin trapped: {}", first_line(&trap)),
                )
            }),
        };
        let dropped = store.data().log_dropped();
        if dropped > 0 {
            tracing::warn!(dropped, "plugin log lines dropped");
        }
        let value = worlds::to_json(result?).map_err(|e| {
            Failure::new(
                FailureKind::AgentError,
                format!("plugin output could not be encoded: {e}"),
            )
        })?;
        let size = serde_json::to_vec(&value).map(|v| v.len()).unwrap_or(0);
        let limit = returned_output_limit(&grant.limits);
        if size as u64 > limit {
            return Err(Failure::new(
                FailureKind::OutputLimit,
                format!("plugin returned {size} bytes of output, over its {limit} byte limit"),
            ));
        }
        Ok(value)
    }
}

fn first_line(e: &wasmtime::Error) -> String {
    format!("{e:#}").lines().next().unwrap_or("").to_string()
}
