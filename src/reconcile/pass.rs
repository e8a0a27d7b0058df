//! One reconcile of one workspace: dereference (read what is declared and what is),
//! plan (ask the pure rules), execute (carry out the decision), and again, until the
//! rules have nothing to do; then write the status, and publish what was done.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use tracing::Instrument;
use tracing::field::Empty;

use super::dereference::{Inputs, dereference, observe_workspace};
use super::{Context, ReconcileError, Requeue, sweep};
use crate::api::{ObjectKey, WorkspaceStatus};
use crate::execute::Executor;
use crate::model::DecisionRecord;
use crate::rules::{Action, Decision, Facts, Plan, plan};
use crate::source::desired::DesiredWorkspace;
use crate::store::StoreError;
use crate::telemetry::TARGET;
use crate::trigger::Report;

/// Most passes one reconcile makes (dereference, plan, execute) before it yields.
const MAX_PASSES: usize = 6;
/// Decisions kept per workspace for `describe`.
const DECISIONS_KEPT: i64 = 50;
/// A quiet workspace is looked at again this long after the time a rule named (its
/// TTL's end, a rotation): by then the rule has something to say.
const WAKE_MARGIN: Duration = Duration::from_millis(100);

/// Reconciles one workspace until desired and observed agree (or a step fails),
/// and publishes what it did.
pub async fn reconcile(ctx: &Context, key: &str) -> (Result<Requeue, Arc<ReconcileError>>, Report) {
    let mut report = Report { key: key.to_string(), ..Report::default() };
    // The trace of this reconcile (exported with --otlp-endpoint; free without).
    let span = tracing::trace_span!(target: TARGET, "reconcile", workspace = key, rule = Empty, cause = Empty,
        otel.status_code = Empty, error = Empty);
    let result = reconcile_into(ctx, key, &mut report).instrument(span.clone()).await.map_err(Arc::new);
    if let Err(e) = &result {
        report.error = Some(e.to_string());
        span.record("otel.status_code", "ERROR").record("error", tracing::field::display(e));
    }
    let _ = ctx.reports.send(report.clone());
    (result, report)
}

async fn reconcile_into(ctx: &Context, key: &str, report: &mut Report) -> Result<Requeue, ReconcileError> {
    let okey = ObjectKey::parse(key);
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
        let observing = tracing::trace_span!(target: TARGET, "observe", workspace = key);
        let Some(inputs) = dereference(ctx, key, &set, declared, now).instrument(observing).await? else {
            return Ok(None); // never seen, not declared: nothing to do
        };
        let facts =
            Facts { desired: inputs.desired.as_ref(), observed: &inputs.observed, now, settings: &ctx.settings };
        let planning = tracing::trace_span!(target: TARGET, "plan", rule = Empty, cause = Empty, wait_until = Empty);
        let planned = planning.in_scope(|| plan(&facts));
        match &planned {
            Plan::Act(d) => {
                // On the plan and on the reconcile (its last decision), for a search by rule.
                for span in [&planning, &tracing::Span::current()] {
                    span.record("rule", d.rule).record("cause", d.cause.as_str());
                }
            }
            Plan::Wait(Some(at)) => {
                planning.record("wait_until", tracing::field::display(at.to_rfc3339()));
            }
            Plan::Wait(None) => {}
        }
        drop(planning);
        match planned {
            Plan::Wait(until) => {
                report.status = write_status(ctx, key, &facts, declared).await?;
                remember_quiet(ctx, key, &inputs);
                return Ok(until.map(|at| until_then(at, now)));
            }
            Plan::Act(decision) => {
                if execute(ctx, key, &facts, declared, &decision, report).await? == Executed::Forgotten {
                    return Ok(None);
                }
            }
        }
    }
    Ok(Some(Duration::from_millis(200)))
}

/// How long from `now` until just after `at`.
fn until_then(at: DateTime<Utc>, now: DateTime<Utc>) -> Duration {
    (at - now).to_std().unwrap_or_default() + WAKE_MARGIN
}

#[derive(PartialEq, Eq)]
enum Executed {
    Done,
    /// The workspace's record is gone: its removal is complete.
    Forgotten,
}

/// Carries out `decision`, records it in the decision log and the metrics, and tells
/// whoever needs to know about the tokens it wrote.
async fn execute(
    ctx: &Context,
    key: &str,
    facts: &Facts<'_>,
    declared: Option<&DesiredWorkspace>,
    decision: &Decision,
    report: &mut Report,
) -> Result<Executed, ReconcileError> {
    tracing::info!(workspace = key, rule = decision.rule, cause = %decision.cause, "decision");
    let executor = Executor {
        runtime: ctx.runtime.as_ref(),
        store: ctx.store.as_ref(),
        instance: &ctx.instance,
        agent: &ctx.agent,
        failpoint: ctx.failpoint.as_deref(),
    };
    let (outcome, result) = executor.apply(facts, &decision.actions, facts.now).await;
    for (container_id, hash) in &outcome.written {
        // As of now, after the write returned: its own copy event is not newer.
        ctx.token_memo.record(key, container_id, hash, Utc::now());
        if let Some(issued) = &ctx.tokens_issued {
            issued(hash);
        }
    }
    let record = facts.observed.record.as_ref();
    if decision.actions.iter().any(Action::changes_containers) {
        // Read our own writes before looking again (the events come later). A failure
        // leaves the cache unknown, which the next pass respects.
        let uid = record.map(|r| r.uid.as_str());
        let _ = ctx.containers.refresh_workspace(ctx.runtime.as_ref(), key, uid).await;
    }
    if let Some(cause) = outcome.suspended {
        ctx.metrics.suspended(cause.as_str());
    }
    for (reason, n) in &outcome.revoked {
        ctx.metrics.revoked(*reason, *n);
    }
    for _ in 0..outcome.issued {
        ctx.metrics.issued();
    }
    ctx.metrics.reconciled(decision.rule, if result.is_ok() { "ok" } else { "error" });
    let forgotten = decision.actions.contains(&Action::Forget) && result.is_ok();
    let rec = DecisionRecord {
        at: facts.now,
        rule: decision.rule.to_string(),
        cause: decision.cause.clone(),
        actions: if outcome.done.is_empty() {
            decision.actions.iter().map(Action::describe).collect()
        } else {
            outcome.done.clone()
        },
        outcome: match &result {
            Ok(()) => "ok".to_string(),
            Err(e) => format!("failed: {e}"),
        },
    };
    if let Some((id, _)) = &outcome.claimed {
        // Docker cannot relabel it: events of the claimed member now trigger this workspace.
        ctx.containers.adopt(id, key);
        ctx.metrics.pool_claimed(facts.now);
        ctx.pools.wake.notify_one();
    }
    // A claim gave the workspace the member's uid: its log goes with it.
    let log_uid = outcome.claimed.as_ref().map(|(_, uid)| uid.as_str()).or(record.map(|r| r.uid.as_str()));
    if let (Some(uid), false) = (log_uid, forgotten) {
        ctx.store.append_decision(uid, &rec, DECISIONS_KEPT).await?;
    }
    report.decisions.push(rec);
    if let Err(e) = result {
        ctx.set_failure(key, Some(e.to_string()));
        // Show the failure in status before backing off.
        if let Some((r, agent)) = ctx.store.workspace_with_report(key).await? {
            let observed = observe_workspace(ctx, key, Some(r), agent).await?;
            let facts = Facts { observed: &observed, now: Utc::now(), ..*facts };
            report.status = write_status(ctx, key, &facts, declared).await?;
        }
        return Err(e.into());
    }
    ctx.set_failure(key, None);
    if forgotten {
        ctx.remember_quiet(key, None);
        if ctx.phases.set(key, None) {
            ctx.phases.publish(&ctx.metrics);
        }
        ctx.metrics.set_agent(key, None);
        report.forgotten = true;
        return Ok(Executed::Forgotten);
    }
    Ok(Executed::Done)
}

/// What the resync sweep may trust of this quiet pass; only what was seen with the
/// containers known is worth remembering.
fn remember_quiet(ctx: &Context, key: &str, inputs: &Inputs) {
    let observed = &inputs.observed;
    let snapshot = inputs.desired.as_ref().filter(|_| observed.containers.is_some()).map(|d| sweep::QuietSnapshot {
        generation: d.generation,
        secrets: inputs.secrets_seen,
        spec_hash: d.spec_hash.as_str().into(),
        container: observed.container().map(|c| c.id.as_str().into()),
        token_file: (&observed.token_file).into(),
    });
    ctx.remember_quiet(key, snapshot);
}

/// Computes and (when it changed) saves the status; returns it.
async fn write_status(
    ctx: &Context,
    key: &str,
    facts: &Facts<'_>,
    declared: Option<&DesiredWorkspace>,
) -> Result<Option<WorkspaceStatus>, StoreError> {
    let Some(record) = facts.observed.record.as_ref() else { return Ok(None) };
    let failure = ctx.failure(key);
    let circumstances = crate::status::workspace::Circumstances {
        last_error: failure.as_deref(),
        conflict: declared.and_then(|d| d.conflict.as_deref()),
        deletion_refused: declared.and_then(|d| d.deletion_refused.as_deref()),
    };
    let st = crate::status::workspace::compute(facts, &circumstances, record.status.as_ref());
    if record.status.as_ref() != Some(&st) {
        ctx.store.save_status(&record.uid, &st).await?;
    }
    if ctx.phases.set(key, Some(st.phase)) {
        ctx.phases.publish(&ctx.metrics);
    }
    ctx.metrics.set_agent(key, st.agent.as_ref());
    Ok(Some(st))
}
