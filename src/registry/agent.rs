//! `POST /registry/register` and `POST /registry/heartbeat`: an agent proves it is
//! its workspace's current incarnation with `Authorization: Bearer <token>`. Bodies
//! are the original platform's (reports.rs reads them): register's `id` (or
//! `workspace_id`), `url`, `agent_card` and `delivery_mode`; heartbeat's
//! `workspace_id` and what the runtime reports about itself. Unknown fields are ignored.
//!
//! Deliberate deviation from the original platform: a bearer is always required.
//! The operator writes the token file before the container starts, so the
//! original's bootstrap ("no live token yet: allow") is not needed, and it would
//! let anyone register as a workspace that has none.
//!
//! Every 401 has the same body, whether the token is missing, malformed, unknown,
//! revoked or of a superseded incarnation, so an answer reveals nothing about which.
//! Tokens are never logged; at most their 8-character prefix.

use crate::trigger::Why;
use std::collections::HashMap;
use std::sync::{Arc, PoisonError};
use std::time::{Duration, Instant};

use axum::Json;
use axum::body::Bytes;
use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Utc};
use serde::Serialize;

use super::auth::{bearer, unauthorized};
use super::limit::{Source, too_many};
use super::{AppState, error, reports};
use crate::model::{TokenOwner, shows_agent_online};
use crate::store::token;

/// The one body of every 401 from the registry.
pub const INVALID_TOKEN: &str = "invalid workspace auth token";
pub const WRONG_WORKSPACE: &str = "this token belongs to another workspace";

/// At most one "is the status behind?" check per workspace per interval (see `nudge`).
const NUDGE_INTERVAL: Duration = Duration::from_secs(1);

#[derive(Serialize)]
struct AgentResponse<'a> {
    status: &'static str,
    workspace_id: &'a str,
    incarnation: i64,
}

#[derive(Serialize)]
struct RegisterResponse<'a> {
    status: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    delivery_mode: Option<&'static str>,
    workspace_id: &'a str,
    incarnation: i64,
}

/// What an agent called (for logs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Call {
    Register,
    Heartbeat,
    UpdateCard,
    Discovery,
}

pub(crate) async fn register(
    State(state): State<Arc<AppState>>,
    source: Source,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    handle(&state, Call::Register, source, &headers, body).await
}

pub(crate) async fn heartbeat(
    State(state): State<Arc<AppState>>,
    source: Source,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    handle(&state, Call::Heartbeat, source, &headers, body).await
}

async fn handle(
    state: &AppState,
    call: Call,
    Source(ip): Source,
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let body = match reports::read(body, call == Call::Register) {
        Ok(body) => body,
        Err((code, message)) => return error(code, message),
    };
    let owner = match authenticate(state, ip, headers, Some(&body.workspace_id), call).await {
        Ok(owner) => owner,
        Err(response) => return response,
    };
    let now = Utc::now();
    state.wakes.heard(&owner.workspace_uid);
    match call {
        // An agent (re)started: written at once, so the reconcile it queues sees it.
        Call::Register => {
            let registration = match reports::registration(state, &owner, &body, now).await {
                Ok(r) => r,
                Err(response) => return response,
            };
            if let Err(e) = state.store.record_heartbeat(&owner.token_id, &owner.workspace_uid, now).await {
                return heartbeat_lost(state, e);
            }
            if let Err(e) = reports::save(state, &owner.workspace_uid, registration.clone()).await {
                return store_unavailable(e);
            }
            state.trigger.enqueue(&owner.workspace_key, Why::AgentRegistered);
            let delivery_mode = registration.delivery_mode.map(|m| m.as_str());
            let body = RegisterResponse {
                status: "registered",
                delivery_mode,
                workspace_id: &owner.workspace_uid,
                incarnation: owner.current_incarnation,
            };
            (StatusCode::OK, Json(body)).into_response()
        }
        // A heartbeat (`handle` serves register and heartbeat only). The steady state:
        // batched (store::heartbeats), unless it changes what the status shows or
        // makes the status catch up (nudge), which write it at once.
        Call::Heartbeat | Call::UpdateCard | Call::Discovery => {
            if let Err(e) = state.store.note_heartbeat(&owner.token_id, &owner.workspace_uid, now).await {
                return heartbeat_lost(state, e);
            }
            let changed = match reports::heartbeat(state, &owner, &body, now).await {
                Ok(changed) => changed,
                Err(e) => return heartbeat_lost(state, e),
            };
            if changed {
                // What the status shows changed (a task, an error rate, a wedge).
                if let Err(e) = state.store.record_heartbeat(&owner.token_id, &owner.workspace_uid, now).await {
                    return heartbeat_lost(state, e);
                }
                state.trigger.enqueue(&owner.workspace_key, Why::AgentHeartbeat);
            } else if let Err(e) = nudge(state, &owner, now).await {
                return heartbeat_lost(state, e);
            }
            let body = AgentResponse {
                status: "ok",
                workspace_id: &owner.workspace_uid,
                incarnation: owner.current_incarnation,
            };
            (StatusCode::OK, Json(body)).into_response()
        }
    }
}

/// The owner of the presented bearer token, when it is a live token of the current
/// incarnation of the workspace `claimed` names (None: whichever workspace it is);
/// else the answer to send (401 for every kind of bad token, alike; 403 for another
/// workspace's; 429, 503).
pub(crate) async fn authenticate(
    state: &AppState,
    ip: std::net::IpAddr,
    headers: &HeaderMap,
    claimed: Option<&str>,
    call: Call,
) -> Result<TokenOwner, Response> {
    let uid = claimed.unwrap_or("");
    let presented = bearer(headers).filter(|t| token::well_formed(t));
    let hash = presented.map(token::hash);
    // A source that keeps failing is answered 429 before any lookup (see limit.rs).
    let now = Instant::now();
    if let Err(wait) = state.limiter.admit(ip, hash.as_deref(), now) {
        return Err(too_many(wait));
    }
    let (Some(presented), Some(hash)) = (presented, hash) else {
        tracing::debug!(workspace_id = %uid, ?call, "registry: missing or malformed bearer");
        return Err(reject(state, ip, uid, Why::TokenRefused).await);
    };
    let prefix = token::prefix(presented);
    let owner = match state.lookups.token_owner(&hash).await {
        Ok(owner) => owner,
        Err(e) => return Err(heartbeat_lost(state, e)),
    };
    let Some(owner) = owner else {
        tracing::debug!(workspace_id = %uid, token_prefix = %prefix, ?call, "registry: unknown or revoked token");
        return Err(reject(state, ip, uid, Why::TokenRefused).await);
    };
    if owner.token_incarnation != owner.current_incarnation {
        tracing::debug!(
            workspace = %owner.workspace_key, token_prefix = %prefix,
            token_incarnation = owner.token_incarnation, current = owner.current_incarnation,
            "registry: token of a superseded incarnation"
        );
        return Err(reject(state, ip, uid, Why::TokenRefused).await);
    }
    if owner.expires_at.is_some_and(|e| e <= Utc::now()) {
        tracing::debug!(workspace = %owner.workspace_key, token_prefix = %prefix, "registry: rotated-out token past its overlap");
        return Err(reject(state, ip, uid, Why::TokenRefused).await);
    }
    if claimed.is_some_and(|uid| !same_uid(&owner.workspace_uid, uid)) {
        tracing::info!(
            workspace_id = %uid, token_workspace = %owner.workspace_key, token_prefix = %prefix,
            "registry: a workspace presented another workspace's token"
        );
        state.limiter.failed(ip, Instant::now());
        enqueue_if_known(state, uid, Why::WrongWorkspace).await;
        return Err(error(StatusCode::FORBIDDEN, WRONG_WORKSPACE));
    }
    state.limiter.vouch(&hash, now);
    Ok(owner)
}

fn same_uid(a: &str, b: &str) -> bool {
    match (uuid::Uuid::parse_str(a), uuid::Uuid::parse_str(b)) {
        (Ok(a), Ok(b)) => a == b,
        _ => a == b,
    }
}

/// A 401; the workspace it claims to be, if known, is queued for reconcile: an agent
/// locked out is itself a sign of drift (e.g. a token file that no longer matches).
async fn reject(state: &AppState, ip: std::net::IpAddr, uid: &str, why: Why) -> Response {
    state.limiter.failed(ip, Instant::now());
    enqueue_if_known(state, uid, why).await;
    unauthorized(INVALID_TOKEN)
}

async fn enqueue_if_known(state: &AppState, uid: &str, why: Why) {
    if uuid::Uuid::parse_str(uid).is_err() {
        return;
    }
    match state.store.workspace_by_uid(uid).await {
        Ok(Some(record)) => state.trigger.enqueue(&record.key, why),
        Ok(None) => {}
        Err(e) => tracing::warn!(workspace_id = %uid, error = %e, "registry: cannot look the workspace up"),
    }
}

/// The store failed while an agent reported in: a 503 (the agent retries), and the
/// time is noted so the heartbeat rule does not take the unrecorded beats for silence.
pub(crate) fn heartbeat_lost(state: &AppState, e: crate::store::StoreError) -> Response {
    state.lost_heartbeats.note(Utc::now());
    store_unavailable(e)
}

pub(crate) fn store_unavailable(e: crate::store::StoreError) -> Response {
    tracing::warn!(error = %e, "registry: state store failed");
    error(StatusCode::SERVICE_UNAVAILABLE, "the operator's state store is unavailable; retry shortly")
}

/// A good heartbeat from a workspace whose status does not show its agent online
/// queues a reconcile, so the status catches up now rather than at the next resync;
/// the heartbeat is then written at once, for that reconcile to see it.
/// Cheap by construction: whether the status shows the agent online comes with the
/// token (`TokenOwner::agent_online`, no second query), so the steady state costs
/// nothing; otherwise at most one reconcile per workspace per `NUDGE_INTERVAL` is
/// queued (an in-memory check). Only a state whose status was not written since the
/// upgrade (agent_online unknown) reads the status, as often.
async fn nudge(state: &AppState, owner: &TokenOwner, at: DateTime<Utc>) -> Result<(), crate::store::StoreError> {
    let (uid, key) = (owner.workspace_uid.as_str(), owner.workspace_key.as_str());
    if owner.agent_online == Some(true) || !nudge_due(state, uid, Instant::now()) {
        return Ok(());
    }
    let behind = match owner.agent_online {
        Some(online) => !online,
        None => match state.store.workspace_by_uid(uid).await {
            Ok(Some(record)) => !record.status.as_ref().is_some_and(shows_agent_online),
            Ok(None) => false,
            Err(e) => {
                tracing::warn!(workspace = %key, error = %e, "registry: cannot read the workspace's status");
                false
            }
        },
    };
    if behind {
        state.store.record_heartbeat(&owner.token_id, uid, at).await?;
        state.trigger.enqueue(key, Why::AgentHeartbeat);
    }
    Ok(())
}

/// When each workspace may next be nudged. Expired entries are dropped whenever the
/// map has doubled since the last pruning, so the cost stays constant per heartbeat
/// however many agents there are.
#[derive(Default)]
pub(crate) struct Nudges {
    next: HashMap<String, Instant>,
    prune_above: usize,
}

fn nudge_due(state: &AppState, uid: &str, now: Instant) -> bool {
    let mut nudges = state.nudges.lock().unwrap_or_else(PoisonError::into_inner);
    if nudges.next.len() > nudges.prune_above.max(4096) {
        nudges.next.retain(|_, next| *next > now);
        nudges.prune_above = nudges.next.len() * 2;
    }
    match nudges.next.get(uid) {
        Some(next) if *next > now => false,
        _ => {
            nudges.next.insert(uid.to_string(), now + NUDGE_INTERVAL);
            true
        }
    }
}
