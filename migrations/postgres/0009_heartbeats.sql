-- Heartbeat times in a narrow table of their own (issue 7: 5,000 heartbeats/s).
-- Same as migrations/sqlite/0007_heartbeats.sql.
--
-- A flush of the registry's batched heartbeats used to update two wide rows per
-- heartbeat: the token's (last_used_at, among the token history) and the workspace's
-- (last_heartbeat_at, beside the status JSON), each a new row version with its fence
-- trigger. Here a heartbeat is one short row per live token: no fence (heartbeats are
-- recorded by any replica's registry; the fence guards tokens and workspaces), no
-- change log, and room left on each page so that an update stays on it (HOT).
--
-- What is read stays the same: a token's last use is its row here, else (after its
-- revocation, or from before this migration) workspace_auth_tokens.last_used_at; a
-- workspace's last heartbeat is the latest of its rows here and
-- workspaces.last_heartbeat_at. When a token is revoked, its row is folded into those
-- two columns and deleted, so the table holds live tokens only and stays small.
CREATE TABLE heartbeats (
    token_id      TEXT PRIMARY KEY,          -- workspace_auth_tokens.id of a live token
    workspace_uid TEXT NOT NULL,
    at            TIMESTAMPTZ NOT NULL       -- the last accepted register or heartbeat
) WITH (fillfactor = 50);

CREATE INDEX heartbeats_workspace_idx ON heartbeats (workspace_uid);

INSERT INTO heartbeats (token_id, workspace_uid, at)
    SELECT id, workspace_uid, last_used_at FROM workspace_auth_tokens
    WHERE revoked_at IS NULL AND last_used_at IS NOT NULL;

-- Revocation folds the token's heartbeat into the wide rows (forward only) and drops it.
CREATE FUNCTION heartbeats_fold() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    folded timestamptz;
BEGIN
    DELETE FROM heartbeats WHERE token_id = NEW.id RETURNING at INTO folded;
    IF folded IS NOT NULL THEN
        UPDATE workspace_auth_tokens SET last_used_at = folded
            WHERE id = NEW.id AND (last_used_at IS NULL OR last_used_at < folded);
        UPDATE workspaces SET last_heartbeat_at = folded
            WHERE uid = NEW.workspace_uid AND (last_heartbeat_at IS NULL OR last_heartbeat_at < folded);
    END IF;
    RETURN NULL;
END $$;

CREATE TRIGGER heartbeats_folded_on_revoke AFTER UPDATE OF revoked_at ON workspace_auth_tokens
    FOR EACH ROW WHEN (OLD.revoked_at IS NULL AND NEW.revoked_at IS NOT NULL)
    EXECUTE FUNCTION heartbeats_fold();
