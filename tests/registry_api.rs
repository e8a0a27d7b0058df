//! The registry server driven over real HTTP (a listener on 127.0.0.1:0), and the
//! CLI's client functions against it.
//!
//! The store is the real SQLite store, in a temp dir per test.

mod support;

use std::sync::Arc;
use std::sync::atomic::Ordering;

use chrono::{DateTime, Utc};
use serde_json::Value;
use tokio::sync::{mpsc, watch};

use molecule::api::effective::{Defaults, resolve};
use molecule::api::{ConditionStatus, ObjectKey, OperatingMode, Phase, SourceRef, Team, TeamSpec, WorkspaceSpec};
use molecule::cli::{self, ClientArgs, ClientCommand, DescribeArgs, GetArgs, GetKind, OutputFormat, VerbArgs};
use molecule::metrics::Metrics;
use molecule::model::{DecisionRecord, IssuedToken, RevokeReason, WorkspaceRecord};
use molecule::registry::views::{ActionResponse, TeamSummary, WorkspaceDetail, WorkspaceSummary};
use molecule::registry::{self, AppState};
use molecule::source::desired::{DesiredSet, DesiredWorkspace};
use molecule::store::{DynStore, token};
use molecule::trigger::{Request, Trigger};
use support::registry::*;

// ---------------------------------------------------------------------------
// Harness

fn declared(name: &str, spec: WorkspaceSpec) -> DesiredWorkspace {
    DesiredWorkspace {
        key: ObjectKey::new("default", name),
        generation: 1,
        spec: resolve(&spec, &Defaults::default()),
        source: SourceRef { kind: "dir".into(), reference: format!("org/{name}.yaml@1") }.into(),
        conflict: None,
        owner_team: None,
        deletion_refused: None,
    }
}

struct Harness {
    url: String,
    store: DynStore,
    triggers: mpsc::UnboundedReceiver<Request>,
    _desired: watch::Sender<Arc<DesiredSet>>,
    admin_token: String,
    state_dir: tempfile::TempDir,
    ready: Arc<std::sync::atomic::AtomicBool>,
    http: reqwest::Client,
    _shutdown: tokio::sync::oneshot::Sender<()>,
}

impl Harness {
    async fn start(desired: DesiredSet) -> Self {
        let state_dir = tempfile::tempdir().unwrap();
        let store: DynStore =
            molecule::store::open(&state_dir.path().join("state.db").display().to_string()).await.unwrap();
        let (trigger, triggers) = Trigger::new();
        let (desired_tx, desired_rx) = watch::channel(Arc::new(desired));
        let admin_token = registry::load_or_create_admin_token(state_dir.path()).unwrap();
        let state = AppState::new(store.clone(), trigger, desired_rx, admin_token.clone(), Arc::new(Metrics::new()));
        let ready = state.ready.clone();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = registry::write_address(state_dir.path(), listener.local_addr().unwrap()).unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(registry::serve(listener, registry::router(state), async move {
            let _ = rx.await;
        }));
        Self {
            url,
            store,
            triggers,
            _desired: desired_tx,
            admin_token,
            state_dir,
            ready,
            http: reqwest::Client::builder().no_proxy().build().unwrap(),
            _shutdown: tx,
        }
    }

    /// A workspace with a record, incarnation 1 and one live token of it.
    async fn workspace_with_token(&self, name: &str) -> (WorkspaceRecord, IssuedToken) {
        let now = Utc::now();
        let rec = self.store.ensure_workspace(&format!("default/{name}"), now).await.unwrap();
        let inc = self.store.bump_incarnation(&rec.uid).await.unwrap();
        let tok = self.store.issue_token(&rec.uid, inc, now).await.unwrap();
        (self.store.workspace_by_uid(&rec.uid).await.unwrap().unwrap(), tok)
    }

    async fn agent(&self, path: &str, auth: Option<&str>, body: &str) -> (u16, Value) {
        let mut req = self.http.post(format!("{}{path}", self.url)).body(body.to_string());
        if let Some(a) = auth {
            req = req.header("Authorization", a);
        }
        let resp = req.send().await.unwrap();
        let code = resp.status().as_u16();
        (code, resp.json().await.unwrap_or(Value::Null))
    }

    async fn heartbeat(&self, token: Option<&str>, uid: &str) -> (u16, Value) {
        let auth = token.map(|t| format!("Bearer {t}"));
        self.agent("/registry/heartbeat", auth.as_deref(), &format!("{{\"workspace_id\":\"{uid}\"}}")).await
    }

    async fn admin(&self, method: reqwest::Method, path: &str, token: Option<&str>) -> (u16, Value) {
        let mut req = self.http.request(method, format!("{}{path}", self.url));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        let resp = req.send().await.unwrap();
        let code = resp.status().as_u16();
        (code, resp.json().await.unwrap_or(Value::Null))
    }

    async fn get(&self, path: &str) -> (u16, Value) {
        self.admin(reqwest::Method::GET, path, Some(&self.admin_token.clone())).await
    }

    async fn post(&self, path: &str) -> (u16, Value) {
        self.admin(reqwest::Method::POST, path, Some(&self.admin_token.clone())).await
    }

    fn drain_triggers(&mut self) -> Vec<(String, &'static str)> {
        let mut out = Vec::new();
        while let Ok(Request::Reconcile { key, why, .. }) = self.triggers.try_recv() {
            let t = (key, why.as_str());
            out.push(t);
        }
        out
    }

    fn client(&self) -> ClientArgs {
        ClientArgs { state: self.state_dir.path().into(), server: None }
    }
}

// ---------------------------------------------------------------------------
// Registry

#[tokio::test]
async fn good_token_is_200_and_touches_token_and_heartbeat() {
    let h = Harness::start(desired_set(vec![declared("a", WorkspaceSpec::default())])).await;
    let (rec, tok) = h.workspace_with_token("a").await;
    assert!(rec.last_heartbeat_at.is_none());
    let (code, body) = h.heartbeat(Some(&tok.plaintext), &rec.uid).await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["status"], "ok");
    assert_eq!(body["workspace_id"], rec.uid.as_str());
    let after = h.store.workspace_by_uid(&rec.uid).await.unwrap().unwrap();
    assert!(after.last_heartbeat_at.is_some());
    let row = &h.store.token_history(&rec.uid, 1).await.unwrap()[0];
    assert!(row.last_used_at.is_some());

    let (code, _) = h
        .agent(
            "/registry/register",
            Some(&format!("Bearer {}", tok.plaintext)),
            &format!("{{\"workspace_id\":\"{}\"}}", rec.uid),
        )
        .await;
    assert_eq!(code, 200);
}

#[tokio::test]
async fn every_401_is_identical_and_reveals_nothing() {
    let h = Harness::start(desired_set(vec![declared("a", WorkspaceSpec::default())])).await;
    let (rec, good) = h.workspace_with_token("a").await;
    let now = Utc::now();

    let revoked = h.store.issue_token(&rec.uid, rec.incarnation, now).await.unwrap();
    h.store.revoke_tokens(&rec.uid, RevokeReason::Rotated, Some(&good.row.id), now).await.unwrap();

    // A live token of incarnation 1, then the workspace moves on to incarnation 2.
    let (rec_b, superseded) = h.workspace_with_token("b").await;
    h.store.bump_incarnation(&rec_b.uid).await.unwrap();

    let unknown = token::generate();
    let body = |uid: &str| format!("{{\"workspace_id\":\"{uid}\"}}");
    let cases: Vec<(&str, Option<String>, String)> = vec![
        ("missing header", None, body(&rec.uid)),
        ("empty bearer", Some("Bearer ".into()), body(&rec.uid)),
        ("malformed", Some("Bearer not-a-token".into()), body(&rec.uid)),
        ("wrong scheme", Some(format!("Basic {}", good.plaintext)), body(&rec.uid)),
        ("unknown", Some(format!("Bearer {unknown}")), body(&rec.uid)),
        ("revoked", Some(format!("Bearer {}", revoked.plaintext)), body(&rec.uid)),
        ("superseded incarnation", Some(format!("Bearer {}", superseded.plaintext)), body(&rec_b.uid)),
    ];
    let mut bodies = Vec::new();
    for (what, auth, b) in &cases {
        let resp = h
            .http
            .post(format!("{}/registry/heartbeat", h.url))
            .body(b.clone())
            .headers(auth.iter().map(|a| (reqwest::header::AUTHORIZATION, a.parse().unwrap())).collect())
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status().as_u16(), 401, "{what}");
        assert_eq!(resp.headers()["www-authenticate"], "Bearer", "{what}");
        bodies.push((what, resp.text().await.unwrap()));
    }
    for (what, b) in &bodies {
        assert_eq!(b, &bodies[0].1, "{what} has a different 401 body");
    }
    assert_eq!(bodies[0].1, r#"{"error":"invalid workspace auth token"}"#);
    // The good token still works.
    assert_eq!(h.heartbeat(Some(&good.plaintext), &rec.uid).await.0, 200);
}

#[tokio::test]
async fn a_401_for_a_known_workspace_queues_its_reconcile() {
    let mut h = Harness::start(desired_set(vec![declared("a", WorkspaceSpec::default())])).await;
    let (rec, _) = h.workspace_with_token("a").await;
    h.drain_triggers();
    assert_eq!(h.heartbeat(Some(&token::generate()), &rec.uid).await.0, 401);
    assert_eq!(h.drain_triggers(), vec![("default/a".to_string(), "registry-401")]);
    assert_eq!(h.heartbeat(None, &rec.uid).await.0, 401);
    assert_eq!(h.drain_triggers(), vec![("default/a".to_string(), "registry-401")]);
    // An id nobody knows queues nothing.
    assert_eq!(h.heartbeat(None, &uuid::Uuid::new_v4().to_string()).await.0, 401);
    assert!(h.drain_triggers().is_empty());
}

#[tokio::test]
async fn another_workspaces_token_is_403() {
    let mut h = Harness::start(desired_set(vec![])).await;
    let (_, tok_a) = h.workspace_with_token("a").await;
    let (rec_b, _) = h.workspace_with_token("b").await;
    h.drain_triggers();
    let (code, body) = h.heartbeat(Some(&tok_a.plaintext), &rec_b.uid).await;
    assert_eq!(code, 403);
    assert_eq!(body["error"], "this token belongs to another workspace");
    assert_eq!(h.drain_triggers(), vec![("default/b".to_string(), "registry-403")]);
    // Nothing was recorded for either.
    assert!(h.store.workspace_by_uid(&rec_b.uid).await.unwrap().unwrap().last_heartbeat_at.is_none());
    assert!(h.store.token_history(&tok_a.row.workspace_uid, 1).await.unwrap()[0].last_used_at.is_none());
}

#[tokio::test]
async fn bad_bodies_are_400_and_large_ones_413() {
    let h = Harness::start(desired_set(vec![])).await;
    let (rec, tok) = h.workspace_with_token("a").await;
    let auth = format!("Bearer {}", tok.plaintext);
    let (code, body) = h.agent("/registry/heartbeat", Some(&auth), "{not json").await;
    assert_eq!(code, 400);
    assert!(body["error"].as_str().unwrap().contains("workspace_id"), "{body}");
    let (code, _) = h.agent("/registry/heartbeat", Some(&auth), "{}").await;
    assert_eq!(code, 400);
    let (code, body) = h.agent("/registry/heartbeat", Some(&auth), r#"{"workspace_id":"a"}"#).await;
    assert_eq!(code, 400);
    assert!(body["error"].as_str().unwrap().contains("UUID"), "{body}");
    let big = format!("{{\"workspace_id\":\"{}\",\"pad\":\"{}\"}}", rec.uid, "x".repeat(20 * 1024));
    let (code, body) = h.agent("/registry/heartbeat", Some(&auth), &big).await;
    assert_eq!(code, 413, "{body}");
    // Extra fields are fine (agents may send more). (A push `url` must be one the
    // operator may call: tests/registry_compat.rs.)
    let extra = format!("{{\"workspace_id\":\"{}\",\"url\":\"http://localhost:8000\",\"x\":1}}", rec.uid);
    assert_eq!(h.agent("/registry/register", Some(&auth), &extra).await.0, 200);
}

#[tokio::test]
async fn heartbeat_nudges_a_reconcile_only_while_status_is_behind() {
    let mut h = Harness::start(desired_set(vec![])).await;
    let (behind, tok_behind) = h.workspace_with_token("behind").await;
    let (online, tok_online) = h.workspace_with_token("online").await;
    h.store.save_status(&online.uid, &online_status()).await.unwrap();
    h.drain_triggers();

    assert_eq!(h.heartbeat(Some(&tok_behind.plaintext), &behind.uid).await.0, 200);
    assert_eq!(h.drain_triggers(), vec![("default/behind".to_string(), "registry-heartbeat")]);
    // Throttled: a second heartbeat right away does not queue again.
    assert_eq!(h.heartbeat(Some(&tok_behind.plaintext), &behind.uid).await.0, 200);
    assert!(h.drain_triggers().is_empty());

    assert_eq!(h.heartbeat(Some(&tok_online.plaintext), &online.uid).await.0, 200);
    assert!(h.drain_triggers().is_empty());
}

// ---------------------------------------------------------------------------
// Admin API

#[tokio::test]
async fn admin_routes_require_the_admin_token() {
    let h = Harness::start(desired_set(vec![declared("a", WorkspaceSpec::default())])).await;
    let (_, tok) = h.workspace_with_token("a").await;
    for (method, path) in [
        (reqwest::Method::GET, "/api/v1/workspaces"),
        (reqwest::Method::GET, "/api/v1/workspaces/a"),
        (reqwest::Method::GET, "/api/v1/teams"),
        (reqwest::Method::POST, "/api/v1/workspaces/a/restart"),
        (reqwest::Method::POST, "/api/v1/workspaces/a/pause"),
        (reqwest::Method::POST, "/api/v1/workspaces/a/resume"),
    ] {
        assert_eq!(h.admin(method.clone(), path, None).await.0, 401, "{method} {path} without a token");
        assert_eq!(h.admin(method.clone(), path, Some("wrong")).await.0, 401, "{method} {path} wrong token");
        // A workspace token is not an admin token.
        assert_eq!(h.admin(method.clone(), path, Some(&tok.plaintext)).await.0, 401, "{method} {path} ws token");
    }
    assert_eq!(h.get("/api/v1/workspaces").await.0, 200);
    let rec = h.store.workspace("default/a").await.unwrap().unwrap();
    assert!(rec.restart_requested_at.is_none() && rec.mode_override.is_none(), "refused calls changed nothing");
}

#[tokio::test]
async fn workspace_list_merges_declared_and_recorded() {
    let mut invalid = declared("c-invalid", WorkspaceSpec::default());
    invalid.spec = resolve(&WorkspaceSpec { tier: Some(9), ..Default::default() }, &Defaults::default());
    let h = Harness::start(desired_set(vec![
        declared("a-running", WorkspaceSpec::default()),
        declared("b-pending", WorkspaceSpec { team: Some("eng".into()), ..Default::default() }),
        invalid,
    ]))
    .await;
    let (rec, tok) = h.workspace_with_token("a-running").await;
    h.store.save_status(&rec.uid, &online_status()).await.unwrap();
    assert_eq!(h.heartbeat(Some(&tok.plaintext), &rec.uid).await.0, 200);

    let (code, raw) = h.get("/api/v1/workspaces").await;
    assert_eq!(code, 200);
    for w in raw.as_array().unwrap() {
        for k in ["name", "uid", "phase", "incarnation", "container", "token", "lastHeartbeatAt", "conditions"] {
            assert!(w.get(k).is_some(), "missing {k} in {w}");
        }
    }
    let list: Vec<WorkspaceSummary> = serde_json::from_value(raw.clone()).unwrap();
    let names: Vec<&str> = list.iter().map(|w| w.name.as_str()).collect();
    assert_eq!(names, ["a-running", "b-pending", "c-invalid"]);
    assert_eq!(list[0].phase, Phase::Running);
    assert_eq!(list[0].uid.as_deref(), Some(rec.uid.as_str()));
    assert!(list[0].last_heartbeat_at.is_some(), "live heartbeat from the record");
    // lastHeartbeatAt is RFC 3339.
    let hb = raw[0]["lastHeartbeatAt"].as_str().unwrap();
    assert!(DateTime::parse_from_rfc3339(hb).is_ok(), "{hb}");
    assert_eq!((list[1].phase, list[1].uid.as_deref()), (Phase::Pending, None));
    assert_eq!(list[1].team.as_deref(), Some("eng"));
    assert_eq!(list[2].phase, Phase::Failed);
    let c = list[2].conditions.iter().find(|c| c.type_ == "InvalidSpec").expect("InvalidSpec");
    assert_eq!(c.status, ConditionStatus::True);
    assert!(c.message.contains("tier: 9"), "{}", c.message);

    let (_, ns) = h.get("/api/v1/workspaces?namespace=other").await;
    assert_eq!(ns, Value::Array(vec![]));
}

#[tokio::test]
async fn describe_shows_spec_tokens_and_decisions_and_404s_unknown_names() {
    let h =
        Harness::start(desired_set(vec![declared("a", WorkspaceSpec { tier: Some(3), ..Default::default() })])).await;
    let (rec, tok) = h.workspace_with_token("a").await;
    let d = DecisionRecord {
        at: chrono::SubsecRound::trunc_subsecs(Utc::now(), 6), // stores keep microseconds
        rule: "provision".into(),
        cause: "declared Running, no container".into(),
        actions: vec![format!("issued token {}", tok.row.prefix)],
        outcome: "ok".into(),
    };
    h.store.append_decision(&rec.uid, &d, 50).await.unwrap();

    let (code, raw) = h.get("/api/v1/workspaces/a").await;
    assert_eq!(code, 200, "{raw}");
    assert!(!raw.to_string().contains(&tok.plaintext), "the token never leaves the store");
    assert!(!raw.to_string().contains(&tok.row.token_hash), "nor its hash");
    let detail: WorkspaceDetail = serde_json::from_value(raw).unwrap();
    assert_eq!(detail.summary.uid.as_deref(), Some(rec.uid.as_str()));
    assert_eq!(detail.spec.as_ref().unwrap().tier, 3);
    assert_eq!(detail.tokens.len(), 1);
    assert_eq!(detail.tokens[0].prefix, tok.row.prefix);
    assert_eq!(detail.decisions, vec![d]);

    let (code, body) = h.get("/api/v1/workspaces/nope").await;
    assert_eq!(code, 404);
    assert!(body["error"].as_str().unwrap().contains("default/nope"), "{body}");
    let (code, _) = h.get("/api/v1/workspaces/a?namespace=other").await;
    assert_eq!(code, 404);
}

#[tokio::test]
async fn restart_pause_resume_write_the_store_and_queue_a_reconcile() {
    let mut h = Harness::start(desired_set(vec![
        declared("a", WorkspaceSpec::default()),
        declared("p", WorkspaceSpec { operating_mode: Some(OperatingMode::Paused), ..Default::default() }),
    ]))
    .await;
    let (rec, _) = h.workspace_with_token("a").await;
    h.drain_triggers();

    let (code, body) = h.post("/api/v1/workspaces/a/restart").await;
    assert_eq!(code, 200, "{body}");
    let answer: ActionResponse = serde_json::from_value(body).unwrap();
    assert_eq!((answer.workspace.as_str(), answer.action.as_str()), ("default/a", "restart"));
    assert!(h.store.workspace_by_uid(&rec.uid).await.unwrap().unwrap().restart_requested_at.is_some());
    assert_eq!(h.drain_triggers(), vec![("default/a".to_string(), "cli-restart")]);

    assert_eq!(h.post("/api/v1/workspaces/a/pause").await.0, 200);
    assert_eq!(h.store.workspace_by_uid(&rec.uid).await.unwrap().unwrap().mode_override, Some(OperatingMode::Paused));
    assert_eq!(h.drain_triggers(), vec![("default/a".to_string(), "cli-pause")]);

    // Declared Running: resume clears the override.
    assert_eq!(h.post("/api/v1/workspaces/a/resume").await.0, 200);
    assert_eq!(h.store.workspace_by_uid(&rec.uid).await.unwrap().unwrap().mode_override, None);
    assert_eq!(h.drain_triggers(), vec![("default/a".to_string(), "cli-resume")]);

    // Declared Paused, never seen by the reconciler: the record is created, resume overrides to Running.
    assert!(h.store.workspace("default/p").await.unwrap().is_none());
    assert_eq!(h.post("/api/v1/workspaces/p/resume").await.0, 200);
    let p = h.store.workspace("default/p").await.unwrap().expect("record created");
    assert_eq!(p.mode_override, Some(OperatingMode::Running));
    assert_eq!(h.drain_triggers(), vec![("default/p".to_string(), "cli-resume")]);

    let (code, body) = h.post("/api/v1/workspaces/ghost/pause").await;
    assert_eq!(code, 404, "{body}");
    assert!(h.drain_triggers().is_empty());

    // Known to the store but declared no more: refused, nothing changed.
    h.store.ensure_workspace("default/gone", Utc::now()).await.unwrap();
    let (code, body) = h.post("/api/v1/workspaces/gone/restart").await;
    assert_eq!(code, 409, "{body}");
    assert!(h.store.workspace("default/gone").await.unwrap().unwrap().restart_requested_at.is_none());
}

#[tokio::test]
async fn teams_roll_up_members() {
    let mut set = desired_set(vec![
        declared("a", WorkspaceSpec { team: Some("eng".into()), ..Default::default() }),
        declared("b", WorkspaceSpec { team: Some("eng".into()), ..Default::default() }),
    ]);
    set.teams.insert(ObjectKey::new("default", "eng"), Team::new("eng", TeamSpec::default()));
    let h = Harness::start(set).await;
    let (rec, _) = h.workspace_with_token("a").await;
    h.store.save_status(&rec.uid, &online_status()).await.unwrap();
    let (code, raw) = h.get("/api/v1/teams").await;
    assert_eq!(code, 200);
    let teams: Vec<TeamSummary> = serde_json::from_value(raw).unwrap();
    assert_eq!(teams.len(), 1);
    assert_eq!((teams[0].members, teams[0].count(Phase::Running), teams[0].count(Phase::Pending)), (2, 1, 1));
}

// ---------------------------------------------------------------------------
// The fleet page's login (registry/login.rs)

/// A login through `/login`: the session cookie's `name=value`.
async fn browser_login(h: &Harness) -> String {
    let (code, body) = h.post("/api/v1/logins").await;
    assert_eq!(code, 201, "{body}");
    assert_eq!(body["expiresInSeconds"], 60);
    let path = body["path"].as_str().unwrap().to_string();
    assert!(path.starts_with("login?code="), "{path}");
    let no_redirects =
        reqwest::Client::builder().no_proxy().redirect(reqwest::redirect::Policy::none()).build().unwrap();
    let r = no_redirects.get(format!("{}/{path}", h.url)).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 303);
    assert_eq!(r.headers()["location"], "./");
    assert_eq!(r.headers()["referrer-policy"], "no-referrer");
    let set = r.headers()["set-cookie"].to_str().unwrap().to_string();
    for attribute in ["HttpOnly", "SameSite=Strict", "Path=/"] {
        assert!(set.contains(attribute), "{set}");
    }
    let again = no_redirects.get(format!("{}/{path}", h.url)).send().await.unwrap();
    assert_eq!(again.status().as_u16(), 401, "a code works once");
    set.split(';').next().unwrap().to_string()
}

#[tokio::test]
async fn the_page_and_the_admin_api_take_a_browser_session_and_changes_need_the_header() {
    let h = Harness::start(desired_set(vec![declared("a", WorkspaceSpec::default())])).await;
    h.workspace_with_token("a").await;
    let get = |path: &str, cookie: Option<&str>| {
        let mut r = h.http.get(format!("{}{path}", h.url));
        if let Some(c) = cookie {
            r = r.header("Cookie", c);
        }
        r.send()
    };
    for path in ["/", "/assets/fleet.js", "/api/v1/fleet", "/api/v1/workspaces"] {
        assert_eq!(get(path, None).await.unwrap().status().as_u16(), 401, "{path} without a login");
    }
    let (code, _) = h.admin(reqwest::Method::POST, "/api/v1/logins", None).await;
    assert_eq!(code, 401, "no login code without the admin token");
    let cookie = browser_login(&h).await;

    let page = get("/", Some(&cookie)).await.unwrap();
    assert_eq!(page.status().as_u16(), 200);
    let csp = page.headers()["content-security-policy"].to_str().unwrap().to_string();
    assert!(csp.contains("script-src 'self'") && csp.contains("frame-ancestors 'none'"), "{csp}");
    assert_eq!(page.headers()["cache-control"], "no-store");
    let html = page.text().await.unwrap();
    assert!(html.contains("assets/fleet.js") && !html.contains(&h.admin_token));
    let fleet: Value = get("/api/v1/fleet", Some(&cookie)).await.unwrap().json().await.unwrap();
    assert_eq!(fleet["workspaces"][0]["name"], "a");
    let actions: Vec<&str> =
        fleet["actions"].as_array().unwrap().iter().map(|a| a["action"].as_str().unwrap()).collect();
    assert_eq!(actions, ["pause", "resume", "restart", "wake"]);
    assert_eq!(get("/", Some("molecule_session_other=nope")).await.unwrap().status().as_u16(), 401);

    // A change with the cookie alone is what a cross-site form would send: refused.
    let post = |path: &str, header: bool| {
        let mut r = h.http.post(format!("{}{path}", h.url)).header("Cookie", &cookie);
        if header {
            r = r.header("X-Molecule-Request", "1");
        }
        r.send()
    };
    assert_eq!(post("/api/v1/workspaces/a/pause", false).await.unwrap().status().as_u16(), 403);
    let rec = h.store.workspace("default/a").await.unwrap().unwrap();
    assert_eq!(rec.mode_override, None, "the refused change changed nothing");
    assert_eq!(post("/api/v1/workspaces/a/pause", true).await.unwrap().status().as_u16(), 200);
    let rec = h.store.workspace("default/a").await.unwrap().unwrap();
    assert_eq!(rec.mode_override, Some(OperatingMode::Paused));
    assert_eq!(post("/api/v1/logins", true).await.unwrap().status().as_u16(), 403, "a session mints no logins");
}

#[tokio::test]
async fn open_no_browser_prints_a_login_url_that_works_once() {
    let h = Harness::start(desired_set(vec![])).await;
    let args = cli::OpenArgs { no_browser: true, client: h.client() };
    let out = cli::execute(&ClientCommand::Open(args)).await.unwrap();
    let url = out.trim();
    assert!(url.starts_with(&format!("{}/login?code=", h.url)) && !url.contains('\n'), "{out}");
    let no_redirects =
        reqwest::Client::builder().no_proxy().redirect(reqwest::redirect::Policy::none()).build().unwrap();
    assert_eq!(no_redirects.get(url).send().await.unwrap().status().as_u16(), 303);
    assert_eq!(no_redirects.get(url).send().await.unwrap().status().as_u16(), 401);
}

#[tokio::test]
async fn the_fleet_stream_starts_with_a_snapshot_then_sends_what_changes() {
    let h = Harness::start(desired_set(vec![declared("a", WorkspaceSpec::default())])).await;
    let mut r =
        h.http.get(format!("{}/api/v1/fleet?watch=true", h.url)).bearer_auth(&h.admin_token).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 200);
    assert!(r.headers()["content-type"].to_str().unwrap().starts_with("text/event-stream"));
    let mut text = String::new();
    while !text.contains("\n\n") {
        text.push_str(&String::from_utf8_lossy(&r.chunk().await.unwrap().expect("the snapshot")));
    }
    assert!(text.starts_with("event: snapshot\ndata: {"), "{text}");
    let data: Value = serde_json::from_str(text.lines().nth(1).unwrap().trim_start_matches("data: ")).unwrap();
    assert_eq!(data["workspaces"][0]["name"], "a");
    assert_eq!(data["workspaces"][0]["phase"], "Pending");
    // A new declaration: only it is sent, and the team it names.
    let b = declared("b", WorkspaceSpec { team: Some("ops".into()), ..Default::default() });
    h._desired.send(Arc::new(desired_set(vec![declared("a", WorkspaceSpec::default()), b]))).unwrap();
    let mut rest = text.split_once("\n\n").unwrap().1.to_string();
    while !(rest.contains("event: workspaces") && rest.contains("event: teams") && rest.ends_with("\n\n")) {
        rest.push_str(&String::from_utf8_lossy(&r.chunk().await.unwrap().expect("what changed")));
    }
    let events: Vec<(&str, Value)> = rest
        .split("\n\n")
        .filter_map(|e| {
            let (name, data) = e.split_once("\ndata: ")?;
            Some((name.trim_start_matches("event: "), serde_json::from_str(data).ok()?))
        })
        .collect();
    let workspaces = &events.iter().find(|(n, _)| *n == "workspaces").unwrap().1;
    let names: Vec<&str> = workspaces.as_array().unwrap().iter().map(|w| w["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["b"], "only the new workspace");
    let teams = &events.iter().find(|(n, _)| *n == "teams").unwrap().1;
    assert_eq!(teams[0]["name"], "ops");
}

// ---------------------------------------------------------------------------
// Health and metrics

#[tokio::test]
async fn readyz_is_503_until_ready_and_healthz_always_200() {
    let h = Harness::start(desired_set(vec![])).await;
    let get = |p: &str| h.http.get(format!("{}{p}", h.url)).send();
    assert_eq!(get("/healthz").await.unwrap().status().as_u16(), 200);
    let r = get("/readyz").await.unwrap();
    assert_eq!(r.status().as_u16(), 503);
    let body: Value = r.json().await.unwrap();
    assert!(body["reason"].as_str().unwrap().contains("source"), "{body}");
    h.ready.store(true, Ordering::Release);
    assert_eq!(get("/readyz").await.unwrap().status().as_u16(), 200);
}

#[tokio::test]
async fn metrics_are_openmetrics_and_count_requests() {
    let h = Harness::start(desired_set(vec![])).await;
    let (rec, tok) = h.workspace_with_token("a").await;
    assert_eq!(h.heartbeat(Some(&tok.plaintext), &rec.uid).await.0, 200);
    assert_eq!(h.heartbeat(None, &rec.uid).await.0, 401);
    assert_eq!(h.heartbeat(None, &rec.uid).await.0, 401);
    assert_eq!(h.get("/api/v1/workspaces/a").await.0, 200);
    let r = h.http.get(format!("{}/metrics", h.url)).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 200);
    assert!(r.headers()["content-type"].to_str().unwrap().starts_with("application/openmetrics-text"));
    let text = r.text().await.unwrap();
    assert!(text.ends_with("# EOF\n"), "{text}");
    for line in [
        r#"molecule_registry_requests_total{endpoint="/registry/heartbeat",code="200"} 1"#,
        r#"molecule_registry_requests_total{endpoint="/registry/heartbeat",code="401"} 2"#,
        r#"molecule_registry_requests_total{endpoint="/api/v1/workspaces/{name}",code="200"} 1"#,
        "# TYPE molecule_heal_seconds histogram",
        "# TYPE molecule_tokens_issued counter",
        "# TYPE molecule_workspaces gauge",
    ] {
        assert!(text.contains(line), "missing {line:?} in\n{text}");
    }
    assert!(!text.contains(&tok.plaintext));
}

// ---------------------------------------------------------------------------
// The CLI's client functions against the real server

#[tokio::test]
async fn cli_get_describe_and_act_through_the_address_file() {
    let h = Harness::start(desired_set(vec![declared("smoke", WorkspaceSpec::default())])).await;
    let (rec, tok) = h.workspace_with_token("smoke").await;
    h.store.save_status(&rec.uid, &online_status()).await.unwrap();
    assert_eq!(h.heartbeat(Some(&tok.plaintext), &rec.uid).await.0, 200);

    let json = cli::execute(&ClientCommand::Get(GetArgs {
        kind: GetKind::Workspaces,
        name: None,
        output: OutputFormat::Json,
        client: h.client(),
    }))
    .await
    .unwrap();
    let list: Vec<Value> = serde_json::from_str(&json).unwrap();
    assert_eq!(list[0]["name"], "smoke");
    assert_eq!(list[0]["uid"], rec.uid.as_str());

    let table = cli::execute(&ClientCommand::Get(GetArgs {
        kind: GetKind::Workspaces,
        name: None,
        output: OutputFormat::Table,
        client: h.client(),
    }))
    .await
    .unwrap();
    assert!(table.starts_with("NAME"), "{table}");
    assert!(table.contains("smoke") && table.contains("Running") && table.contains("s ago"), "{table}");

    let yaml = cli::execute(&ClientCommand::Get(GetArgs {
        kind: GetKind::Teams,
        name: None,
        output: OutputFormat::Yaml,
        client: h.client(),
    }))
    .await
    .unwrap();
    assert!(yaml.trim() == "[]", "{yaml}");
    let yaml = cli::execute(&ClientCommand::Get(GetArgs {
        kind: GetKind::Workspaces,
        name: Some("smoke".into()),
        output: OutputFormat::Yaml,
        client: h.client(),
    }))
    .await
    .unwrap();
    assert!(yaml.contains("name: smoke") && yaml.contains(&format!("uid: {}", rec.uid)), "{yaml}");

    let report = cli::execute(&ClientCommand::Describe(DescribeArgs {
        kind: cli::WorkspaceKind::Workspace,
        name: "smoke".into(),
        output: OutputFormat::Table,
        client: h.client(),
    }))
    .await
    .unwrap();
    assert!(report.contains(&rec.uid) && report.contains(&tok.row.prefix), "{report}");
    assert!(!report.contains(&tok.plaintext));

    let out = cli::execute(&ClientCommand::Pause(VerbArgs {
        kind: cli::WorkspaceKind::Workspace,
        name: "default/smoke".into(),
        client: h.client(),
    }))
    .await
    .unwrap();
    assert!(out.contains("default/smoke") && out.contains("pausing"), "{out}");

    let err = cli::execute(&ClientCommand::Describe(DescribeArgs {
        kind: cli::WorkspaceKind::Workspace,
        name: "ghost".into(),
        output: OutputFormat::Table,
        client: h.client(),
    }))
    .await
    .unwrap_err()
    .to_string();
    assert!(err.contains("no workspace default/ghost"), "{err}");
}

#[tokio::test]
async fn cli_errors_read_like_sentences() {
    let h = Harness::start(desired_set(vec![])).await;
    let get = |client: ClientArgs| async move {
        cli::execute(&ClientCommand::Get(GetArgs {
            kind: GetKind::Workspaces,
            name: None,
            output: OutputFormat::Table,
            client,
        }))
        .await
    };
    // A wrong admin token.
    let other = tempfile::tempdir().unwrap();
    std::fs::write(other.path().join("admin-token"), token::generate()).unwrap();
    let e = get(ClientArgs { state: other.path().into(), server: Some(h.url.clone()) }).await.unwrap_err().to_string();
    assert!(e.contains("refused the admin token") && e.contains("401"), "{e}");

    // Nothing listening at the address in STATE/address.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    registry::write_address(h.state_dir.path(), port).unwrap();
    let e = get(h.client()).await.unwrap_err().to_string();
    assert!(e.contains("not running at") && e.contains("molecule-operator up") && e.contains("address"), "{e}");
}

#[tokio::test]
async fn repeated_failures_from_one_source_are_throttled_while_its_good_agents_keep_working() {
    let h = Harness::start(desired_set(vec![])).await;
    let (rec, good) = h.workspace_with_token("a").await;
    let (rec_b, fresh) = h.workspace_with_token("b").await; // valid, never presented yet
    assert_eq!(h.heartbeat(Some(&good.plaintext), &rec.uid).await.0, 200);

    // Everything here comes from 127.0.0.1, like every host-networked agent.
    let burst = registry::limit::BURST as usize;
    for i in 0..burst {
        assert_eq!(h.heartbeat(Some(&token::generate()), &rec.uid).await.0, 401, "guess {i} within the allowance");
    }
    let resp = h
        .http
        .post(format!("{}/registry/heartbeat", h.url))
        .bearer_auth(token::generate())
        .body(format!("{{\"workspace_id\":\"{}\"}}", rec.uid))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 429, "guesses past the allowance are throttled");
    let retry: u64 = resp.headers()["retry-after"].to_str().unwrap().parse().unwrap();
    assert!(retry >= 1, "Retry-After {retry}");
    assert_eq!(resp.json::<Value>().await.unwrap()["error"], registry::limit::THROTTLED);
    assert_eq!(h.heartbeat(None, &rec.uid).await.0, 429, "a missing token too");

    // The agent that authenticated before is still checked, and accepted.
    assert_eq!(h.heartbeat(Some(&good.plaintext), &rec.uid).await.0, 200);
    // A valid token nobody has presented yet waits out the flood (the agent retries).
    assert_eq!(h.heartbeat(Some(&fresh.plaintext), &rec_b.uid).await.0, 429);
    // Being remembered never accepts a token: revoked is refused at once.
    h.store.revoke_tokens(&rec.uid, RevokeReason::Rotated, None, Utc::now()).await.unwrap();
    assert_eq!(h.heartbeat(Some(&good.plaintext), &rec.uid).await.0, 401);
    // Admin guesses count against the same source; the admin token always passes.
    assert_eq!(h.admin(reqwest::Method::GET, "/api/v1/workspaces", Some("guess")).await.0, 429);
    assert_eq!(h.get("/api/v1/workspaces").await.0, 200);

    // The allowance refills: the fresh agent gets through once the source has calmed down.
    let t0 = std::time::Instant::now();
    loop {
        let code = h.heartbeat(Some(&fresh.plaintext), &rec_b.uid).await.0;
        if code == 200 {
            break;
        }
        assert_eq!(code, 429);
        assert!(t0.elapsed() < std::time::Duration::from_secs(10), "still throttled after 10 s");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

// ---------------------------------------------------------------------------
// Wake (the lifecycle autopilot)

#[tokio::test]
async fn wake_is_202_with_retry_after_and_with_wait_answers_once_the_agent_beats() {
    let mut h = Harness::start(desired_set(vec![declared("a", WorkspaceSpec::default())])).await;
    let (rec, tok) = h.workspace_with_token("a").await;
    let (http, url, admin) = (h.http.clone(), h.url.clone(), h.admin_token.clone());
    let wake = move |query: &'static str| {
        let req = http.post(format!("{url}/api/v1/workspaces/default/a/wake{query}")).bearer_auth(&admin);
        async move { req.send().await.unwrap() }
    };
    let resp = wake("").await;
    assert_eq!(resp.status().as_u16(), 202);
    assert_eq!(resp.headers()["retry-after"], "1");
    let woken = h.store.workspace_by_uid(&rec.uid).await.unwrap().unwrap().woken_at;
    assert!(woken.is_some(), "the wake is stored");
    assert!(h.drain_triggers().contains(&("default/a".to_string(), "wake")));

    // Nobody beats: 504 past the timeout, naming the workspace.
    let resp = wake("?wait=true&timeout=0.3").await;
    assert_eq!(resp.status().as_u16(), 504);
    assert!(resp.text().await.unwrap().contains("default/a"));

    // The agent's first heartbeat after the wake answers the waiting call.
    let waiting = tokio::spawn(wake("?wait=true&timeout=30"));
    let before = h.store.workspace_by_uid(&rec.uid).await.unwrap().unwrap().woken_at;
    let t0 = std::time::Instant::now();
    while h.store.workspace_by_uid(&rec.uid).await.unwrap().unwrap().woken_at == before {
        assert!(t0.elapsed() < std::time::Duration::from_secs(30), "the third wake was never stored");
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert_eq!(h.heartbeat(Some(&tok.plaintext), &rec.uid).await.0, 200);
    let resp = waiting.await.unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    let body: ActionResponse = resp.json().await.unwrap();
    assert!(body.message.contains("online"), "{}", body.message);

    let resp = h.http.post(format!("{}/api/v1/workspaces/default/nope/wake", h.url)).bearer_auth(&h.admin_token);
    assert_eq!(resp.send().await.unwrap().status().as_u16(), 404);
    let resp = h.http.post(format!("{}/api/v1/workspaces/default/a/wake", h.url));
    assert_eq!(resp.send().await.unwrap().status().as_u16(), 401, "the admin token is required");
}
