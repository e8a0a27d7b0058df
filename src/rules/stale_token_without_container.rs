//! stale-token-without-container: the original platform's 60-second sweeper pass,
//! as one rule. A workspace with a live token unused (COALESCE(last_used_at,
//! created_at)) for longer than `tokenPolicy.staleGrace` and no container at all gets
//! those tokens revoked (reason `container-missing`). Its safety filters are kept:
//! - never when listing the runtime failed (Docker unreachable is not "no containers");
//! - not while the workspace is being removed (the remove rule owns that); a
//!   provision in flight never shows (one reconcile at a time per workspace, and the
//!   provision happens inside it);
//! - a container in any state, even stopped, counts as present;
//! - the staleness condition is repeated in the UPDATE (Store::revoke_stale_tokens),
//!   so a heartbeat landing in between wins;
//! - a database error stops the pass; the next reconcile retries.

use super::*;

pub fn rule(facts: &Facts<'_>) -> Option<Verdict> {
    let spec = facts.desired?.spec.as_ref().ok().map(|s| s.token_policy.stale_grace);
    let containers = facts.observed.containers.as_ref()?;
    let record = facts.observed.record.as_ref()?;
    if containers.iter().any(|c| c.uid() == Some(record.uid.as_str())) {
        return None;
    }
    // An invalid spec still has a grace: the default one.
    let grace = spec.unwrap_or(crate::api::effective::DEFAULT_STALE_GRACE);
    let cutoff = facts.now - chrono::Duration::from_std(grace).ok()?;
    let stale: Vec<&TokenRow> = facts.observed.live_tokens.iter().filter(|t| t.last_activity() < cutoff).collect();
    if stale.is_empty() {
        return None;
    }
    let oldest = stale.iter().map(|t| t.last_activity()).min()?;
    let idle = (facts.now - oldest).num_seconds();
    Some(Verdict::new(
        format!("{} live token(s), no container, unused for {idle}s (grace {}s)", stale.len(), grace.as_secs()),
        vec![Action::RevokeStaleTokens { cutoff }],
    ))
}

#[cfg(test)]
mod tests {
    use super::super::fixtures::*;
    use super::*;
    use crate::api::WorkspaceSpec;

    /// No container, one live token last used 10 minutes ago, invalid spec (so the
    /// provision rule would not run first): the sweeper case.
    fn wedged() -> Observed {
        let mut obs = healthy();
        obs.containers = Some(vec![]);
        obs.live_tokens = vec![token("t1", 1, t(0), Some(now() - chrono::Duration::seconds(600)))];
        obs
    }

    fn decide(obs: &Observed, des: Option<&Desired>) -> Option<Verdict> {
        let s = settings();
        rule(&facts(des, obs, &s))
    }

    #[test]
    fn stale_live_token_without_container_is_revoked() {
        let d = decide(&wedged(), Some(&desired())).unwrap();
        assert_eq!(d.actions, vec![Action::RevokeStaleTokens { cutoff: now() - chrono::Duration::seconds(300) }]);
        assert!(d.cause.contains("unused for 600s"), "{}", d.cause);
    }

    #[test]
    fn filter_listing_failed_never_revokes() {
        let mut obs = wedged();
        obs.containers = None;
        assert_eq!(decide(&obs, Some(&desired())), None);
    }

    #[test]
    fn filter_within_grace_is_kept() {
        let mut obs = wedged();
        obs.live_tokens = vec![token("t1", 1, t(0), Some(now() - chrono::Duration::seconds(299)))];
        assert_eq!(decide(&obs, Some(&desired())), None);
    }

    #[test]
    fn filter_never_used_token_counts_from_creation() {
        let mut obs = wedged();
        obs.live_tokens = vec![token("t1", 1, now() - chrono::Duration::seconds(100), None)];
        assert_eq!(decide(&obs, Some(&desired())), None);
        obs.live_tokens = vec![token("t1", 1, now() - chrono::Duration::seconds(400), None)];
        assert!(decide(&obs, Some(&desired())).is_some());
    }

    #[test]
    fn filter_workspace_being_removed_is_left_to_the_remove_rule() {
        assert_eq!(decide(&wedged(), None), None);
    }

    #[test]
    fn filter_a_stopped_container_counts_as_present() {
        let mut obs = wedged();
        obs.containers = Some(vec![container(1, ContainerState::Exited)]);
        assert_eq!(decide(&obs, Some(&desired())), None);
    }

    #[test]
    fn grace_comes_from_the_token_policy() {
        let des = desired_with(WorkspaceSpec {
            token_policy: Some(crate::api::TokenPolicy { stale_grace: Some("15m".into()), ..Default::default() }),
            ..Default::default()
        });
        assert_eq!(decide(&wedged(), Some(&des)), None);
    }
}
