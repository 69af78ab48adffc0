//! Capabilities beyond files and facts: `exec`, `network` and `parameters`, each granted
//! only when the signed manifest asks and the agent's policy allows, through the real
//! binaries and the misbehave plugin.

use std::io::ErrorKind;
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::Value;

use super::support::*;

fn failure_message(r: &Value) -> &str {
    r["failure"]["message"].as_str().unwrap_or("")
}

/// Publishes the misbehave plugin under `name`, asking for `caps`.
fn publish_misbehave_as(server: &Server, name: &str, caps: &[&str]) {
    server.publish(
        &plugin("drover-plugin-misbehave"),
        name,
        1,
        "task",
        caps,
        None,
    );
}

/// Runs misbehave-as-`name` on `agent` with `input` and extra `drover run` flags.
fn misbehave(server: &Server, name: &str, agent: &str, input: &Value, flags: &[&str]) -> Value {
    let input = input.to_string();
    let mut args = vec![name, "-t", agent, "--input", input.as_str()];
    args.extend_from_slice(flags);
    run_one(server, &args)
}

#[test]
fn exec_runs_only_what_the_manifest_and_the_policy_both_grant() {
    let server = Server::start();
    let cfg = server.add_agent(
        "exec-1",
        &["--allow-exec", "/bin/echo", "--allow-exec", "/bin/sleep"],
    );
    let mut agent = Agent::start("exec-1", &cfg, server.dir.path());
    server.wait_online("exec-1");
    publish_misbehave_as(
        &server,
        "runner",
        &["--exec", "/bin/echo", "--exec", "/bin/sleep"],
    );

    // Granted by both: it runs, and its output comes back.
    let r = misbehave(
        &server,
        "runner",
        "exec-1",
        &serde_json::json!({"mode": "exec", "program": "/bin/echo", "args": ["hello", "$HOME"]}),
        &[],
    );
    assert_eq!(r["status"], "succeeded", "{r:#}");
    assert_eq!(r["output"]["exit_code"], 0);
    assert_eq!(
        r["output"]["stdout"], "hello $HOME\n",
        "no shell expands arguments"
    );
    assert_eq!(r["output"]["stdout_truncated"], false);

    // A program the manifest does not name: refused at the call, and nothing runs.
    let marker = server.dir.path().join("pwned");
    let r = misbehave(
        &server,
        "runner",
        "exec-1",
        &serde_json::json!({
            "mode": "exec",
            "program": "/bin/sh",
            "args": ["-c", format!("echo pwned > {}", marker.display())],
        }),
        &[],
    );
    assert_eq!(r["status"], "failed", "{r:#}");
    assert_eq!(failure_kind(&r), "plugin_error", "{r:#}");
    assert_eq!(failure_message(&r), "program /bin/sh is not granted");
    assert_eq!(r["failure"]["retryable"], false);
    assert!(!marker.exists(), "/bin/sh ran");

    // A manifest naming a program the policy does not allow: the job is refused before
    // anything runs, and the refusal names exactly what is missing.
    publish_misbehave_as(
        &server,
        "greedy-exec",
        &["--exec", "/bin/echo", "--exec", "/usr/bin/id"],
    );
    let r = misbehave(
        &server,
        "greedy-exec",
        "exec-1",
        &serde_json::json!({"mode": "exec", "program": "/bin/echo"}),
        &[],
    );
    assert_eq!(r["status"], "rejected", "{r:#}");
    assert_eq!(failure_kind(&r), "policy_denied", "{r:#}");
    let msg = failure_message(&r);
    assert!(msg.ends_with(": exec:/usr/bin/id"), "{msg}");

    // A program still running at the job's deadline dies with the job. The argument makes
    // its command line unique to this test run.
    let argv_tail = format!("60.{:06}", std::process::id() % 1_000_000);
    let argv = ["/bin/sleep", argv_tail.as_str()];
    let input = serde_json::json!({"mode": "exec", "program": "/bin/sleep", "args": [argv_tail]});
    let started = Instant::now();
    let (r, seen) = std::thread::scope(|s| {
        let job = s.spawn(|| misbehave(&server, "runner", "exec-1", &input, &["--timeout", "2s"]));
        let mut seen = false;
        while !job.is_finished() && !seen {
            seen = running(&argv);
            std::thread::sleep(Duration::from_millis(20));
        }
        (job.join().unwrap(), seen)
    });
    assert!(seen, "the program never ran");
    assert_eq!(r["status"], "failed", "{r:#}");
    assert_eq!(failure_kind(&r), "timeout", "{r:#}");
    assert!(started.elapsed() < Duration::from_secs(20));
    // SIGKILL is sent before the result; give the kernel a moment to finish the process.
    let gone = Instant::now();
    while running(&argv) {
        assert!(
            gone.elapsed() < Duration::from_secs(2),
            "{argv:?} outlived its job"
        );
        std::thread::sleep(Duration::from_millis(20));
    }

    assert!(agent.is_running(), "the agent died: {}", agent.log_text());
    let log = agent.log_text();
    assert!(log.contains("plugin ran a program"), "{log}");
    assert!(log.contains("not granted; refused"), "{log}");
    assert!(!log.contains("$HOME"), "arguments were logged: {log}");
}

/// Accepts one connection if one arrives within `within`.
fn accepted(listener: &TcpListener, within: Duration) -> Option<TcpStream> {
    let start = Instant::now();
    loop {
        match listener.accept() {
            Ok((s, _)) => return Some(s),
            Err(e) if e.kind() == ErrorKind::WouldBlock => {}
            Err(e) => panic!("accept failed: {e}"),
        }
        if start.elapsed() > within {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn listener() -> (TcpListener, String) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    l.set_nonblocking(true).unwrap();
    let addr = l.local_addr().unwrap().to_string();
    (l, addr)
}

#[test]
fn network_is_off_unless_the_manifest_and_the_policy_grant_the_address() {
    let server = Server::start();
    // Two listeners: a connection to `open` succeeds if anything lets it through.
    let (open, open_addr) = listener();
    let (_other, other_addr) = listener();
    let not_in_policy = format!("127.0.0.1:{}", free_port());
    let cfg = server.add_agent(
        "net-1",
        &[
            "--allow-network",
            &open_addr,
            "--allow-network",
            &other_addr,
        ],
    );
    let agent = Agent::start("net-1", &cfg, server.dir.path());
    server.wait_online("net-1");
    let connect = serde_json::json!({"mode": "connect", "addr": open_addr});

    // No network capability: no sockets.
    publish_misbehave_as(&server, "netless", &[]);
    let r = misbehave(&server, "netless", "net-1", &connect, &[]);
    assert_eq!(r["status"], "failed", "{r:#}");
    assert!(
        failure_message(&r).starts_with(&format!("could not connect to {open_addr}")),
        "{r:#}"
    );
    assert!(accepted(&open, Duration::from_millis(300)).is_none());

    // Granted exactly that address: connects.
    publish_misbehave_as(&server, "net-open", &["--network", &open_addr]);
    let r = misbehave(&server, "net-open", "net-1", &connect, &[]);
    assert_eq!(r["status"], "succeeded", "{r:#}");
    assert_eq!(r["output"]["connected"], true);
    assert!(
        accepted(&open, Duration::from_secs(5)).is_some(),
        "the listener saw no connection"
    );

    // Granted another port: this one stays closed.
    publish_misbehave_as(&server, "net-other", &["--network", &other_addr]);
    let r = misbehave(&server, "net-other", "net-1", &connect, &[]);
    assert_eq!(r["status"], "failed", "{r:#}");
    assert_eq!(failure_kind(&r), "plugin_error", "{r:#}");
    assert!(accepted(&open, Duration::from_millis(300)).is_none());

    // Asking for an address the policy does not allow: refused, naming it.
    publish_misbehave_as(&server, "net-greedy", &["--network", &not_in_policy]);
    let r = misbehave(&server, "net-greedy", "net-1", &connect, &[]);
    assert_eq!(r["status"], "rejected", "{r:#}");
    assert_eq!(failure_kind(&r), "policy_denied", "{r:#}");
    assert!(
        failure_message(&r).ends_with(&format!(": net:{not_in_policy}")),
        "{r:#}"
    );

    // Parameters: the plugin reads the ones its manifest names, and nothing else.
    publish_misbehave_as(&server, "param-reader", &["--parameter", "region"]);
    for (name, want) in [
        ("region", serde_json::json!("eu-west")),
        ("other", Value::Null),
    ] {
        let r = misbehave(
            &server,
            "param-reader",
            "net-1",
            &serde_json::json!({"mode": "param", "name": name}),
            &["--param", "region=eu-west", "--param", "other=hidden"],
        );
        assert_eq!(r["status"], "succeeded", "{r:#}");
        assert_eq!(r["output"], serde_json::json!({ "value": want }), "{name}");
    }
    drop(agent);
}

#[test]
fn agents_add_refuses_bad_policy_entries_before_minting_anything() {
    let server = Server::start();
    for bad in [
        ["--allow-exec", "uptime"],
        ["--allow-exec", "/usr/bin/../bin/sh"],
        ["--allow-network", "127.0.0.1"],
    ] {
        let cfg = server.dir.path().join("bad.toml");
        let cfg_s = cfg.display().to_string();
        let mut args = vec!["agents", "add", "bad-1", "--out", &cfg_s];
        args.extend_from_slice(&bad);
        let out = server.cli(&args);
        assert!(!out.status.success(), "{bad:?} was accepted");
        assert!(!Path::new(&cfg).exists());
    }
    assert!(server.agent_row("bad-1").is_none());
}
