//! remove: a workspace declared no more loses its container, its config volume and
//! its tokens (reason `deleted`), then the operator forgets it.

use super::*;

pub fn rule(facts: &Facts<'_>) -> Option<Verdict> {
    if facts.desired.is_some() {
        return None;
    }
    let record = facts.observed.record.as_ref()?;
    // Listing failed: we cannot know what to remove, and must not forget the record
    // while a container may still hold its token.
    let containers = facts.observed.containers.as_ref()?;
    let mut actions = vec![Action::RevokeTokens { reason: RevokeReason::Deleted }];
    actions.extend(containers.iter().map(|c| Action::RemoveContainer { id: c.id.clone() }));
    actions.push(Action::RemoveVolume);
    actions.push(Action::Forget);
    Some(Verdict::new(format!("{} is declared no more", record.key), actions))
}

#[cfg(test)]
mod tests {
    use super::super::fixtures::*;
    use super::*;

    #[test]
    fn undeclared_workspace_is_removed_with_tokens_revoked_as_deleted() {
        let obs = healthy();
        let s = settings();
        let d = rule(&facts(None, &obs, &s)).expect("decision");
        assert_eq!(d.actions[0], Action::RevokeTokens { reason: RevokeReason::Deleted });
        assert!(d.actions.contains(&Action::RemoveContainer { id: "c0ffee000001".into() }));
        assert_eq!(d.actions.last(), Some(&Action::Forget));
    }

    #[test]
    fn declared_workspace_is_not_removed() {
        let (obs, s, des) = (healthy(), settings(), desired());
        assert_eq!(rule(&facts(Some(&des), &obs, &s)), None);
    }

    #[test]
    fn nothing_is_removed_or_forgotten_when_listing_failed() {
        let mut obs = healthy();
        obs.containers = None;
        let s = settings();
        assert_eq!(rule(&facts(None, &obs, &s)), None);
    }

    #[test]
    fn never_seen_and_undeclared_is_nothing_to_do() {
        let mut obs = healthy();
        obs.record = None;
        obs.containers = Some(vec![]);
        let s = settings();
        assert_eq!(rule(&facts(None, &obs, &s)), None);
    }
}
