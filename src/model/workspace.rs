//! A workspace as the operator has seen it: its stable identity, lifecycle counters,
//! the CLI's overrides and the last status written.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::api::{OperatingMode, WorkspaceStatus};

/// A workspace the operator has seen: its stable identity and lifecycle counters.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct WorkspaceRecord {
    /// UUID (text), given on first sight, never reused.
    pub uid: String,
    /// `namespace/name`.
    pub key: String,
    /// Bumped on every (re)provision.
    pub incarnation: i64,
    pub created_at: DateTime<Utc>,
    pub last_heartbeat_at: Option<DateTime<Utc>>,
    /// Restarts made by the heartbeat rule (the restart budget counts these).
    pub restart_count: i64,
    pub last_restart_at: Option<DateTime<Utc>>,
    pub last_restart_reason: Option<String>,
    /// The last status written (whole).
    pub status: Option<WorkspaceStatus>,
    /// Set by `molecule-operator pause|resume`: overrides the declared operating mode.
    pub mode_override: Option<OperatingMode>,
    /// Set by `molecule-operator restart`: restart if the container started before this.
    pub restart_requested_at: Option<DateTime<Utc>>,
    /// Set when the current incarnation's container is a warm-pool member this
    /// workspace claimed (cleared by the next provision).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub claim: Option<Claim>,
    /// The last wake request (`molecule-operator wake`, the admin API, the annotation,
    /// a peer's discovery): it ends a suspension made before it and counts as activity.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub woken_at: Option<DateTime<Utc>>,
    /// The lifecycle autopilot's bookkeeping (rules::suspend).
    #[serde(default)]
    pub lifecycle: LifecycleState,
}

/// How a claimed pool member counts as this workspace's container: Docker labels
/// cannot change, so the store says which spec hash it stands for (the workspace's
/// own, rendered for the member's uid, at the claim) and since when it is the
/// workspace's (its provisioning time, for liveness).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Claim {
    /// `namespace/name` of the WarmPool.
    pub pool: String,
    pub container_id: String,
    pub spec_hash: String,
    pub at: DateTime<Utc>,
    /// The claim's files (token, identity) may not all be written yet: set with the
    /// claim, cleared once the identity is in the member's `/configs`. A claim left
    /// pending (the operator stopped mid-claim) is carried out again (rules::claim).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub pending: bool,
}

/// Why the autopilot suspended a workspace.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum SuspendCause {
    /// No busy heartbeat and no wake request for `idleAfter`.
    Idle,
    /// Running for `maxLifetime` (paused and suspended time not counted).
    MaxLifetime,
}

impl SuspendCause {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Idle => "Idle",
            Self::MaxLifetime => "MaxLifetime",
        }
    }
}

impl std::fmt::Display for SuspendCause {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A suspension: why, when, and to which mode.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Suspension {
    pub cause: SuspendCause,
    pub at: DateTime<Utc>,
    pub to: OperatingMode,
}

/// What the autopilot keeps per workspace (one JSON column, `workspaces.lifecycle`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LifecycleState {
    /// The last suspension; a wake request after its time ends it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub suspended: Option<Suspension>,
    /// Since when the agent has been running (this stretch); None while it is not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub running_since: Option<DateTime<Utc>>,
    /// Running time of this lifetime before `running_since`, in milliseconds.
    #[serde(default)]
    pub used_ms: i64,
}

impl LifecycleState {
    /// Running time of this lifetime up to `now`.
    pub fn used(&self, now: DateTime<Utc>) -> chrono::Duration {
        let stretch = self.running_since.map(|s| (now - s).max(chrono::Duration::zero())).unwrap_or_default();
        chrono::Duration::milliseconds(self.used_ms) + stretch
    }
}

/// Whether a status shows the workspace's agent online: AgentOnline=True; without
/// that condition, phase Running. Stored beside the status (`agent_online`) so the
/// registry learns it with the token, without reading and decoding the status.
pub fn shows_agent_online(status: &WorkspaceStatus) -> bool {
    match crate::api::condition::find(&status.conditions, "AgentOnline") {
        Some(c) => c.is_true(),
        None => status.phase == crate::api::Phase::Running,
    }
}
