//! What bounds one run: the memory limiter of its store (bytes across all its memories
//! and tables, and how many of them and of instances it may create), and the most
//! output it may return. (The deadline is in [`super::engine`]; stdout and stderr are capped by
//! [`super::capped`]; programs by [`super::exec`].)

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use drover_protocol::job::Limits;

/// Most elements one table may have.
const MAX_TABLE_ELEMENTS: usize = 100_000;
/// What wasmtime spends on a table element: a pointer.
const TABLE_ELEMENT_BYTES: usize = std::mem::size_of::<usize>();

/// Most core instances one run's store may create. wasmtime's default is 10,000. A
/// Rust or C component has a handful (its module, the canonical ABI's shims);
/// componentize-py links a dozen or so libraries; 64 leaves room and bounds the
/// per-instance bookkeeping a hostile component can make the agent allocate.
pub const MAX_INSTANCES: usize = 64;
/// Most linear memories one store may create. The byte limit counts them all, but
/// each also reserves address space (`engine::new`: 64 MiB, 16 MiB more for growth,
/// and guard pages) however small it is: 10,000 of them would exhaust a small
/// device's address space. Components have one, sometimes two.
pub const MAX_MEMORIES: usize = 16;
/// Most tables one store may create: a component's modules each have one or two.
pub const MAX_TABLES: usize = 64;

/// Holds one run to its memory limit, counted across every linear memory and table of
/// its store (a component may have many), and caps how many instances, memories and
/// tables it may create. Remembers when it refused, so the result can say why the guest
/// died (a Rust guest aborts when allocation fails).
///
/// Shared memories, which wasmtime never asks a limiter about, need its `threads`
/// feature; the agent does not build it, so a component cannot have one.
pub struct MemoryLimiter {
    max_bytes: usize,
    /// Bytes of every memory and table of the store together, as granted.
    used: usize,
    hit: Arc<AtomicBool>,
}

impl MemoryLimiter {
    /// A limiter of `max_bytes`, and the flag it raises when it refuses growth.
    pub fn new(max_bytes: u64) -> (MemoryLimiter, Arc<AtomicBool>) {
        let hit = Arc::new(AtomicBool::new(false));
        let limiter = MemoryLimiter {
            max_bytes: usize::try_from(max_bytes).unwrap_or(usize::MAX),
            used: 0,
            hit: hit.clone(),
        };
        (limiter, hit)
    }

    /// Grants `more` bytes if the store's total stays within the limit.
    fn grow_by(&mut self, more: usize) -> bool {
        match self.used.checked_add(more) {
            Some(total) if total <= self.max_bytes => {
                self.used = total;
                true
            }
            _ => {
                self.hit.store(true, Ordering::Relaxed);
                false
            }
        }
    }
}

/// Whether a failed instantiation was wasmtime refusing more instances, memories or
/// tables than [`MemoryLimiter`]'s counts: no callback tells the limiter, so its error
/// is recognised by its text (`resource limit exceeded: memory count too high at 17`;
/// a test pins it).
pub fn is_count_limit(e: &wasmtime::Error) -> bool {
    e.chain()
        .any(|c| c.to_string().starts_with("resource limit exceeded"))
}

impl wasmtime::ResourceLimiter for MemoryLimiter {
    /// Called when a memory is created (`current` 0) and each time it grows. Growth is
    /// counted when granted; one that wasmtime then fails to map stays counted, which
    /// errs on the safe side and is rare.
    fn memory_growing(
        &mut self,
        current: usize,
        desired: usize,
        maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        // Past the memory's own maximum wasmtime refuses it anyway: not ours to count.
        if maximum.is_some_and(|max| desired > max) {
            return Ok(false);
        }
        Ok(self.grow_by(desired.saturating_sub(current)))
    }

    fn table_growing(
        &mut self,
        current: usize,
        desired: usize,
        maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if maximum.is_some_and(|max| desired > max) {
            return Ok(false);
        }
        if desired > MAX_TABLE_ELEMENTS {
            self.hit.store(true, Ordering::Relaxed);
            return Ok(false);
        }
        let more = desired.saturating_sub(current);
        Ok(self.grow_by(more.saturating_mul(TABLE_ELEMENT_BYTES)))
    }

    fn instances(&self) -> usize {
        MAX_INSTANCES
    }

    fn memories(&self) -> usize {
        MAX_MEMORIES
    }

    fn tables(&self) -> usize {
        MAX_TABLES
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

    #[test]
    fn the_limit_is_the_stores_across_memories_and_tables() {
        use wasmtime::ResourceLimiter as _;
        let (mut l, hit) = MemoryLimiter::new(1 << 20);
        // Two memories of half the limit each: the second fits, a third does not.
        assert!(l.memory_growing(0, 512 << 10, None).unwrap());
        assert!(l.memory_growing(0, 448 << 10, None).unwrap());
        assert!(!hit.load(Ordering::Relaxed));
        assert!(!l.memory_growing(0, 128 << 10, None).unwrap());
        assert!(hit.load(Ordering::Relaxed));
        // Growth counts only what is added; tables count too, a pointer an element.
        let (mut l, hit) = MemoryLimiter::new(1 << 20);
        assert!(l.memory_growing(0, 64 << 10, None).unwrap());
        assert!(l.memory_growing(64 << 10, 960 << 10, None).unwrap());
        assert!(l.table_growing(0, 8 << 10, None).unwrap());
        assert!(!l.table_growing(8 << 10, (8 << 10) + 1, None).unwrap());
        assert!(hit.load(Ordering::Relaxed));
        // Growth past a memory's own maximum is wasmtime's refusal, not the limit's.
        let (mut l, hit) = MemoryLimiter::new(1 << 20);
        assert!(!l.memory_growing(0, 2 << 20, Some(64 << 10)).unwrap());
        assert!(!hit.load(Ordering::Relaxed));
        assert!(l.memory_growing(0, 1 << 20, None).unwrap());
        assert_eq!(
            (l.instances(), l.memories(), l.tables()),
            (MAX_INSTANCES, MAX_MEMORIES, MAX_TABLES)
        );
    }
}
