//! The local node: runs the Pods of the embedded Kubernetes API (`up --kube-api ADDR
//! --runtime kubernetes`) as Docker containers. **A test bed and laptop mode, not a
//! kubelet**: it exists so that the Pod runtime can be exercised end to end with the
//! real kubectl on a machine with Docker and no cluster.
//!
//! It is a client of the API like a kubelet, through kube-rs (watches of its Pods,
//! of Secrets and PVCs; the binding, status and delete calls a kubelet and a
//! scheduler make), so it exercises the API surface the runtime uses and could
//! face another API server. Only `pods/log` is in-process (the API asks the node,
//! as an API server proxies to a kubelet): [`LocalNode`] is the API's `PodLogs`.
//!
//! What it does:
//! - Registers Node `local` (Ready, capacity from Docker) and binds every
//!   unscheduled Pod (scheduler `default-scheduler`) to itself.
//! - Per Pod: a sandbox container (`molecule-agent pause`, the role of the pause
//!   image) holds the network namespace, on the node's bridge network
//!   (`molecule-node-<instance>`, `host.docker.internal` mapped to the host gateway,
//!   hostPorts published) or the host's (`hostNetwork: true`); the Pod's containers
//!   join it, so they share an IP and localhost, and the Pod IP stays across restarts.
//! - Containers: image pull policy (an image that is absent and cannot be pulled
//!   is `ErrImagePull`, then `ImagePullBackOff`), command/args, env (`value`,
//!   `secretKeyRef`, `fieldRef`, `envFrom` secretRef), limits (memory, nano-CPUs) and
//!   CPU requests (shares), securityContext (user/group, fsGroup and supplemental
//!   groups, capabilities, privileged, no-new-privileges, seccomp RuntimeDefault or
//!   Unconfined, read-only root), `runAsNonRoot` checked against the image's user.
//! - Volumes: PVC → Docker named volume `pvc-<uid>` (made when the claim is created,
//!   which the node then binds, removed when the claim is gone); Secret → files in
//!   `STATE/node/pods/<uid>/volumes/` bind-mounted read-only, rewritten atomically
//!   when the Secret changes (`defaultMode`, `items`); emptyDir (a host directory, or
//!   a tmpfs with `medium: Memory`); fsGroup applied to PVCs when their directory is
//!   reachable. `automountServiceAccountToken` mounts nothing either way.
//! - restartPolicy Always/OnFailure/Never with restartCount and the kubelet's
//!   back-off (at once, then 10 s doubling to 5 min): each restart is a new Docker
//!   container, the previous one kept for `kubectl logs --previous`.
//! - Status written back as a kubelet does (status.rs), at once when a container
//!   exits or is removed out of band (Docker events; events the daemon logs before
//!   its listings show them are re-read with observe/settle.rs).
//! - Deleting a Pod stops its containers within the grace period, removes them and
//!   the Pod's directories, then deletes the Pod with a grace period of 0. Its
//!   running sandbox is kept for a while (`kept_0` in its name) and passes to the
//!   next Pod of the same name and namespace that would get the same sandbox, with
//!   its network and address: a heal then costs Docker no network teardown and
//!   setup (see `LocalNode::keep`).
//! - On start it adopts the containers it finds for existing Pods (an operator
//!   restart recreates nothing) and removes those of Pods that are gone.
//!
//! What it does not do: init, ephemeral and sidecar containers (such a Pod stays
//! Pending, `Initialized=False`), probes, lifecycle hooks, `$(VAR)` expansion,
//! ConfigMap, projected, hostPath and other volume types (the Pod waits with a
//! message), service-account tokens, DNS for Services (nothing routes to
//! Services), resource accounting or eviction, node heartbeats or leases, images
//! from a registry that needs credentials, multiple nodes, `kubectl exec`/`attach`/
//! `port-forward`, Events (`kubectl describe pod` shows none). A memory emptyDir is
//! one tmpfs per container, not shared. The
//! first mount of an empty PVC gets the image's content at that path (Docker's
//! copy-up), which a cluster's volume would not.
//!
//! Everything it makes carries `ai.molecule.node=<instance>` (never the operator's
//! `ai.molecule.instance`, which the Docker runtime's cache lists) and the labels
//! in [`labels`].

mod docker;
#[cfg(test)]
mod fixtures;
mod render;
mod status;
mod volumes;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use chrono::{DateTime, Utc};
use futures::StreamExt;
use futures::stream::BoxStream;
use k8s_openapi::api::core::v1::{Node, PersistentVolumeClaim, Pod, Secret};
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams, Preconditions};
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use self::docker::{NameParts, NodeDocker, PodContainer};
use self::render::{NodeIdentity, Resolved, VolumeSource};
use self::status::{ContainerView, Observation};
use crate::model::container::ContainerState;
use crate::observe::settle::{Checked, Settling};

/// The labels on the node's containers, volumes and network.
pub mod labels {
    /// `<operator instance>`: everything this node made.
    pub const NODE: &str = "ai.molecule.node";
    pub const POD_NAMESPACE: &str = "io.kubernetes.pod.namespace";
    pub const POD_NAME: &str = "io.kubernetes.pod.name";
    pub const POD_UID: &str = "io.kubernetes.pod.uid";
    /// The Pod's container name, or [`SANDBOX`].
    pub const CONTAINER_NAME: &str = "io.kubernetes.container.name";
    /// Which start of the container this is: 0, then one more per restart.
    pub const ATTEMPT: &str = "io.kubernetes.container.restartCount";
    /// `podsandbox` or `container`.
    pub const DOCKER_TYPE: &str = "io.kubernetes.docker.type";
    /// The container name of a Pod's sandbox.
    pub const SANDBOX: &str = "POD";
    pub const PVC_NAMESPACE: &str = "io.kubernetes.pvc.namespace";
    pub const PVC_NAME: &str = "io.kubernetes.pvc.name";
    pub const PVC_UID: &str = "io.kubernetes.pvc.uid";
    /// On a sandbox: a hash of what it was made as, apart from its Pod (hostname,
    /// network, published ports): a kept sandbox passes only to a Pod that would get
    /// the same.
    pub const SANDBOX_HASH: &str = "ai.molecule.node.sandbox-hash";
    /// Where the uid stands in the name of a kept sandbox (`k8s_POD_<pod>_<ns>_kept_0`).
    pub const KEPT: &str = "kept";
}

/// The node's name in the API.
pub const NODE_NAME: &str = "local";
/// The field manager of the node's writes.
const MANAGER: &str = "molecule-local-node";
/// The kubelet's crash back-off: the first restart at once, then this, doubling.
const BACKOFF_FIRST: Duration = Duration::from_secs(10);
const BACKOFF_MAX: Duration = Duration::from_secs(300);
/// A Pod waiting on something the watches report (a Secret, a claim) is looked at
/// again after this anyway.
const BLOCKED_RETRY: Duration = Duration::from_secs(10);
/// How long ErrImagePull shows before ImagePullBackOff does (until the next pull).
const PULL_ERROR_SHOWN: Duration = Duration::from_secs(2);
/// Every Pod is looked at this often, the net under the watches and Docker events.
const RESYNC: Duration = Duration::from_secs(60);
/// How long the running sandbox of a deleted Pod is kept for the next Pod of the same
/// name and namespace (a workspace's Pod deleted and made again: a heal), unless
/// `MOLECULE_NODE_KEEP_SANDBOX_SECONDS` says otherwise (0: never kept).
const KEEP_SANDBOX: Duration = Duration::from_secs(30);
/// How long a new Pod waits for the last Pod of its name to be torn down (to get its
/// sandbox) before it makes its own.
const PREDECESSOR_WAIT: Duration = Duration::from_secs(2);

/// The Docker volume of a PVC.
pub fn claim_volume(claim_uid: &str) -> String {
    format!("pvc-{claim_uid}")
}

/// The node's bridge network.
pub fn network_name(instance: &str) -> String {
    format!("molecule-node-{instance}")
}

#[derive(Clone, Debug)]
pub struct NodeConfig {
    /// The operator instance id (labels everything the node makes).
    pub instance: String,
    /// `STATE/node`: the Pods' volume directories.
    pub dir: PathBuf,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum Key {
    Pod(String),
    Claim(String),
    /// A kept sandbox's name: removed if no Pod took it by now.
    Kept(String),
}

/// A back-off: the current delay, and when it was last applied (the last restart
/// for a crash back-off; the end of the wait for a pull back-off).
#[derive(Clone, Copy, Debug, PartialEq)]
struct Backoff {
    delay: Duration,
    until: DateTime<Utc>,
}

#[derive(Default)]
struct Memory {
    /// Per (pod uid, container): the crash back-off.
    crash: HashMap<(String, String), Backoff>,
    /// Per (pod uid, container): the image pull back-off.
    pull: HashMap<(String, String), Backoff>,
    /// Per (pod uid, container): why it could not be started (reason, message).
    waiting: HashMap<(String, String), (String, String)>,
    /// Per pod uid: its containers' events that the listings do not show yet.
    settling: HashMap<String, Settling>,
    /// Kept sandboxes by name: their container id and since when.
    kept: HashMap<String, (String, tokio::time::Instant)>,
    /// Per pod uid: since when it waits for the last Pod of its name to be torn down.
    predecessors: HashMap<String, tokio::time::Instant>,
}

/// The running node; the API's `PodLogs`.
pub struct LocalNode {
    docker: NodeDocker,
    client: kube::Client,
    identity: NodeIdentity,
    dir: PathBuf,
    host_ip: String,
    pods: Store<Pod>,
    secrets: Store<Secret>,
    claims: Store<PersistentVolumeClaim>,
    memory: Mutex<Memory>,
    /// Held while a sandbox is kept or given to a Pod: a Pod looking for its
    /// predecessor's sandbox sees it either still the predecessor's or kept.
    handover: tokio::sync::Mutex<()>,
    queue: mpsc::UnboundedSender<(Key, Option<Duration>)>,
    /// Where each container's usage is read, and its last reading (for CPU rates).
    usage: crate::runtime::docker_usage::UsageReader,
    readings: Mutex<HashMap<String, crate::model::usage::Reading>>,
    /// [`KEEP_SANDBOX`], or what the environment says.
    keep_sandbox: Duration,
}

impl LocalNode {
    /// The host's address on the node's bridge: where its Pods reach the host.
    pub fn gateway(&self) -> &str {
        &self.host_ip
    }
}

/// Starts the node against the API `client` speaks to; it runs until `shutdown`.
/// Pods keep running when it stops (as when a kubelet stops); the next start adopts them.
pub async fn start(
    client: kube::Client,
    config: NodeConfig,
    shutdown: CancellationToken,
) -> anyhow::Result<Arc<LocalNode>> {
    let docker = NodeDocker {
        docker: crate::runtime::docker::connect_client().await.context("the local node cannot reach Docker")?,
        instance: config.instance.clone(),
    };
    crate::runtime::agent_image::ensure_agent_image(&docker.docker, crate::runtime::agent_image::AGENT_IMAGE)
        .await
        .context("the local node runs each Pod's sandbox from the agent image, which cannot be built")?;
    let network = network_name(&config.instance);
    let host_ip = docker.ensure_network(&network).await.context("the local node cannot make its network")?;
    std::fs::create_dir_all(&config.dir).with_context(|| format!("cannot create {}", config.dir.display()))?;
    register(&client, &docker, &host_ip).await.context("the local node cannot register Node local")?;

    let (pods, pod_writer) = reflector::store::<Pod>();
    let (secrets, secret_writer) = reflector::store::<Secret>();
    let (claims, claim_writer) = reflector::store::<PersistentVolumeClaim>();
    let (queue, queued) = mpsc::unbounded_channel();
    let node = Arc::new(LocalNode {
        docker,
        client: client.clone(),
        identity: NodeIdentity {
            instance: config.instance.clone(),
            network,
            sandbox_image: crate::runtime::agent_image::AGENT_IMAGE.into(),
        },
        dir: config.dir,
        host_ip,
        pods,
        secrets,
        claims,
        memory: Mutex::default(),
        handover: tokio::sync::Mutex::new(()),
        queue,
        usage: Default::default(),
        readings: Mutex::default(),
        keep_sandbox: std::env::var("MOLECULE_NODE_KEEP_SANDBOX_SECONDS")
            .ok()
            .and_then(|s| s.parse().ok())
            .map_or(KEEP_SANDBOX, Duration::from_secs),
    });

    let on_node = watcher::Config::default().fields(&format!("spec.nodeName={NODE_NAME}"));
    let pod_events = watcher(Api::<Pod>::all(client.clone()), on_node).default_backoff().reflect(pod_writer);
    spawn_until(
        &shutdown,
        drive(pod_events, {
            let node = node.clone();
            move |pod: &Pod| node.enqueue(Key::Pod(uid_of(&pod.metadata)))
        }),
    );
    let secret_events = watcher(Api::<Secret>::all(client.clone()), watcher::Config::default())
        .default_backoff()
        .reflect(secret_writer);
    spawn_until(
        &shutdown,
        drive(secret_events, {
            let node = node.clone();
            move |secret: &Secret| node.enqueue_users(&secret.metadata, uses_secret)
        }),
    );
    let claim_events = watcher(Api::<PersistentVolumeClaim>::all(client.clone()), watcher::Config::default())
        .default_backoff()
        .reflect(claim_writer);
    spawn_until(
        &shutdown,
        drive(claim_events, {
            let node = node.clone();
            move |claim: &PersistentVolumeClaim| {
                node.enqueue(Key::Claim(uid_of(&claim.metadata)));
                node.enqueue_users(&claim.metadata, uses_claim);
            }
        }),
    );
    spawn_until(&shutdown, schedule(client.clone()));
    spawn_until(&shutdown, node.clone().docker_events());

    tokio::select! {
        _ = shutdown.cancelled() => anyhow::bail!("stopped while the local node was starting"),
        _ = async { let _ = tokio::join!(node.pods.wait_until_ready(), node.secrets.wait_until_ready(), node.claims.wait_until_ready()); } => {}
    }
    // Adoption: every Pod with containers here is looked at (kept if it exists, removed
    // if it is gone), and every claim volume whose claim may be gone. Sandboxes kept
    // for a next Pod by an earlier run go: nobody remembers them.
    for c in node.docker.kept().await? {
        node.docker.remove(&c.run.id).await?;
    }
    for c in node.docker.containers(None).await? {
        node.enqueue(Key::Pod(c.pod_uid));
    }
    for (_, volume_labels) in node.docker.volumes().await? {
        if let Some(uid) = volume_labels.get(labels::PVC_UID) {
            node.enqueue(Key::Claim(uid.clone()));
        }
    }
    spawn_until(&shutdown, {
        let node = node.clone();
        async move {
            loop {
                tokio::time::sleep(RESYNC).await;
                for pod in node.pods.state() {
                    node.enqueue(Key::Pod(uid_of(&pod.metadata)));
                }
            }
        }
    });
    tokio::spawn(run_queue(node.clone(), queued, shutdown));
    tracing::info!(node = NODE_NAME, network = %node.identity.network, host_ip = %node.host_ip, "the local node runs Pods");
    Ok(node)
}

fn spawn_until(shutdown: &CancellationToken, task: impl std::future::Future<Output = ()> + Send + 'static) {
    let stop = shutdown.clone();
    tokio::spawn(async move {
        tokio::select! {
            _ = stop.cancelled() => {}
            _ = task => {}
        }
    });
}

fn uid_of(meta: &kube::api::ObjectMeta) -> String {
    meta.uid.clone().unwrap_or_default()
}

/// Drives a reflector's stream, calling `changed` for every object it reports.
async fn drive<K, S>(stream: S, changed: impl Fn(&K) + Send + 'static)
where
    K: kube::Resource<DynamicType = ()> + Clone + Send + 'static,
    S: futures::Stream<Item = Result<watcher::Event<K>, watcher::Error>> + Send,
{
    let mut stream = std::pin::pin!(stream);
    while let Some(event) = stream.next().await {
        match event {
            Ok(watcher::Event::Apply(o) | watcher::Event::InitApply(o) | watcher::Event::Delete(o)) => {
                tracing::trace!(kind = %K::kind(&()), name = ?o.meta().name, rv = ?o.meta().resource_version, "the local node saw a change");
                changed(&o)
            }
            Ok(_) => {}
            Err(error) => tracing::debug!(%error, "the local node's watch failed; it retries"),
        }
    }
}

/// The node's scheduler: binds every unscheduled Pod for the default scheduler to `local`.
async fn schedule(client: kube::Client) {
    let unscheduled = watcher::Config::default().fields("spec.nodeName=");
    let mut stream =
        std::pin::pin!(watcher(Api::<Pod>::all(client.clone()), unscheduled).default_backoff().applied_objects());
    while let Some(next) = stream.next().await {
        let Ok(pod) = next else { continue };
        let spec = pod.spec.as_ref();
        let ours = spec.and_then(|s| s.scheduler_name.as_deref()).is_none_or(|s| s == "default-scheduler");
        if !ours || pod.metadata.deletion_timestamp.is_some() {
            continue;
        }
        let (Some(ns), Some(name)) = (pod.metadata.namespace.as_deref(), pod.metadata.name.as_deref()) else {
            continue;
        };
        let binding = json!({"apiVersion": "v1", "kind": "Binding", "metadata": {"name": name},
            "target": {"apiVersion": "v1", "kind": "Node", "name": NODE_NAME}});
        let api = Api::<Pod>::namespaced(client.clone(), ns);
        match api.create_subresource::<_, Value>("binding", name, &PostParams::default(), &binding).await {
            Ok(_) => tracing::debug!(%ns, %name, "scheduled onto the local node"),
            Err(error) => tracing::debug!(%ns, %name, %error, "could not bind the Pod (already bound or gone)"),
        }
    }
}

/// Registers (or refreshes) Node `local`: Ready, its capacity from Docker.
async fn register(client: &kube::Client, docker: &NodeDocker, host_ip: &str) -> anyhow::Result<()> {
    let info = docker.docker.info().await.context("docker info")?;
    let cpus = info.ncpu.unwrap_or(1).to_string();
    let memory = format!("{}Ki", info.mem_total.unwrap_or(0) / 1024);
    let capacity = json!({"cpu": cpus, "memory": memory, "pods": "110"});
    let now = Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    let node = json!({
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": NODE_NAME, "labels": {
            "kubernetes.io/hostname": NODE_NAME, "kubernetes.io/os": "linux",
            "kubernetes.io/arch": std::env::consts::ARCH, "node.kubernetes.io/instance-type": "molecule-local"}},
        "spec": {},
        "status": {
            "capacity": capacity,
            "allocatable": capacity,
            "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady",
                "message": "the molecule local node runs Pods as Docker containers (a test bed, not a kubelet)",
                "lastHeartbeatTime": now, "lastTransitionTime": now}],
            "addresses": [{"type": "InternalIP", "address": host_ip}, {"type": "Hostname", "address": NODE_NAME}],
            "nodeInfo": {
                "kubeletVersion": format!("v1.32.0-molecule-{}", env!("CARGO_PKG_VERSION")),
                "kubeProxyVersion": "", "containerRuntimeVersion": format!("docker://{}", info.server_version.unwrap_or_default()),
                "osImage": info.operating_system.unwrap_or_default(), "kernelVersion": info.kernel_version.unwrap_or_default(),
                "operatingSystem": "linux", "architecture": std::env::consts::ARCH,
                "machineID": "", "systemUUID": "", "bootID": ""},
        },
    });
    let api = Api::<Node>::all(client.clone());
    let params = PatchParams::apply(MANAGER).force();
    api.patch(NODE_NAME, &params, &Patch::Apply(&node)).await?;
    api.patch_status(NODE_NAME, &params, &Patch::Apply(&node)).await?;
    Ok(())
}

fn uses_secret(pod: &Pod, name: &str) -> bool {
    let Some(spec) = &pod.spec else { return false };
    let in_volumes =
        spec.volumes.iter().flatten().any(|v| v.secret.as_ref().and_then(|s| s.secret_name.as_deref()) == Some(name));
    let in_env = spec.containers.iter().any(|c| {
        c.env
            .iter()
            .flatten()
            .any(|e| e.value_from.as_ref().and_then(|f| f.secret_key_ref.as_ref()).is_some_and(|r| r.name == name))
            || c.env_from.iter().flatten().any(|f| f.secret_ref.as_ref().is_some_and(|r| r.name == name))
    });
    in_volumes || in_env
}

fn uses_claim(pod: &Pod, name: &str) -> bool {
    pod.spec
        .iter()
        .flat_map(|s| s.volumes.iter().flatten())
        .any(|v| v.persistent_volume_claim.as_ref().is_some_and(|c| c.claim_name == name))
}

/// A key waits in the queue; one sync per key runs at a time; a key that changes
/// while it syncs is synced again after. A sync may ask to be run again later.
async fn run_queue(
    node: Arc<LocalNode>,
    mut queued: mpsc::UnboundedReceiver<(Key, Option<Duration>)>,
    shutdown: CancellationToken,
) {
    let mut delays: tokio_util::time::DelayQueue<Key> = tokio_util::time::DelayQueue::new();
    let mut in_flight: HashSet<Key> = HashSet::new();
    let mut dirty: HashSet<Key> = HashSet::new();
    let mut tasks: tokio::task::JoinSet<(Key, Option<Duration>)> = tokio::task::JoinSet::new();
    let start =
        |key: Key, in_flight: &mut HashSet<Key>, dirty: &mut HashSet<Key>, tasks: &mut tokio::task::JoinSet<_>| {
            if !in_flight.insert(key.clone()) {
                dirty.insert(key);
                return;
            }
            let node = node.clone();
            tasks.spawn(async move {
                let started = tokio::time::Instant::now();
                let again = match &key {
                    Key::Pod(uid) => node.sync_pod(uid).await,
                    Key::Claim(uid) => node.sync_claim(uid).await,
                    Key::Kept(name) => node.expire_kept(name).await,
                };
                let again = again.unwrap_or_else(|error| {
                    tracing::warn!(?key, %error, "the local node could not sync; retrying");
                    Some(Duration::from_secs(2))
                });
                tracing::debug!(?key, micros = started.elapsed().as_micros() as u64, ?again, "the local node synced");
                (key, again)
            });
        };
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => {
                tasks.abort_all();
                return;
            }
            Some((key, delay)) = queued.recv() => match delay {
                None => start(key, &mut in_flight, &mut dirty, &mut tasks),
                Some(delay) => { delays.insert(key, delay); }
            },
            Some(expired) = delays.next(), if !delays.is_empty() => {
                start(expired.into_inner(), &mut in_flight, &mut dirty, &mut tasks);
            }
            Some(done) = tasks.join_next(), if !tasks.is_empty() => {
                let Ok((key, again)) = done else { continue };
                in_flight.remove(&key);
                if let Some(delay) = again {
                    delays.insert(key.clone(), delay);
                }
                if dirty.remove(&key) {
                    start(key, &mut in_flight, &mut dirty, &mut tasks);
                }
            }
        }
    }
}

/// How long the kubelet's back-off makes a restart wait (None: restart now), and
/// the back-off it leaves: at once the first time, then 10 s doubling to 5 min; a
/// container that ran 10 minutes since its last restart starts over.
fn crash_backoff(
    entry: Option<Backoff>,
    finished: DateTime<Utc>,
    now: DateTime<Utc>,
) -> (Option<DateTime<Utc>>, Backoff) {
    let fresh = Backoff { delay: BACKOFF_FIRST, until: now };
    match entry {
        Some(e) if finished.signed_duration_since(e.until).to_std().unwrap_or_default() < 2 * BACKOFF_MAX => {
            let until = finished + e.delay;
            if now < until {
                (Some(until), e)
            } else {
                (None, Backoff { delay: (e.delay * 2).min(BACKOFF_MAX), until: now })
            }
        }
        _ => (None, fresh),
    }
}

fn chrono_delay(until: DateTime<Utc>, now: DateTime<Utc>) -> Duration {
    until.signed_duration_since(now).to_std().unwrap_or_default() + Duration::from_millis(50)
}

impl LocalNode {
    fn enqueue(&self, key: Key) {
        let _ = self.queue.send((key, None));
    }

    /// Pods in the object's namespace that `uses` it.
    fn enqueue_users(&self, meta: &kube::api::ObjectMeta, uses: impl Fn(&Pod, &str) -> bool) {
        let (Some(ns), Some(name)) = (meta.namespace.as_deref(), meta.name.as_deref()) else { return };
        for pod in self.pods.state() {
            if pod.metadata.namespace.as_deref() == Some(ns) && uses(&pod, name) {
                self.enqueue(Key::Pod(uid_of(&pod.metadata)));
            }
        }
    }

    fn pod(&self, uid: &str) -> Option<Arc<Pod>> {
        self.pods.state().into_iter().find(|p| p.metadata.uid.as_deref() == Some(uid))
    }

    fn memory(&self) -> std::sync::MutexGuard<'_, Memory> {
        self.memory.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Container events: each one names its Pod, which is synced; what the event
    /// promises is remembered so a listing that lags it is read again.
    async fn docker_events(self: Arc<Self>) {
        let mut events = self.docker.events();
        while let Some(event) = events.next().await {
            match event {
                Ok(message) => {
                    let Some(actor) = message.actor else { continue };
                    let attributes = actor.attributes.unwrap_or_default();
                    // The name says whose it is now (a kept sandbox passes to a next Pod).
                    let named = attributes.get("name").and_then(|n| NameParts::parse(n)).map(|p| p.uid);
                    let (Some(uid), Some(id), Some(action)) =
                        (named.or_else(|| attributes.get(labels::POD_UID).cloned()), actor.id, message.action)
                    else {
                        continue;
                    };
                    if uid == labels::KEPT {
                        continue;
                    }
                    let action = action.split(':').next().unwrap_or_default().trim().to_string();
                    self.memory().settling.entry(uid.clone()).or_default().saw(
                        &id,
                        &action,
                        tokio::time::Instant::now(),
                    );
                    self.enqueue(Key::Pod(uid.clone()));
                }
                Err(_) => {
                    for pod in self.pods.state() {
                        self.enqueue(Key::Pod(uid_of(&pod.metadata)));
                    }
                }
            }
        }
    }

    /// A claim: bound to its volume when new, its volume removed once it is gone.
    async fn sync_claim(&self, uid: &str) -> anyhow::Result<Option<Duration>> {
        let volume = claim_volume(uid);
        let claim = self.claims.state().into_iter().find(|c| c.metadata.uid.as_deref() == Some(uid));
        let Some(claim) = claim else {
            return Ok((!self.docker.remove_volume(&volume).await?).then_some(Duration::from_secs(2)));
        };
        let bound = claim.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Bound");
        if claim.metadata.deletion_timestamp.is_some() || bound {
            return Ok(None);
        }
        let (ns, name) =
            (claim.metadata.namespace.clone().unwrap_or_default(), claim.metadata.name.clone().unwrap_or_default());
        let volume_labels = HashMap::from([
            (labels::NODE.to_string(), self.identity.instance.clone()),
            (labels::PVC_NAMESPACE.to_string(), ns.clone()),
            (labels::PVC_NAME.to_string(), name.clone()),
            (labels::PVC_UID.to_string(), uid.to_string()),
        ]);
        self.docker.ensure_volume(&volume, volume_labels).await?;
        let spec = claim.spec.clone().unwrap_or_default();
        let api = Api::<PersistentVolumeClaim>::namespaced(self.client.clone(), &ns);
        if spec.volume_name.as_deref().is_none_or(str::is_empty) {
            api.patch(&name, &PatchParams::default(), &Patch::Merge(json!({"spec": {"volumeName": volume}}))).await?;
        }
        let storage = spec.resources.as_ref().and_then(|r| r.requests.as_ref()).and_then(|r| r.get("storage")).cloned();
        let status =
            json!({"status": {"phase": "Bound", "accessModes": spec.access_modes, "capacity": {"storage": storage}}});
        api.patch_status(&name, &PatchParams::default(), &Patch::Merge(status)).await?;
        tracing::debug!(%ns, %name, %volume, "bound the claim to a Docker volume");
        Ok(None)
    }

    /// One Pod: its containers made to match it, its status written.
    async fn sync_pod(&self, uid: &str) -> anyhow::Result<Option<Duration>> {
        let observed = self.docker.containers(Some(uid)).await?;
        let mut again = self.settle(uid, &observed);
        match self.pod(uid) {
            None => {
                self.tear_down(&observed, Duration::ZERO).await?;
                let _ = std::fs::remove_dir_all(volumes::pod_dir(&self.dir, uid));
                let mut memory = self.memory();
                memory.crash.retain(|(u, _), _| u != uid);
                memory.pull.retain(|(u, _), _| u != uid);
                memory.waiting.retain(|(u, _), _| u != uid);
                memory.predecessors.remove(uid);
            }
            Some(pod) if pod.metadata.deletion_timestamp.is_some() => self.terminate(&pod, &observed).await?,
            Some(pod) => {
                let later = self.run(&pod, &observed).await?;
                again = match (again, later) {
                    (Some(a), Some(b)) => Some(a.min(b)),
                    (a, b) => a.or(b),
                };
            }
        }
        Ok(again)
    }

    /// Events of the Pod's containers whose effect the listing did not show yet: read
    /// again after a short wait. `observed` is every container of the Pod, so one it
    /// does not hold is gone (what a `destroy` promises).
    fn settle(&self, uid: &str, observed: &[PodContainer]) -> Option<Duration> {
        settle_pod(&mut self.memory().settling, uid, observed, tokio::time::Instant::now())
    }

    async fn tear_down(&self, containers: &[PodContainer], grace: Duration) -> anyhow::Result<()> {
        // The Pod's containers first (within the grace period, all at once), the sandbox last.
        let (sandboxes, apps): (Vec<&PodContainer>, Vec<&PodContainer>) =
            containers.iter().partition(|c| c.container == labels::SANDBOX);
        let stops = apps.iter().filter(|c| c.run.is_running()).map(|c| self.docker.stop(&c.run.id, grace));
        for result in futures::future::join_all(stops).await {
            result?;
        }
        // Its processes are gone: the sandbox may pass on (before the removals, which
        // a next Pod of the name need not wait for).
        let running = sandboxes.iter().filter(|c| c.run.is_running()).max_by_key(|c| c.run.attempt).map(|c| &c.run.id);
        for c in &sandboxes {
            if running == Some(&c.run.id) && self.keep(c).await? {
                continue;
            }
            self.docker.remove(&c.run.id).await?;
        }
        // A next Pod of the name may be waiting for this one to go (every sandbox of a
        // Pod names the same Pod: the first says it).
        if let Some(parts) = sandboxes.iter().find_map(|c| NameParts::parse(&c.name)) {
            for next in self.pods.state() {
                let (ns, name) = (next.metadata.namespace.as_deref(), next.metadata.name.as_deref());
                if ns == Some(&parts.namespace) && name == Some(&parts.pod) && uid_of(&next.metadata) != parts.uid {
                    self.enqueue(Key::Pod(uid_of(&next.metadata)));
                }
            }
        }
        for c in &apps {
            self.docker.remove(&c.run.id).await?;
        }
        Ok(())
    }

    /// The running sandbox of a Pod that is gone, kept (renamed
    /// `k8s_POD_<pod>_<ns>_kept_0`) for [`KEEP_SANDBOX`]: a Pod of the same name and
    /// namespace made in that time (the runtime's heal: a workspace's Pod deleted and
    /// made again) gets it, network and address ready, instead of waiting for Docker to
    /// tear one network endpoint down and set another up. Its processes are gone with
    /// the Pod's containers; what stays is the pause process and the network namespace.
    /// Returns false when it cannot be kept (another is kept under that name).
    async fn keep(&self, sandbox: &PodContainer) -> anyhow::Result<bool> {
        let Some(parts) = NameParts::parse(&sandbox.name) else { return Ok(false) };
        if sandbox.sandbox_hash.is_none() || self.keep_sandbox.is_zero() {
            return Ok(false);
        }
        let kept = kept_name(&parts.pod, &parts.namespace);
        let _handover = self.handover.lock().await;
        if self.memory().kept.contains_key(&kept) || !self.docker.rename(&sandbox.run.id, &kept).await? {
            return Ok(false);
        }
        self.memory().kept.insert(kept.clone(), (sandbox.run.id.clone(), tokio::time::Instant::now()));
        let _ = self.queue.send((Key::Kept(kept), Some(self.keep_sandbox)));
        Ok(true)
    }

    /// The sandbox kept under `name`, for `pod` when it would get the same one.
    async fn take_kept(&self, pod: &Pod, hash: &str) -> anyhow::Result<Option<(String, String)>> {
        let name =
            kept_name(pod.metadata.name.as_deref().unwrap_or(""), pod.metadata.namespace.as_deref().unwrap_or(""));
        let Some((id, _)) = self.memory().kept.remove(&name) else { return Ok(None) };
        let fits = self
            .docker
            .inspect(&id)
            .await?
            .filter(|c| c.run.is_running() && c.sandbox_hash.as_deref() == Some(hash) && c.name == name);
        let Some(found) = fits else {
            self.docker.remove(&id).await?;
            return Ok(None);
        };
        if !self.docker.rename(&id, &render::docker_name(pod, labels::SANDBOX, 0)).await? {
            self.docker.remove(&id).await?;
            return Ok(None);
        }
        tracing::debug!(pod = ?pod.metadata.name, sandbox = %id, "the Pod takes the sandbox kept from the last Pod of its name");
        Ok(Some((id, found.ip.unwrap_or_default())))
    }

    /// A kept sandbox no Pod took in time goes.
    async fn expire_kept(&self, name: &str) -> anyhow::Result<Option<Duration>> {
        let id = {
            let mut memory = self.memory();
            match memory.kept.get(name) {
                Some((id, since)) if since.elapsed() >= self.keep_sandbox => {
                    let id = id.clone();
                    memory.kept.remove(name);
                    id
                }
                Some((_, since)) => return Ok(Some(self.keep_sandbox.saturating_sub(since.elapsed()))),
                None => return Ok(None),
            }
        };
        self.docker.remove(&id).await?;
        Ok(None)
    }

    /// A Pod being deleted: its containers stopped within its grace period and
    /// removed, its directories removed, then the Pod deleted for good.
    async fn terminate(&self, pod: &Pod, observed: &[PodContainer]) -> anyhow::Result<()> {
        let grace = Duration::from_secs(pod.metadata.deletion_grace_period_seconds.unwrap_or(0).max(0) as u64);
        self.tear_down(observed, grace).await?;
        let uid = uid_of(&pod.metadata);
        let _ = std::fs::remove_dir_all(volumes::pod_dir(&self.dir, &uid));
        let (ns, name) =
            (pod.metadata.namespace.clone().unwrap_or_default(), pod.metadata.name.clone().unwrap_or_default());
        let params = DeleteParams {
            grace_period_seconds: Some(0),
            preconditions: Some(Preconditions { uid: Some(uid), resource_version: None }),
            ..DeleteParams::default()
        };
        match Api::<Pod>::namespaced(self.client.clone(), &ns).delete(&name, &params).await {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(e)) if e.code == 404 || e.code == 409 => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// The Pod's volumes, made ready (Err: why the Pod waits, as a container's message).
    async fn volumes(&self, pod: &Pod) -> Result<BTreeMap<String, VolumeSource>, String> {
        let uid = uid_of(&pod.metadata);
        let ns = pod.metadata.namespace.clone().unwrap_or_default();
        let spec = pod.spec.clone().unwrap_or_default();
        let fs_group = spec.security_context.as_ref().and_then(|s| s.fs_group).and_then(|g| u32::try_from(g).ok());
        let mut out = BTreeMap::new();
        for volume in spec.volumes.iter().flatten() {
            let name = volume.name.clone();
            let source = if let Some(secret) = &volume.secret {
                let secret_name = secret.secret_name.clone().unwrap_or_default();
                let dir = volumes::volume_dir(&self.dir, &uid, "kubernetes.io~secret", &name);
                let found = self.secrets.state().into_iter().find(|s| {
                    s.metadata.namespace.as_deref() == Some(&ns) && s.metadata.name.as_deref() == Some(&secret_name)
                });
                let files = match found {
                    Some(s) => render::secret_files(&s, secret.items.as_deref(), secret.default_mode.unwrap_or(0o644))
                        .map_err(|e| format!("MountVolume.SetUp failed for volume \"{name}\" : {e}"))?,
                    None if secret.optional == Some(true) => vec![],
                    None => {
                        return Err(format!(
                            "MountVolume.SetUp failed for volume \"{name}\" : secret \"{secret_name}\" not found"
                        ));
                    }
                };
                let written =
                    tokio::task::spawn_blocking(move || volumes::write_atomically(&dir, &files, fs_group).map(|_| dir))
                        .await
                        .map_err(|e| e.to_string())?;
                VolumeSource::Secret(
                    written.map_err(|e| format!("MountVolume.SetUp failed for volume \"{name}\" : {e}"))?,
                )
            } else if let Some(claim) = &volume.persistent_volume_claim {
                let found = self.claims.state().into_iter().find(|c| {
                    c.metadata.namespace.as_deref() == Some(&ns)
                        && c.metadata.name.as_deref() == Some(&claim.claim_name)
                });
                let Some(found) = found else {
                    return Err(format!("persistentvolumeclaim \"{}\" not found", claim.claim_name));
                };
                if found.metadata.deletion_timestamp.is_some() {
                    return Err(format!("persistentvolumeclaim \"{}\" is being deleted", claim.claim_name));
                }
                if found.status.as_ref().and_then(|s| s.phase.as_deref()) != Some("Bound") {
                    return Err(format!("persistentvolumeclaim \"{}\" is not bound yet", claim.claim_name));
                }
                let volume = claim_volume(&uid_of(&found.metadata));
                VolumeSource::Named { host_path: self.docker.volume_dir(&volume).await, name: volume }
            } else if let Some(empty) = &volume.empty_dir {
                if empty.medium.as_deref() == Some("Memory") {
                    VolumeSource::Tmpfs { size_bytes: render::tmpfs_size(empty.size_limit.as_ref()) }
                } else {
                    let dir = volumes::volume_dir(&self.dir, &uid, "kubernetes.io~empty-dir", &name);
                    volumes::empty_dir(&dir, fs_group).map_err(|e| format!("emptyDir \"{name}\": {e}"))?;
                    VolumeSource::HostDir(dir)
                }
            } else {
                return Err(format!(
                    "volume \"{name}\": only secret, persistentVolumeClaim and emptyDir volumes run on the local node"
                ));
            };
            out.insert(name, source);
        }
        Ok(out)
    }

    /// A Pod that should run: sandbox, volumes, containers (started, restarted by its
    /// policy and back-off), then its status. Returns when to look again, if sooner
    /// than an event would say.
    async fn run(&self, pod: &Pod, observed: &[PodContainer]) -> anyhow::Result<Option<Duration>> {
        let uid = uid_of(&pod.metadata);
        let spec = pod.spec.clone().unwrap_or_default();
        let terminal = matches!(pod.status.as_ref().and_then(|s| s.phase.as_deref()), Some("Succeeded" | "Failed"));
        let mut again: Option<Duration> = None;
        let mut soon = |d: Duration| again = Some(again.map_or(d, |a: Duration| a.min(d)));
        let mut not_initialized = None;
        let mut blocked = None;
        if terminal {
            // Nothing runs again: only the sandbox is stopped.
            for c in observed.iter().filter(|c| c.container == labels::SANDBOX && c.run.is_running()) {
                self.docker.stop(&c.run.id, Duration::ZERO).await?;
            }
        } else if spec.init_containers.as_ref().is_some_and(|c| !c.is_empty()) {
            not_initialized = Some("the local node does not run init containers".to_string());
        } else {
            match self.volumes(pod).await {
                Err(why) => {
                    blocked = Some(why);
                    soon(BLOCKED_RETRY);
                }
                Ok(volumes) => match self.sandbox(pod, observed).await? {
                    // The last Pod of its name is being torn down: its sandbox may pass to this one.
                    None => soon(PREDECESSOR_WAIT),
                    Some((sandbox_id, pod_ip)) => {
                        let observed = self.docker.containers(Some(&uid)).await?;
                        for container in &spec.containers {
                            if let Some(wait) =
                                self.container(pod, container, &observed, &sandbox_id, &pod_ip, &volumes).await?
                            {
                                soon(wait);
                            }
                        }
                    }
                },
            }
        }

        // The status, from what Docker shows now.
        let observed = self.docker.containers(Some(&uid)).await?;
        let sandbox = latest(&observed, labels::SANDBOX);
        let host_network = spec.host_network.unwrap_or(false);
        let mut seen = Observation {
            sandbox_running: sandbox.is_some_and(|s| s.run.is_running()),
            pod_ip: if host_network { Some(self.host_ip.clone()) } else { sandbox.and_then(|s| s.ip.clone()) },
            host_ip: self.host_ip.clone(),
            not_initialized: not_initialized.clone(),
            ..Default::default()
        };
        let now = Utc::now();
        for container in &spec.containers {
            let mut attempts: Vec<&PodContainer> = observed.iter().filter(|c| c.container == container.name).collect();
            attempts.sort_by_key(|c| c.run.attempt);
            let current = attempts.last().map(|c| c.run.clone());
            let previous = attempts.len().checked_sub(2).map(|i| attempts[i].run.clone());
            let key = (uid.clone(), container.name.clone());
            let memory = self.memory();
            let waiting = if let Some(why) = &not_initialized {
                Some(("PodInitializing".to_string(), why.clone()))
            } else if let Some(why) = &blocked {
                Some(("ContainerCreating".to_string(), why.clone()))
            } else if current.as_ref().is_some_and(|r| r.is_running()) {
                None
            } else if let Some(w) = memory.waiting.get(&key) {
                Some(w.clone())
            } else {
                memory
                    .crash
                    .get(&key)
                    .filter(|b| b.until > now && current.as_ref().is_some_and(|r| r.is_terminated()))
                    .map(|b| {
                        (
                            "CrashLoopBackOff".to_string(),
                            format!(
                                "back-off {}s restarting failed container={} pod={}_{}({uid})",
                                b.delay.as_secs(),
                                container.name,
                                pod.metadata.name.as_deref().unwrap_or(""),
                                pod.metadata.namespace.as_deref().unwrap_or("")
                            ),
                        )
                    })
            };
            seen.containers.insert(container.name.clone(), ContainerView { current, previous, waiting });
        }
        let status = status::pod_status(pod, &seen, now);
        if pod.status.as_ref() != Some(&status) {
            let ns = pod.metadata.namespace.clone().unwrap_or_default();
            let name = pod.metadata.name.clone().unwrap_or_default();
            let body = Pod {
                metadata: kube::api::ObjectMeta {
                    name: Some(name.clone()),
                    namespace: Some(ns.clone()),
                    ..Default::default()
                },
                status: Some(status),
                ..Default::default()
            };
            match Api::<Pod>::namespaced(self.client.clone(), &ns)
                .replace_status(&name, &PostParams::default(), &body)
                .await
            {
                Ok(_) => {}
                Err(kube::Error::Api(e)) if e.code == 404 => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(again)
    }

    /// The Pod's running sandbox: the one it has, or the one kept from the last Pod of
    /// its name, else a new one. None: wait (briefly) for the last Pod of its name to
    /// be torn down, whose sandbox passes to this one. A sandbox that died takes the
    /// Pod's containers with it (they are made again in the new one, each a restart).
    async fn sandbox(&self, pod: &Pod, observed: &[PodContainer]) -> anyhow::Result<Option<(String, String)>> {
        if let Some(s) = latest(observed, labels::SANDBOX).filter(|s| s.run.is_running()) {
            return Ok(Some((s.run.id.clone(), s.ip.clone().unwrap_or_default())));
        }
        let attempt = latest(observed, labels::SANDBOX).map_or(0, |s| s.run.attempt + 1);
        if attempt > 0 {
            tracing::info!(pod = ?pod.metadata.name, "the Pod's sandbox is gone: its containers start again in a new one");
            for c in observed.iter().filter(|c| c.run.is_running()) {
                self.docker.stop(&c.run.id, Duration::ZERO).await?;
            }
            for c in observed.iter().filter(|c| c.container == labels::SANDBOX) {
                self.docker.remove(&c.run.id).await?;
            }
        }
        let body = render::sandbox(&self.identity, pod, attempt);
        let uid = uid_of(&pod.metadata);
        if attempt == 0
            && let Some(hash) = body.labels.as_ref().and_then(|l| l.get(labels::SANDBOX_HASH))
        {
            let _handover = self.handover.lock().await;
            if let Some(taken) = self.take_kept(pod, hash).await? {
                self.memory().predecessors.remove(&uid);
                return Ok(Some(taken));
            }
            if self.predecessor_running(pod).await? {
                let now = tokio::time::Instant::now();
                let since = *self.memory().predecessors.entry(uid.clone()).or_insert(now);
                if since.elapsed() < PREDECESSOR_WAIT {
                    return Ok(None);
                }
            }
        }
        self.memory().predecessors.remove(&uid);
        let name = render::docker_name(pod, labels::SANDBOX, attempt);
        let id = self.docker.create(&name, body).await?;
        self.docker.start(&id).await?;
        let ip = self.docker.inspect(&id).await?.and_then(|c| c.ip).unwrap_or_default();
        Ok(Some((id, ip)))
    }

    /// Whether a running sandbox of another Pod of this one's name and namespace is here
    /// (one being torn down: it is kept for this Pod in a moment).
    async fn predecessor_running(&self, pod: &Pod) -> anyhow::Result<bool> {
        let (name, ns) = (pod.metadata.name.as_deref().unwrap_or(""), pod.metadata.namespace.as_deref().unwrap_or(""));
        let uid = uid_of(&pod.metadata);
        let others = self.docker.named(&format!("k8s_{}_{name}_{ns}_", labels::SANDBOX)).await?;
        Ok(others.iter().any(|c| c.run.is_running() && c.pod_uid != uid && c.pod_uid != labels::KEPT))
    }

    /// One container of the Pod made to run as its spec and restart policy say.
    /// Returns when to look again (a back-off ends), if it waits for one.
    async fn container(
        &self,
        pod: &Pod,
        spec: &k8s_openapi::api::core::v1::Container,
        observed: &[PodContainer],
        sandbox_id: &str,
        pod_ip: &str,
        volumes: &BTreeMap<String, VolumeSource>,
    ) -> anyhow::Result<Option<Duration>> {
        let uid = uid_of(&pod.metadata);
        let key = (uid.clone(), spec.name.clone());
        let now = Utc::now();
        let mut attempts: Vec<&PodContainer> = observed.iter().filter(|c| c.container == spec.name).collect();
        attempts.sort_by_key(|c| c.run.attempt);
        let image = spec.image.clone().unwrap_or_default();
        let next_attempt = match attempts.last() {
            None => 0,
            Some(c) if c.run.is_running() => {
                if c.image == image {
                    return Ok(None);
                }
                // The image changed (the one change a Pod's spec allows): a restart.
                let grace =
                    pod.spec.as_ref().and_then(|s| s.termination_grace_period_seconds).unwrap_or(30).max(0) as u64;
                self.docker.stop(&c.run.id, Duration::from_secs(grace)).await?;
                c.run.attempt + 1
            }
            Some(c) if c.run.status == "created" && c.run.error.is_empty() => {
                // Made but never started (a crash between the two): start it now.
                return self.start(&key, &c.run.id).await;
            }
            Some(c) => {
                let policy = pod.spec.as_ref().and_then(|s| s.restart_policy.as_deref()).unwrap_or("Always");
                let failed = c.run.exit_code != 0 || c.run.status == "created";
                if !(policy == "Always" || (policy == "OnFailure" && failed)) {
                    return Ok(None);
                }
                let finished = c.run.finished_at.unwrap_or(now);
                let (wait, backoff) = crash_backoff(self.memory().crash.get(&key).copied(), finished, now);
                if let Some(until) = wait {
                    let why = format!(
                        "back-off {}s restarting failed container={} pod={}_{}({uid})",
                        backoff.delay.as_secs(),
                        spec.name,
                        pod.metadata.name.as_deref().unwrap_or(""),
                        pod.metadata.namespace.as_deref().unwrap_or("")
                    );
                    self.memory().waiting.insert(key, ("CrashLoopBackOff".into(), why));
                    return Ok(Some(chrono_delay(until, now)));
                }
                self.memory().crash.insert(key.clone(), backoff);
                c.run.attempt + 1
            }
        };

        // The image: present, or pulled as the policy allows (with the kubelet's back-off).
        let policy =
            spec.image_pull_policy.clone().unwrap_or_else(|| crate::kubeapi::default_pull_policy(&image).to_string());
        let mut present = self.docker.image(&image).await?;
        if present.is_none() || policy == "Always" {
            if policy == "Never" {
                let why = format!("Container image \"{image}\" is not present with pull policy of Never");
                self.memory().waiting.insert(key, ("ErrImageNeverPull".into(), why));
                return Ok(Some(BLOCKED_RETRY));
            }
            let backoff = self.memory().pull.get(&key).copied();
            if let Some(b) = backoff.filter(|b| b.until > now) {
                // The pull's error shows a moment first (the Pod's own events sync it again at once).
                let failed_at = b.until - b.delay;
                if now < failed_at + PULL_ERROR_SHOWN {
                    return Ok(Some(chrono_delay(failed_at + PULL_ERROR_SHOWN, now)));
                }
                self.memory()
                    .waiting
                    .insert(key, ("ImagePullBackOff".into(), format!("Back-off pulling image \"{image}\"")));
                return Ok(Some(chrono_delay(b.until, now)));
            }
            match crate::runtime::docker::pull_image(&self.docker.docker, &image).await {
                Ok(()) => {
                    self.memory().pull.remove(&key);
                    present = self.docker.image(&image).await?;
                }
                Err(error) => {
                    let delay = backoff.map_or(BACKOFF_FIRST, |b| (b.delay * 2).min(BACKOFF_MAX));
                    let mut memory = self.memory();
                    memory.pull.insert(key.clone(), Backoff { delay, until: now + delay });
                    memory
                        .waiting
                        .insert(key, ("ErrImagePull".into(), format!("failed to pull image \"{image}\": {error}")));
                    // Looked at again shortly: ImagePullBackOff until the next pull.
                    return Ok(Some(PULL_ERROR_SHOWN));
                }
            }
        }
        let image_user = present.unwrap_or_default();

        let config_error = |why: String| {
            self.memory().waiting.insert(key.clone(), ("CreateContainerConfigError".into(), why));
            Ok(Some(BLOCKED_RETRY))
        };
        let ns = pod.metadata.namespace.clone().unwrap_or_default();
        let secrets = self.secrets.state();
        let env = render::resolve_env(
            pod,
            spec,
            |name| {
                secrets
                    .iter()
                    .find(|s| s.metadata.namespace.as_deref() == Some(&ns) && s.metadata.name.as_deref() == Some(name))
                    .map(|s| s.as_ref())
            },
            pod_ip,
            &self.host_ip,
        );
        let env = match env {
            Ok(env) => env,
            Err(why) => return config_error(why),
        };
        let resolved =
            Resolved { sandbox_id: sandbox_id.to_string(), attempt: next_attempt, env, volumes: volumes.clone() };
        let body = match render::container(&self.identity, pod, spec, &resolved) {
            Ok(body) => body,
            Err(why) => return config_error(why),
        };
        let non_root = spec.security_context.as_ref().and_then(|s| s.run_as_non_root).or(pod
            .spec
            .as_ref()
            .and_then(|s| s.security_context.as_ref())
            .and_then(|s| s.run_as_non_root));
        let user = body.user.clone().unwrap_or(image_user);
        let uid_part = user.split(':').next().unwrap_or("");
        if non_root == Some(true) && matches!(uid_part, "" | "0" | "root") {
            return config_error(format!(
                "container has runAsNonRoot and image will run as root (pod: \"{}_{ns}({uid})\", container: {})",
                pod.metadata.name.as_deref().unwrap_or(""),
                spec.name
            ));
        }
        let name = render::docker_name(pod, &spec.name, next_attempt);
        let id = self.docker.create(&name, body).await?;
        // fsGroup on the claims' volumes, once Docker copied the image's content in.
        if let Some(gid) = pod.spec.as_ref().and_then(|s| s.security_context.as_ref()).and_then(|s| s.fs_group) {
            for source in volumes.values() {
                if let VolumeSource::Named { host_path: Some(dir), .. } = source {
                    let (dir, gid) = (dir.clone(), gid as u32);
                    let _ = tokio::task::spawn_blocking(move || volumes::apply_fs_group(&dir, gid)).await;
                }
            }
        }
        // Older attempts go; the one before this is kept for `logs --previous`.
        for old in attempts.iter().filter(|c| c.run.attempt + 1 < next_attempt) {
            self.docker.remove(&old.run.id).await?;
        }
        self.start(&key, &id).await
    }

    async fn start(&self, key: &(String, String), id: &str) -> anyhow::Result<Option<Duration>> {
        match self.docker.start(id).await {
            Ok(()) => {
                self.memory().waiting.remove(key);
                Ok(None)
            }
            Err(error) => {
                self.memory().waiting.insert(key.clone(), ("RunContainerError".into(), error.to_string()));
                Ok(Some(BLOCKED_RETRY))
            }
        }
    }
}

/// [`LocalNode::settle`] on the node's memory: when to read the Pod `uid` again.
/// Only that Pod's expectations count (another Pod's pending event is that Pod's
/// sync's business), and one that holds or is given up on is forgotten, so a Pod whose
/// containers are all gone asks for nothing.
fn settle_pod(
    settling: &mut HashMap<String, Settling>,
    uid: &str,
    observed: &[PodContainer],
    now: tokio::time::Instant,
) -> Option<Duration> {
    let pod = settling.get_mut(uid)?;
    for id in pod.ids() {
        let state = observed.iter().find(|c| c.run.id == id).map(|c| ContainerState::parse(&c.run.status));
        if let Checked::GaveUp(action) = pod.checked(&id, state, now) {
            tracing::debug!(container = %id, %action, "Docker never showed the event's effect");
        }
    }
    let due = pod.next_due().map(|due| due.saturating_duration_since(now));
    if pod.is_empty() {
        settling.remove(uid);
    }
    due
}

/// The name a sandbox is kept under for the next Pod of `pod` in `namespace`.
fn kept_name(pod: &str, namespace: &str) -> String {
    format!("k8s_{}_{pod}_{namespace}_{}_0", labels::SANDBOX, labels::KEPT)
}

fn latest<'a>(observed: &'a [PodContainer], container: &str) -> Option<&'a PodContainer> {
    observed.iter().filter(|c| c.container == container).max_by_key(|c| c.run.attempt)
}

#[async_trait::async_trait]
impl crate::kubeapi::PodLogs for LocalNode {
    async fn logs(
        &self,
        pod: &Value,
        options: &crate::kubeapi::LogOptions,
    ) -> Result<BoxStream<'static, std::io::Result<axum::body::Bytes>>, String> {
        let uid = pod["metadata"]["uid"].as_str().unwrap_or_default();
        let name = pod["metadata"]["name"].as_str().unwrap_or_default();
        let mut attempts: Vec<PodContainer> = self
            .docker
            .containers(Some(uid))
            .await
            .map_err(|e| e.to_string())?
            .into_iter()
            .filter(|c| c.container == options.container)
            .collect();
        attempts.sort_by_key(|c| c.run.attempt);
        let pick = if options.previous { attempts.len().checked_sub(2).map(|i| &attempts[i]) } else { attempts.last() };
        match pick {
            Some(c) => Ok(self.docker.logs(&c.run.id, options)),
            None if options.previous => {
                Err(format!("previous terminated container \"{}\" in pod \"{name}\" not found", options.container))
            }
            None => {
                let reason = pod["status"]["containerStatuses"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .find(|s| s["name"] == options.container.as_str())
                    .and_then(|s| s["state"]["waiting"]["reason"].as_str())
                    .unwrap_or("ContainerCreating")
                    .to_string();
                Err(format!("container \"{}\" in pod \"{name}\" is waiting to start: {reason}", options.container))
            }
        }
    }
}

/// The shortest span a Pod's CPU figure is averaged over.
const MIN_USAGE_WINDOW: chrono::TimeDelta = chrono::TimeDelta::seconds(5);

/// Usage of the node's Pods for the API's `metrics.k8s.io` (kubeapi/metrics.rs), read as
/// the Docker runtime reads its containers' (cgroup files, else stats). CPU is averaged
/// since the last time it was asked (since the container was created, the first time).
#[async_trait::async_trait]
impl crate::kubeapi::metrics::PodUsage for LocalNode {
    async fn usage(&self) -> Result<HashMap<String, Vec<crate::kubeapi::metrics::ContainerUsage>>, String> {
        use crate::model::usage::{Cpu, Reading, usage};
        let running = self.docker.running().await.map_err(|e| e.to_string())?;
        let infos: Vec<crate::model::container::ContainerInfo> = running
            .iter()
            .map(|c| crate::model::container::ContainerInfo { id: c.id.clone(), ..Default::default() })
            .collect();
        let read = self.usage.read(&self.docker.docker, &infos).await;
        let mut seen = self.readings.lock().unwrap_or_else(|e| e.into_inner());
        let mut out: HashMap<String, Vec<crate::kubeapi::metrics::ContainerUsage>> = HashMap::new();
        let mut next = HashMap::new();
        for now in read {
            let Some(c) = running.iter().find(|c| c.id == now.container_id) else {
                continue;
            };
            let since_created =
                c.created.map(|at| Reading { cpu: Some(Cpu::Total(0)), memory_bytes: None, at, ..now.clone() });
            let base = seen.get(&now.container_id).cloned().or(since_created);
            let u = usage(base.as_ref(), &now);
            out.entry(c.pod_uid.clone()).or_default().push(crate::kubeapi::metrics::ContainerUsage {
                container: c.container.clone(),
                cores: u.cpu_cores,
                window: u.window_seconds,
                memory_bytes: u.memory_bytes,
                at: u.sampled_at,
            });
            // The next rate is over at least MIN_USAGE_WINDOW: one list per namespace
            // right after another must not average over milliseconds.
            let keep = match base {
                Some(b) if now.at - b.at < MIN_USAGE_WINDOW => b,
                _ => now,
            };
            next.insert(keep.container_id.clone(), keep);
        }
        *seen = next;
        Ok(out)
    }
}

/// Everything the node with this instance id made (containers, volumes, its
/// network), removed: for tests' cleanup and for a laptop that is done with it.
pub async fn remove_everything(instance: &str) -> anyhow::Result<()> {
    let docker = NodeDocker { docker: crate::runtime::docker::connect_client().await?, instance: instance.to_string() };
    for c in docker.containers(None).await? {
        docker.remove(&c.run.id).await?;
    }
    for (volume, _) in docker.volumes().await? {
        docker.remove_volume(&volume).await?;
    }
    for network in docker.networks().await? {
        let _ = docker.docker.remove_network(&network).await;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn running(uid: &str, id: &str) -> PodContainer {
        PodContainer {
            pod_uid: uid.into(),
            container: "agent".into(),
            run: status::Run { id: id.into(), status: "running".into(), ..Default::default() },
            image: "molecule-agent:local".into(),
            ip: None,
            sandbox_hash: None,
            name: format!("k8s_agent_p_default_{uid}_0"),
        }
    }

    /// A Pod's sync asks to be run again only for its own containers' events, and a
    /// container that is gone settles its `die` and `destroy`: the deleted Pods of a
    /// run of heals never spin (each one's re-sync due at once, forever, and every
    /// other Pod's with it, as when the node's settling was one for all Pods).
    #[test]
    fn a_pod_resyncs_only_for_its_own_containers_and_a_gone_one_settles() {
        let t0 = tokio::time::Instant::now();
        let mut settling: HashMap<String, Settling> = HashMap::new();
        settling.entry("old".into()).or_default().saw("c1", "die", t0);
        settling.entry("old".into()).or_default().saw("c1", "destroy", t0);
        settling.entry("live".into()).or_default().saw("c2", "die", t0);

        assert_eq!(
            settle_pod(&mut settling, "other", &[running("other", "c3")], t0),
            None,
            "nothing of its own pending"
        );
        // The live Pod's listing lags its die: it is read again soon, and only it.
        let due = settle_pod(&mut settling, "live", &[running("live", "c2")], t0);
        assert!(due.is_some_and(|d| d > Duration::ZERO), "{due:?}");
        // The deleted Pod's container is not listed any more: what destroy promised.
        assert_eq!(settle_pod(&mut settling, "old", &[], t0), None);
        assert!(!settling.contains_key("old"), "a settled Pod is forgotten");
        // Once the live Pod's listing shows the exit, it asks for nothing either.
        let mut exited = running("live", "c2");
        exited.run.status = "exited".into();
        assert_eq!(settle_pod(&mut settling, "live", &[exited], t0 + Duration::from_millis(20)), None);
        assert!(settling.is_empty());
    }

    #[test]
    fn restarts_back_off_like_the_kubelet() {
        let t0 = Utc::now();
        let s = chrono::TimeDelta::seconds;
        // The first crash restarts at once and leaves a 10 s back-off.
        let (wait, b) = crash_backoff(None, t0, t0);
        assert_eq!((wait, b.delay), (None, BACKOFF_FIRST));
        // A second crash 2 s later waits until 10 s after it finished.
        let (wait, same) = crash_backoff(Some(b), t0 + s(2), t0 + s(2));
        assert_eq!(wait, Some(t0 + s(12)));
        assert_eq!(same.delay, BACKOFF_FIRST);
        // Once that passed it restarts, and the next back-off doubles.
        let (wait, b) = crash_backoff(Some(b), t0 + s(2), t0 + s(12));
        assert_eq!((wait, b.delay), (None, BACKOFF_FIRST * 2));
        // Capped at five minutes.
        let long = Backoff { delay: BACKOFF_MAX, until: t0 };
        assert_eq!(crash_backoff(Some(long), t0, t0 + s(400)).1.delay, BACKOFF_MAX);
        // A container that ran ten minutes starts over.
        assert_eq!(
            crash_backoff(Some(long), t0 + s(700), t0 + s(700)),
            (None, Backoff { delay: BACKOFF_FIRST, until: t0 + s(700) })
        );
    }
}
