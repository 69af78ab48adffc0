//! `logging`: a plugin's log lines in the agent's log, inside the job's span (which
//! names the job and the plugin), counted and cut so a plugin cannot flood the log.

use super::{Host, v0_1, v0_2};
use v0_2::logging::Level;

/// Most log lines one run may write to the agent's log; the rest are counted and dropped.
const MAX_LOG_LINES: u32 = 1000;
/// Longest log line kept, in bytes.
const MAX_LOG_LINE: usize = 4096;

impl v0_2::logging::Host for Host {
    fn log(&mut self, level: Level, message: String) {
        if self.log_lines >= MAX_LOG_LINES {
            self.log_dropped += 1;
            return;
        }
        self.log_lines += 1;
        let mut msg = message;
        if msg.len() > MAX_LOG_LINE {
            let mut end = MAX_LOG_LINE;
            while !msg.is_char_boundary(end) {
                end -= 1;
            }
            msg.truncate(end);
        }
        match level {
            Level::Trace => tracing::trace!("{msg}"),
            Level::Debug => tracing::debug!("{msg}"),
            Level::Info => tracing::info!("{msg}"),
            Level::Warn => tracing::warn!("{msg}"),
            Level::Error => tracing::error!("{msg}"),
        }
    }
}

impl v0_1::logging::Host for Host {
    fn log(&mut self, level: v0_1::logging::Level, message: String) {
        use v0_1::logging::Level as Old;
        let level = match level {
            Old::Trace => Level::Trace,
            Old::Debug => Level::Debug,
            Old::Info => Level::Info,
            Old::Warn => Level::Warn,
            Old::Error => Level::Error,
        };
        v0_2::logging::Host::log(self, level, message);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_past_the_allowance_are_counted_and_dropped() {
        let mut h = Host::for_test(&[], &[], &[]);
        for _ in 0..MAX_LOG_LINES + 3 {
            v0_1::logging::Host::log(&mut h, v0_1::logging::Level::Trace, "x".repeat(5000));
        }
        assert_eq!(h.log_dropped(), 3);
    }
}
