//! Where state lives: workspace identities and incarnations, token rows, heartbeats,
//! status, sealed secrets, the decision log and the local Kubernetes API's objects.
//! One trait per role ([`Workspaces`], [`Tokens`], [`Heartbeats`], [`Secrets`],
//! [`DecisionLog`], [`AgentReports`], [`Objects`]; [`Store`] is all of them, as the wiring holds it),
//! one SQL store (sql.rs) with a dialect per database (sqlite.rs, postgres.rs), one
//! conformance suite (tests/store_conformance.rs) run against both. The types the
//! rest of the operator reads (token rows, workspace records, ...) are crate::model's.

pub mod heartbeats;
pub mod lease;
pub mod lookups;
pub mod postgres;
pub mod sql;
pub mod sqlite;
pub mod token;
pub mod url;

use std::sync::Arc;

use async_trait::async_trait;
use chrono::{DateTime, Utc};

use crate::api::{OperatingMode, Phase, WorkspaceStatus};
use crate::model::{
    AgentReport, DecisionRecord, Heartbeat, IssuedToken, RevokeReason, SecretRow, TokenOwner, TokenRow, WorkspaceRecord,
};
pub use url::DatabaseUrl;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("the state database is unreachable or failed: {0}")]
    Database(#[from] sqlx::Error),
    #[error("state database migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("{0}")]
    Invalid(String),
    /// Another operator instance works on this database: acting would fight it.
    #[error("{0}")]
    OtherInstance(String),
}

impl StoreError {
    pub fn metric_label(&self) -> &'static str {
        match self {
            Self::Database(_) => "store_database",
            Self::Migrate(_) => "store_migrate",
            Self::Invalid(_) => "store_invalid",
            Self::OtherInstance(_) => "store_other_instance",
        }
    }
}

pub type StoreResult<T> = Result<T, StoreError>;

/// When the registry last failed to record an agent's heartbeat because the state
/// store failed (unreachable, restarting, locked). Until then an agent's silence in
/// the store may be the store's, not the agent's: the heartbeat rule counts silence
/// only from the later of the last recorded heartbeat and this moment, so healthy
/// agents are not restarted (and their tokens revoked) for an outage of the
/// operator's own database. Shared by the registry (which notes) and the reconciler
/// (which reads).
#[derive(Debug, Default)]
pub struct LostHeartbeats(std::sync::Mutex<Option<DateTime<Utc>>>);

impl LostHeartbeats {
    /// A heartbeat could not be recorded at `at`.
    pub fn note(&self, at: DateTime<Utc>) {
        let mut last = self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if last.is_none_or(|t| t < at) {
            *last = Some(at);
        }
    }

    /// The last time a heartbeat could not be recorded, if ever.
    pub fn last(&self) -> Option<DateTime<Utc>> {
        *self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// What [`Workspaces::take_changes`] returns.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Changes {
    /// Workspaces whose record or token rows changed.
    pub keys: std::collections::BTreeSet<String>,
    /// A secret changed: every workspace may be affected.
    pub secrets: bool,
}

/// Workspace records: identity (uid, given on first sight), incarnation, the restart
/// budget, the CLI's overrides (operating mode, restart requests), the status, and
/// the change log the resync sweep reads.
#[async_trait]
pub trait Workspaces: Send + Sync {
    /// Returns the record for `key`, creating it (new uuid, incarnation 0) on first sight.
    async fn ensure_workspace(&self, key: &str, now: DateTime<Utc>) -> StoreResult<WorkspaceRecord>;
    async fn workspace(&self, key: &str) -> StoreResult<Option<WorkspaceRecord>>;
    /// The record for `key` with what its agent last reported (`AgentReports`), in one
    /// query: what a reconcile reads of a workspace every time.
    async fn workspace_with_report(&self, key: &str) -> StoreResult<Option<(WorkspaceRecord, Option<AgentReport>)>>;
    async fn workspace_by_uid(&self, uid: &str) -> StoreResult<Option<WorkspaceRecord>>;
    async fn list_workspaces(&self) -> StoreResult<Vec<WorkspaceRecord>>;
    /// Records without their status (`status: None`), with the phase that status shows:
    /// what the resync sweep reads, without decoding n statuses. `keys`: None for every
    /// record, or only these (a key with no record is left out).
    async fn list_workspaces_brief(
        &self,
        keys: Option<&[String]>,
    ) -> StoreResult<Vec<(WorkspaceRecord, Option<Phase>)>>;
    /// Takes the change log (see migrations/*/`*_change_log.sql`): the keys of workspaces
    /// whose record or token rows changed, other than by heartbeats and status writes,
    /// since the last call, each change returned once. The resync sweep looks at these.
    async fn take_changes(&self) -> StoreResult<Changes>;
    /// Increments and returns the incarnation.
    async fn bump_incarnation(&self, uid: &str) -> StoreResult<i64>;
    /// Counts a heartbeat-rule restart (restart budget) with its reason.
    async fn record_restart(&self, uid: &str, reason: &str, at: DateTime<Utc>) -> StoreResult<()>;
    /// Resets the restart budget (the agent came back).
    async fn reset_restarts(&self, uid: &str) -> StoreResult<()>;
    /// Sets (or clears, with None) the CLI's operating-mode override.
    async fn set_mode_override(&self, uid: &str, mode: Option<OperatingMode>) -> StoreResult<()>;
    /// Records a wake request (kept when a later one is stored already).
    async fn request_wake(&self, uid: &str, at: DateTime<Utc>) -> StoreResult<()>;
    /// Writes the lifecycle autopilot's bookkeeping (rules::suspend).
    async fn save_lifecycle(&self, uid: &str, state: &crate::model::LifecycleState) -> StoreResult<()>;
    /// Records a CLI restart request.
    async fn request_restart(&self, uid: &str, at: DateTime<Utc>) -> StoreResult<()>;
    /// Writes the status whole.
    async fn save_status(&self, uid: &str, status: &WorkspaceStatus) -> StoreResult<()>;
    /// Forgets the workspace (after its container and volume are gone). Token rows stay,
    /// revoked, for audit.
    async fn delete_workspace(&self, uid: &str) -> StoreResult<()>;
    /// Gives the workspace `key` (record `uid`, never provisioned) the identity of the
    /// warm-pool member `member_uid`: its uid, incarnation 1 and `claim`. None when it
    /// cannot (provisioned meanwhile, or the member is someone else's already).
    async fn claim_member(
        &self,
        key: &str,
        uid: &str,
        member_uid: &str,
        claim: &crate::model::Claim,
    ) -> StoreResult<Option<WorkspaceRecord>>;
    /// The claim is carried out (its files are written): stores it with
    /// `Claim::pending` cleared. Nothing when the record holds no claim any more.
    async fn complete_claim(&self, uid: &str, claim: &crate::model::Claim) -> StoreResult<()>;
}

/// A workspace's auth tokens: issued, read, expired, revoked, and the owners of
/// presented ones. (Revoking the stale ones is [`Heartbeats`]': it reads their clocks.)
#[async_trait]
pub trait Tokens: Send + Sync {
    /// Issues a token for `incarnation`: 32 random bytes, base64url, stored as sha256 hex.
    async fn issue_token(&self, uid: &str, incarnation: i64, now: DateTime<Utc>) -> StoreResult<IssuedToken>;
    /// Live (not revoked) tokens of a workspace, oldest first.
    async fn live_tokens(&self, uid: &str) -> StoreResult<Vec<TokenRow>>;
    /// Live tokens by workspace uid, oldest first, of every workspace (None) or of these
    /// uids: the resync sweep's one query instead of one per workspace.
    async fn all_live_tokens(&self, uids: Option<&[String]>) -> StoreResult<Vec<TokenRow>>;
    /// Every token row of a workspace, newest first, at most `limit`.
    async fn token_history(&self, uid: &str, limit: i64) -> StoreResult<Vec<TokenRow>>;
    /// Revokes the workspace's live tokens except `keep`; returns how many.
    async fn revoke_tokens(
        &self,
        uid: &str,
        reason: RevokeReason,
        keep: Option<&str>,
        now: DateTime<Utc>,
    ) -> StoreResult<u64>;
    /// Revokes one live token of the workspace; returns 1, or 0 if it was not live.
    async fn revoke_token(
        &self,
        uid: &str,
        token_id: &str,
        reason: RevokeReason,
        now: DateTime<Utc>,
    ) -> StoreResult<u64>;
    /// Rotation: the live token stays valid until `at`, then is refused (and revoked).
    async fn expire_token(&self, uid: &str, token_id: &str, at: DateTime<Utc>) -> StoreResult<u64>;
    /// The owner of each hash that is a live token, with its hash, in one query (in no
    /// particular order; unknown and revoked hashes are left out). The registry answers
    /// concurrent requests with it (store::lookups).
    async fn token_owners(&self, token_hashes: &[String]) -> StoreResult<Vec<(String, TokenOwner)>>;
    /// Resolves a presented token by its hash; live rows only. Does not touch it.
    /// ([`Tokens::token_owners`] of one; not overridden.)
    async fn token_owner(&self, token_hash: &str) -> StoreResult<Option<TokenOwner>> {
        let mut found = self.token_owners(std::slice::from_ref(&token_hash.to_string())).await?;
        Ok(found.pop().map(|(_, owner)| owner))
    }
}

/// The heartbeat clocks (a token's last use, a workspace's last heartbeat): the
/// writes that move them forward, and the one write decided by them, revoking the
/// tokens they show stale. The registry's batching (store::heartbeats::Coalescing)
/// takes this whole role and no other: it holds heartbeats back, so a stale-token
/// revoke must go through it to write them first.
#[async_trait]
pub trait Heartbeats: Send + Sync {
    /// Heartbeats written at once, in one statement (see store::heartbeats): for each
    /// token still live, its last use, and so its workspace's last heartbeat, moves
    /// forward to the heartbeat's time (never back; a revoked token is not touched).
    /// Returns how many tokens' times moved.
    async fn record_heartbeats(&self, beats: &[Heartbeat]) -> StoreResult<u64>;
    /// A successful heartbeat that may be written a little later: the stores write it
    /// at once; [`heartbeats::Coalescing`] buffers it and writes it in a batch.
    async fn note_heartbeat(&self, token_id: &str, uid: &str, at: DateTime<Utc>) -> StoreResult<()>;
    /// Revokes live tokens whose last use (else creation) is before `cutoff`. The
    /// condition is evaluated in the UPDATE, so a heartbeat landing after the caller
    /// looked wins; so does every heartbeat noted before this call.
    async fn revoke_stale_tokens(
        &self,
        uid: &str,
        cutoff: DateTime<Utc>,
        reason: RevokeReason,
        now: DateTime<Utc>,
    ) -> StoreResult<u64>;
    /// A register, or a heartbeat that must be seen at once: written now.
    /// ([`Heartbeats::record_heartbeats`] of one; not overridden.)
    async fn record_heartbeat(&self, token_id: &str, uid: &str, at: DateTime<Utc>) -> StoreResult<()> {
        let beat = Heartbeat { token_id: token_id.to_string(), workspace_uid: uid.to_string(), at };
        self.record_heartbeats(std::slice::from_ref(&beat)).await.map(|_| ())
    }
}

/// Sealed secrets (crate::secrets seals and opens them).
#[async_trait]
pub trait Secrets: Send + Sync {
    /// Stores a sealed secret (insert or replace); returns its new version.
    async fn put_secret(
        &self,
        scope: &str,
        name: &str,
        sealed: &crate::secrets::Sealed,
        now: DateTime<Utc>,
    ) -> StoreResult<i64>;
    /// Secrets of the given scopes (all scopes when empty), by scope then name.
    async fn secrets(&self, scopes: &[String]) -> StoreResult<Vec<SecretRow>>;
    /// Deletes a secret; false when there was none.
    async fn delete_secret(&self, scope: &str, name: &str) -> StoreResult<bool>;
}

/// What each workspace's agent last reported to the registry (crate::model::AgentReport).
/// Forgotten with the workspace.
#[async_trait]
pub trait AgentReports: Send + Sync {
    /// Writes the workspace's report whole.
    async fn save_agent_report(&self, uid: &str, report: &AgentReport) -> StoreResult<()>;
    /// The workspace's last report, if its agent ever reported.
    async fn agent_report(&self, uid: &str) -> StoreResult<Option<AgentReport>>;
}

/// The last decisions per workspace, for `describe`.
#[async_trait]
pub trait DecisionLog: Send + Sync {
    /// Appends a decision and keeps only the workspace's last `keep_last`.
    async fn append_decision(&self, uid: &str, decision: &DecisionRecord, keep_last: i64) -> StoreResult<()>;
    /// Newest first.
    async fn decisions(&self, uid: &str, limit: i64) -> StoreResult<Vec<DecisionRecord>>;
    /// The fleet's last `limit` decisions with their workspace's key, newest first
    /// (`events`): one query, whatever the fleet's size.
    async fn recent_decisions(&self, limit: i64) -> StoreResult<Vec<(String, DecisionRecord)>>;
}

/// Objects of the local Kubernetes-compatible API (src/kubeapi). Every write bumps
/// one global revision in its own transaction; the object takes that value as its
/// resource_version (also written into body.metadata.resourceVersion).
#[async_trait]
pub trait Objects: Send + Sync {
    async fn get_object(&self, kind: &str, namespace: &str, name: &str) -> StoreResult<Option<StoredObject>>;
    /// Objects of `kind` (in `namespace`, or all), ordered by namespace and name, and
    /// the revision they were read at.
    async fn list_objects(&self, kind: &str, namespace: Option<&str>) -> StoreResult<(Vec<StoredObject>, i64)>;
    /// Writes `object` whole. `expected` None creates (Conflict if it exists);
    /// Some(rv) updates only if the stored resource_version is still rv.
    async fn put_object(&self, object: &StoredObject, expected: Option<i64>) -> StoreResult<ObjectWrite>;
    /// Removes an object (only if its resource_version is `expected`, when given);
    /// returns it with the resource_version of the deletion.
    async fn delete_object(
        &self,
        kind: &str,
        namespace: &str,
        name: &str,
        expected: Option<i64>,
    ) -> StoreResult<ObjectWrite>;
    /// The current global revision (0 before any object write).
    async fn object_revision(&self) -> StoreResult<i64>;
}

/// The whole store, every role: what the operator's wiring holds and hands out.
/// A caller that needs one role asks for that role (`&dyn Tokens`, `Arc<dyn
/// Objects>`); a `DynStore` coerces to it.
#[async_trait]
pub trait Store: Workspaces + Tokens + Heartbeats + Secrets + DecisionLog + AgentReports + Objects + 'static {
    /// Cheap liveness query (for /readyz).
    async fn ping(&self) -> StoreResult<()>;
    /// This store (the same connections) with its heartbeat role taken by
    /// `heartbeats`: how the operator puts the registry's batching in front of it
    /// (store::heartbeats). `self` keeps writing its own heartbeats, which is what
    /// `heartbeats` must write through.
    fn with_heartbeats(&self, heartbeats: Arc<dyn Heartbeats>) -> DynStore;
}

/// One object of the local Kubernetes API: the whole object as JSON plus the
/// metadata the API server works on.
#[derive(Clone, Debug, PartialEq)]
pub struct StoredObject {
    pub kind: String,
    pub namespace: String,
    pub name: String,
    pub uid: String,
    pub resource_version: i64,
    pub generation: i64,
    /// RFC 3339, as in the body.
    pub creation_timestamp: String,
    pub deletion_timestamp: Option<String>,
    pub body: serde_json::Value,
}

/// What an object write did.
#[derive(Clone, Debug, PartialEq)]
pub enum ObjectWrite {
    /// Written (or, for a delete, removed); carries the new resource_version.
    Written(StoredObject),
    /// The precondition failed: `current` is the stored resource_version (None: absent).
    Conflict { current: Option<i64> },
}

/// The whole store, as the wiring holds and shares it.
pub type DynStore = Arc<dyn Store>;

/// Opens the store a URL names (see `url::DatabaseUrl`: an unknown scheme is an error).
pub async fn open(url: &str) -> StoreResult<DynStore> {
    open_url(&DatabaseUrl::parse(url).map_err(StoreError::Invalid)?).await
}

/// Opens (and migrates) the store `url` names.
pub async fn open_url(url: &DatabaseUrl) -> StoreResult<DynStore> {
    match url {
        DatabaseUrl::Postgres(url) => Ok(Arc::new(postgres::PostgresStore::connect(url).await?)),
        DatabaseUrl::Sqlite(path) => Ok(Arc::new(sqlite::SqliteStore::open(path).await?)),
    }
}
