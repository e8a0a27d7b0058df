-- High availability: replicas of one operator (same instance id) share this
-- Postgres. The leader holds a lease row; every (re)acquisition by another holder
-- bumps the fencing epoch. The leader's connections carry `molecule.fence =
-- '<holder>:<epoch>'`; a write to workspace state or token rows from a connection
-- whose fence is not the lease's current, unexpired holder and epoch is rejected by
-- the database itself, so a deposed leader (paused, partitioned) can never revoke or
-- issue a token. Connections without a fence (followers' registries recording
-- heartbeats) are not leader writes and pass.
CREATE TABLE operator_leases (
    name       TEXT PRIMARY KEY,          -- the operator instance id
    holder     TEXT NOT NULL,
    epoch      BIGINT NOT NULL,
    renewed_at TIMESTAMPTZ NOT NULL,
    expires_at TIMESTAMPTZ NOT NULL
);

CREATE FUNCTION molecule_fence_check() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    fence text := current_setting('molecule.fence', true);
BEGIN
    IF fence IS NULL OR fence = '' THEN
        RETURN COALESCE(NEW, OLD);
    END IF;
    IF NOT EXISTS (
        SELECT 1 FROM operator_leases
        WHERE name = split_part(fence, '|', 1)
          AND holder || ':' || epoch = split_part(fence, '|', 2)
          AND expires_at > now()
    ) THEN
        RAISE EXCEPTION 'fenced: % is no longer the leader', fence USING ERRCODE = 'MF001';
    END IF;
    RETURN COALESCE(NEW, OLD);
END $$;

CREATE TRIGGER workspaces_fence BEFORE INSERT OR UPDATE OR DELETE ON workspaces
    FOR EACH ROW EXECUTE FUNCTION molecule_fence_check();
CREATE TRIGGER workspace_auth_tokens_fence BEFORE INSERT OR UPDATE OR DELETE ON workspace_auth_tokens
    FOR EACH ROW EXECUTE FUNCTION molecule_fence_check();
