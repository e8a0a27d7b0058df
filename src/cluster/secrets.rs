//! Kubernetes Secrets for `envFrom`: a reflector over the `Opaque` Secrets of the
//! watched namespace(s) (what `kubectl create secret generic` makes; service-account
//! tokens, TLS pairs and Helm release Secrets are not listed, so neither held nor
//! paid for in memory). The reconcile queue reads it through
//! [`crate::secrets::SecretObjects`]; a changed or deleted Secret triggers a
//! reconcile of exactly the workspaces whose effective `envFrom` names it, and a
//! fresh list (first start, or after the watch was lost) triggers every workspace
//! that uses `envFrom`. A Secret's values are part of the spec hash, so a change
//! restarts its users under their update policy.
//!
//! Until the first list is in, lookups answer `NotListedYet`: a workspace waits
//! rather than starting without its secrets.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use futures::StreamExt;
use k8s_openapi::api::core::v1::Secret;
use kube::Api;
use kube::runtime::reflector::{ObjectRef, Store, store::Writer};
use kube::runtime::{WatchStreamExt, watcher};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::source::key_of;
use crate::secrets::{SecretLookup, SecretObjects};
use crate::source::desired::DesiredSet;
use crate::trigger::{Trigger, Why};

/// Only these Secrets are reflected (a field selector the API server applies).
pub const FIELD_SELECTOR: &str = "type=Opaque";
/// The `why` of the reconciles a Secret change asks for.
const WHY: Why = Why::SecretChanged;

/// The reconcile queue's view of the cluster's Secrets.
#[derive(Clone)]
pub struct ClusterSecrets {
    store: Store<Secret>,
    listed: Arc<AtomicBool>,
}

/// The two ends of the reflector: [`ClusterSecrets`] for the reconcile context, the
/// writer for [`run`] (through `cluster::Wiring`).
pub fn reflector() -> (ClusterSecrets, SecretsWriter) {
    let (store, writer) = kube::runtime::reflector::store();
    let listed = Arc::new(AtomicBool::new(false));
    (ClusterSecrets { store, listed: listed.clone() }, SecretsWriter { writer, listed })
}

/// What [`run`] feeds.
pub struct SecretsWriter {
    writer: Writer<Secret>,
    listed: Arc<AtomicBool>,
}

impl SecretObjects for ClusterSecrets {
    fn lookup(&self, namespace: &str, name: &str) -> SecretLookup {
        if !self.listed.load(Ordering::Acquire) {
            return SecretLookup::NotListedYet;
        }
        match self.store.get(&ObjectRef::new(name).within(namespace)) {
            None => SecretLookup::Missing,
            Some(secret) => decode(&secret),
        }
    }
}

/// A Secret's data as env values: `data` (base64 on the wire, bytes here) and, should
/// an API server return it, `stringData`. Values must be UTF-8 text.
pub fn decode(secret: &Secret) -> SecretLookup {
    let mut env = BTreeMap::new();
    for (key, bytes) in secret.data.iter().flatten() {
        match String::from_utf8(bytes.0.clone()) {
            Ok(text) => env.insert(key.clone(), text),
            Err(_) => {
                return SecretLookup::Unusable(format!(
                    "key {key} is not UTF-8 text; environment variables must be text"
                ));
            }
        };
    }
    env.extend(secret.string_data.iter().flatten().map(|(k, v)| (k.clone(), v.clone())));
    SecretLookup::Found(env)
}

/// Workspaces in `namespace` whose effective `envFrom` names `secret` (all that use
/// `envFrom` when `secret` is None).
pub fn users(set: &DesiredSet, namespace: Option<&str>, secret: Option<&str>) -> Vec<String> {
    set.workspaces
        .values()
        .filter(|w| namespace.is_none_or(|ns| w.key.namespace == ns))
        .filter(|w| {
            w.spec.as_ref().is_ok_and(|s| match secret {
                Some(name) => s.env_from.iter().any(|e| e.secret_ref.name == name),
                None => !s.env_from.is_empty(),
            })
        })
        .map(|w| w.key.to_string())
        .collect()
}

/// Reflects Secrets into the store until `shutdown`, triggering their users.
pub async fn run(
    api: Api<Secret>,
    feed: SecretsWriter,
    desired: watch::Receiver<Arc<DesiredSet>>,
    trigger: Trigger,
    shutdown: CancellationToken,
) {
    let SecretsWriter { writer, listed } = feed;
    let stream = watcher(api, watcher::Config::default().fields(FIELD_SELECTOR)).default_backoff().reflect(writer);
    let mut stream = std::pin::pin!(stream);
    loop {
        let event = tokio::select! {
            _ = shutdown.cancelled() => return,
            next = stream.next() => match next {
                Some(event) => event,
                None => return,
            },
        };
        let keys = match event {
            Ok(watcher::Event::Apply(s) | watcher::Event::Delete(s)) => {
                let key = key_of(&s);
                users(&desired.borrow(), Some(&key.namespace), Some(&key.name))
            }
            Ok(watcher::Event::InitDone) => {
                listed.store(true, Ordering::Release);
                users(&desired.borrow(), None, None)
            }
            Ok(watcher::Event::Init | watcher::Event::InitApply(_)) => Vec::new(),
            Err(e) => {
                tracing::warn!(error = %e, "watching Secrets failed; retrying");
                Vec::new()
            }
        };
        for key in keys {
            trigger.enqueue(&key, WHY);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::ByteString;

    #[test]
    fn data_becomes_text_and_binary_data_is_refused_without_showing_it() {
        let mut s = Secret {
            data: Some([("API_KEY".to_string(), ByteString(b"sk-123".to_vec()))].into()),
            ..Secret::default()
        };
        assert_eq!(decode(&s), SecretLookup::Found([("API_KEY".to_string(), "sk-123".to_string())].into()));
        s.data = Some([("BLOB".to_string(), ByteString(vec![0xff, 0xfe, 0x00]))].into());
        let SecretLookup::Unusable(why) = decode(&s) else { panic!("binary data is refused") };
        assert!(why.contains("BLOB") && why.contains("UTF-8"), "{why}");
    }
}
