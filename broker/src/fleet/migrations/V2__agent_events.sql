-- What agents report outside any job (refusals, forgeries, unmatched results) is kept
-- apart, by name, from the durable event log every capability reads.
ALTER TABLE events RENAME TO agent_events;
CREATE INDEX agent_events_by_agent ON agent_events(agent_id, id);
