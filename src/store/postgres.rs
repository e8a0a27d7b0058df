//! Postgres: state for the `postgres` and `cluster` modes, shared by replicas, and
//! what the SQL store (sql.rs) does differently on it: lists bound as arrays,
//! timestamptz, row locks, and the registry's token lookups on connections of their
//! own. A leader's connections carry its fence (store::lease).

use std::sync::LazyLock;
use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::migrate::Migrator;
use sqlx::postgres::{PgArguments, PgConnectOptions, PgPoolOptions, PgRow};
use sqlx::query::Query;
use sqlx::{Connection, PgConnection, Postgres, Row};

use super::sql::{Dialect, SqlStore, Statements, micros};
use super::{StoreError, StoreResult};
use crate::model::Heartbeat;

/// How long connecting (and, later, waiting for a pooled connection) may take
/// before "database down" is reported instead of hanging.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const MAX_CONNECTIONS: u32 = 8;
/// The registry's token lookups have connections of their own: as many as lookups
/// may be in flight (store::lookups).
const LOOKUP_CONNECTIONS: u32 = super::lookups::MAX_IN_FLIGHT as u32;

/// The migrations in `migrations/postgres`, embedded in the binary and applied on
/// connect (concurrent replicas serialize on sqlx's migration advisory lock).
static MIGRATOR: Migrator = sqlx::migrate!("migrations/postgres");

pub type PostgresStore = SqlStore<Postgres>;

impl SqlStore<Postgres> {
    /// Connects (failing within `CONNECT_TIMEOUT` when the server does not answer)
    /// and applies the migrations.
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
        // The token lookups' own connections: the reconciler's queries never make a
        // heartbeat wait for a connection, and these run their one statement with a
        // generic plan (`plan_cache_mode`). Postgres would otherwise plan it anew on
        // every execution, because a custom plan for the array at hand looks cheaper
        // than the generic one: planning was over a quarter of the database's CPU per
        // heartbeat (bench/registry, perf). The generic plan is the same index lookup
        // whatever the array (see `Statements::token_owners`).
        let lookups = PgPoolOptions::new()
            .max_connections(LOOKUP_CONNECTIONS)
            .acquire_timeout(CONNECT_TIMEOUT)
            .connect_lazy_with(options.options([("plan_cache_mode", "force_generic_plan")]));
        Ok(Self::new(pool, lookups))
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

impl Dialect for Postgres {
    fn in_list(column: &str) -> String {
        format!("{column} = ANY($1)")
    }

    fn later_of(a: &str, b: &str) -> String {
        format!("GREATEST({a}, {b})")
    }

    /// The planner finds `workspace_auth_tokens_live_idx` by itself.
    const LIVE_TOKENS_INDEX: &'static str = "";
    /// Token ids, uids and times as three arrays.
    const HEARTBEAT_BATCH: &'static str = "unnest($1::text[], $2::text[], $3::timestamptz[]) AS b(id, uid, at)";
    /// The token rows are share-locked: a concurrent revoke waits until the batch
    /// commits (and then folds the row it wrote), or the batch waits for the revoke
    /// and skips the token. (Sorted by token id, concurrent batches lock rows in one
    /// order.)
    const HEARTBEAT_LOCK: &'static str = " FOR SHARE OF t";
    /// Writers serialize on the rows they lock.
    const BEGIN_WRITE: &'static str = "BEGIN";
    const BEGIN_SNAPSHOT: &'static str = "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY";

    type Time = DateTime<Utc>;

    fn time(t: DateTime<Utc>) -> DateTime<Utc> {
        micros(t)
    }

    fn read_time(row: &PgRow, column: &str) -> StoreResult<DateTime<Utc>> {
        Ok(row.try_get(column)?)
    }

    fn read_opt_time(row: &PgRow, column: &str) -> StoreResult<Option<DateTime<Utc>>> {
        Ok(row.try_get(column)?)
    }

    type List<'a> = &'a [String];

    fn list(items: &[String]) -> StoreResult<&[String]> {
        Ok(items)
    }

    fn bind_heartbeats<'q>(
        query: Query<'q, Postgres, PgArguments>,
        batch: &[&Heartbeat],
    ) -> StoreResult<Query<'q, Postgres, PgArguments>> {
        let ids: Vec<&str> = batch.iter().map(|b| b.token_id.as_str()).collect();
        let uids: Vec<&str> = batch.iter().map(|b| b.workspace_uid.as_str()).collect();
        let times: Vec<DateTime<Utc>> = batch.iter().map(|b| micros(b.at)).collect();
        Ok(query.bind(ids).bind(uids).bind(times))
    }

    fn statements() -> &'static Statements {
        static STATEMENTS: LazyLock<Statements> = LazyLock::new(Statements::new::<Postgres>);
        &STATEMENTS
    }
}

/// The statements that differ from SQLite's, as they run here (for EXPLAIN).
pub fn statements() -> &'static Statements {
    <Postgres as Dialect>::statements()
}
