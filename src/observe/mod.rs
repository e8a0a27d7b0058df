//! What is, for one workspace: the runtime's containers (by label), the store's
//! record and live tokens, and the token file inside a running container.

use sha2::{Digest, Sha256};

use crate::rules::{ContainerState, Observed, TokenFile};
use crate::runtime::{CONFIGS_DIR, ContainerInfo, Runtime, TOKEN_FILE};
use crate::store::{Store, StoreResult, WorkspaceRecord};

/// Containers of this workspace: those labelled with its key or its uid.
pub fn containers_of(all: &[ContainerInfo], key: &str, uid: Option<&str>) -> Vec<ContainerInfo> {
    all.iter().filter(|c| c.workspace() == Some(key) || (uid.is_some() && c.uid() == uid)).cloned().collect()
}

/// Every container of this operator instance, or None (logged) when listing failed:
/// unknown, never empty.
pub async fn list(runtime: &dyn Runtime, key: &str) -> Option<Vec<ContainerInfo>> {
    match runtime.list().await {
        Ok(all) => Some(all),
        Err(e) => {
            tracing::warn!(workspace = key, error = %e, "listing containers failed; nothing will be revoked or removed until it works");
            None
        }
    }
}

/// Observes one workspace from a listing of all containers (`list`). A failed
/// listing is recorded as `containers: None` (unknown), never as empty; a store
/// failure is an error (the pass stops).
pub async fn observe(
    runtime: &dyn Runtime,
    store: &dyn Store,
    key: &str,
    record: Option<WorkspaceRecord>,
    all: Option<&[ContainerInfo]>,
    read_token_file: bool,
) -> StoreResult<Observed> {
    let uid = record.as_ref().map(|r| r.uid.clone());
    let containers = all.map(|all| containers_of(all, key, uid.as_deref()));
    let live_tokens = match &uid {
        Some(uid) => store.live_tokens(uid).await?,
        None => Vec::new(),
    };
    let mut obs = Observed {
        record,
        containers,
        live_tokens,
        token_file: TokenFile::NotRead,
        provisioning: false,
        quota_hold: None,
        heartbeats_lost_at: None,
    };
    if read_token_file
        && let Some(c) =
            obs.container().filter(|c| c.state == ContainerState::Running && c.incarnation() == Some(obs.incarnation()))
    {
        let path = format!("{CONFIGS_DIR}/{TOKEN_FILE}");
        obs.token_file = match runtime.read_file(&c.id, &path).await {
            Ok(Some(bytes)) => token_file_state(&bytes),
            Ok(None) => TokenFile::Missing,
            Err(e) => TokenFile::Unreadable(e.to_string()),
        };
    }
    Ok(obs)
}

/// An empty (or whitespace-only) file counts as missing; otherwise the hash of the
/// trimmed content, compared with token rows' hashes.
pub fn token_file_state(bytes: &[u8]) -> TokenFile {
    let text = String::from_utf8_lossy(bytes);
    let t = text.trim();
    if t.is_empty() { TokenFile::Missing } else { TokenFile::Hash(hex::encode(Sha256::digest(t.as_bytes()))) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_file_is_missing_and_content_hashes_like_the_store() {
        assert_eq!(token_file_state(b" \n"), TokenFile::Missing);
        let tok = crate::store::token::generate();
        assert_eq!(token_file_state(format!("{tok}\n").as_bytes()), TokenFile::Hash(crate::store::token::hash(&tok)));
    }
}
