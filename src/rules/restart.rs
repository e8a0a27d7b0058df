//! restart: `spec.restartedAt` (or `molecule-operator restart`) is newer than the
//! container: replace it with a new incarnation and a new token.

use super::*;

pub fn rule(facts: &Facts<'_>) -> Option<Verdict> {
    let spec = facts.spec()?;
    let c = facts.observed.container()?;
    let record = facts.observed.record.as_ref()?;
    let requested = spec.restarted_at.max(record.restart_requested_at).filter(|at| *at <= facts.now)?;
    let provisioned = c.provisioned_at()?;
    if requested <= provisioned {
        return None;
    }
    Some(Verdict::new(
        format!("restart requested at {}", requested.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)),
        vec![facts.provision(RevokeReason::Reprovision)],
    ))
}

#[cfg(test)]
mod tests {
    use super::super::fixtures::*;
    use super::*;
    use crate::api::WorkspaceSpec;
    use crate::model::container::labels;

    #[test]
    fn restarted_at_after_provision_restarts_once() {
        let (obs, s) = (healthy(), settings());
        let des = desired_with(WorkspaceSpec { restarted_at: Some(t(200)), ..Default::default() });
        assert!(rule(&facts(Some(&des), &obs, &s)).is_some());
        // The replacement container is provisioned after the request: quiet.
        let replaced = container(1, ContainerState::Running).labelled(labels::PROVISIONED_AT, t(201).to_rfc3339());
        let obs2 = healthy().with_container(replaced);
        assert_eq!(rule(&facts(Some(&des), &obs2, &s)), None);
    }

    #[test]
    fn cli_request_restarts_and_old_or_future_requests_do_not() {
        let s = settings();
        let requested = |at| healthy().record_with(|r| r.restart_requested_at = Some(at));
        assert!(rule(&facts(Some(&desired()), &requested(t(300)), &s)).is_some());
        assert_eq!(rule(&facts(Some(&desired()), &requested(t(50)), &s)), None, "before the container's start");
        let future = requested(now() + chrono::Duration::seconds(60));
        assert_eq!(rule(&facts(Some(&desired()), &future, &s)), None, "not yet");
    }
}
