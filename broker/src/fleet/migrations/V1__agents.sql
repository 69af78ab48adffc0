-- The fleet as release 0.1 left it: agents, their broker logins, enrolled keys,
-- activations, and what agents reported outside any job.
CREATE TABLE IF NOT EXISTS agents (
    id TEXT PRIMARY KEY,
    hostname TEXT NOT NULL DEFAULT '',
    os TEXT NOT NULL DEFAULT '',
    os_version TEXT NOT NULL DEFAULT '',
    arch TEXT NOT NULL DEFAULT '',
    agent_version TEXT NOT NULL DEFAULT '',
    tags TEXT NOT NULL DEFAULT '{}',
    online INTEGER NOT NULL DEFAULT 0,
    first_seen_ms INTEGER NOT NULL,
    last_seen_ms INTEGER NOT NULL,
    status_changed_ms INTEGER NOT NULL,
    deregistered_ms INTEGER
);
CREATE TABLE IF NOT EXISTS broker_users (
    username TEXT PRIMARY KEY,
    role TEXT NOT NULL,
    salt BLOB NOT NULL,
    hash BLOB NOT NULL,
    created_ms INTEGER NOT NULL,
    mosquitto_hash TEXT
);
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    at_ms INTEGER NOT NULL,
    agent_id TEXT NOT NULL,
    kind TEXT NOT NULL,
    message TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS activations (
    id TEXT PRIMARY KEY,
    salt BLOB NOT NULL,
    code_hash BLOB NOT NULL,
    agent_id TEXT,
    tags TEXT NOT NULL DEFAULT '{}',
    max_uses INTEGER NOT NULL,
    uses INTEGER NOT NULL DEFAULT 0,
    created_ms INTEGER NOT NULL,
    expires_ms INTEGER NOT NULL,
    revoked_ms INTEGER
);
CREATE TABLE IF NOT EXISTS agent_keys (
    agent_id TEXT PRIMARY KEY,
    signing_key TEXT NOT NULL,
    sealing_key TEXT NOT NULL,
    activation_id TEXT NOT NULL,
    enrolled_ms INTEGER NOT NULL
);
