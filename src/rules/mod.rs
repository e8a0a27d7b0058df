//! Everything the operator will ever do, and why. Each rule is a pure function of
//! [`Facts`] (what is declared, what is observed, the time) to an optional
//! [`Verdict`] (a cause and the actions it asks for), with its tests beside it.
//! [`plan`] asks them in the order of [`RULES`] and returns the first decision, named
//! after its rule, or, when no rule has anything to do, when to look again. The
//! reconciler executes a decision, observes again and plans again until it waits.
//!
//! Decisions are made here only: whether the agent is alive ([`Liveness`]), what makes
//! a workspace wait for its container ([`Hold`]: a team's quota, unreadable Secrets),
//! and when a quiet workspace must be looked at again are all answered here, from the
//! same facts, for the loop, the resync sweep and the status alike.

pub mod agent_health;
pub mod agent_url;
pub mod claim;
pub mod drift;
pub mod heartbeat;
pub mod hierarchy;
pub mod liveness;
pub mod orphan;
pub mod out_of_band;
pub mod pause_resume_stop;
pub mod pool;
pub mod provision;
pub mod quota;
pub mod remove;
pub mod restart;
pub mod rotation;
pub mod stale_token_without_container;
pub mod suspend;
pub mod token_file;
pub mod wedged;

#[cfg(test)]
pub(crate) mod fixtures;
#[cfg(test)]
mod props;

use std::collections::BTreeMap;
use std::time::Duration;

use chrono::{DateTime, Utc};

pub use self::liveness::Liveness;
pub use self::quota::TeamView;
use crate::api::OperatingMode;
use crate::api::{EffectiveSpec, ObjectKey, SourceRef};
pub use crate::model::container::ContainerState;
use crate::model::container::{AppliedConfig, ContainerInfo, labels};
use crate::model::{AgentReport, RevokeReason, TokenRow, WorkspaceRecord};

/// What is declared for one workspace, resolved.
#[derive(Clone, Debug)]
pub struct Desired {
    pub key: ObjectKey,
    pub generation: i64,
    /// The effective spec, or why it is invalid (InvalidSpec; nothing is changed for it).
    pub spec: Result<EffectiveSpec, Vec<String>>,
    /// Hash of the rendered container config (see runtime::render).
    pub spec_hash: String,
    pub source: std::sync::Arc<SourceRef>,
    /// Why a Secret the workspace's `envFrom` needs cannot be read, if one cannot.
    pub secrets_unreadable: Option<String>,
    /// The settings a container of this spec runs with (see out_of_band.rs); None where
    /// they are not known (the resync sweep compares hashes only).
    pub applied: Option<AppliedConfig>,
}

impl Desired {
    pub fn effective(&self) -> Option<&EffectiveSpec> {
        self.spec.as_ref().ok()
    }
}

/// The token file as read from the container (archive API).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TokenFile {
    /// Not read (container not running, or reading was not needed).
    NotRead,
    Missing,
    /// sha256 hex of the trimmed content.
    Hash(String),
    /// The read failed: unknown, so no rule may act on it.
    Unreadable(String),
}

/// What is, for one workspace.
#[derive(Clone, Debug)]
pub struct Observed {
    /// The store's record (uid, incarnation, heartbeats); None before first sight.
    pub record: Option<WorkspaceRecord>,
    /// This workspace's containers (by uid or workspace label). None = listing failed:
    /// Docker unreachable must never read as "no containers".
    pub containers: Option<Vec<ContainerInfo>>,
    /// Live (not revoked) token rows, oldest first.
    pub live_tokens: Vec<TokenRow>,
    pub token_file: TokenFile,
    /// The rest of its team, when the team has quotas (see quota.rs).
    pub team: TeamView,
    /// The last time the registry could not record a heartbeat because the state
    /// store failed (see store::LostHeartbeats): silence before it is not the agent's.
    pub heartbeats_lost_at: Option<DateTime<Utc>>,
    /// What the agent last reported to the registry (any incarnation's; see agent_health.rs).
    pub agent: Option<AgentReport>,
    /// The warm pool it names, when a first container may be claimed (see claim.rs).
    pub pool: claim::PoolView,
}

impl Observed {
    /// A claimed pool member is this workspace's container from its claim on (see
    /// claim.rs), but Docker cannot relabel it: it is given the spec hash and the
    /// provisioning time the claim recorded, and the workspace's key, as if the
    /// operator had created it so. Called once the record and containers are read.
    pub fn adopt_claim(&mut self) {
        let Some(record) = self.record.as_ref() else { return };
        let Some(claim) = record.claim.as_ref() else { return };
        let inc = record.incarnation.to_string();
        for c in self.containers.iter_mut().flatten() {
            if c.id == claim.container_id
                && c.uid() == Some(record.uid.as_str())
                && c.label(labels::INCARNATION) == Some(inc.as_str())
            {
                c.labels.insert(labels::SPEC_HASH.into(), claim.spec_hash.clone());
                c.labels.insert(
                    labels::PROVISIONED_AT.into(),
                    claim.at.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
                );
                c.labels.insert(labels::WORKSPACE.into(), record.key.clone());
            }
        }
    }

    /// The one container that is ours for this record (matching uid), if listing worked.
    pub fn container(&self) -> Option<&ContainerInfo> {
        let uid = self.record.as_ref().map(|r| r.uid.as_str())?;
        self.containers.as_ref()?.iter().find(|c| c.uid() == Some(uid))
    }

    pub fn incarnation(&self) -> i64 {
        self.record.as_ref().map(|r| r.incarnation).unwrap_or(0)
    }

    /// Live tokens of the current incarnation.
    pub fn current_tokens(&self) -> impl Iterator<Item = &TokenRow> {
        let inc = self.incarnation();
        self.live_tokens.iter().filter(move |t| t.incarnation == inc)
    }

    /// Our container, when it is running and of the current incarnation: the one whose
    /// token file and agent count.
    pub fn current_running(&self) -> Option<&ContainerInfo> {
        self.container().filter(|c| c.state == ContainerState::Running && c.incarnation() == Some(self.incarnation()))
    }

    /// Our container of the current incarnation whose token file must hold a live token:
    /// a running one, or one the runtime is still starting (a Pod waits for its token
    /// Secret: it starts once the token is there).
    pub fn token_holder(&self) -> Option<&ContainerInfo> {
        self.container().filter(|c| {
            matches!(c.state, ContainerState::Running | ContainerState::Waiting)
                && c.incarnation() == Some(self.incarnation())
        })
    }
}

/// Operator settings the rules depend on.
#[derive(Clone, Debug)]
pub struct Settings {
    /// The agent's heartbeat interval.
    pub heartbeat_interval: Duration,
    /// Silence longer than this (counted from the later of the last heartbeat and the
    /// container's start) means the agent is hung.
    pub heartbeat_ttl: Duration,
    /// Heartbeat restarts allowed before the workspace is left Degraded.
    pub restart_budget: i64,
    /// First wait between heartbeat restarts; doubles each time.
    pub restart_backoff: Duration,
    /// Whether the runtime can freeze a container and keep its memory (Docker's pause).
    /// Kubernetes cannot: there, Paused deletes the Pod and keeps its volume, as Stopped
    /// does, and keeps the token per `onPause`; resuming starts a new Pod.
    pub freezes: bool,
}

/// Everything a rule may look at: one workspace's declaration and observation, the
/// time, and the operator's settings.
#[derive(Clone, Copy, Debug)]
pub struct Facts<'a> {
    /// None: declared no more (or never).
    pub desired: Option<&'a Desired>,
    pub observed: &'a Observed,
    pub now: DateTime<Utc>,
    pub settings: &'a Settings,
}

impl<'a> Facts<'a> {
    /// The valid effective spec, when the workspace is declared and valid.
    pub fn spec(&self) -> Option<&'a EffectiveSpec> {
        self.desired.and_then(Desired::effective)
    }

    /// The declared mode, unless the CLI (`pause`/`resume`) overrides it; a Running
    /// one suspended by the lifecycle autopilot is its suspension's (suspend.rs).
    pub fn mode(&self) -> Option<OperatingMode> {
        let spec = self.spec()?;
        let own = self.observed.record.as_ref().and_then(|r| r.mode_override).unwrap_or(spec.operating_mode);
        Some(suspend::mode(own, self.suspension()))
    }

    /// The lifecycle autopilot's suspension in force, if any (suspend.rs).
    pub fn suspension(&self) -> Option<crate::model::Suspension> {
        suspend::in_force(self.observed.record.as_ref()?, self.spec()?)
    }

    /// Whether the workspace should have a container now: Running, or Paused where the
    /// runtime can freeze one.
    pub fn wants_container(&self) -> Option<bool> {
        Some(match self.mode()? {
            OperatingMode::Running => true,
            OperatingMode::Paused => self.settings.freezes,
            OperatingMode::Stopped => false,
        })
    }

    /// Whether the agent is heard from (see liveness.rs).
    pub fn liveness(&self) -> Liveness {
        Liveness::of(self.observed, self.now, self.settings.heartbeat_ttl)
    }

    /// A new incarnation, created paused when the workspace is to be paused.
    pub fn provision(&self, revoke: RevokeReason) -> Action {
        Action::Provision { revoke, paused: self.mode() == Some(OperatingMode::Paused) }
    }

    /// What makes it wait for a container it should have, if anything does: a Secret
    /// its `envFrom` needs first, then its team's quota.
    pub fn hold(&self) -> Option<Hold> {
        if let Some(why) = self.desired.and_then(|d| d.secrets_unreadable.as_ref()) {
            return Some(Hold::Secrets(why.clone()));
        }
        quota::hold(self).map(Hold::Quota)
    }

    /// The quota's hold alone (a running container is never held by unreadable Secrets).
    pub fn quota_hold(&self) -> Option<String> {
        quota::hold(self)
    }
}

/// Why a workspace waits for a container it should have.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Hold {
    /// A Secret its `envFrom` needs cannot be read: no container is created or
    /// recreated (it would start without its secrets); a running one keeps running.
    Secrets(String),
    /// Its team's quota has no room (`maxWorkspaces`, `maxRunning`): it waits its turn,
    /// first seen first served; nothing that holds a slot is stopped to make room.
    Quota(String),
}

impl Hold {
    pub fn message(&self) -> &str {
        match self {
            Self::Secrets(m) | Self::Quota(m) => m,
        }
    }
}

/// What a rule asks for, and why.
#[derive(Clone, Debug, PartialEq)]
pub struct Verdict {
    /// A sentence for people: "no container".
    pub cause: String,
    pub actions: Vec<Action>,
}

impl Verdict {
    pub fn new(cause: impl Into<String>, actions: Vec<Action>) -> Self {
        Self { cause: cause.into(), actions }
    }

    /// Whether carrying it out creates a container (a provision).
    pub fn creates_container(&self) -> bool {
        self.actions.iter().any(|a| matches!(a, Action::Provision { .. }))
    }
}

/// A verdict with the name of the rule that gave it: what the decision log records.
#[derive(Clone, Debug, PartialEq)]
pub struct Decision {
    pub rule: &'static str,
    pub cause: String,
    pub actions: Vec<Action>,
}

/// Idempotent steps the executor knows how to take.
#[derive(Clone, Debug, PartialEq)]
pub enum Action {
    /// New incarnation: revoke live tokens (reason), remove any old container, ensure the
    /// config volume, create the container, write a fresh token into it, start it, and
    /// pause it when `paused` (operating mode Paused).
    Provision {
        revoke: RevokeReason,
        paused: bool,
    },
    /// Force-remove one container by id.
    RemoveContainer {
        id: String,
    },
    /// Remove the workspace's config volume.
    RemoveVolume,
    /// Revoke every live token of the workspace.
    RevokeTokens {
        reason: RevokeReason,
    },
    /// Revoke these live tokens.
    RevokeTokenIds {
        ids: Vec<String>,
        reason: RevokeReason,
    },
    /// Live rotation: issue a token, write it into the running container, and let
    /// `old` stay valid until `old_valid_until` (the overlap).
    RotateToken {
        old: String,
        old_valid_until: DateTime<Utc>,
    },
    /// Revoke live tokens unused since `cutoff` (condition repeated in the UPDATE).
    RevokeStaleTokens {
        cutoff: DateTime<Utc>,
    },
    /// Issue a token for the current incarnation, write it into the running container,
    /// then revoke the others (reason).
    ReissueToken {
        revoke: RevokeReason,
    },
    Pause {
        id: String,
    },
    Unpause {
        id: String,
    },
    /// Count a heartbeat restart against the budget (precedes a Provision).
    RecordRestart {
        reason: String,
    },
    /// The agent is back: the restart budget starts over.
    ResetRestarts,
    /// Record a suspension by the lifecycle autopilot (the running clock stops with
    /// `used_ms` of the lifetime used); the pause and stop rules carry it out.
    Suspend {
        suspension: crate::model::Suspension,
        used_ms: i64,
    },
    /// The lifecycle autopilot's running clock started or stopped (suspend.rs).
    LifetimeClock {
        state: crate::model::LifecycleState,
    },
    /// Forget the workspace's record (its container and volume are gone).
    Forget,
    /// Take warm-pool member `id` (uid `uid`) of `pool` as the workspace's container:
    /// the workspace takes the member's uid, a new token and the identity file
    /// (workspace id, name, env overlay) are written into its `/configs`. Nothing is
    /// created.
    Claim {
        pool: String,
        id: String,
        uid: String,
        /// The workspace's env the template does not set (see claim::satisfies).
        overlay: BTreeMap<String, String>,
    },
}

impl Action {
    /// The step's name: failpoints (`after-<name>`), errors and metrics use it.
    pub fn name(&self) -> &'static str {
        match self {
            Action::Provision { .. } => "provision",
            Action::RemoveContainer { .. } => "remove-container",
            Action::RemoveVolume => "remove-volume",
            Action::RevokeTokens { .. } => "revoke-tokens",
            Action::RevokeTokenIds { .. } => "revoke-token-ids",
            Action::RotateToken { .. } => "rotate-token",
            Action::RevokeStaleTokens { .. } => "revoke-stale-tokens",
            Action::ReissueToken { .. } => "reissue-token",
            Action::Pause { .. } => "pause",
            Action::Unpause { .. } => "unpause",
            Action::RecordRestart { .. } => "record-restart",
            Action::ResetRestarts => "reset-restarts",
            Action::Suspend { .. } => "suspend",
            Action::LifetimeClock { .. } => "lifetime-clock",
            Action::Forget => "forget",
            Action::Claim { .. } => "claim",
        }
    }

    /// Whether executing it creates, removes or changes the state of containers (the
    /// reconciler then re-reads the workspace's containers before it looks again).
    pub fn changes_containers(&self) -> bool {
        matches!(
            self,
            Action::Provision { .. } | Action::RemoveContainer { .. } | Action::Pause { .. } | Action::Unpause { .. }
        )
    }

    /// How the action reads in the decision log.
    pub fn describe(&self) -> String {
        match self {
            Action::Provision { revoke, paused } => format!(
                "provision a new incarnation{} (old tokens revoked: {revoke})",
                if *paused { ", paused" } else { "" }
            ),
            Action::RemoveContainer { id } => format!("remove container {}", &id[..id.len().min(12)]),
            Action::RemoveVolume => "remove config volume".into(),
            Action::RevokeTokens { reason } => format!("revoke live tokens: {reason}"),
            Action::RevokeTokenIds { ids, reason } => format!("revoke {} token(s): {reason}", ids.len()),
            Action::RotateToken { old_valid_until, .. } => {
                format!("rotate the token (the old one valid until {})", old_valid_until.to_rfc3339())
            }
            Action::RevokeStaleTokens { cutoff } => {
                format!("revoke tokens unused since {}: container-missing", cutoff.to_rfc3339())
            }
            Action::ReissueToken { revoke } => {
                format!("write a new token into the container (old ones revoked: {revoke})")
            }
            Action::Pause { .. } => "pause container".into(),
            Action::Unpause { .. } => "unpause container".into(),
            Action::RecordRestart { reason } => format!("count restart: {reason}"),
            Action::ResetRestarts => "reset the restart budget".into(),
            Action::Suspend { suspension, .. } => {
                format!("suspend ({}) to {:?}", suspension.cause, suspension.to)
            }
            Action::LifetimeClock { state } => {
                let used = state.used_ms / 1000;
                match state.running_since {
                    Some(_) => format!("start the lifetime clock ({used}s used)"),
                    None => format!("stop the lifetime clock ({used}s used)"),
                }
            }
            Action::Forget => "forget workspace".into(),
            Action::Claim { pool, id, .. } => {
                format!("claim container {} of warm pool {pool} with a new token", &id[..id.len().min(12)])
            }
        }
    }
}

/// What a rule decides from the facts.
pub type Decide = fn(&Facts<'_>) -> Option<Verdict>;
/// When a rule that acts on time passing will next have something to say.
pub type Wake = fn(&Facts<'_>) -> Option<DateTime<Utc>>;

/// One rule: its name (the decision log's and the metrics'), what it decides, and,
/// for rules that act on time passing, when it will next have something to say.
pub struct Rule {
    pub name: &'static str,
    pub decide: Decide,
    pub wake: Option<Wake>,
}

const fn rule(name: &'static str, decide: Decide) -> Rule {
    Rule { name, decide, wake: None }
}

/// The rules, in the order they are asked. Earlier rules win: removal before anything,
/// provisioning before drift, token hygiene after the container is right.
pub const RULES: &[Rule] = &[
    rule("remove", remove::rule),
    rule("orphan", orphan::rule),
    rule("claim", claim::rule),
    rule("provision", provision::rule),
    rule("stop", pause_resume_stop::stop),
    rule("drift", drift::rule),
    rule("out-of-band", out_of_band::rule),
    rule("restart", restart::rule),
    rule("pause", pause_resume_stop::pause),
    rule("resume", pause_resume_stop::resume),
    Rule { name: "suspend", decide: suspend::rule, wake: Some(suspend::wake) },
    rule("token-file", token_file::rule),
    Rule { name: "rotation", decide: rotation::rule, wake: Some(rotation::wake) },
    rule("stale-token-without-container", stale_token_without_container::rule),
    Rule { name: "heartbeat", decide: heartbeat::rule, wake: Some(heartbeat::wake) },
    Rule { name: "wedged", decide: wedged::rule, wake: Some(wedged::wake) },
    rule("lifetime", suspend::lifetime),
];

/// What to do about one workspace now.
#[derive(Clone, Debug, PartialEq)]
pub enum Plan {
    /// Carry this out, then plan again.
    Act(Decision),
    /// Desired and observed agree; look again at this time (None: only when something
    /// changes), when a rule will have something to say by then.
    Wait(Option<DateTime<Utc>>),
}

impl Plan {
    /// The decision, if there is one to carry out.
    pub fn decision(self) -> Option<Decision> {
        match self {
            Plan::Act(d) => Some(d),
            Plan::Wait(_) => None,
        }
    }
}

/// The first rule with something to do, or when to look again. While a Secret the
/// workspace needs is unreadable, verdicts that would create a container are passed
/// over: it would start without its secrets. Everything else (pause, stop, removal,
/// revoking tokens) still happens.
pub fn plan(facts: &Facts<'_>) -> Plan {
    let secrets_held = matches!(facts.hold(), Some(Hold::Secrets(_)));
    for r in RULES {
        if let Some(v) = (r.decide)(facts)
            && !(secrets_held && v.creates_container())
        {
            return Plan::Act(Decision { rule: r.name, cause: v.cause, actions: v.actions });
        }
    }
    Plan::Wait(RULES.iter().filter_map(|r| r.wake.and_then(|wake| wake(facts))).min())
}

#[cfg(test)]
mod tests {
    use super::fixtures::*;
    use super::*;

    fn decide(des: Option<&Desired>, obs: &Observed) -> Option<Decision> {
        let s = settings();
        plan(&facts(des, obs, &s)).decision()
    }

    #[test]
    fn a_healthy_workspace_needs_nothing() {
        assert_eq!(decide(Some(&desired()), &healthy()), None);
    }

    #[test]
    fn an_unreadable_secret_holds_every_container_creation_but_nothing_else() {
        let mut des = desired();
        des.secrets_unreadable = Some("Secret default/keys not found".into());
        let obs = healthy().without_container().without_tokens();
        assert_eq!(decide(Some(&des), &obs), None, "no container is created without its secrets");
        // A running container with an old spec keeps running as it is.
        des.spec_hash = "0000000000000000".into();
        assert_eq!(decide(Some(&des), &healthy()), None);
        // Pausing and stopping still happen.
        let mut paused = desired_mode(OperatingMode::Paused);
        paused.secrets_unreadable = des.secrets_unreadable.clone();
        assert_eq!(decide(Some(&paused), &healthy()).unwrap().rule, "pause");
    }

    #[test]
    fn removal_wins_over_everything_else() {
        let obs = healthy().with_token_file(TokenFile::Missing);
        assert_eq!(decide(None, &obs).unwrap().rule, "remove");
    }

    #[test]
    fn the_compose_down_v_incident_is_provisioning_not_a_sweep_later() {
        // Container and volume gone, token rows still live: provisioned at once, with
        // the old tokens revoked as container-missing; no 5-minute wait.
        let d = decide(Some(&desired()), &healthy().without_container()).unwrap();
        assert_eq!(d.rule, "provision");
        assert_eq!(d.actions, vec![Action::Provision { revoke: RevokeReason::ContainerMissing, paused: false }]);
    }

    #[test]
    fn every_decision_is_named_after_its_rule_in_the_table() {
        let names: Vec<&str> = RULES.iter().map(|r| r.name).collect();
        let cases = [
            (None, healthy()),
            (Some(desired()), healthy().without_container()),
            (Some(desired_mode(OperatingMode::Paused)), healthy()),
            (Some(desired()), healthy().with_token_file(TokenFile::Missing)),
        ];
        for (des, obs) in cases {
            let d = decide(des.as_ref(), &obs).unwrap();
            assert!(names.contains(&d.rule), "{} is not a rule of RULES", d.rule);
        }
        let mut unique = names.clone();
        unique.sort();
        unique.dedup();
        assert_eq!(unique.len(), names.len(), "two rules share a name");
    }

    #[test]
    fn a_quiet_workspace_is_looked_at_again_when_its_heartbeat_would_be_overdue() {
        // Heard a second ago, TTL 10 s: the heartbeat rule wakes when the TTL runs out.
        let s = settings();
        let obs = healthy();
        let heard = obs.record.as_ref().unwrap().last_heartbeat_at.unwrap();
        let want = heard + chrono::Duration::from_std(s.heartbeat_ttl).unwrap();
        assert_eq!(plan(&facts(Some(&desired()), &obs, &s)), Plan::Wait(Some(want)));
        // Paused: no heartbeat is expected, nothing to wake for.
        let paused = healthy().with_container(container(1, ContainerState::Paused));
        assert_eq!(plan(&facts(Some(&desired_mode(OperatingMode::Paused)), &paused, &s)), Plan::Wait(None));
    }
}
