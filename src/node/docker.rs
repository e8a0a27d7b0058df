//! The node's Docker calls (bollard, with src/runtime/docker.rs' connection and
//! error conventions). Everything is found by the node's own label
//! (`ai.molecule.node=<instance>`), never the operator's `ai.molecule.instance`, so
//! the Docker runtime's container cache never sees a Pod and parallel nodes on one
//! daemon never touch each other's containers, volumes or networks.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

use bollard::Docker;
use bollard::models::{ContainerCreateBody, EventMessage, NetworkCreateRequest, VolumeCreateRequest};
use bollard::query_parameters::{
    CreateContainerOptionsBuilder, InspectContainerOptions, ListContainersOptionsBuilder, ListNetworksOptionsBuilder,
    ListVolumesOptionsBuilder, LogsOptionsBuilder, RemoveContainerOptionsBuilder, RemoveVolumeOptionsBuilder,
    StopContainerOptionsBuilder,
};
use futures::stream::BoxStream;
use futures::{StreamExt, TryStreamExt};

use super::labels;
use super::status::Run;
use crate::runtime::docker::{container_events, parse_time};
use crate::runtime::docker_error::{api_error, message, status};
use crate::runtime::{RuntimeError, RuntimeResult};

/// One Docker container of a Pod, as inspect shows it.
#[derive(Clone, Debug)]
pub struct PodContainer {
    pub pod_uid: String,
    /// The Pod's container name, or `POD` for the sandbox.
    pub container: String,
    pub run: Run,
    /// The image the container was created from, as the spec named it.
    pub image: String,
    /// Its address on the node's network (the sandbox's is the Pod IP).
    pub ip: Option<String>,
    /// A sandbox's [`labels::SANDBOX_HASH`]: what it was made as, apart from its Pod.
    pub sandbox_hash: Option<String>,
    /// The Docker name, without the leading `/`.
    pub name: String,
}

/// What a node container's name says: `k8s_<container>_<pod>_<namespace>_<uid>_<attempt>`
/// (none of those holds `_`). The name, not the labels, says which Pod a container
/// belongs to now: a kept sandbox is renamed when it passes to the next Pod of its
/// name (labels cannot change).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NameParts {
    pub container: String,
    pub pod: String,
    pub namespace: String,
    pub uid: String,
    pub attempt: u32,
}

impl NameParts {
    pub fn parse(name: &str) -> Option<Self> {
        let parts: Vec<&str> = name.trim_start_matches('/').split('_').collect();
        let [k8s, container, pod, namespace, uid, attempt] = parts.as_slice() else { return None };
        if *k8s != "k8s" || [container, pod, namespace, uid].iter().any(|p| p.is_empty()) {
            return None;
        }
        Some(Self {
            container: container.to_string(),
            pod: pod.to_string(),
            namespace: namespace.to_string(),
            uid: uid.to_string(),
            attempt: attempt.parse().ok()?,
        })
    }
}

/// A running container of a Pod, as a listing shows it.
#[derive(Clone, Debug)]
pub struct RunningContainer {
    pub id: String,
    pub pod_uid: String,
    /// The Pod's container name.
    pub container: String,
    pub created: Option<chrono::DateTime<chrono::Utc>>,
}

#[derive(Clone)]
pub struct NodeDocker {
    pub docker: Docker,
    pub instance: String,
}

impl NodeDocker {
    fn filter(&self, extra: &[(&str, &str)]) -> HashMap<&'static str, Vec<String>> {
        let mut labels_wanted = vec![format!("{}={}", labels::NODE, self.instance)];
        labels_wanted.extend(extra.iter().map(|(k, v)| format!("{k}={v}")));
        HashMap::from([("label", labels_wanted)])
    }

    /// The node's containers (all Pods, or one Pod's, by the uid in their names), inspected.
    pub async fn containers(&self, pod_uid: Option<&str>) -> RuntimeResult<Vec<PodContainer>> {
        let mut filters = self.filter(&[]);
        if let Some(uid) = pod_uid {
            filters.insert("name", vec![format!("_{uid}_")]);
        }
        self.listed(filters).await
    }

    /// The node's kept sandboxes, waiting for a next Pod (see `LocalNode::keep`).
    pub async fn kept(&self) -> RuntimeResult<Vec<PodContainer>> {
        self.named(&format!("_{}_", labels::KEPT)).await
    }

    /// The node's containers whose names hold `part`, inspected.
    pub async fn named(&self, part: &str) -> RuntimeResult<Vec<PodContainer>> {
        let mut filters = self.filter(&[]);
        filters.insert("name", vec![part.to_string()]);
        self.listed(filters).await
    }

    async fn listed(&self, filters: HashMap<&'static str, Vec<String>>) -> RuntimeResult<Vec<PodContainer>> {
        let options = ListContainersOptionsBuilder::new().all(true).filters(&filters).build();
        let listed = self
            .docker
            .list_containers(Some(options))
            .await
            .map_err(|e| api_error("listing the node's containers", e))?;
        let mut out = Vec::new();
        for id in listed.into_iter().filter_map(|c| c.id) {
            if let Some(c) = self.inspect(&id).await? {
                out.push(c);
            }
        }
        Ok(out)
    }

    /// Renames a container; Ok(false) when it is gone or the name is taken.
    pub async fn rename(&self, id: &str, name: &str) -> RuntimeResult<bool> {
        let options = bollard::query_parameters::RenameContainerOptionsBuilder::new().name(name).build();
        match self.docker.rename_container(id, options).await {
            Ok(()) => Ok(true),
            Err(e) if matches!(status(&e), Some(404 | 409)) => Ok(false),
            Err(e) => Err(api_error(format!("renaming container {id} to {name}"), e)),
        }
    }

    /// The node's running (and paused) Pod containers, no sandboxes, from one listing.
    pub async fn running(&self) -> RuntimeResult<Vec<RunningContainer>> {
        let mut filters = self.filter(&[]);
        filters.insert("status", vec!["running".into(), "paused".into()]);
        let options = ListContainersOptionsBuilder::new().filters(&filters).build();
        let listed = self
            .docker
            .list_containers(Some(options))
            .await
            .map_err(|e| api_error("listing the node's containers", e))?;
        Ok(listed
            .into_iter()
            .filter_map(|c| {
                let l = c.labels.unwrap_or_default();
                let container = l.get(labels::CONTAINER_NAME)?.clone();
                if container == labels::SANDBOX {
                    return None;
                }
                let created = c.created.and_then(|t| chrono::DateTime::from_timestamp(t, 0));
                Some(RunningContainer { id: c.id?, pod_uid: l.get(labels::POD_UID)?.clone(), container, created })
            })
            .collect())
    }

    /// One of the node's containers; None when it is gone (or not the node's).
    pub async fn inspect(&self, id: &str) -> RuntimeResult<Option<PodContainer>> {
        let c = match self.docker.inspect_container(id, None::<InspectContainerOptions>).await {
            Ok(c) => c,
            Err(e) if status(&e) == Some(404) => return Ok(None),
            Err(e) => return Err(api_error(format!("inspecting container {id}"), e)),
        };
        let config_labels = c.config.as_ref().and_then(|c| c.labels.clone()).unwrap_or_default();
        if config_labels.get(labels::NODE) != Some(&self.instance) {
            return Ok(None);
        }
        let state = c.state.clone().unwrap_or_default();
        let name = c.name.clone().unwrap_or_default().trim_start_matches('/').to_string();
        let parts = NameParts::parse(&name);
        let ip = c
            .network_settings
            .as_ref()
            .and_then(|n| n.networks.as_ref())
            .and_then(|nets| nets.values().find_map(|n| n.ip_address.clone().filter(|ip| !ip.is_empty())));
        let label = |key: &str| config_labels.get(key).cloned().unwrap_or_default();
        Ok(Some(PodContainer {
            pod_uid: parts.as_ref().map_or_else(|| label(labels::POD_UID), |p| p.uid.clone()),
            container: parts.as_ref().map_or_else(|| label(labels::CONTAINER_NAME), |p| p.container.clone()),
            image: c.config.as_ref().and_then(|c| c.image.clone()).unwrap_or_default(),
            ip,
            sandbox_hash: config_labels.get(labels::SANDBOX_HASH).cloned(),
            run: Run {
                id: c.id.clone().unwrap_or_default(),
                status: state.status.map(|s| s.to_string()).unwrap_or_default(),
                exit_code: state.exit_code.unwrap_or(0),
                oom_killed: state.oom_killed.unwrap_or(false),
                error: state.error.unwrap_or_default(),
                started_at: state.started_at.as_deref().and_then(parse_time),
                finished_at: state.finished_at.as_deref().and_then(parse_time),
                image_id: c.image.clone().unwrap_or_default(),
                attempt: parts
                    .as_ref()
                    .map(|p| p.attempt)
                    .or_else(|| config_labels.get(labels::ATTEMPT).and_then(|a| a.parse().ok()))
                    .unwrap_or(0),
            },
            name,
        }))
    }

    pub async fn create(&self, name: &str, body: ContainerCreateBody) -> RuntimeResult<String> {
        let options = CreateContainerOptionsBuilder::new().name(name).build();
        match self.docker.create_container(Some(options), body.clone()).await {
            Ok(created) => Ok(created.id),
            // A name left by a crash between create and the status write: replace it.
            Err(e) if status(&e) == Some(409) => {
                self.remove(name).await?;
                let options = CreateContainerOptionsBuilder::new().name(name).build();
                self.docker
                    .create_container(Some(options), body)
                    .await
                    .map(|c| c.id)
                    .map_err(|e| api_error(format!("creating container {name}"), e))
            }
            Err(e) => Err(api_error(format!("creating container {name}"), e)),
        }
    }

    /// Err carries Docker's message (e.g. the executable was not found).
    pub async fn start(&self, id: &str) -> RuntimeResult<()> {
        self.docker.start_container(id, None).await.map_err(|e| api_error(format!("starting container {id}"), e))
    }

    /// SIGTERM, then SIGKILL after `grace`.
    pub async fn stop(&self, id: &str, grace: Duration) -> RuntimeResult<()> {
        let seconds = i32::try_from(grace.as_secs()).unwrap_or(i32::MAX);
        let options = StopContainerOptionsBuilder::new().t(seconds).build();
        // The stop takes up to `grace`: wait for the answer that long, and some more.
        let docker = self.docker.clone().with_timeout(grace + Duration::from_secs(30));
        match docker.stop_container(id, Some(options)).await {
            Ok(()) => Ok(()),
            Err(e) if matches!(status(&e), Some(304 | 404)) => Ok(()),
            Err(e) => Err(api_error(format!("stopping container {id}"), e)),
        }
    }

    pub async fn remove(&self, id: &str) -> RuntimeResult<()> {
        let options = RemoveContainerOptionsBuilder::new().force(true).v(false).build();
        match self.docker.remove_container(id, Some(options)).await {
            Ok(()) => Ok(()),
            Err(e) if status(&e) == Some(404) || message(&e).contains("already in progress") => Ok(()),
            Err(e) => Err(api_error(format!("removing container {id}"), e)),
        }
    }

    /// Whether the image is present, and the user its config names.
    pub async fn image(&self, image: &str) -> RuntimeResult<Option<String>> {
        match self.docker.inspect_image(image).await {
            Ok(i) => Ok(Some(i.config.and_then(|c| c.user).unwrap_or_default())),
            Err(e) if status(&e) == Some(404) => Ok(None),
            Err(e) => Err(api_error(format!("inspecting image {image}"), e)),
        }
    }

    /// The node's bridge network (made when missing) and its gateway: the host's
    /// address as Pods see it.
    pub async fn ensure_network(&self, name: &str) -> RuntimeResult<String> {
        let gateway = |n: &bollard::models::NetworkInspect| {
            n.ipam.as_ref().and_then(|i| i.config.as_ref()).and_then(|c| c.iter().find_map(|c| c.gateway.clone()))
        };
        if let Ok(n) = self.docker.inspect_network(name, None).await {
            return gateway(&n).ok_or_else(|| RuntimeError::Api(format!("network {name} has no gateway")));
        }
        let request = NetworkCreateRequest {
            name: name.to_string(),
            driver: Some("bridge".into()),
            labels: Some(HashMap::from([(labels::NODE.to_string(), self.instance.clone())])),
            ..Default::default()
        };
        match self.docker.create_network(request).await {
            Ok(_) => {}
            Err(e) if status(&e) == Some(409) => {}
            Err(e) => return Err(api_error(format!("creating network {name}"), e)),
        }
        let n = self
            .docker
            .inspect_network(name, None)
            .await
            .map_err(|e| api_error(format!("inspecting network {name}"), e))?;
        gateway(&n).ok_or_else(|| RuntimeError::Api(format!("network {name} has no gateway")))
    }

    /// The node's networks (for cleanup).
    pub async fn networks(&self) -> RuntimeResult<Vec<String>> {
        let options = ListNetworksOptionsBuilder::new().filters(&self.filter(&[])).build();
        let networks = self.docker.list_networks(Some(options)).await.map_err(|e| api_error("listing networks", e))?;
        Ok(networks.into_iter().filter_map(|n| n.name).collect())
    }

    pub async fn ensure_volume(&self, name: &str, volume_labels: HashMap<String, String>) -> RuntimeResult<()> {
        if self.docker.inspect_volume(name).await.is_ok() {
            return Ok(());
        }
        let request =
            VolumeCreateRequest { name: Some(name.to_string()), labels: Some(volume_labels), ..Default::default() };
        self.docker.create_volume(request).await.map(drop).map_err(|e| api_error(format!("creating volume {name}"), e))
    }

    /// The volume's directory, when this process can reach it (root beside the daemon).
    pub async fn volume_dir(&self, name: &str) -> Option<PathBuf> {
        let v = self.docker.inspect_volume(name).await.ok()?;
        let dir = PathBuf::from(v.mountpoint);
        std::fs::metadata(&dir).is_ok_and(|m| m.is_dir()).then_some(dir)
    }

    /// Removes a volume; Ok(false) while a container still uses it.
    pub async fn remove_volume(&self, name: &str) -> RuntimeResult<bool> {
        let options = RemoveVolumeOptionsBuilder::new().force(false).build();
        match self.docker.remove_volume(name, Some(options)).await {
            Ok(()) => Ok(true),
            Err(e) if status(&e) == Some(404) => Ok(true),
            Err(e) if status(&e) == Some(409) => Ok(false),
            Err(e) => Err(api_error(format!("removing volume {name}"), e)),
        }
    }

    /// The node's volumes: (name, labels).
    pub async fn volumes(&self) -> RuntimeResult<Vec<(String, HashMap<String, String>)>> {
        let options = ListVolumesOptionsBuilder::new().filters(&self.filter(&[])).build();
        let listed = self.docker.list_volumes(Some(options)).await.map_err(|e| api_error("listing volumes", e))?;
        Ok(listed.volumes.unwrap_or_default().into_iter().map(|v| (v.name, v.labels)).collect())
    }

    /// The node's container events (reconnecting; Err when the stream was lost).
    pub fn events(&self) -> BoxStream<'static, Result<EventMessage, String>> {
        container_events(self.docker.clone(), self.filter(&[]))
    }

    /// A container's output (stdout and stderr interleaved), as `kubectl logs` reads it.
    pub fn logs(
        &self,
        id: &str,
        options: &crate::kubeapi::LogOptions,
    ) -> BoxStream<'static, std::io::Result<axum::body::Bytes>> {
        let mut builder =
            LogsOptionsBuilder::new().stdout(true).stderr(true).follow(options.follow).timestamps(options.timestamps);
        builder = match options.tail_lines {
            Some(n) => builder.tail(&n.max(0).to_string()),
            None => builder.tail("all"),
        };
        if let Some(seconds) = options.since_seconds {
            let since = chrono::Utc::now().timestamp() - seconds.max(0);
            builder = builder.since(i32::try_from(since).unwrap_or(0));
        }
        self.docker
            .logs(id, Some(builder.build()))
            .map_ok(|chunk| chunk.into_bytes())
            .map_err(|e| std::io::Error::other(e.to_string()))
            .boxed()
    }
}

#[cfg(test)]
mod tests {
    use super::NameParts;

    #[test]
    fn a_container_name_says_whose_it_is() {
        let parts = NameParts::parse("/k8s_POD_ws-1a2b_default_9b146fa4-8d04_3").unwrap();
        assert_eq!(
            parts,
            NameParts {
                container: "POD".into(),
                pod: "ws-1a2b".into(),
                namespace: "default".into(),
                uid: "9b146fa4-8d04".into(),
                attempt: 3
            }
        );
        assert_eq!(NameParts::parse("k8s_POD_ws-1a2b_default_kept_0").unwrap().uid, "kept");
        for other in
            ["ws-1a2b", "k8s_POD_ws_x_default_u_0", "k8s_POD__default_u_0", "k8s_POD_p_ns_u_x", "x_POD_p_ns_u_0"]
        {
            assert_eq!(NameParts::parse(other), None, "{other}");
        }
    }
}
