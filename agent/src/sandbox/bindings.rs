//! The generated bindings of both contract versions. They name nothing of ours: the host
//! interfaces implement their traits (`host/`) and the worlds call their exports
//! (`worlds.rs`, `compat.rs`), both on top of them.

/// `drover:plugin@0.2.0`, from `wit/`. (`wit-parser` reads the `*.wit` files of that
/// directory only: `wit/v0.1.0/` is not part of this package.)
pub mod v0_2 {
    wasmtime::component::bindgen!({
        path: "../wit",
        world: "inventory-collector",
        // Running a program waits on it: the only host import that is async.
        imports: { "drover:plugin/process.run": async },
        exports: { default: async },
    });

    /// The `command-runner` world, sharing the interfaces above.
    pub mod command_runner {
        wasmtime::component::bindgen!({
            path: "../wit",
            world: "command-runner",
            exports: { default: async },
            with: {
                "drover:plugin/types": super::drover::plugin::types,
                "drover:plugin/logging": super::drover::plugin::logging,
                "drover:plugin/host-facts": super::drover::plugin::host_facts,
                "drover:plugin/process": super::drover::plugin::process,
                "drover:plugin/parameters": super::drover::plugin::parameters,
            },
        });
    }

    /// The `task` world, sharing the interfaces above.
    pub mod task {
        wasmtime::component::bindgen!({
            path: "../wit",
            world: "task",
            exports: { default: async },
            with: {
                "drover:plugin/types": super::drover::plugin::types,
                "drover:plugin/logging": super::drover::plugin::logging,
                "drover:plugin/host-facts": super::drover::plugin::host_facts,
                "drover:plugin/process": super::drover::plugin::process,
                "drover:plugin/parameters": super::drover::plugin::parameters,
            },
        });
    }
}

/// `drover:plugin@0.1.0`, from `wit/v0.1.0/`.
pub mod v0_1 {
    wasmtime::component::bindgen!({
        path: "../wit/v0.1.0",
        world: "inventory-collector",
        imports: { "drover:plugin/process.run": async },
        exports: { default: async },
    });

    /// The `task` world, sharing the interfaces above.
    pub mod task {
        wasmtime::component::bindgen!({
            path: "../wit/v0.1.0",
            world: "task",
            exports: { default: async },
            with: {
                "drover:plugin/types": super::drover::plugin::types,
                "drover:plugin/logging": super::drover::plugin::logging,
                "drover:plugin/host-facts": super::drover::plugin::host_facts,
                "drover:plugin/process": super::drover::plugin::process,
                "drover:plugin/parameters": super::drover::plugin::parameters,
            },
        });
    }
}
