//! Running markers, and the jobs an agent stop interrupted.
//!
//! A marker (`running/{hex job id}.{attempt}`, holding the plugin's claimed name and
//! version) is written before a job runs and removed once its result is in the outbox.
//! If the agent dies in between, the next start finds it and reports the job
//! `interrupted`; the job is never run again (the seen-envelope log refuses a replay).

use std::path::{Path, PathBuf};

use drover_protocol::durable;
use drover_protocol::job::{FailureKind, JobResult, ResultStatus};

use super::Jobs;

/// The running markers of one agent.
pub struct Markers {
    dir: PathBuf,
}

impl Markers {
    /// Opens (creating) the marker directory.
    pub fn open(dir: &Path) -> std::io::Result<Markers> {
        std::fs::create_dir_all(dir)?;
        Ok(Markers {
            dir: dir.to_path_buf(),
        })
    }

    fn path(&self, job_id: &str, attempt: u32) -> PathBuf {
        self.dir.join(format!("{}.{attempt}", hex::encode(job_id)))
    }

    /// Marks a job as running, naming the plugin it claims to run.
    ///
    /// Each marker has a name of its own and is never replaced, so it is created in
    /// place rather than renamed into it: what must survive a crash is the name, which
    /// the directory's flush keeps (one flush per job, as a temporary file and a rename
    /// would need one more). A marker whose content was lost still reports its job.
    pub fn mark(&self, job_id: &str, attempt: u32, plugin: &(String, u64)) -> std::io::Result<()> {
        std::fs::write(
            self.path(job_id, attempt),
            serde_json::to_vec(plugin).unwrap_or_default(),
        )?;
        durable::sync_dir(&self.dir)
    }

    /// The job is reported (or never ran): forget it.
    pub fn clear(&self, job_id: &str, attempt: u32) {
        let _ = std::fs::remove_file(self.path(job_id, attempt));
    }

    /// Markers left by an earlier run: (job id, attempt, claimed plugin, path). Files
    /// that are not markers are removed.
    fn leftovers(&self) -> Vec<(String, u32, (String, u64), PathBuf)> {
        let Ok(dir) = std::fs::read_dir(&self.dir) else {
            return Vec::new();
        };
        let mut found = Vec::new();
        for e in dir.flatten() {
            let path = e.path();
            let name = e.file_name().to_string_lossy().into_owned();
            let parsed = name.rsplit_once('.').and_then(|(id, a)| {
                Some((
                    String::from_utf8(hex::decode(id).ok()?).ok()?,
                    a.parse::<u32>().ok()?,
                ))
            });
            let Some((job_id, attempt)) = parsed else {
                let _ = std::fs::remove_file(&path);
                continue;
            };
            let plugin: (String, u64) = std::fs::read(&path)
                .ok()
                .and_then(|b| serde_json::from_slice(&b).ok())
                .unwrap_or_default();
            found.push((job_id, attempt, plugin, path));
        }
        found
    }
}

impl Jobs {
    /// Reports every job that was running when the agent last stopped as interrupted.
    /// Such jobs are never run again: the seen-envelope log already refuses them.
    pub async fn recover_interrupted(&self) {
        for (job_id, attempt, plugin, path) in self.markers.leftovers() {
            if self.outbox.holds(&job_id, attempt) {
                // It finished and its result is safe: the agent died just after.
                tracing::info!(job.id = %job_id, attempt, "job finished before the agent stopped; its result is in the outbox");
                let _ = std::fs::remove_file(&path);
                continue;
            }
            let mut r = JobResult::refused(
                &job_id,
                &self.config.id,
                attempt,
                FailureKind::Interrupted,
                "the agent stopped while this job was running (a crash or a kill); it was not run again"
                    .into(),
            );
            r.status = ResultStatus::Failed;
            (r.plugin, r.plugin_version) = plugin;
            tracing::warn!(job.id = %job_id, attempt, "job was interrupted by an agent stop");
            self.publish(&r).await;
            let _ = std::fs::remove_file(&path);
        }
    }
}
