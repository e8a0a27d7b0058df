//! Team status: member counts by phase and a Ready condition, rolled up from the
//! members' last reported phases. Pure; the controller writes it by server-side apply.

use std::collections::{BTreeMap, HashMap};

use chrono::{DateTime, Utc};

use crate::api::condition::carry_transition_times;
use crate::api::{Condition, ConditionStatus, ObjectKey, Phase, TeamStatus};
use crate::source::desired::DesiredSet;

/// The Team a declared workspace belongs to (inline member or by `spec.team`).
pub fn team_of(desired: &DesiredSet, workspace: &ObjectKey) -> Option<ObjectKey> {
    let team = desired.workspaces.get(workspace)?.team()?;
    Some(ObjectKey::new(workspace.namespace.clone(), team))
}

/// The phases of a member that is where it should be.
const SETTLED: [&str; 4] = ["Running", "Paused", "Stopped", "Suspended"];

/// Rolls up the members of `team`: every declared workspace of it, with its last
/// reported phase (Pending until one is reported). Ready when every member has
/// settled as declared (Running, Paused or Stopped) or as the lifecycle autopilot
/// decided (Suspended).
pub fn rollup(
    team: &ObjectKey,
    desired: &DesiredSet,
    phases: &HashMap<ObjectKey, Phase>,
    generation: Option<i64>,
    previous: Option<&TeamStatus>,
    now: DateTime<Utc>,
) -> TeamStatus {
    let mut counts: BTreeMap<String, u32> = BTreeMap::new();
    let mut members = 0u32;
    for key in desired.workspaces.keys().filter(|k| team_of(desired, k).as_ref() == Some(team)) {
        members += 1;
        let phase = phases.get(key).copied().unwrap_or_default();
        *counts.entry(phase.to_string()).or_default() += 1;
    }
    let settled: u32 = SETTLED.iter().filter_map(|p| counts.get(*p)).sum();
    let ready = if members == 0 {
        Condition::new("Ready", ConditionStatus::False, "NoMembers", "the team has no workspaces", now)
    } else if settled == members {
        Condition::new(
            "Ready",
            ConditionStatus::True,
            "AllMembersReady",
            format!("{members} of {members} workspaces ready"),
            now,
        )
    } else {
        let waiting: Vec<String> =
            counts.iter().filter(|(p, _)| !SETTLED.contains(&p.as_str())).map(|(p, n)| format!("{n} {p}")).collect();
        Condition::new(
            "Ready",
            ConditionStatus::False,
            "MembersNotReady",
            format!("{settled} of {members} workspaces ready; {}", waiting.join(", ")),
            now,
        )
    };
    let mut conditions = vec![ready];
    if let Some(p) = previous {
        carry_transition_times(&p.conditions, &mut conditions);
    }
    TeamStatus { members, phases: counts, observed_generation: generation, conditions }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::SourceRef;
    use crate::api::effective::Defaults;
    use crate::api::{Team, Workspace};
    use crate::source::desired::merge;
    use crate::source::{Snapshot, SourceObject};

    fn declared() -> DesiredSet {
        let source = SourceRef { kind: "kubernetes".into(), reference: "x".into() };
        let team: Team = serde_json::from_value(serde_json::json!({
            "apiVersion": "molecule.ai/v1alpha1", "kind": "Team",
            "metadata": {"name": "core", "namespace": "eng"},
            "spec": {"workspaces": [{"name": "a"}, {"name": "b"}]}}))
        .unwrap();
        let ws: Workspace = serde_json::from_value(serde_json::json!({
            "apiVersion": "molecule.ai/v1alpha1", "kind": "Workspace",
            "metadata": {"name": "lead", "namespace": "eng"}, "spec": {"team": "core"}}))
        .unwrap();
        let loner: Workspace = serde_json::from_value(serde_json::json!({
            "apiVersion": "molecule.ai/v1alpha1", "kind": "Workspace",
            "metadata": {"name": "loner", "namespace": "eng"}, "spec": {}}))
        .unwrap();
        let snap = Snapshot {
            source: "kubernetes".into(),
            objects: vec![
                SourceObject::Team { object: Box::new(team), source: source.clone() },
                SourceObject::Workspace { object: Box::new(ws), source: source.clone() },
                SourceObject::Workspace { object: Box::new(loner), source },
            ],
            errors: vec![],
        };
        merge(&[snap], &Defaults::default(), &DesiredSet::default())
    }

    #[test]
    fn members_are_counted_by_phase_and_ready_once_all_have_settled() {
        let set = declared();
        let core = ObjectKey::new("eng", "core");
        assert_eq!(team_of(&set, &ObjectKey::new("eng", "core-a")), Some(core.clone()));
        assert_eq!(team_of(&set, &ObjectKey::new("eng", "loner")), None);
        let t0 = Utc::now();
        let mut phases = HashMap::from([
            (ObjectKey::new("eng", "core-a"), Phase::Running),
            (ObjectKey::new("eng", "lead"), Phase::Provisioning),
        ]);
        let st = rollup(&core, &set, &phases, Some(4), None, t0);
        assert_eq!(st.members, 3);
        assert_eq!(
            st.phases,
            BTreeMap::from([("Running".into(), 1), ("Provisioning".into(), 1), ("Pending".into(), 1)])
        );
        assert_eq!(st.observed_generation, Some(4));
        let ready = &st.conditions[0];
        assert_eq!((ready.status, ready.reason.as_str()), (ConditionStatus::False, "MembersNotReady"));
        assert!(ready.message.starts_with("1 of 3 workspaces ready"), "{}", ready.message);

        phases.insert(ObjectKey::new("eng", "core-b"), Phase::Paused);
        phases.insert(ObjectKey::new("eng", "lead"), Phase::Running);
        let later = t0 + chrono::Duration::seconds(5);
        let st2 = rollup(&core, &set, &phases, Some(4), Some(&st), later);
        assert_eq!(st2.conditions[0].status, ConditionStatus::True);
        assert_eq!(st2.conditions[0].last_transition_time, later);
        let st3 = rollup(&core, &set, &phases, Some(4), Some(&st2), later + chrono::Duration::seconds(5));
        assert_eq!(st3.conditions[0].last_transition_time, later, "unchanged status keeps its transition time");

        // Suspended by the lifecycle autopilot is settled too, and counted.
        phases.insert(ObjectKey::new("eng", "core-b"), Phase::Suspended);
        let st4 = rollup(&core, &set, &phases, Some(4), Some(&st3), later);
        assert_eq!(st4.phases.get("Suspended"), Some(&1));
        assert_eq!(st4.conditions[0].status, ConditionStatus::True, "{:?}", st4.conditions[0]);
    }
}
