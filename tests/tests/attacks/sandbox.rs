//! Attacks by hostile plugins and manifests on the agent's sandbox.

use std::path::Path;

use serde_json::{Value, json};

use super::super::support::*;

fn failure_message(r: &Value) -> &str {
    r["failure"]["message"].as_str().unwrap_or("")
}

/// Runs misbehave, published as `name`, on `agent` with `input` and extra flags.
fn misbehave(server: &Server, name: &str, agent: &str, input: &Value, flags: &[&str]) -> Value {
    let input = input.to_string();
    let mut args = vec![name, "-t", agent, "--input", input.as_str()];
    args.extend_from_slice(flags);
    run_one(server, &args)
}

/// A granted directory holding a real subdirectory and a link to a directory outside
/// it, and that outside directory with a file only the link leads to.
struct LinkedTree {
    granted: TempDir,
    /// Kept until the test ends.
    _outside: TempDir,
}

impl LinkedTree {
    fn new() -> LinkedTree {
        let (granted, outside) = (TempDir::new("granted"), TempDir::new("outside"));
        std::fs::write(outside.path().join("secret"), "not for plugins").unwrap();
        std::fs::create_dir(granted.path().join("sub")).unwrap();
        std::fs::write(granted.path().join("sub/file"), "fine").unwrap();
        std::os::unix::fs::symlink(outside.path(), granted.path().join("link")).unwrap();
        LinkedTree {
            granted,
            _outside: outside,
        }
    }

    fn granted(&self, rest: &str) -> String {
        path_str(&self.granted.path().join(rest))
    }
}

fn path_str(p: &Path) -> String {
    p.to_str().unwrap().to_string()
}

/// The policy allows one directory; a signed manifest asks for a link inside it that
/// points elsewhere. The grant is checked on the path's text, so it matched; opening
/// it must not follow the link out of what the operator allowed.
#[test]
fn a_read_grant_does_not_follow_a_symlink_out_of_the_allowed_directory() {
    let tree = LinkedTree::new();
    let server = Server::start();
    let allowed = path_str(tree.granted.path());
    let cfg = server.add_agent("links-1", &["--allow-read", &allowed]);
    let agent = Agent::start("links-1", &cfg, server.dir.path());
    server.wait_online("links-1");

    // Through the link: refused before anything runs, naming the path.
    let via_link = tree.granted("link");
    server.publish(
        &plugin("drover-plugin-misbehave"),
        "via-link",
        1,
        "task",
        &["--read-path", &via_link],
        None,
    );
    let secret = tree.granted("link/secret");
    let r = misbehave(
        &server,
        "via-link",
        "links-1",
        &json!({"mode": "open", "path": secret}),
        &[],
    );
    assert_eq!(r["status"], "rejected", "the link was followed: {r:#}");
    assert_eq!(failure_kind(&r), "policy_denied", "{r:#}");
    let msg = failure_message(&r);
    assert!(
        msg.contains(&via_link) && msg.contains("symbolic link"),
        "{msg}"
    );

    // A real directory below the allowed one is still granted, and read.
    let sub = tree.granted("sub");
    server.publish(
        &plugin("drover-plugin-misbehave"),
        "via-sub",
        1,
        "task",
        &["--read-path", &sub],
        None,
    );
    let r = misbehave(
        &server,
        "via-sub",
        "links-1",
        &json!({"mode": "open", "path": tree.granted("sub/file")}),
        &[],
    );
    assert_eq!(r["status"], "succeeded", "{r:#}");
    assert_eq!(r["output"]["read_bytes"], 4);

    let log = agent.log_text();
    assert!(log.contains("symbolic link"), "{log}");
    assert_eq!(log.matches("job succeeded").count(), 1, "{log}");
}

/// A link the operator wrote into the policy is the operator's choice (Debian's
/// `/var/run -> /run`): it is followed, and only what lies below it is held to no links.
#[test]
fn a_link_the_operator_allowed_by_name_is_followed() {
    let tree = LinkedTree::new();
    let server = Server::start();
    let allowed = tree.granted("link");
    let cfg = server.add_agent("links-2", &["--allow-read", &allowed]);
    let _agent = Agent::start("links-2", &cfg, server.dir.path());
    server.wait_online("links-2");
    server.publish(
        &plugin("drover-plugin-misbehave"),
        "operator-link",
        1,
        "task",
        &["--read-path", &allowed],
        None,
    );
    let r = misbehave(
        &server,
        "operator-link",
        "links-2",
        &json!({"mode": "open", "path": tree.granted("link/secret")}),
        &[],
    );
    assert_eq!(r["status"], "succeeded", "{r:#}");
    assert_eq!(r["output"]["read_bytes"], 15);
}

/// A command's working directory is a host path a job names: a link in it is refused,
/// so a command meant for one directory never runs in another.
#[test]
fn a_working_directory_through_a_symlink_is_refused() {
    let tree = LinkedTree::new();
    let server = Server::start();
    server.publish(
        &plugin("drover-plugin-command"),
        "command",
        1,
        "command-runner",
        &["--exec", "*"],
        None,
    );
    let cfg = server.add_agent("cwd-1", &["--allow-exec", "*"]);
    let _agent = Agent::start("cwd-1", &cfg, server.dir.path());
    server.wait_online("cwd-1");
    let run_in = |cwd: &str| -> Value {
        let out = server.cli(&[
            "--output",
            "json",
            "run-command",
            "-t",
            "cwd-1",
            "--cwd",
            cwd,
            "--",
            "/bin/pwd",
        ]);
        let view: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!("bad output: {e}; stderr: {}", text(&out.stderr));
        });
        view["targets"][0].clone()
    };

    let t = run_in(&tree.granted("link"));
    assert_eq!(
        t["state"], "failed",
        "the command ran through the link: {t:#}"
    );
    let msg = t["result"]["failure"]["message"].as_str().unwrap_or("");
    assert!(
        msg.contains(&tree.granted("link")) && msg.contains("symbolic link"),
        "{t:#}"
    );

    // A real directory works as before.
    let t = run_in(&tree.granted("sub"));
    assert_eq!(t["state"], "success", "{t:#}");
    assert_eq!(
        t["result"]["output"]["stdout"]["text"],
        format!("{}\n", tree.granted("sub"))
    );
}

/// A `task` component whose core module has `memories` linear memories of `pages` 64 KiB
/// pages each, every one under a small job limit on its own. Its `run` writes to every
/// page of every memory, so what the agent let it have shows in the agent's RSS, and
/// returns `{}`.
fn many_memories(memories: usize, pages: u32) -> Vec<u8> {
    let bytes = pages * 65536;
    let decls: String = (0..memories)
        .map(|i| format!("(memory $m{i} {pages})\n"))
        .collect();
    let fills: String = (0..memories)
        .map(|i| format!("(memory.fill $m{i} (i32.const 0) (i32.const 1) (i32.const {bytes}))\n"))
        .collect();
    let text = format!(
        r#"
(component
  (core module $hog
    {decls}
    (export "memory" (memory $m0))
    (func (export "cabi_realloc") (param i32 i32 i32 i32) (result i32) (i32.const 1024))
    ;; The canonical ABI: the input string in memory 0, a pointer to the result back.
    (func (export "run") (param i32 i32) (result i32)
      {fills}
      ;; ok("{{}}"): the text at 0; the result (tag, pointer, length) at 16.
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
    );
    wat::parse_str(&text).expect("the hostile component's WAT")
}

/// The peak resident set of a process, bytes (`VmHWM`).
fn peak_rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM in /proc/PID/status");
    kib * 1024
}

/// The memory limit is the job's, not each memory's: sixteen memories of 15 MiB each,
/// under a 16 MiB limit, must not get 240 MiB between them.
#[test]
fn a_component_with_many_memories_is_held_to_the_jobs_memory_limit() {
    let server = Server::start();
    publish_misbehave(&server);
    let wasm = server.dir.path().join("hog.wasm");
    std::fs::write(&wasm, many_memories(16, 240)).unwrap();
    server.publish(&wasm, "hog", 1, "task", &[], None);
    let cfg = server.add_agent("hog-1", &[]);
    let mut agent = Agent::start("hog-1", &cfg, server.dir.path());
    server.wait_online("hog-1");
    // The agent's own peak so far, after a first job.
    let r = misbehave(&server, "misbehave", "hog-1", &json!({"mode": "echo"}), &[]);
    assert_eq!(r["status"], "succeeded", "{r:#}");
    let before = peak_rss(agent.pid());

    let r = run_one(
        &server,
        &["hog", "-t", "hog-1", "--input", "{}", "--memory-mib", "16"],
    );
    let grown = peak_rss(agent.pid()).saturating_sub(before);
    assert_eq!(
        r["status"],
        "failed",
        "16 memories of 15 MiB ran under a 16 MiB limit; the agent's peak RSS grew by {} MiB: {r:#}",
        grown >> 20
    );
    assert_eq!(failure_kind(&r), "memory_limit", "{r:#}");
    assert!(failure_message(&r).contains("16777216 byte limit"), "{r:#}");
    assert!(
        grown < 64 << 20,
        "the agent's peak RSS grew by {} MiB",
        grown >> 20
    );

    // The agent carries on.
    let r = misbehave(&server, "misbehave", "hog-1", &json!({"mode": "echo"}), &[]);
    assert_eq!(r["status"], "succeeded", "{r:#}");
    assert!(agent.is_running(), "the agent died: {}", agent.log_text());
}
