//! The worlds of `drover:plugin@0.1.0` (`wit/v0.1.0/`, frozen): plugins built against
//! them keep running. Their bindings, and the conversions between their records and
//! `drover_protocol::worlds`, naming every field as [`super::worlds`] does. The 0.1.0
//! host interfaces are in [`super::host`], beside the 0.2.0 ones they delegate to.
//!
//! 0.1.0 has `inventory-collector` and `task`, and its `plugin-error` is a record of a
//! message and whether a retry can help; a result from it has no `plugin_error` case.

use drover_protocol::job::{Failure, FailureKind};
use drover_protocol::manifest::World;
use drover_protocol::worlds::{Output, inventory};
use wasmtime::Store;
use wasmtime::component::InstancePre;

use super::host::Host;
use super::worlds::{Input, mismatch, task_output};

/// The contract version these bindings are for.
pub const VERSION: &str = "0.1.0";

/// The bindings of `wit/v0.1.0/`.
pub use super::bindings::v0_1 as bindings;

use bindings::drover::plugin::{inventory as wit_inventory, types};

/// Why a component cannot be run as a 0.1.0 plugin of some world.
pub enum Unsupported {
    /// 0.1.0 has no such world.
    World,
    /// It does not export what the world says.
    Exports(wasmtime::Error),
}

/// The typed exports of a `drover:plugin@0.1.0` plugin, checked when it was loaded.
#[derive(Clone)]
pub enum Exports {
    /// `inventory-collector`.
    Inventory(bindings::InventoryCollectorPre<Host>),
    /// `task`.
    Task(bindings::task::TaskPre<Host>),
}

impl Exports {
    /// Checks that the component exports `world` as 0.1.0 defines it.
    pub fn new(pre: InstancePre<Host>, world: World) -> Result<Exports, Unsupported> {
        match world {
            World::InventoryCollector => bindings::InventoryCollectorPre::new(pre)
                .map(Exports::Inventory)
                .map_err(Unsupported::Exports),
            World::Task => bindings::task::TaskPre::new(pre)
                .map(Exports::Task)
                .map_err(Unsupported::Exports),
            World::CommandRunner => Err(Unsupported::World),
        }
    }

    /// Instantiates the plugin and calls its world's export.
    pub async fn call(
        &self,
        store: &mut Store<Host>,
        input: Input,
    ) -> wasmtime::Result<Result<Output, Failure>> {
        Ok(match (self, input) {
            (Exports::Inventory(pre), Input::Inventory(request)) => {
                let instance = pre.instantiate_async(&mut *store).await?;
                instance
                    .call_collect(&mut *store, &collect_request(request))
                    .await?
                    .map(|i| Output::Inventory(from_inventory(i)))
                    .map_err(failure)
            }
            (Exports::Task(pre), Input::Task(text)) => {
                let instance = pre.instantiate_async(&mut *store).await?;
                match instance.call_run(&mut *store, &text).await? {
                    Ok(out) => task_output(&out),
                    Err(e) => Err(failure(e)),
                }
            }
            (_, input) => Err(mismatch(&input)),
        })
    }
}

/// A 0.1.0 plugin's error as the job's failure: retryable as it says, no case.
pub fn failure(e: types::PluginError) -> Failure {
    let types::PluginError { message, retryable } = e;
    Failure {
        kind: FailureKind::PluginError,
        message,
        retryable,
        plugin_error: None,
    }
}

super::worlds::inventory_conversions!(wit_inventory);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_error_keeps_its_retryable_flag_and_has_no_case() {
        for retryable in [true, false] {
            let f = failure(types::PluginError {
                message: "m".into(),
                retryable,
            });
            assert_eq!(f.kind, FailureKind::PluginError);
            assert_eq!((f.message.as_str(), f.retryable), ("m", retryable));
            assert_eq!(f.plugin_error, None);
        }
    }
}
