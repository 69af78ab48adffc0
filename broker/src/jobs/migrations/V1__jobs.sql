-- Jobs, their targets and rate control, as release 0.1 left them. `envelope` holds a
-- target's signed envelope until its agent answers; `cancel_ms` a cancel request not yet
-- answered. Every statement that answers a target clears what it no longer needs of
-- these two, so a value present means "still owed"; the partial indexes hold only those.
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    plugin TEXT NOT NULL,
    version INTEGER NOT NULL,
    targets TEXT NOT NULL,
    input TEXT NOT NULL,
    created_ms INTEGER NOT NULL,
    expires_ms INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS job_targets (
    job_id TEXT NOT NULL REFERENCES jobs(id),
    agent_id TEXT NOT NULL,
    attempt INTEGER NOT NULL,
    status TEXT NOT NULL,
    result TEXT,
    updated_ms INTEGER NOT NULL,
    state TEXT NOT NULL DEFAULT 'pending',
    detail TEXT,
    dispatched_ms INTEGER,
    started_ms INTEGER,
    finished_ms INTEGER,
    envelope BLOB,
    cancel_ms INTEGER,
    PRIMARY KEY (job_id, agent_id)
);
CREATE TABLE IF NOT EXISTS rollouts (
    job_id TEXT PRIMARY KEY REFERENCES jobs(id),
    spec TEXT NOT NULL,
    created_ms INTEGER NOT NULL,
    cancelled_ms INTEGER,
    done_ms INTEGER
);
CREATE INDEX IF NOT EXISTS job_targets_unanswered ON job_targets(agent_id) WHERE envelope IS NOT NULL;
CREATE INDEX IF NOT EXISTS job_targets_cancelling ON job_targets(agent_id) WHERE cancel_ms IS NOT NULL;
