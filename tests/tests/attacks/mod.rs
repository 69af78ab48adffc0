//! The adversarial suite: a hostile participant with full control of the broker (the
//! test owns Mosquitto and has a superuser on it) tries each attack the trust model
//! rules out. Every attempt must be refused with a clear error, the agent must keep
//! running, and nothing unintended may run.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::Value;

use super::support::*;

// The attacks on the agent's sandbox, and on the server, each in a file of their own.
mod sandbox;
mod server;

const ATTACKER: (&str, &str) = ("attacker", "attacker-secret");

/// A `mosquitto_sub` running as the attacker, writing what it receives to a file.
struct Tap {
    child: Child,
    out: PathBuf,
}

impl Tap {
    fn start(mosq: &Mosquitto, topic: &str) -> Tap {
        let out = mosq.dir.path().join(format!("tap-{}.txt", free_port()));
        let file = std::fs::File::create(&out).unwrap();
        // Line-buffered, so what arrives can be read while it runs.
        let child = Command::new("stdbuf")
            .arg("-oL")
            .arg(mosquitto_bin("mosquitto_sub"))
            .args(["-h", "127.0.0.1", "-p", &mosq.port.to_string(), "-q", "1"])
            .args([
                "-u",
                ATTACKER.0,
                "-P",
                ATTACKER.1,
                "-i",
                &format!("tap-{}", free_port()),
            ])
            .args(["-t", topic, "-F", "%t\t%p"])
            .stdin(Stdio::null())
            .stdout(file)
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        // Give the subscription a moment to be in place.
        std::thread::sleep(Duration::from_millis(300));
        Tap { child, out }
    }

    /// (topic, payload) lines so far.
    fn messages(&self) -> Vec<(String, String)> {
        // Chunk frames are binary: read lossily.
        String::from_utf8_lossy(&std::fs::read(&self.out).unwrap_or_default())
            .lines()
            .filter_map(|l| l.split_once('\t'))
            .map(|(t, p)| (t.to_string(), p.to_string()))
            .collect()
    }

    /// Waits for the first message on `topic`.
    fn first_on(&self, topic: &str) -> String {
        wait_for(
            Duration::from_secs(60),
            &format!("a message on {topic}"),
            || {
                self.messages()
                    .into_iter()
                    .find(|(t, _)| t == topic)
                    .map(|(_, p)| p)
            },
        )
    }
}

impl Drop for Tap {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A server on a Mosquitto the attacker owns, with enrolled agents running misbehave.
struct Field {
    mosq: Mosquitto,
    server: Server,
    agents: Vec<Agent>,
}

impl Field {
    fn new(ids: &[&str]) -> Field {
        let mosq = Mosquitto::start(&[("drover-control", "control-secret"), ATTACKER]);
        let server = server_on(&mosq, "control-secret");
        publish_misbehave(&server);
        let mut agents = Vec::new();
        for id in ids {
            let cfg = server.add_agent(id, &[]);
            mosq.add_user(id, &toml_value(&cfg, "password"));
            agents.push(Agent::start(id, &cfg, server.dir.path()));
            server.wait_online(id);
        }
        Field {
            mosq,
            server,
            agents,
        }
    }

    fn inject(&self, topic: &str, payload: &[u8]) {
        self.mosq.publish(ATTACKER.0, ATTACKER.1, topic, payload);
    }

    fn successes(&self, i: usize) -> usize {
        self.agents[i].log_text().matches("job succeeded").count()
    }

    fn events(&self, agent: &str) -> Vec<Value> {
        self.server
            .json(&["agents", "events", "--agent", agent])
            .as_array()
            .unwrap()
            .clone()
    }
}

fn job_topic(id: &str) -> String {
    format!("drover/v1/agents/{id}/down/job")
}

fn echo(server: &Server, target: &str) -> Value {
    run_one(
        server,
        &["misbehave", "-t", target, "--input", r#"{"mode":"echo"}"#],
    )
}

fn wait_log(agent: &Agent, needle: &str) {
    wait_for(
        Duration::from_secs(60),
        &format!("agent log to say {needle:?}"),
        || agent.log_text().contains(needle).then_some(()),
    );
}

#[test]
fn captured_jobs_cannot_be_replayed_or_retargeted() {
    let mut f = Field::new(&["victim-1", "other-1"]);
    let tap = Tap::start(&f.mosq, "drover/v1/agents/+/down/job");
    let r = echo(&f.server, "victim-1");
    assert_eq!(r["status"], "succeeded");
    let captured = tap.first_on(&job_topic("victim-1"));
    assert_eq!(f.successes(0), 1);

    // Replay to the same agent.
    f.inject(&job_topic("victim-1"), captured.as_bytes());
    wait_log(&f.agents[0], "replay refused");

    // Replay after the agent restarts: the seen-set is on disk.
    f.agents[0].kill9();
    f.agents[0].restart();
    f.server.wait_online("victim-1");
    f.inject(&job_topic("victim-1"), captured.as_bytes());
    wait_for(Duration::from_secs(60), "the second refusal", || {
        (f.agents[0].log_text().matches("replay refused").count() >= 2).then_some(())
    });

    // Retarget: the same genuine envelope delivered to another agent.
    f.inject(&job_topic("other-1"), captured.as_bytes());
    wait_log(&f.agents[1], "addressed to agent \"victim-1\"");

    assert_eq!(f.successes(0), 1, "a replay ran");
    assert_eq!(f.successes(1), 0, "a retargeted job ran");
    assert!(f.agents[0].is_running() && f.agents[1].is_running());
    // The victim still works.
    assert_eq!(echo(&f.server, "victim-1")["status"], "succeeded");
}

/// The control plane sends unanswered envelopes again, marked as copies and signed
/// again. A copy of a job the agent already took is ignored without a report; the
/// original replayed is still refused and reported; neither runs it twice.
#[test]
fn a_resent_copy_is_ignored_quietly_and_never_runs_a_job_twice() {
    use drover_protocol::job::JobEnvelope;
    use drover_protocol::signed::Signed;
    let f = Field::new(&["copied-1"]);
    let tap = Tap::start(&f.mosq, "drover/v1/agents/+/down/job");
    assert_eq!(echo(&f.server, "copied-1")["status"], "succeeded");
    let captured = tap.first_on(&job_topic("copied-1"));

    let key =
        drover_protocol::keys::SigningKey::load(&f.server.data.join("keys/control-plane.key"))
            .unwrap();
    let signed: Signed<JobEnvelope> = serde_json::from_str(&captured).unwrap();
    let mut env = signed.unverified().unwrap();
    env.resent = true;
    let copy = serde_json::to_vec(&Signed::sign(&env, &key)).unwrap();
    f.inject(&job_topic("copied-1"), &copy);
    wait_log(&f.agents[0], "another copy of a job in hand; ignored");
    assert!(!f.agents[0].log_text().contains("replay refused"));

    // The broker marking a copy itself breaks the signature.
    let mut marked = signed.clone();
    marked.payload = marked
        .payload
        .replacen("\"job_id\"", "\"resent\":true,\"job_id\"", 1);
    assert_ne!(marked.payload, signed.payload);
    f.inject(
        &job_topic("copied-1"),
        &serde_json::to_vec(&marked).unwrap(),
    );
    wait_log(&f.agents[0], "job envelope refused");

    f.inject(&job_topic("copied-1"), captured.as_bytes());
    wait_log(&f.agents[0], "replay refused");
    assert_eq!(f.successes(0), 1, "a copy ran");
    // The forged mark and the replay are on record; the copy is not.
    wait_for(
        Duration::from_secs(30),
        "two refused envelopes on record",
        || {
            let ev = f.events("copied-1");
            (ev.iter()
                .filter(|e| e["kind"] == "refused-envelope")
                .count()
                == 2)
                .then_some(())
        },
    );
}

#[test]
fn forged_results_are_refused_and_recorded() {
    let f = Field::new(&["honest-1", "liar-1"]);
    let r = echo(&f.server, "honest-1");
    let job_id = r["job_id"].as_str().unwrap();

    // A result for honest-1 signed with a key of the attacker's own.
    let fake = drover_protocol::keys::SigningKey::generate();
    let mut forged: drover_protocol::job::JobResult = serde_json::from_value(r.clone()).unwrap();
    forged.output = Some(serde_json::json!({"pwned": true}));
    let signed = drover_protocol::signed::Signed::sign(&forged, &fake);
    f.inject(
        "drover/v1/agents/honest-1/up/result",
        &serde_json::to_vec(&signed).unwrap(),
    );
    // Signed by another real agent's key: liar-1's enrolled key cannot speak for honest-1.
    let liar_key =
        drover_protocol::keys::SigningKey::load(&f.agents[1].data_dir.join("identity/agent.key"))
            .unwrap();
    let signed = drover_protocol::signed::Signed::sign(&forged, &liar_key);
    f.inject(
        "drover/v1/agents/honest-1/up/result",
        &serde_json::to_vec(&signed).unwrap(),
    );
    let events = wait_for(Duration::from_secs(60), "two forgery events", || {
        let ev = f.events("honest-1");
        (ev.iter().filter(|e| e["kind"] == "forged").count() >= 2).then_some(ev)
    });
    assert!(
        events
            .iter()
            .any(|e| e["message"].as_str().unwrap().contains("enrolled key"))
    );
    // The stored result is still the genuine one.
    let view = f.server.json(&["job", "show", job_id]);
    assert_eq!(
        view["targets"][0]["result"]["output"]["echo"]["mode"],
        "echo"
    );
    assert!(view.to_string().find("pwned").is_none());
}

fn sign_plugin(server: &Server, wasm: &Path, name: &str, version: u64, extra: &[&str]) -> PathBuf {
    let copy = server
        .dir
        .path()
        .join(format!("{name}-{version}-{}.wasm", free_port()));
    std::fs::copy(wasm, &copy).unwrap();
    let (c, v) = (copy.display().to_string(), version.to_string());
    let mut args = vec![
        "plugin",
        "sign",
        &c,
        "--name",
        name,
        "--version",
        &v,
        "--world",
        "task",
    ];
    args.extend_from_slice(extra);
    let out = server.cli(&args);
    assert!(out.status.success(), "{}", text(&out.stderr));
    copy
}

fn publish_file(server: &Server, wasm: &Path) -> std::process::Output {
    server.cli(&["plugin", "publish", &wasm.display().to_string()])
}

#[test]
fn plugins_cannot_be_downgraded_swapped_or_installed_after_expiry() {
    let server = Server::start();
    let misbehave = plugin("drover-plugin-misbehave");
    let inventory = plugin("drover-plugin-inventory");
    let cfg = server.add_agent("pinned-1", &[]);
    let agent = Agent::start("pinned-1", &cfg, server.dir.path());
    server.wait_online("pinned-1");
    let input = r#"{"mode":"echo"}"#;

    // v1 then v2 run; then asking for v1 again is a downgrade.
    for v in [1, 2] {
        let w = sign_plugin(&server, &misbehave, "tool", v, &[]);
        assert!(publish_file(&server, &w).status.success());
        let (code, r, e) = server.run(&[
            "tool",
            "-t",
            "pinned-1",
            "--version",
            &v.to_string(),
            "--input",
            input,
        ]);
        assert_eq!(code, 0, "{e} {r:?}");
    }
    let (_, r, _) = server.run(&["tool", "-t", "pinned-1", "--version", "1", "--input", input]);
    assert_eq!(r[0]["status"], "rejected");
    assert!(
        r[0]["failure"]["message"]
            .as_str()
            .unwrap()
            .contains("downgrade refused"),
        "{:#}",
        r[0]
    );

    // The same version with another digest, slipped into the store behind the server's back.
    let swapped = sign_plugin(&server, &inventory, "tool", 2, &[]);
    assert!(
        !publish_file(&server, &swapped).status.success(),
        "server took a second v2"
    );
    let manifest = std::fs::read_to_string(format!("{}.manifest.json", swapped.display())).unwrap();
    let m: Value = serde_json::from_str(&manifest).unwrap();
    let payload: Value = serde_json::from_str(m["payload"].as_str().unwrap()).unwrap();
    {
        let db = rusqlite::Connection::open(server.data.join("drover.db")).unwrap();
        db.busy_timeout(Duration::from_secs(5)).unwrap();
        db.execute(
            "INSERT INTO blobs (sha256, bytes) VALUES (?1, ?2)",
            rusqlite::params![
                payload["sha256"].as_str().unwrap(),
                std::fs::read(&swapped).unwrap()
            ],
        )
        .unwrap();
        db.execute(
            "UPDATE plugins SET manifest = ?1, sha256 = ?2, length = ?3 WHERE name = 'tool' AND version = 2",
            rusqlite::params![manifest, payload["sha256"].as_str().unwrap(), payload["length"].as_i64().unwrap()],
        )
        .unwrap();
    }
    let (_, r, _) = server.run(&["tool", "-t", "pinned-1", "--version", "2", "--input", input]);
    assert_eq!(r[0]["status"], "rejected");
    assert!(
        r[0]["failure"]["message"]
            .as_str()
            .unwrap()
            .contains("was installed with digest"),
        "{:#}",
        r[0]
    );

    // An expired manifest cannot be installed.
    let old = sign_plugin(&server, &misbehave, "stale", 1, &["--expires", "1s"]);
    std::thread::sleep(Duration::from_millis(2100));
    let _ = publish_file(&server, &old);
    let (_, r, _) = server.run(&["stale", "-t", "pinned-1", "--input", input]);
    assert_eq!(r[0]["status"], "rejected", "{r:?}");
    assert_eq!(r[0]["failure"]["kind"], "expired_plugin", "{:#}", r[0]);

    let log = agent.log_text();
    assert!(log.contains("downgrade refused") && log.contains("expired"));
    assert_eq!(
        log.matches("job succeeded").count(),
        2,
        "something unintended ran"
    );
}

#[test]
fn thresholds_count_distinct_publishers_and_rotation_needs_the_root() {
    let server = Server::start();
    let misbehave = plugin("drover-plugin-misbehave");
    let cfg = server.add_agent("strict-1", &[]);
    let agent = Agent::start("strict-1", &cfg, server.dir.path());
    server.wait_online("strict-1");

    // A second publisher, and a threshold of two, signed by the root.
    let second = TempDir::new("publisher-2");
    let key2 = keygen(second.path());
    let pub2 = format!("{}.pub", key2.display());
    let out = server.cli(&[
        "keyset",
        "rotate",
        "--add-publisher",
        &pub2,
        "--publisher-threshold",
        "2",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    wait_log(&agent, "adopted a new key set");

    // A rotation signed by something other than the current root is refused by the server
    // before it reaches anyone.
    let out = server.cli(&[
        "keyset",
        "rotate",
        "--publisher-threshold",
        "1",
        "--sign-with",
        &key2.display().to_string(),
    ]);
    assert!(!out.status.success(), "a publisher key rotated the key set");

    // One publisher's signature, duplicated, is still one.
    let w = sign_plugin(&server, &misbehave, "dual", 1, &[]);
    let mpath = format!("{}.manifest.json", w.display());
    let mut m: Value = serde_json::from_str(&std::fs::read_to_string(&mpath).unwrap()).unwrap();
    let sig = m["signatures"][0].clone();
    m["signatures"].as_array_mut().unwrap().push(sig);
    std::fs::write(&mpath, serde_json::to_vec(&m).unwrap()).unwrap();
    assert!(publish_file(&server, &w).status.success());
    let (_, r, _) = server.run(&["dual", "-t", "strict-1", "--input", r#"{"mode":"echo"}"#]);
    assert_eq!(r[0]["status"], "rejected");
    assert!(
        r[0]["failure"]["message"]
            .as_str()
            .unwrap()
            .contains("1 distinct trusted key(s), 2 needed"),
        "{:#}",
        r[0]
    );

    // Two distinct publishers: it runs.
    let k1 = server.data.join("keys/publisher.key").display().to_string();
    let k2 = key2.display().to_string();
    let w = sign_plugin(
        &server,
        &misbehave,
        "dual",
        2,
        &["--key", &k1, "--key", &k2],
    );
    assert!(publish_file(&server, &w).status.success());
    let (code, r, e) = server.run(&["dual", "-t", "strict-1", "--input", r#"{"mode":"echo"}"#]);
    assert_eq!(code, 0, "{e} {r:?}");
}

#[test]
fn enrollment_codes_expire_count_uses_and_can_be_revoked() {
    let server = Server::start();
    let api = server.info()["api"].as_str().unwrap().to_string();
    let created = server.json(&[
        "activation",
        "create",
        "--expires",
        "1h",
        "--max-uses",
        "1",
        "--tags",
        "env=prod,team=ops",
    ]);
    let (id, code) = (
        created["activation"]["id"].as_str().unwrap().to_string(),
        created["code"].as_str().unwrap().to_string(),
    );
    let enroll = |agent: &str, dir: &Path, act: &str, code: &str| {
        Command::new(bin("drover-agent"))
            .args(["--id", agent, "--data-dir"])
            .arg(dir)
            .args([
                "enroll",
                "--server",
                &api,
                "--activation-id",
                act,
                "--code",
                code,
            ])
            .output()
            .unwrap()
    };
    let d1 = server.dir.path().join("e1");
    let out = enroll("edge-1", &d1, &id, "wrong-code");
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("wrong code"),
        "{}",
        text(&out.stderr)
    );
    let out = enroll("edge-1", &d1, &id, &code);
    assert!(out.status.success(), "{}", text(&out.stderr));
    {
        use std::os::unix::fs::PermissionsExt as _;
        for f in ["agent.key", "sealing.key", "enrollment.json"] {
            let mode = std::fs::metadata(d1.join("identity").join(f))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600, "{f}");
        }
    }
    // Used up.
    let out = enroll("edge-2", &server.dir.path().join("e2"), &id, &code);
    assert!(
        text(&out.stderr).contains("no uses left"),
        "{}",
        text(&out.stderr)
    );

    // Revoked, and expired.
    let c2 = server.json(&["activation", "create", "--max-uses", "5"]);
    let id2 = c2["activation"]["id"].as_str().unwrap();
    server.json(&["activation", "revoke", id2]);
    let out = enroll(
        "edge-3",
        &server.dir.path().join("e3"),
        id2,
        c2["code"].as_str().unwrap(),
    );
    assert!(
        text(&out.stderr).contains("revoked"),
        "{}",
        text(&out.stderr)
    );
    let c3 = server.json(&["activation", "create", "--expires", "1s"]);
    std::thread::sleep(Duration::from_millis(1500));
    let out = enroll(
        "edge-4",
        &server.dir.path().join("e4"),
        c3["activation"]["id"].as_str().unwrap(),
        c3["code"].as_str().unwrap(),
    );
    assert!(
        text(&out.stderr).contains("expired"),
        "{}",
        text(&out.stderr)
    );

    // The enrolled agent runs with what enrollment gave it: no config file at all.
    let log = server.dir.path().join("edge-1.log");
    let file = std::fs::File::create(&log).unwrap();
    let child = Killed(
        Command::new(bin("drover-agent"))
            .args(["--id", "edge-1", "--data-dir"])
            .arg(&d1)
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .spawn()
            .unwrap(),
    );
    server.wait_online("edge-1");
    let row = server.agent_row("edge-1").unwrap();
    assert_eq!(row["tags"]["env"], "prod");
    assert_eq!(row["tags"]["team"], "ops");
    drop(child);

    // Every step is in the audit log.
    let audit = server.json(&["audit", "--action", "agent.enroll"]);
    let outcomes: Vec<&str> = audit
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["outcome"].as_str().unwrap())
        .collect();
    assert_eq!(
        outcomes.iter().filter(|o| **o == "ok").count(),
        1,
        "{audit:#}"
    );
    assert_eq!(
        outcomes.iter().filter(|o| **o == "refused").count(),
        4,
        "{audit:#}"
    );
}

#[test]
fn secrets_never_appear_in_broker_traffic_or_the_database() {
    let f = Field::new(&["vault-1"]);
    let w = sign_plugin(
        &f.server,
        &plugin("drover-plugin-misbehave"),
        "keeper",
        1,
        &["--parameter", "db_password"],
    );
    assert!(publish_file(&f.server, &w).status.success());
    let tap = Tap::start(&f.mosq, "#");
    let secret = "correct-horse-battery-staple-7f3a9c";
    let arg = format!("db_password={secret}");
    let (code, r, e) = f.server.run(&[
        "keeper",
        "-t",
        "vault-1",
        "--secret",
        &arg,
        "--input",
        r#"{"mode":"param_digest","name":"db_password"}"#,
    ]);
    assert_eq!(code, 0, "{e} {r:?}");
    // The plugin got it: it reports the value's length and digest, never the value.
    let digest = drover_protocol::manifest::sha256_hex(secret.as_bytes());
    assert_eq!(r[0]["output"]["sha256"], digest.as_str());
    std::thread::sleep(Duration::from_millis(300));

    let traffic: String = tap
        .messages()
        .into_iter()
        .map(|(t, p)| format!("{t} {p}\n"))
        .collect();
    assert!(
        traffic.contains("vault-1/down/job"),
        "the tap saw no job: {traffic}"
    );
    assert!(!traffic.contains(secret), "secret seen on the broker");
    for file in ["drover.db", "drover.db-wal"] {
        let p = f.server.data.join(file);
        if let Ok(bytes) = std::fs::read(&p) {
            assert!(
                !bytes.windows(secret.len()).any(|w| w == secret.as_bytes()),
                "secret found in {file}"
            );
        }
    }
    assert!(!f.server.log_text().contains(secret) && !f.agents[0].log_text().contains(secret));
}

#[test]
fn the_audit_log_records_operator_actions_and_executions() {
    let server = Server::start();
    let cfg = server.add_agent("audited-1", &[]);
    let _agent = Agent::start("audited-1", &cfg, server.dir.path());
    server.wait_online("audited-1");
    publish_misbehave(&server);
    let r = echo(&server, "audited-1");
    let job = r["job_id"].as_str().unwrap();
    let _ = server.run(&["nonexistent", "-t", "audited-1"]);

    let all = server.json(&["audit"]);
    let actions: Vec<String> = all
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            format!(
                "{} {} {}",
                e["actor"].as_str().unwrap(),
                e["action"].as_str().unwrap(),
                e["outcome"].as_str().unwrap()
            )
        })
        .collect();
    for want in [
        "operator agent.credentials ok",
        "operator activation.create ok",
        "enroll:",
        "operator plugin.publish ok",
        "operator job.create ok",
        "agent:audited-1 job.execute succeeded",
        "operator job.create refused",
    ] {
        assert!(
            actions
                .iter()
                .any(|a| a.starts_with(want) || a.contains(want)),
            "no {want:?} in {actions:#?}"
        );
    }
    let for_job = server.json(&["audit", "--target", job]);
    assert_eq!(for_job.as_array().unwrap().len(), 2, "{for_job:#}");
    let agent_only = server.json(&["audit", "--actor", "agent:audited-1"]);
    assert!(
        agent_only
            .as_array()
            .unwrap()
            .iter()
            .all(|e| e["actor"] == "agent:audited-1")
    );
}

fn outbox_files(agent: &Agent) -> usize {
    std::fs::read_dir(agent.data_dir.join("outbox"))
        .map(|d| d.flatten().filter(|e| e.path().is_file()).count())
        .unwrap_or(0)
}

/// A broker that swallows a result and forges its ack cannot make the agent drop it: a
/// result leaves the outbox only on an ack signed by the control-plane key that names the
/// very message the server stored. (Before, an unsigned ack deleted it for good.)
#[test]
fn a_forged_ack_cannot_make_an_agent_drop_a_result_the_server_never_stored() {
    use drover_protocol::job::ResultAck;
    use drover_protocol::signed::Signed;
    let mut f = Field::new(&["acked-1"]);
    let job = f.server.json(&[
        "run",
        "misbehave",
        "-t",
        "acked-1",
        "--no-wait",
        "--timeout",
        "60s",
        "--input",
        r#"{"mode":"sleep","seconds":2}"#,
    ])["job_id"]
        .as_str()
        .unwrap()
        .to_string();
    wait_for(Duration::from_secs(60), "the job to start", || {
        let running = std::fs::read_dir(f.agents[0].data_dir.join("running")).ok()?;
        (running.count() == 1).then_some(())
    });
    // The server goes away while the job runs; the broker then swallows what the agent
    // publishes for it (a restart without persistence drops it).
    f.server.stop();
    wait_for(Duration::from_secs(30), "the result in the outbox", || {
        (outbox_files(&f.agents[0]) == 1).then_some(())
    });
    let connects = |a: &Agent| a.log_text().matches("connected to broker").count();
    let before = connects(&f.agents[0]);
    f.mosq.kill9();
    f.mosq.restart();
    wait_for(
        Duration::from_secs(30),
        "the agent back on the broker",
        || (connects(&f.agents[0]) > before).then_some(()),
    );
    std::thread::sleep(Duration::from_millis(500));

    // Forged acks: unsigned, as the previous release took them; signed by a key of the
    // broker's own; and signed by the control plane but naming another message.
    let topic = "drover/v1/agents/acked-1/down/ack";
    f.inject(
        topic,
        serde_json::json!({"job_id": job, "attempt": 1})
            .to_string()
            .as_bytes(),
    );
    let ack = |digest: &str| ResultAck {
        agent_id: "acked-1".into(),
        job_id: job.clone(),
        attempt: 1,
        result_sha256: digest.into(),
    };
    let stranger = drover_protocol::keys::SigningKey::generate();
    let forged = Signed::sign(&ack(&"0".repeat(64)), &stranger);
    f.inject(topic, &serde_json::to_vec(&forged).unwrap());
    let control =
        drover_protocol::keys::SigningKey::load(&f.server.data.join("keys/control-plane.key"))
            .unwrap();
    let other = Signed::sign(&ack(&"1".repeat(64)), &control);
    f.inject(topic, &serde_json::to_vec(&other).unwrap());
    wait_for(Duration::from_secs(30), "three refused acks", || {
        (f.agents[0].log_text().matches("result ack refused").count() >= 3).then_some(())
    });
    assert_eq!(
        outbox_files(&f.agents[0]),
        1,
        "a forged ack deleted the result"
    );

    // When the server is back, the result reaches it from the outbox, and only its true
    // ack empties the outbox.
    f.server.restart();
    let r = wait_for(Duration::from_secs(60), "the result stored", || {
        let v = f.server.json(&["job", "show", &job]);
        let r = v["targets"][0]["result"].clone();
        (!r.is_null()).then_some(r)
    });
    assert_eq!(r["status"], "succeeded", "{r:#}");
    wait_for(Duration::from_secs(30), "the outbox to empty", || {
        (outbox_files(&f.agents[0]) == 0).then_some(())
    });
}
