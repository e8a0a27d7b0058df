//! drift: the running container's spec-hash label differs from the rendered spec.
//! Immediate recreates it (new incarnation, new token); OnNextStop and Manual wait,
//! and status shows SpecDrift with both hashes.

use super::*;
use crate::api::UpdatePolicy;

pub fn rule(facts: &Facts<'_>) -> Option<Verdict> {
    let desired = facts.desired?;
    let spec = facts.spec()?;
    let c = facts.observed.container()?;
    let running = c.hash_differs(&desired.spec_hash)?;
    if spec.update_policy != UpdatePolicy::Immediate {
        return None;
    }
    Some(Verdict::new(
        format!("spec changed (hash {} -> {})", running, desired.spec_hash),
        vec![facts.provision(RevokeReason::Reprovision)],
    ))
}

impl ContainerInfo {
    /// The container's hash when it differs from `want`.
    pub fn hash_differs(&self, want: &str) -> Option<String> {
        let have = self.spec_hash().unwrap_or("none");
        (have != want).then(|| have.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::super::fixtures::*;
    use super::*;
    use crate::api::WorkspaceSpec;

    #[test]
    fn changed_hash_recreates_under_immediate() {
        let (obs, s) = (healthy(), settings());
        let mut des = desired();
        des.spec_hash = "0000000000000000".into();
        let d = rule(&facts(Some(&des), &obs, &s)).unwrap();
        assert!(d.cause.contains("feedfacecafebeef -> 0000000000000000"), "{}", d.cause);
        assert_eq!(d.actions, vec![Action::Provision { revoke: RevokeReason::Reprovision, paused: false }]);
    }

    #[test]
    fn same_hash_is_quiet_and_other_policies_wait() {
        let (obs, s) = (healthy(), settings());
        assert_eq!(rule(&facts(Some(&desired()), &obs, &s)), None);
        for p in [UpdatePolicy::OnNextStop, UpdatePolicy::Manual] {
            let mut des = desired_with(WorkspaceSpec { update_policy: Some(p), ..Default::default() });
            des.spec_hash = "0000000000000000".into();
            assert_eq!(rule(&facts(Some(&des), &obs, &s)), None);
        }
    }
}
