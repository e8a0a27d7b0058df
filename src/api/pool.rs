//! The `WarmPool` resource: `size` agents kept running from `template`, with no
//! identity yet, so that a Workspace naming the pool (`spec.warmPool`) starts from one
//! of them instead of a new container. A member is claimed once and never returned:
//! the pool refills with fresh ones.

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::effective::{self, Defaults, EffectiveSpec};
use super::{Condition, OperatingMode, WorkspaceSpec};

/// The most members one pool may keep (each is a running container).
pub const MAX_POOL_SIZE: u32 = 200;

// kube's derive takes one printcolumn attribute per column.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "molecule.ai",
    version = "v1alpha1",
    kind = "WarmPool",
    namespaced,
    status = "WarmPoolStatus",
    shortname = "wp",
    category = "molecule",
    printcolumn(name = "Size", type_ = "integer", json_path = ".spec.size"),
    printcolumn(name = "Ready", type_ = "integer", json_path = ".status.ready"),
    printcolumn(name = "Starting", type_ = "integer", json_path = ".status.starting"),
    printcolumn(name = "Claimed", type_ = "integer", json_path = ".status.claimed"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WarmPoolSpec {
    /// The Workspace spec every member runs (image, tier, resources, env, network).
    /// `team`, `parent`, `warmPool`, `envFrom`, `requiredEnv`, `operatingMode` and
    /// `restartedAt` belong to a workspace, not a pool, and are refused here.
    pub template: WorkspaceSpec,
    /// Unclaimed members to keep running (0..=200).
    #[schemars(range(min = 0, max = 200))]
    pub size: u32,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct WarmPoolStatus {
    #[serde(default)]
    pub size: u32,
    /// Unclaimed members running now.
    #[serde(default)]
    pub ready: u32,
    /// Unclaimed members still being started (a container created, a Pod waiting).
    #[serde(default)]
    pub starting: u32,
    /// Members claimed by workspaces (they run as those workspaces now).
    #[serde(default)]
    pub claimed: u32,
    /// The generation of the WarmPool this status is of (Kubernetes objects only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
}

/// The pool's template resolved like a workspace's spec, or every reason it cannot be,
/// each naming its field (`spec.template.tier: ...`).
pub fn resolve_template(spec: &WarmPoolSpec, defaults: &Defaults) -> Result<EffectiveSpec, Vec<String>> {
    let t = &spec.template;
    let mut errors = Vec::new();
    let refused = [
        ("team", t.team.is_some()),
        ("parent", t.parent.is_some()),
        ("warmPool", t.warm_pool.is_some()),
        ("envFrom", !t.env_from.is_empty()),
        ("requiredEnv", !t.required_env.is_empty()),
        ("operatingMode", t.operating_mode.is_some_and(|m| m != OperatingMode::Running)),
        ("restartedAt", t.restarted_at.is_some()),
    ];
    for (field, set) in refused {
        if set {
            errors.push(format!("spec.template.{field}: belongs to a workspace, not to a pool; remove it"));
        }
    }
    if spec.size > MAX_POOL_SIZE {
        errors.push(format!("spec.size: {} is more than {MAX_POOL_SIZE}", spec.size));
    }
    match effective::resolve(t, defaults) {
        Ok(eff) if errors.is_empty() => Ok(eff),
        Ok(_) => Err(errors),
        Err(more) => {
            errors.extend(more.into_iter().map(|e| format!("spec.template.{e}")));
            Err(errors)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(yaml: &str) -> WarmPoolSpec {
        serde_saphyr::from_str(yaml).unwrap()
    }

    #[test]
    fn a_plain_template_resolves_and_workspace_fields_are_refused_by_name() {
        let ok = resolve_template(&pool("size: 2\ntemplate: {tier: 1, env: {A: x}}\n"), &Defaults::default()).unwrap();
        assert_eq!((ok.tier, ok.env.get("A").map(String::as_str)), (1, Some("x")));
        let errs =
            resolve_template(&pool("size: 2\ntemplate: {team: eng, tier: 7}\n"), &Defaults::default()).unwrap_err();
        assert!(errs.iter().any(|e| e.starts_with("spec.template.team:")), "{errs:?}");
        assert!(errs.iter().any(|e| e.starts_with("spec.template.tier:")), "{errs:?}");
        let errs = resolve_template(&pool("size: 500\ntemplate: {}\n"), &Defaults::default()).unwrap_err();
        assert!(errs[0].starts_with("spec.size:"), "{errs:?}");
    }

    #[test]
    fn unknown_fields_are_refused() {
        assert!(serde_saphyr::from_str::<WarmPoolSpec>("size: 1\ntemplate: {teir: 2}\n").is_err());
        assert!(serde_saphyr::from_str::<WarmPoolSpec>("sise: 1\ntemplate: {}\n").is_err());
    }
}
