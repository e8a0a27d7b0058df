//! Carries out a decision's actions through the Runtime and Store, and decides
//! nothing: every choice (which tokens go and why, whether a new container starts
//! paused) is in the action, made by a rule. Every action is idempotent and ordered
//! so that a crash at any point, followed by a restart, converges to the same end
//! state: no duplicate container (one name per uid, removed before create), no live
//! token without its container (old tokens are revoked before the new container
//! exists; a token is written before start).

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};

use crate::model::container::{CONFIG_FILE_MODE, CONFIGS_DIR, IDENTITY_FILE, THAW_FILE, TOKEN_FILE, labels};
use crate::model::{RevokeReason, WorkspaceRecord};
use crate::rules::{Action, Desired, Facts};
use crate::runtime::render::{AgentEnv, Identity, config_volume_name, container_name, identity_file, render};
use crate::runtime::{Runtime, RuntimeError};
use crate::store::{Store, StoreError};

/// A step that failed, named after its action.
#[derive(Debug, thiserror::Error)]
#[error("{step}: {source}")]
pub struct ExecError {
    /// The action's name (`Action::name`): provision, reissue-token, ...
    pub step: &'static str,
    #[source]
    pub source: StepError,
}

#[derive(Debug, thiserror::Error)]
pub enum StepError {
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{0}")]
    Precondition(String),
}

impl ExecError {
    pub fn metric_label(&self) -> &'static str {
        match &self.source {
            StepError::Runtime(e) => e.metric_label(),
            StepError::Store(e) => e.metric_label(),
            StepError::Precondition(_) => "precondition",
        }
    }
}

/// Carries out actions for one operator instance.
pub struct Executor<'a> {
    pub runtime: &'a dyn Runtime,
    pub store: &'a dyn Store,
    pub instance: &'a str,
    pub agent: &'a AgentEnv,
    /// Failpoints for crash-consistency tests: `MOLECULE_FAILPOINT=<name>` aborts the
    /// process the first time it reaches that step, `<name>@<n>` the n-th time, and
    /// `panic:<name>` panics there instead. Every name is in [`FAILPOINTS`].
    pub failpoint: Option<&'a str>,
}

/// Every step the process can be killed at (tests/crash.rs crashes at each): the
/// steps inside a provision, a token reissue, a rotation and a warm-pool claim, and
/// after every action.
pub const FAILPOINTS: &[&str] = &[
    "provision-after-bump",
    "provision-after-remove",
    "provision-after-create",
    "provision-after-issue",
    "provision-after-write",
    "provision-after-start",
    "reissue-after-issue",
    "reissue-after-write",
    "rotate-after-issue",
    "rotate-after-write",
    "after-provision",
    "after-remove-container",
    "after-remove-volume",
    "after-revoke-tokens",
    "after-revoke-token-ids",
    "after-rotate-token",
    "after-revoke-stale-tokens",
    "after-reissue-token",
    "after-pause",
    "after-unpause",
    "after-record-restart",
    "after-reset-restarts",
    "after-suspend",
    "after-lifetime-clock",
    "after-forget",
    "claim-after-store",
    "claim-after-issue",
    "claim-after-write",
    "claim-after-identity",
    "after-claim",
];

/// How often the configured failpoint has been reached in this process.
static FAILPOINT_HITS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

/// What happened, for the decision log and metrics.
#[derive(Debug, Default)]
pub struct Outcome {
    pub done: Vec<String>,
    pub revoked: Vec<(RevokeReason, u64)>,
    pub issued: u64,
    /// Token files written: (container id, sha256 of the token), in order, so the
    /// reconciler knows the file's content without reading it back (and the registry
    /// knows the tokens it issued).
    pub written: Vec<(String, String)>,
    /// A warm-pool member taken: (container id, the uid the workspace has now).
    pub claimed: Option<(String, String)>,
    /// A suspension recorded (for the metrics).
    pub suspended: Option<crate::model::SuspendCause>,
}

impl Executor<'_> {
    fn failpoint(&self, name: &str) {
        debug_assert!(FAILPOINTS.contains(&name), "failpoint {name} is not listed in FAILPOINTS");
        let Some(spec) = self.failpoint else { return };
        // `panic:<name>` panics instead (the reconcile loop's test of a panicking reconcile).
        let (panics, spec) = match spec.strip_prefix("panic:") {
            Some(rest) => (true, rest),
            None => (false, spec),
        };
        let (point, nth) = match spec.split_once('@') {
            Some((p, n)) => (p, n.parse::<u32>().unwrap_or(1)),
            None => (spec, 1),
        };
        if point == name && FAILPOINT_HITS.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1 == nth {
            if panics {
                panic!("failpoint {name} reached");
            }
            tracing::error!(failpoint = name, "failpoint reached: aborting the process");
            std::process::abort();
        }
    }

    pub async fn apply(
        &self,
        facts: &Facts<'_>,
        actions: &[Action],
        now: DateTime<Utc>,
    ) -> (Outcome, Result<(), ExecError>) {
        let mut out = Outcome::default();
        for a in actions {
            // A child of the reconcile's trace per action (see crate::telemetry).
            let span = tracing::trace_span!(target: crate::telemetry::TARGET, "execute", action = a.name(),
                otel.name = format!("execute {}", a.name()), otel.status_code = tracing::field::Empty,
                error = tracing::field::Empty);
            let applied = tracing::Instrument::instrument(self.apply_one(facts, a, now, &mut out), span.clone()).await;
            if let Err(source) = applied {
                span.record("otel.status_code", "ERROR").record("error", tracing::field::display(&source));
                return (out, Err(ExecError { step: a.name(), source }));
            }
            self.failpoint(&format!("after-{}", a.name()));
        }
        (out, Ok(()))
    }

    async fn apply_one(
        &self,
        facts: &Facts<'_>,
        action: &Action,
        now: DateTime<Utc>,
        out: &mut Outcome,
    ) -> Result<(), StepError> {
        // Removing a stray container needs no identity; everything else does.
        if let Action::RemoveContainer { id } = action {
            self.runtime.remove(id).await?;
            out.done.push(format!("removed container {}", short(id)));
            return Ok(());
        }
        let record =
            facts.observed.record.as_ref().ok_or_else(|| {
                StepError::Precondition(format!("{} needs the workspace's record", action.describe()))
            })?;
        let uid = record.uid.as_str();
        match action {
            Action::Provision { revoke, paused } => {
                let desired =
                    facts.desired.ok_or_else(|| StepError::Precondition("provision without a declaration".into()))?;
                self.provision(facts, desired, record, *revoke, *paused, now, out).await?;
            }
            Action::RemoveContainer { .. } => {} // handled above
            Action::RemoveVolume => {
                self.runtime.remove_volume(&config_volume_name(uid)).await?;
                out.done.push("removed config volume".into());
            }
            Action::RevokeTokens { reason } => {
                let n = self.store.revoke_tokens(uid, *reason, None, now).await?;
                self.revoked(out, *reason, n, &record.key);
            }
            Action::RevokeTokenIds { ids, reason } => {
                let mut n = 0;
                for id in ids {
                    n += self.store.revoke_token(uid, id, *reason, now).await?;
                }
                self.revoked(out, *reason, n, &record.key);
            }
            Action::RotateToken { old, old_valid_until } => {
                let c = facts
                    .observed
                    .container()
                    .ok_or_else(|| StepError::Precondition("no container to write the token into".into()))?;
                let issued = self.store.issue_token(uid, record.incarnation, now).await?;
                self.failpoint("rotate-after-issue");
                self.runtime.write_file(&c.id, CONFIGS_DIR, TOKEN_FILE, issued.plaintext.as_bytes(), 0o600).await?;
                self.failpoint("rotate-after-write");
                out.issued += 1;
                out.written.push((c.id.clone(), issued.row.token_hash.clone()));
                // Only once the new token is in the file does the old one start to expire.
                self.store.expire_token(uid, old, *old_valid_until).await?;
                out.done.push(format!(
                    "rotated: wrote token {}… into the container; the old one is valid until {}",
                    issued.row.prefix,
                    old_valid_until.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
                ));
            }
            Action::RevokeStaleTokens { cutoff } => {
                let n = self.store.revoke_stale_tokens(uid, *cutoff, RevokeReason::ContainerMissing, now).await?;
                self.revoked(out, RevokeReason::ContainerMissing, n, &record.key);
            }
            Action::ReissueToken { revoke } => {
                let c = facts
                    .observed
                    .container()
                    .ok_or_else(|| StepError::Precondition("no container to write the token into".into()))?;
                let issued = self.store.issue_token(uid, record.incarnation, now).await?;
                self.failpoint("reissue-after-issue");
                // If the write fails the new token is live but unused: the next pass sees the
                // file still wrong, reissues, and revokes every token but the one written.
                self.runtime.write_file(&c.id, CONFIGS_DIR, TOKEN_FILE, issued.plaintext.as_bytes(), 0o600).await?;
                self.failpoint("reissue-after-write");
                out.issued += 1;
                out.written.push((c.id.clone(), issued.row.token_hash.clone()));
                out.done.push(format!("wrote token {}… into the container", issued.row.prefix));
                let n = self.store.revoke_tokens(uid, *revoke, Some(&issued.row.id), now).await?;
                self.revoked(out, *revoke, n, &record.key);
            }
            Action::Pause { id } => {
                self.runtime.pause(id).await?;
                out.done.push("paused container".into());
            }
            Action::Unpause { id } => {
                // A thaw is a wake: the agent's silence while frozen is not a hang
                // (liveness::silent_since), however the resume was asked for (the
                // file, the CLI, a wake, a freed quota slot). Recorded first, so a
                // crash between the two cannot leave a thawed agent judged silent.
                self.store.request_wake(uid, now).await?;
                // Written while frozen: the agent's inotify holds the event, and the
                // agent heartbeats the moment it runs. A courtesy: without it the
                // agent notices only a freeze longer than one of its waits.
                let at = now.to_rfc3339_opts(chrono::SecondsFormat::Micros, true);
                if let Err(e) = self.runtime.write_file(id, CONFIGS_DIR, THAW_FILE, at.as_bytes(), 0o600).await {
                    tracing::debug!(workspace = %record.key, error = %e, "could not write the thaw file; unpausing anyway");
                }
                self.runtime.unpause(id).await?;
                out.done.push("unpaused container".into());
            }
            Action::RecordRestart { reason } => {
                self.store.record_restart(uid, reason, now).await?;
                out.done.push(format!("restart {} of the budget", record.restart_count + 1));
            }
            Action::ResetRestarts => {
                self.store.reset_restarts(uid).await?;
                out.done.push("restart budget reset".into());
            }
            Action::Suspend { suspension, used_ms } => {
                let state = crate::model::LifecycleState {
                    suspended: Some(*suspension),
                    running_since: None,
                    used_ms: *used_ms,
                };
                self.store.save_lifecycle(uid, &state).await?;
                out.done.push(format!("suspended ({})", suspension.cause));
                out.suspended = Some(suspension.cause);
            }
            Action::LifetimeClock { state } => {
                self.store.save_lifecycle(uid, state).await?;
                out.done.push(action.describe());
            }
            Action::Forget => {
                self.store.delete_workspace(uid).await?;
                out.done.push("forgot the workspace".into());
            }
            Action::Claim { pool, id, uid: member_uid, overlay } => {
                let desired =
                    facts.desired.ok_or_else(|| StepError::Precondition("claim without a declaration".into()))?;
                self.claim(desired, record, pool, id, member_uid, overlay, now, out).await?;
            }
        }
        Ok(())
    }

    fn revoked(&self, out: &mut Outcome, reason: RevokeReason, n: u64, key: &str) {
        if n > 0 {
            tracing::info!(workspace = key, reason = reason.as_str(), count = n, "revoked tokens");
            out.revoked.push((reason, n));
            out.done.push(format!("revoked {n} token{}: {reason}", if n == 1 { "" } else { "s" }));
        }
    }

    /// A new incarnation. The image is checked first so a bad image never costs a
    /// working container its tokens; then old tokens go, the old container goes, the
    /// new one is created, given its token, and started.
    #[allow(clippy::too_many_arguments)]
    async fn provision(
        &self,
        facts: &Facts<'_>,
        desired: &Desired,
        record: &WorkspaceRecord,
        revoke: RevokeReason,
        paused: bool,
        now: DateTime<Utc>,
        out: &mut Outcome,
    ) -> Result<(), StepError> {
        let spec = desired.effective().ok_or_else(|| StepError::Precondition("invalid spec".into()))?;
        let uid = record.uid.as_str();
        let id = Identity { instance: self.instance, key: &record.key, uid };
        let mut cs = render(spec, &id, self.agent);
        self.runtime.ensure_image(&cs.image, cs.image_pull_policy).await?;
        let vol_labels: BTreeMap<String, String> = cs
            .labels
            .iter()
            .filter(|(k, _)| [labels::MANAGED, labels::INSTANCE, labels::WORKSPACE, labels::UID].contains(&k.as_str()))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        self.runtime.ensure_volume(&cs.config_volume, &vol_labels).await?;
        let incarnation = self.store.bump_incarnation(uid).await?;
        self.failpoint("provision-after-bump");
        let n = self.store.revoke_tokens(uid, revoke, None, now).await?;
        self.revoked(out, revoke, n, &record.key);
        for c in facts.observed.containers.iter().flatten() {
            self.runtime.remove(&c.id).await?;
        }
        self.runtime.remove(&container_name(uid)).await?;
        self.failpoint("provision-after-remove");
        cs.labels.insert(labels::INCARNATION.into(), incarnation.to_string());
        cs.labels.insert(labels::PROVISIONED_AT.into(), now.to_rfc3339_opts(chrono::SecondsFormat::Millis, true));
        let cid = self.runtime.create(&cs).await?;
        self.failpoint("provision-after-create");
        // Before the token: its write is what makes the agent own /configs.
        self.runtime.write_files(&cid, CONFIGS_DIR, &cs.config_files, CONFIG_FILE_MODE).await?;
        let issued = self.store.issue_token(uid, incarnation, now).await?;
        self.failpoint("provision-after-issue");
        self.runtime.write_file(&cid, CONFIGS_DIR, TOKEN_FILE, issued.plaintext.as_bytes(), 0o600).await?;
        self.failpoint("provision-after-write");
        out.issued += 1;
        out.written.push((cid.clone(), issued.row.token_hash.clone()));
        self.runtime.start(&cid).await?;
        self.failpoint("provision-after-start");
        if paused {
            self.runtime.pause(&cid).await?;
        }
        out.done.push(format!(
            "created {} (incarnation {incarnation}, image {}) with token {}…",
            cs.name, cs.image, issued.row.prefix
        ));
        Ok(())
    }
}

impl Executor<'_> {
    /// Takes a warm-pool member as the workspace's container: the workspace gets the
    /// member's uid (the store refuses if another took it) and a pending claim, the
    /// runtime relabels the member as the workspace's where it can (`Runtime::adopt`),
    /// then the workspace's config files, a new token and its identity are written into
    /// the member's `/configs` (Kubernetes: its token Secret), and the claim is marked
    /// complete; the waiting agent reads the identity and registers. Nothing is created.
    ///
    /// Convergence: until the claim is complete the claim rule asks for this again
    /// (a crash or a failed write at any step), and the second time the store step is
    /// skipped (the member is already the workspace's), the relabel is made again and
    /// every file is written again, and the tokens of the interrupted attempt are
    /// revoked: one live token, in the file. The identity's content is the same each
    /// time, so an agent that already took it only sees its token change, which it
    /// re-reads.
    #[allow(clippy::too_many_arguments)]
    async fn claim(
        &self,
        desired: &Desired,
        record: &WorkspaceRecord,
        pool: &str,
        id: &str,
        member_uid: &str,
        overlay: &BTreeMap<String, String>,
        now: DateTime<Utc>,
        out: &mut Outcome,
    ) -> Result<(), StepError> {
        let spec = desired.effective().ok_or_else(|| StepError::Precondition("invalid spec".into()))?;
        let mut cs = render(spec, &Identity { instance: self.instance, key: &record.key, uid: member_uid }, self.agent);
        // A claim left pending by an earlier attempt: the store already gave the member.
        let again = record.claim.as_ref().filter(|c| record.uid == member_uid && c.container_id == id && c.pending);
        let claim = match again {
            Some(claim) => claim.clone(),
            None => {
                let claim = crate::model::Claim {
                    pool: pool.to_string(),
                    container_id: id.to_string(),
                    spec_hash: cs.labels.get(labels::SPEC_HASH).cloned().unwrap_or_default(),
                    at: now,
                    pending: true,
                };
                let claimed = self.store.claim_member(&record.key, &record.uid, member_uid, &claim).await?;
                if claimed.is_none() {
                    return Err(StepError::Precondition(format!(
                        "container {} of warm pool {pool} was taken meanwhile, or the workspace was provisioned",
                        short(id)
                    )));
                }
                out.claimed = Some((id.to_string(), member_uid.to_string()));
                claim
            }
        };
        self.failpoint("claim-after-store");
        // Where the runtime can relabel (Kubernetes), the member becomes the workspace's
        // Pod outright; the store's claim says the same for Docker.
        cs.labels.insert(labels::INCARNATION.into(), "1".into());
        cs.labels.insert(labels::PROVISIONED_AT.into(), claim.at.to_rfc3339_opts(chrono::SecondsFormat::Millis, true));
        self.runtime.adopt(id, &cs).await?;
        self.runtime.write_files(id, CONFIGS_DIR, &cs.config_files, CONFIG_FILE_MODE).await?;
        let issued = self.store.issue_token(member_uid, 1, now).await?;
        self.failpoint("claim-after-issue");
        self.runtime.write_file(id, CONFIGS_DIR, TOKEN_FILE, issued.plaintext.as_bytes(), 0o600).await?;
        self.failpoint("claim-after-write");
        out.issued += 1;
        out.written.push((id.to_string(), issued.row.token_hash.clone()));
        let identity = identity_file(member_uid, &record.key, overlay);
        self.runtime.write_file(id, CONFIGS_DIR, IDENTITY_FILE, identity.as_bytes(), 0o600).await?;
        self.failpoint("claim-after-identity");
        if again.is_some() {
            let n = self
                .store
                .revoke_tokens(member_uid, RevokeReason::TokenFileMismatch, Some(&issued.row.id), now)
                .await?;
            self.revoked(out, RevokeReason::TokenFileMismatch, n, &record.key);
        }
        self.store.complete_claim(member_uid, &claim).await?;
        out.done.push(format!(
            "{} {} of warm pool {pool} (now uid {}), wrote token {}… and its identity ({} env overlay variable(s))",
            if again.is_some() { "finished the claim of" } else { "claimed" },
            short(id),
            member_uid,
            issued.row.prefix,
            overlay.len()
        ));
        Ok(())
    }
}

fn short(id: &str) -> &str {
    &id[..id.len().min(12)]
}
