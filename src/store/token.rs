//! Token material: 32 random bytes from the OS, base64url without padding (43 chars),
//! stored only as sha256 hex plus an 8-character display prefix.

use base64::Engine;
use sha2::{Digest, Sha256};

pub const TOKEN_LEN: usize = 43;
pub const PREFIX_LEN: usize = 8;

/// A new plaintext token.
pub fn generate() -> String {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).expect("the OS random source is available");
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// sha256 hex of the plaintext: the only form stored or compared.
pub fn hash(plaintext: &str) -> String {
    hex::encode(Sha256::digest(plaintext.as_bytes()))
}

pub fn prefix(plaintext: &str) -> String {
    plaintext.chars().take(PREFIX_LEN).collect()
}

/// Whether `s` has the shape of one of our tokens (cheap reject before any lookup).
pub fn well_formed(s: &str) -> bool {
    s.len() == TOKEN_LEN && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_43_base64url_chars_and_unique() {
        let a = generate();
        let b = generate();
        assert_eq!(a.len(), TOKEN_LEN);
        assert!(well_formed(&a));
        assert_ne!(a, b);
        assert_eq!(prefix(&a).len(), 8);
        assert_eq!(hash(&a).len(), 64);
        assert_ne!(hash(&a), hash(&b));
        assert!(!well_formed("short"));
        assert!(!well_formed(&format!("{}!", &a[..42])));
    }
}
