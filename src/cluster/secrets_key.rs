//! The secrets key in a cluster: a Kubernetes Secret in the operator's own namespace
//! (`--secrets-key-secret`, default `molecule-operator-secrets-key`, key `key`), so the
//! key outlives every Pod of the operator and every replica seals with the same one.
//! The first replica that finds it missing creates it with a new random key; a
//! replica that loses that race (409) reads the winner's. An existing Secret is never
//! changed: a key that does not decode is an error naming the Secret, not a reason to
//! make a new one (that would lose every secret sealed with the old key).

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Api, PostParams};

use crate::secrets::Keyring;

/// The key in the Secret's data.
pub const KEY: &str = "key";

#[derive(Debug, thiserror::Error)]
pub enum SecretsKeyError {
    #[error(
        "cannot read or create the secrets key Secret {namespace}/{name}: {source}; the operator's ServiceAccount \
         needs get and create on Secrets in {namespace} (deploy/rbac.yaml)"
    )]
    Api {
        namespace: String,
        name: String,
        #[source]
        source: kube::Error,
    },
    #[error(
        "Secret {namespace}/{name} holds no usable secrets key in data.{KEY} ({why}); put 32 bytes there (base64 \
         or hex), or set MOLECULE_SECRETS_KEY"
    )]
    Unusable { namespace: String, name: String, why: String },
}

/// The keyring whose key is in the Secret `namespace/name`, which is created first
/// when missing. Old keys still come from MOLECULE_SECRETS_OLD_KEYS.
pub async fn load_or_create(client: kube::Client, namespace: &str, name: &str) -> Result<Keyring, SecretsKeyError> {
    let api: Api<Secret> = Api::namespaced(client, namespace);
    let api_error = |source| SecretsKeyError::Api { namespace: namespace.into(), name: name.into(), source };
    let unusable = |why: String| SecretsKeyError::Unusable { namespace: namespace.into(), name: name.into(), why };
    let secret = match api.get_opt(name).await.map_err(api_error)? {
        Some(found) => found,
        None => {
            let text = Keyring::generate_key_text().map_err(|e| unusable(e.to_string()))?;
            match api.create(&PostParams::default(), &new_secret(namespace, name, &text)).await {
                Ok(created) => {
                    tracing::info!(secret = %format!("{namespace}/{name}"), "created the secrets key");
                    created
                }
                // Another replica made it first: use theirs.
                Err(kube::Error::Api(s)) if s.code == 409 => api.get(name).await.map_err(api_error)?,
                Err(e) => return Err(api_error(e)),
            }
        }
    };
    let text = key_text(&secret).map_err(unusable)?;
    Keyring::from_key_text(&text).map_err(|e| unusable(e.to_string()))
}

/// The Secret the operator creates: labelled as the operator's.
pub fn new_secret(namespace: &str, name: &str, key_text: &str) -> Secret {
    Secret {
        metadata: ObjectMeta {
            name: Some(name.to_string()),
            namespace: Some(namespace.to_string()),
            labels: Some(BTreeMap::from([("app.kubernetes.io/name".to_string(), "molecule-operator".to_string())])),
            ..ObjectMeta::default()
        },
        type_: Some("Opaque".into()),
        string_data: Some(BTreeMap::from([(KEY.to_string(), key_text.to_string())])),
        ..Secret::default()
    }
}

/// The key's text in a Secret (data, or stringData as a create returns it from some
/// servers).
fn key_text(secret: &Secret) -> Result<String, String> {
    if let Some(bytes) = secret.data.as_ref().and_then(|d| d.get(KEY)) {
        return String::from_utf8(bytes.0.clone()).map_err(|_| "not UTF-8 text".to_string());
    }
    if let Some(text) = secret.string_data.as_ref().and_then(|d| d.get(KEY)) {
        return Ok(text.clone());
    }
    Err(format!("no key {KEY:?}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_secret_holds_a_key_the_keyring_reads() {
        let text = Keyring::generate_key_text().unwrap();
        let s = new_secret("molecule-system", "k", &text);
        assert_eq!(key_text(&s).unwrap(), text);
        assert!(Keyring::from_key_text(&text).is_ok());
        let mut s = s;
        s.string_data = None;
        assert!(key_text(&s).unwrap_err().contains("no key"));
    }
}
