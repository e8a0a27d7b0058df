//! Warm pools in the background: each pass looks at every declared pool (and every
//! pool that still has members but is declared no more), asks the pool rule
//! (rules/pool.rs) what to do, carries it out, and logs the decision under
//! `pool:<namespace>/<name>`. A pass runs every `POOL_INTERVAL`, and at once when a
//! claim took a member or the desired set changed. Claims themselves are made by
//! workspace reconciles (rules/claim.rs); this only refills, so a claim never waits
//! for a container to be created.
//!
//! Which members are claimed is the store's answer (a workspace has the member's
//! uid), not the labels' (Docker cannot relabel): a claimed member is routed to its
//! workspace in the container cache here too, so that its events reach the workspace
//! after an operator restart.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::Utc;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::Context;
use crate::api::{EffectiveSpec, ObjectKey, WarmPoolStatus};
use crate::model::DecisionRecord;
use crate::model::container::{ContainerInfo, ContainerState, labels};
use crate::rules::claim::PoolView;
use crate::rules::pool::{DeclaredPool, PoolAction, PoolFacts, plan};
use crate::runtime::render::{member_hash, render_member};
use crate::source::desired::DesiredSet;
use crate::status::pool::{PoolCounts, status as pool_status};
use crate::store::StoreError;

/// How often every pool is looked at without being asked.
const POOL_INTERVAL: Duration = Duration::from_millis(500);
/// Decisions kept per pool.
const DECISIONS_KEPT: i64 = 50;

/// What `get warmpools` shows, per pool, and how a pass is asked for.
#[derive(Default)]
pub struct Pools {
    /// Shared with the admin API (`GET /api/v1/warmpools`).
    pub status: PoolStatuses,
    pub wake: Notify,
    /// Told when a pass changed `status` (the WarmPool status writer waits for it).
    pub published: Notify,
}

/// Each declared pool's status by `namespace/name`, as the last pass saw it.
pub type PoolStatuses = Arc<Mutex<BTreeMap<String, WarmPoolStatus>>>;

/// A pool's members split by whether a workspace took them.
pub struct Members {
    /// Unclaimed, oldest first.
    pub unclaimed: Vec<ContainerInfo>,
    pub claimed: u32,
}

/// The store key a pool's decisions are logged under.
pub fn log_key(pool: &str) -> String {
    format!("pool:{pool}")
}

/// Every member of `pool` the cache holds, split by the store. None when the cache
/// is unknown.
pub async fn members(ctx: &Context, pool: &str) -> Result<Option<Members>, StoreError> {
    let Some(all) = ctx.containers.labelled(labels::POOL, pool) else { return Ok(None) };
    let mut out = Members { unclaimed: Vec::new(), claimed: 0 };
    for c in all {
        let Some(uid) = c.uid() else { continue };
        // Known claimed (routed to its workspace): no need to ask the store again.
        if ctx.containers.workspace_of(&c.id).is_some() {
            out.claimed += 1;
            continue;
        }
        match ctx.store.workspace_by_uid(uid).await? {
            Some(record) => {
                ctx.containers.adopt(&c.id, &record.key);
                out.claimed += 1;
            }
            None => out.unclaimed.push(c),
        }
    }
    out.unclaimed.sort_by_key(|c| (c.provisioned_at(), c.id.clone()));
    Ok(Some(out))
}

/// The pool a workspace names, for its claim rule: the template and the members
/// ready to be claimed (running, of the current template).
pub async fn view(ctx: &Context, set: &DesiredSet, namespace: &str, name: &str) -> Result<PoolView, StoreError> {
    let key = ObjectKey::new(namespace, name);
    let Some(Ok(template)) = set.pools.get(&key).map(|p| &p.template) else { return Ok(PoolView::NotAsked) };
    let pool = key.to_string();
    let hash = member_hash(template, &ctx.instance, &pool, &ctx.agent);
    let members = members(ctx, &pool).await?.map(|m| {
        m.unclaimed
            .into_iter()
            .filter(|c| c.state == ContainerState::Running && c.spec_hash() == Some(hash.as_str()))
            .collect()
    });
    let files_fixed = ctx.runtime.config_files_fixed();
    Ok(PoolView::Offer { pool, template: template.clone(), members, files_fixed })
}

/// Keeps every pool at its size until `shutdown`.
pub async fn run(ctx: Arc<Context>, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(POOL_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut desired = ctx.desired.clone();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
            () = ctx.pools.wake.notified() => {}
            Ok(()) = desired.changed() => {}
        }
        if ctx.lease_unconfirmed.load(std::sync::atomic::Ordering::Acquire) {
            continue;
        }
        let set = desired.borrow_and_update().clone();
        if !set.complete {
            continue;
        }
        if let Err(e) = pass(&ctx, &set).await {
            tracing::warn!(error = %e, "warm pools: a pass failed; the next one looks again");
        }
    }
}

/// One look at every pool.
async fn pass(ctx: &Context, set: &DesiredSet) -> Result<(), StoreError> {
    let mut keys: Vec<String> = set.pools.keys().map(ToString::to_string).collect();
    // Pools with members but no declaration any more.
    if let Some(all) = ctx.containers.labelled_any(labels::POOL) {
        for c in all {
            if let Some(p) = c.label(labels::POOL)
                && !keys.iter().any(|k| k == p)
            {
                keys.push(p.to_string());
            }
        }
    }
    let mut statuses = BTreeMap::new();
    let previous = ctx.pools.status.lock().map(|s| s.clone()).unwrap_or_default();
    for pool in keys {
        let declared = set.pools.get(&ObjectKey::parse(&pool));
        let template: Option<&Arc<EffectiveSpec>> = declared.and_then(|p| p.template.as_ref().ok());
        let Some(members) = members(ctx, &pool).await? else { return Ok(()) };
        let hash = template.map(|t| member_hash(t, &ctx.instance, &pool, &ctx.agent));
        let facts = PoolFacts {
            pool: &pool,
            declared: match (declared, &hash) {
                (Some(p), Some(h)) => Some(DeclaredPool { size: p.size, member_hash: h }),
                _ => None,
            },
            members: &members.unclaimed,
            now: Utc::now(),
        };
        let count = |unclaimed: &[ContainerInfo]| {
            let current: Vec<&ContainerInfo> =
                unclaimed.iter().filter(|c| hash.as_deref().is_some_and(|h| c.spec_hash() == Some(h))).collect();
            let ready = current.iter().filter(|c| c.state == ContainerState::Running).count() as u32;
            let starting =
                current.iter().filter(|c| matches!(c.state, ContainerState::Created | ContainerState::Waiting)).count();
            (ready, starting as u32)
        };
        let (mut ready, mut starting) = count(&members.unclaimed);
        if let Some(decision) = plan(&facts) {
            tracing::info!(pool = %pool, rule = decision.rule, cause = %decision.cause, "decision");
            let (done, result) = execute(ctx, &pool, template, &decision.actions).await;
            ctx.metrics.reconciled(decision.rule, if result.is_ok() { "ok" } else { "error" });
            let rec = DecisionRecord {
                at: facts.now,
                rule: decision.rule.to_string(),
                cause: decision.cause.clone(),
                actions: done,
                outcome: match &result {
                    Ok(()) => "ok".into(),
                    Err(e) => format!("failed: {e}"),
                },
            };
            ctx.store.append_decision(&log_key(&pool), &rec, DECISIONS_KEPT).await?;
            if let Ok(Some(after)) = self::members(ctx, &pool).await {
                (ready, starting) = count(&after.unclaimed);
            }
        }
        match declared {
            Some(p) => {
                ctx.metrics.set_pool(&pool, Some((ready, members.claimed)));
                let counts = PoolCounts { size: p.size, ready, starting, claimed: members.claimed };
                let errors = p.template.as_ref().err().map(Vec::as_slice);
                let status = pool_status(counts, errors, p.generation, previous.get(&pool), facts.now);
                statuses.insert(pool, status);
            }
            None => ctx.metrics.set_pool(&pool, None),
        }
    }
    let changed = statuses != previous;
    if let Ok(mut s) = ctx.pools.status.lock() {
        *s = statuses;
    }
    if changed {
        ctx.pools.published.notify_one();
    }
    Ok(())
}

/// Carries out a pool decision: what was done, and the first error.
async fn execute(
    ctx: &Context,
    pool: &str,
    template: Option<&Arc<EffectiveSpec>>,
    actions: &[PoolAction],
) -> (Vec<String>, Result<(), String>) {
    let mut done = Vec::new();
    for a in actions {
        let step = match a {
            PoolAction::Remove { id } => remove_member(ctx, pool, id).await.map(|()| {
                done.push(format!("removed member {}", &id[..id.len().min(12)]));
            }),
            PoolAction::Create { count } => {
                let Some(template) = template else { continue };
                let mut step = Ok(());
                for _ in 0..*count {
                    match create_member(ctx, pool, template).await {
                        Ok(name) => done.push(format!("created member {name}")),
                        Err(e) => {
                            step = Err(e);
                            break;
                        }
                    }
                }
                step
            }
        };
        if let Err(e) = step {
            return (done, Err(e));
        }
    }
    (done, Ok(()))
}

/// A fresh member: its own uid, volume and container, started, with no token and no
/// identity (its agent waits for a claim).
async fn create_member(ctx: &Context, pool: &str, template: &EffectiveSpec) -> Result<String, String> {
    let uid = uuid::Uuid::new_v4().to_string();
    let mut cs = render_member(template, &ctx.instance, pool, &uid, &ctx.agent);
    cs.labels.insert(labels::PROVISIONED_AT.into(), Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true));
    let rt = ctx.runtime.as_ref();
    rt.ensure_image(&cs.image, cs.image_pull_policy).await.map_err(|e| e.to_string())?;
    let vol_labels: BTreeMap<String, String> = cs
        .labels
        .iter()
        .filter(|(k, _)| [labels::MANAGED, labels::INSTANCE, labels::UID, labels::POOL].contains(&k.as_str()))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    rt.ensure_volume(&cs.config_volume, &vol_labels).await.map_err(|e| e.to_string())?;
    let id = rt.create(&cs).await.map_err(|e| e.to_string())?;
    rt.write_files(
        &id,
        crate::model::container::CONFIGS_DIR,
        &cs.config_files,
        crate::model::container::CONFIG_FILE_MODE,
    )
    .await
    .map_err(|e| e.to_string())?;
    rt.start(&id).await.map_err(|e| e.to_string())?;
    let _ = ctx.containers.refresh_ids(rt, std::slice::from_ref(&id)).await;
    Ok(cs.name)
}

/// Removes an unclaimed member and its volume (it never held anyone's identity).
async fn remove_member(ctx: &Context, pool: &str, id: &str) -> Result<(), String> {
    let uid = ctx
        .containers
        .labelled(labels::POOL, pool)
        .and_then(|all| all.into_iter().find(|c| c.id == id))
        .and_then(|c| c.uid().map(str::to_string));
    // Never a claimed one: the store may have changed since the pass read it.
    if let Some(uid) = &uid
        && ctx.store.workspace_by_uid(uid).await.map_err(|e| e.to_string())?.is_some()
    {
        return Ok(());
    }
    ctx.runtime.remove(id).await.map_err(|e| e.to_string())?;
    if let Some(uid) = uid {
        ctx.runtime
            .remove_volume(&crate::runtime::render::config_volume_name(&uid))
            .await
            .map_err(|e| e.to_string())?;
    }
    let _ = ctx.containers.refresh_ids(ctx.runtime.as_ref(), &[id.to_string()]).await;
    Ok(())
}
