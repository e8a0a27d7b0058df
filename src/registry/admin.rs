//! The admin API (`/api/v1/*`, admin token required): what `get`, `describe`,
//! `restart`, `pause` and `resume` talk to.

use crate::trigger::Why;
use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use chrono::Utc;
use futures::StreamExt;
use serde::Deserialize;

use super::views::{self, ActionResponse};
use super::{AppState, error};
use crate::api::{DEFAULT_NAMESPACE, ObjectKey, OperatingMode};
use crate::model::WorkspaceRecord;
use crate::source::desired::DesiredWorkspace;
use crate::store::StoreError;

/// Token rows and decisions shown by `describe`.
const TOKEN_HISTORY: i64 = 10;
const DECISIONS: i64 = 20;

#[derive(Deserialize)]
pub(crate) struct NamespaceQuery {
    namespace: Option<String>,
}

impl NamespaceQuery {
    fn key(&self, name: String) -> ObjectKey {
        ObjectKey::new(self.namespace.as_deref().unwrap_or(DEFAULT_NAMESPACE), name)
    }
}

pub(crate) fn store_failed(e: StoreError) -> Response {
    tracing::warn!(error = %e, "admin API: state store failed");
    error(StatusCode::SERVICE_UNAVAILABLE, format!("the operator's state store failed: {e}"))
}

fn unknown(key: &ObjectKey) -> Response {
    error(
        StatusCode::NOT_FOUND,
        format!(
            "no workspace {key}: it is not declared and the operator has no record of it (see `molecule-operator get workspaces`)"
        ),
    )
}

/// `GET /api/v1/workspaces[?namespace=NS]`: every declared or known workspace.
pub(crate) async fn list_workspaces(State(state): State<Arc<AppState>>, Query(q): Query<NamespaceQuery>) -> Response {
    let records = match state.store.list_workspaces().await {
        Ok(r) => r,
        Err(e) => return store_failed(e),
    };
    let mut all = views::with_usage(views::summaries(&state.desired(), &records, Utc::now()), &state.usage);
    if let Some(ns) = &q.namespace {
        all.retain(|w| &w.namespace == ns);
    }
    Json(all).into_response()
}

/// `GET /api/v1/teams`.
pub(crate) async fn list_teams(State(state): State<Arc<AppState>>) -> Response {
    let records = match state.store.list_workspaces().await {
        Ok(r) => r,
        Err(e) => return store_failed(e),
    };
    let desired = state.desired();
    let workspaces = views::summaries(&desired, &records, Utc::now());
    Json(views::teams(&desired, &workspaces)).into_response()
}

/// One warm pool as `get warmpools` shows it.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PoolSummary {
    pub namespace: String,
    pub name: String,
    #[serde(flatten)]
    pub status: crate::api::WarmPoolStatus,
}

/// `GET /api/v1/warmpools`: every declared pool, with its ready and claimed members.
pub(crate) async fn list_pools(State(state): State<Arc<AppState>>) -> Response {
    let seen = state.pools.lock().map(|p| p.clone()).unwrap_or_default();
    let all: Vec<PoolSummary> = state
        .desired()
        .pools
        .values()
        .map(|p| {
            let key = p.key.to_string();
            let mut status = seen.get(&key).cloned().unwrap_or_default();
            status.size = p.size;
            PoolSummary { namespace: p.key.namespace.clone(), name: p.key.name.clone(), status }
        })
        .collect();
    Json(all).into_response()
}

/// `GET /api/v1/workspaces/{name}?namespace=NS`: one workspace in detail.
pub(crate) async fn get_workspace(
    State(state): State<Arc<AppState>>,
    Path(name): Path<String>,
    Query(q): Query<NamespaceQuery>,
) -> Response {
    let key = q.key(name);
    let desired = state.desired();
    let declared = desired.workspaces.get(&key);
    let record = match state.store.workspace(&key.to_string()).await {
        Ok(r) => r,
        Err(e) => return store_failed(e),
    };
    if declared.is_none() && record.is_none() {
        return unknown(&key);
    }
    let (tokens, decisions) = match &record {
        Some(r) => {
            let tokens = state.store.token_history(&r.uid, TOKEN_HISTORY).await;
            let decisions = state.store.decisions(&r.uid, DECISIONS).await;
            match (tokens, decisions) {
                (Ok(t), Ok(d)) => (t, d),
                (Err(e), _) | (_, Err(e)) => return store_failed(e),
            }
        }
        None => (Vec::new(), Vec::new()),
    };
    let mut summary = views::summary(&key, declared, record.as_ref(), Utc::now());
    summary.usage = state.usage.get(&key.to_string());
    Json(views::detail(summary, declared, record.as_ref(), &tokens, decisions)).into_response()
}

/// The declared workspace and its record (created now if the reconciler has not
/// seen it yet, so an action can be recorded against its uid).
pub(crate) async fn target(
    state: &AppState,
    key: &ObjectKey,
    action: &str,
) -> Result<(DesiredWorkspace, WorkspaceRecord), Response> {
    let declared = state.desired().workspaces.get(key).cloned();
    let record = state.store.workspace(&key.to_string()).await.map_err(store_failed)?;
    let Some(declared) = declared else {
        return Err(match record {
            Some(_) => error(
                StatusCode::CONFLICT,
                format!("{key} is declared no more and is being removed; {action} applies to declared workspaces"),
            ),
            None => unknown(key),
        });
    };
    let record = match record {
        Some(r) => r,
        None => state.store.ensure_workspace(&key.to_string(), Utc::now()).await.map_err(store_failed)?,
    };
    Ok((declared, record))
}

fn done(state: &AppState, key: &ObjectKey, action: &'static str, why: Why, message: String) -> Response {
    state.trigger.enqueue(&key.to_string(), why);
    tracing::info!(workspace = %key, action, "admin API: {message}");
    Json(ActionResponse { workspace: key.to_string(), action: action.into(), message }).into_response()
}

/// `POST /api/v1/workspaces/{name}/restart`.
pub(crate) async fn restart(
    State(state): State<Arc<AppState>>,
    Path(name): Path<String>,
    Query(q): Query<NamespaceQuery>,
) -> Response {
    let key = q.key(name);
    let (_, record) = match target(&state, &key, "restart").await {
        Ok(t) => t,
        Err(r) => return r,
    };
    if let Err(e) = state.store.request_restart(&record.uid, Utc::now()).await {
        return store_failed(e);
    }
    done(
        &state,
        &key,
        "restart",
        Why::CliRestart,
        format!("restart of {key} requested; the operator replaces its container now"),
    )
}

/// `POST /api/v1/workspaces/{name}/pause`: overrides the declared mode with Paused.
pub(crate) async fn pause(
    State(state): State<Arc<AppState>>,
    Path(name): Path<String>,
    Query(q): Query<NamespaceQuery>,
) -> Response {
    let key = q.key(name);
    let (_, record) = match target(&state, &key, "pause").await {
        Ok(t) => t,
        Err(r) => return r,
    };
    if let Err(e) = state.store.set_mode_override(&record.uid, Some(OperatingMode::Paused)).await {
        return store_failed(e);
    }
    done(
        &state,
        &key,
        "pause",
        Why::CliPause,
        format!("{key} is pausing; `molecule-operator resume workspace {}` undoes it", key.name),
    )
}

/// `POST /api/v1/workspaces/{name}/resume`: back to running. The override is cleared
/// when the declaration says Running, and set to Running when it says Paused or
/// Stopped (that override stays until the next `pause`).
pub(crate) async fn resume(
    State(state): State<Arc<AppState>>,
    Path(name): Path<String>,
    Query(q): Query<NamespaceQuery>,
) -> Response {
    let key = q.key(name);
    let (declared, record) = match target(&state, &key, "resume").await {
        Ok(t) => t,
        Err(r) => return r,
    };
    let declared_mode = declared.spec.as_ref().map(|e| e.operating_mode).unwrap_or_default();
    let over = (declared_mode != OperatingMode::Running).then_some(OperatingMode::Running);
    if let Err(e) = state.store.set_mode_override(&record.uid, over).await {
        return store_failed(e);
    }
    // A resume is also a wake: it ends a suspension by the lifecycle autopilot.
    if let Err(e) = state.store.request_wake(&record.uid, Utc::now()).await {
        return store_failed(e);
    }
    let message = match over {
        None => format!("{key} is resuming (it is declared Running)"),
        Some(_) => format!("{key} is resuming; it stays running although it is declared {declared_mode:?}"),
    };
    done(&state, &key, "resume", Why::CliResume, message)
}

/// What `logs` asks for beside the namespace (a `NamespaceQuery` of its own).
#[derive(Debug, serde::Deserialize)]
pub(crate) struct LogsQuery {
    #[serde(default)]
    follow: bool,
    tail: Option<usize>,
}

/// `GET /api/v1/workspaces/{name}/logs[?follow=true&tail=N]`: the agent's output, as
/// the runtime keeps it (`molecule-operator logs workspace NAME [-f]`).
pub(crate) async fn logs(
    State(state): State<Arc<AppState>>,
    Path(name): Path<String>,
    Query(ns): Query<NamespaceQuery>,
    Query(q): Query<LogsQuery>,
) -> Response {
    let key = ns.key(name.clone());
    let record = match state.store.workspace(&key.to_string()).await {
        Ok(Some(r)) => r,
        Ok(None) => return unknown(&key),
        Err(e) => return store_failed(e),
    };
    let Some(container) = record.status.as_ref().and_then(|s| s.container.as_ref()) else {
        return error(StatusCode::CONFLICT, format!("{key} has no container now (see `describe workspace {name}`)"));
    };
    let Some(runtime) = state.runtime.get() else {
        return error(StatusCode::SERVICE_UNAVAILABLE, "the operator has not connected to its runtime yet");
    };
    match runtime.logs(&container.id, q.follow, q.tail.unwrap_or(100)).await {
        Ok(Some(stream)) => {
            // A follow ends when the operator stops, so the server can finish.
            let stream = stream.take_until(state.shutdown.clone().cancelled_owned());
            let body = axum::body::Body::from_stream(stream.map(Ok::<_, std::convert::Infallible>));
            ([(axum::http::header::CONTENT_TYPE, "text/plain; charset=utf-8")], body).into_response()
        }
        Ok(None) => error(
            StatusCode::NOT_IMPLEMENTED,
            format!("this runtime serves no logs here: `kubectl logs pod/{}`", container.name),
        ),
        Err(e) => error(StatusCode::BAD_GATEWAY, format!("cannot read the logs of {key}: {e}")),
    }
}
