//! `Runtime` on the local Docker daemon (bollard).
//!
//! Fencing: every list and event subscription is filtered server-side by
//! `ai.molecule.instance=<instance>`, and `remove` checks that label before it
//! deletes anything, so several operators (and parallel tests) share one daemon.
//! bollard's models are from API 1.53 while the daemon may speak 1.41: every field
//! read from a response is optional and read defensively.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use bollard::errors::Error as DockerError;
use bollard::models::{
    ContainerCreateBody, ContainerSummary, EventMessage, HostConfig, Mount, MountType, RestartPolicy,
    RestartPolicyNameEnum, VolumeCreateRequest,
};
use bollard::query_parameters::{
    CreateContainerOptionsBuilder, CreateImageOptionsBuilder, DownloadFromContainerOptionsBuilder,
    EventsOptionsBuilder, ListContainersOptionsBuilder, ListNetworksOptionsBuilder, RemoveContainerOptionsBuilder,
    RemoveVolumeOptionsBuilder, UploadToContainerOptionsBuilder,
};
use bollard::{Docker, body_full};
use chrono::{DateTime, Utc};
use futures::stream::{self, BoxStream, StreamExt, TryStreamExt};

use super::docker_error::{api_error, chain, is_unavailable, message, status, unavailable};
use super::{
    READ_FILE_LIMIT, Runtime, RuntimeError, RuntimeEvent, RuntimeResult, Watched, agent_image,
    network::WorkspaceNetwork,
};
use crate::api::ImagePullPolicy;
use crate::model::container::{
    AGENT_UID, AppliedConfig, CONFIGS_DIR, ContainerInfo, ContainerSpec, ContainerState, labels,
};

/// Mode of a directory `write_file` creates or re-owns: the agent owns it (it may
/// replace files in it); others may list it. Secrets are protected by the file mode.
const DIR_MODE: u32 = 0o755;
/// Labels copied from a container spec onto its config volume. Incarnation and
/// spec-hash are left out: the volume outlives both.
const VOLUME_LABELS: [&str; 4] = [labels::MANAGED, labels::INSTANCE, labels::WORKSPACE, labels::UID];
/// How long a request may wait for the response headers (bollard's default is 120 s).
/// A hung daemon call fails after this and the reconcile backs off and retries,
/// rather than holding its workspace's one reconcile slot for two minutes. Pulls,
/// builds and the event stream answer with headers at once and then stream.
const REQUEST_TIMEOUT_SECS: u64 = 30;
/// How much of a file's archive `read_file` takes: the file's first READ_FILE_LIMIT + 1
/// bytes and room for the tar headers before them (a few hundred bytes; more with PAX
/// records).
const ARCHIVE_READ_LIMIT: usize = READ_FILE_LIMIT + 64 * 1024;
const EVENTS_BACKOFF_MIN: Duration = Duration::from_millis(500);
const EVENTS_BACKOFF_MAX: Duration = Duration::from_secs(30);

/// A client of the local daemon (`DOCKER_HOST=unix://...` or /var/run/docker.sock)
/// with this module's conventions: the API version negotiated, the daemon pinged,
/// [`REQUEST_TIMEOUT_SECS`] for response headers. A missing socket or a daemon that
/// does not answer is `Unavailable`; callers retry. (The local node uses it too.)
pub async fn connect_client() -> RuntimeResult<Docker> {
    let docker = Docker::connect_with_local_defaults()
        .map_err(|e| unavailable(format!("cannot open the Docker socket: {}", chain(&e))))?
        .with_timeout(Duration::from_secs(REQUEST_TIMEOUT_SECS));
    negotiate(docker).await
}

async fn negotiate(docker: Docker) -> RuntimeResult<Docker> {
    let unreachable = |e: DockerError| unavailable(chain(&e));
    let docker = docker.negotiate_version().await.map_err(unreachable)?;
    docker.ping().await.map_err(unreachable)?;
    Ok(docker)
}

/// Container events matching `filters` (e.g. a label): [`docker_events`] of
/// containers.
pub fn container_events(
    docker: Docker,
    mut filters: HashMap<&'static str, Vec<String>>,
) -> BoxStream<'static, Result<EventMessage, String>> {
    filters.insert("type", vec!["container".to_string()]);
    docker_events(docker, filters)
}

/// The daemon's events matching `filters`, from the moment of this call, even those
/// before the stream is first polled. Reconnects with backoff (0.5 s doubling to 30 s)
/// whenever the stream ends or fails, resuming from the last event's time: an event
/// may repeat after a reconnect, none in between is lost (the daemon keeps its last
/// 256 events). Yields `Err(why)` each time the stream is lost, before it waits to
/// reconnect. Never ends by itself.
pub fn docker_events(
    docker: Docker,
    filters: HashMap<&'static str, Vec<String>>,
) -> BoxStream<'static, Result<EventMessage, String>> {
    let state = EventsState {
        docker,
        filters,
        current: None,
        since: since_arg(SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos() as i64)),
        backoff: EVENTS_BACKOFF_MIN,
        lost: false,
    };
    stream::unfold(state, |mut st| async move {
        if st.lost {
            st.lost = false;
            tokio::time::sleep(st.backoff).await;
            st.backoff = (st.backoff * 2).min(EVENTS_BACKOFF_MAX);
        }
        let current = st.current.get_or_insert_with(|| {
            let options = EventsOptionsBuilder::new().filters(&st.filters).since(&st.since).build();
            st.docker.events(Some(options)).boxed()
        });
        match current.next().await {
            Some(Ok(message)) => {
                st.backoff = EVENTS_BACKOFF_MIN;
                if let Some(nanos) = message.time_nano {
                    st.since = since_arg(nanos);
                }
                Some((Ok(message), st))
            }
            ended => {
                let error = match ended {
                    Some(Err(e)) => chain(&e),
                    _ => "the daemon closed it".to_string(),
                };
                tracing::warn!(%error, retry_in = ?st.backoff, "Docker event stream lost; reconnecting");
                st.current = None;
                st.lost = true; // wait before reconnecting, after the loss is reported
                Some((Err(format!("the Docker event stream was lost: {error}")), st))
            }
        }
    })
    .boxed()
}

/// Pulls `image` (a tagless name pulls `latest` only). `PullFailed` names the image.
pub async fn pull_image(docker: &Docker, image: &str) -> RuntimeResult<()> {
    let (name, tag) = split_reference(image);
    let mut options = CreateImageOptionsBuilder::new().from_image(name);
    if !tag.is_empty() {
        options = options.tag(tag);
    }
    let pulled: Result<Vec<_>, _> = docker.create_image(Some(options.build()), None, None).try_collect().await;
    pulled.map(drop).map_err(|e| {
        if is_unavailable(&e) {
            unavailable(chain(&e))
        } else {
            RuntimeError::PullFailed { image: image.to_string(), message: chain(&e) }
        }
    })
}

/// The Docker runtime of one operator instance.
#[derive(Clone)]
pub struct DockerRuntime {
    docker: Docker,
    instance: String,
    /// Write files into a volume's host directory when it is reachable (see `write_file`).
    direct_volume_writes: bool,
    /// Which way each `write_file` went (shared by clones).
    writes: Arc<FileWrites>,
    /// Where each container's usage is read (docker_usage.rs).
    usage: Arc<super::docker_usage::UsageReader>,
}

/// How many files `write_file` wrote straight into a volume's directory, and how many
/// through the archive API: the tests tell by these which way their write went.
#[derive(Debug, Default)]
pub struct FileWrites {
    pub direct: AtomicU64,
    pub uploaded: AtomicU64,
}

impl fmt::Debug for DockerRuntime {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DockerRuntime").field("instance", &self.instance).finish_non_exhaustive()
    }
}

impl DockerRuntime {
    /// Connects to the local daemon (`DOCKER_HOST=unix://...` or /var/run/docker.sock),
    /// negotiates the API version and pings it. A missing socket or a daemon that does
    /// not answer is `Unavailable`; callers retry.
    pub async fn connect(instance: &str) -> RuntimeResult<Self> {
        if instance.is_empty() {
            return Err(RuntimeError::Api("the operator instance id is empty; it must name this operator".into()));
        }
        Ok(Self {
            docker: connect_client().await?,
            instance: instance.to_string(),
            direct_volume_writes: true,
            writes: Arc::default(),
            usage: Arc::default(),
        })
    }

    /// Like `connect`, at an explicit unix socket path.
    pub async fn connect_unix(socket: &str, instance: &str) -> RuntimeResult<Self> {
        let docker = Docker::connect_with_unix(socket, REQUEST_TIMEOUT_SECS, bollard::API_DEFAULT_VERSION)
            .map_err(|e| unavailable(format!("cannot open the Docker socket {socket}: {}", chain(&e))))?;
        Self::handshake(docker, instance).await
    }

    async fn handshake(docker: Docker, instance: &str) -> RuntimeResult<Self> {
        if instance.is_empty() {
            return Err(RuntimeError::Api("the operator instance id is empty; it must name this operator".into()));
        }
        Ok(Self {
            docker: negotiate(docker).await?,
            instance: instance.to_string(),
            direct_volume_writes: true,
            writes: Arc::default(),
            usage: Arc::default(),
        })
    }

    pub fn instance(&self) -> &str {
        &self.instance
    }

    /// Files written so far by this runtime and its clones, by the way they went.
    pub fn file_writes(&self) -> &FileWrites {
        &self.writes
    }

    /// Always writes files through Docker's archive API, even where the volume's
    /// directory is reachable (tests use it to cover both paths).
    pub fn archive_writes_only(mut self) -> Self {
        self.direct_volume_writes = false;
        self
    }

    /// The host directory of the named volume mounted (read-write) at `dir` in our
    /// container `id`, when this process can reach it: the operator runs on the
    /// daemon's host with access to its volumes (as root next to a rootful daemon).
    /// None otherwise, and then files go through the archive API.
    async fn reachable_volume_dir(&self, id: &str, dir: &str) -> Option<std::path::PathBuf> {
        let c = self.docker.inspect_container(id, None).await.ok()?;
        let ours = c.config.as_ref().and_then(|c| c.labels.as_ref()).and_then(|l| l.get(labels::INSTANCE));
        if ours != Some(&self.instance) {
            return None;
        }
        let mount = c.mounts?.into_iter().find(|m| {
            m.typ.as_deref() == Some("volume")
                && m.rw != Some(false)
                && m.destination.as_deref().map(|d| d.trim_end_matches('/')) == Some(dir)
        })?;
        let source = std::path::PathBuf::from(mount.source?);
        let reachable = tokio::fs::symlink_metadata(&source).await.is_ok_and(|m| m.is_dir());
        reachable.then_some(source)
    }

    /// Builds the `molecule-agent:local` image unless it is present and current;
    /// true when it built. See `agent_image`.
    pub async fn ensure_agent_image(&self) -> RuntimeResult<bool> {
        agent_image::ensure_agent_image(&self.docker, agent_image::AGENT_IMAGE).await
    }

    /// Builds the agent image unconditionally (`molecule-operator agent-image`).
    pub async fn build_agent_image(&self) -> RuntimeResult<()> {
        agent_image::build_agent_image(&self.docker, agent_image::AGENT_IMAGE).await
    }

    /// The networks named exactly `name` (the daemon's name filter matches parts of
    /// names), oldest id first.
    async fn networks_named(&self, name: &str) -> RuntimeResult<Vec<bollard::models::Network>> {
        let filters = HashMap::from([("name", vec![name.to_string()])]);
        let options = ListNetworksOptionsBuilder::new().filters(&filters).build();
        let mut found = self
            .docker
            .list_networks(Some(options))
            .await
            .map_err(|e| api_error(format!("listing networks named {name}"), e))?;
        found.retain(|n| n.name.as_deref() == Some(name));
        found.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(found)
    }

    /// This instance's own bridge network `name` (see `runtime::network`): created,
    /// labelled with the instance, when it is missing; refused when a network of that
    /// name exists that this instance did not make. Docker 20.10 does not refuse a
    /// second network of the same name, so replicas creating it at once may make two:
    /// every replica then keeps the one with the smallest id and removes the others.
    pub async fn ensure_own_network(&self, name: &str) -> RuntimeResult<WorkspaceNetwork> {
        let ours = |n: &bollard::models::Network| {
            n.labels.as_ref().and_then(|l| l.get(labels::INSTANCE)) == Some(&self.instance)
        };
        let mut found = self.networks_named(name).await?;
        if found.is_empty() {
            let request = bollard::models::NetworkCreateRequest {
                name: name.to_string(),
                driver: Some("bridge".into()),
                labels: Some(HashMap::from([
                    (labels::MANAGED.to_string(), "true".to_string()),
                    (labels::INSTANCE.to_string(), self.instance.clone()),
                ])),
                ..Default::default()
            };
            self.docker.create_network(request).await.map_err(|e| {
                let e = api_error(format!("creating network {name}"), e);
                match e.to_string().contains("non-overlapping") {
                    true => RuntimeError::Api(format!(
                        "{e}; Docker has no address range left for another network: remove unused ones \
                         (`docker network prune`, or old `molecule-*` networks), or pass --network"
                    )),
                    false => e,
                }
            })?;
            tracing::info!(network = name, "created the workspaces' network");
            found = self.networks_named(name).await?;
        }
        let Some(keep) = found.iter().find(|n| ours(n)).cloned() else {
            return Err(RuntimeError::Api(format!(
                "a Docker network named {name} exists but was not made by operator instance {:?} (it lacks the \
                 label {}={0:?}); remove it, or pass --network NAME to put workspaces on it",
                self.instance,
                labels::INSTANCE
            )));
        };
        for twin in found.iter().filter(|n| ours(n) && n.id != keep.id) {
            if let Some(id) = &twin.id {
                let _ = self.docker.remove_network(id).await;
            }
        }
        Ok(workspace_network(&keep))
    }

    /// The network `name` as it is (None when there is none), for `--network NAME`:
    /// the operator uses it as it finds it and never changes or removes it.
    pub async fn find_network(&self, name: &str) -> RuntimeResult<Option<WorkspaceNetwork>> {
        match self.docker.inspect_network(name, None).await {
            Ok(n) => Ok(Some(WorkspaceNetwork {
                name: n.name.unwrap_or_else(|| name.to_string()),
                gateway: gateway_of(n.ipam.as_ref()),
            })),
            Err(e) if status(&e) == Some(404) => Ok(None),
            Err(e) => Err(api_error(format!("inspecting network {name}"), e)),
        }
    }

    /// Removes this instance's network `name` when no container of this instance
    /// exists (in any state: a stopped one could not start again without it). A
    /// network with containers attached is refused by Docker anyway. True if removed.
    pub async fn remove_own_network_if_unused(&self, name: &str) -> RuntimeResult<bool> {
        if !self.list().await?.is_empty() {
            return Ok(false);
        }
        let mut removed = false;
        for n in self.networks_named(name).await? {
            let ours = n.labels.as_ref().and_then(|l| l.get(labels::INSTANCE)) == Some(&self.instance);
            if let (true, Some(id)) = (ours, &n.id) {
                match self.docker.remove_network(id).await {
                    Ok(()) => removed = true,
                    Err(e) if status(&e) == Some(404) => {}
                    Err(e) => return Err(api_error(format!("removing network {name}"), e)),
                }
            }
        }
        Ok(removed)
    }

    /// One container of this instance with `started_at` filled (one inspect call);
    /// None when it does not exist or belongs to another instance.
    pub async fn inspect(&self, id_or_name: &str) -> RuntimeResult<Option<ContainerInfo>> {
        let c = match self.docker.inspect_container(id_or_name, None).await {
            Ok(c) => c,
            Err(e) if status(&e) == Some(404) => return Ok(None),
            Err(e) => return Err(api_error(format!("inspecting container {id_or_name}"), e)),
        };
        let labels: BTreeMap<String, String> =
            c.config.as_ref().and_then(|c| c.labels.clone()).unwrap_or_default().into_iter().collect();
        if labels.get(labels::INSTANCE) != Some(&self.instance) {
            return Ok(None);
        }
        let state = c.state.as_ref();
        Ok(Some(ContainerInfo {
            id: c.id.clone().unwrap_or_default(),
            name: c.name.as_deref().unwrap_or_default().trim_start_matches('/').to_string(),
            image: c.config.as_ref().and_then(|c| c.image.clone()).unwrap_or_default(),
            state: state.and_then(|s| s.status).map_or(ContainerState::Unknown, |s| ContainerState::parse(s.as_ref())),
            labels,
            created_at: c.created.as_ref().and_then(|t| parse_time(&t.to_string())),
            started_at: state.and_then(|s| s.started_at.as_deref()).and_then(parse_time),
            ..Default::default()
        }))
    }

    fn instance_filter(&self) -> HashMap<&'static str, Vec<String>> {
        HashMap::from([("label", vec![format!("{}={}", labels::INSTANCE, self.instance)])])
    }

    async fn pull(&self, image: &str) -> RuntimeResult<()> {
        pull_image(&self.docker, image).await
    }

    async fn upload(&self, id: &str, into: &str, tar: Vec<u8>) -> Result<(), DockerError> {
        let options = UploadToContainerOptionsBuilder::new().path(into).build();
        self.docker.upload_to_container(id, Some(options), body_full(tar.into())).await
    }
}

#[async_trait]
impl Runtime for DockerRuntime {
    /// One API call: `created_at` comes from the list, `started_at` is left None
    /// (it needs an inspect per container: use `DockerRuntime::inspect`).
    async fn list(&self) -> RuntimeResult<Vec<ContainerInfo>> {
        let options = ListContainersOptionsBuilder::new().all(true).filters(&self.instance_filter()).build();
        let containers =
            self.docker.list_containers(Some(options)).await.map_err(|e| api_error("listing containers", e))?;
        Ok(containers.into_iter().filter_map(container_info).collect())
    }

    /// One API call, filtered by id (the daemon matches each given id) and our label.
    async fn list_ids(&self, ids: &[String]) -> RuntimeResult<Vec<ContainerInfo>> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let mut filters = self.instance_filter();
        filters.insert("id", ids.to_vec());
        let options = ListContainersOptionsBuilder::new().all(true).filters(&filters).build();
        let containers =
            self.docker.list_containers(Some(options)).await.map_err(|e| api_error("listing containers", e))?;
        // The daemon's id filter matches prefixes; keep exactly the ids asked for.
        Ok(containers.into_iter().filter_map(container_info).filter(|c| ids.contains(&c.id)).collect())
    }

    /// One API call: label filters are ANDed by the daemon.
    async fn list_labeled(&self, key: &str, value: &str) -> RuntimeResult<Vec<ContainerInfo>> {
        let mut filters = self.instance_filter();
        filters.entry("label").or_default().push(format!("{key}={value}"));
        let options = ListContainersOptionsBuilder::new().all(true).filters(&filters).build();
        let containers =
            self.docker.list_containers(Some(options)).await.map_err(|e| api_error("listing containers", e))?;
        Ok(containers.into_iter().filter_map(container_info).filter(|c| c.label(key) == Some(value)).collect())
    }

    async fn volume_exists(&self, name: &str) -> RuntimeResult<bool> {
        match self.docker.inspect_volume(name).await {
            Ok(_) => Ok(true),
            Err(e) if status(&e) == Some(404) => Ok(false),
            Err(e) => Err(api_error(format!("inspecting volume {name}"), e)),
        }
    }

    async fn ensure_volume(&self, name: &str, labels: &BTreeMap<String, String>) -> RuntimeResult<()> {
        if self.volume_exists(name).await? {
            return Ok(());
        }
        let request = VolumeCreateRequest {
            name: Some(name.to_string()),
            labels: Some(labels.iter().map(|(k, v)| (k.clone(), v.clone())).collect()),
            ..Default::default()
        };
        // Creating an existing volume is a no-op in Docker, so a race with another creator is harmless.
        self.docker.create_volume(request).await.map(drop).map_err(|e| api_error(format!("creating volume {name}"), e))
    }

    async fn remove_volume(&self, name: &str) -> RuntimeResult<()> {
        let options = RemoveVolumeOptionsBuilder::new().force(false).build();
        match self.docker.remove_volume(name, Some(options)).await {
            Ok(()) => Ok(()),
            Err(e) if status(&e) == Some(404) => Ok(()),
            Err(e) => Err(api_error(format!("removing volume {name}"), e)),
        }
    }

    async fn ensure_image(&self, image: &str, policy: ImagePullPolicy) -> RuntimeResult<()> {
        let present = match self.docker.inspect_image(image).await {
            Ok(_) => true,
            Err(e) if status(&e) == Some(404) => false,
            Err(e) => return Err(api_error(format!("inspecting image {image}"), e)),
        };
        match policy {
            ImagePullPolicy::Never if present => Ok(()),
            ImagePullPolicy::Never => Err(RuntimeError::ImageMissing { image: image.to_string() }),
            ImagePullPolicy::IfNotPresent if present => Ok(()),
            ImagePullPolicy::IfNotPresent | ImagePullPolicy::Always => self.pull(image).await,
        }
    }

    /// Also ensures the config volume (labelled with the spec's managed, instance,
    /// workspace and uid labels), so Docker never creates it unlabelled.
    async fn create(&self, spec: &ContainerSpec) -> RuntimeResult<String> {
        let volume_labels: BTreeMap<String, String> =
            VOLUME_LABELS.iter().filter_map(|k| spec.labels.get(*k).map(|v| (k.to_string(), v.clone()))).collect();
        self.ensure_volume(&spec.config_volume, &volume_labels).await?;
        let options = CreateContainerOptionsBuilder::new().name(&spec.name).build();
        let created = self
            .docker
            .create_container(Some(options), container_body(spec))
            .await
            .map_err(|e| api_error(format!("creating container {}", spec.name), e))?;
        Ok(created.id)
    }

    async fn start(&self, id: &str) -> RuntimeResult<()> {
        // Starting a running container answers 304, which bollard reports as success.
        self.docker.start_container(id, None).await.map_err(|e| api_error(format!("starting container {id}"), e))
    }

    async fn pause(&self, id: &str) -> RuntimeResult<()> {
        match self.docker.pause_container(id).await {
            // 409 on current daemons, 500 on 20.10.
            Err(e) if message(&e).contains("is already paused") => Ok(()),
            r => r.map_err(|e| api_error(format!("pausing container {id}"), e)),
        }
    }

    async fn unpause(&self, id: &str) -> RuntimeResult<()> {
        match self.docker.unpause_container(id).await {
            Err(e) if message(&e).contains("is not paused") => Ok(()),
            r => r.map_err(|e| api_error(format!("unpausing container {id}"), e)),
        }
    }

    /// Refuses a container that carries another instance's label (names are global).
    async fn remove(&self, id_or_name: &str) -> RuntimeResult<()> {
        let id = match self.docker.inspect_container(id_or_name, None).await {
            Err(e) if status(&e) == Some(404) => return Ok(()),
            Err(e) => return Err(api_error(format!("inspecting container {id_or_name}"), e)),
            Ok(c) => {
                let owner = c.config.as_ref().and_then(|c| c.labels.as_ref()).and_then(|l| l.get(labels::INSTANCE));
                if owner != Some(&self.instance) {
                    return Err(RuntimeError::Api(format!(
                        "container {id_or_name} belongs to operator instance {:?}, not {:?}; not removing it",
                        owner.map_or("(none)", String::as_str),
                        self.instance
                    )));
                }
                c.id.unwrap_or_else(|| id_or_name.to_string())
            }
        };
        let options = RemoveContainerOptionsBuilder::new().force(true).v(true).build();
        match self.docker.remove_container(&id, Some(options)).await {
            Ok(()) => Ok(()),
            Err(e) if status(&e) == Some(404) => Ok(()),
            Err(e) if message(&e).contains("already in progress") => Ok(()),
            Err(e) => Err(api_error(format!("removing container {id_or_name}"), e)),
        }
    }

    /// Uploads a tar holding `dir/` (owned by AGENT_UID, mode 0755) and `dir/name` into
    /// dir's parent: Docker ignores a tar entry for the extraction root itself, and a
    /// fresh named volume's root is root-owned, so this is how the agent comes to own
    /// its config dir. On a read-only root filesystem Docker only accepts uploads into
    /// a volume, so there the file alone goes into `dir`, whose ownership then comes
    /// from the image (the agent image ships /configs owned by AGENT_UID, and Docker
    /// copies that onto a fresh volume).
    async fn write_file(&self, id: &str, dir: &str, name: &str, content: &[u8], mode: u32) -> RuntimeResult<()> {
        if name.is_empty() || name.contains('/') || name == "." || name == ".." {
            return Err(RuntimeError::Api(format!("cannot write {name:?}: not a plain file name")));
        }
        let what = || format!("writing {dir}/{name} into container {id}");
        let tar = |dir| file_tar(dir, name, content, mode).map_err(|e| RuntimeError::Api(format!("{}: {e}", what())));
        let dir = dir.trim_end_matches('/');
        // An upload costs the daemon a mount and a helper process, as much as creating
        // the container; a file written straight into the volume's directory costs
        // nothing there. Same ownership and modes either way.
        if self.direct_volume_writes
            && let Some(host_dir) = self.reachable_volume_dir(id, dir).await
        {
            let (file, content) = (name.to_string(), content.to_vec());
            let written = tokio::task::spawn_blocking(move || write_into_dir(&host_dir, &file, &content, mode)).await;
            match written {
                Ok(Ok(())) => {
                    self.writes.direct.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(container = id, "wrote {dir}/{name} straight into the volume's directory");
                    return Ok(());
                }
                Ok(Err(e)) => {
                    tracing::debug!(container = id, error = %e, "writing into the volume directory failed; uploading instead")
                }
                Err(e) => {
                    tracing::debug!(container = id, error = %e, "writing into the volume directory failed; uploading instead")
                }
            }
        }
        let uploaded = || {
            self.writes.uploaded.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(container = id, "wrote {dir}/{name} through the archive API");
        };
        if let Some((parent, base)) = dir.rsplit_once('/').filter(|(_, base)| !base.is_empty()) {
            match self.upload(id, if parent.is_empty() { "/" } else { parent }, tar(Some(base))?).await {
                Ok(()) => {
                    uploaded();
                    return Ok(());
                }
                // Status 500 on 20.10; matched by message so other versions' codes do too.
                Err(e) if message(&e).contains("rootfs is marked read-only") => {}
                Err(e) => return Err(api_error(what(), e)),
            }
        }
        self.upload(id, if dir.is_empty() { "/" } else { dir }, tar(None)?).await.map_err(|e| api_error(what(), e))?;
        uploaded();
        Ok(())
    }

    /// One upload for all the files: a tar holding every subdirectory (owned by the
    /// agent) and file, extracted into `dir`.
    async fn write_files(&self, id: &str, dir: &str, files: &BTreeMap<String, String>, mode: u32) -> RuntimeResult<()> {
        if files.is_empty() {
            return Ok(());
        }
        let what = || format!("writing {} config files into {dir} of container {id}", files.len());
        let tar = files_tar(files, mode).map_err(|e| RuntimeError::Api(format!("{}: {e}", what())))?;
        self.upload(id, dir, tar).await.map_err(|e| api_error(what(), e))?;
        self.writes.uploaded.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// From the containers' cgroup files where they are reachable, else one-shot stats
    /// (docker_usage.rs).
    async fn usage(&self, containers: &[ContainerInfo]) -> RuntimeResult<Option<Vec<crate::model::usage::Reading>>> {
        Ok(Some(self.usage.read(&self.docker, containers).await))
    }

    /// Takes at most `ARCHIVE_READ_LIMIT` bytes of the archive: the rest is never read
    /// (dropping the stream closes the connection, and the daemon stops sending), so a
    /// container that makes the file huge costs the operator nothing more.
    async fn logs(&self, id: &str, follow: bool, tail: usize) -> RuntimeResult<Option<BoxStream<'static, Vec<u8>>>> {
        let options = bollard::query_parameters::LogsOptionsBuilder::new()
            .stdout(true)
            .stderr(true)
            .follow(follow)
            .tail(&tail.to_string())
            .build();
        let mut stream = self.docker.logs(id, Some(options));
        // The first chunk (or error) tells whether the container is there at all.
        let first = match stream.next().await {
            Some(Err(e)) => return Err(api_error(format!("reading the logs of {id}"), e)),
            Some(Ok(chunk)) => Some(chunk.into_bytes().to_vec()),
            None => None,
        };
        let rest = stream
            .take_while(|r| futures::future::ready(r.is_ok()))
            .filter_map(|r| async move { r.ok().map(|chunk| chunk.into_bytes().to_vec()) });
        Ok(Some(stream::iter(first).chain(rest).boxed()))
    }

    async fn read_file(&self, id: &str, path: &str) -> RuntimeResult<Option<Vec<u8>>> {
        let options = DownloadFromContainerOptionsBuilder::new().path(path).build();
        let mut chunks = self.docker.download_from_container(id, Some(options));
        let mut archive = Vec::new();
        let read = loop {
            match chunks.next().await {
                None => break Ok(()),
                Some(Err(e)) => break Err(e),
                Some(Ok(chunk)) => {
                    let room = ARCHIVE_READ_LIMIT - archive.len();
                    archive.extend_from_slice(&chunk[..chunk.len().min(room)]);
                    if archive.len() == ARCHIVE_READ_LIMIT {
                        tracing::debug!(container = id, path, "the file is longer than what is read of it");
                        break Ok(());
                    }
                }
            }
        };
        drop(chunks);
        let archive = match read {
            Ok(()) => archive,
            // 404 is "no such file", but also "no such container", and a container being
            // torn down (`docker rm -f`) loses its files before it is gone. A container
            // removed since it was listed is not one whose token file is missing: the
            // token-file rule would issue a token for it. So a missing file counts only
            // in a container that is still there and running.
            Err(e) if status(&e) == Some(404) => {
                let state = match self.inspect(id).await? {
                    Some(c) if c.state == ContainerState::Running => return Ok(None),
                    Some(c) => format!("{:?}", c.state),
                    None => "gone".to_string(),
                };
                return Err(RuntimeError::Api(format!(
                    "reading {path} from container {id}: {} (the container is {state}, not running)",
                    message(&e)
                )));
            }
            Err(e) => return Err(api_error(format!("reading {path} from container {id}"), e)),
        };
        first_file_in_tar(&archive, READ_FILE_LIMIT + 1)
            .map(Some)
            .map_err(|e| RuntimeError::Api(format!("reading {path} from container {id}: {e}")))
    }

    /// `events`, with a `Lost` each time the stream fails or ends, before it waits to
    /// reconnect. Two subscriptions: this instance's containers (by label), and every
    /// network connect and disconnect (networks carry no labels of ours; the container
    /// cache keeps only those of its containers).
    fn watch(&self) -> BoxStream<'static, Watched> {
        let instance = self.instance.clone();
        let containers = container_events(self.docker.clone(), self.instance_filter())
            .filter_map(move |message| futures::future::ready(watched(message, |m| runtime_event(m, &instance))));
        // Networks carry no labels of ours: every connect and disconnect (the container
        // cache keeps only those of its containers).
        let networks = HashMap::from([
            ("type", vec!["network".to_string()]),
            ("event", vec!["connect".to_string(), "disconnect".to_string()]),
        ]);
        // Networks name the container only: it is this instance's if its labels say so.
        let (docker, instance) = (self.docker.clone(), self.instance.clone());
        let networks = docker_events(self.docker.clone(), networks).filter_map(move |message| {
            let (docker, instance) = (docker.clone(), instance.clone());
            async move {
                let watched = watched(message, network_event)?;
                let Watched::Event(ev) = &watched else { return Some(watched) };
                let theirs = docker.inspect_container(&ev.container_id, None).await.ok()?.config?.labels?;
                (theirs.get(labels::INSTANCE) == Some(&instance)).then_some(watched)
            }
        });
        stream::select(containers, networks).boxed()
    }

    async fn applied_config(&self, id: &str) -> RuntimeResult<Option<AppliedConfig>> {
        let c = match self.docker.inspect_container(id, None).await {
            Ok(c) => c,
            Err(e) if status(&e) == Some(404) => return Ok(None),
            Err(e) => return Err(api_error(format!("inspecting container {id}"), e)),
        };
        let host = c.host_config.unwrap_or_default();
        let mut networks: Vec<String> =
            c.network_settings.and_then(|n| n.networks).unwrap_or_default().into_keys().collect();
        networks.sort();
        Ok(Some(AppliedConfig {
            memory_bytes: host.memory.unwrap_or(0),
            nano_cpus: host.nano_cpus.unwrap_or(0),
            restart_policy: host
                .restart_policy
                .and_then(|p| p.name)
                .map_or_else(|| "no".to_string(), |n| n.as_ref().to_string()),
            networks,
        }))
    }
}

/// A subscription's item as the runtime's watch reports it: `keep` maps a message to
/// an event (or drops it); a lost stream is `Lost`.
fn watched(
    message: Result<EventMessage, String>,
    keep: impl FnOnce(EventMessage) -> Option<RuntimeEvent>,
) -> Option<Watched> {
    match message {
        Ok(message) => keep(message).map(Watched::Event),
        Err(lost) => Some(Watched::Lost(lost)),
    }
}

/// A container connected to or disconnected from a network (any container: the
/// cache keeps only this instance's).
fn network_event(message: EventMessage) -> Option<RuntimeEvent> {
    let action = message.action?;
    let container = message.actor?.attributes?.remove("container")?;
    Some(RuntimeEvent {
        workspace: None,
        container_id: container,
        action,
        at: message.time_nano.map(DateTime::from_timestamp_nanos),
    })
}

struct EventsState {
    docker: Docker,
    filters: HashMap<&'static str, Vec<String>>,
    current: Option<BoxStream<'static, Result<EventMessage, DockerError>>>,
    /// Where a (re)connect starts: the subscription's or the last event's time (`secs.nanos`).
    since: String,
    backoff: Duration,
    /// The stream was just lost (and reported): wait `backoff` before reconnecting.
    lost: bool,
}

/// The container a spec describes: hardened by default, privileges only as asked.
fn container_body(spec: &ContainerSpec) -> ContainerCreateBody {
    let security = &spec.security;
    let host_config = HostConfig {
        init: Some(true),
        memory: Some(spec.memory_bytes).filter(|m| *m > 0),
        nano_cpus: Some(spec.nano_cpus).filter(|c| *c > 0),
        readonly_rootfs: Some(spec.read_only_root),
        tmpfs: spec
            .tmp_tmpfs_bytes
            .map(|bytes| HashMap::from([("/tmp".to_string(), format!("rw,noexec,nosuid,size={bytes}"))])),
        network_mode: Some(spec.network.clone()),
        mounts: Some(vec![Mount {
            target: Some(CONFIGS_DIR.to_string()),
            source: Some(spec.config_volume.clone()),
            typ: Some(MountType::VOLUME),
            read_only: Some(false),
            ..Default::default()
        }]),
        // Privileged grants every capability anyway; dropping them would contradict it.
        cap_drop: (!security.privileged).then(|| vec!["ALL".to_string()]),
        security_opt: (!security.privileged).then(|| vec!["no-new-privileges:true".to_string()]),
        restart_policy: Some(RestartPolicy {
            name: Some(RestartPolicyNameEnum::UNLESS_STOPPED),
            maximum_retry_count: None,
        }),
        privileged: Some(security.privileged),
        pid_mode: security.host_pid.then(|| "host".to_string()),
        binds: security.docker_socket.then(|| vec!["/var/run/docker.sock:/var/run/docker.sock".to_string()]),
        ..Default::default()
    };
    ContainerCreateBody {
        image: Some(spec.image.clone()),
        env: Some(spec.env.iter().map(|(k, v)| format!("{k}={v}")).collect()),
        labels: Some(spec.labels.iter().map(|(k, v)| (k.clone(), v.clone())).collect()),
        user: Some(format!("{AGENT_UID}:{AGENT_UID}")),
        host_config: Some(host_config),
        ..Default::default()
    }
}

fn workspace_network(n: &bollard::models::Network) -> WorkspaceNetwork {
    WorkspaceNetwork { name: n.name.clone().unwrap_or_default(), gateway: gateway_of(n.ipam.as_ref()) }
}

/// The first IPv4 gateway of a network's address configuration.
fn gateway_of(ipam: Option<&bollard::models::Ipam>) -> Option<std::net::IpAddr> {
    let configs = ipam?.config.as_ref()?;
    configs
        .iter()
        .filter_map(|c| c.gateway.as_deref()?.parse::<std::net::IpAddr>().ok())
        .find(std::net::IpAddr::is_ipv4)
}

fn container_info(c: ContainerSummary) -> Option<ContainerInfo> {
    let id = c.id?;
    let name = c
        .names
        .unwrap_or_default()
        .into_iter()
        .next()
        .map(|n| n.trim_start_matches('/').to_string())
        .unwrap_or_default();
    Some(ContainerInfo {
        id,
        name,
        image: c.image.unwrap_or_default(),
        state: c.state.map_or(ContainerState::Unknown, |s| ContainerState::parse(s.as_ref())),
        labels: c.labels.unwrap_or_default().into_iter().collect(),
        created_at: c.created.and_then(|secs| DateTime::from_timestamp(secs, 0)),
        started_at: None,
        ..Default::default()
    })
}

fn runtime_event(message: EventMessage, instance: &str) -> Option<RuntimeEvent> {
    let actor = message.actor?;
    let attributes = actor.attributes.unwrap_or_default();
    // The daemon filtered by label already; this only guards against a daemon that did not.
    if attributes.get(labels::INSTANCE).map(String::as_str) != Some(instance) {
        return None;
    }
    // "exec_start: sh -c ..." and "health_status: healthy" carry details after a colon.
    let action = message.action?;
    let action = action.split(':').next().unwrap_or_default().trim().to_string();
    let at = message
        .time_nano
        .map(DateTime::from_timestamp_nanos)
        .or_else(|| message.time.and_then(|s| DateTime::from_timestamp(s, 0)));
    Some(RuntimeEvent { workspace: attributes.get(labels::WORKSPACE).cloned(), container_id: actor.id?, action, at })
}

/// Writes `dir/name` (owned by AGENT_UID, `mode`) into a volume's host directory and
/// hands the directory to the agent (AGENT_UID, 0755), as the archive upload does.
/// The volume's content is the container's to change, so nothing in it is followed:
/// the content goes into a new file (`create_new` refuses any existing name, a
/// symlink included), which then replaces `name` by rename (a rename replaces a
/// symlink, never its target). Readers see the old file or the new one, never a
/// partial one.
fn write_into_dir(dir: &std::path::Path, name: &str, content: &[u8], mode: u32) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt, fchown};
    let d = std::fs::File::open(dir)?;
    fchown(&d, Some(AGENT_UID), Some(AGENT_UID))?;
    d.set_permissions(std::fs::Permissions::from_mode(DIR_MODE))?;
    let mut nonce = [0u8; 8];
    getrandom::fill(&mut nonce).map_err(|e| std::io::Error::other(e.to_string()))?;
    let tmp = dir.join(format!(".{name}.molecule-{}", hex::encode(nonce)));
    let result = (|| {
        let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(mode).open(&tmp)?;
        fchown(&f, Some(AGENT_UID), Some(AGENT_UID))?;
        f.set_permissions(std::fs::Permissions::from_mode(mode))?;
        f.write_all(content)?;
        f.sync_all()?;
        std::fs::rename(&tmp, dir.join(name))
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// A tar with `name` (uid/gid AGENT_UID, `mode`), under a `dir/` entry owned the same way when given.
fn file_tar(dir: Option<&str>, name: &str, content: &[u8], mode: u32) -> std::io::Result<Vec<u8>> {
    let mtime = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let header = |path: &str, kind: tar::EntryType, mode: u32, size: u64| -> std::io::Result<tar::Header> {
        let mut h = tar::Header::new_gnu();
        h.set_path(path)?;
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_uid(AGENT_UID.into());
        h.set_gid(AGENT_UID.into());
        h.set_mtime(mtime);
        h.set_size(size);
        h.set_cksum();
        Ok(h)
    };
    let mut tar = tar::Builder::new(Vec::new());
    let path = match dir {
        Some(dir) => {
            tar.append(&header(&format!("{dir}/"), tar::EntryType::Directory, DIR_MODE, 0)?, std::io::empty())?;
            format!("{dir}/{name}")
        }
        None => name.to_string(),
    };
    tar.append(&header(&path, tar::EntryType::Regular, mode, content.len() as u64)?, content)?;
    tar.into_inner()
}

/// A tar of `files` (relative paths) with an entry for each of their directories,
/// everything owned by AGENT_UID: files with `mode`, directories with DIR_MODE.
fn files_tar(files: &BTreeMap<String, String>, mode: u32) -> std::io::Result<Vec<u8>> {
    let mtime = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let mut tar = tar::Builder::new(Vec::new());
    let mut dirs = std::collections::BTreeSet::new();
    for (path, content) in files {
        let parts: Vec<&str> = path.split('/').collect();
        for depth in 1..parts.len() {
            let dir = format!("{}/", parts[..depth].join("/"));
            if dirs.insert(dir.clone()) {
                let mut h = tar::Header::new_gnu();
                h.set_path(&dir)?;
                h.set_entry_type(tar::EntryType::Directory);
                h.set_mode(DIR_MODE);
                h.set_uid(AGENT_UID.into());
                h.set_gid(AGENT_UID.into());
                h.set_mtime(mtime);
                h.set_size(0);
                h.set_cksum();
                tar.append(&h, std::io::empty())?;
            }
        }
        let mut h = tar::Header::new_gnu();
        h.set_path(path)?;
        h.set_entry_type(tar::EntryType::Regular);
        h.set_mode(mode);
        h.set_uid(AGENT_UID.into());
        h.set_gid(AGENT_UID.into());
        h.set_mtime(mtime);
        h.set_size(content.len() as u64);
        h.set_cksum();
        tar.append(&h, content.as_bytes())?;
    }
    tar.into_inner()
}

/// The first entry's content, at most `limit` bytes of it (the archive may be cut
/// after that: nothing past it is looked at).
fn first_file_in_tar(archive: &[u8], limit: usize) -> Result<Vec<u8>, String> {
    let mut tar = tar::Archive::new(archive);
    let mut entries = tar.entries().map_err(|e| format!("unreadable archive: {e}"))?;
    let mut entry = match entries.next() {
        Some(entry) => entry.map_err(|e| format!("unreadable archive: {e}"))?,
        None => return Err("empty archive".into()),
    };
    if !entry.header().entry_type().is_file() {
        return Err(format!("not a regular file (tar entry type {:?})", entry.header().entry_type()));
    }
    let mut content = Vec::new();
    let mut entry = std::io::Read::take(&mut entry, limit as u64);
    std::io::Read::read_to_end(&mut entry, &mut content).map_err(|e| format!("unreadable archive: {e}"))?;
    Ok(content)
}

/// Splits an image reference for a pull: a tagless name pulls `latest`, never every tag.
pub(crate) fn split_reference(image: &str) -> (&str, &str) {
    if image.contains('@') {
        return (image, "");
    }
    let last_slash = image.rfind('/').map_or(0, |i| i + 1);
    match image[last_slash..].rfind(':') {
        Some(i) => (&image[..last_slash + i], &image[last_slash + i + 1..]),
        None => (image, "latest"),
    }
}

pub(crate) fn parse_time(s: &str) -> Option<DateTime<Utc>> {
    // Docker reports "0001-01-01T00:00:00Z" for "never".
    DateTime::parse_from_rfc3339(s).ok().map(|t| t.with_timezone(&Utc)).filter(|t| t.timestamp() > 0)
}

/// A Unix time in nanoseconds as the events API's `since` takes it: `secs.nanos`.
fn since_arg(unix_nanos: i64) -> String {
    format!("{}.{:09}", unix_nanos / 1_000_000_000, unix_nanos % 1_000_000_000)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::Security;
    use crate::model::container::RESTART_POLICY;

    fn spec() -> ContainerSpec {
        ContainerSpec {
            name: "ws-0123".into(),
            image: "molecule-agent:local".into(),
            image_pull_policy: ImagePullPolicy::IfNotPresent,
            env: [("A".to_string(), "1".to_string())].into(),
            labels: [(labels::INSTANCE.to_string(), "i".to_string())].into(),
            memory_bytes: 256 << 20,
            nano_cpus: 500_000_000,
            read_only_root: true,
            tmp_tmpfs_bytes: Some(64 << 20),
            network: "host".into(),
            config_volume: "ws-0123-configs".into(),
            security: Security::default(),
            config_files: BTreeMap::new(),
        }
    }

    #[test]
    fn containers_are_hardened_unless_privileges_are_asked_for() {
        let body = container_body(&spec());
        let hc = body.host_config.unwrap();
        assert_eq!(body.user.as_deref(), Some("65534:65534"));
        assert_eq!(body.env.unwrap(), vec!["A=1"]);
        assert_eq!(hc.init, Some(true));
        assert_eq!(hc.cap_drop.unwrap(), vec!["ALL"]);
        assert_eq!(hc.security_opt.unwrap(), vec!["no-new-privileges:true"]);
        assert_eq!(hc.privileged, Some(false));
        assert_eq!(hc.pid_mode, None);
        assert_eq!(hc.binds, None);
        assert_eq!(hc.readonly_rootfs, Some(true));
        assert_eq!(hc.tmpfs.unwrap()["/tmp"], "rw,noexec,nosuid,size=67108864");
        assert_eq!(hc.memory, Some(256 << 20));
        assert_eq!(hc.nano_cpus, Some(500_000_000));
        let policy = hc.restart_policy.unwrap().name.unwrap();
        assert_eq!(policy, RestartPolicyNameEnum::UNLESS_STOPPED);
        assert_eq!(policy.as_ref(), RESTART_POLICY, "what AppliedConfig expects");
        let mount = &hc.mounts.unwrap()[0];
        assert_eq!((mount.source.as_deref(), mount.target.as_deref()), (Some("ws-0123-configs"), Some("/configs")));

        let privileged = ContainerSpec {
            security: Security { privileged: true, host_pid: true, docker_socket: true },
            read_only_root: false,
            tmp_tmpfs_bytes: None,
            ..spec()
        };
        let hc = container_body(&privileged).host_config.unwrap();
        assert_eq!((hc.privileged, hc.cap_drop, hc.security_opt), (Some(true), None, None));
        assert_eq!(hc.pid_mode.as_deref(), Some("host"));
        assert_eq!(hc.binds.unwrap(), vec!["/var/run/docker.sock:/var/run/docker.sock"]);
        assert_eq!((hc.readonly_rootfs, hc.tmpfs), (Some(false), None));
    }

    #[test]
    fn tagless_references_pull_latest_only() {
        assert_eq!(split_reference("alpine"), ("alpine", "latest"));
        assert_eq!(split_reference("molecule-agent:local"), ("molecule-agent", "local"));
        assert_eq!(split_reference("localhost:5000/a/b"), ("localhost:5000/a/b", "latest"));
        assert_eq!(split_reference("localhost:5000/a/b:v1"), ("localhost:5000/a/b", "v1"));
        assert_eq!(split_reference("a@sha256:00"), ("a@sha256:00", ""));
    }

    #[test]
    fn file_tar_round_trips_with_agent_ownership() {
        let tar = file_tar(Some("configs"), ".auth_token", b"tok", 0o600).unwrap();
        let mut archive = tar::Archive::new(tar.as_slice());
        let entries: Vec<_> = archive
            .entries()
            .unwrap()
            .map(|e| {
                let e = e.unwrap();
                let h = e.header();
                (e.path().unwrap().display().to_string(), h.mode().unwrap(), h.uid().unwrap(), h.gid().unwrap())
            })
            .collect();
        assert_eq!(
            entries,
            vec![("configs/".into(), 0o755, 65534, 65534), ("configs/.auth_token".into(), 0o600, 65534, 65534)]
        );
        let single = file_tar(None, ".auth_token", b"tok", 0o600).unwrap();
        assert_eq!(first_file_in_tar(&single, 10).unwrap(), b"tok");
        assert!(first_file_in_tar(&tar, 10).is_err(), "a directory first is not a file");
        // A long file in an archive cut short: its first `limit` bytes.
        let long = file_tar(None, ".auth_token", &[b'x'; 100_000], 0o600).unwrap();
        assert_eq!(first_file_in_tar(&long[..2048], 1025).unwrap(), vec![b'x'; 1025]);
    }

    #[test]
    fn events_map_to_workspace_and_bare_action() {
        let message = EventMessage {
            action: Some("exec_start: sh -c true".into()),
            time_nano: Some(1_700_000_000_123_456_789),
            actor: Some(bollard::models::EventActor {
                id: Some("abc".into()),
                attributes: Some(HashMap::from([
                    (labels::INSTANCE.to_string(), "i".to_string()),
                    (labels::WORKSPACE.to_string(), "default/a".to_string()),
                ])),
            }),
            ..Default::default()
        };
        let event = runtime_event(message.clone(), "i").unwrap();
        assert_eq!(
            event,
            RuntimeEvent {
                workspace: Some("default/a".into()),
                container_id: "abc".into(),
                action: "exec_start".into(),
                at: Some(DateTime::from_timestamp_nanos(1_700_000_000_123_456_789)),
            }
        );
        assert_eq!(runtime_event(message, "other"), None);
    }
}
