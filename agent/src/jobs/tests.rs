//! The run path with real plugin components, which `./test.sh` builds into
//! `plugins/target/wasm32-wasip2/release/` before the tests run. Jobs go in through
//! [`Jobs::run_local`], the entry point of runs the agent schedules itself, and so pass
//! the same manifest checks, policy, sandbox, limits, running markers and outbox as jobs
//! from the control plane. The agent's broker is a closed port: nothing here needs one.

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use drover_protocol::job::{FailureKind, JobResult, Limits, PluginErrorKind, ResultStatus};
use drover_protocol::keys::SigningKey;
use drover_protocol::keyset::KeySet;
use drover_protocol::link::{self, LinkOptions};
use drover_protocol::manifest::{Capabilities, Manifest, World, sha256_hex};
use drover_protocol::now_secs;
use drover_protocol::signed::Signed;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use super::{Jobs, LocalJob};
use crate::config::{Config, ConfigFile, Overrides, PolicyFile, TrustFile};
use crate::durable::outbox::Outbox;
use crate::durable::state::State;
use crate::identity::Identity;
use crate::jobs::fetch::Fetcher;
use crate::sandbox::Sandbox;

/// One sandbox for every test here: each plugin compiles once per test process.
fn sandbox() -> Arc<Sandbox> {
    static SANDBOX: OnceLock<Arc<Sandbox>> = OnceLock::new();
    SANDBOX
        .get_or_init(|| {
            let dir =
                std::env::temp_dir().join(format!("drover-jobs-compiled-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            Arc::new(Sandbox::new(&dir).unwrap())
        })
        .clone()
}

/// A component built from `plugins/`. Never skipped: a missing one fails the test.
fn component(crate_name: &str) -> Vec<u8> {
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../plugins/target/wasm32-wasip2/release")
        .join(format!("{}.wasm", crate_name.replace('-', "_")));
    assert!(
        p.exists(),
        "{} is missing: build the plugins first (./test.sh does: cd plugins && cargo build --release)",
        p.display()
    );
    std::fs::read(&p).unwrap()
}

/// An agent's job pipeline in a temporary directory, with its own keys and policy.
struct Agent {
    dir: PathBuf,
    publisher: SigningKey,
    jobs: Arc<Jobs>,
    outbox: Arc<Outbox>,
    stop: CancellationToken,
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.stop.cancel();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Agent {
    fn start(tag: &str, policy: PolicyFile) -> Agent {
        let dir = std::env::temp_dir().join(format!("drover-jobs-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let (root, publisher) = (SigningKey::generate(), SigningKey::generate());
        let keyset = KeySet {
            version: 1,
            roots: vec![root.public()],
            root_threshold: 1,
            publishers: vec![publisher.public()],
            publisher_threshold: 1,
            control_plane: vec![SigningKey::generate().public()],
            issued_at: now_secs(),
        };
        let initial = dir.join("keyset.json");
        std::fs::write(
            &initial,
            serde_json::to_vec(&Signed::sign(&keyset, &root)).unwrap(),
        )
        .unwrap();
        let data = dir.join("data");
        let config = Config::from_file(
            ConfigFile {
                id: Some("local-1".into()),
                broker: Some("mqtt://127.0.0.1:1".into()),
                data_dir: Some(data.clone()),
                trust: TrustFile {
                    roots: vec![root.public().to_hex()],
                    root_threshold: None,
                    keyset_file: Some(initial.clone()),
                },
                policy,
                ..ConfigFile::default()
            },
            Overrides::default(),
        )
        .unwrap();
        std::fs::create_dir_all(&data).unwrap();
        let state = State::open(
            &data.join("state"),
            &config.roots,
            1,
            Some(&initial),
            drover_protocol::now_ms(),
        )
        .unwrap();
        let identity = Identity::load_or_create(&data).unwrap();
        let outbox = Arc::new(Outbox::open(&data.join("outbox"), Default::default()).unwrap());
        let stop = CancellationToken::new();
        let (link, _incoming, _task) = link::spawn(
            LinkOptions {
                broker: config.broker.clone().unwrap(),
                ca_file: None,
                client_id: config.id.clone(),
                credentials: None,
                keep_alive: Duration::from_secs(30),
                max_incoming_packet: 1 << 20,
                max_outgoing_packet: 1 << 20,
                persistent_session: false,
                last_will: None,
                subscriptions: Vec::new(),
                unsubscriptions: Vec::new(),
                on_connect: drover_protocol::link::OnConnect::none(),
                incoming_capacity: 1,
            },
            stop.clone(),
        )
        .unwrap();
        let jobs = Jobs::new(
            Arc::new(config),
            sandbox(),
            link,
            Fetcher::default(),
            Arc::new(state),
            Arc::new(identity),
            outbox.clone(),
        )
        .unwrap();
        Agent {
            dir,
            publisher,
            jobs,
            outbox,
            stop,
        }
    }

    /// Signs a manifest for `crate_name`'s component as plugin `name` of `world`, and
    /// puts the component where the agent keeps fetched blobs.
    fn plugin(
        &self,
        crate_name: &str,
        name: &str,
        world: World,
        caps: Capabilities,
    ) -> Signed<Manifest> {
        self.plugin_of(component(crate_name), name, world, caps)
    }

    /// [`Agent::plugin`] for a component's bytes.
    fn plugin_of(
        &self,
        wasm: Vec<u8>,
        name: &str,
        world: World,
        caps: Capabilities,
    ) -> Signed<Manifest> {
        let sha256 = sha256_hex(&wasm);
        let blobs = self.dir.join("data/blobs");
        std::fs::write(blobs.join(format!("{sha256}.wasm")), &wasm).unwrap();
        let manifest = Manifest {
            name: name.into(),
            version: 1,
            sha256,
            length: wasm.len() as u64,
            world,
            capabilities: caps,
            issued_at: now_secs(),
            expires_at: now_secs() + 3600,
        };
        Signed::sign(&manifest, &self.publisher)
    }

    async fn run(&self, job_id: &str, plugin: &Signed<Manifest>, input: Value) -> JobResult {
        self.run_with(job_id, plugin, input, Limits::default())
            .await
    }

    async fn run_with(
        &self,
        job_id: &str,
        plugin: &Signed<Manifest>,
        input: Value,
        limits: Limits,
    ) -> JobResult {
        self.jobs
            .run_local(LocalJob {
                job_id: job_id.into(),
                plugin: plugin.clone(),
                input,
                parameters: [("region".to_string(), "eu".to_string())].into(),
                limits,
                schedule: "test".into(),
            })
            .await
    }

    fn markers(&self) -> usize {
        std::fs::read_dir(self.dir.join("data/running"))
            .unwrap()
            .count()
    }
}

fn exec(programs: &[&str]) -> Capabilities {
    Capabilities {
        exec: programs.iter().map(|p| p.to_string()).collect(),
        ..Capabilities::default()
    }
}

fn allow_exec(programs: &[&str]) -> PolicyFile {
    PolicyFile {
        exec: programs.iter().map(|p| p.to_string()).collect(),
        ..PolicyFile::default()
    }
}

fn failure(r: &JobResult) -> &drover_protocol::job::Failure {
    r.failure
        .as_ref()
        .unwrap_or_else(|| panic!("no failure: {r:#?}"))
}

#[tokio::test]
async fn a_local_run_takes_the_run_path_to_the_outbox() {
    let a = Agent::start("local", PolicyFile::default());
    let misbehave = a.plugin(
        "drover-plugin-misbehave",
        "misbehave",
        World::Task,
        Capabilities::default(),
    );
    let r = a
        .run("local-echo", &misbehave, json!({"mode": "echo", "n": 1}))
        .await;
    assert_eq!(r.status, ResultStatus::Succeeded, "{r:#?}");
    assert_eq!(r.output.as_ref().unwrap()["echo"]["n"], 1);
    assert_eq!((r.agent_id.as_str(), r.attempt), ("local-1", 1));
    assert_eq!((r.plugin.as_str(), r.plugin_version), ("misbehave", 1));
    assert!(
        a.outbox.holds("local-echo", 1),
        "the result is in the outbox"
    );
    assert_eq!(a.markers(), 0, "the running marker is gone");
    assert_eq!(
        a.jobs.stats.ran.load(std::sync::atomic::Ordering::Relaxed),
        1
    );

    // A 0.2.0 plugin's error case reaches the result.
    let r = a
        .run("local-fail", &misbehave, json!({"mode": "fail"}))
        .await;
    assert_eq!(r.status, ResultStatus::Failed);
    let f = failure(&r);
    assert_eq!(
        (f.kind, f.message.as_str()),
        (FailureKind::PluginError, "asked to fail")
    );
    assert_eq!(
        (f.plugin_error, f.retryable),
        (Some(PluginErrorKind::Unavailable), true)
    );
    let r = a.run("local-bad", &misbehave, json!({"mode": "fly"})).await;
    assert_eq!(
        failure(&r).plugin_error,
        Some(PluginErrorKind::InvalidInput)
    );

    // Its limits hold: the deadline stops a plugin blocked in WASI.
    let limits = Limits {
        timeout_ms: 300,
        ..Limits::default()
    };
    let r = a
        .run_with(
            "local-sleep",
            &misbehave,
            json!({"mode": "sleep", "seconds": 60}),
            limits,
        )
        .await;
    assert_eq!(failure(&r).kind, FailureKind::Timeout, "{r:#?}");
    assert!(r.duration_ms < 10_000, "{r:#?}");
    assert!(a.outbox.holds("local-sleep", 1));
}

#[tokio::test]
async fn a_local_run_is_checked_like_any_job() {
    let a = Agent::start("checked", PolicyFile::default());
    // Signed by a key the agent does not trust.
    let mut stranger = a.plugin(
        "drover-plugin-misbehave",
        "stranger",
        World::Task,
        Capabilities::default(),
    );
    stranger = Signed::sign(&stranger.unverified().unwrap(), &SigningKey::generate());
    let r = a.run("untrusted", &stranger, json!({"mode": "echo"})).await;
    assert_eq!(r.status, ResultStatus::Rejected);
    assert_eq!(failure(&r).kind, FailureKind::UntrustedPlugin, "{r:#?}");

    // Asking for more than the policy allows.
    let greedy = a.plugin(
        "drover-plugin-misbehave",
        "greedy",
        World::Task,
        exec(&["/bin/echo"]),
    );
    let r = a.run("greedy", &greedy, json!({"mode": "echo"})).await;
    assert_eq!(r.status, ResultStatus::Rejected);
    assert_eq!(failure(&r).kind, FailureKind::PolicyDenied);
    assert!(failure(&r).message.ends_with(": exec:/bin/echo"), "{r:#?}");

    // Expired before it was ever installed.
    let mut m = a
        .plugin(
            "drover-plugin-misbehave",
            "stale",
            World::Task,
            Capabilities::default(),
        )
        .unverified()
        .unwrap();
    m.expires_at = now_secs() - 10;
    let stale = Signed::sign(&m, &a.publisher);
    let r = a.run("stale", &stale, json!({"mode": "echo"})).await;
    assert_eq!(failure(&r).kind, FailureKind::ExpiredPlugin, "{r:#?}");

    // A refusal is a result like any other: in the outbox, nothing left running.
    for job in ["untrusted", "greedy", "stale"] {
        assert!(a.outbox.holds(job, 1), "{job}");
    }
    assert_eq!(a.markers(), 0);
}

#[tokio::test]
async fn a_job_interrupted_by_an_agent_stop_is_reported_not_run_again() {
    let a = Agent::start("interrupted", PolicyFile::default());
    a.jobs
        .markers
        .mark("cut-short", 1, &("misbehave".to_string(), 3))
        .unwrap();
    assert_eq!(a.markers(), 1);
    a.jobs.recover_interrupted().await;
    assert_eq!(a.markers(), 0);
    assert!(
        a.outbox.holds("cut-short", 1),
        "reported through the outbox"
    );
}

#[tokio::test]
async fn command_runner_requests_and_outputs_are_typed() {
    let a = Agent::start("command", allow_exec(&["*"]));
    let command = a.plugin(
        "drover-plugin-command",
        "command",
        World::CommandRunner,
        exec(&["*"]),
    );
    let r = a
        .run(
            "cmd-echo",
            &command,
            json!({"argv": ["/bin/echo", "a  b"], "stream": false}),
        )
        .await;
    assert_eq!(r.status, ResultStatus::Succeeded, "{r:#?}");
    assert_eq!(
        r.output.unwrap(),
        json!({
            "exit_code": 0,
            "stdout": {"text": "a  b\n", "total_bytes": 5, "truncated": false},
            "stderr": {"text": "", "total_bytes": 0, "truncated": false},
        })
    );
    let r = a
        .run(
            "cmd-exit",
            &command,
            json!({"script": "echo out; echo err >&2; exit 3", "env": {"A": "1"}}),
        )
        .await;
    let out = r.output.unwrap();
    assert_eq!(
        (out["exit_code"].clone(), out["stderr"]["text"].clone()),
        (json!(3), json!("err\n"))
    );

    // Input that is not a command-runner request: refused, and the plugin never called.
    let marker = a.dir.join("ran");
    let script = format!("touch {}", marker.display());
    let r = a
        .run(
            "cmd-typo",
            &command,
            json!({"script": script, "timeout": 5}),
        )
        .await;
    assert_eq!(r.status, ResultStatus::Rejected, "{r:#?}");
    let f = failure(&r);
    assert_eq!(f.kind, FailureKind::BadInput);
    assert!(
        f.message.contains("unknown field `timeout`"),
        "{}",
        f.message
    );
    let r = a.run("cmd-type", &command, json!({"script": 1})).await;
    assert_eq!(failure(&r).kind, FailureKind::BadInput);
    assert!(!marker.exists(), "the plugin ran");

    // The plugin's own checks are `invalid-input`; the host's errors pass through.
    let r = a.run("cmd-empty", &command, json!({"script": "  "})).await;
    assert_eq!(
        failure(&r).plugin_error,
        Some(PluginErrorKind::InvalidInput),
        "{r:#?}"
    );
    let r = a
        .run("cmd-none", &command, json!({"argv": ["/no/such/program"]}))
        .await;
    let f = failure(&r);
    assert_eq!(f.plugin_error, Some(PluginErrorKind::Unavailable), "{r:#?}");
    assert!(
        f.message.contains("could not be started") && f.retryable,
        "{f:?}"
    );

    // A command stopped at the deadline leaves what it wrote, marked partial.
    let limits = Limits {
        timeout_ms: 1000,
        ..Limits::default()
    };
    let r = a
        .run_with(
            "cmd-partial",
            &command,
            json!({"script": "echo before; sleep 30"}),
            limits,
        )
        .await;
    assert_eq!(failure(&r).kind, FailureKind::Timeout, "{r:#?}");
    assert_eq!(
        r.output.unwrap(),
        json!({
            "partial": true,
            "stdout": {"text": "before\n", "total_bytes": 7, "truncated": false},
            "stderr": {"text": "", "total_bytes": 0, "truncated": false},
        })
    );
}

#[tokio::test]
async fn plugins_built_against_0_1_0_keep_running() {
    let a = Agent::start("legacy", allow_exec(&["/bin/echo"]));
    let caps = Capabilities {
        exec: vec!["/bin/echo".into()],
        parameters: vec!["region".into()],
        ..Capabilities::default()
    };
    let legacy = a.plugin("drover-plugin-legacy", "legacy", World::Task, caps);
    let r = a
        .run("old-echo", &legacy, json!({"mode": "echo", "n": 2}))
        .await;
    assert_eq!(r.status, ResultStatus::Succeeded, "{r:#?}");
    let out = r.output.unwrap();
    assert_eq!(
        (out["echo"]["n"].clone(), out["contract"].clone()),
        (json!(2), json!("0.1.0"))
    );
    let sha = legacy.unverified().unwrap().sha256;
    assert_eq!(
        a.jobs
            .sandbox
            .loaded(&sha, World::Task)
            .unwrap()
            .contract_version(),
        "0.1.0"
    );

    // Its error record keeps its own retryable flag, and names no case.
    let r = a
        .run(
            "old-fail",
            &legacy,
            json!({"mode": "fail", "message": "busy"}),
        )
        .await;
    let f = failure(&r);
    assert_eq!(
        (f.kind, f.message.as_str()),
        (FailureKind::PluginError, "busy")
    );
    assert_eq!((f.retryable, f.plugin_error), (true, None));

    // The 0.1.0 imports: process, parameters.
    let r = a
        .run(
            "old-exec",
            &legacy,
            json!({"mode": "exec", "program": "/bin/echo", "args": ["hi"]}),
        )
        .await;
    assert_eq!(
        r.output.unwrap(),
        json!({"exit_code": 0, "stdout": "hi\n", "stderr": ""})
    );
    let r = a
        .run(
            "old-denied",
            &legacy,
            json!({"mode": "exec", "program": "/bin/sh"}),
        )
        .await;
    let f = failure(&r);
    assert_eq!(f.message, "program /bin/sh is not granted");
    assert_eq!((f.retryable, f.plugin_error), (false, None));
    let r = a
        .run(
            "old-param",
            &legacy,
            json!({"mode": "param", "name": "region"}),
        )
        .await;
    assert_eq!(r.output.unwrap(), json!({"value": "eu"}));

    // 0.1.0 has no command-runner world: refused when loaded, never run.
    let as_command = a.plugin(
        "drover-plugin-legacy",
        "legacy-cmd",
        World::CommandRunner,
        Capabilities::default(),
    );
    let r = a.run("old-cmd", &as_command, json!({"argv": ["x"]})).await;
    assert_eq!(r.status, ResultStatus::Rejected, "{r:#?}");
    let f = failure(&r);
    assert_eq!(f.kind, FailureKind::CompileFailed);
    assert!(
        f.message
            .contains("drover:plugin@0.1.0, which has no command-runner world"),
        "{}",
        f.message
    );
}

#[tokio::test]
async fn inventory_output_keeps_its_keys() {
    let policy = PolicyFile {
        host_facts: true,
        read_paths: vec!["/var/lib/dpkg".into()],
        ..PolicyFile::default()
    };
    let a = Agent::start("inventory", policy);
    let caps = Capabilities {
        host_facts: true,
        read_paths: vec!["/var/lib/dpkg".into()],
        ..Capabilities::default()
    };
    let inventory = a.plugin(
        "drover-plugin-inventory",
        "inventory",
        World::InventoryCollector,
        caps,
    );
    let r = a.run("inv", &inventory, json!({"packages": false})).await;
    assert_eq!(r.status, ResultStatus::Succeeded, "{r:#?}");
    let out = r.output.unwrap();
    assert_eq!(out["os"]["family"], std::env::consts::OS);
    assert!(out["os"]["kernel_version"].is_string(), "{out:#}");
    assert_eq!(out["packages"], json!([]));
    assert!(
        out["custom"].is_array() && out["warnings"].is_array(),
        "{out:#}"
    );
}

/// The policy allows a directory; a manifest asks for a link in it to a directory
/// outside. Refused before anything runs; a real directory below works.
#[tokio::test]
async fn a_read_grant_through_a_link_below_the_policy_is_refused() {
    let base = std::fs::canonicalize(std::env::temp_dir())
        .unwrap()
        .join(format!("drover-jobs-linked-tree-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&base);
    let (allowed, outside) = (base.join("allowed"), base.join("outside"));
    std::fs::create_dir_all(allowed.join("sub")).unwrap();
    std::fs::create_dir_all(&outside).unwrap();
    std::fs::write(allowed.join("sub/file"), "fine").unwrap();
    std::fs::write(outside.join("secret"), "not for plugins").unwrap();
    std::os::unix::fs::symlink(&outside, allowed.join("link")).unwrap();
    let path = |rest: &str| allowed.join(rest).to_str().unwrap().to_string();

    let a = Agent::start(
        "links",
        PolicyFile {
            read_paths: vec![allowed.clone()],
            ..PolicyFile::default()
        },
    );
    let reads = |p: String| Capabilities {
        read_paths: vec![p],
        ..Capabilities::default()
    };
    let via_link = a.plugin(
        "drover-plugin-misbehave",
        "via-link",
        World::Task,
        reads(path("link")),
    );
    let r = a
        .run(
            "via-link",
            &via_link,
            json!({"mode": "open", "path": path("link/secret")}),
        )
        .await;
    assert_eq!(r.status, ResultStatus::Rejected, "{r:#?}");
    let f = failure(&r);
    assert_eq!(f.kind, FailureKind::PolicyDenied, "{f:?}");
    assert_eq!(
        f.message,
        format!(
            "granted path refused: {} goes through a symbolic link below {}, which is not followed; name the real directory",
            path("link"),
            allowed.display()
        )
    );
    assert_eq!(
        a.jobs.stats.ran.load(std::sync::atomic::Ordering::Relaxed),
        0
    );

    let via_sub = a.plugin(
        "drover-plugin-misbehave",
        "via-sub",
        World::Task,
        reads(path("sub")),
    );
    let r = a
        .run(
            "via-sub",
            &via_sub,
            json!({"mode": "open", "path": path("sub/file")}),
        )
        .await;
    assert_eq!(r.status, ResultStatus::Succeeded, "{r:#?}");
    assert_eq!(r.output.unwrap()["read_bytes"], 4);
    let _ = std::fs::remove_dir_all(&base);
}

/// A `task` component with `memories` memories of `pages` pages each, whose `run` fills
/// them all and returns `{}` (the same as the attack suite's).
fn many_memories(memories: usize, pages: u32) -> Vec<u8> {
    let bytes = pages * 65536;
    let decls: String = (0..memories)
        .map(|i| format!("(memory $m{i} {pages})\n"))
        .collect();
    let fills: String = (0..memories)
        .map(|i| format!("(memory.fill $m{i} (i32.const 0) (i32.const 1) (i32.const {bytes}))\n"))
        .collect();
    wat::parse_str(format!(
        r#"
(component
  (core module $hog
    {decls}
    (export "memory" (memory $m0))
    (func (export "cabi_realloc") (param i32 i32 i32 i32) (result i32) (i32.const 1024))
    (func (export "run") (param i32 i32) (result i32)
      {fills}
      (i32.store16 $m0 (i32.const 0) (i32.const 0x7d7b))
      (i32.store8 $m0 (i32.const 16) (i32.const 0))
      (i32.store $m0 (i32.const 20) (i32.const 0))
      (i32.store $m0 (i32.const 24) (i32.const 2))
      (i32.const 16)))
  (core instance $i (instantiate $hog))
  (type $error' (variant
    (case "denied" string)
    (case "invalid-input" string)
    (case "unavailable" string)
    (case "timed-out" string)
    (case "failed" string)))
  (export $error "plugin-error" (type $error'))
  (func $run (param "input" string) (result (result string (error $error)))
    (canon lift (core func $i "run") (memory $i "memory") (realloc (func $i "cabi_realloc"))))
  (export "run" (func $run)))
"#
    ))
    .unwrap()
}

/// The memory limit holds for a store's memories together, and how many memories a
/// run may create is capped; either way the result says `MemoryLimit`.
#[tokio::test]
async fn the_memory_limit_counts_every_memory_of_a_run() {
    let a = Agent::start("memories", PolicyFile::default());
    let limits = Limits {
        memory_bytes: 16 << 20,
        ..Limits::default()
    };
    let run = |name: &'static str, memories: usize, pages: u32| {
        let plugin = a.plugin_of(
            many_memories(memories, pages),
            name,
            World::Task,
            Capabilities::default(),
        );
        let a = &a;
        async move { a.run_with(name, &plugin, json!({}), limits).await }
    };
    // Within the limit together: it runs.
    let r = run("fits", 4, 60).await;
    assert_eq!(r.status, ResultStatus::Succeeded, "{r:#?}");
    assert_eq!(r.output, Some(json!({})));

    // Sixteen memories of 15 MiB, each under 16 MiB on its own.
    let r = run("hog", 16, 240).await;
    assert_eq!(r.status, ResultStatus::Failed, "{r:#?}");
    let f = failure(&r);
    assert_eq!(f.kind, FailureKind::MemoryLimit, "{f:?}");
    assert!(
        f.message.starts_with(
            "plugin tried to grow memory past its 16777216 byte limit (all its memories and tables together)"
        ),
        "{f:?}"
    );

    // More memories than a run may have, however small: wasmtime's refusal, which the
    // agent recognises by its text.
    let r = run("many", crate::sandbox::limits::MAX_MEMORIES + 1, 1).await;
    let f = failure(&r);
    assert_eq!(f.kind, FailureKind::MemoryLimit, "{f:?}");
    assert!(
        f.message.starts_with(
            "plugin needs more than a run may have (at most 64 instances, 16 memories and 64 tables): "
        ) && f
            .message
            .contains("resource limit exceeded: memory count too high at 17"),
        "{f:?}"
    );
}
