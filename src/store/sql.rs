//! The SQL store: one body for SQLite and Postgres. Every statement is written once,
//! here, in SQL both databases read the same way (`$1` placeholders, `CAST(x AS
//! TEXT)`, `->>`, `ON CONFLICT`, `RETURNING`), and every row is mapped once. What
//! truly differs is a backend's [`Dialect`] (sqlite.rs, postgres.rs): how a list or
//! a batch of heartbeats is bound (a JSON array read with `json_each`, or arrays),
//! how a time is stored (SQLite: fixed-width UTC text; Postgres: timestamptz), the
//! index SQLite must be told to use, Postgres's row locks, and how a transaction
//! begins.
//!
//! The body is compiled once per backend by `sql_store!` (as vaultwarden's
//! `db_run!`): inside, the backend is a concrete sqlx database, so the code is plain
//! sqlx with no generic bounds, and each backend keeps its own query plans and types.
//! (sqlx's `Any` driver would lose both: it binds no arrays and knows no
//! timestamptz or jsonb.)

use std::sync::Arc;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde::Deserialize;
use sqlx::query::Query;
use sqlx::types::Json;
use sqlx::{Pool, Row};

use super::heartbeats::latest_per_token;
use super::{
    AgentReports, Changes, DecisionLog, DynStore, Heartbeats, ObjectWrite, Objects, Secrets, Store, StoreError,
    StoreResult, StoredObject, Tokens, Workspaces, token,
};
use crate::api::{OperatingMode, Phase, WorkspaceStatus};
use crate::model::{
    AgentReport, Claim, DecisionRecord, Heartbeat, IssuedToken, LifecycleState, RevokeReason, SecretRow, TokenOwner,
    TokenRow, WorkspaceRecord, shows_agent_online,
};

/// What a SQL backend does differently from the other; everything else is this file.
pub trait Dialect: sqlx::Database {
    /// SQL: `column` is one of the items of the list bound as `$1` ([`Dialect::list`]).
    fn in_list(column: &str) -> String;
    /// SQL: the later of two nullable times, NULL only when both are.
    fn later_of(a: &str, b: &str) -> String;
    /// SQL after `FROM workspace_auth_tokens` where a workspace's live tokens are
    /// read: the index to use, where the planner must be told.
    const LIVE_TOKENS_INDEX: &'static str;
    /// SQL: the heartbeat batch bound by [`Dialect::bind_heartbeats`], as a table
    /// `b(id, uid, at)`.
    const HEARTBEAT_BATCH: &'static str;
    /// SQL after the batch's join: the lock it takes on the token rows it joins.
    const HEARTBEAT_LOCK: &'static str;
    /// Begins a transaction that writes.
    const BEGIN_WRITE: &'static str;
    /// Begins a transaction whose reads are one snapshot.
    const BEGIN_SNAPSHOT: &'static str;

    /// A time as stored (bound as a parameter).
    type Time;
    fn time(t: DateTime<Utc>) -> Self::Time;
    /// A time column; `column` names it in errors.
    fn read_time(row: &Self::Row, column: &str) -> StoreResult<DateTime<Utc>>;
    fn read_opt_time(row: &Self::Row, column: &str) -> StoreResult<Option<DateTime<Utc>>>;
    /// A list of text items as one parameter, for [`Dialect::in_list`]: any length,
    /// one prepared statement.
    type List<'a>;
    fn list(items: &[String]) -> StoreResult<Self::List<'_>>;
    /// Binds a batch of heartbeats (one per token, sorted by token id) for
    /// [`Dialect::HEARTBEAT_BATCH`].
    fn bind_heartbeats<'q>(
        query: Query<'q, Self, Self::Arguments>,
        batch: &[&Heartbeat],
    ) -> StoreResult<Query<'q, Self, Self::Arguments>>;

    /// This backend's [`Statements`], built once.
    fn statements() -> &'static Statements;
}

/// A store on a SQL database: the same code for every [`Dialect`].
pub struct SqlStore<D: Dialect> {
    pool: Pool<D>,
    /// Connections for [`Tokens::token_owners`] only, the registry's hot path: Postgres
    /// gives them a pool of their own (see postgres.rs); SQLite shares `pool`.
    lookups: Pool<D>,
    /// What takes the heartbeat role when one is put in front of this store
    /// ([`Store::with_heartbeats`]: the registry's batching); None: written here.
    heartbeats: Option<Arc<dyn Heartbeats>>,
}

impl<D: Dialect> SqlStore<D> {
    pub(super) fn new(pool: Pool<D>, lookups: Pool<D>) -> Self {
        Self { pool, lookups, heartbeats: None }
    }
}

/// A token's last use: its row in `heartbeats` while it is live, else what its
/// revocation folded into `workspace_auth_tokens.last_used_at` (migrations
/// sqlite/0007, postgres/0009).
macro_rules! last_used_at {
    () => {
        "COALESCE((SELECT h.at FROM heartbeats h WHERE h.token_id = workspace_auth_tokens.id), last_used_at)"
    };
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

macro_rules! object_columns {
    () => {
        "kind, namespace, name, uid, resource_version, generation, creation_timestamp, deletion_timestamp, \
         CAST(body AS TEXT) AS body"
    };
}

macro_rules! secret_columns {
    () => {
        "scope, name, key_id, nonce, ciphertext, version, updated_at"
    };
}

/// What [`Heartbeats::revoke_stale_tokens`] runs (binds: uid, cutoff, now, reason): the
/// staleness condition is evaluated by the database, in the UPDATE, so a heartbeat
/// landing after the caller looked wins. Public so the conformance suite can check
/// its query plan.
pub const REVOKE_STALE_TOKENS: &str = concat!(
    "UPDATE workspace_auth_tokens SET revoked_at = $3, revoke_reason = $4 \
     WHERE workspace_uid = $1 AND revoked_at IS NULL AND COALESCE(",
    last_used_at!(),
    ", created_at) < $2"
);
const ALL_LIVE_TOKENS: &str = concat!(
    "SELECT ",
    token_columns!(),
    " FROM workspace_auth_tokens WHERE revoked_at IS NULL ORDER BY workspace_uid, created_at, id"
);
const TOKEN_HISTORY: &str = concat!(
    "SELECT ",
    token_columns!(),
    " FROM workspace_auth_tokens WHERE workspace_uid = $1 ORDER BY created_at DESC, id DESC LIMIT $2"
);
const ALL_SECRETS: &str = concat!("SELECT ", secret_columns!(), " FROM secrets ORDER BY scope, name");
const OBJECT_BY_NAME: &str =
    concat!("SELECT ", object_columns!(), " FROM objects WHERE kind = $1 AND namespace = $2 AND name = $3");
const OBJECTS_OF_KIND: &str = concat!(
    "SELECT ",
    object_columns!(),
    " FROM objects WHERE kind = $1 AND (CAST($2 AS TEXT) IS NULL OR namespace = $2) ORDER BY namespace, name"
);
const OBJECT_REVISION: &str = "SELECT value FROM object_revision WHERE id = 1";
/// Every object write bumps one global revision in its transaction; the object takes
/// that value as its resource_version.
const BUMP_OBJECT_REVISION: &str = "UPDATE object_revision SET value = value + 1 WHERE id = 1 RETURNING value";

/// The statements that hold a dialect's SQL, on the hot paths: public so the
/// benchmarks and the conformance suite can EXPLAIN exactly what runs (see
/// bench/stale_token, bench/registry).
pub struct Statements {
    /// `Workspaces::workspace` (and the first look of `ensure_workspace`): one row by key.
    pub workspace_by_key: String,
    /// `Workspaces::workspace_with_report`: one row by key, with its agent's report.
    pub workspace_with_report: String,
    /// `Workspaces::workspace_by_uid`: one row by uid.
    pub workspace_by_uid: String,
    /// `Workspaces::list_workspaces`.
    pub workspaces: String,
    /// `Workspaces::list_workspaces_brief`: every record, or (bind: a list) these keys.
    pub workspaces_brief: String,
    pub workspaces_brief_of_keys: String,
    /// `Tokens::live_tokens` (what the stale-token and token-file rules look at).
    pub live_tokens: String,
    /// `Tokens::all_live_tokens` of some workspaces (bind: a list of uids).
    pub live_tokens_of_uids: String,
    /// `Tokens::token_owners`: presented tokens' rows (bind: a list of hashes; the
    /// caller keeps the live ones) and their workspaces.
    pub token_owners: String,
    /// `Heartbeats::record_heartbeats`: each token's row in `heartbeats` moves forward to
    /// its time, only while the token is live (a revoked token's heartbeat leaves no
    /// trace). (`WHERE true`: SQLite needs a WHERE before an upsert's ON CONFLICT
    /// when the SELECT has a join.)
    pub record_heartbeats: String,
    /// `Secrets::secrets` for some scopes (bind: a list of scope names).
    pub secrets_of_scopes: String,
}

impl Statements {
    pub fn new<D: Dialect>() -> Self {
        // A workspace's last heartbeat: the latest of its live tokens' rows in
        // `heartbeats` and what revocations folded into `workspaces.last_heartbeat_at`.
        let last_heartbeat_at = D::later_of(
            "workspaces.last_heartbeat_at",
            "(SELECT max(h.at) FROM heartbeats h WHERE h.workspace_uid = workspaces.uid)",
        );
        let brief = format!(
            "uid, key, incarnation, created_at, {last_heartbeat_at} AS last_heartbeat_at, restart_count, \
             last_restart_at, last_restart_reason, mode_override, restart_requested_at, CAST(claim AS TEXT) AS claim, woken_at, lifecycle"
        );
        let workspace = format!("SELECT {brief}, CAST(status AS TEXT) AS status FROM workspaces");
        let workspace_with_report = format!(
            "SELECT {brief}, CAST(status AS TEXT) AS status, (SELECT r.report FROM agent_reports r \
             WHERE r.workspace_uid = workspaces.uid) AS agent_report FROM workspaces WHERE key = $1"
        );
        let brief = format!("SELECT {brief}, status ->> 'phase' AS phase FROM workspaces");
        let live_tokens =
            format!(concat!("SELECT ", token_columns!(), " FROM workspace_auth_tokens{}"), D::LIVE_TOKENS_INDEX);
        Self {
            workspace_by_key: format!("{workspace} WHERE key = $1"),
            workspace_with_report,
            workspace_by_uid: format!("{workspace} WHERE uid = $1"),
            workspaces: format!("{workspace} ORDER BY key"),
            workspaces_brief: format!("{brief} ORDER BY key"),
            workspaces_brief_of_keys: format!("{brief} WHERE {} ORDER BY key", D::in_list("key")),
            live_tokens: format!(
                "{live_tokens} WHERE workspace_uid = $1 AND revoked_at IS NULL ORDER BY created_at, id"
            ),
            live_tokens_of_uids: format!(
                "{live_tokens} WHERE revoked_at IS NULL AND {} ORDER BY workspace_uid, created_at, id",
                D::in_list("workspace_uid")
            ),
            token_owners: format!(
                "SELECT t.token_hash, t.revoked_at IS NULL AS live, t.id, t.workspace_uid, w.key, \
                        t.incarnation AS token_incarnation, w.incarnation AS current_incarnation, t.expires_at, \
                        w.agent_online \
                 FROM workspace_auth_tokens t JOIN workspaces w ON w.uid = t.workspace_uid WHERE {}",
                D::in_list("t.token_hash")
            ),
            record_heartbeats: format!(
                "INSERT INTO heartbeats (token_id, workspace_uid, at) SELECT b.id, b.uid, b.at FROM {} \
                 JOIN workspace_auth_tokens t ON t.id = b.id AND t.workspace_uid = b.uid AND t.revoked_at IS NULL \
                 WHERE true{} \
                 ON CONFLICT (token_id) DO UPDATE SET at = excluded.at WHERE heartbeats.at < excluded.at",
                D::HEARTBEAT_BATCH,
                D::HEARTBEAT_LOCK
            ),
            secrets_of_scopes: format!(
                concat!("SELECT ", secret_columns!(), " FROM secrets WHERE {} ORDER BY scope, name"),
                D::in_list("scope")
            ),
        }
    }
}

/// The body of [`SqlStore`] for one backend (`$db`: a concrete sqlx database
/// implementing [`Dialect`]), expanded below in a module of its own for each.
macro_rules! sql_store {
    ($db:ty) => {
        /// The backend this expansion is for.
        type D = $db;
        type DbRow = <$db as sqlx::Database>::Row;

        /// A `decisions` row (`at, rule, cause, actions as text, outcome`); `whose`
        /// names the workspace in an error.
        fn decision_row(row: &DbRow, whose: &str) -> StoreResult<DecisionRecord> {
            let actions: String = row.try_get("actions")?;
            Ok(DecisionRecord {
                at: D::read_time(row, "at")?,
                rule: row.try_get("rule")?,
                cause: row.try_get("cause")?,
                actions: decode_actions(whose, &actions)?,
                outcome: row.try_get("outcome")?,
            })
        }

        /// A record from a row; without `with_status` the row has no status column
        /// and the record's status is None.
        fn record_from_row(row: &DbRow, with_status: bool) -> StoreResult<WorkspaceRecord> {
            let uid: String = row.try_get("uid")?;
            Ok(WorkspaceRecord {
                key: row.try_get("key")?,
                incarnation: row.try_get("incarnation")?,
                created_at: D::read_time(row, "created_at")?,
                last_heartbeat_at: D::read_opt_time(row, "last_heartbeat_at")?,
                restart_count: row.try_get("restart_count")?,
                last_restart_at: D::read_opt_time(row, "last_restart_at")?,
                last_restart_reason: row.try_get("last_restart_reason")?,
                status: if with_status { decode_status(&uid, row.try_get("status")?) } else { None },
                mode_override: parse_mode(&uid, row.try_get("mode_override")?)?,
                restart_requested_at: D::read_opt_time(row, "restart_requested_at")?,
                claim: decode_claim(&uid, row.try_get("claim")?),
                woken_at: D::read_opt_time(row, "woken_at")?,
                lifecycle: decode_lifecycle(&uid, row.try_get("lifecycle")?),
                uid,
            })
        }

        /// An agent report as stored. One that no longer decodes is treated as none:
        /// the agent's next heartbeat writes a new one.
        fn decode_report(uid: &str, text: &str) -> Option<AgentReport> {
            serde_json::from_str(text)
                .inspect_err(|e| tracing::warn!(workspace_uid = uid, error = %e, "cannot decode the agent report"))
                .ok()
        }

        fn workspace_from_row(row: &DbRow) -> StoreResult<WorkspaceRecord> {
            record_from_row(row, true)
        }

        fn token_from_row(row: &DbRow) -> StoreResult<TokenRow> {
            Ok(TokenRow {
                id: row.try_get("id")?,
                workspace_uid: row.try_get("workspace_uid")?,
                token_hash: row.try_get("token_hash")?,
                prefix: row.try_get("prefix")?,
                incarnation: row.try_get("incarnation")?,
                created_at: D::read_time(row, "created_at")?,
                last_used_at: D::read_opt_time(row, "last_used_at")?,
                revoked_at: D::read_opt_time(row, "revoked_at")?,
                revoke_reason: row.try_get("revoke_reason")?,
                expires_at: D::read_opt_time(row, "expires_at")?,
            })
        }

        fn secret_from_row(row: &DbRow) -> StoreResult<SecretRow> {
            Ok(SecretRow {
                scope: row.try_get("scope")?,
                name: row.try_get("name")?,
                key_id: row.try_get("key_id")?,
                nonce: row.try_get("nonce")?,
                ciphertext: row.try_get("ciphertext")?,
                version: row.try_get("version")?,
                updated_at: D::read_time(row, "updated_at")?,
            })
        }

        fn object_from_row(row: &DbRow) -> StoreResult<StoredObject> {
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

        #[async_trait]
        impl Workspaces for SqlStore<D> {
            async fn ensure_workspace(&self, key: &str, now: DateTime<Utc>) -> StoreResult<WorkspaceRecord> {
                if let Some(record) = self.workspace(key).await? {
                    return Ok(record);
                }
                // Two callers racing on first sight both end up with the row that won.
                sqlx::query(
                    "INSERT INTO workspaces (uid, key, incarnation, created_at, restart_count) \
                     VALUES ($1, $2, 0, $3, 0) ON CONFLICT (key) DO NOTHING",
                )
                .bind(uuid::Uuid::new_v4().to_string())
                .bind(key)
                .bind(D::time(now))
                .execute(&self.pool)
                .await?;
                self.workspace(key).await?.ok_or_else(|| {
                    StoreError::Invalid(format!("workspace {key} was deleted while it was being recorded"))
                })
            }

            async fn workspace(&self, key: &str) -> StoreResult<Option<WorkspaceRecord>> {
                let sql = D::statements().workspace_by_key.as_str();
                let row = sqlx::query(sql).bind(key).fetch_optional(&self.pool).await?;
                row.as_ref().map(workspace_from_row).transpose()
            }

            async fn workspace_with_report(
                &self,
                key: &str,
            ) -> StoreResult<Option<(WorkspaceRecord, Option<AgentReport>)>> {
                let sql = D::statements().workspace_with_report.as_str();
                let Some(row) = sqlx::query(sql).bind(key).fetch_optional(&self.pool).await? else {
                    return Ok(None);
                };
                let record = workspace_from_row(&row)?;
                let report: Option<String> = row.try_get("agent_report")?;
                let report = report.and_then(|text| decode_report(&record.uid, &text));
                Ok(Some((record, report)))
            }

            async fn workspace_by_uid(&self, uid: &str) -> StoreResult<Option<WorkspaceRecord>> {
                let sql = D::statements().workspace_by_uid.as_str();
                let row = sqlx::query(sql).bind(uid).fetch_optional(&self.pool).await?;
                row.as_ref().map(workspace_from_row).transpose()
            }

            async fn list_workspaces(&self) -> StoreResult<Vec<WorkspaceRecord>> {
                let rows = sqlx::query(D::statements().workspaces.as_str()).fetch_all(&self.pool).await?;
                rows.iter().map(workspace_from_row).collect()
            }

            async fn list_workspaces_brief(
                &self,
                keys: Option<&[String]>,
            ) -> StoreResult<Vec<(WorkspaceRecord, Option<Phase>)>> {
                let sql = D::statements();
                let rows = match keys {
                    None => sqlx::query(sql.workspaces_brief.as_str()).fetch_all(&self.pool).await?,
                    Some(keys) => {
                        let query = sqlx::query(sql.workspaces_brief_of_keys.as_str());
                        query.bind(D::list(keys)?).fetch_all(&self.pool).await?
                    }
                };
                rows.iter()
                    .map(|row| Ok((record_from_row(row, false)?, parse_phase(row.try_get("phase")?))))
                    .collect()
            }

            async fn take_changes(&self) -> StoreResult<Changes> {
                let rows: Vec<Option<String>> =
                    sqlx::query_scalar("DELETE FROM workspace_changes RETURNING workspace_key")
                        .fetch_all(&self.pool)
                        .await?;
                Ok(changes_from(rows))
            }

            async fn bump_incarnation(&self, uid: &str) -> StoreResult<i64> {
                let incarnation: Option<i64> = sqlx::query_scalar(
                    "UPDATE workspaces SET incarnation = incarnation + 1, claim = NULL WHERE uid = $1 \
                     RETURNING incarnation",
                )
                .bind(uid)
                .fetch_optional(&self.pool)
                .await?;
                incarnation.ok_or_else(|| unknown_workspace(uid))
            }

            async fn record_restart(&self, uid: &str, reason: &str, at: DateTime<Utc>) -> StoreResult<()> {
                let done = sqlx::query(
                    "UPDATE workspaces SET restart_count = restart_count + 1, last_restart_at = $2, \
                     last_restart_reason = $3 WHERE uid = $1",
                )
                .bind(uid)
                .bind(D::time(at))
                .bind(reason)
                .execute(&self.pool)
                .await?;
                expect_one(uid, done.rows_affected())
            }

            async fn reset_restarts(&self, uid: &str) -> StoreResult<()> {
                let done = sqlx::query("UPDATE workspaces SET restart_count = 0 WHERE uid = $1")
                    .bind(uid)
                    .execute(&self.pool)
                    .await?;
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

            async fn request_wake(&self, uid: &str, at: DateTime<Utc>) -> StoreResult<()> {
                // Kept when a later one is stored (then no row changes: not an error).
                sqlx::query(
                    "UPDATE workspaces SET woken_at = $2 WHERE uid = $1 AND (woken_at IS NULL OR woken_at < $2)",
                )
                .bind(uid)
                .bind(D::time(at))
                .execute(&self.pool)
                .await?;
                Ok(())
            }

            async fn save_lifecycle(&self, uid: &str, state: &LifecycleState) -> StoreResult<()> {
                let text = serde_json::to_string(state).map_err(|e| StoreError::Invalid(e.to_string()))?;
                let done = sqlx::query("UPDATE workspaces SET lifecycle = $2 WHERE uid = $1")
                    .bind(uid)
                    .bind(text)
                    .execute(&self.pool)
                    .await?;
                expect_one(uid, done.rows_affected())
            }

            async fn request_restart(&self, uid: &str, at: DateTime<Utc>) -> StoreResult<()> {
                let done = sqlx::query("UPDATE workspaces SET restart_requested_at = $2 WHERE uid = $1")
                    .bind(uid)
                    .bind(D::time(at))
                    .execute(&self.pool)
                    .await?;
                expect_one(uid, done.rows_affected())
            }

            async fn save_status(&self, uid: &str, status: &WorkspaceStatus) -> StoreResult<()> {
                let done = sqlx::query("UPDATE workspaces SET status = $2, agent_online = $3 WHERE uid = $1")
                    .bind(uid)
                    .bind(Json(status))
                    .bind(shows_agent_online(status))
                    .execute(&self.pool)
                    .await?;
                expect_one(uid, done.rows_affected())
            }

            async fn delete_workspace(&self, uid: &str) -> StoreResult<()> {
                let mut tx = self.pool.begin_with(D::BEGIN_WRITE).await?;
                sqlx::query(
                    "UPDATE workspace_auth_tokens SET revoked_at = $2, revoke_reason = $3 \
                     WHERE workspace_uid = $1 AND revoked_at IS NULL",
                )
                .bind(uid)
                .bind(D::time(Utc::now()))
                .bind(RevokeReason::Deleted.as_str())
                .execute(&mut *tx)
                .await?;
                sqlx::query("DELETE FROM decisions WHERE workspace_uid = $1").bind(uid).execute(&mut *tx).await?;
                sqlx::query("DELETE FROM agent_reports WHERE workspace_uid = $1").bind(uid).execute(&mut *tx).await?;
                sqlx::query("DELETE FROM workspaces WHERE uid = $1").bind(uid).execute(&mut *tx).await?;
                tx.commit().await?;
                Ok(())
            }

            async fn claim_member(
                &self,
                key: &str,
                uid: &str,
                member_uid: &str,
                claim: &Claim,
            ) -> StoreResult<Option<WorkspaceRecord>> {
                let mut tx = self.pool.begin_with(D::BEGIN_WRITE).await?;
                // Only a workspace that never had a container takes a member's identity;
                // a member already taken (its uid is a workspace's) cannot be taken again.
                let done = sqlx::query(
                    "UPDATE workspaces SET uid = $3, incarnation = 1, claim = $4 \
                     WHERE key = $1 AND uid = $2 AND incarnation = 0 \
                     AND NOT EXISTS (SELECT 1 FROM workspaces w WHERE w.uid = $3)",
                )
                .bind(key)
                .bind(uid)
                .bind(member_uid)
                .bind(Json(claim))
                .execute(&mut *tx)
                .await?;
                if done.rows_affected() != 1 {
                    return Ok(None);
                }
                for sql in [
                    "UPDATE decisions SET workspace_uid = $2 WHERE workspace_uid = $1",
                    "UPDATE agent_reports SET workspace_uid = $2 WHERE workspace_uid = $1",
                    "UPDATE workspace_auth_tokens SET workspace_uid = $2 WHERE workspace_uid = $1",
                ] {
                    sqlx::query(sql).bind(uid).bind(member_uid).execute(&mut *tx).await?;
                }
                tx.commit().await?;
                self.workspace(key).await
            }

            async fn complete_claim(&self, uid: &str, claim: &Claim) -> StoreResult<()> {
                let done = Claim { pending: false, ..claim.clone() };
                // Only while the record still holds a claim: a provision meanwhile cleared it.
                sqlx::query(
                    "UPDATE workspaces SET claim = $2 WHERE uid = $1 AND claim IS NOT NULL AND incarnation = 1",
                )
                .bind(uid)
                .bind(Json(&done))
                .execute(&self.pool)
                .await?;
                Ok(())
            }
        }

        #[async_trait]
        impl Tokens for SqlStore<D> {
            async fn issue_token(
                &self,
                uid: &str,
                incarnation: i64,
                now: DateTime<Utc>,
            ) -> StoreResult<IssuedToken> {
                let issued = new_token(uid, incarnation, now);
                let row = &issued.row;
                // Only for a workspace the store knows: a token nobody can own is never created.
                let done = sqlx::query(
                    "INSERT INTO workspace_auth_tokens \
                         (id, workspace_uid, token_hash, prefix, incarnation, created_at) \
                     SELECT $1, $2, $3, $4, $5, $6 WHERE EXISTS (SELECT 1 FROM workspaces WHERE uid = $2)",
                )
                .bind(&row.id)
                .bind(&row.workspace_uid)
                .bind(&row.token_hash)
                .bind(&row.prefix)
                .bind(row.incarnation)
                .bind(D::time(row.created_at))
                .execute(&self.pool)
                .await?;
                expect_one(uid, done.rows_affected())?;
                Ok(issued)
            }

            async fn live_tokens(&self, uid: &str) -> StoreResult<Vec<TokenRow>> {
                let sql = D::statements().live_tokens.as_str();
                let rows = sqlx::query(sql).bind(uid).fetch_all(&self.pool).await?;
                rows.iter().map(token_from_row).collect()
            }

            async fn all_live_tokens(&self, uids: Option<&[String]>) -> StoreResult<Vec<TokenRow>> {
                let rows = match uids {
                    None => {
                        sqlx::query(ALL_LIVE_TOKENS).fetch_all(&self.pool).await?
                    }
                    // The live index, one lookup per uid (as live_tokens does).
                    Some(uids) => {
                        let query = sqlx::query(D::statements().live_tokens_of_uids.as_str());
                        query.bind(D::list(uids)?).fetch_all(&self.pool).await?
                    }
                };
                rows.iter().map(token_from_row).collect()
            }

            async fn token_history(&self, uid: &str, limit: i64) -> StoreResult<Vec<TokenRow>> {
                let rows = sqlx::query(TOKEN_HISTORY).bind(uid).bind(limit.max(0)).fetch_all(&self.pool).await?;
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
                     WHERE workspace_uid = $1 AND revoked_at IS NULL AND (CAST($4 AS TEXT) IS NULL OR id <> $4)",
                )
                .bind(uid)
                .bind(D::time(now))
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
                .bind(D::time(now))
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
                .bind(D::time(at))
                .execute(&self.pool)
                .await?;
                Ok(done.rows_affected())
            }

            async fn token_owners(&self, token_hashes: &[String]) -> StoreResult<Vec<(String, TokenOwner)>> {
                if token_hashes.is_empty() {
                    return Ok(Vec::new());
                }
                let query = sqlx::query(D::statements().token_owners.as_str());
                let rows = query.bind(D::list(token_hashes)?).fetch_all(&self.lookups).await?;
                let mut owners = Vec::with_capacity(rows.len());
                for row in &rows {
                    // Revoked rows are left out here, not in the WHERE: with `revoked_at IS
                    // NULL` there, Postgres may plan a BitmapAnd with the partial index of
                    // live tokens (read whole, on every lookup) when its statistics are
                    // missing or stale.
                    if row.try_get("live")? {
                        owners.push((
                            row.try_get("token_hash")?,
                            TokenOwner {
                                token_id: row.try_get("id")?,
                                workspace_uid: row.try_get("workspace_uid")?,
                                workspace_key: row.try_get("key")?,
                                token_incarnation: row.try_get("token_incarnation")?,
                                current_incarnation: row.try_get("current_incarnation")?,
                                expires_at: D::read_opt_time(row, "expires_at")?,
                                agent_online: row.try_get("agent_online")?,
                            },
                        ));
                    }
                }
                Ok(owners)
            }
        }

        #[async_trait]
        impl Heartbeats for SqlStore<D> {
            async fn record_heartbeats(&self, beats: &[Heartbeat]) -> StoreResult<u64> {
                if let Some(front) = &self.heartbeats {
                    return front.record_heartbeats(beats).await;
                }
                if beats.is_empty() {
                    return Ok(0);
                }
                let query = sqlx::query(D::statements().record_heartbeats.as_str());
                // One statement, one write transaction, for the whole batch.
                let done = D::bind_heartbeats(query, &latest_per_token(beats))?.execute(&self.pool).await?;
                Ok(done.rows_affected())
            }

            async fn note_heartbeat(&self, token_id: &str, uid: &str, at: DateTime<Utc>) -> StoreResult<()> {
                match &self.heartbeats {
                    Some(front) => front.note_heartbeat(token_id, uid, at).await,
                    None => self.record_heartbeat(token_id, uid, at).await,
                }
            }

            async fn revoke_stale_tokens(
                &self,
                uid: &str,
                cutoff: DateTime<Utc>,
                reason: RevokeReason,
                now: DateTime<Utc>,
            ) -> StoreResult<u64> {
                if let Some(front) = &self.heartbeats {
                    return front.revoke_stale_tokens(uid, cutoff, reason, now).await;
                }
                let done = sqlx::query(REVOKE_STALE_TOKENS)
                    .bind(uid)
                    .bind(D::time(cutoff))
                    .bind(D::time(now))
                    .bind(reason.as_str())
                    .execute(&self.pool)
                    .await?;
                Ok(done.rows_affected())
            }
        }

        #[async_trait]
        impl Secrets for SqlStore<D> {
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
                         ciphertext = excluded.ciphertext, version = secrets.version + 1, \
                         updated_at = excluded.updated_at \
                     RETURNING version",
                )
                .bind(scope)
                .bind(name)
                .bind(&sealed.key_id)
                .bind(&sealed.nonce)
                .bind(&sealed.ciphertext)
                .bind(D::time(now))
                .fetch_one(&self.pool)
                .await?;
                Ok(row.try_get("version")?)
            }

            async fn secrets(&self, scopes: &[String]) -> StoreResult<Vec<SecretRow>> {
                // Only the asked scopes are read (primary key (scope, name)): every reconcile
                // asks for its workspace's three, whatever the number of secrets stored.
                let rows = if scopes.is_empty() {
                    sqlx::query(ALL_SECRETS).fetch_all(&self.pool).await?
                } else {
                    let query = sqlx::query(D::statements().secrets_of_scopes.as_str());
                    query.bind(D::list(scopes)?).fetch_all(&self.pool).await?
                };
                rows.iter().map(secret_from_row).collect()
            }

            async fn delete_secret(&self, scope: &str, name: &str) -> StoreResult<bool> {
                let done = sqlx::query("DELETE FROM secrets WHERE scope = $1 AND name = $2")
                    .bind(scope)
                    .bind(name)
                    .execute(&self.pool)
                    .await?;
                Ok(done.rows_affected() > 0)
            }
        }

        #[async_trait]
        impl DecisionLog for SqlStore<D> {
            async fn append_decision(
                &self,
                uid: &str,
                decision: &DecisionRecord,
                keep_last: i64,
            ) -> StoreResult<()> {
                let mut tx = self.pool.begin_with(D::BEGIN_WRITE).await?;
                sqlx::query(
                    "INSERT INTO decisions (workspace_uid, at, rule, cause, actions, outcome) \
                     VALUES ($1, $2, $3, $4, $5, $6)",
                )
                .bind(uid)
                .bind(D::time(decision.at))
                .bind(&decision.rule)
                .bind(&decision.cause)
                .bind(Json(&decision.actions))
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
                    "SELECT at, rule, cause, CAST(actions AS TEXT) AS actions, outcome FROM decisions \
                     WHERE workspace_uid = $1 ORDER BY id DESC LIMIT $2",
                )
                .bind(uid)
                .bind(limit.max(0))
                .fetch_all(&self.pool)
                .await?;
                rows.iter().map(|row| decision_row(row, uid)).collect()
            }

            async fn recent_decisions(&self, limit: i64) -> StoreResult<Vec<(String, DecisionRecord)>> {
                let rows = sqlx::query(
                    "SELECT w.key AS key, d.at AS at, d.rule AS rule, d.cause AS cause, \
                     CAST(d.actions AS TEXT) AS actions, d.outcome AS outcome \
                     FROM decisions d JOIN workspaces w ON w.uid = d.workspace_uid ORDER BY d.id DESC LIMIT $1",
                )
                .bind(limit.max(0))
                .fetch_all(&self.pool)
                .await?;
                rows.iter()
                    .map(|row| {
                        let key: String = row.try_get("key")?;
                        let decision = decision_row(row, &key)?;
                        Ok((key, decision))
                    })
                    .collect()
            }
        }

        #[async_trait]
        impl AgentReports for SqlStore<D> {
            async fn save_agent_report(&self, uid: &str, report: &AgentReport) -> StoreResult<()> {
                let text = serde_json::to_string(report)
                    .map_err(|e| StoreError::Invalid(format!("workspace {uid}: cannot encode its agent report: {e}")))?;
                sqlx::query(
                    "INSERT INTO agent_reports (workspace_uid, report) VALUES ($1, $2) \
                     ON CONFLICT (workspace_uid) DO UPDATE SET report = excluded.report",
                )
                .bind(uid)
                .bind(text)
                .execute(&self.pool)
                .await?;
                Ok(())
            }

            async fn agent_report(&self, uid: &str) -> StoreResult<Option<AgentReport>> {
                let row = sqlx::query("SELECT report FROM agent_reports WHERE workspace_uid = $1")
                    .bind(uid)
                    .fetch_optional(&self.pool)
                    .await?;
                let Some(row) = row else { return Ok(None) };
                let text: String = row.try_get("report")?;
                Ok(decode_report(uid, &text))
            }
        }

        #[async_trait]
        impl Objects for SqlStore<D> {
            async fn get_object(
                &self,
                kind: &str,
                namespace: &str,
                name: &str,
            ) -> StoreResult<Option<StoredObject>> {
                let row = sqlx::query(OBJECT_BY_NAME)
                    .bind(kind)
                    .bind(namespace)
                    .bind(name)
                    .fetch_optional(&self.pool)
                    .await?;
                row.as_ref().map(object_from_row).transpose()
            }

            async fn list_objects(
                &self,
                kind: &str,
                namespace: Option<&str>,
            ) -> StoreResult<(Vec<StoredObject>, i64)> {
                // The rows and the revision are one snapshot.
                let mut tx = self.pool.begin_with(D::BEGIN_SNAPSHOT).await?;
                let rows = sqlx::query(OBJECTS_OF_KIND).bind(kind).bind(namespace).fetch_all(&mut *tx).await?;
                let revision: i64 = sqlx::query_scalar(OBJECT_REVISION).fetch_one(&mut *tx).await?;
                tx.commit().await?;
                Ok((rows.iter().map(object_from_row).collect::<StoreResult<_>>()?, revision))
            }

            async fn put_object(&self, object: &StoredObject, expected: Option<i64>) -> StoreResult<ObjectWrite> {
                let mut tx = self.pool.begin_with(D::BEGIN_WRITE).await?;
                // Bumping first takes the revision row's lock: object writers serialize
                // here, so the check below cannot race another create or update.
                let rv: i64 = sqlx::query_scalar(BUMP_OBJECT_REVISION).fetch_one(&mut *tx).await?;
                let current: Option<i64> = sqlx::query_scalar(
                    "SELECT resource_version FROM objects WHERE kind = $1 AND namespace = $2 AND name = $3",
                )
                .bind(&object.kind)
                .bind(&object.namespace)
                .bind(&object.name)
                .fetch_optional(&mut *tx)
                .await?;
                if current != expected {
                    tx.rollback().await?;
                    return Ok(ObjectWrite::Conflict { current });
                }
                let body = object_body_at(object, rv)?;
                sqlx::query(
                    "INSERT INTO objects (kind, namespace, name, uid, resource_version, generation, \
                                          creation_timestamp, deletion_timestamp, body) \
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) \
                     ON CONFLICT (kind, namespace, name) DO UPDATE SET uid = excluded.uid, \
                        resource_version = excluded.resource_version, generation = excluded.generation, \
                        creation_timestamp = excluded.creation_timestamp, \
                        deletion_timestamp = excluded.deletion_timestamp, body = excluded.body",
                )
                .bind(&object.kind)
                .bind(&object.namespace)
                .bind(&object.name)
                .bind(&object.uid)
                .bind(rv)
                .bind(object.generation)
                .bind(&object.creation_timestamp)
                .bind(&object.deletion_timestamp)
                .bind(Json(&body))
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
                let mut tx = self.pool.begin_with(D::BEGIN_WRITE).await?;
                // As in put_object: writers serialize on the revision row.
                let rv: i64 = sqlx::query_scalar(BUMP_OBJECT_REVISION).fetch_one(&mut *tx).await?;
                let row = sqlx::query(OBJECT_BY_NAME)
                    .bind(kind)
                    .bind(namespace)
                    .bind(name)
                    .fetch_optional(&mut *tx)
                    .await?;
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
                let body = object_body_at(&stored, rv)?;
                Ok(ObjectWrite::Written(StoredObject { resource_version: rv, body, ..stored }))
            }

            async fn object_revision(&self) -> StoreResult<i64> {
                Ok(sqlx::query_scalar(OBJECT_REVISION).fetch_one(&self.pool).await?)
            }
        }

        #[async_trait]
        impl Store for SqlStore<D> {
            async fn ping(&self) -> StoreResult<()> {
                sqlx::query("SELECT 1").execute(&self.pool).await?;
                Ok(())
            }

            fn with_heartbeats(&self, heartbeats: Arc<dyn Heartbeats>) -> DynStore {
                let (pool, lookups) = (self.pool.clone(), self.lookups.clone());
                Arc::new(Self { pool, lookups, heartbeats: Some(heartbeats) })
            }
        }
    };
}

mod sqlite_body {
    use super::*;
    sql_store!(sqlx::Sqlite);
}

mod postgres_body {
    use super::*;
    sql_store!(sqlx::Postgres);
}

// Row encoding shared by both backends, so they store the same text for the same value.

/// `Err(unknown workspace)` when an UPDATE keyed by uid matched no row.
fn expect_one(uid: &str, rows_affected: u64) -> StoreResult<()> {
    if rows_affected == 0 { Err(unknown_workspace(uid)) } else { Ok(()) }
}

fn unknown_workspace(uid: &str) -> StoreError {
    StoreError::Invalid(format!("no workspace with uid {uid} in the state store"))
}

/// The change log's rows (workspace keys; NULL for a secret) as [`Changes`].
fn changes_from(rows: Vec<Option<String>>) -> Changes {
    let mut changes = Changes::default();
    for key in rows {
        match key {
            Some(key) => {
                changes.keys.insert(key);
            }
            None => changes.secrets = true,
        }
    }
    changes
}

fn mode_as_str(mode: OperatingMode) -> &'static str {
    match mode {
        OperatingMode::Running => "Running",
        OperatingMode::Paused => "Paused",
        OperatingMode::Stopped => "Stopped",
    }
}

fn parse_mode(uid: &str, text: Option<String>) -> StoreResult<Option<OperatingMode>> {
    match text.as_deref() {
        None => Ok(None),
        Some("Running") => Ok(Some(OperatingMode::Running)),
        Some("Paused") => Ok(Some(OperatingMode::Paused)),
        Some("Stopped") => Ok(Some(OperatingMode::Stopped)),
        Some(other) => Err(StoreError::Invalid(format!(
            "workspace {uid} has an unknown operating-mode override {other:?} in the state store"
        ))),
    }
}

/// The status is rewritten whole on every reconcile pass, so one that no longer
/// decodes (written by another version) is dropped with a warning, not an error
/// that would hide the whole workspace.
fn decode_claim(uid: &str, json: Option<String>) -> Option<Claim> {
    serde_json::from_str(json.as_deref()?)
        .inspect_err(|e| tracing::warn!(workspace_uid = uid, error = %e, "cannot decode the claim"))
        .ok()
}

fn decode_status(uid: &str, json: Option<String>) -> Option<WorkspaceStatus> {
    let json = json?;
    match serde_json::from_str(&json) {
        Ok(status) => Some(status),
        Err(error) => {
            tracing::warn!(workspace_uid = uid, %error, "ignoring a stored status that does not decode");
            None
        }
    }
}

/// A phase as stored inside a status (`"Running"`); None for anything else.
fn parse_phase(text: Option<String>) -> Option<Phase> {
    use serde::de::IntoDeserializer;
    let text = text?;
    Phase::deserialize(IntoDeserializer::<serde::de::value::Error>::into_deserializer(text.as_str())).ok()
}

/// The autopilot's bookkeeping as stored; none (or one that no longer decodes) is
/// the empty state: the clock starts again at the next pass.
fn decode_lifecycle(uid: &str, text: Option<String>) -> LifecycleState {
    text.and_then(|t| {
        serde_json::from_str(&t)
            .inspect_err(|e| tracing::warn!(workspace_uid = uid, error = %e, "cannot decode the lifecycle state"))
            .ok()
    })
    .unwrap_or_default()
}

fn decode_actions(uid: &str, json: &str) -> StoreResult<Vec<String>> {
    serde_json::from_str(json).map_err(|e| {
        StoreError::Invalid(format!(
            "a decision of workspace {uid} has actions that are not a JSON list of strings: {e}"
        ))
    })
}

/// The object's body with metadata.resourceVersion set to `rv`.
fn object_body_at(object: &StoredObject, rv: i64) -> StoreResult<serde_json::Value> {
    let mut body = object.body.clone();
    match body.get_mut("metadata").and_then(|m| m.as_object_mut()) {
        Some(meta) => {
            meta.insert("resourceVersion".into(), serde_json::Value::String(rv.to_string()));
            Ok(body)
        }
        None => Err(StoreError::Invalid(format!(
            "object {}/{} of kind {} has no metadata",
            object.namespace, object.name, object.kind
        ))),
    }
}

fn decode_object_body(kind: &str, namespace: &str, name: &str, text: &str) -> StoreResult<serde_json::Value> {
    serde_json::from_str(text)
        .map_err(|e| StoreError::Invalid(format!("the stored {kind} {namespace}/{name} is not valid JSON: {e}")))
}

/// Both databases keep microseconds; values are truncated to that before they are
/// stored, so what a call returns equals what a later read returns.
pub(super) fn micros(t: DateTime<Utc>) -> DateTime<Utc> {
    use chrono::SubsecRound;
    t.trunc_subsecs(6)
}

/// A new token row (not yet stored) and its plaintext.
fn new_token(uid: &str, incarnation: i64, now: DateTime<Utc>) -> IssuedToken {
    let plaintext = token::generate();
    let now = micros(now);
    let row = TokenRow {
        id: uuid::Uuid::new_v4().to_string(),
        workspace_uid: uid.to_string(),
        token_hash: token::hash(&plaintext),
        prefix: token::prefix(&plaintext),
        incarnation,
        created_at: now,
        last_used_at: None,
        revoked_at: None,
        revoke_reason: None,
        expires_at: None,
    };
    IssuedToken { plaintext, row }
}
