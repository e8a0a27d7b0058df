//! The loop: requests (the registry, the CLI, the sources, the cluster controller),
//! the runtime's events (through the container cache's feeder), changes of the
//! desired set and the periodic resync feed the work queue; up to `concurrency`
//! reconciles run at once, one per workspace.
//!
//! Nothing slow runs inside the loop itself: a resync sweep (seconds of bulk reads
//! and planning at 100,000 workspaces) and the look at every workspace after an
//! outage run as tasks beside it, so triggers and shutdown are handled meanwhile; a
//! resync asked for while one runs waits for it and runs once. A reconcile that
//! panics is reported as failed (its waiters are answered) and retried with backoff:
//! its workspace is never left "in flight" forever.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::queue::{Finished, WorkQueue};
use super::{Context, ReconcileError, Requeue, reconcile, sweep};
use crate::api::ObjectKey;
use crate::observe::cache::{self, CacheNews};
use crate::source::desired::DesiredSet;
use crate::trigger::{Report, Request, Resync};

/// Reconciles in a burst after which, once the queue is idle, freed memory is given back.
const TRIM_AFTER: u32 = 1000;

/// What a background look at the fleet is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Look {
    /// A resync sweep (see sweep.rs): the rules asked about each workspace from bulk
    /// reads; only those that need it are reconciled.
    Sweep(Resync),
    /// Every declared, recorded or labelled workspace is reconciled (after the container
    /// cache recovered, or once every source has spoken).
    Everything,
}

type Looked = (Vec<String>, Vec<oneshot::Sender<usize>>);

/// The looks at the fleet: at most one runs at a time; those asked for meanwhile are
/// merged into one that runs next.
#[derive(Default)]
struct Looks {
    running: JoinSet<Looked>,
    next: Option<(Look, Vec<oneshot::Sender<usize>>)>,
}

impl Looks {
    fn ask(&mut self, ctx: &Arc<Context>, look: Look, done: Option<oneshot::Sender<usize>>) {
        let (merged, mut waiters) = match self.next.take() {
            None => (look, Vec::new()),
            Some((pending, waiters)) => (merge(pending, look), waiters),
        };
        waiters.extend(done);
        self.next = Some((merged, waiters));
        self.start(ctx);
    }

    fn start(&mut self, ctx: &Arc<Context>) {
        if !self.running.is_empty() {
            return;
        }
        let Some((look, waiters)) = self.next.take() else { return };
        let ctx = ctx.clone();
        self.running.spawn(async move {
            let keys = match look {
                Look::Sweep(scope) => sweep::sweep(&ctx, scope == Resync::Full).await,
                Look::Everything => all_keys(&ctx).await.into_iter().collect(),
            };
            (keys, waiters)
        });
    }
}

/// One look that does what both would.
fn merge(a: Look, b: Look) -> Look {
    match (a, b) {
        (Look::Everything, _) | (_, Look::Everything) => Look::Everything,
        (Look::Sweep(Resync::Full), _) | (_, Look::Sweep(Resync::Full)) => Look::Sweep(Resync::Full),
        _ => Look::Sweep(Resync::Changed),
    }
}

/// Runs the queue until `shutdown`.
pub async fn run(
    ctx: Arc<Context>,
    mut requests: mpsc::UnboundedReceiver<Request>,
    resync: Duration,
    concurrency: usize,
    shutdown: CancellationToken,
) {
    let mut desired_rx = ctx.desired.clone();
    let mut last_set = desired_rx.borrow().clone();
    if let Ok(rows) = ctx.store.secrets(&[]).await {
        ctx.secrets_seen.store(sweep::secrets_fingerprint(&rows), std::sync::atomic::Ordering::SeqCst);
    }
    // The container cache's feeder: passes each runtime event on once the cache holds it.
    let (news_tx, mut news) = mpsc::unbounded_channel();
    let feed = cache::feed(ctx.containers.clone(), ctx.runtime.clone(), news_tx, shutdown.clone());
    crate::health::essential(&ctx.health, "container-feed", &shutdown, async move {
        feed.await;
        Ok(())
    });
    // Warm pools refill beside the loop (members are containers, or Pods).
    tokio::spawn(super::pools::run(ctx.clone(), shutdown.clone()));
    let mut resync_tick = tokio::time::interval(resync);
    let mut queue = WorkQueue::default();
    let mut running: JoinSet<(Result<Requeue, Arc<ReconcileError>>, Report)> = JoinSet::new();
    let mut running_keys: HashMap<tokio::task::Id, String> = HashMap::new();
    let mut looks = Looks::default();
    let mut since_trim = 0u32; // reconciles finished since freed memory was last given back

    loop {
        while running.len() < concurrency {
            let Some(key) = queue.start_next() else { break };
            let task_ctx = ctx.clone();
            let task_key = key.clone();
            let handle = running.spawn(async move { reconcile(&task_ctx, &task_key).await });
            running_keys.insert(handle.id(), key);
        }
        tokio::select! {
            _ = shutdown.cancelled() => break,
            Some(request) = requests.recv() => match request {
                Request::Reconcile { key, why, done } => {
                    tracing::debug!(workspace = %key, %why, "triggered");
                    ctx.metrics.triggered(why.as_str());
                    if why.rereads_token_file() {
                        // The agent presented what its file holds and was refused: read it
                        // again, at most once per token_memo::REFUSAL_REREAD (a flood of
                        // refusals must not become a flood of reads); when that is later,
                        // look again then rather than at the agent's next retry.
                        let wait = ctx.token_memo.refused(&key, chrono::Utc::now());
                        if !wait.is_zero() {
                            queue.look_after(key.clone(), wait);
                        }
                    }
                    match done {
                        Some(done) => queue.add_waiting(key, done),
                        None => queue.add(key),
                    }
                }
                Request::Resync { scope, done } => looks.ask(&ctx, Look::Sweep(scope), done),
            },
            Some(n) = news.recv() => match n {
                // Every event, lifecycle or not: a copy into a container or an exec in it
                // may have changed its token file.
                CacheNews::Seen(ev) => ctx.token_memo.saw_event(&ev),
                CacheNews::Changed { key, action } => {
                    tracing::debug!(workspace = %key, %action, "runtime event");
                    ctx.metrics.triggered("runtime-event");
                    queue.add(key);
                }
                CacheNews::Recovered => {
                    ctx.metrics.triggered("runtime-recovered");
                    looks.ask(&ctx, Look::Everything, None);
                }
            },
            Ok(()) = desired_rx.changed() => {
                let set = desired_rx.borrow_and_update().clone();
                for key in changed_keys(&last_set, &set) {
                    queue.add(key);
                }
                if set.complete && !last_set.complete {
                    looks.ask(&ctx, Look::Everything, None);
                }
                last_set = set;
            }
            _ = resync_tick.tick() => looks.ask(&ctx, Look::Sweep(Resync::Changed), None),
            () = queue.due() => {}
            Some(looked) = looks.running.join_next(), if !looks.running.is_empty() => {
                match looked {
                    Ok((keys, waiters)) => {
                        for w in waiters {
                            let _ = w.send(keys.len());
                        }
                        for key in keys {
                            queue.add(key);
                        }
                    }
                    Err(e) => tracing::error!(error = %e, "a resync failed; the next one will look again"),
                }
                looks.start(&ctx);
            }
            Some(joined) = running.join_next_with_id(), if !running.is_empty() => {
                let (id, (result, report)) = match joined {
                    Ok((id, done)) => (id, done),
                    Err(e) => {
                        let id = e.id();
                        let key = running_keys.get(&id).cloned().unwrap_or_default();
                        let why = panic_message(e);
                        tracing::error!(workspace = %key, panic = %why, "a reconcile panicked; retrying with backoff");
                        let error = Arc::new(ReconcileError::Panicked(why));
                        let report = Report { key, error: Some(error.to_string()), ..Report::default() };
                        let _ = ctx.reports.send(report.clone());
                        (id, (Err(error), report))
                    }
                };
                let Some(key) = running_keys.remove(&id) else { continue };
                since_trim = since_trim.saturating_add(1);
                if since_trim >= TRIM_AFTER && running.is_empty() && queue.queued() == 0 {
                    since_trim = 0;
                    crate::memory::release_free_memory();
                }
                if !report.decisions.is_empty() {
                    // A team member that changed may have freed (or taken) quota room: the
                    // rest of its team takes another look.
                    for k in teammates(&ctx.desired.borrow(), &key) {
                        queue.add(k);
                    }
                }
                let finished = match &result {
                    Ok(next) => Finished::Quiet(*next),
                    Err(e) if e.retry_helps() => Finished::Failed,
                    Err(e) => {
                        ctx.metrics.reconcile_error(e.metric_label());
                        tracing::warn!(workspace = %key, error = %e, "reconcile failed; waiting for a change");
                        Finished::Quiet(None)
                    }
                };
                if let Some(retry) = queue.finish(&key, finished, &report)
                    && let Err(e) = &result
                {
                    ctx.metrics.reconcile_error(e.metric_label());
                    tracing::warn!(workspace = %key, error = %e, attempt = retry.attempt, retry_in = ?retry.after, "reconcile failed");
                }
            }
        }
    }
    running.shutdown().await;
    looks.running.shutdown().await;
}

fn panic_message(e: tokio::task::JoinError) -> String {
    match e.try_into_panic() {
        Ok(payload) => payload
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "a panic without a message".into()),
        Err(e) => e.to_string(),
    }
}

/// The other members of `key`'s team, when the team has quotas.
fn teammates(set: &DesiredSet, key: &str) -> Vec<String> {
    let Some(me) = set.workspaces.get(&ObjectKey::parse(key)) else { return Vec::new() };
    let Some((team, _)) = super::dereference::team_limits(set, me) else { return Vec::new() };
    set.workspaces
        .iter()
        .filter(|(k, w)| {
            k.to_string() != key && super::dereference::team_limits(set, w).is_some_and(|(t, _)| t == team)
        })
        .map(|(k, _)| k.to_string())
        .collect()
}

/// Every key worth a look after an outage: declared, known to the store, or labelled.
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
