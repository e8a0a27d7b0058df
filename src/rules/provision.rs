//! provision: the workspace should run (Running or Paused) and has no usable
//! container: none at all, one that exited, one never started (a provision that was
//! interrupted), or one from an older incarnation. A new incarnation replaces it,
//! with a fresh token; every older token is revoked.

use super::*;

pub fn rule(facts: &Facts<'_>) -> Option<Verdict> {
    if !facts.wants_container()? {
        return None;
    }
    facts.observed.record.as_ref()?;
    facts.observed.containers.as_ref()?; // listing failed: unknown, do nothing
    let current = facts.observed.incarnation();
    let (cause, revoke) = match facts.observed.container() {
        None if facts.quota_hold().is_some() => return None, // waits for room in its team
        None => match claim::fallback(facts) {
            Some(why) => (format!("no container ({why})"), RevokeReason::ContainerMissing),
            None => ("no container".to_string(), RevokeReason::ContainerMissing),
        },
        Some(c) if c.incarnation() != Some(current) => (
            format!(
                "container is from incarnation {}, current is {current}",
                c.incarnation().map_or("?".to_string(), |i| i.to_string())
            ),
            RevokeReason::Superseded,
        ),
        Some(c) => match c.state {
            ContainerState::Created => {
                ("container was never started (interrupted provision)".into(), RevokeReason::Reprovision)
            }
            ContainerState::Exited | ContainerState::Dead => {
                let state = format!("container {:?}", c.state).to_lowercase();
                let cause = match &c.detail {
                    Some(why) => format!("{state} ({why})"),
                    None => state,
                };
                (cause, RevokeReason::Reprovision)
            }
            _ => return None,
        },
    };
    Some(Verdict::new(cause, vec![facts.provision(revoke)]))
}

#[cfg(test)]
mod tests {
    use super::super::fixtures::*;
    use super::*;

    fn decide(obs: &Observed, des: &Desired) -> Option<Verdict> {
        let s = settings();
        rule(&facts(Some(des), obs, &s))
    }

    #[test]
    fn no_container_provisions_and_revokes_as_container_missing() {
        let mut obs = healthy();
        obs.containers = Some(vec![]);
        let d = decide(&obs, &desired()).unwrap();
        assert_eq!(d.cause, "no container");
        assert_eq!(d.actions, vec![Action::Provision { revoke: RevokeReason::ContainerMissing, paused: false }]);
    }

    #[test]
    fn exited_never_started_and_older_incarnation_are_replaced() {
        for (state, inc, want) in [
            (ContainerState::Exited, 1, "container exited"),
            (ContainerState::Created, 1, "never started"),
            (ContainerState::Running, 0, "incarnation 0, current is 1"),
        ] {
            let mut obs = healthy();
            obs.containers = Some(vec![container(inc, state)]);
            let d = decide(&obs, &desired()).unwrap();
            assert!(d.cause.contains(want), "{} !~ {want}", d.cause);
        }
    }

    #[test]
    fn healthy_running_or_paused_container_is_left_alone() {
        assert_eq!(decide(&healthy(), &desired()), None);
        let mut obs = healthy();
        obs.containers = Some(vec![container(1, ContainerState::Paused)]);
        assert_eq!(decide(&obs, &desired_mode(OperatingMode::Paused)), None);
    }

    #[test]
    fn stopped_invalid_or_unknown_listing_never_provisions() {
        let mut obs = healthy();
        obs.containers = Some(vec![]);
        assert_eq!(decide(&obs, &desired_mode(OperatingMode::Stopped)), None);
        let invalid = desired_with(crate::api::WorkspaceSpec { tier: Some(9), ..Default::default() });
        assert_eq!(decide(&obs, &invalid), None);
        obs.containers = None;
        assert_eq!(decide(&obs, &desired()), None);
    }

    #[test]
    fn a_quota_hold_keeps_a_new_workspace_waiting_but_never_touches_an_existing_one() {
        let full = team_with_one_running_member(quota::Limits { max_workspaces: Some(1), max_running: None });
        let obs = healthy().without_container().in_team(full.clone());
        assert_eq!(decide(&obs, &desired()), None, "waits for room in its team");
        let obs = healthy().with_container(container(1, ContainerState::Exited)).in_team(full);
        assert!(decide(&obs, &desired()).is_some(), "an exited container still holds its slot");
    }

    #[test]
    fn cli_pause_override_still_needs_a_container_and_stop_override_does_not() {
        let overridden = |mode| healthy().without_container().record_with(|r| r.mode_override = Some(mode));
        assert_eq!(decide(&overridden(OperatingMode::Stopped), &desired()), None);
        assert!(decide(&overridden(OperatingMode::Paused), &desired()).is_some());
    }
}
