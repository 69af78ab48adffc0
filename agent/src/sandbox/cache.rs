//! Compiled plugins: precompiled components on disk, named by the blob's sha256 and the
//! engine's compatibility hash, and the plugins loaded from them kept in memory.
//!
//! A precompiled component is native code, so the directory is created 0700 and only
//! this agent writes it.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use drover_protocol::durable;
use drover_protocol::manifest::World;
use wasmtime::Engine;
use wasmtime::component::Component;

use super::LoadedPlugin;

/// The cache of one sandbox.
pub struct Cache {
    dir: PathBuf,
    /// The engine's compatibility hash, part of every file name.
    compat: String,
    /// By digest and world: the same component may be signed as more than one world,
    /// and its typed bindings differ by world.
    loaded: Mutex<HashMap<(String, World), LoadedPlugin>>,
}

impl Cache {
    /// Opens (creating, 0700) the cache directory, dropping writes a crash cut short.
    pub fn open(dir: &Path, compat: String) -> std::io::Result<Cache> {
        std::fs::create_dir_all(dir)?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
        }
        for e in std::fs::read_dir(dir)?.flatten() {
            if durable::is_temp(&e.file_name().to_string_lossy()) {
                let _ = std::fs::remove_file(e.path());
            }
        }
        Ok(Cache {
            dir: dir.to_path_buf(),
            compat,
            loaded: Mutex::default(),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<(String, World), LoadedPlugin>> {
        self.loaded.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn path(&self, sha256: &str) -> PathBuf {
        self.dir.join(format!("{sha256}-{}.cwasm", self.compat))
    }

    /// Whether a precompiled artifact for this digest is in memory or on disk.
    pub fn is_cached(&self, sha256: &str) -> bool {
        self.lock().keys().any(|(sha, _)| sha == sha256) || self.path(sha256).exists()
    }

    /// The plugin, if loaded in memory as `world`.
    pub fn loaded(&self, sha256: &str, world: World) -> Option<LoadedPlugin> {
        self.lock().get(&(sha256.to_string(), world)).cloned()
    }

    /// Keeps a loaded plugin in memory.
    pub fn remember(&self, sha256: &str, plugin: LoadedPlugin) {
        self.lock()
            .insert((sha256.to_string(), plugin.world()), plugin);
    }

    /// The precompiled component for this digest, if the disk has a usable one; an
    /// unusable one is deleted.
    pub fn read(&self, engine: &Engine, sha256: &str) -> Option<Component> {
        let path = self.path(sha256);
        if !path.exists() {
            return None;
        }
        // SAFETY: the file was written by `precompile_component` of an engine with the
        // same compatibility hash (it is in the file name), into a directory only this
        // agent can write (created 0700 in `open`). wasmtime also checks the header.
        #[allow(unsafe_code)]
        let r = unsafe { Component::deserialize_file(engine, &path) };
        match r {
            Ok(c) => Some(c),
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "discarding unusable compiled plugin");
                let _ = std::fs::remove_file(&path);
                None
            }
        }
    }

    /// Stores a precompiled component. A failure costs a compile next time, nothing
    /// more, so it is logged, not returned.
    pub fn write(&self, sha256: &str, compiled: &[u8]) {
        let path = self.path(sha256);
        if let Err(e) = durable::replace(&path, compiled) {
            tracing::warn!(path = %path.display(), error = %e, "could not cache compiled plugin");
        }
    }
}

/// Loads a component that `engine` has just precompiled.
pub fn deserialize(engine: &Engine, compiled: &[u8]) -> wasmtime::Result<Component> {
    // SAFETY: the bytes come from `precompile_component` on this very engine.
    #[allow(unsafe_code)]
    unsafe {
        Component::deserialize(engine, compiled)
    }
}
