-- What each command did on each target, as the engine's `job.target_finished` events
-- tell it: kept by Run Command, so that a fleet-wide command's exit codes can be
-- counted without reading every output.
CREATE TABLE IF NOT EXISTS command_results (
    job_id TEXT NOT NULL,
    agent_id TEXT NOT NULL,
    attempt INTEGER NOT NULL,
    state TEXT NOT NULL,
    exit_code INTEGER,
    partial INTEGER NOT NULL DEFAULT 0,
    stdout_bytes INTEGER NOT NULL DEFAULT 0,
    stderr_bytes INTEGER NOT NULL DEFAULT 0,
    truncated INTEGER NOT NULL DEFAULT 0,
    finished_ms INTEGER NOT NULL,
    PRIMARY KEY (job_id, agent_id, attempt)
);
