//! Waking a workspace (the lifecycle autopilot, rules::suspend): `POST
//! /api/v1/workspaces/{namespace}/{name}/wake[?wait=true&timeout=SECONDS]`, what
//! `molecule-operator wake workspace NAME` and a gateway call when traffic arrives for
//! a suspended workspace. A wake is a time stored with the workspace: a suspension
//! made before it is over, and the idle clock starts again from it. Without `wait` the
//! answer is 202 with `Retry-After`; with it, 200 once the agent is heard from after
//! the wake (its first accepted heartbeat or register), 504 past the timeout.
//!
//! How "heard from" is known fast: the registry tells [`Waiters`] of every accepted
//! agent call (one atomic load while nobody waits); the store's last heartbeat is
//! also polled, for agents whose calls reach another replica.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Utc};
use serde::Deserialize;
use tokio::sync::Notify;

use super::views::ActionResponse;
use super::{AppState, error};
use crate::api::{ObjectKey, Phase};
use crate::model::WorkspaceRecord;
use crate::trigger::Why;

/// How long `?wait=true` waits unless `timeout` says otherwise.
const DEFAULT_WAIT: Duration = Duration::from_secs(60);
/// Longest `timeout` accepted.
const MAX_WAIT: Duration = Duration::from_secs(600);
/// How often the store's last heartbeat is read while waiting.
const POLL: Duration = Duration::from_millis(250);
/// How long a wake is followed for the wake-latency metric when nobody waits.
const METRIC_WAIT: Duration = Duration::from_secs(300);

/// Who waits to hear from which workspace's agent.
#[derive(Default)]
pub struct Waiters {
    waiting: AtomicUsize,
    by_uid: Mutex<HashMap<String, Arc<Notify>>>,
}

impl Waiters {
    /// The registry accepted a call of this workspace's agent.
    pub(crate) fn heard(&self, uid: &str) {
        if self.waiting.load(Ordering::Acquire) == 0 {
            return;
        }
        if let Some(n) = self.by_uid.lock().unwrap_or_else(PoisonError::into_inner).get(uid) {
            n.notify_waiters();
        }
    }

    fn watch(self: &Arc<Self>, uid: &str) -> Watch {
        let notify = {
            let mut map = self.by_uid.lock().unwrap_or_else(PoisonError::into_inner);
            map.entry(uid.to_string()).or_default().clone()
        };
        self.waiting.fetch_add(1, Ordering::AcqRel);
        Watch { waiters: self.clone(), uid: uid.to_string(), notify }
    }
}

/// One waiter; unregisters when dropped.
struct Watch {
    waiters: Arc<Waiters>,
    uid: String,
    notify: Arc<Notify>,
}

impl Drop for Watch {
    fn drop(&mut self) {
        self.waiters.waiting.fetch_sub(1, Ordering::AcqRel);
        let mut map = self.waiters.by_uid.lock().unwrap_or_else(PoisonError::into_inner);
        // Only this entry's users hold it: the map's copy and each Watch's.
        if map.get(&self.uid).is_some_and(|n| Arc::strong_count(n) <= 2) {
            map.remove(&self.uid);
        }
    }
}

#[derive(Deserialize, Default)]
pub(crate) struct WakeQuery {
    #[serde(default)]
    wait: bool,
    /// Seconds `wait` waits at most (default 60, at most 600).
    timeout: Option<f64>,
}

/// Whether a record's last suspension is in force, as far as the record tells (the
/// rules also ask whether the spec still has a lifecycle).
fn suspended(record: &WorkspaceRecord) -> bool {
    record.status.as_ref().is_some_and(|s| s.phase == Phase::Suspended)
        || record.lifecycle.suspended.is_some_and(|s| record.woken_at.is_none_or(|w| w < s.at))
}

/// Stores a wake request for the workspace and queues its reconcile; returns the
/// wake's time.
pub(crate) async fn request(
    state: &AppState,
    record: &WorkspaceRecord,
    why: Why,
) -> Result<DateTime<Utc>, crate::store::StoreError> {
    let at = Utc::now();
    state.store.request_wake(&record.uid, at).await?;
    state.trigger.enqueue(&record.key, why);
    Ok(at)
}

/// Waits until the workspace's agent is heard from after `since`; the time it took.
async fn online(state: &AppState, watch: Watch, key: &str, since: DateTime<Utc>, limit: Duration) -> Option<Duration> {
    let t0 = Instant::now();
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        let heard = watch.notify.notified();
        tokio::pin!(heard);
        heard.as_mut().enable();
        if let Ok(Some(r)) = state.store.workspace(key).await
            && r.last_heartbeat_at.is_some_and(|h| h >= since)
            && r.lifecycle.suspended.is_none_or(|s| s.at <= since)
        {
            return Some(t0.elapsed());
        }
        tokio::select! {
            _ = &mut heard => return Some(t0.elapsed()),
            _ = tokio::time::sleep(POLL) => {}
            _ = tokio::time::sleep_until(deadline) => return None,
            _ = state.shutdown.cancelled() => return None,
        }
    }
}

/// `POST /api/v1/workspaces/{namespace}/{name}/wake[?wait=true&timeout=SECONDS]`.
pub(crate) async fn wake(
    State(state): State<Arc<AppState>>,
    Path((namespace, name)): Path<(String, String)>,
    Query(q): Query<WakeQuery>,
) -> Response {
    let key = ObjectKey::new(namespace, name);
    let (_, record) = match super::admin::target(&state, &key, "wake").await {
        Ok(t) => t,
        Err(r) => return r,
    };
    let was_suspended = suspended(&record);
    // Watch before the wake is stored: the first heartbeat after it must not be missed.
    let watch = state.wakes.watch(&record.uid);
    let at = match request(&state, &record, Why::Wake).await {
        Ok(at) => at,
        Err(e) => return super::admin::store_failed(e),
    };
    tracing::info!(workspace = %key, suspended = was_suspended, wait = q.wait, "admin API: wake");
    let message = match was_suspended {
        true => format!("{key} is waking from its suspension"),
        false => format!("{key} is not suspended; its idle time starts again now"),
    };
    if !q.wait {
        if was_suspended {
            let state = state.clone();
            let key = key.to_string();
            tokio::spawn(async move {
                if let Some(took) = online(&state, watch, &key, at, METRIC_WAIT).await {
                    state.metrics.woken(took.as_secs_f64());
                }
            });
        }
        let body = ActionResponse { workspace: key.to_string(), action: "wake".into(), message };
        return (StatusCode::ACCEPTED, [(header::RETRY_AFTER, "1")], Json(body)).into_response();
    }
    let limit = q.timeout.filter(|t| t.is_finite() && *t > 0.0).map(Duration::from_secs_f64).unwrap_or(DEFAULT_WAIT);
    match online(&state, watch, &key.to_string(), at, limit.min(MAX_WAIT)).await {
        Some(took) => {
            if was_suspended {
                state.metrics.woken(took.as_secs_f64());
            }
            let message = format!("{key} is online ({:.3}s after the wake)", took.as_secs_f64());
            Json(ActionResponse { workspace: key.to_string(), action: "wake".into(), message }).into_response()
        }
        None => error(
            StatusCode::GATEWAY_TIMEOUT,
            format!(
                "{key} was woken but its agent was not heard from within {:.0}s (see `molecule-operator describe workspace {}`)",
                limit.min(MAX_WAIT).as_secs_f64(),
                key.name
            ),
        ),
    }
}
