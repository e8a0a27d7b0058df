//! The registry driven as the original platform's workspace runtimes drive it: their
//! request shapes for register (push and poll), heartbeat (with a wedge and its
//! recovery), update-card, discover, peers and check-access, over real HTTP against
//! the real SQLite store (a temp dir per test). docs/registry-protocol.md lists every
//! endpoint and field and what the operator does with it.
//!
//! What the status makes of a heartbeat (AgentHealthy, phase Degraded) is a pure
//! function, tested in src/status/workspace.rs and src/rules/agent_health.rs; here we
//! check that what the runtime sends is kept and queues the reconcile that shows it.

mod support;

use std::sync::Arc;

use chrono::Utc;
use serde_json::{Value, json};
use tokio::sync::{mpsc, watch};

use molecule::api::effective::{Defaults, resolve};
use molecule::api::{ObjectKey, SourceRef, WorkspaceSpec};
use molecule::metrics::Metrics;
use molecule::model::{IssuedToken, WorkspaceRecord};
use molecule::registry::{self, AppState};
use molecule::source::desired::{DesiredSet, DesiredWorkspace};
use molecule::store::DynStore;
use molecule::trigger::{Request, Trigger};
use support::registry::*;

/// The org of these tests, in namespace `default`:
/// ```text
/// pm ─┬─ dev          cto ── ops
///     └─ qa
/// ```
fn org() -> DesiredSet {
    let ws = |name: &str, parent: Option<&str>| DesiredWorkspace {
        key: ObjectKey::new("default", name),
        generation: 1,
        spec: resolve(
            &WorkspaceSpec { parent: parent.map(str::to_string), ..Default::default() },
            &Defaults::default(),
        ),
        source: SourceRef { kind: "dir".into(), reference: format!("org/{name}.yaml@1") }.into(),
        conflict: None,
        owner_team: None,
        deletion_refused: None,
    };
    let all = [ws("pm", None), ws("dev", Some("pm")), ws("qa", Some("pm")), ws("cto", None), ws("ops", Some("cto"))];
    desired_set(all)
}

struct Registry {
    url: String,
    store: DynStore,
    triggers: mpsc::UnboundedReceiver<Request>,
    _desired: watch::Sender<Arc<DesiredSet>>,
    _dir: tempfile::TempDir,
    http: reqwest::Client,
    _shutdown: tokio::sync::oneshot::Sender<()>,
}

/// A workspace as its runtime sees itself: its id and its token.
struct Agent {
    id: String,
    token: String,
}

impl Registry {
    async fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let store = molecule::store::open(&dir.path().join("state.db").display().to_string()).await.unwrap();
        let (trigger, triggers) = Trigger::new();
        let (desired_tx, desired_rx) = watch::channel(Arc::new(org()));
        let admin = registry::load_or_create_admin_token(dir.path()).unwrap();
        let state = AppState::new(store.clone(), trigger, desired_rx, admin, Arc::new(Metrics::new()));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = registry::address_url(listener.local_addr().unwrap());
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(registry::serve(listener, registry::router(state), async move {
            let _ = rx.await;
        }));
        let http = reqwest::Client::builder().no_proxy().build().unwrap();
        Self { url, store, triggers, _desired: desired_tx, _dir: dir, http, _shutdown: tx }
    }

    /// The workspace `name` as the operator provisions it: a record, incarnation 1 and a
    /// live token (what the runtime finds in /configs/.auth_token).
    async fn agent(&self, name: &str) -> Agent {
        let now = Utc::now();
        let rec: WorkspaceRecord = self.store.ensure_workspace(&format!("default/{name}"), now).await.unwrap();
        let inc = self.store.bump_incarnation(&rec.uid).await.unwrap();
        let tok: IssuedToken = self.store.issue_token(&rec.uid, inc, now).await.unwrap();
        Agent { id: rec.uid, token: tok.plaintext }
    }

    async fn send(
        &self,
        method: reqwest::Method,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
    ) -> (u16, Value) {
        let mut req = self.http.request(method, format!("{}{path}", self.url));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.unwrap();
        let code = resp.status().as_u16();
        (code, resp.json().await.unwrap_or(Value::Null))
    }

    async fn post(&self, path: &str, agent: &Agent, body: Value) -> (u16, Value) {
        self.send(reqwest::Method::POST, path, Some(&agent.token), Some(body)).await
    }

    async fn get(&self, path: &str, agent: &Agent) -> (u16, Value) {
        self.send(reqwest::Method::GET, path, Some(&agent.token), None).await
    }

    async fn report(&self, agent: &Agent) -> molecule::model::AgentReport {
        self.store.agent_report(&agent.id).await.unwrap().expect("a stored agent report")
    }

    fn queued(&mut self) -> Vec<(String, &'static str)> {
        let mut out = Vec::new();
        while let Ok(Request::Reconcile { key, why, .. }) = self.triggers.try_recv() {
            out.push((key, why.as_str()));
        }
        out
    }
}

fn card(name: &str) -> Value {
    json!({"name": name, "description": "reviews pull requests", "skills": [{"id": "review", "name": "Review"}]})
}

// ---------------------------------------------------------------------------
// register

#[tokio::test]
async fn register_in_push_mode_keeps_url_and_card() {
    let mut r = Registry::start().await;
    let dev = r.agent("dev").await;
    r.queued();
    let body =
        json!({"id": dev.id, "url": "http://localhost:8000", "agent_card": card("dev"), "delivery_mode": "push"});
    let (code, answer) = r.post("/registry/register", &dev, body).await;
    assert_eq!(code, 200, "{answer}");
    assert_eq!((answer["status"].as_str(), answer["delivery_mode"].as_str()), (Some("registered"), Some("push")));
    let report = r.report(&dev).await;
    assert_eq!(report.url.as_deref(), Some("http://localhost:8000"));
    assert_eq!(report.agent_card, Some(card("dev")));
    assert_eq!(r.queued(), vec![("default/dev".to_string(), "registry-register")]);
    // The original runtimes' heartbeat names the workspace by `workspace_id`; register
    // takes it too.
    let body = json!({"workspace_id": dev.id, "url": "http://93.184.216.34:8000", "agent_card": card("dev")});
    let (code, answer) = r.post("/registry/register", &dev, body).await;
    assert_eq!((code, answer["delivery_mode"].as_str()), (200, Some("push")), "{answer}");
    assert_eq!(r.report(&dev).await.url.as_deref(), Some("http://93.184.216.34:8000"));
}

#[tokio::test]
async fn register_in_poll_mode_needs_no_url_and_keeps_the_mode() {
    let r = Registry::start().await;
    let qa = r.agent("qa").await;
    let (code, answer) = r
        .post("/registry/register", &qa, json!({"id": qa.id, "agent_card": card("qa"), "delivery_mode": "poll"}))
        .await;
    assert_eq!((code, answer["delivery_mode"].as_str()), (200, Some("poll")), "{answer}");
    // The stored mode holds for a register that names none.
    let (code, answer) = r.post("/registry/register", &qa, json!({"id": qa.id, "agent_card": card("qa")})).await;
    assert_eq!((code, answer["delivery_mode"].as_str()), (200, Some("poll")), "{answer}");
    // A URL in poll mode is kept, never called, so not checked.
    let body = json!({"id": qa.id, "url": "http://169.254.169.254/", "agent_card": {}, "delivery_mode": "poll"});
    assert_eq!(r.post("/registry/register", &qa, body).await.0, 200);
}

#[tokio::test]
async fn an_unknown_delivery_mode_is_400_and_a_register_without_a_token_401() {
    let r = Registry::start().await;
    let dev = r.agent("dev").await;
    let body = json!({"id": dev.id, "url": "http://localhost:1", "agent_card": {}, "delivery_mode": "webhook"});
    let (code, answer) = r.send(reqwest::Method::POST, "/registry/register", None, Some(body)).await;
    assert_eq!(code, 400, "checked before the token, as the original does");
    assert!(answer["error"].as_str().unwrap().contains("delivery_mode must be \"push\" or \"poll\""), "{answer}");
    // Tokens stay operator-injected: no token is minted on a first register.
    let body = json!({"id": dev.id, "url": "http://localhost:1", "agent_card": {}});
    let (code, answer) = r.send(reqwest::Method::POST, "/registry/register", None, Some(body)).await;
    assert_eq!(code, 401);
    assert!(answer.get("auth_token").is_none());
    assert!(r.store.agent_report(&dev.id).await.unwrap().is_none(), "nothing stored");
}

#[tokio::test]
async fn push_urls_the_platform_must_not_call_are_400() {
    let r = Registry::start().await;
    let dev = r.agent("dev").await;
    let hostname = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap().trim().to_string();
    let refused = [
        ("http://127.0.0.1:8000", "loopback"),
        ("http://[::1]:8000", "loopback"),
        ("http://169.254.169.254/latest/meta-data", "link-local"),
        ("http://10.0.0.5:8000", "private"),
        ("http://192.168.1.20:8000", "private"),
        ("http://100.64.0.1:8000", "carrier-grade NAT"),
        ("http://192.0.2.10:8000", "TEST-NET"),
        ("http://224.0.0.1:8000", "multicast"),
        ("http://[fc00::1]:8000", "fc00::/8"),
        ("http://[2001:db8::1]:8000", "2001:db8"),
        ("ftp://localhost/agent", "only http and https"),
        ("http://no-such-host.invalid:8000", "does not resolve"),
    ];
    for (url, why) in refused {
        let body = json!({"id": dev.id, "url": url, "agent_card": {}, "delivery_mode": "push"});
        let (code, answer) = r.post("/registry/register", &dev, body).await;
        assert_eq!(code, 400, "{url}: {answer}");
        let message = answer["error"].as_str().unwrap();
        assert!(message.contains(why), "{url}: {message}");
    }
    // A name is resolved and every address checked: this machine's name resolves to a
    // loopback or private address here.
    let url = format!("http://{hostname}:8000");
    let body = json!({"id": dev.id, "url": url, "agent_card": {}, "delivery_mode": "push"});
    let (code, answer) = r.post("/registry/register", &dev, body).await;
    assert_eq!(code, 400, "{url}: {answer}");
    // Push without a URL.
    let (code, answer) =
        r.post("/registry/register", &dev, json!({"id": dev.id, "agent_card": {}, "delivery_mode": "push"})).await;
    assert_eq!(code, 400);
    assert!(answer["error"].as_str().unwrap().contains("url is required"), "{answer}");
    assert!(r.store.agent_report(&dev.id).await.unwrap().is_none(), "no refused register was stored");
}

// ---------------------------------------------------------------------------
// heartbeat

#[tokio::test]
async fn heartbeat_keeps_every_field_and_a_wedge_and_recovery_queue_the_status() {
    let mut r = Registry::start().await;
    let dev = r.agent("dev").await;
    let beat = |rate: f64, state: &str, task: &str| {
        json!({
            "workspace_id": dev.id, "error_rate": rate, "sample_error": "model timed out", "active_tasks": 1,
            "uptime_seconds": 3600, "current_task": task, "monthly_spend": 4200, "runtime_state": state,
            "runtime_metadata": {"capabilities": {"heartbeat": true, "status_mgmt": false}, "idle_timeout_seconds": 900},
            "a_field_from_a_newer_runtime": {"x": 1}
        })
    };
    // Its status already shows it online (else every heartbeat nudges a reconcile).
    r.store.save_status(&dev.id, &online_status()).await.unwrap();
    r.queued();
    let (code, answer) = r.post("/registry/heartbeat", &dev, beat(0.0, "", "triage #42")).await;
    assert_eq!((code, answer["status"].as_str()), (200, Some("ok")), "{answer}");
    let report = r.report(&dev).await;
    assert_eq!(report.error_rate, Some(0.0));
    assert_eq!(report.sample_error.as_deref(), Some("model timed out"));
    assert_eq!((report.active_tasks, report.uptime_seconds, report.monthly_spend), (Some(1), Some(3600), Some(4200)));
    assert_eq!(report.current_task.as_deref(), Some("triage #42"));
    assert_eq!(report.runtime_metadata.as_ref().unwrap()["idle_timeout_seconds"], 900);
    assert_eq!(r.queued(), vec![("default/dev".to_string(), "registry-heartbeat")]);

    // The same report again changes nothing shown: no reconcile is queued.
    assert_eq!(r.post("/registry/heartbeat", &dev, beat(0.0, "", "triage #42")).await.0, 200);
    assert!(r.queued().is_empty());

    // Wedged: kept with its start, and the reconcile that shows Degraded is queued.
    assert_eq!(r.post("/registry/heartbeat", &dev, beat(0.0, "wedged", "triage #42")).await.0, 200);
    let wedged = r.report(&dev).await;
    assert!(wedged.wedged() && wedged.wedged_since.is_some());
    assert_eq!(r.queued(), vec![("default/dev".to_string(), "registry-heartbeat")]);

    // Recovery.
    assert_eq!(r.post("/registry/heartbeat", &dev, beat(0.02, "", "triage #43")).await.0, 200);
    let back = r.report(&dev).await;
    assert!(!back.wedged() && back.wedged_since.is_none());
    assert_eq!(back.current_task.as_deref(), Some("triage #43"));
    assert_eq!(r.queued(), vec![("default/dev".to_string(), "registry-heartbeat")]);

    // Ill-typed fields never fail a heartbeat.
    let odd = json!({"workspace_id": dev.id, "error_rate": "n/a", "active_tasks": [], "runtime_metadata": 7});
    assert_eq!(r.post("/registry/heartbeat", &dev, odd).await.0, 200);
    assert_eq!(r.report(&dev).await.error_rate, Some(0.02));
}

// ---------------------------------------------------------------------------
// update-card, discover, peers, check-access

#[tokio::test]
async fn update_card_replaces_the_card_a_sibling_discovers() {
    let r = Registry::start().await;
    let (dev, qa) = (r.agent("dev").await, r.agent("qa").await);
    let body =
        json!({"id": qa.id, "url": "http://localhost:9001", "agent_card": card("qa v1"), "delivery_mode": "push"});
    assert_eq!(r.post("/registry/register", &qa, body).await.0, 200);
    let (code, answer) =
        r.post("/registry/update-card", &qa, json!({"workspace_id": qa.id, "agent_card": card("qa v2")})).await;
    assert_eq!((code, answer["status"].as_str()), (200, Some("updated")), "{answer}");
    let (code, found) = r.get(&format!("/registry/discover/{}", qa.id), &dev).await;
    assert_eq!(code, 200, "{found}");
    assert_eq!(found["agent_card"], card("qa v2"));
    assert_eq!((found["url"].as_str(), found["name"].as_str()), (Some("http://localhost:9001"), Some("qa")));
    // Another workspace's card cannot be replaced with one's own token.
    let (code, _) = r.post("/registry/update-card", &dev, json!({"workspace_id": qa.id, "agent_card": {}})).await;
    assert_eq!(code, 403);
    let (code, _) = r.post("/registry/update-card", &qa, json!({"workspace_id": qa.id})).await;
    assert_eq!(code, 400, "agent_card is required");
}

#[tokio::test]
async fn discover_as_sibling_as_parent_and_as_stranger() {
    let r = Registry::start().await;
    let (pm, dev, qa, ops) = (r.agent("pm").await, r.agent("dev").await, r.agent("qa").await, r.agent("ops").await);
    let cto = r.agent("cto").await;
    let discover = |who: &Agent, target: &Agent| {
        let path = format!("/registry/discover/{}", target.id);
        let token = who.token.clone();
        let r = &r;
        async move { r.send(reqwest::Method::GET, &path, Some(&token), None).await }
    };
    assert_eq!(discover(&dev, &qa).await.0, 200, "siblings");
    assert_eq!(discover(&pm, &dev).await.0, 200, "parent to child");
    assert_eq!(discover(&dev, &pm).await.0, 200, "child to parent");
    assert_eq!(discover(&pm, &cto).await.0, 200, "both roots");
    assert_eq!(discover(&cto, &dev).await.0, 403, "cto is no ancestor of dev's parent");
    let (code, answer) = discover(&dev, &ops).await;
    assert_eq!(code, 403, "strangers");
    assert!(answer["error"].as_str().unwrap().contains("may not reach default/ops"), "{answer}");
    // PARENT_ID holds the parent's name: discovery takes it.
    let (code, parent) = r.get("/registry/discover/pm", &dev).await;
    assert_eq!((code, parent["id"].as_str()), (200, Some(pm.id.as_str())), "{parent}");
    // No token, and an unknown id.
    let path = format!("/registry/discover/{}", qa.id);
    assert_eq!(r.send(reqwest::Method::GET, &path, None, None).await.0, 401);
    assert_eq!(r.get(&format!("/registry/discover/{}", uuid::Uuid::new_v4()), &dev).await.0, 404);
}

#[tokio::test]
async fn peers_are_parent_siblings_and_children_and_only_ones_own() {
    let r = Registry::start().await;
    let (pm, dev, _qa, _ops, _cto) =
        (r.agent("pm").await, r.agent("dev").await, r.agent("qa").await, r.agent("ops").await, r.agent("cto").await);
    let names = |v: &Value| {
        let mut n: Vec<String> =
            v.as_array().unwrap().iter().map(|p| p["name"].as_str().unwrap().to_string()).collect();
        n.sort();
        n
    };
    let (code, peers) = r.get(&format!("/registry/{}/peers", dev.id), &dev).await;
    assert_eq!(code, 200, "{peers}");
    assert_eq!(names(&peers), ["pm", "qa"], "as a child: its parent and sibling");
    let (code, peers) = r.get(&format!("/registry/{}/peers", pm.id), &pm).await;
    assert_eq!(code, 200, "{peers}");
    assert_eq!(names(&peers), ["cto", "dev", "qa"], "as a parent: its children and the other root");
    // Someone else's peers, with one's own token: 403.
    assert_eq!(r.get(&format!("/registry/{}/peers", pm.id), &dev).await.0, 403);
    // An X-Workspace-ID naming another workspace than the token's: 403.
    let resp = r
        .http
        .get(format!("{}/registry/{}/peers", r.url, dev.id))
        .bearer_auth(&dev.token)
        .header("X-Workspace-ID", pm.id.as_str())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 403);
}

#[tokio::test]
async fn check_access_answers_the_hierarchy_rule_for_ones_own_workspace() {
    let r = Registry::start().await;
    let (dev, qa, ops) = (r.agent("dev").await, r.agent("qa").await, r.agent("ops").await);
    let check = |caller: &Agent, target: &Agent| json!({"caller_id": caller.id, "target_id": target.id});
    let (code, answer) = r.post("/registry/check-access", &dev, check(&dev, &qa)).await;
    assert_eq!((code, answer["allowed"].as_bool()), (200, Some(true)), "{answer}");
    let (code, answer) = r.post("/registry/check-access", &dev, check(&dev, &ops)).await;
    assert_eq!((code, answer["allowed"].as_bool()), (200, Some(false)), "{answer}");
    assert_eq!(r.post("/registry/check-access", &dev, check(&qa, &dev)).await.0, 403, "asking as someone else");
    assert_eq!(r.post("/registry/check-access", &dev, json!({"caller_id": dev.id})).await.0, 400);
}
