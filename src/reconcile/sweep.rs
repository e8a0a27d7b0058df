//! The periodic resync as a sweep. A full reconcile of one workspace costs store
//! queries (record, secrets, live tokens), a render and hash of its container config,
//! an archive read of its token file and a status write: a resync that reconciled all
//! of n workspaces cost n of each. The sweep instead reads everything in bulk, once:
//! one container listing (which also repairs the container cache), one query of the
//! records, one of the live tokens and one of the secrets, and asks the same rules
//! (`rules::plan`) in memory about each workspace. Only the workspaces where a rule
//! would act, or whose inputs changed since their last full reconcile, get one.
//!
//! What the sweep takes from the last full reconcile instead of recomputing (`QuietSnapshot`):
//! - the spec hash, valid while the declaration's generation and the secrets are the
//!   same (any change to any secret makes every workspace reconcile once);
//! - the token file's hash, valid while the container is the same one. Every way the
//!   file can change is already a trigger: a write through Docker's archive API is an
//!   `extract-to-dir` event, and a file changed any other way (inside the container,
//!   on the volume) makes the agent present a token the registry refuses (401).
//!
//! Anything the sweep cannot vouch for (a workspace failing, a member of a team with
//! quotas, no `QuietSnapshot` yet, a different container) gets a full reconcile, as before.

use std::collections::{BTreeSet, HashMap};

use chrono::{DateTime, Utc};
use sha2::{Digest, Sha256};

use super::Context;
use super::dereference::team_limits;
use crate::api::ObjectKey;
use crate::compact::Hex;
use crate::model::container::ContainerInfo;
use crate::model::{SecretRow, TokenRow, WorkspaceRecord};
use crate::rules::{Desired, Facts, Observed, Settings, TeamView, TokenFile, plan};
use crate::source::desired::{DesiredSet, DesiredWorkspace};

/// What the last quiet full reconcile of a workspace saw, for the sweep. One per
/// workspace, so ids and hashes are kept as bytes.
#[derive(Clone, Debug, PartialEq)]
pub struct QuietSnapshot {
    pub generation: i64,
    /// `secrets_fingerprint` of the secrets as they were when the hash was computed.
    pub secrets: u64,
    pub spec_hash: Hex,
    /// Its own container (by uid) and what its token file held.
    pub container: Option<Hex>,
    pub token_file: SnapshotFile,
}

/// A `TokenFile` as `QuietSnapshot` keeps it.
#[derive(Clone, Debug, PartialEq)]
pub enum SnapshotFile {
    NotRead,
    Missing,
    Hash(Hex),
    Unreadable(Box<str>),
}

impl From<&TokenFile> for SnapshotFile {
    fn from(file: &TokenFile) -> Self {
        match file {
            TokenFile::NotRead => Self::NotRead,
            TokenFile::Missing => Self::Missing,
            TokenFile::Hash(h) => Self::Hash(h.as_str().into()),
            TokenFile::Unreadable(e) => Self::Unreadable(e.as_str().into()),
        }
    }
}

impl From<&SnapshotFile> for TokenFile {
    fn from(file: &SnapshotFile) -> Self {
        match file {
            SnapshotFile::NotRead => Self::NotRead,
            SnapshotFile::Missing => Self::Missing,
            SnapshotFile::Hash(h) => Self::Hash(h.to_string()),
            SnapshotFile::Unreadable(e) => Self::Unreadable(e.to_string()),
        }
    }
}

/// One number for every secret's scope, name and version: any change to any secret
/// changes it.
pub fn secrets_fingerprint(rows: &[SecretRow]) -> u64 {
    let mut h = Sha256::new();
    for r in rows {
        h.update(r.scope.as_bytes());
        h.update([0]);
        h.update(r.name.as_bytes());
        h.update([0]);
        h.update(r.version.to_le_bytes());
    }
    u64::from_le_bytes(h.finalize()[..8].try_into().expect("8 bytes"))
}

/// Whether a workspace needs a full reconcile, judged from bulk-read state and what its
/// last full reconcile saw. Pure.
pub struct SweepInput<'a> {
    pub declared: Option<&'a DesiredWorkspace>,
    pub record: Option<&'a WorkspaceRecord>,
    /// None: the container listing failed (unknown).
    pub containers: Option<Vec<ContainerInfo>>,
    pub live_tokens: Vec<TokenRow>,
    pub snapshot: Option<&'a QuietSnapshot>,
    pub secrets: u64,
    /// A member of a team with quotas (the hold needs the whole team: always reconciled).
    pub quota_team: bool,
    /// The last execution failed (it is retried with backoff anyway).
    pub failing: bool,
    /// When the registry last failed to record heartbeats (see the heartbeat rule).
    pub heartbeats_lost_at: Option<DateTime<Utc>>,
}

impl SweepInput<'_> {
    /// Why it needs a full reconcile, or None when every rule would stay quiet.
    pub fn why(self, settings: &Settings, now: DateTime<Utc>) -> Option<&'static str> {
        if self.failing {
            return Some("failing");
        }
        if self.quota_team {
            return Some("quota-team");
        }
        // envFrom Secrets (Kubernetes objects) are not in the secrets fingerprint, and
        // whether one is missing (a hold) is decided on reading them: reconciled.
        if self.declared.is_some_and(|d| d.spec.as_ref().is_ok_and(|s| !s.env_from.is_empty())) {
            return Some("env-from");
        }
        // Likewise whether requiredEnv holds it is decided on reading the secrets.
        if self.declared.is_some_and(|d| d.spec.as_ref().is_ok_and(|s| !s.required_env.is_empty())) {
            return Some("required-env");
        }
        let Some(containers) = self.containers else { return Some("containers-unknown") };
        let (declared, record) = match (self.declared, self.record) {
            (None, None) if containers.is_empty() => return None,
            (Some(_), None) => return Some("never-seen"),
            pair => pair,
        };
        let seen = match (declared, self.snapshot) {
            (Some(_), None) => return Some("not-seen-since-start"),
            (_, seen) => seen,
        };
        let desired = match (declared, seen) {
            (Some(d), Some(seen)) => {
                if seen.generation != d.generation || seen.secrets != self.secrets {
                    return Some("declaration-or-secrets-changed");
                }
                Some(Desired {
                    key: d.key.clone(),
                    generation: d.generation,
                    spec: d.spec.clone(),
                    spec_hash: seen.spec_hash.to_string(),
                    source: d.source.clone(),
                    secrets_unreadable: None, // only envFrom holds, and those are reconciled above
                    applied: None,            // an out-of-band change is an event, reconciled then
                })
            }
            _ => None,
        };
        let mut observed = Observed {
            record: record.cloned(),
            containers: Some(containers),
            live_tokens: self.live_tokens,
            token_file: TokenFile::NotRead,
            team: TeamView::NoQuota, // quota teams are reconciled above
            heartbeats_lost_at: self.heartbeats_lost_at,
            agent: None, // read by the full reconcile: a rule it holds back (suspend, busy) costs only that
            pool: Default::default(),
        };
        observed.adopt_claim();
        let own = observed.container().map(|c| Hex::new(&c.id));
        if let Some(seen) = seen {
            if own != seen.container {
                return Some("container-changed");
            }
            observed.token_file = (&seen.token_file).into();
        }
        let facts = Facts { desired: desired.as_ref(), observed: &observed, now, settings };
        plan(&facts).decision().map(|d| d.rule)
    }
}

/// How the last sweeps went: when the last full one ran, and which workspaces of the
/// desired set it saw use `envFrom` (recomputed only when the set changes).
#[derive(Debug, Default)]
pub struct Sweeps {
    last_full: Option<std::time::Instant>,
    /// A Weak: a set the sources have replaced is not kept alive for this.
    env_from: Option<(std::sync::Weak<DesiredSet>, Vec<String>)>,
}

impl Sweeps {
    fn env_from(&mut self, set: &std::sync::Arc<DesiredSet>) -> Vec<String> {
        match &self.env_from {
            Some((seen, keys)) if std::sync::Weak::ptr_eq(seen, &std::sync::Arc::downgrade(set)) => keys.clone(),
            _ => {
                let keys: Vec<String> = set
                    .workspaces
                    .values()
                    .filter(|d| d.spec.as_ref().is_ok_and(|s| !s.env_from.is_empty()))
                    .map(|d| d.key.to_string())
                    .collect();
                self.env_from = Some((std::sync::Arc::downgrade(set), keys.clone()));
                keys
            }
        }
    }
}

/// Each workspace's phase as its status last showed it, for the workspaces-by-phase
/// gauge: set by every status write and by full sweeps, published by every sweep and
/// by a status write that changes a phase (a user scraping the metrics right after a
/// workspace is suspended sees it). The counts are kept as phases change, so
/// publishing does not walk every workspace.
#[derive(Debug, Default)]
pub struct Phases(std::sync::Mutex<PhaseCounts>);

#[derive(Debug, Default)]
pub struct PhaseCounts {
    of: HashMap<String, crate::api::Phase>,
    counts: HashMap<crate::api::Phase, i64>,
}

impl PhaseCounts {
    fn count(&mut self, phase: crate::api::Phase, by: i64) {
        *self.counts.entry(phase).or_default() += by;
    }
}

impl Phases {
    fn lock(&self) -> std::sync::MutexGuard<'_, PhaseCounts> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// `key`'s phase now (None: it has no record any more); whether that changed a count.
    pub fn set(&self, key: &str, phase: Option<crate::api::Phase>) -> bool {
        let mut p = self.lock();
        let old = match phase {
            Some(phase) => match p.of.get_mut(key) {
                Some(slot) => Some(std::mem::replace(slot, phase)),
                None => {
                    p.of.insert(key.to_string(), phase);
                    None
                }
            },
            None => p.of.remove(key),
        };
        if old != phase {
            if let Some(old) = old {
                p.count(old, -1);
            }
            if let Some(new) = phase {
                p.count(new, 1);
            }
        }
        old != phase
    }

    pub(super) fn replace(&self, all: Vec<(String, crate::api::Phase)>) {
        let mut p = PhaseCounts::default();
        for (_, phase) in &all {
            p.count(*phase, 1);
        }
        p.of = all.into_iter().collect();
        *self.lock() = p;
    }

    pub(super) fn publish(&self, metrics: &crate::metrics::Metrics) {
        let counts: Vec<(crate::api::Phase, i64)> = self.lock().counts.iter().map(|(p, n)| (*p, *n)).collect();
        metrics.set_workspaces(counts);
    }
}

/// Which workspaces a resync looks at: every one, or those in the change log.
#[derive(Debug, PartialEq)]
enum Extent {
    Full(&'static str),
    Changed(BTreeSet<String>),
}

/// Every key worth a look on a resync, and which of them need a full reconcile.
///
/// Most resyncs are incremental: the store's change log names the workspaces whose
/// record or tokens changed since the last sweep, the container cache is kept current by
/// Docker's events, the desired set's changes are queued as they happen, and each
/// reconcile leaves a timer for the next deadline it knows of (a heartbeat, a rotation).
/// What is left to look at is what the log names, plus the workspaces whose inputs the
/// operator cannot see change (envFrom Secrets). A full sweep (every container listed,
/// every record and token read) runs at start, every `Context::full_resync`, after a
/// secret changed, and whenever the log or the cache cannot be trusted. A failed bulk
/// read sends every key to a full reconcile (which copes with failures one workspace at
/// a time, as before the sweep).
pub(super) async fn sweep(ctx: &Context, force_full: bool) -> Vec<String> {
    let (due, full) = sweep_inner(ctx, force_full).await;
    if full {
        // Its bulk reads are freed now.
        crate::memory::release_free_memory();
    }
    due
}

/// `sweep`, and whether it was a full one.
async fn sweep_inner(ctx: &Context, force_full: bool) -> (Vec<String>, bool) {
    let set: std::sync::Arc<DesiredSet> = ctx.desired.borrow().clone();
    if !set.complete {
        return (Vec::new(), false); // every workspace gets a full reconcile once every source has spoken
    }
    if ctx.lease_unconfirmed.load(std::sync::atomic::Ordering::Acquire) {
        return (Vec::new(), false); // the change log is the leader's to take
    }
    let started = std::time::Instant::now();
    // Taken first: a change made after this is in the next sweep's log.
    let changes = ctx.store.take_changes().await;
    let last_full = ctx.sweeps.lock().unwrap_or_else(|e| e.into_inner()).last_full;
    let extent = match changes {
        _ if force_full => Extent::Full("asked"),
        _ if last_full.is_none_or(|t| t.elapsed() >= ctx.full_resync) => Extent::Full("periodic"),
        Err(e) => {
            tracing::warn!(error = %e, "the resync could not read the change log; looking at everything");
            Extent::Full("change-log-unreadable")
        }
        Ok(changes) if changes.secrets => Extent::Full("secrets-changed"),
        Ok(_) if !ctx.containers.is_known() => Extent::Full("containers-unknown"),
        Ok(changes) => Extent::Changed(changes.keys),
    };
    let full = matches!(extent, Extent::Full(_));
    let mut keys: BTreeSet<String> = match &extent {
        Extent::Full(_) => set.workspaces.keys().map(ObjectKey::to_string).collect(),
        // envFrom Secrets are not in the log: those workspaces are looked at every time.
        Extent::Changed(changed) => {
            let env_from = ctx.sweeps.lock().unwrap_or_else(|e| e.into_inner()).env_from(&set);
            changed.iter().cloned().chain(env_from).collect()
        }
    };
    // A listing that ends an outage (the cache was unknown) vouches for nothing the
    // reconciles saw meanwhile: like a failed one, every workspace gets a full look.
    let listed = !full || ctx.containers.relist(ctx.runtime.as_ref()).await.is_ok_and(|applied| !applied.recovered);
    let t_list = started.elapsed();
    if full {
        keys.extend(ctx.containers.workspace_keys().unwrap_or_default());
    }
    let key_list: Vec<String>;
    let records = ctx
        .store
        .list_workspaces_brief(if full {
            None
        } else {
            key_list = keys.iter().cloned().collect();
            Some(&key_list)
        })
        .await;
    let t_records = started.elapsed();
    let mut phases = Vec::new();
    let records = records.map(|records| {
        let records: Vec<WorkspaceRecord> = records
            .into_iter()
            .map(|(r, phase)| {
                phases.push((r.key.clone(), phase.unwrap_or_default()));
                r
            })
            .collect();
        keys.extend(records.iter().map(|r| r.key.clone()));
        records
    });
    let uids: Vec<String>;
    let tokens = match (&records, full) {
        (_, true) => ctx.store.all_live_tokens(None).await,
        (Ok(records), false) => {
            uids = records.iter().map(|r| r.uid.clone()).collect();
            ctx.store.all_live_tokens(Some(&uids)).await
        }
        (Err(_), false) => Ok(Vec::new()), // reconciled below anyway
    };
    let t_tokens = started.elapsed();
    let secrets = match full {
        true => ctx.store.secrets(&[]).await.map(|rows| secrets_fingerprint(&rows)),
        false => Ok(ctx.secrets_seen.load(std::sync::atomic::Ordering::SeqCst)),
    };
    let (Ok(records), true, Ok(tokens), Ok(secrets)) = (records, listed, tokens, secrets) else {
        tracing::warn!(
            "the resync could not read everything at once (or Docker just came back); reconciling every workspace it looked at"
        );
        return (keys.into_iter().collect(), full);
    };
    // The workspaces-by-phase gauge: statuses are written by reconciles (which keep the
    // gauge's per-workspace phases current), or by hand (seen here).
    if full {
        ctx.phases.replace(phases);
    } else {
        let found: HashMap<String, crate::api::Phase> = phases.into_iter().collect();
        for key in &keys {
            ctx.phases.set(key, found.get(key).copied());
        }
    }
    ctx.phases.publish(&ctx.metrics);
    if full {
        ctx.sweeps.lock().unwrap_or_else(|e| e.into_inner()).last_full = Some(started);
        // Reconciles from now on record this fingerprint with the spec hash they compute.
        ctx.secrets_seen.store(secrets, std::sync::atomic::Ordering::SeqCst);
    }
    let records: HashMap<&str, &WorkspaceRecord> = records.iter().map(|r| (r.key.as_str(), r)).collect();
    let mut tokens_of: HashMap<String, Vec<TokenRow>> = HashMap::new();
    for t in tokens {
        tokens_of.entry(t.workspace_uid.clone()).or_default().push(t);
    }
    let quiet = ctx.quiet.lock().unwrap_or_else(|e| e.into_inner());
    let failures: BTreeSet<String> = ctx.failing_keys();
    let now = Utc::now();
    let heartbeats_lost_at = ctx.lost_heartbeats.last();
    let mut due = Vec::new();
    let mut reasons: HashMap<&'static str, usize> = HashMap::new();
    let looked = keys.len();
    for key in keys {
        let okey = ObjectKey::parse(&key);
        let declared = set.workspaces.get(&okey);
        let record = records.get(key.as_str()).copied();
        let look = SweepInput {
            declared,
            record,
            containers: ctx.containers.containers_of(&key, record.map(|r| r.uid.as_str())),
            live_tokens: record.and_then(|r| tokens_of.remove(&r.uid)).unwrap_or_default(),
            snapshot: quiet.get(key.as_str()),
            secrets,
            quota_team: declared.is_some_and(|d| team_limits(&set, d).is_some()),
            failing: failures.contains(&key),
            heartbeats_lost_at,
        };
        if let Some(why) = look.why(&ctx.settings, now) {
            *reasons.entry(why).or_default() += 1;
            due.push(key);
        }
    }
    drop(quiet);
    ctx.metrics.resynced(full, looked);
    tracing::debug!(
        full = match extent {
            Extent::Full(why) => why,
            Extent::Changed(_) => "no",
        },
        looked,
        ?reasons,
        list = ?t_list,
        records = ?t_records - t_list,
        tokens = ?t_tokens - t_records,
        total = ?started.elapsed(),
        "resync sweep"
    );
    (due, full)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rules::ContainerState;
    use crate::rules::fixtures::*;

    fn declared() -> DesiredWorkspace {
        let d = desired();
        DesiredWorkspace {
            key: d.key,
            generation: d.generation,
            spec: d.spec,
            source: d.source,
            conflict: None,
            owner_team: None,
            deletion_refused: None,
        }
    }

    fn snapshot() -> QuietSnapshot {
        QuietSnapshot {
            generation: 1,
            secrets: 7,
            spec_hash: HASH.into(),
            container: Some(container(1, ContainerState::Running).id.as_str().into()),
            token_file: SnapshotFile::Hash("hash-t1".into()),
        }
    }

    /// The sweep's look at `d` recorded as `r` and last seen as `s`, with the containers
    /// and tokens of a healthy workspace.
    fn input<'a>(d: &'a DesiredWorkspace, r: &'a WorkspaceRecord, s: &'a QuietSnapshot) -> SweepInput<'a> {
        let obs = healthy();
        SweepInput {
            declared: Some(d),
            record: Some(r),
            containers: obs.containers,
            live_tokens: obs.live_tokens,
            snapshot: Some(s),
            secrets: 7,
            quota_team: false,
            failing: false,
            heartbeats_lost_at: None,
        }
    }

    /// A healthy workspace as the sweep sees it, with `f` applied.
    fn why(f: impl FnOnce(&mut SweepInput<'_>)) -> Option<&'static str> {
        let (d, r, s) = (declared(), record(1), snapshot());
        let mut input = input(&d, &r, &s);
        f(&mut input);
        input.why(&settings(), now())
    }

    #[test]
    fn a_healthy_workspace_as_last_seen_needs_no_reconcile() {
        assert_eq!(why(|_| {}), None);
    }

    #[test]
    fn what_the_rules_would_act_on_is_reconciled() {
        assert_eq!(why(|l| l.containers = Some(vec![])), Some("container-changed"));
        assert_eq!(why(|l| l.live_tokens.clear()), Some("token-file"), "token rows revoked by hand");
        assert_eq!(why(|l| l.declared = None), Some("remove"));
        let silent = record(1);
        let silent = WorkspaceRecord { last_heartbeat_at: Some(now() - chrono::Duration::seconds(60)), ..silent };
        let (d, s) = (declared(), snapshot());
        assert_eq!(input(&d, &silent, &s).why(&settings(), now()), Some("heartbeat"), "an agent silent past its TTL");
    }

    #[test]
    fn what_the_sweep_cannot_vouch_for_is_reconciled() {
        assert_eq!(why(|l| l.containers = None), Some("containers-unknown"));
        assert_eq!(why(|l| l.snapshot = None), Some("not-seen-since-start"));
        assert_eq!(why(|l| l.secrets = 8), Some("declaration-or-secrets-changed"));
        assert_eq!(why(|l| l.record = None), Some("never-seen"));
        assert_eq!(why(|l| l.failing = true), Some("failing"));
        assert_eq!(why(|l| l.quota_team = true), Some("quota-team"));
        let replaced = Some(vec![container(2, ContainerState::Running)]);
        assert_eq!(why(|l| l.containers = replaced), Some("container-changed"));
    }

    #[test]
    fn a_new_generation_is_reconciled() {
        let mut d = declared();
        d.generation = 2;
        let (r, s) = (record(1), snapshot());
        assert_eq!(input(&d, &r, &s).why(&settings(), now()), Some("declaration-or-secrets-changed"));
    }

    #[test]
    fn nothing_declared_recorded_or_running_is_left_alone() {
        assert_eq!(
            why(|l| {
                l.declared = None;
                l.record = None;
                l.containers = Some(vec![]);
                l.snapshot = None;
            }),
            None
        );
        // An undeclared container with our labels: the orphan rule's.
        assert_eq!(
            why(|l| {
                l.declared = None;
                l.record = None;
                l.snapshot = None;
            }),
            Some("orphan")
        );
    }

    #[test]
    fn the_phase_gauge_follows_status_writes_removals_and_full_reads() {
        use crate::api::Phase;
        let metrics = crate::metrics::Metrics::new();
        let gauge = |phase: &str| {
            let text = metrics.encode();
            let line = format!("molecule_workspaces{{phase=\"{phase}\"}} ");
            text.lines().find_map(|l| l.strip_prefix(line.as_str())?.parse::<i64>().ok()).unwrap()
        };
        let phases = Phases::default();
        phases.replace(vec![("a".into(), Phase::Running), ("b".into(), Phase::Running), ("c".into(), Phase::Paused)]);
        phases.publish(&metrics);
        assert_eq!((gauge("Running"), gauge("Paused")), (2, 1));
        assert!(phases.set("a", Some(Phase::Paused)));
        assert!(!phases.set("a", Some(Phase::Paused)), "the same again changes nothing");
        phases.set("b", None);
        phases.set("d", Some(Phase::Running));
        phases.publish(&metrics);
        assert_eq!((gauge("Running"), gauge("Paused")), (1, 2));
        phases.replace(vec![]);
        phases.publish(&metrics);
        assert_eq!((gauge("Running"), gauge("Paused")), (0, 0));
    }

    #[test]
    fn the_secrets_fingerprint_covers_scope_name_and_version() {
        let row = |scope: &str, name: &str, version| SecretRow {
            scope: scope.into(),
            name: name.into(),
            key_id: "k".into(),
            nonce: "n".into(),
            ciphertext: "c".into(),
            version,
            updated_at: now(),
        };
        let base = secrets_fingerprint(&[row("global", "A", 1)]);
        assert_eq!(base, secrets_fingerprint(&[row("global", "A", 1)]));
        assert_ne!(base, secrets_fingerprint(&[row("global", "A", 2)]));
        assert_ne!(base, secrets_fingerprint(&[row("team:default/t", "A", 1)]));
        assert_ne!(base, secrets_fingerprint(&[]));
    }
}
