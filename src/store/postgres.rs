//! Postgres store: state for the `postgres` and `cluster` modes, shared by replicas.

use std::time::Duration;

use sqlx::migrate::Migrator;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions, PgRow};
use sqlx::{Connection, PgConnection, Row};

use super::*;

/// How long connecting (and, later, waiting for a pooled connection) may take
/// before "database down" is reported instead of hanging.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const MAX_CONNECTIONS: u32 = 8;
/// The registry's token lookups have connections of their own (see
/// [`PostgresStore::lookups`]): as many as lookups may be in flight.
const LOOKUP_CONNECTIONS: u32 = super::lookups::MAX_IN_FLIGHT as u32;

/// The migrations in `migrations/postgres`, embedded in the binary. (`sqlx::migrate!`
/// needs sqlx's proc-macro crate, which this project does not build; a unit test
/// below checks that every file of the directory is listed here.)
/// The migrations in `migrations/postgres`, embedded in the binary and applied on open.
static MIGRATOR: Migrator = sqlx::migrate!("migrations/postgres");

pub struct PostgresStore {
    pool: PgPool,
    /// Connections for [`Store::token_owners`] only, the registry's hot path: the
    /// reconciler's queries never make a heartbeat wait for a connection, and these
    /// run their one statement with a generic plan (`plan_cache_mode`). Postgres
    /// would otherwise plan it anew on every execution, because a custom plan for the
    /// array at hand looks cheaper than the generic one: planning was over a quarter
    /// of the database's CPU per heartbeat (bench/registry, perf). The generic plan is
    /// the same index lookup whatever the array (see `TOKEN_OWNERS_SQL`).
    lookups: PgPool,
}

impl PostgresStore {
    /// Connects (failing within [`CONNECT_TIMEOUT`] when the server does not answer)
    /// and applies the migrations; concurrent replicas serialize on sqlx's
    /// migration advisory lock.
    pub async fn connect(url: &str) -> StoreResult<Self> {
        Self::connect_fenced(url, None).await
    }

    /// A store whose every connection carries the leader's fence (see store::lease):
    /// once the lease moves on, the database rejects its writes.
    pub async fn connect_fenced(url: &str, fence: Option<&str>) -> StoreResult<Self> {
        let mut options: PgConnectOptions = url
            .parse()
            .map_err(|e| StoreError::Invalid(format!("the database URL is not a usable postgres:// URL: {e}")))?;
        if let Some(f) = fence {
            options = options.options([("molecule.fence", f)]);
        }
        probe(&options).await?;
        let pool = PgPoolOptions::new()
            .max_connections(MAX_CONNECTIONS)
            .acquire_timeout(CONNECT_TIMEOUT)
            .connect_with(options.clone())
            .await?;
        MIGRATOR.run(&pool).await?;
        let lookups = PgPoolOptions::new()
            .max_connections(LOOKUP_CONNECTIONS)
            .acquire_timeout(CONNECT_TIMEOUT)
            .connect_lazy_with(options.options([("plan_cache_mode", "force_generic_plan")]));
        Ok(Self { pool, lookups })
    }
}

/// One direct connection first: the pool would retry a refused connection until
/// its timeout and then report only "pool timed out"; this names the server and
/// the real cause.
async fn probe(options: &PgConnectOptions) -> StoreResult<()> {
    let server = format!("{}:{}", options.get_host(), options.get_port());
    match tokio::time::timeout(CONNECT_TIMEOUT, PgConnection::connect_with(options)).await {
        Ok(Ok(conn)) => {
            let _ = conn.close().await;
            Ok(())
        }
        Ok(Err(sqlx::Error::Io(e))) => {
            Err(StoreError::Database(sqlx::Error::Io(std::io::Error::new(e.kind(), format!("{server}: {e}")))))
        }
        Ok(Err(e)) => Err(StoreError::Database(e)),
        Err(_) => Err(StoreError::Database(sqlx::Error::Io(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!("{server} did not answer within {} s", CONNECT_TIMEOUT.as_secs()),
        )))),
    }
}

/// A workspace's last heartbeat: the latest of its live tokens' rows in `heartbeats`
/// and what revocations folded into `workspaces.last_heartbeat_at` (migration 0009).
macro_rules! last_heartbeat_at {
    () => {
        "GREATEST(workspaces.last_heartbeat_at, \
         (SELECT max(h.at) FROM heartbeats h WHERE h.workspace_uid = workspaces.uid)) AS last_heartbeat_at"
    };
}

macro_rules! workspace_columns {
    () => {
        concat!(
            "uid, key, incarnation, created_at, ",
            last_heartbeat_at!(),
            ", restart_count, last_restart_at, last_restart_reason, status::text AS status, mode_override, \
             restart_requested_at"
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

fn workspace_from_row(row: &PgRow) -> StoreResult<WorkspaceRecord> {
    record_from_row(row, true)
}

/// A record from a row; without `with_status` the row has no status column and the
/// record's status is None.
fn record_from_row(row: &PgRow, with_status: bool) -> StoreResult<WorkspaceRecord> {
    let uid: String = row.try_get("uid")?;
    Ok(WorkspaceRecord {
        key: row.try_get("key")?,
        incarnation: row.try_get("incarnation")?,
        created_at: row.try_get("created_at")?,
        last_heartbeat_at: row.try_get("last_heartbeat_at")?,
        restart_count: row.try_get("restart_count")?,
        last_restart_at: row.try_get("last_restart_at")?,
        last_restart_reason: row.try_get("last_restart_reason")?,
        status: if with_status { decode_status(&uid, row.try_get("status")?) } else { None },
        mode_override: parse_mode(&uid, row.try_get("mode_override")?)?,
        restart_requested_at: row.try_get("restart_requested_at")?,
        uid,
    })
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
/// reason). Public so the conformance suite can check with EXPLAIN that it is
/// served by an index.
pub const REVOKE_STALE_TOKENS_SQL: &str = concat!(
    "UPDATE workspace_auth_tokens SET revoked_at = $3, revoke_reason = $4 \
     WHERE workspace_uid = $1 AND revoked_at IS NULL AND COALESCE(",
    last_used_at!(),
    ", created_at) < $2"
);

// The statements on the hot paths, public so the benchmarks and the conformance
// suite can EXPLAIN exactly what runs (see bench/stale_token, bench/registry).

/// `Store::workspace` (and the first look of `ensure_workspace`): one row by key.
pub const WORKSPACE_BY_KEY_SQL: &str = concat!("SELECT ", workspace_columns!(), " FROM workspaces WHERE key = $1");
/// `Store::workspace_by_uid`: one row by uid.
pub const WORKSPACE_BY_UID_SQL: &str = concat!("SELECT ", workspace_columns!(), " FROM workspaces WHERE uid = $1");
/// `Store::live_tokens` (what the stale-token and token-file rules look at).
pub const LIVE_TOKENS_SQL: &str = concat!(
    "SELECT ",
    token_columns!(),
    " FROM workspace_auth_tokens WHERE workspace_uid = $1 AND revoked_at IS NULL ORDER BY created_at, id"
);
/// `Store::token_owners`: presented tokens' rows (by hash; the caller keeps the live
/// ones) and their workspaces.
pub const TOKEN_OWNERS_SQL: &str = "SELECT t.token_hash, t.revoked_at IS NULL AS live, t.id, t.workspace_uid, w.key, t.incarnation AS token_incarnation, \
            w.incarnation AS current_incarnation, t.expires_at, w.agent_online \
     FROM workspace_auth_tokens t JOIN workspaces w ON w.uid = t.workspace_uid \
     WHERE t.token_hash = ANY($1)";
/// `Store::record_heartbeats` (binds: token ids, uids, times, as arrays sorted by
/// token id, so concurrent batches lock rows in one order): each token's row in
/// `heartbeats` moves forward to `at`, only while the token is live. The token rows
/// are share-locked: a concurrent revoke waits until this commits (and then folds
/// the row this wrote), or this waits for the revoke and skips the token.
pub const HEARTBEATS_SQL: &str = "INSERT INTO heartbeats (token_id, workspace_uid, at) \
     SELECT b.id, b.uid, b.at \
     FROM unnest($1::text[], $2::text[], $3::timestamptz[]) AS b(id, uid, at) \
     JOIN workspace_auth_tokens t ON t.id = b.id AND t.workspace_uid = b.uid AND t.revoked_at IS NULL \
     FOR SHARE OF t \
     ON CONFLICT (token_id) DO UPDATE SET at = excluded.at WHERE heartbeats.at < excluded.at";
/// `Store::secrets` for some scopes (bind: text[] of scope names).
pub const SECRETS_OF_SCOPES_SQL: &str = "SELECT scope, name, key_id, nonce, ciphertext, version, updated_at \
     FROM secrets WHERE scope = ANY($1) ORDER BY scope, name";
const ALL_SECRETS_SQL: &str =
    "SELECT scope, name, key_id, nonce, ciphertext, version, updated_at FROM secrets ORDER BY scope, name";

fn token_from_row(row: &PgRow) -> StoreResult<TokenRow> {
    Ok(TokenRow {
        id: row.try_get("id")?,
        workspace_uid: row.try_get("workspace_uid")?,
        token_hash: row.try_get("token_hash")?,
        prefix: row.try_get("prefix")?,
        incarnation: row.try_get("incarnation")?,
        created_at: row.try_get("created_at")?,
        last_used_at: row.try_get("last_used_at")?,
        revoked_at: row.try_get("revoked_at")?,
        revoke_reason: row.try_get("revoke_reason")?,
        expires_at: row.try_get("expires_at")?,
    })
}

/// `Err(unknown workspace)` when an UPDATE keyed by uid matched no row.
fn expect_one(uid: &str, rows_affected: u64) -> StoreResult<()> {
    if rows_affected == 0 { Err(unknown_workspace(uid)) } else { Ok(()) }
}

#[async_trait]
impl Store for PostgresStore {
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
            "INSERT INTO workspaces (uid, key, incarnation, created_at, restart_count) VALUES ($1, $2, 0, $3, 0) \
             ON CONFLICT (key) DO NOTHING",
        )
        .bind(uuid::Uuid::new_v4().to_string())
        .bind(key)
        .bind(micros(now))
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
                    ", status->>'phase' AS phase FROM workspaces ",
                    $filter,
                    " ORDER BY key"
                )
            };
        }
        let rows = match keys {
            None => sqlx::query(select!("")).fetch_all(&self.pool).await?,
            Some(keys) => sqlx::query(select!("WHERE key = ANY($1)")).bind(keys).fetch_all(&self.pool).await?,
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
            "UPDATE workspaces SET incarnation = incarnation + 1 WHERE uid = $1 RETURNING incarnation",
        )
        .bind(uid)
        .fetch_optional(&self.pool)
        .await?;
        incarnation.ok_or_else(|| unknown_workspace(uid))
    }

    async fn record_restart(&self, uid: &str, reason: &str, at: DateTime<Utc>) -> StoreResult<()> {
        let done = sqlx::query(
            "UPDATE workspaces SET restart_count = restart_count + 1, last_restart_at = $2, last_restart_reason = $3 \
             WHERE uid = $1",
        )
        .bind(uid)
        .bind(at)
        .bind(reason)
        .execute(&self.pool)
        .await?;
        expect_one(uid, done.rows_affected())
    }

    async fn reset_restarts(&self, uid: &str) -> StoreResult<()> {
        let done =
            sqlx::query("UPDATE workspaces SET restart_count = 0 WHERE uid = $1").bind(uid).execute(&self.pool).await?;
        expect_one(uid, done.rows_affected())
    }

    async fn set_mode_override(&self, uid: &str, mode: Option<OperatingMode>) -> StoreResult<()> {
        let done = sqlx::query("UPDATE workspaces SET mode_override = $2 WHERE uid = $1")
            .bind(uid)
            .bind(mode.map(mode_as_str))
            .execute(&self.pool)
            .await?;
        expect_one(uid, done.rows_affected())
    }

    async fn request_restart(&self, uid: &str, at: DateTime<Utc>) -> StoreResult<()> {
        let done = sqlx::query("UPDATE workspaces SET restart_requested_at = $2 WHERE uid = $1")
            .bind(uid)
            .bind(at)
            .execute(&self.pool)
            .await?;
        expect_one(uid, done.rows_affected())
    }

    async fn save_status(&self, uid: &str, status: &WorkspaceStatus) -> StoreResult<()> {
        let done = sqlx::query("UPDATE workspaces SET status = $2::jsonb, agent_online = $3 WHERE uid = $1")
            .bind(uid)
            .bind(encode_status(status)?)
            .bind(shows_agent_online(status))
            .execute(&self.pool)
            .await?;
        expect_one(uid, done.rows_affected())
    }

    async fn delete_workspace(&self, uid: &str) -> StoreResult<()> {
        let mut tx = self.pool.begin().await?;
        sqlx::query(
            "UPDATE workspace_auth_tokens SET revoked_at = $2, revoke_reason = $3 \
             WHERE workspace_uid = $1 AND revoked_at IS NULL",
        )
        .bind(uid)
        .bind(micros(Utc::now()))
        .bind(RevokeReason::Deleted.as_str())
        .execute(&mut *tx)
        .await?;
        sqlx::query("DELETE FROM decisions WHERE workspace_uid = $1").bind(uid).execute(&mut *tx).await?;
        sqlx::query("DELETE FROM workspaces WHERE uid = $1").bind(uid).execute(&mut *tx).await?;
        tx.commit().await?;
        Ok(())
    }

    async fn issue_token(&self, uid: &str, incarnation: i64, now: DateTime<Utc>) -> StoreResult<IssuedToken> {
        let issued = new_token(uid, incarnation, now);
        let row = &issued.row;
        // Only for a workspace the store knows: a token nobody can own is never created.
        let done = sqlx::query(
            "INSERT INTO workspace_auth_tokens (id, workspace_uid, token_hash, prefix, incarnation, created_at) \
             SELECT $1, $2, $3, $4, $5, $6 WHERE EXISTS (SELECT 1 FROM workspaces WHERE uid = $2)",
        )
        .bind(&row.id)
        .bind(&row.workspace_uid)
        .bind(&row.token_hash)
        .bind(&row.prefix)
        .bind(row.incarnation)
        .bind(row.created_at)
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
        macro_rules! select {
            ($filter:literal) => {
                concat!(
                    "SELECT ",
                    token_columns!(),
                    " FROM workspace_auth_tokens WHERE revoked_at IS NULL ",
                    $filter,
                    " ORDER BY workspace_uid, created_at, id"
                )
            };
        }
        let rows = match uids {
            None => sqlx::query(select!("")).fetch_all(&self.pool).await?,
            Some(uids) => sqlx::query(select!("AND workspace_uid = ANY($1)")).bind(uids).fetch_all(&self.pool).await?,
        };
        rows.iter().map(token_from_row).collect()
    }

    async fn token_history(&self, uid: &str, limit: i64) -> StoreResult<Vec<TokenRow>> {
        let sql = concat!(
            "SELECT ",
            token_columns!(),
            " FROM workspace_auth_tokens WHERE workspace_uid = $1 ORDER BY created_at DESC, id DESC LIMIT $2"
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
            "UPDATE workspace_auth_tokens SET revoked_at = $2, revoke_reason = $3 \
             WHERE workspace_uid = $1 AND revoked_at IS NULL AND ($4::text IS NULL OR id <> $4)",
        )
        .bind(uid)
        .bind(micros(now))
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
            "UPDATE workspace_auth_tokens SET revoked_at = $3, revoke_reason = $4 \
             WHERE workspace_uid = $1 AND id = $2 AND revoked_at IS NULL",
        )
        .bind(uid)
        .bind(token_id)
        .bind(micros(now))
        .bind(reason.as_str())
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected())
    }

    async fn expire_token(&self, uid: &str, token_id: &str, at: DateTime<Utc>) -> StoreResult<u64> {
        let done = sqlx::query(
            "UPDATE workspace_auth_tokens SET expires_at = $3 \
             WHERE workspace_uid = $1 AND id = $2 AND revoked_at IS NULL",
        )
        .bind(uid)
        .bind(token_id)
        .bind(micros(at))
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
            .bind(micros(cutoff))
            .bind(micros(now))
            .bind(reason.as_str())
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected())
    }

    async fn token_owners(&self, token_hashes: &[String]) -> StoreResult<Vec<(String, TokenOwner)>> {
        if token_hashes.is_empty() {
            return Ok(Vec::new());
        }
        let rows = sqlx::query(TOKEN_OWNERS_SQL).bind(token_hashes).fetch_all(&self.lookups).await?;
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
                        expires_at: row.try_get("expires_at")?,
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
        let sorted = heartbeats::latest_per_token(beats);
        let ids: Vec<&str> = sorted.iter().map(|b| b.token_id.as_str()).collect();
        let uids: Vec<&str> = sorted.iter().map(|b| b.workspace_uid.as_str()).collect();
        let times: Vec<DateTime<Utc>> = sorted.iter().map(|b| micros(b.at)).collect();
        let done = sqlx::query(HEARTBEATS_SQL).bind(&ids).bind(&uids).bind(&times).execute(&self.pool).await?;
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
             VALUES ($1, $2, $3, $4, $5, 1, $6) \
             ON CONFLICT (scope, name) DO UPDATE SET key_id = excluded.key_id, nonce = excluded.nonce, \
                 ciphertext = excluded.ciphertext, version = secrets.version + 1, updated_at = excluded.updated_at \
             RETURNING version",
        )
        .bind(scope)
        .bind(name)
        .bind(&sealed.key_id)
        .bind(&sealed.nonce)
        .bind(&sealed.ciphertext)
        .bind(micros(now))
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
            sqlx::query(SECRETS_OF_SCOPES_SQL).bind(scopes).fetch_all(&self.pool).await?
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
                    updated_at: row.try_get("updated_at")?,
                })
            })
            .collect()
    }

    async fn delete_secret(&self, scope: &str, name: &str) -> StoreResult<bool> {
        let done = sqlx::query("DELETE FROM secrets WHERE scope = $1 AND name = $2")
            .bind(scope)
            .bind(name)
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected() > 0)
    }

    async fn append_decision(&self, uid: &str, decision: &DecisionRecord, keep_last: i64) -> StoreResult<()> {
        let mut tx = self.pool.begin().await?;
        sqlx::query(
            "INSERT INTO decisions (workspace_uid, at, rule, cause, actions, outcome) \
             VALUES ($1, $2, $3, $4, $5::jsonb, $6)",
        )
        .bind(uid)
        .bind(micros(decision.at))
        .bind(&decision.rule)
        .bind(&decision.cause)
        .bind(encode_actions(&decision.actions)?)
        .bind(&decision.outcome)
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "DELETE FROM decisions WHERE workspace_uid = $1 AND id <= \
             (SELECT id FROM decisions WHERE workspace_uid = $1 ORDER BY id DESC LIMIT 1 OFFSET $2)",
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
            "SELECT at, rule, cause, actions::text AS actions, outcome FROM decisions WHERE workspace_uid = $1 \
             ORDER BY id DESC LIMIT $2",
        )
        .bind(uid)
        .bind(limit.max(0))
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|row| {
                let actions: String = row.try_get("actions")?;
                Ok(DecisionRecord {
                    at: row.try_get("at")?,
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
            concat!("SELECT ", object_columns!(), " FROM objects WHERE kind = $1 AND namespace = $2 AND name = $3");
        let row = sqlx::query(sql).bind(kind).bind(namespace).bind(name).fetch_optional(&self.pool).await?;
        row.as_ref().map(object_from_row).transpose()
    }

    async fn list_objects(&self, kind: &str, namespace: Option<&str>) -> StoreResult<(Vec<StoredObject>, i64)> {
        // REPEATABLE READ: the rows and the revision are one snapshot.
        let mut tx = self.pool.begin().await?;
        sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY").execute(&mut *tx).await?;
        let sql = concat!(
            "SELECT ",
            object_columns!(),
            " FROM objects WHERE kind = $1 AND ($2::text IS NULL OR namespace = $2) ORDER BY namespace, name"
        );
        let rows = sqlx::query(sql).bind(kind).bind(namespace).fetch_all(&mut *tx).await?;
        let revision: i64 =
            sqlx::query_scalar("SELECT value FROM object_revision WHERE id = 1").fetch_one(&mut *tx).await?;
        tx.commit().await?;
        Ok((rows.iter().map(object_from_row).collect::<StoreResult<_>>()?, revision))
    }

    async fn put_object(&self, object: &StoredObject, expected: Option<i64>) -> StoreResult<ObjectWrite> {
        let mut tx = self.pool.begin().await?;
        // Bumping first takes the revision row's lock: object writers serialize here,
        // so the check below cannot race another create or update.
        let rv: i64 = sqlx::query_scalar("UPDATE object_revision SET value = value + 1 WHERE id = 1 RETURNING value")
            .fetch_one(&mut *tx)
            .await?;
        let current: Option<i64> =
            sqlx::query_scalar("SELECT resource_version FROM objects WHERE kind = $1 AND namespace = $2 AND name = $3")
                .bind(&object.kind)
                .bind(&object.namespace)
                .bind(&object.name)
                .fetch_optional(&mut *tx)
                .await?;
        if current != expected {
            tx.rollback().await?;
            return Ok(ObjectWrite::Conflict { current });
        }
        let (body, text) = encode_object_body(object, rv)?;
        sqlx::query(
            "INSERT INTO objects (kind, namespace, name, uid, resource_version, generation, creation_timestamp, \
                                  deletion_timestamp, body) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9::jsonb) \
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
        let mut tx = self.pool.begin().await?;
        let rv: i64 = sqlx::query_scalar("UPDATE object_revision SET value = value + 1 WHERE id = 1 RETURNING value")
            .fetch_one(&mut *tx)
            .await?;
        let sql =
            concat!("SELECT ", object_columns!(), " FROM objects WHERE kind = $1 AND namespace = $2 AND name = $3");
        let row = sqlx::query(sql).bind(kind).bind(namespace).bind(name).fetch_optional(&mut *tx).await?;
        let Some(stored) = row.as_ref().map(object_from_row).transpose()? else {
            tx.rollback().await?;
            return Ok(ObjectWrite::Conflict { current: None });
        };
        if expected.is_some_and(|expected| expected != stored.resource_version) {
            tx.rollback().await?;
            return Ok(ObjectWrite::Conflict { current: Some(stored.resource_version) });
        }
        sqlx::query("DELETE FROM objects WHERE kind = $1 AND namespace = $2 AND name = $3")
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

macro_rules! object_columns {
    () => {
        "kind, namespace, name, uid, resource_version, generation, creation_timestamp, deletion_timestamp, \
         body::text AS body"
    };
}
use object_columns;

fn object_from_row(row: &PgRow) -> StoreResult<StoredObject> {
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
