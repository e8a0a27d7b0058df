-- The registry's hot path at 10,000 agents (issue 7; bench/registry, bench/stale_token).
--
-- 1. No query sweeps every workspace by last activity: the stale-token rule runs per
--    workspace (Store::live_tokens and Store::revoke_stale_tokens, both served by
--    workspace_auth_tokens_live_idx). The index on COALESCE(last_used_at, created_at)
--    served only such a sweep, and since last_used_at moves on every heartbeat it made
--    every heartbeat write an index entry and, in Postgres, ruled out HOT updates, so
--    every index of the table took a new entry per heartbeat.
DROP INDEX workspace_auth_tokens_live_activity_idx;

-- 2. Heartbeats now update rows in place (HOT) when the page has room: leave some.
ALTER TABLE workspace_auth_tokens SET (fillfactor = 90);
ALTER TABLE workspaces SET (fillfactor = 90);

-- 3. Whether the last written status shows the agent online, written with the status
--    (Store::save_status) and read with the token (Store::token_owner), so a heartbeat
--    needs one query, not a second one to read and decode the status. NULL: no status
--    written since this migration (the registry then reads the status).
ALTER TABLE workspaces ADD COLUMN agent_online BOOLEAN;
