//! A workspace's auth tokens as the operator knows them: their rows (never the
//! plaintext, but at the moment of issue), why one was revoked, and what a presented
//! token resolves to. (Token material itself, generation and hashing, is
//! store::token.)

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// Why a token was revoked. Every revocation records one.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RevokeReason {
    /// A new incarnation replaced the container.
    Reprovision,
    /// Live token, no container, past the stale grace (the original sweeper's rule).
    ContainerMissing,
    /// The container's token file is missing or holds no live token.
    TokenFileMismatch,
    /// The workspace is declared no more.
    Deleted,
    Paused,
    Stopped,
    Rotated,
    /// Reissued as the workspace resumed (tokenPolicy.onResume: Reissue).
    Resumed,
    /// The token belongs to an older incarnation than the workspace's current one.
    Superseded,
}

impl RevokeReason {
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Reprovision => "reprovision",
            Self::ContainerMissing => "container-missing",
            Self::TokenFileMismatch => "token-file-mismatch",
            Self::Deleted => "deleted",
            Self::Paused => "paused",
            Self::Stopped => "stopped",
            Self::Rotated => "rotated",
            Self::Resumed => "resumed",
            Self::Superseded => "superseded",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        [
            Self::Reprovision,
            Self::ContainerMissing,
            Self::TokenFileMismatch,
            Self::Deleted,
            Self::Paused,
            Self::Stopped,
            Self::Rotated,
            Self::Resumed,
            Self::Superseded,
        ]
        .into_iter()
        .find(|r| r.as_str() == s)
    }
}

impl std::fmt::Display for RevokeReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One row of `workspace_auth_tokens`. The plaintext is never stored.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TokenRow {
    pub id: String,
    pub workspace_uid: String,
    /// sha256 of the plaintext, lowercase hex.
    pub token_hash: String,
    /// First 8 characters of the plaintext, for display.
    pub prefix: String,
    pub incarnation: i64,
    pub created_at: DateTime<Utc>,
    pub last_used_at: Option<DateTime<Utc>>,
    pub revoked_at: Option<DateTime<Utc>>,
    pub revoke_reason: Option<String>,
    /// Set when the token was rotated out: it stays valid until then (the overlap).
    pub expires_at: Option<DateTime<Utc>>,
}

impl TokenRow {
    /// Still accepted at `now`: live and not past its overlap.
    pub fn valid_at(&self, now: DateTime<Utc>) -> bool {
        self.is_live() && self.expires_at.is_none_or(|e| e > now)
    }

    pub fn is_live(&self) -> bool {
        self.revoked_at.is_none()
    }
    /// COALESCE(last_used_at, created_at), as the original sweeper.
    pub fn last_activity(&self) -> DateTime<Utc> {
        self.last_used_at.unwrap_or(self.created_at)
    }
}

/// A freshly issued token: the only moment its plaintext exists outside the container.
pub struct IssuedToken {
    pub plaintext: String,
    pub row: TokenRow,
}

impl std::fmt::Debug for IssuedToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IssuedToken").field("prefix", &self.row.prefix).finish_non_exhaustive()
    }
}

/// What a presented token resolves to (hash lookup, live rows only).
#[derive(Clone, Debug, PartialEq)]
pub struct TokenOwner {
    pub token_id: String,
    pub workspace_uid: String,
    pub workspace_key: String,
    pub token_incarnation: i64,
    pub current_incarnation: i64,
    /// A rotated-out token is refused after this.
    pub expires_at: Option<DateTime<Utc>>,
    /// Whether the workspace's last written status shows its agent online
    /// ([`shows_agent_online`](super::shows_agent_online)); None when no status was
    /// written since this was recorded (a state from before migration 0005/0007):
    /// read the status to know.
    pub agent_online: Option<bool>,
}
