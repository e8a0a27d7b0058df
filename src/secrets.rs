//! Secrets at rest: AES-256-GCM (ring) under a key from `MOLECULE_SECRETS_KEY` or the
//! key file STATE/secrets.key (0600, made on first use). Every sealed value records
//! the id of the key that sealed it, so the key can be rotated: put the old key in
//! `MOLECULE_SECRETS_OLD_KEYS` (comma-separated), and values sealed with it still open
//! until they are set again. The scope and name are the AEAD's associated data, so a
//! ciphertext moved to another slot does not open. Values never appear in logs,
//! status, errors or `describe`.

use std::path::Path;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use ring::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use sha2::{Digest, Sha256};

pub const KEY_FILE: &str = "secrets.key";

/// Where a secret applies; a workspace's value overrides its team's, which overrides
/// the global one.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum SecretScope {
    Global,
    /// `namespace/team`
    Team(String),
    /// `namespace/workspace`
    Workspace(String),
}

impl SecretScope {
    pub fn as_string(&self) -> String {
        match self {
            Self::Global => "global".into(),
            Self::Team(k) => format!("team:{k}"),
            Self::Workspace(k) => format!("workspace:{k}"),
        }
    }

    pub fn parse(s: &str) -> Result<Self, String> {
        let with_ns =
            |k: &str| if k.contains('/') { k.to_string() } else { format!("{}/{k}", crate::api::DEFAULT_NAMESPACE) };
        match s.split_once(':') {
            None if s == "global" => Ok(Self::Global),
            Some(("team", k)) if !k.is_empty() => Ok(Self::Team(with_ns(k))),
            Some(("workspace", k)) if !k.is_empty() => Ok(Self::Workspace(with_ns(k))),
            _ => Err(format!("scope {s:?}: use global, team:NAME or workspace:NAME")),
        }
    }
}

/// A sealed value as stored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Sealed {
    pub key_id: String,
    /// base64 of the 12-byte nonce.
    pub nonce: String,
    /// base64 of ciphertext and tag.
    pub ciphertext: String,
}

#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error("MOLECULE_SECRETS_KEY must be 32 bytes as base64 or 64 hex characters")]
    BadKey,
    #[error("the operating system's random source failed; no secrets key can be made")]
    NoRandom,
    #[error("cannot read or create the secrets key file {path}: {error}")]
    KeyFile { path: String, error: std::io::Error },
    #[error(
        "secret {name} ({scope}) was sealed with key {key_id}, which is not configured; add it to MOLECULE_SECRETS_OLD_KEYS"
    )]
    UnknownKey { scope: String, name: String, key_id: String },
    #[error("secret {name} ({scope}) does not decrypt: it was altered or moved")]
    Corrupt { scope: String, name: String },
}

struct Key {
    id: String,
    key: LessSafeKey,
}

impl Key {
    fn new(bytes: &[u8]) -> Result<Self, SecretError> {
        let unbound = UnboundKey::new(&AES_256_GCM, bytes).map_err(|_| SecretError::BadKey)?;
        Ok(Self { id: hex::encode(Sha256::digest(bytes))[..8].to_string(), key: LessSafeKey::new(unbound) })
    }
}

pub struct Keyring {
    current: Key,
    old: Vec<Key>,
}

fn decode_key(text: &str) -> Result<Vec<u8>, SecretError> {
    let t = text.trim();
    let bytes = if t.len() == 64 && t.bytes().all(|b| b.is_ascii_hexdigit()) {
        hex::decode(t).map_err(|_| SecretError::BadKey)?
    } else {
        B64.decode(t)
            .or_else(|_| base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(t))
            .map_err(|_| SecretError::BadKey)?
    };
    if bytes.len() != 32 {
        return Err(SecretError::BadKey);
    }
    Ok(bytes)
}

impl Keyring {
    /// The key from MOLECULE_SECRETS_KEY, else STATE/secrets.key (created 0600).
    pub fn load(state_dir: &Path) -> Result<Self, SecretError> {
        let current = match Self::key_from_env() {
            Some(v) => decode_key(&v)?,
            None => Self::key_file(state_dir)?,
        };
        Self::with_current(&current)
    }

    /// MOLECULE_SECRETS_KEY, when it is set and not empty.
    pub fn key_from_env() -> Option<String> {
        std::env::var("MOLECULE_SECRETS_KEY").ok().filter(|v| !v.trim().is_empty())
    }

    /// The key given as text (base64 or hex of 32 bytes, as MOLECULE_SECRETS_KEY),
    /// with the old keys of MOLECULE_SECRETS_OLD_KEYS. Cluster mode reads the text from
    /// a Kubernetes Secret (`cluster::secrets_key`).
    pub fn from_key_text(text: &str) -> Result<Self, SecretError> {
        Self::with_current(&decode_key(text)?)
    }

    /// A new random key as text, in the form `from_key_text` reads.
    pub fn generate_key_text() -> Result<String, SecretError> {
        let mut bytes = [0u8; 32];
        getrandom::fill(&mut bytes).map_err(|_| SecretError::NoRandom)?;
        Ok(B64.encode(bytes))
    }

    fn with_current(current: &[u8]) -> Result<Self, SecretError> {
        let old = std::env::var("MOLECULE_SECRETS_OLD_KEYS")
            .unwrap_or_default()
            .split(',')
            .filter(|s| !s.trim().is_empty())
            .map(|s| decode_key(s).and_then(|b| Key::new(&b)))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self { current: Key::new(current)?, old })
    }

    fn key_file(state_dir: &Path) -> Result<Vec<u8>, SecretError> {
        let path = state_dir.join(KEY_FILE);
        let err = |error| SecretError::KeyFile { path: path.display().to_string(), error };
        match std::fs::read_to_string(&path) {
            Ok(text) => decode_key(&text),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let mut bytes = [0u8; 32];
                getrandom::fill(&mut bytes).map_err(|e| err(std::io::Error::other(e.to_string())))?;
                use std::io::Write;
                use std::os::unix::fs::OpenOptionsExt;
                let mut f =
                    std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&path).map_err(err)?;
                f.write_all(B64.encode(bytes).as_bytes()).map_err(err)?;
                Ok(bytes.to_vec())
            }
            Err(e) => Err(err(e)),
        }
    }

    /// A keyring from raw keys (tests).
    pub fn from_keys(current: &[u8; 32], old: &[[u8; 32]]) -> Self {
        Self {
            current: Key::new(current).expect("32-byte key"),
            old: old.iter().map(|k| Key::new(k).expect("32-byte key")).collect(),
        }
    }

    pub fn current_key_id(&self) -> &str {
        &self.current.id
    }

    pub fn seal(&self, scope: &SecretScope, name: &str, plaintext: &str) -> Sealed {
        let mut nonce = [0u8; NONCE_LEN];
        getrandom::fill(&mut nonce).expect("the OS random source is available");
        let mut buf = plaintext.as_bytes().to_vec();
        let aad = format!("{}\0{name}", scope.as_string());
        self.current
            .key
            .seal_in_place_append_tag(Nonce::assume_unique_for_key(nonce), Aad::from(aad.as_bytes()), &mut buf)
            .expect("AES-GCM sealing of an in-memory buffer does not fail");
        Sealed { key_id: self.current.id.clone(), nonce: B64.encode(nonce), ciphertext: B64.encode(buf) }
    }

    pub fn open(&self, scope: &SecretScope, name: &str, sealed: &Sealed) -> Result<String, SecretError> {
        let scope_s = scope.as_string();
        let corrupt = || SecretError::Corrupt { scope: scope_s.clone(), name: name.to_string() };
        let key = std::iter::once(&self.current).chain(&self.old).find(|k| k.id == sealed.key_id).ok_or_else(|| {
            SecretError::UnknownKey { scope: scope_s.clone(), name: name.into(), key_id: sealed.key_id.clone() }
        })?;
        let nonce: [u8; NONCE_LEN] =
            B64.decode(&sealed.nonce).ok().and_then(|n| n.try_into().ok()).ok_or_else(corrupt)?;
        let mut buf = B64.decode(&sealed.ciphertext).map_err(|_| corrupt())?;
        let aad = format!("{scope_s}\0{name}");
        let plain = key
            .key
            .open_in_place(Nonce::assume_unique_for_key(nonce), Aad::from(aad.as_bytes()), &mut buf)
            .map_err(|_| corrupt())?;
        String::from_utf8(plain.to_vec()).map_err(|_| corrupt())
    }
}

/// Kubernetes Secrets as the operator can read them. Cluster mode reflects them
/// (`cluster::secrets`); other modes have none, and `envFrom` there says so.
pub trait SecretObjects: Send + Sync {
    fn lookup(&self, namespace: &str, name: &str) -> SecretLookup;
}

/// One Secret's state, as far as the operator knows.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SecretLookup {
    /// The first list of Secrets has not come back yet: unknown, not missing.
    NotListedYet,
    Missing,
    /// Its data, decoded.
    Found(std::collections::BTreeMap<String, String>),
    /// It exists but cannot become env (e.g. a value that is not UTF-8); says why.
    Unusable(String),
}

/// What a workspace's `envFrom` yields: the variables, and why the workspace must
/// wait when a Secret it needs cannot be read (never its values).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EnvFrom {
    pub env: std::collections::BTreeMap<String, String>,
    pub hold: Option<String>,
}

/// Reads every `envFrom` Secret in order (later keys win). Optional Secrets that are
/// missing add nothing; anything else that is not found holds the workspace.
pub fn env_from(namespace: &str, refs: &[crate::api::EnvFromSource], objects: Option<&dyn SecretObjects>) -> EnvFrom {
    let mut out = EnvFrom::default();
    let mut problems = Vec::new();
    for r in refs {
        let name = &r.secret_ref.name;
        let lookup = match objects {
            Some(o) => o.lookup(namespace, name),
            None => SecretLookup::Missing,
        };
        match lookup {
            SecretLookup::Found(data) => {
                let prefix = r.prefix.as_deref().unwrap_or("");
                out.env.extend(data.into_iter().map(|(k, v)| (format!("{prefix}{k}"), v)));
            }
            SecretLookup::Missing if r.secret_ref.optional => {}
            SecretLookup::Missing if objects.is_none() => problems.push(format!(
                "Secret {namespace}/{name} cannot be read: Kubernetes Secrets are read only in Kubernetes mode; \
                 here, set the values with `molecule-operator secret set`"
            )),
            SecretLookup::Missing => problems.push(format!("Secret {namespace}/{name} not found")),
            SecretLookup::NotListedYet => problems.push("Kubernetes Secrets are not listed yet".to_string()),
            SecretLookup::Unusable(why) => problems.push(format!("Secret {namespace}/{name}: {why}")),
        }
    }
    problems.dedup();
    if !problems.is_empty() {
        out.hold = Some(problems.join("; "));
    }
    out
}

/// Secret names become environment variable names.
pub fn valid_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 128
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
        && !name.as_bytes()[0].is_ascii_digit();
    if ok {
        Ok(())
    } else {
        Err(format!("secret name {name:?}: use letters, digits and _ (an env var name, e.g. OPENAI_API_KEY)"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seal_open_round_trip_bound_to_scope_and_name() {
        let k = Keyring::from_keys(&[7; 32], &[]);
        let s = k.seal(&SecretScope::Global, "API_KEY", "sk-secret");
        assert!(!s.ciphertext.contains("sk-secret"));
        assert_eq!(k.open(&SecretScope::Global, "API_KEY", &s).unwrap(), "sk-secret");
        assert!(matches!(k.open(&SecretScope::Global, "OTHER", &s), Err(SecretError::Corrupt { .. })));
        assert!(matches!(
            k.open(&SecretScope::Team("default/eng".into()), "API_KEY", &s),
            Err(SecretError::Corrupt { .. })
        ));
        assert_ne!(k.seal(&SecretScope::Global, "API_KEY", "sk-secret").nonce, s.nonce, "fresh nonce every time");
    }

    #[test]
    fn rotated_keys_still_open_old_values_and_errors_never_show_values() {
        let old = Keyring::from_keys(&[1; 32], &[]);
        let sealed = old.seal(&SecretScope::Global, "A", "v1-value");
        let new = Keyring::from_keys(&[2; 32], &[[1; 32]]);
        assert_eq!(new.open(&SecretScope::Global, "A", &sealed).unwrap(), "v1-value");
        let without = Keyring::from_keys(&[2; 32], &[]);
        let err = without.open(&SecretScope::Global, "A", &sealed).unwrap_err().to_string();
        assert!(err.contains(&sealed.key_id) && !err.contains("v1-value"), "{err}");
    }

    struct Objects(std::collections::BTreeMap<(&'static str, &'static str), SecretLookup>);
    impl SecretObjects for Objects {
        fn lookup(&self, namespace: &str, name: &str) -> SecretLookup {
            self.0
                .iter()
                .find(|((n, m), _)| *n == namespace && *m == name)
                .map_or(SecretLookup::Missing, |(_, l)| l.clone())
        }
    }

    fn from(name: &str, optional: bool, prefix: Option<&str>) -> crate::api::EnvFromSource {
        crate::api::EnvFromSource {
            secret_ref: crate::api::SecretEnvSource { name: name.into(), optional },
            prefix: prefix.map(str::to_string),
        }
    }

    fn data(pairs: &[(&str, &str)]) -> SecretLookup {
        SecretLookup::Found(pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect())
    }

    #[test]
    fn env_from_reads_secrets_in_order_with_prefixes_and_holds_on_a_missing_one() {
        let objects = Objects(
            [
                (("ns", "a"), data(&[("KEY", "from-a"), ("ONLY_A", "1")])),
                (("ns", "b"), data(&[("KEY", "from-b")])),
                (("ns", "bin"), SecretLookup::Unusable("key BLOB is not UTF-8 text".into())),
            ]
            .into(),
        );
        let got = env_from(
            "ns",
            &[from("a", false, None), from("b", false, None), from("a", false, Some("X_"))],
            Some(&objects),
        );
        assert_eq!(got.hold, None);
        assert_eq!(got.env["KEY"], "from-b", "a later Secret wins");
        assert_eq!(got.env["X_KEY"], "from-a");
        assert_eq!(got.env["ONLY_A"], "1");

        let got = env_from("ns", &[from("gone", true, None), from("a", false, None)], Some(&objects));
        assert_eq!((got.hold, got.env.len()), (None, 2), "a missing optional Secret adds nothing");

        let got = env_from("ns", &[from("gone", false, None), from("bin", false, None)], Some(&objects));
        assert_eq!(got.hold.as_deref(), Some("Secret ns/gone not found; Secret ns/bin: key BLOB is not UTF-8 text"));
        let got = env_from("other", &[from("a", false, None)], Some(&objects));
        assert_eq!(got.hold.as_deref(), Some("Secret other/a not found"), "only the workspace's namespace");
    }

    #[test]
    fn env_from_outside_kubernetes_mode_says_where_values_go_instead() {
        let got = env_from("default", &[from("keys", false, None)], None);
        assert!(got.hold.unwrap().contains("molecule-operator secret set"));
        assert_eq!(env_from("default", &[from("keys", true, None)], None), EnvFrom::default());
    }

    #[test]
    fn scopes_and_names() {
        assert_eq!(SecretScope::parse("team:eng").unwrap(), SecretScope::Team("default/eng".into()));
        assert_eq!(SecretScope::parse("workspace:ns/dev").unwrap().as_string(), "workspace:ns/dev");
        assert!(SecretScope::parse("planet:x").is_err());
        assert!(valid_name("OPENAI_API_KEY").is_ok());
        assert!(valid_name("1X").is_err() && valid_name("A-B").is_err());
    }

    #[test]
    fn key_file_is_created_0600_and_reused() {
        let dir = tempfile::tempdir().unwrap();
        // SAFETY-free: this test does not set MOLECULE_SECRETS_KEY; if the environment does, skip.
        if std::env::var("MOLECULE_SECRETS_KEY").is_ok() {
            return;
        }
        let a = Keyring::load(dir.path()).unwrap();
        let b = Keyring::load(dir.path()).unwrap();
        assert_eq!(a.current_key_id(), b.current_key_id());
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join(KEY_FILE)).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }
}
