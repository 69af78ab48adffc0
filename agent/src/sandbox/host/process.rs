//! `process`: granted programs, run by [`crate::sandbox::exec`] within the job's
//! deadline. Arguments and environments are never logged: they may carry parameters.

use std::time::{Duration, Instant};

use super::{Host, v0_1, v0_2};
use crate::sandbox::exec::{self, ExecError, ExecErrorKind};
use v0_2::process::{Command, CommandOutput};
use v0_2::types::PluginError;

/// A program that did not run to the end, as the 0.2.0 error case it is.
fn plugin_error(e: ExecError) -> PluginError {
    let ExecError { kind, message } = e;
    match kind {
        ExecErrorKind::Denied => PluginError::Denied(message),
        ExecErrorKind::InvalidInput => PluginError::InvalidInput(message),
        ExecErrorKind::Unavailable => PluginError::Unavailable(message),
        ExecErrorKind::TimedOut => PluginError::TimedOut(message),
    }
}

impl v0_2::process::Host for Host {
    async fn run(&mut self, request: Command) -> Result<CommandOutput, PluginError> {
        let Command {
            program,
            args,
            timeout_ms,
            working_dir,
            env,
            run_as,
            stream_output,
        } = request;
        if let Err(e) = exec::check_granted(&self.exec, &program) {
            tracing::warn!(
                program = %program,
                "plugin asked to run a program it was not granted; refused"
            );
            return Err(plugin_error(e));
        }
        let run_as = match run_as.as_deref() {
            None => None,
            Some(name) => match exec::run_as_user(name, &self.run_as) {
                Ok(user) => Some(user),
                Err(e) => {
                    tracing::warn!(
                        program = %program,
                        run_as = %name,
                        "plugin asked to run a program as a user it may not; refused: {}",
                        e.message
                    );
                    return Err(plugin_error(e));
                }
            },
        };
        let remaining = self.deadline.saturating_duration_since(Instant::now());
        let timeout = timeout_ms.map_or(remaining, |ms| {
            remaining.min(Duration::from_millis(ms.into()))
        });
        let program = exec::Program {
            path: program,
            args,
            working_dir,
            env,
            run_as,
        };
        let live = self.live.as_ref().map(|l| {
            if stream_output {
                l.clone()
            } else {
                l.keep_only()
            }
        });
        let started = Instant::now();
        let result = exec::run(&program, timeout, self.output_cap, live.as_ref()).await;
        let user = program.run_as.as_ref().map_or("", |u| u.name.as_str());
        match &result {
            Ok(out) => tracing::info!(
                program = %program.path,
                run_as = %user,
                exit_code = out.exit_code,
                ms = started.elapsed().as_millis() as u64,
                "plugin ran a program"
            ),
            Err(e) => tracing::warn!(
                program = %program.path,
                run_as = %user,
                "plugin's program did not run: {}",
                e.message
            ),
        }
        let exec::ProgramOutput {
            exit_code,
            stdout,
            stderr,
            stdout_truncated,
            stderr_truncated,
            stdout_bytes,
            stderr_bytes,
        } = result.map_err(plugin_error)?;
        Ok(CommandOutput {
            exit_code,
            stdout,
            stderr,
            stdout_truncated,
            stderr_truncated,
            stdout_bytes,
            stderr_bytes,
        })
    }
}

impl v0_1::process::Host for Host {
    async fn run(
        &mut self,
        request: v0_1::process::Command,
    ) -> Result<v0_1::process::CommandOutput, v0_1::types::PluginError> {
        let v0_1::process::Command {
            program,
            args,
            timeout_ms,
            working_dir,
            env,
            run_as,
            stream_output,
        } = request;
        let request = Command {
            program,
            args,
            timeout_ms,
            working_dir,
            env,
            run_as,
            stream_output,
        };
        match v0_2::process::Host::run(self, request).await {
            Ok(CommandOutput {
                exit_code,
                stdout,
                stderr,
                stdout_truncated,
                stderr_truncated,
                stdout_bytes,
                stderr_bytes,
            }) => Ok(v0_1::process::CommandOutput {
                exit_code,
                stdout,
                stderr,
                stdout_truncated,
                stderr_truncated,
                stdout_bytes,
                stderr_bytes,
            }),
            Err(e) => Err(legacy_error(e)),
        }
    }
}

/// A 0.2.0 error case as 0.1.0's record: only a program stopped at its timeout may
/// do better another time, as 0.1.0 documents.
fn legacy_error(e: PluginError) -> v0_1::types::PluginError {
    let (message, retryable) = match e {
        PluginError::TimedOut(m) => (m, true),
        PluginError::Denied(m)
        | PluginError::InvalidInput(m)
        | PluginError::Unavailable(m)
        | PluginError::Failed(m) => (m, false),
    };
    v0_1::types::PluginError { message, retryable }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sandbox::exec::LiveSink;
    use v0_2::process::Host as _;

    fn command(program: &str, args: &[&str], timeout_ms: Option<u32>) -> Command {
        Command {
            program: program.into(),
            args: args.iter().map(|s| s.to_string()).collect(),
            timeout_ms,
            working_dir: None,
            env: Vec::new(),
            run_as: None,
            stream_output: false,
        }
    }

    fn message(e: &PluginError) -> &str {
        match e {
            PluginError::Denied(m)
            | PluginError::InvalidInput(m)
            | PluginError::Unavailable(m)
            | PluginError::TimedOut(m)
            | PluginError::Failed(m) => m,
        }
    }

    #[tokio::test]
    async fn runs_only_granted_programs() {
        let mut h = Host::for_test(&["/bin/echo"], &[], &[]);
        let out = h.run(command("/bin/echo", &["hello"], None)).await.unwrap();
        assert_eq!((out.exit_code, out.stdout), (0, b"hello\n".to_vec()));
        let e = h
            .run(command("/bin/sh", &["-c", "echo hi"], None))
            .await
            .unwrap_err();
        assert!(
            matches!(&e, PluginError::Denied(m) if m == "program /bin/sh is not granted"),
            "{e:?}"
        );
    }

    #[tokio::test]
    async fn stops_at_the_job_deadline() {
        let mut h = Host::for_test(&["/bin/sleep"], &[], &[]);
        h.deadline = Instant::now() + Duration::from_millis(300);
        let t = Instant::now();
        let e = h
            .run(command("/bin/sleep", &["30"], Some(60_000)))
            .await
            .unwrap_err();
        assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
        assert!(
            matches!(&e, PluginError::TimedOut(m) if m.contains("did not finish")),
            "{e:?}"
        );
        // The request's own timeout applies when it is the shorter one.
        h.deadline = Instant::now() + Duration::from_secs(60);
        let e = h
            .run(command("/bin/sleep", &["30"], Some(200)))
            .await
            .unwrap_err();
        assert!(message(&e).contains("within 200 ms"), "{e:?}");
    }

    #[tokio::test]
    async fn applies_the_working_directory_and_environment() {
        let mut h = Host::for_test(&["/bin/sh"], &[], &[]);
        let mut c = command("/bin/sh", &["-c", "pwd; echo \"$FOO\"; echo $PATH"], None);
        c.working_dir = Some("/usr".into());
        c.env = vec![("FOO".into(), "bar".into())];
        let out = h.run(c.clone()).await.unwrap();
        assert_eq!(out.exit_code, 0);
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            format!("/usr\nbar\n{}\n", exec::PATH)
        );
        c.env = vec![("A=B".into(), "x".into())];
        let e = h.run(c.clone()).await.unwrap_err();
        assert!(
            matches!(&e, PluginError::InvalidInput(m) if m.contains("environment variable name")),
            "{e:?}"
        );
        c.env.clear();
        c.working_dir = Some("/no/such/dir".into());
        let e = h.run(c).await.unwrap_err();
        assert_eq!(
            message(&e),
            "working directory /no/such/dir does not exist on this host"
        );
        let e = h
            .run(command("/no/such/program", &[], None))
            .await
            .unwrap_err();
        assert!(matches!(e, PluginError::Denied(_)), "not granted: {e:?}");
        let mut any = Host::for_test(&[exec::ANY_PROGRAM], &[], &[]);
        let e = any
            .run(command("/no/such/program", &[], None))
            .await
            .unwrap_err();
        assert!(
            matches!(&e, PluginError::Unavailable(m) if m.contains("could not be started")),
            "{e:?}"
        );
    }

    #[tokio::test]
    async fn reports_totals_when_output_is_cut() {
        let mut h = Host::for_test(&["/bin/sh"], &[], &[]);
        let out = h
            .run(command(
                "/bin/sh",
                &["-c", "head -c 5000 /dev/zero; head -c 3000 /dev/zero >&2"],
                None,
            ))
            .await
            .unwrap();
        assert_eq!((out.stdout.len(), out.stderr.len()), (1024, 1024));
        assert!(out.stdout_truncated && out.stderr_truncated);
        assert_eq!((out.stdout_bytes, out.stderr_bytes), (5000, 3000));
    }

    #[tokio::test]
    async fn streams_live_output_only_when_asked() {
        let mut h = Host::for_test(&["/bin/echo"], &[], &[]);
        let (sink, mut rx) = LiveSink::new(16);
        h.live = Some(sink);
        let mut c = command("/bin/echo", &["quiet"], None);
        h.run(c.clone()).await.unwrap();
        assert!(rx.try_recv().is_err(), "streamed without being asked");
        c.args = vec!["loud".into()];
        c.stream_output = true;
        let out = h.run(c).await.unwrap();
        let chunk = rx.try_recv().unwrap();
        assert_eq!(chunk.stream, drover_protocol::job::StreamName::Stdout);
        assert_eq!(chunk.data, b"loud\n");
        assert_eq!(out.stdout, b"loud\n", "the output comes back whole too");
    }

    #[tokio::test]
    async fn runs_under_an_any_program_grant() {
        let mut h = Host::for_test(&[exec::ANY_PROGRAM], &[], &[]);
        let out = h.run(command("/bin/echo", &["any"], None)).await.unwrap();
        assert_eq!(out.stdout, b"any\n");
        for program in ["echo", "*", "/bin/../bin/echo"] {
            let e = h.run(command(program, &[], None)).await.unwrap_err();
            assert!(
                matches!(&e, PluginError::Denied(m) if m.contains("not an absolute path")),
                "{program}: {e:?}"
            );
        }
    }

    #[tokio::test]
    async fn run_as_a_user_needs_the_policy() {
        let mut h = Host::for_test(&["/usr/bin/id"], &[], &[]);
        let mut c = command("/usr/bin/id", &["-un"], None);
        c.run_as = Some("nobody".into());
        let e = h.run(c.clone()).await.unwrap_err();
        assert!(
            matches!(&e, PluginError::Denied(m) if m == "run-as user nobody is not allowed by this agent's policy"),
            "{e:?}"
        );
        h.run_as = vec!["nobody".into()];
        match h.run(c).await {
            Ok(out) => assert_eq!(out.stdout, b"nobody\n"),
            // Not root: only the agent's own user may be named.
            Err(e) => assert!(
                matches!(&e, PluginError::Denied(m) if m.contains("needs the agent to run as root")),
                "{e:?}"
            ),
        }
    }

    /// The 0.1.0 import runs the same programs and reports errors as 0.1.0 did: a
    /// record, retryable only for a program stopped at its timeout.
    #[tokio::test]
    async fn the_v0_1_import_delegates_and_maps_errors_back_to_the_record() {
        use v0_1::process::Host as Old;
        let mut h = Host::for_test(&["/bin/echo", "/bin/sleep"], &[], &[]);
        let old = |program: &str, args: &[&str], timeout_ms| v0_1::process::Command {
            program: program.into(),
            args: args.iter().map(|s| s.to_string()).collect(),
            timeout_ms,
            working_dir: None,
            env: Vec::new(),
            run_as: None,
            stream_output: false,
        };
        let out = Old::run(&mut h, old("/bin/echo", &["old"], None))
            .await
            .unwrap();
        assert_eq!((out.exit_code, out.stdout), (0, b"old\n".to_vec()));
        let e = Old::run(&mut h, old("/bin/sh", &[], None))
            .await
            .unwrap_err();
        assert_eq!(e.message, "program /bin/sh is not granted");
        assert!(!e.retryable);
        let e = Old::run(&mut h, old("/bin/sleep", &["5"], Some(100)))
            .await
            .unwrap_err();
        assert!(e.message.contains("did not finish"), "{e:?}");
        assert!(e.retryable);
        for case in [
            PluginError::Denied("m".into()),
            PluginError::InvalidInput("m".into()),
            PluginError::Unavailable("m".into()),
            PluginError::Failed("m".into()),
        ] {
            assert!(!legacy_error(case).retryable);
        }
    }
}
