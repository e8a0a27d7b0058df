//! Heartbeats coalesced in memory and written in batches.
//!
//! Every accepted heartbeat moves two clocks forward: its token's last use (the
//! stale-token rule's) and its workspace's last heartbeat (the heartbeat rule's).
//! Both are kept in one narrow table, `heartbeats` (one short row per live token;
//! migrations/*/`*_heartbeats.sql`): a token's last use is its row, a workspace's
//! last heartbeat the latest of its tokens' rows, and a revocation folds the row into
//! the wide token and workspace rows and deletes it. Written one by one, that is a
//! write transaction per heartbeat: with SQLite every one of them takes the single
//! write lock, with Postgres every one waits for its WAL flush. [`Coalescing`] wraps
//! a store so that the registry's heartbeats land in an in-memory map instead (one
//! entry per token, the latest time wins) and a flusher writes the map every
//! [`DEFAULT_FLUSH_INTERVAL`] in one statement ([`Store::record_heartbeats`]).
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
//!   show the agent online call [`Store::record_heartbeat`], which writes at once, so
//!   the reconcile they trigger sees them.
//!
//! Memory is bounded by the number of live tokens (one entry each); a failed flush
//! keeps its entries (merged with newer ones) for the next. A heartbeat the store
//! cannot even validate (`token_owner` fails) is a 503 and noted as lost, as before.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::lookups::TokenLookups;
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
    pub async fn flush(&self, store: &dyn Store) -> StoreResult<usize> {
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
/// binds. (An UPDATE ... FROM joining a row to several source rows uses one of them,
/// unspecified which; sorted, concurrent batches lock token rows in one order.)
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

/// A store whose `note_heartbeat` is buffered and flushed every `interval` (see the
/// module documentation), and whose `token_owner` calls are answered in batches
/// (store::lookups); everything else goes straight to the wrapped store.
pub struct Coalescing {
    inner: DynStore,
    /// The store flushes write through (the registry's: unfenced, see store::lease).
    writer: DynStore,
    buffer: Arc<HeartbeatBuffer>,
    /// Noted whenever heartbeats already answered could not be written (a flush
    /// failed, or is taking longer than [`SLOW_FLUSH`]): the heartbeat rule then
    /// does not take their absence from the database for the agents' silence.
    lost: Arc<LostHeartbeats>,
    /// Token lookups, answered in batches (store::lookups).
    lookups: Arc<TokenLookups>,
}

/// A flush still running after this is treated as failing for the heartbeat rule
/// (its heartbeats, and those that arrive meanwhile, are noted as lost until it
/// ends): a store that hangs must not make the agents it answered look silent.
pub const SLOW_FLUSH: Duration = Duration::from_secs(1);

impl Coalescing {
    /// Wraps `store`; flushes go through it too. Heartbeats that cannot be written
    /// are noted in `lost` (the registry's and the reconciler's shared record).
    pub fn new(store: DynStore, lost: Arc<LostHeartbeats>) -> Self {
        let lookups = TokenLookups::new(store.clone());
        Self { inner: store.clone(), writer: store, buffer: HeartbeatBuffer::new(), lost, lookups }
    }

    /// Another view of the same buffer over a different store (the fenced store of a
    /// Postgres leader): its stale-token revokes flush the shared buffer first.
    pub fn sharing(&self, store: DynStore) -> Self {
        Self {
            lookups: TokenLookups::new(store.clone()),
            inner: store,
            writer: self.writer.clone(),
            buffer: self.buffer.clone(),
            lost: self.lost.clone(),
        }
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
impl Store for Coalescing {
    async fn note_heartbeat(&self, token_id: &str, uid: &str, at: DateTime<Utc>) -> StoreResult<()> {
        self.buffer.push(Heartbeat { token_id: token_id.to_string(), workspace_uid: uid.to_string(), at });
        Ok(())
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

    async fn record_heartbeats(&self, beats: &[Heartbeat]) -> StoreResult<u64> {
        self.writer.record_heartbeats(beats).await
    }

    async fn record_heartbeat(&self, token_id: &str, uid: &str, at: DateTime<Utc>) -> StoreResult<()> {
        self.writer.record_heartbeat(token_id, uid, at).await
    }

    // Everything else goes straight through.

    async fn ping(&self) -> StoreResult<()> {
        self.inner.ping().await
    }
    async fn ensure_workspace(&self, key: &str, now: DateTime<Utc>) -> StoreResult<WorkspaceRecord> {
        self.inner.ensure_workspace(key, now).await
    }
    async fn workspace(&self, key: &str) -> StoreResult<Option<WorkspaceRecord>> {
        self.inner.workspace(key).await
    }
    async fn workspace_by_uid(&self, uid: &str) -> StoreResult<Option<WorkspaceRecord>> {
        self.inner.workspace_by_uid(uid).await
    }
    async fn list_workspaces(&self) -> StoreResult<Vec<WorkspaceRecord>> {
        self.inner.list_workspaces().await
    }
    async fn list_workspaces_brief(
        &self,
        keys: Option<&[String]>,
    ) -> StoreResult<Vec<(WorkspaceRecord, Option<Phase>)>> {
        self.inner.list_workspaces_brief(keys).await
    }
    async fn take_changes(&self) -> StoreResult<Changes> {
        self.inner.take_changes().await
    }
    async fn bump_incarnation(&self, uid: &str) -> StoreResult<i64> {
        self.inner.bump_incarnation(uid).await
    }
    async fn record_restart(&self, uid: &str, reason: &str, at: DateTime<Utc>) -> StoreResult<()> {
        self.inner.record_restart(uid, reason, at).await
    }
    async fn reset_restarts(&self, uid: &str) -> StoreResult<()> {
        self.inner.reset_restarts(uid).await
    }
    async fn set_mode_override(&self, uid: &str, mode: Option<OperatingMode>) -> StoreResult<()> {
        self.inner.set_mode_override(uid, mode).await
    }
    async fn request_restart(&self, uid: &str, at: DateTime<Utc>) -> StoreResult<()> {
        self.inner.request_restart(uid, at).await
    }
    async fn save_status(&self, uid: &str, status: &WorkspaceStatus) -> StoreResult<()> {
        self.inner.save_status(uid, status).await
    }
    async fn delete_workspace(&self, uid: &str) -> StoreResult<()> {
        self.inner.delete_workspace(uid).await
    }
    async fn issue_token(&self, uid: &str, incarnation: i64, now: DateTime<Utc>) -> StoreResult<IssuedToken> {
        self.inner.issue_token(uid, incarnation, now).await
    }
    async fn live_tokens(&self, uid: &str) -> StoreResult<Vec<TokenRow>> {
        self.inner.live_tokens(uid).await
    }
    async fn all_live_tokens(&self, uids: Option<&[String]>) -> StoreResult<Vec<TokenRow>> {
        self.inner.all_live_tokens(uids).await
    }
    async fn token_history(&self, uid: &str, limit: i64) -> StoreResult<Vec<TokenRow>> {
        self.inner.token_history(uid, limit).await
    }
    async fn revoke_tokens(
        &self,
        uid: &str,
        reason: RevokeReason,
        keep: Option<&str>,
        now: DateTime<Utc>,
    ) -> StoreResult<u64> {
        self.inner.revoke_tokens(uid, reason, keep, now).await
    }
    async fn revoke_token(
        &self,
        uid: &str,
        token_id: &str,
        reason: RevokeReason,
        now: DateTime<Utc>,
    ) -> StoreResult<u64> {
        self.inner.revoke_token(uid, token_id, reason, now).await
    }
    async fn expire_token(&self, uid: &str, token_id: &str, at: DateTime<Utc>) -> StoreResult<u64> {
        self.inner.expire_token(uid, token_id, at).await
    }
    async fn token_owner(&self, token_hash: &str) -> StoreResult<Option<TokenOwner>> {
        self.lookups.token_owner(token_hash).await
    }
    async fn token_owners(&self, token_hashes: &[String]) -> StoreResult<Vec<(String, TokenOwner)>> {
        self.inner.token_owners(token_hashes).await
    }
    async fn put_secret(
        &self,
        scope: &str,
        name: &str,
        sealed: &crate::secrets::Sealed,
        now: DateTime<Utc>,
    ) -> StoreResult<i64> {
        self.inner.put_secret(scope, name, sealed, now).await
    }
    async fn secrets(&self, scopes: &[String]) -> StoreResult<Vec<SecretRow>> {
        self.inner.secrets(scopes).await
    }
    async fn delete_secret(&self, scope: &str, name: &str) -> StoreResult<bool> {
        self.inner.delete_secret(scope, name).await
    }
    async fn append_decision(&self, uid: &str, decision: &DecisionRecord, keep_last: i64) -> StoreResult<()> {
        self.inner.append_decision(uid, decision, keep_last).await
    }
    async fn decisions(&self, uid: &str, limit: i64) -> StoreResult<Vec<DecisionRecord>> {
        self.inner.decisions(uid, limit).await
    }
    async fn get_object(&self, kind: &str, namespace: &str, name: &str) -> StoreResult<Option<StoredObject>> {
        self.inner.get_object(kind, namespace, name).await
    }
    async fn list_objects(&self, kind: &str, namespace: Option<&str>) -> StoreResult<(Vec<StoredObject>, i64)> {
        self.inner.list_objects(kind, namespace).await
    }
    async fn put_object(&self, object: &StoredObject, expected: Option<i64>) -> StoreResult<ObjectWrite> {
        self.inner.put_object(object, expected).await
    }
    async fn delete_object(
        &self,
        kind: &str,
        namespace: &str,
        name: &str,
        expected: Option<i64>,
    ) -> StoreResult<ObjectWrite> {
        self.inner.delete_object(kind, namespace, name, expected).await
    }
    async fn object_revision(&self) -> StoreResult<i64> {
        self.inner.object_revision().await
    }
}
