//! Resident memory and CPU time of a process, from `/proc`, and the open-file limit.

use std::time::Instant;

use anyhow::Context as _;
use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};

/// One reading of a process.
#[derive(Debug, Clone, Copy)]
pub struct Sample {
    /// Resident set size, bytes (`VmRSS`).
    pub rss_bytes: u64,
    /// Peak resident set size, bytes (`VmHWM`).
    pub peak_rss_bytes: u64,
    /// Resident anonymous memory (heap, stacks), bytes (`RssAnon`; 0 if the kernel
    /// does not say).
    pub anon_bytes: u64,
    /// Resident file-backed memory (mostly the binary's own pages), bytes (`RssFile`).
    pub file_bytes: u64,
    /// User plus system CPU time, seconds.
    pub cpu_secs: f64,
    /// User plus system CPU time of its children that have ended and been waited
    /// for, seconds.
    pub children_cpu_secs: f64,
    /// When it was read.
    pub at: Instant,
}

impl Sample {
    /// Reads `/proc/PID/status` and `/proc/PID/stat`; `None` means this process.
    pub fn of(pid: Option<u32>) -> anyhow::Result<Sample> {
        let dir = match pid {
            Some(p) => format!("/proc/{p}"),
            None => "/proc/self".to_string(),
        };
        let status = std::fs::read_to_string(format!("{dir}/status"))
            .with_context(|| format!("reading {dir}/status"))?;
        let stat = std::fs::read_to_string(format!("{dir}/stat"))
            .with_context(|| format!("reading {dir}/stat"))?;
        let kib = |key| status_kib(&status, key).with_context(|| format!("no {key} in {dir}"));
        let ticks = stat_cpu_ticks(&stat).with_context(|| format!("unreadable {dir}/stat"))?;
        let children =
            stat_children_cpu_ticks(&stat).with_context(|| format!("unreadable {dir}/stat"))?;
        let per_sec = rustix::param::clock_ticks_per_second() as f64;
        Ok(Sample {
            rss_bytes: kib("VmRSS")? * 1024,
            peak_rss_bytes: kib("VmHWM")? * 1024,
            anon_bytes: status_kib(&status, "RssAnon").unwrap_or(0) * 1024,
            file_bytes: status_kib(&status, "RssFile").unwrap_or(0) * 1024,
            cpu_secs: ticks as f64 / per_sec,
            children_cpu_secs: children as f64 / per_sec,
            at: Instant::now(),
        })
    }

    /// `"12.0 MiB (anon 4.0, file 8.0)"`.
    pub fn describe_rss(&self) -> String {
        let mib = |b: u64| b as f64 / (1 << 20) as f64;
        format!(
            "{:.1} MiB (anonymous {:.1}, file-backed {:.1})",
            mib(self.rss_bytes),
            mib(self.anon_bytes),
            mib(self.file_bytes)
        )
    }

    /// CPU used between `earlier` and this sample, as a share of one core (1.0 = 100 %).
    pub fn cpu_share_since(&self, earlier: &Sample) -> f64 {
        let wall = self.at.duration_since(earlier.at).as_secs_f64();
        if wall <= 0.0 {
            return 0.0;
        }
        (self.cpu_secs - earlier.cpu_secs).max(0.0) / wall
    }
}

/// A `Key:   123 kB` line of `/proc/PID/status`, in KiB.
pub fn status_kib(status: &str, key: &str) -> Option<u64> {
    status.lines().find_map(|l| {
        let rest = l.strip_prefix(key)?.strip_prefix(':')?;
        rest.split_whitespace().next()?.parse().ok()
    })
}

/// utime + stime, in clock ticks, from `/proc/PID/stat`. The command name (field 2)
/// may hold spaces and parentheses, so fields are counted after its last `)`.
pub fn stat_cpu_ticks(stat: &str) -> Option<u64> {
    // utime is field 14, stime field 15.
    Some(stat_field(stat, 14)? + stat_field(stat, 15)?)
}

/// cutime + cstime (the waited-for children's CPU), in clock ticks, from `/proc/PID/stat`.
pub fn stat_children_cpu_ticks(stat: &str) -> Option<u64> {
    Some(stat_field(stat, 16)? + stat_field(stat, 17)?)
}

/// Numeric field `n` (counted from 1, as in proc(5)) of a `/proc/PID/stat` line.
fn stat_field(stat: &str, n: usize) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    // After the name, the first field is the state, field 3.
    rest.split_whitespace().nth(n.checked_sub(3)?)?.parse().ok()
}

/// Raises this process's `RLIMIT_NOFILE`: the soft limit to the hard one, and both to
/// `wanted` if that is higher and the process may (root may). Returns the new soft limit
/// (`None`: unlimited). Children started afterwards inherit it.
pub fn raise_nofile(wanted: u64) -> anyhow::Result<Option<u64>> {
    let lim = getrlimit(Resource::Nofile);
    if let Some(hard) = lim.maximum
        && hard < wanted
    {
        let more = Rlimit {
            current: Some(wanted),
            maximum: Some(wanted),
        };
        if setrlimit(Resource::Nofile, more).is_ok() {
            return Ok(Some(wanted));
        }
    }
    if lim.current != lim.maximum {
        setrlimit(
            Resource::Nofile,
            Rlimit {
                current: lim.maximum,
                maximum: lim.maximum,
            },
        )
        .context("raising RLIMIT_NOFILE")?;
    }
    Ok(getrlimit(Resource::Nofile).current)
}

/// Files a fleet of `agents` needs open at once: each agent holds its MQTT socket and
/// its seen-envelope log, and briefly more while it works; plus the runtime and the
/// HTTP client.
pub fn files_needed(agents: usize) -> u64 {
    agents as u64 * 3 + 256
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_status_and_stat_lines() {
        let status = "Name:\tdrover-agent\nVmHWM:\t    9000 kB\nVmRSS:\t    8123 kB\n";
        assert_eq!(status_kib(status, "VmRSS"), Some(8123));
        assert_eq!(status_kib(status, "VmHWM"), Some(9000));
        assert_eq!(status_kib(status, "VmSwap"), None);
        // A command name with a space and a parenthesis.
        let stat = "42 (a) b) S 1 42 42 0 -1 4194560 100 0 0 0 7 3 5 6 20 0 3 0 100 0 0";
        assert_eq!(stat_cpu_ticks(stat), Some(10));
        assert_eq!(stat_children_cpu_ticks(stat), Some(11));
        assert_eq!(stat_cpu_ticks("garbage"), None);
    }

    #[test]
    fn this_process_can_be_read() {
        let s = Sample::of(None).unwrap();
        assert!(s.rss_bytes > 0 && s.peak_rss_bytes >= s.rss_bytes);
        assert!(raise_nofile(64).unwrap().is_none_or(|n| n >= 64));
    }
}
