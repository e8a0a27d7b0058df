//! The Kubernetes runtime (`--runtime kubernetes`): each workspace is a Pod, a
//! PersistentVolumeClaim (its `/configs`) and a token Secret in the Workspace's
//! namespace, scheduled by Kubernetes. The same rules, store and decision log as with
//! Docker: only how a container is made and seen differs. objects.rs says what the
//! objects are; this file makes the calls.
//!
//! How the `Runtime` calls map:
//! - a container is a Pod (its id the Pod's uid, its name `ws-<12>`); `create` makes
//!   the Pod, which starts by itself once its token Secret exists, so `start` does
//!   nothing; `remove` deletes it at once (grace 0) with its token and files Secrets
//!   (a next Pod of the name must not start on a revoked token) and waits until the
//!   name is free;
//! - the token "file" is the Secret `ws-<12>-token` (key `token`), mounted read-only
//!   into the Pod, where the agent reads `MOLECULE_TOKEN_FILE`: writing the token
//!   creates or replaces the Secret, and the kubelet updates the mounted file, so a
//!   rotation needs no restart;
//! - the config volume is the claim `ws-<12>-configs`; removing it also removes the
//!   token and files Secrets (a paused workspace keeps its claim, not its Pod);
//! - the config files (`spec.configFiles`) are the Secret `ws-<12>-files`, each key
//!   mounted read-only at its path in `/configs`; the Pod waits for it as for its
//!   token;
//! - there is no freezer: `pause` is refused (the rules remove the Pod instead);
//! - images are the node's to pull: a Pod that cannot get its image shows as Waiting
//!   with the kubelet's reason;
//! - events are watches on the instance's Pods, token Secrets and claims: a Secret
//!   edited or deleted reads as a write into the container (the token is read again),
//!   a claim being deleted as a change to its Pod (which then reads as dead); the
//!   Pod and claim watches fill reflectors, from which `list_ids` (the re-read an
//!   event asks for) is answered without a request.
//!
//! Objects are found by the instance label (`ai.molecule.instance`), in every
//! namespace; Pods also get an ownerReference to their Workspace when one exists (a
//! backstop: deleting the Workspace collects them even without the operator).

pub mod metrics;
pub mod objects;

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use futures::StreamExt;
use futures::stream::{self, BoxStream};
use k8s_openapi::api::core::v1::{PersistentVolumeClaim, Pod, Secret};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::reflector::{self, ObjectRef, Store, store::Writer};
use kube::runtime::wait::await_condition;
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, Resource, ResourceExt};

use self::objects::{
    ClaimSeen, TOKEN_KEY, config_claim, container_info, files_secret, files_secret_name, is_member, pod_claim,
    spec_namespace, split_key, token_secret, token_secret_name,
};
use super::{Runtime, RuntimeError, RuntimeEvent, RuntimeResult, Watched};
use crate::api::ImagePullPolicy;
use crate::model::container::{CONFIGS_DIR, ContainerInfo, ContainerSpec, IDENTITY_FILE, TOKEN_FILE, labels};

/// The field manager of the operator's server-side applies.
const FIELD_MANAGER: &str = "molecule-operator";
/// The field manager of a claim's identity in a member's token Secret: not the token's,
/// so that a token write (which applies the token alone) keeps the identity.
const CLAIM_FIELD_MANAGER: &str = "molecule-operator-claim";
/// How long a removal waits for the Pod's name to be free again.
const GONE_WITHIN: Duration = Duration::from_secs(60);

pub struct KubeRuntime {
    client: Client,
    instance: String,
    /// The resource metrics API, where the cluster serves one (metrics.rs).
    metrics: metrics::MetricsApi,
    reflected: Reflected,
}

/// The instance's Pods and claims as its watch last saw them (kube-rs reflectors fed
/// by [`Runtime::watch`], an informer's cache): the re-read an event asks for is
/// answered from them, so it costs the API server nothing however many Pods there are.
/// A full listing still asks the API server.
struct Reflected {
    pods: Store<Pod>,
    claims: Store<PersistentVolumeClaim>,
    /// Taken by the first watch.
    writers: Mutex<Option<(Writer<Pod>, Writer<PersistentVolumeClaim>)>>,
}

impl Default for Reflected {
    fn default() -> Self {
        let (pods, pod_writer) = reflector::store();
        let (claims, claim_writer) = reflector::store();
        Self { pods, claims, writers: Mutex::new(Some((pod_writer, claim_writer))) }
    }
}

impl Reflected {
    /// Those of `ids` the watch has; None until its first listing is in.
    fn list_ids(&self, ids: &[String]) -> Option<Vec<ContainerInfo>> {
        use futures::FutureExt;
        let ready = |r: Option<Result<(), _>>| r.is_some_and(|r| r.is_ok());
        if !ready(self.pods.wait_until_ready().now_or_never()) || !ready(self.claims.wait_until_ready().now_or_never())
        {
            return None;
        }
        let pods = self.pods.state_filter(|p| p.metadata.uid.as_ref().is_some_and(|u| ids.contains(u)));
        let claim = |ns: &str, name: &str| self.claims.get(&ObjectRef::new(name).within(ns)).map(|c| ClaimSeen::of(&c));
        Some(pods.iter().filter_map(|p| container_of(p, claim)).collect())
    }
}

/// A watch's stream, feeding `writer`'s store on its way when there is one.
fn reflect_into<K>(
    events: impl futures::Stream<Item = Result<watcher::Event<K>, watcher::Error>> + Send + 'static,
    writer: Option<Writer<K>>,
) -> BoxStream<'static, Result<watcher::Event<K>, watcher::Error>>
where
    K: Resource<DynamicType = ()> + Clone + Send + Sync + 'static,
{
    match writer {
        Some(writer) => events.reflect(writer).boxed(),
        None => events.boxed(),
    }
}

/// A Pod as a container, given how its claim is found (None: not there).
fn container_of(pod: &Pod, claim: impl Fn(&str, &str) -> Option<ClaimSeen>) -> Option<ContainerInfo> {
    let ns = pod.namespace().unwrap_or_default();
    // A claim that is not there (any more) cannot hold data: as if deleting.
    let seen = pod_claim(pod).map_or(ClaimSeen::Bound, |c| claim(&ns, &c).unwrap_or(ClaimSeen::Deleting));
    container_info(pod, seen)
}

impl KubeRuntime {
    pub fn new(client: Client, instance: &str) -> Self {
        Self { client, instance: instance.to_string(), metrics: Default::default(), reflected: Reflected::default() }
    }

    fn selector(&self, extra: Option<(&str, &str)>) -> ListParams {
        let mut s = format!("{}={}", labels::INSTANCE, self.instance);
        if let Some((k, v)) = extra {
            s.push_str(&format!(",{k}={v}"));
        }
        ListParams::default().labels(&s)
    }

    /// The Pods and claims `params` selects in `namespace` (every namespace when None),
    /// as containers.
    async fn pods(&self, namespace: Option<&str>, params: &ListParams) -> RuntimeResult<Vec<ContainerInfo>> {
        let (pods, claims): (Api<Pod>, Api<PersistentVolumeClaim>) = match namespace {
            Some(ns) => (Api::namespaced(self.client.clone(), ns), Api::namespaced(self.client.clone(), ns)),
            None => (Api::all(self.client.clone()), Api::all(self.client.clone())),
        };
        let pods = pods.list(params).await.map_err(|e| kube_error("listing Pods", e))?;
        let claims = claims.list(params).await.map_err(|e| kube_error("listing PersistentVolumeClaims", e))?;
        let seen: BTreeMap<(String, String), ClaimSeen> = claims
            .items
            .iter()
            .map(|c| ((c.namespace().unwrap_or_default(), c.name_any()), ClaimSeen::of(c)))
            .collect();
        Ok(pods
            .items
            .iter()
            .filter_map(|p| container_of(p, |ns, name| seen.get(&(ns.to_string(), name.to_string())).copied()))
            .collect())
    }

    /// The Pod with this uid or name, if it exists.
    async fn find_pod(&self, id_or_name: &str) -> RuntimeResult<Option<Pod>> {
        let all: Api<Pod> = Api::all(self.client.clone());
        let params = match id_or_name.starts_with("ws-") {
            true => self.selector(None).fields(&format!("metadata.name={id_or_name}")),
            false => self.selector(None),
        };
        let pods = all.list(&params).await.map_err(|e| kube_error("listing Pods", e))?;
        Ok(pods.items.into_iter().find(|p| p.metadata.uid.as_deref() == Some(id_or_name) || p.name_any() == id_or_name))
    }

    /// The claim named `name` in whatever namespace it is.
    async fn find_claim(&self, name: &str) -> RuntimeResult<Option<PersistentVolumeClaim>> {
        let all: Api<PersistentVolumeClaim> = Api::all(self.client.clone());
        let params = self.selector(None).fields(&format!("metadata.name={name}"));
        let found = all.list(&params).await.map_err(|e| kube_error("listing PersistentVolumeClaims", e))?;
        Ok(found.items.into_iter().next())
    }

    /// The Workspace object `namespace/name`, as an owner, when there is one (a
    /// workspace declared in a directory or in Postgres has none).
    async fn owner(&self, namespace: &str, name: &str) -> Option<OwnerReference> {
        let api: Api<crate::api::Workspace> = Api::namespaced(self.client.clone(), namespace);
        let ws = api.get_opt(name).await.ok().flatten()?;
        let mut owner = ws.controller_owner_ref(&())?;
        owner.block_owner_deletion = Some(true);
        Some(owner)
    }

    /// Creates or replaces (server-side apply) a Secret beside `pod`.
    async fn apply_secret(&self, pod: &Pod, secret: Secret, what: &str) -> RuntimeResult<()> {
        self.apply_secret_as(pod, secret, what, FIELD_MANAGER).await
    }

    async fn apply_secret_as(&self, pod: &Pod, secret: Secret, what: &str, manager: &str) -> RuntimeResult<()> {
        let ns = pod.namespace().unwrap_or_default();
        let api: Api<Secret> = Api::namespaced(self.client.clone(), &ns);
        let name = secret.name_any();
        api.patch(&name, &PatchParams::apply(manager).force(), &Patch::Apply(&secret))
            .await
            .map_err(|e| kube_error(format!("writing {what} {ns}/{name}"), e))?;
        Ok(())
    }

    /// The owner of a rendered spec's objects: its Workspace (a warm-pool member has
    /// none until a claim makes it a workspace's).
    async fn owner_of(&self, spec_labels: &BTreeMap<String, String>) -> Option<OwnerReference> {
        let key = spec_labels.get(labels::WORKSPACE)?;
        let (ns, ws) = split_key(key);
        self.owner(ns, ws).await
    }

    /// Waits until the object `name` is gone (its name free again), or, given the uid
    /// of the one being deleted, until that one is: over a watch, so the wait ends the
    /// moment the API server removes it, without polling it.
    async fn wait_gone<K>(&self, api: &Api<K>, name: &str, uid: Option<&str>) -> RuntimeResult<()>
    where
        K: Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + 'static,
    {
        let gone = move |obj: Option<&K>| obj.is_none_or(|o| uid.is_some_and(|u| o.meta().uid.as_deref() != Some(u)));
        match tokio::time::timeout(GONE_WITHIN, await_condition(api.clone(), name, gone)).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(RuntimeError::Kubernetes(format!("watching {name} go: {e}"))),
            Err(_) => Err(RuntimeError::Kubernetes(format!("{name} is still being deleted after {GONE_WITHIN:?}"))),
        }
    }
}

#[async_trait]
impl Runtime for KubeRuntime {
    async fn list(&self) -> RuntimeResult<Vec<ContainerInfo>> {
        self.pods(None, &self.selector(None)).await
    }

    /// From the watch's reflection once it has listed (the re-read an event asks
    /// for); before that from the API server.
    async fn list_ids(&self, ids: &[String]) -> RuntimeResult<Vec<ContainerInfo>> {
        if let Some(found) = self.reflected.list_ids(ids) {
            return Ok(found);
        }
        Ok(self.list().await?.into_iter().filter(|c| ids.contains(&c.id)).collect())
    }

    async fn list_labeled(&self, key: &str, value: &str) -> RuntimeResult<Vec<ContainerInfo>> {
        if key == labels::WORKSPACE || key == labels::POOL {
            // Label values hold no `/`: the namespace is the object's.
            let (ns, name) = split_key(value);
            return self.pods(Some(ns), &self.selector(Some((key, name)))).await;
        }
        self.pods(None, &self.selector(Some((key, value)))).await
    }

    /// From the resource metrics API (metrics.k8s.io), where the cluster serves it.
    async fn usage(&self, containers: &[ContainerInfo]) -> RuntimeResult<Option<Vec<crate::model::usage::Reading>>> {
        Ok(self.metrics.read(&self.client, &self.instance, containers).await)
    }

    fn freezes(&self) -> bool {
        false
    }

    async fn volume_exists(&self, name: &str) -> RuntimeResult<bool> {
        Ok(self.find_claim(name).await?.is_some_and(|c| c.metadata.deletion_timestamp.is_none()))
    }

    async fn ensure_volume(&self, name: &str, spec_labels: &BTreeMap<String, String>) -> RuntimeResult<()> {
        if let Some(claim) = self.find_claim(name).await? {
            if claim.metadata.deletion_timestamp.is_none() {
                return Ok(());
            }
            // Being deleted: it goes once no Pod mounts it (the claim's protection), so
            // its workspace's Pod goes first (the provision replaces it anyway); then
            // the claim is made anew.
            let ns = claim.namespace().unwrap_or_default();
            let pods: Api<Pod> = Api::namespaced(self.client.clone(), &ns);
            let using = pods.list(&self.selector(None)).await.map_err(|e| kube_error("listing Pods", e))?;
            for pod in using.items.iter().filter(|p| pod_claim(p).as_deref() == Some(name)) {
                self.remove(&pod.name_any()).await?;
            }
            let api: Api<PersistentVolumeClaim> = Api::namespaced(self.client.clone(), &ns);
            self.wait_gone(&api, name, claim.metadata.uid.as_deref()).await?;
        }
        let ns = spec_namespace(spec_labels);
        let owner = self.owner_of(spec_labels).await;
        let claim = config_claim(name, spec_labels, owner.as_ref());
        let api: Api<PersistentVolumeClaim> = Api::namespaced(self.client.clone(), ns);
        match api.create(&PostParams::default(), &claim).await {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(s)) if s.code == 409 => Ok(()),
            Err(e) => Err(kube_error(format!("creating PersistentVolumeClaim {ns}/{name}"), e)),
        }
    }

    async fn remove_volume(&self, name: &str) -> RuntimeResult<()> {
        let Some(claim) = self.find_claim(name).await? else { return Ok(()) };
        let ns = claim.namespace().unwrap_or_default();
        let claims: Api<PersistentVolumeClaim> = Api::namespaced(self.client.clone(), &ns);
        ignore_missing(claims.delete(name, &DeleteParams::background()).await.map(|_| ()))
            .map_err(|e| kube_error(format!("deleting PersistentVolumeClaim {ns}/{name}"), e))?;
        let pod = name.trim_end_matches("-configs");
        let secrets: Api<Secret> = Api::namespaced(self.client.clone(), &ns);
        for secret in [token_secret_name(pod), files_secret_name(pod)] {
            ignore_missing(secrets.delete(&secret, &DeleteParams::background()).await.map(|_| ()))
                .map_err(|e| kube_error(format!("deleting Secret {ns}/{secret}"), e))?;
        }
        Ok(())
    }

    async fn ensure_image(&self, _image: &str, _policy: ImagePullPolicy) -> RuntimeResult<()> {
        Ok(()) // the node pulls; an image it cannot get shows on the Pod (Waiting, ErrImagePull)
    }

    async fn create(&self, spec: &ContainerSpec) -> RuntimeResult<String> {
        let ns = spec_namespace(&spec.labels);
        let owner = self.owner_of(&spec.labels).await;
        let pod = objects::pod(spec, owner.as_ref()).map_err(RuntimeError::Kubernetes)?;
        let api: Api<Pod> = Api::namespaced(self.client.clone(), ns);
        let created = match api.create(&PostParams::default(), &pod).await {
            Err(kube::Error::Api(s)) if s.code == 409 => {
                // An earlier Pod of that name is still going away.
                self.wait_gone(&api, &spec.name, None).await?;
                api.create(&PostParams::default(), &pod).await
            }
            other => other,
        }
        .map_err(|e| kube_error(format!("creating Pod {ns}/{}", spec.name), e))?;
        if is_member(&spec.labels) {
            // Nothing writes a token into a warm-pool member: its Pod starts on an empty
            // token Secret, where a claim writes the token and the identity.
            self.apply_secret(&created, objects::member_token_secret(&created), "the token Secret").await?;
        }
        created
            .metadata
            .uid
            .ok_or_else(|| RuntimeError::Kubernetes("the API server returned a Pod without a uid".into()))
    }

    async fn start(&self, _id: &str) -> RuntimeResult<()> {
        Ok(()) // a Pod starts by itself once its token Secret is there
    }

    async fn pause(&self, id: &str) -> RuntimeResult<()> {
        Err(RuntimeError::Kubernetes(format!(
            "Pod {id}: Kubernetes has no freezer; a Paused workspace's Pod is deleted"
        )))
    }

    async fn unpause(&self, id: &str) -> RuntimeResult<()> {
        self.pause(id).await
    }

    async fn remove(&self, id_or_name: &str) -> RuntimeResult<()> {
        let Some(pod) = self.find_pod(id_or_name).await? else { return Ok(()) };
        let (ns, name) = (pod.namespace().unwrap_or_default(), pod.name_any());
        let api: Api<Pod> = Api::namespaced(self.client.clone(), &ns);
        // At once: the workspace's tokens are revoked already, and its new incarnation
        // takes the same name.
        let params = DeleteParams { grace_period_seconds: Some(0), ..DeleteParams::background() };
        ignore_missing(api.delete(&name, &params).await.map(|_| ()))
            .map_err(|e| kube_error(format!("deleting Pod {ns}/{name}"), e))?;
        // Its token and files go with it: a next Pod of that name must not start on
        // what they hold now (a revoked token, the files of the old spec) before they
        // are rewritten, as a kubelet may take a minute to update a mounted Secret.
        let secrets: Api<Secret> = Api::namespaced(self.client.clone(), &ns);
        for secret in [token_secret_name(&name), files_secret_name(&name)] {
            ignore_missing(secrets.delete(&secret, &DeleteParams::background()).await.map(|_| ()))
                .map_err(|e| kube_error(format!("deleting Secret {ns}/{secret}"), e))?;
        }
        self.wait_gone(&api, &name, pod.metadata.uid.as_deref()).await
    }

    async fn write_file(&self, id: &str, dir: &str, name: &str, content: &[u8], _mode: u32) -> RuntimeResult<()> {
        if dir.trim_end_matches('/') != CONFIGS_DIR || (name != TOKEN_FILE && name != IDENTITY_FILE) {
            return Err(RuntimeError::Kubernetes(format!(
                "the Kubernetes runtime writes only the token and a claim's identity into a Pod, not {dir}/{name}"
            )));
        }
        let pod = self.find_pod(id).await?.ok_or_else(|| gone(id))?;
        if name == IDENTITY_FILE {
            // Beside the token, in the member's token Secret (its agent reads
            // MOLECULE_IDENTITY_FILE there).
            let secret = objects::identity_secret(&pod, content);
            return self.apply_secret_as(&pod, secret, "the identity", CLAIM_FIELD_MANAGER).await;
        }
        self.apply_secret(&pod, token_secret(&pod, content), "the token Secret").await
    }

    /// Relabels the member's Pod and its claim as the workspace's (merge patches: the
    /// pool label stays), its owner the Workspace. The token Secret follows with the
    /// token written next (it takes the Pod's labels and owner).
    async fn adopt(&self, id: &str, spec: &ContainerSpec) -> RuntimeResult<()> {
        let pod = self.find_pod(id).await?.ok_or_else(|| gone(id))?;
        let (ns, name) = (pod.namespace().unwrap_or_default(), pod.name_any());
        let owner = self.owner_of(&spec.labels).await;
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), &ns);
        let patch = objects::claimed_pod_patch(spec, owner.as_ref());
        pods.patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .map_err(|e| kube_error(format!("relabelling Pod {ns}/{name}"), e))?;
        if let Some(claim) = pod_claim(&pod) {
            let claims: Api<PersistentVolumeClaim> = Api::namespaced(self.client.clone(), &ns);
            let patch = objects::claimed_claim_patch(spec, owner.as_ref());
            claims
                .patch(&claim, &PatchParams::default(), &Patch::Merge(&patch))
                .await
                .map_err(|e| kube_error(format!("relabelling PersistentVolumeClaim {ns}/{claim}"), e))?;
        }
        Ok(())
    }

    fn config_files_fixed(&self) -> bool {
        true
    }

    async fn write_files(
        &self,
        id: &str,
        dir: &str,
        files: &BTreeMap<String, String>,
        _mode: u32,
    ) -> RuntimeResult<()> {
        if files.is_empty() {
            return Ok(());
        }
        if dir.trim_end_matches('/') != CONFIGS_DIR {
            return Err(RuntimeError::Kubernetes(format!(
                "the Kubernetes runtime writes config files only into {CONFIGS_DIR}, not {dir}"
            )));
        }
        let pod = self.find_pod(id).await?.ok_or_else(|| gone(id))?;
        self.apply_secret(&pod, files_secret(&pod, files), "the config files Secret").await
    }

    async fn read_file(&self, id: &str, path: &str) -> RuntimeResult<Option<Vec<u8>>> {
        if path != format!("{CONFIGS_DIR}/{TOKEN_FILE}") {
            return Err(RuntimeError::Kubernetes(format!(
                "the Kubernetes runtime reads only the token of a Pod, not {path}"
            )));
        }
        let pod = self.find_pod(id).await?.ok_or_else(|| gone(id))?;
        let ns = pod.namespace().unwrap_or_default();
        let api: Api<Secret> = Api::namespaced(self.client.clone(), &ns);
        let name = token_secret_name(&pod.name_any());
        let secret = api.get_opt(&name).await.map_err(|e| kube_error(format!("reading the Secret {ns}/{name}"), e))?;
        Ok(secret.and_then(|s| s.data).and_then(|mut d| d.remove(TOKEN_KEY)).map(|b| b.0))
    }

    fn watch(&self) -> BoxStream<'static, Watched> {
        let config = watcher::Config::default().labels(&format!("{}={}", labels::INSTANCE, self.instance));
        let writers = self.reflected.writers.lock().unwrap_or_else(|e| e.into_inner()).take();
        let (pod_writer, claim_writer) = writers.map_or((None, None), |(p, c)| (Some(p), Some(c)));
        let pods = watcher(Api::<Pod>::all(self.client.clone()), config.clone()).default_backoff();
        let pods = reflect_into(pods, pod_writer).map(|e| Seen::Pod(Box::new(e)));
        let secrets = watcher(Api::<Secret>::all(self.client.clone()), config.clone())
            .default_backoff()
            .map(|e| Seen::Secret(Box::new(e)));
        let claims = watcher(Api::<PersistentVolumeClaim>::all(self.client.clone()), config).default_backoff();
        let claims = reflect_into(claims, claim_writer).map(|e| Seen::Claim(Box::new(e)));
        // Pod uid per workspace uid, to name the Pod a Secret or claim change concerns.
        let pod_of: Arc<Mutex<HashMap<String, String>>> = Arc::default();
        stream::select_all([pods.boxed(), secrets.boxed(), claims.boxed()])
            .flat_map(move |seen| stream::iter(translate(seen, &pod_of)))
            .boxed()
    }
}

/// What one of the three watches saw.
enum Seen {
    Pod(News<Pod>),
    Secret(News<Secret>),
    Claim(News<PersistentVolumeClaim>),
}

/// One item of a watch (boxed: a Pod is large, and most news is of small objects).
type News<K> = Box<Result<watcher::Event<K>, watcher::Error>>;

/// A watch's news as runtime events: a Pod's change as itself; a token Secret's as a
/// write into its Pod (the token memo reads it again); a claim's as a change to its
/// Pod (whose state depends on it). A watch that fails, or starts over, may have
/// missed events: `Lost`.
fn translate(seen: Seen, pod_of: &Mutex<HashMap<String, String>>) -> Vec<Watched> {
    let now = Some(chrono::Utc::now());
    let lost = |what: &str, e: watcher::Error| vec![Watched::Lost(format!("the {what} watch failed: {e}"))];
    let mut pods = pod_of.lock().unwrap_or_else(|e| e.into_inner());
    match seen {
        Seen::Pod(news) => match *news {
            Err(e) => lost("Pod", e),
            Ok(watcher::Event::Init) => vec![Watched::Lost("the Pod watch started over".into())],
            Ok(watcher::Event::InitDone) => Vec::new(),
            Ok(watcher::Event::Apply(pod) | watcher::Event::InitApply(pod)) => pod_news(pod, "update", &mut pods, now),
            Ok(watcher::Event::Delete(pod)) => pod_news(pod, "destroy", &mut pods, now),
        },
        Seen::Secret(news) => match *news {
            Err(e) => lost("Secret", e),
            Ok(watcher::Event::Apply(o) | watcher::Event::Delete(o)) => {
                concerning(&o.metadata.labels, &o.namespace(), &pods, "extract-to-dir", now)
            }
            Ok(_) => Vec::new(),
        },
        Seen::Claim(news) => match *news {
            Err(e) => lost("PersistentVolumeClaim", e),
            Ok(watcher::Event::Apply(o) | watcher::Event::Delete(o)) => {
                concerning(&o.metadata.labels, &o.namespace(), &pods, "update", now)
            }
            Ok(_) => Vec::new(),
        },
    }
}

/// A Pod's change as an event of its own, remembering which Pod is its workspace's.
fn pod_news(
    pod: Pod,
    action: &str,
    pods: &mut HashMap<String, String>,
    at: Option<chrono::DateTime<chrono::Utc>>,
) -> Vec<Watched> {
    let (Some(id), Some(info)) = (pod.metadata.uid.clone(), container_info(&pod, ClaimSeen::Bound)) else {
        return Vec::new();
    };
    if let Some(uid) = info.uid() {
        match action {
            "destroy" => pods.remove(uid),
            _ => pods.insert(uid.to_string(), id.clone()),
        };
    }
    vec![Watched::Event(RuntimeEvent {
        workspace: info.workspace().map(str::to_string),
        container_id: id,
        action: action.into(),
        at,
    })]
}

/// An event for the Pod of the workspace an object is labelled with, if it has one.
fn concerning(
    object_labels: &Option<BTreeMap<String, String>>,
    namespace: &Option<String>,
    pods: &HashMap<String, String>,
    action: &str,
    at: Option<chrono::DateTime<chrono::Utc>>,
) -> Vec<Watched> {
    let l = object_labels.as_ref();
    let (Some(uid), Some(name)) = (l.and_then(|l| l.get(labels::UID)), l.and_then(|l| l.get(labels::WORKSPACE))) else {
        return Vec::new();
    };
    let Some(pod) = pods.get(uid) else { return Vec::new() };
    let ns = namespace.as_deref().unwrap_or("default");
    vec![Watched::Event(RuntimeEvent {
        workspace: Some(format!("{ns}/{name}")),
        container_id: pod.clone(),
        action: action.into(),
        at,
    })]
}

fn ignore_missing(r: Result<(), kube::Error>) -> Result<(), kube::Error> {
    match r {
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
        other => other,
    }
}

/// A Pod that is gone: not a missing file (callers must not read it as one).
fn gone(id: &str) -> RuntimeError {
    RuntimeError::Kubernetes(format!("Pod {id} is gone"))
}

/// What a failed API call means: the API server unreachable is `Unavailable` (retried,
/// never read as "nothing exists"); a refusal is `Kubernetes`, saying why in words a
/// user acts on (a missing namespace, a quota, a missing grant) and the server's own.
fn kube_error(what: impl std::fmt::Display, e: kube::Error) -> RuntimeError {
    match e {
        kube::Error::Api(s) => RuntimeError::Kubernetes(format!("{what}: the Kubernetes API refused: {}", refusal(&s))),
        other => RuntimeError::Unavailable(format!("{what}: the Kubernetes API cannot be reached: {other}")),
    }
}

/// Why the API server refused, from its Status. The causes a Workspace can have
/// (rather than the operator) are named first: they end up in its conditions.
pub fn refusal(s: &kube::core::Status) -> String {
    let said = format!("{} ({} {})", s.message, s.code, s.reason);
    let detail_kind = s.details.as_ref().map(|d| d.kind.as_str()).unwrap_or_default();
    if s.code == 404 && (detail_kind == "namespaces" || s.message.starts_with("namespaces \"")) {
        let ns = s.details.as_ref().map(|d| d.name.clone()).filter(|n| !n.is_empty());
        let ns = ns.unwrap_or_else(|| s.message.split('"').nth(1).unwrap_or_default().to_string());
        return format!(
            "namespace {ns} does not exist: create it (`kubectl create namespace {ns}`) or declare the Workspace in \
             another namespace; {said}"
        );
    }
    if s.code == 403 && s.message.contains("exceeded quota") {
        return format!(
            "the namespace's ResourceQuota refuses it: raise the quota or lower the workspace's tier; {said}"
        );
    }
    if s.code == 403 && s.message.contains("is being terminated") {
        return format!("its namespace is being deleted; {said}");
    }
    if s.code == 403 {
        return format!("forbidden: the operator's ServiceAccount lacks a grant (deploy/rbac.yaml); {said}");
    }
    said
}
