//! Run Command through the real binaries: the command runner plugin, rate control,
//! timeouts that kill process trees, cancellation, offline agents and capped output.

use std::time::Duration;

use serde_json::Value;

use super::support::*;

/// Publishes the command runner as `command` v1, asking for any program.
fn publish_command(server: &Server) {
    server.publish(
        &plugin("drover-plugin-command"),
        "command",
        1,
        "command-runner",
        &["--exec", "*"],
        None,
    );
}

/// Adds and starts an agent whose policy lets the command runner run anything.
fn command_agent(server: &Server, id: &str, extra: &[&str]) -> Agent {
    let mut args = vec!["--allow-exec", "*"];
    args.extend_from_slice(extra);
    let cfg = server.add_agent(id, &args);
    let agent = Agent::start(id, &cfg, server.dir.path());
    server.wait_online(id);
    agent
}

/// `drover --output json run-command ARGS`: exit code, the command's final view, stderr.
fn run_command(server: &Server, args: &[&str]) -> (i32, Value, String) {
    let mut full = vec!["--output", "json", "run-command"];
    full.extend_from_slice(args);
    let out = server.cli(&full);
    let stdout = text(&out.stdout);
    let view = serde_json::from_str(&stdout)
        .unwrap_or_else(|e| panic!("bad output {stdout:?}: {e}; stderr: {}", text(&out.stderr)));
    (out.status.code().unwrap_or(-1), view, text(&out.stderr))
}

fn target<'a>(view: &'a Value, agent: &str) -> &'a Value {
    view["targets"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["agent_id"] == agent)
        .unwrap_or_else(|| panic!("no target {agent} in {view:#}"))
}

fn output(t: &Value) -> &Value {
    &t["result"]["output"]
}

fn show(server: &Server, id: &str) -> Value {
    server.json(&["command", "show", id])
}

#[test]
fn commands_report_exit_codes_output_environment_and_capped_output() {
    let server = Server::start();
    publish_command(&server);
    let _agent = command_agent(&server, "cmd-1", &[]);

    // A non-zero exit is a failed target with its exit code, stdout and stderr.
    let (code, view, err) = run_command(
        &server,
        &[
            "-t",
            "cmd-1",
            "--",
            "sh",
            "-c",
            "echo out; echo err >&2; exit 3",
        ],
    );
    assert_eq!(code, 1, "exit code for a failed command: {err}");
    let t = target(&view, "cmd-1");
    assert_eq!(t["state"], "failed", "{t:#}");
    assert_eq!(t["detail"], "exit code 3");
    assert_eq!(output(t)["exit_code"], 3);
    assert_eq!(output(t)["stdout"]["text"], "out\n");
    assert_eq!(output(t)["stderr"]["text"], "err\n");
    assert_eq!(view["counts"]["failed"], 1);

    // A script with environment and working directory.
    let (code, view, err) = run_command(
        &server,
        &[
            "-t",
            "cmd-1",
            "--env",
            "GREETING=hello there",
            "--cwd",
            "/tmp",
            "--script",
            "echo \"$GREETING\"; pwd",
        ],
    );
    assert_eq!(code, 0, "{err}");
    let t = target(&view, "cmd-1");
    assert_eq!(t["state"], "success", "{t:#}");
    assert_eq!(output(t)["stdout"]["text"], "hello there\n/tmp\n");

    // 3 MB of output: 1 MiB kept by default, flagged, with the full byte count.
    let (code, view, err) = run_command(
        &server,
        &[
            "-t",
            "cmd-1",
            "--script",
            "head -c 3000000 /dev/zero | tr '\\0' a; echo done >&2",
        ],
    );
    assert_eq!(code, 0, "{err}");
    let out = output(target(&view, "cmd-1"));
    assert_eq!(out["stdout"]["total_bytes"], 3_000_000);
    assert_eq!(out["stdout"]["truncated"], true);
    assert_eq!(out["stdout"]["text"].as_str().unwrap().len(), 1 << 20);
    assert_eq!(out["stderr"]["text"], "done\n");
    assert_eq!(out["stderr"]["truncated"], false);
    // The stored result has it too, as `command show` reads it.
    let id = view["job"]["id"].as_str().unwrap();
    let stored = show(&server, id);
    assert_eq!(
        output(target(&stored, "cmd-1"))["stdout"]["total_bytes"],
        3_000_000
    );

    // A smaller cap.
    let (_, view, _) = run_command(
        &server,
        &[
            "-t",
            "cmd-1",
            "--output-cap",
            "64KiB",
            "--script",
            "head -c 100000 /dev/zero",
        ],
    );
    let out = output(target(&view, "cmd-1"));
    assert_eq!(out["stdout"]["total_bytes"], 100_000);
    assert_eq!(out["stdout"]["text"].as_str().unwrap().len(), 64 << 10);
    assert_eq!(out["stdout"]["truncated"], true);

    // A program that does not exist: the shell says so and exits 127.
    let (code, view, _) = run_command(&server, &["-t", "cmd-1", "--", "no-such-program-x"]);
    assert_eq!(code, 1);
    let t = target(&view, "cmd-1");
    assert_eq!(output(t)["exit_code"], 127);
    assert!(
        output(t)["stderr"]["text"]
            .as_str()
            .unwrap()
            .contains("no-such-program-x"),
        "{t:#}"
    );

    // A reader that goes away ends the CLI quietly, as it ends `cat`: no panic about a
    // broken pipe. The pipe is closed before the CLI writes anything.
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let out = std::process::Command::new(bin("drover"))
        .arg("--data-dir")
        .arg(&server.data)
        .args(["command", "list"])
        .stdin(std::process::Stdio::null())
        .stdout(writer)
        .stderr(std::process::Stdio::piped())
        .output()
        .unwrap();
    let err = text(&out.stderr);
    assert!(!err.contains("panicked"), "{err}");
    {
        use std::os::unix::process::ExitStatusExt as _;
        assert_eq!(out.status.signal(), Some(13), "ended by SIGPIPE: {err}");
    }

    // An absolute program runs without a shell: its arguments arrive untouched, and one
    // that cannot be started fails with the reason instead of a shell's 127.
    let (code, view, err) = run_command(
        &server,
        &["-t", "cmd-1", "--", "/bin/echo", "a  b", "$HOME", "*"],
    );
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        output(target(&view, "cmd-1"))["stdout"]["text"],
        "a  b $HOME *\n"
    );
    let (code, view, _) = run_command(&server, &["-t", "cmd-1", "--", "/no/such/program-y"]);
    assert_eq!(code, 1);
    let t = target(&view, "cmd-1");
    assert_eq!(t["state"], "failed", "{t:#}");
    let why = t["detail"].as_str().unwrap_or_default();
    assert!(
        why.contains("/no/such/program-y") && why.contains("could not be started"),
        "{t:#}"
    );
}

#[test]
fn follow_streams_output_while_the_command_runs() {
    let server = Server::start();
    publish_command(&server);
    let _agent = command_agent(&server, "follow-1", &[]);
    let out = server.cli(&[
        "run-command",
        "-t",
        "follow-1",
        "--follow",
        "--script",
        "echo first; sleep 1; echo second",
    ]);
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{stdout} {}", text(&out.stderr));
    assert!(
        stdout.contains("follow-1 | first") && stdout.contains("follow-1 | second"),
        "live lines missing: {stdout:?}"
    );
    // Output seen live is not printed again at the end.
    assert_eq!(stdout.matches("first").count(), 1, "{stdout:?}");
    let err = text(&out.stderr);
    assert!(err.contains("follow-1: in_progress"), "{err}");
    assert!(err.contains("1 success"), "{err}");
}

#[test]
fn a_timeout_kills_the_whole_process_tree() {
    let server = Server::start();
    publish_command(&server);
    let _agent = command_agent(&server, "tree-1", &[]);
    // The shell starts a background child and a foreground one; both must die.
    let (code, view, err) = run_command(
        &server,
        &[
            "-t",
            "tree-1",
            "--timeout",
            "2s",
            "--script",
            "echo before the stop; echo on stderr >&2; sleep 313 & sleep 314; wait",
        ],
    );
    assert_eq!(code, 1, "{err}");
    let t = target(&view, "tree-1");
    assert_eq!(t["state"], "timed_out", "{t:#}");
    // What it wrote before it was stopped is kept, marked partial, without an exit code.
    let out = output(t);
    assert_eq!(out["partial"], true, "{t:#}");
    assert_eq!(out["stdout"]["text"], "before the stop\n", "{t:#}");
    assert_eq!(out["stderr"]["text"], "on stderr\n", "{t:#}");
    assert!(out.get("exit_code").is_none(), "{t:#}");
    wait_for(Duration::from_secs(5), "sleeps gone", || {
        (!running(&["sleep", "313"]) && !running(&["sleep", "314"])).then_some(())
    });
}

#[test]
fn cancel_stops_running_commands_and_their_processes() {
    let server = Server::start();
    publish_command(&server);
    let _agent = command_agent(&server, "cancel-1", &[]);
    let out = server.cli(&[
        "run-command",
        "-t",
        "cancel-1",
        "--no-wait",
        "--script",
        "echo started-271; sleep 271 & sleep 272; wait",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let id = text(&out.stdout).trim().to_string();
    wait_for(Duration::from_secs(20), "command in progress", || {
        (target(&show(&server, &id), "cancel-1")["state"] == "in_progress"
            && running(&["sleep", "272"]))
        .then_some(())
    });
    let out = server.cli(&["command", "cancel", &id]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("1 running target(s) asked to stop"),
        "{}",
        text(&out.stdout)
    );
    let view = wait_for(Duration::from_secs(20), "cancelled", || {
        let v = show(&server, &id);
        (target(&v, "cancel-1")["state"] == "cancelled").then_some(v)
    });
    let t = target(&view, "cancel-1");
    assert_eq!(t["result"]["failure"]["kind"], "cancelled", "{t:#}");
    assert_eq!(output(t)["partial"], true, "{t:#}");
    assert_eq!(output(t)["stdout"]["text"], "started-271\n", "{t:#}");
    // For people, `command show` prints it with the reason it is partial.
    let shown = text(
        &server
            .cli(&["command", "show", &id, "--agent", "cancel-1"])
            .stdout,
    );
    assert!(
        shown.contains("stopped before it ended") && shown.contains("started-271"),
        "{shown}"
    );
    wait_for(Duration::from_secs(5), "sleeps gone", || {
        (!running(&["sleep", "271"]) && !running(&["sleep", "272"])).then_some(())
    });
    // The agent carries on.
    let (code, _, err) = run_command(&server, &["-t", "cancel-1", "--", "true"]);
    assert_eq!(code, 0, "{err}");
}

#[test]
fn an_offline_agent_gets_the_command_when_it_returns() {
    let server = Server::start();
    publish_command(&server);
    let mut agent = command_agent(&server, "away-1", &[]);
    agent.stop();
    wait_for(Duration::from_secs(15), "agent offline", || {
        server.agent_row("away-1").filter(|a| a["online"] == false)
    });
    let out = server.cli(&[
        "run-command",
        "-t",
        "away-1",
        "--no-wait",
        "--delivery-timeout",
        "5m",
        "--",
        "echo",
        "back",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let id = text(&out.stdout).trim().to_string();
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(target(&show(&server, &id), "away-1")["state"], "pending");
    agent.restart();
    let view = wait_for(Duration::from_secs(30), "command done", || {
        let v = show(&server, &id);
        (target(&v, "away-1")["state"] == "success").then_some(v)
    });
    assert_eq!(output(target(&view, "away-1"))["stdout"]["text"], "back\n");
}

#[test]
fn a_target_offline_past_the_delivery_timeout_is_undeliverable() {
    let server = Server::start();
    publish_command(&server);
    let mut agent = command_agent(&server, "gone-1", &[]);
    agent.stop();
    wait_for(Duration::from_secs(15), "agent offline", || {
        server.agent_row("gone-1").filter(|a| a["online"] == false)
    });
    let (code, view, err) = run_command(
        &server,
        &["-t", "gone-1", "--delivery-timeout", "2s", "--", "true"],
    );
    assert_eq!(code, 1, "{err}");
    let t = target(&view, "gone-1");
    assert_eq!(t["state"], "undeliverable", "{t:#}");
    assert!(t["result"].is_null());
}

/// Max concurrency and max errors, on several agents, checked against the server's own
/// records of when each target was sent and finished.
#[test]
fn rate_control_holds_in_the_servers_records() {
    let server = Server::start();
    publish_command(&server);
    let ids: Vec<String> = (0..6).map(|i| format!("rate-{i}")).collect();
    let _agents: Vec<Agent> = ids
        .iter()
        .map(|id| command_agent(&server, id, &["--tag", "group=rate"]))
        .collect();

    let (code, view, err) = run_command(
        &server,
        &[
            "-t",
            "tag:group=rate",
            "--max-concurrency",
            "2",
            "--script",
            "sleep 0.4",
        ],
    );
    assert_eq!(code, 0, "{err}");
    assert_eq!(view["counts"]["success"], 6);
    for t in view["targets"].as_array().unwrap() {
        let sent = t["dispatched_ms"].as_u64().expect("dispatched_ms");
        let done = t["finished_ms"].as_u64().expect("finished_ms");
        assert!(done >= sent);
    }
    let peak = peak_in_flight(&view);
    assert_eq!(peak, 2, "in flight at most 2, and 2 were used");

    // For people: each target is printed once, with its output, as it finishes.
    let out = server.cli(&[
        "run-command",
        "-t",
        "tag:group=rate",
        "--max-concurrency",
        "2",
        "--script",
        "sleep 0.2; echo from-the-script",
    ]);
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert_eq!(out.status.code(), Some(0), "{stdout}{stderr}");
    for id in &ids {
        let lines = stdout
            .lines()
            .filter(|l| l.starts_with(id.as_str()))
            .count();
        assert_eq!(lines, 1, "{id} printed {lines} times:\n{stdout}");
    }
    assert_eq!(stdout.matches("from-the-script").count(), 6, "{stdout}");
    assert!(stderr.contains("6 success"), "{stderr}");

    // Every target fails; one error is tolerated, so two run and four never start.
    let (code, view, err) = run_command(
        &server,
        &[
            "-t",
            "tag:group=rate",
            "--max-concurrency",
            "1",
            "--max-errors",
            "1",
            "--",
            "false",
        ],
    );
    assert_eq!(code, 1, "{err}");
    assert_eq!(view["counts"]["failed"], 2, "{view:#}");
    assert_eq!(view["counts"]["cancelled"], 4, "{view:#}");
    for t in view["targets"].as_array().unwrap() {
        if t["state"] == "cancelled" {
            assert!(
                t["dispatched_ms"].is_null(),
                "a cancelled target was sent: {t:#}"
            );
            assert!(
                t["detail"].as_str().unwrap().contains("max-errors"),
                "{t:#}"
            );
        }
    }

    // The exponential ramp: the first target finishes before any other is sent.
    let (code, view, err) = run_command(
        &server,
        &[
            "-t",
            "tag:group=rate",
            "--ramp",
            "exponential",
            "--script",
            "sleep 0.2",
        ],
    );
    assert_eq!(code, 0, "{err}");
    let mut targets: Vec<&Value> = view["targets"].as_array().unwrap().iter().collect();
    targets.sort_by_key(|t| t["dispatched_ms"].as_u64());
    let first_done = targets[0]["finished_ms"].as_u64().unwrap();
    assert!(
        targets[1..]
            .iter()
            .all(|t| t["dispatched_ms"].as_u64().unwrap() >= first_done),
        "{view:#}"
    );
}

fn effective_uid() -> u32 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("Uid:")).unwrap();
    line.split_whitespace().nth(2).unwrap().parse().unwrap()
}

#[test]
fn run_as_needs_the_policy_and_drops_to_that_user() {
    let server = Server::start();
    publish_command(&server);
    let _agent = command_agent(&server, "runas-1", &["--allow-run-as", "nobody"]);

    // Not in the policy: refused, nothing runs.
    let (code, view, _) = run_command(
        &server,
        &["-t", "runas-1", "--run-as", "daemon", "--", "id"],
    );
    assert_eq!(code, 1);
    let t = target(&view, "runas-1");
    assert_eq!(t["state"], "failed", "{t:#}");
    let why = t["result"]["failure"]["message"].as_str().unwrap_or("");
    assert!(why.contains("daemon") && why.contains("policy"), "{t:#}");

    let (code, view, err) = run_command(
        &server,
        &[
            "-t",
            "runas-1",
            "--run-as",
            "nobody",
            "--script",
            "id -u; id -G; echo $HOME",
        ],
    );
    let t = target(&view, "runas-1");
    if effective_uid() == 0 {
        assert_eq!(code, 0, "{err} {t:#}");
        let nobody = std::fs::read_to_string("/etc/passwd")
            .unwrap()
            .lines()
            .find(|l| l.starts_with("nobody:"))
            .map(|l| l.split(':').collect::<Vec<_>>())
            .unwrap()
            .iter()
            .map(|s| s.to_string())
            .collect::<Vec<_>>();
        let lines: Vec<String> = output(t)["stdout"]["text"]
            .as_str()
            .unwrap()
            .lines()
            .map(str::to_string)
            .collect();
        assert_eq!(lines[0], nobody[2], "uid");
        // Only nobody's own group: root's supplementary groups are gone.
        assert_eq!(lines[1], nobody[3], "groups");
        assert_eq!(lines[2], nobody[5], "HOME");
    } else {
        // An agent that is not root cannot switch users, and says so.
        assert_eq!(code, 1);
        let why = t["result"]["failure"]["message"].as_str().unwrap_or("");
        assert!(why.contains("root"), "{t:#}");
    }
}

/// The most targets in flight at once, from the server's records of when each was sent
/// and finished. Ends sort before starts at the same millisecond: a slot freed and
/// reused at once.
fn peak_in_flight(view: &Value) -> i32 {
    let mut edges: Vec<(u64, i32)> = Vec::new();
    for t in view["targets"].as_array().unwrap() {
        if let (Some(sent), Some(done)) = (t["dispatched_ms"].as_u64(), t["finished_ms"].as_u64()) {
            edges.push((sent, 1));
            edges.push((done, -1));
        }
    }
    edges.sort();
    let (mut now, mut peak) = (0, 0);
    for (_, d) in edges {
        now += d;
        peak = peak.max(now);
    }
    peak
}

#[test]
fn a_restarted_server_carries_on_with_a_rate_controlled_command() {
    let mut server = Server::start_restartable();
    publish_command(&server);
    let ids: Vec<String> = (0..3).map(|i| format!("resume-{i}")).collect();
    let _agents: Vec<Agent> = ids
        .iter()
        .map(|id| command_agent(&server, id, &["--tag", "group=resume"]))
        .collect();
    let out = server.cli(&[
        "run-command",
        "-t",
        "tag:group=resume",
        "--no-wait",
        "--max-concurrency",
        "1",
        "--script",
        "sleep 1; echo ok",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let id = text(&out.stdout).trim().to_string();
    wait_for(Duration::from_secs(20), "first target in progress", || {
        (show(&server, &id)["counts"]["in_progress"] == 1).then_some(())
    });
    server.stop();
    server.restart();
    let view = wait_for(Duration::from_secs(60), "all targets done", || {
        let v = show(&server, &id);
        (v["counts"]["success"] == 3).then_some(v)
    });
    for t in view["targets"].as_array().unwrap() {
        assert_eq!(output(t)["stdout"]["text"], "ok\n", "{t:#}");
    }
    assert_eq!(peak_in_flight(&view), 1, "{view:#}");
}

/// Work queued for an agent that is away arrives when it is back, in the order it was
/// made, each result once.
#[test]
fn commands_queued_for_an_absent_agent_run_in_order_when_it_returns() {
    let server = Server::start();
    publish_command(&server);
    let cfg = server.add_agent("later-1", &["--allow-exec", "*"]);
    prepend_config(&cfg, "max_concurrent_jobs = 1");
    let mut agent = Agent::start("later-1", &cfg, server.dir.path());
    server.wait_online("later-1");
    agent.stop();
    wait_for(Duration::from_secs(15), "agent offline", || {
        server.agent_row("later-1").filter(|a| a["online"] == false)
    });
    let ids: Vec<String> = (0..5)
        .map(|i| {
            let out = server.cli(&[
                "run-command",
                "-t",
                "later-1",
                "--no-wait",
                "--script",
                &format!("echo {i}; date +%s%N"),
            ]);
            assert!(out.status.success(), "{}", text(&out.stderr));
            text(&out.stdout).trim().to_string()
        })
        .collect();
    // Away for a while: longer than the agent's first reconnect backoffs.
    std::thread::sleep(Duration::from_secs(4));
    for id in &ids {
        assert_eq!(target(&show(&server, id), "later-1")["state"], "pending");
    }
    agent.restart();
    let mut ran_at = Vec::new();
    for (i, id) in ids.iter().enumerate() {
        let v = wait_for(Duration::from_secs(60), "command done", || {
            let v = show(&server, id);
            (target(&v, "later-1")["state"] == "success").then_some(v)
        });
        let t = target(&v, "later-1");
        let stdout = output(t)["stdout"]["text"].as_str().unwrap().to_string();
        let mut lines = stdout.lines();
        assert_eq!(lines.next(), Some(i.to_string().as_str()), "{stdout:?}");
        let ns: u128 = lines.next().unwrap().parse().unwrap();
        ran_at.push((ns, t["finished_ms"].as_u64().unwrap()));
    }
    assert!(
        ran_at
            .windows(2)
            .all(|w| w[0].0 < w[1].0 && w[0].1 <= w[1].1),
        "not in order: {ran_at:?}"
    );
}

#[test]
fn deregistering_an_agent_settles_its_targets() {
    let server = Server::start();
    publish_command(&server);
    let mut agent = command_agent(&server, "leaving-1", &[]);
    agent.stop();
    wait_for(Duration::from_secs(15), "agent offline", || {
        server
            .agent_row("leaving-1")
            .filter(|a| a["online"] == false)
    });
    let out = server.cli(&["run-command", "-t", "leaving-1", "--no-wait", "--", "true"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let id = text(&out.stdout).trim().to_string();
    assert_eq!(target(&show(&server, &id), "leaving-1")["state"], "pending");
    let out = server.cli(&["agents", "deregister", "leaving-1"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let t = target(&show(&server, &id), "leaving-1").clone();
    assert_eq!(t["state"], "undeliverable", "{t:#}");
    assert_eq!(t["detail"], "the agent was deregistered");
}

/// Run Command keeps what each target's command did, from the engine's durable events:
/// `command list` and `command show` count exit codes and stopped commands without
/// reading any output, and the record survives a server restart.
#[test]
fn command_list_counts_exit_codes_from_the_engines_events() {
    let mut server = Server::start_restartable();
    publish_command(&server);
    let _a = command_agent(&server, "tally-1", &[]);
    let _b = command_agent(&server, "tally-2", &[]);
    let (code, view, _) = run_command(
        &server,
        &["-t", "tally-1,tally-2", "--", "/bin/sh", "-c", "exit 3"],
    );
    assert_eq!(code, 1);
    let exited = view["job"]["id"].as_str().unwrap().to_string();
    let (code, view, _) = run_command(
        &server,
        &[
            "-t",
            "tally-1",
            "--timeout",
            "1s",
            "--script",
            "echo started; sleep 30",
        ],
    );
    assert_eq!(code, 1);
    let stopped = view["job"]["id"].as_str().unwrap().to_string();
    // A job of another world is not a command.
    publish_misbehave(&server);
    let other = server.json(&[
        "run",
        "misbehave",
        "-t",
        "tally-1",
        "--no-wait",
        "--input",
        r#"{"mode":"echo"}"#,
    ]);
    let other = other["job_id"].as_str().unwrap().to_string();

    let summary = |server: &Server, id: &str| {
        wait_for(Duration::from_secs(20), "the ledger to catch up", || {
            let list = server.json(&["command", "list"]);
            let c = list
                .as_array()
                .unwrap()
                .iter()
                .find(|c| c["id"] == id)?
                .clone();
            let recorded: u64 = c["exit_codes"]
                .as_object()?
                .values()
                .map(|n| n.as_u64().unwrap())
                .sum::<u64>()
                + c["partial"].as_u64()?;
            (recorded > 0).then_some(c)
        })
    };
    let c = summary(&server, &exited);
    assert_eq!(c["exit_codes"], serde_json::json!({"3": 2}), "{c:#}");
    assert_eq!(c["partial"], 0);
    assert_eq!(c["what"], "/bin/sh -c exit 3");
    assert_eq!(c["counts"]["failed"], 2);
    let c = summary(&server, &stopped);
    assert_eq!(c["partial"], 1, "{c:#}");
    assert_eq!(c["counts"]["timed_out"], 1);
    let list = server.json(&["command", "list"]);
    assert!(
        list.as_array()
            .unwrap()
            .iter()
            .all(|c| c["id"] != other.as_str()),
        "{list:#}"
    );

    // People see the tally too.
    let out = server.cli(&["command", "show", &exited]);
    assert!(
        text(&out.stdout).contains("exit codes: 3 x2"),
        "{}",
        text(&out.stdout)
    );

    // The record is the store's: it is there after a restart.
    server.restart();
    let c = server.json(&["command", "list"]);
    let c = c
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["id"] == exited.as_str())
        .unwrap();
    assert_eq!(c["exit_codes"], serde_json::json!({"3": 2}));
}
