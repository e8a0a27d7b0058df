//! `/api/v1/secrets` (admin token required): set, list and delete secrets. Values go
//! in sealed and never come out: the list shows scope, name, version and time only.

use crate::trigger::Why;
use std::sync::Arc;

use axum::Json;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::{AppState, error};
use crate::api::ObjectKey;
use crate::secrets::{SecretScope, valid_name};

/// One secret as listed: never its value.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SecretView {
    pub scope: String,
    pub name: String,
    pub version: i64,
    pub key_id: String,
    pub updated_at: DateTime<Utc>,
}

#[derive(Deserialize)]
pub(crate) struct SecretQuery {
    scope: Option<String>,
    name: String,
}

#[derive(Deserialize)]
pub(crate) struct SecretBody {
    value: String,
}

/// The scope a request names, or why it is a bad request.
fn parse(q: &SecretQuery) -> Result<SecretScope, String> {
    valid_name(&q.name)?;
    SecretScope::parse(q.scope.as_deref().unwrap_or("global"))
}

/// Workspaces that receive a secret of this scope: reconciled at once.
fn affected(state: &AppState, scope: &SecretScope) -> Vec<ObjectKey> {
    let set = state.desired.borrow().clone();
    set.workspaces
        .values()
        .filter(|w| match scope {
            SecretScope::Global => true,
            SecretScope::Workspace(k) => w.key.to_string() == *k,
            SecretScope::Team(k) => w.team().is_some_and(|t| format!("{}/{t}", w.key.namespace) == *k),
        })
        .map(|w| w.key.clone())
        .collect()
}

fn touch(state: &AppState, scope: &SecretScope) -> usize {
    let keys = affected(state, scope);
    for k in &keys {
        state.trigger.enqueue(&k.to_string(), Why::SecretChanged);
    }
    keys.len()
}

/// `GET /api/v1/secrets`.
pub(crate) async fn list(State(state): State<Arc<AppState>>) -> Response {
    match state.store.secrets(&[]).await {
        Ok(rows) => Json(
            rows.into_iter()
                .map(|r| SecretView {
                    scope: r.scope,
                    name: r.name,
                    version: r.version,
                    key_id: r.key_id,
                    updated_at: r.updated_at,
                })
                .collect::<Vec<_>>(),
        )
        .into_response(),
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, format!("the operator's state store failed: {e}")),
    }
}

/// `PUT /api/v1/secrets?scope=S&name=N`, body `{"value": "..."}`.
pub(crate) async fn set(
    State(state): State<Arc<AppState>>,
    Query(q): Query<SecretQuery>,
    Json(body): Json<SecretBody>,
) -> Response {
    let scope = match parse(&q) {
        Ok(s) => s,
        Err(e) => return error(StatusCode::BAD_REQUEST, e),
    };
    let Some(keyring) = state.keyring.as_ref() else {
        return error(StatusCode::SERVICE_UNAVAILABLE, "the operator has no secrets key");
    };
    let sealed = keyring.seal(&scope, &q.name, &body.value);
    match state.store.put_secret(&scope.as_string(), &q.name, &sealed, Utc::now()).await {
        Ok(version) => {
            let n = touch(&state, &scope);
            tracing::info!(scope = %scope.as_string(), name = %q.name, version, workspaces = n, "secret set");
            Json(serde_json::json!({
                "message": format!("secret {} ({}) is at version {version}; {n} workspace(s) use it", q.name, scope.as_string()),
            }))
            .into_response()
        }
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, format!("the operator's state store failed: {e}")),
    }
}

/// `DELETE /api/v1/secrets?scope=S&name=N`.
pub(crate) async fn delete(State(state): State<Arc<AppState>>, Query(q): Query<SecretQuery>) -> Response {
    let scope = match parse(&q) {
        Ok(s) => s,
        Err(e) => return error(StatusCode::BAD_REQUEST, e),
    };
    match state.store.delete_secret(&scope.as_string(), &q.name).await {
        Ok(true) => {
            let n = touch(&state, &scope);
            tracing::info!(scope = %scope.as_string(), name = %q.name, workspaces = n, "secret deleted");
            Json(serde_json::json!({ "message": format!("secret {} ({}) deleted; {n} workspace(s) used it", q.name, scope.as_string()) }))
                .into_response()
        }
        Ok(false) => error(StatusCode::NOT_FOUND, format!("no secret {} in scope {}", q.name, scope.as_string())),
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, format!("the operator's state store failed: {e}")),
    }
}
