//! The broker as defence in depth: every client authenticated, every agent confined to its
//! own topics, and a deregistered agent cut off. Real `drover` and `drover-agent`, the
//! embedded broker and Mosquitto configured by `drover broker acl`, and the real Mosquitto
//! clients playing an agent gone rogue: agent A, with its genuine credential, against
//! agent B.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use serde_json::Value;

use super::support::*;

const ECHO: &str = r#"{"mode":"echo"}"#;

/// An agent's identity as a rogue client would use it.
struct Login {
    id: String,
    password: String,
}

impl Login {
    fn of(id: &str, cfg: &Path) -> Login {
        Login {
            id: id.to_string(),
            password: toml_value(cfg, "password"),
        }
    }
}

fn mqtt_args(port: u16, login: &Login, client_id: &str) -> Vec<String> {
    [
        "-h",
        "127.0.0.1",
        "-p",
        &port.to_string(),
        "-u",
        &login.id,
        "-P",
        &login.password,
        "-i",
        client_id,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// `mosquitto_pub -q 1` as `login`, with its own id as client id. The exit status is
/// not checked: a broker may acknowledge a publish it drops.
fn rogue_publish(port: u16, login: &Login, topic: &str, retain: bool, payload: &str) -> Output {
    let mut cmd = Command::new(mosquitto_bin("mosquitto_pub"));
    cmd.args(mqtt_args(port, login, &login.id))
        .args(["-q", "1", "-t", topic, "-m", payload]);
    if retain {
        cmd.arg("-r");
    }
    cmd.stdin(Stdio::null()).output().unwrap()
}

/// `mosquitto_sub` in the background, printing (`-d`) its protocol exchanges and the
/// topic of every message it receives. Started once it has its SUBACK.
struct Spy {
    child: Child,
    out: PathBuf,
}

impl Spy {
    fn start(port: u16, login: &Login, filters: &[&str], dir: &Path) -> Spy {
        let out = dir.join(format!("spy-{}.out", login.id));
        let file = fs::File::create(&out).unwrap();
        // Line-buffered: the debug lines are not flushed otherwise.
        let mut cmd = Command::new("stdbuf");
        cmd.arg("-oL")
            .arg(mosquitto_bin("mosquitto_sub"))
            .args(mqtt_args(port, login, &login.id))
            .args(["-q", "1", "-d", "-F", "%t"]);
        for f in filters {
            cmd.args(["-t", f]);
        }
        let child = cmd
            .stdin(Stdio::null())
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .spawn()
            .expect("spawn mosquitto_sub");
        let spy = Spy { child, out };
        wait_for(Duration::from_secs(10), "the spy's SUBACK", || {
            spy.text().contains("received SUBACK").then_some(())
        });
        spy
    }

    fn text(&self) -> String {
        fs::read_to_string(&self.out).unwrap_or_default()
    }

    /// The topics received so far: `-F %t` lines (debug lines all contain spaces).
    fn topics(&self) -> Vec<String> {
        self.text()
            .lines()
            .filter(|l| !l.is_empty() && !l.contains(' '))
            .map(str::to_string)
            .collect()
    }

    fn stop(mut self) -> Vec<String> {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.topics()
    }
}

fn events_of(server: &Server, id: &str) -> Vec<Value> {
    server
        .json(&["agents", "events", "--agent", id])
        .as_array()
        .cloned()
        .unwrap_or_default()
}

/// Runs the echo job on `targets` without waiting; returns the job id.
fn submit_echo(server: &Server, targets: &str) -> String {
    let v = server.json(&[
        "run",
        "misbehave",
        "-t",
        targets,
        "--no-wait",
        "--input",
        ECHO,
    ]);
    v["job_id"].as_str().unwrap().to_string()
}

/// Waits for `agent`'s result of `job`.
fn result_of(server: &Server, job: &str, agent: &str) -> Value {
    wait_for(Duration::from_secs(30), "the job's result", || {
        let v = server.json(&["job", "show", job]);
        v["targets"]
            .as_array()?
            .iter()
            .find(|t| t["agent_id"] == agent && !t["result"].is_null())
            .map(|t| t["result"].clone())
    })
}

/// The attacks every broker must stop. A has registered once and is down, so its
/// credential is free for the attacker; B is online and working.
fn agent_a_cannot_reach_agent_b(
    server: &Server,
    port: u16,
    a: &Login,
    agent_a: &mut Agent,
    agent_b: &Agent,
) {
    let b_id = agent_b.id.as_str();
    let a_down_job = format!("drover/v1/agents/{}/down/job", a.id);

    // Listening with A's credential on everything it can name, while B runs a job (and,
    // as the positive control, a job is sent to A too).
    let spy = Spy::start(
        port,
        a,
        &[
            "#",
            "drover/v1/agents/+/down/#",
            "drover/v1/agents/+/up/#",
            &format!("drover/v1/agents/{}/down/#", a.id),
        ],
        server.dir.path(),
    );
    let job = submit_echo(server, &format!("{},{b_id}", a.id));
    let r = result_of(server, &job, b_id);
    assert_eq!(r["status"], "succeeded", "B's job: {r:#}");
    wait_for(
        Duration::from_secs(10),
        "A's own job to reach the spy",
        || spy.topics().contains(&a_down_job).then_some(()),
    );
    std::thread::sleep(Duration::from_millis(500));
    let topics = spy.stop();
    let own = format!("drover/v1/agents/{}/", a.id);
    assert!(
        topics.iter().all(|t| t.starts_with(&own)),
        "A's credential received others' messages: {topics:?}"
    );

    // Forgeries in B's name do not reach the server; the same in A's own name do.
    let b_events = events_of(server, b_id).len();
    let a_events = events_of(server, &a.id).len();
    let forged = r#"{"forged":"by A"}"#;
    rogue_publish(
        port,
        a,
        &format!("drover/v1/agents/{b_id}/up/result"),
        false,
        forged,
    );
    rogue_publish(
        port,
        a,
        &format!("drover/v1/agents/{b_id}/up/status"),
        true,
        r#"{"state":"offline"}"#,
    );
    // Retained envelopes for whoever subscribes next, A or B.
    rogue_publish(port, a, &a_down_job, true, "retained by A");
    rogue_publish(
        port,
        a,
        &format!("drover/v1/agents/{b_id}/down/job"),
        true,
        "retained by A",
    );
    let out = rogue_publish(
        port,
        a,
        &format!("drover/v1/agents/{}/up/result", a.id),
        false,
        forged,
    );
    assert!(out.status.success(), "A's own publish failed: {out:?}");
    wait_for(
        Duration::from_secs(10),
        "the server to refuse A's own bad result",
        || (events_of(server, &a.id).len() > a_events).then_some(()),
    );
    let a_events = events_of(server, &a.id).len();
    assert_eq!(
        events_of(server, b_id).len(),
        b_events,
        "a forgery in B's name reached the server: {:#?}",
        events_of(server, b_id)
    );
    assert_eq!(
        server.agent_row(b_id).unwrap()["online"],
        true,
        "B's presence was forged"
    );

    // A comes back: no retained job waits for it, and B got none either. The job sent
    // to A at the start (which the spy took in its place) is still unanswered, so the
    // control plane sends it again: A runs that one, and nothing else.
    let a_log = agent_a.log_text().len();
    agent_a.restart();
    server.wait_online(&a.id);
    let r = result_of(server, &job, &a.id);
    assert_eq!(r["status"], "succeeded", "A's own job, sent again: {r:#}");
    std::thread::sleep(Duration::from_secs(2));
    let new_log = agent_a.log_text().split_off(a_log);
    assert!(
        !new_log.contains("job rejected")
            && new_log
                .lines()
                .filter(|l| l.contains("job succeeded"))
                .all(|l| l.contains(job.as_str())),
        "A acted on a retained message:\n{new_log}"
    );
    assert!(
        !agent_b.log_text().contains("job rejected"),
        "B acted on a message from A:\n{}",
        agent_b.log_text()
    );
    assert_eq!(events_of(server, &a.id).len(), a_events);
    assert_eq!(events_of(server, b_id).len(), b_events);
}

/// Connecting with B's client id and A's credential does not disturb B.
fn a_cannot_take_bs_place(server: &Server, port: u16, a: &Login, agent_b: &Agent) -> Output {
    let b_log = agent_b.log_text().len();
    let out = Command::new(mosquitto_bin("mosquitto_sub"))
        .args(mqtt_args(port, a, &agent_b.id))
        .args(["-q", "1", "-W", "2", "-t"])
        .arg(format!("drover/v1/agents/{}/down/#", agent_b.id))
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let new_log = agent_b.log_text().split_off(b_log);
    assert!(
        !new_log.contains("broker connection failed"),
        "B was disconnected:\n{new_log}"
    );
    let job = submit_echo(server, &agent_b.id);
    assert_eq!(result_of(server, &job, &agent_b.id)["status"], "succeeded");
    out
}

#[test]
fn embedded_broker_confines_each_agent_to_its_own_topics() {
    let server = Server::start();
    publish_misbehave(&server);
    let cfg_a = server.add_agent("rogue-a", &[]);
    let cfg_b = server.add_agent("honest-b", &[]);
    let port = server.broker_port();
    let a = Login::of("rogue-a", &cfg_a);
    let mut agent_a = Agent::start("rogue-a", &cfg_a, server.dir.path());
    server.wait_online("rogue-a");
    agent_a.kill9();
    let agent_b = Agent::start("honest-b", &cfg_b, server.dir.path());
    server.wait_online("honest-b");

    agent_a_cannot_reach_agent_b(&server, port, &a, &mut agent_a, &agent_b);
    agent_a.kill9();

    // The embedded broker binds the client id to the credential: refused outright.
    let out = a_cannot_take_bs_place(&server, port, &a, &agent_b);
    assert!(!out.status.success(), "connected as B: {out:?}");
    assert!(
        text(&out.stderr).contains("not authorised"),
        "{}",
        text(&out.stderr)
    );
    // Every refusal above was the ACL's.
    let log = server.log_text();
    for action in ["\"subscribe\"", "\"publish\"", "\"connect\""] {
        assert!(log.contains(action), "no {action} denial logged:\n{log}");
    }
}

#[test]
fn mosquitto_configured_by_drover_broker_acl_confines_agents_too() {
    // Mosquitto's files come from the server's store, so the server (and the agents'
    // credentials) come first; the control link waits for Mosquitto.
    let port = free_port();
    let url = format!("mqtt://127.0.0.1:{port}");
    let secrets = TempDir::new("control-pw");
    let pw = secrets.path().join("control.pw");
    fs::write(&pw, "control-secret\n").unwrap();
    let pw_s = pw.display().to_string();
    let server = Server::start_with(&[
        "--broker",
        &url,
        "--broker-username",
        "drover-control",
        "--broker-password-file",
        &pw_s,
    ]);
    publish_misbehave(&server);
    let cfg_a = server.add_agent("mrogue-a", &[]);
    let cfg_b = server.add_agent("mhonest-b", &[]);

    let dir = TempDir::new("mosquitto-acl");
    let out_s = dir.path().display().to_string();
    let acl = |server: &Server| {
        server.json(&[
            "broker",
            "acl",
            "--format",
            "mosquitto",
            "--out",
            &out_s,
            "--control-password-file",
            &pw_s,
        ])
    };
    let written = acl(&server);
    assert_eq!(
        written["agents"],
        serde_json::json!(["mhonest-b", "mrogue-a"])
    );
    let passwd = fs::read_to_string(dir.path().join("passwd")).unwrap();
    assert!(
        passwd.starts_with("drover-control:$7$101$"),
        "passwd: {passwd}"
    );
    let snippet = fs::read_to_string(dir.path().join("mosquitto.conf.snippet")).unwrap();
    for setting in [
        "allow_anonymous false",
        "use_username_as_clientid true",
        "set_tcp_nodelay true",
    ] {
        assert!(snippet.contains(setting), "snippet lacks {setting}");
    }
    let mosq = Mosquitto::start_configured(dir, port, &snippet);

    let a = Login::of("mrogue-a", &cfg_a);
    let mut agent_a = Agent::start("mrogue-a", &cfg_a, server.dir.path());
    server.wait_online("mrogue-a");
    agent_a.kill9();
    let mut agent_b = Agent::start("mhonest-b", &cfg_b, server.dir.path());
    server.wait_online("mhonest-b");

    agent_a_cannot_reach_agent_b(&server, port, &a, &mut agent_a, &agent_b);
    agent_a.kill9();
    // Mosquitto replaces the client id with the username: A gets in, as itself only.
    a_cannot_take_bs_place(&server, port, &a, &agent_b);

    // Deregistering B, writing the files again and reloading cuts B off: Mosquitto
    // re-checks connected clients against the new password file.
    let b_log = agent_b.log_text().len();
    server.json(&["agents", "deregister", "mhonest-b"]);
    let written = acl(&server);
    assert_eq!(written["agents"], serde_json::json!(["mrogue-a"]));
    mosq.reload();
    wait_for(Duration::from_secs(10), "B to be refused", || {
        let log = agent_b.log_text().split_off(b_log);
        log.contains("Connection refused").then_some(())
    });
    assert!(agent_b.is_running());
    assert!(
        !mosq.log_text().contains("Error"),
        "mosquitto: {}",
        mosq.log_text()
    );
}

#[test]
fn a_deregistered_agent_is_dropped_and_stays_out() {
    let server = Server::start();
    let cfg = server.add_agent("gone-b", &[]);
    let login = Login::of("gone-b", &cfg);
    let port = server.broker_port();
    let mut agent = Agent::start("gone-b", &cfg, server.dir.path());
    server.wait_online("gone-b");
    let before = agent.log_text().len();

    let d = server.json(&["agents", "deregister", "gone-b"]);
    assert_eq!(d["disconnected"], true, "{d:#}");
    assert_eq!(d["embedded_broker"], true, "{d:#}");

    // Its connection is dropped now, and every reconnect is refused.
    wait_for(Duration::from_secs(10), "the agent to be dropped", || {
        let log = agent.log_text().split_off(before);
        (log.contains("broker connection failed") && log.contains("Connection refused"))
            .then_some(())
    });
    wait_for(Duration::from_secs(10), "the agent offline", || {
        server.agent_row("gone-b").filter(|a| a["online"] == false)
    });
    std::thread::sleep(Duration::from_secs(2));
    let row = server.agent_row("gone-b").unwrap();
    assert_eq!(row["online"], false, "it came back: {row:#}");
    assert!(row["deregistered_ms"].as_u64().is_some(), "{row:#}");
    assert!(
        agent.is_running(),
        "the agent gave up: {}",
        agent.log_text()
    );
    let list = text(&server.cli(&["agents", "list"]).stdout);
    let line = list
        .lines()
        .find(|l| l.starts_with("gone-b "))
        .unwrap_or_else(|| panic!("not listed:\n{list}"));
    assert!(line.contains("deregistered"), "{list}");

    // The credential itself is dead, for any client.
    let out = Command::new(mosquitto_bin("mosquitto_sub"))
        .args(mqtt_args(port, &login, "gone-b"))
        .args(["-W", "2", "-t", "drover/v1/agents/gone-b/down/#"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("bad user name or password"),
        "{}",
        text(&out.stderr)
    );

    // Unknown agents are an error; deregistering twice is not.
    assert!(
        !server
            .cli(&["agents", "deregister", "no-such-agent"])
            .status
            .success()
    );
    server.json(&["agents", "deregister", "gone-b"]);
    agent.kill9();
}
