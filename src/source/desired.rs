//! The desired store: merges every source's snapshot into one resolved view.

use std::collections::BTreeMap;

use crate::api::{EffectiveSpec, ObjectKey, SourceRef, Team};

/// One workspace as the operator should make it.
#[derive(Clone, Debug, PartialEq)]
pub struct DesiredWorkspace {
    pub key: ObjectKey,
    /// Bumps whenever the resolved spec changes (in memory; starts at 1).
    pub generation: i64,
    /// Effective spec (own fields, then team defaults, then operator defaults), or every
    /// reason it is invalid.
    pub spec: Result<EffectiveSpec, Vec<String>>,
    pub source: SourceRef,
    /// Set when another source declares the same name: names the losing source.
    pub conflict: Option<String>,
    /// The Team that generated it from `spec.workspaces`, if any.
    pub owner_team: Option<String>,
}

/// Everything declared, merged from all sources.
#[derive(Clone, Debug, Default)]
pub struct DesiredSet {
    pub workspaces: BTreeMap<ObjectKey, DesiredWorkspace>,
    pub teams: BTreeMap<ObjectKey, Team>,
    /// Source-level problems (e.g. a file that does not parse), each naming file and line.
    pub errors: Vec<String>,
    /// False until every source has delivered its first snapshot: nothing is removed
    /// before the operator has seen everything that is declared.
    pub complete: bool,
}
