//! The API server's own controllers, as a real cluster's controller manager runs
//! them: the garbage collector (ownerReferences), PVC protection and namespace
//! deletion. One task, woken by the writes of this server, looks at one namespace
//! at a time (its objects of every stored kind, plus the cluster-scoped ones),
//! decides with [`plan`] (pure, unit-tested below) and applies the actions through
//! the same write path as any client, until a pass finds nothing to do.
//!
//! - An object whose owners are all gone is deleted (background); one that still
//!   has an owner loses its references to the gone ones. An owner being deleted
//!   with `propagationPolicy: Foreground` keeps its `foregroundDeletion` finalizer
//!   until no dependent that blocks it (`blockOwnerDeletion: true`) is left, and its
//!   dependents are deleted meanwhile; with `Orphan` its dependents lose their
//!   references to it, then its `orphan` finalizer goes. An owner of a kind this
//!   server does not store is taken to exist. Before deleting for a missing owner,
//!   the owner is read again (it may have been made after the snapshot).
//! - A PVC being deleted keeps `kubernetes.io/pvc-protection` while a Pod that is
//!   bound to a node and not terminated uses it.
//! - A namespace being deleted has everything in it deleted; once it is empty its
//!   `kubernetes` finalizer goes and with it the namespace.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use tokio::sync::broadcast::error::RecvError;

use super::core::{self, NAMESPACE_FINALIZER, PVC_PROTECTION};
use super::objects::{self, DeleteOptions, FOREGROUND_FINALIZER, ORPHAN_FINALIZER};
use super::{Kind, KubeApi};
use crate::store::StoredObject;

/// Writes that arrive this close together are looked at in one pass.
const DEBOUNCE: Duration = Duration::from_millis(20);
/// A pass that failed is retried after this.
const RETRY: Duration = Duration::from_secs(1);
/// Passes over one namespace in a row, each acting on what the last one changed.
const MAX_ROUNDS: usize = 20;

/// What the controllers do to one object.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Delete it: every owner is gone (`verify` are the gone ones, read again first)
    /// or waits for its dependents to go; or its namespace is being deleted.
    Delete { kind: Kind, namespace: String, name: String, uid: String, verify: Vec<OwnerRef> },
    /// Remove its references to these owners (gone, or orphaning it).
    DropOwners { kind: Kind, namespace: String, name: String, uid: String, owners: Vec<String> },
    /// Remove a finalizer that has done its job.
    RemoveFinalizer { kind: Kind, namespace: String, name: String, uid: String, finalizer: String },
}

/// An owner a dependent names: (kind, namespace it would be in, name, uid).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OwnerRef {
    pub kind: Kind,
    pub namespace: String,
    pub name: String,
    pub uid: String,
}

fn kind_of(object: &StoredObject) -> Option<Kind> {
    Kind::ALL.into_iter().find(|k| k.name() == object.kind)
}

fn has_finalizer(object: &StoredObject, finalizer: &str) -> bool {
    object.body["metadata"]["finalizers"].as_array().is_some_and(|f| f.iter().any(|x| x == finalizer))
}

fn target(object: &StoredObject) -> Option<(Kind, String, String, String)> {
    Some((kind_of(object)?, object.namespace.clone(), object.name.clone(), object.uid.clone()))
}

/// What to do about `objects`: every stored object of one namespace, with the
/// cluster-scoped ones (Namespaces, Nodes). `namespace` names the namespace looked at.
pub fn plan(namespace: &str, objects: &[StoredObject]) -> Vec<Action> {
    let by_uid: HashMap<&str, &StoredObject> = objects.iter().map(|o| (o.uid.as_str(), o)).collect();
    let mut actions = Vec::new();
    // Dependents of each owner uid, with whether the reference blocks the owner.
    let mut dependents: HashMap<&str, Vec<(&StoredObject, bool)>> = HashMap::new();
    for object in objects {
        for (_, _, _, uid, block) in core::owner_references(&object.body) {
            dependents.entry(uid).or_default().push((object, block));
        }
    }

    for object in objects {
        let Some((kind, ns, name, uid)) = target(object) else { continue };
        let refs = core::owner_references(&object.body);
        if refs.is_empty() {
            continue;
        }
        let (mut solid, mut gone, mut waiting) = (0, Vec::new(), Vec::new());
        for (api_version, owner_kind, owner_name, owner_uid, _) in refs {
            let Some(owner_kind) = Kind::from_type(api_version, owner_kind) else {
                solid += 1; // a kind this server does not store: taken to exist
                continue;
            };
            match by_uid.get(owner_uid) {
                None => gone.push(OwnerRef {
                    kind: owner_kind,
                    namespace: owner_kind.stored_namespace(Some(&ns)).to_string(),
                    name: owner_name.to_string(),
                    uid: owner_uid.to_string(),
                }),
                Some(owner) if owner.deletion_timestamp.is_some() && has_finalizer(owner, FOREGROUND_FINALIZER) => {
                    waiting.push(owner_uid.to_string())
                }
                Some(_) => solid += 1,
            }
        }
        if gone.is_empty() && waiting.is_empty() {
            continue;
        }
        if solid == 0 {
            if object.deletion_timestamp.is_none() {
                actions.push(Action::Delete { kind, namespace: ns, name, uid, verify: gone });
            }
        } else {
            let owners = gone.into_iter().map(|o| o.uid).chain(waiting).collect();
            actions.push(Action::DropOwners { kind, namespace: ns, name, uid, owners });
        }
    }

    for object in objects.iter().filter(|o| o.deletion_timestamp.is_some()) {
        let Some((kind, ns, name, uid)) = target(object) else { continue };
        let remove = |finalizer: &str| Action::RemoveFinalizer {
            kind,
            namespace: ns.clone(),
            name: name.clone(),
            uid: uid.clone(),
            finalizer: finalizer.to_string(),
        };
        let deps = dependents.get(object.uid.as_str()).map(Vec::as_slice).unwrap_or_default();
        if has_finalizer(object, ORPHAN_FINALIZER) {
            for (dependent, _) in deps {
                if let Some((kind, namespace, name, uid)) = target(dependent) {
                    actions.push(Action::DropOwners { kind, namespace, name, uid, owners: vec![object.uid.clone()] });
                }
            }
            if deps.is_empty() {
                actions.push(remove(ORPHAN_FINALIZER));
            }
        }
        if has_finalizer(object, FOREGROUND_FINALIZER) && !deps.iter().any(|(_, blocks)| *blocks) {
            actions.push(remove(FOREGROUND_FINALIZER));
        }
        if kind == Kind::PersistentVolumeClaim && has_finalizer(object, PVC_PROTECTION) {
            let in_use = objects.iter().any(|pod| {
                pod.kind == Kind::Pod.name()
                    && pod.namespace == object.namespace
                    && pod.body["spec"]["nodeName"].as_str().is_some_and(|n| !n.is_empty())
                    && !matches!(pod.body["status"]["phase"].as_str(), Some("Succeeded" | "Failed"))
                    && core::pod_claims(&pod.body).contains(&object.name.as_str())
            });
            if !in_use {
                actions.push(remove(PVC_PROTECTION));
            }
        }
        if kind == Kind::Namespace && object.name == namespace {
            let content: Vec<&StoredObject> =
                objects.iter().filter(|o| o.namespace == namespace && !o.namespace.is_empty()).collect();
            for inside in content.iter().filter(|o| o.deletion_timestamp.is_none()) {
                if let Some((kind, namespace, name, uid)) = target(inside) {
                    actions.push(Action::Delete { kind, namespace, name, uid, verify: vec![] });
                }
            }
            let held = object.body["spec"]["finalizers"]
                .as_array()
                .is_some_and(|f| f.iter().any(|x| x == NAMESPACE_FINALIZER));
            if content.is_empty() && held {
                actions.push(remove(NAMESPACE_FINALIZER));
            }
        }
    }
    actions
}

/// Starts the controllers; they run until the handle is aborted.
pub fn spawn(api: Arc<KubeApi>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut events = api.events.subscribe();
        let mut dirty: BTreeSet<String> = BTreeSet::new();
        let mut everything = true; // deletions made while no server ran
        loop {
            if everything {
                match all_namespaces(&api).await {
                    Ok(all) => {
                        dirty.extend(all);
                        everything = false;
                    }
                    Err(error) => tracing::warn!(%error, "kube-api: the garbage collector cannot list namespaces"),
                }
            }
            let mut failed = Vec::new();
            for namespace in std::mem::take(&mut dirty) {
                if let Err(error) = converge(&api, &namespace).await {
                    tracing::warn!(%namespace, %error, "kube-api: a garbage collection pass failed; retrying");
                    failed.push(namespace);
                }
            }
            let retry = !failed.is_empty() || everything;
            dirty.extend(failed);
            let wake =
                async { if !retry { std::future::pending::<()>().await } else { tokio::time::sleep(RETRY).await } };
            tokio::select! {
                _ = wake => {}
                received = events.recv() => match received {
                    Ok(event) => {
                        note(&event, &mut dirty, &mut everything);
                        tokio::time::sleep(DEBOUNCE).await;
                        loop {
                            match events.try_recv() {
                                Ok(event) => note(&event, &mut dirty, &mut everything),
                                Err(tokio::sync::broadcast::error::TryRecvError::Lagged(_)) => everything = true,
                                Err(_) => break,
                            }
                        }
                    }
                    Err(RecvError::Lagged(_)) => everything = true,
                    Err(RecvError::Closed) => return,
                },
            }
        }
    })
}

/// Which namespaces a write may have given work: any delete, anything being
/// deleted, a new object (it may name an owner that is gone), any change to a Pod
/// (a PVC it used may be released). A status write elsewhere gives none.
fn note(event: &super::WatchEvent, dirty: &mut BTreeSet<String>, everything: &mut bool) {
    let deleting = event.object["metadata"]["deletionTimestamp"].is_string();
    let relevant = event.event_type != "MODIFIED" || deleting || event.kind == Kind::Pod;
    if !relevant {
        return;
    }
    match event.kind {
        Kind::Namespace => {
            if let Some(name) = event.object["metadata"]["name"].as_str() {
                dirty.insert(name.to_string());
            }
        }
        // A cluster-scoped owner may have dependents anywhere.
        Kind::Node => *everything = true,
        _ => {
            dirty.insert(event.namespace.clone());
        }
    }
}

async fn all_namespaces(api: &KubeApi) -> Result<BTreeSet<String>, crate::store::StoreError> {
    let mut all = BTreeSet::new();
    for kind in Kind::ALL {
        let (objects, _) = api.store.list_objects(kind.name(), None).await?;
        all.extend(objects.into_iter().map(|o| if kind == Kind::Namespace { o.name } else { o.namespace }));
    }
    all.remove("");
    Ok(all)
}

/// Passes over `namespace` until one finds nothing to do.
async fn converge(api: &KubeApi, namespace: &str) -> Result<(), String> {
    for _ in 0..MAX_ROUNDS {
        let mut objects = Vec::new();
        for kind in Kind::ALL {
            let scope = if kind.namespaced() { Some(namespace) } else { None };
            let (listed, _) = api.store.list_objects(kind.name(), scope).await.map_err(|e| e.to_string())?;
            objects.extend(listed);
        }
        let actions = plan(namespace, &objects);
        if actions.is_empty() {
            return Ok(());
        }
        let mut acted = false;
        for action in actions {
            acted |= apply(api, action).await?;
        }
        if !acted {
            return Ok(());
        }
    }
    Ok(())
}

/// Applies one action to the object as it is now; false when it no longer applies.
async fn apply(api: &KubeApi, action: Action) -> Result<bool, String> {
    let (kind, namespace, name, uid) = match &action {
        Action::Delete { kind, namespace, name, uid, .. }
        | Action::DropOwners { kind, namespace, name, uid, .. }
        | Action::RemoveFinalizer { kind, namespace, name, uid, .. } => (*kind, namespace, name, uid),
    };
    if let Action::Delete { verify, .. } = &action {
        for owner in verify {
            let found = api
                .store
                .get_object(owner.kind.name(), &owner.namespace, &owner.name)
                .await
                .map_err(|e| e.to_string())?;
            if found.is_some_and(|o| o.uid == owner.uid) {
                return Ok(false); // the owner exists after all (made after the snapshot)
            }
        }
    }
    let _guard = api.write_lock.lock().await;
    let Some(existing) = api.store.get_object(kind.name(), namespace, name).await.map_err(|e| e.to_string())? else {
        return Ok(false);
    };
    if existing.uid != *uid {
        return Ok(false);
    }
    let result = match action {
        Action::Delete { .. } => {
            tracing::debug!(kind = kind.name(), %namespace, %name, "kube-api: garbage-collecting");
            objects::delete_locked(api, kind, &existing, &DeleteOptions::default()).await
        }
        Action::DropOwners { owners, .. } => {
            let mut body = existing.body.clone();
            if let Some(refs) = body["metadata"]["ownerReferences"].as_array_mut() {
                refs.retain(|r| !r["uid"].as_str().is_some_and(|u| owners.iter().any(|o| o == u)));
                if refs.is_empty() {
                    body["metadata"].as_object_mut().map(|m| m.remove("ownerReferences"));
                }
            }
            objects::write_locked(api, kind, &existing, body).await
        }
        Action::RemoveFinalizer { finalizer, .. } => {
            let mut body = existing.body.clone();
            let pointer = if kind == Kind::Namespace && finalizer == NAMESPACE_FINALIZER {
                "/spec/finalizers"
            } else {
                "/metadata/finalizers"
            };
            if let Some(list) = body.pointer_mut(pointer).and_then(Value::as_array_mut) {
                list.retain(|f| *f != *finalizer);
            }
            objects::write_locked(api, kind, &existing, body).await
        }
    };
    result.map(|_| true).map_err(|e| e.message)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn object(kind: Kind, name: &str, uid: &str, extra: Value) -> StoredObject {
        let mut body = json!({"apiVersion": kind.api_version(), "kind": kind.name(),
            "metadata": {"name": name, "namespace": "ns", "uid": uid}});
        json_patch::merge(&mut body, &extra);
        StoredObject {
            kind: kind.name().into(),
            namespace: kind.stored_namespace(Some("ns")).into(),
            name: name.into(),
            uid: uid.into(),
            resource_version: 1,
            generation: 1,
            creation_timestamp: String::new(),
            deletion_timestamp: body["metadata"]["deletionTimestamp"].as_str().map(str::to_string),
            body,
        }
    }

    fn owned_by(kind: Kind, name: &str, uid: &str, block: bool) -> Value {
        json!({"metadata": {"ownerReferences": [{"apiVersion": kind.api_version(), "kind": kind.name(),
            "name": name, "uid": uid, "blockOwnerDeletion": block, "controller": true}]}})
    }

    fn names(actions: &[Action]) -> Vec<String> {
        actions
            .iter()
            .map(|a| match a {
                Action::Delete { name, .. } => format!("delete {name}"),
                Action::DropOwners { name, owners, .. } => format!("drop {owners:?} from {name}"),
                Action::RemoveFinalizer { name, finalizer, .. } => format!("unfinalize {name} {finalizer}"),
            })
            .collect()
    }

    #[test]
    fn dependents_of_a_gone_owner_are_deleted_and_shared_ones_keep_their_other_owner() {
        let ws = object(Kind::Workspace, "ws", "w1", json!({}));
        let pod = object(Kind::Pod, "pod", "p1", owned_by(Kind::Workspace, "gone", "w0", true));
        let mut both = owned_by(Kind::Workspace, "gone", "w0", true);
        both["metadata"]["ownerReferences"].as_array_mut().unwrap().push(json!({"apiVersion": "molecule.ai/v1alpha1",
            "kind": "Workspace", "name": "ws", "uid": "w1"}));
        let shared = object(Kind::Secret, "shared", "s1", both);
        let foreign = object(
            Kind::Secret,
            "foreign",
            "s2",
            json!({"metadata": {"ownerReferences": [
            {"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "rs", "uid": "r1"}]}}),
        );
        let actions = plan("ns", &[ws, pod, shared, foreign]);
        assert_eq!(names(&actions), vec!["delete pod", "drop [\"w0\"] from shared"]);
        let Action::Delete { verify, .. } = &actions[0] else { panic!() };
        assert_eq!(verify[0].name, "gone", "the gone owner is read again before the delete");
    }

    #[test]
    fn foreground_waits_for_blocking_dependents_and_orphan_drops_references() {
        let deleting =
            json!({"metadata": {"deletionTimestamp": "2024-01-01T00:00:00Z", "finalizers": ["foregroundDeletion"]}});
        let owner = object(Kind::Workspace, "ws", "w1", deleting);
        let blocking = object(Kind::Pod, "pod", "p1", owned_by(Kind::Workspace, "ws", "w1", true));
        assert_eq!(names(&plan("ns", &[owner.clone(), blocking])), vec!["delete pod"]);
        assert_eq!(names(&plan("ns", &[owner])), vec!["unfinalize ws foregroundDeletion"]);

        let orphaning = json!({"metadata": {"deletionTimestamp": "2024-01-01T00:00:00Z", "finalizers": ["orphan"]}});
        let owner = object(Kind::Workspace, "ws", "w1", orphaning);
        let pod = object(Kind::Pod, "pod", "p1", owned_by(Kind::Workspace, "ws", "w1", true));
        assert_eq!(names(&plan("ns", &[owner.clone(), pod])), vec!["drop [\"w1\"] from pod"]);
        assert_eq!(names(&plan("ns", &[owner])), vec!["unfinalize ws orphan"]);
    }

    #[test]
    fn a_claim_in_use_by_a_running_pod_is_protected() {
        let claim = object(
            Kind::PersistentVolumeClaim,
            "data",
            "c1",
            json!({"metadata": {"deletionTimestamp": "2024-01-01T00:00:00Z", "finalizers": [PVC_PROTECTION]}}),
        );
        let pod = |phase: &str, node: &str| {
            object(
                Kind::Pod,
                "pod",
                "p1",
                json!({"spec": {"nodeName": node,
                "volumes": [{"name": "v", "persistentVolumeClaim": {"claimName": "data"}}]}, "status": {"phase": phase}}),
            )
        };
        assert!(plan("ns", &[claim.clone(), pod("Running", "local")]).is_empty());
        assert_eq!(
            names(&plan("ns", &[claim.clone(), pod("Succeeded", "local")])),
            vec![format!("unfinalize data {PVC_PROTECTION}")]
        );
        assert_eq!(
            names(&plan("ns", &[claim.clone(), pod("Pending", "")])).len(),
            1,
            "an unscheduled Pod uses nothing"
        );
        assert_eq!(names(&plan("ns", &[claim])).len(), 1);
    }

    #[test]
    fn a_namespace_being_deleted_is_emptied_then_released() {
        let mut namespace = object(
            Kind::Namespace,
            "ns",
            "n1",
            json!({"metadata": {"deletionTimestamp": "2024-01-01T00:00:00Z"}, "spec": {"finalizers": ["kubernetes"]}}),
        );
        namespace.body["metadata"].as_object_mut().unwrap().remove("namespace");
        let secret = object(Kind::Secret, "s", "s1", json!({}));
        assert_eq!(names(&plan("ns", &[namespace.clone(), secret])), vec!["delete s"]);
        assert_eq!(names(&plan("ns", &[namespace.clone()])), vec!["unfinalize ns kubernetes"]);
        assert!(plan("other", &[namespace]).is_empty(), "a pass over another namespace leaves it");
    }
}
