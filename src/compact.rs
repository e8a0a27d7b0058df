//! Compact forms of the texts the operator keeps for every workspace, so that memory
//! stays proportional to what a workspace needs (bench/scale, "RSS at 10,000").

use std::collections::HashSet;
use std::fmt;
use std::hash::Hash;
use std::sync::Arc;

/// Shares equal values: the first of each is kept, and every equal one after it gets a
/// clone of that `Arc`. Texts most workspaces have in common (an image, a network, the
/// file that declared them) are then held once, not once per workspace.
pub struct Interner<T: ?Sized>(HashSet<Arc<T>>);

impl<T: ?Sized + Eq + Hash> Default for Interner<T> {
    fn default() -> Self {
        Self(HashSet::new())
    }
}

impl<T: ?Sized + Eq + Hash> Interner<T> {
    /// The shared `Arc` equal to `value`, made by `make` the first time.
    pub fn get(&mut self, value: &T, make: impl FnOnce() -> Arc<T>) -> Arc<T> {
        if let Some(kept) = self.0.get(value) {
            return kept.clone();
        }
        let kept = make();
        self.0.insert(kept.clone());
        kept
    }

    /// `value`, or the equal one kept before it.
    pub fn share(&mut self, value: Arc<T>) -> Arc<T> {
        self.get(&value.clone(), || value)
    }
}

/// A text that is nearly always lowercase hex (a Docker container id, a sha256 of a
/// token, a spec hash), kept as its bytes: a 64-digit id as a `String` is a
/// 64-byte allocation that malloc rounds to 80, plus the 24-byte `String`; as `Hex`
/// it is 34 bytes inline and no allocation. Any other text is kept as it is, so
/// `Hex::new(s).to_string() == s` always holds.
#[derive(Clone, PartialEq, Eq, Hash)]
pub enum Hex {
    /// Lowercase hex of `len` bytes (at most 32), the first `len` of `bytes`.
    Bytes {
        len: u8,
        bytes: [u8; 32],
    },
    Text(Box<str>),
}

impl Hex {
    pub fn new(text: &str) -> Self {
        let lower_hex = |b: &u8| b.is_ascii_digit() || (b'a'..=b'f').contains(b);
        let mut bytes = [0u8; 32];
        let len = text.len() / 2;
        if text.len().is_multiple_of(2)
            && len <= bytes.len()
            && text.bytes().all(|b| lower_hex(&b))
            && hex::decode_to_slice(text, &mut bytes[..len]).is_ok()
        {
            return Self::Bytes { len: len as u8, bytes };
        }
        Self::Text(text.into())
    }

    /// Whether this is the same text as `text`.
    pub fn is(&self, text: &str) -> bool {
        *self == Self::new(text)
    }
}

impl fmt::Display for Hex {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Text(t) => f.write_str(t),
            Self::Bytes { len, bytes } => {
                for b in &bytes[..usize::from(*len)] {
                    write!(f, "{b:02x}")?;
                }
                Ok(())
            }
        }
    }
}

impl fmt::Debug for Hex {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.to_string())
    }
}

impl From<&str> for Hex {
    fn from(text: &str) -> Self {
        Self::new(text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn an_interner_hands_out_one_arc_per_distinct_value() {
        let mut pool = Interner::<str>::default();
        let a = pool.share(Arc::from("molecule-agent:local"));
        let b = pool.share(Arc::from("molecule-agent:local"));
        let c = pool.get("host", || Arc::from("host"));
        assert!(Arc::ptr_eq(&a, &b));
        assert!(!Arc::ptr_eq(&a, &c));
        assert_eq!((&*a, &*c), ("molecule-agent:local", "host"));
    }

    #[test]
    fn hex_texts_are_kept_as_bytes_and_read_back_the_same() {
        let id = "4f1c0d9e2b7a6c5d8e9f0a1b2c3d4e5f60718293a4b5c6d7e8f9012345678901";
        assert!(matches!(Hex::new(id), Hex::Bytes { len: 32, .. }));
        assert!(matches!(Hex::new("0123456789abcdef"), Hex::Bytes { len: 8, .. }));
        for text in [id, "0123456789abcdef", "", "c1", "ABCDEF", "abc", &format!("{id}00")] {
            let h = Hex::new(text);
            assert_eq!(h.to_string(), text);
            assert!(h.is(text), "{text}");
        }
        assert!(matches!(Hex::new("ABCDEF"), Hex::Text(_)), "uppercase stays text: it reads back as written");
        assert!(!Hex::new("abcdef").is("ABCDEF"));
        assert!(!Hex::new("abcdef").is("abcdef00"));
        assert!(!Hex::new("c1").is("c2"));
        assert!(std::mem::size_of::<Hex>() <= 40);
    }

    proptest! {
        #[test]
        fn any_text_reads_back_as_written_and_equals_only_itself(a in ".{0,70}|[0-9a-f]{0,66}", b in ".{0,70}|[0-9a-f]{0,66}") {
            let h = Hex::new(&a);
            prop_assert_eq!(h.to_string(), a.clone());
            prop_assert!(h.is(&a));
            prop_assert_eq!(h.is(&b), a == b);
            prop_assert_eq!(h == Hex::new(&b), a == b);
        }
    }
}
