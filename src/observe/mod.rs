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

/// The containers of one workspace (labelled with its key or its uid), or None (logged)
/// when listing failed. Two small listings the daemon filters: much cheaper than `list`
/// when the instance has many containers.
pub async fn list_workspace(runtime: &dyn Runtime, key: &str, uid: Option<&str>) -> Option<Vec<ContainerInfo>> {
    use crate::runtime::labels;
    let by_uid = async {
        match uid {
            Some(uid) => runtime.list_labeled(labels::UID, uid).await,
            None => Ok(Vec::new()),
        }
    };
    match tokio::join!(runtime.list_labeled(labels::WORKSPACE, key), by_uid) {
        (Ok(mut mine), Ok(by_uid)) => {
            for c in by_uid {
                if !mine.iter().any(|m| m.id == c.id) {
                    mine.push(c);
                }
            }
            Some(mine)
        }
        (Err(e), _) | (_, Err(e)) => {
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
    if read_token_file && let Some(c) = token_file_container(&obs) {
        let id = c.id.clone();
        obs.token_file = read_token(runtime, &id).await;
    }
    Ok(obs)
}

/// The container whose token file the token-file rule checks: running, of the
/// workspace's current incarnation.
pub fn token_file_container(obs: &Observed) -> Option<&ContainerInfo> {
    obs.container().filter(|c| c.state == ContainerState::Running && c.incarnation() == Some(obs.incarnation()))
}

/// Reads the token file of container `id` (Docker's archive API).
pub async fn read_token(runtime: &dyn Runtime, id: &str) -> TokenFile {
    let path = format!("{CONFIGS_DIR}/{TOKEN_FILE}");
    match runtime.read_file(id, &path).await {
        Ok(Some(bytes)) => token_file_state(&bytes),
        Ok(None) => TokenFile::Missing,
        Err(e) => TokenFile::Unreadable(e.to_string()),
    }
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
