//! Everything the operator will ever do, and why. Each rule is a pure function
//! `(desired, observed, now) -> Option<Decision>` with its tests beside it; `plan`
//! asks them in order and returns the first decision. The reconciler executes it,
//! observes again and plans again until no rule has anything to say.

pub mod drift;
pub use crate::runtime::ContainerState;
pub mod heartbeat;
pub mod orphan;
pub mod pause_resume_stop;
pub mod provision;
pub mod quota;
pub mod remove;
pub mod restart;
pub mod rotation;
pub mod stale_token_without_container;
pub mod token_file;

#[cfg(test)]
pub(crate) mod fixtures;
#[cfg(test)]
mod props;

use std::time::Duration;

use chrono::{DateTime, Utc};

use crate::api::OperatingMode;
use crate::api::{EffectiveSpec, ObjectKey, SourceRef};
use crate::runtime::ContainerInfo;
use crate::store::{RevokeReason, TokenRow, WorkspaceRecord};

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
    /// Why a Secret the workspace's `envFrom` needs cannot be read. While set, no
    /// container is created or recreated for it (see [`plan`]).
    pub secrets_hold: Option<String>,
}

impl Desired {
    pub fn effective(&self) -> Option<&EffectiveSpec> {
        self.spec.as_ref().ok()
    }
}

impl<'a> Ctx<'a> {
    /// The valid effective spec, when the workspace is declared and valid.
    pub fn spec(&self) -> Option<&'a EffectiveSpec> {
        self.desired.and_then(Desired::effective)
    }

    /// The declared mode, unless the CLI (`pause`/`resume`) overrides it.
    pub fn mode(&self) -> Option<OperatingMode> {
        let spec = self.spec()?;
        Some(self.observed.record.as_ref().and_then(|r| r.mode_override).unwrap_or(spec.operating_mode))
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
    /// Set while a provision is known to be in flight (the stale-token rule skips it).
    pub provisioning: bool,
    /// Why the team's quota makes this workspace wait (see quota.rs), if it does.
    pub quota_hold: Option<String>,
    /// The last time the registry could not record a heartbeat because the state
    /// store failed (see store::LostHeartbeats): silence before it is not the agent's.
    pub heartbeats_lost_at: Option<DateTime<Utc>>,
}

impl Observed {
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
}

/// Everything a rule may look at.
#[derive(Clone, Copy, Debug)]
pub struct Ctx<'a> {
    /// None: declared no more (or never).
    pub desired: Option<&'a Desired>,
    pub observed: &'a Observed,
    pub now: DateTime<Utc>,
    pub settings: &'a Settings,
}

/// What to do, and why.
#[derive(Clone, Debug, PartialEq)]
pub struct Decision {
    pub rule: &'static str,
    /// A sentence for people: "provisioned: no container".
    pub cause: String,
    pub actions: Vec<Action>,
}

impl Decision {
    pub fn new(rule: &'static str, cause: impl Into<String>, actions: Vec<Action>) -> Self {
        Self { rule, cause: cause.into(), actions }
    }

    /// Whether carrying it out creates a container (a provision).
    pub fn creates_container(&self) -> bool {
        self.actions.iter().any(|a| matches!(a, Action::Provision { .. }))
    }
}

/// Idempotent steps the executor knows how to take.
#[derive(Clone, Debug, PartialEq)]
pub enum Action {
    /// New incarnation: revoke live tokens (reason), remove any old container, ensure the
    /// config volume, create the container, write a fresh token into it, start it.
    Provision {
        revoke: RevokeReason,
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
    /// Forget the workspace's record (its container and volume are gone).
    Forget,
}

impl Action {
    /// The failpoint just after this action (see `execute::FAILPOINTS`).
    pub fn failpoint(&self) -> &'static str {
        match self {
            Action::Provision { .. } => "after-provision",
            Action::RemoveContainer { .. } => "after-remove-container",
            Action::RemoveVolume => "after-remove-volume",
            Action::RevokeTokens { .. } => "after-revoke-tokens",
            Action::RevokeTokenIds { .. } => "after-revoke-token-ids",
            Action::RotateToken { .. } => "after-rotate-token",
            Action::RevokeStaleTokens { .. } => "after-revoke-stale-tokens",
            Action::ReissueToken { .. } => "after-reissue-token",
            Action::Pause { .. } => "after-pause",
            Action::Unpause { .. } => "after-unpause",
            Action::RecordRestart { .. } => "after-record-restart",
            Action::ResetRestarts => "after-reset-restarts",
            Action::Forget => "after-forget",
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
            Action::Provision { revoke } => format!("provision a new incarnation (old tokens revoked: {revoke})"),
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
            Action::Forget => "forget workspace".into(),
        }
    }
}

pub type Rule = fn(&Ctx<'_>) -> Option<Decision>;

/// The rules, in the order they are asked. Earlier rules win: removal before anything,
/// provisioning before drift, token hygiene after the container is right.
pub const RULES: &[(&str, Rule)] = &[
    ("remove", remove::rule),
    ("orphan", orphan::rule),
    ("provision", provision::rule),
    ("stop", pause_resume_stop::stop),
    ("drift", drift::rule),
    ("restart", restart::rule),
    ("pause", pause_resume_stop::pause),
    ("resume", pause_resume_stop::resume),
    ("token-file", token_file::rule),
    ("rotation", rotation::rule),
    ("stale-token-without-container", stale_token_without_container::rule),
    ("heartbeat", heartbeat::rule),
];

/// The first rule with something to do, or None when desired and observed agree.
/// While a needed Secret is unreadable, decisions that would create a container are
/// passed over: it would start without its secrets. Everything else (pause, stop,
/// removal, revoking tokens) still happens.
pub fn plan(ctx: &Ctx<'_>) -> Option<Decision> {
    let held = ctx.desired.is_some_and(|d| d.secrets_hold.is_some());
    RULES.iter().filter_map(|(_, rule)| rule(ctx)).find(|d| !(held && d.creates_container()))
}

#[cfg(test)]
mod tests {
    use super::fixtures::*;
    use super::*;

    #[test]
    fn a_healthy_workspace_needs_nothing() {
        let (obs, s, des) = (healthy(), settings(), desired());
        assert_eq!(plan(&ctx(Some(&des), &obs, &s)), None);
    }

    #[test]
    fn an_unreadable_secret_holds_every_container_creation_but_nothing_else() {
        let s = settings();
        let mut des = desired();
        des.secrets_hold = Some("Secret default/keys not found".into());
        let mut obs = healthy();
        obs.containers = Some(vec![]);
        obs.live_tokens.clear();
        assert_eq!(plan(&ctx(Some(&des), &obs, &s)), None, "no container is created without its secrets");
        // A running container with an old spec keeps running as it is.
        let obs = healthy();
        des.spec_hash = "0000000000000000".into();
        assert_eq!(plan(&ctx(Some(&des), &obs, &s)), None);
        // Pausing and stopping still happen.
        let mut paused = desired_mode(OperatingMode::Paused);
        paused.secrets_hold = des.secrets_hold.clone();
        assert_eq!(plan(&ctx(Some(&paused), &obs, &s)).unwrap().rule, "pause");
    }

    #[test]
    fn removal_wins_over_everything_else() {
        let mut obs = healthy();
        obs.token_file = TokenFile::Missing;
        let s = settings();
        assert_eq!(plan(&ctx(None, &obs, &s)).unwrap().rule, "remove");
    }

    #[test]
    fn the_compose_down_v_incident_is_provisioning_not_a_sweep_later() {
        // Container and volume gone, token rows still live: provisioned at once, with
        // the old tokens revoked as container-missing; no 5-minute wait.
        let mut obs = healthy();
        obs.containers = Some(vec![]);
        let (s, des) = (settings(), desired());
        let d = plan(&ctx(Some(&des), &obs, &s)).unwrap();
        assert_eq!(d.rule, "provision");
        assert_eq!(d.actions, vec![Action::Provision { revoke: RevokeReason::ContainerMissing }]);
    }
}
