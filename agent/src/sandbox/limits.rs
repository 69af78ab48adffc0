//! What bounds one run: the memory limiter of its store, and the most output it may
//! return. (The deadline is in [`super::engine`]; stdout and stderr are capped by
//! [`super::capped`]; programs by [`super::exec`].)

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use drover_protocol::job::Limits;

/// Most table elements a plugin may grow a table to.
const MAX_TABLE_ELEMENTS: usize = 100_000;

/// Refuses memory growth past the limit and remembers that it did, so the result can
/// say why the guest died (a Rust guest aborts when allocation fails).
pub struct MemoryLimiter {
    max_bytes: usize,
    hit: Arc<AtomicBool>,
}

impl MemoryLimiter {
    /// A limiter of `max_bytes`, and the flag it raises when it refuses growth.
    pub fn new(max_bytes: u64) -> (MemoryLimiter, Arc<AtomicBool>) {
        let hit = Arc::new(AtomicBool::new(false));
        let limiter = MemoryLimiter {
            max_bytes: usize::try_from(max_bytes).unwrap_or(usize::MAX),
            hit: hit.clone(),
        };
        (limiter, hit)
    }
}

impl wasmtime::ResourceLimiter for MemoryLimiter {
    fn memory_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if desired > self.max_bytes {
            self.hit.store(true, Ordering::Relaxed);
            return Ok(false);
        }
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(desired <= MAX_TABLE_ELEMENTS)
    }
}

/// Most bytes of JSON a plugin may return: twelve times `output_bytes`, plus 64 KiB.
///
/// A program's stdout and stderr are each kept up to `output_bytes`; a plugin that
/// returns both, as text in a JSON document with a few fields around them (the command
/// plugin does), needs room for two full streams, escaped: JSON writes a control byte
/// as six (`\u0000`), so binary output grows up to six times. With the agent's default
/// output ceiling of 1 MiB that is at most 12 MiB, under the 16 MiB the agent and the
/// server accept per message.
pub fn returned_output_limit(limits: &Limits) -> u64 {
    limits
        .output_bytes
        .saturating_mul(12)
        .saturating_add(64 << 10)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn returned_output_has_room_for_two_full_streams() {
        let limits = Limits {
            output_bytes: 1 << 20,
            ..Limits::default()
        };
        assert_eq!(returned_output_limit(&limits), (12 << 20) + (64 << 10));
        // The worst case of the ceiling still fits in one message.
        assert!(returned_output_limit(&limits) < crate::daemon::MAX_OUTGOING as u64);
    }

    #[test]
    fn the_limiter_refuses_growth_past_its_limit_and_says_so() {
        use wasmtime::ResourceLimiter as _;
        let (mut l, hit) = MemoryLimiter::new(1 << 20);
        assert!(l.memory_growing(0, 1 << 20, None).unwrap());
        assert!(!hit.load(Ordering::Relaxed));
        assert!(!l.memory_growing(1 << 20, (1 << 20) + 1, None).unwrap());
        assert!(hit.load(Ordering::Relaxed));
    }
}
