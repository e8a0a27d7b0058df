//! Heartbeats coalesced in memory and written in batches.
//!
//! Every accepted heartbeat moves two clocks forward: its token's last use (the
//! stale-token rule's) and its workspace's last heartbeat (the heartbeat rule's).
//! Both are kept in one narrow table, `heartbeats` (one short row per live token;
//! migrations/*/`*_heartbeats.sql`): a token's last use is its row, a workspace's
//! last heartbeat the latest of its tokens' rows, and a revocation folds the row into
//! the wide token and workspace rows and deletes it. Written one by one, that is a
//! write transaction per heartbeat: with SQLite every one of them takes the single
//! write lock, with Postgres every one waits for its WAL flush. [`Coalescing`] takes
//! a store's heartbeat role (and only that: [`Store::with_heartbeats`]) so that the
//! registry's heartbeats land in an in-memory map instead (one entry per token, the
//! latest time wins) and a flusher writes the map every [`DEFAULT_FLUSH_INTERVAL`] in
//! one statement ([`Heartbeats::record_heartbeats`]).
//!
//! What a deferred write means for the rules, and why each stays correct:
//!
//! - **A heartbeat with a revoked token is refused at once.** Nothing about
//!   validation is buffered or cached: every request resolves its token in the
//!   database (`token_owner`, live rows only), by a query that begins after the
//!   request arrived (concurrent requests share one, store::lookups), so a
//!   revocation committed before the request is seen by it.
//! - **A revoke wins over a pending heartbeat.** A flushed entry only ever writes a
//!   heartbeat row (never `revoked_at`), and only for a token that is still live when
//!   it is written (in Postgres the token row is share-locked meanwhile, so a revoke
//!   either waits for the flush and then folds its row, or goes first and the flush
//!   skips the token). A token revoked while its heartbeat waited stays revoked, and
//!   that heartbeat leaves no trace.
//! - **The stale-token rule revokes nothing a heartbeat should have saved.** Its
//!   write, `revoke_stale_tokens`, first flushes what is pending (waiting for a flush
//!   already running), then runs its UPDATE with the staleness condition repeated.
//!   So, as with one write per heartbeat, every heartbeat answered before the revoke
//!   began counts. (Across replicas in HA mode a heartbeat answered by another
//!   replica reaches the database up to one flush interval later: for that window
//!   the grace is effectively that much shorter, 100 ms of a 5-minute default, and
//!   the rule still requires that the workspace has no container at all.)
//! - **The heartbeat rule (agent silent past the TTL) is unaffected.** It reads
//!   the workspace's last heartbeat, which lags the truth by at most one flush interval plus a
//!   flush; the TTL is at least two heartbeat intervals and at least 10 s, 100 times
//!   the lag. Times are those of the requests, not of the flush, so a batched
//!   heartbeat never looks newer than it was, and the rule's filter "heard since this
//!   container was provisioned" keeps working.
//! - **A flush that fails, or hangs, makes no healthy agent look silent.** Its
//!   heartbeats were answered 200 but are not in the database. The flush keeps them
//!   for the next one and notes the moment in [`LostHeartbeats`], as the registry
//!   does when it cannot record a heartbeat at all (a 503); a flush still running
//!   after [`SLOW_FLUSH`] notes it every [`SLOW_FLUSH`] until it ends. The heartbeat
//!   rule counts silence only from the later of the last recorded heartbeat and that
//!   moment, so the unwritten beats are never taken for the agents' silence. (In HA
//!   mode each replica notes its own failures, as for the registry's 503s.)
//! - **A crash loses at most one flush interval of last-seen times, safely.**
//!   Only heartbeats answered in the last interval are lost; for each token and
//!   workspace the stored time is then that of its previous flushed heartbeat,
//!   i.e. the store looks as if one beat was missed. Both clocks only move forward
//!   (every write is `... < new`), so nothing goes back further. The heartbeat rule
//!   tolerates a missed beat by design (TTL >= 2 intervals), and the agents beat
//!   again as soon as the operator is back; the stale-token rule's grace (minutes) is
//!   far longer than a beat and it never acts on a workspace with a container.
//!   Nothing that decides security is ever buffered: issuing, revoking and
//!   validating tokens stay synchronous writes and reads.
//! - **Registers and status catch-up are written through.** A register (an agent
//!   (re)started) and a heartbeat that queues a reconcile because the status does not
//!   show the agent online call [`Heartbeats::record_heartbeat`], which writes at
//!   once, so the reconcile they trigger sees them.
//!
//! Memory is bounded by the number of live tokens (one entry each); a failed flush
//! keeps its entries (merged with newer ones) for the next. A heartbeat the store
//! cannot even validate (`token_owner` fails) is a 503 and noted as lost, as before.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::*;

/// How long a heartbeat may wait in memory before it is written.
pub const DEFAULT_FLUSH_INTERVAL: Duration = Duration::from_millis(100);

/// Heartbeats waiting to be written, one per token (the latest).
#[derive(Default)]
pub struct HeartbeatBuffer {
    pending: Mutex<HashMap<String, Heartbeat>>,
    /// Held while a batch is being written: a flush that must see every earlier
    /// heartbeat in the database waits for one already running.
    flushing: tokio::sync::Mutex<()>,
}

impl HeartbeatBuffer {
    pub fn new() -> Arc<Self> {
        Arc::default()
    }

    /// Remembers a heartbeat (keeps the later time for a token seen before).
    pub fn push(&self, beat: Heartbeat) {
        let mut pending = self.pending.lock().unwrap_or_else(PoisonError::into_inner);
        merge(&mut pending, beat);
    }

    /// How many tokens have a heartbeat waiting.
    pub fn len(&self) -> usize {
        self.pending.lock().unwrap_or_else(PoisonError::into_inner).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Writes everything pending through `store` in one transaction; returns how
    /// many heartbeats were written. On an error the batch is kept for the next flush.
    pub async fn flush(&self, store: &dyn Heartbeats) -> StoreResult<usize> {
        let _guard = self.flushing.lock().await;
        let batch: Vec<Heartbeat> = {
            let mut pending = self.pending.lock().unwrap_or_else(PoisonError::into_inner);
            if pending.is_empty() {
                return Ok(0);
            }
            std::mem::take(&mut *pending).into_values().collect()
        };
        match store.record_heartbeats(&batch).await {
            Ok(_) => Ok(batch.len()),
            Err(e) => {
                let mut pending = self.pending.lock().unwrap_or_else(PoisonError::into_inner);
                for beat in batch {
                    merge(&mut pending, beat);
                }
                Err(e)
            }
        }
    }
}

/// The latest heartbeat of each token, sorted by token id: what a batch write
/// binds. (Postgres's upsert may not touch a row twice in one statement; sorted,
/// concurrent batches lock token rows in one order.)
pub(crate) fn latest_per_token(beats: &[Heartbeat]) -> Vec<&Heartbeat> {
    let mut sorted: Vec<&Heartbeat> = beats.iter().collect();
    // Latest first within a token, so dedup keeps it.
    sorted.sort_by(|a, b| a.token_id.cmp(&b.token_id).then(b.at.cmp(&a.at)));
    sorted.dedup_by(|later, kept| later.token_id == kept.token_id);
    sorted
}

fn merge(pending: &mut HashMap<String, Heartbeat>, beat: Heartbeat) {
    match pending.get_mut(&beat.token_id) {
        Some(have) if have.at >= beat.at => {}
        Some(have) => *have = beat,
        None => {
            pending.insert(beat.token_id.clone(), beat);
        }
    }
}

/// The heartbeat role of a store, batched: `note_heartbeat` lands in the buffer,
/// which a flusher writes every `interval` (see the module documentation), and a
/// stale-token revoke writes what is pending first. Only this role: the operator puts
/// it in front of a store with [`Store::with_heartbeats`], and every other role stays
/// the store's own.
pub struct Coalescing {
    /// Where stale-token revokes run once the buffer is flushed (a Postgres leader's
    /// fenced store, or the store flushes write through).
    inner: Arc<dyn Heartbeats>,
    /// The store flushes write through (the registry's: unfenced, see store::lease).
    writer: Arc<dyn Heartbeats>,
    buffer: Arc<HeartbeatBuffer>,
    /// Noted whenever heartbeats already answered could not be written (a flush
    /// failed, or is taking longer than [`SLOW_FLUSH`]): the heartbeat rule then
    /// does not take their absence from the database for the agents' silence.
    lost: Arc<LostHeartbeats>,
}

/// A flush still running after this is treated as failing for the heartbeat rule
/// (its heartbeats, and those that arrive meanwhile, are noted as lost until it
/// ends): a store that hangs must not make the agents it answered look silent.
pub const SLOW_FLUSH: Duration = Duration::from_secs(1);

impl Coalescing {
    /// Batches the heartbeats of `store`, which must write its own (as
    /// [`super::open`] returns it; not a store this is in front of); flushes go
    /// through it. Heartbeats that cannot be written are noted in `lost` (the
    /// registry's and the reconciler's shared record).
    pub fn new(store: Arc<dyn Heartbeats>, lost: Arc<LostHeartbeats>) -> Self {
        Self { inner: store.clone(), writer: store, buffer: HeartbeatBuffer::new(), lost }
    }

    /// Another view of the same buffer, whose stale-token revokes run on `store` (the
    /// fenced store of a Postgres leader) after flushing the shared buffer.
    pub fn sharing(&self, store: Arc<dyn Heartbeats>) -> Self {
        Self { inner: store, writer: self.writer.clone(), buffer: self.buffer.clone(), lost: self.lost.clone() }
    }

    pub fn buffer(&self) -> &Arc<HeartbeatBuffer> {
        &self.buffer
    }

    /// Where unwritten heartbeats are noted.
    pub fn lost_heartbeats(&self) -> &Arc<LostHeartbeats> {
        &self.lost
    }

    /// Writes what is pending now. On failure the heartbeats stay pending and the
    /// moment is noted as one when heartbeats were lost: every heartbeat of the
    /// failed batch was answered before it, so the heartbeat rule counts no silence
    /// of those agents from before it (store::LostHeartbeats).
    pub async fn flush(&self) -> StoreResult<usize> {
        let result = self.buffer.flush(self.writer.as_ref()).await;
        if result.is_err() {
            self.lost.note(Utc::now());
        }
        result
    }

    /// [`Coalescing::flush`], noting heartbeats as lost every [`SLOW_FLUSH`] for as
    /// long as it runs beyond that (a hanging database: the batch in flight and
    /// what arrives meanwhile are not in the database yet).
    async fn flush_watched(&self) -> StoreResult<usize> {
        let flush = self.flush();
        tokio::pin!(flush);
        loop {
            tokio::select! {
                result = &mut flush => return result,
                _ = tokio::time::sleep(SLOW_FLUSH) => self.lost.note(Utc::now()),
            }
        }
    }

    /// Flushes every `interval` until `shutdown`, then once more.
    pub fn spawn_flusher(
        self: &Arc<Self>,
        interval: Duration,
        shutdown: CancellationToken,
    ) -> tokio::task::JoinHandle<()> {
        let this = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tick.tick() => {}
                }
                if let Err(e) = this.flush_watched().await {
                    tracing::warn!(error = %e, pending = this.buffer.len(), "could not write heartbeats; keeping them for the next flush");
                }
            }
            if let Err(e) = this.flush().await {
                tracing::warn!(error = %e, lost = this.buffer.len(), "could not write the last heartbeats at shutdown");
            }
        })
    }
}

#[async_trait]
impl Heartbeats for Coalescing {
    async fn note_heartbeat(&self, token_id: &str, uid: &str, at: DateTime<Utc>) -> StoreResult<()> {
        self.buffer.push(Heartbeat { token_id: token_id.to_string(), workspace_uid: uid.to_string(), at });
        Ok(())
    }

    async fn record_heartbeats(&self, beats: &[Heartbeat]) -> StoreResult<u64> {
        self.writer.record_heartbeats(beats).await
    }

    async fn revoke_stale_tokens(
        &self,
        uid: &str,
        cutoff: DateTime<Utc>,
        reason: RevokeReason,
        now: DateTime<Utc>,
    ) -> StoreResult<u64> {
        // Every heartbeat answered before this call is in the database before the
        // UPDATE (which repeats the staleness condition) runs: the heartbeat wins.
        self.flush().await?;
        self.inner.revoke_stale_tokens(uid, cutoff, reason, now).await
    }
}
