//! Builders for tests that drive the registry in-process.

use molecule::api::{Condition, ConditionStatus, Phase, WorkspaceStatus};
use molecule::source::desired::{DesiredSet, DesiredWorkspace};

/// A complete desired set of `workspaces`.
pub fn desired_set(workspaces: impl IntoIterator<Item = DesiredWorkspace>) -> DesiredSet {
    DesiredSet {
        workspaces: workspaces.into_iter().map(|w| (w.key.clone(), w)).collect(),
        complete: true,
        ..Default::default()
    }
}

/// A status that shows incarnation 1 running with its agent online.
pub fn online_status() -> WorkspaceStatus {
    WorkspaceStatus {
        phase: Phase::Running,
        incarnation: 1,
        conditions: vec![Condition::new("AgentOnline", ConditionStatus::True, "Heartbeating", "", chrono::Utc::now())],
        ..Default::default()
    }
}
