-- Desired state as rows (`--source postgres`): any SQL client, dashboard or the
-- original platform's control plane can declare workspaces and teams here. The
-- operator LISTENs on `molecule_desired` and writes status back into `status`.
CREATE TABLE desired_objects (
    kind              TEXT NOT NULL CHECK (kind IN ('Workspace', 'Team')),
    namespace         TEXT NOT NULL DEFAULT 'default',
    name              TEXT NOT NULL,
    spec              JSONB NOT NULL DEFAULT '{}',
    labels            JSONB NOT NULL DEFAULT '{}',
    generation        BIGINT NOT NULL DEFAULT 1,     -- bumps on every spec/labels/deleted_at change
    created_at        TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at        TIMESTAMPTZ NOT NULL DEFAULT now(),
    deleted_at        TIMESTAMPTZ,                   -- soft delete: the operator removes the workspace
    status            JSONB,                         -- written by the operator, whole
    status_updated_at TIMESTAMPTZ,
    PRIMARY KEY (kind, namespace, name)
);

CREATE FUNCTION molecule_desired_declared_change(o desired_objects, n desired_objects) RETURNS boolean
    LANGUAGE sql IMMUTABLE AS $$
    SELECT o.spec IS DISTINCT FROM n.spec OR o.labels IS DISTINCT FROM n.labels OR o.deleted_at IS DISTINCT FROM n.deleted_at
$$;

CREATE FUNCTION molecule_desired_touch() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF molecule_desired_declared_change(OLD, NEW) THEN
        NEW.generation := OLD.generation + 1;
        NEW.updated_at := now();
    END IF;
    RETURN NEW;
END $$;

CREATE TRIGGER desired_objects_touch BEFORE UPDATE ON desired_objects
    FOR EACH ROW EXECUTE FUNCTION molecule_desired_touch();

-- Status-only writes (the operator's own) do not wake the operator.
CREATE FUNCTION molecule_desired_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'UPDATE' AND NOT molecule_desired_declared_change(OLD, NEW) THEN
        RETURN NULL;
    END IF;
    IF TG_OP = 'DELETE' THEN
        PERFORM pg_notify('molecule_desired', OLD.kind || '/' || OLD.namespace || '/' || OLD.name);
    ELSE
        PERFORM pg_notify('molecule_desired', NEW.kind || '/' || NEW.namespace || '/' || NEW.name);
    END IF;
    RETURN NULL;
END $$;

CREATE TRIGGER desired_objects_notify AFTER INSERT OR UPDATE OR DELETE ON desired_objects
    FOR EACH ROW EXECUTE FUNCTION molecule_desired_notify();
