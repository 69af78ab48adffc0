//! The host side of the plugin contract: [`Host`], the state of one run's store, and the
//! [`linker`] that gives plugins WASI and the `drover:plugin` host interfaces at both
//! versions, 0.2.0 and 0.1.0 (defined side by side: their versions are not
//! semver-compatible, so each component links to the one it was built against).
//!
//! One file per interface, each holding both versions; the 0.1.0 functions convert
//! their arguments and delegate to the 0.2.0 ones.

mod host_facts;
mod logging;
mod parameters;
mod process;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use wasmtime::Engine;
use wasmtime::component::{HasSelf, Linker, ResourceTable};
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

use super::Grant;
use super::bindings::v0_1::drover::plugin as v0_1;
use super::bindings::v0_2::drover::plugin as v0_2;
use super::exec::LiveSink;
use super::limits::MemoryLimiter;
use crate::facts::HostFacts;

/// Everything a run may touch. One per run, dropped with the store.
pub struct Host {
    wasi: WasiCtx,
    table: ResourceTable,
    limiter: MemoryLimiter,
    /// Host facts, when granted.
    facts: Option<HostFacts>,
    /// Programs the `process` interface may run.
    exec: Vec<String>,
    /// Users those programs may run as: the agent policy's `run_as`.
    run_as: Vec<String>,
    /// Where programs' output goes while they run.
    live: Option<LiveSink>,
    /// The job's deadline: no program runs past it.
    deadline: Instant,
    /// Most bytes kept of each of a program's output streams.
    output_cap: usize,
    /// The granted parameters' values. Never logged.
    parameters: BTreeMap<String, String>,
    agent_id: String,
    log_lines: u32,
    log_dropped: u32,
}

impl Host {
    /// The state of one run under `grant`, whose deadline starts now.
    pub fn new(
        wasi: WasiCtx,
        limiter: MemoryLimiter,
        grant: &Grant,
        parameters: &BTreeMap<String, String>,
        agent_id: &str,
        live: Option<LiveSink>,
    ) -> Host {
        let caps = &grant.capabilities;
        Host {
            wasi,
            table: ResourceTable::new(),
            limiter,
            facts: caps.host_facts.then(HostFacts::gather),
            exec: caps.exec.clone(),
            run_as: grant.run_as.clone(),
            live,
            deadline: Instant::now() + Duration::from_millis(grant.limits.timeout_ms),
            output_cap: usize::try_from(grant.limits.output_bytes).unwrap_or(usize::MAX),
            parameters: parameters::granted(parameters, &caps.parameters),
            agent_id: agent_id.to_string(),
            log_lines: 0,
            log_dropped: 0,
        }
    }

    /// The store's memory limiter.
    pub fn limiter(&mut self) -> &mut MemoryLimiter {
        &mut self.limiter
    }

    /// Log lines the plugin wrote past its allowance, dropped.
    pub fn log_dropped(&self) -> u32 {
        self.log_dropped
    }
}

impl WasiView for Host {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

impl v0_2::types::Host for Host {}
impl v0_1::types::Host for Host {}

/// A linker with WASI (async) and both versions of every `drover:plugin` host interface.
pub fn linker(engine: &Engine) -> wasmtime::Result<Linker<Host>> {
    let mut linker: Linker<Host> = Linker::new(engine);
    wasmtime_wasi::p2::add_to_linker_async(&mut linker)?;
    v0_2::logging::add_to_linker::<Host, HasSelf<Host>>(&mut linker, |h| h)?;
    v0_2::host_facts::add_to_linker::<Host, HasSelf<Host>>(&mut linker, |h| h)?;
    v0_2::process::add_to_linker::<Host, HasSelf<Host>>(&mut linker, |h| h)?;
    v0_2::parameters::add_to_linker::<Host, HasSelf<Host>>(&mut linker, |h| h)?;
    v0_1::logging::add_to_linker::<Host, HasSelf<Host>>(&mut linker, |h| h)?;
    v0_1::host_facts::add_to_linker::<Host, HasSelf<Host>>(&mut linker, |h| h)?;
    v0_1::process::add_to_linker::<Host, HasSelf<Host>>(&mut linker, |h| h)?;
    v0_1::parameters::add_to_linker::<Host, HasSelf<Host>>(&mut linker, |h| h)?;
    Ok(linker)
}

#[cfg(test)]
impl Host {
    /// A host granted `exec` and the parameters named in `granted` of `params`, with a
    /// deadline 30 s away and a 1 KiB output cap.
    pub fn for_test(exec: &[&str], params: &[(&str, &str)], granted: &[&str]) -> Host {
        use drover_protocol::job::Limits;
        use drover_protocol::manifest::Capabilities;
        let all: BTreeMap<String, String> = params
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let grant = Grant {
            capabilities: Capabilities {
                exec: exec.iter().map(|s| s.to_string()).collect(),
                parameters: granted.iter().map(|s| s.to_string()).collect(),
                ..Capabilities::default()
            },
            read_dirs: Vec::new(),
            limits: Limits {
                timeout_ms: 30_000,
                memory_bytes: 1 << 20,
                output_bytes: 1024,
            },
            run_as: Vec::new(),
        };
        let (limiter, _) = MemoryLimiter::new(1 << 20);
        Host::new(
            wasmtime_wasi::WasiCtxBuilder::new().build(),
            limiter,
            &grant,
            &all,
            "a",
            None,
        )
    }
}
