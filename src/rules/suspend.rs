//! suspend: the lifecycle autopilot (`spec.lifecycle`). A running workspace is
//! suspended once its agent has been idle for `idleAfter` (no heartbeat reporting
//! `active_tasks > 0` and no wake request in that time), or once it has run for
//! `maxLifetime` (wall time with a running agent; paused, stopped and suspended time
//! does not count). An agent that reports work in progress is never suspended, however
//! long it runs: the lifetime waits for it to finish.
//!
//! A suspension is recorded with its cause (`Idle`, `MaxLifetime`) and mode
//! (`suspendTo`: Paused or Stopped) and overrides a Running mode (see [`mode`]); the
//! pause and stop rules then do what they do for those modes, token policy included,
//! and a removed container comes back frozen, not running. A wake request later than
//! the suspension ends it (the `wake` API, CLI and annotation, `resume`, and, with
//! `wake: OnDemand`, a peer's discovery); after a `MaxLifetime` suspension the
//! lifetime starts over.
//!
//! `lifetime` keeps the running clock: it starts when the agent's container runs in
//! mode Running and stops when it no longer does, so what is paused is not counted.

use super::*;
use crate::model::{LifecycleState, SuspendCause, Suspension};

/// The suspension in force for a record: its last one, unless a wake request came
/// after it. Only where the spec asks for the autopilot (`lifecycle.idleAfter` or
/// `maxLifetime`): removing those ends a suspension too.
pub fn in_force(record: &crate::model::WorkspaceRecord, spec: &EffectiveSpec) -> Option<Suspension> {
    if !spec.lifecycle.enabled() {
        return None;
    }
    let s = record.lifecycle.suspended?;
    record.woken_at.is_none_or(|w| w < s.at).then_some(s)
}

/// The operating mode once a suspension is applied: a suspension overrides Running only
/// (a workspace paused or stopped by its owner stays as they said).
pub fn mode(declared: OperatingMode, suspension: Option<Suspension>) -> OperatingMode {
    match (declared, suspension) {
        (OperatingMode::Running, Some(s)) => s.to,
        (mode, _) => mode,
    }
}

/// Whether the current incarnation's agent says it is working on something.
fn busy(facts: &Facts<'_>) -> bool {
    let inc = facts.observed.incarnation();
    facts.observed.agent.as_ref().is_some_and(|r| r.incarnation == inc && r.busy())
}

/// Since when the agent counts as idle: the latest of its start (this container, or
/// this running stretch after a pause), its last busy heartbeat and the last wake.
fn idle_since(facts: &Facts<'_>, c: &ContainerInfo) -> Option<DateTime<Utc>> {
    let record = facts.observed.record.as_ref()?;
    let inc = record.incarnation;
    let busy_at = facts.observed.agent.as_ref().filter(|r| r.incarnation == inc).and_then(|r| r.busy_at);
    [c.started_at.or(c.provisioned_at()), record.lifecycle.running_since, busy_at, record.woken_at]
        .into_iter()
        .flatten()
        .max()
}

/// When each cause of a suspension falls due for a running, not busy workspace: None
/// when the rule has nothing to watch (no lifecycle, not running, busy).
fn due(facts: &Facts<'_>) -> Option<Vec<(SuspendCause, DateTime<Utc>, String)>> {
    let lc = &facts.spec()?.lifecycle;
    if !lc.enabled() || facts.mode()? != OperatingMode::Running || busy(facts) {
        return None;
    }
    let c = facts.observed.current_running()?;
    let record = facts.observed.record.as_ref()?;
    let mut out = Vec::new();
    // MaxLifetime first: when both are due it is the one that resets the lifetime. Only
    // once the clock runs: right after a wake, `lifetime` first closes the suspension
    // (and starts a new lifetime after a MaxLifetime one).
    if let Some(max) = lc.max_lifetime.and_then(|m| chrono::Duration::from_std(m).ok())
        && record.lifecycle.running_since.is_some()
    {
        let used = record.lifecycle.used(facts.now);
        let left = max - used;
        let why = format!(
            "ran for {}s of lifecycle.maxLifetime {}s",
            used.num_seconds().min(max.num_seconds()),
            max.num_seconds()
        );
        out.push((SuspendCause::MaxLifetime, facts.now + left.max(chrono::Duration::zero()), why));
    }
    if let Some(idle) = lc.idle_after.and_then(|i| chrono::Duration::from_std(i).ok()) {
        let since = idle_since(facts, c)?;
        let why =
            format!("idle for {}s (lifecycle.idleAfter {}s)", (facts.now - since).num_seconds(), idle.num_seconds());
        out.push((SuspendCause::Idle, since + idle, why));
    }
    Some(out)
}

pub fn rule(facts: &Facts<'_>) -> Option<Verdict> {
    let (cause, _, why) = due(facts)?.into_iter().find(|(_, at, _)| *at <= facts.now)?;
    let spec = facts.spec()?;
    let record = facts.observed.record.as_ref()?;
    let to = spec.lifecycle.suspend_to.mode();
    let used_ms = record.lifecycle.used(facts.now).num_milliseconds();
    let suspension = Suspension { cause, at: facts.now, to };
    Some(Verdict::new(format!("{why}: suspend to {to:?}"), vec![Action::Suspend { suspension, used_ms }]))
}

/// When a cause falls due (None while the agent is busy: the heartbeat that reports it
/// done changes what the status shows, which queues a reconcile).
pub fn wake(facts: &Facts<'_>) -> Option<DateTime<Utc>> {
    due(facts)?.into_iter().map(|(_, at, _)| at).min()
}

/// The running clock of `maxLifetime` (and the start of an idle stretch after a
/// pause): started when the agent's container runs in mode Running, stopped when it
/// no longer does. Starting it also closes a suspension a wake ended.
pub fn lifetime(facts: &Facts<'_>) -> Option<Verdict> {
    let record = facts.observed.record.as_ref()?;
    let state = &record.lifecycle;
    let enabled = facts.spec().is_some_and(|s| s.lifecycle.enabled());
    let running = enabled
        && facts.mode() == Some(OperatingMode::Running)
        && facts.observed.current_running().is_some()
        && facts.observed.containers.is_some();
    match (running, state.running_since) {
        (true, None) => {
            let mut next = LifecycleState { running_since: Some(facts.now), ..state.clone() };
            let mut cause = "the agent's container runs".to_string();
            if let Some(s) = next.suspended.take() {
                cause = format!("woken from a suspension ({})", s.cause);
                if s.cause == SuspendCause::MaxLifetime {
                    next.used_ms = 0;
                    cause.push_str(": a new lifetime starts");
                }
            }
            Some(Verdict::new(cause, vec![Action::LifetimeClock { state: next }]))
        }
        // Not running (or the autopilot turned off): the stretch is added up. Only
        // once the listing is known: an unknown one is not "stopped".
        (false, Some(since)) if facts.observed.containers.is_some() || !enabled => {
            let used_ms = state.used_ms + (facts.now - since).num_milliseconds().max(0);
            let next = LifecycleState { running_since: None, used_ms, ..state.clone() };
            Some(Verdict::new("the agent's container no longer runs", vec![Action::LifetimeClock { state: next }]))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::super::fixtures::*;
    use super::*;
    use crate::api::{Lifecycle, SuspendTo, WorkspaceSpec};
    use crate::model::AgentReport;

    fn lifecycle(idle: Option<&str>, max: Option<&str>, to: Option<SuspendTo>) -> Desired {
        desired_with(WorkspaceSpec {
            lifecycle: Some(Lifecycle {
                idle_after: idle.map(String::from),
                max_lifetime: max.map(String::from),
                suspend_to: to,
                wake: None,
            }),
            ..Default::default()
        })
    }

    /// Running since t(100) (the container's start), the clock running since then.
    fn running() -> Observed {
        healthy().record_with(|r| r.lifecycle.running_since = Some(t(100)))
    }

    fn with_report(obs: Observed, report: AgentReport) -> Observed {
        Observed { agent: Some(AgentReport { incarnation: 1, ..report }), ..obs }
    }

    fn at(des: &Desired, obs: &Observed, secs: i64) -> Option<Verdict> {
        let s = settings();
        let mut f = facts(Some(des), obs, &s);
        f.now = t(secs);
        rule(&f)
    }

    #[test]
    fn nothing_happens_without_a_lifecycle() {
        assert_eq!(at(&desired(), &running(), 100_000), None);
        let s = settings();
        assert_eq!(wake(&facts(Some(&desired()), &running(), &s)), None);
        assert_eq!(lifetime(&facts(Some(&desired()), &healthy(), &s)), None, "no clock either");
    }

    #[test]
    fn an_idle_agent_is_suspended_after_idle_after_with_its_cause() {
        let des = lifecycle(Some("60s"), None, None);
        assert_eq!(at(&des, &running(), 159), None, "started at 100, idle for 59 s");
        let v = at(&des, &running(), 160).unwrap();
        assert_eq!(v.cause, "idle for 60s (lifecycle.idleAfter 60s): suspend to Paused");
        let Action::Suspend { suspension, .. } = v.actions[0] else { panic!("{v:?}") };
        assert_eq!(suspension, Suspension { cause: SuspendCause::Idle, at: t(160), to: OperatingMode::Paused });
        let s = settings();
        let obs = running();
        let mut f = facts(Some(&des), &obs, &s);
        f.now = t(130);
        assert_eq!(wake(&f), Some(t(160)), "looked at again when it falls due");
    }

    #[test]
    fn a_busy_agent_is_never_suspended() {
        let des = lifecycle(Some("60s"), Some("10m"), None);
        let busy =
            with_report(running(), AgentReport { active_tasks: Some(2), busy_at: Some(t(110)), ..Default::default() });
        assert_eq!(at(&des, &busy, 100_000), None, "busy, long past idleAfter and maxLifetime");
        let s = settings();
        assert_eq!(wake(&facts(Some(&des), &busy, &s)), None, "the heartbeat that ends the work queues a look");
        // Done at t(500): idle from its last busy heartbeat on.
        let done =
            with_report(running(), AgentReport { active_tasks: Some(0), busy_at: Some(t(500)), ..Default::default() });
        let des = lifecycle(Some("60s"), None, None);
        assert_eq!(at(&des, &done, 559), None);
        assert!(at(&des, &done, 560).is_some());
    }

    #[test]
    fn a_wake_request_restarts_the_idle_clock() {
        let des = lifecycle(Some("60s"), None, None);
        let woken = running().record_with(|r| r.woken_at = Some(t(300)));
        assert_eq!(at(&des, &woken, 359), None);
        assert_eq!(at(&des, &woken, 360).unwrap().cause, "idle for 60s (lifecycle.idleAfter 60s): suspend to Paused");
    }

    #[test]
    fn max_lifetime_counts_running_time_only_and_wins_over_idle() {
        let des = lifecycle(Some("1h"), Some("10m"), Some(SuspendTo::Stopped));
        // 500 s used before this stretch (t(100)..): due at t(200).
        let obs = running().record_with(|r| r.lifecycle.used_ms = 500_000);
        assert_eq!(at(&des, &obs, 199), None);
        let v = at(&des, &obs, 200).unwrap();
        assert_eq!(v.cause, "ran for 600s of lifecycle.maxLifetime 600s: suspend to Stopped");
        assert_eq!(
            v.actions,
            vec![Action::Suspend {
                suspension: Suspension { cause: SuspendCause::MaxLifetime, at: t(200), to: OperatingMode::Stopped },
                used_ms: 600_000
            }]
        );
    }

    #[test]
    fn a_suspension_overrides_running_until_a_later_wake() {
        let des = lifecycle(Some("60s"), None, None);
        let s = settings();
        let susp = Suspension { cause: SuspendCause::Idle, at: t(500), to: OperatingMode::Paused };
        let obs = running().record_with(|r| r.lifecycle.suspended = Some(susp));
        let f = facts(Some(&des), &obs, &s);
        assert_eq!(f.mode(), Some(OperatingMode::Paused));
        assert_eq!(f.suspension(), Some(susp));
        assert_eq!(
            super::super::pause_resume_stop::pause(&f).unwrap().cause,
            "suspended (Idle): operating mode is Paused"
        );
        let old_wake = obs.clone().record_with(|r| r.woken_at = Some(t(400)));
        assert_eq!(
            facts(Some(&des), &old_wake, &s).mode(),
            Some(OperatingMode::Paused),
            "a wake before it ends nothing"
        );
        let woken = obs.clone().record_with(|r| r.woken_at = Some(t(600)));
        assert_eq!(facts(Some(&des), &woken, &s).mode(), Some(OperatingMode::Running));
        // The owner's own pause stays a pause; turning the lifecycle off ends it.
        assert_eq!(mode(OperatingMode::Stopped, Some(susp)), OperatingMode::Stopped);
        assert_eq!(facts(Some(&desired()), &obs, &s).mode(), Some(OperatingMode::Running));
    }

    #[test]
    fn a_suspended_workspace_whose_container_is_gone_comes_back_frozen() {
        let des = lifecycle(Some("60s"), None, None);
        let s = settings();
        let susp = Suspension { cause: SuspendCause::Idle, at: t(500), to: OperatingMode::Paused };
        let obs = healthy().without_container().record_with(|r| r.lifecycle.suspended = Some(susp));
        let d = plan(&facts(Some(&des), &obs, &s)).decision().unwrap();
        assert_eq!(d.rule, "provision");
        assert!(d.actions.iter().any(|a| matches!(a, Action::Provision { paused: true, .. })), "{d:?}");
    }

    #[test]
    fn the_clock_runs_only_while_the_agent_runs() {
        let des = lifecycle(None, Some("1h"), None);
        let s = settings();
        let v = lifetime(&facts(Some(&des), &healthy(), &s)).unwrap();
        assert_eq!(
            v.actions,
            vec![Action::LifetimeClock { state: LifecycleState { running_since: Some(now()), ..Default::default() } }]
        );
        assert_eq!(lifetime(&facts(Some(&des), &running(), &s)), None, "already running");
        // Paused by its owner: the stretch t(100)..now is added up.
        let paused = running().with_container(container(1, ContainerState::Paused));
        let paused_des = desired_with(WorkspaceSpec {
            operating_mode: Some(OperatingMode::Paused),
            lifecycle: Some(Lifecycle { max_lifetime: Some("1h".into()), ..Default::default() }),
            ..Default::default()
        });
        let v = lifetime(&facts(Some(&paused_des), &paused, &s)).unwrap();
        assert_eq!(
            v.actions,
            vec![Action::LifetimeClock {
                state: LifecycleState { running_since: None, used_ms: 900_000, ..Default::default() }
            }]
        );
    }

    #[test]
    fn waking_from_max_lifetime_starts_a_new_lifetime_and_from_idle_keeps_it() {
        let des = lifecycle(Some("60s"), Some("1h"), None);
        let s = settings();
        for (cause, used) in [(SuspendCause::MaxLifetime, 0), (SuspendCause::Idle, 42)] {
            let obs = healthy().record_with(|r| {
                r.lifecycle = LifecycleState {
                    suspended: Some(Suspension { cause, at: t(500), to: OperatingMode::Paused }),
                    running_since: None,
                    used_ms: 42,
                };
                r.woken_at = Some(t(600));
            });
            let v = lifetime(&facts(Some(&des), &obs, &s)).unwrap();
            assert!(v.cause.starts_with(&format!("woken from a suspension ({cause})")), "{}", v.cause);
            assert_eq!(
                v.actions,
                vec![Action::LifetimeClock {
                    state: LifecycleState { suspended: None, running_since: Some(now()), used_ms: used }
                }]
            );
        }
    }
}
