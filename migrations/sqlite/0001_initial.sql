-- State store schema, SQLite flavour (the Postgres one in migrations/postgres
-- has the same tables and columns).
--
-- Timestamps are TEXT in one fixed-width UTC form, 'YYYY-MM-DDTHH:MM:SS.ffffffZ'
-- (microseconds, like Postgres), written only by the store. Fixed width makes
-- text order equal time order, so comparisons such as the stale-token
-- condition run in SQL.

CREATE TABLE workspaces (
    uid                  TEXT PRIMARY KEY NOT NULL,      -- uuid, given on first sight
    key                  TEXT NOT NULL UNIQUE,           -- namespace/name
    incarnation          INTEGER NOT NULL DEFAULT 0,     -- bumped on every (re)provision
    created_at           TEXT NOT NULL,
    last_heartbeat_at    TEXT,
    restart_count        INTEGER NOT NULL DEFAULT 0,     -- the heartbeat rule's restart budget
    last_restart_at      TEXT,
    last_restart_reason  TEXT,
    status               TEXT,                           -- WorkspaceStatus as JSON, written whole
    mode_override        TEXT CHECK (mode_override IN ('Running', 'Paused', 'Stopped')),
    restart_requested_at TEXT
);

-- No foreign key to workspaces: rows outlive their workspace, revoked, for audit.
CREATE TABLE workspace_auth_tokens (
    id            TEXT PRIMARY KEY NOT NULL,             -- uuid
    workspace_uid TEXT NOT NULL,
    token_hash    TEXT NOT NULL UNIQUE,                  -- sha256 hex; the plaintext is never stored
    prefix        TEXT NOT NULL,                         -- first 8 characters, for display
    incarnation   INTEGER NOT NULL,
    created_at    TEXT NOT NULL,
    last_used_at  TEXT,
    revoked_at    TEXT,
    revoke_reason TEXT,
    CHECK ((revoked_at IS NULL) = (revoke_reason IS NULL))  -- every revocation has a reason
);

-- A workspace's live tokens (bootstrap rule, revoke-all, token-file check).
CREATE INDEX workspace_auth_tokens_live_idx
    ON workspace_auth_tokens (workspace_uid) WHERE revoked_at IS NULL;

-- The stale-token condition: live rows by last activity, as the original sweeper selects them.
CREATE INDEX workspace_auth_tokens_live_activity_idx
    ON workspace_auth_tokens (COALESCE(last_used_at, created_at), workspace_uid) WHERE revoked_at IS NULL;

-- Token history of one workspace (describe).
CREATE INDEX workspace_auth_tokens_workspace_idx
    ON workspace_auth_tokens (workspace_uid, created_at);

CREATE TABLE decisions (
    id            INTEGER PRIMARY KEY AUTOINCREMENT,
    workspace_uid TEXT NOT NULL,
    at            TEXT NOT NULL,
    rule          TEXT NOT NULL,
    cause         TEXT NOT NULL,
    actions       TEXT NOT NULL,                         -- JSON array of strings
    outcome       TEXT NOT NULL
);

CREATE INDEX decisions_workspace_idx ON decisions (workspace_uid, id);
