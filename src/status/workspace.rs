//! A workspace's status, recomputed whole on every pass from the rules' facts (never
//! read-modify-write): whether its agent is online and what holds it come from the
//! rules (`Liveness`, `Hold`), so the status says what the rules act on. Conditions
//! keep their transition times when nothing changed.

use crate::api::condition::carry_transition_times;
use crate::api::{
    AgentStatus, Condition, ConditionStatus, ContainerStatus, OperatingMode, Phase, PodStatus, TokenStatus,
    UpdatePolicy, WorkspaceStatus,
};
use crate::rules::agent_health::{self, AgentHealth};
use crate::rules::{ContainerState, Facts, Hold, TokenFile, heartbeat, liveness};

/// What the status shows beyond the rules' facts: the loop's own knowledge.
#[derive(Clone, Debug, Default)]
pub struct Circumstances<'a> {
    /// The error that stopped the last decision (image missing, Docker down...).
    pub last_error: Option<&'a str>,
    /// Set when another source declares the same workspace.
    pub conflict: Option<&'a str>,
    /// Set when its deletion is refused because children still name it as parent.
    pub deletion_refused: Option<&'a str>,
}

pub fn compute(facts: &Facts<'_>, extra: &Circumstances<'_>, previous: Option<&WorkspaceStatus>) -> WorkspaceStatus {
    let now = facts.now;
    let obs = facts.observed;
    let record = obs.record.as_ref();
    let container = obs.container();
    let heard = liveness::last_heard(obs);
    let online = facts.liveness().is_online();
    let token = {
        let inc = obs.incarnation();
        obs.live_tokens.iter().filter(|t| t.incarnation == inc).max_by_key(|t| t.created_at)
    };

    let mut cond = Vec::new();
    let mut c = |t: &str, status: ConditionStatus, reason: &str, msg: String| {
        cond.push(Condition::new(t, status, reason, msg, now));
    };
    let tf = |ok: bool| if ok { ConditionStatus::True } else { ConditionStatus::False };

    let invalid = facts.desired.and_then(|d| d.spec.as_ref().err());
    let hold = facts.hold();
    let secrets_hold = match &hold {
        Some(Hold::Secrets(why)) => Some(why.as_str()),
        _ => None,
    };
    let quota_hold = facts.quota_hold();
    let degraded = heartbeat::degraded(facts);
    // What the agent itself reports, judged only while it is heard from.
    let previously_healthy = previous
        .and_then(|p| crate::api::condition::find(&p.conditions, "AgentHealthy"))
        .is_none_or(|c| c.status != ConditionStatus::False);
    let report = obs.agent.as_ref().filter(|r| r.incarnation == obs.incarnation());
    let health = agent_health::evaluate(previously_healthy, report, obs.incarnation()).filter(|_| online);
    let unhealthy = match &health {
        Some(AgentHealth::Degraded(_, why)) => Some(why.clone()),
        _ => None,
    };
    let mode = facts.mode();
    let phase = match (facts.desired, invalid) {
        (None, _) => Phase::Terminating,
        (Some(_), Some(_)) => Phase::Failed,
        _ if extra.last_error.is_some() => Phase::Failed,
        _ if obs.containers.is_none() => previous.map(|p| p.phase).unwrap_or_default(),
        // Suspended by the lifecycle autopilot, and carried out: frozen, or no container.
        _ if facts.suspension().is_some()
            && container.is_none_or(|c| {
                c.state == ContainerState::Paused && c.incarnation() == record.map(|r| r.incarnation)
            }) =>
        {
            Phase::Suspended
        }
        _ => match (mode, container.map(|c| c.state)) {
            (Some(OperatingMode::Stopped), None) => Phase::Stopped,
            (Some(OperatingMode::Stopped), Some(_)) => Phase::Terminating,
            (Some(OperatingMode::Paused), Some(ContainerState::Paused)) => Phase::Paused,
            // No freezer (Kubernetes): paused means no container, its volume kept.
            (Some(OperatingMode::Paused), None) if !facts.settings.freezes => Phase::Paused,
            (_, Some(ContainerState::Running)) if online && unhealthy.is_some() => Phase::Degraded,
            (_, Some(ContainerState::Running)) if online => Phase::Running,
            (_, Some(ContainerState::Running)) if degraded.is_some() => Phase::Degraded,
            (_, Some(_)) => Phase::Provisioning,
            (_, None) if hold.is_some() => Phase::Pending,
            (_, None) if record.is_some_and(|r| r.incarnation > 0) => Phase::Provisioning,
            (_, None) => Phase::Pending,
        },
    };

    match invalid {
        Some(errors) => c("InvalidSpec", tf(true), "InvalidSpec", errors.join("; ")),
        None => c("InvalidSpec", tf(false), "Valid", String::new()),
    }
    if facts.spec().is_some_and(|s| s.lifecycle.enabled()) {
        match facts.suspension() {
            Some(s) => {
                let how = match (s.to, facts.settings.freezes) {
                    (OperatingMode::Paused, true) => "frozen, memory kept",
                    (OperatingMode::Paused, false) => {
                        "suspendTo Paused acts as Stopped here (no freezer): no container, volume kept"
                    }
                    _ => "stopped: no container, volume kept",
                };
                let name = facts.desired.map(|d| d.key.name.as_str()).unwrap_or("NAME");
                c(
                    "Suspended",
                    tf(true),
                    s.cause.as_str(),
                    format!(
                        "since {} ({how}); `molecule-operator wake workspace {name}` resumes it",
                        s.at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
                    ),
                )
            }
            None => c("Suspended", tf(false), "Active", String::new()),
        }
    }
    match extra.conflict {
        Some(msg) => c("SourceConflict", tf(true), "DeclaredTwice", msg.to_string()),
        None => c("SourceConflict", tf(false), "SingleSource", String::new()),
    }
    if let Some(msg) = &quota_hold {
        c("QuotaExceeded", tf(true), "TeamQuota", msg.clone());
    }
    match (secrets_hold, facts.spec().is_some_and(|s| !s.env_from.is_empty())) {
        (Some(msg), _) => c("SecretsReady", tf(false), "SecretUnavailable", msg.to_string()),
        (None, true) => c("SecretsReady", tf(true), "Resolved", String::new()),
        (None, false) => {}
    }
    if let Some(msg) = extra.deletion_refused {
        c("DeletionRefused", tf(true), "HasChildren", msg.to_string());
    }
    match (obs.containers.as_ref(), container) {
        (None, _) => c(
            "ContainerRunning",
            ConditionStatus::Unknown,
            "RuntimeUnavailable",
            "the container runtime could not be listed".into(),
        ),
        (_, Some(k)) => c(
            "ContainerRunning",
            tf(k.state == ContainerState::Running),
            &format!("{:?}", k.state),
            match &k.detail {
                Some(detail) => format!("container {}: {detail}", k.name),
                None => format!("container {}", k.name),
            },
        ),
        (_, None) => c("ContainerRunning", tf(false), "NoContainer", extra.last_error.unwrap_or("").to_string()),
    }
    match &obs.token_file {
        TokenFile::Hash(h) if token.is_some_and(|t| &t.token_hash == h) => {
            c("TokenValid", tf(true), "Live", String::new())
        }
        TokenFile::Hash(_) => c("TokenValid", tf(false), "Mismatch", "the token file holds no live token".into()),
        TokenFile::Missing => c("TokenValid", tf(false), "Missing", "the token file is missing or empty".into()),
        TokenFile::NotRead | TokenFile::Unreadable(_) => c(
            "TokenValid",
            if token.is_some() { ConditionStatus::Unknown } else { ConditionStatus::False },
            if token.is_some() { "NotChecked" } else { "NoLiveToken" },
            String::new(),
        ),
    }
    let hb_msg = match heard {
        Some(h) => format!("last heartbeat {}s ago", (now - h).num_seconds()),
        None => "no heartbeat from this incarnation yet".into(),
    };
    c("AgentOnline", tf(online), if online { "Heartbeating" } else { "Silent" }, degraded.clone().unwrap_or(hb_msg));
    match &health {
        Some(AgentHealth::Healthy(reason)) => c("AgentHealthy", tf(true), reason, agent_summary(report)),
        Some(AgentHealth::Degraded(reason, why)) => c("AgentHealthy", tf(false), reason, why.clone()),
        None => {}
    }
    let drift = match (facts.desired, container) {
        (Some(d), Some(k)) if invalid.is_none() => k.hash_differs(&d.spec_hash).map(|have| (d.spec_hash.clone(), have)),
        _ => None,
    };
    match (&drift, facts.spec().map(|s| s.update_policy)) {
        (Some((want, have)), Some(policy)) => c(
            "SpecDrift",
            tf(true),
            match policy {
                _ if secrets_hold.is_some() => "WaitingForSecrets",
                UpdatePolicy::Immediate => "Recreating",
                _ => "Pending",
            },
            format!("running {have}, declared {want}; updatePolicy {policy:?}"),
        ),
        _ => c("SpecDrift", tf(false), "InSync", String::new()),
    }
    let ready_msg = match (&degraded, extra.last_error, invalid) {
        (_, _, Some(e)) => e.join("; "),
        _ if quota_hold.is_some() && container.is_none() => quota_hold.clone().unwrap_or_default(),
        _ if secrets_hold.is_some() => secrets_hold.unwrap_or_default().to_string(),
        (_, Some(e), _) => e.to_string(),
        (Some(d), _, _) => d.clone(),
        _ if unhealthy.is_some() => unhealthy.clone().unwrap_or_default(),
        _ => String::new(),
    };
    c("Ready", tf(phase == Phase::Running), &phase.to_string(), ready_msg);

    if let Some(p) = previous {
        carry_transition_times(&p.conditions, &mut cond);
    }
    WorkspaceStatus {
        phase,
        uid: record.map(|r| r.uid.clone()),
        observed_generation: facts.desired.map(|d| d.generation),
        incarnation: obs.incarnation(),
        container: container.map(|k| ContainerStatus {
            id: k.id.clone(),
            name: k.name.clone(),
            spec_hash: k.spec_hash().unwrap_or_default().to_string(),
            image: k.image.clone(),
        }),
        pod: container.filter(|k| k.node.is_some() || k.restarts > 0 || !facts.settings.freezes).map(|k| PodStatus {
            name: k.name.clone(),
            node: k.node.clone(),
            restarts: k.restarts,
        }),
        token: token.map(|t| TokenStatus {
            prefix: t.prefix.clone(),
            issued_at: t.created_at,
            last_used_at: t.last_used_at,
        }),
        last_heartbeat_at: record.and_then(|r| r.last_heartbeat_at),
        restart_count: record.map(|r| r.restart_count).unwrap_or(0),
        last_restart_reason: record.and_then(|r| r.last_restart_reason.clone()),
        agent: report.map(|r| AgentStatus {
            url: r.url.clone(),
            delivery_mode: r.delivery_mode.map(|m| m.as_str().to_string()),
            current_task: r.current_task.clone().filter(|t| !t.is_empty()),
            active_tasks: r.active_tasks,
            error_rate: r.error_rate,
            sample_error: r.sample_error.clone().filter(|t| !t.is_empty()),
            runtime_state: r.runtime_state.clone().filter(|t| !t.is_empty()),
        }),
        source: facts.desired.map(|d| (*d.source).clone()),
        pending_hash: drift.as_ref().map(|(want, _)| want.clone()),
        applied_hash: drift.map(|(_, have)| have),
        conditions: cond,
    }
}

/// The AgentHealthy message of a healthy agent: its error rate and current task.
fn agent_summary(report: Option<&crate::model::AgentReport>) -> String {
    let Some(r) = report else { return String::new() };
    let mut parts = vec![format!("error rate {:.2}", r.error_rate.unwrap_or(0.0))];
    if let Some(task) = r.current_task.as_deref().filter(|t| !t.is_empty()) {
        parts.push(format!("working on: {task}"));
    }
    parts.join("; ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::condition::find;
    use crate::rules::fixtures::*;

    fn status(
        obs: &crate::rules::Observed,
        des: Option<&crate::rules::Desired>,
        extra: Circumstances<'_>,
    ) -> WorkspaceStatus {
        let s = settings();
        compute(&facts(des, obs, &s), &extra, None)
    }

    #[test]
    fn healthy_is_running_and_ready() {
        let st = status(&healthy(), Some(&desired()), Circumstances::default());
        assert_eq!(st.phase, Phase::Running);
        assert!(find(&st.conditions, "Ready").unwrap().is_true());
        assert!(find(&st.conditions, "TokenValid").unwrap().is_true());
        assert_eq!(st.token.unwrap().prefix, "Ab3x9_Qe");
        assert_eq!(st.incarnation, 1);
    }

    #[test]
    fn running_container_without_heartbeat_is_provisioning() {
        let obs = healthy().record_with(|r| r.last_heartbeat_at = Some(t(50))); // before this container
        assert_eq!(status(&obs, Some(&desired()), Circumstances::default()).phase, Phase::Provisioning);
    }

    #[test]
    fn invalid_spec_is_failed_with_the_reason() {
        let des = desired_with(crate::api::WorkspaceSpec { tier: Some(7), ..Default::default() });
        let st = status(&healthy(), Some(&des), Circumstances::default());
        assert_eq!(st.phase, Phase::Failed);
        let c = find(&st.conditions, "InvalidSpec").unwrap();
        assert!(c.is_true() && c.message.contains("tier"), "{c:?}");
    }

    #[test]
    fn execution_error_is_failed_and_shown() {
        let obs = healthy().without_container();
        let st = status(
            &obs,
            Some(&desired()),
            Circumstances { last_error: Some("image x is not present"), ..Circumstances::default() },
        );
        assert_eq!(st.phase, Phase::Failed);
        assert!(find(&st.conditions, "Ready").unwrap().message.contains("image x"));
    }

    #[test]
    fn a_pod_held_for_its_image_or_claim_says_why_and_a_refusal_is_shown_whole() {
        // What the Pod runtime observes (runtime/kubernetes/objects.rs) reaches the
        // ContainerRunning condition as it was said.
        let mut k = container(1, ContainerState::Waiting);
        k.detail = Some("ErrImagePull: pull access denied for ghcr.io/x/y".into());
        let st = status(&healthy().with_container(k), Some(&desired()), Circumstances::default());
        let c = find(&st.conditions, "ContainerRunning").unwrap();
        assert_eq!((c.is_true(), c.reason.as_str()), (false, "Waiting"));
        assert!(c.message.contains("ErrImagePull: pull access denied for ghcr.io/x/y"), "{c:?}");
        assert_eq!(st.phase, Phase::Provisioning);
        // A call the API refused (a quota, a missing namespace) is the provision's error.
        let why = "provision: creating Pod team-a/ws-x: the Kubernetes API refused: the namespace's ResourceQuota \
                   refuses it: raise the quota or lower the workspace's tier; exceeded quota: compute";
        let extra = Circumstances { last_error: Some(why), ..Circumstances::default() };
        let st = status(&healthy().without_container(), Some(&desired()), extra);
        assert_eq!(st.phase, Phase::Failed);
        for t in ["Ready", "ContainerRunning"] {
            assert_eq!(find(&st.conditions, t).unwrap().message, why, "{t}");
        }
    }

    #[test]
    fn a_suspension_is_phase_suspended_with_its_cause_once_carried_out() {
        use crate::api::{Lifecycle, WorkspaceSpec};
        use crate::model::{SuspendCause, Suspension};
        let des = desired_with(WorkspaceSpec {
            lifecycle: Some(Lifecycle { idle_after: Some("1m".into()), ..Default::default() }),
            ..Default::default()
        });
        let active = status(&healthy(), Some(&des), Circumstances::default());
        assert_eq!(active.phase, Phase::Running);
        assert_eq!(find(&active.conditions, "Suspended").unwrap().reason, "Active");
        let susp = Suspension { cause: SuspendCause::MaxLifetime, at: t(900), to: crate::api::OperatingMode::Paused };
        let obs = healthy().record_with(|r| r.lifecycle.suspended = Some(susp));
        assert_ne!(status(&obs, Some(&des), Circumstances::default()).phase, Phase::Suspended, "not frozen yet");
        let frozen = obs.with_container(container(1, ContainerState::Paused));
        let st = status(&frozen, Some(&des), Circumstances::default());
        assert_eq!(st.phase, Phase::Suspended);
        let c = find(&st.conditions, "Suspended").unwrap();
        assert!(c.is_true() && c.reason == "MaxLifetime", "{c:?}");
        assert!(c.message.contains("molecule-operator wake workspace dev"), "{c:?}");
        let gone = frozen.without_container();
        assert_eq!(status(&gone, Some(&des), Circumstances::default()).phase, Phase::Suspended);
        assert!(
            find(&status(&healthy(), Some(&desired()), Circumstances::default()).conditions, "Suspended").is_none()
        );
    }

    #[test]
    fn paused_stopped_and_drift() {
        let obs = healthy().with_container(container(1, ContainerState::Paused));
        assert_eq!(
            status(&obs, Some(&desired_mode(OperatingMode::Paused)), Circumstances::default()).phase,
            Phase::Paused
        );
        let obs = healthy().without_container();
        assert_eq!(
            status(&obs, Some(&desired_mode(OperatingMode::Stopped)), Circumstances::default()).phase,
            Phase::Stopped
        );
        let mut des =
            desired_with(crate::api::WorkspaceSpec { update_policy: Some(UpdatePolicy::Manual), ..Default::default() });
        des.spec_hash = "new".into();
        let st = status(&healthy(), Some(&des), Circumstances::default());
        assert!(find(&st.conditions, "SpecDrift").unwrap().is_true());
        assert_eq!(st.pending_hash.as_deref(), Some("new"));
        assert_eq!(st.applied_hash.as_deref(), Some(HASH));
    }

    #[test]
    fn an_unreadable_secret_keeps_a_new_workspace_pending_and_says_which() {
        let obs = healthy().without_container();
        let mut des = desired_with(crate::api::WorkspaceSpec {
            env_from: vec![crate::api::EnvFromSource {
                secret_ref: crate::api::SecretEnvSource { name: "keys".into(), optional: false },
                prefix: None,
            }],
            ..Default::default()
        });
        des.secrets_unreadable = Some("Secret default/keys not found".into());
        let st = status(&obs, Some(&des), Circumstances::default());
        assert_eq!(st.phase, Phase::Pending);
        let c = find(&st.conditions, "SecretsReady").unwrap();
        assert!(!c.is_true() && c.message == "Secret default/keys not found", "{c:?}");
        assert!(find(&st.conditions, "Ready").unwrap().message.contains("keys not found"));
        des.secrets_unreadable = None;
        let st = status(&healthy(), Some(&des), Circumstances::default());
        assert!(find(&st.conditions, "SecretsReady").unwrap().is_true());
        assert!(find(&st.conditions, "SecretsReady").is_some());
        let st = status(&healthy(), Some(&desired()), Circumstances::default());
        assert!(find(&st.conditions, "SecretsReady").is_none(), "only workspaces that use envFrom");
    }

    fn reporting(rate: f64, state: &str) -> crate::rules::Observed {
        let mut obs = healthy();
        obs.agent = Some(crate::model::AgentReport {
            incarnation: 1,
            error_rate: Some(rate),
            sample_error: Some("rate limited".into()),
            current_task: Some("triage #42".into()),
            runtime_state: Some(state.into()),
            reported_at: Some(now()),
            ..Default::default()
        });
        obs
    }

    fn after(previous: &WorkspaceStatus, obs: &crate::rules::Observed) -> WorkspaceStatus {
        let s = settings();
        compute(&facts(Some(&desired()), obs, &s), &Circumstances::default(), Some(previous))
    }

    #[test]
    fn a_wedged_agent_is_degraded_and_recovers_as_the_original_platform() {
        let ok = status(&reporting(0.0, ""), Some(&desired()), Circumstances::default());
        assert_eq!(ok.phase, Phase::Running);
        let c = find(&ok.conditions, "AgentHealthy").unwrap();
        assert!(c.is_true() && c.message.contains("triage #42"), "{c:?}");
        let agent = ok.agent.as_ref().unwrap();
        assert_eq!((agent.current_task.as_deref(), agent.error_rate), (Some("triage #42"), Some(0.0)));

        let wedged = after(&ok, &reporting(0.0, "wedged"));
        assert_eq!(wedged.phase, Phase::Degraded);
        let c = find(&wedged.conditions, "AgentHealthy").unwrap();
        assert!(!c.is_true() && c.reason == "Wedged" && c.message.contains("rate limited"), "{c:?}");
        assert!(!find(&wedged.conditions, "Ready").unwrap().is_true());
        assert!(find(&wedged.conditions, "AgentOnline").unwrap().is_true(), "still heard from");

        let between = after(&wedged, &reporting(0.3, ""));
        assert_eq!(between.phase, Phase::Degraded, "0.3 is not below 0.1");
        let back = after(&between, &reporting(0.05, ""));
        assert_eq!(back.phase, Phase::Running);
        assert_eq!(find(&back.conditions, "AgentHealthy").unwrap().reason, "Recovered");
        assert_eq!(after(&back, &reporting(0.3, "")).phase, Phase::Running, "0.3 is not 0.5");
        assert_eq!(after(&back, &reporting(0.5, "")).phase, Phase::Degraded);
    }

    #[test]
    fn a_report_of_an_older_incarnation_or_a_silent_agent_is_not_judged() {
        let mut obs = reporting(0.9, "wedged");
        obs.agent.as_mut().unwrap().incarnation = 0;
        let st = status(&obs, Some(&desired()), Circumstances::default());
        assert_eq!(st.phase, Phase::Running);
        assert!(find(&st.conditions, "AgentHealthy").is_none() && st.agent.is_none());
        let silent = reporting(0.9, "wedged").silent_for(600);
        let st = status(&silent, Some(&desired()), Circumstances::default());
        assert_ne!(st.phase, Phase::Degraded);
        assert!(find(&st.conditions, "AgentHealthy").is_none());
    }
}
