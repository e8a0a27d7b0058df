//! token-file: the running container's /configs/.auth_token must hold a live token
//! of the current incarnation, and no other token may stay live. A missing, emptied
//! or overwritten file (or rows revoked by hand) gets a new token written in; the
//! agent re-reads the file, so no restart is needed.

use super::*;

pub fn rule(facts: &Facts<'_>) -> Option<Verdict> {
    facts.spec()?;
    facts.observed.token_holder()?;
    let current = facts.observed.incarnation();
    let reissue = |cause: String| {
        Some(Verdict::new(cause, vec![Action::ReissueToken { revoke: RevokeReason::TokenFileMismatch }]))
    };
    match &facts.observed.token_file {
        TokenFile::NotRead | TokenFile::Unreadable(_) => None,
        TokenFile::Missing => reissue(format!(
            "{}/{} is missing or empty",
            crate::model::container::CONFIGS_DIR,
            crate::model::container::TOKEN_FILE
        )),
        TokenFile::Hash(h) => {
            let now = facts.now;
            let Some(live) = facts.observed.current_tokens().find(|t| &t.token_hash == h && t.valid_at(now)) else {
                return reissue(format!("the token file holds no live token of incarnation {current}"));
            };
            // Every other live token goes, except one still inside its rotation overlap.
            let mut by_reason: Vec<(RevokeReason, Vec<String>)> = Vec::new();
            let in_overlap = |t: &TokenRow| t.expires_at.is_some_and(|e| e > now);
            for t in facts.observed.live_tokens.iter().filter(|t| t.id != live.id && !in_overlap(t)) {
                let reason = if t.expires_at.is_some() {
                    RevokeReason::Rotated
                } else if t.incarnation < current {
                    RevokeReason::Superseded
                } else {
                    RevokeReason::TokenFileMismatch
                };
                match by_reason.iter_mut().find(|(r, _)| *r == reason) {
                    Some((_, ids)) => ids.push(t.id.clone()),
                    None => by_reason.push((reason, vec![t.id.clone()])),
                }
            }
            if by_reason.is_empty() {
                return None;
            }
            let n: usize = by_reason.iter().map(|(_, ids)| ids.len()).sum();
            Some(Verdict::new(
                format!("{n} live token(s) besides the one in the container"),
                by_reason.into_iter().map(|(reason, ids)| Action::RevokeTokenIds { ids, reason }).collect(),
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::fixtures::*;
    use super::*;

    fn decide(obs: &Observed) -> Option<Verdict> {
        let (s, des) = (settings(), desired());
        rule(&facts(Some(&des), obs, &s))
    }

    #[test]
    fn matching_file_is_quiet() {
        assert_eq!(decide(&healthy()), None);
    }

    #[test]
    fn missing_or_foreign_file_gets_a_new_token() {
        let mut obs = healthy();
        obs.token_file = TokenFile::Missing;
        assert_eq!(
            decide(&obs).unwrap().actions,
            vec![Action::ReissueToken { revoke: RevokeReason::TokenFileMismatch }]
        );
        obs.token_file = TokenFile::Hash("hash-of-garbage".into());
        assert!(decide(&obs).unwrap().cause.contains("no live token"));
    }

    #[test]
    fn rows_revoked_by_hand_mean_no_live_token_matches() {
        let mut obs = healthy();
        obs.live_tokens.clear();
        assert!(decide(&obs).is_some());
    }

    #[test]
    fn token_of_an_older_incarnation_in_the_file_is_not_accepted() {
        let mut obs = healthy();
        obs.live_tokens = vec![token("t0", 0, t(0), None)];
        obs.token_file = TokenFile::Hash("hash-t0".into());
        assert!(decide(&obs).is_some());
    }

    #[test]
    fn extra_live_tokens_are_revoked_keeping_the_one_in_use() {
        let mut obs = healthy();
        obs.live_tokens.insert(0, token("t0", 0, t(0), None));
        let d = decide(&obs).unwrap();
        assert_eq!(
            d.actions,
            vec![Action::RevokeTokenIds { ids: vec!["t0".into()], reason: RevokeReason::Superseded }]
        );
    }

    #[test]
    fn a_rotated_out_token_stays_through_its_overlap_then_goes_as_rotated() {
        let mut obs = healthy();
        let mut old = token("t0", 1, t(0), None);
        old.expires_at = Some(now() + chrono::Duration::seconds(10));
        obs.live_tokens.insert(0, old);
        assert_eq!(decide(&obs), None, "inside the overlap the old token is left alone");
        obs.live_tokens[0].expires_at = Some(now() - chrono::Duration::seconds(1));
        assert_eq!(
            decide(&obs).unwrap().actions,
            vec![Action::RevokeTokenIds { ids: vec!["t0".into()], reason: RevokeReason::Rotated }]
        );
    }

    #[test]
    fn a_file_holding_an_expired_token_gets_a_new_one() {
        let mut obs = healthy();
        obs.live_tokens[0].expires_at = Some(now() - chrono::Duration::seconds(1));
        assert!(matches!(decide(&obs).unwrap().actions[0], Action::ReissueToken { .. }));
    }

    #[test]
    fn unreadable_file_or_paused_container_is_left_alone() {
        let mut obs = healthy();
        obs.token_file = TokenFile::Unreadable("docker timeout".into());
        assert_eq!(decide(&obs), None);
        let mut obs = healthy();
        obs.token_file = TokenFile::Missing;
        obs.containers = Some(vec![container(1, ContainerState::Paused)]);
        assert_eq!(decide(&obs), None);
    }
}
