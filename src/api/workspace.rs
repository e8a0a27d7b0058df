//! The `Workspace` resource: one AI agent in one container, with one live token.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::Condition;

/// What users declare about one workspace. Every field is optional so a Team's
/// `defaults` can fill what a member leaves out; `EffectiveSpec` is the result.
// kube's derive takes one printcolumn attribute per column.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "molecule.ai",
    version = "v1alpha1",
    kind = "Workspace",
    namespaced,
    status = "WorkspaceStatus",
    shortname = "ws",
    category = "molecule",
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase"),
    printcolumn(name = "Team", type_ = "string", json_path = ".spec.team"),
    printcolumn(name = "Incarnation", type_ = "integer", json_path = ".status.incarnation"),
    printcolumn(name = "Ready", type_ = "string", json_path = ".status.conditions[?(@.type==\"Ready\")].status"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WorkspaceSpec {
    /// The Team this workspace belongs to (inherits its defaults, counts against its quotas).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub team: Option<String>,
    /// Org hierarchy: the name of another Workspace in the same namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<String>,
    /// Agent runtime (langgraph, claude-code, ...); picks the image from the operator's image template.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runtime: Option<String>,
    /// Explicit image; wins over `runtime`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_pull_policy: Option<ImagePullPolicy>,
    /// 1..4: resources and isolation (see tiers.rs). Default 2.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 4))]
    pub tier: Option<u8>,
    /// Overrides the tier's memory/CPU.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<Resources>,
    /// Environment variables. Numbers and booleans are accepted and kept as text
    /// (`PORT: 8080` means "8080").
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty", deserialize_with = "env_map")]
    pub env: BTreeMap<String, String>,
    /// Environment variables from Kubernetes Secrets (Kubernetes mode): every key of
    /// each named Secret in the workspace's namespace becomes a variable, a later
    /// entry winning over an earlier one and over `env`. Secrets set with
    /// `molecule-operator secret set` win over these. Until a Secret that is not
    /// `optional` can be read, no container is created or recreated for the workspace
    /// (a running one is left as it is) and status shows `SecretsReady=False`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub env_from: Vec<EnvFromSource>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub operating_mode: Option<OperatingMode>,
    /// Set or bump to restart (like `kubectl rollout restart`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restarted_at: Option<DateTime<Utc>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub update_policy: Option<UpdatePolicy>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_policy: Option<TokenPolicy>,
    /// Privileges are never implied by a tier; each must be asked for here and
    /// is refused unless the operator runs with `--allow-privileged`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub security: Option<Security>,
    /// A Docker network name; default: the operator's (its own bridge network unless it
    /// runs with `--network`). `host` or `container:NAME` is refused unless it is the
    /// operator's own choice or it runs with `--allow-privileged`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<String>,
    /// Files written into the config volume (`/configs/PATH`) before the agent starts:
    /// relative paths (subdirectories allowed) to UTF-8 text. A change is spec drift and
    /// follows `updatePolicy`. `${VAR}` in a file expands from the workspace's secrets.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub config_files: BTreeMap<String, String>,
    /// Variables that must be set (in `env` or as secrets) before a container is made:
    /// until they are, the workspace is held with `SecretsReady=False` naming them.
    /// `A|B` is satisfied by either.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub required_env: Vec<String>,
    /// What to do about an agent that is online but reports itself unwell.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health_policy: Option<HealthPolicy>,
    /// Start from a member of this WarmPool (same namespace) when the pool's template
    /// satisfies this spec: no container is created on that path. Otherwise a normal
    /// provision, with the reason in the decision log.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub warm_pool: Option<String>,
    /// Suspend an idle agent or one past its lifetime, and wake it on demand.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lifecycle: Option<Lifecycle>,
    /// Secret values a source read alongside the declaration (an org template's `.env`
    /// files): merged into the env like the workspace's own secrets, and never
    /// serialized (not shown, not stored, not sent).
    #[serde(skip)]
    #[schemars(skip)]
    pub source_secrets: BTreeMap<String, String>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum ImagePullPolicy {
    Always,
    #[default]
    IfNotPresent,
    Never,
}

/// One `envFrom` entry, shaped like a Pod's.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EnvFromSource {
    pub secret_ref: SecretEnvSource,
    /// Put before every key of the Secret (e.g. `OPENAI_`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix: Option<String>,
}

/// A Secret in the workspace's namespace.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SecretEnvSource {
    pub name: String,
    /// A missing optional Secret adds nothing instead of holding the workspace.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub optional: bool,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum OperatingMode {
    #[default]
    Running,
    /// Frozen with the cgroup freezer (`docker pause`): memory kept.
    Paused,
    /// No container; the config volume is kept.
    Stopped,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum UpdatePolicy {
    /// Spec drift recreates the container at once.
    #[default]
    Immediate,
    /// Drift waits (SpecDrift=True) and applies at the next stop or restart.
    OnNextStop,
    /// Drift waits for `molecule-operator restart`.
    Manual,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Resources {
    /// e.g. `512Mi`, `2Gi`, `1G`, `268435456`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<String>,
    /// e.g. `0.5`, `2`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpus: Option<f64>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Security {
    #[serde(default)]
    pub privileged: bool,
    #[serde(default)]
    pub host_pid: bool,
    #[serde(default)]
    pub docker_socket: bool,
}

impl Security {
    pub fn any(&self) -> bool {
        self.privileged || self.host_pid || self.docker_socket
    }
}

/// What resuming a paused workspace does to its token.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum OnResume {
    /// The token it had keeps working (or, after onPause: Revoke, a new one is written).
    #[default]
    Keep,
    /// A new token is written into the container as it thaws; the old one is revoked.
    Reissue,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum OnPause {
    #[default]
    Keep,
    Revoke,
}

/// Beyond the original platform: an agent whose runtime keeps reporting
/// `runtime_state: wedged` is restarted (new container, new token) once it has been
/// wedged this long, within the same restart budget and backoff as a silent agent
/// (`--restart-budget`, `--restart-backoff-seconds`). Unset: a wedged agent is only
/// shown as Degraded, as the original did.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HealthPolicy {
    /// How long an agent may report itself wedged before it is restarted, e.g. `5m`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restart_wedged_after: Option<String>,
}

/// The lifecycle autopilot: suspend a workspace whose agent has been idle for
/// `idleAfter`, or that has run for `maxLifetime`, and wake it when asked
/// (`molecule-operator wake`, `POST /api/v1/workspaces/{namespace}/{name}/wake`, the
/// `molecule.ai/wake` annotation). An agent reporting `active_tasks > 0` is never
/// suspended. Everything is off unless a duration is set.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Lifecycle {
    /// Suspend once no heartbeat with `active_tasks > 0` and no wake request has been
    /// seen for this long, e.g. `15m`. At least twice the heartbeat interval.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle_after: Option<String>,
    /// What a suspension does: `Paused` (frozen, memory kept; the default) or `Stopped`
    /// (no container, volume kept). Where there is no freezer (Pods) both stop.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub suspend_to: Option<SuspendTo>,
    /// Suspend after this much wall time Running (paused or suspended time does not
    /// count), e.g. `8h`. A wake after such a suspension starts a new lifetime.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_lifetime: Option<String>,
    /// `OnDemand` (default): a peer's discovery of the suspended workspace wakes it too.
    /// `Manual`: only explicit wakes (CLI, admin API, annotation, `resume`) do.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wake: Option<WakePolicy>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum SuspendTo {
    #[default]
    Paused,
    Stopped,
}

impl SuspendTo {
    pub fn mode(self) -> OperatingMode {
        match self {
            Self::Paused => OperatingMode::Paused,
            Self::Stopped => OperatingMode::Stopped,
        }
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum WakePolicy {
    #[default]
    OnDemand,
    Manual,
}

/// Durations are strings like `5m`, `60s`, `1h 30m`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TokenPolicy {
    /// How long a live token may go unused with no container before it is revoked (default 5m).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stale_grace: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_pause: Option<OnPause>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_resume: Option<OnResume>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rotate_every: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_age: Option<String>,
    /// How long the old token stays valid after a live rotation (default 60s).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub overlap: Option<String>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
pub enum Phase {
    #[default]
    Pending,
    Provisioning,
    Running,
    Degraded,
    Paused,
    Stopped,
    /// Suspended by the lifecycle autopilot (idle, or past its lifetime); a wake resumes it.
    Suspended,
    Failed,
    Terminating,
}

/// Every phase, in lifecycle order (tables and gauges list each, 0 when empty).
pub const ALL_PHASES: [Phase; 9] = [
    Phase::Pending,
    Phase::Provisioning,
    Phase::Running,
    Phase::Degraded,
    Phase::Paused,
    Phase::Stopped,
    Phase::Suspended,
    Phase::Failed,
    Phase::Terminating,
];

impl std::fmt::Display for Phase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(self, f)
    }
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct WorkspaceStatus {
    #[serde(default)]
    pub phase: Phase,
    /// The workspace's stable identity (UUID), given on first sight.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Bumps on every (re)provision; stamped on the container and its token.
    #[serde(default)]
    pub incarnation: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container: Option<ContainerStatus>,
    /// With the Kubernetes runtime: the workspace's Pod (`container` is the same Pod:
    /// its uid and name).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<PodStatus>,
    /// Never the token itself: its 8-character prefix and times.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<TokenStatus>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_heartbeat_at: Option<DateTime<Utc>>,
    #[serde(default)]
    pub restart_count: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_restart_reason: Option<String>,
    /// What the agent of the current incarnation last reported to the registry.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent: Option<AgentStatus>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<SourceRef>,
    /// The spec hash waiting to be applied (SpecDrift) and the one running.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pending_hash: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub applied_hash: Option<String>,
    /// One per type (a list-map keyed by `type`, as Kubernetes conditions are).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ContainerStatus {
    pub id: String,
    pub name: String,
    #[serde(default)]
    pub spec_hash: String,
    #[serde(default)]
    pub image: String,
}

/// What a workspace's agent reports about itself (register and heartbeat, in the
/// original platform's fields); uptime and spend, which move on every beat, are left out.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AgentStatus {
    /// Where the agent takes messages (push mode).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// `push` or `poll`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delivery_mode: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current_task: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub active_tasks: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_rate: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sample_error: Option<String>,
    /// `wedged` when the runtime says so.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runtime_state: Option<String>,
}

/// Where a workspace's Pod runs, and how often its agent was restarted in place.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PodStatus {
    pub name: String,
    /// The node it is scheduled on (none before it is scheduled).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// The agent container's restartCount: restarts by the kubelet, in place.
    #[serde(default)]
    pub restarts: u32,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TokenStatus {
    pub prefix: String,
    pub issued_at: DateTime<Utc>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_used_at: Option<DateTime<Utc>>,
}

/// Where a desired object came from, and which version of it is reflected.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SourceRef {
    /// `dir`, `postgres`, `kubernetes`.
    pub kind: String,
    /// e.g. `org/eng.yaml@<git commit or mtime>`.
    #[serde(rename = "ref")]
    pub reference: String,
}

/// Reads an env map whose values may be YAML/JSON scalars of any kind, as text.
fn env_map<'de, D: serde::Deserializer<'de>>(d: D) -> Result<BTreeMap<String, String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Scalar {
        S(String),
        I(i64),
        F(f64),
        B(bool),
    }
    let raw = BTreeMap::<String, Scalar>::deserialize(d)?;
    Ok(raw
        .into_iter()
        .map(|(k, v)| {
            let v = match v {
                Scalar::S(s) => s,
                Scalar::I(i) => i.to_string(),
                Scalar::F(f) => f.to_string(),
                Scalar::B(b) => b.to_string(),
            };
            (k, v)
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_values_may_be_numbers_or_booleans_from_json_and_yaml() {
        let v = serde_json::json!({"env": {"PORT": 8080, "DEBUG": true, "NAME": "x"}});
        let spec: WorkspaceSpec = serde_json::from_value(v).unwrap();
        assert_eq!(spec.env["PORT"], "8080");
        assert_eq!(spec.env["DEBUG"], "true");
        let spec: WorkspaceSpec = serde_saphyr::from_str("env:\n  PORT: 8080\n").unwrap();
        assert_eq!(spec.env["PORT"], "8080");
    }
}
