//! `drover-bench`: measures Drover's release binaries on this machine and prints a table
//! (metric, value, target, met?); writes the same as JSON.
//!
//! It starts its own `drover serve` (loopback, ports picked by the system) in a fresh
//! directory, signs and publishes the built-in plugins as `quickstart.sh` does, and then:
//!
//! - runs one real `drover-agent` process: idle memory and CPU, a cold first run of
//!   `inventory`, warm round trips of `misbehave` in `echo` mode, a restart;
//! - runs simulated agents in this process (`drover_sim::Fleet`: real agents sharing one
//!   wasm engine, data under /dev/shm): a fan-out to 1,000 of them, Run Command to them
//!   when the CLI has it, and 10,000 connected at once.
//!
//! It is a program, not a test: build the release binaries and plugins first (see
//! README, "Performance").

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail, ensure};
use clap::{Parser, ValueEnum};
use drover_sim::api::results_in;
use drover_sim::procfs::{self, Sample};
use drover_sim::report::{Report, Target, quantile};
use drover_sim::server::{Process, Server};
use drover_sim::{Api, Fleet, FleetOptions};
use serde_json::{Value, json};

/// Measures Drover's release binaries on this machine.
#[derive(Debug, Parser)]
#[command(about)]
struct Args {
    /// Where `drover` and `drover-agent` are (default: $CARGO_TARGET_DIR/release, else
    /// target/release in the workspace).
    #[arg(long)]
    bin_dir: Option<PathBuf>,
    /// Where the plugins are (default: plugins/target/wasm32-wasip2/release).
    #[arg(long)]
    plugins_dir: Option<PathBuf>,
    /// The server's and the real agent's directory, on disk (default: a fresh one in
    /// the temporary directory, removed afterwards unless --keep).
    #[arg(long)]
    work_dir: Option<PathBuf>,
    /// The simulated agents' directories (default: under /dev/shm, so their fsyncs do
    /// not measure this machine's disk).
    #[arg(long)]
    sim_dir: Option<PathBuf>,
    /// Where to write the JSON (default: target/bench.json in the workspace).
    #[arg(long)]
    json: Option<PathBuf>,
    /// Only these measurements (comma-separated); all by default.
    #[arg(long, value_enum, value_delimiter = ',')]
    only: Vec<Stage>,
    /// How long the real agent idles before its memory and CPU are read.
    #[arg(long, default_value_t = 60)]
    idle_secs: u64,
    /// Warm round trips measured.
    #[arg(long, default_value_t = 200)]
    latency_runs: usize,
    /// Round trips before measuring.
    #[arg(long, default_value_t = 20)]
    warmup: usize,
    /// Simulated agents in the fan-out.
    #[arg(long, default_value_t = 1000)]
    fanout: usize,
    /// Fan-outs and Run Commands measured (after one warm-up each); the medians are
    /// reported.
    #[arg(long, default_value_t = 3)]
    fanout_runs: usize,
    /// Simulated agents connected at once for the "10,000 agents" figure.
    #[arg(long = "agents-10k", default_value_t = 10_000)]
    agents_10k: usize,
    /// Simulated agents started per second (each connects at once).
    #[arg(long, default_value_t = 250)]
    start_rate: usize,
    /// Give up growing the fleet when no more agents came online for this many seconds.
    #[arg(long, default_value_t = 120)]
    stall_secs: u64,
    /// After the 10,000-agent figures, also fan out to all of them. Off by default: at
    /// this scale the embedded broker's routing makes it take minutes (see README).
    #[arg(long)]
    burst_10k: bool,
    /// The server's log level (DROVER_LOG).
    #[arg(long, default_value = "info")]
    server_log: String,
    /// Keep the work directories.
    #[arg(long)]
    keep: bool,
}

/// What to measure.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Stage {
    /// The agent binary's size.
    Size,
    /// A real agent's idle RSS and CPU.
    Idle,
    /// Cold first run of inventory on a fresh agent.
    Cold,
    /// Warm job round trips (p50, p99).
    Latency,
    /// Restart of the agent to its first result.
    Restart,
    /// Fan-out to 1,000 simulated agents, and results ingested per second.
    Fanout,
    /// Run Command (`/bin/true`) to the simulated agents.
    RunCommand,
    /// 10,000 simulated agents connected; the server's RSS.
    Agents10k,
}

const MIB: f64 = (1 << 20) as f64;

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    drover_protocol::telemetry::init(
        "warn,drover_protocol::link=error",
        drover_protocol::telemetry::Format::Text,
    );
    let mut bench = Bench::new(args)?;
    let outcome = bench.run();
    if let Err(e) = &outcome {
        bench
            .report
            .context
            .insert("error".into(), json!(format!("{e:#}")));
        eprintln!("bench: stopped early: {e:#}");
    }
    bench.finish()?;
    outcome
}

fn say(msg: impl AsRef<str>) {
    eprintln!("bench: {}", msg.as_ref());
}

struct Bench {
    args: Args,
    report: Report,
    bin_dir: PathBuf,
    plugins_dir: PathBuf,
    work: PathBuf,
    sim_dir: PathBuf,
    json_path: PathBuf,
    started: Instant,
}

/// How to start the real agent.
struct RealAgent {
    config: PathBuf,
    log: PathBuf,
}

impl Bench {
    fn new(args: Args) -> anyhow::Result<Bench> {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .context("workspace root")?
            .to_path_buf();
        let target = std::env::var_os("CARGO_TARGET_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| root.join("target"));
        let bin_dir = args
            .bin_dir
            .clone()
            .unwrap_or_else(|| target.join("release"));
        let plugins_dir = args
            .plugins_dir
            .clone()
            .unwrap_or_else(|| root.join("plugins/target/wasm32-wasip2/release"));
        let pid = std::process::id();
        let work = args
            .work_dir
            .clone()
            .unwrap_or_else(|| std::env::temp_dir().join(format!("drover-bench-{pid}")));
        let sim_dir = args.sim_dir.clone().unwrap_or_else(|| {
            drover_sim::fleet::default_data_dir().with_file_name(format!("drover-bench-{pid}"))
        });
        let json_path = args
            .json
            .clone()
            .unwrap_or_else(|| target.join("bench.json"));
        ensure!(
            bin_dir.join("drover").exists() && bin_dir.join("drover-agent").exists(),
            "{} has no drover and drover-agent: cargo build --release -p drover -p drover-agent",
            bin_dir.display()
        );
        Ok(Bench {
            args,
            report: Report::default(),
            bin_dir,
            plugins_dir,
            work,
            sim_dir,
            json_path,
            started: Instant::now(),
        })
    }

    fn wants(&self, s: Stage) -> bool {
        self.args.only.is_empty() || self.args.only.contains(&s)
    }

    fn plugin(&self, crate_name: &str) -> PathBuf {
        self.plugins_dir
            .join(format!("{}.wasm", crate_name.replace('-', "_")))
    }

    fn run(&mut self) -> anyhow::Result<()> {
        self.context();
        if self.wants(Stage::Size) {
            let len = std::fs::metadata(self.bin_dir.join("drover-agent"))?.len();
            self.report.push(
                "agent_binary_mib",
                "agent binary size",
                Some(len as f64 / MIB),
                "MiB",
                None,
                format!("{len} bytes, stripped release build (lto thin)"),
            );
        }
        let real = [Stage::Idle, Stage::Cold, Stage::Latency, Stage::Restart]
            .iter()
            .any(|s| self.wants(*s));
        let sim = [Stage::Fanout, Stage::RunCommand, Stage::Agents10k]
            .iter()
            .any(|s| self.wants(*s));
        if !real && !sim {
            return Ok(());
        }

        // Before the server starts, so that it inherits the limit too.
        let biggest = self.biggest_fleet();
        let need = procfs::files_needed(biggest);
        let limit = procfs::raise_nofile(need)?;
        self.report
            .context
            .insert("nofile_limit".into(), json!(limit));
        if let Some(l) = limit
            && l < need
        {
            say(format!(
                "warning: open-file limit {l} < ~{need} needed for {biggest} agents (ulimit -Hn)"
            ));
        }
        std::fs::create_dir_all(&self.work)?;
        let server = Server::start(
            &self.bin_dir.join("drover"),
            &self.work.join("server"),
            &["--max-connections", "100000"],
            &self.args.server_log,
        )?;
        say(format!(
            "server on {} (broker {}), data in {}",
            server.api_url,
            server.broker,
            server.data.display()
        ));
        let api = server.api()?;
        let plugins = self.work.join("plugins");
        std::fs::create_dir_all(&plugins)?;
        server.publish(
            &self.plugin("drover-plugin-misbehave"),
            &plugins,
            "misbehave",
            1,
            "task",
            &[],
        )?;
        server.publish(
            &self.plugin("drover-plugin-inventory"),
            &plugins,
            "inventory",
            1,
            "inventory-collector",
            &["--host-facts", "--read-path", "/var/lib/dpkg"],
        )?;
        let s = Sample::of(Some(server.process.pid()))?;
        self.report.context.insert(
            "server_rss_start_mib".into(),
            json!(round(s.rss_bytes as f64 / MIB, 1)),
        );

        if real {
            self.real_agent(&server, &api)?;
        }
        if sim {
            self.simulated(&server, &api, &plugins)?;
        }
        let s = Sample::of(Some(server.process.pid()))?;
        self.report.context.insert(
            "server_peak_rss_mib".into(),
            json!(round(s.peak_rss_bytes as f64 / MIB, 1)),
        );
        let mut server = server;
        let t = Instant::now();
        let st = server.process.stop(Duration::from_secs(30))?;
        say(format!(
            "server stopped in {:.1} s ({st})",
            t.elapsed().as_secs_f64()
        ));
        Ok(())
    }

    fn context(&mut self) {
        let c = &mut self.report.context;
        c.insert("at_ms".into(), json!(now_ms()));
        c.insert(
            "cpus".into(),
            json!(std::thread::available_parallelism().map_or(1, |n| n.get())),
        );
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        if let Some(kib) = procfs::status_kib(&meminfo, "MemTotal") {
            c.insert("memory_mib".into(), json!(kib / 1024));
        }
        if let Ok(k) = std::fs::read_to_string("/proc/sys/kernel/osrelease") {
            c.insert("kernel".into(), json!(k.trim()));
        }
        let git = |args: &[&str]| {
            Command::new("git")
                .args(args)
                .current_dir(env!("CARGO_MANIFEST_DIR"))
                .output()
                .ok()
                .filter(|o| o.status.success())
                .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        };
        c.insert(
            "git_head".into(),
            json!(git(&["rev-parse", "--short", "HEAD"])),
        );
        c.insert(
            "git_dirty_files".into(),
            json!(
                git(&["status", "--porcelain", "--untracked-files=no"]).map(|s| s.lines().count())
            ),
        );
        c.insert("bin_dir".into(), json!(self.bin_dir.display().to_string()));
        c.insert("work_dir".into(), json!(self.work.display().to_string()));
        c.insert("sim_dir".into(), json!(self.sim_dir.display().to_string()));
        c.insert(
            "args".into(),
            json!(std::env::args().skip(1).collect::<Vec<_>>()),
        );
    }

    fn finish(&mut self) -> anyhow::Result<()> {
        self.report.context.insert(
            "bench_secs".into(),
            json!(round(self.started.elapsed().as_secs_f64(), 1)),
        );
        println!("{}", self.report.table());
        if let Some(dir) = self.json_path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        std::fs::write(
            &self.json_path,
            serde_json::to_string_pretty(&self.report)? + "\n",
        )
        .with_context(|| format!("writing {}", self.json_path.display()))?;
        say(format!("wrote {}", self.json_path.display()));
        if !self.args.keep {
            let _ = std::fs::remove_dir_all(&self.work);
            let _ = std::fs::remove_dir_all(&self.sim_dir);
        }
        Ok(())
    }

    // ---- one real agent -------------------------------------------------------------

    fn spawn_agent(&self, a: &RealAgent) -> anyhow::Result<Process> {
        let mut cmd = Command::new(self.bin_dir.join("drover-agent"));
        cmd.arg("--config").arg(&a.config).env("DROVER_LOG", "info");
        Process::spawn(cmd, "drover-agent", &a.log)
    }

    fn real_agent(&mut self, server: &Server, api: &Api) -> anyhow::Result<()> {
        let id = "bench-agent";
        let config = self.work.join("agent.toml");
        let agent_dir = self.work.join("agent");
        server.cli(&[
            "agents",
            "add",
            id,
            "--out",
            &config.display().to_string(),
            "--agent-data-dir",
            &agent_dir.display().to_string(),
            "--tag",
            "bench=single",
        ])?;
        let agent = RealAgent {
            config,
            log: self.work.join("agent.log"),
        };
        let t = Instant::now();
        let mut process = self.spawn_agent(&agent)?;
        wait_online(api, id, Duration::from_secs(60))?;
        say(format!(
            "real agent online {:.0} ms after spawn (first start: keys and enrollment)",
            t.elapsed().as_secs_f64() * 1000.0
        ));
        let pid = process.pid();

        if self.wants(Stage::Idle) {
            std::thread::sleep(Duration::from_secs(2));
            let a = Sample::of(Some(pid))?;
            say(format!(
                "agent idle for {} s (--idle-secs)",
                self.args.idle_secs
            ));
            std::thread::sleep(Duration::from_secs(self.args.idle_secs));
            let b = Sample::of(Some(pid))?;
            self.report.push(
                "agent_idle_rss_mib",
                &format!("agent idle RSS ({} s)", self.args.idle_secs),
                Some(b.rss_bytes as f64 / MIB),
                "MiB",
                Some(Target::AtMost(10.0)),
                format!(
                    "VmRSS of a connected drover-agent that has run nothing yet: {}; peak {:.1} MiB",
                    b.describe_rss(),
                    b.peak_rss_bytes as f64 / MIB
                ),
            );
            self.report.push(
                "agent_idle_cpu_pct",
                &format!("agent idle CPU ({} s)", self.args.idle_secs),
                Some(100.0 * b.cpu_share_since(&a)),
                "%",
                Some(Target::AtMost(0.1)),
                format!(
                    "utime+stime over the window, % of one core ({:.3} s CPU); target ≈ 0",
                    b.cpu_secs - a.cpu_secs
                ),
            );
        }

        let inventory = json!({
            "plugin": "inventory", "targets": id, "timeout_secs": 60, "delivery_secs": 120,
        });
        if self.wants(Stage::Cold) {
            let (took, view) = run_job(api, &inventory, Duration::from_secs(120))?;
            let r = first_result(&view)?;
            let tm = &r["timings"];
            self.report.push(
                "cold_first_run_ms",
                "cold first run (inventory), end to end",
                Some(ms(took)),
                "ms",
                None,
                format!(
                    "submit to result stored, fresh agent: fetch {} ms + verify/compile {} ms (cached: {}) + run {} ms; agent total {} ms",
                    tm["fetch_ms"], tm["load_ms"], tm["compile_cached"], tm["run_ms"], r["duration_ms"]
                ),
            );
            for (key, name, field) in [
                ("cold_fetch_ms", "cold: fetch over MQTT", "fetch_ms"),
                ("cold_compile_ms", "cold: verify + compile", "load_ms"),
                ("cold_run_ms", "cold: run (inventory)", "run_ms"),
            ] {
                self.report.push(
                    key,
                    name,
                    tm[field].as_f64(),
                    "ms",
                    None,
                    "from the result's timings",
                );
            }
        }

        if self.wants(Stage::Latency) {
            let l = self.latency(api, id, server.process.pid(), pid)?;
            let note = format!(
                "misbehave echo, {} runs after {} warm-up, one at a time, agent data on disk: POST /api/v1/jobs to the result stored (a long-poll GET returns); max {:.2} ms; server's stamps created→finished p50 {} ms; CPU per job: server {:.0} µs, agent {:.0} µs; {} failed",
                l.runs, self.args.warmup, l.max, l.server_p50, l.cpu_us.0, l.cpu_us.1, l.failed
            );
            self.report.push(
                "latency_p50_ms",
                "job round trip p50 (warm)",
                Some(l.p50),
                "ms",
                Some(Target::AtMost(1.0)),
                note.clone(),
            );
            self.report.push(
                "latency_p99_ms",
                "job round trip p99 (warm)",
                Some(l.p99),
                "ms",
                Some(Target::AtMost(5.0)),
                note,
            );
            self.report
                .context
                .insert("latency_first_echo_ms".into(), json!(round(l.first, 2)));
            let s = Sample::of(Some(pid))?;
            self.report.push(
                "agent_rss_after_jobs_mib",
                "agent RSS after the jobs",
                Some(s.rss_bytes as f64 / MIB),
                "MiB",
                None,
                format!(
                    "after the runs above (two plugins compiled and loaded): {}; peak {:.1} MiB",
                    s.describe_rss(),
                    s.peak_rss_bytes as f64 / MIB
                ),
            );
        }

        if self.wants(Stage::Latency) {
            // The same with the agent's data on tmpfs: what the agent's fsyncs cost.
            let shm_id = "bench-agent-tmpfs";
            let shm_agent = RealAgent {
                config: self.work.join("agent-tmpfs.toml"),
                log: self.work.join("agent-tmpfs.log"),
            };
            server.cli(&[
                "agents",
                "add",
                shm_id,
                "--out",
                &shm_agent.config.display().to_string(),
                "--agent-data-dir",
                &self.sim_dir.join(shm_id).display().to_string(),
                "--tag",
                "bench=tmpfs",
            ])?;
            let mut p = self.spawn_agent(&shm_agent)?;
            wait_online(api, shm_id, Duration::from_secs(60))?;
            let l = self.latency(api, shm_id, server.process.pid(), p.pid())?;
            p.stop(Duration::from_secs(15))?;
            let note = format!(
                "as above, but this agent's data directory is on tmpfs ({}), so its fsyncs are free; the server stays where --work-dir is; CPU per job: server {:.0} µs, agent {:.0} µs",
                self.sim_dir.display(),
                l.cpu_us.0,
                l.cpu_us.1
            );
            self.report.push(
                "latency_tmpfs_p50_ms",
                "job round trip p50, agent on tmpfs",
                Some(l.p50),
                "ms",
                None,
                note.clone(),
            );
            self.report.push(
                "latency_tmpfs_p99_ms",
                "job round trip p99, agent on tmpfs",
                Some(l.p99),
                "ms",
                None,
                note,
            );
            let (disk, shm) = (fsync_p50(&self.work)?, fsync_p50(&self.sim_dir)?);
            self.report.push(
                "fsync_disk_ms",
                "fsync of a small file, work dir",
                Some(disk),
                "ms",
                None,
                format!(
                    "p50 of 200 create+write+fsync of 300 bytes in {}",
                    self.work.display()
                ),
            );
            self.report
                .context
                .insert("fsync_tmpfs_ms".into(), json!(round(shm, 4)));
        }

        if self.wants(Stage::Restart) {
            process.stop(Duration::from_secs(15))?;
            // Give the server a moment to see it offline, as after a real restart.
            std::thread::sleep(Duration::from_millis(500));
            let t = Instant::now();
            process = self.spawn_agent(&agent)?;
            let (id_, n) = api.submit(&inventory)?;
            let view = api.wait_job(&id_, n, Duration::from_secs(60))?;
            let took = t.elapsed();
            let r = first_result(&view)?;
            let tm = &r["timings"];
            self.report.push(
                "restart_first_result_ms",
                "cached restart to first result",
                Some(ms(took)),
                "ms",
                None,
                format!(
                    "spawn drover-agent, submit inventory at once, to the result stored; load {} ms (precompiled cache: {}), run {} ms",
                    tm["load_ms"], tm["compile_cached"], tm["run_ms"]
                ),
            );
            self.report.push(
                "restart_load_ms",
                "restart: load precompiled plugin",
                tm["load_ms"].as_f64(),
                "ms",
                None,
                "from the result's timings",
            );
        }
        process.stop(Duration::from_secs(15))?;
        Ok(())
    }

    /// Warm round trips of misbehave echo on one agent, one at a time.
    /// CPU per job of the server (`server_pid`) and the agent (`agent_pid`) is measured
    /// over the timed runs.
    fn latency(
        &self,
        api: &Api,
        id: &str,
        server_pid: u32,
        agent_pid: u32,
    ) -> anyhow::Result<Latency> {
        let echo = json!({
            "plugin": "misbehave", "targets": id, "input": {"mode": "echo"},
            "timeout_secs": 10, "delivery_secs": 60,
        });
        say(format!(
            "{id}: {} warm-up + {} measured round trips",
            self.args.warmup, self.args.latency_runs
        ));
        let mut first = None;
        for _ in 0..self.args.warmup.max(1) {
            let (took, _) = run_job(api, &echo, Duration::from_secs(60))?;
            first.get_or_insert(took);
        }
        let mut lat = Vec::with_capacity(self.args.latency_runs);
        let mut server = Vec::with_capacity(self.args.latency_runs);
        let mut failed = 0;
        let (srv0, agent0) = (Sample::of(Some(server_pid))?, Sample::of(Some(agent_pid))?);
        for _ in 0..self.args.latency_runs.max(1) {
            let (took, view) = run_job(api, &echo, Duration::from_secs(30))?;
            if first_result(&view)?["status"] != "succeeded" {
                failed += 1;
            }
            lat.push(ms(took));
            let created = view["job"]["created_ms"].as_f64().unwrap_or(0.0);
            let finished = view["targets"][0]["finished_ms"]
                .as_f64()
                .unwrap_or(created);
            server.push(finished - created);
        }
        let (srv1, agent1) = (Sample::of(Some(server_pid))?, Sample::of(Some(agent_pid))?);
        let per_job = |a: &Sample, b: &Sample| (b.cpu_secs - a.cpu_secs) * 1e6 / lat.len() as f64;
        let cpu_us = (per_job(&srv0, &srv1), per_job(&agent0, &agent1));
        lat.sort_by(f64::total_cmp);
        server.sort_by(f64::total_cmp);
        Ok(Latency {
            cpu_us,
            runs: lat.len(),
            first: first.map_or(0.0, ms),
            p50: quantile(&lat, 0.5).unwrap_or(0.0),
            p99: quantile(&lat, 0.99).unwrap_or(0.0),
            max: lat.last().copied().unwrap_or(0.0),
            server_p50: quantile(&server, 0.5).unwrap_or(0.0),
            failed,
        })
    }

    // ---- simulated agents -----------------------------------------------------------

    fn biggest_fleet(&self) -> usize {
        self.args.fanout.max(if self.wants(Stage::Agents10k) {
            self.args.agents_10k
        } else {
            0
        })
    }

    fn simulated(&mut self, server: &Server, api: &Api, plugins: &Path) -> anyhow::Result<()> {
        let biggest = self.biggest_fleet();

        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?;
        let tags = BTreeMap::from([("bench".to_string(), "fleet".to_string())]);
        let (act, code) =
            api.create_activation(biggest as u32 + 1, &tags, Duration::from_secs(4 * 3600))?;
        let mut opts = FleetOptions::new(&server.api_url, &act, &code, self.args.fanout);
        opts.prefix = "sim-".into();
        opts.data_dir = self.sim_dir.clone();
        opts.enroll_parallelism = 8;
        opts.start_rate = self.args.start_rate;

        // Run Command needs the command plugin, the CLI command, and agents allowing
        // any program.
        let mut run_command = None;
        if self.wants(Stage::RunCommand) {
            let wasm = self.plugin("drover-plugin-command");
            let mut probe = opts.clone();
            probe.policy_exec = vec!["*".into()];
            run_command = if !server.has_command("run-command") {
                Some(Err("`drover run-command` is not in this build".to_string()))
            } else if !wasm.exists() {
                Some(Err(format!("{} is not built", wasm.display())))
            } else if let Err(e) = probe.config("sim-probe") {
                Some(Err(format!("agents cannot allow exec \"*\": {e:#}")))
            } else {
                server.publish(
                    &wasm,
                    plugins,
                    "command",
                    1,
                    "command-runner",
                    &["--exec", "*"],
                )?;
                opts.policy_exec = vec!["*".into()];
                Some(Ok(()))
            };
        }

        say(format!(
            "starting {} simulated agents (data under {})",
            self.args.fanout,
            self.sim_dir.display()
        ));
        let t = Instant::now();
        let fleet = rt.block_on(Fleet::start(opts.clone()))?;
        let started = t.elapsed();
        let connected =
            rt.block_on(fleet.wait_connected(api, Duration::from_secs(600), progress("online")))?;
        say(format!(
            "{} agents: enrolled in {:.1} s, started in {:.1} s, all online {:.1} s later",
            self.args.fanout,
            fleet.enroll_time.as_secs_f64(),
            started.as_secs_f64(),
            connected.as_secs_f64()
        ));
        self.report.context.insert(
            "fleet_1k".into(),
            json!({
                "agents": self.args.fanout,
                "enroll_secs": round(fleet.enroll_time.as_secs_f64(), 2),
                "online_after_start_secs": round(connected.as_secs_f64(), 2),
            }),
        );
        let (sim_1k, server_1k) = idle_window(server, Duration::from_secs(10))?;
        let fds = std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count());
        self.report
            .context
            .insert("sim_open_files_1k".into(), json!(fds));
        self.push_fleet_resources("1k", self.args.fanout, sim_1k, server_1k);

        let outcome = (|| -> anyhow::Result<Option<Fleet>> {
            if self.wants(Stage::Fanout) {
                self.fanout(api, server.process.pid(), self.args.fanout)?;
            }
            match run_command {
                Some(Ok(())) => self.run_command(api, server.process.pid(), self.args.fanout)?,
                Some(Err(why)) => self.report.missing(
                    "run_command_1k_s",
                    "Run Command /bin/true to 1,000",
                    "s",
                    None,
                    &why,
                ),
                None => {}
            }
            if self.wants(Stage::Agents10k) {
                return self.agents_10k(&rt, api, &opts, &fleet, server);
            }
            Ok(None)
        })();

        let t = Instant::now();
        let (more, failure) = match outcome {
            Ok(more) => (more, None),
            Err(e) => (None, Some(e)),
        };
        let mut stopped = 0;
        if let Some(more) = more {
            stopped += rt.block_on(more.stop(Duration::from_secs(60))).stopped;
        }
        stopped += rt.block_on(fleet.stop(Duration::from_secs(60))).stopped;
        if let Some(e) = failure {
            return Err(e);
        }
        say(format!(
            "{stopped} simulated agents stopped in {:.1} s",
            t.elapsed().as_secs_f64()
        ));
        self.report.context.insert(
            "fleet_stop_secs".into(),
            json!(round(t.elapsed().as_secs_f64(), 2)),
        );
        Ok(())
    }

    fn push_fleet_resources(&mut self, tag: &str, n: usize, sim: Window, server: Window) {
        let label = if tag == "10k" { "10,000" } else { "1,000" };
        let scale = if n == 10_000 || n == 1000 {
            String::new()
        } else {
            format!(" (scaled down: {n} agents)")
        };
        self.report.push(
            &format!("server_rss_{tag}_mib"),
            &format!("server RSS, {label} agents connected"),
            Some(server.rss_mib),
            "MiB",
            (tag == "10k").then_some(Target::AtMost(1024.0)),
            format!(
                "drover serve (broker, control plane, SQLite, API): {}{scale}; CPU while idle {:.1} % of a core",
                server.end.describe_rss(),
                server.cpu_pct
            ),
        );
        self.report.push(
            &format!("sim_rss_{tag}_mib"),
            &format!("simulator RSS, {label} agents"),
            Some(sim.rss_mib),
            "MiB",
            None,
            format!(
                "this process: {n} real agents sharing one wasm engine: {}, {:.0} KiB each; CPU while idle {:.1} % of a core{scale}",
                sim.end.describe_rss(),
                sim.rss_mib * 1024.0 / n.max(1) as f64,
                sim.cpu_pct
            ),
        );
    }

    /// Fan-out of misbehave echo to every fleet agent: one warm-up, then the median of
    /// `fanout_runs`, from submit to every result stored.
    fn fanout(&mut self, api: &Api, server_pid: u32, n: usize) -> anyhow::Result<()> {
        let req = json!({
            "plugin": "misbehave", "targets": "tag:bench=fleet", "input": {"mode": "echo"},
            "timeout_secs": 30, "delivery_secs": 120,
        });
        prime(api, &req)?;
        let (first, view) = run_job(api, &req, Duration::from_secs(300))?;
        ensure_all_succeeded(&view, n)?;
        say(format!(
            "first fan-out to {n}: {:.2} s (first run on each agent)",
            first.as_secs_f64()
        ));
        let mut runs = Vec::new();
        let mut spreads = Vec::new();
        let (sim0, srv0) = (Sample::of(None)?, Sample::of(Some(server_pid))?);
        for _ in 0..self.args.fanout_runs.max(1) {
            let (took, view) = run_job(api, &req, Duration::from_secs(120))?;
            ensure_all_succeeded(&view, n)?;
            runs.push(took.as_secs_f64());
            spreads.push(server_spread_secs(&view));
        }
        let (sim1, srv1) = (Sample::of(None)?, Sample::of(Some(server_pid))?);
        let per_result_us = |a: &Sample, b: &Sample| {
            (b.cpu_secs - a.cpu_secs) * 1e6 / (n * runs.len()).max(1) as f64
        };
        let cpu_note = format!(
            "CPU per result: server {:.0} µs, simulator {:.0} µs (2 cores shared by both)",
            per_result_us(&srv0, &srv1),
            per_result_us(&sim0, &sim1)
        );
        let mut sorted = runs.clone();
        sorted.sort_by(f64::total_cmp);
        let median = quantile(&sorted, 0.5).unwrap_or(0.0);
        self.report.push(
            "fanout_1k_s",
            "fan-out to 1,000 agents, all stored",
            Some(median),
            "s",
            (n == 1000).then_some(Target::AtMost(1.0)),
            format!(
                "misbehave echo to {n} simulated agents, submit to every result stored; median of {:?} s; first run {:.2} s; {cpu_note}",
                runs.iter().map(|r| round(*r, 3)).collect::<Vec<_>>(),
                first.as_secs_f64()
            ),
        );
        let spread = spreads.iter().copied().fold(f64::INFINITY, f64::min);
        self.report.push(
            "ingest_per_s",
            "results ingested per second",
            Some(n as f64 / median),
            "/s",
            None,
            format!(
                "{n} results / the median fan-out time; from the server's own finish stamps, {:.0}/s",
                if spread > 0.0 { n as f64 / spread } else { 0.0 }
            ),
        );
        Ok(())
    }

    fn run_command(&mut self, api: &Api, server_pid: u32, n: usize) -> anyhow::Result<()> {
        let req = json!({
            "targets": "tag:bench=fleet", "argv": ["/bin/true"], "max_concurrency": "100%",
            "timeout_secs": 30, "delivery_secs": 120, "stream": false,
        });
        // Primed on one agent first, as `prime` does for jobs.
        let submit = |api: &Api| -> anyhow::Result<(Duration, Value)> {
            let t = Instant::now();
            let v = api.post("/api/v1/commands", &req)?;
            let id = v["job_id"].as_str().context("command without an id")?;
            let n = v["agents"].as_array().map_or(0, Vec::len);
            let view = api.wait_job(id, n, Duration::from_secs(180))?;
            Ok((t.elapsed(), view))
        };
        let mut one = req.clone();
        one["targets"] = json!(drover_sim::fleet::agent_id("sim-", 0));
        let v = api.post("/api/v1/commands", &one)?;
        api.wait_job(
            v["job_id"].as_str().context("command without an id")?,
            1,
            Duration::from_secs(60),
        )?;
        let (first, view) = submit(api)?;
        ensure_all_succeeded(&view, n)?;
        let mut runs = Vec::new();
        let mut view = view;
        let (sim0, srv0) = (Sample::of(None)?, Sample::of(Some(server_pid))?);
        for _ in 0..self.args.fanout_runs.max(1) {
            let (took, v) = submit(api)?;
            ensure_all_succeeded(&v, n)?;
            runs.push(round(took.as_secs_f64(), 3));
            view = v;
        }
        let (sim1, srv1) = (Sample::of(None)?, Sample::of(Some(server_pid))?);
        let per_target_us = |secs: f64| secs * 1e6 / (n * runs.len()).max(1) as f64;
        let cpu_note = format!(
            "CPU per target: server {:.0} µs, simulator {:.0} µs, the commands it started {:.0} µs",
            per_target_us(srv1.cpu_secs - srv0.cpu_secs),
            per_target_us(sim1.cpu_secs - sim0.cpu_secs),
            per_target_us(sim1.children_cpu_secs - sim0.children_cpu_secs),
        );
        let mut sorted = runs.clone();
        sorted.sort_by(f64::total_cmp);
        let took = quantile(&sorted, 0.5).unwrap_or(0.0);
        let exit0 = view["targets"].as_array().map_or(0, |t| {
            t.iter()
                .filter(|t| t["result"]["output"]["exit_code"] == 0)
                .count()
        });
        self.report.push(
            "run_command_1k_s",
            "Run Command /bin/true to 1,000",
            Some(took),
            "s",
            (n == 1000).then_some(Target::AtMost(1.0)),
            format!(
                "command plugin, --max-concurrency 100%, {n} agents, submit to every result stored; median of {runs:?} s; {exit0} exit 0 in the last; first run {:.2} s; {cpu_note}",
                first.as_secs_f64()
            ),
        );
        Ok(())
    }

    /// Waits for `n` agents (`sim-*`) online; stops early when none came online for
    /// `--stall-secs`. Returns the count reached, how long, and whether it stalled.
    fn grow_wait(&self, api: &Api, n: usize) -> anyhow::Result<(usize, Duration, bool)> {
        let t = Instant::now();
        let (mut best, mut gained) = (0, Instant::now());
        let mut show = progress("online");
        loop {
            let online = api.online_count("sim-")?;
            show(online);
            if online > best {
                best = online;
                gained = Instant::now();
            }
            if online >= n {
                return Ok((online, t.elapsed(), false));
            }
            if gained.elapsed() > Duration::from_secs(self.args.stall_secs)
                || t.elapsed() > Duration::from_secs(1800)
            {
                return Ok((online, t.elapsed(), true));
            }
            std::thread::sleep(Duration::from_secs(2));
        }
    }

    /// Grows the fleet to `agents_10k` (a second fleet sharing the engine), waits for all
    /// online, reads memory and idle CPU, and fans out once to all of them.
    fn agents_10k(
        &mut self,
        rt: &tokio::runtime::Runtime,
        api: &Api,
        base: &FleetOptions,
        fleet: &Fleet,
        server: &Server,
    ) -> anyhow::Result<Option<Fleet>> {
        let n = self.args.agents_10k;
        let have = fleet.ids().len();
        let more = if n > have {
            let mut opts = base.clone();
            opts.first = have;
            opts.count = n - have;
            opts.shared = Some(fleet.shared().clone());
            say(format!("growing the fleet to {n} agents"));
            let t = Instant::now();
            let more = rt.block_on(Fleet::start(opts))?;
            let started = t.elapsed();
            let (online, took, stalled) = self.grow_wait(api, n)?;
            say(format!(
                "{} more agents: enrolled in {:.1} s ({:.0}/s), started in {:.1} s, {online} online {:.1} s later{}",
                n - have,
                more.enroll_time.as_secs_f64(),
                more.enrolled as f64 / more.enroll_time.as_secs_f64().max(1e-9),
                started.as_secs_f64(),
                took.as_secs_f64(),
                if stalled {
                    " (stalled: gave up waiting)"
                } else {
                    ""
                }
            ));
            self.report.context.insert(
                "fleet_10k".into(),
                json!({
                    "agents": n,
                    "enrolled": more.enrolled,
                    "enroll_secs": round(more.enroll_time.as_secs_f64(), 2),
                    "start_rate_per_s": self.args.start_rate,
                    "online": online,
                    "online_after_start_secs": round(took.as_secs_f64(), 2),
                    "stalled": stalled,
                    "failed_agents": more.failed(),
                }),
            );
            Some(more)
        } else {
            None
        };
        let online = api.online_count("sim-")?;
        self.report.push(
            "agents_connected",
            "simulated agents connected at once",
            Some(online as f64),
            "agents",
            Some(Target::AtLeast(n as f64)),
            "online in the server's agent list; each a real agent with its own MQTT connection",
        );
        std::thread::sleep(Duration::from_secs(5));
        let (sim, srv) = idle_window(server, Duration::from_secs(30))?;
        self.push_fleet_resources("10k", n, sim, srv);

        if !self.args.burst_10k {
            return Ok(more);
        }
        // One fan-out to everyone: a burst of results.
        let req = json!({
            "plugin": "misbehave", "targets": "tag:bench=fleet", "input": {"mode": "echo"},
            "timeout_secs": 60, "delivery_secs": 300,
        });
        let pid = server.process.pid();
        let (sim0, srv0) = (Sample::of(None)?, Sample::of(Some(pid))?);
        let (took, view) = run_job(api, &req, Duration::from_secs(600))?;
        let (sim1, srv1) = (Sample::of(None)?, Sample::of(Some(pid))?);
        let (done, total) = results_in(&view);
        let ok = succeeded(&view);
        let per_result_us =
            |a: &Sample, b: &Sample| (b.cpu_secs - a.cpu_secs) * 1e6 / done.max(1) as f64;
        self.report.push(
            "fanout_10k_s",
            "fan-out to 10,000 agents, all stored",
            Some(took.as_secs_f64()),
            "s",
            None,
            format!(
                "misbehave echo to {total} agents (first run on {} of them), {done} results, {ok} succeeded; {:.0} results/s; CPU per result: server {:.0} µs, simulator {:.0} µs",
                n.saturating_sub(have),
                done as f64 / took.as_secs_f64(),
                per_result_us(&srv0, &srv1),
                per_result_us(&sim0, &sim1)
            ),
        );
        let s = Sample::of(Some(server.process.pid()))?;
        self.report.context.insert(
            "server_rss_after_10k_fanout_mib".into(),
            json!(round(s.rss_bytes as f64 / MIB, 1)),
        );
        Ok(more)
    }
}

/// Round-trip figures, milliseconds.
struct Latency {
    runs: usize,
    first: f64,
    p50: f64,
    p99: f64,
    max: f64,
    /// Job created to result finished, on the server's millisecond clock.
    server_p50: f64,
    failed: usize,
    /// CPU per job, µs: the server's and the agent's.
    cpu_us: (f64, f64),
}

/// The median time to create, write and fsync a small file in `dir`: the unit of the
/// agent's durability (seen log, running marker, outbox record and its directory).
fn fsync_p50(dir: &Path) -> anyhow::Result<f64> {
    use std::io::Write as _;
    std::fs::create_dir_all(dir)?;
    let path = dir.join("fsync-probe");
    let mut t = Vec::with_capacity(200);
    for _ in 0..200 {
        let start = Instant::now();
        let mut f = std::fs::File::create(&path)?;
        f.write_all(&[b'x'; 300])?;
        f.sync_all()?;
        t.push(ms(start.elapsed()));
    }
    std::fs::remove_file(&path)?;
    t.sort_by(f64::total_cmp);
    Ok(quantile(&t, 0.5).unwrap_or(0.0))
}

/// Resident memory and CPU over a quiet window.
#[derive(Debug, Clone, Copy)]
struct Window {
    rss_mib: f64,
    cpu_pct: f64,
    end: Sample,
}

/// Samples this process (the simulator) and the server across `window`.
fn idle_window(server: &Server, window: Duration) -> anyhow::Result<(Window, Window)> {
    let (s0, v0) = (Sample::of(None)?, Sample::of(Some(server.process.pid()))?);
    std::thread::sleep(window);
    let (s1, v1) = (Sample::of(None)?, Sample::of(Some(server.process.pid()))?);
    let w = |a: &Sample, b: &Sample| Window {
        rss_mib: b.rss_bytes as f64 / MIB,
        cpu_pct: 100.0 * b.cpu_share_since(a),
        end: *b,
    };
    Ok((w(&s0, &s1), w(&v0, &v1)))
}

/// A progress printer for long waits: at most one line every 5 s.
fn progress(what: &'static str) -> impl FnMut(usize) + Send + 'static {
    let mut last: Option<Instant> = None;
    move |n| {
        if last.is_none_or(|l| l.elapsed() >= Duration::from_secs(5)) {
            say(format!("{what}: {n}"));
            last = Some(Instant::now());
        }
    }
}

/// Runs `req` on the fleet's first agent alone, so the plugin is compiled once into the
/// engine the simulated agents share. Without this, every agent that receives the first
/// job at the same moment finds the plugin missing and compiles it too, at once.
fn prime(api: &Api, req: &Value) -> anyhow::Result<()> {
    let mut one = req.clone();
    one["targets"] = json!(drover_sim::fleet::agent_id("sim-", 0));
    run_job(api, &one, Duration::from_secs(120))?;
    Ok(())
}

/// Submits a job and waits for every result: how long, and the job view.
fn run_job(api: &Api, req: &Value, timeout: Duration) -> anyhow::Result<(Duration, Value)> {
    let t = Instant::now();
    let (id, n) = api.submit(req)?;
    ensure!(n > 0, "job {id} has no targets");
    let view = api.wait_job(&id, n, timeout)?;
    let took = t.elapsed();
    let (done, total) = results_in(&view);
    ensure!(
        done == total,
        "job {id}: {done} of {total} results after {timeout:?}"
    );
    Ok((took, view))
}

fn first_result(view: &Value) -> anyhow::Result<&Value> {
    let r = &view["targets"][0]["result"];
    ensure!(!r.is_null(), "no result in {view}");
    Ok(r)
}

fn succeeded(view: &Value) -> usize {
    view["targets"].as_array().map_or(0, |t| {
        t.iter()
            .filter(|t| t["result"]["status"] == "succeeded")
            .count()
    })
}

fn ensure_all_succeeded(view: &Value, n: usize) -> anyhow::Result<()> {
    let ok = succeeded(view);
    if ok != n {
        let sample = view["targets"]
            .as_array()
            .and_then(|t| t.iter().find(|t| t["result"]["status"] != "succeeded"))
            .cloned()
            .unwrap_or(Value::Null);
        bail!("{ok} of {n} targets succeeded; for example: {sample}");
    }
    Ok(())
}

/// Seconds between the first and last `finished_ms` the server stamped.
fn server_spread_secs(view: &Value) -> f64 {
    let stamps: Vec<u64> = view["targets"]
        .as_array()
        .map(|t| t.iter().filter_map(|t| t["finished_ms"].as_u64()).collect())
        .unwrap_or_default();
    match (stamps.iter().min(), stamps.iter().max()) {
        (Some(a), Some(b)) => (b - a) as f64 / 1000.0,
        _ => 0.0,
    }
}

fn wait_online(api: &Api, id: &str, timeout: Duration) -> anyhow::Result<()> {
    let t = Instant::now();
    loop {
        let online = api
            .agents()?
            .iter()
            .any(|a| a["id"] == id && a["online"] == true);
        if online {
            return Ok(());
        }
        ensure!(
            t.elapsed() < timeout,
            "agent {id} not online after {timeout:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn round(v: f64, digits: i32) -> f64 {
    let f = 10f64.powi(digits);
    (v * f).round() / f
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}
