//! WarmPool status write-back: each WarmPool the Kubernetes source declares gets the
//! status the pool pass (reconcile/pools.rs) last published for it (`size`, `ready`,
//! `starting`, `claimed`, `observedGeneration`, a Ready condition; status/pool.rs),
//! written whole by server-side apply on its status subresource, the controller's way.
//! A status is written when the pass publishes a change, and only when it differs
//! from what was last written to that object (by uid: a WarmPool made anew under the
//! same name is written again). `get warmpools` shows the same counts, from the same
//! statuses, in every mode.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use kube::api::{ApiResource, DynamicObject, Patch, PatchParams};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::{Api, Client, Resource};
use serde_json::json;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::source::GuardedPool;
use super::{FIELD_MANAGER, SOURCE_NAME};
use crate::api::{API_VERSION, ObjectKey, WarmPool, WarmPoolStatus};
use crate::reconcile::pools::Pools;
use crate::source::desired::DesiredSet;

/// Looked at this often without being told (a write that failed is tried again).
const RETRY: Duration = Duration::from_secs(10);

/// Writes the pools' statuses until `shutdown`.
pub async fn run(
    client: Client,
    objects: Store<GuardedPool>,
    pools: Arc<Pools>,
    desired: watch::Receiver<Arc<DesiredSet>>,
    shutdown: CancellationToken,
) {
    let mut written: HashMap<ObjectKey, (String, WarmPoolStatus)> = HashMap::new();
    let mut tick = tokio::time::interval(RETRY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            () = pools.published.notified() => {}
            _ = tick.tick() => {}
        }
        let statuses = pools.status.lock().map(|s| s.clone()).unwrap_or_default();
        let ours: Vec<ObjectKey> =
            desired.borrow().pools.values().filter(|p| p.source.kind == SOURCE_NAME).map(|p| p.key.clone()).collect();
        written.retain(|k, _| ours.contains(k));
        for key in ours {
            let Some(status) = statuses.get(&key.to_string()) else { continue };
            let Some(object) = objects.get(&ObjectRef::new(&key.name).within(&key.namespace)) else { continue };
            let uid = object.meta().uid.clone().unwrap_or_default();
            if written.get(&key).is_some_and(|(u, s)| *u == uid && s == status) {
                continue;
            }
            match write(&client, &key, status).await {
                Ok(()) => {
                    written.insert(key, (uid, status.clone()));
                }
                Err(e) => tracing::warn!(pool = %key, error = %e, "cannot write the WarmPool's status"),
            }
        }
    }
}

/// Writes one WarmPool's status whole (server-side apply on the status subresource).
async fn write(client: &Client, key: &ObjectKey, status: &WarmPoolStatus) -> Result<(), kube::Error> {
    let api: Api<DynamicObject> =
        Api::namespaced_with(client.clone(), &key.namespace, &ApiResource::erase::<WarmPool>(&()));
    let patch = json!({"apiVersion": API_VERSION, "kind": "WarmPool", "status": status});
    api.patch_status(&key.name, &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(&patch)).await?;
    Ok(())
}
