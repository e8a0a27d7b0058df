-- The lifecycle autopilot (rules::suspend): the last wake request, and the
-- autopilot's bookkeeping (its last suspension, the running clock of maxLifetime) as
-- one JSON document (crate::model::LifecycleState). Both are inputs of the rules, so
-- a change of either is logged for the resync like the CLI's overrides.
-- Same as migrations/postgres/0013_lifecycle.sql.
ALTER TABLE workspaces ADD COLUMN woken_at TEXT;
ALTER TABLE workspaces ADD COLUMN lifecycle TEXT;

DROP TRIGGER workspaces_logged_update;
CREATE TRIGGER workspaces_logged_update AFTER UPDATE OF
    uid, key, incarnation, created_at, restart_count, last_restart_at, last_restart_reason,
    mode_override, restart_requested_at, woken_at, lifecycle
ON workspaces
WHEN OLD.uid IS NOT NEW.uid OR OLD.key IS NOT NEW.key OR OLD.incarnation IS NOT NEW.incarnation
  OR OLD.created_at IS NOT NEW.created_at OR OLD.restart_count IS NOT NEW.restart_count
  OR OLD.last_restart_at IS NOT NEW.last_restart_at OR OLD.last_restart_reason IS NOT NEW.last_restart_reason
  OR OLD.mode_override IS NOT NEW.mode_override OR OLD.restart_requested_at IS NOT NEW.restart_requested_at
  OR OLD.woken_at IS NOT NEW.woken_at OR OLD.lifecycle IS NOT NEW.lifecycle
BEGIN
    INSERT INTO workspace_changes (workspace_key) VALUES (NEW.key);
    INSERT INTO workspace_changes (workspace_key) SELECT OLD.key WHERE OLD.key IS NOT NEW.key;
END;
