//! Sources turn what users declare into `Workspace`/`Team` objects, and the desired
//! store merges them into one resolved view (`DesiredSet`). A source that fails keeps
//! its last good objects: an error never reads as "delete everything".

pub mod desired;
pub mod dir;
pub mod manifest;
pub mod org;
pub mod postgres;

use crate::api::{ObjectKey, SourceRef, Team, Workspace};

/// One object as a source read it, or why it could not be read.
#[derive(Clone, Debug)]
pub enum SourceObject {
    Workspace {
        /// Boxed (as is a Team): both are several times larger than `Invalid`.
        object: Box<Workspace>,
        source: SourceRef,
    },
    Team {
        object: Box<Team>,
        source: SourceRef,
    },
    WarmPool {
        object: Box<crate::api::WarmPool>,
        source: SourceRef,
    },
    /// An object whose kind and name are known but whose body is invalid (unknown
    /// field, bad value): it gets InvalidSpec and nothing is changed for it.
    Invalid {
        kind: String,
        key: ObjectKey,
        source: SourceRef,
        error: String,
    },
}

/// Everything one source declares right now.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    /// e.g. `dir:examples/org`, `postgres`, `kubernetes`.
    pub source: String,
    pub objects: Vec<SourceObject>,
    /// Problems that are not tied to one object (a file that does not parse: its
    /// objects are kept as they were). Each names the file and line.
    pub errors: Vec<String>,
}
