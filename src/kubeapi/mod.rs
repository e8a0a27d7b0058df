//! A Kubernetes-compatible API server (`up --kube-api ADDR`): the molecule.ai kinds
//! (Workspace, Team) and the core/v1 kinds a Pod runtime needs (Pods, Secrets,
//! PersistentVolumeClaims, Services, Namespaces, Nodes), with Events and Leases.
//! It is the subset of the API that kubectl and kube-rs use (discovery, OpenAPI v3,
//! get/list/watch/create/update/patch/delete, the status subresource, Table output),
//! and the part of a cluster's controller manager that those kinds rely on (gc.rs:
//! garbage collection, PVC protection, namespace deletion). Objects live in the state
//! store (SQLite or Postgres), so they survive restarts; one global resourceVersion
//! orders every write. A bounded in-memory event history serves watches that resume
//! from a resourceVersion; older ones get 410 Expired, as from a real API server.
//! Pods run on the local node (src/node) when the operator has `--runtime kubernetes`.
//!
//! Wiring: `bind(store, admin_token, addr, state_dir)` then `Bound::serve(shutdown)`.
//! It serves HTTPS with a self-signed certificate kept in `STATE/kube-api/`:
//! kubectl only sends a kubeconfig's token over TLS; an unusable pair fails `bind`.
//! Every request needs `Authorization: Bearer <admin token>` (401 Status otherwise);
//! with `set_limiter`, wrong tokens spend the admin API's per-source allowance (429).
//!
//! Served (paths under `/api/v1` for core, `/apis/molecule.ai/v1alpha1`):
//! - every stored kind: get, list and watch (label selectors; field selectors
//!   `metadata.name`, `metadata.namespace`, and per kind `spec.nodeName`,
//!   `status.phase`, ... of Pods, `type` of Secrets, `status.phase` of Namespaces),
//!   create, update, patch (JSON merge, JSON patch, strategic merge, server-side
//!   apply), delete with DeleteOptions (`propagationPolicy` Background (default),
//!   Foreground, Orphan; `gracePeriodSeconds`; preconditions), finalizers and
//!   `deletionTimestamp`, `uid`, `creationTimestamp`, `generation` (bumped on spec
//!   changes), the status subresource (not for Secrets), Table output with the
//!   columns kubectl prints for each kind;
//! - Pods: `binding` (what a scheduler posts), `log` (`container`, `follow`,
//!   `tailLines`, `timestamps`, `sinceSeconds`, `previous`, `limitBytes`; asked of the
//!   node); a Pod bound to a node is deleted gracefully (its node deletes it again
//!   with grace 0 once its containers are gone);
//! - Namespaces: `default`, `kube-system` and `molecule-system` always exist (and one
//!   for every namespace objects were stored in before namespaces were served); a
//!   create in a namespace that does not exist is 404, in one being deleted 403;
//! - Nodes: whatever registers (the local node registers `local`).
//!
//! Choices, where a real API server does more:
//! - Validation of the molecule kinds is the CRD schema (types, enums, ranges,
//!   unknown fields: always strict) plus decoding into the Rust types; of the core
//!   kinds, decoding into the k8s-openapi types, fields those types do not know
//!   (strict), and the rules core.rs lists (names, containers, mounts, quantities,
//!   immutability of a Pod's spec but its images, of a bound claim's spec, of an
//!   immutable Secret). Errors are 422 Status with causes. Defaults are those the
//!   runtime can see (restartPolicy, pull policy, requests from limits, ...); no
//!   admission plugins beyond PVC protection; no service accounts or their tokens.
//! - Secrets: `stringData` is folded into `data` (base64) on every write; messages
//!   never quote a value, and nothing here logs a body.
//! - Strategic merge patch: with the merge keys of the core kinds' lists
//!   (strategic.rs); for the custom resources, a JSON merge patch with `$`
//!   directives dropped (CRDs have no patch strategies). Server-side apply merges the
//!   applied fields into the object and records them per field manager in
//!   managedFields (FieldsV1), so a field the same manager applied before and leaves
//!   out now is removed; lists are atomic; it never reports a conflict between
//!   managers, so `force` is accepted and changes nothing. Applying status replaces
//!   the status whole (the controller's way).
//! - Request bodies are JSON, and protobuf only for the Namespaces and Secrets
//!   `kubectl create` sends that way (protobuf.rs); answers are always JSON.
//! - Services are stored with a cluster IP from 10.96.0.0/16; nothing routes to them.
//! - Discovery is the legacy form (kubectl falls back from aggregated discovery when
//!   the answer is plain JSON). Events (core v1 and events.k8s.io/v1) are kept in
//!   memory only, the newest 1000, so `kubectl describe` shows what controllers
//!   recorded since the operator started. coordination.k8s.io/v1 Leases (for leader
//!   election) are served and stored, but not watched nor listed in discovery.
//! - Lists are never paginated (`limit` is ignored, no `continue`); no
//!   `deletecollection`, no `exec`/`attach`/`port-forward`, no ConfigMaps,
//!   ServiceAccounts, Endpoints or any other kind.
//! - Watch events live in this process: several replicas sharing one Postgres each
//!   see only their own writes (local mode runs one).

mod core;
mod discovery;
mod events;
mod gc;
mod kinds;
mod leases;
pub mod logs;
pub mod metrics;
mod objects;
mod protobuf;
pub use crate::model::quantity;
mod schema;
mod selector;
mod services;
mod status;
mod strategic;
mod table;
mod tls;
mod watch;

use std::collections::VecDeque;
use std::io::Write;
use std::net::SocketAddr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, Method, Uri};
use axum::response::{IntoResponse, Response};
use kube::CustomResourceExt;
use serde_json::Value;
use tokio::sync::broadcast;

use crate::api::{GROUP, Team, VERSION, Workspace};
use crate::registry::limit::{FailureLimiter, Source};
use crate::store::{Objects, StoreResult};
pub use core::{PVC_PROTECTION, default_pull_policy};
pub use kinds::Kind;
pub use logs::{LogOptions, PodLogs};
pub use status::ApiError;
pub use tls::KubeTls;

/// How many write events a watch can resume from (older resourceVersions get 410).
pub const DEFAULT_HISTORY: usize = 1000;
/// How often a watch that allows bookmarks gets one.
pub const DEFAULT_BOOKMARK_INTERVAL: Duration = Duration::from_secs(30);
/// Namespaces that always exist: Kubernetes' own two, and the one deploy/ installs
/// the operator into.
pub const BUILTIN_NAMESPACES: [&str; 3] = ["default", "kube-system", "molecule-system"];

/// One write, as a watch delivers it.
#[derive(Debug)]
pub struct WatchEvent {
    pub rv: i64,
    pub kind: Kind,
    pub namespace: String,
    /// ADDED | MODIFIED | DELETED
    pub event_type: &'static str,
    /// The whole object (for DELETED: as it was, with the deletion's resourceVersion).
    pub object: Value,
}

struct History {
    /// Every event with rv > floor is in `events`; a watch from below it gets 410.
    floor: i64,
    events: VecDeque<Arc<WatchEvent>>,
}

/// Per-kind data derived once from the CRDs.
struct KindInfo {
    /// openAPIV3Schema
    schema: Value,
    /// additionalPrinterColumns
    columns: Vec<Value>,
}

/// The generated CRD of a molecule.ai kind, as JSON (schema, printer columns).
fn crd(kind: Kind) -> Value {
    let crd = match kind {
        Kind::Team => Team::crd(),
        Kind::WarmPool => crate::api::WarmPool::crd(),
        _ => Workspace::crd(),
    };
    serde_json::to_value(crd).expect("a CRD serializes")
}

/// The schema (with apiVersion, kind and metadata added) and printer columns of a
/// molecule.ai kind.
fn kind_info(kind: Kind) -> KindInfo {
    let crd = crd(kind);
    let version = &crd["spec"]["versions"][0];
    let mut schema = version["schema"]["openAPIV3Schema"].clone();
    // The generated schema covers spec and status; every object also has these.
    if let Some(properties) = schema["properties"].as_object_mut() {
        properties.entry("apiVersion").or_insert(serde_json::json!({"type": "string",
        "description": "APIVersion defines the versioned schema of this representation of an object."}));
        properties.entry("kind").or_insert(serde_json::json!({"type": "string",
        "description": "Kind is a string value representing the REST resource this object represents."}));
        properties.entry("metadata").or_insert(serde_json::json!({"type": "object",
        "description": "Standard object's metadata (name, namespace, labels, annotations, finalizers, ...)."}));
    }
    KindInfo { schema, columns: version["additionalPrinterColumns"].as_array().cloned().unwrap_or_default() }
}

/// The server's state: the store's objects, the bearer token it requires, the event
/// history.
pub struct KubeApi {
    store: Arc<dyn Objects>,
    token: String,
    /// Serializes writes so history order is resourceVersion order.
    write_lock: tokio::sync::Mutex<()>,
    history: Mutex<History>,
    history_limit: usize,
    events: broadcast::Sender<Arc<WatchEvent>>,
    bookmark_interval: Duration,
    /// Failed authentications count here, shared with the admin API's limiter.
    limiter: OnceLock<Arc<FailureLimiter>>,
    /// What serves `pods/NAME/log`: the local node, when one runs.
    pod_logs: OnceLock<Arc<dyn PodLogs>>,
    /// What serves `metrics.k8s.io` PodMetrics: the local node, when one runs.
    pod_usage: OnceLock<Arc<dyn metrics::PodUsage>>,
    /// Set when the server shuts down: open watches end, so a graceful shutdown
    /// does not wait out their timeouts.
    closing: tokio::sync::watch::Sender<bool>,
    workspace: KindInfo,
    team: KindInfo,
    pool: KindInfo,
    event_log: events::EventLog,
}

impl KubeApi {
    /// The stored object `kind` `ns/name`, or 404 naming it.
    pub(crate) async fn current(
        &self,
        kind: Kind,
        ns: &str,
        name: &str,
    ) -> Result<crate::store::StoredObject, ApiError> {
        self.store.get_object(kind.name(), ns, name).await?.ok_or_else(|| ApiError::not_found(&kind.qualified(), name))
    }

    /// A server over `store` that requires `Authorization: Bearer <token>` (the
    /// operator's admin token). Watches can resume from the store's current revision on.
    pub async fn new(store: Arc<dyn Objects>, token: impl Into<String>) -> StoreResult<Self> {
        let floor = store.object_revision().await?;
        let (events, _) = broadcast::channel(DEFAULT_HISTORY);
        let api = Self {
            store,
            token: token.into(),
            write_lock: tokio::sync::Mutex::new(()),
            history: Mutex::new(History { floor, events: VecDeque::new() }),
            history_limit: DEFAULT_HISTORY,
            events,
            bookmark_interval: DEFAULT_BOOKMARK_INTERVAL,
            limiter: OnceLock::new(),
            pod_logs: OnceLock::new(),
            pod_usage: OnceLock::new(),
            closing: tokio::sync::watch::Sender::new(false),
            workspace: kind_info(Kind::Workspace),
            team: kind_info(Kind::Team),
            pool: kind_info(Kind::WarmPool),
            event_log: events::EventLog::default(),
        };
        api.ensure_namespaces().await?;
        Ok(api)
    }

    /// Creates the built-in namespaces, and one for every namespace objects were
    /// stored in before namespaces were served, so they keep working as before.
    async fn ensure_namespaces(&self) -> StoreResult<()> {
        let mut wanted: std::collections::BTreeSet<String> = BUILTIN_NAMESPACES.iter().map(|n| n.to_string()).collect();
        for kind in Kind::ALL.into_iter().filter(|k| k.namespaced()) {
            let (objects, _) = self.store.list_objects(kind.name(), None).await?;
            wanted.extend(objects.into_iter().map(|o| o.namespace));
        }
        let (existing, _) = self.store.list_objects(Kind::Namespace.name(), None).await?;
        let _guard = self.write_lock.lock().await;
        for name in wanted.iter().filter(|n| !existing.iter().any(|e| e.name == **n)) {
            let mut namespace = serde_json::json!({
                "apiVersion": "v1", "kind": "Namespace",
                "metadata": {"name": name, "uid": uuid::Uuid::new_v4().to_string(),
                    "creationTimestamp": now_rfc3339(), "labels": {"kubernetes.io/metadata.name": name}},
            });
            core::normalize(Kind::Namespace, &mut namespace);
            core::admit_create(Kind::Namespace, &mut namespace);
            // Another replica sharing the store may have made it meanwhile: that is fine.
            if let crate::store::ObjectWrite::Written(written) =
                self.store.put_object(&objects::stored(Kind::Namespace, "", namespace), None).await?
            {
                self.publish(WatchEvent {
                    rv: written.resource_version,
                    kind: Kind::Namespace,
                    namespace: String::new(),
                    event_type: "ADDED",
                    object: written.body,
                });
            }
        }
        Ok(())
    }

    /// Failed admin-token guesses count toward `limiter` (the admin API's), and a
    /// source that spent its allowance is answered 429 before its token is checked.
    pub fn set_limiter(&self, limiter: Arc<FailureLimiter>) {
        let _ = self.limiter.set(limiter);
    }

    /// What serves `metrics.k8s.io` PodMetrics (the local node). Without one, the group
    /// is not served (404), as in a cluster without metrics-server.
    pub fn set_pod_usage(&self, usage: Arc<dyn metrics::PodUsage>) {
        let _ = self.pod_usage.set(usage);
    }

    /// What serves `pods/NAME/log` (the local node). Without one, logs are 503.
    pub fn set_pod_logs(&self, logs: Arc<dyn PodLogs>) {
        let _ = self.pod_logs.set(logs);
    }

    /// How many events watches can resume from (default [`DEFAULT_HISTORY`]).
    pub fn with_history_limit(mut self, limit: usize) -> Self {
        self.history_limit = limit.max(1);
        self
    }

    pub fn with_bookmark_interval(mut self, interval: Duration) -> Self {
        self.bookmark_interval = interval;
        self
    }

    /// Ends every open watch (clients reconnect); call it when shutting down, or a
    /// graceful shutdown waits for the watches' timeouts.
    pub fn close_watches(&self) {
        self.closing.send_replace(true);
    }

    /// Schema and printer columns of a molecule.ai kind (the core kinds have none:
    /// they are validated by decoding, their tables are built by table.rs).
    fn info(&self, kind: Kind) -> &KindInfo {
        match kind {
            Kind::Team => &self.team,
            Kind::WarmPool => &self.pool,
            _ => &self.workspace,
        }
    }

    /// Appends a write to the history and tells the watches. Called with the write
    /// lock held, in resourceVersion order.
    fn publish(&self, event: WatchEvent) {
        let event = Arc::new(event);
        {
            let mut history = self.history.lock().unwrap_or_else(|p| p.into_inner());
            history.events.push_back(event.clone());
            while history.events.len() > self.history_limit {
                if let Some(old) = history.events.pop_front() {
                    history.floor = old.rv;
                }
            }
        }
        // No receiver is fine: nobody watches.
        let _ = self.events.send(event);
    }

    fn authorized(&self, headers: &HeaderMap) -> bool {
        let presented = headers
            .get(axum::http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim);
        presented.is_some_and(|p| constant_time_eq(p.as_bytes(), self.token.as_bytes()))
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The router: every path goes through one dispatcher that speaks Kubernetes
/// (Status bodies for errors, 401 without the bearer token).
pub fn router(api: Arc<KubeApi>) -> axum::Router {
    axum::Router::new().fallback(dispatch).with_state(api)
}

/// The API bound to its address, with STATE/kubeconfig written: what `up --kube-api
/// ADDR` starts. `serve` runs it until the shutdown future completes.
pub struct Bound {
    /// `https://127.0.0.1:PORT` (the real port when ADDR asked for port 0).
    pub url: String,
    /// STATE/kubeconfig: `kubectl --kubeconfig` this, or point KUBECONFIG at it.
    pub kubeconfig: PathBuf,
    api: Arc<KubeApi>,
    /// TLS is set up when binding, so an unusable certificate or key fails `bind`,
    /// never a server that says it serves.
    listener: tls::TlsListener,
    router: axum::Router,
}

/// Binds `addr`, loads or creates the TLS pair in `state_dir/kube-api/` (an
/// unusable pair is an error naming the files), and writes `state_dir/kubeconfig`
/// (server, CA, `token`). The store's objects are served at once.
pub async fn bind(store: Arc<dyn Objects>, token: &str, addr: SocketAddr, state_dir: &Path) -> std::io::Result<Bound> {
    let api = KubeApi::new(store, token)
        .await
        .map_err(|e| std::io::Error::other(format!("the Kubernetes API cannot read the state store: {e}")))?;
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| std::io::Error::new(e.kind(), format!("cannot listen on {addr} for the Kubernetes API: {e}")))?;
    let local = listener.local_addr()?;
    let host = if local.ip().is_unspecified() { "127.0.0.1".to_string() } else { local.ip().to_string() };
    let host = if local.is_ipv6() && !local.ip().is_unspecified() { format!("[{host}]") } else { host };
    let url = format!("https://{host}:{}", local.port());
    let tls = KubeTls::load_or_create(state_dir)?;
    let listener = tls::TlsListener::new(listener, &tls).map_err(|e| {
        std::io::Error::new(
            e.kind(),
            format!(
                "{e}: fix or delete {} (a new self-signed pair is made when both files are missing)",
                KubeTls::dir(state_dir).display()
            ),
        )
    })?;
    let kubeconfig = write_kubeconfig(state_dir, &url, token, &tls)?;
    let api = Arc::new(api);
    Ok(Bound { url, kubeconfig, router: router(api.clone()), api, listener })
}

impl Bound {
    /// Every write through this API, in resourceVersion order (to trigger reconciles
    /// without a kube-rs watch).
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<WatchEvent>> {
        self.api.events.subscribe()
    }

    /// The server, to give it a limiter or a log provider before it serves.
    pub fn api(&self) -> &Arc<KubeApi> {
        &self.api
    }

    /// Serves until `shutdown` completes; then open watches end and in-flight
    /// requests finish. The API server's own controllers (garbage collection,
    /// PVC protection, namespace deletion) run while it serves.
    pub async fn serve(self, shutdown: impl std::future::Future<Output = ()> + Send + 'static) -> std::io::Result<()> {
        let api = self.api.clone();
        let controllers = gc::spawn(api.clone());
        let shutdown = async move {
            shutdown.await;
            api.close_watches();
        };
        let result = serve_tls(self.listener, self.router, shutdown).await;
        controllers.abort();
        result
    }
}

/// The Workspaces and Teams stored through this API (all namespaces), decoded: what
/// a source reads. Objects being deleted are included (their deletionTimestamp is set).
pub async fn declared(store: &dyn Objects) -> StoreResult<(Vec<Workspace>, Vec<Team>)> {
    fn decode<T: serde::de::DeserializeOwned>(objects: Vec<crate::store::StoredObject>) -> Vec<T> {
        objects
            .into_iter()
            .filter_map(|o| match serde_json::from_value(o.body) {
                Ok(decoded) => Some(decoded),
                Err(error) => {
                    // Only validated objects are stored; one another version wrote is skipped.
                    tracing::warn!(kind = %o.kind, namespace = %o.namespace, name = %o.name, %error, "kube-api: a stored object does not decode");
                    None
                }
            })
            .collect()
    }
    let (workspaces, _) = store.list_objects(Kind::Workspace.name(), None).await?;
    let (teams, _) = store.list_objects(Kind::Team.name(), None).await?;
    Ok((decode(workspaces), decode(teams)))
}

/// Serves `router` over TLS (`tls`) on `listener` until `shutdown` completes.
pub async fn serve(
    listener: tokio::net::TcpListener,
    router: axum::Router,
    tls: &KubeTls,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    serve_tls(tls::TlsListener::new(listener, tls)?, router, shutdown).await
}

/// With each connection's peer address, so failed authentications are limited per source.
async fn serve_tls(
    listener: tls::TlsListener,
    router: axum::Router,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    use axum::serve::ListenerExt;
    let listener = listener.tap_io(|_| {});
    axum::serve(listener, router.into_make_service_with_connect_info::<SocketAddr>())
        .with_graceful_shutdown(shutdown)
        .await
}

/// Writes `STATE_DIR/kubeconfig` (mode 0600): one cluster at `url`
/// (`https://127.0.0.1:PORT`) trusting `tls`' certificate, a user with `token`,
/// one context (namespace `default`) that is current. Returns its path.
pub fn write_kubeconfig(state_dir: &Path, url: &str, token: &str, tls: &KubeTls) -> std::io::Result<PathBuf> {
    use base64::Engine;
    let path = state_dir.join("kubeconfig");
    let ca = base64::engine::general_purpose::STANDARD.encode(tls.ca_pem());
    let config = serde_json::json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "molecule", "cluster": {"server": url, "certificate-authority-data": ca}}],
        "users": [{"name": "molecule-admin", "user": {"token": token}}],
        "contexts": [{"name": "molecule", "context": {"cluster": "molecule", "user": "molecule-admin", "namespace": "default"}}],
        "current-context": "molecule",
        "preferences": {},
    });
    // JSON is YAML: kubectl and kube-rs both read it.
    let text = serde_json::to_string_pretty(&config).map_err(std::io::Error::other)?;
    let tmp = state_dir.join(".kubeconfig.tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut file = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&tmp)?;
    file.write_all(text.as_bytes())?;
    file.sync_all()?;
    std::fs::rename(&tmp, &path)?;
    Ok(path)
}

async fn dispatch(
    State(api): State<Arc<KubeApi>>,
    Source(ip): Source,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if !api.authorized(&headers) {
        // As the admin API: wrong tokens spend the source's allowance; once it is
        // spent, the source is answered 429 (the right token always passes).
        if let Some(limiter) = api.limiter.get() {
            let now = std::time::Instant::now();
            if let Err(wait) = limiter.admit(ip, None, now) {
                return ApiError::too_many_requests(wait).into_response();
            }
            limiter.failed(ip, now);
        }
        return ApiError::unauthorized().into_response();
    }
    let started = std::time::Instant::now();
    let query = Query::parse(uri.query().unwrap_or(""));
    let path = uri.path().trim_matches('/');
    let segments: Vec<&str> = if path.is_empty() { vec![] } else { path.split('/').collect() };
    let result = match (method.clone(), segments.as_slice()) {
        (Method::GET, ["version"]) => Ok(discovery::version()),
        (Method::GET, ["api"]) => Ok(discovery::core_versions()),
        (Method::GET, ["api", "v1"]) => Ok(discovery::core_resources()),
        (_, ["api", "v1", "events"]) | (_, ["apis", "events.k8s.io", "v1", "events"]) => {
            api.event_log.handle(&method, None, None, &query, &body)
        }
        (_, ["api", "v1", "namespaces", ns, "events", rest @ ..])
        | (_, ["apis", "events.k8s.io", "v1", "namespaces", ns, "events", rest @ ..])
            if rest.len() <= 1 =>
        {
            api.event_log.handle(&method, Some(ns), rest.first().copied(), &query, &body)
        }
        (_, ["apis", "coordination.k8s.io", "v1", "namespaces", ns, "leases", rest @ ..]) if rest.len() <= 1 => {
            leases::handle(&api, &method, ns, rest.first().copied(), &headers, &body).await
        }
        (Method::GET, ["apis", "metrics.k8s.io", "v1beta1", "pods"]) => {
            metrics::serve(&api, None, &query, uri.path()).await
        }
        (Method::GET, ["apis", "metrics.k8s.io", "v1beta1", "namespaces", ns, "pods"]) => {
            metrics::serve(&api, Some(ns), &query, uri.path()).await
        }
        (Method::GET, ["apis"]) => Ok(discovery::groups()),
        (Method::GET, ["apis", g]) if *g == GROUP => Ok(discovery::group()),
        (Method::GET, ["apis", "coordination.k8s.io"]) => Ok(discovery::coordination_group()),
        (Method::GET, ["apis", "coordination.k8s.io", "v1"]) => Ok(discovery::coordination_resources()),
        (Method::GET, ["apis", g, v]) if *g == GROUP && *v == VERSION => Ok(discovery::resources()),
        (Method::GET, ["openapi", "v3"]) => Ok(discovery::openapi_index(&api)),
        (Method::GET, ["openapi", "v3", "apis", g, v]) if *g == GROUP && *v == VERSION => {
            Ok(discovery::openapi_v3(&api, GROUP))
        }
        (Method::GET, ["openapi", "v3", "api", "v1"]) => Ok(discovery::openapi_v3(&api, "")),
        (_, ["api", "v1", rest @ ..]) => match objects::parse_target("", rest) {
            Some(target) => objects::route(&api, &method, target, &query, &headers, &body).await,
            None => Err(ApiError::not_found_path(uri.path())),
        },
        (_, ["apis", g, v, rest @ ..]) if *g == GROUP && *v == VERSION => match objects::parse_target(GROUP, rest) {
            Some(target) => objects::route(&api, &method, target, &query, &headers, &body).await,
            None => Err(ApiError::not_found_path(uri.path())),
        },
        _ => Err(ApiError::not_found_path(uri.path())),
    };
    let response = match result {
        Ok(response) => response,
        Err(error) => error.into_response(),
    };
    // The API server's request log (a watch is logged when it starts streaming).
    tracing::debug!(
        target: "molecule::kubeapi::access",
        %method,
        uri = %uri,
        status = response.status().as_u16(),
        micros = started.elapsed().as_micros() as u64,
        "kube-api request"
    );
    response
}

/// Query parameters, decoded.
#[derive(Debug, Default)]
pub(crate) struct Query(Vec<(String, String)>);

impl Query {
    fn parse(raw: &str) -> Self {
        Query(
            raw.split('&')
                .filter(|p| !p.is_empty())
                .map(|pair| {
                    let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
                    (percent_decode(k), percent_decode(v))
                })
                .collect(),
        )
    }
    fn get(&self, key: &str) -> Option<&str> {
        self.0.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
    }
    fn flag(&self, key: &str) -> bool {
        matches!(self.get(key), Some("1" | "true" | ""))
    }
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes.get(i + 1..i + 3).and_then(|h| std::str::from_utf8(h).ok());
        match (bytes[i], hex.and_then(|h| u8::from_str_radix(h, 16).ok())) {
            (b'%', Some(b)) => {
                out.push(b);
                i += 3;
            }
            (b'+', _) => {
                out.push(b' ');
                i += 1;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// JSON response with a status code.
fn json_response(code: u16, value: &Value) -> Response {
    let code = axum::http::StatusCode::from_u16(code).unwrap_or(axum::http::StatusCode::OK);
    (code, [(axum::http::header::CONTENT_TYPE, "application/json")], serde_json::to_vec(value).unwrap_or_default())
        .into_response()
}

/// RFC 3339 at second precision, as Kubernetes writes timestamps.
fn now_rfc3339() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}
