//! A sealed secret as the stores keep it (the secrets module seals and opens them):
//! never its plaintext.

use chrono::{DateTime, Utc};

/// A sealed secret as stored (see the secrets module); never its plaintext.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SecretRow {
    pub scope: String,
    pub name: String,
    pub key_id: String,
    pub nonce: String,
    pub ciphertext: String,
    pub version: i64,
    pub updated_at: DateTime<Utc>,
}
