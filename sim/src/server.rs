//! The real binaries as child processes: `drover serve`, the `drover` CLI and
//! `drover-agent`, driven the way `quickstart.sh` and the end-to-end tests drive them.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use rustix::process::{Pid, Signal, kill_process};

use crate::api::Api;

/// A child process stopped (SIGTERM, then SIGKILL) when dropped.
#[derive(Debug)]
pub struct Process {
    child: Child,
    what: String,
}

impl Process {
    /// Spawns `cmd` with its stdout and stderr appended to `log`.
    pub fn spawn(mut cmd: Command, what: &str, log: &Path) -> anyhow::Result<Process> {
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .with_context(|| format!("opening {}", log.display()))?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .with_context(|| format!("starting {what}"))?;
        Ok(Process {
            child,
            what: what.to_string(),
        })
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Whether it has exited.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// SIGTERM, then SIGKILL if it has not exited within `grace`.
    pub fn stop(&mut self, grace: Duration) -> anyhow::Result<ExitStatus> {
        if let Some(st) = self.exited() {
            return Ok(st);
        }
        if let Some(pid) = i32::try_from(self.pid()).ok().and_then(Pid::from_raw) {
            let _ = kill_process(pid, Signal::TERM);
        }
        let t = Instant::now();
        while t.elapsed() < grace {
            if let Some(st) = self.exited() {
                return Ok(st);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        tracing::warn!("{} did not stop within {grace:?}: killing it", self.what);
        let _ = self.child.kill();
        Ok(self.child.wait()?)
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.stop(Duration::from_secs(10));
    }
}

/// A running `drover serve` with its own data directory.
#[derive(Debug)]
pub struct Server {
    /// The `drover` binary.
    pub bin: PathBuf,
    /// Its data directory.
    pub data: PathBuf,
    /// The HTTP API, `http://127.0.0.1:PORT`.
    pub api_url: String,
    /// The broker agents dial.
    pub broker: String,
    /// The server process.
    pub process: Process,
    /// Its log.
    pub log: PathBuf,
}

impl Server {
    /// `drover keygen` (once), then `drover serve` on loopback with ports picked by the
    /// system, plus `extra` flags; returns once `server.json` says where it listens.
    pub fn start(
        bin: &Path,
        data: &Path,
        extra: &[&str],
        log_level: &str,
    ) -> anyhow::Result<Server> {
        std::fs::create_dir_all(data)?;
        if !data.join("keys").exists() {
            run_cli(bin, data, &["keygen"])?;
        }
        let info = data.join("server.json");
        let _ = std::fs::remove_file(&info);
        let log = data.join("server.log");
        let mut cmd = Command::new(bin);
        cmd.arg("--data-dir")
            .arg(data)
            .args(["serve", "--api-listen", "127.0.0.1:0"])
            .args(["--mqtt-listen", "127.0.0.1:0"])
            .args(extra)
            .env("DROVER_LOG", log_level);
        let mut process = Process::spawn(cmd, "drover serve", &log)?;
        let t = Instant::now();
        let v: serde_json::Value = loop {
            if let Some(st) = process.exited() {
                bail!(
                    "drover serve exited with {st}: {}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
            }
            if let Ok(text) = std::fs::read(&info)
                && let Ok(v) = serde_json::from_slice(&text)
            {
                break v;
            }
            if t.elapsed() > Duration::from_secs(30) {
                bail!("drover serve wrote no server.json within 30 s");
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        Ok(Server {
            bin: bin.to_path_buf(),
            data: data.to_path_buf(),
            api_url: v["api"]
                .as_str()
                .context("server.json: no api")?
                .to_string(),
            broker: v["broker"]
                .as_str()
                .context("server.json: no broker")?
                .to_string(),
            process,
            log,
        })
    }

    /// A client for its API, with the operator token.
    pub fn api(&self) -> anyhow::Result<Api> {
        Api::with_token_file(&self.api_url, &self.data.join("api-token"))
    }

    /// Runs `drover --data-dir DATA args...`; returns its stdout, or fails with its stderr.
    pub fn cli(&self, args: &[&str]) -> anyhow::Result<String> {
        run_cli(&self.bin, &self.data, args)
    }

    /// Whether the CLI knows `command` (`drover COMMAND --help` succeeds).
    pub fn has_command(&self, command: &str) -> bool {
        Command::new(&self.bin)
            .args([command, "--help"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    }

    /// Signs `wasm` with the data directory's publisher key (`drover plugin sign NAME
    /// --version V --world W CAPS...`) and publishes it; the signed copy goes in `dir`.
    pub fn publish(
        &self,
        wasm: &Path,
        dir: &Path,
        name: &str,
        version: u64,
        world: &str,
        caps: &[&str],
    ) -> anyhow::Result<()> {
        let copy = dir.join(format!("{name}-{version}.wasm"));
        std::fs::copy(wasm, &copy).with_context(|| format!("copying {}", wasm.display()))?;
        let copy_s = copy.display().to_string();
        let v = version.to_string();
        let mut args = vec![
            "plugin",
            "sign",
            &copy_s,
            "--name",
            name,
            "--version",
            &v,
            "--world",
            world,
        ];
        args.extend_from_slice(caps);
        self.cli(&args)?;
        self.cli(&["plugin", "publish", &copy_s])?;
        Ok(())
    }
}

fn run_cli(bin: &Path, data: &Path, args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new(bin)
        .arg("--data-dir")
        .arg(data)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {}", bin.display()))?;
    if !out.status.success() {
        bail!(
            "drover {} failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
