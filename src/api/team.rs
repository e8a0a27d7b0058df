//! The `Team` resource: owns workspaces (inline members or by `spec.team`),
//! gives them defaults, pauses or stops them together, and caps their number.

use std::collections::BTreeMap;

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::{Condition, OperatingMode, WorkspaceSpec};

// kube's derive takes one printcolumn attribute per column.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "molecule.ai",
    version = "v1alpha1",
    kind = "Team",
    namespaced,
    status = "TeamStatus",
    shortname = "team",
    category = "molecule",
    printcolumn(name = "Members", type_ = "integer", json_path = ".status.members"),
    printcolumn(name = "Running", type_ = "integer", json_path = ".status.phases.Running"),
    printcolumn(name = "Ready", type_ = "string", json_path = ".status.conditions[?(@.type==\"Ready\")].status"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TeamSpec {
    /// Inline members, expanded into Workspaces named `<team>-<name>`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub workspaces: Vec<TeamMember>,
    /// Fields every member inherits unless it sets its own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub defaults: Option<WorkspaceSpec>,
    /// Paused or Stopped applies to every member; Running restores each member's own mode.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub operating_mode: Option<OperatingMode>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_workspaces: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_running: Option<u32>,
}

/// A member template: a Workspace spec plus its `name`. serde cannot combine
/// `flatten` with `deny_unknown_fields`, so it is read by hand: `name` is taken
/// out and the rest must be a valid `WorkspaceSpec` (unknown fields rejected).
#[derive(Clone, Debug, Default, PartialEq, Serialize, JsonSchema)]
pub struct TeamMember {
    pub name: String,
    #[serde(flatten)]
    pub spec: WorkspaceSpec,
}

impl<'de> Deserialize<'de> for TeamMember {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        let mut map = serde_json::Map::<String, serde_json::Value>::deserialize(d)?;
        let name = match map.remove("name") {
            Some(serde_json::Value::String(n)) => n,
            Some(_) => return Err(D::Error::custom("member `name` must be a string")),
            None => return Err(D::Error::missing_field("name")),
        };
        let spec = WorkspaceSpec::deserialize(serde_json::Value::Object(map))
            .map_err(|e| D::Error::custom(format!("member `{name}`: {e}")))?;
        Ok(Self { name, spec })
    }
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TeamStatus {
    #[serde(default)]
    pub members: u32,
    /// Member count by phase, e.g. {Running: 5, Paused: 1}.
    #[serde(default)]
    pub phases: BTreeMap<String, u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// One per type (a list-map keyed by `type`, as Kubernetes conditions are).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
}
