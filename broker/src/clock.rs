//! The time the server decides by: passed to everything whose behaviour depends on it
//! (deadlines, delivery timeouts, schedules), so that tests can run it on tokio's paused
//! clock and move it forward at will.

use std::sync::Arc;

/// Wall-clock time as Unix milliseconds.
#[derive(Clone)]
pub struct Clock(Arc<Source>);

enum Source {
    System,
    /// Starts at `origin_ms` and advances with tokio's clock, which a test may pause
    /// (`#[tokio::test(start_paused = true)]`) and advance (`tokio::time::advance`).
    Tokio {
        origin_ms: u64,
        origin: tokio::time::Instant,
    },
}

impl std::fmt::Debug for Clock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &*self.0 {
            Source::System => f.write_str("Clock::system"),
            Source::Tokio { origin_ms, .. } => write!(f, "Clock::tokio({origin_ms})"),
        }
    }
}

impl Clock {
    /// The system's clock.
    pub fn system() -> Clock {
        Clock(Arc::new(Source::System))
    }

    /// A clock that reads `start_ms` now and then moves with tokio's clock.
    pub fn tokio(start_ms: u64) -> Clock {
        Clock(Arc::new(Source::Tokio {
            origin_ms: start_ms,
            origin: tokio::time::Instant::now(),
        }))
    }

    /// The time now, Unix milliseconds.
    pub fn now_ms(&self) -> u64 {
        match &*self.0 {
            Source::System => drover_protocol::now_ms(),
            Source::Tokio { origin_ms, origin } => origin_ms + origin.elapsed().as_millis() as u64,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test(start_paused = true)]
    async fn a_tokio_clock_moves_only_with_tokio_time() {
        let clock = Clock::tokio(1_000);
        assert_eq!(clock.now_ms(), 1_000);
        tokio::time::advance(Duration::from_secs(90)).await;
        assert_eq!(clock.now_ms(), 91_000);
    }
}
