-- Secrets, sealed with AES-256-GCM (see src/secrets.rs); plaintext is never stored.
CREATE TABLE secrets (
    scope      TEXT NOT NULL,            -- global | team:ns/name | workspace:ns/name
    name       TEXT NOT NULL,            -- delivered as this env var
    key_id     TEXT NOT NULL,            -- which key sealed it (key rotation)
    nonce      TEXT NOT NULL,
    ciphertext TEXT NOT NULL,
    version    INTEGER NOT NULL,         -- bumps on every set
    updated_at TEXT NOT NULL,
    PRIMARY KEY (scope, name)
);
