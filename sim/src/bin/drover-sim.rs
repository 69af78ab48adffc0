//! `drover-sim`: N real agents in one process, until Ctrl-C.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::Parser;
use drover_sim::procfs::{self, Sample};
use drover_sim::{Api, Fleet, FleetOptions, fleet};

/// A simulated fleet: N real Drover agents in one process, each with its own keys, data
/// directory and MQTT connection, sharing one wasm engine. They enroll with a
/// multi-use activation (`drover activation create --max-uses N`) and run until Ctrl-C.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// The server's HTTP API, http://HOST:PORT (server.json's "api").
    #[arg(long)]
    api: String,
    /// The operator token (the server's DATA_DIR/api-token), to count agents online.
    #[arg(long)]
    token_file: Option<PathBuf>,
    /// The activation id.
    #[arg(long)]
    activation: String,
    /// The activation code.
    #[arg(long)]
    code: String,
    /// How many agents.
    #[arg(long)]
    count: usize,
    /// Agent ids are PREFIX00000, PREFIX00001, ...
    #[arg(long, default_value = "sim-")]
    prefix: String,
    /// Index of the first agent (to run several processes with one prefix).
    #[arg(long, default_value_t = 0)]
    first: usize,
    /// Where the agents keep their data, one directory each; already enrolled agents are
    /// not enrolled again. Default: /dev/shm/drover-sim (RAM, so agent fsyncs do not
    /// measure this disk).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// `[policy] exec`: a program plugins may be granted; repeatable.
    #[arg(long)]
    policy_exec: Vec<String>,
    /// `[policy] host_facts = true`.
    #[arg(long)]
    policy_host_facts: bool,
    /// `[policy] read_paths`: a directory plugins may be granted; repeatable.
    #[arg(long)]
    policy_read: Vec<PathBuf>,
    /// A tag KEY=VALUE each agent announces; repeatable.
    #[arg(long = "tag", value_parser = parse_tag)]
    tags: Vec<(String, String)>,
    /// Enrollments in flight at once.
    #[arg(long, default_value_t = 8)]
    enroll_parallelism: usize,
    /// Agents started per second (0: all at once).
    #[arg(long, default_value_t = 2000)]
    start_rate: usize,
    /// Tokio worker threads (default: one per core).
    #[arg(long)]
    threads: Option<usize>,
}

fn parse_tag(s: &str) -> Result<(String, String), String> {
    let (k, v) = s
        .split_once('=')
        .ok_or_else(|| format!("tag {s:?} must be KEY=VALUE"))?;
    Ok((k.to_string(), v.to_string()))
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    drover_protocol::telemetry::init(
        "warn,drover_sim=info",
        drover_protocol::telemetry::Format::Text,
    );

    let need = procfs::files_needed(args.count);
    let limit = procfs::raise_nofile(need)?;
    match limit {
        Some(l) if l < need => eprintln!(
            "warning: open-file limit {l} is below the ~{need} that {} agents need; raise the hard limit (ulimit -Hn)",
            args.count
        ),
        _ => eprintln!(
            "open-file limit: {}",
            limit.map_or("unlimited".to_string(), |l| l.to_string())
        ),
    }

    let mut rt = tokio::runtime::Builder::new_multi_thread();
    if let Some(n) = args.threads {
        rt.worker_threads(n.max(1));
    }
    let rt = rt
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let api = match &args.token_file {
        Some(f) => Some(Api::with_token_file(&args.api, f)?),
        None => None,
    };
    let mut opts = FleetOptions::new(&args.api, &args.activation, &args.code, args.count);
    opts.prefix = args.prefix.clone();
    opts.first = args.first;
    opts.data_dir = args
        .data_dir
        .clone()
        .unwrap_or_else(fleet::default_data_dir);
    opts.policy_exec = args.policy_exec.clone();
    opts.host_facts = args.policy_host_facts;
    opts.read_paths = args.policy_read.clone();
    opts.tags = args.tags.iter().cloned().collect();
    opts.enroll_parallelism = args.enroll_parallelism;
    opts.start_rate = args.start_rate;
    eprintln!(
        "starting {} agents ({}{:05}..) with data under {}",
        args.count,
        args.prefix,
        args.first,
        opts.data_dir.display()
    );

    rt.block_on(async move {
        let t = Instant::now();
        let fleet = Fleet::start(opts).await?;
        eprintln!(
            "enrolled {} new agent(s) in {:.1} s; all {} started after {:.1} s",
            fleet.enrolled,
            fleet.enroll_time.as_secs_f64(),
            fleet.ids().len(),
            t.elapsed().as_secs_f64()
        );
        let before = Sample::of(None)?;
        let term = terminated();
        tokio::pin!(term);
        let mut last_print: Option<Instant> = None;
        let mut all_online = false;
        loop {
            let online = match &api {
                Some(api) => {
                    let (api, ids) = (api.clone(), fleet.ids().to_vec());
                    Some(tokio::task::spawn_blocking(move || api.online_among(&ids)).await??)
                }
                None => None,
            };
            let first_all = !all_online && online == Some(fleet.ids().len());
            if first_all {
                all_online = true;
                eprintln!(
                    "all {} agents online after {:.1} s",
                    fleet.ids().len(),
                    t.elapsed().as_secs_f64()
                );
            }
            if first_all || last_print.is_none_or(|p| p.elapsed() >= Duration::from_secs(10)) {
                let now = Sample::of(None)?;
                eprintln!(
                    "online {} / {}; in message loop {}; failed {}; RSS {:.0} MiB; CPU {:.1} % of a core since start",
                    online.map_or("?".to_string(), |n| n.to_string()),
                    fleet.ids().len(),
                    fleet.running(),
                    fleet.failed(),
                    now.rss_bytes as f64 / (1 << 20) as f64,
                    100.0 * now.cpu_share_since(&before)
                );
                last_print = Some(Instant::now());
            }
            tokio::select! {
                _ = &mut term => break,
                _ = tokio::time::sleep(Duration::from_secs(2)) => {}
            }
        }
        eprintln!("stopping");
        let s = fleet.stop(Duration::from_secs(20)).await;
        eprintln!(
            "stopped {} agent(s) in {:.1} s ({} aborted)",
            s.stopped,
            s.took.as_secs_f64(),
            s.aborted
        );
        anyhow::Ok(())
    })
}

/// SIGINT or SIGTERM.
async fn terminated() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
