//! Leader lease with a fencing epoch, in Postgres (several replicas of one operator).
//! See migrations/postgres/0006_fencing.sql for how the database rejects a deposed
//! leader's writes.

use std::time::Duration;

use sqlx::Row;
use sqlx::postgres::{PgPool, PgPoolOptions};

use super::{StoreError, StoreResult};

pub struct Lease {
    pool: PgPool,
    /// The operator instance id: replicas share it.
    pub name: String,
    /// This process.
    pub holder: String,
    pub ttl: Duration,
}

impl Lease {
    pub async fn connect(url: &str, name: &str, holder: &str, ttl: Duration) -> StoreResult<Self> {
        let pool = PgPoolOptions::new().max_connections(2).acquire_timeout(Duration::from_secs(5)).connect(url).await?;
        Ok(Self { pool, name: name.into(), holder: holder.into(), ttl })
    }

    /// Takes the lease if it is free, expired or already ours; returns the fencing
    /// epoch (bumped whenever the holder changes), or None while another holds it.
    ///
    /// The lease row is locked FOR UPDATE first: that waits for every fenced
    /// transaction still open under the current epoch (they hold it FOR KEY SHARE,
    /// migrations/postgres/0010), so a deposed leader's writes land before a takeover
    /// or not at all. Expiry is judged by `clock_timestamp()`, after that wait.
    ///
    /// One database serves one operator instance: while another instance's lease is
    /// live this fails with [`StoreError::OtherInstance`] naming it (two instances
    /// would both lead and fight over the same rows). Acquisitions are serialized by a
    /// table lock, so two instances starting at once cannot both pass that check.
    pub async fn try_acquire(&self) -> StoreResult<Option<i64>> {
        // A standby's look is a plain read: it takes no lock a leader's writes could wait on.
        let current =
            sqlx::query("SELECT holder, expires_at > clock_timestamp() AS live FROM operator_leases WHERE name = $1")
                .bind(&self.name)
                .fetch_optional(&self.pool)
                .await?;
        if let Some(row) = current {
            let holder: String = row.try_get("holder")?;
            if row.try_get::<bool, _>("live")? && holder != self.holder {
                return Ok(None);
            }
        }
        let mut tx = self.pool.begin().await?;
        sqlx::query("LOCK TABLE operator_leases IN SHARE ROW EXCLUSIVE MODE").execute(&mut *tx).await?;
        let other = sqlx::query(
            "SELECT name, holder FROM operator_leases WHERE name <> $1 AND expires_at > clock_timestamp() LIMIT 1",
        )
        .bind(&self.name)
        .fetch_optional(&mut *tx)
        .await?;
        if let Some(row) = other {
            let (name, holder): (String, String) = (row.try_get("name")?, row.try_get("holder")?);
            return Err(StoreError::OtherInstance(format!(
                "another operator instance, {name:?} (process {holder}), works on this database: one database \
                 serves one instance. Give its replicas the same --instance, or this instance a database of its own"
            )));
        }
        sqlx::query("SELECT 1 FROM operator_leases WHERE name = $1 FOR UPDATE")
            .bind(&self.name)
            .execute(&mut *tx)
            .await?;
        let row = sqlx::query(
            "INSERT INTO operator_leases (name, holder, epoch, renewed_at, expires_at) \
             VALUES ($1, $2, 1, clock_timestamp(), clock_timestamp() + make_interval(secs => $3)) \
             ON CONFLICT (name) DO UPDATE SET \
                 epoch = CASE WHEN operator_leases.holder = excluded.holder THEN operator_leases.epoch ELSE operator_leases.epoch + 1 END, \
                 holder = excluded.holder, renewed_at = excluded.renewed_at, expires_at = excluded.expires_at \
             WHERE operator_leases.holder = excluded.holder OR operator_leases.expires_at < clock_timestamp() \
             RETURNING epoch",
        )
        .bind(&self.name)
        .bind(&self.holder)
        .bind(self.ttl.as_secs_f64())
        .fetch_optional(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(row.map(|r| r.try_get("epoch")).transpose()?)
    }

    /// Extends the lease; false when it was lost (expired and taken, or epoch moved).
    pub async fn renew(&self, epoch: i64) -> StoreResult<bool> {
        let done = sqlx::query(
            "UPDATE operator_leases SET renewed_at = clock_timestamp(), expires_at = clock_timestamp() + make_interval(secs => $4) \
             WHERE name = $1 AND holder = $2 AND epoch = $3 AND expires_at > clock_timestamp()",
        )
        .bind(&self.name)
        .bind(&self.holder)
        .bind(epoch)
        .bind(self.ttl.as_secs_f64())
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Gives the lease up (clean shutdown), so a follower takes over at once.
    pub async fn release(&self, epoch: i64) -> StoreResult<()> {
        sqlx::query(
            "UPDATE operator_leases SET expires_at = clock_timestamp() WHERE name = $1 AND holder = $2 AND epoch = $3",
        )
        .bind(&self.name)
        .bind(&self.holder)
        .bind(epoch)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// The value a fenced store's connections carry.
    pub fn fence(&self, epoch: i64) -> String {
        format!("{}|{}:{epoch}", self.name, self.holder)
    }
}

/// Whether an error is the database refusing a deposed leader's write.
pub fn is_fenced(e: &StoreError) -> bool {
    match e {
        StoreError::Database(sqlx::Error::Database(db)) => db.code().as_deref() == Some("MF001"),
        _ => false,
    }
}
