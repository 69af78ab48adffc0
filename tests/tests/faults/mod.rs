//! No result lost or duplicated: the agent is killed mid-job, the server (with its
//! broker) goes away while results are in flight.

use std::time::Duration;

use serde_json::Value;

use super::support::*;

fn job_result(server: &Server, job: &str, within: Duration) -> Value {
    wait_for(within, &format!("a result for {job}"), || {
        let v = server.json(&["job", "show", job]);
        let r = v["targets"][0]["result"].clone();
        (!r.is_null()).then_some(r)
    })
}

fn submit(server: &Server, target: &str, input: &str, timeout: &str) -> String {
    let v = server.json(&[
        "run",
        "misbehave",
        "-t",
        target,
        "--timeout",
        timeout,
        "--no-wait",
        "--input",
        input,
    ]);
    v["job_id"].as_str().unwrap().to_string()
}

fn files_in(dir: &std::path::Path) -> usize {
    std::fs::read_dir(dir)
        .map(|d| d.flatten().filter(|e| e.path().is_file()).count())
        .unwrap_or(0)
}

/// Publishes misbehave and starts agent `id`; returns once it is online.
fn misbehave_agent(server: &Server, id: &str) -> Agent {
    publish_misbehave(server);
    let cfg = server.add_agent(id, &[]);
    let agent = Agent::start(id, &cfg, server.dir.path());
    server.wait_online(id);
    agent
}

/// [`misbehave_agent`], sent a job that sleeps `seconds`; returns once the job runs.
fn agent_running_a_sleep(server: &Server, id: &str, seconds: u32) -> (Agent, String) {
    let agent = misbehave_agent(server, id);
    let input = format!(r#"{{"mode":"sleep","seconds":{seconds}}}"#);
    let job = submit(server, id, &input, &format!("{}s", seconds * 2));
    let running = agent.data_dir.join("running");
    wait_for(Duration::from_secs(60), "the job to start", || {
        (files_in(&running) == 1).then_some(())
    });
    (agent, job)
}

#[test]
fn a_job_cut_short_by_kill_9_is_reported_interrupted_and_never_rerun() {
    let server = Server::start();
    let (mut agent, job) = agent_running_a_sleep(&server, "crashy-1", 60);
    let running = agent.data_dir.join("running");
    agent.kill9();
    agent.restart();

    let r = job_result(&server, &job, Duration::from_secs(60));
    assert_eq!(r["status"], "failed", "{r:#}");
    assert_eq!(failure_kind(&r), "interrupted", "{r:#}");
    assert_eq!(r["plugin"], "misbehave");
    assert_eq!(files_in(&running), 0);
    // Reported once, and the sleep never ran to completion.
    std::thread::sleep(Duration::from_secs(1));
    let audit = server.json(&["audit", "--target", &job, "--action", "job.execute"]);
    assert_eq!(audit.as_array().unwrap().len(), 1, "{audit:#}");
    assert!(!agent.log_text().contains("job succeeded"));
}

/// Runs a 2 s job on `target`, takes something down while it runs (`outage`), waits
/// for the result to land in the agent's outbox, brings it back (`recovery`), and checks
/// the result arrives, is stored exactly once, and leaves the outbox.
fn across_an_outage(
    server: &mut Server,
    agent: &Agent,
    target: &str,
    outage: impl FnOnce(&mut Server),
    recovery: impl FnOnce(&mut Server),
) {
    // Warm up (fetch and compile), so the timed job is quick once it starts.
    let echo = r#"{"mode":"echo"}"#;
    assert_eq!(
        run_one(server, &["misbehave", "-t", target, "--input", echo])["status"],
        "succeeded"
    );

    let job = submit(server, target, r#"{"mode":"sleep","seconds":2}"#, "60s");
    let running = agent.data_dir.join("running");
    wait_for(Duration::from_secs(30), "the job to start", || {
        (files_in(&running) == 1).then_some(())
    });
    outage(server);

    // The job finishes with nobody to tell: its result waits on disk.
    let outbox = agent.data_dir.join("outbox");
    wait_for(Duration::from_secs(30), "the result in the outbox", || {
        (files_in(&running) == 0 && files_in(&outbox) == 1).then_some(())
    });
    recovery(server);

    let r = job_result(server, &job, Duration::from_secs(90));
    assert_eq!(r["status"], "succeeded", "{r:#}");
    assert_eq!(r["output"]["slept"].as_f64(), Some(2.0));
    // Acknowledged end to end: the outbox empties, and the result is stored once.
    wait_for(Duration::from_secs(30), "the outbox to empty", || {
        (files_in(&outbox) == 0).then_some(())
    });
    let audit = server.json(&["audit", "--target", &job, "--action", "job.execute"]);
    assert_eq!(audit.as_array().unwrap().len(), 1, "{audit:#}");
    // Both sides are back: a new job goes through.
    assert_eq!(
        run_one(server, &["misbehave", "-t", target, "--input", echo])["status"],
        "succeeded"
    );
}

/// Crashes the agent at `point` in its first outbox write (a debug-build hook), starts
/// it again, and returns the one result the server stored.
fn crash_in_outbox(point: &str, id: &str) -> (Server, Agent, String, Value) {
    let server = Server::start();
    let mut agent = misbehave_agent(&server, id);
    agent.stop();
    agent.env = vec![("DROVER_TEST_CRASH".into(), point.into())];
    agent.restart();
    server.wait_online(id);
    let job = submit(&server, id, r#"{"mode":"echo","value":"kept"}"#, "30s");
    assert!(
        agent.wait_exit(Duration::from_secs(30)),
        "the agent did not crash at {point}"
    );
    agent.env.clear();
    agent.restart();
    let r = job_result(&server, &job, Duration::from_secs(60));
    (server, agent, job, r)
}

#[test]
fn kill_mid_outbox_write_the_torn_record_is_discarded_and_the_job_reported_interrupted() {
    let (server, agent, job, r) = crash_in_outbox("outbox-mid-write", "torn-1");
    assert_eq!(r["status"], "failed", "{r:#}");
    assert_eq!(failure_kind(&r), "interrupted", "{r:#}");
    let log = agent.log_text();
    assert!(
        log.contains("discarding an outbox write cut short by a crash"),
        "{log}"
    );
    // Nothing torn is left behind, and the interrupted report itself was acknowledged.
    let outbox = agent.data_dir.join("outbox");
    wait_for(Duration::from_secs(20), "the outbox to empty", || {
        (files_in(&outbox) == 0).then_some(())
    });
    let events = server.json(&["agents", "events", "--agent", "torn-1"]);
    assert!(
        !events.to_string().contains(&job),
        "the job appears in events (a second report?): {events:#}"
    );
}

#[test]
fn kill_right_after_an_outbox_write_the_stored_result_wins() {
    let (server, agent, job, r) = crash_in_outbox("outbox-after-write", "synced-1");
    // The result was safe on disk; the restart sends it, and does not call the job
    // interrupted.
    assert_eq!(r["status"], "succeeded", "{r:#}");
    assert_eq!(r["output"]["echo"]["value"], "kept", "{r:#}");
    let log = agent.log_text();
    assert!(
        log.contains("its result is in the outbox")
            && !log.contains("interrupted by an agent stop"),
        "{log}"
    );
    std::thread::sleep(Duration::from_secs(1));
    let events = server.json(&["agents", "events", "--agent", "synced-1"]);
    assert!(
        !events.to_string().contains(&job),
        "a second report for the job: {events:#}"
    );
}

#[test]
fn results_wait_in_the_outbox_while_the_server_and_its_broker_are_down() {
    let mut server = Server::start_restartable();
    let agent = misbehave_agent(&server, "patient-1");
    across_an_outage(
        &mut server,
        &agent,
        "patient-1",
        Server::stop,
        Server::restart,
    );
}

/// The agent is away when a job is sent to it. It comes back while the server still
/// runs (the broker's queued copy and the control plane's resent copy meet: one run),
/// then again after a server restart, which the embedded broker's queue (in memory)
/// does not survive: the control plane sends the envelope again from its store.
#[test]
fn a_job_for_an_absent_agent_arrives_once_even_across_a_server_restart() {
    let mut server = Server::start_restartable();
    let mut agent = misbehave_agent(&server, "away-1");
    let away = |server: &Server| {
        wait_for(Duration::from_secs(30), "away-1 offline", || {
            server.agent_row("away-1").filter(|a| a["online"] == false)
        });
    };
    let echo = r#"{"mode":"echo"}"#;
    let runs = |job: &str, server: &Server| {
        let audit = server.json(&["audit", "--target", job, "--action", "job.execute"]);
        audit.as_array().unwrap().len()
    };

    // Back while the server runs. The job lasts a second, so the control plane's copy,
    // sent on hello, finds it in hand.
    agent.stop();
    away(&server);
    let first = submit(&server, "away-1", r#"{"mode":"sleep","seconds":1}"#, "60s");
    agent.restart();
    let r = job_result(&server, &first, Duration::from_secs(60));
    assert_eq!(r["status"], "succeeded", "{r:#}");
    // One of the two copies ran; the other was ignored.
    wait_for(
        Duration::from_secs(30),
        "the second copy to be ignored",
        || {
            agent
                .log_text()
                .contains("another copy of a job in hand; ignored")
                .then_some(())
        },
    );

    // Back after the server (and its broker) restarted.
    agent.stop();
    away(&server);
    let second = submit(&server, "away-1", echo, "60s");
    let before = server.log_text().len();
    server.restart();
    agent.restart();
    let r = job_result(&server, &second, Duration::from_secs(60));
    assert_eq!(r["status"], "succeeded", "{r:#}");
    assert!(
        server.log_text()[before..].contains("sending unanswered job envelopes again"),
        "the second job came back without being sent again"
    );

    // Each ran once (two successes in all; the audit has each result stored once), and
    // no copy was taken for a replay.
    wait_for(Duration::from_secs(30), "the outbox to empty", || {
        (files_in(&agent.data_dir.join("outbox")) == 0).then_some(())
    });
    assert_eq!(runs(&first, &server), 1);
    assert_eq!(runs(&second, &server), 1);
    assert_eq!(agent.log_text().matches("job succeeded").count(), 2);
    let log = agent.log_text();
    assert!(!log.contains("replay refused"), "{log}");
    let events = server.json(&["agents", "events", "--agent", "away-1"]);
    assert!(
        !events.to_string().contains("refused-envelope"),
        "{events:#}"
    );
}

/// A cancel request the broker lost (it went to an agent that was cut off, and the
/// server and its in-memory broker restarted before the agent came back) is sent again
/// when the agent says hello: the job stops instead of running to the end.
#[test]
fn a_lost_cancel_request_is_sent_again_when_the_agent_returns() {
    let mut server = Server::start_restartable();
    let (agent, job) = agent_running_a_sleep(&server, "cut-off-1", 40);

    // Frozen, the agent cannot see its connection go; the new broker has no session for
    // it, so the cancel request reaches nobody.
    agent.signal("STOP");
    server.restart();
    let out = server.cli(&["command", "cancel", &job]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    agent.signal("CONT");

    let r = job_result(&server, &job, Duration::from_secs(30));
    assert_eq!(failure_kind(&r), "cancelled", "{r:#}");
    assert!(
        server.log_text().matches("cancel request sent").count() >= 2,
        "the cancel request was not sent again"
    );
}

/// A small tmpfs, unmounted when dropped.
struct SmallDisk {
    path: std::path::PathBuf,
}

impl SmallDisk {
    fn mount(path: &std::path::Path, size: &str) -> SmallDisk {
        std::fs::create_dir_all(path).unwrap();
        let out = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(path)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "this test mounts a small tmpfs and needs root: {}",
            text(&out.stderr)
        );
        SmallDisk {
            path: path.to_path_buf(),
        }
    }

    /// Fills the disk; returns the filler so it can be removed.
    fn fill(&self) -> std::path::PathBuf {
        use std::io::Write as _;
        let filler = self.path.join("filler");
        let mut f = std::fs::File::create(&filler).unwrap();
        let block = vec![0u8; 64 * 1024];
        while f.write_all(&block).is_ok() {}
        let _ = f.sync_all();
        filler
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        // Lazy, so a process still holding a file cannot keep it mounted.
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.path)
            .status();
    }
}

#[test]
fn a_full_disk_is_a_clear_error_and_the_agent_carries_on() {
    let server = Server::start();
    publish_misbehave(&server);
    let cfg = server.add_agent("cramped-1", &[]);
    let disk = SmallDisk::mount(&server.dir.path().join("disk"), "16m");
    let data = disk.path.join("agent");
    let log = server.dir.path().join("cramped.log");
    let logf = std::fs::File::create(&log).unwrap();
    let mut agent = Killed(
        std::process::Command::new(bin("drover-agent"))
            .arg("--config")
            .arg(&cfg)
            .arg("--data-dir")
            .arg(&data)
            .stdout(logf.try_clone().unwrap())
            .stderr(logf)
            .spawn()
            .unwrap(),
    );
    server.wait_online("cramped-1");
    let echo = |server: &Server| {
        run_one(
            server,
            &[
                "misbehave",
                "-t",
                "cramped-1",
                "--input",
                r#"{"mode":"echo"}"#,
            ],
        )
    };
    assert_eq!(echo(&server)["status"], "succeeded");

    let filler = disk.fill();
    // Whether the refusal comes from the replay log or the outbox depends on which write
    // needs a new page first; either way it is said clearly and the operator hears back.
    let r = echo(&server);
    let text_log = std::fs::read_to_string(&log).unwrap();
    assert!(text_log.contains("No space left on device"), "{text_log}");
    match r["status"].as_str() {
        Some("rejected") => assert!(
            r["failure"]["message"]
                .as_str()
                .unwrap()
                .contains("cannot record the job"),
            "{r:#}"
        ),
        Some("succeeded") => assert!(
            text_log.contains("could not be stored durably"),
            "{text_log}"
        ),
        _ => panic!("unexpected result {r:#}"),
    }
    assert!(agent.0.try_wait().unwrap().is_none(), "the agent died");

    // Space again: work goes on.
    std::fs::remove_file(filler).unwrap();
    assert_eq!(echo(&server)["status"], "succeeded");
    drop(agent);
    drop(disk);
}

#[test]
fn results_survive_an_external_broker_killed_and_restarted_mid_job() {
    let mosq = Mosquitto::start(&[("drover-control", "control-secret")]);
    let mut server = server_on(&mosq, "control-secret");
    publish_misbehave(&server);
    let cfg = server.add_agent("steady-1", &[]);
    mosq.add_user("steady-1", &toml_value(&cfg, "password"));
    let agent = Agent::start("steady-1", &cfg, server.dir.path());
    server.wait_online("steady-1");
    let mosq = std::cell::RefCell::new(mosq);
    across_an_outage(
        &mut server,
        &agent,
        "steady-1",
        |_| mosq.borrow_mut().kill9(),
        |_| mosq.borrow_mut().restart(),
    );
}
