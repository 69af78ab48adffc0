//! Attacks on the server: by dishonest agents, anonymous network clients and a hostile
//! broker.

use std::io::Write as _;
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use drover_protocol::agent::Hello;
use drover_protocol::enroll::Heartbeat;
use drover_protocol::keys::SigningKey;
use drover_protocol::signed::Signed;
use serde_json::Value;

use super::super::support::*;
use super::{ATTACKER, Field, Tap, echo};

/// `drover-agent --id ID --data-dir DIR enroll ...` with an activation.
fn enroll(server: &Server, id: &str, dir: &Path, activation: &Value) -> std::process::Output {
    let api = server.info()["api"].as_str().unwrap().to_string();
    Command::new(bin("drover-agent"))
        .args(["--id", id, "--data-dir"])
        .arg(dir)
        .args([
            "enroll",
            "--server",
            &api,
            "--activation-id",
            activation["activation"]["id"].as_str().unwrap(),
            "--code",
            activation["code"].as_str().unwrap(),
        ])
        .output()
        .unwrap()
}

/// Hole 4: an open activation (one for a whole fleet) could enroll an id that `drover
/// agents add` had registered but that had not enrolled yet: it replaced the id's broker
/// credential, so the attacker came online as that agent (and could open secrets sealed
/// to it) while the real agent was locked out.
#[test]
fn an_open_activation_cannot_take_an_id_that_was_added_but_has_not_enrolled() {
    let server = Server::start();
    let cfg = server.add_agent("added-1", &["--tag", "env=prod"]);
    let open = server.json(&["activation", "create", "--max-uses", "5"]);

    let thief = server.dir.path().join("thief");
    let out = enroll(&server, "added-1", &thief, &open);
    assert!(
        !out.status.success(),
        "an open activation enrolled the added id added-1: {}",
        text(&out.stdout)
    );
    assert!(
        text(&out.stderr).contains("already known"),
        "{}",
        text(&out.stderr)
    );
    // The refusal used nothing up.
    let acts = server.json(&["activation", "list"]);
    let used = acts
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["id"] == open["activation"]["id"])
        .unwrap()["uses"]
        .clone();
    assert_eq!(used, 0);

    // The real agent enrolls with its own activation, keeps its credential, and runs.
    publish_misbehave(&server);
    let _agent = Agent::start("added-1", &cfg, server.dir.path());
    server.wait_online("added-1");
    assert_eq!(echo(&server, "added-1")["status"], "succeeded");

    // Once enrolled, an open activation cannot have it either; a new id it can.
    let out = enroll(
        &server,
        "added-1",
        &server.dir.path().join("thief-2"),
        &open,
    );
    assert!(!out.status.success());
    let out = enroll(&server, "fresh-1", &server.dir.path().join("fresh"), &open);
    assert!(out.status.success(), "{}", text(&out.stderr));
}

/// Replaces the `[tags]` table of a config written by `drover agents add`.
fn claim_tags(cfg: &Path, tags: &str) {
    let text = std::fs::read_to_string(cfg).unwrap();
    let (head, rest) = text.split_once("\n[tags]\n").unwrap();
    let (_, tail) = rest.split_once("\n[trust]\n").unwrap();
    std::fs::write(cfg, format!("{head}\n[tags]\n{tags}\n\n[trust]\n{tail}")).unwrap();
}

fn targets_of(results: &[Value]) -> Vec<String> {
    let mut ids: Vec<String> = results
        .iter()
        .map(|r| r["agent_id"].as_str().unwrap().to_string())
        .collect();
    ids.sort();
    ids
}

/// Hole 5: the server targeted by the tags an agent reported about itself, so an agent
/// enrolled as `env=dev` that said `env=prod` in its config received prod's jobs (and
/// their sealed secrets). Tags are now the server's: from the activation, changed only
/// by operators; what the agent says is kept as labels and never targeted.
#[test]
fn an_agent_cannot_tag_itself_into_a_target() {
    let server = Server::start();
    publish_misbehave(&server);
    let dev = server.add_agent("dev-1", &["--tag", "env=dev"]);
    claim_tags(&dev, "\"env\" = \"prod\"");
    let prod = server.add_agent("prod-1", &["--tag", "env=prod"]);
    let _agents = [
        Agent::start("dev-1", &dev, server.dir.path()),
        Agent::start("prod-1", &prod, server.dir.path()),
    ];
    server.wait_online("dev-1");
    server.wait_online("prod-1");
    let row = server.agent_row("dev-1").unwrap();
    assert_eq!(row["tags"]["env"], "dev", "{row:#}");
    assert_eq!(row["labels"]["env"], "prod", "{row:#}");

    let input = r#"{"mode":"echo"}"#;
    let (code, results, err) = server.run(&["misbehave", "-t", "tag:env=prod", "--input", input]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        targets_of(&results),
        ["prod-1"],
        "a self-tagged agent got the job"
    );

    // An operator moves it: audited, and targeted from then on.
    let moved = server.json(&["agents", "tag", "dev-1", "env=prod", "tier=web"]);
    assert_eq!(moved["tags"]["env"], "prod", "{moved:#}");
    let (code, results, err) = server.run(&["misbehave", "-t", "tag:env=prod", "--input", input]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(targets_of(&results), ["dev-1", "prod-1"]);
    let moved = server.json(&["agents", "tag", "dev-1", "--remove", "tier"]);
    assert_eq!(moved["tags"], serde_json::json!({"env": "prod"}));
    let audit = server.json(&["audit", "--action", "agent.tag"]);
    assert_eq!(audit.as_array().unwrap().len(), 2, "{audit:#}");
    // Tagging an agent the server does not know is refused.
    let out = server.cli(&["agents", "tag", "nobody-1", "env=prod"]);
    assert!(!out.status.success());
}

fn sign<T: drover_protocol::signed::Signable>(v: &T, key: &SigningKey) -> Vec<u8> {
    serde_json::to_vec(&Signed::sign(v, key)).unwrap()
}

/// Hole 5, the second half: a signed hello (or heartbeat) captured by the broker could be
/// played again to show a dead agent online and restore the facts it once reported. The
/// server now takes one only if it is newer than the last it took from that agent and
/// within five minutes of its own clock.
#[test]
fn a_replayed_hello_or_heartbeat_is_refused() {
    let mut f = Field::new(&["replayed-1"]);
    let topic = "drover/v1/agents/replayed-1/up/hello";
    let tap = Tap::start(&f.mosq, topic);
    f.agents[0].stop();
    f.agents[0].restart();
    let captured = tap.first_on(topic);
    f.server.wait_online("replayed-1");
    f.agents[0].stop();
    wait_for(Duration::from_secs(30), "replayed-1 offline", || {
        f.server
            .agent_row("replayed-1")
            .filter(|a| a["online"] == false)
    });

    f.inject(topic, captured.as_bytes());
    let key = SigningKey::load(&f.agents[0].data_dir.join("identity/agent.key")).unwrap();
    let mut hello: Hello = serde_json::from_str::<Signed<Hello>>(&captured)
        .unwrap()
        .unverified()
        .unwrap();
    hello.hostname = "restored".into();
    hello.sent_at_ms = drover_protocol::now_ms() + 10 * 60_000;
    f.inject(topic, &sign(&hello, &key));
    let hb = |at_ms| Heartbeat {
        agent_id: "replayed-1".into(),
        at_ms,
        jobs_run: 0,
        jobs_refused: 0,
    };
    let beat = sign(&hb(drover_protocol::now_ms()), &key);
    let hb_topic = "drover/v1/agents/replayed-1/up/heartbeat";
    f.inject(hb_topic, &beat);
    f.inject(hb_topic, &beat);
    f.inject(
        hb_topic,
        &sign(&hb(drover_protocol::now_ms() - 10 * 60_000), &key),
    );
    let events = wait_for(Duration::from_secs(60), "four replays refused", || {
        let ev = f.events("replayed-1");
        (ev.iter().filter(|e| e["kind"] == "replayed").count() >= 4).then_some(ev)
    });
    assert!(
        events
            .iter()
            .any(|e| e["message"].as_str().unwrap().contains("not newer")),
        "{events:#?}"
    );
    let row = f.server.agent_row("replayed-1").unwrap();
    assert_eq!(row["online"], false, "a replayed hello showed it online");
    assert_ne!(row["hostname"], "restored");

    // The agent itself still comes back.
    f.agents[0].restart();
    f.server.wait_online("replayed-1");
    assert_eq!(echo(&f.server, "replayed-1")["status"], "succeeded");
}

/// A tap that records the length of every message on `topic` (chunk frames are binary).
fn length_tap(mosq: &Mosquitto, topic: &str) -> Tap {
    let out = mosq.dir.path().join(format!("lengths-{}.txt", free_port()));
    let file = std::fs::File::create(&out).unwrap();
    let child = Command::new("stdbuf")
        .arg("-oL")
        .arg(mosquitto_bin("mosquitto_sub"))
        .args(["-h", "127.0.0.1", "-p", &mosq.port.to_string(), "-q", "1"])
        .args(["-u", ATTACKER.0, "-P", ATTACKER.1])
        .args(["-i", &format!("lengths-{}", free_port())])
        .args(["-t", topic, "-F", "%t\t%l"])
        .stdin(Stdio::null())
        .stdout(file)
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    Tap { child, out }
}

/// Publishes each line as its own message, from one `mosquitto_pub`.
fn inject_lines(mosq: &Mosquitto, topic: &str, lines: &[String]) {
    let mut child = Command::new(mosquitto_bin("mosquitto_pub"))
        .args(["-h", "127.0.0.1", "-p", &mosq.port.to_string(), "-q", "1"])
        .args(["-u", ATTACKER.0, "-P", ATTACKER.1])
        .args(["-i", &format!("flood-{}", free_port()), "-t", topic, "-l"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    for l in lines {
        writeln!(stdin, "{l}").unwrap();
    }
    drop(stdin);
    assert!(child.wait().unwrap().success());
}

fn fetch(sha256: &str, indices: Option<Vec<u32>>) -> String {
    serde_json::json!({
        "request_id": format!("forged-{}", free_port()),
        "sha256": sha256,
        "chunk_size": 1024,
        "indices": indices,
    })
    .to_string()
}

/// Waits until the count of messages `tap` has seen stops moving; returns it.
fn settled(tap: &Tap) -> usize {
    let mut last = usize::MAX;
    loop {
        std::thread::sleep(Duration::from_millis(1500));
        let n = tap.messages().len();
        if n == last {
            return n;
        }
        last = n;
    }
}

/// Hole 6: one fetch request of 6 KB with 2,000 copies of one index made the server
/// publish 2,000 chunks, for any blob, on behalf of any agent, as often as asked. Now a
/// blob is served only for a job in flight to that agent, each chunk once per request,
/// and an agent's requests are rate-limited; every refusal is counted and recorded.
#[test]
fn fetch_requests_cannot_multiply_into_floods() {
    let f = Field::new(&["fetcher-1"]);
    let plugins = f.server.json(&["plugin", "list"]);
    let sha = plugins[0]["sha256"].as_str().unwrap().to_string();
    let chunks = length_tap(&f.mosq, "drover/v1/agents/fetcher-1/down/chunk");
    let up = "drover/v1/agents/fetcher-1/up/fetch";

    // No job in flight to fetcher-1: no chunk of the blob, one refusal.
    inject_lines(&f.mosq, up, &[fetch(&sha, Some(vec![0; 2000]))]);
    wait_for(Duration::from_secs(30), "the fetch refused", || {
        f.events("fetcher-1")
            .iter()
            .any(|e| e["kind"] == "refused-fetch")
            .then_some(())
    });
    let n = settled(&chunks);
    assert!(n <= 1, "{n} chunk messages for a blob of no job in flight");

    // With a job in flight, 2,000 copies of one index are one chunk.
    let job = f.server.json(&[
        "run",
        "misbehave",
        "-t",
        "fetcher-1",
        "--no-wait",
        "--input",
        r#"{"mode":"sleep","seconds":30}"#,
    ])["job_id"]
        .as_str()
        .unwrap()
        .to_string();
    wait_for(Duration::from_secs(30), "the job in flight", || {
        let v = f.server.json(&["job", "show", &job]);
        (v["targets"][0]["state"] == "in_progress").then_some(())
    });
    let before = settled(&chunks);
    inject_lines(&f.mosq, up, &[fetch(&sha, Some(vec![0; 2000]))]);
    std::thread::sleep(Duration::from_secs(2));
    let served = settled(&chunks) - before;
    assert_eq!(
        served, 1,
        "2,000 copies of one index were served {served} times"
    );

    // A burst of requests is cut off by the agent's rate limit.
    let before = settled(&chunks);
    let burst: Vec<String> = (0..60).map(|_| fetch(&sha, Some(vec![0]))).collect();
    inject_lines(&f.mosq, up, &burst);
    std::thread::sleep(Duration::from_secs(2));
    let served = settled(&chunks) - before;
    assert!(served < 40, "{served} of 60 requests served at once");
    let events = f.events("fetcher-1");
    assert!(
        events.iter().any(|e| e["kind"] == "rate-limited"),
        "{events:#?}"
    );
    f.server.json(&["job", "cancel", &job]);
}

/// The agent events of hole 5's kind: a flood of forged messages wrote one row each, with
/// no bound. Each agent's events are rate-limited, what is dropped is counted and said
/// in the log, and each agent keeps only its newest.
#[test]
fn a_flood_of_forged_messages_cannot_grow_the_event_log_without_bound() {
    let f = Field::new(&["flooded-1"]);
    let garbage: Vec<String> = (0..3000).map(|i| format!("not json {i}")).collect();
    inject_lines(&f.mosq, "drover/v1/agents/flooded-1/up/heartbeat", &garbage);
    let events = wait_for(Duration::from_secs(60), "the drop noted in the log", || {
        let ev = f.server.json(&[
            "agents",
            "events",
            "--agent",
            "flooded-1",
            "--limit",
            "10000",
        ]);
        let ev = ev.as_array().unwrap().clone();
        ev.iter().any(|e| e["kind"] == "dropped").then_some(ev)
    });
    std::thread::sleep(Duration::from_secs(2));
    let all = f.server.json(&[
        "agents",
        "events",
        "--agent",
        "flooded-1",
        "--limit",
        "10000",
    ]);
    let n = all.as_array().unwrap().len();
    assert!(n <= 200, "{n} events recorded for one flood: {events:#?}");

    // Later, the next refusal is recorded, with how many were not.
    std::thread::sleep(Duration::from_secs(3));
    f.inject("drover/v1/agents/flooded-1/up/heartbeat", b"late garbage");
    wait_for(
        Duration::from_secs(30),
        "the count of what was dropped",
        || {
            let ev = f.events("flooded-1");
            ev.iter()
                .any(|e| {
                    e["kind"] == "dropped"
                        && e["message"].as_str().unwrap().contains("were not recorded")
                })
                .then_some(())
        },
    );
    // The agent itself is unharmed.
    assert_eq!(echo(&f.server, "flooded-1")["status"], "succeeded");
}

/// Hole 7: the API ran without a header-read timeout or a connection limit, so idle
/// sockets piled up until the process ran out of descriptors; the API stopped answering
/// and the broker's listener failed with EMFILE. The server now raises its descriptor
/// limit, gives the API and the broker a budget each, times out idle and half-sent
/// requests, and makes room for a new connection by closing the oldest idle one.
#[test]
fn idle_and_half_sent_connections_starve_neither_the_api_nor_the_broker() {
    // Soft 1024, hard 4096: a common default.
    let server = Server::start_limited(Some((1024, 4096)), &[]);
    let cfg = server.add_agent("late-1", &[]);
    let api = server.info()["api"].as_str().unwrap().to_string();
    let addr: SocketAddr = api.trim_start_matches("http://").parse().unwrap();
    let mut sockets = Vec::new();
    for i in 0..1200 {
        let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_millis(500)) else {
            continue;
        };
        if i % 2 == 1 {
            let _ = s.write_all(b"GET /api/v1/agents HTTP/1.1\r\nHost: drover\r\n");
        }
        sockets.push(s);
    }
    std::thread::sleep(Duration::from_millis(500));

    // The API answers at once.
    let token = std::fs::read_to_string(server.data.join("api-token")).unwrap();
    let http = ureq::Agent::config_builder()
        .timeout_global(Some(Duration::from_secs(10)))
        .build()
        .new_agent();
    let start = Instant::now();
    let resp = http
        .get(format!("{api}/api/v1/agents"))
        .header("Authorization", &format!("Bearer {}", token.trim()))
        .call();
    assert!(
        resp.is_ok(),
        "the API did not answer beside {} idle sockets: {resp:?}",
        sockets.len()
    );
    assert!(start.elapsed() < Duration::from_secs(5));

    // The broker accepts an agent.
    let _agent = Agent::start("late-1", &cfg, server.dir.path());
    server.wait_online("late-1");
    drop(sockets);
    assert!(
        !server.log_text().contains("Too many open files"),
        "{}",
        server.log_text()
    );
}
