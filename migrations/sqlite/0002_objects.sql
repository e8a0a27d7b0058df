-- Objects kept by the local Kubernetes-compatible API (`up --kube-api`): whole
-- Workspace/Team objects as JSON, with the metadata the API server works on in
-- columns. The Postgres flavour has the same tables and columns.

-- One global, monotonic resourceVersion, incremented in the same transaction as
-- every object write, so a watch can resume from any value it was given.
CREATE TABLE object_revision (
    id    INTEGER PRIMARY KEY NOT NULL CHECK (id = 1),
    value INTEGER NOT NULL
);
INSERT INTO object_revision (id, value) VALUES (1, 0);

CREATE TABLE objects (
    kind               TEXT NOT NULL,                  -- Workspace | Team
    namespace          TEXT NOT NULL,
    name               TEXT NOT NULL,
    uid                TEXT NOT NULL UNIQUE,
    resource_version   INTEGER NOT NULL,               -- object_revision.value of its last write
    generation         INTEGER NOT NULL,               -- bumped when .spec changes
    creation_timestamp TEXT NOT NULL,                  -- RFC 3339, as in the body
    deletion_timestamp TEXT,                           -- set while finalizers hold a deleted object
    body               TEXT NOT NULL,                  -- the whole object as JSON
    PRIMARY KEY (kind, namespace, name)
);
