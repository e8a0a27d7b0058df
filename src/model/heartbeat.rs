//! An agent's heartbeat, as the registry accepts it and the stores record it
//! (store::heartbeats explains how they are batched).

use chrono::{DateTime, Utc};

/// One accepted heartbeat: the token it presented, its workspace, when.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Heartbeat {
    pub token_id: String,
    pub workspace_uid: String,
    pub at: DateTime<Utc>,
}
