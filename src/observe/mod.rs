//! What is, for one workspace: the runtime's containers (by label, from the container
//! cache), the store's record and live tokens, and the token file inside a running
//! container.

pub mod cache;
pub mod settle;
pub mod usage;

use sha2::{Digest, Sha256};

pub use cache::ContainerCache;

use crate::model::WorkspaceRecord;
use crate::model::container::{CONFIGS_DIR, TOKEN_FILE};
use crate::rules::{Observed, TokenFile};
use crate::runtime::{READ_FILE_LIMIT, Runtime};
use crate::store::{StoreResult, Tokens};

/// Observes one workspace: its containers from the container cache (None when the
/// cache is unknown: never read as "no containers"), its record and live tokens from
/// the store. The token file is not read here (see reconcile/token_memo.rs, which reads
/// it only when it may have changed). A store failure is an error (the pass stops).
pub async fn observe(
    tokens: &dyn Tokens,
    cache: &ContainerCache,
    key: &str,
    record: Option<WorkspaceRecord>,
) -> StoreResult<Observed> {
    let uid = record.as_ref().map(|r| r.uid.clone());
    let containers = cache.containers_of(key, uid.as_deref());
    if containers.is_none() {
        tracing::debug!(workspace = key, why = %cache.why_unknown(), "containers unknown; nothing will be revoked or removed until Docker can be listed");
    }
    let live_tokens = match &uid {
        Some(uid) => tokens.live_tokens(uid).await?,
        None => Vec::new(),
    };
    let mut observed = Observed {
        record,
        containers,
        live_tokens,
        token_file: TokenFile::NotRead,
        team: Default::default(),
        heartbeats_lost_at: None,
        agent: None,
        pool: Default::default(),
    };
    observed.adopt_claim();
    Ok(observed)
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
/// trimmed content, compared with token rows' hashes. A file longer than
/// `READ_FILE_LIMIT` (all the runtime reads of it) is a mismatch, whatever it starts
/// with: its untrimmed bytes' hash, which no token's is.
pub fn token_file_state(bytes: &[u8]) -> TokenFile {
    if bytes.len() > READ_FILE_LIMIT {
        return TokenFile::Hash(hex::encode(Sha256::digest(bytes)));
    }
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

    #[test]
    fn a_file_longer_than_what_is_read_never_matches_a_token() {
        let tok = crate::store::token::generate();
        let mut long = format!("{tok}\n").into_bytes();
        long.resize(READ_FILE_LIMIT + 1, b' ');
        let TokenFile::Hash(hash) = token_file_state(&long) else { panic!("a long file is not missing") };
        assert_ne!(hash, crate::store::token::hash(&tok), "the token followed by blanks is still too long");
    }
}
