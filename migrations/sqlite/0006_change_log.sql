-- The resync's change log (issue 7). The periodic resync used to read every record and
-- every live token to find the few that changed out of band (a row edited by hand, a
-- token revoked from another process). Each change to a workspace record or a token row
-- now leaves the workspace's key here; the resync takes (deletes and returns) the log
-- and looks at those workspaces only. Same as migrations/postgres/0008_change_log.sql.
--
-- Only real changes are logged (an UPDATE that writes the same values is not). Not
-- logged, because no rule reads them: heartbeats (last_heartbeat_at, last_used_at;
-- a silent agent is found by the reconcile timed for its heartbeat deadline) and the
-- status, which is the operator's output (status, agent_online). A NULL key means "every
-- workspace": a secret changed.
CREATE TABLE workspace_changes (
    seq           INTEGER PRIMARY KEY AUTOINCREMENT,
    workspace_key TEXT
);

CREATE TRIGGER workspaces_logged_insert AFTER INSERT ON workspaces
BEGIN
    INSERT INTO workspace_changes (workspace_key) VALUES (NEW.key);
END;

CREATE TRIGGER workspaces_logged_delete AFTER DELETE ON workspaces
BEGIN
    INSERT INTO workspace_changes (workspace_key) VALUES (OLD.key);
END;

CREATE TRIGGER workspaces_logged_update AFTER UPDATE OF
    uid, key, incarnation, created_at, restart_count, last_restart_at, last_restart_reason,
    mode_override, restart_requested_at
ON workspaces
WHEN OLD.uid IS NOT NEW.uid OR OLD.key IS NOT NEW.key OR OLD.incarnation IS NOT NEW.incarnation
  OR OLD.created_at IS NOT NEW.created_at OR OLD.restart_count IS NOT NEW.restart_count
  OR OLD.last_restart_at IS NOT NEW.last_restart_at OR OLD.last_restart_reason IS NOT NEW.last_restart_reason
  OR OLD.mode_override IS NOT NEW.mode_override OR OLD.restart_requested_at IS NOT NEW.restart_requested_at
BEGIN
    INSERT INTO workspace_changes (workspace_key) VALUES (NEW.key);
    INSERT INTO workspace_changes (workspace_key) SELECT OLD.key WHERE OLD.key IS NOT NEW.key;
END;

CREATE TRIGGER tokens_logged_insert AFTER INSERT ON workspace_auth_tokens
BEGIN
    INSERT INTO workspace_changes (workspace_key) SELECT key FROM workspaces WHERE uid = NEW.workspace_uid;
END;

CREATE TRIGGER tokens_logged_delete AFTER DELETE ON workspace_auth_tokens
BEGIN
    INSERT INTO workspace_changes (workspace_key) SELECT key FROM workspaces WHERE uid = OLD.workspace_uid;
END;

CREATE TRIGGER tokens_logged_update AFTER UPDATE OF
    id, workspace_uid, token_hash, incarnation, created_at, revoked_at, revoke_reason, expires_at
ON workspace_auth_tokens
WHEN OLD.id IS NOT NEW.id OR OLD.workspace_uid IS NOT NEW.workspace_uid OR OLD.token_hash IS NOT NEW.token_hash
  OR OLD.incarnation IS NOT NEW.incarnation OR OLD.created_at IS NOT NEW.created_at
  OR OLD.revoked_at IS NOT NEW.revoked_at OR OLD.revoke_reason IS NOT NEW.revoke_reason
  OR OLD.expires_at IS NOT NEW.expires_at
BEGIN
    INSERT INTO workspace_changes (workspace_key)
        SELECT key FROM workspaces WHERE uid IN (NEW.workspace_uid, OLD.workspace_uid);
END;

CREATE TRIGGER secrets_logged_insert AFTER INSERT ON secrets
BEGIN
    INSERT INTO workspace_changes (workspace_key) VALUES (NULL);
END;

CREATE TRIGGER secrets_logged_update AFTER UPDATE ON secrets
BEGIN
    INSERT INTO workspace_changes (workspace_key) VALUES (NULL);
END;

CREATE TRIGGER secrets_logged_delete AFTER DELETE ON secrets
BEGIN
    INSERT INTO workspace_changes (workspace_key) VALUES (NULL);
END;
