//! Plugins built against an older contract keep running: the `legacy` fixture, built
//! against `drover:plugin@0.1.0` (`wit/v0.1.0`), on a real agent through the real
//! binaries; and the error cases of the current contract reaching the result.

use serde_json::{Value, json};

use super::support::*;

fn run(server: &Server, plugin: &str, agent: &str, input: &Value) -> Value {
    let input = input.to_string();
    run_one(server, &[plugin, "-t", agent, "--input", input.as_str()])
}

#[test]
fn a_plugin_built_against_0_1_0_runs_on_this_agent() {
    let server = Server::start();
    server.publish(
        &plugin("drover-plugin-legacy"),
        "legacy",
        1,
        "task",
        &["--exec", "/bin/echo"],
        None,
    );
    let cfg = server.add_agent("compat-1", &["--allow-exec", "/bin/echo"]);
    let mut agent = Agent::start("compat-1", &cfg, server.dir.path());
    server.wait_online("compat-1");

    // Its output.
    let r = run(
        &server,
        "legacy",
        "compat-1",
        &json!({"mode": "echo", "n": 7}),
    );
    assert_eq!(r["status"], "succeeded", "{r:#}");
    assert_eq!(r["output"]["echo"]["n"], 7, "{r:#}");
    assert_eq!(r["output"]["contract"], "0.1.0", "{r:#}");

    // Its error: a record whose retryable flag is kept, with no case of the new variant.
    let r = run(
        &server,
        "legacy",
        "compat-1",
        &json!({"mode": "fail", "message": "try later"}),
    );
    assert_eq!(r["status"], "failed", "{r:#}");
    assert_eq!(failure_kind(&r), "plugin_error", "{r:#}");
    assert_eq!(r["failure"]["message"], "try later");
    assert_eq!(r["failure"]["retryable"], true, "{r:#}");
    assert!(r["failure"].get("plugin_error").is_none(), "{r:#}");

    // A program it ran through the 0.1.0 `process` import.
    let r = run(
        &server,
        "legacy",
        "compat-1",
        &json!({"mode": "exec", "program": "/bin/echo", "args": ["from", "0.1.0"]}),
    );
    assert_eq!(r["status"], "succeeded", "{r:#}");
    assert_eq!(r["output"]["exit_code"], 0);
    assert_eq!(r["output"]["stdout"], "from 0.1.0\n");

    // And the import's errors come back as 0.1.0 reported them.
    let r = run(
        &server,
        "legacy",
        "compat-1",
        &json!({"mode": "exec", "program": "/bin/sh"}),
    );
    assert_eq!(failure_kind(&r), "plugin_error", "{r:#}");
    assert_eq!(r["failure"]["message"], "program /bin/sh is not granted");
    assert_eq!(r["failure"]["retryable"], false);

    assert!(agent.is_running(), "the agent died: {}", agent.log_text());
}

#[test]
fn a_plugin_error_case_reaches_the_result() {
    let server = Server::start();
    publish_misbehave(&server);
    let cfg = server.add_agent("cases-1", &[]);
    let _agent = Agent::start("cases-1", &cfg, server.dir.path());
    server.wait_online("cases-1");

    let r = run(&server, "misbehave", "cases-1", &json!({"mode": "fail"}));
    assert_eq!(r["status"], "failed", "{r:#}");
    assert_eq!(failure_kind(&r), "plugin_error", "{r:#}");
    assert_eq!(r["failure"]["plugin_error"], "unavailable", "{r:#}");
    assert_eq!(r["failure"]["retryable"], true, "{r:#}");
    assert_eq!(r["failure"]["message"], "asked to fail");

    let r = run(
        &server,
        "misbehave",
        "cases-1",
        &json!({"mode": "no-such-mode"}),
    );
    assert_eq!(r["failure"]["plugin_error"], "invalid_input", "{r:#}");
    assert_eq!(r["failure"]["retryable"], false, "{r:#}");
}
