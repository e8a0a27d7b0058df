//! pause / resume / stop: the operating mode. Paused freezes the container (memory
//! kept; tokens kept unless `tokenPolicy.onPause: Revoke`); Running thaws it; Stopped
//! removes the container, keeps the config volume and revokes the tokens. A runtime
//! with no freezer (Kubernetes) pauses by removing the container and keeping the
//! volume, tokens per `onPause`; Running then provisions a new one.

use super::*;
use crate::api::OnPause;

pub fn stop(facts: &Facts<'_>) -> Option<Verdict> {
    if facts.mode()? != OperatingMode::Stopped {
        return None;
    }
    let containers = facts.observed.containers.as_ref()?;
    let mut actions: Vec<Action> = containers.iter().map(|c| Action::RemoveContainer { id: c.id.clone() }).collect();
    if !facts.observed.live_tokens.is_empty() {
        actions.push(Action::RevokeTokens { reason: RevokeReason::Stopped });
    }
    if actions.is_empty() {
        return None;
    }
    Some(Verdict::new(suspended(facts, "operating mode is Stopped"), actions))
}

pub fn pause(facts: &Facts<'_>) -> Option<Verdict> {
    if facts.mode()? != OperatingMode::Paused {
        return None;
    }
    let spec = facts.spec()?;
    let revoke = spec.token_policy.on_pause == OnPause::Revoke && !facts.observed.live_tokens.is_empty();
    let mut actions = Vec::new();
    if facts.settings.freezes {
        if let Some(c) = facts.observed.container().filter(|c| c.state == ContainerState::Running) {
            actions.push(Action::Pause { id: c.id.clone() });
        }
    } else {
        let containers = facts.observed.containers.as_ref()?;
        actions.extend(containers.iter().map(|c| Action::RemoveContainer { id: c.id.clone() }));
    }
    if revoke {
        actions.push(Action::RevokeTokens { reason: RevokeReason::Paused });
    }
    if actions.is_empty() {
        return None;
    }
    let cause = match facts.settings.freezes {
        true => "operating mode is Paused",
        false => "operating mode is Paused (the runtime has no freezer: the container goes, its volume stays)",
    };
    Some(Verdict::new(suspended(facts, cause), actions))
}

/// The cause, saying so when the mode is a suspension's (suspend.rs).
fn suspended(facts: &Facts<'_>, cause: &str) -> String {
    match facts.suspension() {
        Some(s) => format!("suspended ({}): {cause}", s.cause),
        None => cause.to_string(),
    }
}

pub fn resume(facts: &Facts<'_>) -> Option<Verdict> {
    if facts.mode()? != OperatingMode::Running {
        return None;
    }
    let c = facts.observed.container().filter(|c| c.state == ContainerState::Paused)?;
    if facts.quota_hold().is_some() {
        return None; // maxRunning: waits for a running slot
    }
    // The token first, while the agent is frozen, so its first heartbeat after the thaw
    // carries it: `onResume: Reissue`, or no live token left (`onPause: Revoke`), which
    // the token-file rule would otherwise fix only after the agent was refused.
    let reissue = facts.spec()?.token_policy.on_resume == crate::api::OnResume::Reissue
        || !facts.observed.current_tokens().any(|t| t.valid_at(facts.now));
    let mut actions = Vec::new();
    if reissue {
        actions.push(Action::ReissueToken { revoke: RevokeReason::Resumed });
    }
    actions.push(Action::Unpause { id: c.id.clone() });
    Some(Verdict::new("operating mode is Running", actions))
}

#[cfg(test)]
mod tests {
    use super::super::fixtures::*;
    use super::*;
    use crate::api::{TokenPolicy, WorkspaceSpec};

    #[test]
    fn stopped_removes_container_and_revokes_but_keeps_volume() {
        let (obs, s) = (healthy(), settings());
        let des = desired_mode(OperatingMode::Stopped);
        let d = stop(&facts(Some(&des), &obs, &s)).unwrap();
        assert!(d.actions.contains(&Action::RemoveContainer { id: "c0ffee000001".into() }));
        assert!(d.actions.contains(&Action::RevokeTokens { reason: RevokeReason::Stopped }));
        assert!(!d.actions.contains(&Action::RemoveVolume));
    }

    #[test]
    fn stopped_and_converged_is_quiet() {
        let mut obs = healthy();
        obs.containers = Some(vec![]);
        obs.live_tokens.clear();
        let s = settings();
        let des = desired_mode(OperatingMode::Stopped);
        assert_eq!(stop(&facts(Some(&des), &obs, &s)), None);
    }

    #[test]
    fn paused_freezes_running_container_and_keeps_tokens_by_default() {
        let (obs, s) = (healthy(), settings());
        let des = desired_mode(OperatingMode::Paused);
        let d = pause(&facts(Some(&des), &obs, &s)).unwrap();
        assert_eq!(d.actions, vec![Action::Pause { id: "c0ffee000001".into() }]);
    }

    #[test]
    fn on_pause_revoke_revokes_tokens() {
        let (obs, s) = (healthy(), settings());
        let des = desired_with(WorkspaceSpec {
            operating_mode: Some(OperatingMode::Paused),
            token_policy: Some(TokenPolicy { on_pause: Some(OnPause::Revoke), ..Default::default() }),
            ..Default::default()
        });
        let d = pause(&facts(Some(&des), &obs, &s)).unwrap();
        assert!(d.actions.contains(&Action::RevokeTokens { reason: RevokeReason::Paused }));
    }

    #[test]
    fn running_thaws_a_paused_container() {
        let mut obs = healthy();
        obs.containers = Some(vec![container(1, ContainerState::Paused)]);
        let (s, des) = (settings(), desired());
        let d = resume(&facts(Some(&des), &obs, &s)).unwrap();
        assert_eq!(d.actions, vec![Action::Unpause { id: "c0ffee000001".into() }]);
        assert_eq!(pause(&facts(Some(&des), &obs, &s)), None);
    }

    #[test]
    fn on_resume_reissue_writes_a_new_token_as_it_thaws() {
        let mut obs = healthy();
        obs.containers = Some(vec![container(1, ContainerState::Paused)]);
        let s = settings();
        let des = desired_with(WorkspaceSpec {
            token_policy: Some(TokenPolicy { on_resume: Some(crate::api::OnResume::Reissue), ..Default::default() }),
            ..Default::default()
        });
        let d = resume(&facts(Some(&des), &obs, &s)).unwrap();
        assert_eq!(
            d.actions,
            vec![Action::ReissueToken { revoke: RevokeReason::Resumed }, Action::Unpause { id: "c0ffee000001".into() }],
            "the token is in the file before the agent thaws"
        );
    }

    #[test]
    fn a_pause_that_revoked_the_token_gets_a_new_one_before_the_thaw() {
        let mut obs = healthy();
        obs.containers = Some(vec![container(1, ContainerState::Paused)]);
        obs.live_tokens.clear(); // onPause: Revoke
        let (s, des) = (settings(), desired());
        let d = resume(&facts(Some(&des), &obs, &s)).unwrap();
        assert_eq!(
            d.actions,
            vec![Action::ReissueToken { revoke: RevokeReason::Resumed }, Action::Unpause { id: "c0ffee000001".into() }]
        );
    }

    #[test]
    fn without_a_freezer_paused_removes_the_container_keeps_tokens_and_provisions_nothing() {
        let s = Settings { freezes: false, ..settings() };
        let des = desired_mode(OperatingMode::Paused);
        let d = pause(&facts(Some(&des), &healthy(), &s)).unwrap();
        assert_eq!(
            d.actions,
            vec![Action::RemoveContainer { id: "c0ffee000001".into() }],
            "tokens kept (onPause Keep)"
        );
        assert!(d.cause.contains("no freezer"), "{}", d.cause);
        let gone = healthy().without_container();
        assert_eq!(pause(&facts(Some(&des), &gone, &s)), None, "settled");
        assert_eq!(super::super::provision::rule(&facts(Some(&des), &gone, &s)), None, "nothing provisioned");
        let running = desired();
        let back = super::super::provision::rule(&facts(Some(&running), &gone, &s)).unwrap();
        assert_eq!(back.cause, "no container", "resuming provisions a new one");
    }

    #[test]
    fn cli_override_wins_over_declared_mode() {
        let obs = healthy().record_with(|r| r.mode_override = Some(OperatingMode::Paused));
        let (s, des) = (settings(), desired());
        assert!(pause(&facts(Some(&des), &obs, &s)).is_some());
    }
}
