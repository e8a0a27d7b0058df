-- The registry's hot path at 10,000 agents (issue 7; bench/registry, bench/stale_token).
-- Same as migrations/postgres/0007_heartbeat_path.sql, minus what SQLite has no use for.
--
-- 1. No query sweeps every workspace by last activity: the stale-token rule runs per
--    workspace (Store::live_tokens and Store::revoke_stale_tokens, both served by
--    workspace_auth_tokens_live_idx). The index on COALESCE(last_used_at, created_at)
--    served only such a sweep, and made every heartbeat write an index entry.
DROP INDEX workspace_auth_tokens_live_activity_idx;

-- 2. Whether the last written status shows the agent online, written with the status
--    (Store::save_status) and read with the token (Store::token_owner), so a heartbeat
--    needs one query, not a second one to read and decode the status. NULL: no status
--    written since this migration (the registry then reads the status).
ALTER TABLE workspaces ADD COLUMN agent_online BOOLEAN;
