//! File descriptors: the server raises its limit at start, then gives the HTTP API and
//! the embedded broker a budget each, so that sockets piling up on one can never leave
//! the other unable to accept (or the store unable to open a file).

use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};

/// Descriptors kept for everything but the two listeners: the database and its WAL, log
/// files, the link to the broker, the runtime, key files read on demand.
pub const RESERVED: u64 = 256;
/// The smallest budget either listener gets, whatever the limit.
const FLOOR: u64 = 16;

/// How many connections each listener may hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Budget {
    /// The HTTP API's.
    pub api: usize,
    /// The embedded broker's.
    pub broker: usize,
}

/// Raises `RLIMIT_NOFILE`'s soft limit to its hard one (a common default is 1,024 soft
/// of 524,288 hard). Returns the soft limit then; None: unlimited.
pub fn raise_nofile() -> Option<u64> {
    let lim = getrlimit(Resource::Nofile);
    if lim.current != lim.maximum {
        let raised = Rlimit {
            current: lim.maximum,
            maximum: lim.maximum,
        };
        if let Err(e) = setrlimit(Resource::Nofile, raised) {
            tracing::warn!(error = %e, "could not raise the open-file limit");
        }
    }
    getrlimit(Resource::Nofile).current
}

/// Splits what `limit` leaves after [`RESERVED`]: the API gets what it asks for up to a
/// quarter, the broker what it asks for up to the rest.
pub fn budget(limit: Option<u64>, api_wanted: usize, broker_wanted: usize) -> Budget {
    let Some(limit) = limit else {
        return Budget {
            api: api_wanted,
            broker: broker_wanted,
        };
    };
    let usable = limit.saturating_sub(RESERVED).max(2 * FLOOR);
    let api = (api_wanted as u64).min(usable / 4).max(FLOOR);
    let broker = (broker_wanted as u64).min(usable - api).max(FLOOR);
    Budget {
        api: api as usize,
        broker: broker as usize,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_limit_is_split_and_neither_listener_gets_all_of_it() {
        // A common soft limit, not raised.
        assert_eq!(
            budget(Some(1024), 512, 100_000),
            Budget {
                api: 192,
                broker: 576
            }
        );
        // Raised to 4,096: the API what it asks, the broker the rest.
        assert_eq!(
            budget(Some(4096), 512, 100_000),
            Budget {
                api: 512,
                broker: 3328
            }
        );
        // Plenty: what each asks.
        let b = budget(Some(1 << 20), 512, 100_000);
        assert_eq!((b.api, b.broker), (512, 100_000));
        assert_eq!(
            budget(None, 512, 7),
            Budget {
                api: 512,
                broker: 7
            }
        );
        // Absurdly low: each still gets a few.
        let b = budget(Some(64), 512, 100_000);
        assert!(b.api >= 16 && b.broker >= 16);
    }

    #[test]
    fn the_limit_can_be_raised() {
        let soft = raise_nofile();
        assert!(soft.is_none_or(|n| n >= 64));
    }
}
