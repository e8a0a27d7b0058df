//! The original platform's discovery endpoints, each gated by the caller's own token
//! and the hierarchy rule (rules::hierarchy; 403 when it says no):
//! - `POST /registry/update-card` `{workspace_id, agent_card}`: replaces the card;
//! - `GET /registry/discover/{id}`: one workspace's address and card (`id` may also be
//!   a workspace's name in the caller's namespace, as `PARENT_ID` holds);
//! - `GET /registry/{id}/peers`: the caller's parent, siblings and children;
//! - `POST /registry/check-access` `{caller_id, target_id}`: `{allowed}`.
//!
//! The caller is whoever the bearer token belongs to; an `X-Workspace-ID` header (the
//! original runtimes send one) must name that same workspace.

use std::sync::Arc;

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use serde_json::Value;

use super::agent::{Call, authenticate, store_unavailable};
use super::limit::Source;
use super::{AppState, error, reports};
use crate::api::ObjectKey;
use crate::model::{AgentReport, TokenOwner, WorkspaceRecord};
use crate::rules::hierarchy;

/// A workspace as discovery shows it.
#[derive(Serialize)]
struct Peer {
    id: String,
    name: String,
    namespace: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    parent: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    url: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    agent_card: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    delivery_mode: Option<&'static str>,
    /// The phase, lower-case as the original's statuses (`running`, `degraded`, ...).
    status: String,
}

pub(crate) async fn update_card(
    State(state): State<Arc<AppState>>,
    Source(ip): Source,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let body = match reports::read(body, false) {
        Ok(body) => body,
        Err((code, message)) => return error(code, message),
    };
    let owner = match authenticate(&state, ip, &headers, Some(&body.workspace_id), Call::UpdateCard).await {
        Ok(owner) => owner,
        Err(response) => return response,
    };
    let Some(card) = body.value("agent_card") else {
        return error(StatusCode::BAD_REQUEST, "agent_card is required (a JSON value)");
    };
    match reports::update_card(&state, &owner, card.clone()).await {
        Ok(()) => (StatusCode::OK, Json(serde_json::json!({"status": "updated"}))).into_response(),
        Err(e) => store_unavailable(e),
    }
}

pub(crate) async fn discover(
    State(state): State<Arc<AppState>>,
    Source(ip): Source,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    let caller = match caller(&state, ip, &headers, None).await {
        Ok(caller) => caller,
        Err(response) => return response,
    };
    // An id, or a name in the caller's namespace (PARENT_ID carries the parent's name).
    let found = match uuid::Uuid::parse_str(&id) {
        Ok(_) => state.store.workspace_by_uid(&id).await,
        Err(_) => {
            let namespace = ObjectKey::parse(&caller.workspace_key).namespace;
            state.store.workspace(&ObjectKey::new(namespace, id.as_str()).to_string()).await
        }
    };
    let target = match found {
        Ok(Some(record)) => record,
        Ok(None) => return error(StatusCode::NOT_FOUND, format!("no workspace has the id {id}")),
        Err(e) => return store_unavailable(e),
    };
    if !allowed(&state, &caller.workspace_key, &target.key) {
        return forbidden(&caller.workspace_key, &target.key);
    }
    // Traffic for a suspended workspace: with `lifecycle.wake: OnDemand` (the default)
    // a peer looking it up wakes it, as the original platform's 503 + Retry-After did;
    // the answer says `suspended` with a Retry-After. `Manual` waits for an explicit wake.
    let suspended = target.status.as_ref().is_some_and(|s| s.phase == crate::api::Phase::Suspended);
    if suspended && wakes_on_demand(&state, &target.key) {
        if let Err(e) = super::wake::request(&state, &target, crate::trigger::Why::Wake).await {
            return store_unavailable(e);
        }
        tracing::info!(workspace = %target.key, by = %caller.workspace_key, "registry: a peer's discovery wakes it");
    }
    match peer(&state, &target).await {
        Ok(p) if suspended => (StatusCode::OK, [(axum::http::header::RETRY_AFTER, "1")], Json(p)).into_response(),
        Ok(p) => (StatusCode::OK, Json(p)).into_response(),
        Err(e) => store_unavailable(e),
    }
}

/// Whether the workspace's declared lifecycle lets traffic wake it (`wake: OnDemand`).
fn wakes_on_demand(state: &AppState, key: &str) -> bool {
    let set = state.desired();
    set.workspaces
        .get(&ObjectKey::parse(key))
        .and_then(|d| d.spec.as_ref().ok())
        .is_some_and(|s| s.lifecycle.enabled() && s.lifecycle.wake == crate::api::WakePolicy::OnDemand)
}

pub(crate) async fn peers(
    State(state): State<Arc<AppState>>,
    Source(ip): Source,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    let caller = match caller(&state, ip, &headers, Some(&id)).await {
        Ok(caller) => caller,
        Err(response) => return response,
    };
    let me = ObjectKey::parse(&caller.workspace_key);
    let set = state.desired();
    let parent_of = |key: &ObjectKey| set.workspaces.get(key).and_then(|d| d.spec.as_ref().ok()?.parent.clone());
    let my_parent = parent_of(&me);
    let neighbours: Vec<&ObjectKey> = set
        .workspaces
        .keys()
        .filter(|k| k.namespace == me.namespace && **k != me)
        .filter(|k| {
            let theirs = parent_of(k);
            theirs == my_parent
                || theirs.as_deref() == Some(me.name.as_str())
                || my_parent.as_deref() == Some(k.name.as_str())
        })
        .collect();
    let mut out = Vec::new();
    for key in neighbours {
        match state.store.workspace(&key.to_string()).await {
            Ok(Some(record)) => match peer(&state, &record).await {
                Ok(p) => out.push(p),
                Err(e) => return store_unavailable(e),
            },
            Ok(None) => {} // declared, not seen yet: nothing to discover
            Err(e) => return store_unavailable(e),
        }
    }
    (StatusCode::OK, Json(out)).into_response()
}

pub(crate) async fn check_access(
    State(state): State<Arc<AppState>>,
    Source(ip): Source,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let ids = body
        .ok()
        .and_then(|b| serde_json::from_slice::<serde_json::Map<String, Value>>(&b).ok())
        .and_then(|m| Some((m.get("caller_id")?.as_str()?.to_string(), m.get("target_id")?.as_str()?.to_string())));
    let Some((caller_id, target_id)) = ids else {
        return error(
            StatusCode::BAD_REQUEST,
            "the body must be JSON like {\"caller_id\": \"<uuid>\", \"target_id\": \"<uuid>\"}",
        );
    };
    let caller = match caller(&state, ip, &headers, Some(&caller_id)).await {
        Ok(caller) => caller,
        Err(response) => return response,
    };
    let allowed = match state.store.workspace_by_uid(&target_id).await {
        Ok(Some(target)) => allowed(&state, &caller.workspace_key, &target.key),
        Ok(None) => false,
        Err(e) => return store_unavailable(e),
    };
    (StatusCode::OK, Json(serde_json::json!({"allowed": allowed}))).into_response()
}

/// The calling workspace: the owner of the bearer token, which must be the workspace
/// `claimed` names and the one an `X-Workspace-ID` header names.
async fn caller(
    state: &AppState,
    ip: std::net::IpAddr,
    headers: &HeaderMap,
    claimed: Option<&str>,
) -> Result<TokenOwner, Response> {
    let header = headers.get("x-workspace-id").and_then(|v| v.to_str().ok()).map(str::trim);
    let owner = authenticate(state, ip, headers, claimed.or(header), Call::Discovery).await?;
    match (claimed, header) {
        (Some(c), Some(h)) if !c.eq_ignore_ascii_case(h) => {
            Err(error(StatusCode::FORBIDDEN, super::agent::WRONG_WORKSPACE))
        }
        _ => Ok(owner),
    }
}

/// Whether `caller` may see `target` (rules::hierarchy over the declared parents).
fn allowed(state: &AppState, caller: &str, target: &str) -> bool {
    let set = state.desired();
    let parent_of = |key: &str| -> Option<String> {
        let key = ObjectKey::parse(key);
        let parent = set.workspaces.get(&key)?.spec.as_ref().ok()?.parent.clone()?;
        Some(ObjectKey::new(key.namespace, parent).to_string())
    };
    hierarchy::can_communicate(caller, target, &parent_of)
}

fn forbidden(caller: &str, target: &str) -> Response {
    error(
        StatusCode::FORBIDDEN,
        format!(
            "workspace {caller} may not reach {target}: only the same workspace, siblings, roots, \
             parent and child, or an ancestor of the other's parent may"
        ),
    )
}

async fn peer(state: &AppState, record: &WorkspaceRecord) -> crate::store::StoreResult<Peer> {
    let key = ObjectKey::parse(&record.key);
    let report: Option<AgentReport> = state.store.agent_report(&record.uid).await?;
    let report = report.filter(|r| r.incarnation == record.incarnation);
    let set = state.desired();
    let parent = set.workspaces.get(&key).and_then(|d| d.spec.as_ref().ok()?.parent.clone());
    let status = record.status.as_ref().map(|s| s.phase.to_string().to_lowercase()).unwrap_or_else(|| "pending".into());
    Ok(Peer {
        id: record.uid.clone(),
        name: key.name,
        namespace: key.namespace,
        parent,
        url: report.as_ref().and_then(|r| r.url.clone()),
        agent_card: report.as_ref().and_then(|r| r.agent_card.clone()),
        delivery_mode: report.as_ref().and_then(|r| r.delivery_mode).map(|m| m.as_str()),
        status,
    })
}
