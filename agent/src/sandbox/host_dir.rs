//! [`HostDir`]: a host directory that a plugin or a job names (a granted read path, a
//! program's working directory), opened once and from then on used through the open
//! handle, never by name again.
//!
//! The policy checks paths as text, so the kernel must not read them otherwise: below
//! the point the operator wrote, every component is resolved without following symbolic
//! links, and a link there is refused whatever it points to. A granted directory in
//! which a less trusted user can make a link (or a manifest naming `ALLOWED/link` where
//! `link -> /etc`) would otherwise hand out what the policy never allowed. The
//! operator's own entry is opened as written: on Debian `/var/run` is a link to `/run`,
//! and naming it is the operator's choice.
//!
//! Resolution is `openat2` with `RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS`, one system call
//! the kernel enforces; where it is missing (Linux before 5.6, or a seccomp filter that
//! refuses it) one `openat` per component with `O_NOFOLLOW`, which is as strict since
//! the paths have no `..` (the policy refuses them).
//!
//! Whatever needs the directory gets it as `/proc/self/fd/N` ([`HostDir::handle_path`]),
//! which names the open directory itself: wasmtime-wasi 48's `preopened_dir` takes only
//! a path (its list of preopens is private to the crate), and std sets a child's
//! working directory only by name (`fchdir` would need `pre_exec`, which is unsafe).
//! Opening that name again re-resolves nothing, so a link swapped in after the check
//! changes nothing either.

use std::fmt;
use std::os::fd::{AsRawFd as _, OwnedFd};
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;

use rustix::fs::{Mode, OFlags, ResolveFlags};
use rustix::io::Errno;

/// An open host directory and the path it was opened as.
#[derive(Debug, Clone)]
pub struct HostDir {
    path: String,
    fd: Arc<OwnedFd>,
}

/// Why a path could not be opened as a [`HostDir`]. Its `Display` names the path.
#[derive(Debug)]
pub struct HostDirError {
    path: String,
    root: PathBuf,
    reason: Reason,
}

#[derive(Debug)]
enum Reason {
    /// A component below the root is a symbolic link.
    Link,
    /// A component is not a directory.
    NotDirectory,
    /// It does not exist.
    Missing,
    /// The path is not below the root, or not absolute, or has `.` or `..`.
    NotBeneath,
    /// Anything else the system said.
    Io(std::io::Error),
}

impl HostDirError {
    /// Whether the path was refused for what it is (a link, not a directory, not
    /// beneath its root) rather than for what the host could not do.
    pub fn is_refusal(&self) -> bool {
        matches!(
            self.reason,
            Reason::Link | Reason::NotDirectory | Reason::NotBeneath
        )
    }
}

impl fmt::Display for HostDirError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (path, root) = (&self.path, self.root.display());
        match &self.reason {
            Reason::Link if self.root == Path::new("/") => write!(
                f,
                "{path} goes through a symbolic link, which is not followed; name the real directory"
            ),
            Reason::Link => write!(
                f,
                "{path} goes through a symbolic link below {root}, which is not followed; name the real directory"
            ),
            Reason::NotDirectory => write!(f, "{path} is not a directory"),
            Reason::Missing => write!(f, "{path} does not exist on this host"),
            Reason::NotBeneath => write!(
                f,
                "{path} is not an absolute path at or below {root} without '.' or '..'"
            ),
            Reason::Io(e) => write!(f, "{path} cannot be opened: {e}"),
        }
    }
}

impl std::error::Error for HostDirError {}

impl HostDir {
    /// Opens `path`, which must be `root` or below it: `root` as written (links in it
    /// followed: the operator wrote it), the rest without following any link.
    /// Blocking: a directory on a hung network mount blocks the caller.
    pub fn open_beneath(root: &Path, path: &str) -> Result<HostDir, HostDirError> {
        let error = |reason| HostDirError {
            path: path.to_string(),
            root: root.to_path_buf(),
            reason,
        };
        let rest = Path::new(path)
            .strip_prefix(root)
            .ok()
            .filter(|_| root.is_absolute() && is_normal(root) && is_normal(Path::new(path)))
            .ok_or_else(|| error(Reason::NotBeneath))?;
        let at_root = open_dir(root).map_err(|e| error(reason(e)))?;
        let fd = if rest.as_os_str().is_empty() {
            at_root
        } else {
            open_below(&at_root, rest).map_err(|e| match reason(e) {
                // A path that would not do even through its links says so first: the
                // link is worth mentioning only if it leads to a directory.
                Reason::Link => error(match std::fs::metadata(path) {
                    Ok(m) if !m.is_dir() => Reason::NotDirectory,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => Reason::Missing,
                    _ => Reason::Link,
                }),
                r => error(r),
            })?
        };
        Ok(HostDir {
            path: path.to_string(),
            fd: Arc::new(fd),
        })
    }

    /// Opens an absolute `path` without following any link in it.
    pub fn open_no_follow(path: &str) -> Result<HostDir, HostDirError> {
        HostDir::open_beneath(Path::new("/"), path)
    }

    /// The path it was opened as.
    pub fn path(&self) -> &str {
        &self.path
    }

    /// A name for the open directory itself, valid while this `HostDir` (or a clone)
    /// lives, and in a child process until it execs.
    pub fn handle_path(&self) -> PathBuf {
        PathBuf::from(format!("/proc/self/fd/{}", self.fd.as_raw_fd()))
    }
}

/// Whether `p` has only a root and plain names: no `.`, no `..`.
fn is_normal(p: &Path) -> bool {
    p.components()
        .all(|c| matches!(c, Component::RootDir | Component::Normal(_)))
}

/// `O_PATH`: the directory is named, not read, so it needs no read permission.
fn dir_flags() -> OFlags {
    OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC
}

fn open_dir(path: &Path) -> rustix::io::Result<OwnedFd> {
    rustix::fs::open(path, dir_flags(), Mode::empty())
}

/// Opens the relative `rest` below `dir`, following no link.
fn open_below(dir: &OwnedFd, rest: &Path) -> rustix::io::Result<OwnedFd> {
    let resolve = ResolveFlags::BENEATH | ResolveFlags::NO_SYMLINKS;
    match rustix::fs::openat2(dir, rest, dir_flags(), Mode::empty(), resolve) {
        Err(Errno::NOSYS | Errno::PERM) => open_below_stepwise(dir, rest),
        r => r,
    }
}

/// [`open_below`] without `openat2`: one component at a time, none followed if it is
/// a link.
fn open_below_stepwise(dir: &OwnedFd, rest: &Path) -> rustix::io::Result<OwnedFd> {
    let mut at: Option<OwnedFd> = None;
    for c in rest.components() {
        let Component::Normal(name) = c else {
            return Err(Errno::XDEV);
        };
        let parent = at.as_ref().unwrap_or(dir);
        let flags = dir_flags() | OFlags::NOFOLLOW;
        let next = rustix::fs::openat(parent, name, flags, Mode::empty()).map_err(|e| {
            // With `O_PATH | O_NOFOLLOW` a link fails `O_DIRECTORY`: say it was a link.
            let link = e == Errno::NOTDIR
                && rustix::fs::statat(parent, name, rustix::fs::AtFlags::SYMLINK_NOFOLLOW)
                    .is_ok_and(|s| rustix::fs::FileType::from_raw_mode(s.st_mode).is_symlink());
            if link { Errno::LOOP } else { e }
        })?;
        at = Some(next);
    }
    at.ok_or(Errno::XDEV)
}

fn reason(e: Errno) -> Reason {
    match e {
        Errno::LOOP => Reason::Link,
        Errno::NOTDIR => Reason::NotDirectory,
        Errno::NOENT => Reason::Missing,
        Errno::XDEV => Reason::NotBeneath,
        e => Reason::Io(e.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `root/` with `sub/deeper/`, `file`, `link -> outside`, `sub/inner -> ..`, and
    /// `outside/` (with `secret` and `dir/`) beside it.
    fn tree(tag: &str) -> (PathBuf, PathBuf) {
        let base = std::fs::canonicalize(std::env::temp_dir())
            .unwrap()
            .join(format!("drover-host-dir-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&base);
        let (root, outside) = (base.join("root"), base.join("outside"));
        std::fs::create_dir_all(root.join("sub/deeper")).unwrap();
        std::fs::create_dir_all(outside.join("dir")).unwrap();
        std::fs::write(root.join("file"), "x").unwrap();
        std::fs::write(outside.join("secret"), "s").unwrap();
        std::os::unix::fs::symlink(&outside, root.join("link")).unwrap();
        std::os::unix::fs::symlink("..", root.join("sub/inner")).unwrap();
        (root, outside)
    }

    fn s(p: &Path) -> String {
        p.to_str().unwrap().to_string()
    }

    fn refused(root: &Path, path: &Path) -> String {
        let e = HostDir::open_beneath(root, &s(path)).unwrap_err();
        assert!(e.is_refusal(), "{e}");
        e.to_string()
    }

    #[test]
    fn links_below_the_root_are_refused_and_real_directories_open() {
        let (root, outside) = tree("beneath");
        let d = HostDir::open_beneath(&root, &s(&root.join("sub/deeper"))).unwrap();
        assert_eq!(d.path(), s(&root.join("sub/deeper")));
        // The handle names the directory that was opened.
        assert_eq!(
            std::fs::canonicalize(d.handle_path()).unwrap(),
            std::fs::canonicalize(root.join("sub/deeper")).unwrap()
        );
        HostDir::open_beneath(&root, &s(&root)).unwrap();

        let msg = refused(&root, &root.join("link"));
        assert!(
            msg.contains("link") && msg.contains("symbolic link"),
            "{msg}"
        );
        refused(&root, &root.join("link/dir"));
        refused(&root, &root.join("sub/inner"));
        let msg = refused(&root, &root.join("file"));
        assert!(msg.ends_with("is not a directory"), "{msg}");
        // Through a link, what is wrong at its end is said first.
        let msg = refused(&root, &root.join("link/secret"));
        assert!(msg.ends_with("is not a directory"), "{msg}");
        let e = HostDir::open_beneath(&root, &s(&root.join("link/nope"))).unwrap_err();
        assert!(
            e.to_string().ends_with("does not exist on this host"),
            "{e}"
        );
        refused(&root, &outside);
        refused(&root, &root.join("sub/../link"));
        let e = HostDir::open_beneath(&root, &s(&root.join("nope"))).unwrap_err();
        assert!(!e.is_refusal() && e.to_string().ends_with("does not exist on this host"));

        // The root itself may be a link: the operator wrote it.
        let d = HostDir::open_beneath(&root.join("link"), &s(&root.join("link"))).unwrap();
        assert!(std::fs::read(d.handle_path().join("secret")).is_ok());
        let _ = std::fs::remove_dir_all(root.parent().unwrap());
    }

    #[test]
    fn the_stepwise_walk_refuses_what_openat2_refuses() {
        let (root, _) = tree("stepwise");
        let at = open_dir(&root).unwrap();
        assert!(open_below_stepwise(&at, Path::new("sub/deeper")).is_ok());
        for bad in ["link", "link/x", "sub/inner", "sub/inner/link"] {
            assert_eq!(
                open_below_stepwise(&at, Path::new(bad)).unwrap_err(),
                Errno::LOOP,
                "{bad}"
            );
            assert_eq!(
                open_below(&at, Path::new(bad)).unwrap_err(),
                Errno::LOOP,
                "{bad}"
            );
        }
        assert_eq!(
            open_below_stepwise(&at, Path::new("file")).unwrap_err(),
            Errno::NOTDIR
        );
        assert_eq!(
            open_below_stepwise(&at, Path::new("../root")).unwrap_err(),
            Errno::XDEV
        );
        let _ = std::fs::remove_dir_all(root.parent().unwrap());
    }
}
