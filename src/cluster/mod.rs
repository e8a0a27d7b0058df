//! Cluster mode: Workspaces and Teams are Kubernetes custom resources.
//!
//! - [`source`] watches them and sends the desired store a full `Snapshot` on every
//!   change (objects being deleted are left out, malformed ones become `Invalid`);
//! - [`controller`] is a kube-runtime `Controller` over Workspaces: it holds the
//!   `molecule.ai/cleanup` finalizer, drives the one reconcile queue through the
//!   `Trigger` (it never touches containers itself), writes status by server-side
//!   apply and publishes Events for the decisions a user should see;
//! - [`leader`] elects one acting replica with a `coordination.k8s.io/v1` Lease;
//! - [`secrets`] reflects Opaque Secrets for `envFrom` and triggers their users;
//! - [`secrets_key`] keeps the secrets key in a Secret of the operator's namespace;
//! - [`pools`] writes each WarmPool's status (its members' counts, Ready).
//!
//! [`run`] starts the source, the controller and the status writer; the caller
//! acquires leadership first ([`leader::acquire`]) and stops acting when it is lost.

pub mod controller;
pub mod events;
pub mod leader;
pub mod pools;
pub mod secrets;
pub mod secrets_key;
pub mod source;

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{broadcast, mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::source::Snapshot;
use crate::source::desired::DesiredSet;
use crate::trigger::{Report, Trigger};

/// The finalizer that keeps a Workspace until its container, volume and tokens are gone.
pub const FINALIZER: &str = "molecule.ai/cleanup";
/// Field manager of every server-side apply, and the Events' reporting controller.
pub const FIELD_MANAGER: &str = "molecule-operator";
/// Name of the desired-store source this module feeds.
pub const SOURCE_NAME: &str = "kubernetes";
/// Default Lease name for leader election.
pub const LEASE_NAME: &str = "molecule-operator";

/// One (API group, resource, verbs) the operator calls in cluster mode. deploy/'s RBAC
/// grants exactly these (tests/deploy_rbac.rs), and the mock-apiserver tests check
/// that every request they see is listed here.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ApiUse {
    pub group: &'static str,
    /// `resource` or `resource/subresource`.
    pub resource: &'static str,
    pub verbs: &'static [&'static str],
    /// Only needed in the operator's own namespace (granted by a Role, not the ClusterRole).
    pub own_namespace: bool,
}

pub const API_USES: &[ApiUse] = &[
    // source + controller watches; finalizer add/remove is a JSON patch; the Pod runtime
    // reads a Workspace's uid to make it the owner of its Pod, claim and Secret.
    ApiUse {
        group: "molecule.ai",
        resource: "workspaces",
        verbs: &["get", "list", "watch", "patch"],
        own_namespace: false,
    },
    ApiUse { group: "molecule.ai", resource: "workspaces/status", verbs: &["patch"], own_namespace: false },
    ApiUse { group: "molecule.ai", resource: "teams", verbs: &["list", "watch"], own_namespace: false },
    ApiUse { group: "molecule.ai", resource: "teams/status", verbs: &["patch"], own_namespace: false },
    // Warm pools: watched; their status (member counts, Ready) written by server-side apply.
    ApiUse { group: "molecule.ai", resource: "warmpools", verbs: &["list", "watch"], own_namespace: false },
    ApiUse { group: "molecule.ai", resource: "warmpools/status", verbs: &["patch"], own_namespace: false },
    // Recorder: create, then patch the series of a repeated event.
    ApiUse { group: "events.k8s.io", resource: "events", verbs: &["create", "patch"], own_namespace: false },
    // envFrom reflects Opaque Secrets; the Pod runtime writes (server-side apply),
    // reads and deletes each workspace's token Secret and watches them by label.
    ApiUse {
        group: "",
        resource: "secrets",
        verbs: &["get", "list", "watch", "patch", "delete"],
        own_namespace: false,
    },
    // The Pod runtime (--runtime kubernetes): a workspace is a Pod and a claim; a
    // claimed warm-pool member's are relabelled as the workspace's (merge patch).
    ApiUse {
        group: "",
        resource: "pods",
        verbs: &["get", "list", "watch", "create", "patch", "delete"],
        own_namespace: false,
    },
    ApiUse {
        group: "",
        resource: "persistentvolumeclaims",
        verbs: &["get", "list", "watch", "create", "patch", "delete"],
        own_namespace: false,
    },
    // Usage of the workspaces' Pods, where the cluster serves the resource metrics API
    // (metrics-server); one list per namespace by the instance label.
    ApiUse { group: "metrics.k8s.io", resource: "pods", verbs: &["list"], own_namespace: false },
    // The secrets key: a Secret in the operator's own namespace, created once when
    // missing (it is read with the `get` above). `create` cannot be limited by name.
    ApiUse { group: "", resource: "secrets", verbs: &["create"], own_namespace: true },
    ApiUse {
        group: "coordination.k8s.io",
        resource: "leases",
        verbs: &["get", "create", "update"],
        own_namespace: true,
    },
];

/// Everything that can go wrong in cluster mode. `metric_label` is stable.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes API call failed: {0}")]
    Kube(#[from] kube::Error),
    #[error("finalizer {FINALIZER}: {0}")]
    Finalizer(#[source] Box<kube::runtime::finalizer::Error<Error>>),
    #[error("Workspace {0} has an invalid spec; fix it and the operator retries on the next change")]
    InvalidSpec(String),
    #[error("reconcile of {key} failed: {message}")]
    ReconcileFailed { key: String, message: String },
    #[error("Workspace {0} is not in the desired set yet")]
    NotYetDesired(String),
    #[error("Workspace {0} is being deleted; waiting for its container and tokens to be removed")]
    CleanupPending(String),
    #[error("the operator is shutting down")]
    ShuttingDown,
    #[error("lost the leader lease {0}; another replica acts now")]
    LeadershipLost(String),
    #[error("cannot serialize status: {0}")]
    Serialize(#[from] serde_json::Error),
    #[error("cannot configure the Kubernetes client: {0}")]
    Config(String),
}

impl Error {
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::Kube(_) => "kube",
            Error::Finalizer(e) => match e.as_ref() {
                kube::runtime::finalizer::Error::ApplyFailed(inner)
                | kube::runtime::finalizer::Error::CleanupFailed(inner) => inner.metric_label(),
                _ => "finalizer",
            },
            Error::InvalidSpec(_) => "invalid_spec",
            Error::ReconcileFailed { .. } => "reconcile_failed",
            Error::NotYetDesired(_) => "not_yet_desired",
            Error::CleanupPending(_) => "cleanup_pending",
            Error::ShuttingDown => "shutting_down",
            Error::LeadershipLost(_) => "leadership_lost",
            Error::Serialize(_) => "serialize",
            Error::Config(_) => "config",
        }
    }

    /// The error wrapped by the finalizer helper, if any.
    pub fn inner(&self) -> &Error {
        match self {
            Error::Finalizer(e) => match e.as_ref() {
                kube::runtime::finalizer::Error::ApplyFailed(inner)
                | kube::runtime::finalizer::Error::CleanupFailed(inner) => inner.inner(),
                _ => self,
            },
            _ => self,
        }
    }
}

/// A client from a kubeconfig file (local mode: `STATE/kubeconfig` written by
/// `up --kube-api`), or, with None, the usual inference: in-cluster service account,
/// then `$KUBECONFIG` / `~/.kube/config`.
pub async fn client(kubeconfig: Option<&std::path::Path>) -> Result<kube::Client, Error> {
    use kube::config::{Config, KubeConfigOptions, Kubeconfig};
    let config = match kubeconfig {
        Some(path) => {
            let kc = Kubeconfig::read_from(path)
                .map_err(|e| Error::Config(format!("cannot read kubeconfig {}: {e}", path.display())))?;
            Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
                .await
                .map_err(|e| Error::Config(format!("kubeconfig {}: {e}", path.display())))?
        }
        None => Config::infer()
            .await
            .map_err(|e| Error::Config(format!("no in-cluster config and no usable kubeconfig: {e}")))?,
    };
    kube::Client::try_from(config).map_err(|e| Error::Config(e.to_string()))
}

/// Blocks until this replica holds the leader Lease (or `shutdown`). The returned
/// [`leader::Leadership::lost`] is cancelled the moment leadership is lost: stop acting
/// (cancel the operator's shutdown token and exit; the Deployment restarts the pod as a
/// standby). Serve /healthz before calling this, or a standby fails its liveness probe.
pub async fn wait_for_leadership(
    client: kube::Client,
    lease: leader::LeaseConfig,
    shutdown: CancellationToken,
) -> Result<leader::Leadership, Error> {
    leader::acquire(client, lease, shutdown).await
}

/// What [`run`] needs from the rest of the operator.
pub struct Wiring {
    /// The desired store's input: this source's snapshots are named [`SOURCE_NAME`].
    pub snapshots: mpsc::Sender<Snapshot>,
    /// The merged desired set (the controller waits for its object to be in it).
    pub desired: watch::Receiver<Arc<DesiredSet>>,
    /// The reconcile queue's handle.
    pub trigger: Trigger,
    /// `Context.reports` of the reconcile queue: status and events for every reconcile.
    pub reports: broadcast::Sender<Report>,
    /// Feeds the reconcile context's view of Secrets (`envFrom`), when it has one.
    pub secrets: Option<secrets::SecretsWriter>,
    /// The state store, where the `molecule.ai/wake` annotation's wakes are recorded.
    pub store: Option<crate::store::DynStore>,
    /// The warm pools' statuses as the pool pass publishes them, written back to the
    /// WarmPools (their status subresource).
    pub pools: Option<Arc<crate::reconcile::pools::Pools>>,
}

/// Options of cluster mode.
#[derive(Clone, Debug)]
pub struct Options {
    /// Watch one namespace, or all when None.
    pub namespace: Option<String>,
    /// Reporting instance of Events (e.g. the pod name).
    pub identity: String,
    /// How long the controller waits for the desired store to reflect an object.
    pub desired_wait: Duration,
}

impl Default for Options {
    fn default() -> Self {
        Self { namespace: None, identity: FIELD_MANAGER.to_string(), desired_wait: Duration::from_secs(5) }
    }
}

/// Runs the Kubernetes source, the Workspace controller and the status/events writer
/// until `shutdown` (or until the controller stops). Call it only while this replica
/// leads (see [`leader::acquire`]); cancel `shutdown` when leadership is lost.
pub async fn run(
    client: kube::Client,
    options: Options,
    wiring: Wiring,
    shutdown: CancellationToken,
) -> Result<(), Error> {
    let stop = shutdown.child_token();
    let (sent_tx, sent_rx) = watch::channel(source::SentMap::new());
    let (teams, team_writer) = kube::runtime::reflector::store();
    let (pool_objects, pool_writer) = kube::runtime::reflector::store();
    let source = tokio::spawn(source::run(
        client.clone(),
        options.namespace.clone(),
        wiring.snapshots.clone(),
        sent_tx,
        team_writer,
        pool_writer,
        stop.clone(),
    ));
    let pool_status = wiring.pools.clone().map(|published| {
        tokio::spawn(pools::run(client.clone(), pool_objects, published, wiring.desired.clone(), stop.clone()))
    });
    let secrets = wiring.secrets.map(|feed| {
        let api = match &options.namespace {
            Some(ns) => kube::Api::namespaced(client.clone(), ns),
            None => kube::Api::all(client.clone()),
        };
        tokio::spawn(secrets::run(api, feed, wiring.desired.clone(), wiring.trigger.clone(), stop.clone()))
    });
    let controller = controller::build(client.clone(), options.namespace.as_deref());
    let mut ctx = controller::ControllerContext::new(
        client,
        &options,
        wiring.trigger.clone(),
        wiring.desired.clone(),
        sent_rx,
        controller.store(),
        teams,
    );
    ctx.wake_store = wiring.store.clone();
    let ctx = Arc::new(ctx);
    let writer = tokio::spawn(controller::write_reports(ctx.clone(), wiring.reports.subscribe(), stop.clone()));
    controller::run(ctx, controller, stop.clone()).await;
    stop.cancel();
    let _ = writer.await;
    if let Some(secrets) = secrets {
        let _ = secrets.await;
    }
    if let Some(pool_status) = pool_status {
        let _ = pool_status.await;
    }
    match source.await {
        Ok(r) => r,
        Err(_) => Ok(()),
    }
}
