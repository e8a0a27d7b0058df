-- State store schema, Postgres flavour (the SQLite one in migrations/sqlite has
-- the same tables and columns).

CREATE TABLE workspaces (
    uid                  TEXT PRIMARY KEY,               -- uuid, given on first sight
    key                  TEXT NOT NULL UNIQUE,           -- namespace/name
    incarnation          BIGINT NOT NULL DEFAULT 0,      -- bumped on every (re)provision
    created_at           TIMESTAMPTZ NOT NULL,
    last_heartbeat_at    TIMESTAMPTZ,
    restart_count        BIGINT NOT NULL DEFAULT 0,      -- the heartbeat rule's restart budget
    last_restart_at      TIMESTAMPTZ,
    last_restart_reason  TEXT,
    status               JSONB,                          -- WorkspaceStatus, written whole
    mode_override        TEXT CHECK (mode_override IN ('Running', 'Paused', 'Stopped')),
    restart_requested_at TIMESTAMPTZ
);

-- No foreign key to workspaces: rows outlive their workspace, revoked, for audit.
CREATE TABLE workspace_auth_tokens (
    id            TEXT PRIMARY KEY,                      -- uuid
    workspace_uid TEXT NOT NULL,
    token_hash    TEXT NOT NULL UNIQUE,                  -- sha256 hex; the plaintext is never stored
    prefix        TEXT NOT NULL,                         -- first 8 characters, for display
    incarnation   BIGINT NOT NULL,
    created_at    TIMESTAMPTZ NOT NULL,
    last_used_at  TIMESTAMPTZ,
    revoked_at    TIMESTAMPTZ,
    revoke_reason TEXT,
    CHECK ((revoked_at IS NULL) = (revoke_reason IS NULL))  -- every revocation has a reason
);

-- A workspace's live tokens (bootstrap rule, revoke-all, token-file check).
CREATE INDEX workspace_auth_tokens_live_idx
    ON workspace_auth_tokens (workspace_uid) WHERE revoked_at IS NULL;

-- The stale-token condition: live rows by last activity, as the original sweeper selects them.
CREATE INDEX workspace_auth_tokens_live_activity_idx
    ON workspace_auth_tokens ((COALESCE(last_used_at, created_at)), workspace_uid) WHERE revoked_at IS NULL;

-- Token history of one workspace (describe).
CREATE INDEX workspace_auth_tokens_workspace_idx
    ON workspace_auth_tokens (workspace_uid, created_at);

CREATE TABLE decisions (
    id            BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    workspace_uid TEXT NOT NULL,
    at            TIMESTAMPTZ NOT NULL,
    rule          TEXT NOT NULL,
    cause         TEXT NOT NULL,
    actions       JSONB NOT NULL,                        -- JSON array of strings
    outcome       TEXT NOT NULL
);

CREATE INDEX decisions_workspace_idx ON decisions (workspace_uid, id);
