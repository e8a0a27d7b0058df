//! The reconcile loop: a per-workspace queue (one reconcile in flight per key,
//! triggers arriving meanwhile coalesce into one more pass, failures back off) and
//! `reconcile`, which observes, plans with the pure rules, executes, and repeats
//! until no rule has anything to do, then writes the status whole.

pub mod status;
pub mod sweep;
pub mod token_memo;

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::Utc;
use futures::StreamExt;
use tokio::sync::{broadcast, mpsc, oneshot, watch};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tokio_util::time::{DelayQueue, delay_queue};

use crate::api::{ObjectKey, WorkspaceStatus};
use crate::execute::{Env, ExecError};
use crate::observe::cache::{self, ContainerCache, Feed};
use crate::observe::observe;
use crate::registry::metrics::Metrics;
use crate::rules::{Action, Ctx, Desired, Settings, plan, quota};
use crate::runtime::Runtime;
use crate::runtime::render::{AgentEnv, Identity, render};
use crate::source::desired::{DesiredSet, DesiredWorkspace};
use crate::store::{DecisionRecord, DynStore, StoreError};

/// A request to reconcile one workspace (`ns/name`).
#[derive(Debug)]
pub struct Request {
    pub key: String,
    /// Names the trigger for logs and metrics: "registry-401", "docker-event", ...
    pub why: &'static str,
    /// Told the outcome of the first reconcile of `key` that starts after the request.
    pub done: Option<oneshot::Sender<Report>>,
    /// For a resync (empty `key`): told how many workspaces it queued for a reconcile.
    pub resynced: Option<oneshot::Sender<usize>>,
}

/// What one finished reconcile did, for whoever writes status back to where the
/// object came from (Kubernetes status, Postgres columns) and for waiters.
#[derive(Clone, Debug, Default)]
pub struct Report {
    pub key: String,
    /// The status as written to the state store; None when the workspace is unknown
    /// or was forgotten.
    pub status: Option<WorkspaceStatus>,
    /// Decisions taken in this reconcile, in order.
    pub decisions: Vec<DecisionRecord>,
    /// The workspace's record was deleted: its removal is complete.
    pub forgotten: bool,
    /// The error that stopped it (it will be retried with backoff).
    pub error: Option<String>,
}

/// The `why` of a resync that must be a full sweep.
pub const FULL_RESYNC: &str = "full-resync";

/// Asks for workspaces to be reconciled soon. Cheap and non-blocking; repeated
/// requests for the same key coalesce.
#[derive(Clone, Debug)]
pub struct Trigger {
    tx: mpsc::UnboundedSender<Request>,
}

impl Trigger {
    pub fn new() -> (Self, mpsc::UnboundedReceiver<Request>) {
        let (tx, rx) = mpsc::unbounded_channel();
        (Self { tx }, rx)
    }

    /// `why` names the trigger for logs and metrics: "registry-401", "docker-event", ...
    pub fn enqueue(&self, key: &str, why: &'static str) {
        let _ = self.tx.send(Request { key: key.to_string(), why, done: None, resynced: None });
    }

    /// Asks for a full resync now, as the periodic one does: every declared, recorded or
    /// labelled workspace is looked at.
    pub fn resync(&self, why: &'static str) {
        let _ = self.tx.send(Request { key: String::new(), why, done: None, resynced: None });
    }

    /// `resync`, and waits until it has decided which workspaces need a reconcile;
    /// returns how many it queued. None when the operator is shutting down. `why`
    /// [`FULL_RESYNC`] asks for a full sweep (every container listed, every record read).
    pub async fn resync_and_wait(&self, why: &'static str) -> Option<usize> {
        let (tx, rx) = oneshot::channel();
        self.tx.send(Request { key: String::new(), why, done: None, resynced: Some(tx) }).ok()?;
        rx.await.ok()
    }

    /// Enqueues and waits for the outcome of a reconcile that starts after this call.
    /// None when the operator is shutting down.
    pub async fn reconcile_and_wait(&self, key: &str, why: &'static str) -> Option<Report> {
        let (done, rx) = oneshot::channel();
        self.tx.send(Request { key: key.to_string(), why, done: Some(done), resynced: None }).ok()?;
        rx.await.ok()
    }
}

/// How often a resync re-lists every container and re-reads every record, unless told
/// otherwise (`--full-resync-seconds`).
pub const DEFAULT_FULL_RESYNC: Duration = Duration::from_secs(600);

/// Most passes one reconcile makes (observe, plan, execute) before it yields.
const MAX_PASSES: usize = 6;
/// Decisions kept per workspace for `describe`.
const DECISIONS_KEPT: i64 = 50;

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
    /// Heartbeats the registry could not record (shared with it; see the heartbeat rule).
    pub lost_heartbeats: Arc<crate::store::LostHeartbeats>,
    /// The registry's failure limiter, told about every token issued.
    pub limiter: Option<Arc<crate::registry::limit::FailureLimiter>>,
    /// Set while this replica cannot confirm that it still holds the leader lease (the
    /// database was unreachable for longer than the lease): reconciles do nothing and
    /// retry with backoff until the lease is confirmed (or the process stops, if it was
    /// lost). The database refuses a deposed leader's writes anyway; this keeps it from
    /// acting on containers meanwhile as well.
    pub lease_unconfirmed: Arc<std::sync::atomic::AtomicBool>,
    /// The last execution error per workspace (shown in status until it succeeds).
    failures: Mutex<HashMap<String, Failure>>,
    /// Token files' content as last known: a reconcile reads a file only when it may
    /// have changed since.
    pub token_memo: token_memo::TokenMemo,
    /// What each workspace's last quiet reconcile saw (the resync sweep's memory).
    seen: Mutex<HashMap<Box<str>, sweep::Seen>>,
    /// The secrets' fingerprint as the last sweep (or the start) read it.
    secrets_seen: AtomicU64,
    /// When the last full sweep ran (see `sweep::sweep`).
    sweeps: Mutex<sweep::Sweeps>,
    /// How often a resync is a full sweep rather than a look at what the change log names.
    pub full_resync: Duration,
    /// Each workspace's phase, for the workspaces-by-phase gauge.
    phases: sweep::Phases,
}

#[derive(Clone, Debug)]
struct Failure {
    message: String,
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
            limiter: None,
            lease_unconfirmed: Arc::default(),
            keyring: None,
            secret_objects: None,
            failures: Mutex::new(HashMap::new()),
            token_memo: token_memo::TokenMemo::default(),
            seen: Mutex::new(HashMap::new()),
            secrets_seen: AtomicU64::new(0),
            sweeps: Mutex::default(),
            full_resync: DEFAULT_FULL_RESYNC,
            phases: sweep::Phases::default(),
        }
    }

    fn failing_keys(&self) -> BTreeSet<String> {
        self.failures.lock().map(|f| f.keys().cloned().collect()).unwrap_or_default()
    }

    fn remember(&self, key: &str, seen: Option<sweep::Seen>) {
        let mut memo = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        match seen {
            Some(seen) => memo.insert(key.into(), seen),
            None => memo.remove(key),
        };
    }

    fn failure(&self, key: &str) -> Option<Failure> {
        self.failures.lock().ok()?.get(key).cloned()
    }

    fn set_failure(&self, key: &str, message: Option<String>) {
        let Ok(mut f) = self.failures.lock() else { return };
        match message {
            None => f.remove(key),
            Some(message) => f.insert(key.to_string(), Failure { message }),
        };
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Exec(#[from] ExecError),
    #[error(transparent)]
    Secret(#[from] crate::secrets::SecretError),
    #[error("secrets are set for this workspace but the operator has no secrets key")]
    NoKeyring,
    #[error("not reconciling: the leader lease cannot be confirmed while the state database is unreachable")]
    LeaseUnconfirmed,
}

impl ReconcileError {
    pub fn metric_label(&self) -> &'static str {
        match self {
            Self::Store(e) => e.metric_label(),
            Self::Exec(e) => e.metric_label(),
            Self::Secret(_) | Self::NoKeyring => "secret",
            Self::LeaseUnconfirmed => "lease",
        }
    }
}

/// When to look at a workspace again after a successful reconcile.
pub type Requeue = Option<Duration>;

/// The secrets a workspace receives as env vars: the Kubernetes Secrets its
/// `envFrom` names, then the operator's global, team and own secrets (each
/// overriding the one before). `hold` says why a needed Secret cannot be read.
async fn secret_env(ctx: &Context, d: &DesiredWorkspace) -> Result<crate::secrets::EnvFrom, ReconcileError> {
    use crate::secrets::Scope;
    let Ok(spec) = &d.spec else { return Ok(Default::default()) };
    let mut out = crate::secrets::env_from(&d.key.namespace, &spec.env_from, ctx.secret_objects.as_deref());
    let mut scopes = vec![Scope::Global];
    if let Some(team) = d.team() {
        scopes.push(Scope::Team(format!("{}/{team}", d.key.namespace)));
    }
    scopes.push(Scope::Workspace(d.key.to_string()));
    let names: Vec<String> = scopes.iter().map(Scope::as_string).collect();
    let rows = ctx.store.secrets(&names).await?;
    if rows.is_empty() {
        return Ok(out);
    }
    let keyring = ctx.keyring.as_ref().ok_or(ReconcileError::NoKeyring)?;
    for scope in &scopes {
        let scope_name = scope.as_string();
        for row in rows.iter().filter(|r| r.scope == scope_name) {
            let sealed = crate::secrets::Sealed {
                key_id: row.key_id.clone(),
                nonce: row.nonce.clone(),
                ciphertext: row.ciphertext.clone(),
            };
            out.env.insert(row.name.clone(), keyring.open(scope, &row.name, &sealed)?);
        }
    }
    Ok(out)
}

fn to_rule_desired(
    d: &DesiredWorkspace,
    secrets: crate::secrets::EnvFrom,
    instance: &str,
    uid: &str,
    agent: &AgentEnv,
) -> Desired {
    let key = d.key.to_string();
    // Secrets join the env here only: never in the desired set the API shows.
    let spec = d.spec.clone().map(|mut s| {
        s.env.extend(secrets.env);
        s
    });
    let spec_hash = match &spec {
        Ok(spec) => {
            let cs = render(spec, &Identity { instance, key: &key, uid }, agent);
            cs.labels.get(crate::runtime::labels::SPEC_HASH).cloned().unwrap_or_default()
        }
        Err(_) => String::new(),
    };
    Desired {
        key: d.key.clone(),
        generation: d.generation,
        spec,
        spec_hash,
        source: d.source.clone(),
        secrets_hold: secrets.hold,
    }
}

/// Reconciles one workspace until desired and observed agree (or a step fails),
/// and publishes what it did.
pub async fn reconcile(ctx: &Context, key: &str) -> (Result<Requeue, ReconcileError>, Report) {
    let mut report = Report { key: key.to_string(), ..Report::default() };
    let result = reconcile_into(ctx, key, &mut report).await;
    if let Err(e) = &result {
        report.error = Some(e.to_string());
    }
    let _ = ctx.reports.send(report.clone());
    (result, report)
}

async fn reconcile_into(ctx: &Context, key: &str, report: &mut Report) -> Result<Requeue, ReconcileError> {
    let okey = ObjectKey::parse(key);
    let env = Env {
        runtime: ctx.runtime.as_ref(),
        store: ctx.store.as_ref(),
        instance: &ctx.instance,
        agent: &ctx.agent,
        failpoint: ctx.failpoint.as_deref(),
        vouch: ctx.limiter.as_deref(),
    };
    for _ in 0..MAX_PASSES {
        if ctx.lease_unconfirmed.load(std::sync::atomic::Ordering::Acquire) {
            return Err(ReconcileError::LeaseUnconfirmed);
        }
        let set = ctx.desired.borrow().clone();
        let declared = set.workspaces.get(&okey);
        if declared.is_none() && !set.complete {
            return Ok(None); // not every source has spoken yet: never remove on partial knowledge
        }
        let now = Utc::now();
        let record = match declared {
            Some(_) => Some(ctx.store.ensure_workspace(key, now).await?),
            None => ctx.store.workspace(key).await?,
        };
        // Read before the secrets are: a secret changed meanwhile then counts as changed.
        let secrets_seen = ctx.secrets_seen.load(Ordering::SeqCst);
        let desired = match (declared, &record) {
            (Some(d), Some(r)) => {
                Some(to_rule_desired(d, secret_env(ctx, d).await?, &ctx.instance, &r.uid, &ctx.agent))
            }
            _ => None,
        };
        let read_token = desired.as_ref().is_some_and(|d| d.spec.is_ok());
        let mut observed =
            observe(ctx.runtime.as_ref(), ctx.store.as_ref(), &ctx.containers, key, record.clone(), false).await?;
        if read_token {
            ctx.token_memo.observe(ctx.runtime.as_ref(), key, &mut observed).await;
        }
        if let (Some(d), Some(_)) = (declared, &observed.containers) {
            observed.quota_hold = quota_hold(ctx, &set, d).await?;
        }
        observed.heartbeats_lost_at = ctx.lost_heartbeats.last();
        if observed.record.is_none() && observed.containers.as_ref().is_none_or(|c| c.is_empty()) {
            return Ok(None); // never seen, not declared: nothing to do
        }
        let rctx = Ctx { desired: desired.as_ref(), observed: &observed, now, settings: &ctx.settings };
        let Some(decision) = plan(&rctx) else {
            report.status = write_status(ctx, key, &rctx, declared).await?;
            // Only what was seen with the containers known is worth remembering.
            ctx.remember(
                key,
                desired.as_ref().filter(|_| observed.containers.is_some()).map(|d| sweep::Seen {
                    generation: d.generation,
                    secrets: secrets_seen,
                    spec_hash: d.spec_hash.as_str().into(),
                    container: observed.container().map(|c| c.id.as_str().into()),
                    token_file: (&observed.token_file).into(),
                }),
            );
            return Ok(next_look(&rctx));
        };
        tracing::info!(workspace = key, rule = decision.rule, cause = %decision.cause, "decision");
        let (outcome, result) = env.apply(&rctx, &decision.actions, now).await;
        for (container_id, hash) in &outcome.written {
            // As of now, after the write returned: its own copy event is not newer.
            ctx.token_memo.record(key, container_id, hash, Utc::now());
        }
        if decision.actions.iter().any(Action::changes_containers) {
            // Read our own writes before looking again (the events come later). A failure
            // leaves the cache unknown, which the next pass respects.
            let uid = record.as_ref().map(|r| r.uid.as_str());
            let _ = ctx.containers.refresh_workspace(ctx.runtime.as_ref(), key, uid).await;
        }
        for (reason, n) in &outcome.revoked {
            ctx.metrics.revoked(*reason, *n);
        }
        for _ in 0..outcome.issued {
            ctx.metrics.issued();
        }
        let outcome_text = match &result {
            Ok(()) => "ok".to_string(),
            Err(e) => format!("failed: {e}"),
        };
        ctx.metrics.reconciled(decision.rule, if result.is_ok() { "ok" } else { "error" });
        let forgotten = decision.actions.contains(&Action::Forget) && result.is_ok();
        let rec = DecisionRecord {
            at: now,
            rule: decision.rule.to_string(),
            cause: decision.cause.clone(),
            actions: if outcome.done.is_empty() {
                decision.actions.iter().map(Action::describe).collect()
            } else {
                outcome.done.clone()
            },
            outcome: outcome_text,
        };
        if let (Some(r), false) = (&record, forgotten) {
            ctx.store.append_decision(&r.uid, &rec, DECISIONS_KEPT).await?;
        }
        report.decisions.push(rec);
        if let Err(e) = result {
            ctx.set_failure(key, Some(e.to_string()));
            // Show the failure in status before backing off.
            if let Some(r) = ctx.store.workspace(key).await? {
                let mut observed =
                    observe(ctx.runtime.as_ref(), ctx.store.as_ref(), &ctx.containers, key, Some(r), false).await?;
                observed.heartbeats_lost_at = ctx.lost_heartbeats.last();
                let rctx =
                    Ctx { desired: desired.as_ref(), observed: &observed, now: Utc::now(), settings: &ctx.settings };
                report.status = write_status(ctx, key, &rctx, declared).await?;
            }
            return Err(e.into());
        }
        ctx.set_failure(key, None);
        if forgotten {
            ctx.remember(key, None);
            ctx.phases.set(key, None);
            report.forgotten = true;
            return Ok(None);
        }
    }
    Ok(Some(Duration::from_millis(200)))
}

/// The team a declared workspace belongs to and its quota limits, if it has any.
fn team_limits<'a>(set: &'a DesiredSet, d: &DesiredWorkspace) -> Option<(&'a str, quota::Limits)> {
    let team_name = d.team()?;
    let (key, team) = set.teams.iter().find(|(k, _)| k.namespace == d.key.namespace && k.name == team_name)?;
    let limits = quota::Limits { max_workspaces: team.spec.max_workspaces, max_running: team.spec.max_running };
    (limits != quota::Limits::default()).then_some((key.name.as_str(), limits))
}

/// Members of the same team, as the quota sees them. Only computed for teams that
/// have limits.
async fn quota_hold(ctx: &Context, set: &DesiredSet, d: &DesiredWorkspace) -> Result<Option<String>, StoreError> {
    let Some((team, limits)) = team_limits(set, d) else { return Ok(None) };
    let members: Vec<&DesiredWorkspace> = set
        .workspaces
        .values()
        .filter(|w| w.key.namespace == d.key.namespace && team_limits(set, w).is_some_and(|(t, _)| t == team))
        .collect();
    let mut records: HashMap<String, crate::store::WorkspaceRecord> =
        ctx.store.list_workspaces().await?.into_iter().map(|r| (r.key.clone(), r)).collect();
    // Every member gets its first-seen time now, so that concurrent reconciles of the
    // team all rank the members the same way and never start more than the quota.
    for w in &members {
        let key = w.key.to_string();
        if let std::collections::hash_map::Entry::Vacant(slot) = records.entry(key.clone()) {
            slot.insert(ctx.store.ensure_workspace(&key, Utc::now()).await?);
        }
    }
    let mut looked = Vec::with_capacity(members.len());
    for w in &members {
        let record = records.get(&w.key.to_string());
        let mine = match record {
            // Unknown (the cache went unknown since this pass observed): hold, never
            // count a member as having no container.
            Some(r) => match ctx.containers.containers_of_uid(&r.uid) {
                Some(mine) => mine,
                None => return Ok(Some("waiting until Docker's containers can be listed".to_string())),
            },
            None => Vec::new(),
        };
        looked.push((*w, record, mine));
    }
    let members: Vec<quota::Member> = looked
        .into_iter()
        .map(|(w, record, mine)| {
            let mode = record
                .and_then(|r| r.mode_override)
                .or(w.spec.as_ref().ok().map(|s| s.operating_mode))
                .unwrap_or_default();
            quota::Member {
                name: w.key.name.clone(),
                first_seen: record.map(|r| r.created_at),
                has_container: !mine.is_empty(),
                running: mine.iter().any(|c| c.state == crate::rules::ContainerState::Running),
                wants_container: w.spec.is_ok() && mode != crate::api::OperatingMode::Stopped,
                wants_running: w.spec.is_ok() && mode == crate::api::OperatingMode::Running,
            }
        })
        .collect();
    Ok(quota::hold(team, limits, &members, &d.key.name))
}

/// Computes and (when it changed) saves the status; returns it.
async fn write_status(
    ctx: &Context,
    key: &str,
    rctx: &Ctx<'_>,
    declared: Option<&DesiredWorkspace>,
) -> Result<Option<WorkspaceStatus>, StoreError> {
    let Some(record) = rctx.observed.record.as_ref() else { return Ok(None) };
    let failure = ctx.failure(key);
    let extra = status::Extra {
        last_error: failure.as_ref().map(|f| f.message.as_str()),
        conflict: declared.and_then(|d| d.conflict.as_deref()),
        deletion_refused: declared.and_then(|d| d.deletion_refused.as_deref()),
    };
    let st = status::compute(rctx, &extra, record.status.as_ref());
    if record.status.as_ref() != Some(&st) {
        ctx.store.save_status(&record.uid, &st).await?;
    }
    ctx.phases.set(key, Some(st.phase));
    Ok(Some(st))
}

/// After a quiet pass: look again when the agent's heartbeat would be overdue (or,
/// while waiting for a new agent's first heartbeat, soon, so the phase flips
/// promptly), when the token is due for rotation, or when an overlap ends.
fn next_look(rctx: &Ctx<'_>) -> Requeue {
    let heartbeat = heartbeat_look(rctx);
    let token_times = rctx.spec().into_iter().flat_map(|spec| {
        rctx.observed.live_tokens.iter().filter_map(move |t| match t.expires_at {
            Some(e) => Some(e),
            None => crate::rules::rotation::due(spec, t),
        })
    });
    let token = token_times.map(|at| (at - rctx.now).to_std().unwrap_or_default() + Duration::from_millis(50)).min();
    heartbeat.into_iter().chain(token).min()
}

fn heartbeat_look(rctx: &Ctx<'_>) -> Requeue {
    let c = rctx.observed.container()?;
    if c.state != crate::rules::ContainerState::Running {
        return None;
    }
    let ttl = rctx.settings.heartbeat_ttl;
    let record = rctx.observed.record.as_ref()?;
    let heard = record.last_heartbeat_at.filter(|h| Some(*h) >= c.provisioned_at());
    let Some(from) = heard.or(c.provisioned_at()) else {
        return Some(rctx.settings.heartbeat_interval.min(ttl));
    };
    let silent = crate::rules::heartbeat::silent_since(from, rctx.observed);
    let due = (silent + chrono::Duration::from_std(ttl).ok()? - rctx.now).to_std().unwrap_or_default();
    let due = due + Duration::from_millis(100);
    if heard.is_some() {
        return Some(due);
    }
    // No heartbeat yet. The registry queues a reconcile on an agent's first heartbeat,
    // so these looks are for heartbeats another replica recorded (which flip the phase
    // to Running) and for the deadline. They back off, one heartbeat interval at first,
    // then as long again as the agent has been waiting: n agents that never come up
    // (a broken image, or 100,000 provisioned at once) cost a few reconciles each
    // before their deadline, not one per interval.
    let waited = (rctx.now - from).to_std().unwrap_or_default();
    Some(due.min(waited.max(rctx.settings.heartbeat_interval)))
}

/// Backoff after the n-th consecutive failure: 0.5 s doubling, at most 30 s.
pub fn backoff(attempt: u32) -> Duration {
    let ms = 500u64.saturating_mul(1 << attempt.saturating_sub(1).min(6));
    Duration::from_millis(ms.min(30_000))
}

/// Every key worth a look on a resync: declared, known to the store, or labelled.
async fn all_keys(ctx: &Context) -> BTreeSet<String> {
    let mut keys: BTreeSet<String> = ctx.desired.borrow().workspaces.keys().map(|k| k.to_string()).collect();
    match ctx.store.list_workspaces().await {
        Ok(records) => {
            ctx.phases.replace(
                records
                    .iter()
                    .map(|r| (r.key.clone(), r.status.as_ref().map(|s| s.phase).unwrap_or_default()))
                    .collect(),
            );
            ctx.phases.publish(&ctx.metrics);
            keys.extend(records.into_iter().map(|r| r.key));
        }
        Err(e) => tracing::warn!(error = %e, "resync could not list workspace records"),
    }
    // The resync's one full listing: it also repairs anything the events missed.
    if ctx.containers.relist(ctx.runtime.as_ref()).await.is_ok()
        && let Some(labelled) = ctx.containers.workspace_keys()
    {
        keys.extend(labelled);
    }
    keys
}

/// Runs the queue until `shutdown`. Triggers come from `triggers` (registry, CLI),
/// the runtime's events, changes of the desired set, and a periodic resync.
pub async fn run(
    ctx: Arc<Context>,
    mut triggers: mpsc::UnboundedReceiver<Request>,
    resync: Duration,
    concurrency: usize,
    shutdown: CancellationToken,
) {
    let mut desired_rx = ctx.desired.clone();
    let mut last_set = desired_rx.borrow().clone();
    if let Ok(rows) = ctx.store.secrets(&[]).await {
        ctx.secrets_seen.store(sweep::secrets_fingerprint(&rows), Ordering::SeqCst);
    }
    // The container cache's feeder: passes each runtime event on once the cache holds it.
    let (feed_tx, mut feed) = mpsc::unbounded_channel();
    tokio::spawn(cache::feed(ctx.containers.clone(), ctx.runtime.clone(), feed_tx, shutdown.child_token()));
    let mut resync_tick = tokio::time::interval(resync);
    let mut running: JoinSet<(String, Result<Requeue, ReconcileError>, Report)> = JoinSet::new();
    // Waiters for the next reconcile of a key to start, and for the one running now.
    let mut waiting: HashMap<String, Vec<oneshot::Sender<Report>>> = HashMap::new();
    let mut waiting_running: HashMap<String, Vec<oneshot::Sender<Report>>> = HashMap::new();
    let mut in_flight: HashMap<String, bool> = HashMap::new(); // key -> dirty
    let mut ready = Ready::default();
    let mut delayed: DelayQueue<String> = DelayQueue::new();
    let mut delay_keys: HashMap<String, delay_queue::Key> = HashMap::new();
    let mut attempts: HashMap<String, u32> = HashMap::new(); // consecutive failures per key
    let mut since_trim = 0u32; // reconciles finished since freed memory was last given back

    let enqueue = |key: String, in_flight: &mut HashMap<String, bool>, ready: &mut Ready| {
        if let Some(dirty) = in_flight.get_mut(&key) {
            *dirty = true;
        } else if !ready.contains(&key) {
            ready.push_back(key);
        }
    };

    loop {
        while running.len() < concurrency {
            let Some(key) = ready.pop_front() else { break };
            if in_flight.contains_key(&key) {
                continue;
            }
            if let Some(dk) = delay_keys.remove(&key) {
                delayed.try_remove(&dk);
            }
            in_flight.insert(key.clone(), false);
            if let Some(w) = waiting.remove(&key) {
                waiting_running.insert(key.clone(), w);
            }
            let ctx = ctx.clone();
            running.spawn(async move {
                let (r, report) = reconcile(&ctx, &key).await;
                (key, r, report)
            });
        }
        tokio::select! {
            _ = shutdown.cancelled() => break,
            Some(Request { key, why, done, resynced }) = triggers.recv() => {
                tracing::debug!(workspace = %key, why, "triggered");
                ctx.metrics.triggered(why);
                if key.is_empty() {
                    // Trigger::resync: no workspace key is empty.
                    let due = sweep::sweep(&ctx, why == FULL_RESYNC).await;
                    if let Some(tx) = resynced {
                        let _ = tx.send(due.len());
                    }
                    for key in due {
                        enqueue(key, &mut in_flight, &mut ready);
                    }
                    continue;
                }
                if why == "registry-401" || why == "registry-403" {
                    // The agent presented what its file holds and was refused: read it
                    // again (at most once per token_memo::REFUSAL_REREAD).
                    ctx.token_memo.refused(&key, Utc::now());
                }
                if let Some(done) = done {
                    waiting.entry(key.clone()).or_default().push(done);
                }
                enqueue(key, &mut in_flight, &mut ready);
            }
            Some(f) = feed.recv() => match f {
                // Every event, lifecycle or not: a copy into a container or an exec in it
                // may have changed its token file.
                Feed::Seen(ev) => ctx.token_memo.saw_event(&ev),
                Feed::Changed { key, action } => {
                    tracing::debug!(workspace = %key, %action, "runtime event");
                    ctx.metrics.triggered("runtime-event");
                    enqueue(key, &mut in_flight, &mut ready);
                }
                Feed::Recovered => {
                    ctx.metrics.triggered("runtime-recovered");
                    for key in all_keys(&ctx).await {
                        enqueue(key, &mut in_flight, &mut ready);
                    }
                }
            },
            Ok(()) = desired_rx.changed() => {
                let set = desired_rx.borrow_and_update().clone();
                for key in changed_keys(&last_set, &set) {
                    enqueue(key, &mut in_flight, &mut ready);
                }
                if set.complete && !last_set.complete {
                    for key in all_keys(&ctx).await {
                        enqueue(key, &mut in_flight, &mut ready);
                    }
                }
                last_set = set;
            }
            _ = resync_tick.tick() => {
                for key in sweep::sweep(&ctx, false).await {
                    enqueue(key, &mut in_flight, &mut ready);
                }
            }
            Some(expired) = delayed.next(), if !delayed.is_empty() => {
                let key = expired.into_inner();
                delay_keys.remove(&key);
                enqueue(key, &mut in_flight, &mut ready);
            }
            Some(done) = running.join_next(), if !running.is_empty() => {
                since_trim = since_trim.saturating_add(1);
                if since_trim >= TRIM_AFTER && running.is_empty() && ready.order.is_empty() {
                    since_trim = 0;
                    crate::memory::release_free_memory();
                }
                let Ok((key, result, report)) = done else { continue };
                let dirty = in_flight.remove(&key).unwrap_or(false);
                // A team member that changed may have freed (or taken) quota room: the
                // rest of its team takes another look.
                if !report.decisions.is_empty() {
                    let set = ctx.desired.borrow().clone();
                    if let Some((team, _)) = set.workspaces.get(&ObjectKey::parse(&key)).and_then(|d| team_limits(&set, d)) {
                        for (k, w) in &set.workspaces {
                            if k.to_string() != key && team_limits(&set, w).is_some_and(|(t, _)| t == team) {
                                enqueue(k.to_string(), &mut in_flight, &mut ready);
                            }
                        }
                    }
                }
                for w in waiting_running.remove(&key).unwrap_or_default() {
                    let _ = w.send(report.clone());
                }
                let after = match result {
                    Ok(next) => {
                        attempts.remove(&key);
                        next
                    }
                    Err(e) => {
                        ctx.metrics.reconcile_error(e.metric_label());
                        let n = attempts.entry(key.clone()).or_insert(0);
                        *n += 1;
                        let wait = backoff(*n);
                        tracing::warn!(workspace = %key, error = %e, attempt = *n, retry_in = ?wait, "reconcile failed");
                        Some(wait)
                    }
                };
                if dirty {
                    enqueue(key, &mut in_flight, &mut ready);
                } else if let Some(after) = after {
                    match delay_keys.get(&key) {
                        Some(dk) => delayed.reset(dk, after.min(delayed.deadline(dk).saturating_duration_since(tokio::time::Instant::now()))),
                        None => {
                            let dk = delayed.insert(key.clone(), after);
                            delay_keys.insert(key, dk);
                        }
                    }
                }
            }
        }
    }
    running.shutdown().await;
}

/// Reconciles in a burst after which, once the queue is idle, freed memory is given back.
const TRIM_AFTER: u32 = 1000;

/// Keys waiting for a reconcile slot, in order, each once. A set beside the queue keeps
/// "already queued?" O(1): a resync or a recovery queues every workspace at once, and a
/// scan of the queue per key made that O(n²) (minutes at 100k workspaces).
#[derive(Default)]
struct Ready {
    order: std::collections::VecDeque<String>,
    queued: std::collections::HashSet<String>,
}

impl Ready {
    fn contains(&self, key: &str) -> bool {
        self.queued.contains(key)
    }

    fn push_back(&mut self, key: String) {
        if self.queued.insert(key.clone()) {
            self.order.push_back(key);
        }
    }

    fn pop_front(&mut self) -> Option<String> {
        let key = self.order.pop_front()?;
        self.queued.remove(&key);
        if self.order.is_empty() && self.order.capacity() > 1024 {
            // A burst (a resync, a recovery) is over: its room is not kept for good.
            *self = Self::default();
        }
        Some(key)
    }
}

/// Keys whose declaration appeared, disappeared or changed.
pub fn changed_keys(old: &DesiredSet, new: &DesiredSet) -> Vec<String> {
    let mut keys = Vec::new();
    for (k, w) in &new.workspaces {
        if old.workspaces.get(k) != Some(w) {
            keys.push(k.to_string());
        }
    }
    for k in old.workspaces.keys() {
        if !new.workspaces.contains_key(k) {
            keys.push(k.to_string());
        }
    }
    keys
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_first_heartbeat_is_waited_for_with_backoff_and_the_deadline_kept() {
        use crate::rules::fixtures::{healthy, settings, t};
        let settings = settings(); // interval 1 s, TTL 10 s; the container was provisioned at t(100)
        let mut observed = healthy();
        let look = |observed: &crate::rules::Observed, now| {
            heartbeat_look(&Ctx { desired: None, observed, now, settings: &settings })
        };
        let ms = Duration::from_millis;
        // Heard from a second ago: look when the TTL would run out.
        let heard = observed.record.as_ref().unwrap().last_heartbeat_at.unwrap();
        assert_eq!(look(&observed, heard + chrono::Duration::seconds(1)), Some(ms(9100)));
        observed.record.as_mut().unwrap().last_heartbeat_at = None;
        let at = |s: f64| t(100) + chrono::Duration::milliseconds((s * 1000.0) as i64);
        assert_eq!(look(&observed, at(0.5)), Some(ms(1000)), "one interval at first");
        assert_eq!(look(&observed, at(2.0)), Some(ms(2000)), "then as long as it has waited");
        assert_eq!(look(&observed, at(4.0)), Some(ms(4000)));
        assert_eq!(look(&observed, at(7.0)), Some(ms(3100)), "never past the deadline");
    }

    #[test]
    fn backoff_doubles_and_caps() {
        assert_eq!(backoff(1), Duration::from_millis(500));
        assert_eq!(backoff(2), Duration::from_secs(1));
        assert_eq!(backoff(20), Duration::from_secs(30));
    }
}
