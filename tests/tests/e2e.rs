//! End to end: the real `drover` and `drover-agent` binaries, a real broker (the embedded
//! one, and Mosquitto), and real plugins built from `plugins/`.

mod attacks;
mod broker_acl;
mod capabilities;
mod commands;
mod compat;
mod faults;
mod openapi;
mod support;

use std::time::{Duration, Instant};

use serde_json::Value;
use support::*;

const INVENTORY_CAPS: &[&str] = &["--host-facts", "--read-path", "/var/lib/dpkg"];

fn setup_inventory(server: &Server, id: &str) -> Agent {
    server.publish(
        &plugin("drover-plugin-inventory"),
        "inventory",
        1,
        "inventory-collector",
        INVENTORY_CAPS,
        None,
    );
    let cfg = server.add_agent(id, &["--tag", "env=test"]);
    let agent = Agent::start(id, &cfg, server.dir.path());
    server.wait_online(id);
    agent
}

fn check_inventory_result(r: &Value, id: &str) {
    assert_eq!(r["agent_id"], id);
    assert_eq!(r["status"], "succeeded", "result: {r:#}");
    let out = &r["output"];
    let packages = out["packages"].as_array().expect("packages");
    assert_eq!(
        packages.len(),
        dpkg_package_count(),
        "package count differs from dpkg-query"
    );
    assert!(
        packages.iter().any(|p| p["name"] == "dpkg"),
        "dpkg itself is not listed"
    );
    let hostname = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap();
    assert_eq!(out["os"]["hostname"], hostname.trim());
    assert_eq!(out["os"]["family"], "linux");
    assert!(!out["os"]["name"].as_str().unwrap_or("").is_empty());
}

#[test]
fn inventory_runs_end_to_end_on_the_embedded_broker() {
    let server = Server::start();
    let _agent = setup_inventory(&server, "node-1");

    let row = server.agent_row("node-1").unwrap();
    assert_eq!(row["tags"]["env"], "test");
    assert_eq!(row["os"], "linux");

    // First run: fetched in chunks, verified, compiled.
    let (code, results, err) = server.run(&["inventory", "--targets", "node-1"]);
    assert_eq!(code, 0, "run failed: {err}");
    assert_eq!(results.len(), 1);
    check_inventory_result(&results[0], "node-1");
    assert!(!results[0]["timings"]["compile_cached"].as_bool().unwrap());

    // The stored result is the same one.
    let job_id = results[0]["job_id"].as_str().unwrap();
    let view = server.json(&["job", "show", job_id]);
    let stored = &view["targets"][0]["result"];
    check_inventory_result(stored, "node-1");

    // Second run, by tag: the compiled plugin comes from the cache, nothing is fetched.
    let (code, results, err) = server.run(&["inventory", "--targets", "tag:env=test"]);
    assert_eq!(code, 0, "run failed: {err}");
    check_inventory_result(&results[0], "node-1");
    assert!(results[0]["timings"]["compile_cached"].as_bool().unwrap());
    assert_eq!(results[0]["timings"]["fetch_ms"], 0);
}

#[test]
fn inventory_runs_end_to_end_on_mosquitto() {
    let mosq = Mosquitto::start(&[("drover-control", "control-secret")]);
    let server = server_on(&mosq, "control-secret");
    assert_eq!(server.broker_url(), mosq.url());

    server.publish(
        &plugin("drover-plugin-inventory"),
        "inventory",
        1,
        "inventory-collector",
        INVENTORY_CAPS,
        None,
    );
    // The agent's credential is Mosquitto's to check: register the minted one there.
    let cfg = server.add_agent("mosq-1", &[]);
    mosq.add_user("mosq-1", &toml_value(&cfg, "password"));
    let _agent = Agent::start("mosq-1", &cfg, server.dir.path());
    server.wait_online("mosq-1");

    let (code, results, err) = server.run(&["inventory", "--targets", "mosq-1"]);
    assert_eq!(code, 0, "run failed: {err}");
    check_inventory_result(&results[0], "mosq-1");
}

#[test]
fn sandbox_limits_hold_and_the_agent_carries_on() {
    let server = Server::start();
    publish_misbehave(&server);
    let cfg = server.add_agent("box-1", &[]);
    let mut agent = Agent::start("box-1", &cfg, server.dir.path());
    server.wait_online("box-1");

    let misbehave = |input: &str, flags: &[&str]| {
        let mut args = vec!["misbehave", "-t", "box-1", "--input", input];
        args.extend_from_slice(flags);
        run_one(&server, &args)
    };
    // After every hostile run, the same agent still runs the next job.
    let echo = || {
        let r = misbehave(r#"{"mode":"echo","n":1}"#, &[]);
        assert_eq!(r["status"], "succeeded", "{r:#}");
        assert_eq!(r["output"]["echo"]["n"], 1);
    };
    echo();

    // A loop forever, and a guest blocked in a WASI sleep, are stopped at the deadline.
    for input in [r#"{"mode":"spin"}"#, r#"{"mode":"sleep","seconds":3600}"#] {
        let t = Instant::now();
        let r = misbehave(input, &["--timeout", "2s"]);
        assert_eq!(r["status"], "failed");
        assert_eq!(failure_kind(&r), "timeout", "{input}: {r:#}");
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "{input} took {:?}",
            t.elapsed()
        );
        echo();
    }

    // Growing memory past the limit fails, and says so.
    let r = misbehave(r#"{"mode":"grow","mib":256}"#, &["--memory-mib", "32"]);
    assert_eq!(r["status"], "failed");
    assert_eq!(failure_kind(&r), "memory_limit", "{r:#}");
    assert!(
        r["failure"]["message"]
            .as_str()
            .unwrap()
            .contains("33554432 byte limit")
    );
    echo();

    // A file it was not granted cannot be opened.
    let r = misbehave(r#"{"mode":"open","path":"/etc/hostname"}"#, &[]);
    assert_eq!(r["status"], "failed");
    assert_eq!(failure_kind(&r), "plugin_error", "{r:#}");
    assert!(
        r["failure"]["message"]
            .as_str()
            .unwrap()
            .contains("could not open /etc/hostname")
    );
    echo();

    // Megabytes of stdout are capped and flagged, not fatal.
    let r = misbehave(
        r#"{"mode":"spew","bytes":8388608}"#,
        &["--output-kib", "64"],
    );
    assert_eq!(r["status"], "succeeded", "{r:#}");
    assert_eq!(r["output"]["written"], 8388608);
    assert_eq!(r["stdout"]["truncated"], true);
    assert_eq!(r["stdout"]["total_bytes"], 8388608);
    assert_eq!(r["stdout"]["text"].as_str().unwrap().len(), 64 * 1024);
    echo();

    // A trap is a clear failure.
    let r = misbehave(r#"{"mode":"trap"}"#, &[]);
    assert_eq!(failure_kind(&r), "trap", "{r:#}");
    echo();

    assert!(agent.is_running(), "the agent died: {}", agent.log_text());
    assert!(
        agent.log_text().contains("deadline"),
        "timeouts are not in the agent log"
    );
}

fn sqlite(server: &Server) -> rusqlite::Connection {
    let c = rusqlite::Connection::open(server.data.join("drover.db")).unwrap();
    c.busy_timeout(Duration::from_secs(5)).unwrap();
    c
}

#[test]
fn rejections_are_clear_and_nothing_runs() {
    let server = Server::start();
    let misbehave = plugin("drover-plugin-misbehave");
    let cfg = server.add_agent("guard-1", &[]);
    let agent = Agent::start("guard-1", &cfg, server.dir.path());
    server.wait_online("guard-1");
    let echo = |name: &str| {
        run_one(
            &server,
            &[name, "-t", "guard-1", "--input", r#"{"mode":"echo"}"#],
        )
    };

    // Signed by a key the agent does not trust.
    let other = TempDir::new("other-publisher");
    let other_key = keygen(other.path());
    server.publish(&misbehave, "stranger", 1, "task", &[], Some(&other_key));
    assert_refused(&echo("stranger"), "untrusted_plugin", "untrusted key");

    // Unsigned: the store (which is not trusted either) serves a manifest with no signature.
    server.publish(&misbehave, "unsigned", 1, "task", &[], None);
    sqlite(&server)
        .execute(
            "UPDATE plugins SET manifest = json_set(manifest, '$.signatures', json('[]')) WHERE name = 'unsigned'",
            [],
        )
        .unwrap();
    assert_refused(&echo("unsigned"), "untrusted_plugin", "not signed");

    // A tampered blob: one byte changed after signing.
    server.publish(&misbehave, "tampered", 1, "task", &[], None);
    {
        let db = sqlite(&server);
        let sha: String = db
            .query_row(
                "SELECT sha256 FROM plugins WHERE name = 'tampered'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        let mut blob: Vec<u8> = db
            .query_row("SELECT bytes FROM blobs WHERE sha256 = ?1", [&sha], |r| {
                r.get(0)
            })
            .unwrap();
        let mid = blob.len() / 2;
        blob[mid] ^= 0x55;
        db.execute(
            "UPDATE blobs SET bytes = ?1 WHERE sha256 = ?2",
            rusqlite::params![blob, sha],
        )
        .unwrap();
    }
    assert_refused(&echo("tampered"), "blob_mismatch", "does not match");

    // A plugin asking for more than the agent's policy allows.
    server.publish(
        &misbehave,
        "greedy",
        1,
        "task",
        &["--read-path", "/etc"],
        None,
    );
    assert_refused(&echo("greedy"), "policy_denied", "read:/etc");

    let log = agent.log_text();
    for needle in ["untrusted key", "not signed", "does not match", "read:/etc"] {
        assert!(log.contains(needle), "agent log lacks {needle:?}:\n{log}");
    }
    // Nothing ran: the agent never logged a success.
    assert!(!log.contains("job succeeded"), "something ran:\n{log}");
}

fn assert_refused(r: &Value, kind: &str, needle: &str) {
    assert_eq!(r["status"], "rejected", "{r:#}");
    assert_eq!(failure_kind(r), kind, "{r:#}");
    let msg = r["failure"]["message"].as_str().unwrap_or("");
    assert!(msg.contains(needle), "message {msg:?} lacks {needle:?}");
}

#[test]
fn a_forged_envelope_is_refused_and_reported() {
    // The test owns the broker: it plays an attacker with full broker access.
    let mosq = Mosquitto::start(&[
        ("drover-control", "control-secret"),
        ("attacker", "attacker-secret"),
    ]);
    let server = server_on(&mosq, "control-secret");
    publish_misbehave(&server);
    let cfg = server.add_agent("target-1", &[]);
    mosq.add_user("target-1", &toml_value(&cfg, "password"));
    // The test's own job is never submitted, so the server would serve its plugin to no
    // one (a blob goes only to an agent with a job of it in flight): the agent has it.
    let sha = server.json(&["plugin", "list"])[0]["sha256"]
        .as_str()
        .unwrap()
        .to_string();
    let blobs = server.dir.path().join("agent-target-1/blobs");
    std::fs::create_dir_all(&blobs).unwrap();
    std::fs::copy(
        plugin("drover-plugin-misbehave"),
        blobs.join(format!("{sha}.wasm")),
    )
    .unwrap();
    let agent = Agent::start("target-1", &cfg, server.dir.path());
    server.wait_online("target-1");

    // A real envelope, signed by the control plane, for a job of the test's own making.
    let key = drover_protocol::keys::SigningKey::load(&server.data.join("keys/control-plane.key"))
        .unwrap();
    let manifest: Value = server.json(&["plugin", "list"])[0]["manifest"].clone();
    let manifest = serde_json::from_value(manifest).unwrap();
    let env = drover_protocol::job::JobEnvelope {
        job_id: "forged-job-1".into(),
        agent_id: "target-1".into(),
        attempt: 1,
        plugin: manifest,
        input: serde_json::json!({"mode": "echo", "who": "operator"}),
        parameters: Default::default(),
        limits: Default::default(),
        not_before_ms: drover_protocol::now_ms(),
        expires_at_ms: drover_protocol::now_ms() + 600_000,
        resent: false,
    };
    let signed = drover_protocol::signed::Signed::sign(&env, &key);
    // The attacker changes the parameters and keeps the signature.
    let mut forged = signed.clone();
    forged.payload = forged.payload.replace("operator", "attacker");
    assert_ne!(forged.payload, signed.payload);
    mosq.publish(
        "attacker",
        "attacker-secret",
        "drover/v1/agents/target-1/down/job",
        &serde_json::to_vec(&forged).unwrap(),
    );

    // The agent refuses, logs it, and reports it; the operator sees it.
    let events = wait_for(Duration::from_secs(60), "refusal event", || {
        let ev = server.json(&["agents", "events", "--agent", "target-1"]);
        ev.as_array()
            .unwrap()
            .iter()
            .any(|e| {
                e["message"]
                    .as_str()
                    .unwrap_or("")
                    .contains("bad signature")
            })
            .then_some(ev)
    });
    assert!(events.to_string().contains("forged-job-1"));
    let log = agent.log_text();
    assert!(log.contains("bad signature"), "agent log: {log}");
    assert!(!log.contains("job succeeded"), "the forged job ran: {log}");

    // The genuine envelope is accepted: the refusal was about the forgery, not the job.
    mosq.publish(
        "attacker",
        "attacker-secret",
        "drover/v1/agents/target-1/down/job",
        &serde_json::to_vec(&signed).unwrap(),
    );
    wait_for(Duration::from_secs(60), "genuine job to run", || {
        agent.log_text().contains("job succeeded").then_some(())
    });
}

#[test]
fn a_killed_agent_shows_offline_within_ten_seconds() {
    let server = Server::start();
    let cfg = server.add_agent("mortal-1", &[]);
    let mut agent = Agent::start("mortal-1", &cfg, server.dir.path());
    server.wait_online("mortal-1");
    let killed = Instant::now();
    agent.kill9();
    wait_for(Duration::from_secs(10), "agent offline", || {
        server
            .agent_row("mortal-1")
            .filter(|a| a["online"] == false)
    });
    let took = killed.elapsed();
    assert!(took < Duration::from_secs(10), "offline after {took:?}");

    // And back online when it returns.
    agent.restart();
    server.wait_online("mortal-1");
}

#[test]
fn plugins_reach_agents_through_a_broker_with_a_small_message_limit() {
    // Mosquitto refuses any packet over 16 KiB; the plugin is about 128 KiB.
    let mosq = Mosquitto::start_limited(&[("drover-control", "control-secret")], 16 * 1024);
    let server = server_on(&mosq, "control-secret");
    let wasm = plugin("drover-plugin-misbehave");
    assert!(std::fs::metadata(&wasm).unwrap().len() > 64 * 1024);
    publish_misbehave(&server);
    let cfg = server.add_agent("small-1", &[]);
    prepend_config(&cfg, "chunk_size = 4096");
    mosq.add_user("small-1", &toml_value(&cfg, "password"));
    let agent = Agent::start("small-1", &cfg, server.dir.path());
    server.wait_online("small-1");

    let r = run_one(
        &server,
        &[
            "misbehave",
            "-t",
            "small-1",
            "--input",
            r#"{"mode":"echo"}"#,
        ],
    );
    assert_eq!(r["status"], "succeeded", "{r:#}\n{}", agent.log_text());
    assert!(!r["timings"]["compile_cached"].as_bool().unwrap());
}

#[test]
fn a_full_job_queue_refuses_jobs_instead_of_losing_them() {
    let server = Server::start();
    publish_misbehave(&server);
    let cfg = server.add_agent("busy-1", &[]);
    prepend_config(&cfg, "max_concurrent_jobs = 1\njob_queue = 1");
    let _agent = Agent::start("busy-1", &cfg, server.dir.path());
    server.wait_online("busy-1");

    // One running, one waiting for the slot, one in the queue; the rest find it full.
    // Submitted all at once, so none can finish before the last arrives.
    let jobs: Vec<String> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..6)
            .map(|_| {
                scope.spawn(|| {
                    let v = server.json(&[
                        "run",
                        "misbehave",
                        "-t",
                        "busy-1",
                        "--timeout",
                        "3s",
                        "--no-wait",
                        "--input",
                        r#"{"mode":"spin"}"#,
                    ]);
                    v["job_id"].as_str().unwrap().to_string()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let results: Vec<Value> = jobs
        .iter()
        .map(|id| {
            wait_for(Duration::from_secs(90), "every job to report", || {
                let v = server.json(&["job", "show", id]);
                let r = v["targets"][0]["result"].clone();
                (!r.is_null()).then_some(r)
            })
        })
        .collect();
    let busy = results
        .iter()
        .filter(|r| {
            r["status"] == "rejected"
                && r["failure"]["message"]
                    .as_str()
                    .unwrap_or("")
                    .contains("agent is busy")
                && r["failure"]["retryable"] == true
        })
        .count();
    let timed_out = results
        .iter()
        .filter(|r| failure_kind(r) == "timeout")
        .count();
    assert!(busy >= 1, "no job was refused as busy: {results:#?}");
    assert!(timed_out >= 1, "no job ran: {results:#?}");
    assert_eq!(busy + timed_out, jobs.len(), "{results:#?}");
}
