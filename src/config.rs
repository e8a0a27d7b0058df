//! Operator settings from the command line (`up` and `run` share them).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Args;
use sha2::{Digest, Sha256};

/// How `up` reports convergence (`--progress`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ProgressMode {
    Auto,
    Plain,
    None,
}

/// `--log-format`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// Flags shared by `up` and `run`.
#[derive(Args, Clone, Debug)]
pub struct OperatorArgs {
    /// State directory: the SQLite database (state.db), the admin token, the address file.
    #[arg(long, default_value = ".molecule", env = "MOLECULE_STATE")]
    pub state: PathBuf,
    /// Address of the admin API, metrics and registry. Loopback by default. Agents on
    /// a bridge network (the default) get a listener of their own, serving only the
    /// registry, on the network's gateway at this port.
    #[arg(long, default_value = "127.0.0.1:8080", env = "MOLECULE_LISTEN")]
    pub listen: SocketAddr,
    /// Operator instance id, stamped on every container it creates (ai.molecule.instance);
    /// it only ever touches containers carrying its own. Default: derived from the state path.
    #[arg(long, env = "MOLECULE_INSTANCE")]
    pub instance: Option<String>,
    /// Keep state (tokens, incarnations) in Postgres (postgres://..., postgresql://...)
    /// or another SQLite file (sqlite://PATH, or a path) instead of STATE/state.db.
    /// Prefer the environment variable: a command line is visible in the process list.
    #[arg(long, env = "MOLECULE_DATABASE_URL", hide_env_values = true)]
    pub database_url: Option<String>,
    /// How often agents heartbeat (passed to them as MOLECULE_HEARTBEAT_SECONDS).
    #[arg(long, default_value_t = 30)]
    pub heartbeat_seconds: u64,
    /// Silence longer than this many heartbeats means the agent is hung (minimum 10 s).
    #[arg(long, default_value_t = 6)]
    pub heartbeat_misses: u32,
    /// Restarts for missed heartbeats before a workspace is left Degraded.
    #[arg(long, default_value_t = 3)]
    pub restart_budget: i64,
    /// First wait between heartbeat restarts; doubles after each.
    #[arg(long, default_value_t = 10)]
    pub restart_backoff_seconds: u64,
    /// Periodic resync, the safety net behind event-driven reconciles: looks at the
    /// workspaces whose records or tokens changed without the operator being told.
    #[arg(long, default_value_t = 60)]
    pub resync_seconds: u64,
    /// How often a resync is a full one instead: every container listed, every record
    /// and token read (also at start, and after a secret or the Docker connection changed).
    #[arg(long, default_value_t = 600)]
    pub full_resync_seconds: u64,
    /// How often each workspace's CPU and memory are read from the runtime (cgroup
    /// files or Docker's stats; with Pods, the metrics.k8s.io API where served), for
    /// `get -o wide`, `describe`, the fleet page and /metrics. 0: never.
    #[arg(long, default_value_t = 15)]
    pub usage_seconds: u64,
    /// Image for a runtime; `{runtime}` is replaced. Production:
    /// ghcr.io/molecule-ai/workspace-template-{runtime}:latest
    #[arg(long, default_value = "molecule-agent:local")]
    pub image_template: String,
    /// Network for workspace containers. Default: a bridge network of this operator's
    /// own, molecule-<instance>, made and labelled by it; agents reach the registry on
    /// its gateway and nothing else of the host. `host` puts every agent in the host's
    /// network namespace: they reach its loopback (the admin API, local databases), and
    /// while the operator is stopped any agent can listen on the registry's port and
    /// collect the others' tokens; use it only if every agent is trusted. Any other
    /// NAME: an existing Docker network, used as found.
    #[arg(long, value_name = "host|NAME")]
    pub network: Option<String>,
    /// Allow workspaces to ask for spec.security (privileged, hostPid, dockerSocket).
    #[arg(long)]
    pub allow_privileged: bool,
    /// Also serve the registry alone (register, heartbeat, healthz: no admin API, no
    /// metrics) on ADDR. In a cluster the registry's Service targets this port, so
    /// that workspaces reach the registry and nothing else of the operator (deploy/).
    #[arg(long, value_name = "ADDR")]
    pub agent_listen: Option<SocketAddr>,
    /// URL agents use to reach the registry. Default: http://<gateway>:<listen port> on
    /// a bridge network (served by the operator), http://<listen> with `--network host`.
    /// When given, the operator serves nothing extra for agents: the URL must reach it.
    #[arg(long)]
    pub registry_url: Option<String>,
    /// Serve the Kubernetes API for Workspaces and Teams on ADDR (HTTPS, self-signed;
    /// writes STATE/kubeconfig): `kubectl --kubeconfig STATE/kubeconfig apply -f ...`.
    /// Objects applied there are stored in the state store and reconciled like any source.
    #[arg(long, value_name = "ADDR")]
    pub kube_api: Option<SocketAddr>,
    /// What runs workspaces: `docker` (containers on the local daemon; the default for
    /// `up`) or `kubernetes` (Pods, a PersistentVolumeClaim and a token Secret each; the
    /// default for `--source kubernetes`). With `--kube-api`, `kubernetes` also starts
    /// the local node, which runs the embedded API's Pods as Docker containers (a test
    /// bed and laptop mode, not a kubelet). In a cluster, give `--registry-url` (the
    /// Service in front of the operator) so that agents reach the registry.
    #[arg(long, value_enum)]
    pub runtime: Option<RuntimeKind>,
    /// The cluster to use with `--source kubernetes`: a kubeconfig file. Default: the
    /// in-cluster service account, else $KUBECONFIG or ~/.kube/config.
    #[arg(long, value_name = "FILE")]
    pub kubeconfig: Option<PathBuf>,
    /// With `--source kubernetes`, the Secret in the operator's namespace that holds
    /// the secrets key (key `key`); the operator creates it, with a new random key, when
    /// it is missing. MOLECULE_SECRETS_KEY, when set, is used instead.
    #[arg(long, value_name = "NAME", default_value = "molecule-operator-secrets-key")]
    pub secrets_key_secret: String,
    /// Leader Lease duration with several replicas (`--source kubernetes`).
    #[arg(long, default_value_t = 15)]
    pub lease_seconds: u64,
    /// How convergence is shown: `auto` (the default of `up`) redraws one line per
    /// workspace in place on a terminal, with a summary such as `6/6 running`, and
    /// sends the logs to STATE/operator.log; off a terminal it prints a plain line
    /// whenever a workspace changes. `plain` always prints plain lines; `none` (the
    /// default of `run`) shows logs only.
    #[arg(long, value_enum)]
    pub progress: Option<ProgressMode>,
    /// Log lines as `text`, or as `json` (one object per line, for log shippers).
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// Reconciles run at once.
    #[arg(long, default_value_t = 8)]
    pub concurrency: usize,
    /// Export traces over OTLP/HTTP (JSON) to this collector (its base URL, e.g.
    /// http://localhost:4318; spans go to /v1/traces): each reconcile a span, with its
    /// steps (observe, plan, each action) as children and the decision's rule and
    /// cause as attributes. Off when unset.
    #[arg(long, value_name = "URL", env = "OTEL_EXPORTER_OTLP_ENDPOINT")]
    pub otlp_endpoint: Option<String>,
}

/// `--runtime`: what runs workspaces.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum RuntimeKind {
    /// Containers on the local Docker daemon.
    #[default]
    Docker,
    /// Pods, through the Kubernetes API.
    Kubernetes,
}

impl OperatorArgs {
    /// Whether a progress view is drawn, and how: `Some(true)` in place (stdout is a
    /// terminal and the mode is `auto`), `Some(false)` as plain lines, `None` not at all.
    pub fn progress_view(&self) -> Option<bool> {
        use std::io::IsTerminal;
        match self.progress? {
            ProgressMode::None => None,
            ProgressMode::Plain => Some(false),
            ProgressMode::Auto => Some(std::io::stdout().is_terminal()),
        }
    }

    /// Where the logs go while a view is drawn in place: a file in the state dir.
    pub fn log_file(&self) -> Option<PathBuf> {
        (self.progress_view() == Some(true)).then(|| self.state.join("operator.log"))
    }

    /// `--runtime`, or its default: Pods when the workspaces are Kubernetes objects.
    pub fn runtime_kind(&self, cluster_mode: bool) -> RuntimeKind {
        self.runtime.unwrap_or(if cluster_mode { RuntimeKind::Kubernetes } else { RuntimeKind::Docker })
    }

    pub fn instance_id(&self) -> String {
        self.instance.clone().unwrap_or_else(|| derive_instance(&self.state))
    }

    pub fn heartbeat_interval(&self) -> Duration {
        Duration::from_secs(self.heartbeat_seconds.max(1))
    }

    /// Which network workspaces join (`--network`).
    pub fn network_choice(&self) -> crate::runtime::network::NetworkChoice {
        crate::runtime::network::NetworkChoice::new(self.network.as_deref(), &self.instance_id())
    }

    /// The state store: what `--database-url` names (an unknown scheme is an error
    /// naming the accepted forms), else `STATE/state.db`.
    pub fn database(&self) -> Result<crate::store::DatabaseUrl, String> {
        match &self.database_url {
            Some(url) => crate::store::DatabaseUrl::parse(url).map_err(|e| format!("--database-url: {e}")),
            None => Ok(crate::store::DatabaseUrl::Sqlite(self.state.join("state.db"))),
        }
    }
}

/// `local-` plus 8 hex chars of the absolute state path: two operators with different
/// state dirs on one Docker daemon never touch each other's containers.
pub fn derive_instance(state: &Path) -> String {
    let abs = std::path::absolute(state).unwrap_or_else(|_| state.to_path_buf());
    format!("local-{}", &hex::encode(Sha256::digest(abs.to_string_lossy().as_bytes()))[..8])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instance_is_stable_per_state_dir_and_differs_between_them() {
        let a = derive_instance(Path::new("/tmp/a/.molecule"));
        assert_eq!(a, derive_instance(Path::new("/tmp/a/.molecule")));
        assert_ne!(a, derive_instance(Path::new("/tmp/b/.molecule")));
        assert!(a.starts_with("local-") && a.len() == 14);
    }
}
