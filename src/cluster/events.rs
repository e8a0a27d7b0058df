//! Which Kubernetes Events a reconcile makes: its decisions the user should see
//! (Provisioned, Recreated, TokenRevoked, Healed, ...) and the agent's health changing
//! (AgentUnhealthy, AgentRecovered, Degraded), as a pure function.

use kube::runtime::events::{Event, EventType};

use crate::api::condition::{ConditionStatus, find};
use crate::api::{Phase, WorkspaceStatus};
use crate::trigger::Report;

/// What the status last written for a workspace said of its health: a change is
/// announced once, when it happens.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Health {
    pub phase: Phase,
    /// The AgentHealthy condition's status, when there is one.
    pub agent_healthy: Option<ConditionStatus>,
}

impl Health {
    pub fn of(status: &WorkspaceStatus) -> Self {
        Self { phase: status.phase, agent_healthy: find(&status.conditions, "AgentHealthy").map(|c| c.status) }
    }
}

/// Events for one finished reconcile, given the health last written (None: nothing
/// written yet).
pub fn events_for(report: &Report, previous: Option<Health>) -> Vec<Event> {
    let mut out = Vec::new();
    let incarnation = report.status.as_ref().map_or(0, |s| s.incarnation);
    for d in &report.decisions {
        let failed = d.outcome != "ok";
        let reason = match d.rule.as_str() {
            "provision" if incarnation <= 1 => Some("Provisioned"),
            "provision" | "drift" | "restart" => Some("Recreated"),
            "token-file" => Some("Healed"),
            "heartbeat" if d.cause.contains("online again") => Some("Healed"),
            "heartbeat" => Some("Restarted"),
            "stale-token-without-container" => Some("TokenRevoked"),
            "remove" => Some("Removed"),
            "stop" => Some("Stopped"),
            "pause" => Some("Paused"),
            "resume" => Some("Resumed"),
            _ => None, // orphan: no object to attach it to
        };
        let Some(reason) = reason else { continue };
        let mut note = format!("{}: {}", d.cause, d.actions.join("; "));
        if failed {
            note.push_str(&format!(" ({})", d.outcome));
        }
        let warning = failed || reason == "Restarted";
        out.push(event(reason, d.rule.as_str(), note, warning));
        // Revocations inside another decision (e.g. a provision revoking a missing
        // container's tokens) are worth their own event.
        if reason != "TokenRevoked" {
            for revoked in d.actions.iter().filter(|a| a.starts_with("revoked")) {
                out.push(event("TokenRevoked", d.rule.as_str(), revoked.clone(), false));
            }
        }
    }
    let Some(st) = &report.status else { return out };
    // The agent's own report (error rate, sample error, wedged), as the original
    // platform's `degraded` and back: when the AgentHealthy condition flips.
    let (was, is) = (previous.and_then(|p| p.agent_healthy), Health::of(st).agent_healthy);
    let agent = find(&st.conditions, "AgentHealthy").map(|c| c.message.clone()).unwrap_or_default();
    match (was, is) {
        (Some(ConditionStatus::False), Some(ConditionStatus::False)) => {}
        (_, Some(ConditionStatus::False)) => out.push(event("AgentUnhealthy", "agent-health", agent, true)),
        (Some(ConditionStatus::False), Some(ConditionStatus::True)) => {
            out.push(event("AgentRecovered", "agent-health", agent, false))
        }
        _ => {}
    }
    // Degraded for any other cause (a container restarting in a loop, ...).
    let announced = out.iter().any(|e| e.reason == "AgentUnhealthy");
    if st.phase == Phase::Degraded && previous.map(|p| p.phase) != Some(Phase::Degraded) && !announced {
        let why = find(&st.conditions, "Ready").map(|c| c.message.clone()).unwrap_or_default();
        out.push(event("Degraded", "status", why, true));
    }
    out
}

fn event(reason: &str, action: &str, note: String, warning: bool) -> Event {
    Event {
        type_: if warning { EventType::Warning } else { EventType::Normal },
        reason: reason.to_string(),
        // events.k8s.io limits `note` to 1 KiB.
        note: Some(note.chars().take(1000).collect()),
        action: action.to_string(),
        secondary: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::WorkspaceStatus;
    use crate::model::DecisionRecord;

    fn decision(rule: &str, cause: &str, actions: &[&str]) -> DecisionRecord {
        DecisionRecord {
            at: chrono::Utc::now(),
            rule: rule.into(),
            cause: cause.into(),
            actions: actions.iter().map(|s| s.to_string()).collect(),
            outcome: "ok".into(),
        }
    }

    fn report(incarnation: i64, phase: Phase, decisions: Vec<DecisionRecord>) -> Report {
        Report {
            key: "eng/a".into(),
            status: Some(WorkspaceStatus { incarnation, phase, ..Default::default() }),
            decisions,
            ..Default::default()
        }
    }

    fn was(phase: Phase, agent_healthy: Option<ConditionStatus>) -> Health {
        Health { phase, agent_healthy }
    }

    fn reasons(events: &[Event]) -> Vec<&str> {
        events.iter().map(|e| e.reason.as_str()).collect()
    }

    #[test]
    fn first_provision_is_provisioned_and_a_wiped_container_is_recreated_with_its_tokens_revoked() {
        let first = report(1, Phase::Running, vec![decision("provision", "no container", &["created container ws-1"])]);
        assert_eq!(reasons(&events_for(&first, None)), ["Provisioned"]);
        let healed = report(
            2,
            Phase::Running,
            vec![decision(
                "provision",
                "no container",
                &["revoked 1 token: container-missing", "created container ws-1"],
            )],
        );
        let ev = events_for(&healed, Some(was(Phase::Running, None)));
        assert_eq!(reasons(&ev), ["Recreated", "TokenRevoked"]);
        assert_eq!(ev[1].note.as_deref(), Some("revoked 1 token: container-missing"));
        assert_eq!(ev[0].type_, EventType::Normal);
    }

    #[test]
    fn token_file_heals_stale_tokens_revoke_and_degraded_is_announced_once() {
        let r =
            report(3, Phase::Running, vec![decision("token-file", "no live token matches", &["wrote token Ab3x…"])]);
        assert_eq!(reasons(&events_for(&r, None)), ["Healed"]);
        let r = report(
            3,
            Phase::Running,
            vec![decision("stale-token-without-container", "x", &["revoked 2 tokens: container-missing"])],
        );
        assert_eq!(reasons(&events_for(&r, None)), ["TokenRevoked"]);
        let degraded = report(3, Phase::Degraded, vec![]);
        let ev = events_for(&degraded, Some(was(Phase::Running, None)));
        assert_eq!(reasons(&ev), ["Degraded"]);
        assert_eq!(ev[0].type_, EventType::Warning);
        assert!(events_for(&degraded, Some(was(Phase::Degraded, None))).is_empty());
    }

    /// A report of an agent whose AgentHealthy condition is `status` with `message`.
    fn agent(phase: Phase, status: ConditionStatus, message: &str) -> Report {
        let mut r = report(2, phase, vec![]);
        let st = r.status.as_mut().unwrap();
        st.conditions.push(crate::api::Condition::new("AgentHealthy", status, "Reported", message, chrono::Utc::now()));
        r
    }

    #[test]
    fn an_agent_turning_unhealthy_and_back_is_announced_once_each_way_with_what_it_reported() {
        let sick = agent(Phase::Degraded, ConditionStatus::False, "error rate 0.90: sample error: upstream 502");
        let ev = events_for(&sick, Some(was(Phase::Running, Some(ConditionStatus::True))));
        assert_eq!(reasons(&ev), ["AgentUnhealthy"], "not a second Degraded event for the same change");
        assert_eq!(ev[0].type_, EventType::Warning);
        assert!(ev[0].note.as_deref().unwrap().contains("upstream 502"));
        // Still unhealthy: nothing new.
        assert!(events_for(&sick, Some(Health::of(sick.status.as_ref().unwrap()))).is_empty());
        // Unhealthy from the first status ever written: announced.
        assert_eq!(reasons(&events_for(&sick, None)), ["AgentUnhealthy"]);
        let well = agent(Phase::Running, ConditionStatus::True, "error rate 0.02");
        let ev = events_for(&well, Some(Health::of(sick.status.as_ref().unwrap())));
        assert_eq!(reasons(&ev), ["AgentRecovered"]);
        assert_eq!(ev[0].type_, EventType::Normal);
        assert!(events_for(&well, Some(Health::of(well.status.as_ref().unwrap()))).is_empty());
    }

    #[test]
    fn failed_decisions_are_warnings_and_orphans_make_no_event() {
        let mut d = decision("drift", "spec changed", &["remove container"]);
        d.outcome = "failed: image missing".into();
        let ev = events_for(&report(2, Phase::Failed, vec![d]), None);
        assert_eq!(reasons(&ev), ["Recreated"]);
        assert_eq!(ev[0].type_, EventType::Warning);
        assert!(ev[0].note.as_deref().unwrap().contains("image missing"));
        assert!(events_for(&report(1, Phase::Running, vec![decision("orphan", "x", &[])]), None).is_empty());
    }
}
