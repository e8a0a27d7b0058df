//! The kinds this server stores in the state store's `objects` table: the three
//! molecule.ai custom resources and the core/v1 kinds a Pod runtime needs. One
//! descriptor per kind (group, names, scope, subresources); routing, discovery,
//! validation and tables all read it, so a kind is added here and nowhere else.
//! (Events and Leases are served too, but by their own modules: events.rs keeps
//! Events in memory, leases.rs stores Leases without a schema.)

use crate::api::{API_VERSION, GROUP, VERSION};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    Workspace,
    Team,
    WarmPool,
    Pod,
    Secret,
    PersistentVolumeClaim,
    Service,
    Namespace,
    Node,
}

impl Kind {
    pub const ALL: [Kind; 9] = [
        Kind::Workspace,
        Kind::Team,
        Kind::WarmPool,
        Kind::Pod,
        Kind::Secret,
        Kind::PersistentVolumeClaim,
        Kind::Service,
        Kind::Namespace,
        Kind::Node,
    ];
    /// The custom resources (molecule.ai/v1alpha1), validated by their CRD schemas.
    pub const MOLECULE: [Kind; 3] = [Kind::Workspace, Kind::Team, Kind::WarmPool];
    /// The core/v1 kinds, validated by decoding into the k8s-openapi types.
    pub const CORE: [Kind; 6] =
        [Kind::Pod, Kind::Secret, Kind::PersistentVolumeClaim, Kind::Service, Kind::Namespace, Kind::Node];

    pub fn name(self) -> &'static str {
        match self {
            Kind::Workspace => "Workspace",
            Kind::Team => "Team",
            Kind::WarmPool => "WarmPool",
            Kind::Pod => "Pod",
            Kind::Secret => "Secret",
            Kind::PersistentVolumeClaim => "PersistentVolumeClaim",
            Kind::Service => "Service",
            Kind::Namespace => "Namespace",
            Kind::Node => "Node",
        }
    }

    pub fn plural(self) -> &'static str {
        match self {
            Kind::Workspace => "workspaces",
            Kind::Team => "teams",
            Kind::WarmPool => "warmpools",
            Kind::Pod => "pods",
            Kind::Secret => "secrets",
            Kind::PersistentVolumeClaim => "persistentvolumeclaims",
            Kind::Service => "services",
            Kind::Namespace => "namespaces",
            Kind::Node => "nodes",
        }
    }

    pub fn singular(self) -> String {
        self.name().to_lowercase()
    }

    pub fn short_names(self) -> &'static [&'static str] {
        match self {
            Kind::Workspace => &["ws"],
            Kind::Team => &["team"],
            Kind::WarmPool => &["wp"],
            Kind::Pod => &["po"],
            Kind::Secret => &[],
            Kind::PersistentVolumeClaim => &["pvc"],
            Kind::Service => &["svc"],
            Kind::Namespace => &["ns"],
            Kind::Node => &["no"],
        }
    }

    pub fn is_core(self) -> bool {
        !matches!(self, Kind::Workspace | Kind::Team | Kind::WarmPool)
    }

    /// The API group: `molecule.ai`, or "" for core.
    pub fn group(self) -> &'static str {
        if self.is_core() { "" } else { GROUP }
    }

    pub fn version(self) -> &'static str {
        if self.is_core() { "v1" } else { VERSION }
    }

    /// `molecule.ai/v1alpha1` or `v1`.
    pub fn api_version(self) -> &'static str {
        if self.is_core() { "v1" } else { API_VERSION }
    }

    /// Namespaces and Nodes are cluster-scoped (stored with namespace "").
    pub fn namespaced(self) -> bool {
        !matches!(self, Kind::Namespace | Kind::Node)
    }

    /// Whether `/status` is a subresource (a Secret has no status).
    pub fn has_status(self) -> bool {
        !matches!(self, Kind::Secret)
    }

    /// The kind named by a URL's group and plural.
    pub fn from_plural(group: &str, plural: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.group() == group && k.plural() == plural)
    }

    /// The kind an object's (or an ownerReference's) apiVersion and kind name.
    pub fn from_type(api_version: &str, kind: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.api_version() == api_version && k.name() == kind)
    }

    /// `Workspace.molecule.ai`, or `Pod`: how the API server names a kind in messages.
    pub fn qualified(self) -> String {
        if self.is_core() { self.name().to_string() } else { format!("{}.{GROUP}", self.name()) }
    }

    /// The namespace an object of this kind is stored under: "" when cluster-scoped.
    pub fn stored_namespace(self, ns: Option<&str>) -> &str {
        if self.namespaced() { ns.unwrap_or("") } else { "" }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_is_found_by_its_url_and_by_its_type() {
        for kind in Kind::ALL {
            assert_eq!(Kind::from_plural(kind.group(), kind.plural()), Some(kind));
            assert_eq!(Kind::from_type(kind.api_version(), kind.name()), Some(kind));
        }
        assert_eq!(Kind::from_plural("", "workspaces"), None, "custom resources live in their group");
        assert_eq!(Kind::from_type("apps/v1", "Pod"), None);
        assert_eq!(Kind::Pod.qualified(), "Pod");
        assert_eq!(Kind::Workspace.qualified(), "Workspace.molecule.ai");
        assert_eq!(Kind::Node.stored_namespace(Some("default")), "");
    }
}
