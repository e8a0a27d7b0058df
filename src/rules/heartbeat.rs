//! heartbeat: the container runs but the agent has been silent past the TTL (a hung
//! agent; see liveness.rs for how silence is counted). Restart it with a new
//! incarnation, at most `restart_budget` times with doubling backoff; after that the
//! workspace stays Degraded (status says why) until the agent is heard again, which
//! also resets the budget.

use super::*;

pub fn rule(facts: &Facts<'_>) -> Option<Verdict> {
    facts.spec()?;
    if facts.mode()? != OperatingMode::Running {
        return None;
    }
    let c = facts.observed.container()?;
    let record = facts.observed.record.as_ref()?;
    if c.incarnation() != Some(record.incarnation) {
        return None;
    }
    let ttl = chrono::Duration::from_std(facts.settings.heartbeat_ttl).ok()?;
    match facts.liveness() {
        Liveness::NotExpected | Liveness::Waiting { .. } => None,
        Liveness::Online { last, .. } => {
            // Heard since the last restart and for longer than a TTL: the budget resets.
            let settled = record.last_restart_at.is_some_and(|r| last > r && last - r > ttl);
            (record.restart_count > 0 && settled)
                .then(|| Verdict::new("agent is online again", vec![Action::ResetRestarts]))
        }
        Liveness::Silent { heard, since } => {
            if restart_at(record, facts.settings).is_none_or(|at| at > facts.now) {
                return None;
            }
            let silent = (facts.now - since).num_seconds();
            let reason = match heard {
                Some(_) => format!("agent silent for {silent}s (TTL {}s)", ttl.num_seconds()),
                None => format!("agent never reported in {silent}s (TTL {}s)", ttl.num_seconds()),
            };
            Some(Verdict::new(
                reason.clone(),
                vec![Action::RecordRestart { reason }, facts.provision(RevokeReason::Reprovision)],
            ))
        }
    }
}

/// When the rule will next have something to say: the end of the TTL, or, for an agent
/// silent past it, the end of the restart backoff (never, once the budget is spent:
/// then only a heartbeat, which queues a reconcile itself, changes anything).
pub fn wake(facts: &Facts<'_>) -> Option<DateTime<Utc>> {
    match facts.liveness() {
        Liveness::NotExpected => None,
        Liveness::Online { deadline, .. } | Liveness::Waiting { deadline, .. } => Some(deadline),
        Liveness::Silent { .. } => restart_at(facts.observed.record.as_ref()?, facts.settings),
    }
}

/// The earliest time another heartbeat restart is allowed: after the backoff since the
/// last one (doubling each time); None once the budget is spent.
pub fn restart_at(record: &crate::model::WorkspaceRecord, settings: &Settings) -> Option<DateTime<Utc>> {
    if record.restart_count >= settings.restart_budget {
        return None;
    }
    let Some(last) = record.last_restart_at else { return Some(DateTime::<Utc>::MIN_UTC) };
    let factor = 1u32 << record.restart_count.clamp(0, 16) as u32;
    let wait = chrono::Duration::from_std(settings.restart_backoff * factor).unwrap_or(chrono::Duration::MAX);
    Some(last.checked_add_signed(wait).unwrap_or(DateTime::<Utc>::MAX_UTC))
}

/// The budget is spent: the status reports Degraded with this reason.
pub fn degraded(facts: &Facts<'_>) -> Option<String> {
    let record = facts.observed.record.as_ref()?;
    (record.restart_count >= facts.settings.restart_budget).then(|| {
        format!(
            "restarted {} times for missed heartbeats ({}); waiting for the agent",
            record.restart_count,
            record.last_restart_reason.as_deref().unwrap_or("agent silent")
        )
    })
}

#[cfg(test)]
mod tests {
    use super::super::fixtures::*;
    use super::*;

    fn silent(secs: i64) -> Observed {
        healthy().silent_for(secs)
    }

    /// `restarts` heartbeat restarts so far, the last `ago` seconds before now.
    fn restarted(obs: Observed, restarts: i64, ago: i64) -> Observed {
        obs.record_with(|r| {
            r.restart_count = restarts;
            r.last_restart_at = Some(now() - chrono::Duration::seconds(ago));
        })
    }

    fn decide(obs: &Observed) -> Option<Verdict> {
        let (s, des) = (settings(), desired());
        rule(&facts(Some(&des), obs, &s))
    }

    #[test]
    fn fresh_heartbeat_is_quiet() {
        assert_eq!(decide(&silent(5)), None);
    }

    #[test]
    fn silence_past_ttl_restarts_and_counts_it() {
        let d = decide(&silent(30)).unwrap();
        assert!(matches!(d.actions[0], Action::RecordRestart { .. }));
        assert_eq!(d.actions[1], Action::Provision { revoke: RevokeReason::Reprovision, paused: false });
    }

    #[test]
    fn agent_that_never_reported_is_timed_from_provisioning() {
        let obs = healthy().never_heard();
        assert!(decide(&obs).unwrap().cause.contains("never reported"));
    }

    #[test]
    fn budget_spent_means_degraded_not_another_restart() {
        let obs = restarted(silent(30), 3, 3600);
        assert_eq!(decide(&obs), None);
        let (s, des) = (settings(), desired());
        assert!(degraded(&facts(Some(&des), &obs, &s)).is_some());
    }

    #[test]
    fn backoff_doubles_between_restarts() {
        assert_eq!(decide(&restarted(silent(30), 2, 30)), None, "the third restart waits 40 s");
        assert!(decide(&restarted(silent(30), 2, 41)).is_some());
    }

    #[test]
    fn heartbeats_the_store_could_not_record_are_not_silence() {
        let lost = |secs| silent(30).heartbeats_lost(secs);
        assert_eq!(decide(&lost(2)), None, "the store failed to record beats 2 s ago: not silent past the TTL");
        assert!(decide(&lost(25)).unwrap().cause.contains("silent for 25s"), "silence counts from the outage's end");
        assert!(decide(&lost(60)).unwrap().cause.contains("silent for 30s"), "an older outage changes nothing");
    }

    #[test]
    fn paused_workspaces_are_not_expected_to_heartbeat() {
        let obs = silent(30).with_container(container(1, ContainerState::Paused));
        let (s, des) = (settings(), desired_mode(OperatingMode::Paused));
        assert_eq!(rule(&facts(Some(&des), &obs, &s)), None);
    }

    #[test]
    fn it_wakes_at_the_end_of_the_ttl_or_the_backoff_and_not_once_the_budget_is_spent() {
        let (s, des) = (settings(), desired());
        let wake_of = |obs: &Observed| wake(&facts(Some(&des), obs, &s));
        assert_eq!(wake_of(&silent(5)), Some(now() + chrono::Duration::seconds(5)), "heard 5 s ago, TTL 10 s");
        let backing_off = restarted(silent(30), 2, 30);
        assert_eq!(wake_of(&backing_off), Some(now() + chrono::Duration::seconds(10)), "40 s after the last restart");
        assert_eq!(wake_of(&restarted(silent(30), 3, 30)), None, "Degraded: only a heartbeat changes anything");
    }

    #[test]
    fn budget_resets_once_the_agent_is_back() {
        let obs = restarted(silent(1), 2, 60);
        assert_eq!(decide(&obs).unwrap().actions, vec![Action::ResetRestarts]);
    }
}
