-- A job remembers the world of its plugin, so its events carry typed output; and each
-- target keeps its parameters sealed to its agent (ciphertext only), so a restarted
-- server still has them for targets it has not sent yet.
ALTER TABLE jobs ADD COLUMN world TEXT NOT NULL DEFAULT 'task';
UPDATE jobs SET world = COALESCE(
    (SELECT p.world FROM plugins p WHERE p.name = jobs.plugin AND p.version = jobs.version),
    'task');
ALTER TABLE job_targets ADD COLUMN sealed TEXT;
CREATE INDEX IF NOT EXISTS job_targets_open ON job_targets(agent_id) WHERE result IS NULL AND state IN ('pending', 'delivered', 'in_progress');
CREATE INDEX IF NOT EXISTS jobs_by_world ON jobs(world, created_ms);
