//! The resources users declare (`Workspace`, `Team`, group `molecule.ai/v1alpha1`),
//! their status, validation, defaults and tiers. Every source (directory, Postgres,
//! Kubernetes) yields these same types.

pub mod condition;
pub mod duration;
pub mod effective;
pub mod interpolate;
pub mod pool;
pub mod team;
pub mod tiers;
pub mod validate;
pub mod workspace;

pub use condition::{Condition, ConditionStatus};
pub use effective::EffectiveSpec;
pub use pool::{WarmPool, WarmPoolSpec, WarmPoolStatus};
pub use team::{Team, TeamSpec, TeamStatus};
pub use workspace::*;

/// API group and version of every molecule resource.
pub const GROUP: &str = "molecule.ai";
pub const VERSION: &str = "v1alpha1";
pub const API_VERSION: &str = "molecule.ai/v1alpha1";

/// `namespace/name`: how a workspace is addressed everywhere inside the operator
/// (queue keys, store rows, the `ai.molecule.workspace` label).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
pub struct ObjectKey {
    pub namespace: String,
    pub name: String,
}

impl ObjectKey {
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        Self { namespace: namespace.into(), name: name.into() }
    }

    /// Parses `ns/name`; a bare `name` means the `default` namespace.
    pub fn parse(s: &str) -> Self {
        match s.split_once('/') {
            Some((ns, name)) => Self::new(ns, name),
            None => Self::new(DEFAULT_NAMESPACE, s),
        }
    }
}

impl std::fmt::Display for ObjectKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

pub const DEFAULT_NAMESPACE: &str = "default";

/// The Workspace, Team and WarmPool CRDs as multi-document YAML (what `crds` prints and
/// `crds/` holds).
pub fn crds_yaml() -> String {
    use kube::CustomResourceExt;
    let mut out = String::new();
    for crd in [Workspace::crd(), Team::crd(), WarmPool::crd()] {
        out.push_str("---\n");
        out.push_str(&serde_saphyr::to_string(&crd).expect("CRDs serialize"));
    }
    out
}
