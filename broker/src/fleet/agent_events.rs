//! How much of what agents send ends up in the per-agent event log (`drover agents
//! events`): every refusal is a row, and a flood of forged messages must not be a flood
//! of rows. Each agent may have [`BURST`] events recorded at once and one a second after
//! that; what is over is counted, and the log says so twice: when the limit is reached,
//! and how many were not recorded when recording resumes. The store keeps each agent's
//! newest events only (`store::EVENTS_KEPT_PER_AGENT`).

use std::sync::atomic::{AtomicU64, Ordering};

use crate::rate::{Allowances, Take};

/// Events an agent may have recorded at once.
pub const BURST: u32 = 100;
/// After a burst, one event per this many milliseconds.
const REFILL_MS: u64 = 1000;
/// Agents whose allowances are kept apart (see [`crate::rate`]).
const TRACKED: usize = 10_000;

/// Counters, for logs.
#[derive(Debug, Default)]
pub struct Stats {
    /// Events not recorded: over an agent's rate.
    pub suppressed: AtomicU64,
    /// Events deleted from the store: past an agent's newest, or past the log's bound.
    pub deleted: AtomicU64,
}

/// Each agent's allowance of recorded events.
#[derive(Debug)]
pub struct Intake {
    allowances: Allowances,
    /// Counters.
    pub stats: Stats,
}

impl Default for Intake {
    fn default() -> Intake {
        Intake {
            allowances: Allowances::new(BURST, REFILL_MS, TRACKED),
            stats: Stats::default(),
        }
    }
}

impl Intake {
    /// Whether to record an event of `agent` at `now` (ms).
    pub fn admit(&self, agent: &str, now: u64) -> Take {
        let take = self.allowances.take(agent, now);
        if let Take::Refused { .. } = take {
            self.stats.suppressed.fetch_add(1, Ordering::Relaxed);
        }
        take
    }
}
