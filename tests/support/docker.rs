//! Helpers for tests against the real Docker daemon (no mocks).
//!
//! - `TestDocker::connect` gives a runtime with a unique instance id; when Docker is
//!   unreachable it FAILS under `CI=true` and otherwise prints a notice and returns None.
//! - Dropping a `TestDocker` removes every container and volume labelled with its
//!   instance, also when the test panics.
//! - `wait_for` polls a condition until a deadline instead of sleeping.
//!
//! Use it from a test file with `#[path = "support/docker.rs"] mod docker_support;`.
#![allow(dead_code)]

use std::collections::HashMap;
use std::future::Future;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use bollard::Docker;
use bollard::query_parameters::{
    BuildImageOptionsBuilder, DownloadFromContainerOptionsBuilder, ListContainersOptionsBuilder,
    ListVolumesOptionsBuilder, LogsOptionsBuilder, RemoveContainerOptionsBuilder, RemoveImageOptions,
    RemoveVolumeOptionsBuilder,
};
use futures::{StreamExt, TryStreamExt};
use molecule::api::effective::{Defaults, resolve};
use molecule::api::{ImagePullPolicy, WorkspaceSpec};
use molecule::model::container::{ContainerSpec, labels};
use molecule::runtime::agent_image::AGENT_BINARY;
use molecule::runtime::docker::DockerRuntime;
use molecule::runtime::render::{AgentEnv, Identity, render};

/// A registry URL nothing listens on: the agent keeps retrying against it.
pub const NO_REGISTRY: &str = "http://127.0.0.1:1";

pub struct TestDocker {
    pub runtime: DockerRuntime,
    /// A plain client for what the `Runtime` trait does not offer (inspect, logs, stop).
    pub docker: Docker,
    pub instance: String,
    /// Image tags this test made, removed by the guard.
    images: Mutex<Vec<String>>,
}

impl TestDocker {
    /// Connects with a fresh instance id derived from `test`.
    pub async fn connect(test: &str) -> Option<Self> {
        let instance = unique_instance(test);
        match DockerRuntime::connect(&instance).await {
            Ok(runtime) => {
                let docker = Docker::connect_with_local_defaults().expect("the socket answered a moment ago");
                Some(Self { runtime, docker, instance, images: Mutex::default() })
            }
            Err(e) if std::env::var("CI").is_ok_and(|v| v == "true") => {
                panic!("{test}: Docker is required when CI=true, but: {e}")
            }
            Err(e) => {
                eprintln!("NOTICE: skipping {test}: {e}");
                None
            }
        }
    }

    /// Another instance on the same daemon (cleaned up by its own guard).
    pub async fn other_instance(&self, test: &str) -> Self {
        Self::connect(test).await.expect("Docker answered for the first instance")
    }

    /// A workspace container spec as the operator renders it, with incarnation 1.
    pub fn spec(&self, name: &str, workspace: WorkspaceSpec, registry_url: &str) -> ContainerSpec {
        let workspace = WorkspaceSpec { image_pull_policy: Some(ImagePullPolicy::Never), ..workspace };
        let effective = resolve(&workspace, &Defaults::default()).expect("test spec is valid");
        let uid = uuid::Uuid::new_v4().to_string();
        let key = format!("default/{name}");
        let identity = Identity { instance: &self.instance, key: &key, uid: &uid };
        let agent = AgentEnv { registry_url: registry_url.to_string(), heartbeat_seconds: 1 };
        let mut spec = render(&effective, &identity, &agent);
        spec.labels.insert(labels::INCARNATION.into(), "1".into());
        spec
    }

    /// Builds the agent image if it is missing or stale.
    pub async fn agent_image(&self) {
        self.runtime.ensure_agent_image().await.expect("the agent image builds");
    }

    /// Removes `tag` when the test ends.
    pub fn track_image(&self, tag: &str) {
        self.images.lock().unwrap().push(tag.to_string());
    }

    /// The agent binary in an image WITHOUT a /configs directory, as most third-party
    /// runtime images are: Docker then creates a fresh config volume's root as root 0755.
    pub async fn bare_agent_image(&self) -> String {
        let tag = format!("molecule-test-bare:{}", self.instance);
        let dockerfile =
            "FROM scratch\nCOPY molecule-agent /molecule-agent\nUSER 65534:65534\nENTRYPOINT [\"/molecule-agent\"]\n";
        let mut context = tar::Builder::new(Vec::new());
        for (path, mode, data) in
            [("Dockerfile", 0o644, dockerfile.as_bytes()), ("molecule-agent", 0o755, AGENT_BINARY)]
        {
            let mut h = tar::Header::new_gnu();
            h.set_path(path).unwrap();
            h.set_mode(mode);
            h.set_size(data.len() as u64);
            h.set_cksum();
            context.append(&h, data).unwrap();
        }
        // No build cache: tests build this same image in parallel, and one that ends removes its tag (and with
        // it the image) while another's build is resolving the cached layer, which then fails with
        // "failed to get digest ... no such file or directory".
        let options = BuildImageOptionsBuilder::new().dockerfile("Dockerfile").t(&tag).rm(true).nocache(true).build();
        self.track_image(&tag);
        self.docker
            .build_image(options, None, Some(bollard::body_full(context.into_inner().unwrap().into())))
            .try_collect::<Vec<_>>()
            .await
            .expect("the bare agent image builds");
        tag
    }

    /// uid, gid, mode and content of a file, read with the archive API (None if missing).
    pub async fn stat(&self, id: &str, path: &str) -> Option<FileMeta> {
        let options = DownloadFromContainerOptionsBuilder::new().path(path).build();
        let chunks: Vec<_> = match self.docker.download_from_container(id, Some(options)).try_collect().await {
            Ok(chunks) => chunks,
            Err(bollard::errors::Error::DockerResponseServerError { status_code: 404, .. }) => return None,
            Err(e) => panic!("download {path}: {e}"),
        };
        let archive = chunks.concat();
        let mut tar = tar::Archive::new(archive.as_slice());
        let mut entry = tar.entries().unwrap().next().expect("one entry").unwrap();
        let h = entry.header().clone();
        let mut content = Vec::new();
        std::io::Read::read_to_end(&mut entry, &mut content).unwrap();
        Some(FileMeta {
            uid: h.uid().unwrap() as u32,
            gid: h.gid().unwrap() as u32,
            mode: h.mode().unwrap() & 0o7777,
            is_dir: h.entry_type().is_dir(),
            content,
        })
    }

    /// stdout and stderr of a container, like `docker logs`.
    pub async fn logs(&self, id: &str) -> String {
        let options = LogsOptionsBuilder::new().stdout(true).stderr(true).build();
        let lines: Vec<_> = self.docker.logs(id, Some(options)).try_collect().await.expect("logs");
        lines.iter().map(|l| String::from_utf8_lossy(&l.clone().into_bytes()).into_owned()).collect()
    }

    /// The host directory of the named volume, when this process can reach it (root on
    /// the daemon's host): what the direct write path needs. When it cannot, a test of
    /// that path FAILS under `CI=true` (CI runs as root next to its daemon) and
    /// otherwise prints a notice and gets None.
    pub async fn reachable_volume_dir(&self, volume: &str) -> Option<std::path::PathBuf> {
        let mountpoint = self.docker.inspect_volume(volume).await.expect("inspect the volume").mountpoint;
        let dir = std::path::PathBuf::from(mountpoint);
        if std::fs::read_dir(&dir).is_ok() {
            return Some(dir);
        }
        let why = format!("the volume's directory {} is not reachable from this process", dir.display());
        if std::env::var("CI").is_ok_and(|v| v == "true") {
            panic!("{why}: the direct write path cannot be tested (CI=true: run as root on the daemon's host)");
        }
        eprintln!("NOTICE: skipping a test of the direct write path: {why}");
        None
    }

    /// The daemon's state string of a container ("running", "exited", ...).
    pub async fn state(&self, id: &str) -> String {
        let c = self.docker.inspect_container(id, None).await.expect("inspect");
        c.state.and_then(|s| s.status).map(|s| s.to_string()).unwrap_or_default()
    }
}

impl Drop for TestDocker {
    /// Removes everything labelled with this instance, and the tracked images. Drop cannot await, and may run
    /// inside a runtime, so the cleanup runs on its own thread with its own runtime.
    fn drop(&mut self) {
        let instance = self.instance.clone();
        let images = std::mem::take(&mut *self.images.lock().unwrap_or_else(|e| e.into_inner()));
        let cleanup = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
            rt.block_on(remove_instance(&instance, &images))
        });
        if let Ok(Err(e)) = cleanup.join() {
            eprintln!("cleanup of test instance {}: {e}", self.instance);
        }
    }
}

async fn remove_instance(instance: &str, images: &[String]) -> Result<(), bollard::errors::Error> {
    let docker = Docker::connect_with_local_defaults()?;
    let filters = HashMap::from([("label", vec![format!("{}={instance}", labels::INSTANCE)])]);
    let containers =
        docker.list_containers(Some(ListContainersOptionsBuilder::new().all(true).filters(&filters).build())).await?;
    for id in containers.into_iter().filter_map(|c| c.id) {
        let options = RemoveContainerOptionsBuilder::new().force(true).v(true).build();
        let _ = docker.remove_container(&id, Some(options)).await;
    }
    let volumes = docker.list_volumes(Some(ListVolumesOptionsBuilder::new().filters(&filters).build())).await?;
    for volume in volumes.volumes.unwrap_or_default() {
        let _ = docker.remove_volume(&volume.name, Some(RemoveVolumeOptionsBuilder::new().force(true).build())).await;
    }
    for tag in images {
        let _ = docker.remove_image(tag, None::<RemoveImageOptions>, None).await;
    }
    Ok(())
}

#[derive(Debug)]
pub struct FileMeta {
    pub uid: u32,
    pub gid: u32,
    pub mode: u32,
    pub is_dir: bool,
    pub content: Vec<u8>,
}

/// Polls `condition` every 50 ms until it holds; panics naming `what` at the deadline.
pub async fn wait_for<F, Fut>(what: &str, deadline: Duration, mut condition: F) -> Duration
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let started = Instant::now();
    loop {
        if condition().await {
            return started.elapsed();
        }
        if started.elapsed() > deadline {
            panic!("timed out after {deadline:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Collects items from a stream until `done` says so or the deadline passes.
pub async fn collect_until<T, S>(stream: &mut S, deadline: Duration, mut done: impl FnMut(&[T]) -> bool) -> Vec<T>
where
    S: futures::Stream<Item = T> + Unpin,
{
    let mut items = Vec::new();
    let _ = tokio::time::timeout(deadline, async {
        while let Some(item) = stream.next().await {
            items.push(item);
            if done(&items) {
                break;
            }
        }
    })
    .await;
    items
}

fn unique_instance(test: &str) -> String {
    let slug: String =
        test.chars().map(|c| if c.is_ascii_alphanumeric() { c.to_ascii_lowercase() } else { '-' }).collect();
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().subsec_nanos();
    format!("test-{slug}-{}-{nanos:x}", std::process::id())
}
