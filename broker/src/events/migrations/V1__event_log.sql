-- The durable event log: what the job engine and the fleet tell capabilities, appended
-- in the same transaction as the change it reports. Each consumer keeps its cursor,
-- the last event it has handled; it is called at least once for every event after it.
CREATE TABLE IF NOT EXISTS event_log (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    at_ms INTEGER NOT NULL,
    kind TEXT NOT NULL,
    body TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS event_cursors (
    consumer TEXT PRIMARY KEY,
    last_id INTEGER NOT NULL,
    updated_ms INTEGER NOT NULL
);
