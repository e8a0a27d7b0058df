//! The Workspace controller (kube-runtime `Controller`, shaped like kube-rs/controller-rs).
//!
//! It never touches containers: Apply waits until the desired store holds the object's
//! version, asks the one reconcile queue for a pass (`Trigger::reconcile_and_wait`) and
//! writes the resulting status; Cleanup (the `molecule.ai/cleanup` finalizer) waits
//! until the object has left the desired set, asks for a pass and lets the finalizer go
//! only once the Report says the workspace was forgotten (container, volume and tokens
//! gone) or was never known. [`write_reports`] writes status and Events for every
//! other reconcile (Docker events, registry 401s, resync).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use kube::api::{ApiResource, DynamicObject, Patch, PatchParams, TypeMeta};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::finalizer::{self, finalizer};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::watcher;
use kube::{Api, Client, Resource};
use serde_json::json;
use tokio::sync::{broadcast, watch};
use tokio_util::sync::CancellationToken;

use super::events::Health;
use super::source::{GuardedTeam, GuardedWorkspace, SentMap, key_of};
use super::{Error, FIELD_MANAGER, FINALIZER, Options, SOURCE_NAME};
use crate::api::{
    API_VERSION, Condition, ConditionStatus, ObjectKey, Phase, Team, TeamStatus, Workspace, WorkspaceStatus,
};
use crate::source::desired::DesiredSet;
use crate::status::team as team_status;
use crate::trigger::{Report, Trigger, Why};

/// Look again this often when nothing happens (status from other triggers is
/// written by [`write_reports`] anyway).
const RESYNC: Duration = Duration::from_secs(300);
/// While the desired store catches up or a deletion completes.
const SOON: Duration = Duration::from_secs(1);
/// The `why` of the reconciles this controller asks for.
const WHY: Why = Why::Kubernetes;

/// Every IO handle the controller needs; tests build their own.
pub struct ControllerContext {
    pub client: Client,
    pub trigger: Trigger,
    pub desired: watch::Receiver<Arc<DesiredSet>>,
    /// What the Kubernetes source last sent (see `source::Sent`).
    pub sent: watch::Receiver<SentMap>,
    /// The controller's view of Workspaces: the report writer only writes to objects
    /// that exist here, with their generation.
    pub objects: Store<GuardedWorkspace>,
    /// Teams as the source reflects them: only these get a status rollup.
    pub teams: Store<GuardedTeam>,
    pub recorder: Recorder,
    /// How long Apply/Cleanup wait for the desired store before requeueing.
    pub desired_wait: Duration,
    written: Mutex<HashMap<ObjectKey, Written>>,
    failures: Mutex<HashMap<ObjectKey, u32>>,
    /// Every workspace's last reported phase and its team, for the Team rollup.
    members: Mutex<HashMap<ObjectKey, Member>>,
    teams_written: Mutex<HashMap<ObjectKey, TeamStatus>>,
    /// Generation and time of the last successful Apply per workspace.
    applied: Mutex<HashMap<ObjectKey, (Option<i64>, Instant)>>,
    /// Where wakes asked for by the `molecule.ai/wake` annotation are recorded (None:
    /// the annotation is ignored).
    pub wake_store: Option<crate::store::DynStore>,
    /// The annotation's value last acted on, per workspace.
    wakes_seen: Mutex<HashMap<ObjectKey, String>>,
}

/// A Workspace annotation that wakes it (lifecycle autopilot, rules::suspend), for a
/// gateway or `kubectl annotate ws NAME molecule.ai/wake=$(date -u +%FT%TZ) --overwrite`.
/// Every new value is one wake request. An RFC 3339 time is the request's time (so an
/// operator restarted later does not count it again: a suspension made after it
/// stands); any other value is a request at the moment the operator sees it.
pub const WAKE_ANNOTATION: &str = "molecule.ai/wake";

/// The time of the wake a `molecule.ai/wake` value asks for, seen at `now`: an RFC 3339
/// time to the whole second (`date -u +%FT%TZ`) stands for that whole second, so it is
/// the end of it (a suspension made earlier in the second the annotation was written
/// is over); never later than `now`; any other value is `now`.
fn wake_time(value: &str, now: chrono::DateTime<chrono::Utc>) -> chrono::DateTime<chrono::Utc> {
    let Ok(t) = chrono::DateTime::parse_from_rfc3339(value.trim()) else { return now };
    let t = t.with_timezone(&chrono::Utc);
    let end = match t.timestamp_subsec_nanos() {
        0 => t + chrono::Duration::seconds(1) - chrono::Duration::nanoseconds(1),
        _ => t,
    };
    end.min(now)
}

#[derive(Clone, Debug)]
struct Member {
    phase: Phase,
    team: Option<ObjectKey>,
}

/// The last status written per workspace (writes are skipped when unchanged).
#[derive(Clone, Debug)]
struct Written {
    status: serde_json::Value,
    health: Health,
}

impl ControllerContext {
    pub fn new(
        client: Client,
        options: &Options,
        trigger: Trigger,
        desired: watch::Receiver<Arc<DesiredSet>>,
        sent: watch::Receiver<SentMap>,
        objects: Store<GuardedWorkspace>,
        teams: Store<GuardedTeam>,
    ) -> Self {
        let reporter = Reporter { controller: FIELD_MANAGER.to_string(), instance: Some(options.identity.clone()) };
        Self {
            recorder: Recorder::new(client.clone(), reporter),
            client,
            trigger,
            desired,
            sent,
            objects,
            teams,
            desired_wait: options.desired_wait,
            written: Mutex::default(),
            failures: Mutex::default(),
            members: Mutex::default(),
            teams_written: Mutex::default(),
            applied: Mutex::default(),
            wake_store: None,
            wakes_seen: Mutex::default(),
        }
    }

    /// Records the wake the object's `molecule.ai/wake` annotation asks for, once per value.
    async fn wake_by_annotation(&self, obj: &GuardedWorkspace, key: &ObjectKey) {
        let Some(store) = &self.wake_store else { return };
        let Some(value) = obj.meta().annotations.as_ref().and_then(|a| a.get(WAKE_ANNOTATION)) else { return };
        if self.wakes_seen.lock().is_ok_and(|seen| seen.get(key) == Some(value)) {
            return;
        }
        let at = wake_time(value, chrono::Utc::now());
        let done = match store.workspace(&key.to_string()).await {
            Ok(Some(record)) => store.request_wake(&record.uid, at).await.map(|()| true),
            Ok(None) => Ok(false),
            Err(e) => Err(e),
        };
        match done {
            Ok(known) => {
                if let Ok(mut seen) = self.wakes_seen.lock() {
                    seen.insert(key.clone(), value.clone());
                }
                if known {
                    tracing::info!(workspace = %key, annotation = %value, "woken by the molecule.ai/wake annotation");
                    self.trigger.enqueue(&key.to_string(), crate::trigger::Why::Wake);
                }
            }
            Err(e) => tracing::warn!(workspace = %key, error = %e, "cannot record the wake the annotation asks for"),
        }
    }

    /// Workspaces in `namespace`, untyped: a malformed object can still be patched.
    fn api(&self, namespace: &str) -> Api<DynamicObject> {
        Api::namespaced_with(self.client.clone(), namespace, &ApiResource::erase::<Workspace>(&()))
    }

    /// The desired store holds this generation of the object (or another source
    /// declares the name and wins).
    fn is_desired(&self, key: &ObjectKey, generation: Option<i64>) -> bool {
        let sent = self.sent.borrow();
        let Some(s) = sent.get(key) else { return false };
        if s.generation < generation {
            return false;
        }
        let set = self.desired.borrow();
        set.workspaces.get(key).is_some_and(|d| d.source.kind != SOURCE_NAME || d.source.reference == s.reference)
    }

    fn removal(&self, key: &ObjectKey) -> Removal {
        if self.sent.borrow().contains_key(key) {
            return Removal::NotYet;
        }
        let set = self.desired.borrow();
        match set.workspaces.get(key) {
            Some(d) if d.source.kind == SOURCE_NAME => Removal::NotYet,
            Some(_) => Removal::DeclaredElsewhere,
            None if !set.complete => Removal::NotYet,
            None => Removal::Gone,
        }
    }

    async fn wait_for(&self, ready: impl Fn() -> bool) -> bool {
        let deadline = Instant::now() + self.desired_wait;
        loop {
            if ready() {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Our own status writes (and finalizer patches) wake the controller too. This
    /// generation was reconciled a moment ago: nothing for the controller to drive
    /// (other reconciles' status arrives through `write_reports`). Returns when to look again.
    fn applied_recently(&self, key: &ObjectKey, generation: Option<i64>) -> Option<Duration> {
        let applied = self.applied.lock().ok()?;
        let (g, at) = applied.get(key)?;
        (*g == generation).then(|| RESYNC.checked_sub(at.elapsed())).flatten().filter(|left| !left.is_zero())
    }

    fn last_health(&self, key: &ObjectKey) -> Option<Health> {
        self.written.lock().ok()?.get(key).map(|w| w.health)
    }

    /// Writes the status whole by server-side apply, unless it is what was last written.
    pub async fn write_status(
        &self,
        key: &ObjectKey,
        generation: Option<i64>,
        mut status: WorkspaceStatus,
    ) -> Result<(), Error> {
        status.observed_generation = generation;
        let value = serde_json::to_value(&status)?;
        if self.written.lock().ok().and_then(|w| w.get(key).map(|w| w.status == value)).unwrap_or(false) {
            return Ok(());
        }
        let patch = json!({"apiVersion": API_VERSION, "kind": "Workspace", "status": value});
        self.api(&key.namespace)
            .patch_status(&key.name, &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(&patch))
            .await?;
        if let Ok(mut w) = self.written.lock() {
            w.insert(key.clone(), Written { status: value, health: Health::of(&status) });
        }
        Ok(())
    }

    /// Publishes the Events of one report and writes its status, for a Workspace
    /// this controller knows (others, e.g. from a directory source, are skipped).
    pub async fn handle_report(&self, report: &Report) {
        let key = ObjectKey::parse(&report.key);
        let team = self.remember_member(&key, report);
        if let Some(obj) = self.objects.get(&ObjectRef::new(&key.name).within(&key.namespace)) {
            self.workspace_report(&key, &obj, report).await;
        }
        if let Some(team) = team
            && let Err(e) = self.write_team_status(&team).await
        {
            tracing::warn!(team = %team, error = %e, "cannot write team status");
        }
    }

    /// Records the workspace's phase and team; returns the team to roll up.
    fn remember_member(&self, key: &ObjectKey, report: &Report) -> Option<ObjectKey> {
        let declared_team = team_status::team_of(&self.desired.borrow(), key);
        let mut members = self.members.lock().ok()?;
        let previous_team = members.get(key).and_then(|m| m.team.clone());
        if report.forgotten {
            members.remove(key);
            return previous_team.or(declared_team);
        }
        let phase = report.status.as_ref().map(|s| s.phase)?;
        let team = declared_team.or(previous_team);
        members.insert(key.clone(), Member { phase, team: team.clone() });
        team
    }

    /// Writes the Team's rollup by server-side apply, when the Team is a Kubernetes
    /// object and the rollup changed.
    pub async fn write_team_status(&self, team: &ObjectKey) -> Result<(), Error> {
        let Some(obj) = self.teams.get(&ObjectRef::new(&team.name).within(&team.namespace)) else { return Ok(()) };
        let phases: HashMap<ObjectKey, Phase> = match self.members.lock() {
            Ok(m) => m.iter().map(|(k, m)| (k.clone(), m.phase)).collect(),
            Err(_) => return Ok(()),
        };
        let previous = self.teams_written.lock().ok().and_then(|w| w.get(team).cloned());
        let status = team_status::rollup(
            team,
            &self.desired.borrow(),
            &phases,
            obj.meta().generation,
            previous.as_ref(),
            chrono::Utc::now(),
        );
        if previous.as_ref() == Some(&status) {
            return Ok(());
        }
        let patch = json!({"apiVersion": API_VERSION, "kind": "Team", "status": status});
        Api::<DynamicObject>::namespaced_with(self.client.clone(), &team.namespace, &ApiResource::erase::<Team>(&()))
            .patch_status(&team.name, &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(&patch))
            .await?;
        if let Ok(mut w) = self.teams_written.lock() {
            w.insert(team.clone(), status);
        }
        Ok(())
    }

    async fn workspace_report(&self, key: &ObjectKey, obj: &GuardedWorkspace, report: &Report) {
        let key = key.clone();
        let reference = obj.object_ref(&());
        for ev in super::events::events_for(report, self.last_health(&key)) {
            if let Err(e) = self.recorder.publish(&ev, &reference).await {
                tracing::warn!(workspace = %key, reason = %ev.reason, error = %e, "cannot publish event");
            }
        }
        if report.forgotten {
            if let Ok(mut w) = self.written.lock() {
                w.remove(&key);
            }
            return;
        }
        if let Some(status) = report.status.clone()
            && let Err(e) = self.write_status(&key, obj.meta().generation, status).await
        {
            tracing::warn!(workspace = %key, error = %e, "cannot write status");
        }
    }
}

enum Removal {
    /// Still declared by this source (the snapshot without it is not merged yet).
    NotYet,
    /// Another source declares the same name: nothing to clean up for this object.
    DeclaredElsewhere,
    Gone,
}

/// Builds the Controller over Workspaces (all namespaces or one). Its store is the
/// `objects` of the [`Context`].
pub fn build(client: Client, namespace: Option<&str>) -> Controller<GuardedWorkspace> {
    let api: Api<GuardedWorkspace> = match namespace {
        Some(ns) => Api::namespaced(client, ns),
        None => Api::all(client),
    };
    Controller::new(api, watcher::Config::default().any_semantic())
}

/// Runs the controller until `shutdown`.
pub async fn run(ctx: Arc<ControllerContext>, controller: Controller<GuardedWorkspace>, shutdown: CancellationToken) {
    controller
        .graceful_shutdown_on(async move { shutdown.cancelled_owned().await })
        .run(reconcile, error_policy, ctx)
        .for_each(|result| async move {
            match result {
                Ok((obj, action)) => tracing::debug!(workspace = %obj, ?action, "reconciled"),
                // Already logged by error_policy.
                Err(e @ kube::runtime::controller::Error::ReconcilerFailed(..)) => tracing::debug!(error = %e, "controller"),
                Err(e) => tracing::warn!(error = %e, "Workspace controller (is the CRD installed? `kubectl apply -k deploy/`)"),
            }
        })
        .await;
}

/// The reconcile fn: the finalizer decides between Apply and Cleanup.
pub async fn reconcile(obj: Arc<GuardedWorkspace>, ctx: Arc<ControllerContext>) -> Result<Action, Error> {
    let key = key_of(obj.as_ref());
    let api = ctx.api(&key.namespace);
    // The finalizer helper only reads metadata and patches it; an untyped copy lets it
    // handle malformed objects too.
    let erased = Arc::new(DynamicObject {
        types: Some(TypeMeta { api_version: API_VERSION.to_string(), kind: "Workspace".to_string() }),
        metadata: obj.meta().clone(),
        data: json!({}),
    });
    let (o, k, c) = (obj.as_ref(), &key, ctx.as_ref());
    let result = finalizer(&api, FINALIZER, erased, |event| async move {
        match event {
            finalizer::Event::Apply(_) => apply(o, k, c).await,
            finalizer::Event::Cleanup(_) => cleanup(k, c).await,
        }
    })
    .await
    .map_err(|e| Error::Finalizer(Box::new(e)));
    if result.is_ok()
        && let Ok(mut f) = ctx.failures.lock()
    {
        f.remove(&key);
    }
    result
}

async fn apply(obj: &GuardedWorkspace, key: &ObjectKey, ctx: &ControllerContext) -> Result<Action, Error> {
    let generation = obj.meta().generation;
    // An annotation changes no generation: looked at before the "applied recently" skip.
    ctx.wake_by_annotation(obj, key).await;
    if let Some(left) = ctx.applied_recently(key, generation) {
        return Ok(Action::requeue(left));
    }
    if !ctx.wait_for(|| ctx.is_desired(key, generation)).await {
        return Err(Error::NotYetDesired(key.to_string()));
    }
    let report = ctx.trigger.reconcile_and_wait(&key.to_string(), WHY).await.ok_or(Error::ShuttingDown)?;
    let invalid_spec = obj.0.is_err()
        || report
            .status
            .as_ref()
            .is_some_and(|s| crate::api::condition::find(&s.conditions, "InvalidSpec").is_some_and(Condition::is_true));
    let status = match (&report.status, &obj.0) {
        (Some(s), _) => Some(s.clone()),
        (None, Err(invalid)) => Some(invalid_status(&invalid.error)),
        (None, Ok(_)) => None,
    };
    if let Some(status) = status {
        ctx.write_status(key, generation, status).await?;
    }
    if let Some(message) = report.error {
        return Err(Error::ReconcileFailed { key: key.to_string(), message });
    }
    if invalid_spec {
        return Err(Error::InvalidSpec(key.to_string()));
    }
    Ok(match report.status {
        Some(_) => {
            if let Ok(mut a) = ctx.applied.lock() {
                a.insert(key.clone(), (generation, Instant::now()));
            }
            Action::requeue(RESYNC)
        }
        None => Action::requeue(SOON), // not every source has spoken yet
    })
}

/// Status of an object that could not even be read (the reconciler has not seen it yet).
fn invalid_status(error: &str) -> WorkspaceStatus {
    let now = chrono::Utc::now();
    WorkspaceStatus {
        phase: Phase::Failed,
        conditions: vec![
            Condition::new("Ready", ConditionStatus::False, "InvalidSpec", error, now),
            Condition::new("InvalidSpec", ConditionStatus::True, "InvalidSpec", error, now),
        ],
        ..WorkspaceStatus::default()
    }
}

async fn cleanup(key: &ObjectKey, ctx: &ControllerContext) -> Result<Action, Error> {
    if !ctx.wait_for(|| !matches!(ctx.removal(key), Removal::NotYet)).await {
        return Err(Error::CleanupPending(key.to_string()));
    }
    if matches!(ctx.removal(key), Removal::DeclaredElsewhere) {
        tracing::info!(workspace = %key, "deleted from Kubernetes but still declared by another source; its container stays");
        return Ok(Action::await_change());
    }
    let report = ctx.trigger.reconcile_and_wait(&key.to_string(), WHY).await.ok_or(Error::ShuttingDown)?;
    if let Some(message) = report.error {
        return Err(Error::ReconcileFailed { key: key.to_string(), message });
    }
    let never_known = report.status.is_none() && report.decisions.is_empty();
    if report.forgotten || never_known {
        if let Ok(mut a) = ctx.applied.lock() {
            a.remove(key);
        }
        tracing::info!(workspace = %key, "removed; releasing the finalizer");
        return Ok(Action::await_change());
    }
    Err(Error::CleanupPending(key.to_string()))
}

/// Invalid spec: waiting will not help, the next change of the object will.
/// Anything else: back off per object (0.5 s doubling, at most 30 s).
pub fn error_policy(obj: Arc<GuardedWorkspace>, error: &Error, ctx: Arc<ControllerContext>) -> Action {
    let key = key_of(obj.as_ref());
    match error.inner() {
        Error::InvalidSpec(_) | Error::ShuttingDown => Action::await_change(),
        Error::NotYetDesired(_) | Error::CleanupPending(_) => Action::requeue(SOON),
        inner => {
            let attempt = ctx
                .failures
                .lock()
                .map(|mut f| {
                    let n = f.entry(key.clone()).or_default();
                    *n += 1;
                    *n
                })
                .unwrap_or(1);
            tracing::warn!(workspace = %key, error = %error, label = inner.metric_label(), attempt, "reconcile failed");
            Action::requeue(crate::reconcile::queue::backoff(attempt))
        }
    }
}

/// Writes status and Events for every finished reconcile until `shutdown`.
pub async fn write_reports(
    ctx: Arc<ControllerContext>,
    mut reports: broadcast::Receiver<Report>,
    shutdown: CancellationToken,
) {
    loop {
        let report = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = reports.recv() => r,
        };
        match report {
            Ok(report) => ctx.handle_report(&report).await,
            Err(broadcast::error::RecvError::Lagged(n)) => {
                tracing::warn!(missed = n, "status writer fell behind; the next reconciles will catch up");
            }
            Err(broadcast::error::RecvError::Closed) => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::wake_time;
    use chrono::{DateTime, Utc};

    fn t(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    #[test]
    fn a_wake_annotation_to_the_second_stands_for_that_whole_second_until_now() {
        let now = t("2026-01-01T10:00:31.528Z");
        // Written in the second a suspension at 10:00:31.125 was made: it ends it.
        assert!(wake_time("2026-01-01T10:00:31Z", now) > t("2026-01-01T10:00:31.125Z"));
        assert_eq!(wake_time("2026-01-01T10:00:31Z", now), now, "never later than now");
        assert_eq!(wake_time("2026-01-01T09:00:00Z", now), t("2026-01-01T09:00:00.999999999Z"));
        assert_eq!(wake_time("2026-01-01T09:00:00.250Z", now), t("2026-01-01T09:00:00.250Z"));
        assert_eq!(wake_time("please", now), now);
    }
}
