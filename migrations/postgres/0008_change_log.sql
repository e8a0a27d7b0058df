-- The resync's change log (issue 7). The periodic resync used to read every record and
-- every live token to find the few that changed out of band (a row edited by hand, a
-- token revoked from another process). Each change to a workspace record or a token row
-- now leaves the workspace's key here; the resync takes (deletes and returns) the log
-- and looks at those workspaces only. Same as migrations/sqlite/0006_change_log.sql.
--
-- Taking the log is `DELETE ... RETURNING`, not "rows after the last sequence number
-- seen": a transaction can commit after one that drew a later number, and a reader
-- going by numbers would skip it. A row not yet committed is simply taken next time.
--
-- Only real changes are logged (an UPDATE that writes the same values is not). Not
-- logged, because no rule reads them: heartbeats (last_heartbeat_at, last_used_at; a
-- silent agent is found by the reconcile timed for its heartbeat deadline) and the
-- status, which is the operator's output (status, agent_online). A NULL key means "every
-- workspace": a secret changed.
CREATE TABLE workspace_changes (
    seq           BIGSERIAL PRIMARY KEY,
    workspace_key TEXT
);

CREATE FUNCTION molecule_log_workspace_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP <> 'INSERT' THEN
        INSERT INTO workspace_changes (workspace_key) VALUES (OLD.key);
    END IF;
    IF TG_OP <> 'DELETE' AND (TG_OP = 'INSERT' OR NEW.key IS DISTINCT FROM OLD.key) THEN
        INSERT INTO workspace_changes (workspace_key) VALUES (NEW.key);
    END IF;
    RETURN NULL;
END $$;

CREATE TRIGGER workspaces_logged_insert_delete AFTER INSERT OR DELETE ON workspaces
    FOR EACH ROW EXECUTE FUNCTION molecule_log_workspace_change();
CREATE TRIGGER workspaces_logged_update AFTER UPDATE OF
    uid, key, incarnation, created_at, restart_count, last_restart_at, last_restart_reason,
    mode_override, restart_requested_at
ON workspaces FOR EACH ROW
WHEN ((OLD.uid, OLD.key, OLD.incarnation, OLD.created_at, OLD.restart_count, OLD.last_restart_at,
       OLD.last_restart_reason, OLD.mode_override, OLD.restart_requested_at)
      IS DISTINCT FROM
      (NEW.uid, NEW.key, NEW.incarnation, NEW.created_at, NEW.restart_count, NEW.last_restart_at,
       NEW.last_restart_reason, NEW.mode_override, NEW.restart_requested_at))
EXECUTE FUNCTION molecule_log_workspace_change();

CREATE FUNCTION molecule_log_token_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO workspace_changes (workspace_key)
        SELECT key FROM workspaces
        WHERE uid IN (CASE WHEN TG_OP <> 'DELETE' THEN NEW.workspace_uid END,
                      CASE WHEN TG_OP <> 'INSERT' THEN OLD.workspace_uid END);
    RETURN NULL;
END $$;

CREATE TRIGGER tokens_logged_insert_delete AFTER INSERT OR DELETE ON workspace_auth_tokens
    FOR EACH ROW EXECUTE FUNCTION molecule_log_token_change();
CREATE TRIGGER tokens_logged_update AFTER UPDATE OF
    id, workspace_uid, token_hash, incarnation, created_at, revoked_at, revoke_reason, expires_at
ON workspace_auth_tokens FOR EACH ROW
WHEN ((OLD.id, OLD.workspace_uid, OLD.token_hash, OLD.incarnation, OLD.created_at, OLD.revoked_at,
       OLD.revoke_reason, OLD.expires_at)
      IS DISTINCT FROM
      (NEW.id, NEW.workspace_uid, NEW.token_hash, NEW.incarnation, NEW.created_at, NEW.revoked_at,
       NEW.revoke_reason, NEW.expires_at))
EXECUTE FUNCTION molecule_log_token_change();

CREATE FUNCTION molecule_log_secret_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO workspace_changes (workspace_key) VALUES (NULL);
    RETURN NULL;
END $$;

CREATE TRIGGER secrets_logged AFTER INSERT OR UPDATE OR DELETE ON secrets
    FOR EACH STATEMENT EXECUTE FUNCTION molecule_log_secret_change();
