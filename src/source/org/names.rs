//! Object names for an org template's display names ("MeDo Builder" -> `medo-builder`):
//! deterministic, always a valid DNS-1123 label, the display name kept as an annotation.

use sha2::{Digest, Sha256};

/// Longest DNS-1123 label.
const MAX_LEN: usize = 63;

/// The object name for a display name: lower case, every run of other characters one
/// `-`, no `-` at either end. A name that loses everything (say only CJK characters)
/// becomes `ws-` plus 8 hex of its sha256; one longer than 63 characters is cut and
/// given the same 8 hex, so two long names that share a prefix still differ.
pub fn object_name(display: &str) -> String {
    let mut out = String::with_capacity(display.len());
    for c in display.chars() {
        let c = c.to_ascii_lowercase();
        if c.is_ascii_lowercase() || c.is_ascii_digit() {
            out.push(c);
        } else if !out.ends_with('-') {
            out.push('-');
        }
    }
    let trimmed = out.trim_matches('-');
    let digest = || hex::encode(Sha256::digest(display.as_bytes()))[..8].to_string();
    if trimmed.is_empty() {
        return format!("ws-{}", digest());
    }
    if trimmed.len() > MAX_LEN {
        let cut = trimmed[..MAX_LEN - 9].trim_end_matches('-');
        return format!("{cut}-{}", digest());
    }
    trimmed.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::validate::dns1123_label;

    #[test]
    fn display_names_map_to_labels() {
        assert_eq!(object_name("MeDo Builder"), "medo-builder");
        assert_eq!(object_name("dev-lead"), "dev-lead");
        assert_eq!(object_name("  QA / Release Eng.  "), "qa-release-eng");
        assert_eq!(object_name("Back_End (v2)"), "back-end-v2");
        assert_eq!(object_name("研发"), object_name("研发"), "deterministic");
        assert!(object_name("研发").starts_with("ws-"));
        assert_ne!(object_name("研发"), object_name("测试"));
        let long = "A".repeat(100);
        assert_eq!(object_name(&long).len(), 63);
        assert_ne!(object_name(&long), object_name(&format!("{long}B")));
        for n in ["MeDo Builder", "研发", &long, "-x-", "Ünïcödé Team"] {
            assert!(dns1123_label(&object_name(n)).is_ok(), "{n} -> {}", object_name(n));
        }
    }
}
