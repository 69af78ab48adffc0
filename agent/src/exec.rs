//! Programs a plugin was granted, run for the `process` import.
//!
//! A program runs directly (no shell) with an empty environment but for [`PATH`], `/` as
//! its working directory, stdin closed, and in a process group of its own. Its stdout and
//! stderr are read concurrently and capped. Nothing it starts outlives the call: when the
//! program exits, when the call times out, and when the call's future is dropped (the
//! job's deadline drops the whole guest call), the group is killed with SIGKILL, and the
//! child itself is killed on drop. A process that leaves the group (`setsid`) escapes
//! this; that needs cgroups, which the agent does not use.

use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt as _};

/// The only environment variable a program gets.
pub const PATH: &str = "/usr/bin:/bin";

/// What a program did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProgramOutput {
    /// Its exit code; `-1` when a signal ended it.
    pub exit_code: i32,
    /// Its stdout, up to the cap.
    pub stdout: Vec<u8>,
    /// Its stderr, up to the cap.
    pub stderr: Vec<u8>,
    /// Whether stdout was cut.
    pub stdout_truncated: bool,
    /// Whether stderr was cut.
    pub stderr_truncated: bool,
}

/// Why a program did not run to the end, for the plugin.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecError {
    /// One sentence.
    pub message: String,
    /// Whether trying again unchanged could help.
    pub retryable: bool,
}

/// Refuses a program that is not exactly one of `granted`.
pub fn check_granted(granted: &[String], program: &str) -> Result<(), ExecError> {
    if granted.iter().any(|p| p == program) {
        Ok(())
    } else {
        Err(ExecError {
            message: format!("program {program} is not granted"),
            retryable: false,
        })
    }
}

/// Runs `program` with `args`, for at most `timeout`, keeping at most `cap` bytes of
/// each output stream. The caller has checked the grant.
pub async fn run(
    program: &str,
    args: &[String],
    timeout: Duration,
    cap: usize,
) -> Result<ProgramOutput, ExecError> {
    let mut cmd = tokio::process::Command::new(program);
    cmd.args(args)
        .env_clear()
        .env("PATH", PATH)
        .current_dir("/")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    #[cfg(unix)]
    cmd.process_group(0);
    let mut child = cmd.spawn().map_err(|e| ExecError {
        message: format!("program {program} could not be started: {e}"),
        retryable: false,
    })?;
    // Declared after `child`, so dropped before it: the group dies while the child is
    // still unreaped and its id cannot have been reused.
    let mut group = ProcessGroup(child.id());
    let (stdout, stderr) = (child.stdout.take(), child.stderr.take());
    let work = async {
        let status = async {
            let status = child.wait().await;
            // Whatever it left behind in its group goes too, closing the pipes they hold.
            group.kill();
            status
        };
        tokio::join!(status, read_capped(stdout, cap), read_capped(stderr, cap))
    };
    let (status, (stdout, stdout_truncated), (stderr, stderr_truncated)) =
        match tokio::time::timeout(timeout, work).await {
            Ok(done) => done,
            Err(_) => {
                return Err(ExecError {
                    message: format!(
                        "program {program} did not finish within {} ms and was killed",
                        timeout.as_millis()
                    ),
                    retryable: true,
                });
            }
        };
    let status = status.map_err(|e| ExecError {
        message: format!("waiting for program {program} failed: {e}"),
        retryable: true,
    })?;
    Ok(ProgramOutput {
        exit_code: status.code().unwrap_or(-1),
        stdout,
        stderr,
        stdout_truncated,
        stderr_truncated,
    })
}

/// Reads `r` to its end, keeping the first `cap` bytes; says whether anything was cut.
/// Reading on past the cap keeps a chatty program from blocking on a full pipe.
async fn read_capped(r: Option<impl AsyncRead + Unpin>, cap: usize) -> (Vec<u8>, bool) {
    let mut kept = Vec::new();
    let mut truncated = false;
    let Some(mut r) = r else {
        return (kept, truncated);
    };
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match r.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                let room = cap.saturating_sub(kept.len());
                kept.extend_from_slice(&buf[..n.min(room)]);
                truncated |= n > room;
            }
        }
    }
    (kept, truncated)
}

/// A process group, killed with SIGKILL when dropped or asked to, once.
struct ProcessGroup(Option<u32>);

impl ProcessGroup {
    fn kill(&mut self) {
        if let Some(id) = self.0.take() {
            kill_group(id);
        }
    }
}

impl Drop for ProcessGroup {
    fn drop(&mut self) {
        self.kill();
    }
}

#[cfg(unix)]
fn kill_group(id: u32) {
    use rustix::process::{Pid, Signal, kill_process_group};
    if let Some(pid) = i32::try_from(id).ok().and_then(Pid::from_raw) {
        // ESRCH means the group is already empty.
        let _ = kill_process_group(pid, Signal::KILL);
    }
}

#[cfg(not(unix))]
fn kill_group(_id: u32) {}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    fn args(a: &[&str]) -> Vec<String> {
        a.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn only_exactly_granted_programs_pass() {
        let granted = args(&["/bin/echo", "/usr/bin/uptime"]);
        assert!(check_granted(&granted, "/bin/echo").is_ok());
        for p in [
            "/bin/sh",
            "echo",
            "/bin//echo",
            "/bin/echo ",
            "/usr/bin/../bin/echo",
        ] {
            let e = check_granted(&granted, p).unwrap_err();
            assert_eq!(e.message, format!("program {p} is not granted"));
            assert!(!e.retryable);
        }
    }

    #[tokio::test]
    async fn runs_without_a_shell_and_with_a_bare_environment() {
        let out = run(
            "/bin/echo",
            &args(&["hello", "$HOME", "a;b"]),
            Duration::from_secs(10),
            1024,
        )
        .await
        .unwrap();
        assert_eq!(out.exit_code, 0);
        assert_eq!(out.stdout, b"hello $HOME a;b\n");
        assert!(!out.stdout_truncated && out.stderr.is_empty());

        let env = run("/usr/bin/env", &[], Duration::from_secs(10), 1024)
            .await
            .unwrap();
        assert_eq!(
            String::from_utf8_lossy(&env.stdout),
            format!("PATH={PATH}\n")
        );

        let pwd = run("/bin/pwd", &[], Duration::from_secs(10), 1024)
            .await
            .unwrap();
        assert_eq!(pwd.stdout, b"/\n");
    }

    #[tokio::test]
    async fn exit_codes_stderr_and_caps_come_back() {
        let out = run(
            "/bin/sh",
            &args(&["-c", "echo oops >&2; head -c 100000 /dev/zero; exit 3"]),
            Duration::from_secs(10),
            1000,
        )
        .await
        .unwrap();
        assert_eq!(out.exit_code, 3);
        assert_eq!(out.stderr, b"oops\n");
        assert_eq!(out.stdout.len(), 1000);
        assert!(out.stdout_truncated && !out.stderr_truncated);

        let e = run("/nonexistent/program", &[], Duration::from_secs(1), 10)
            .await
            .unwrap_err();
        assert!(e.message.contains("could not be started"), "{e:?}");
        assert!(!e.retryable);
    }

    /// Whether any process's command line is exactly `argv`.
    fn running(argv: &[&str]) -> bool {
        let want: Vec<u8> = argv
            .iter()
            .flat_map(|a| [a.as_bytes(), b"\0"].concat())
            .collect();
        std::fs::read_dir("/proc")
            .unwrap()
            .flatten()
            .any(|e| std::fs::read(e.path().join("cmdline")).is_ok_and(|c| c == want))
    }

    fn gone_soon(argv: &[&str]) -> bool {
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(5) {
            if !running(argv) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }

    /// Waits (up to 5 s) until a process with this command line runs; says whether it did.
    async fn started(argv: &[&str]) -> bool {
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(5) {
            if running(argv) {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        false
    }

    #[tokio::test]
    async fn a_timeout_kills_the_program_and_its_children() {
        // The shell starts a grandchild in the background and waits on another.
        let t = Instant::now();
        let script = args(&["-c", "/bin/sleep 61.25 & /bin/sleep 61.5; wait"]);
        let (result, seen) = tokio::join!(
            run("/bin/sh", &script, Duration::from_millis(1500), 100,),
            async {
                started(&["/bin/sleep", "61.25"]).await && started(&["/bin/sleep", "61.5"]).await
            }
        );
        assert!(seen, "the programs never started");
        let e = result.unwrap_err();
        assert!(t.elapsed() < Duration::from_secs(5));
        assert!(e.message.contains("did not finish within 1500 ms"), "{e:?}");
        assert!(e.retryable);
        assert!(
            gone_soon(&["/bin/sleep", "61.25"]),
            "background child survived"
        );
        assert!(gone_soon(&["/bin/sleep", "61.5"]), "child survived");
    }

    #[tokio::test]
    async fn dropping_the_call_kills_the_program() {
        let call = tokio::spawn(async {
            run(
                "/bin/sleep",
                &args(&["62.75"]),
                Duration::from_secs(60),
                100,
            )
            .await
        });
        assert!(started(&["/bin/sleep", "62.75"]).await, "never started");
        call.abort();
        assert!(call.await.unwrap_err().is_cancelled());
        assert!(
            gone_soon(&["/bin/sleep", "62.75"]),
            "program outlived its call"
        );
    }

    #[tokio::test]
    async fn leftovers_in_the_group_die_when_the_program_exits() {
        let out = run(
            "/bin/sh",
            &args(&["-c", "/bin/sleep 63.125 >/dev/null 2>&1 & echo started"]),
            Duration::from_secs(10),
            100,
        )
        .await
        .unwrap();
        assert_eq!(out.stdout, b"started\n");
        assert!(gone_soon(&["/bin/sleep", "63.125"]), "leftover survived");
    }
}
