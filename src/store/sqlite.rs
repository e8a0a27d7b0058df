//! SQLite store (stub, being implemented).
use super::*;
pub struct SqliteStore;
impl SqliteStore {
    pub async fn open(_path: &std::path::Path) -> StoreResult<Self> {
        Err(StoreError::Invalid("not implemented".into()))
    }
}
