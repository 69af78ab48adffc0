//! The wasmtime `Engine` every run shares, and its epoch ticker.
//!
//! Deadlines: the ticker thread bumps the engine's epoch every [`TICK`] while some plugin
//! runs; each store yields to tokio at every tick, and the call runs under
//! `tokio::time::timeout`. Guest code in a loop yields at the next tick; a guest blocked
//! in a WASI call (sleep, poll) is an async host future that the timeout simply drops.
//! Either way the deadline holds. While no plugin runs the ticker sleeps, so an idle
//! agent has no wake-ups.

use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use wasmtime::{Config, Engine};

/// How often the epoch advances: the granularity of deadlines and of yielding to tokio.
pub const TICK: Duration = Duration::from_millis(10);

/// The engine, configured for many small runs with their own limits.
pub fn new() -> wasmtime::Result<Engine> {
    let mut config = Config::new();
    config.epoch_interruption(true);
    // Limits apply per store; keep reservations modest for small devices.
    config.memory_reservation(64 << 20);
    config.memory_reservation_for_growth(16 << 20);
    config.max_wasm_stack(1 << 20);
    Engine::new(&config)
}

/// A stable name for the engine's compatibility hash: precompiled components made by an
/// engine with another hash cannot be loaded by this one.
pub fn compatibility(engine: &Engine) -> String {
    /// Feeds `Hash` output into SHA-256: `precompile_compatibility_hash` is only `Hash`.
    struct Sha256Hasher(ring::digest::Context);

    impl std::hash::Hasher for Sha256Hasher {
        fn finish(&self) -> u64 {
            0
        }
        fn write(&mut self, bytes: &[u8]) {
            self.0.update(bytes);
        }
    }

    let mut h = Sha256Hasher(ring::digest::Context::new(&ring::digest::SHA256));
    std::hash::Hash::hash(&engine.precompile_compatibility_hash(), &mut h);
    hex::encode(&h.0.finish().as_ref()[..8])
}

/// The epoch ticker: a thread that advances the engine's epoch every [`TICK`] while at
/// least one [`Ticking`] is alive, and waits on a condition variable otherwise. Stopped
/// when dropped.
pub struct Ticker {
    shared: Arc<Shared>,
}

#[derive(Default)]
struct Shared {
    state: Mutex<State>,
    wake: Condvar,
}

#[derive(Default)]
struct State {
    running: usize,
    stop: bool,
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Ticker {
    /// Starts the thread.
    pub fn start(engine: &Engine) -> std::io::Result<Ticker> {
        let shared = Arc::new(Shared::default());
        let engine = engine.clone();
        let s = shared.clone();
        std::thread::Builder::new()
            .name("drover-epoch".into())
            .spawn(move || {
                loop {
                    {
                        let mut g = s.lock();
                        while g.running == 0 && !g.stop {
                            g = s.wake.wait(g).unwrap_or_else(|e| e.into_inner());
                        }
                        if g.stop {
                            return;
                        }
                    }
                    std::thread::sleep(TICK);
                    engine.increment_epoch();
                }
            })?;
        Ok(Ticker { shared })
    }

    /// Keeps the ticker going until the returned guard is dropped.
    pub fn ticking(&self) -> Ticking {
        self.shared.lock().running += 1;
        self.shared.wake.notify_all();
        Ticking(self.shared.clone())
    }
}

impl Drop for Ticker {
    fn drop(&mut self) {
        self.shared.lock().stop = true;
        self.shared.wake.notify_all();
    }
}

/// Keeps the ticker going while a run is in progress.
pub struct Ticking(Arc<Shared>);

impl Drop for Ticking {
    fn drop(&mut self) {
        let mut g = self.0.lock();
        g.running = g.running.saturating_sub(1);
    }
}
