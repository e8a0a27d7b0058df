//! `GET /api/v1/events`: the fleet's decisions, newest last (`molecule-operator
//! events`), and with `?watch=true` those that follow, live, as NDJSON (`events -w`).

use std::sync::Arc;

use axum::Json;
use axum::body::Body;
use axum::extract::{Query, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;

use super::AppState;
use super::admin::store_failed;
use crate::model::DecisionRecord;

/// One decision, with the workspace it was about.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FleetEvent {
    /// `namespace/name`.
    pub workspace: String,
    #[serde(flatten)]
    pub decision: DecisionRecord,
}

#[derive(Debug, Deserialize)]
pub(crate) struct EventsQuery {
    #[serde(default)]
    watch: bool,
    /// How many past decisions come first (50 unless given).
    limit: Option<usize>,
}

pub(crate) async fn list(State(state): State<Arc<AppState>>, Query(q): Query<EventsQuery>) -> Response {
    // Subscribed before the backlog is read, so nothing falls between the two.
    let live = state.reports.as_ref().map(broadcast::Sender::subscribe);
    let limit = q.limit.unwrap_or(50).min(i64::MAX as usize) as i64;
    let mut backlog: Vec<FleetEvent> = match state.store.recent_decisions(limit).await {
        Ok(rows) => rows.into_iter().map(|(workspace, decision)| FleetEvent { workspace, decision }).collect(),
        Err(e) => return store_failed(e),
    };
    backlog.reverse(); // oldest first
    if !q.watch {
        return Json(backlog).into_response();
    }
    let Some(live) = live else {
        return Json(backlog).into_response();
    };
    let first = futures::stream::iter(backlog);
    let then = futures::stream::unfold(live, |mut rx| async move {
        loop {
            match rx.recv().await {
                Ok(report) => {
                    let events: Vec<FleetEvent> = report
                        .decisions
                        .into_iter()
                        .map(|d| FleetEvent { workspace: report.key.clone(), decision: d })
                        .collect();
                    return Some((futures::stream::iter(events), rx));
                }
                // A slow reader skips what it missed rather than holding the loop back.
                Err(broadcast::error::RecvError::Lagged(_)) => continue,
                Err(broadcast::error::RecvError::Closed) => return None,
            }
        }
    })
    .flatten();
    // Until the operator stops: a watch must not hold up the server's graceful shutdown.
    let then = then.take_until(state.shutdown.clone().cancelled_owned());
    let lines = first.chain(then).map(|e| {
        let mut line = serde_json::to_vec(&e).unwrap_or_default();
        line.push(b'\n');
        Ok::<_, std::convert::Infallible>(line)
    });
    ([(header::CONTENT_TYPE, "application/x-ndjson")], Body::from_stream(lines)).into_response()
}
