//! Events, kept in memory (the newest [`MAX_EVENTS`]) so `kubectl describe` shows
//! what the controller recorded: written as events.k8s.io/v1 (kube-rs' Recorder:
//! create, then merge patches for a repeating series) or core v1, read as core v1
//! (what `kubectl describe` lists, by `involvedObject` field selectors).

use std::collections::VecDeque;
use std::sync::Mutex;

use axum::body::Bytes;
use axum::http::Method;
use axum::response::Response;
use serde_json::{Value, json};

use super::status::ApiError;
use super::{Query, json_response, now_rfc3339};

pub const MAX_EVENTS: usize = 1000;

#[derive(Default)]
pub struct EventLog {
    /// (namespace, name, the event as written: events.k8s.io/v1 or v1)
    events: Mutex<VecDeque<(String, String, Value)>>,
}

/// The core v1 form of an event, as `kubectl describe` reads it.
fn as_core(event: &Value) -> Value {
    if event["apiVersion"] != "events.k8s.io/v1" {
        return event.clone();
    }
    let first = event.get("deprecatedFirstTimestamp").cloned().unwrap_or_else(|| event["eventTime"].clone());
    let last = event["series"].get("lastObservedTime").cloned().unwrap_or_else(|| event["eventTime"].clone());
    json!({
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": event["metadata"],
        "involvedObject": event["regarding"],
        "related": event["related"],
        "reason": event["reason"],
        "message": event["note"],
        "type": event["type"],
        "action": event["action"],
        "eventTime": event["eventTime"],
        "firstTimestamp": first,
        "lastTimestamp": last,
        "count": event["series"].get("count").cloned().unwrap_or(json!(1)),
        "source": {"component": event["reportingController"]},
        "reportingComponent": event["reportingController"],
        "reportingInstance": event["reportingInstance"],
    })
}

/// `involvedObject.name=x,involvedObject.uid=y,...`: every dotted path must equal.
fn field_matches(selector: &str, event: &Value) -> bool {
    selector.split(',').filter(|p| !p.is_empty()).all(|pair| {
        let (path, wanted, equal) = match pair.split_once("!=") {
            Some((p, v)) => (p, v, false),
            None => match pair.split_once("==").or_else(|| pair.split_once('=')) {
                Some((p, v)) => (p, v, true),
                None => return true,
            },
        };
        let found = path.split('.').try_fold(event, |v, key| v.get(key));
        let text = match found {
            Some(Value::String(s)) => s.clone(),
            Some(Value::Null) | None => String::new(),
            Some(other) => other.to_string(),
        };
        (text == wanted) == equal
    })
}

impl EventLog {
    /// `namespace` None: every namespace; `name` Some: one event.
    pub fn handle(
        &self,
        method: &Method,
        namespace: Option<&str>,
        name: Option<&str>,
        query: &Query,
        body: &Bytes,
    ) -> Result<Response, ApiError> {
        let mut events = self.events.lock().unwrap_or_else(|p| p.into_inner());
        let position = |events: &VecDeque<(String, String, Value)>, ns: &str, name: &str| {
            events.iter().position(|(n, m, _)| n == ns && m == name)
        };
        match (method.clone(), namespace, name) {
            (Method::GET, _, None) => {
                let selector = query.get("fieldSelector").unwrap_or("");
                let items: Vec<Value> = events
                    .iter()
                    .filter(|(ns, _, _)| namespace.is_none_or(|n| n == ns))
                    .map(|(_, _, e)| as_core(e))
                    .filter(|e| field_matches(selector, e))
                    .collect();
                Ok(json_response(
                    200,
                    &json!({"apiVersion": "v1", "kind": "EventList", "metadata": {"resourceVersion": "0"}, "items": items}),
                ))
            }
            (Method::GET, Some(ns), Some(name)) => match position(&events, ns, name) {
                Some(i) => Ok(json_response(200, &events[i].2)),
                None => Err(ApiError::not_found("Event.events.k8s.io", name)),
            },
            (Method::POST, Some(ns), None) => {
                let mut event: Value = serde_json::from_slice(body)
                    .map_err(|e| ApiError::bad_request(format!("the event is not valid JSON: {e}")))?;
                if !event.is_object() {
                    return Err(ApiError::bad_request("the event is not a JSON object"));
                }
                if !event["metadata"].is_object() {
                    event["metadata"] = json!({});
                }
                let name = match event["metadata"]["name"].as_str() {
                    Some(n) if !n.is_empty() => n.to_string(),
                    _ => format!(
                        "{}.{}",
                        event["metadata"]["generateName"].as_str().unwrap_or("event"),
                        &uuid::Uuid::new_v4().simple().to_string()[..16]
                    ),
                };
                event["metadata"]["name"] = json!(name);
                event["metadata"]["namespace"] = json!(ns);
                event["metadata"]["uid"] = json!(uuid::Uuid::new_v4().to_string());
                event["metadata"]["creationTimestamp"] = json!(now_rfc3339());
                if let Some(i) = position(&events, ns, &name) {
                    events.remove(i);
                }
                events.push_back((ns.to_string(), name, event.clone()));
                while events.len() > MAX_EVENTS {
                    events.pop_front();
                }
                Ok(json_response(201, &event))
            }
            (Method::PATCH | Method::PUT, Some(ns), Some(name)) => {
                let i = position(&events, ns, name).ok_or_else(|| ApiError::not_found("Event.events.k8s.io", name))?;
                let patch: Value = serde_json::from_slice(body)
                    .map_err(|e| ApiError::bad_request(format!("the event patch is not valid JSON: {e}")))?;
                if !patch.is_object() {
                    return Err(ApiError::new(422, "Invalid", "an event patch must be a JSON object"));
                }
                let stored = &mut events[i].2;
                let mut updated = stored.clone();
                if *method == Method::PUT {
                    updated = patch;
                    updated["metadata"] = stored["metadata"].clone();
                } else {
                    json_patch::merge(&mut updated, &patch);
                }
                if !updated["metadata"].is_object() {
                    return Err(ApiError::new(422, "Invalid", "the event's metadata must stay an object"));
                }
                *stored = updated;
                Ok(json_response(200, stored))
            }
            _ => Err(ApiError::method_not_allowed(format!("{method} is not supported on events"))),
        }
    }
}
