//! Drover's inventory collector: a component for the `inventory-collector` world.
//!
//! It reports the OS from `host-facts` and, when asked, the packages in dpkg's status
//! database, which the agent grants as a read-only preopen of `/var/lib/dpkg` at that
//! same guest path. Anything it cannot read becomes a warning in the inventory: the
//! WIT contract keeps errors for when nothing useful could be collected, and the OS
//! part is useful on its own.
//!
//! The parser is plain Rust in [`dpkg`]; the component glue is compiled only for wasm32,
//! so `cargo test --target x86_64-unknown-linux-gnu` tests the parser on the host.

pub mod dpkg;

#[cfg(target_arch = "wasm32")]
mod component;
