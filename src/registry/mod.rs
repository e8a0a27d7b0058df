//! The operator's HTTP server (axum): the agents' registry (`/registry/*`), the
//! admin API the CLI talks to (`/api/v1/*`), the fleet page (`/`, page.rs) with its
//! browser login (`/login`, login.rs), health and metrics, all on `--listen`
//! (`router`). The workspaces' network gets a listener of its own on its gateway that
//! serves the agents' routes and nothing else (`agent_router`; runtime::network says
//! why).
//!
//! Start-up, as `main.rs` wires it:
//! ```ignore
//! let admin_token = registry::load_or_create_admin_token(&state_dir)?;
//! let state = registry::AppState::new(store, trigger, desired_rx, admin_token, metrics.clone());
//! let ready = state.ready.clone();
//! let listener = tokio::net::TcpListener::bind(listen).await?;
//! registry::write_address(&state_dir, listener.local_addr()?)?;
//! tokio::spawn(registry::serve(listener, registry::router(state), shutdown));
//! // ... once every source has delivered its first snapshot:
//! ready.store(true, Ordering::Release);
//! ```

pub mod admin;
mod agent;
pub mod auth;
mod discovery;
pub mod events;
pub mod fleet;
pub mod limit;
pub mod login;
mod page;
mod reports;
pub mod secrets;
pub mod views;
pub mod wake;

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use axum::extract::{DefaultBodyLimit, MatchedPath, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use tokio::sync::watch;

use crate::metrics::Metrics;
use crate::source::desired::DesiredSet;
use crate::store::DynStore;
use crate::store::lookups::TokenLookups;
use crate::trigger::Trigger;

pub use auth::load_or_create_admin_token;

/// `STATE/admin-token`: the admin API's bearer token (0600), created on first start.
pub const ADMIN_TOKEN_FILE: &str = "admin-token";
/// `STATE/address`: the running operator's base URL (e.g. `http://127.0.0.1:8080`),
/// one line, written once it listens; the CLI reads it when `--server` is not given.
pub const ADDRESS_FILE: &str = "address";
/// Largest request body accepted (the registry's bodies are a few dozen bytes).
pub const BODY_LIMIT: usize = 16 * 1024;

/// Everything the handlers need. Cheap to clone.
#[derive(Clone)]
pub struct AppState {
    pub store: DynStore,
    /// Presented tokens resolved in batches over `store` (store::lookups).
    pub lookups: Arc<TokenLookups>,
    /// Queues a workspace (`ns/name`) for reconcile: registry 401s, CLI actions.
    pub trigger: Trigger,
    /// What is declared right now (the desired store's latest merge).
    pub desired: watch::Receiver<Arc<DesiredSet>>,
    pub admin_token: String,
    pub metrics: Arc<Metrics>,
    /// Set once the operator has read every source; `/readyz` is 503 until then.
    pub ready: Arc<AtomicBool>,
    /// The operator's tasks that are not working (`/readyz` is 503 while any is listed).
    pub health: Arc<crate::health::Health>,
    /// Seals secrets set through the admin API.
    pub keyring: Option<Arc<crate::secrets::Keyring>>,
    /// Heartbeats the store failed to record (read by the heartbeat rule).
    pub lost_heartbeats: Arc<crate::store::LostHeartbeats>,
    /// Failed authentications per source address (see limit.rs).
    pub limiter: Arc<limit::FailureLimiter>,
    /// Per-workspace time of the last "is the status behind?" check (see agent.rs).
    nudges: Arc<Mutex<agent::Nudges>>,
    /// Every finished reconcile (the loop's own channel), for `events -w`; None
    /// where no loop runs beside the API.
    pub reports: Option<tokio::sync::broadcast::Sender<crate::trigger::Report>>,
    /// The runtime, once connected (after the API starts serving): for agents' logs.
    pub runtime: Arc<std::sync::OnceLock<Arc<dyn crate::runtime::Runtime>>>,
    /// The agents' reports as last written (see reports.rs).
    agent_reports: Arc<reports::Cache>,
    /// Whether agents may register push URLs in private ranges (RFC 1918, fd00::/8):
    /// the original platform's SaaS mode. Off by default (rules::agent_url).
    pub private_agent_urls: bool,
    /// The fleet page's login codes and browser sessions (login.rs).
    pub logins: Arc<login::Logins>,
    /// What each workspace uses, as the usage sampler last read it (observe/usage.rs).
    pub usage: Arc<crate::observe::usage::UsageBook>,
    /// Who waits for an agent to be heard from after a wake (wake.rs).
    pub wakes: Arc<wake::Waiters>,
    /// Cancelled when the operator stops: answers that never end by themselves (the
    /// fleet stream, `events -w`, `logs -f`) end then, so the server can finish.
    pub shutdown: tokio_util::sync::CancellationToken,
    /// Warm pools' status as the refill last saw it (`get warmpools`).
    pub pools: Arc<Mutex<std::collections::BTreeMap<String, crate::api::WarmPoolStatus>>>,
}

impl AppState {
    /// A state that is not ready yet.
    pub fn new(
        store: DynStore,
        trigger: Trigger,
        desired: watch::Receiver<Arc<DesiredSet>>,
        admin_token: String,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            lookups: TokenLookups::new(store.clone()),
            store,
            trigger,
            desired,
            admin_token,
            metrics,
            ready: Arc::new(AtomicBool::new(false)),
            health: Arc::default(),
            keyring: None,
            lost_heartbeats: Arc::default(),
            limiter: Arc::default(),
            nudges: Arc::default(),
            reports: None,
            runtime: Arc::default(),
            agent_reports: Arc::default(),
            private_agent_urls: false,
            logins: Arc::default(),
            usage: Arc::default(),
            wakes: Arc::default(),
            shutdown: tokio_util::sync::CancellationToken::new(),
            pools: Arc::default(),
        }
    }

    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::Release);
    }

    /// The latest declared set.
    fn desired(&self) -> Arc<DesiredSet> {
        self.desired.borrow().clone()
    }
}

/// The routes agents use: the registry (each call needs the workspace's own token;
/// discovery also the hierarchy rule, rules::hierarchy) and liveness.
fn agent_routes() -> Router<Arc<AppState>> {
    Router::new()
        .route("/registry/register", post(agent::register))
        .route("/registry/heartbeat", post(agent::heartbeat))
        .route("/registry/update-card", post(discovery::update_card))
        .route("/registry/discover/{id}", get(discovery::discover))
        .route("/registry/{id}/peers", get(discovery::peers))
        .route("/registry/check-access", post(discovery::check_access))
        .route("/healthz", get(healthz))
}

/// What the workspaces' network is served (see `runtime::network`): the agents' routes
/// and nothing else, so no workspace reaches the admin API, metrics or readiness.
pub fn agent_router(state: AppState) -> Router {
    finish(agent_routes(), Arc::new(state))
}

/// Every route. Admin routes require the admin token (or the page's browser session,
/// login.rs); the registry routes the workspace's own token; health, metrics and
/// `/login` nothing.
pub fn router(state: AppState) -> Router {
    let state = Arc::new(state);
    let admin = Router::new()
        .route("/api/v1/logins", post(login::create))
        .route("/api/v1/fleet", get(fleet::fleet))
        .route("/api/v1/workspaces", get(admin::list_workspaces))
        .route("/api/v1/workspaces/{name}", get(admin::get_workspace))
        .route("/api/v1/workspaces/{name}/restart", post(admin::restart))
        .route("/api/v1/workspaces/{name}/pause", post(admin::pause))
        .route("/api/v1/workspaces/{name}/resume", post(admin::resume))
        .route("/api/v1/workspaces/{name}/logs", get(admin::logs))
        .route("/api/v1/workspaces/{name}/{workspace}/wake", post(wake::wake))
        .route("/api/v1/teams", get(admin::list_teams))
        .route("/api/v1/warmpools", get(admin::list_pools))
        .route("/api/v1/events", get(events::list))
        .route("/api/v1/secrets", get(secrets::list).put(secrets::set).delete(secrets::delete))
        .route_layer(middleware::from_fn_with_state(state.clone(), auth::require_admin));
    let page = Router::new()
        .route("/", get(page::index))
        .route("/assets/fleet.css", get(page::css))
        .route("/assets/fleet.js", get(page::js))
        .route_layer(middleware::from_fn_with_state(state.clone(), page::require_login));
    let routes = agent_routes()
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_text))
        .route("/login", get(login::login))
        .merge(admin)
        .merge(page);
    finish(routes, state)
}

/// Unknown paths answer 404; every answer is counted; bodies are capped.
fn finish(routes: Router<Arc<AppState>>, state: Arc<AppState>) -> Router {
    routes
        .fallback(not_found)
        .layer(middleware::from_fn_with_state(state.clone(), count_requests))
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
        .with_state(state)
}

/// Serves until `shutdown` resolves, then finishes the requests in flight.
pub async fn serve(
    listener: tokio::net::TcpListener,
    router: Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> io::Result<()> {
    // With each connection's peer address: failed authentications are limited per source.
    axum::serve(listener, router.into_make_service_with_connect_info::<SocketAddr>())
        .with_graceful_shutdown(shutdown)
        .await
}

/// The URL clients use for a listening address (an unspecified IP becomes loopback).
pub fn address_url(addr: SocketAddr) -> String {
    let ip = match addr.ip() {
        std::net::IpAddr::V4(ip) if ip.is_unspecified() => std::net::Ipv4Addr::LOCALHOST.into(),
        std::net::IpAddr::V6(ip) if ip.is_unspecified() => std::net::Ipv6Addr::LOCALHOST.into(),
        ip => ip,
    };
    format!("http://{}", SocketAddr::new(ip, addr.port()))
}

/// Writes `STATE/address` (atomically: temp file then rename) and returns the URL.
pub fn write_address(state_dir: &Path, addr: SocketAddr) -> io::Result<String> {
    let url = address_url(addr);
    std::fs::create_dir_all(state_dir)?;
    let tmp = state_dir.join(format!(".{ADDRESS_FILE}.{}", std::process::id()));
    // Private like everything in the state directory (not a secret, but nobody
    // else's business either).
    {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let _ = std::fs::remove_file(&tmp);
        let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&tmp)?;
        f.write_all(format!("{url}\n").as_bytes())?;
    }
    std::fs::rename(&tmp, address_path(state_dir))?;
    Ok(url)
}

/// Removes `STATE/address` on clean shutdown (a missing file is fine).
pub fn remove_address(state_dir: &Path) -> io::Result<()> {
    match std::fs::remove_file(address_path(state_dir)) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

pub fn address_path(state_dir: &Path) -> PathBuf {
    state_dir.join(ADDRESS_FILE)
}

pub fn admin_token_path(state_dir: &Path) -> PathBuf {
    state_dir.join(ADMIN_TOKEN_FILE)
}

/// A JSON error body `{"error": message}` with `code`.
pub(crate) fn error(code: StatusCode, message: impl Into<String>) -> Response {
    (code, Json(views::ErrorBody { error: message.into() })).into_response()
}

async fn healthz() -> &'static str {
    "ok\n"
}

async fn readyz(State(state): State<Arc<AppState>>) -> Response {
    if !state.ready.load(Ordering::Acquire) {
        return not_ready("the operator is starting: not every source has been read yet");
    }
    let problems = state.health.problems();
    if !problems.is_empty() {
        let reasons: Vec<String> = problems.iter().map(|(task, why)| format!("{task}: {why}")).collect();
        return not_ready(&reasons.join("; "));
    }
    match state.store.ping().await {
        Ok(()) => (StatusCode::OK, Json(serde_json::json!({"status": "ready"}))).into_response(),
        Err(e) => not_ready(&format!("the state store does not answer: {e}")),
    }
}

fn not_ready(reason: &str) -> Response {
    (StatusCode::SERVICE_UNAVAILABLE, Json(serde_json::json!({"status": "not ready", "reason": reason})))
        .into_response()
}

async fn metrics_text(State(state): State<Arc<AppState>>) -> Response {
    ([(header::CONTENT_TYPE, crate::metrics::CONTENT_TYPE)], state.metrics.encode()).into_response()
}

async fn not_found(req: Request) -> Response {
    error(StatusCode::NOT_FOUND, format!("no such endpoint: {} {}", req.method(), req.uri().path()))
}

/// Counts every answer by route template (never the raw path: bounded labels).
async fn count_requests(State(state): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    let endpoint = req.extensions().get::<MatchedPath>().map(|m| m.as_str().to_owned());
    let response = next.run(req).await;
    state.metrics.registry_request(endpoint.as_deref().unwrap_or("unmatched"), response.status().as_u16());
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unspecified_listen_address_becomes_loopback() {
        assert_eq!(address_url("0.0.0.0:8080".parse().unwrap()), "http://127.0.0.1:8080");
        assert_eq!(address_url("127.0.0.1:9".parse().unwrap()), "http://127.0.0.1:9");
        assert_eq!(address_url("[::]:80".parse().unwrap()), "http://[::1]:80");
    }

    #[test]
    fn address_file_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let url = write_address(dir.path(), "127.0.0.1:4242".parse().unwrap()).unwrap();
        assert_eq!(std::fs::read_to_string(address_path(dir.path())).unwrap(), format!("{url}\n"));
        remove_address(dir.path()).unwrap();
        remove_address(dir.path()).unwrap();
    }
}
