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
    pub async fn try_acquire(&self) -> StoreResult<Option<i64>> {
        let row = sqlx::query(
            "INSERT INTO operator_leases (name, holder, epoch, renewed_at, expires_at) \
             VALUES ($1, $2, 1, now(), now() + make_interval(secs => $3)) \
             ON CONFLICT (name) DO UPDATE SET \
                 epoch = CASE WHEN operator_leases.holder = excluded.holder THEN operator_leases.epoch ELSE operator_leases.epoch + 1 END, \
                 holder = excluded.holder, renewed_at = now(), expires_at = excluded.expires_at \
             WHERE operator_leases.holder = excluded.holder OR operator_leases.expires_at < now() \
             RETURNING epoch",
        )
        .bind(&self.name)
        .bind(&self.holder)
        .bind(self.ttl.as_secs_f64())
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.map(|r| r.try_get("epoch")).transpose()?)
    }

    /// Extends the lease; false when it was lost (expired and taken, or epoch moved).
    pub async fn renew(&self, epoch: i64) -> StoreResult<bool> {
        let done = sqlx::query(
            "UPDATE operator_leases SET renewed_at = now(), expires_at = now() + make_interval(secs => $4) \
             WHERE name = $1 AND holder = $2 AND epoch = $3 AND expires_at > now()",
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
        sqlx::query("UPDATE operator_leases SET expires_at = now() WHERE name = $1 AND holder = $2 AND epoch = $3")
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
