//! wedged: the agent is online, but its runtime has reported `runtime_state: wedged`
//! without a break for longer than `spec.healthPolicy.restartWedgedAfter`. Restart it
//! (new container, new token), within the same restart budget and backoff as the
//! heartbeat rule: a runtime that wedges again at once is not restarted in a loop.
//! Without the policy a wedged agent is only shown as Degraded (agent_health.rs), as
//! the original platform did.

use super::*;

/// Since when this incarnation's agent has been wedged, and how long it may be.
fn wedged(facts: &Facts<'_>) -> Option<(DateTime<Utc>, chrono::Duration)> {
    let grace = chrono::Duration::from_std(facts.spec()?.restart_wedged_after?).ok()?;
    if facts.mode()? != OperatingMode::Running {
        return None;
    }
    let record = facts.observed.record.as_ref()?;
    if facts.observed.container()?.incarnation() != Some(record.incarnation) {
        return None;
    }
    let report = facts.observed.agent.as_ref().filter(|r| r.incarnation == record.incarnation && r.wedged())?;
    Some((report.wedged_since?, grace))
}

pub fn rule(facts: &Facts<'_>) -> Option<Verdict> {
    let (since, grace) = wedged(facts)?;
    if facts.now - since < grace {
        return None;
    }
    let record = facts.observed.record.as_ref()?;
    if heartbeat::restart_at(record, facts.settings).is_none_or(|at| at > facts.now) {
        return None;
    }
    let reason = format!(
        "agent wedged for {}s (healthPolicy.restartWedgedAfter {}s)",
        (facts.now - since).num_seconds(),
        grace.num_seconds()
    );
    Some(Verdict::new(
        reason.clone(),
        vec![Action::RecordRestart { reason }, facts.provision(RevokeReason::Reprovision)],
    ))
}

/// The end of the grace, or, past it, the end of the restart backoff.
pub fn wake(facts: &Facts<'_>) -> Option<DateTime<Utc>> {
    let (since, grace) = wedged(facts)?;
    let due = since + grace;
    if due > facts.now {
        return Some(due);
    }
    heartbeat::restart_at(facts.observed.record.as_ref()?, facts.settings)
}

#[cfg(test)]
mod tests {
    use super::super::fixtures::*;
    use super::*;
    use crate::api::WorkspaceSpec;
    use crate::model::AgentReport;

    fn with_policy(after: Option<u64>) -> Desired {
        desired_with(WorkspaceSpec {
            health_policy: after.map(|s| crate::api::HealthPolicy { restart_wedged_after: Some(format!("{s}s")) }),
            ..Default::default()
        })
    }

    /// A healthy workspace whose agent has reported itself wedged for `secs`.
    fn wedged_for(secs: i64) -> Observed {
        let mut obs = healthy();
        let incarnation = obs.record.as_ref().unwrap().incarnation;
        obs.agent = Some(AgentReport {
            incarnation,
            runtime_state: Some("wedged".into()),
            wedged_since: Some(now() - chrono::Duration::seconds(secs)),
            reported_at: Some(now()),
            ..Default::default()
        });
        obs
    }

    fn decide(obs: &Observed, des: &Desired) -> Option<Verdict> {
        rule(&facts(Some(des), obs, &settings()))
    }

    #[test]
    fn a_wedge_past_the_grace_is_restarted_with_a_new_token() {
        let v = decide(&wedged_for(301), &with_policy(Some(300))).expect("restarted");
        assert!(v.cause.contains("wedged for 301s"), "{}", v.cause);
        assert!(matches!(v.actions[0], Action::RecordRestart { .. }));
        assert!(matches!(v.actions[1], Action::Provision { .. }), "{:?}", v.actions);
    }

    #[test]
    fn within_the_grace_or_without_the_policy_nothing_happens() {
        assert_eq!(decide(&wedged_for(299), &with_policy(Some(300))), None);
        assert_eq!(decide(&wedged_for(3600), &with_policy(None)), None, "the original only showed Degraded");
        assert_eq!(decide(&healthy(), &with_policy(Some(1))), None, "not wedged");
    }

    #[test]
    fn a_report_of_an_older_incarnation_says_nothing() {
        let mut obs = wedged_for(3600);
        obs.agent.as_mut().unwrap().incarnation -= 1;
        assert_eq!(decide(&obs, &with_policy(Some(60))), None);
    }

    #[test]
    fn the_restart_budget_and_backoff_hold_as_for_a_silent_agent() {
        let spent = wedged_for(3600).record_with(|r| {
            r.restart_count = 3;
            r.last_restart_at = Some(now() - chrono::Duration::hours(1));
        });
        assert_eq!(decide(&spent, &with_policy(Some(60))), None, "budget spent");
        let recent = wedged_for(3600).record_with(|r| {
            r.restart_count = 1;
            r.last_restart_at = Some(now() - chrono::Duration::seconds(5));
        });
        assert_eq!(decide(&recent, &with_policy(Some(60))), None, "backing off");
    }

    #[test]
    fn it_wakes_at_the_end_of_the_grace() {
        let obs = wedged_for(100);
        let des = with_policy(Some(300));
        assert_eq!(wake(&facts(Some(&des), &obs, &settings())), Some(now() + chrono::Duration::seconds(200)));
    }
}
