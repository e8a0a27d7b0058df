//! Applies a Decision's actions through the Runtime and Store. Every action is
//! idempotent and ordered so that a crash at any point, followed by a restart,
//! converges to the same end state: no duplicate container (one name per uid,
//! removed before create), no live token without its container (old tokens are
//! revoked before the new container exists; a token is written before start).

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};

use crate::api::OperatingMode;
use crate::rules::{Action, Ctx, Desired};
use crate::runtime::render::{AgentEnv, Identity, config_volume_name, container_name, render};
use crate::runtime::{CONFIGS_DIR, Runtime, RuntimeError, TOKEN_FILE, labels};
use crate::store::{RevokeReason, Store, StoreError, WorkspaceRecord};

#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{0}")]
    Precondition(String),
}

impl ExecError {
    pub fn metric_label(&self) -> &'static str {
        match self {
            Self::Runtime(e) => e.metric_label(),
            Self::Store(e) => e.metric_label(),
            Self::Precondition(_) => "precondition",
        }
    }
}

/// What executing needs besides the traits.
pub struct Env<'a> {
    pub runtime: &'a dyn Runtime,
    pub store: &'a dyn Store,
    pub instance: &'a str,
    pub agent: &'a AgentEnv,
    /// Failpoints for crash-consistency tests: `MOLECULE_FAILPOINT=<name>` aborts the
    /// process the first time it reaches that step, `<name>@<n>` the n-th time. Every
    /// name is in [`FAILPOINTS`].
    pub failpoint: Option<&'a str>,
    /// Told about every token issued, so the registry lets its agent be checked even
    /// while the agent's address is throttled for others' failures (registry/limit.rs).
    pub vouch: Option<&'a crate::registry::limit::FailureLimiter>,
}

/// Every step the process can be killed at (tests/crash.rs crashes at each): the
/// steps inside a provision, a token reissue and a rotation, and after every action.
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
    "after-forget",
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
    /// reconciler knows the file's content without reading it back.
    pub written: Vec<(String, String)>,
}

impl Env<'_> {
    fn vouch(&self, issued: &crate::store::IssuedToken) {
        if let Some(limiter) = self.vouch {
            limiter.vouch(&issued.row.token_hash, std::time::Instant::now());
        }
    }

    fn failpoint(&self, name: &str) {
        debug_assert!(FAILPOINTS.contains(&name), "failpoint {name} is not listed in FAILPOINTS");
        let Some(spec) = self.failpoint else { return };
        let (point, nth) = match spec.split_once('@') {
            Some((p, n)) => (p, n.parse::<u32>().unwrap_or(1)),
            None => (spec, 1),
        };
        if point == name && FAILPOINT_HITS.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1 >= nth {
            tracing::error!(failpoint = name, "failpoint reached: aborting the process");
            std::process::abort();
        }
    }

    pub async fn apply(
        &self,
        ctx: &Ctx<'_>,
        actions: &[Action],
        now: DateTime<Utc>,
    ) -> (Outcome, Result<(), ExecError>) {
        let mut out = Outcome::default();
        for a in actions {
            if let Err(e) = self.apply_one(ctx, a, now, &mut out).await {
                return (out, Err(e));
            }
            self.failpoint(a.failpoint());
        }
        (out, Ok(()))
    }

    async fn apply_one(
        &self,
        ctx: &Ctx<'_>,
        action: &Action,
        now: DateTime<Utc>,
        out: &mut Outcome,
    ) -> Result<(), ExecError> {
        // Removing a stray container needs no identity; everything else does.
        if let Action::RemoveContainer { id } = action {
            self.runtime.remove(id).await?;
            out.done.push(format!("removed container {}", short(id)));
            return Ok(());
        }
        let record =
            ctx.observed.record.as_ref().ok_or_else(|| {
                ExecError::Precondition(format!("{} needs the workspace's record", action.describe()))
            })?;
        let uid = record.uid.as_str();
        match action {
            Action::Provision { revoke } => {
                let desired =
                    ctx.desired.ok_or_else(|| ExecError::Precondition("provision without a declaration".into()))?;
                self.provision(ctx, desired, record, *revoke, now, out).await?;
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
                let c = ctx
                    .observed
                    .container()
                    .ok_or_else(|| ExecError::Precondition("no container to write the token into".into()))?;
                let issued = self.store.issue_token(uid, record.incarnation, now).await?;
                self.vouch(&issued);
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
                let c = ctx
                    .observed
                    .container()
                    .ok_or_else(|| ExecError::Precondition("no container to write the token into".into()))?;
                let issued = self.store.issue_token(uid, record.incarnation, now).await?;
                self.vouch(&issued);
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
            Action::Forget => {
                self.store.delete_workspace(uid).await?;
                out.done.push("forgot the workspace".into());
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
    async fn provision(
        &self,
        ctx: &Ctx<'_>,
        desired: &Desired,
        record: &WorkspaceRecord,
        revoke: RevokeReason,
        now: DateTime<Utc>,
        out: &mut Outcome,
    ) -> Result<(), ExecError> {
        let spec = desired.effective().ok_or_else(|| ExecError::Precondition("invalid spec".into()))?;
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
        for c in ctx.observed.containers.iter().flatten() {
            self.runtime.remove(&c.id).await?;
        }
        self.runtime.remove(&container_name(uid)).await?;
        self.failpoint("provision-after-remove");
        cs.labels.insert(labels::INCARNATION.into(), incarnation.to_string());
        cs.labels.insert(labels::PROVISIONED_AT.into(), now.to_rfc3339_opts(chrono::SecondsFormat::Millis, true));
        let cid = self.runtime.create(&cs).await?;
        self.failpoint("provision-after-create");
        let issued = self.store.issue_token(uid, incarnation, now).await?;
        self.vouch(&issued);
        self.failpoint("provision-after-issue");
        self.runtime.write_file(&cid, CONFIGS_DIR, TOKEN_FILE, issued.plaintext.as_bytes(), 0o600).await?;
        self.failpoint("provision-after-write");
        out.issued += 1;
        out.written.push((cid.clone(), issued.row.token_hash.clone()));
        self.runtime.start(&cid).await?;
        self.failpoint("provision-after-start");
        if ctx.mode() == Some(OperatingMode::Paused) {
            self.runtime.pause(&cid).await?;
        }
        out.done.push(format!(
            "created {} (incarnation {incarnation}, image {}) with token {}…",
            cs.name, cs.image, issued.row.prefix
        ));
        Ok(())
    }
}

fn short(id: &str) -> &str {
    &id[..id.len().min(12)]
}
