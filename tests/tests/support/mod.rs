//! Helpers for end-to-end tests: temporary directories, the real `drover` and
//! `drover-agent` binaries, Mosquitto, and the plugins built from `plugins/`.
#![allow(dead_code)]

use std::fs;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;

/// Where cargo put the binaries: next to the `deps/` directory this test runs from.
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    let dir = exe.parent().and_then(Path::parent).expect("target dir");
    let p = dir.join(name);
    assert!(
        p.exists(),
        "{} is missing: build the binaries first (./test.sh does: cargo build --workspace --bins)",
        p.display()
    );
    p
}

/// A component built from `plugins/`.
pub fn plugin(crate_name: &str) -> PathBuf {
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../plugins/target/wasm32-wasip2/release")
        .join(format!("{}.wasm", crate_name.replace('-', "_")));
    assert!(
        p.exists(),
        "{} is missing: build the plugins first (./test.sh does: cd plugins && cargo build --release)",
        p.display()
    );
    p
}

/// A directory removed when dropped.
pub struct TempDir(PathBuf);

static COUNTER: AtomicU32 = AtomicU32::new(0);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        let p = std::env::temp_dir().join(format!(
            "drover-e2e-{tag}-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = fs::remove_dir_all(&p);
        fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
    pub fn path(&self) -> &Path {
        &self.0
    }

    /// Owns nothing: a stand-in while a value is moved out and back.
    fn placeholder() -> TempDir {
        TempDir(PathBuf::new())
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if !self.0.as_os_str().is_empty() && std::env::var_os("DROVER_KEEP_TEST_DIRS").is_none() {
            let _ = fs::remove_dir_all(&self.0);
        }
    }
}

/// A free TCP port on loopback.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Polls `f` until it returns `Some`, or panics after `timeout` with `what`.
pub fn wait_for<T>(timeout: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        if start.elapsed() > timeout {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn signal(child: &Child, sig: &str) {
    let _ = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(child.id().to_string())
        .status();
}

/// Stops a child: SIGTERM, then SIGKILL if it lingers.
fn stop(child: &mut Child) {
    if let Ok(Some(_)) = child.try_wait() {
        return;
    }
    signal(child, "TERM");
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(10) {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// `drover keygen` in a data directory of its own; returns the publisher key.
pub fn keygen(data: &Path) -> PathBuf {
    let out = Command::new(bin("drover"))
        .arg("--data-dir")
        .arg(data)
        .arg("keygen")
        .output()
        .expect("run drover keygen");
    assert!(out.status.success(), "keygen failed: {}", text(&out.stderr));
    data.join("keys/publisher.key")
}

/// A running `drover serve`.
pub struct Server {
    pub dir: TempDir,
    pub data: PathBuf,
    child: Option<Child>,
    pub log: PathBuf,
    args: Vec<String>,
    /// `RLIMIT_NOFILE` (soft, hard) to start `drover serve` with, through `prlimit`.
    nofile: Option<(u64, u64)>,
}

impl Server {
    /// Creates keys, then starts the server with the embedded broker on free ports.
    pub fn start() -> Server {
        Server::start_with(&[])
    }

    /// Like [`Server::start`], with extra `drover serve` flags.
    pub fn start_with(extra: &[&str]) -> Server {
        Server::start_limited(None, extra)
    }

    /// Like [`Server::start_with`], with the server's `RLIMIT_NOFILE` set to (soft,
    /// hard) when given, as a system with a low default would start it.
    pub fn start_limited(nofile: Option<(u64, u64)>, extra: &[&str]) -> Server {
        let dir = TempDir::new("server");
        let data = dir.path().join("data");
        let s = Server {
            data: data.clone(),
            log: dir.path().join("server.log"),
            dir,
            child: None,
            args: Vec::new(),
            nofile,
        };
        let out = s.cli(&["keygen"]);
        assert!(out.status.success(), "keygen failed: {}", text(&out.stderr));
        s.spawn(extra)
    }

    /// Like [`Server::start`], on fixed free ports, so that agents find the server again
    /// after [`Server::restart`].
    pub fn start_restartable() -> Server {
        let (api, mqtt) = (free_port(), free_port());
        let (api, mqtt) = (format!("127.0.0.1:{api}"), format!("127.0.0.1:{mqtt}"));
        Server::start_with(&["--api-listen", &api, "--mqtt-listen", &mqtt])
    }

    /// Starts the server again with the same flags and data (after [`Server::stop`]).
    /// Give it fixed `--api-listen` and `--mqtt-listen` ports if agents must find it.
    pub fn restart(&mut self) {
        // A server still running would hold the data directory and leak.
        self.stop();
        let args = std::mem::take(&mut self.args);
        let s = std::mem::replace(
            self,
            Server {
                dir: TempDir::placeholder(),
                data: PathBuf::new(),
                child: None,
                log: PathBuf::new(),
                args: Vec::new(),
                nofile: None,
            },
        );
        let extra: Vec<&str> = args.iter().map(String::as_str).collect();
        *self = s.spawn(&extra);
    }

    fn spawn(mut self, extra: &[&str]) -> Server {
        self.args = extra.iter().map(|s| s.to_string()).collect();
        let _ = fs::remove_file(self.data.join("server.json"));
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let mut args: Vec<String> = vec![
            "--data-dir".into(),
            self.data.display().to_string(),
            "serve".into(),
        ];
        for flag in ["--api-listen", "--mqtt-listen"] {
            if !extra.contains(&flag) {
                args.extend([flag.to_string(), "127.0.0.1:0".to_string()]);
            }
        }
        args.extend(extra.iter().map(|s| s.to_string()));
        let mut command = match self.nofile {
            Some((soft, hard)) => {
                let mut c = Command::new("prlimit");
                c.arg(format!("--nofile={soft}:{hard}")).arg(bin("drover"));
                c
            }
            None => Command::new(bin("drover")),
        };
        let child = command
            .args(&args)
            .env("DROVER_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("spawn drover serve");
        self.child = Some(child);
        let info = self.data.join("server.json");
        wait_for(Duration::from_secs(30), "server.json", || {
            if let Some(c) = self.child.as_mut()
                && let Ok(Some(st)) = c.try_wait()
            {
                panic!("drover serve exited with {st}: {}", self.log_text());
            }
            info.exists().then_some(())
        });
        self
    }

    /// The server's log so far.
    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// `server.json`.
    pub fn info(&self) -> Value {
        serde_json::from_slice(&fs::read(self.data.join("server.json")).unwrap()).unwrap()
    }

    /// The port of the broker agents dial.
    pub fn broker_port(&self) -> u16 {
        let url = self.broker_url();
        url.rsplit(':').next().unwrap().parse().unwrap()
    }

    /// The broker URL agents dial.
    pub fn broker_url(&self) -> String {
        self.info()["broker"].as_str().unwrap().to_string()
    }

    /// Runs `drover --data-dir DATA args...`.
    pub fn cli(&self, args: &[&str]) -> Output {
        Command::new(bin("drover"))
            .arg("--data-dir")
            .arg(&self.data)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("run drover")
    }

    /// Runs a CLI command that must succeed, and parses its JSON output.
    pub fn json(&self, args: &[&str]) -> Value {
        let mut full = vec!["--output", "json"];
        full.extend_from_slice(args);
        let out = self.cli(&full);
        assert!(
            out.status.success(),
            "drover {args:?} failed: {}\n{}",
            text(&out.stderr),
            text(&out.stdout)
        );
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "drover {args:?} printed no JSON ({e}): {}",
                text(&out.stdout)
            )
        })
    }

    /// Signs (with the data directory's publisher key unless `key` is given) and
    /// publishes a component.
    pub fn publish(
        &self,
        wasm: &Path,
        name: &str,
        version: u64,
        world: &str,
        caps: &[&str],
        key: Option<&Path>,
    ) {
        let copy = self.dir.path().join(format!("{name}-{version}.wasm"));
        fs::copy(wasm, &copy).unwrap();
        let v = version.to_string();
        let copy_s = copy.display().to_string();
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
        let key_s;
        if let Some(k) = key {
            key_s = k.display().to_string();
            args.push("--key");
            args.push(&key_s);
        }
        let out = self.cli(&args);
        assert!(out.status.success(), "sign failed: {}", text(&out.stderr));
        let out = self.cli(&["plugin", "publish", &copy_s]);
        assert!(
            out.status.success(),
            "publish failed: {}",
            text(&out.stderr)
        );
    }

    /// Adds an agent and writes its config; returns the config path.
    pub fn add_agent(&self, id: &str, extra: &[&str]) -> PathBuf {
        let cfg = self.dir.path().join(format!("{id}.toml"));
        let cfg_s = cfg.display().to_string();
        let mut args = vec!["agents", "add", id, "--out", &cfg_s];
        args.extend_from_slice(extra);
        let out = self.cli(&args);
        assert!(
            out.status.success(),
            "agents add failed: {}",
            text(&out.stderr)
        );
        cfg
    }

    /// `drover agents list` as JSON, one agent.
    pub fn agent_row(&self, id: &str) -> Option<Value> {
        let v = self.json(&["agents", "list"]);
        v.as_array()?.iter().find(|a| a["id"] == id).cloned()
    }

    /// Waits until the agent is online.
    pub fn wait_online(&self, id: &str) {
        wait_for(
            Duration::from_secs(30),
            &format!("agent {id} online"),
            || self.agent_row(id).filter(|a| a["online"] == true),
        );
    }

    /// `drover run` with JSON output: exit code and the result lines.
    pub fn run(&self, args: &[&str]) -> (i32, Vec<Value>, String) {
        let mut full = vec!["--output", "json", "run"];
        full.extend_from_slice(args);
        let out = self.cli(&full);
        let results = text(&out.stdout)
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| {
                serde_json::from_str(l).unwrap_or_else(|e| panic!("bad result line {l:?}: {e}"))
            })
            .collect();
        (out.status.code().unwrap_or(-1), results, text(&out.stderr))
    }

    /// Stops the server.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            stop(&mut c);
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A running `drover-agent`.
pub struct Agent {
    pub id: String,
    child: Option<Child>,
    pub log: PathBuf,
    pub data_dir: PathBuf,
    config: PathBuf,
    /// Extra environment for the next (re)start.
    pub env: Vec<(String, String)>,
}

impl Agent {
    /// Starts an agent from a config file, with its data under `dir`.
    pub fn start(id: &str, config: &Path, dir: &Path) -> Agent {
        let mut a = Agent {
            id: id.to_string(),
            child: None,
            log: dir.join(format!("agent-{id}.log")),
            data_dir: dir.join(format!("agent-{id}")),
            config: config.to_path_buf(),
            env: Vec::new(),
        };
        a.restart();
        a
    }

    /// Starts the agent process again (after a kill).
    pub fn restart(&mut self) {
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let child = Command::new(bin("drover-agent"))
            .arg("--config")
            .arg(&self.config)
            .arg("--data-dir")
            .arg(&self.data_dir)
            .env("DROVER_LOG", "info")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("spawn drover-agent");
        self.child = Some(child);
    }

    /// The agent's log so far.
    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits for the process to exit on its own (a crash); returns whether it did.
    pub fn wait_exit(&mut self, within: Duration) -> bool {
        let start = Instant::now();
        while start.elapsed() < within {
            if !self.is_running() {
                self.child = None;
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }

    /// The process id of the running agent.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("the agent is running").id()
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }

    /// SIGTERM, and waits for the agent to say goodbye and exit.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            stop(&mut c);
        }
    }

    /// Sends the process a signal by name (`STOP`, `CONT`, ...).
    pub fn signal(&self, name: &str) {
        let pid = self.child.as_ref().expect("the agent is running").id();
        let status = Command::new("kill")
            .arg(format!("-{name}"))
            .arg(pid.to_string())
            .status()
            .unwrap();
        assert!(status.success(), "kill -{name} {pid} failed");
    }

    /// SIGKILL, no goodbye.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            stop(&mut c);
        }
    }
}

/// A Mosquitto broker on a free port, with a password file.
pub struct Mosquitto {
    pub dir: TempDir,
    pub port: u16,
    child: Child,
    passwd: PathBuf,
}

fn spawn_mosquitto(dir: &Path, port: u16) -> Child {
    let log = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("mosquitto.log"))
        .unwrap();
    let child = Command::new(mosquitto_bin("mosquitto"))
        .arg("-c")
        .arg(dir.join("mosquitto.conf"))
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .expect("spawn mosquitto");
    wait_for(Duration::from_secs(10), "mosquitto listening", || {
        std::net::TcpStream::connect(("127.0.0.1", port)).ok()
    });
    child
}

pub fn mosquitto_bin(name: &str) -> PathBuf {
    for d in ["/usr/sbin", "/usr/bin"] {
        let p = Path::new(d).join(name);
        if p.exists() {
            return p;
        }
    }
    panic!("{name} is not installed: ./test.sh installs Debian's mosquitto package");
}

impl Mosquitto {
    /// Starts Mosquitto with these users.
    pub fn start(users: &[(&str, &str)]) -> Mosquitto {
        Mosquitto::start_limited(users, 16 << 20)
    }

    /// Starts Mosquitto with these users, refusing packets over `max_packet` bytes.
    pub fn start_limited(users: &[(&str, &str)], max_packet: usize) -> Mosquitto {
        let dir = TempDir::new("mosquitto");
        let passwd = dir.path().join("passwd");
        fs::write(&passwd, "").unwrap();
        for (u, p) in users {
            add_user(&passwd, u, p);
        }
        let settings = format!(
            "allow_anonymous false\npassword_file {}\nset_tcp_nodelay true\nmax_packet_size {max_packet}\nlog_type error\nlog_type warning\nlog_type notice\n",
            passwd.display()
        );
        Mosquitto::start_configured(dir, free_port(), &settings)
    }

    /// Starts Mosquitto on `port` with `settings` (without a listener) as its whole
    /// configuration; its files are in `dir`, which it keeps.
    pub fn start_configured(dir: TempDir, port: u16, settings: &str) -> Mosquitto {
        let conf = dir.path().join("mosquitto.conf");
        fs::write(
            &conf,
            format!("listener {port} 127.0.0.1\npersistence false\nlog_dest stderr\n{settings}"),
        )
        .unwrap();
        make_readable(dir.path());
        let child = spawn_mosquitto(dir.path(), port);
        let passwd = dir.path().join("passwd");
        Mosquitto {
            dir,
            port,
            child,
            passwd,
        }
    }

    /// SIGKILL: the broker vanishes with everything in flight.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Starts it again on the same port with the same files.
    pub fn restart(&mut self) {
        self.child = spawn_mosquitto(self.dir.path(), self.port);
    }

    /// Makes Mosquitto reload its password and ACL files (after making them readable).
    pub fn reload(&self) {
        make_readable(self.dir.path());
        signal(&self.child, "HUP");
        std::thread::sleep(Duration::from_millis(300));
    }

    /// Mosquitto's log so far.
    pub fn log_text(&self) -> String {
        fs::read_to_string(self.dir.path().join("mosquitto.log")).unwrap_or_default()
    }

    /// `mqtt://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("mqtt://127.0.0.1:{}", self.port)
    }

    /// Adds a user and makes Mosquitto reload its password file.
    pub fn add_user(&self, user: &str, password: &str) {
        add_user(&self.passwd, user, password);
        make_readable(self.dir.path());
        signal(&self.child, "HUP");
        std::thread::sleep(Duration::from_millis(300));
    }

    /// Publishes with `mosquitto_pub` as `user`.
    pub fn publish(&self, user: &str, password: &str, topic: &str, payload: &[u8]) {
        let file = self.dir.path().join("payload.bin");
        fs::write(&file, payload).unwrap();
        let out = Command::new(mosquitto_bin("mosquitto_pub"))
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string(), "-q", "1"])
            .args(["-u", user, "-P", password, "-i", &format!("{user}-pub")])
            .args(["-t", topic, "-f"])
            .arg(&file)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "mosquitto_pub failed: {}",
            text(&out.stderr)
        );
    }
}

fn add_user(passwd: &Path, user: &str, password: &str) {
    let out = Command::new(mosquitto_bin("mosquitto_passwd"))
        .arg("-b")
        .arg(passwd)
        .arg(user)
        .arg(password)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "mosquitto_passwd failed: {}",
        text(&out.stderr)
    );
}

/// Mosquitto drops to its own user when started as root: let it read its files.
pub fn make_readable(dir: &Path) {
    use std::os::unix::fs::PermissionsExt as _;
    let _ = fs::set_permissions(dir, fs::Permissions::from_mode(0o755));
    for e in fs::read_dir(dir).unwrap().flatten() {
        let _ = fs::set_permissions(e.path(), fs::Permissions::from_mode(0o644));
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        stop(&mut self.child);
    }
}

/// Lossy UTF-8.
pub fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Starts a server on `mosq` with the given control password, kept beside the broker's
/// files so that the server can be restarted as long as the broker lives.
pub fn server_on(mosq: &Mosquitto, control_password: &str) -> Server {
    let pw = mosq.dir.path().join(format!("control-{}.pw", free_port()));
    fs::write(&pw, control_password).unwrap();
    let (url, pw_s) = (mosq.url(), pw.display().to_string());
    Server::start_with(&[
        "--broker",
        &url,
        "--broker-username",
        "drover-control",
        "--broker-password-file",
        &pw_s,
    ])
}

/// The number of packages `dpkg-query` lists, the ground truth for inventory.
pub fn dpkg_package_count() -> usize {
    let out = Command::new("dpkg-query")
        .args(["-W", "-f", ".\n"])
        .output()
        .expect("dpkg-query");
    text(&out.stdout).lines().count()
}

/// Reads one `key = "value"` line of a TOML file written by `drover agents add`.
pub fn toml_value(path: &Path, key: &str) -> String {
    let t = fs::read_to_string(path).unwrap();
    for line in t.lines() {
        if let Some(rest) = line.strip_prefix(&format!("{key} = ")) {
            return serde_json::from_str(rest).unwrap();
        }
    }
    panic!("{key} not in {}", path.display());
}

/// Runs one job on one agent and returns its result; the exit code must match it.
pub fn run_one(server: &Server, args: &[&str]) -> Value {
    let (code, results, err) = server.run(args);
    assert_eq!(results.len(), 1, "no result for {args:?}: {err}");
    let r = results.into_iter().next().unwrap();
    if r["status"] == "succeeded" {
        assert_eq!(code, 0);
    } else {
        assert_eq!(code, 1, "exit code for a failed job: {err}");
    }
    r
}

/// Publishes the misbehave test plugin as `misbehave` v1, world `task`, no capabilities.
pub fn publish_misbehave(server: &Server) {
    let wasm = plugin("drover-plugin-misbehave");
    server.publish(&wasm, "misbehave", 1, "task", &[], None);
}

/// Puts top-level settings at the head of an agent config written by `agents add`.
pub fn prepend_config(cfg: &std::path::Path, lines: &str) {
    let text = std::fs::read_to_string(cfg).unwrap();
    std::fs::write(cfg, format!("{lines}\n{text}")).unwrap();
}

/// The result's failure kind, or "".
pub fn failure_kind(r: &Value) -> &str {
    r["failure"]["kind"].as_str().unwrap_or("")
}

/// A child process killed when dropped, even when the test panics.
pub struct Killed(pub Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Whether some process's command line is exactly `argv`. Read from /proc, never by
/// matching names: only the process the test started can have this exact line.
pub fn running(argv: &[&str]) -> bool {
    let want: Vec<u8> = argv
        .iter()
        .flat_map(|a| [a.as_bytes(), b"\0"].concat())
        .collect();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return false;
    };
    dir.flatten()
        .any(|e| std::fs::read(e.path().join("cmdline")).is_ok_and(|c| c == want))
}
