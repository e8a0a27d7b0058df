//! heartbeat: the container runs but the agent has been silent past the TTL (a hung
//! agent). Restart it with a new incarnation, at most `restart_budget` times with
//! doubling backoff; after that the workspace stays Degraded (status says why) until
//! the agent is heard again, which also resets the budget.

use super::*;

pub fn rule(ctx: &Ctx<'_>) -> Option<Decision> {
    ctx.spec()?;
    if ctx.mode()? != OperatingMode::Running {
        return None;
    }
    let c = ctx.observed.container()?;
    let record = ctx.observed.record.as_ref()?;
    if c.state != ContainerState::Running || c.incarnation() != Some(record.incarnation) {
        return None;
    }
    let ttl = chrono::Duration::from_std(ctx.settings.heartbeat_ttl).ok()?;
    let heard = record.last_heartbeat_at.filter(|h| Some(*h) >= c.provisioned_at());
    if let Some(h) = heard
        && ctx.now - h <= ttl
    {
        // Online. Heard since the last restart and for longer than a TTL: budget resets.
        let settled = record.last_restart_at.is_some_and(|r| h > r && h - r > ttl);
        return (record.restart_count > 0 && settled)
            .then(|| Decision::new("heartbeat", "agent is online again", vec![Action::ResetRestarts]));
    }
    let since = silent_since(heard.or(c.provisioned_at())?, ctx.observed);
    let silent = ctx.now - since;
    if silent <= ttl {
        return None;
    }
    if !restart_allowed(record, ctx) {
        return None;
    }
    let reason = match heard {
        Some(_) => format!("agent silent for {}s (TTL {}s)", silent.num_seconds(), ttl.num_seconds()),
        None => format!("agent never reported in {}s (TTL {}s)", silent.num_seconds(), ttl.num_seconds()),
    };
    Some(Decision::new(
        "heartbeat",
        reason.clone(),
        vec![Action::RecordRestart { reason }, Action::Provision { revoke: RevokeReason::Reprovision }],
    ))
}

/// Where the agent's silence starts counting: at `from` (its last recorded heartbeat,
/// or its container's start), or later if the registry failed to record heartbeats
/// since (the state store was down or locked): beats the operator could not record
/// are not the agent's silence, so an outage of the operator's own database never
/// restarts healthy agents nor revokes their tokens.
pub fn silent_since(from: DateTime<Utc>, observed: &Observed) -> DateTime<Utc> {
    observed.heartbeats_lost_at.map_or(from, |lost| lost.max(from))
}

/// Within budget and past the backoff since the last restart.
pub fn restart_allowed(record: &crate::store::WorkspaceRecord, ctx: &Ctx<'_>) -> bool {
    if record.restart_count >= ctx.settings.restart_budget {
        return false;
    }
    let Some(last) = record.last_restart_at else { return true };
    let factor = 1u32 << record.restart_count.clamp(0, 16) as u32;
    let wait = chrono::Duration::from_std(ctx.settings.restart_backoff * factor).unwrap_or(chrono::Duration::MAX);
    ctx.now - last >= wait
}

/// The budget is spent: the status reports Degraded with this reason.
pub fn degraded(ctx: &Ctx<'_>) -> Option<String> {
    let record = ctx.observed.record.as_ref()?;
    (record.restart_count >= ctx.settings.restart_budget).then(|| {
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
        let mut obs = healthy();
        obs.record.as_mut().unwrap().last_heartbeat_at = Some(now() - chrono::Duration::seconds(secs));
        obs
    }

    fn decide(obs: &Observed) -> Option<Decision> {
        let (s, des) = (settings(), desired());
        rule(&ctx(Some(&des), obs, &s))
    }

    #[test]
    fn fresh_heartbeat_is_quiet() {
        assert_eq!(decide(&silent(5)), None);
    }

    #[test]
    fn silence_past_ttl_restarts_and_counts_it() {
        let d = decide(&silent(30)).unwrap();
        assert!(matches!(d.actions[0], Action::RecordRestart { .. }));
        assert_eq!(d.actions[1], Action::Provision { revoke: RevokeReason::Reprovision });
    }

    #[test]
    fn agent_that_never_reported_is_timed_from_provisioning() {
        let mut obs = healthy();
        obs.record.as_mut().unwrap().last_heartbeat_at = None;
        assert!(decide(&obs).unwrap().cause.contains("never reported"));
    }

    #[test]
    fn budget_spent_means_degraded_not_another_restart() {
        let mut obs = silent(30);
        let r = obs.record.as_mut().unwrap();
        r.restart_count = 3;
        r.last_restart_at = Some(now() - chrono::Duration::seconds(3600));
        assert_eq!(decide(&obs), None);
        let (s, des) = (settings(), desired());
        assert!(degraded(&ctx(Some(&des), &obs, &s)).is_some());
    }

    #[test]
    fn backoff_doubles_between_restarts() {
        let mut obs = silent(30);
        let r = obs.record.as_mut().unwrap();
        r.restart_count = 2;
        r.last_restart_at = Some(now() - chrono::Duration::seconds(30)); // needs 40s
        assert_eq!(decide(&obs), None);
        obs.record.as_mut().unwrap().last_restart_at = Some(now() - chrono::Duration::seconds(41));
        assert!(decide(&obs).is_some());
    }

    #[test]
    fn heartbeats_the_store_could_not_record_are_not_silence() {
        let mut obs = silent(30);
        obs.heartbeats_lost_at = Some(now() - chrono::Duration::seconds(2));
        assert_eq!(decide(&obs), None, "the store failed to record beats 2 s ago: not silent past the TTL");
        obs.heartbeats_lost_at = Some(now() - chrono::Duration::seconds(25));
        assert!(decide(&obs).unwrap().cause.contains("silent for 25s"), "silence counts from the outage's end");
        obs.heartbeats_lost_at = Some(now() - chrono::Duration::seconds(60));
        assert!(decide(&obs).unwrap().cause.contains("silent for 30s"), "an older outage changes nothing");
    }

    #[test]
    fn paused_workspaces_are_not_expected_to_heartbeat() {
        let mut obs = silent(30);
        obs.containers = Some(vec![container(1, ContainerState::Paused)]);
        let (s, des) = (settings(), desired_mode(OperatingMode::Paused));
        assert_eq!(rule(&ctx(Some(&des), &obs, &s)), None);
    }

    #[test]
    fn budget_resets_once_the_agent_is_back() {
        let mut obs = silent(1);
        let r = obs.record.as_mut().unwrap();
        r.restart_count = 2;
        r.last_restart_at = Some(now() - chrono::Duration::seconds(60));
        assert_eq!(decide(&obs).unwrap().actions, vec![Action::ResetRestarts]);
    }
}
