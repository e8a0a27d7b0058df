//! SQLite store: the embedded state file of local mode (`STATE/state.db`).
//!
//! Timestamps are TEXT in one fixed-width UTC form (see [`ts`]), so text order is
//! time order and the stale-token condition is evaluated by SQLite itself.

use std::fs::{DirBuilder, OpenOptions, Permissions};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;
use std::time::Duration;

use sqlx::Row;
use sqlx::migrate::Migrator;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteRow, SqliteSynchronous,
};

use super::*;

/// How long a statement waits for another connection's write lock before failing.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);
/// WAL lets readers run beside the single writer; writes serialize on the file lock
/// whatever the pool size, so a few connections are enough.
const MAX_CONNECTIONS: u32 = 4;

/// The migrations in `migrations/sqlite`, embedded in the binary and applied on open.
static MIGRATOR: Migrator = sqlx::migrate!("migrations/sqlite");

pub struct SqliteStore {
    pool: SqlitePool,
}

impl SqliteStore {
    /// Opens (creating if needed, mode 0600) the state database at `path` and
    /// applies the migrations.
    pub async fn open(path: &Path) -> StoreResult<Self> {
        create_private_file(path)?;
        let options = SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            // With WAL, NORMAL is durable except for the last commits on power loss.
            .synchronous(SqliteSynchronous::Normal)
            .busy_timeout(BUSY_TIMEOUT)
            .foreign_keys(true);
        let pool = SqlitePoolOptions::new()
            .max_connections(MAX_CONNECTIONS)
            .acquire_timeout(BUSY_TIMEOUT * 2)
            // sqlx pings a connection before lending it out by default: for SQLite a round
            // trip to the connection's thread, as dear as the query itself. A local
            // file's connection does not go stale.
            .test_before_acquire(false)
            .connect_with(options)
            .await?;
        MIGRATOR.run(&pool).await?;
        Ok(Self { pool })
    }

    /// A transaction that takes the write lock at once (waiting up to the busy
    /// timeout), so it can never fail half-way on a lock upgrade.
    async fn write_tx(&self) -> StoreResult<sqlx::Transaction<'static, sqlx::Sqlite>> {
        Ok(self.pool.begin_with("BEGIN IMMEDIATE").await?)
    }
}

/// Creates the parent directory (0700 if new) and the file (0600), and tightens an
/// existing file to 0600: the state holds token hashes and the admin's overrides.
fn create_private_file(path: &Path) -> StoreResult<()> {
    let shown = path.display();
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(parent)
            .map_err(|e| StoreError::Invalid(format!("cannot create the state directory {}: {e}", parent.display())))?;
    }
    OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| StoreError::Invalid(format!("cannot create the state database {shown}: {e}")))?;
    if let Err(error) = std::fs::set_permissions(path, Permissions::from_mode(0o600)) {
        tracing::warn!(path = %shown, %error, "cannot make the state database private (mode 0600)");
    }
    Ok(())
}

const TS_FORMAT: &str = "%Y-%m-%dT%H:%M:%S%.6fZ";

/// The stored form of a timestamp: `YYYY-MM-DDTHH:MM:SS.ffffffZ`. Years outside
/// 0000..=9999 are clamped so the text keeps its width and therefore its order.
fn ts(t: DateTime<Utc>) -> String {
    use chrono::Datelike;
    match t.year() {
        ..0 => "0000-01-01T00:00:00.000000Z".to_string(),
        10000.. => "9999-12-31T23:59:59.999999Z".to_string(),
        _ => t.format(TS_FORMAT).to_string(),
    }
}

fn parse_ts(column: &str, text: &str) -> StoreResult<DateTime<Utc>> {
    DateTime::parse_from_rfc3339(text).map(|t| t.with_timezone(&Utc)).map_err(|e| {
        StoreError::Invalid(format!("the state database holds a malformed timestamp {text:?} in {column}: {e}"))
    })
}

fn get_ts(row: &SqliteRow, column: &str) -> StoreResult<DateTime<Utc>> {
    let text: String = row.try_get(column)?;
    parse_ts(column, &text)
}

fn get_opt_ts(row: &SqliteRow, column: &str) -> StoreResult<Option<DateTime<Utc>>> {
    let text: Option<String> = row.try_get(column)?;
    text.map(|t| parse_ts(column, &t)).transpose()
}

/// A workspace's last heartbeat: the latest of its live tokens' rows in `heartbeats`
/// and what revocations folded into `workspaces.last_heartbeat_at` (migration 0007).
macro_rules! last_heartbeat_at {
    () => {
        "NULLIF(max(COALESCE(workspaces.last_heartbeat_at, ''), \
         COALESCE((SELECT max(h.at) FROM heartbeats h WHERE h.workspace_uid = workspaces.uid), '')), '') \
         AS last_heartbeat_at"
    };
}

macro_rules! workspace_columns {
    () => {
        concat!(
            "uid, key, incarnation, created_at, ",
            last_heartbeat_at!(),
            ", restart_count, last_restart_at, last_restart_reason, status, mode_override, restart_requested_at"
        )
    };
}

macro_rules! brief_workspace_columns {
    () => {
        concat!(
            "uid, key, incarnation, created_at, ",
            last_heartbeat_at!(),
            ", restart_count, last_restart_at, last_restart_reason, mode_override, restart_requested_at"
        )
    };
}

fn workspace_from_row(row: &SqliteRow) -> StoreResult<WorkspaceRecord> {
    record_from_row(row, true)
}

/// A record from a row; without `with_status` the row has no status column and the
/// record's status is None.
fn record_from_row(row: &SqliteRow, with_status: bool) -> StoreResult<WorkspaceRecord> {
    let uid: String = row.try_get("uid")?;
    Ok(WorkspaceRecord {
        key: row.try_get("key")?,
        incarnation: row.try_get("incarnation")?,
        created_at: get_ts(row, "created_at")?,
        last_heartbeat_at: get_opt_ts(row, "last_heartbeat_at")?,
        restart_count: row.try_get("restart_count")?,
        last_restart_at: get_opt_ts(row, "last_restart_at")?,
        last_restart_reason: row.try_get("last_restart_reason")?,
        status: if with_status { decode_status(&uid, row.try_get("status")?) } else { None },
        mode_override: parse_mode(&uid, row.try_get("mode_override")?)?,
        restart_requested_at: get_opt_ts(row, "restart_requested_at")?,
        uid,
    })
}

/// A list bound as one JSON array parameter (read back with `json_each`): any length,
/// one prepared statement.
fn json_array(items: &[String]) -> StoreResult<String> {
    serde_json::to_string(items).map_err(|e| StoreError::Invalid(format!("cannot encode a list parameter: {e}")))
}

macro_rules! token_columns {
    () => {
        concat!(
            "id, workspace_uid, token_hash, prefix, incarnation, created_at, ",
            last_used_at!(),
            " AS last_used_at, revoked_at, revoke_reason, expires_at"
        )
    };
}

/// The statement [`Store::revoke_stale_tokens`] runs (binds: uid, cutoff, now,
/// reason). Public so the conformance suite can check its query plan.
pub const REVOKE_STALE_TOKENS_SQL: &str = concat!(
    "UPDATE workspace_auth_tokens SET revoked_at = ?3, revoke_reason = ?4 \
     WHERE workspace_uid = ?1 AND revoked_at IS NULL AND COALESCE(",
    last_used_at!(),
    ", created_at) < ?2"
);

// The statements on the hot paths, public so the benchmarks and the conformance
// suite can EXPLAIN exactly what runs (see bench/stale_token, bench/registry).

/// `Store::workspace` (and the first look of `ensure_workspace`): one row by key.
pub const WORKSPACE_BY_KEY_SQL: &str = concat!("SELECT ", workspace_columns!(), " FROM workspaces WHERE key = ?1");
/// `Store::workspace_by_uid`: one row by uid.
pub const WORKSPACE_BY_UID_SQL: &str = concat!("SELECT ", workspace_columns!(), " FROM workspaces WHERE uid = ?1");
/// `Store::live_tokens` (what the stale-token and token-file rules look at). The
/// index is named: without statistics (the operator never runs ANALYZE) SQLite
/// prefers `workspace_auth_tokens_workspace_idx`, which also serves the ORDER BY,
/// and so reads every revoked row of the workspace's history to find its one or two
/// live ones (1 ms at 10,000 rows of history; bench/stale_token).
pub const LIVE_TOKENS_SQL: &str = concat!(
    "SELECT ",
    token_columns!(),
    " FROM workspace_auth_tokens INDEXED BY workspace_auth_tokens_live_idx \
     WHERE workspace_uid = ?1 AND revoked_at IS NULL ORDER BY created_at, id"
);
/// `Store::token_owners`: presented tokens' rows (by hash; the caller keeps the live
/// ones) and their workspaces.
pub const TOKEN_OWNERS_SQL: &str = "SELECT t.token_hash, t.revoked_at IS NULL AS live, t.id, t.workspace_uid, w.key, t.incarnation AS token_incarnation, \
            w.incarnation AS current_incarnation, t.expires_at, w.agent_online \
     FROM workspace_auth_tokens t JOIN workspaces w ON w.uid = t.workspace_uid \
     WHERE t.token_hash IN (SELECT value FROM json_each(?1))";
/// `Store::record_heartbeats` (bind: a JSON array of `[token id, uid, at]`, one per
/// token): each token's row in `heartbeats` moves forward to `at`, only while the
/// token is live (a revoked token's heartbeat leaves no trace). (`WHERE true`: SQLite
/// needs a WHERE before an upsert's ON CONFLICT when the SELECT has a join.)
pub const HEARTBEATS_SQL: &str = "INSERT INTO heartbeats (token_id, workspace_uid, at) \
     SELECT b.id, b.uid, b.at \
     FROM (SELECT value ->> 0 AS id, value ->> 1 AS uid, value ->> 2 AS at FROM json_each(?1)) AS b \
     JOIN workspace_auth_tokens t ON t.id = b.id AND t.workspace_uid = b.uid AND t.revoked_at IS NULL \
     WHERE true \
     ON CONFLICT (token_id) DO UPDATE SET at = excluded.at WHERE excluded.at > heartbeats.at";
/// `Store::secrets` for some scopes (bind: a JSON array of scope names).
pub const SECRETS_OF_SCOPES_SQL: &str = "SELECT scope, name, key_id, nonce, ciphertext, version, updated_at \
     FROM secrets WHERE scope IN (SELECT value FROM json_each(?1)) ORDER BY scope, name";
const ALL_SECRETS_SQL: &str =
    "SELECT scope, name, key_id, nonce, ciphertext, version, updated_at FROM secrets ORDER BY scope, name";

fn token_from_row(row: &SqliteRow) -> StoreResult<TokenRow> {
    Ok(TokenRow {
        id: row.try_get("id")?,
        workspace_uid: row.try_get("workspace_uid")?,
        token_hash: row.try_get("token_hash")?,
        prefix: row.try_get("prefix")?,
        incarnation: row.try_get("incarnation")?,
        created_at: get_ts(row, "created_at")?,
        last_used_at: get_opt_ts(row, "last_used_at")?,
        revoked_at: get_opt_ts(row, "revoked_at")?,
        revoke_reason: row.try_get("revoke_reason")?,
        expires_at: get_opt_ts(row, "expires_at")?,
    })
}

macro_rules! object_columns {
    () => {
        "kind, namespace, name, uid, resource_version, generation, creation_timestamp, deletion_timestamp, body"
    };
}

fn object_from_row(row: &SqliteRow) -> StoreResult<StoredObject> {
    let kind: String = row.try_get("kind")?;
    let namespace: String = row.try_get("namespace")?;
    let name: String = row.try_get("name")?;
    let body: String = row.try_get("body")?;
    Ok(StoredObject {
        body: decode_object_body(&kind, &namespace, &name, &body)?,
        uid: row.try_get("uid")?,
        resource_version: row.try_get("resource_version")?,
        generation: row.try_get("generation")?,
        creation_timestamp: row.try_get("creation_timestamp")?,
        deletion_timestamp: row.try_get("deletion_timestamp")?,
        kind,
        namespace,
        name,
    })
}

/// `Err(unknown workspace)` when an UPDATE keyed by uid matched no row.
fn expect_one(uid: &str, rows_affected: u64) -> StoreResult<()> {
    if rows_affected == 0 { Err(unknown_workspace(uid)) } else { Ok(()) }
}

#[async_trait]
impl Store for SqliteStore {
    async fn ping(&self) -> StoreResult<()> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    async fn ensure_workspace(&self, key: &str, now: DateTime<Utc>) -> StoreResult<WorkspaceRecord> {
        if let Some(record) = self.workspace(key).await? {
            return Ok(record);
        }
        // Two callers racing on first sight both end up with the row that won.
        sqlx::query(
            "INSERT INTO workspaces (uid, key, incarnation, created_at, restart_count) VALUES (?1, ?2, 0, ?3, 0) \
             ON CONFLICT (key) DO NOTHING",
        )
        .bind(uuid::Uuid::new_v4().to_string())
        .bind(key)
        .bind(ts(now))
        .execute(&self.pool)
        .await?;
        self.workspace(key)
            .await?
            .ok_or_else(|| StoreError::Invalid(format!("workspace {key} was deleted while it was being recorded")))
    }

    async fn workspace(&self, key: &str) -> StoreResult<Option<WorkspaceRecord>> {
        let row = sqlx::query(WORKSPACE_BY_KEY_SQL).bind(key).fetch_optional(&self.pool).await?;
        row.as_ref().map(workspace_from_row).transpose()
    }

    async fn workspace_by_uid(&self, uid: &str) -> StoreResult<Option<WorkspaceRecord>> {
        let row = sqlx::query(WORKSPACE_BY_UID_SQL).bind(uid).fetch_optional(&self.pool).await?;
        row.as_ref().map(workspace_from_row).transpose()
    }

    async fn list_workspaces(&self) -> StoreResult<Vec<WorkspaceRecord>> {
        let sql = concat!("SELECT ", workspace_columns!(), " FROM workspaces ORDER BY key");
        let rows = sqlx::query(sql).fetch_all(&self.pool).await?;
        rows.iter().map(workspace_from_row).collect()
    }

    async fn list_workspaces_brief(
        &self,
        keys: Option<&[String]>,
    ) -> StoreResult<Vec<(WorkspaceRecord, Option<Phase>)>> {
        macro_rules! select {
            ($filter:literal) => {
                concat!(
                    "SELECT ",
                    brief_workspace_columns!(),
                    ", json_extract(status, '$.phase') AS phase FROM workspaces ",
                    $filter,
                    " ORDER BY key"
                )
            };
        }
        let rows = match keys {
            None => sqlx::query(select!("")).fetch_all(&self.pool).await?,
            Some(keys) => {
                let sql = select!("WHERE key IN (SELECT value FROM json_each(?1))");
                sqlx::query(sql).bind(json_array(keys)?).fetch_all(&self.pool).await?
            }
        };
        rows.iter().map(|row| Ok((record_from_row(row, false)?, parse_phase(row.try_get("phase")?)))).collect()
    }

    async fn take_changes(&self) -> StoreResult<Changes> {
        let rows: Vec<Option<String>> =
            sqlx::query_scalar("DELETE FROM workspace_changes RETURNING workspace_key").fetch_all(&self.pool).await?;
        Ok(changes_from(rows))
    }

    async fn bump_incarnation(&self, uid: &str) -> StoreResult<i64> {
        let incarnation: Option<i64> = sqlx::query_scalar(
            "UPDATE workspaces SET incarnation = incarnation + 1 WHERE uid = ?1 RETURNING incarnation",
        )
        .bind(uid)
        .fetch_optional(&self.pool)
        .await?;
        incarnation.ok_or_else(|| unknown_workspace(uid))
    }

    async fn record_restart(&self, uid: &str, reason: &str, at: DateTime<Utc>) -> StoreResult<()> {
        let done = sqlx::query(
            "UPDATE workspaces SET restart_count = restart_count + 1, last_restart_at = ?2, last_restart_reason = ?3 \
             WHERE uid = ?1",
        )
        .bind(uid)
        .bind(ts(at))
        .bind(reason)
        .execute(&self.pool)
        .await?;
        expect_one(uid, done.rows_affected())
    }

    async fn reset_restarts(&self, uid: &str) -> StoreResult<()> {
        let done =
            sqlx::query("UPDATE workspaces SET restart_count = 0 WHERE uid = ?1").bind(uid).execute(&self.pool).await?;
        expect_one(uid, done.rows_affected())
    }

    async fn set_mode_override(&self, uid: &str, mode: Option<OperatingMode>) -> StoreResult<()> {
        let done = sqlx::query("UPDATE workspaces SET mode_override = ?2 WHERE uid = ?1")
            .bind(uid)
            .bind(mode.map(mode_as_str))
            .execute(&self.pool)
            .await?;
        expect_one(uid, done.rows_affected())
    }

    async fn request_restart(&self, uid: &str, at: DateTime<Utc>) -> StoreResult<()> {
        let done = sqlx::query("UPDATE workspaces SET restart_requested_at = ?2 WHERE uid = ?1")
            .bind(uid)
            .bind(ts(at))
            .execute(&self.pool)
            .await?;
        expect_one(uid, done.rows_affected())
    }

    async fn save_status(&self, uid: &str, status: &WorkspaceStatus) -> StoreResult<()> {
        let done = sqlx::query("UPDATE workspaces SET status = ?2, agent_online = ?3 WHERE uid = ?1")
            .bind(uid)
            .bind(encode_status(status)?)
            .bind(shows_agent_online(status))
            .execute(&self.pool)
            .await?;
        expect_one(uid, done.rows_affected())
    }

    async fn delete_workspace(&self, uid: &str) -> StoreResult<()> {
        let mut tx = self.write_tx().await?;
        sqlx::query(
            "UPDATE workspace_auth_tokens SET revoked_at = ?2, revoke_reason = ?3 \
             WHERE workspace_uid = ?1 AND revoked_at IS NULL",
        )
        .bind(uid)
        .bind(ts(Utc::now()))
        .bind(RevokeReason::Deleted.as_str())
        .execute(&mut *tx)
        .await?;
        sqlx::query("DELETE FROM decisions WHERE workspace_uid = ?1").bind(uid).execute(&mut *tx).await?;
        sqlx::query("DELETE FROM workspaces WHERE uid = ?1").bind(uid).execute(&mut *tx).await?;
        tx.commit().await?;
        Ok(())
    }

    async fn issue_token(&self, uid: &str, incarnation: i64, now: DateTime<Utc>) -> StoreResult<IssuedToken> {
        let issued = new_token(uid, incarnation, now);
        let row = &issued.row;
        // Only for a workspace the store knows: a token nobody can own is never created.
        let done = sqlx::query(
            "INSERT INTO workspace_auth_tokens (id, workspace_uid, token_hash, prefix, incarnation, created_at) \
             SELECT ?1, ?2, ?3, ?4, ?5, ?6 WHERE EXISTS (SELECT 1 FROM workspaces WHERE uid = ?2)",
        )
        .bind(&row.id)
        .bind(&row.workspace_uid)
        .bind(&row.token_hash)
        .bind(&row.prefix)
        .bind(row.incarnation)
        .bind(ts(row.created_at))
        .execute(&self.pool)
        .await?;
        expect_one(uid, done.rows_affected())?;
        Ok(issued)
    }

    async fn live_tokens(&self, uid: &str) -> StoreResult<Vec<TokenRow>> {
        let rows = sqlx::query(LIVE_TOKENS_SQL).bind(uid).fetch_all(&self.pool).await?;
        rows.iter().map(token_from_row).collect()
    }

    async fn all_live_tokens(&self, uids: Option<&[String]>) -> StoreResult<Vec<TokenRow>> {
        let rows = match uids {
            None => {
                let sql = concat!(
                    "SELECT ",
                    token_columns!(),
                    " FROM workspace_auth_tokens WHERE revoked_at IS NULL ORDER BY workspace_uid, created_at, id"
                );
                sqlx::query(sql).fetch_all(&self.pool).await?
            }
            Some(uids) => {
                // The live index, one lookup per uid (as live_tokens does).
                let sql = concat!(
                    "SELECT ",
                    token_columns!(),
                    " FROM workspace_auth_tokens INDEXED BY workspace_auth_tokens_live_idx \
                     WHERE revoked_at IS NULL AND workspace_uid IN (SELECT value FROM json_each(?1)) \
                     ORDER BY workspace_uid, created_at, id"
                );
                sqlx::query(sql).bind(json_array(uids)?).fetch_all(&self.pool).await?
            }
        };
        rows.iter().map(token_from_row).collect()
    }

    async fn token_history(&self, uid: &str, limit: i64) -> StoreResult<Vec<TokenRow>> {
        let sql = concat!(
            "SELECT ",
            token_columns!(),
            " FROM workspace_auth_tokens WHERE workspace_uid = ?1 ORDER BY created_at DESC, id DESC LIMIT ?2"
        );
        let rows = sqlx::query(sql).bind(uid).bind(limit.max(0)).fetch_all(&self.pool).await?;
        rows.iter().map(token_from_row).collect()
    }

    async fn revoke_tokens(
        &self,
        uid: &str,
        reason: RevokeReason,
        keep: Option<&str>,
        now: DateTime<Utc>,
    ) -> StoreResult<u64> {
        let done = sqlx::query(
            "UPDATE workspace_auth_tokens SET revoked_at = ?2, revoke_reason = ?3 \
             WHERE workspace_uid = ?1 AND revoked_at IS NULL AND (?4 IS NULL OR id <> ?4)",
        )
        .bind(uid)
        .bind(ts(now))
        .bind(reason.as_str())
        .bind(keep)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected())
    }

    async fn revoke_token(
        &self,
        uid: &str,
        token_id: &str,
        reason: RevokeReason,
        now: DateTime<Utc>,
    ) -> StoreResult<u64> {
        let done = sqlx::query(
            "UPDATE workspace_auth_tokens SET revoked_at = ?3, revoke_reason = ?4 \
             WHERE workspace_uid = ?1 AND id = ?2 AND revoked_at IS NULL",
        )
        .bind(uid)
        .bind(token_id)
        .bind(ts(now))
        .bind(reason.as_str())
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected())
    }

    async fn expire_token(&self, uid: &str, token_id: &str, at: DateTime<Utc>) -> StoreResult<u64> {
        let done = sqlx::query(
            "UPDATE workspace_auth_tokens SET expires_at = ?3 \
             WHERE workspace_uid = ?1 AND id = ?2 AND revoked_at IS NULL",
        )
        .bind(uid)
        .bind(token_id)
        .bind(ts(at))
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected())
    }

    async fn revoke_stale_tokens(
        &self,
        uid: &str,
        cutoff: DateTime<Utc>,
        reason: RevokeReason,
        now: DateTime<Utc>,
    ) -> StoreResult<u64> {
        let done = sqlx::query(REVOKE_STALE_TOKENS_SQL)
            .bind(uid)
            .bind(ts(cutoff))
            .bind(ts(now))
            .bind(reason.as_str())
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected())
    }

    async fn token_owners(&self, token_hashes: &[String]) -> StoreResult<Vec<(String, TokenOwner)>> {
        if token_hashes.is_empty() {
            return Ok(Vec::new());
        }
        let hashes = serde_json::to_string(token_hashes).map_err(|e| StoreError::Invalid(e.to_string()))?;
        let rows = sqlx::query(TOKEN_OWNERS_SQL).bind(hashes).fetch_all(&self.pool).await?;
        let mut owners = Vec::with_capacity(rows.len());
        for row in &rows {
            // Revoked rows are left out here, not in the WHERE: with `revoked_at IS NULL`
            // there, Postgres may plan a BitmapAnd with the partial index of live tokens
            // (read whole, on every lookup) when its statistics are missing or stale.
            if row.try_get("live")? {
                owners.push((
                    row.try_get("token_hash")?,
                    TokenOwner {
                        token_id: row.try_get("id")?,
                        workspace_uid: row.try_get("workspace_uid")?,
                        workspace_key: row.try_get("key")?,
                        token_incarnation: row.try_get("token_incarnation")?,
                        current_incarnation: row.try_get("current_incarnation")?,
                        expires_at: get_opt_ts(row, "expires_at")?,
                        agent_online: row.try_get("agent_online")?,
                    },
                ));
            }
        }
        Ok(owners)
    }

    async fn record_heartbeats(&self, beats: &[Heartbeat]) -> StoreResult<u64> {
        if beats.is_empty() {
            return Ok(0);
        }
        let batch: Vec<(&str, &str, String)> = heartbeats::latest_per_token(beats)
            .iter()
            .map(|b| (b.token_id.as_str(), b.workspace_uid.as_str(), ts(b.at)))
            .collect();
        let batch = serde_json::to_string(&batch)
            .map_err(|e| StoreError::Invalid(format!("cannot encode a batch of heartbeats: {e}")))?;
        // One statement, one write transaction, for the whole batch.
        let done = sqlx::query(HEARTBEATS_SQL).bind(&batch).execute(&self.pool).await?;
        Ok(done.rows_affected())
    }

    async fn put_secret(
        &self,
        scope: &str,
        name: &str,
        sealed: &crate::secrets::Sealed,
        now: DateTime<Utc>,
    ) -> StoreResult<i64> {
        let row = sqlx::query(
            "INSERT INTO secrets (scope, name, key_id, nonce, ciphertext, version, updated_at) \
             VALUES (?1, ?2, ?3, ?4, ?5, 1, ?6) \
             ON CONFLICT (scope, name) DO UPDATE SET key_id = excluded.key_id, nonce = excluded.nonce, \
                 ciphertext = excluded.ciphertext, version = secrets.version + 1, updated_at = excluded.updated_at \
             RETURNING version",
        )
        .bind(scope)
        .bind(name)
        .bind(&sealed.key_id)
        .bind(&sealed.nonce)
        .bind(&sealed.ciphertext)
        .bind(ts(now))
        .fetch_one(&self.pool)
        .await?;
        Ok(row.try_get("version")?)
    }

    async fn secrets(&self, scopes: &[String]) -> StoreResult<Vec<SecretRow>> {
        // Only the asked scopes are read (primary key (scope, name)): every reconcile
        // asks for its workspace's three, whatever the number of secrets stored.
        let rows = if scopes.is_empty() {
            sqlx::query(ALL_SECRETS_SQL).fetch_all(&self.pool).await?
        } else {
            sqlx::query(SECRETS_OF_SCOPES_SQL).bind(json_array(scopes)?).fetch_all(&self.pool).await?
        };
        rows.iter()
            .map(|row| {
                Ok(SecretRow {
                    scope: row.try_get("scope")?,
                    name: row.try_get("name")?,
                    key_id: row.try_get("key_id")?,
                    nonce: row.try_get("nonce")?,
                    ciphertext: row.try_get("ciphertext")?,
                    version: row.try_get("version")?,
                    updated_at: get_ts(row, "updated_at")?,
                })
            })
            .collect()
    }

    async fn delete_secret(&self, scope: &str, name: &str) -> StoreResult<bool> {
        let done = sqlx::query("DELETE FROM secrets WHERE scope = ?1 AND name = ?2")
            .bind(scope)
            .bind(name)
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected() > 0)
    }

    async fn append_decision(&self, uid: &str, decision: &DecisionRecord, keep_last: i64) -> StoreResult<()> {
        let mut tx = self.write_tx().await?;
        sqlx::query(
            "INSERT INTO decisions (workspace_uid, at, rule, cause, actions, outcome) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        )
        .bind(uid)
        .bind(ts(decision.at))
        .bind(&decision.rule)
        .bind(&decision.cause)
        .bind(encode_actions(&decision.actions)?)
        .bind(&decision.outcome)
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "DELETE FROM decisions WHERE workspace_uid = ?1 AND id <= \
             (SELECT id FROM decisions WHERE workspace_uid = ?1 ORDER BY id DESC LIMIT 1 OFFSET ?2)",
        )
        .bind(uid)
        .bind(keep_last.max(0))
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    async fn decisions(&self, uid: &str, limit: i64) -> StoreResult<Vec<DecisionRecord>> {
        let rows = sqlx::query(
            "SELECT at, rule, cause, actions, outcome FROM decisions WHERE workspace_uid = ?1 ORDER BY id DESC LIMIT ?2",
        )
        .bind(uid)
        .bind(limit.max(0))
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|row| {
                let actions: String = row.try_get("actions")?;
                Ok(DecisionRecord {
                    at: get_ts(row, "at")?,
                    rule: row.try_get("rule")?,
                    cause: row.try_get("cause")?,
                    actions: decode_actions(uid, &actions)?,
                    outcome: row.try_get("outcome")?,
                })
            })
            .collect()
    }

    async fn get_object(&self, kind: &str, namespace: &str, name: &str) -> StoreResult<Option<StoredObject>> {
        let sql =
            concat!("SELECT ", object_columns!(), " FROM objects WHERE kind = ?1 AND namespace = ?2 AND name = ?3");
        let row = sqlx::query(sql).bind(kind).bind(namespace).bind(name).fetch_optional(&self.pool).await?;
        row.as_ref().map(object_from_row).transpose()
    }

    async fn list_objects(&self, kind: &str, namespace: Option<&str>) -> StoreResult<(Vec<StoredObject>, i64)> {
        // One read transaction: the rows and the revision are one snapshot (WAL).
        let mut tx = self.pool.begin().await?;
        let sql = concat!(
            "SELECT ",
            object_columns!(),
            " FROM objects WHERE kind = ?1 AND (?2 IS NULL OR namespace = ?2) ORDER BY namespace, name"
        );
        let rows = sqlx::query(sql).bind(kind).bind(namespace).fetch_all(&mut *tx).await?;
        let revision: i64 =
            sqlx::query_scalar("SELECT value FROM object_revision WHERE id = 1").fetch_one(&mut *tx).await?;
        tx.commit().await?;
        Ok((rows.iter().map(object_from_row).collect::<StoreResult<_>>()?, revision))
    }

    async fn put_object(&self, object: &StoredObject, expected: Option<i64>) -> StoreResult<ObjectWrite> {
        let mut tx = self.write_tx().await?;
        let current: Option<i64> =
            sqlx::query_scalar("SELECT resource_version FROM objects WHERE kind = ?1 AND namespace = ?2 AND name = ?3")
                .bind(&object.kind)
                .bind(&object.namespace)
                .bind(&object.name)
                .fetch_optional(&mut *tx)
                .await?;
        if current != expected {
            return Ok(ObjectWrite::Conflict { current });
        }
        let rv: i64 = sqlx::query_scalar("UPDATE object_revision SET value = value + 1 WHERE id = 1 RETURNING value")
            .fetch_one(&mut *tx)
            .await?;
        let (body, text) = encode_object_body(object, rv)?;
        sqlx::query(
            "INSERT INTO objects (kind, namespace, name, uid, resource_version, generation, creation_timestamp, \
                                  deletion_timestamp, body) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9) \
             ON CONFLICT (kind, namespace, name) DO UPDATE SET uid = excluded.uid, \
                resource_version = excluded.resource_version, generation = excluded.generation, \
                creation_timestamp = excluded.creation_timestamp, deletion_timestamp = excluded.deletion_timestamp, \
                body = excluded.body",
        )
        .bind(&object.kind)
        .bind(&object.namespace)
        .bind(&object.name)
        .bind(&object.uid)
        .bind(rv)
        .bind(object.generation)
        .bind(&object.creation_timestamp)
        .bind(&object.deletion_timestamp)
        .bind(text)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(ObjectWrite::Written(StoredObject { resource_version: rv, body, ..object.clone() }))
    }

    async fn delete_object(
        &self,
        kind: &str,
        namespace: &str,
        name: &str,
        expected: Option<i64>,
    ) -> StoreResult<ObjectWrite> {
        let mut tx = self.write_tx().await?;
        let sql =
            concat!("SELECT ", object_columns!(), " FROM objects WHERE kind = ?1 AND namespace = ?2 AND name = ?3");
        let row = sqlx::query(sql).bind(kind).bind(namespace).bind(name).fetch_optional(&mut *tx).await?;
        let Some(stored) = row.as_ref().map(object_from_row).transpose()? else {
            return Ok(ObjectWrite::Conflict { current: None });
        };
        if expected.is_some_and(|rv| rv != stored.resource_version) {
            return Ok(ObjectWrite::Conflict { current: Some(stored.resource_version) });
        }
        let rv: i64 = sqlx::query_scalar("UPDATE object_revision SET value = value + 1 WHERE id = 1 RETURNING value")
            .fetch_one(&mut *tx)
            .await?;
        sqlx::query("DELETE FROM objects WHERE kind = ?1 AND namespace = ?2 AND name = ?3")
            .bind(kind)
            .bind(namespace)
            .bind(name)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        let (body, _) = encode_object_body(&stored, rv)?;
        Ok(ObjectWrite::Written(StoredObject { resource_version: rv, body, ..stored }))
    }

    async fn object_revision(&self) -> StoreResult<i64> {
        Ok(sqlx::query_scalar("SELECT value FROM object_revision WHERE id = 1").fetch_one(&self.pool).await?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stored_timestamps_sort_as_time() {
        let a = DateTime::parse_from_rfc3339("2026-01-02T03:04:05Z").unwrap().with_timezone(&Utc);
        let b = a + chrono::Duration::microseconds(1);
        let c = a + chrono::Duration::seconds(10);
        assert_eq!(ts(a), "2026-01-02T03:04:05.000000Z");
        assert!(ts(a) < ts(b) && ts(b) < ts(c));
        assert_eq!(parse_ts("t", &ts(b)).unwrap(), b);
        let far = a + chrono::Duration::days(365 * 9000);
        assert!(ts(far) > ts(c));
    }
}
