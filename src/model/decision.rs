//! The decision log's entries: what a reconcile pass decided for a workspace, and
//! why (`describe` prints them; the Kubernetes runtime turns them into Events).

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// One reconcile decision, kept per workspace for `describe`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DecisionRecord {
    pub at: DateTime<Utc>,
    pub rule: String,
    pub cause: String,
    /// Human-readable actions, e.g. "revoked 1 token: container-missing".
    pub actions: Vec<String>,
    /// "ok" or the error that stopped it.
    pub outcome: String,
}
