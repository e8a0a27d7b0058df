//! Postgres store (stub, being implemented).
use super::*;
pub struct PostgresStore;
impl PostgresStore {
    pub async fn connect(_url: &str) -> StoreResult<Self> {
        Err(StoreError::Invalid("not implemented".into()))
    }
}
