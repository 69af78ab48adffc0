//! The `inventory-collector` world's glue: bindings for ../../wit and `collect`.

wit_bindgen::generate!({
    path: "../../wit",
    world: "inventory-collector",
});

use drover::plugin::host_facts;
// `CollectRequest`, `Inventory` and `PluginError` are in this module: the world `use`s them.
use drover::plugin::inventory::{InstalledPackage, OsInfo};
use drover::plugin::logging::{self, Level};

/// Where dpkg keeps its database; the agent preopens its directory at the same path.
const DPKG_STATUS: &str = "/var/lib/dpkg/status";

struct InventoryCollector;

impl Guest for InventoryCollector {
    fn collect(request: CollectRequest) -> Result<Inventory, PluginError> {
        let mut warnings = Vec::new();

        let os = match host_facts::get() {
            Some(facts) => OsInfo {
                family: facts.os_family,
                name: facts.os_name,
                version: facts.os_version,
                kernel_version: facts.kernel_version,
                architecture: facts.architecture,
                hostname: facts.hostname,
            },
            None => {
                warnings.push("host facts not granted".to_owned());
                OsInfo {
                    family: String::new(),
                    name: String::new(),
                    version: String::new(),
                    kernel_version: String::new(),
                    architecture: String::new(),
                    hostname: String::new(),
                }
            }
        };

        let packages = if request.packages {
            let packages = read_dpkg_packages(&mut warnings);
            logging::log(
                Level::Info,
                &format!("found {} packages in {DPKG_STATUS}", packages.len()),
            );
            packages
        } else {
            logging::log(Level::Info, "package listing not requested: 0 packages");
            Vec::new()
        };

        Ok(Inventory {
            os,
            packages,
            custom: Vec::new(),
            warnings,
        })
    }
}

/// Reads and parses dpkg's status file, turning every failure into a warning.
fn read_dpkg_packages(warnings: &mut Vec<String>) -> Vec<InstalledPackage> {
    // Every read error is a warning, not only NotFound (no dpkg, or /var/lib/dpkg not
    // granted: under wasm32-wasip2 a path outside every preopen fails with ENOENT) and
    // PermissionDenied: the OS part of the inventory is still worth returning, and the
    // WIT keeps errors for when nothing useful could be collected.
    let bytes = match std::fs::read(DPKG_STATUS) {
        Ok(bytes) => bytes,
        Err(err) => {
            warnings.push(format!(
                "package database {DPKG_STATUS} could not be read: {err}"
            ));
            return Vec::new();
        }
    };
    let parsed = crate::dpkg::parse_status(&String::from_utf8_lossy(&bytes));
    if parsed.skipped > 0 {
        warnings.push(format!(
            "{} entries in {DPKG_STATUS} were skipped because they lack a package name, \
             a version or a valid status",
            parsed.skipped
        ));
    }
    parsed
        .packages
        .into_iter()
        .map(|p| InstalledPackage {
            name: p.name,
            version: p.version,
            architecture: p.architecture,
            source: "dpkg".to_owned(),
        })
        .collect()
}

export!(InventoryCollector);
