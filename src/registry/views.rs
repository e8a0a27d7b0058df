//! What the admin API returns and the CLI reads back: a workspace as the user sees
//! it, merged from what is declared (`DesiredSet`) and what the store knows
//! (`WorkspaceRecord`, whose status the reconciler writes whole). Building these is
//! pure, so it is tested without a server.

use std::collections::{BTreeMap, BTreeSet};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::api::condition::find;
use crate::api::{
    ALL_PHASES, Condition, ConditionStatus, ContainerStatus, EffectiveSpec, ObjectKey, OperatingMode, Phase, SourceRef,
    TokenStatus,
};
use crate::model::{DecisionRecord, TokenRow, WorkspaceRecord};
use crate::source::desired::{DesiredSet, DesiredWorkspace};

pub const INVALID_SPEC: &str = "InvalidSpec";
pub const SOURCE_CONFLICT: &str = "SourceConflict";

/// One workspace, as `get workspaces` shows it. Every field is always present in
/// JSON (null when unknown), so scripts can rely on the shape.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WorkspaceSummary {
    pub name: String,
    pub namespace: String,
    #[serde(default)]
    pub team: Option<String>,
    /// The workspace it reports to (`spec.parent`, same namespace): the org tree.
    #[serde(default)]
    pub parent: Option<String>,
    /// Null until the operator has first seen the workspace.
    #[serde(default)]
    pub uid: Option<String>,
    #[serde(default)]
    pub phase: Phase,
    #[serde(default)]
    pub incarnation: i64,
    #[serde(default)]
    pub container: Option<ContainerStatus>,
    /// The workspace's Pod, with the Kubernetes runtime.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<crate::api::PodStatus>,
    /// Prefix and times only, never the token.
    #[serde(default)]
    pub token: Option<TokenStatus>,
    #[serde(default)]
    pub last_heartbeat_at: Option<DateTime<Utc>>,
    #[serde(default)]
    pub restart_count: i64,
    #[serde(default)]
    pub last_restart_reason: Option<String>,
    /// What the agent reports (current task, error rate, sample error...), as the
    /// status last showed it; null when it reported nothing.
    #[serde(default)]
    pub agent: Option<crate::api::AgentStatus>,
    #[serde(default)]
    pub source: Option<SourceRef>,
    #[serde(default)]
    pub conditions: Vec<Condition>,
    #[serde(default)]
    pub created_at: Option<DateTime<Utc>>,
    /// False when no source declares it any more (it is being removed).
    #[serde(default)]
    pub declared: bool,
    /// Set by `molecule-operator pause|resume`: wins over the declared operating mode.
    #[serde(default)]
    pub mode_override: Option<OperatingMode>,
    /// CPU and memory of its container as last sampled (in memory, observe/usage.rs);
    /// null when it has no running container or the runtime reports no usage.
    #[serde(default)]
    pub usage: Option<crate::model::usage::Usage>,
}

impl WorkspaceSummary {
    pub fn key(&self) -> ObjectKey {
        ObjectKey::new(&self.namespace, &self.name)
    }
}

/// `describe workspace`: the summary plus the effective spec, token history and
/// the last decisions.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WorkspaceDetail {
    #[serde(flatten)]
    pub summary: WorkspaceSummary,
    /// In-memory generation of the declared spec (bumps when it changes).
    #[serde(default)]
    pub generation: Option<i64>,
    /// The effective spec; null when the declaration is invalid (see `specErrors`).
    #[serde(default)]
    /// The effective spec (own fields, then team defaults, then operator defaults).
    pub spec: Option<EffectiveSpec>,
    #[serde(default)]
    pub spec_errors: Vec<String>,
    #[serde(default)]
    pub restart_requested_at: Option<DateTime<Utc>>,
    /// Newest first.
    #[serde(default)]
    pub tokens: Vec<TokenView>,
    /// Newest first.
    #[serde(default)]
    pub decisions: Vec<DecisionRecord>,
}

/// One token row without its hash.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TokenView {
    pub prefix: String,
    pub incarnation: i64,
    pub issued_at: DateTime<Utc>,
    #[serde(default)]
    pub last_used_at: Option<DateTime<Utc>>,
    #[serde(default)]
    pub revoked_at: Option<DateTime<Utc>>,
    #[serde(default)]
    pub revoke_reason: Option<String>,
}

impl From<&TokenRow> for TokenView {
    fn from(t: &TokenRow) -> Self {
        Self {
            prefix: t.prefix.clone(),
            incarnation: t.incarnation,
            issued_at: t.created_at,
            last_used_at: t.last_used_at,
            revoked_at: t.revoked_at,
            revoke_reason: t.revoke_reason.clone(),
        }
    }
}

/// One team, as `get teams` shows it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TeamSummary {
    pub name: String,
    pub namespace: String,
    pub members: u32,
    /// Member count by phase; every phase is present (0 when empty).
    #[serde(default)]
    pub phases: BTreeMap<String, u32>,
    #[serde(default)]
    pub operating_mode: Option<OperatingMode>,
    #[serde(default)]
    pub max_workspaces: Option<u32>,
    #[serde(default)]
    pub max_running: Option<u32>,
    /// False for a team that workspaces name in `spec.team` but no Team object declares.
    #[serde(default)]
    pub declared: bool,
    /// Ready: every member has settled (Running, Paused or Stopped), with the counts.
    #[serde(default)]
    pub conditions: Vec<Condition>,
}

impl TeamSummary {
    pub fn count(&self, phase: Phase) -> u32 {
        self.phases.get(&phase.to_string()).copied().unwrap_or(0)
    }
}

/// Answer to restart/pause/resume.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ActionResponse {
    /// `namespace/name`.
    pub workspace: String,
    pub action: String,
    pub message: String,
}

/// Every error the API returns.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: String,
}

/// Merges one workspace's declaration and record. Either may be missing (declared but
/// not seen yet; seen but declared no more), not both.
///
/// The reconciler's status wins for everything it reports; what it has not written
/// yet is filled from the declaration: no status means `Pending`, or `Failed` when the
/// spec is invalid, and InvalidSpec/SourceConflict conditions are added when the
/// declaration has them but the status does not (yet).
pub fn summary(
    key: &ObjectKey,
    declared: Option<&DesiredWorkspace>,
    record: Option<&WorkspaceRecord>,
    now: DateTime<Utc>,
) -> WorkspaceSummary {
    let status = record.and_then(|r| r.status.as_ref());
    let mut conditions = status.map(|s| s.conditions.clone()).unwrap_or_default();
    let mut phase = status.map(|s| s.phase).unwrap_or_default();
    let team = declared.and_then(|d| d.team().map(str::to_string));
    let parent = declared.and_then(|d| d.spec.as_ref().ok()).and_then(|s| s.parent.clone());
    if let Some(d) = declared {
        if let Err(errors) = &d.spec {
            if status.is_none() {
                phase = Phase::Failed;
            }
            if !find(&conditions, INVALID_SPEC).is_some_and(Condition::is_true) {
                conditions.retain(|c| c.type_ != INVALID_SPEC);
                conditions.push(invalid_spec_condition(key, errors, now));
            }
        }
        if let Some(other) = &d.conflict
            && !find(&conditions, SOURCE_CONFLICT).is_some_and(Condition::is_true)
        {
            conditions.retain(|c| c.type_ != SOURCE_CONFLICT);
            conditions.push(Condition::new(
                SOURCE_CONFLICT,
                ConditionStatus::True,
                "DeclaredTwice",
                format!("{key} is also declared by {other}; the first-listed source wins"),
                now,
            ));
        }
    }
    WorkspaceSummary {
        name: key.name.clone(),
        namespace: key.namespace.clone(),
        team,
        parent,
        uid: record.map(|r| r.uid.clone()).or_else(|| status.and_then(|s| s.uid.clone())),
        phase,
        incarnation: status.map(|s| s.incarnation).or(record.map(|r| r.incarnation)).unwrap_or(0),
        container: status.and_then(|s| s.container.clone()),
        pod: status.and_then(|s| s.pod.clone()),
        token: status.and_then(|s| s.token.clone()),
        // The heartbeat path updates the record live; the status copy lags a reconcile.
        last_heartbeat_at: record.and_then(|r| r.last_heartbeat_at).or(status.and_then(|s| s.last_heartbeat_at)),
        // Count and reason from one place, the record when there is one (it is written
        // as the restart happens), so the two never disagree while the status lags.
        restart_count: record.map(|r| r.restart_count).or(status.map(|s| s.restart_count)).unwrap_or(0),
        last_restart_reason: match record {
            Some(r) => r.last_restart_reason.clone(),
            None => status.and_then(|s| s.last_restart_reason.clone()),
        },
        agent: status.and_then(|s| s.agent.clone()),
        source: declared.map(|d| (*d.source).clone()).or_else(|| status.and_then(|s| s.source.clone())),
        conditions,
        created_at: record.map(|r| r.created_at),
        declared: declared.is_some(),
        mode_override: record.and_then(|r| r.mode_override),
        usage: None,
    }
}

/// Fills in each summary's usage from the sampler's book.
pub fn with_usage(
    mut workspaces: Vec<WorkspaceSummary>,
    book: &crate::observe::usage::UsageBook,
) -> Vec<WorkspaceSummary> {
    let all = book.all();
    for w in &mut workspaces {
        w.usage = all.get(&w.key().to_string()).cloned();
    }
    workspaces
}

/// The InvalidSpec condition for a declaration that does not resolve, listing every error.
pub fn invalid_spec_condition(key: &ObjectKey, errors: &[String], now: DateTime<Utc>) -> Condition {
    Condition::new(
        INVALID_SPEC,
        ConditionStatus::True,
        "ValidationFailed",
        format!("{key} is invalid, nothing is changed for it until it is fixed: {}", errors.join("; ")),
        now,
    )
}

/// Every declared workspace and every workspace the store knows, sorted by key.
pub fn summaries(desired: &DesiredSet, records: &[WorkspaceRecord], now: DateTime<Utc>) -> Vec<WorkspaceSummary> {
    let by_key: BTreeMap<ObjectKey, &WorkspaceRecord> = records.iter().map(|r| (ObjectKey::parse(&r.key), r)).collect();
    let keys: BTreeSet<&ObjectKey> = desired.workspaces.keys().chain(by_key.keys()).collect();
    keys.into_iter().map(|k| summary(k, desired.workspaces.get(k), by_key.get(k).copied(), now)).collect()
}

/// The detail view of one workspace.
pub fn detail(
    summary: WorkspaceSummary,
    declared: Option<&DesiredWorkspace>,
    record: Option<&WorkspaceRecord>,
    tokens: &[TokenRow],
    decisions: Vec<DecisionRecord>,
) -> WorkspaceDetail {
    let (spec, spec_errors) = match declared.map(|d| &d.spec) {
        Some(Ok(e)) => (Some(e.clone()), Vec::new()),
        Some(Err(errors)) => (None, errors.clone()),
        None => (None, Vec::new()),
    };
    WorkspaceDetail {
        summary,
        generation: declared.map(|d| d.generation),
        spec,
        spec_errors,
        restart_requested_at: record.and_then(|r| r.restart_requested_at),
        tokens: tokens.iter().map(TokenView::from).collect(),
        decisions,
    }
}

/// Teams: every declared Team, plus every team name a workspace refers to without a
/// Team object; members counted by the phase of their summary.
pub fn teams(desired: &DesiredSet, workspaces: &[WorkspaceSummary]) -> Vec<TeamSummary> {
    let mut out: BTreeMap<ObjectKey, TeamSummary> = BTreeMap::new();
    let empty = |key: &ObjectKey| TeamSummary {
        name: key.name.clone(),
        namespace: key.namespace.clone(),
        members: 0,
        phases: ALL_PHASES.iter().map(|p| (p.to_string(), 0)).collect(),
        operating_mode: None,
        max_workspaces: None,
        max_running: None,
        declared: false,
        conditions: Vec::new(),
    };
    for (key, team) in &desired.teams {
        let mut t = empty(key);
        t.operating_mode = team.spec.operating_mode;
        t.max_workspaces = team.spec.max_workspaces;
        t.max_running = team.spec.max_running;
        t.declared = true;
        out.insert(key.clone(), t);
    }
    for w in workspaces {
        let Some(team) = &w.team else { continue };
        let key = ObjectKey::new(&w.namespace, team);
        let t = out.entry(key.clone()).or_insert_with(|| empty(&key));
        t.members += 1;
        *t.phases.entry(w.phase.to_string()).or_default() += 1;
    }
    // Ready is the same rollup the cluster controller writes into Team status.
    let now = Utc::now();
    let phases: std::collections::HashMap<ObjectKey, Phase> = workspaces.iter().map(|w| (w.key(), w.phase)).collect();
    for (key, t) in out.iter_mut() {
        t.conditions = crate::status::team::rollup(key, desired, &phases, None, None, now).conditions;
    }
    out.into_values().collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::effective::{Defaults, resolve};
    use crate::api::{Team, TeamSpec, WorkspaceSpec, WorkspaceStatus};
    use chrono::TimeZone;

    fn now() -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 3, 1, 12, 0, 0).unwrap()
    }

    fn declared(name: &str, team: Option<&str>) -> DesiredWorkspace {
        let spec = WorkspaceSpec { team: team.map(Into::into), ..Default::default() };
        DesiredWorkspace {
            key: ObjectKey::new("default", name),
            generation: 1,
            spec: resolve(&spec, &Defaults::default()),
            source: SourceRef { kind: "dir".into(), reference: format!("{name}.yaml") }.into(),
            conflict: None,
            owner_team: None,
            deletion_refused: None,
        }
    }

    fn record(name: &str, phase: Phase) -> WorkspaceRecord {
        WorkspaceRecord {
            uid: format!("uid-{name}"),
            key: format!("default/{name}"),
            incarnation: 2,
            created_at: now(),
            last_heartbeat_at: Some(now()),
            restart_count: 0,
            last_restart_at: None,
            last_restart_reason: None,
            status: Some(WorkspaceStatus { phase, incarnation: 2, ..Default::default() }),
            mode_override: None,
            restart_requested_at: None,
            claim: None,
            woken_at: None,
            lifecycle: Default::default(),
        }
    }

    #[test]
    fn declared_without_record_is_pending_and_invalid_is_failed() {
        let mut set = DesiredSet::default();
        set.workspaces.insert(ObjectKey::new("default", "a"), declared("a", Some("eng")));
        let mut bad = declared("b", None);
        bad.spec = Err(vec!["tier: 9 is out of range; use 1, 2, 3 or 4".into()]);
        set.workspaces.insert(ObjectKey::new("default", "b"), bad);
        let out = summaries(&set, &[record("gone", Phase::Terminating)], now());
        let names: Vec<_> = out.iter().map(|w| w.name.as_str()).collect();
        assert_eq!(names, ["a", "b", "gone"]);
        assert_eq!(out[0].phase, Phase::Pending);
        assert_eq!(out[0].uid, None);
        assert_eq!(out[0].team.as_deref(), Some("eng"));
        assert_eq!(out[1].phase, Phase::Failed);
        let c = find(&out[1].conditions, INVALID_SPEC).expect("InvalidSpec condition");
        assert!(c.is_true() && c.message.contains("tier: 9"), "{c:?}");
        assert!(!out[2].declared);
        assert_eq!(out[2].uid.as_deref(), Some("uid-gone"));
        assert_eq!(out[2].incarnation, 2);
    }

    #[test]
    fn record_heartbeat_wins_over_status_copy() {
        let mut r = record("a", Phase::Running);
        r.status.as_mut().unwrap().last_heartbeat_at = Some(now() - chrono::Duration::seconds(60));
        let s = summary(&ObjectKey::new("default", "a"), Some(&declared("a", None)), Some(&r), now());
        assert_eq!(s.last_heartbeat_at, Some(now()));
        assert_eq!(s.phase, Phase::Running);
    }

    #[test]
    fn json_has_every_contract_field_even_when_unknown() {
        let s = summary(&ObjectKey::new("default", "a"), Some(&declared("a", None)), None, now());
        let v = serde_json::to_value(&s).unwrap();
        for k in ["name", "uid", "phase", "incarnation", "container", "token", "lastHeartbeatAt", "conditions", "usage"]
        {
            assert!(v.get(k).is_some(), "missing {k} in {v}");
        }
        let back: WorkspaceSummary = serde_json::from_value(v).unwrap();
        assert_eq!(back, s);
    }

    #[test]
    fn teams_count_members_by_phase() {
        let mut set = DesiredSet::default();
        set.teams.insert(
            ObjectKey::new("default", "eng"),
            Team::new("eng", TeamSpec { max_running: Some(3), ..Default::default() }),
        );
        set.workspaces.insert(ObjectKey::new("default", "a"), declared("a", Some("eng")));
        set.workspaces.insert(ObjectKey::new("default", "b"), declared("b", Some("eng")));
        set.workspaces.insert(ObjectKey::new("default", "c"), declared("c", Some("ops")));
        let ws = summaries(&set, &[record("a", Phase::Running)], now());
        let t = teams(&set, &ws);
        assert_eq!(t.len(), 2);
        assert_eq!((t[0].name.as_str(), t[0].members, t[0].declared), ("eng", 2, true));
        assert_eq!(t[0].count(Phase::Running), 1);
        assert_eq!(t[0].count(Phase::Pending), 1);
        assert_eq!(t[0].max_running, Some(3));
        assert_eq!((t[1].name.as_str(), t[1].members, t[1].declared), ("ops", 1, false));
    }
}
