//! Property tests of the rules over random desired/observed states (proptest):
//! - planning is deterministic;
//! - applying each decision to a model of the world and planning again converges in a
//!   few steps to "nothing to do", and once there, stays there (idempotence);
//! - safety: nothing is revoked, removed or forgotten while the runtime listing is
//!   unknown; no container is ever created while a needed Secret is unreadable; a
//!   container that is not ours (foreign uid) is never given a token or kept.
//!
//! The model applies actions the way the executor does (`execute/`), to the fields the
//! rules read: a provision bumps the incarnation, revokes live tokens, replaces our
//! container with a running one of the declared hash and writes a fresh token; and
//! so on. Time stands still, as within one reconcile.

use proptest::prelude::*;

use super::fixtures::*;
use super::*;
use crate::api::{OnResume, OperatingMode, TokenPolicy, UpdatePolicy, WorkspaceSpec};
use crate::model::container::labels;
use crate::rules::quota;

/// At most this many decisions before a workspace must be settled (the reconcile
/// loop allows MAX_PASSES = 6 per pass and then requeues).
const SETTLE: usize = 8;

#[derive(Clone, Debug)]
struct World {
    desired: Option<Desired>,
    observed: Observed,
    /// Tokens issued by the model (ids), for fresh ids.
    issued: usize,
}

fn arb_desired() -> impl Strategy<Value = Option<Desired>> {
    let spec = (
        prop_oneof![Just(OperatingMode::Running), Just(OperatingMode::Paused), Just(OperatingMode::Stopped)],
        prop_oneof![Just(UpdatePolicy::Immediate), Just(UpdatePolicy::OnNextStop), Just(UpdatePolicy::Manual)],
        any::<bool>(), // onPause Revoke
        any::<bool>(), // onResume Reissue
        any::<bool>(), // rotateEvery 1h
        any::<bool>(), // invalid spec (tier 9)
        any::<bool>(), // secrets held
        prop_oneof![Just(HASH), Just("0000000000000000")],
        any::<bool>(), // lifecycle: idleAfter 1m, maxLifetime 10m
    );
    proptest::option::weighted(
        0.85,
        spec.prop_map(|(mode, policy, revoke, reissue, rotate, invalid, held, hash, lifecycle)| {
            let mut d = desired_with(WorkspaceSpec {
                operating_mode: Some(mode),
                update_policy: Some(policy),
                tier: invalid.then_some(9),
                token_policy: Some(TokenPolicy {
                    on_pause: revoke.then_some(crate::api::OnPause::Revoke),
                    on_resume: reissue.then_some(OnResume::Reissue),
                    rotate_every: rotate.then(|| "1h".to_string()),
                    ..Default::default()
                }),
                lifecycle: lifecycle.then(|| crate::api::Lifecycle {
                    idle_after: Some("1m".into()),
                    max_lifetime: Some("10m".into()),
                    ..Default::default()
                }),
                ..Default::default()
            });
            d.spec_hash = hash.into();
            d.secrets_unreadable = held.then(|| "Secret default/keys not found".to_string());
            d
        }),
    )
}

fn arb_container() -> impl Strategy<Value = ContainerInfo> {
    (
        0i64..3,
        prop_oneof![
            Just(ContainerState::Running),
            Just(ContainerState::Paused),
            Just(ContainerState::Exited),
            Just(ContainerState::Created),
            Just(ContainerState::Dead),
        ],
        any::<bool>(), // foreign uid (label spoofing / wiped database)
        prop_oneof![Just(HASH), Just("0000000000000000")],
        0u32..1000,
    )
        .prop_map(|(inc, state, foreign, hash, n)| {
            let mut c = container(inc, state);
            c.id = format!("c{n:05}{inc}");
            if foreign {
                c.labels.insert(labels::UID.into(), "ffffffff-spoofed".into());
            }
            c.labels.insert(labels::SPEC_HASH.into(), hash.into());
            c
        })
}

fn arb_token() -> impl Strategy<Value = TokenRow> {
    (0i64..3, 0i64..1000, proptest::option::of(0i64..1000), proptest::option::of(-100i64..100), 0u32..1000).prop_map(
        |(inc, created, used, expires, n)| {
            let mut t = token(&format!("r{n}"), inc, now() - chrono::Duration::seconds(created), None);
            t.last_used_at = used.map(|u| now() - chrono::Duration::seconds(u));
            t.expires_at = expires.map(|e| now() + chrono::Duration::seconds(e));
            t
        },
    )
}

fn arb_world() -> impl Strategy<Value = World> {
    (
        arb_desired(),
        proptest::option::weighted(0.85, (0i64..3, proptest::option::of(0i64..100), 0i64..5)),
        proptest::option::weighted(0.9, proptest::collection::vec(arb_container(), 0..3)),
        proptest::collection::vec(arb_token(), 0..3),
        0usize..4, // token file: not read, missing, a live token's hash, garbage
        any::<bool>(),
    )
        .prop_map(|(desired, rec, containers, tokens, file, quota)| {
            let record = rec.map(|(inc, hb, restarts)| {
                let mut r = record(inc);
                r.last_heartbeat_at = hb.map(|s| now() - chrono::Duration::seconds(s));
                r.restart_count = restarts;
                r
            });
            let token_file = match file {
                0 => TokenFile::NotRead,
                1 => TokenFile::Missing,
                2 => tokens.first().map_or(TokenFile::Missing, |t| TokenFile::Hash(t.token_hash.clone())),
                _ => TokenFile::Hash("garbage".into()),
            };
            // Token rows belong to a record (a foreign key in both stores).
            let tokens = if record.is_some() { tokens } else { Vec::new() };
            let observed = Observed {
                record,
                containers,
                live_tokens: tokens,
                token_file,
                team: if quota { busy_team() } else { TeamView::NoQuota },
                heartbeats_lost_at: None,
                agent: None,
                pool: Default::default(),
            };
            World { desired, observed, issued: 0 }
        })
}

/// A team allowing one running workspace, taken by a member seen first.
fn busy_team() -> TeamView {
    team_with_one_running_member(quota::Limits { max_workspaces: None, max_running: Some(1) })
}

impl World {
    fn plan(&self, settings: &Settings) -> Option<Decision> {
        plan(&facts(self.desired.as_ref(), &self.observed, settings)).decision()
    }

    fn new_token(&mut self, incarnation: i64) -> TokenRow {
        self.issued += 1;
        let t = token(&format!("new{}", self.issued), incarnation, now(), None);
        self.observed.live_tokens.push(t.clone());
        self.observed.token_file = TokenFile::Hash(t.token_hash.clone());
        t
    }

    /// What the executor's actions do to what the rules observe.
    fn apply(&mut self, actions: &[Action]) {
        for a in actions {
            let obs = &mut self.observed;
            match a {
                Action::Provision { paused, .. } => {
                    let rec = obs.record.get_or_insert_with(|| record(0));
                    rec.incarnation += 1;
                    let inc = rec.incarnation;
                    let uid = rec.uid.clone();
                    obs.live_tokens.clear();
                    let containers = obs.containers.get_or_insert_with(Vec::new);
                    containers.retain(|c| c.uid() != Some(uid.as_str()));
                    let state = if *paused { ContainerState::Paused } else { ContainerState::Running };
                    let mut c = container(inc, state);
                    c.id = format!("new-{inc}");
                    c.labels.insert(labels::PROVISIONED_AT.into(), now().to_rfc3339());
                    c.started_at = Some(now());
                    let hash = self.desired.as_ref().map_or(HASH.to_string(), |d| d.spec_hash.clone());
                    c.labels.insert(labels::SPEC_HASH.into(), hash);
                    containers.push(c);
                    self.new_token(inc);
                }
                Action::RemoveContainer { id } => {
                    if let Some(cs) = obs.containers.as_mut() {
                        cs.retain(|c| &c.id != id);
                    }
                }
                Action::RemoveVolume => obs.token_file = TokenFile::NotRead,
                Action::RevokeTokens { .. } => obs.live_tokens.clear(),
                Action::RevokeTokenIds { ids, .. } => obs.live_tokens.retain(|t| !ids.contains(&t.id)),
                Action::RotateToken { old, old_valid_until } => {
                    if let Some(t) = obs.live_tokens.iter_mut().find(|t| &t.id == old) {
                        t.expires_at = Some(*old_valid_until);
                    }
                    let inc = self.observed.incarnation();
                    self.new_token(inc);
                }
                Action::RevokeStaleTokens { cutoff } => obs.live_tokens.retain(|t| t.last_activity() >= *cutoff),
                Action::ReissueToken { .. } => {
                    obs.live_tokens.clear();
                    let inc = self.observed.incarnation();
                    self.new_token(inc);
                }
                Action::Pause { id } | Action::Unpause { id } => {
                    let to = if matches!(a, Action::Pause { .. }) {
                        ContainerState::Paused
                    } else {
                        ContainerState::Running
                    };
                    if let Some(c) = obs.containers.iter_mut().flatten().find(|c| &c.id == id) {
                        c.state = to;
                    }
                }
                Action::RecordRestart { .. } => {
                    if let Some(r) = obs.record.as_mut() {
                        r.restart_count += 1;
                        r.last_restart_at = Some(now());
                    }
                }
                Action::ResetRestarts => {
                    if let Some(r) = obs.record.as_mut() {
                        r.restart_count = 0;
                    }
                }
                Action::Suspend { suspension, used_ms } => {
                    if let Some(r) = obs.record.as_mut() {
                        r.lifecycle = crate::model::LifecycleState {
                            suspended: Some(*suspension),
                            running_since: None,
                            used_ms: *used_ms,
                        };
                    }
                }
                Action::LifetimeClock { state } => {
                    if let Some(r) = obs.record.as_mut() {
                        r.lifecycle = state.clone();
                    }
                }
                Action::Forget => obs.record = None,
                // The model names no warm pool (claims have their own tests in claim.rs).
                Action::Claim { .. } => {}
            }
        }
    }
}

fn destroys_something(d: &Decision) -> bool {
    d.actions.iter().any(|a| {
        matches!(
            a,
            // Revoking because the declared mode says so (Paused with onPause Revoke,
            // Stopped) does not depend on the listing.
            Action::RevokeTokens {
                reason: RevokeReason::ContainerMissing
                    | RevokeReason::Deleted
                    | RevokeReason::Reprovision
                    | RevokeReason::TokenFileMismatch
                    | RevokeReason::Superseded,
                ..
            } | Action::RevokeTokenIds { .. }
                | Action::RevokeStaleTokens { .. }
                | Action::RemoveContainer { .. }
                | Action::RemoveVolume
                | Action::Forget
                | Action::Provision { .. }
        )
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn planning_is_deterministic(world in arb_world()) {
        let s = settings();
        prop_assert_eq!(world.plan(&s), world.plan(&s));
    }

    #[test]
    fn nothing_is_destroyed_while_the_runtime_listing_is_unknown(mut world in arb_world()) {
        let s = settings();
        world.observed.containers = None;
        if let Some(d) = world.plan(&s) {
            prop_assert!(!destroys_something(&d), "{:?}", d);
        }
    }

    #[test]
    fn plans_converge_and_then_stay_quiet(mut world in arb_world()) {
        let s = settings();
        let start = world.clone();
        let mut steps = Vec::new();
        while let Some(d) = world.plan(&s) {
            prop_assert!(
                steps.len() < SETTLE,
                "no fixed point after {} decisions from {:?}: {:?}", SETTLE, start, steps
            );
            if world.desired.as_ref().is_some_and(|d| d.secrets_unreadable.is_some()) {
                prop_assert!(!d.actions.iter().any(|a| matches!(a, Action::Provision { .. })), "a container created while its Secret is unreadable: {:?}", d);
            }
            world.apply(&d.actions);
            steps.push(d.rule);
        }
        // Idempotent: the settled world asks for nothing, however often it is asked.
        prop_assert_eq!(world.plan(&s), None);
        // Settled means: no container that is not ours survives...
        if let (Some(cs), Some(rec)) = (world.observed.containers.as_ref(), world.observed.record.as_ref()) {
            prop_assert!(cs.iter().all(|c| c.uid() == Some(rec.uid.as_str())), "{:?}", cs);
        }
        // ...and a declared, valid, running workspace (not held back) has exactly its
        // container running with one live token of its incarnation in the file.
        let wants_running = world.desired.as_ref().is_some_and(|d| {
            d.spec.as_ref().is_ok_and(|s| s.operating_mode == OperatingMode::Running)
                && d.secrets_unreadable.is_none()
                && d.spec.as_ref().is_ok_and(|s| s.update_policy == UpdatePolicy::Immediate)
        }) && world.observed.record.as_ref().is_none_or(|r| r.lifecycle.suspended.is_none()); // idle: suspended
        let listed = world.observed.containers.is_some();
        if wants_running && listed && world.observed.team == TeamView::NoQuota && world.observed.record.is_some() {
            let c = world.observed.container();
            prop_assert!(c.is_some_and(|c| c.state == ContainerState::Running), "{:?} from {:?}", world, start);
            if let TokenFile::Hash(h) = &world.observed.token_file {
                let inc = world.observed.incarnation();
                prop_assert!(world.observed.current_tokens().any(|t| &t.token_hash == h && t.incarnation == inc));
            }
        }
        // Undeclared: nothing of it is left.
        if world.desired.is_none() && start.observed.containers.is_some() {
            prop_assert!(world.observed.container().is_none());
            prop_assert!(world.observed.live_tokens.is_empty(), "{:?}", world.observed.live_tokens);
        }
    }
}
