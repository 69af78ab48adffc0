//! Installing a job's plugin: its manifest verified (publisher signatures, rollback,
//! local policy, expiry, size), its blob from the cache or fetched and checked, and the
//! component compiled or loaded. Whatever fails here is a refusal: nothing ran.

use std::time::Instant;

use drover_protocol::job::{Failure, FailureKind, Timings};
use drover_protocol::manifest::{Capabilities, Manifest, sha256_hex};
use drover_protocol::signed::Signed;
use drover_protocol::{durable, now_secs};
use tracing::Instrument as _;

use super::Jobs;
use crate::config::Policy;
use crate::sandbox::LoadedPlugin;
use crate::sandbox::host_dir::HostDir;

/// A plugin ready to run.
pub struct Installed {
    /// Its manifest, verified.
    pub manifest: Manifest,
    /// What the local policy grants it: all it asks for.
    pub capabilities: Capabilities,
    /// Its granted read paths, opened.
    pub read_dirs: Vec<HostDir>,
    /// The compiled component.
    pub plugin: LoadedPlugin,
}

impl Jobs {
    /// Verifies, fetches if need be, and loads the plugin. Fills `timings` as it goes.
    pub(super) async fn install(
        &self,
        signed: &Signed<Manifest>,
        timings: &mut Timings,
    ) -> Result<Installed, Failure> {
        let keyset = self.state.keyset();
        let manifest: Manifest = signed
            .verify_threshold_memo(
                &keyset.publishers,
                keyset.publisher_threshold as usize,
                self.sandbox.manifest_signatures(),
            )
            .map_err(|e| {
                Failure::new(
                    FailureKind::UntrustedPlugin,
                    format!("plugin manifest refused: {e}"),
                )
            })?;
        manifest.validate().map_err(|e| {
            Failure::new(
                FailureKind::UntrustedPlugin,
                format!("plugin manifest invalid: {e}"),
            )
        })?;
        self.state
            .check_plugin(&manifest.name, manifest.version, &manifest.sha256)
            .map_err(|m| Failure::new(FailureKind::UntrustedPlugin, m))?;
        let capabilities = self
            .config
            .policy
            .grant(&manifest.capabilities)
            .map_err(|missing| {
                Failure::new(
                    FailureKind::PolicyDenied,
                    format!(
                        "plugin asks for capabilities this agent's policy does not allow: {}",
                        missing.join(", ")
                    ),
                )
            })?;
        // Before anything is fetched: a path the policy matched as text must also be
        // what the host resolves it to.
        let read_dirs = open_read_paths(&self.config.policy, &capabilities.read_paths)?;
        // Expiry stops new installs, never a plugin already installed.
        let installed = self
            .state
            .is_installed(&manifest.name, manifest.version, &manifest.sha256);
        let now = now_secs();
        if !installed && now > manifest.expires_at {
            return Err(Failure::new(
                FailureKind::ExpiredPlugin,
                format!(
                    "plugin manifest expired {} s ago; it cannot be installed",
                    now - manifest.expires_at
                ),
            ));
        }
        if manifest.length > self.config.max_plugin_bytes {
            return Err(Failure::new(
                FailureKind::PolicyDenied,
                format!(
                    "plugin is {} bytes, over this agent's {} byte limit",
                    manifest.length, self.config.max_plugin_bytes
                ),
            ));
        }

        // The blob: from the cache, else fetched and checked.
        let blob_path = self.blob_dir.join(format!("{}.wasm", manifest.sha256));
        let mut fetched: Option<Vec<u8>> = None;
        if !self.sandbox.is_cached(&manifest.sha256) && !blob_path.exists() {
            let t = Instant::now();
            let blob = self
                .fetcher
                .fetch(
                    &self.link,
                    &self.config.id,
                    &manifest.sha256,
                    manifest.length,
                    self.config.chunk_size,
                )
                .await
                .map_err(|e| Failure::new(FailureKind::FetchFailed, e.to_string()))?;
            timings.fetch_ms = t.elapsed().as_millis() as u64;
            check_blob(&manifest, &blob).map_err(|m| Failure::new(FailureKind::BlobMismatch, m))?;
            if let Err(e) = durable::replace(&blob_path, &blob) {
                tracing::warn!(path = %blob_path.display(), error = %e, "could not cache plugin blob");
            }
            fetched = Some(blob);
        }

        // Compiling is CPU-bound: keep it off the async workers. A plugin already in
        // memory needs neither the disk nor a blocking thread.
        let t = Instant::now();
        let loaded = if let Some(plugin) = self.sandbox.loaded(&manifest.sha256, manifest.world) {
            Ok((plugin, true))
        } else {
            let sandbox = self.sandbox.clone();
            let (m, path) = (manifest.clone(), blob_path.clone());
            let span = tracing::Span::current();
            tokio::task::spawn_blocking(move || {
                let _span = span.enter();
                sandbox.load(&m.sha256, m.world, || {
                    if let Some(b) = fetched {
                        return Ok(b);
                    }
                    // Cached blobs are checked again: the disk is not the signer.
                    let b = std::fs::read(&path)?;
                    check_blob(&m, &b).map_err(anyhow::Error::msg)?;
                    Ok(b)
                })
            })
            .in_current_span()
            .await
            .map_err(|e| {
                Failure::new(
                    FailureKind::AgentError,
                    format!("plugin load task failed: {e}"),
                )
            })?
        };
        let (plugin, from_cache) = loaded.inspect_err(|f| {
            if f.kind == FailureKind::AgentError {
                // A bad cached blob: drop it so the next attempt fetches afresh.
                let _ = std::fs::remove_file(&blob_path);
            }
        })?;
        if let Err(e) = self
            .state
            .record_plugin(&manifest.name, manifest.version, &manifest.sha256)
        {
            return Err(Failure::new(
                FailureKind::AgentError,
                format!("cannot record the plugin's version, so it is not run: {e:#}"),
            ));
        }
        timings.load_ms = t.elapsed().as_millis() as u64;
        timings.compile_cached = from_cache;
        Ok(Installed {
            manifest,
            capabilities,
            read_dirs,
            plugin,
        })
    }
}

/// Opens each granted read path: its policy entry as the operator wrote it, the rest
/// without following links. A link, or anything but a directory, is a policy refusal
/// naming the path. Per job, and only for jobs with read paths: one `open` for a path
/// that is its policy entry (as before, when wasmtime-wasi opened it), two below one.
/// Blocking, on the async worker, as opening the preopens always was.
fn open_read_paths(policy: &Policy, paths: &[String]) -> Result<Vec<HostDir>, Failure> {
    paths
        .iter()
        .map(|path| {
            // `grant` allowed it, so some entry matches; none would be a policy refusal.
            let root = policy.read_root(path).ok_or_else(|| {
                Failure::new(
                    FailureKind::PolicyDenied,
                    format!("granted path {path} is under no policy.read_paths entry"),
                )
            })?;
            HostDir::open_beneath(root, path).map_err(|e| {
                if e.is_refusal() {
                    Failure::new(
                        FailureKind::PolicyDenied,
                        format!("granted path refused: {e}"),
                    )
                } else {
                    Failure::new(
                        FailureKind::AgentError,
                        format!("granted path cannot be opened on this host: {e}"),
                    )
                }
            })
        })
        .collect()
}

/// Checks a blob against its manifest's length and digest.
pub fn check_blob(manifest: &Manifest, blob: &[u8]) -> Result<(), String> {
    if blob.len() as u64 != manifest.length {
        return Err(format!(
            "plugin blob is {} bytes but its manifest says {}; refused",
            blob.len(),
            manifest.length
        ));
    }
    let actual = sha256_hex(blob);
    if actual != manifest.sha256 {
        return Err(format!(
            "plugin blob sha256 {actual} does not match its manifest's {}; refused",
            manifest.sha256
        ));
    }
    Ok(())
}
