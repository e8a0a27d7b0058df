-- The lifecycle autopilot (rules::suspend): the last wake request, and the
-- autopilot's bookkeeping (its last suspension, the running clock of maxLifetime) as
-- one JSON document (crate::model::LifecycleState). Both are inputs of the rules, so
-- a change of either is logged for the resync like the CLI's overrides.
-- Same as migrations/sqlite/0010_lifecycle.sql.
ALTER TABLE workspaces ADD COLUMN woken_at TIMESTAMPTZ;
ALTER TABLE workspaces ADD COLUMN lifecycle TEXT;

DROP TRIGGER workspaces_logged_update ON workspaces;
CREATE TRIGGER workspaces_logged_update AFTER UPDATE OF
    uid, key, incarnation, created_at, restart_count, last_restart_at, last_restart_reason,
    mode_override, restart_requested_at, woken_at, lifecycle
ON workspaces FOR EACH ROW
WHEN ((OLD.uid, OLD.key, OLD.incarnation, OLD.created_at, OLD.restart_count, OLD.last_restart_at,
       OLD.last_restart_reason, OLD.mode_override, OLD.restart_requested_at, OLD.woken_at, OLD.lifecycle)
      IS DISTINCT FROM
      (NEW.uid, NEW.key, NEW.incarnation, NEW.created_at, NEW.restart_count, NEW.last_restart_at,
       NEW.last_restart_reason, NEW.mode_override, NEW.restart_requested_at, NEW.woken_at, NEW.lifecycle))
EXECUTE FUNCTION molecule_log_workspace_change();
