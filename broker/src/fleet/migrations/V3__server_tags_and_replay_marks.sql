-- Tags are the server's: set at enrollment from the activation and changed by operators,
-- and jobs target by them. What an agent says of itself (its hello's `tags`) is kept
-- apart as `labels`, shown and never targeted. Existing agents keep what they reported as
-- labels, and get the tags of the activation they enrolled with, or none.
ALTER TABLE agents ADD COLUMN labels TEXT NOT NULL DEFAULT '{}';
UPDATE agents SET labels = tags;
UPDATE agents SET tags = COALESCE(
    (SELECT a.tags FROM agent_keys k JOIN activations a ON a.id = k.activation_id
     WHERE k.agent_id = agents.id),
    '{}');
-- When the last hello and heartbeat taken from each agent were signed (the agent's
-- clock): one not newer is a replay.
ALTER TABLE agents ADD COLUMN hello_sent_ms INTEGER;
ALTER TABLE agents ADD COLUMN heartbeat_at_ms INTEGER;
