//! A simulated, in-memory `Runtime`, for the scale benchmark (cargo feature `sim`) and
//! the in-process pipeline tests (`reconcile/scenarios.rs`), which assert the decision
//! log of each scenario in milliseconds. The operator binary and the tests of Docker
//! behaviour never use it.
//!
//! Containers "start" instantly and nothing runs in them. Every call emits the container
//! events the Docker daemon emits for the same call (`create`, `extract-to-dir`, `start`,
//! `pause`, `unpause`, `kill`/`die`/`destroy` for a forced removal, `archive-path` for an
//! archive read), with the container's labels, so the reconcile queue and the container
//! cache see what they see on Docker. Volume calls emit nothing (the Docker runtime
//! subscribes to container events only). Files written with `write_file` into the config
//! volume live with the volume, as on Docker: a recreated container finds them.
//!
//! `calls()` counts the calls made per method, so a benchmark can say how many Docker
//! API calls a resync would cost.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use async_trait::async_trait;
use chrono::{SubsecRound, Utc};
use futures::stream::{self, BoxStream, StreamExt};
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;

use super::{Runtime, RuntimeError, RuntimeEvent, RuntimeResult, Watched};
use crate::api::ImagePullPolicy;
use crate::model::container::{CONFIGS_DIR, ContainerInfo, ContainerSpec, ContainerState, labels};

/// The simulated daemon of one operator instance.
pub struct SimRuntime {
    instance: String,
    inner: Mutex<Inner>,
    subscribers: Mutex<Vec<mpsc::UnboundedSender<RuntimeEvent>>>,
    calls: Calls,
}

/// What the simulated daemon holds. Cloned only to measure its size.
#[derive(Clone, Default)]
pub struct Inner {
    containers: HashMap<String, SimContainer>,
    /// Container name -> id (names are unique, as on Docker).
    names: HashMap<String, String>,
    volumes: HashMap<String, Volume>,
    /// (label, value) -> ids, for the workspace and uid labels (the ones the operator
    /// filters by), so that a filtered listing costs what it costs the daemon's caller,
    /// not a scan of every container inside the benchmark's own process.
    by_label: HashMap<(String, String), std::collections::BTreeSet<String>>,
    next: u64,
}

const INDEXED: [&str; 2] = [labels::WORKSPACE, labels::UID];

impl Inner {
    fn index(&mut self, info: &ContainerInfo, add: bool) {
        for k in INDEXED {
            if let Some(v) = info.label(k) {
                let slot = (k.to_string(), v.to_string());
                if add {
                    self.by_label.entry(slot).or_default().insert(info.id.clone());
                } else if let Some(ids) = self.by_label.get_mut(&slot) {
                    ids.remove(&info.id);
                    if ids.is_empty() {
                        self.by_label.remove(&slot);
                    }
                }
            }
        }
    }
}

#[derive(Clone)]
struct SimContainer {
    info: ContainerInfo,
    config_volume: String,
}

#[derive(Clone, Default)]
struct Volume {
    /// File name inside /configs -> content.
    files: HashMap<String, Vec<u8>>,
}

/// Calls made, per Runtime method.
#[derive(Default)]
pub struct Calls {
    pub list: AtomicU64,
    pub list_ids: AtomicU64,
    pub list_labeled: AtomicU64,
    pub create: AtomicU64,
    pub start: AtomicU64,
    pub remove: AtomicU64,
    pub pause: AtomicU64,
    pub unpause: AtomicU64,
    pub write_file: AtomicU64,
    pub read_file: AtomicU64,
    pub volume: AtomicU64,
    pub image: AtomicU64,
}

impl Calls {
    /// (method, count) for every method called at least once.
    pub fn snapshot(&self) -> BTreeMap<&'static str, u64> {
        [
            ("list", &self.list),
            ("list_ids", &self.list_ids),
            ("list_labeled", &self.list_labeled),
            ("create", &self.create),
            ("start", &self.start),
            ("remove", &self.remove),
            ("pause", &self.pause),
            ("unpause", &self.unpause),
            ("write_file", &self.write_file),
            ("read_file", &self.read_file),
            ("volume", &self.volume),
            ("image", &self.image),
        ]
        .into_iter()
        .map(|(k, v)| (k, v.load(Ordering::Relaxed)))
        .filter(|(_, v)| *v > 0)
        .collect()
    }
}

fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

fn not_found(what: &str) -> RuntimeError {
    RuntimeError::Api(format!("No such container: {what} (HTTP 404)"))
}

impl SimRuntime {
    pub fn new(instance: &str) -> Self {
        Self {
            instance: instance.to_string(),
            inner: Mutex::default(),
            subscribers: Mutex::default(),
            calls: Calls::default(),
        }
    }

    pub fn calls(&self) -> &Calls {
        &self.calls
    }

    /// A deep copy of the daemon's state (to measure how much memory it holds).
    pub fn clone_state(&self) -> Inner {
        self.inner.lock().expect("sim lock").clone()
    }

    pub fn container_count(&self) -> usize {
        self.inner.lock().expect("sim lock").containers.len()
    }

    /// Out of band: the container's process dies (a crash, an OOM kill, `docker kill`).
    pub fn crash(&self, id: &str) -> RuntimeResult<()> {
        self.transition(id, |c| {
            c.state = ContainerState::Exited;
            Ok(vec!["kill", "die"])
        })
    }

    fn emit(&self, info: &ContainerInfo, actions: &[&str]) {
        let mut subs = self.subscribers.lock().expect("sim lock");
        for action in actions {
            let ev = RuntimeEvent {
                workspace: info.workspace().map(str::to_string),
                container_id: info.id.clone(),
                action: action.to_string(),
                at: Some(chrono::Utc::now()),
            };
            subs.retain(|tx| tx.send(ev.clone()).is_ok());
        }
    }

    /// Resolves an id or a name to the id of one of our containers.
    fn resolve(inner: &Inner, id_or_name: &str) -> Option<String> {
        if inner.containers.contains_key(id_or_name) {
            return Some(id_or_name.to_string());
        }
        inner.names.get(id_or_name.trim_start_matches('/')).cloned()
    }

    /// Changes a container's state and emits `actions`; a missing container is a 404.
    fn transition(
        &self,
        id: &str,
        f: impl FnOnce(&mut ContainerInfo) -> RuntimeResult<Vec<&'static str>>,
    ) -> RuntimeResult<()> {
        let (info, actions) = {
            let mut inner = self.inner.lock().expect("sim lock");
            let id = Self::resolve(&inner, id).ok_or_else(|| not_found(id))?;
            let c = inner.containers.get_mut(&id).expect("resolved");
            let actions = f(&mut c.info)?;
            (c.info.clone(), actions)
        };
        self.emit(&info, &actions);
        Ok(())
    }

    fn mine(&self, c: &ContainerInfo) -> bool {
        c.label(labels::INSTANCE) == Some(self.instance.as_str())
    }
}

#[async_trait]
impl Runtime for SimRuntime {
    async fn list(&self) -> RuntimeResult<Vec<ContainerInfo>> {
        bump(&self.calls.list);
        let inner = self.inner.lock().expect("sim lock");
        Ok(inner.containers.values().map(|c| c.info.clone()).filter(|c| self.mine(c)).collect())
    }

    async fn list_ids(&self, ids: &[String]) -> RuntimeResult<Vec<ContainerInfo>> {
        bump(&self.calls.list_ids);
        let inner = self.inner.lock().expect("sim lock");
        Ok(ids
            .iter()
            .filter_map(|id| inner.containers.get(id))
            .map(|c| c.info.clone())
            .filter(|c| self.mine(c))
            .collect())
    }

    async fn list_labeled(&self, key: &str, value: &str) -> RuntimeResult<Vec<ContainerInfo>> {
        bump(&self.calls.list_labeled);
        let inner = self.inner.lock().expect("sim lock");
        if INDEXED.contains(&key) {
            let ids = inner.by_label.get(&(key.to_string(), value.to_string()));
            return Ok(ids
                .into_iter()
                .flatten()
                .filter_map(|id| inner.containers.get(id))
                .filter(|c| self.mine(&c.info))
                .map(|c| c.info.clone())
                .collect());
        }
        Ok(inner
            .containers
            .values()
            .filter(|c| c.info.label(key) == Some(value) && self.mine(&c.info))
            .map(|c| c.info.clone())
            .collect())
    }

    async fn volume_exists(&self, name: &str) -> RuntimeResult<bool> {
        bump(&self.calls.volume);
        Ok(self.inner.lock().expect("sim lock").volumes.contains_key(name))
    }

    async fn ensure_volume(&self, name: &str, _labels: &BTreeMap<String, String>) -> RuntimeResult<()> {
        bump(&self.calls.volume);
        self.inner.lock().expect("sim lock").volumes.entry(name.to_string()).or_default();
        Ok(())
    }

    async fn remove_volume(&self, name: &str) -> RuntimeResult<()> {
        bump(&self.calls.volume);
        let mut inner = self.inner.lock().expect("sim lock");
        if inner.containers.values().any(|c| c.config_volume == name) {
            return Err(RuntimeError::Api(format!("removing volume {name}: volume is in use (HTTP 409)")));
        }
        inner.volumes.remove(name);
        Ok(())
    }

    async fn ensure_image(&self, _image: &str, _policy: ImagePullPolicy) -> RuntimeResult<()> {
        bump(&self.calls.image);
        Ok(())
    }

    async fn create(&self, spec: &ContainerSpec) -> RuntimeResult<String> {
        bump(&self.calls.create);
        let info = {
            let mut inner = self.inner.lock().expect("sim lock");
            if inner.names.contains_key(&spec.name) {
                return Err(RuntimeError::Api(format!(
                    "creating container {}: Conflict. The container name \"/{}\" is already in use (HTTP 409)",
                    spec.name, spec.name
                )));
            }
            inner.next += 1;
            let id = hex::encode(Sha256::digest(format!("{}/{}", self.instance, inner.next)));
            inner.volumes.entry(spec.config_volume.clone()).or_default();
            let info = ContainerInfo {
                id: id.clone(),
                name: spec.name.clone(),
                image: spec.image.clone(),
                state: ContainerState::Created,
                labels: spec.labels.clone(),
                created_at: Some(Utc::now().trunc_subsecs(0)),
                started_at: None,
                ..Default::default()
            };
            inner.names.insert(spec.name.clone(), id.clone());
            inner.index(&info, true);
            inner.containers.insert(id, SimContainer { info: info.clone(), config_volume: spec.config_volume.clone() });
            info
        };
        self.emit(&info, &["create"]);
        Ok(info.id)
    }

    async fn start(&self, id: &str) -> RuntimeResult<()> {
        bump(&self.calls.start);
        self.transition(id, |c| match c.state {
            ContainerState::Running => Ok(vec![]), // 304, no event
            ContainerState::Paused => {
                Err(RuntimeError::Api(format!("starting container {id}: cannot start a paused container")))
            }
            _ => {
                c.state = ContainerState::Running;
                Ok(vec!["start"])
            }
        })
    }

    async fn pause(&self, id: &str) -> RuntimeResult<()> {
        bump(&self.calls.pause);
        self.transition(id, |c| match c.state {
            ContainerState::Paused => Ok(vec![]),
            ContainerState::Running => {
                c.state = ContainerState::Paused;
                Ok(vec!["pause"])
            }
            _ => Err(RuntimeError::Api(format!("pausing container {id}: container is not running (HTTP 409)"))),
        })
    }

    async fn unpause(&self, id: &str) -> RuntimeResult<()> {
        bump(&self.calls.unpause);
        self.transition(id, |c| match c.state {
            ContainerState::Paused => {
                c.state = ContainerState::Running;
                Ok(vec!["unpause"])
            }
            _ => Ok(vec![]),
        })
    }

    async fn remove(&self, id_or_name: &str) -> RuntimeResult<()> {
        bump(&self.calls.remove);
        let removed = {
            let mut inner = self.inner.lock().expect("sim lock");
            let Some(id) = Self::resolve(&inner, id_or_name) else { return Ok(()) };
            let c = &inner.containers[&id];
            if !self.mine(&c.info) {
                return Err(RuntimeError::Api(format!(
                    "container {id_or_name} belongs to another operator instance; not removing it"
                )));
            }
            let c = inner.containers.remove(&id).expect("resolved");
            inner.names.remove(&c.info.name);
            inner.index(&c.info, false);
            c.info
        };
        let actions: &[&str] = match removed.state {
            ContainerState::Running | ContainerState::Paused | ContainerState::Restarting => {
                &["kill", "die", "destroy"]
            }
            _ => &["destroy"],
        };
        self.emit(&removed, actions);
        Ok(())
    }

    async fn write_file(&self, id: &str, dir: &str, name: &str, content: &[u8], _mode: u32) -> RuntimeResult<()> {
        bump(&self.calls.write_file);
        let info = {
            let mut inner = self.inner.lock().expect("sim lock");
            let id = Self::resolve(&inner, id).ok_or_else(|| not_found(id))?;
            let c = &inner.containers[&id];
            let (info, volume) = (c.info.clone(), c.config_volume.clone());
            if dir.trim_end_matches('/') != CONFIGS_DIR {
                return Err(RuntimeError::Api(format!("the simulated runtime only writes into {CONFIGS_DIR}")));
            }
            inner.volumes.entry(volume).or_default().files.insert(name.to_string(), content.to_vec());
            info
        };
        self.emit(&info, &["extract-to-dir"]);
        Ok(())
    }

    async fn read_file(&self, id: &str, path: &str) -> RuntimeResult<Option<Vec<u8>>> {
        bump(&self.calls.read_file);
        let (info, content) = {
            let inner = self.inner.lock().expect("sim lock");
            let id = Self::resolve(&inner, id).ok_or_else(|| not_found(id))?;
            let c = &inner.containers[&id];
            let name = path.strip_prefix(CONFIGS_DIR).map(|p| p.trim_start_matches('/'));
            let content = name.and_then(|n| inner.volumes.get(&c.config_volume)?.files.get(n).cloned());
            (c.info.clone(), content)
        };
        self.emit(&info, &["archive-path"]);
        Ok(content)
    }

    /// Never lost: the simulated daemon is in this process.
    fn watch(&self) -> BoxStream<'static, Watched> {
        let (tx, rx) = mpsc::unbounded_channel();
        self.subscribers.lock().expect("sim lock").push(tx);
        stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|ev| (Watched::Event(ev), rx)) }).boxed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(name: &str) -> ContainerSpec {
        ContainerSpec {
            name: name.into(),
            image: "img".into(),
            image_pull_policy: ImagePullPolicy::Never,
            env: BTreeMap::new(),
            labels: [
                (labels::INSTANCE.to_string(), "i".to_string()),
                (labels::WORKSPACE.to_string(), format!("default/{name}")),
            ]
            .into(),
            memory_bytes: 0,
            nano_cpus: 0,
            read_only_root: false,
            tmp_tmpfs_bytes: None,
            network: "host".into(),
            config_volume: format!("{name}-configs"),
            security: Default::default(),
            config_files: BTreeMap::new(),
        }
    }

    #[tokio::test]
    async fn emits_what_docker_emits_and_keeps_files_with_the_volume() {
        let sim = SimRuntime::new("i");
        let mut events = sim.events();
        let id = sim.create(&spec("a")).await.unwrap();
        assert!(sim.create(&spec("a")).await.is_err(), "names are unique");
        sim.write_file(&id, CONFIGS_DIR, ".auth_token", b"tok", 0o600).await.unwrap();
        sim.start(&id).await.unwrap();
        sim.start(&id).await.unwrap(); // no event, like a 304
        assert_eq!(sim.read_file(&id, "/configs/.auth_token").await.unwrap().as_deref(), Some(&b"tok"[..]));
        sim.remove("a").await.unwrap();
        sim.remove("a").await.unwrap();
        let mut actions = Vec::new();
        while let Some(Some(ev)) = futures::FutureExt::now_or_never(events.next()) {
            assert_eq!((ev.workspace.as_deref(), ev.container_id.as_str()), (Some("default/a"), id.as_str()));
            actions.push(ev.action);
        }
        assert_eq!(actions, ["create", "extract-to-dir", "start", "archive-path", "kill", "die", "destroy"]);
        let id2 = sim.create(&spec("a")).await.unwrap();
        assert_eq!(sim.read_file(&id2, "/configs/.auth_token").await.unwrap().as_deref(), Some(&b"tok"[..]));
        assert_eq!(sim.list().await.unwrap().len(), 1);
        let labeled = sim.list_labeled(labels::WORKSPACE, "default/a").await.unwrap();
        assert_eq!(
            labeled.iter().map(|c| c.id.as_str()).collect::<Vec<_>>(),
            [id2.as_str()],
            "the index forgets removed ones"
        );
    }
}
