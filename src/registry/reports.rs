//! What agents tell the registry about themselves, in the original platform's request
//! shapes: reading the bodies of register, heartbeat and update-card, and keeping
//! each workspace's [`AgentReport`] (in the store, with a copy in memory so a heartbeat
//! that changes nothing a user sees costs no write).
//!
//! The checks are the rules' (rules::agent_url: which push URLs may be called); this
//! module resolves names and merges fields.

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::http::StatusCode;
use axum::response::Response;
use chrono::{DateTime, Utc};
use serde_json::{Map, Value};

use super::{AppState, BODY_LIMIT, error};
use crate::model::{AgentReport, DeliveryMode, TokenOwner};
use crate::rules::agent_url;
use crate::store::StoreResult;

/// A report whose shown fields did not change is still written this often, so the
/// stored uptime and spend are never older than this.
const REFRESH: Duration = Duration::from_secs(60);
/// How long resolving a push URL's host may take.
const RESOLVE_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest text kept of `current_task` and `sample_error` (characters).
const TEXT_LIMIT: usize = 1024;
/// The original's clamp of `monthly_spend` (cents).
const SPEND_LIMIT: i64 = 1_000_000_000_000;
/// The heartbeat fields of the original runtimes.
const HEARTBEAT_FIELDS: [&str; 8] = [
    "error_rate",
    "sample_error",
    "active_tasks",
    "uptime_seconds",
    "current_task",
    "monthly_spend",
    "runtime_state",
    "runtime_metadata",
];

/// A registry request body: the workspace it names and every field it sent.
pub(crate) struct Body {
    pub workspace_id: String,
    pub fields: Map<String, Value>,
}

impl Body {
    fn text(&self, name: &str) -> Option<&str> {
        self.fields.get(name).and_then(Value::as_str).filter(|s| !s.is_empty())
    }

    pub fn value(&self, name: &str) -> Option<&Value> {
        self.fields.get(name).filter(|v| !v.is_null())
    }
}

/// Reads a body: a JSON object naming its workspace by `workspace_id` (or `id`, as the
/// original's register does); on register, a `delivery_mode` other than `push` or
/// `poll` is refused here, before the token is looked at, as the original does.
pub(crate) fn read(body: Result<Bytes, BytesRejection>, register: bool) -> Result<Body, (StatusCode, String)> {
    let bytes = body.map_err(|rejection| {
        let code = rejection.status();
        if code == StatusCode::PAYLOAD_TOO_LARGE {
            (code, format!("the request body is larger than {} KiB", BODY_LIMIT / 1024))
        } else {
            (code, format!("cannot read the request body: {}", rejection.body_text()))
        }
    })?;
    let shape = "the body must be a JSON object like {\"workspace_id\": \"<uuid>\"} (register also takes \"id\")";
    let fields: Map<String, Value> =
        serde_json::from_slice(&bytes).map_err(|e| (StatusCode::BAD_REQUEST, format!("{shape}: {e}")))?;
    let id = ["workspace_id", "id"].iter().find_map(|k| fields.get(*k).and_then(Value::as_str));
    let Some(id) = id else {
        return Err((StatusCode::BAD_REQUEST, format!("{shape}: missing field `workspace_id`")));
    };
    if uuid::Uuid::parse_str(id).is_err() {
        let message = "workspace_id must be the workspace's UUID (WORKSPACE_ID or MOLECULE_WORKSPACE_ID)";
        return Err((StatusCode::BAD_REQUEST, message.into()));
    }
    let body = Body { workspace_id: id.to_string(), fields };
    if register {
        delivery_mode(&body).map_err(|m| (StatusCode::BAD_REQUEST, m))?;
    }
    Ok(body)
}

/// The delivery mode the body asks for, if any; an unknown one is an error.
fn delivery_mode(body: &Body) -> Result<Option<DeliveryMode>, String> {
    match body.value("delivery_mode") {
        None => Ok(None),
        Some(Value::String(s)) if s.is_empty() => Ok(None),
        Some(v) => v
            .as_str()
            .and_then(DeliveryMode::parse)
            .map(Some)
            .ok_or_else(|| format!("delivery_mode must be \"push\" or \"poll\", not {v}")),
    }
}

/// The workspaces' reports as last written, and when (see [`REFRESH`]).
#[derive(Default)]
pub(crate) struct Cache(Mutex<HashMap<String, (AgentReport, Instant)>>);

impl Cache {
    fn get(&self, uid: &str) -> Option<(AgentReport, Instant)> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner).get(uid).cloned()
    }

    fn put(&self, uid: &str, report: AgentReport, written: Instant) {
        self.0.lock().unwrap_or_else(PoisonError::into_inner).insert(uid.to_string(), (report, written));
    }
}

/// The workspace's last report and when this process last wrote it (None: not by this
/// process, or long ago).
async fn last(state: &AppState, uid: &str) -> StoreResult<(Option<AgentReport>, Option<Instant>)> {
    if let Some((report, written)) = state.agent_reports.get(uid) {
        return Ok((Some(report), Some(written)));
    }
    Ok((state.store.agent_report(uid).await?, None))
}

/// Writes the report (store, then the in-memory copy).
pub(crate) async fn save(state: &AppState, uid: &str, report: AgentReport) -> StoreResult<()> {
    state.store.save_agent_report(uid, &report).await?;
    state.agent_reports.put(uid, report, Instant::now());
    Ok(())
}

/// The report a register makes: its delivery mode (the body's, else the one stored,
/// else push when it names a URL and poll when it does not), its URL (required and
/// checked in push mode) and card. The heartbeat fields of the same incarnation stay.
pub(crate) async fn registration(
    state: &AppState,
    owner: &TokenOwner,
    body: &Body,
    now: DateTime<Utc>,
) -> Result<AgentReport, Response> {
    let (previous, _) = last(state, &owner.workspace_uid).await.map_err(super::agent::store_unavailable)?;
    let url = body.text("url");
    let asked = delivery_mode(body).map_err(|m| error(StatusCode::BAD_REQUEST, m))?;
    let mode = asked.or_else(|| previous.as_ref().and_then(|p| p.delivery_mode)).unwrap_or(match url {
        Some(_) => DeliveryMode::Push,
        None => DeliveryMode::Poll,
    });
    if mode == DeliveryMode::Push {
        let Some(url) = url else {
            return Err(error(StatusCode::BAD_REQUEST, "url is required when delivery_mode is push"));
        };
        check_push_url(state, url).await.map_err(|m| error(StatusCode::BAD_REQUEST, m))?;
    }
    let mut report = match previous {
        Some(p) if p.incarnation == owner.current_incarnation => p,
        Some(p) => AgentReport { agent_card: p.agent_card, ..Default::default() },
        None => AgentReport::default(),
    };
    report.incarnation = owner.current_incarnation;
    report.url = url.map(str::to_string);
    if let Some(card) = body.value("agent_card") {
        report.agent_card = Some(card.clone());
    }
    report.delivery_mode = Some(mode);
    report.registered_at = Some(now);
    Ok(report)
}

/// Replaces the agent's card (the original's update-card; the rest of the report stays).
pub(crate) async fn update_card(state: &AppState, owner: &TokenOwner, card: Value) -> StoreResult<()> {
    let (previous, _) = last(state, &owner.workspace_uid).await?;
    let mut report =
        previous.unwrap_or_else(|| AgentReport { incarnation: owner.current_incarnation, ..Default::default() });
    report.agent_card = Some(card);
    save(state, &owner.workspace_uid, report).await
}

/// The SSRF check of a push URL: parsed, its host resolved (unless an address or
/// `localhost`), and every address judged by rules::agent_url.
async fn check_push_url(state: &AppState, url: &str) -> Result<(), String> {
    let host = agent_url::parse(url)?;
    if agent_url::allowed_by_name(&host) {
        return Ok(());
    }
    let addresses = match host {
        agent_url::UrlHost::Ip(ip) => vec![ip],
        agent_url::UrlHost::Name(name) => {
            match tokio::time::timeout(RESOLVE_TIMEOUT, tokio::net::lookup_host((name.as_str(), 0))).await {
                Ok(Ok(found)) => found.map(|a| a.ip()).collect(),
                Ok(Err(e)) => {
                    tracing::debug!(host = %name, error = %e, "registry: a push URL's host does not resolve");
                    Vec::new()
                }
                Err(_) => Vec::new(),
            }
        }
    };
    agent_url::check(url, &addresses, state.private_agent_urls)
}

/// Merges a heartbeat's fields into the workspace's report. Returns whether anything
/// the status shows changed. A heartbeat with none of the original's fields (this
/// operator's own agent) leaves the report alone. Ill-typed fields are ignored, like
/// unknown ones: a heartbeat is never refused for what it reports.
pub(crate) async fn heartbeat(
    state: &AppState,
    owner: &TokenOwner,
    body: &Body,
    now: DateTime<Utc>,
) -> StoreResult<bool> {
    if !HEARTBEAT_FIELDS.iter().any(|f| body.fields.contains_key(*f)) {
        return Ok(false);
    }
    let uid = owner.workspace_uid.as_str();
    let (previous, written) = last(state, uid).await?;
    let mut report = match &previous {
        Some(p) if p.incarnation == owner.current_incarnation => p.clone(),
        // The first beat of a new incarnation that did not register: its card and
        // address carry over, what the old agent reported does not.
        Some(p) => AgentReport {
            url: p.url.clone(),
            agent_card: p.agent_card.clone(),
            delivery_mode: p.delivery_mode,
            ..Default::default()
        },
        None => AgentReport::default(),
    };
    report.incarnation = owner.current_incarnation;
    apply(&mut report, body, now);
    let changed = previous.as_ref().is_none_or(|p| p.shown() != report.shown());
    if changed || written.is_none_or(|w| w.elapsed() >= REFRESH) {
        save(state, uid, report).await?;
    } else if let Some(w) = written {
        state.agent_reports.put(uid, report, w);
    }
    Ok(changed)
}

/// The heartbeat's fields, as the original reads them.
fn apply(report: &mut AgentReport, body: &Body, now: DateTime<Utc>) {
    let f = &body.fields;
    let int = |name: &str| f.get(name).and_then(|v| v.as_i64().or_else(|| v.as_f64().map(|x| x as i64)));
    let text = |name: &str| f.get(name).and_then(Value::as_str).map(|s| s.chars().take(TEXT_LIMIT).collect());
    if let Some(rate) = f.get("error_rate").and_then(Value::as_f64).filter(|r| r.is_finite()) {
        report.error_rate = Some(rate);
    }
    if f.contains_key("sample_error") {
        report.sample_error = text("sample_error");
    }
    if let Some(n) = int("active_tasks") {
        report.active_tasks = Some(n.max(0));
        if n > 0 {
            report.busy_at = Some(now);
        }
    }
    if let Some(n) = int("uptime_seconds") {
        report.uptime_seconds = Some(n.max(0));
    }
    if f.contains_key("current_task") {
        report.current_task = text("current_task");
    }
    // 0 means "no update" in the original.
    if let Some(cents) = int("monthly_spend").filter(|c| *c > 0) {
        report.monthly_spend = Some(cents.min(SPEND_LIMIT));
    }
    if f.contains_key("runtime_state") {
        let was_wedged = report.wedged();
        report.runtime_state = text("runtime_state");
        report.wedged_since = match (report.wedged(), was_wedged) {
            (true, true) => report.wedged_since.or(Some(now)),
            (true, false) => Some(now),
            (false, _) => None,
        };
    }
    if let Some(meta) = f.get("runtime_metadata").filter(|m| m.is_object()) {
        report.runtime_metadata = Some(meta.clone());
    }
    report.reported_at = Some(now);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(json: Value) -> Body {
        let fields = json.as_object().unwrap().clone();
        Body { workspace_id: String::new(), fields }
    }

    #[test]
    fn the_originals_heartbeat_fields_are_kept_and_ill_typed_ones_ignored() {
        let mut r = AgentReport::default();
        let t0 = Utc::now();
        apply(
            &mut r,
            &body(serde_json::json!({
                "error_rate": 0.25, "sample_error": "429 from the model", "active_tasks": 2,
                "uptime_seconds": 120.7, "current_task": "triage #42", "monthly_spend": 1234,
                "runtime_state": "", "runtime_metadata": {"capabilities": {"status_mgmt": true}},
                "something_new": [1, 2]
            })),
            t0,
        );
        assert_eq!(r.error_rate, Some(0.25));
        assert_eq!(r.sample_error.as_deref(), Some("429 from the model"));
        assert_eq!((r.active_tasks, r.uptime_seconds, r.monthly_spend), (Some(2), Some(120), Some(1234)));
        assert_eq!(r.current_task.as_deref(), Some("triage #42"));
        assert!(r.declares("status_mgmt") && !r.wedged() && r.wedged_since.is_none());
        apply(&mut r, &body(serde_json::json!({"error_rate": "high", "monthly_spend": 0, "active_tasks": null})), t0);
        assert_eq!((r.error_rate, r.monthly_spend, r.active_tasks), (Some(0.25), Some(1234), Some(2)));
        apply(&mut r, &body(serde_json::json!({"monthly_spend": 9_000_000_000_000_000i64})), t0);
        assert_eq!(r.monthly_spend, Some(SPEND_LIMIT));
    }

    #[test]
    fn a_wedge_is_dated_from_its_first_report() {
        let mut r = AgentReport::default();
        let (t0, t1) = (Utc::now(), Utc::now() + chrono::Duration::seconds(30));
        apply(&mut r, &body(serde_json::json!({"runtime_state": "wedged"})), t0);
        apply(&mut r, &body(serde_json::json!({"runtime_state": "wedged"})), t1);
        assert_eq!(r.wedged_since, Some(t0));
        apply(&mut r, &body(serde_json::json!({"runtime_state": ""})), t1);
        assert_eq!(r.wedged_since, None);
    }

    #[test]
    fn register_bodies_name_the_workspace_by_id_or_workspace_id() {
        let id = uuid::Uuid::new_v4().to_string();
        let read = |json: String, register| read(Ok(Bytes::from(json)), register);
        assert_eq!(read(format!(r#"{{"id":"{id}"}}"#), true).ok().unwrap().workspace_id, id);
        assert_eq!(read(format!(r#"{{"workspace_id":"{id}"}}"#), true).ok().unwrap().workspace_id, id);
        let (code, m) = read(format!(r#"{{"id":"{id}","delivery_mode":"carrier-pigeon"}}"#), true).err().unwrap();
        assert_eq!(code, StatusCode::BAD_REQUEST);
        assert!(m.contains("delivery_mode must be \"push\" or \"poll\""), "{m}");
        assert!(read(format!(r#"{{"id":"{id}","delivery_mode":"carrier-pigeon"}}"#), false).is_ok());
        assert!(read("{}".into(), true).err().unwrap().1.contains("workspace_id"));
        assert!(read(r#"{"id":"a"}"#.into(), true).err().unwrap().1.contains("UUID"));
    }
}
