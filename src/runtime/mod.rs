//! What runs: the `Runtime` trait (Docker via bollard in docker.rs) and the pure
//! rendering of an effective spec into a container config (render.rs).

pub mod agent_image;
pub mod docker;
pub mod docker_error;
pub mod docker_usage;
pub mod kubernetes;
pub mod network;
pub mod operator_image;
pub mod render;
#[cfg(any(test, feature = "sim"))]
pub mod sim;

use std::collections::BTreeMap;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use futures::stream::BoxStream;

use crate::api::ImagePullPolicy;
use crate::model::container::{AppliedConfig, ContainerInfo, ContainerSpec};

/// The longest file `Runtime::read_file` returns whole. The files it reads are written
/// by containers, which may make them any size to make the operator work: a longer
/// one is returned cut to this length plus one byte, and reading stops there. (A token
/// file holds 43 bytes; one this long holds no token, whatever it starts with.)
pub const READ_FILE_LIMIT: usize = 4096;

impl RuntimeEvent {
    /// Whether the event can change what a reconcile would observe: lifecycle changes,
    /// and files written into the container (someone overwriting the token file).
    /// Archive reads (our own token-file checks), exec, attach and the like cannot:
    /// reacting to reads would make every check trigger the next reconcile, forever.
    pub fn is_lifecycle(&self) -> bool {
        matches!(
            self.action.split(':').next().unwrap_or_default().trim(),
            "create"
                | "start"
                | "restart"
                | "die"
                | "kill"
                | "stop"
                | "destroy"
                | "pause"
                | "unpause"
                | "oom"
                | "rename"
                | "update"
                | "extract-to-dir"
                | "connect"
                | "disconnect"
        )
    }

    /// Whether it changes settings a running container can change (its limits, its
    /// restart policy, its networks): what it runs with is read again.
    pub fn changes_settings(&self) -> bool {
        matches!(self.action.as_str(), "update" | "connect" | "disconnect")
    }
}

/// What a runtime's watch delivers: events, and word that the stream was lost (events
/// may have been missed until it is back, so whatever was learnt from them is stale).
#[derive(Clone, Debug, PartialEq)]
pub enum Watched {
    Event(RuntimeEvent),
    Lost(String),
}

/// A container lifecycle event for one of our containers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RuntimeEvent {
    /// `ns/name` from the workspace label.
    pub workspace: Option<String>,
    pub container_id: String,
    /// create, start, die, stop, kill, destroy, pause, unpause, ...
    pub action: String,
    /// When the daemon says it happened (None when it did not say).
    pub at: Option<DateTime<Utc>>,
}

#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// The runtime cannot be reached at all (never read as "nothing exists").
    #[error("{0}")]
    Unavailable(String),
    #[error(
        "image {image} is not present and imagePullPolicy is Never; build or load it (`molecule-operator agent-image` builds molecule-agent:local)"
    )]
    ImageMissing { image: String },
    #[error("image {image} could not be pulled: {message}")]
    PullFailed { image: String, message: String },
    #[error("Docker refused: {0}")]
    Api(String),
    /// The Pod runtime cannot do it, or the Kubernetes API refused it: says what and
    /// why (a missing namespace, a quota, a missing grant).
    #[error("{0}")]
    Kubernetes(String),
}

impl RuntimeError {
    pub fn metric_label(&self) -> &'static str {
        match self {
            Self::Unavailable(_) => "runtime_unavailable",
            Self::ImageMissing { .. } => "image_missing",
            Self::PullFailed { .. } => "pull_failed",
            Self::Api(_) => "runtime_api",
            Self::Kubernetes(_) => "kubernetes",
        }
    }
}

pub type RuntimeResult<T> = Result<T, RuntimeError>;

#[async_trait]
pub trait Runtime: Send + Sync + 'static {
    /// Every container (running or not) carrying this operator instance's label.
    /// An error means "unknown", never "none": callers must not act as if empty.
    async fn list(&self) -> RuntimeResult<Vec<ContainerInfo>>;
    /// Those of `ids` that exist and carry this instance's label; an id missing from the
    /// answer is gone. An error means "unknown". The default filters `list`.
    async fn list_ids(&self, ids: &[String]) -> RuntimeResult<Vec<ContainerInfo>> {
        Ok(self.list().await?.into_iter().filter(|c| ids.contains(&c.id)).collect())
    }
    /// This instance's containers labelled `key=value` (e.g. one workspace's). An error
    /// means "unknown". The default filters `list`.
    async fn list_labeled(&self, key: &str, value: &str) -> RuntimeResult<Vec<ContainerInfo>> {
        Ok(self.list().await?.into_iter().filter(|c| c.label(key) == Some(value)).collect())
    }
    /// Whether the named volume exists.
    async fn volume_exists(&self, name: &str) -> RuntimeResult<bool>;
    /// Creates the named volume (with our labels) if it is missing.
    async fn ensure_volume(&self, name: &str, labels: &BTreeMap<String, String>) -> RuntimeResult<()>;
    /// Removes the named volume; a missing volume is success.
    async fn remove_volume(&self, name: &str) -> RuntimeResult<()>;
    /// Makes sure the image is present according to the pull policy.
    async fn ensure_image(&self, image: &str, policy: ImagePullPolicy) -> RuntimeResult<()>;
    /// Creates (does not start) the container; returns its id.
    async fn create(&self, spec: &ContainerSpec) -> RuntimeResult<String>;
    async fn start(&self, id: &str) -> RuntimeResult<()>;
    async fn pause(&self, id: &str) -> RuntimeResult<()>;
    async fn unpause(&self, id: &str) -> RuntimeResult<()>;
    /// Force-removes the container (and its anonymous volumes); a missing container is success.
    async fn remove(&self, id_or_name: &str) -> RuntimeResult<()>;
    /// Writes `dir/name` inside the container via the archive API (works before start and
    /// on scratch images), owned by AGENT_UID with the given mode.
    async fn write_file(&self, id: &str, dir: &str, name: &str, content: &[u8], mode: u32) -> RuntimeResult<()>;
    /// Writes `files` (paths relative to `dir`, subdirectories made as needed) inside
    /// the container, owned by AGENT_UID with the given mode. The default writes each
    /// with `write_file`, which makes at most one level of subdirectory.
    async fn write_files(&self, id: &str, dir: &str, files: &BTreeMap<String, String>, mode: u32) -> RuntimeResult<()> {
        for (path, content) in files {
            let (sub, name) = path.rsplit_once('/').map_or(("", path.as_str()), |(d, n)| (d, n));
            let dir = if sub.is_empty() { dir.to_string() } else { format!("{}/{sub}", dir.trim_end_matches('/')) };
            self.write_file(id, &dir, name, content.as_bytes(), mode).await?;
        }
        Ok(())
    }
    /// Reads a file via the archive API; Ok(None) when it does not exist in a running
    /// container, an error when the container is gone or no longer running (a container
    /// being removed loses its files first: that is not a missing file). At most
    /// `READ_FILE_LIMIT + 1` bytes of it (more means "longer than the limit").
    async fn read_file(&self, id: &str, path: &str) -> RuntimeResult<Option<Vec<u8>>>;
    /// Makes the claimed warm-pool member `id` the workspace's container as rendered in
    /// `spec` (its labels, stamped with incarnation and time, and its owner), where the
    /// runtime can relabel. Docker cannot: there the store's claim says whose it is
    /// (`Observed::adopt_claim`), and this does nothing.
    async fn adopt(&self, _id: &str, _spec: &ContainerSpec) -> RuntimeResult<()> {
        Ok(())
    }
    /// Whether a container's config files (`spec.configFiles`) are fixed when it is
    /// created (Kubernetes mounts each from a Secret, which a running Pod does not see
    /// change), so a claim cannot give a member other files than its template's.
    fn config_files_fixed(&self) -> bool {
        false
    }
    /// What container `id` runs with now, for the settings that can change while it
    /// runs (see `AppliedConfig`); None when the runtime has no such settings.
    async fn applied_config(&self, _id: &str) -> RuntimeResult<Option<AppliedConfig>> {
        Ok(None)
    }
    /// The agent's output (stdout and stderr, as written): the last `tail` lines, then,
    /// with `follow`, what it writes next until it stops. None when this runtime keeps
    /// no logs it can serve here.
    async fn logs(&self, _id: &str, _follow: bool, _tail: usize) -> RuntimeResult<Option<BoxStream<'static, Vec<u8>>>> {
        Ok(None)
    }
    /// One usage reading (CPU, memory) of each of `containers` (this instance's running
    /// ones) that it can read; those it cannot are left out. None when this runtime
    /// reports no usage at all (then none is shown). Called every few seconds by the
    /// usage sampler (observe/usage.rs), off the reconcile path.
    async fn usage(&self, _containers: &[ContainerInfo]) -> RuntimeResult<Option<Vec<crate::model::usage::Reading>>> {
        Ok(None)
    }
    /// Whether it can freeze a container and keep its memory (Docker's pause). Without
    /// a freezer the rules pause a workspace by removing its container (rules::Settings).
    fn freezes(&self) -> bool {
        true
    }
    /// Lifecycle events of this instance's containers, and a `Lost` each time the
    /// stream fails (events may have been missed until it is back); reconnects by itself.
    fn watch(&self) -> BoxStream<'static, Watched>;
    /// `watch` without the losses.
    fn events(&self) -> BoxStream<'static, RuntimeEvent> {
        use futures::StreamExt;
        self.watch()
            .filter_map(|w| async move {
                match w {
                    Watched::Event(ev) => Some(ev),
                    Watched::Lost(_) => None,
                }
            })
            .boxed()
    }
}

#[cfg(test)]
mod tests {
    use super::RuntimeEvent;

    #[test]
    fn only_lifecycle_events_trigger_reconciles() {
        let ev = |a: &str| RuntimeEvent {
            workspace: Some("default/a".into()),
            container_id: "c".into(),
            action: a.into(),
            at: None,
        };
        for a in ["create", "start", "die", "destroy", "pause", "unpause", "kill", "oom"] {
            assert!(ev(a).is_lifecycle(), "{a}");
        }
        for a in ["archive-path", "exec_create: ls", "exec_start: ls", "attach", "top"] {
            assert!(!ev(a).is_lifecycle(), "{a}");
        }
    }
}
