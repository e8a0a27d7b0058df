//! The container view: what the rules, the cache and both runtimes say of a workspace's
//! container (a Docker container, or a Kubernetes Pod), the spec one is made from, and
//! the names every runtime keeps to: the labels, where the token lives, the agent's
//! user. Data only, no IO.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};

use crate::api::{ImagePullPolicy, Security};

/// Labels on everything the operator creates. It only ever touches objects that
/// carry its own `INSTANCE` label.
pub mod labels {
    pub const MANAGED: &str = "ai.molecule.managed";
    pub const INSTANCE: &str = "ai.molecule.instance";
    pub const WORKSPACE: &str = "ai.molecule.workspace";
    pub const UID: &str = "ai.molecule.uid";
    pub const INCARNATION: &str = "ai.molecule.incarnation";
    pub const SPEC_HASH: &str = "ai.molecule.spec-hash";
    pub const TEAM: &str = "ai.molecule.team";
    /// When the operator created the container (RFC 3339, ms): restart requests
    /// made after it mean "restart".
    pub const PROVISIONED_AT: &str = "ai.molecule.provisioned-at";
    /// On a warm-pool member: its pool (`namespace/name`). It has no workspace label
    /// until a workspace claims it (then the store says whose it is; Docker labels
    /// cannot change).
    pub const POOL: &str = "ai.molecule.pool";
}

/// Where the token lives inside every workspace container.
pub const CONFIGS_DIR: &str = "/configs";
pub const TOKEN_FILE: &str = ".auth_token";
/// What a claim writes into a pool member's `/configs` after the token (read by the
/// waiting agent; see src/bin/molecule-agent.rs).
pub const IDENTITY_FILE: &str = ".identity";
/// What the operator writes into `/configs` just before it thaws a paused container
/// (the time, so each thaw changes it): an agent that watches the directory hears of
/// the thaw the moment it runs again, however short the freeze was.
pub const THAW_FILE: &str = ".thawed";
/// Mode of the config files (`spec.configFiles`): `${VAR}` may have put secrets in them.
pub const CONFIG_FILE_MODE: u32 = 0o600;
/// The agent runs as this non-root user; it owns the token file (mode 0600).
pub const AGENT_UID: u32 = 65534;
/// Docker's restart policy for workspace containers: an agent that crashes is
/// restarted in place; removals and kills are the operator's to heal.
pub const RESTART_POLICY: &str = "unless-stopped";
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ContainerState {
    Created,
    /// The runtime is still trying to start it (Kubernetes: a Pod waiting for its
    /// volume, its token Secret, its image, or a node): not an interrupted provision;
    /// `ContainerInfo::detail` says what it waits for.
    Waiting,
    Running,
    Paused,
    Restarting,
    Exited,
    Dead,
    Removing,
    #[default]
    Unknown,
}

impl ContainerState {
    pub fn parse(s: &str) -> Self {
        match s {
            "created" => Self::Created,
            "running" => Self::Running,
            "paused" => Self::Paused,
            "restarting" => Self::Restarting,
            "exited" => Self::Exited,
            "dead" => Self::Dead,
            "removing" => Self::Removing,
            _ => Self::Unknown,
        }
    }
}

/// A container (in Kubernetes, a Pod) as observed, with our labels decoded.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ContainerInfo {
    pub id: String,
    pub name: String,
    pub image: String,
    pub state: ContainerState,
    pub labels: BTreeMap<String, String>,
    pub created_at: Option<DateTime<Utc>>,
    /// When it last started (from inspect; None when unknown or never started).
    pub started_at: Option<DateTime<Utc>>,
    /// Why it is in its state, when the runtime says (Kubernetes: `ErrImagePull: ...`,
    /// `Evicted: ...`, the PVC it waits for).
    pub detail: Option<String>,
    /// Where it runs (Kubernetes: the Pod's node).
    pub node: Option<String>,
    /// Times the runtime restarted its process in place (Kubernetes: the container's
    /// restartCount; Docker restarts nothing in place).
    pub restarts: u32,
    /// What it runs with, as read after someone changed it behind the operator's back
    /// (`docker update`, `docker network connect`); None when nothing was changed since
    /// the operator created it.
    pub applied: Option<AppliedConfig>,
}

/// The settings of a running container that can be changed without recreating it, so
/// out of band: compared with what the operator rendered (see rules/out_of_band.rs).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AppliedConfig {
    pub memory_bytes: i64,
    pub nano_cpus: i64,
    pub restart_policy: String,
    /// The networks it is attached to, sorted.
    pub networks: Vec<String>,
}

impl AppliedConfig {
    /// What a container rendered from `spec` runs with when nobody changed it.
    pub fn of(spec: &ContainerSpec) -> Self {
        Self {
            memory_bytes: spec.memory_bytes,
            nano_cpus: spec.nano_cpus,
            restart_policy: RESTART_POLICY.into(),
            networks: vec![spec.network.clone()],
        }
    }
}

impl ContainerInfo {
    pub fn label(&self, key: &str) -> Option<&str> {
        self.labels.get(key).map(String::as_str)
    }
    pub fn workspace(&self) -> Option<&str> {
        self.label(labels::WORKSPACE)
    }
    pub fn uid(&self) -> Option<&str> {
        self.label(labels::UID)
    }
    pub fn incarnation(&self) -> Option<i64> {
        self.label(labels::INCARNATION).and_then(|s| s.parse().ok())
    }
    pub fn spec_hash(&self) -> Option<&str> {
        self.label(labels::SPEC_HASH)
    }
    /// When the operator created it, else Docker's creation time.
    pub fn provisioned_at(&self) -> Option<DateTime<Utc>> {
        self.label(labels::PROVISIONED_AT)
            .and_then(|s| DateTime::parse_from_rfc3339(s).ok())
            .map(|t| t.with_timezone(&Utc))
            .or(self.created_at)
    }
}

/// Everything needed to create one workspace container.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct ContainerSpec {
    pub name: String,
    pub image: String,
    pub image_pull_policy: ImagePullPolicy,
    pub env: BTreeMap<String, String>,
    #[serde(skip)]
    pub labels: BTreeMap<String, String>,
    pub memory_bytes: i64,
    pub nano_cpus: i64,
    pub read_only_root: bool,
    pub tmp_tmpfs_bytes: Option<i64>,
    /// `host` or a bridge network name.
    pub network: String,
    /// Named volume mounted at /configs.
    pub config_volume: String,
    pub security: Security,
    /// Files written into `/configs` (path relative to it -> text) after the container
    /// is created and before it starts. Left out of the hash when empty, so containers
    /// made before this field existed keep their spec hash.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub config_files: BTreeMap<String, String>,
}
