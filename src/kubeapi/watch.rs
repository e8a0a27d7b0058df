//! Watches: a stream of JSON lines `{"type": ..., "object": ...}`. From a given
//! resourceVersion the history is replayed first (410 Expired, as an ERROR event,
//! when it is older than the history); without one (or "0") the current objects
//! come first as ADDED. BOOKMARKs when allowed, `timeoutSeconds`, and
//! `sendInitialEvents` (ADDED for all, then the initial-events-end bookmark).

use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::response::Response;
use futures::SinkExt;
use serde_json::{Value, json};
use tokio::sync::broadcast::error::RecvError;

use super::selector::Selector;
use super::status::ApiError;
use super::{Kind, KubeApi, Query, WatchEvent, table};

/// Without `timeoutSeconds`, a watch ends after this (clients reconnect).
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(1800);

pub fn watch(
    api: &Arc<KubeApi>,
    kind: Kind,
    ns: Option<&str>,
    selector: Selector,
    query: &Query,
    as_table: bool,
) -> Result<Response, ApiError> {
    let from = match query.get("resourceVersion").filter(|rv| !rv.is_empty() && *rv != "0") {
        None => None,
        Some(rv) => Some(rv.parse::<i64>().map_err(|_| {
            ApiError::bad_request(format!("resourceVersion {rv:?} is not a resourceVersion this server gave out"))
        })?),
    };
    let send_initial = query.flag("sendInitialEvents") && query.get("sendInitialEvents").is_some();
    let timeout = query
        .get("timeoutSeconds")
        .and_then(|s| s.parse::<u64>().ok())
        .map(Duration::from_secs)
        .unwrap_or(DEFAULT_TIMEOUT);
    let watch = Watch {
        kind,
        namespace: ns.map(str::to_string),
        selector,
        as_table,
        include: query.get("includeObject").map(str::to_string),
        bookmarks: query.flag("allowWatchBookmarks") && query.get("allowWatchBookmarks").is_some(),
    };
    // Subscribe before reading anything, so no write falls between the snapshot and the stream.
    let receiver = api.events.subscribe();
    let (tx, rx) = futures::channel::mpsc::channel::<Result<Bytes, std::io::Error>>(64);
    let api = api.clone();
    tokio::spawn(async move {
        let _ = run(api, watch, receiver, tx, from, send_initial, timeout).await;
    });
    Ok(Response::builder()
        .status(200)
        .header("content-type", "application/json")
        .header("transfer-encoding", "chunked")
        .body(Body::from_stream(rx))
        .unwrap_or_default())
}

struct Watch {
    kind: Kind,
    namespace: Option<String>,
    selector: Selector,
    as_table: bool,
    include: Option<String>,
    bookmarks: bool,
}

impl Watch {
    fn wants(&self, event: &WatchEvent) -> bool {
        event.kind == self.kind
            && self.namespace.as_ref().is_none_or(|ns| *ns == event.namespace)
            && self.selector.matches(&event.object)
    }
}

type Sink = futures::channel::mpsc::Sender<Result<Bytes, std::io::Error>>;

/// Err when the client went away.
async fn send(
    sink: &mut Sink,
    api: &KubeApi,
    watch: &Watch,
    event_type: &str,
    object: &Value,
    rv: i64,
) -> Result<(), ()> {
    let object = if watch.as_table && matches!(event_type, "ADDED" | "MODIFIED" | "DELETED") {
        table::table(api, watch.kind, &[object], rv, watch.include.as_deref())
    } else {
        object.clone()
    };
    let mut line = serde_json::to_vec(&json!({"type": event_type, "object": object})).unwrap_or_default();
    line.push(b'\n');
    sink.send(Ok(Bytes::from(line))).await.map_err(drop)
}

fn bookmark(kind: Kind, rv: i64, initial_end: bool) -> Value {
    let mut meta = json!({"resourceVersion": rv.to_string()});
    if initial_end {
        meta["annotations"] = json!({"k8s.io/initial-events-end": "true"});
    }
    json!({"apiVersion": kind.api_version(), "kind": kind.name(), "metadata": meta})
}

async fn run(
    api: Arc<KubeApi>,
    watch: Watch,
    mut receiver: tokio::sync::broadcast::Receiver<Arc<WatchEvent>>,
    mut sink: Sink,
    from: Option<i64>,
    send_initial: bool,
    timeout: Duration,
) -> Result<(), ()> {
    let mut last = match from {
        Some(rv) if !send_initial => {
            let replay: Result<Vec<Arc<WatchEvent>>, i64> = {
                let history = api.history.lock().unwrap_or_else(|p| p.into_inner());
                if rv < history.floor {
                    Err(history.floor)
                } else {
                    Ok(history.events.iter().filter(|e| e.rv > rv).cloned().collect())
                }
            };
            match replay {
                Err(floor) => {
                    let status = ApiError::gone(format!("too old resource version: {rv} ({floor})")).status();
                    return send(&mut sink, &api, &watch, "ERROR", &status, 0).await;
                }
                Ok(events) => {
                    let mut last = rv;
                    for event in events {
                        if watch.wants(&event) {
                            send(&mut sink, &api, &watch, event.event_type, &event.object, event.rv).await?;
                        }
                        last = event.rv;
                    }
                    last
                }
            }
        }
        _ => {
            let namespace = watch.namespace.as_deref();
            let (objects, revision) = match api.store.list_objects(watch.kind.name(), namespace).await {
                Ok(listed) => listed,
                Err(error) => {
                    let status = ApiError::from(error).status();
                    return send(&mut sink, &api, &watch, "ERROR", &status, 0).await;
                }
            };
            for object in objects.iter().filter(|o| watch.selector.matches(&o.body)) {
                send(&mut sink, &api, &watch, "ADDED", &object.body, object.resource_version).await?;
            }
            if send_initial {
                send(&mut sink, &api, &watch, "BOOKMARK", &bookmark(watch.kind, revision, true), revision).await?;
            }
            revision
        }
    };
    let mut closing = api.closing.subscribe();
    if *closing.borrow() {
        return Ok(());
    }
    let deadline = tokio::time::sleep(timeout);
    tokio::pin!(deadline);
    let mut ticks = tokio::time::interval(api.bookmark_interval);
    ticks.tick().await;
    loop {
        tokio::select! {
            _ = &mut deadline => return Ok(()),
            // Only `true` is ever sent: the server is shutting down.
            Ok(()) = closing.changed() => return Ok(()),
            _ = ticks.tick(), if watch.bookmarks => {
                send(&mut sink, &api, &watch, "BOOKMARK", &bookmark(watch.kind, last, false), last).await?;
            }
            received = receiver.recv() => match received {
                Ok(event) => {
                    if event.rv <= last {
                        continue;
                    }
                    if watch.wants(&event) {
                        send(&mut sink, &api, &watch, event.event_type, &event.object, event.rv).await?;
                    }
                    last = event.rv;
                }
                Err(RecvError::Lagged(_)) => {
                    let status = ApiError::gone(format!("the watch fell behind; relist from resourceVersion {last} or later")).status();
                    return send(&mut sink, &api, &watch, "ERROR", &status, 0).await;
                }
                Err(RecvError::Closed) => return Ok(()),
            },
        }
    }
}
