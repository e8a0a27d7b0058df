//! Kubernetes-style conditions, recomputed every pass; `lastTransitionTime` only
//! moves when the status actually changes.

use chrono::{DateTime, Utc};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum ConditionStatus {
    True,
    False,
    Unknown,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    /// Ready, ContainerRunning, TokenValid, AgentOnline, SpecDrift, SourceConflict, InvalidSpec, ...
    #[serde(rename = "type")]
    pub type_: String,
    pub status: ConditionStatus,
    /// One CamelCase word a program can match on.
    pub reason: String,
    /// A sentence for people: what is wrong and what to do.
    #[serde(default)]
    pub message: String,
    pub last_transition_time: DateTime<Utc>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

impl Condition {
    pub fn new(
        type_: &str,
        status: ConditionStatus,
        reason: &str,
        message: impl Into<String>,
        now: DateTime<Utc>,
    ) -> Self {
        Self {
            type_: type_.to_string(),
            status,
            reason: reason.to_string(),
            message: message.into(),
            last_transition_time: now,
            observed_generation: None,
        }
    }

    pub fn is_true(&self) -> bool {
        self.status == ConditionStatus::True
    }
}

/// Merges freshly computed conditions with the previous ones, keeping each
/// condition's `lastTransitionTime` when its status did not change.
pub fn carry_transition_times(previous: &[Condition], next: &mut [Condition]) {
    for c in next.iter_mut() {
        if let Some(p) = previous.iter().find(|p| p.type_ == c.type_)
            && p.status == c.status
        {
            c.last_transition_time = p.last_transition_time;
        }
    }
}

pub fn find<'a>(conditions: &'a [Condition], type_: &str) -> Option<&'a Condition> {
    conditions.iter().find(|c| c.type_ == type_)
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    #[test]
    fn transition_time_kept_when_status_unchanged_and_moved_when_changed() {
        let t0 = Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).unwrap();
        let t1 = Utc.with_ymd_and_hms(2026, 1, 1, 0, 5, 0).unwrap();
        let prev = vec![
            Condition::new("Ready", ConditionStatus::True, "Running", "", t0),
            Condition::new("TokenValid", ConditionStatus::True, "Live", "", t0),
        ];
        let mut next = vec![
            Condition::new("Ready", ConditionStatus::True, "Running", "", t1),
            Condition::new("TokenValid", ConditionStatus::False, "Revoked", "", t1),
        ];
        carry_transition_times(&prev, &mut next);
        assert_eq!(next[0].last_transition_time, t0);
        assert_eq!(next[1].last_transition_time, t1);
    }
}
