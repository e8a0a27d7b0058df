//! out-of-band: a running container whose settings were changed behind the operator's
//! back (`docker update` of its limits or restart policy, `docker network connect` or
//! `disconnect`) is recreated as declared. Unlike a spec change, which waits for its
//! update policy, this is drift nobody declared: it converges at once. The cause
//! names what differs.

use super::*;

pub fn rule(facts: &Facts<'_>) -> Option<Verdict> {
    let expected = facts.desired?.applied.as_ref()?;
    facts.spec()?;
    let c = facts.observed.container()?;
    if c.incarnation() != Some(facts.observed.incarnation()) {
        return None;
    }
    let applied = c.applied.as_ref()?;
    let differences = differences(expected, applied);
    if differences.is_empty() {
        return None;
    }
    Some(Verdict::new(
        format!("changed out of band: {}", differences.join("; ")),
        vec![facts.provision(RevokeReason::Reprovision)],
    ))
}

/// Each setting that differs, as `what is, declared what should be`.
fn differences(want: &AppliedConfig, have: &AppliedConfig) -> Vec<String> {
    let mut out = Vec::new();
    if have.memory_bytes != want.memory_bytes {
        out.push(format!("memory limit {}, declared {}", bytes(have.memory_bytes), bytes(want.memory_bytes)));
    }
    if have.nano_cpus != want.nano_cpus {
        out.push(format!("CPU limit {}, declared {}", cpus(have.nano_cpus), cpus(want.nano_cpus)));
    }
    if have.restart_policy != want.restart_policy {
        out.push(format!("restart policy {}, declared {}", have.restart_policy, want.restart_policy));
    }
    if have.networks != want.networks {
        out.push(format!("networks {}, declared {}", have.networks.join(","), want.networks.join(",")));
    }
    out
}

fn bytes(n: i64) -> String {
    match n {
        0 => "none".into(),
        n if n % (1 << 20) == 0 => format!("{}Mi", n >> 20),
        n => format!("{n} bytes"),
    }
}

fn cpus(nano: i64) -> String {
    match nano {
        0 => "none".into(),
        n => format!("{}", n as f64 / 1e9),
    }
}

#[cfg(test)]
mod tests {
    use super::super::fixtures::*;
    use super::*;

    fn declared() -> AppliedConfig {
        AppliedConfig {
            memory_bytes: 256 << 20,
            nano_cpus: 500_000_000,
            restart_policy: "unless-stopped".into(),
            networks: vec!["molecule-t".into()],
        }
    }

    fn decide(applied: Option<AppliedConfig>) -> Option<Verdict> {
        let mut des = desired();
        des.applied = Some(declared());
        let mut c = container(1, ContainerState::Running);
        c.applied = applied;
        rule(&facts(Some(&des), &healthy().with_container(c), &settings()))
    }

    #[test]
    fn a_container_nobody_changed_is_left_alone() {
        assert_eq!(decide(None), None, "not changed since it was created");
        assert_eq!(decide(Some(declared())), None, "read again, and as declared");
    }

    #[test]
    fn limits_restart_policy_and_networks_changed_out_of_band_recreate_it_and_say_what_differed() {
        let changed = AppliedConfig {
            memory_bytes: 1 << 30,
            nano_cpus: 2_000_000_000,
            restart_policy: "always".into(),
            networks: vec!["bridge".into(), "molecule-t".into()],
        };
        let v = decide(Some(changed)).expect("recreated");
        assert_eq!(v.actions, vec![Action::Provision { revoke: RevokeReason::Reprovision, paused: false }]);
        assert_eq!(
            v.cause,
            "changed out of band: memory limit 1024Mi, declared 256Mi; CPU limit 2, declared 0.5; \
             restart policy always, declared unless-stopped; networks bridge,molecule-t, declared molecule-t"
        );
    }
}
