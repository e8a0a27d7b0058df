//! Small builders for rule tests: a declared workspace, a store record, a container,
//! token rows, all at a fixed clock.

use std::collections::BTreeMap;
use std::time::Duration;

use chrono::{DateTime, TimeZone, Utc};

use super::*;
use crate::api::effective::{Defaults, resolve};
use crate::api::{ObjectKey, OperatingMode, SourceRef, WorkspaceSpec};
use crate::model::container::labels;
use crate::model::{TokenRow, WorkspaceRecord};

pub const UID: &str = "0a1b2c3d-4e5f-6071-8293-a4b5c6d7e8f9";
pub const HASH: &str = "feedfacecafebeef";

pub fn t(secs: i64) -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 11, 25, 12, 0, 0).unwrap() + chrono::Duration::seconds(secs)
}

pub fn now() -> DateTime<Utc> {
    t(1000)
}

pub fn settings() -> Settings {
    Settings {
        heartbeat_interval: Duration::from_secs(1),
        heartbeat_ttl: Duration::from_secs(10),
        restart_budget: 3,
        restart_backoff: Duration::from_secs(10),
        freezes: true,
    }
}

pub fn desired_with(spec: WorkspaceSpec) -> Desired {
    Desired {
        key: ObjectKey::new("default", "dev"),
        generation: 1,
        spec: resolve(&spec, &Defaults::default()),
        spec_hash: HASH.into(),
        source: SourceRef { kind: "dir".into(), reference: "dev.yaml".into() }.into(),
        secrets_unreadable: None,
        applied: None,
    }
}

pub fn desired() -> Desired {
    desired_with(WorkspaceSpec::default())
}

pub fn desired_mode(mode: OperatingMode) -> Desired {
    desired_with(WorkspaceSpec { operating_mode: Some(mode), ..Default::default() })
}

pub fn record(incarnation: i64) -> WorkspaceRecord {
    WorkspaceRecord {
        uid: UID.into(),
        key: "default/dev".into(),
        incarnation,
        created_at: t(0),
        last_heartbeat_at: Some(now() - chrono::Duration::seconds(1)),
        restart_count: 0,
        last_restart_at: None,
        last_restart_reason: None,
        status: None,
        mode_override: None,
        restart_requested_at: None,
        claim: None,
        woken_at: None,
        lifecycle: Default::default(),
    }
}

pub fn container(incarnation: i64, state: ContainerState) -> ContainerInfo {
    let mut l = BTreeMap::new();
    l.insert(labels::INSTANCE.to_string(), "test".to_string());
    l.insert(labels::WORKSPACE.to_string(), "default/dev".to_string());
    l.insert(labels::UID.to_string(), UID.to_string());
    l.insert(labels::INCARNATION.to_string(), incarnation.to_string());
    l.insert(labels::SPEC_HASH.to_string(), HASH.to_string());
    l.insert(labels::PROVISIONED_AT.to_string(), t(100).to_rfc3339());
    ContainerInfo {
        id: format!("c0ffee{incarnation:06}"),
        name: "ws-0a1b2c3d-4e5".into(),
        image: "molecule-agent:local".into(),
        state,
        labels: l,
        created_at: Some(t(100)),
        started_at: Some(t(100)),
        ..Default::default()
    }
}

pub fn token(id: &str, incarnation: i64, created: DateTime<Utc>, last_used: Option<DateTime<Utc>>) -> TokenRow {
    TokenRow {
        id: id.into(),
        workspace_uid: UID.into(),
        token_hash: format!("hash-{id}"),
        prefix: "Ab3x9_Qe".into(),
        incarnation,
        created_at: created,
        last_used_at: last_used,
        revoked_at: None,
        revoke_reason: None,
        expires_at: None,
    }
}

/// A healthy running workspace at incarnation 1: container, matching token file, fresh heartbeat.
pub fn healthy() -> Observed {
    Observed {
        record: Some(record(1)),
        containers: Some(vec![container(1, ContainerState::Running)]),
        live_tokens: vec![token("t1", 1, t(100), Some(now()))],
        token_file: TokenFile::Hash("hash-t1".into()),
        team: TeamView::NoQuota,
        heartbeats_lost_at: None,
        agent: None,
        pool: Default::default(),
    }
}

/// Changes to a fixture, each saying what differs from it.
impl Observed {
    /// Docker lists no container for it.
    pub fn without_container(mut self) -> Self {
        self.containers = Some(vec![]);
        self
    }

    /// Its only container is `c`.
    pub fn with_container(mut self, c: ContainerInfo) -> Self {
        self.containers = Some(vec![c]);
        self
    }

    /// Its containers are `cs`.
    pub fn with_containers(mut self, cs: Vec<ContainerInfo>) -> Self {
        self.containers = Some(cs);
        self
    }

    /// Docker could not be listed.
    pub fn containers_unknown(mut self) -> Self {
        self.containers = None;
        self
    }

    pub fn without_tokens(mut self) -> Self {
        self.live_tokens.clear();
        self
    }

    pub fn with_tokens(mut self, tokens: Vec<TokenRow>) -> Self {
        self.live_tokens = tokens;
        self
    }

    pub fn with_token_file(mut self, file: TokenFile) -> Self {
        self.token_file = file;
        self
    }

    /// Never seen before (no store record).
    pub fn without_record(mut self) -> Self {
        self.record = None;
        self
    }

    /// Edits the store record.
    pub fn record_with(mut self, edit: impl FnOnce(&mut WorkspaceRecord)) -> Self {
        if let Some(r) = self.record.as_mut() {
            edit(r);
        }
        self
    }

    /// Its last heartbeat was `secs` seconds before `now()`.
    pub fn silent_for(self, secs: i64) -> Self {
        self.record_with(|r| r.last_heartbeat_at = Some(now() - chrono::Duration::seconds(secs)))
    }

    /// No heartbeat recorded, ever.
    pub fn never_heard(self) -> Self {
        self.record_with(|r| r.last_heartbeat_at = None)
    }

    /// The registry could not record heartbeats `secs` seconds before `now()`.
    pub fn heartbeats_lost(mut self, secs: i64) -> Self {
        self.heartbeats_lost_at = Some(now() - chrono::Duration::seconds(secs));
        self
    }

    /// A member of a team with quotas, the rest of the team as given.
    pub fn in_team(mut self, team: TeamView) -> Self {
        self.team = team;
        self
    }
}

impl ContainerInfo {
    /// The same container with one of the operator's labels changed.
    pub fn labelled(mut self, key: &str, value: impl Into<String>) -> Self {
        self.labels.insert(key.to_string(), value.into());
        self
    }
}

/// A team with these limits whose one other member, seen first, runs and holds a slot.
pub fn team_with_one_running_member(limits: super::quota::Limits) -> TeamView {
    let other = super::quota::Member {
        name: "other".into(),
        first_seen: Some(t(-1)),
        has_container: true,
        running: true,
        wants_container: true,
        wants_running: true,
    };
    TeamView::Known { team: "eng".into(), limits, others: vec![other] }
}

pub fn facts<'a>(desired: Option<&'a Desired>, observed: &'a Observed, settings: &'a Settings) -> Facts<'a> {
    Facts { desired, observed, now: now(), settings }
}
