//! A command becomes a job of the command runner: the request is checked, and its
//! input is the `command-runner` world's request (`protocol::worlds::command`).

use std::collections::BTreeMap;

use drover_protocol::worlds::command;

use super::types::{COMMAND_PLUGIN, CommandRequest, DEFAULT_OUTPUT_KIB};
use crate::jobs::types::JobRequest;

/// The default deadline of a command on each agent, seconds.
const DEFAULT_TIMEOUT_SECS: u64 = 600;

impl CommandRequest {
    /// The job that runs this command.
    pub fn into_job(self) -> Result<JobRequest, String> {
        match (self.argv.is_empty(), &self.script) {
            (false, None) => {}
            (true, Some(script)) if !script.trim().is_empty() => {}
            (true, _) => return Err("a command needs argv or a script".into()),
            (false, Some(_)) => return Err("give argv or a script, not both".into()),
        }
        let input = command::CommandRequest {
            shell: self.script.as_ref().and(self.shell.clone()),
            argv: self.argv,
            script: self.script,
            cwd: self.cwd,
            env: self.env,
            run_as: self.run_as,
            stream: self.stream.unwrap_or(true),
        };
        Ok(JobRequest {
            plugin: self.plugin.unwrap_or_else(|| COMMAND_PLUGIN.to_string()),
            version: None,
            targets: self.targets,
            input: serde_json::to_value(&input).map_err(|e| e.to_string())?,
            timeout_secs: Some(self.timeout_secs.unwrap_or(DEFAULT_TIMEOUT_SECS)),
            memory_mib: None,
            output_kib: Some(self.output_kib.unwrap_or(DEFAULT_OUTPUT_KIB)),
            delivery_secs: self.delivery_secs,
            parameters: BTreeMap::new(),
            secrets: BTreeMap::new(),
            rate: Some(self.rate),
        })
    }

    /// What it runs, in one line: the program and arguments, or the script.
    pub fn describe(&self) -> String {
        match &self.script {
            Some(script) => format!("script {script:?}"),
            None => format!("{:?}", self.argv),
        }
    }
}

/// What a command's job input runs, in one line; None if it is not a command.
pub fn describe_input(input: &serde_json::Value) -> Option<String> {
    let req: command::CommandRequest = serde_json::from_value(input.clone()).ok()?;
    Some(match req.script {
        Some(s) => s,
        None => req.argv.join(" "),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::jobs::types::RateRequest;

    #[test]
    fn commands_become_rate_controlled_jobs_of_the_command_runner() {
        let job = CommandRequest {
            targets: "all".into(),
            argv: vec!["uname".into(), "-a".into()],
            rate: RateRequest {
                max_concurrency: Some("10%".into()),
                ..Default::default()
            },
            env: [("A".to_string(), "1".to_string())].into(),
            ..Default::default()
        }
        .into_job()
        .unwrap();
        assert_eq!(job.plugin, COMMAND_PLUGIN);
        assert_eq!(job.input["argv"], serde_json::json!(["uname", "-a"]));
        assert_eq!(job.input["env"]["A"], "1");
        assert_eq!(job.input["stream"], true);
        assert_eq!(job.output_kib, Some(1024));
        assert_eq!(job.rate.unwrap().max_concurrency.as_deref(), Some("10%"));
        // The input is exactly the world's request: the agent reads it as one.
        let back: command::CommandRequest = serde_json::from_value(job.input.clone()).unwrap();
        assert_eq!(back.argv, ["uname", "-a"]);
        assert_eq!(describe_input(&job.input).as_deref(), Some("uname -a"));

        let job = CommandRequest {
            targets: "all".into(),
            script: Some("echo hi | wc -c".into()),
            shell: Some("/bin/bash".into()),
            ..Default::default()
        }
        .into_job()
        .unwrap();
        assert_eq!(job.input["script"], "echo hi | wc -c");
        assert_eq!(job.input["shell"], "/bin/bash");
        assert!(job.input.get("argv").is_none());
        for bad in [
            CommandRequest::default(),
            CommandRequest {
                argv: vec!["x".into()],
                script: Some("y".into()),
                ..Default::default()
            },
            CommandRequest {
                script: Some("  ".into()),
                ..Default::default()
            },
        ] {
            assert!(bad.into_job().is_err());
        }
    }
}
