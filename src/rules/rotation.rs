//! rotation: live token rotation without a restart (`tokenPolicy.rotateEvery`,
//! `maxAge`). A new token is written into the running container; the agent re-reads
//! the file; the old token stays valid for `overlap` and is then revoked (`rotated`)
//! by the token-file rule. The agent never sees a 401 across a rotation.

use super::*;

/// When the token in use must be rotated, per the policy; None when it never must.
pub fn due(spec: &EffectiveSpec, token: &TokenRow) -> Option<DateTime<Utc>> {
    let p = &spec.token_policy;
    let by_age = p.rotate_every.and_then(|d| chrono::Duration::from_std(d).ok()).map(|d| token.created_at + d);
    // maxAge: rotate early enough that the old token's overlap ends by its maximum age.
    let by_max = p
        .max_age
        .and_then(|m| chrono::Duration::from_std(m.saturating_sub(p.overlap)).ok())
        .map(|d| token.created_at + d);
    by_age.into_iter().chain(by_max).min()
}

/// The token in the running container's file that rotation applies to: live, of the
/// current incarnation, not itself rotated out.
fn in_use<'a>(facts: &Facts<'a>) -> Option<&'a TokenRow> {
    facts.observed.current_running()?;
    let TokenFile::Hash(h) = &facts.observed.token_file else { return None };
    facts.observed.current_tokens().find(|t| &t.token_hash == h && t.expires_at.is_none())
}

/// When a rotation falls due, or a rotated-out token's overlap ends (the token-file
/// rule then revokes it).
pub fn wake(facts: &Facts<'_>) -> Option<DateTime<Utc>> {
    let spec = facts.spec()?;
    let overlaps_end = facts.observed.live_tokens.iter().filter_map(|t| t.expires_at);
    let rotation = in_use(facts).and_then(|t| due(spec, t));
    overlaps_end.chain(rotation).min()
}

pub fn rule(facts: &Facts<'_>) -> Option<Verdict> {
    let spec = facts.spec()?;
    let current = in_use(facts)?;
    let at = due(spec, current)?;
    if at > facts.now {
        return None;
    }
    let overlap = chrono::Duration::from_std(spec.token_policy.overlap).ok()?;
    Some(Verdict::new(
        format!(
            "token {}… is due for rotation (issued {})",
            current.prefix,
            current.created_at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
        ),
        vec![Action::RotateToken { old: current.id.clone(), old_valid_until: facts.now + overlap }],
    ))
}

#[cfg(test)]
mod tests {
    use super::super::fixtures::*;
    use super::*;
    use crate::api::{TokenPolicy, WorkspaceSpec};

    fn policy(rotate: Option<&str>, max_age: Option<&str>) -> Desired {
        desired_with(WorkspaceSpec {
            token_policy: Some(TokenPolicy {
                rotate_every: rotate.map(str::to_string),
                max_age: max_age.map(str::to_string),
                overlap: Some("30s".into()),
                ..Default::default()
            }),
            ..Default::default()
        })
    }

    #[test]
    fn no_policy_never_rotates() {
        let (obs, s) = (healthy(), settings());
        assert_eq!(rule(&facts(Some(&desired()), &obs, &s)), None);
    }

    #[test]
    fn rotates_when_due_keeping_the_old_token_for_the_overlap() {
        // The healthy token was issued at t(100); now is t(1000).
        let (obs, s) = (healthy(), settings());
        let d = rule(&facts(Some(&policy(Some("10m"), None)), &obs, &s)).unwrap();
        assert_eq!(
            d.actions,
            vec![Action::RotateToken { old: "t1".into(), old_valid_until: now() + chrono::Duration::seconds(30) }]
        );
        assert_eq!(rule(&facts(Some(&policy(Some("1h"), None)), &obs, &s)), None);
    }

    #[test]
    fn max_age_rotates_an_overlap_early() {
        let (obs, s) = (healthy(), settings());
        // 900 s old; maxAge 920 s minus 30 s overlap = due at 890 s.
        assert!(rule(&facts(Some(&policy(None, Some("920s"))), &obs, &s)).is_some());
        assert_eq!(rule(&facts(Some(&policy(None, Some("1h"))), &obs, &s)), None);
    }

    #[test]
    fn a_token_already_rotating_out_is_not_rotated_again() {
        let mut obs = healthy();
        obs.live_tokens[0].expires_at = Some(now() + chrono::Duration::seconds(5));
        let s = settings();
        assert_eq!(rule(&facts(Some(&policy(Some("1m"), None)), &obs, &s)), None);
    }
}
