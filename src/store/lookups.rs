//! Token lookups of concurrent requests, answered together.
//!
//! Every agent request resolves its bearer token in the database (`token_owner`:
//! a revocation committed before the request is seen by it; nothing about
//! validation is cached). At thousands of heartbeats a second, one query per
//! request is most of what both the operator and the database spend per
//! heartbeat: the query's round trip, its hand-off to SQLite's connection
//! thread, Postgres's parse-bind-execute, not the index lookup itself.
//!
//! [`TokenLookups`] (the registry's `AppState::lookups`) keeps that guarantee and
//! pays the round trip once per batch.
//! A request joins the queue; at most [`MAX_IN_FLIGHT`] queries run at once; a
//! query takes everything queued when it starts ([`Tokens::token_owners`], one
//! indexed lookup per hash). So:
//!
//! - **Each request is answered by a query that began after it arrived**, never by
//!   one already running (which could predate a revocation the request must see).
//!   A revoked token is refused by the very next request, as before.
//! - **Latency adapts instead of queueing.** A request that finds a query slot free
//!   starts its own at once; otherwise it waits for the first query in flight to end
//!   and goes with the next. The busier the registry, the larger the batches and
//!   the fewer queries per heartbeat.
//! - **A failed batch costs nothing in correctness**: each of its requests then
//!   runs its own query and gets its own answer or error (a 503, noted as lost).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use tokio::sync::oneshot;

use super::{StoreResult, Tokens};
use crate::model::TokenOwner;

/// At most this many hashes per query; more wait for the next.
pub const MAX_BATCH: usize = 512;

/// At most this many batch queries in flight at once. Two: a request that arrives
/// while one runs need not wait for it to end (which, alone, put a query's latency on
/// every request's wait), and the database still sees few, large queries under load.
pub const MAX_IN_FLIGHT: usize = 2;

/// What a waiting request is sent: the batch's answer for its hash, or `None`
/// when the batch failed (the request then asks on its own).
type Answer = Option<Option<TokenOwner>>;

/// The queue of [`Tokens::token_owner`] calls waiting for the next batch query.
pub struct TokenLookups {
    store: Arc<dyn Tokens>,
    queue: Mutex<Queue>,
}

#[derive(Default)]
struct Queue {
    waiting: Vec<(String, oneshot::Sender<Answer>)>,
    /// Tasks draining the queue (each leaves when it finds the queue empty).
    draining: usize,
}

impl TokenLookups {
    pub fn new(store: Arc<dyn Tokens>) -> Arc<Self> {
        Arc::new(Self { store, queue: Mutex::default() })
    }

    /// The owner of the live token with this hash, resolved by a query that begins
    /// after this call (see the module documentation).
    pub async fn token_owner(self: &Arc<Self>, token_hash: &str) -> StoreResult<Option<TokenOwner>> {
        let (tx, rx) = oneshot::channel();
        let start = {
            let mut queue = self.queue.lock().unwrap_or_else(PoisonError::into_inner);
            queue.waiting.push((token_hash.to_string(), tx));
            let start = queue.draining < MAX_IN_FLIGHT;
            queue.draining += usize::from(start);
            start
        };
        if start {
            tokio::spawn(self.clone().drain());
        }
        match rx.await {
            Ok(Some(owner)) => Ok(owner),
            // The batch failed, or its task ended without answering: ask alone.
            Ok(None) | Err(_) => self.store.token_owner(token_hash).await,
        }
    }

    /// Answers batches until the queue is empty.
    async fn drain(self: Arc<Self>) {
        // Whatever ends this task (a panic included) hands the queue to the next caller;
        // requests still waiting then are answered `Err` by the dropped senders and ask alone.
        let mut release = Release(Some(&self));
        loop {
            let batch: Vec<(String, oneshot::Sender<Answer>)> = {
                let mut queue = self.queue.lock().unwrap_or_else(PoisonError::into_inner);
                if queue.waiting.is_empty() {
                    queue.draining -= 1;
                    release.0 = None;
                    return;
                }
                let at = queue.waiting.len().min(MAX_BATCH);
                let rest = queue.waiting.split_off(at);
                std::mem::replace(&mut queue.waiting, rest)
            };
            let mut hashes: Vec<String> = batch.iter().map(|(hash, _)| hash.clone()).collect();
            hashes.sort_unstable();
            hashes.dedup();
            match self.store.token_owners(&hashes).await {
                Ok(found) => {
                    let found: HashMap<String, TokenOwner> = found.into_iter().collect();
                    for (hash, tx) in batch {
                        let _ = tx.send(Some(found.get(&hash).cloned()));
                    }
                }
                Err(e) => {
                    tracing::debug!(error = %e, requests = batch.len(), "a batched token lookup failed; each request asks alone");
                    for (_, tx) in batch {
                        let _ = tx.send(None);
                    }
                }
            }
        }
    }
}

/// Clears `draining` (and drops the waiting senders) if the draining task ends
/// without emptying the queue (a panic, or the task cancelled); `None` once it did.
struct Release<'a>(Option<&'a TokenLookups>);

impl Drop for Release<'_> {
    fn drop(&mut self) {
        if let Some(lookups) = self.0 {
            let mut queue = lookups.queue.lock().unwrap_or_else(PoisonError::into_inner);
            queue.waiting.clear();
            queue.draining -= 1;
        }
    }
}
