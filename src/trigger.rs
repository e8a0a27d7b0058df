//! How the rest of the operator talks to the reconcile loop: a [`Trigger`] asks for a
//! workspace (or a resync) to be looked at, saying why ([`Why`]); every finished
//! reconcile is published as a [`Report`]. A leaf: the registry, the sources and the
//! cluster controller use it without depending on the loop itself.

use tokio::sync::{mpsc, oneshot};

use crate::api::WorkspaceStatus;
use crate::model::DecisionRecord;

/// Why a workspace is to be reconciled: what the metrics count, and what the loop may
/// do differently because of it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Why {
    /// An agent registered: it (re)started.
    AgentRegistered,
    /// An agent heartbeated while its status did not show it online yet.
    AgentHeartbeat,
    /// The registry refused the token an agent presented (401): the file may not hold
    /// what the store has.
    TokenRefused,
    /// An agent presented another workspace's token (403).
    WrongWorkspace,
    /// A secret the workspace receives (operator secret or Kubernetes Secret) changed.
    SecretChanged,
    /// `molecule-operator restart|pause|resume` (the admin API).
    CliRestart,
    CliPause,
    CliResume,
    /// A wake request (`molecule-operator wake`, the admin API, the `molecule.ai/wake`
    /// annotation, or a peer's discovery of a suspended workspace).
    Wake,
    /// The Kubernetes controller saw the object change.
    Kubernetes,
}

impl Why {
    /// The metric label and log word.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::AgentRegistered => "registry-register",
            Self::AgentHeartbeat => "registry-heartbeat",
            Self::TokenRefused => "registry-401",
            Self::WrongWorkspace => "registry-403",
            Self::SecretChanged => "secret-changed",
            Self::CliRestart => "cli-restart",
            Self::CliPause => "cli-pause",
            Self::CliResume => "cli-resume",
            Self::Wake => "wake",
            Self::Kubernetes => "kubernetes",
        }
    }

    /// Whether the token file must be read again rather than trusted as last known:
    /// the agent presented what the file holds and was refused.
    pub fn rereads_token_file(self) -> bool {
        matches!(self, Self::TokenRefused | Self::WrongWorkspace)
    }
}

impl std::fmt::Display for Why {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a resync looks at.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Resync {
    /// The workspaces whose records or tokens changed (the change log), and those whose
    /// inputs the operator cannot see change; a full sweep when that is due anyway.
    Changed,
    /// Everything: every container listed, every record and token read.
    Full,
}

/// A request to the reconcile loop.
#[derive(Debug)]
pub enum Request {
    /// Reconcile one workspace (`ns/name`); `done` is told the outcome of the first
    /// reconcile of it that starts after the request.
    Reconcile { key: String, why: Why, done: Option<oneshot::Sender<Report>> },
    /// Look at the fleet; `done` is told how many workspaces it queued.
    Resync { scope: Resync, done: Option<oneshot::Sender<usize>> },
}

/// What one finished reconcile did, for whoever writes status back to where the
/// object came from (Kubernetes status, Postgres columns) and for waiters.
#[derive(Clone, Debug, Default)]
pub struct Report {
    pub key: String,
    /// The status as written to the state store; None when the workspace is unknown
    /// or was forgotten.
    pub status: Option<WorkspaceStatus>,
    /// Decisions taken in this reconcile, in order.
    pub decisions: Vec<DecisionRecord>,
    /// The workspace's record was deleted: its removal is complete.
    pub forgotten: bool,
    /// The error that stopped it (it will be retried with backoff).
    pub error: Option<String>,
}

/// Asks for workspaces to be reconciled soon. Cheap and non-blocking; repeated
/// requests for the same key coalesce.
#[derive(Clone, Debug)]
pub struct Trigger {
    tx: mpsc::UnboundedSender<Request>,
}

impl Trigger {
    pub fn new() -> (Self, mpsc::UnboundedReceiver<Request>) {
        let (tx, rx) = mpsc::unbounded_channel();
        (Self { tx }, rx)
    }

    pub fn enqueue(&self, key: &str, why: Why) {
        let _ = self.tx.send(Request::Reconcile { key: key.to_string(), why, done: None });
    }

    /// Asks for a resync now, as the periodic one does.
    pub fn resync(&self, scope: Resync) {
        let _ = self.tx.send(Request::Resync { scope, done: None });
    }

    /// `resync`, and waits until it has decided which workspaces need a reconcile;
    /// returns how many it queued. None when the operator is shutting down.
    pub async fn resync_and_wait(&self, scope: Resync) -> Option<usize> {
        let (tx, rx) = oneshot::channel();
        self.tx.send(Request::Resync { scope, done: Some(tx) }).ok()?;
        rx.await.ok()
    }

    /// Enqueues and waits for the outcome of a reconcile that starts after this call.
    /// None when the operator is shutting down.
    pub async fn reconcile_and_wait(&self, key: &str, why: Why) -> Option<Report> {
        let (done, rx) = oneshot::channel();
        self.tx.send(Request::Reconcile { key: key.to_string(), why, done: Some(done) }).ok()?;
        rx.await.ok()
    }
}
