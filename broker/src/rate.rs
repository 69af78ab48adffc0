//! Allowances per key (token buckets): a burst, then one more per interval. The keys are
//! agent ids taken from topics, which a hostile broker can make up, so how many are
//! tracked is bounded: keys whose allowance is whole again are forgotten, and past the
//! bound the newcomers share one allowance.

use std::collections::HashMap;
use std::sync::Mutex;

/// Whether a key may have one more.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Take {
    /// Yes; `refused_before` were refused since the last one granted.
    Granted {
        /// Refused since the last one granted.
        refused_before: u64,
    },
    /// No. `first`: the first refused since the last one granted.
    Refused {
        /// The first refused since the last one granted.
        first: bool,
    },
}

struct Bucket {
    /// What may be taken now, in thousandths.
    milli: u64,
    at_ms: u64,
    refused: u64,
}

#[derive(Default)]
struct Buckets {
    by_key: HashMap<String, Bucket>,
    /// When whole keys were last forgotten: at most once per interval, as it reads all.
    pruned_ms: Option<u64>,
}

/// Allowances by key.
pub struct Allowances {
    burst: u32,
    refill_ms: u64,
    tracked: usize,
    buckets: Mutex<Buckets>,
}

impl std::fmt::Debug for Allowances {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Allowances({} then 1/{} ms)", self.burst, self.refill_ms)
    }
}

/// The key every key past the bound shares.
const SHARED: &str = "";

impl Allowances {
    /// `burst` at once, then one per `refill_ms`, for at most `tracked` keys apart.
    pub fn new(burst: u32, refill_ms: u64, tracked: usize) -> Allowances {
        Allowances {
            burst: burst.max(1),
            refill_ms: refill_ms.max(1),
            tracked: tracked.max(1),
            buckets: Mutex::new(Buckets::default()),
        }
    }

    /// The most taken at once.
    pub fn burst(&self) -> u32 {
        self.burst
    }

    fn full(&self) -> u64 {
        u64::from(self.burst) * 1000
    }

    fn refill(&self, b: &mut Bucket, now: u64) {
        let gained = now.saturating_sub(b.at_ms).saturating_mul(1000) / self.refill_ms;
        b.milli = (b.milli + gained).min(self.full());
        b.at_ms = b.at_ms.max(now);
    }

    /// Takes one from `key`'s allowance at `now` (ms), if there is one.
    pub fn take(&self, key: &str, now: u64) -> Take {
        let mut guard = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        let Buckets { by_key, pruned_ms } = &mut *guard;
        if !by_key.contains_key(key)
            && by_key.len() >= self.tracked
            && pruned_ms.is_none_or(|t| now >= t + self.refill_ms)
        {
            // Keys whose allowance is whole again owe nothing: forget them.
            *pruned_ms = Some(now);
            let full = self.full();
            by_key.retain(|_, b| {
                self.refill(b, now);
                b.milli < full || b.refused > 0
            });
        }
        let key = if by_key.contains_key(key) || by_key.len() < self.tracked {
            key
        } else {
            SHARED
        };
        let b = by_key.entry(key.to_string()).or_insert(Bucket {
            milli: self.full(),
            at_ms: now,
            refused: 0,
        });
        self.refill(b, now);
        if b.milli >= 1000 {
            b.milli -= 1000;
            Take::Granted {
                refused_before: std::mem::take(&mut b.refused),
            }
        } else {
            b.refused += 1;
            Take::Refused {
                first: b.refused == 1,
            }
        }
    }

    /// How many keys are tracked apart.
    pub fn tracked(&self) -> usize {
        self.buckets
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .by_key
            .len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_is_granted_the_rest_refused_and_the_allowance_comes_back() {
        let a = Allowances::new(3, 1000, 100);
        for _ in 0..3 {
            assert_eq!(a.take("a", 1_000), Take::Granted { refused_before: 0 });
        }
        assert_eq!(a.take("a", 1_000), Take::Refused { first: true });
        assert_eq!(a.take("a", 1_500), Take::Refused { first: false });
        // Another key has its own allowance.
        assert_eq!(a.take("b", 1_500), Take::Granted { refused_before: 0 });
        // A second later, one more, with the count of those refused.
        assert_eq!(a.take("a", 2_000), Take::Granted { refused_before: 2 });
        assert_eq!(a.take("a", 2_000), Take::Refused { first: true });
    }

    #[test]
    fn made_up_keys_share_one_allowance_once_too_many_are_tracked() {
        let a = Allowances::new(5, 1000, 50);
        for i in 0..50 {
            assert!(matches!(
                a.take(&format!("id-{i}"), 0),
                Take::Granted { .. }
            ));
        }
        // Nobody's allowance is whole yet: newcomers share one.
        let granted = (0..20)
            .filter(|i| matches!(a.take(&format!("new-{i}"), 0), Take::Granted { .. }))
            .count();
        assert_eq!(granted, 5);
        // Once the others are whole again, they are forgotten and newcomers tracked.
        assert_eq!(
            a.take("newest", 60_000),
            Take::Granted { refused_before: 0 }
        );
        assert!(a.tracked() < 50);
    }
}
