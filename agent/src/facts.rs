//! Host facts, read with `sysinfo`.

use sysinfo::System;

/// What the agent knows about its host.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct HostFacts {
    /// Host name.
    pub hostname: String,
    /// OS family, `std::env::consts::OS`.
    pub os_family: String,
    /// Distribution name.
    pub os_name: String,
    /// Distribution version.
    pub os_version: String,
    /// Kernel version.
    pub kernel_version: String,
    /// CPU architecture.
    pub architecture: String,
    /// Logical CPUs.
    pub cpu_count: u32,
    /// Physical memory, bytes.
    pub memory_total_bytes: u64,
    /// Seconds since boot.
    pub uptime_seconds: u64,
}

impl HostFacts {
    /// Reads the facts now. Cheap: no CPU sampling, one read of memory totals.
    pub fn gather() -> HostFacts {
        let memory_total_bytes = match System::new() {
            Ok(mut sys) => {
                sys.refresh_memory();
                sys.total_memory()
            }
            Err(_) => 0,
        };
        HostFacts {
            hostname: System::host_name().unwrap_or_default(),
            os_family: std::env::consts::OS.to_string(),
            os_name: System::name().unwrap_or_default(),
            os_version: System::os_version().unwrap_or_default(),
            kernel_version: System::kernel_version().unwrap_or_default(),
            architecture: System::cpu_arch(),
            cpu_count: std::thread::available_parallelism()
                .map(|n| n.get() as u32)
                .unwrap_or(1),
            memory_total_bytes,
            uptime_seconds: System::uptime().unwrap_or(0),
        }
    }
}
