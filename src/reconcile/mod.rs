//! The reconcile loop, in steps one can read top to bottom:
//!
//! - `run.rs`: the loop. Triggers (the registry, the CLI, the sources, the runtime's
//!   events, resyncs) feed the work queue; reconciles run concurrently, one per
//!   workspace at a time; resync sweeps run beside the loop, never inside it.
//! - `queue.rs`: the work queue (ordering, coalescing, delayed looks, backoff).
//! - `pass.rs`: one reconcile of one workspace: dereference, plan (the pure rules),
//!   execute, and again until the rules wait; then the status and the decision log.
//! - `dereference.rs`: what a pass reads: the declaration resolved into the rules'
//!   `Desired`, the observation into their `Observed`.
//! - `sweep.rs`: the periodic resync, which asks the same rules about every workspace
//!   from bulk reads and reconciles only those that need it.
//! - `token_memo.rs`: token files' content as last known, so a pass reads a file only
//!   when it may have changed.
//!
//! Every IO handle a reconcile needs lives in [`Context`]; tests build their own.

mod dereference;
mod pass;
pub mod pools;
pub mod queue;
mod run;
#[cfg(test)]
mod scenarios;
pub mod sweep;
pub mod token_memo;

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{broadcast, watch};

pub use self::pass::reconcile;
pub use self::run::run;
use crate::execute::ExecError;
use crate::metrics::Metrics;
use crate::observe::cache::ContainerCache;
use crate::rules::Settings;
use crate::runtime::Runtime;
use crate::runtime::render::AgentEnv;
use crate::source::desired::DesiredSet;
use crate::store::{DynStore, StoreError};
use crate::trigger::Report;

/// How often a resync re-lists every container and re-reads every record, unless told
/// otherwise (`--full-resync-seconds`).
pub const DEFAULT_FULL_RESYNC: Duration = Duration::from_secs(600);

/// Told the hash of every token the operator wrote into a container, as soon as it is
/// written (the registry's failure limiter lets that token be checked from a throttled
/// address; registry/limit.rs).
pub type TokensIssued = Arc<dyn Fn(&str) + Send + Sync>;

/// Every IO handle a reconcile needs; tests build their own.
pub struct Context {
    pub instance: String,
    pub runtime: Arc<dyn Runtime>,
    /// The runtime's containers, kept current by its events (see observe::cache).
    pub containers: Arc<ContainerCache>,
    pub store: DynStore,
    pub desired: watch::Receiver<Arc<DesiredSet>>,
    pub settings: Settings,
    pub agent: AgentEnv,
    pub metrics: Arc<Metrics>,
    pub failpoint: Option<String>,
    /// Opens secrets for delivery into containers.
    pub keyring: Option<Arc<crate::secrets::Keyring>>,
    /// Kubernetes Secrets for `envFrom` (cluster mode only).
    pub secret_objects: Option<Arc<dyn crate::secrets::SecretObjects>>,
    /// Every finished reconcile is published here (status writers subscribe).
    pub reports: broadcast::Sender<Report>,
    /// Heartbeats the registry could not record (shared with it; see rules/liveness.rs).
    pub lost_heartbeats: Arc<crate::store::LostHeartbeats>,
    pub tokens_issued: Option<TokensIssued>,
    /// Set while this replica cannot confirm that it still holds the leader lease (the
    /// database was unreachable for longer than the lease): reconciles do nothing and
    /// retry with backoff until the lease is confirmed (or the process stops, if it was
    /// lost). The database refuses a deposed leader's writes anyway; this keeps it from
    /// acting on containers meanwhile as well.
    pub lease_unconfirmed: Arc<std::sync::atomic::AtomicBool>,
    /// Where the loop's own essential tasks (the container cache's feeder) report.
    pub health: Arc<crate::health::Health>,
    /// The last execution error per workspace (shown in status until it succeeds).
    failures: Mutex<HashMap<String, String>>,
    /// Token files' content as last known: a reconcile reads a file only when it may
    /// have changed since.
    pub token_memo: token_memo::TokenMemo,
    /// What each workspace's last quiet reconcile saw (the resync sweep's memory).
    quiet: Mutex<HashMap<Box<str>, sweep::QuietSnapshot>>,
    /// The secrets' fingerprint as the last sweep (or the start) read it.
    secrets_seen: AtomicU64,
    /// When the last full sweep ran (see `sweep::sweep`).
    sweeps: Mutex<sweep::Sweeps>,
    /// How often a resync is a full sweep rather than a look at what the change log names.
    pub full_resync: Duration,
    /// Each workspace's phase, for the workspaces-by-phase gauge.
    phases: sweep::Phases,
    /// Warm pools' status (for `get warmpools`) and the wake-up of their refill.
    pub pools: Arc<pools::Pools>,
}

impl Context {
    pub fn new(
        instance: String,
        runtime: Arc<dyn Runtime>,
        store: DynStore,
        desired: watch::Receiver<Arc<DesiredSet>>,
        settings: Settings,
        agent: AgentEnv,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            instance,
            runtime,
            containers: Arc::new(ContainerCache::new()),
            store,
            desired,
            settings,
            agent,
            metrics,
            failpoint: std::env::var("MOLECULE_FAILPOINT").ok().filter(|s| !s.is_empty()),
            reports: broadcast::channel(1024).0,
            lost_heartbeats: Arc::default(),
            tokens_issued: None,
            lease_unconfirmed: Arc::default(),
            health: Arc::default(),
            keyring: None,
            secret_objects: None,
            failures: Mutex::new(HashMap::new()),
            token_memo: token_memo::TokenMemo::default(),
            quiet: Mutex::new(HashMap::new()),
            secrets_seen: AtomicU64::new(0),
            sweeps: Mutex::default(),
            full_resync: DEFAULT_FULL_RESYNC,
            phases: sweep::Phases::default(),
            pools: Arc::default(),
        }
    }

    fn failing_keys(&self) -> BTreeSet<String> {
        self.failures.lock().map(|f| f.keys().cloned().collect()).unwrap_or_default()
    }

    fn remember_quiet(&self, key: &str, snapshot: Option<sweep::QuietSnapshot>) {
        let mut memo = self.quiet.lock().unwrap_or_else(|e| e.into_inner());
        match snapshot {
            Some(s) => memo.insert(key.into(), s),
            None => memo.remove(key),
        };
    }

    fn failure(&self, key: &str) -> Option<String> {
        self.failures.lock().ok()?.get(key).cloned()
    }

    fn set_failure(&self, key: &str, message: Option<String>) {
        let Ok(mut f) = self.failures.lock() else { return };
        match message {
            None => f.remove(key),
            Some(message) => f.insert(key.to_string(), message),
        };
    }
}

/// Why a reconcile stopped, by the step that failed.
#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    /// Reading what is (the record, tokens, secrets) or writing the outcome.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Carrying out a decision (the error names the action).
    #[error(transparent)]
    Exec(#[from] ExecError),
    #[error(transparent)]
    Secret(#[from] crate::secrets::SecretError),
    #[error("secrets are set for this workspace but the operator has no secrets key")]
    NoKeyring,
    #[error("not reconciling: the leader lease cannot be confirmed while the state database is unreachable")]
    LeaseUnconfirmed,
    /// A bug: the reconcile panicked. The key is released and retried with backoff.
    #[error("the reconcile panicked: {0}")]
    Panicked(String),
}

impl ReconcileError {
    /// Whether retrying can help by itself. The rest (secrets stored but no key to open
    /// them) waits for something to change: the next trigger, or the periodic resync,
    /// which reconciles failing workspaces.
    pub fn retry_helps(&self) -> bool {
        !matches!(self, Self::NoKeyring)
    }

    pub fn metric_label(&self) -> &'static str {
        match self {
            Self::Store(e) => e.metric_label(),
            Self::Exec(e) => e.metric_label(),
            Self::Secret(_) | Self::NoKeyring => "secret",
            Self::LeaseUnconfirmed => "lease",
            Self::Panicked(_) => "panic",
        }
    }
}

/// When to look at a workspace again after a successful reconcile.
pub type Requeue = Option<Duration>;
