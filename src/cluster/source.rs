//! The Kubernetes source: reflects Workspaces, Teams and WarmPools and sends the desired store a
//! full snapshot after every change, once both initial lists are in.
//!
//! Objects are read through `DeserializeGuard`, so one malformed object becomes
//! `SourceObject::Invalid` (InvalidSpec) and never stops the others. Objects with a
//! deletionTimestamp are left out: to the reconciler they are no longer declared, so
//! their containers, volumes and tokens are removed while the finalizer holds them.

use std::collections::BTreeMap;
use std::sync::Arc;

use futures::{StreamExt, stream};
use kube::core::DeserializeGuard;
use kube::runtime::{WatchStreamExt, reflector, watcher};
use kube::{Api, Client, Resource};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use super::{Error, SOURCE_NAME};
use crate::api::{DEFAULT_NAMESPACE, ObjectKey, SourceRef, Team, WarmPool, Workspace};
use crate::source::{Snapshot, SourceObject};

pub type GuardedWorkspace = DeserializeGuard<Workspace>;
pub type GuardedTeam = DeserializeGuard<Team>;
pub type GuardedPool = DeserializeGuard<WarmPool>;

/// `ns/name` of any namespaced object.
pub fn key_of<K: Resource>(obj: &K) -> ObjectKey {
    let meta = obj.meta();
    ObjectKey::new(meta.namespace.as_deref().unwrap_or(DEFAULT_NAMESPACE), meta.name.as_deref().unwrap_or_default())
}

/// Where an object came from: `kubernetes`, `<ns>/<name>@<resourceVersion>`.
pub fn source_ref<K: Resource>(obj: &K) -> SourceRef {
    SourceRef {
        kind: SOURCE_NAME.to_string(),
        reference: format!("{}@{}", key_of(obj), obj.meta().resource_version.as_deref().unwrap_or("")),
    }
}

/// What the source last sent for one Workspace: the controller waits until the
/// desired store holds this version before it asks for a reconcile.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Sent {
    /// `metadata.generation` of the object sent (status writes do not change it).
    pub generation: Option<i64>,
    /// The `SourceRef.reference` it was sent with.
    pub reference: String,
}

/// Every Workspace in the last snapshot sent.
pub type SentMap = BTreeMap<ObjectKey, Sent>;

/// What a snapshot declares, without resourceVersions or status: a status write
/// changes neither, so it does not cause a new snapshot (and a new reconcile).
fn fingerprint(workspaces: &[Arc<GuardedWorkspace>], teams: &[Arc<GuardedTeam>]) -> String {
    let mut parts: Vec<String> = Vec::new();
    for ws in workspaces.iter().filter(|o| o.meta().deletion_timestamp.is_none()) {
        let body = match &ws.0 {
            Ok(o) => format!("{:?}", o.spec),
            Err(e) => e.error.clone(),
        };
        parts.push(format!("W {} {:?} {body}", key_of(ws.as_ref()), ws.meta().generation));
    }
    for team in teams.iter().filter(|o| o.meta().deletion_timestamp.is_none()) {
        let body = match &team.0 {
            Ok(o) => format!("{:?}", o.spec),
            Err(e) => e.error.clone(),
        };
        parts.push(format!("T {} {:?} {body}", key_of(team.as_ref()), team.meta().generation));
    }
    parts.sort();
    parts.join("\n")
}

/// The Workspaces of a snapshot built from `workspaces`, for the controller.
pub fn sent_map(workspaces: &[Arc<GuardedWorkspace>]) -> SentMap {
    workspaces
        .iter()
        .filter(|o| o.meta().deletion_timestamp.is_none())
        .map(|o| {
            let sent = Sent { generation: o.meta().generation, reference: source_ref(o.as_ref()).reference };
            (key_of(o.as_ref()), sent)
        })
        .collect()
}

/// Builds the snapshot of what the cluster declares: everything not being deleted,
/// malformed objects as `Invalid`.
pub fn snapshot(workspaces: &[Arc<GuardedWorkspace>], teams: &[Arc<GuardedTeam>]) -> Snapshot {
    snapshot_with_pools(workspaces, teams, &[])
}

/// `snapshot`, with the WarmPools.
pub fn snapshot_with_pools(
    workspaces: &[Arc<GuardedWorkspace>],
    teams: &[Arc<GuardedTeam>],
    pools: &[Arc<GuardedPool>],
) -> Snapshot {
    let mut objects = Vec::with_capacity(workspaces.len() + teams.len() + pools.len());
    for pool in pools.iter().filter(|o| o.meta().deletion_timestamp.is_none()) {
        let source = source_ref(pool.as_ref());
        objects.push(match &pool.0 {
            Ok(object) => SourceObject::WarmPool { object: Box::new(object.clone()), source },
            Err(invalid) => invalid_object("WarmPool", pool.as_ref(), &invalid.error, source),
        });
    }
    for ws in workspaces.iter().filter(|o| o.meta().deletion_timestamp.is_none()) {
        let source = source_ref(ws.as_ref());
        objects.push(match &ws.0 {
            Ok(object) => SourceObject::Workspace { object: Box::new(object.clone()), source },
            Err(invalid) => invalid_object("Workspace", ws.as_ref(), &invalid.error, source),
        });
    }
    for team in teams.iter().filter(|o| o.meta().deletion_timestamp.is_none()) {
        let source = source_ref(team.as_ref());
        objects.push(match &team.0 {
            Ok(object) => SourceObject::Team { object: Box::new(object.clone()), source },
            Err(invalid) => invalid_object("Team", team.as_ref(), &invalid.error, source),
        });
    }
    // Stable order, so two snapshots of the same state are equal.
    objects.sort_by_key(|o| match o {
        SourceObject::Workspace { object, .. } => (0, key_of(object.as_ref())),
        SourceObject::Team { object, .. } => (1, key_of(object.as_ref())),
        SourceObject::WarmPool { object, .. } => (2, key_of(object.as_ref())),
        SourceObject::Invalid { kind, key, .. } => (
            match kind.as_str() {
                "Team" => 1,
                "WarmPool" => 2,
                _ => 0,
            },
            key.clone(),
        ),
    });
    Snapshot { source: SOURCE_NAME.to_string(), objects, errors: Vec::new() }
}

fn invalid_object<K: Resource>(kind: &str, obj: &K, error: &str, source: SourceRef) -> SourceObject {
    let key = key_of(obj);
    SourceObject::Invalid {
        kind: kind.to_string(),
        error: format!(
            "{kind} {key}: {error}; fix the object with `kubectl edit {} {}`",
            kind.to_lowercase(),
            key.name
        ),
        key,
        source,
    }
}

/// Which watch stream an event came from, and whether a (re)list just completed.
enum Change {
    Workspaces {
        init_done: bool,
    },
    Teams {
        init_done: bool,
    },
    Pools {
        init_done: bool,
    },
    /// The WarmPool watch failed (say, its CRD is not installed yet): the others go
    /// on without pools rather than wait for it.
    PoolsFailed(String),
}

fn is_init_done<K>(ev: &watcher::Event<K>) -> bool {
    matches!(ev, watcher::Event::InitDone)
}

/// Watches Workspaces, Teams and WarmPools (in `namespace`, or all) and sends a
/// snapshot on every change until `shutdown`. `team_writer` fills the Team store the
/// controller reads for the Team status rollup, `pool_writer` the WarmPool store the
/// pool status writer reads. Watch errors are retried with backoff (and logged); the
/// last snapshot stays in force meanwhile.
pub async fn run(
    client: Client,
    namespace: Option<String>,
    snapshots: mpsc::Sender<Snapshot>,
    sent: watch::Sender<SentMap>,
    team_writer: reflector::store::Writer<GuardedTeam>,
    pool_writer: reflector::store::Writer<GuardedPool>,
    shutdown: CancellationToken,
) -> Result<(), Error> {
    let ws_client = client.clone();
    let (ws_api, team_api): (Api<GuardedWorkspace>, Api<GuardedTeam>) = match &namespace {
        Some(ns) => (Api::namespaced(client.clone(), ns), Api::namespaced(client, ns)),
        None => (Api::all(client.clone()), Api::all(client)),
    };
    let (ws_store, ws_writer) = reflector::store();
    let team_store = team_writer.as_reader();
    let ws_events = reflector(ws_writer, watcher(ws_api, watcher::Config::default()).default_backoff())
        .map(|ev| ev.map(|ev| Change::Workspaces { init_done: is_init_done(&ev) }))
        .boxed();
    let team_events = reflector(team_writer, watcher(team_api, watcher::Config::default()).default_backoff())
        .map(|ev| ev.map(|ev| Change::Teams { init_done: is_init_done(&ev) }))
        .boxed();
    let pool_api: Api<GuardedPool> = match &namespace {
        Some(ns) => Api::namespaced(ws_client.clone(), ns),
        None => Api::all(ws_client.clone()),
    };
    let pool_store = pool_writer.as_reader();
    let pool_events = reflector(pool_writer, watcher(pool_api, watcher::Config::default()).default_backoff())
        .map(|ev| match ev {
            Ok(ev) => Ok(Change::Pools { init_done: is_init_done(&ev) }),
            Err(e) => Ok(Change::PoolsFailed(e.to_string())),
        })
        .boxed();
    let mut changes = stream::select(stream::select(ws_events, team_events), pool_events);
    let (mut ws_ready, mut teams_ready, mut pools_ready) = (false, false, false);
    let mut last_sent: Option<String> = None;
    loop {
        let change = tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            c = changes.next() => c,
        };
        match change {
            None => return Ok(()),
            Some(Err(e)) => {
                tracing::warn!(
                    error = %e,
                    "watching molecule.ai Workspaces/Teams failed; retrying (are the CRDs installed and is the \
                     operator allowed to list them? `kubectl apply -k deploy/`)"
                );
                continue;
            }
            Some(Ok(Change::Workspaces { init_done })) => ws_ready |= init_done,
            Some(Ok(Change::Teams { init_done })) => teams_ready |= init_done,
            Some(Ok(Change::Pools { init_done })) => pools_ready |= init_done,
            Some(Ok(Change::PoolsFailed(e))) => {
                if !pools_ready {
                    tracing::warn!(error = %e, "watching molecule.ai WarmPools failed; going on without them (is the WarmPool CRD installed? `kubectl apply -k deploy/`)");
                }
                pools_ready = true;
            }
        }
        if !(ws_ready && teams_ready && pools_ready) {
            continue;
        }
        let (workspaces, teams, pools) = (ws_store.state(), team_store.state(), pool_store.state());
        // Status writes bump resourceVersions too; send only when something declared changed.
        let mut print = fingerprint(&workspaces, &teams);
        for pool in pools.iter().filter(|o| o.meta().deletion_timestamp.is_none()) {
            let body = match &pool.0 {
                Ok(o) => format!("{:?}", o.spec),
                Err(e) => e.error.clone(),
            };
            print.push_str(&format!("\nP {} {:?} {body}", key_of(pool.as_ref()), pool.meta().generation));
        }
        if last_sent.as_ref() == Some(&print) {
            continue;
        }
        last_sent = Some(print);
        if snapshots.send(snapshot_with_pools(&workspaces, &teams, &pools)).await.is_err() {
            return Ok(()); // the desired store is gone: the operator is stopping
        }
        sent.send_replace(sent_map(&workspaces));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn guard<K: serde::de::DeserializeOwned + Resource>(v: serde_json::Value) -> Arc<DeserializeGuard<K>> {
        Arc::new(serde_json::from_value(v).unwrap())
    }

    fn ws(name: &str, spec: serde_json::Value) -> serde_json::Value {
        json!({"apiVersion": "molecule.ai/v1alpha1", "kind": "Workspace",
               "metadata": {"name": name, "namespace": "eng", "resourceVersion": "42"}, "spec": spec})
    }

    #[test]
    fn valid_objects_carry_their_resource_version_and_invalid_ones_do_not_stop_the_others() {
        let workspaces = vec![
            guard::<Workspace>(ws("good", json!({"tier": 2}))),
            guard::<Workspace>(ws("bad", json!({"tier": 2, "colour": "blue"}))),
        ];
        let teams = vec![guard::<Team>(json!({"apiVersion": "molecule.ai/v1alpha1", "kind": "Team",
            "metadata": {"name": "core", "namespace": "eng", "resourceVersion": "7"}, "spec": {}}))];
        let snap = snapshot(&workspaces, &teams);
        assert_eq!(snap.source, "kubernetes");
        assert_eq!(snap.objects.len(), 3);
        match &snap.objects[0] {
            SourceObject::Invalid { kind, key, error, source } => {
                assert_eq!(kind, "Workspace");
                assert_eq!(key, &ObjectKey::new("eng", "bad"));
                assert!(error.contains("colour"), "{error}");
                assert_eq!(source.reference, "eng/bad@42");
            }
            other => panic!("expected Invalid, got {other:?}"),
        }
        match &snap.objects[1] {
            SourceObject::Workspace { object, source } => {
                assert_eq!(object.spec.tier, Some(2));
                assert_eq!(source, &SourceRef { kind: "kubernetes".into(), reference: "eng/good@42".into() });
            }
            other => panic!("expected Workspace, got {other:?}"),
        }
        assert!(matches!(&snap.objects[2], SourceObject::Team { source, .. } if source.reference == "eng/core@7"));
    }

    #[test]
    fn a_status_write_does_not_change_the_fingerprint_but_a_spec_change_does() {
        let before = vec![guard::<Workspace>(ws("a", json!({"tier": 2})))];
        let mut v = ws("a", json!({"tier": 2}));
        v["metadata"]["resourceVersion"] = json!("43");
        v["status"] = json!({"phase": "Running"});
        let status_written = vec![guard::<Workspace>(v)];
        assert_eq!(fingerprint(&before, &[]), fingerprint(&status_written, &[]));
        let edited = vec![guard::<Workspace>(ws("a", json!({"tier": 3})))];
        assert_ne!(fingerprint(&before, &[]), fingerprint(&edited, &[]));
        assert_eq!(sent_map(&status_written)[&ObjectKey::new("eng", "a")].reference, "eng/a@43");
    }

    #[test]
    fn objects_being_deleted_are_left_out() {
        let mut deleting = ws("gone", json!({}));
        deleting["metadata"]["deletionTimestamp"] = json!("2026-01-01T00:00:00Z");
        deleting["metadata"]["finalizers"] = json!(["molecule.ai/cleanup"]);
        let snap = snapshot(&[guard::<Workspace>(deleting), guard::<Workspace>(ws("kept", json!({})))], &[]);
        assert_eq!(snap.objects.len(), 1);
        assert!(
            matches!(&snap.objects[0], SourceObject::Workspace { object, .. } if object.metadata.name.as_deref() == Some("kept"))
        );
    }
}
