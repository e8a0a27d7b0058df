-- Heartbeat times in a narrow table of their own (issue 7: 5,000 heartbeats/s).
-- Same as migrations/postgres/0009_heartbeats.sql.
--
-- A flush of the registry's batched heartbeats used to move two columns of wide rows:
-- workspace_auth_tokens.last_used_at (among the token history) and
-- workspaces.last_heartbeat_at (beside the status JSON, about a kilobyte). Each
-- heartbeat then rewrote two pages; at 5,000/s that was 40 MB/s written to the WAL and
-- checkpointed again, for 16 bytes of news per heartbeat. Here a heartbeat is one
-- short row per live token, many to a page.
--
-- What is read stays the same: a token's last use is its row here, else (after its
-- revocation, or from before this migration) workspace_auth_tokens.last_used_at; a
-- workspace's last heartbeat is the latest of its rows here and
-- workspaces.last_heartbeat_at. When a token is revoked, its row is folded into those
-- two columns and deleted, so the table holds live tokens only and stays small.
CREATE TABLE heartbeats (
    token_id      TEXT PRIMARY KEY NOT NULL,   -- workspace_auth_tokens.id of a live token
    workspace_uid TEXT NOT NULL,
    at            TEXT NOT NULL                -- the last accepted register or heartbeat
) WITHOUT ROWID;

CREATE INDEX heartbeats_workspace_idx ON heartbeats (workspace_uid);

INSERT INTO heartbeats (token_id, workspace_uid, at)
    SELECT id, workspace_uid, last_used_at FROM workspace_auth_tokens
    WHERE revoked_at IS NULL AND last_used_at IS NOT NULL;

-- Revocation folds the token's heartbeat into the wide rows (forward only) and drops it.
CREATE TRIGGER heartbeats_folded_on_revoke AFTER UPDATE OF revoked_at ON workspace_auth_tokens
WHEN OLD.revoked_at IS NULL AND NEW.revoked_at IS NOT NULL
BEGIN
    UPDATE workspace_auth_tokens SET last_used_at = h.at
        FROM heartbeats h
        WHERE h.token_id = NEW.id AND workspace_auth_tokens.id = NEW.id
          AND (workspace_auth_tokens.last_used_at IS NULL OR workspace_auth_tokens.last_used_at < h.at);
    UPDATE workspaces SET last_heartbeat_at = h.at
        FROM heartbeats h
        WHERE h.token_id = NEW.id AND workspaces.uid = h.workspace_uid
          AND (workspaces.last_heartbeat_at IS NULL OR workspaces.last_heartbeat_at < h.at);
    DELETE FROM heartbeats WHERE token_id = NEW.id;
END;
