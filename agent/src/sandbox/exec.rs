//! Programs a plugin was granted, run for the `process` import.
//!
//! A program runs directly (no shell) with an environment of [`PATH`] plus what the
//! request adds, `/` or the requested directory (with no symbolic link in its path) as
//! its working directory, stdin closed, optionally as another user, and in a process
//! group of its own. Its stdout and stderr are read concurrently, capped and counted,
//! and, when asked, offered live to a [`LiveSink`]. Nothing it starts outlives the
//! call: when the program exits, when the call times out, and when the call's future is
//! dropped (the job's deadline drops the whole guest call), the group is killed with
//! SIGKILL, and the child itself is killed on drop. A process that leaves the group
//! (`setsid`) escapes this; that needs cgroups, which the agent does not use.

use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use drover_protocol::job::StreamName;
use drover_protocol::manifest::is_clean_absolute;
use tokio::io::{AsyncRead, AsyncReadExt as _};
use tokio::sync::mpsc;

use super::host_dir::HostDir;

/// The `PATH` every program gets unless its request sets another.
pub const PATH: &str = "/usr/bin:/bin";

/// The `exec` entry that stands for any program given by a clean absolute path. A
/// manifest gets it only from a policy that lists it too.
pub const ANY_PROGRAM: &str = "*";

/// Where the users a program may run as are looked up.
const PASSWD: &str = "/etc/passwd";

/// What to run, and how. The grant is checked by the caller; the rest here, by [`run`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Program {
    /// The program's absolute path.
    pub path: String,
    /// Its arguments, not including the program itself.
    pub args: Vec<String>,
    /// The directory it starts in; `None` is `/`.
    pub working_dir: Option<String>,
    /// Variables added to its environment, in order: a later one wins.
    pub env: Vec<(String, String)>,
    /// Whom it runs as; `None` is the agent's own user.
    pub run_as: Option<User>,
}

impl Program {
    /// `path` with `args`, in `/`, with nothing added to the environment, as the agent's
    /// own user.
    pub fn new(path: impl Into<String>, args: Vec<String>) -> Program {
        Program {
            path: path.into(),
            args,
            working_dir: None,
            env: Vec::new(),
            run_as: None,
        }
    }
}

/// A user a program may run as: one line of `/etc/passwd`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    /// The user's name.
    pub name: String,
    /// Its user id.
    pub uid: u32,
    /// Its primary group id.
    pub gid: u32,
    /// Its home directory, for `HOME`.
    pub home: String,
}

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
    /// How many bytes it wrote to stdout in all, kept or not.
    pub stdout_bytes: u64,
    /// How many bytes it wrote to stderr in all, kept or not.
    pub stderr_bytes: u64,
}

/// Why a program did not run to the end, for the plugin.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecError {
    /// Which kind of reason: it becomes a case of the WIT `plugin-error`.
    pub kind: ExecErrorKind,
    /// One sentence.
    pub message: String,
}

/// The kinds of [`ExecError`], named after the cases of the WIT `plugin-error` they
/// become (`wit/process.wit` documents which is which).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExecErrorKind {
    /// Not granted by the manifest, or not allowed by the agent's policy: a program, a
    /// run-as user, or switching users at all.
    Denied,
    /// The request cannot be carried out as written: a working directory or an
    /// environment variable that cannot be used, a user this host does not have.
    InvalidInput,
    /// The host could not do it now: the program could not be started or waited for,
    /// the user database could not be read.
    Unavailable,
    /// The program was stopped at its timeout.
    TimedOut,
}

impl ExecError {
    fn new(kind: ExecErrorKind, message: String) -> ExecError {
        ExecError { kind, message }
    }

    fn denied(message: String) -> ExecError {
        ExecError::new(ExecErrorKind::Denied, message)
    }

    fn invalid(message: String) -> ExecError {
        ExecError::new(ExecErrorKind::InvalidInput, message)
    }
}

/// Live output of a running program, best effort: the bounded channel drops what a slow
/// reader cannot take, counted. Whether or not it is forwarded, what the program writes
/// is also kept (up to the cap) in the sink's [`Partial`] until the program ends, so the
/// output of a program stopped by its job's deadline or a cancel is not lost.
#[derive(Debug, Clone)]
pub struct LiveSink {
    tx: mpsc::Sender<LiveChunk>,
    dropped: Arc<AtomicU64>,
    partial: Partial,
    forward: bool,
}

/// What the program running now has written so far: stdout, then stderr.
#[derive(Debug, Clone, Default)]
pub struct Partial(Arc<std::sync::Mutex<[Captured; 2]>>);

/// Part of one output stream.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Captured {
    /// The first bytes, up to the cap.
    pub kept: Vec<u8>,
    /// How many bytes were written in all.
    pub total: u64,
}

impl Partial {
    fn lock(&self) -> std::sync::MutexGuard<'_, [Captured; 2]> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn record(&self, stream: StreamName, data: &[u8], cap: usize) {
        let mut streams = self.lock();
        let c = &mut streams[match stream {
            StreamName::Stdout => 0,
            StreamName::Stderr => 1,
        }];
        let room = cap.saturating_sub(c.kept.len());
        c.kept.extend_from_slice(&data[..data.len().min(room)]);
        c.total = c.total.saturating_add(data.len() as u64);
    }

    /// Takes what was kept, leaving nothing: `[stdout, stderr]`.
    pub fn take(&self) -> [Captured; 2] {
        std::mem::take(&mut *self.lock())
    }
}

/// One piece of a program's output, as it was read from its pipe.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LiveChunk {
    /// Which stream it came from.
    pub stream: StreamName,
    /// The bytes, as read: a piece may end inside a UTF-8 sequence or a line.
    pub data: Vec<u8>,
}

impl LiveSink {
    /// A sink holding at most `capacity` pieces (at least 1) that the receiver has not
    /// taken yet; each piece is at most 64 KiB.
    pub fn new(capacity: usize) -> (LiveSink, mpsc::Receiver<LiveChunk>) {
        let (tx, rx) = mpsc::channel(capacity.max(1));
        (
            LiveSink {
                tx,
                dropped: Arc::default(),
                partial: Partial::default(),
                forward: true,
            },
            rx,
        )
    }

    /// This sink, keeping output in its [`Partial`] but forwarding nothing: for programs
    /// whose command did not ask to stream.
    pub fn keep_only(&self) -> LiveSink {
        LiveSink {
            forward: false,
            ..self.clone()
        }
    }

    /// Where the running program's output is kept until it ends.
    pub fn partial(&self) -> Partial {
        self.partial.clone()
    }

    /// How many bytes of output were dropped, in all clones of this sink, because the
    /// channel was full or its receiver gone.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// Keeps a piece (up to `cap` bytes of each stream) and offers it without waiting: a
    /// program is never slowed down by its reader.
    fn offer(&self, stream: StreamName, data: &[u8], cap: usize) {
        self.partial.record(stream, data, cap);
        if !self.forward {
            return;
        }
        let chunk = LiveChunk {
            stream,
            data: data.to_vec(),
        };
        if self.tx.try_send(chunk).is_err() {
            self.dropped.fetch_add(data.len() as u64, Ordering::Relaxed);
        }
    }
}

/// Refuses a program that is not granted: one that is not exactly one of `granted`,
/// or, under a grant of [`ANY_PROGRAM`], one that is not a clean absolute path.
pub fn check_granted(granted: &[String], program: &str) -> Result<(), ExecError> {
    let any = granted.iter().any(|p| p == ANY_PROGRAM);
    if is_clean_absolute(program) && (any || granted.iter().any(|p| p == program)) {
        Ok(())
    } else if any {
        Err(ExecError::denied(format!(
            "program {program:?} is not an absolute path without '.', '..' or '//', which is all a grant of any program allows"
        )))
    } else {
        Err(ExecError::denied(format!(
            "program {program} is not granted"
        )))
    }
}

/// Refuses environment variables that cannot be passed on as they are: an empty name,
/// a name with `=` or NUL, a value with NUL. Values are never quoted: they may be secret.
pub fn check_env(env: &[(String, String)]) -> Result<(), ExecError> {
    for (name, value) in env {
        if name.is_empty() || name.contains(['=', '\0']) {
            return Err(ExecError::invalid(format!(
                "environment variable name {name:?} is invalid: it must be non-empty and contain no '=' or NUL"
            )));
        }
        if value.contains('\0') {
            return Err(ExecError::invalid(format!(
                "environment variable {name} has a NUL byte in its value"
            )));
        }
    }
    Ok(())
}

/// Opens a working directory: a clean absolute path of an existing directory (as the
/// agent sees it) with no symbolic link in it, resolved beneath `/` without following
/// any (see [`super::host_dir`]): a command meant for one directory never runs in the
/// one a link leads to. `None` for `/`, which needs no checking.
pub async fn open_working_dir(dir: &str) -> Result<Option<HostDir>, ExecError> {
    // The default, which every host has: no trip through tokio's blocking pool (a
    // thread handoff each way) for the many commands that do not choose one.
    if dir == "/" {
        return Ok(None);
    }
    if !is_clean_absolute(dir) {
        return Err(ExecError::invalid(format!(
            "working directory {dir:?} must be an absolute path without '.', '..' or '//'"
        )));
    }
    // Off the async workers: a directory on a hung network mount must not stall them.
    let owned = dir.to_string();
    match tokio::task::spawn_blocking(move || HostDir::open_no_follow(&owned)).await {
        Ok(Ok(opened)) => Ok(Some(opened)),
        Ok(Err(e)) => Err(ExecError::invalid(format!("working directory {e}"))),
        Err(e) => Err(ExecError::new(
            ExecErrorKind::Unavailable,
            format!("working directory {dir} could not be checked: {e}"),
        )),
    }
}

/// The user `name`, if the policy's `allowed` list names it and `/etc/passwd` has it.
/// (Only `/etc/passwd`: users that exist only in NSS sources such as LDAP are not found.)
pub fn run_as_user(name: &str, allowed: &[String]) -> Result<User, ExecError> {
    if !allowed.iter().any(|a| a == name) {
        return Err(ExecError::denied(format!(
            "run-as user {name} is not allowed by this agent's policy"
        )));
    }
    let passwd = std::fs::read_to_string(PASSWD).map_err(|e| {
        ExecError::new(
            ExecErrorKind::Unavailable,
            format!("run-as user {name} cannot be looked up: reading {PASSWD} failed: {e}"),
        )
    })?;
    find_user(&passwd, name).ok_or_else(|| {
        ExecError::invalid(format!(
            "run-as user {name} does not exist on this host (not in {PASSWD})"
        ))
    })
}

/// The first well-formed entry for `name` in the text of a passwd file
/// (`name:password:uid:gid:gecos:home:shell`).
fn find_user(passwd: &str, name: &str) -> Option<User> {
    passwd.lines().find_map(|line| {
        let fields: Vec<&str> = line.split(':').collect();
        if fields.len() < 7 || fields[0] != name {
            return None;
        }
        Some(User {
            name: name.to_string(),
            uid: fields[2].parse().ok()?,
            gid: fields[3].parse().ok()?,
            home: fields[5].to_string(),
        })
    })
}

/// Whether switching to `user` needs new ids (`true` when the agent runs as root),
/// or is not needed (`false`: it is the agent's own user); any other user is refused,
/// since only root may switch.
fn needs_switch(euid: u32, user: &User) -> Result<bool, ExecError> {
    if euid == 0 {
        Ok(true)
    } else if euid == user.uid {
        Ok(false)
    } else {
        Err(ExecError::denied(format!(
            "run-as user {} needs the agent to run as root, and it runs as uid {euid}",
            user.name
        )))
    }
}

#[cfg(unix)]
fn effective_uid() -> u32 {
    rustix::process::geteuid().as_raw()
}

#[cfg(not(unix))]
fn effective_uid() -> u32 {
    u32::MAX
}

/// Runs `program` for at most `timeout`, keeping at most `cap` bytes of each output
/// stream and offering everything it writes to `live`, if given. The caller has checked
/// the grant and the run-as policy; the environment, working directory and whether the
/// agent can switch users are checked here.
pub async fn run(
    program: &Program,
    timeout: Duration,
    cap: usize,
    live: Option<&LiveSink>,
) -> Result<ProgramOutput, ExecError> {
    let path = &program.path;
    check_env(&program.env)?;
    let working_dir = program.working_dir.as_deref().unwrap_or("/");
    // Held until the program has started: its handle is the working directory's name.
    let opened = open_working_dir(working_dir).await?;
    let switch = match &program.run_as {
        Some(user) => needs_switch(effective_uid(), user)?,
        None => false,
    };
    let mut cmd = tokio::process::Command::new(path);
    match &opened {
        // The directory that was checked, by its handle: a link made after the check
        // changes nothing.
        Some(dir) if !switch => cmd.current_dir(dir.handle_path()),
        // As another user the directory is entered by name after the switch, so that
        // user's permissions apply to every component of it; the handle, opened as the
        // agent, would skip those above the directory. It was checked just before:
        // only a link made in between gets through.
        _ => cmd.current_dir(working_dir),
    };
    cmd.args(&program.args)
        .env_clear()
        .env("PATH", PATH)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    if let Some(user) = &program.run_as {
        if switch {
            // std sets the group id, then, because no supplementary groups are given,
            // calls `setgroups(0, NULL)` before `setuid`: as root that clears them all,
            // so nothing of the agent's groups is left (std's `CommandExt::uid` docs and
            // its unix `do_exec`). The user's own supplementary groups are not added.
            // The working directory is entered after the switch, as the user.
            #[cfg(unix)]
            cmd.gid(user.gid).uid(user.uid);
        }
        cmd.env("HOME", &user.home)
            .env("USER", &user.name)
            .env("LOGNAME", &user.name);
    }
    // Last, so the request's own variables win (`PATH` included).
    cmd.envs(program.env.iter().map(|(k, v)| (k, v)));
    #[cfg(unix)]
    cmd.process_group(0);
    let mut child = cmd.spawn().map_err(|e| {
        ExecError::new(
            ExecErrorKind::Unavailable,
            format!("program {path} could not be started: {e}"),
        )
    })?;
    drop(opened);
    // Declared after `child`, so dropped before it: the group dies while the child is
    // still unreaped and its id cannot have been reused.
    let mut group = ProcessGroup(child.id());
    let (stdout, stderr) = (child.stdout.take(), child.stderr.take());
    let live_out = live.map(|l| (l, StreamName::Stdout));
    let live_err = live.map(|l| (l, StreamName::Stderr));
    let work = async {
        let status = async {
            let status = child.wait().await;
            // Whatever it left behind in its group goes too, closing the pipes they hold.
            group.kill();
            status
        };
        tokio::join!(
            status,
            read_capped(stdout, cap, live_out),
            read_capped(stderr, cap, live_err)
        )
    };
    let (status, (stdout, stdout_bytes), (stderr, stderr_bytes)) =
        match tokio::time::timeout(timeout, work).await {
            Ok(done) => done,
            Err(_) => {
                return Err(ExecError::new(
                    ExecErrorKind::TimedOut,
                    format!(
                        "program {path} did not finish within {} ms and was killed",
                        timeout.as_millis()
                    ),
                ));
            }
        };
    // It ended on its own: what it wrote comes back whole below, so nothing partial is
    // left for a later stop to report.
    if let Some(live) = live {
        live.partial.take();
    }
    let status = status.map_err(|e| {
        ExecError::new(
            ExecErrorKind::Unavailable,
            format!("waiting for program {path} failed: {e}"),
        )
    })?;
    Ok(ProgramOutput {
        exit_code: status.code().unwrap_or(-1),
        stdout_truncated: stdout_bytes > stdout.len() as u64,
        stderr_truncated: stderr_bytes > stderr.len() as u64,
        stdout,
        stderr,
        stdout_bytes,
        stderr_bytes,
    })
}

/// The largest read buffer for a program's output stream.
const READ_BUF_MAX: usize = 64 << 10;

/// Reads `r` to its end, keeping the first `cap` bytes and offering every piece to
/// `live`; returns what it kept and how many bytes it read in all. Reading on past the
/// cap keeps a chatty program from blocking on a full pipe.
async fn read_capped(
    r: Option<impl AsyncRead + Unpin>,
    cap: usize,
    live: Option<(&LiveSink, StreamName)>,
) -> (Vec<u8>, u64) {
    let mut kept = Vec::new();
    let mut total = 0u64;
    let Some(mut r) = r else {
        return (kept, total);
    };
    // Small at first (most programs write little, and a fleet-wide command runs
    // thousands of them), larger for a program that fills it.
    let mut buf = vec![0u8; 4 << 10];
    loop {
        match r.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if n == buf.len() && buf.len() < READ_BUF_MAX {
                    buf.resize(buf.len() * 2, 0);
                }
                let room = cap.saturating_sub(kept.len());
                kept.extend_from_slice(&buf[..n.min(room)]);
                total = total.saturating_add(n as u64);
                if let Some((sink, stream)) = live {
                    sink.offer(stream, &buf[..n], cap);
                }
            }
        }
    }
    (kept, total)
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

    fn prog(path: &str, a: &[&str]) -> Program {
        Program::new(path, args(a))
    }

    fn sh(script: &str) -> Program {
        prog("/bin/sh", &["-c", script])
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
            "*",
        ] {
            let e = check_granted(&granted, p).unwrap_err();
            assert_eq!(e.message, format!("program {p} is not granted"));
            assert_eq!(e.kind, ExecErrorKind::Denied);
        }
    }

    #[test]
    fn any_program_grants_clean_absolute_paths_only() {
        let granted = args(&[ANY_PROGRAM]);
        for p in ["/bin/sh", "/usr/local/bin/tool", "/no/such/program"] {
            assert!(check_granted(&granted, p).is_ok(), "{p}");
        }
        for p in ["*", "sh", "", "/", "/bin/../bin/sh", "/bin//sh", "/bin/sh/"] {
            let e = check_granted(&granted, p).unwrap_err();
            assert!(e.message.contains("not an absolute path"), "{p}: {e:?}");
            assert_eq!(e.kind, ExecErrorKind::Denied);
        }
    }

    #[tokio::test]
    async fn runs_without_a_shell_and_with_a_bare_environment() {
        let out = run(
            &prog("/bin/echo", &["hello", "$HOME", "a;b"]),
            Duration::from_secs(10),
            1024,
            None,
        )
        .await
        .unwrap();
        assert_eq!(out.exit_code, 0);
        assert_eq!(out.stdout, b"hello $HOME a;b\n");
        assert!(!out.stdout_truncated && out.stderr.is_empty());
        assert_eq!((out.stdout_bytes, out.stderr_bytes), (16, 0));

        let env = run(
            &prog("/usr/bin/env", &[]),
            Duration::from_secs(10),
            1024,
            None,
        )
        .await
        .unwrap();
        assert_eq!(
            String::from_utf8_lossy(&env.stdout),
            format!("PATH={PATH}\n")
        );

        let pwd = run(&prog("/bin/pwd", &[]), Duration::from_secs(10), 1024, None)
            .await
            .unwrap();
        assert_eq!(pwd.stdout, b"/\n");
    }

    #[tokio::test]
    async fn working_directory_and_environment_are_applied() {
        let dir = "/usr";
        let mut p = sh("pwd; echo \"$FOO|$EMPTY|$PATH\"");
        p.working_dir = Some(dir.to_string());
        p.env = vec![
            ("FOO".into(), "bar baz".into()),
            ("EMPTY".into(), String::new()),
            ("PATH".into(), "/bin".into()),
            ("FOO".into(), "later wins".into()),
        ];
        let out = run(&p, Duration::from_secs(10), 1024, None).await.unwrap();
        assert_eq!(out.exit_code, 0, "{}", String::from_utf8_lossy(&out.stderr));
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            format!("{dir}\nlater wins||/bin\n")
        );
    }

    #[tokio::test]
    async fn bad_working_directories_and_environments_are_refused() {
        for (dir, why) in [
            ("relative", "must be an absolute path"),
            ("/tmp/../etc", "must be an absolute path"),
            ("/tmp//x", "must be an absolute path"),
            ("/no/such/directory", "does not exist"),
            ("/bin/sh", "is not a directory"),
        ] {
            let mut p = prog("/bin/pwd", &[]);
            p.working_dir = Some(dir.into());
            let e = run(&p, Duration::from_secs(10), 10, None)
                .await
                .unwrap_err();
            assert!(e.message.contains(why), "{dir}: {e:?}");
            assert_eq!(e.kind, ExecErrorKind::InvalidInput);
        }
        for (name, value, why) in [
            ("", "x", "is invalid"),
            ("A=B", "x", "is invalid"),
            ("A\0", "x", "is invalid"),
            ("SECRET", "s3cret\0", "NUL byte in its value"),
        ] {
            let mut p = prog("/bin/pwd", &[]);
            p.env = vec![(name.into(), value.into())];
            let e = run(&p, Duration::from_secs(10), 10, None)
                .await
                .unwrap_err();
            assert!(e.message.contains(why), "{name:?}: {e:?}");
            assert!(!e.message.contains("s3cret"), "a value leaked: {e:?}");
            assert_eq!(e.kind, ExecErrorKind::InvalidInput);
        }
    }

    #[tokio::test]
    async fn a_working_directory_through_a_link_is_refused() {
        // Canonical: a link above the test's own directory would be refused too.
        let base = std::fs::canonicalize(std::env::temp_dir())
            .unwrap()
            .join(format!("drover-exec-cwd-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&base);
        std::fs::create_dir_all(base.join("real/sub")).unwrap();
        std::os::unix::fs::symlink(base.join("real"), base.join("link")).unwrap();
        let in_dir = |dir: &std::path::Path| {
            let mut p = prog("/bin/pwd", &[]);
            p.working_dir = Some(dir.to_str().unwrap().to_string());
            p
        };
        for dir in [base.join("link"), base.join("link/sub")] {
            let e = run(&in_dir(&dir), Duration::from_secs(10), 100, None)
                .await
                .unwrap_err();
            assert_eq!(e.kind, ExecErrorKind::InvalidInput);
            assert_eq!(
                e.message,
                format!(
                    "working directory {} goes through a symbolic link, which is not followed; name the real directory",
                    dir.display()
                )
            );
        }
        let real = base.join("real/sub");
        let out = run(&in_dir(&real), Duration::from_secs(10), 100, None)
            .await
            .unwrap();
        assert_eq!(out.stdout, format!("{}\n", real.display()).into_bytes());
        let _ = std::fs::remove_dir_all(&base);
    }

    #[tokio::test]
    async fn exit_codes_stderr_caps_and_totals_come_back() {
        let out = run(
            &sh("echo oops >&2; head -c 100000 /dev/zero; exit 3"),
            Duration::from_secs(10),
            1000,
            None,
        )
        .await
        .unwrap();
        assert_eq!(out.exit_code, 3);
        assert_eq!(out.stderr, b"oops\n");
        assert_eq!(out.stdout.len(), 1000);
        assert!(out.stdout_truncated && !out.stderr_truncated);
        assert_eq!((out.stdout_bytes, out.stderr_bytes), (100_000, 5));

        let e = run(
            &prog("/nonexistent/program", &[]),
            Duration::from_secs(1),
            10,
            None,
        )
        .await
        .unwrap_err();
        assert!(e.message.contains("could not be started"), "{e:?}");
        assert_eq!(e.kind, ExecErrorKind::Unavailable);
    }

    #[tokio::test]
    async fn a_stopped_program_leaves_its_output_so_far_and_a_finished_one_nothing() {
        let (sink, mut rx) = LiveSink::new(64);
        let quiet = sink.keep_only();
        // Stopped by its timeout: what it wrote is kept, capped, with the full count.
        let e = run(
            &sh("echo hello; printf 'x%.0s' $(seq 50) >&2; sleep 5"),
            Duration::from_millis(700),
            20,
            Some(&quiet),
        )
        .await
        .unwrap_err();
        assert!(e.message.contains("did not finish"), "{e:?}");
        let [out, err] = sink.partial().take();
        assert_eq!(out.kept, b"hello\n");
        assert_eq!(err.kept.len(), 20);
        assert_eq!(err.total, 50);
        // Nothing was forwarded: the command did not ask to stream.
        assert!(rx.try_recv().is_err());
        // A program that ends on its own returns its output; nothing partial is left.
        run(&sh("echo done"), Duration::from_secs(10), 20, Some(&quiet))
            .await
            .unwrap();
        assert_eq!(
            sink.partial().take(),
            [Captured::default(), Captured::default()]
        );
    }

    #[tokio::test]
    async fn live_output_arrives_in_order_per_stream() {
        let (sink, mut rx) = LiveSink::new(64);
        let out = run(
            &sh("echo one; echo err >&2; sleep 0.1; echo two"),
            Duration::from_secs(10),
            1024,
            Some(&sink),
        )
        .await
        .unwrap();
        drop(sink);
        let (mut live_out, mut live_err) = (Vec::new(), Vec::new());
        while let Some(c) = rx.recv().await {
            match c.stream {
                StreamName::Stdout => live_out.extend(c.data),
                StreamName::Stderr => live_err.extend(c.data),
            }
        }
        assert_eq!(live_out, out.stdout);
        assert_eq!(live_out, b"one\ntwo\n");
        assert_eq!(live_err, b"err\n");
    }

    #[tokio::test]
    async fn a_full_live_sink_drops_and_counts_but_never_blocks() {
        // Room for one piece and nobody reading: the rest is dropped, counted in bytes.
        let (sink, rx) = LiveSink::new(1);
        let out = run(
            &sh("head -c 1000000 /dev/zero"),
            Duration::from_secs(10),
            100,
            Some(&sink),
        )
        .await
        .unwrap();
        assert_eq!(out.stdout_bytes, 1_000_000);
        assert!(out.stdout_truncated);
        let kept: u64 = {
            let mut rx = rx;
            let mut n = 0;
            while let Ok(c) = rx.try_recv() {
                n += c.data.len() as u64;
            }
            n
        };
        assert!(kept > 0);
        assert_eq!(kept + sink.dropped(), 1_000_000);
        // A receiver that is gone counts as a slow one.
        let (sink, rx) = LiveSink::new(8);
        drop(rx);
        run(&sh("echo gone"), Duration::from_secs(10), 100, Some(&sink))
            .await
            .unwrap();
        assert_eq!(sink.dropped(), 5);
    }

    #[test]
    fn users_are_found_in_passwd_text() {
        let passwd = "root:x:0:0:root:/root:/bin/bash\n\
                      # a comment\n\
                      broken:x:nope:1:b:/b:/bin/sh\n\
                      short:x:5:5\n\
                      nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n";
        assert_eq!(
            find_user(passwd, "nobody"),
            Some(User {
                name: "nobody".into(),
                uid: 65534,
                gid: 65534,
                home: "/nonexistent".into()
            })
        );
        assert_eq!(find_user(passwd, "root").map(|u| u.uid), Some(0));
        for missing in ["broken", "short", "nobod", "", "# a comment"] {
            assert_eq!(find_user(passwd, missing), None, "{missing}");
        }
    }

    #[test]
    fn run_as_needs_the_policy_and_root_or_the_same_user() {
        let e = run_as_user("nobody", &args(&["daemon"])).unwrap_err();
        assert_eq!(
            e.message,
            "run-as user nobody is not allowed by this agent's policy"
        );
        assert_eq!(e.kind, ExecErrorKind::Denied);
        let e = run_as_user("no-such-user-here", &args(&["no-such-user-here"])).unwrap_err();
        assert!(e.message.contains("does not exist on this host"), "{e:?}");
        assert_eq!(e.kind, ExecErrorKind::InvalidInput);

        let nobody = User {
            name: "nobody".into(),
            uid: 65534,
            gid: 65534,
            home: "/nonexistent".into(),
        };
        assert_eq!(needs_switch(0, &nobody), Ok(true));
        assert_eq!(needs_switch(65534, &nobody), Ok(false));
        let e = needs_switch(1000, &nobody).unwrap_err();
        assert_eq!(e.kind, ExecErrorKind::Denied);
        assert_eq!(
            e.message,
            "run-as user nobody needs the agent to run as root, and it runs as uid 1000"
        );
    }

    #[tokio::test]
    async fn runs_as_another_user_when_root() {
        let user = run_as_user("nobody", &args(&["nobody"])).unwrap();
        let mut p = sh("id -u; id -g; id -G; echo \"$HOME $USER $LOGNAME\"");
        p.run_as = Some(user.clone());
        let result = run(&p, Duration::from_secs(10), 1024, None).await;
        if effective_uid() != 0 {
            let e = result.unwrap_err();
            assert!(
                e.message.contains("needs the agent to run as root"),
                "{e:?}"
            );
            return;
        }
        let out = result.unwrap();
        let (uid, gid) = (user.uid.to_string(), user.gid.to_string());
        let expected = format!("{uid}\n{gid}\n{gid}\n{} nobody nobody\n", user.home);
        assert_eq!(String::from_utf8_lossy(&out.stdout), expected);
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
        let script = sh("/bin/sleep 61.25 & /bin/sleep 61.5; wait");
        let (result, seen) = tokio::join!(
            run(&script, Duration::from_millis(1500), 100, None),
            async {
                started(&["/bin/sleep", "61.25"]).await && started(&["/bin/sleep", "61.5"]).await
            }
        );
        assert!(seen, "the programs never started");
        let e = result.unwrap_err();
        assert!(t.elapsed() < Duration::from_secs(5));
        assert!(e.message.contains("did not finish within 1500 ms"), "{e:?}");
        assert_eq!(e.kind, ExecErrorKind::TimedOut);
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
                &prog("/bin/sleep", &["62.75"]),
                Duration::from_secs(60),
                100,
                None,
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
            &sh("/bin/sleep 63.125 >/dev/null 2>&1 & echo started"),
            Duration::from_secs(10),
            100,
            None,
        )
        .await
        .unwrap();
        assert_eq!(out.stdout, b"started\n");
        assert!(gone_soon(&["/bin/sleep", "63.125"]), "leftover survived");
    }
}
