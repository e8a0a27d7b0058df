//! SQLite: the embedded state file of local mode (`STATE/state.db`), and what the
//! SQL store (sql.rs) does differently on it.
//!
//! Timestamps are TEXT in one fixed-width UTC form (see `ts`), so text order is
//! time order and the stale-token condition is evaluated by SQLite itself (DESIGN.md,
//! "SQLite timestamps"). Lists are bound as one JSON array and read with `json_each`.

use std::fs::{DirBuilder, OpenOptions, Permissions};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;
use std::sync::LazyLock;
use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::Sqlite;
use sqlx::migrate::Migrator;
use sqlx::query::Query;
use sqlx::sqlite::{SqliteArguments, SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteRow};
use sqlx::{Row, sqlite::SqliteSynchronous};

use super::sql::{Dialect, SqlStore, Statements};
use super::{StoreError, StoreResult};
use crate::model::Heartbeat;

/// How long a statement waits for another connection's write lock before failing.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);
/// WAL lets readers run beside the single writer; writes serialize on the file lock
/// whatever the pool size, so a few connections are enough.
const MAX_CONNECTIONS: u32 = 4;

/// The migrations in `migrations/sqlite`, embedded in the binary and applied on open.
static MIGRATOR: Migrator = sqlx::migrate!("migrations/sqlite");

pub type SqliteStore = SqlStore<Sqlite>;

impl SqlStore<Sqlite> {
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
        // One pool serves the token lookups too: the file has one writer whatever
        // the number of connections, and readers never wait for it (WAL).
        Ok(Self::new(pool.clone(), pool))
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

impl Dialect for Sqlite {
    fn in_list(column: &str) -> String {
        format!("{column} IN (SELECT value FROM json_each($1))")
    }

    /// SQLite's two-argument max() is NULL when either argument is; '' sorts before
    /// every stored time.
    fn later_of(a: &str, b: &str) -> String {
        format!("NULLIF(max(COALESCE({a}, ''), COALESCE({b}, '')), '')")
    }

    /// Without statistics (the operator never runs ANALYZE) SQLite prefers
    /// `workspace_auth_tokens_workspace_idx`, which also serves the ORDER BY, and so
    /// reads every revoked row of the workspace's history to find its one or two live
    /// ones (1 ms at 10,000 rows of history; bench/stale_token).
    const LIVE_TOKENS_INDEX: &'static str = " INDEXED BY workspace_auth_tokens_live_idx";
    /// A JSON array of `[token id, uid, at]`.
    const HEARTBEAT_BATCH: &'static str =
        "(SELECT value ->> 0 AS id, value ->> 1 AS uid, value ->> 2 AS at FROM json_each($1)) AS b";
    /// None: the statement holds the file's one write lock.
    const HEARTBEAT_LOCK: &'static str = "";
    /// Takes the write lock at once (waiting up to the busy timeout), so a transaction
    /// can never fail half-way on a lock upgrade.
    const BEGIN_WRITE: &'static str = "BEGIN IMMEDIATE";
    /// With WAL, a read transaction sees one snapshot.
    const BEGIN_SNAPSHOT: &'static str = "BEGIN";

    type Time = String;

    fn time(t: DateTime<Utc>) -> String {
        ts(t)
    }

    fn read_time(row: &SqliteRow, column: &str) -> StoreResult<DateTime<Utc>> {
        let text: String = row.try_get(column)?;
        parse_ts(column, &text)
    }

    fn read_opt_time(row: &SqliteRow, column: &str) -> StoreResult<Option<DateTime<Utc>>> {
        let text: Option<String> = row.try_get(column)?;
        text.map(|t| parse_ts(column, &t)).transpose()
    }

    type List<'a> = String;

    fn list(items: &[String]) -> StoreResult<String> {
        serde_json::to_string(items).map_err(|e| StoreError::Invalid(format!("cannot encode a list parameter: {e}")))
    }

    fn bind_heartbeats<'q>(
        query: Query<'q, Sqlite, SqliteArguments>,
        batch: &[&Heartbeat],
    ) -> StoreResult<Query<'q, Sqlite, SqliteArguments>> {
        let batch: Vec<(&str, &str, String)> =
            batch.iter().map(|b| (b.token_id.as_str(), b.workspace_uid.as_str(), ts(b.at))).collect();
        let batch = serde_json::to_string(&batch)
            .map_err(|e| StoreError::Invalid(format!("cannot encode a batch of heartbeats: {e}")))?;
        Ok(query.bind(batch))
    }

    fn statements() -> &'static Statements {
        static STATEMENTS: LazyLock<Statements> = LazyLock::new(Statements::new::<Sqlite>);
        &STATEMENTS
    }
}

/// The statements that differ from Postgres's, as they run here (for EXPLAIN).
pub fn statements() -> &'static Statements {
    <Sqlite as Dialect>::statements()
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
