//! The operator's metrics, served at `GET /metrics` in the OpenMetrics text format.
//! One `Metrics` is shared (in an `Arc`) by the registry server and the reconciler;
//! every family is prefixed `molecule_`.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::api::{ALL_PHASES, Phase};
use crate::model::RevokeReason;

/// The content type of [`Metrics::encode`]'s output.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Buckets of `molecule_heal_seconds`: from a fast token revoke to a slow re-provision.
pub const HEAL_BUCKETS: [f64; 10] = [0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RuleOutcome {
    rule: String,
    outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ErrorLabel {
    error: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TriggerLabel {
    trigger: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    endpoint: String,
    code: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResyncLabels {
    scope: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct WorkspaceLabel {
    workspace: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PoolLabels {
    pool: String,
    state: String,
}

/// Claim latency buckets: a claim is a few writes into a running container.
const CLAIM_BUCKETS: [f64; 10] = [0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PhaseLabel {
    phase: String,
}

pub struct Metrics {
    registry: Registry,
    reconciles: Family<RuleOutcome, Counter>,
    reconcile_errors: Family<ErrorLabel, Counter>,
    triggers: Family<TriggerLabel, Counter>,
    tokens_revoked: Family<ReasonLabel, Counter>,
    tokens_issued: Counter,
    registry_requests: Family<RequestLabels, Counter>,
    heal_seconds: Histogram,
    workspaces: Family<PhaseLabel, Gauge>,
    resyncs: Family<ResyncLabels, Counter>,
    resync_looked: Counter,
    agent_error_rate: Family<WorkspaceLabel, Gauge<f64, std::sync::atomic::AtomicU64>>,
    agent_active_tasks: Family<WorkspaceLabel, Gauge>,
    agent_wedged: Family<WorkspaceLabel, Gauge>,
    cpu_cores: Family<WorkspaceLabel, Gauge<f64, std::sync::atomic::AtomicU64>>,
    memory_bytes: Family<WorkspaceLabel, Gauge>,
    pool_members: Family<PoolLabels, Gauge>,
    pool_claim_seconds: Histogram,
    suspensions: Family<ReasonLabel, Counter>,
    wake_seconds: Histogram,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("molecule");
        let reconciles = Family::<RuleOutcome, Counter>::default();
        let reconcile_errors = Family::<ErrorLabel, Counter>::default();
        let triggers = Family::<TriggerLabel, Counter>::default();
        let tokens_revoked = Family::<ReasonLabel, Counter>::default();
        let tokens_issued = Counter::default();
        let registry_requests = Family::<RequestLabels, Counter>::default();
        let heal_seconds = Histogram::new(HEAL_BUCKETS);
        let workspaces = Family::<PhaseLabel, Gauge>::default();
        let resyncs = Family::<ResyncLabels, Counter>::default();
        let resync_looked = Counter::default();
        let agent_error_rate = Family::<WorkspaceLabel, Gauge<f64, std::sync::atomic::AtomicU64>>::default();
        let agent_active_tasks = Family::<WorkspaceLabel, Gauge>::default();
        let agent_wedged = Family::<WorkspaceLabel, Gauge>::default();
        let cpu_cores = Family::<WorkspaceLabel, Gauge<f64, std::sync::atomic::AtomicU64>>::default();
        let memory_bytes = Family::<WorkspaceLabel, Gauge>::default();
        let pool_members = Family::<PoolLabels, Gauge>::default();
        let pool_claim_seconds = Histogram::new(CLAIM_BUCKETS);
        registry.register(
            "pool_members",
            "Warm-pool members by pool and state: ready (unclaimed, running) or claimed",
            pool_members.clone(),
        );
        registry.register(
            "pool_claim_seconds",
            "Seconds from a claim decision to the member holding the workspace's token and identity",
            pool_claim_seconds.clone(),
        );
        let suspensions = Family::<ReasonLabel, Counter>::default();
        let wake_seconds = Histogram::new(HEAL_BUCKETS);
        registry.register("reconciles", "Reconcile decisions executed, by rule and outcome", reconciles.clone());
        registry.register("reconcile_errors", "Reconcile passes that failed, by error kind", reconcile_errors.clone());
        registry.register("reconcile_triggers", "Reconcile requests, by what asked for them", triggers.clone());
        registry.register("tokens_revoked", "Workspace auth tokens revoked, by reason", tokens_revoked.clone());
        registry.register("tokens_issued", "Workspace auth tokens issued", tokens_issued.clone());
        registry.register(
            "registry_requests",
            "HTTP requests served, by route and status code",
            registry_requests.clone(),
        );
        registry.register(
            "heal_seconds",
            "Seconds from detecting drift to the workspace matching its declaration again",
            heal_seconds.clone(),
        );
        registry.register("workspaces", "Workspaces by phase", workspaces.clone());
        registry.register(
            "resyncs",
            "Periodic resyncs: full (every container and record read) or changes (what the change log named)",
            resyncs.clone(),
        );
        registry.register("resync_workspaces_looked", "Workspaces the resyncs looked at", resync_looked.clone());
        // Per workspace (bounded by the declared set; dropped when a workspace is
        // forgotten). Current task and sample error are text: in the status, not here.
        registry.register(
            "agent_error_rate",
            "The error rate the workspace's agent last reported (original runtimes' heartbeat)",
            agent_error_rate.clone(),
        );
        registry.register(
            "agent_active_tasks",
            "The tasks the workspace's agent last reported active",
            agent_active_tasks.clone(),
        );
        registry.register(
            "agent_wedged",
            "1 while the workspace's runtime reports itself wedged",
            agent_wedged.clone(),
        );
        // Per workspace while its container runs (observe/usage.rs), labelled like
        // Kubernetes objects (namespace, name) so they join with kube-state-metrics.
        registry.register(
            "workspace_cpu_cores",
            "CPU the workspace's container used, in cores, averaged between the last two usage samples",
            cpu_cores.clone(),
        );
        registry.register(
            "workspace_memory_bytes",
            "Memory the workspace's container uses, in bytes, without reclaimable page cache",
            memory_bytes.clone(),
        );
        registry.register(
            "suspensions",
            "Workspaces suspended by the lifecycle autopilot, by reason (Idle, MaxLifetime); \
             molecule_workspaces{phase=\"Suspended\"} counts those suspended now",
            suspensions.clone(),
        );
        registry.register(
            "wake_seconds",
            "Seconds from a wake request for a suspended workspace to its agent online again",
            wake_seconds.clone(),
        );
        let metrics = Self {
            registry,
            reconciles,
            reconcile_errors,
            triggers,
            tokens_revoked,
            tokens_issued,
            registry_requests,
            heal_seconds,
            workspaces,
            resyncs,
            resync_looked,
            agent_error_rate,
            agent_active_tasks,
            agent_wedged,
            cpu_cores,
            memory_bytes,
            pool_members,
            pool_claim_seconds,
            suspensions,
            wake_seconds,
        };
        metrics.set_workspaces(std::iter::empty());
        metrics
    }

    /// A rule's decision was executed; `outcome` is e.g. "ok" or "error".
    pub fn reconciled(&self, rule: &str, outcome: &str) {
        self.reconciles.get_or_create(&RuleOutcome { rule: rule.into(), outcome: outcome.into() }).inc();
    }

    /// A reconcile pass failed; `error` is a stable label (e.g. `StoreError::metric_label`).
    pub fn reconcile_error(&self, error: &str) {
        self.reconcile_errors.get_or_create(&ErrorLabel { error: error.into() }).inc();
    }

    /// A reconcile was requested; `why` as passed to `Trigger::enqueue`.
    pub fn triggered(&self, why: &str) {
        self.triggers.get_or_create(&TriggerLabel { trigger: why.into() }).inc();
    }

    /// `n` tokens were revoked for `reason`.
    pub fn revoked(&self, reason: RevokeReason, n: u64) {
        if n > 0 {
            self.tokens_revoked.get_or_create(&ReasonLabel { reason: reason.as_str().into() }).inc_by(n);
        }
    }

    pub fn issued(&self) {
        self.tokens_issued.inc();
    }

    /// An HTTP request was answered; `endpoint` is the route template (bounded cardinality).
    pub fn registry_request(&self, endpoint: &str, code: u16) {
        self.registry_requests
            .get_or_create(&RequestLabels { endpoint: endpoint.into(), code: code.to_string() })
            .inc();
    }

    /// A resync ran over `looked` workspaces; `full`: every one, else what changed.
    pub fn resynced(&self, full: bool, looked: usize) {
        let scope = if full { "full" } else { "changes" };
        self.resyncs.get_or_create(&ResyncLabels { scope: scope.into() }).inc();
        self.resync_looked.inc_by(looked as u64);
    }

    /// What `workspace`'s agent reports, as its status shows it (None: nothing, or the
    /// workspace is forgotten: its series are dropped).
    pub fn set_agent(&self, workspace: &str, agent: Option<&crate::api::AgentStatus>) {
        let label = WorkspaceLabel { workspace: workspace.to_string() };
        match agent {
            Some(a) => {
                self.agent_error_rate.get_or_create(&label).set(a.error_rate.unwrap_or(0.0));
                self.agent_active_tasks.get_or_create(&label).set(a.active_tasks.unwrap_or(0));
                self.agent_wedged.get_or_create(&label).set(i64::from(a.runtime_state.as_deref() == Some("wedged")));
            }
            None => {
                self.agent_error_rate.remove(&label);
                self.agent_active_tasks.remove(&label);
                self.agent_wedged.remove(&label);
            }
        }
    }

    /// What `workspace` (`ns/name`) uses (None: nothing known, or its container is
    /// gone: its series are dropped).
    pub fn set_usage(&self, workspace: &str, usage: Option<&crate::model::usage::Usage>) {
        let labels = WorkspaceLabel { workspace: workspace.to_string() };
        match usage.and_then(|u| u.cpu_cores) {
            Some(cores) => {
                self.cpu_cores.get_or_create(&labels).set(cores);
            }
            None => {
                self.cpu_cores.remove(&labels);
            }
        }
        match usage.and_then(|u| u.memory_bytes) {
            Some(bytes) => {
                self.memory_bytes.get_or_create(&labels).set(i64::try_from(bytes).unwrap_or(i64::MAX));
            }
            None => {
                self.memory_bytes.remove(&labels);
            }
        }
    }

    /// A warm-pool member was claimed by a decision taken at `decided`.
    pub fn pool_claimed(&self, decided: chrono::DateTime<chrono::Utc>) {
        let secs = (chrono::Utc::now() - decided).num_microseconds().unwrap_or(0) as f64 / 1e6;
        self.pool_claim_seconds.observe(secs.max(0.0));
    }

    /// A pool's ready and claimed member counts; None removes the pool's series.
    pub fn set_pool(&self, pool: &str, counts: Option<(u32, u32)>) {
        for (i, state) in ["ready", "claimed"].into_iter().enumerate() {
            let label = PoolLabels { pool: pool.to_string(), state: state.to_string() };
            match counts {
                Some((ready, claimed)) => {
                    self.pool_members.get_or_create(&label).set(i64::from(if i == 0 { ready } else { claimed }));
                }
                None => {
                    self.pool_members.remove(&label);
                }
            }
        }
    }

    /// The lifecycle autopilot suspended a workspace for `reason`.
    pub fn suspended(&self, reason: &str) {
        self.suspensions.get_or_create(&ReasonLabel { reason: reason.into() }).inc();
    }

    /// A suspended workspace's agent came online `seconds` after the wake request.
    pub fn woken(&self, seconds: f64) {
        self.wake_seconds.observe(seconds);
    }

    /// A drift was healed `seconds` after it was first seen.
    pub fn healed(&self, seconds: f64) {
        self.heal_seconds.observe(seconds);
    }

    /// Sets the per-phase workspace counts; phases not given are set to 0.
    pub fn set_workspaces(&self, counts: impl IntoIterator<Item = (Phase, i64)>) {
        let mut all: Vec<(Phase, i64)> = ALL_PHASES.iter().map(|p| (*p, 0)).collect();
        for (phase, n) in counts {
            if let Some(slot) = all.iter_mut().find(|(p, _)| *p == phase) {
                slot.1 += n;
            }
        }
        for (phase, n) in all {
            self.workspaces.get_or_create(&PhaseLabel { phase: phase.to_string() }).set(n);
        }
    }

    /// The OpenMetrics text exposition, ending with `# EOF`.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn families_are_prefixed_and_counted() {
        let m = Metrics::new();
        m.reconciled("provision", "ok");
        m.reconciled("provision", "ok");
        m.revoked(RevokeReason::ContainerMissing, 2);
        m.revoked(RevokeReason::Paused, 0);
        m.issued();
        m.registry_request("/registry/heartbeat", 401);
        m.healed(0.3);
        m.set_workspaces([(Phase::Running, 3)]);
        m.suspended("Idle");
        m.woken(0.2);
        let text = m.encode();
        assert!(text.contains("molecule_suspensions_total{reason=\"Idle\"} 1"), "{text}");
        assert!(text.contains("molecule_wake_seconds_bucket{le=\"0.25\"} 1"), "{text}");
        assert!(text.contains("molecule_workspaces{phase=\"Suspended\"} 0"), "{text}");
        assert!(text.ends_with("# EOF\n"), "{text}");
        assert!(text.contains("molecule_reconciles_total{rule=\"provision\",outcome=\"ok\"} 2"), "{text}");
        assert!(text.contains("molecule_tokens_revoked_total{reason=\"container-missing\"} 2"), "{text}");
        assert!(!text.contains("reason=\"paused\""), "{text}");
        assert!(text.contains("molecule_tokens_issued_total 1"), "{text}");
        assert!(text.contains("molecule_registry_requests_total{endpoint=\"/registry/heartbeat\",code=\"401\"} 1"));
        assert!(text.contains("molecule_heal_seconds_bucket{le=\"0.5\"} 1"), "{text}");
        assert!(text.contains("molecule_workspaces{phase=\"Running\"} 3"), "{text}");
        assert!(text.contains("molecule_workspaces{phase=\"Failed\"} 0"), "{text}");
    }

    #[test]
    fn what_an_agent_reports_is_a_series_per_workspace_until_it_is_forgotten() {
        let m = Metrics::new();
        let agent = crate::api::AgentStatus {
            error_rate: Some(0.75),
            active_tasks: Some(2),
            runtime_state: Some("wedged".into()),
            ..Default::default()
        };
        m.set_agent("default/dev", Some(&agent));
        let text = m.encode();
        assert!(text.contains("molecule_agent_error_rate{workspace=\"default/dev\"} 0.75"), "{text}");
        assert!(text.contains("molecule_agent_active_tasks{workspace=\"default/dev\"} 2"), "{text}");
        assert!(text.contains("molecule_agent_wedged{workspace=\"default/dev\"} 1"), "{text}");
        m.set_agent("default/dev", None);
        assert!(!m.encode().contains("default/dev"));
    }

    #[test]
    fn usage_is_a_series_per_workspace_until_its_container_is_gone() {
        let m = Metrics::new();
        let u = crate::model::usage::Usage {
            cpu_cores: Some(0.25),
            memory_bytes: Some(4096),
            window_seconds: Some(15.0),
            sampled_at: chrono::Utc::now(),
        };
        m.set_usage("team-a/dev", Some(&u));
        let text = m.encode();
        assert!(text.contains("molecule_workspace_cpu_cores{workspace=\"team-a/dev\"} 0.25"), "{text}");
        assert!(text.contains("molecule_workspace_memory_bytes{workspace=\"team-a/dev\"} 4096"), "{text}");
        m.set_usage("team-a/dev", Some(&crate::model::usage::Usage { cpu_cores: None, ..u }));
        let text = m.encode();
        assert!(!text.contains("molecule_workspace_cpu_cores{"), "no rate, no series: {text}");
        assert!(text.contains("molecule_workspace_memory_bytes{workspace=\"team-a/dev\"} 4096"), "{text}");
        m.set_usage("team-a/dev", None);
        assert!(!m.encode().contains("name=\"dev\""));
    }
}
