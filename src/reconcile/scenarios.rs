//! The whole pipeline in-process: declarations in YAML, the simulated runtime, a real
//! SQLite store in a temporary directory, and `reconcile()` itself; each scenario
//! asserts the decision log as people read it (`describe`), as docker compose's
//! `reconcile_test.go` asserts its plans as text. They run in milliseconds and need
//! no Docker; the Docker runtime itself is tested against the daemon elsewhere.
//!
//! Between steps, `settle` hands the runtime's events to the container cache and the
//! token memo, as the feeder does in the operator.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use futures::stream::BoxStream;
use tokio::sync::watch;

use super::{Context, reconcile};
use crate::api::SourceRef;
use crate::api::effective::Defaults;
use crate::metrics::Metrics;
use crate::model::container::{CONFIGS_DIR, TOKEN_FILE};
use crate::rules::Settings;
use crate::runtime::render::AgentEnv;
use crate::runtime::sim::SimRuntime;
use crate::runtime::{Runtime, RuntimeEvent};
use crate::source::Snapshot;
use crate::source::desired::{DesiredSet, merge};
use crate::trigger::Report;

struct Bed {
    ctx: Arc<Context>,
    sim: Arc<SimRuntime>,
    desired: watch::Sender<Arc<DesiredSet>>,
    events: BoxStream<'static, RuntimeEvent>,
    _dir: tempfile::TempDir,
}

const WS: &str = "apiVersion: molecule.ai/v1alpha1
kind: Workspace
metadata: {name: dev}
spec: {env: {ROLE: dev}}
";

impl Bed {
    async fn new() -> Self {
        Self::with(|_| {}).await
    }

    /// A bed whose context is first changed by `configure`.
    async fn with(configure: impl FnOnce(&mut Context)) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = crate::store::open(dir.path().join("state.db").to_str().expect("utf-8 path"))
            .await
            .expect("SQLite store opens");
        let sim = Arc::new(SimRuntime::new("test"));
        let events = sim.events();
        let (desired, rx) = watch::channel(Arc::new(DesiredSet { complete: true, ..DesiredSet::default() }));
        let settings = Settings {
            heartbeat_interval: Duration::from_secs(1),
            heartbeat_ttl: Duration::from_secs(10),
            restart_budget: 3,
            restart_backoff: Duration::from_secs(10),
            freezes: true,
        };
        let agent = AgentEnv { registry_url: "http://127.0.0.1:9".into(), heartbeat_seconds: 1 };
        let mut ctx = Context::new("test".into(), sim.clone(), store, rx, settings, agent, Arc::new(Metrics::new()));
        configure(&mut ctx);
        let bed = Self { ctx: Arc::new(ctx), sim, desired, events, _dir: dir };
        bed.ctx.containers.relist(bed.sim.as_ref()).await.expect("the simulated runtime lists");
        bed
    }

    /// Declares what the YAML documents say (and nothing else).
    fn declare(&self, yaml: &str) {
        let source = SourceRef { kind: "dir".into(), reference: "test.yaml".into() };
        let (objects, errors) = crate::source::manifest::parse_documents(yaml, "test.yaml", &source);
        assert!(errors.is_empty(), "{errors:?}");
        let snapshot = Snapshot { source: "dir:test".into(), objects, errors };
        let previous = self.desired.borrow().clone();
        let mut set = merge(&[snapshot], &Defaults::default(), &previous);
        set.complete = true;
        self.desired.send_replace(Arc::new(set));
    }

    /// Hands the runtime's events so far to the cache and the token memo.
    async fn settle(&mut self) {
        while let Some(Some(ev)) = futures::FutureExt::now_or_never(self.events.next()) {
            self.ctx.token_memo.saw_event(&ev);
        }
        self.ctx.containers.relist(self.sim.as_ref()).await.expect("the simulated runtime lists");
    }

    /// Reconciles `name` once (after the events so far) and returns the decision log
    /// of that reconcile as text.
    async fn reconcile(&mut self, name: &str) -> String {
        self.settle().await;
        let (result, report) = reconcile(&self.ctx, &format!("default/{name}")).await;
        if let Err(e) = result {
            panic!("reconcile of {name} failed: {e}");
        }
        log(&report)
    }

    async fn record(&self, name: &str) -> crate::model::WorkspaceRecord {
        self.ctx.store.workspace(&format!("default/{name}")).await.unwrap().expect("a record")
    }

    async fn container(&self, name: &str) -> String {
        let uid = self.record(name).await.uid;
        let mine = self.sim.list_labeled(crate::model::container::labels::UID, &uid).await.unwrap();
        assert_eq!(mine.len(), 1, "one container for {name}");
        mine[0].id.clone()
    }

    async fn overwrite_token_file(&self, name: &str, content: &str) {
        let id = self.container(name).await;
        self.sim.write_file(&id, CONFIGS_DIR, TOKEN_FILE, content.as_bytes(), 0o600).await.unwrap();
    }
}

/// The decisions of a report as `describe` lists them, with what differs from run to
/// run (uids, container ids, token prefixes, times) replaced by placeholders.
fn log(report: &Report) -> String {
    let mut out = String::new();
    for d in &report.decisions {
        out.push_str(&format!("{}: {}\n", d.rule, d.cause));
        for a in &d.actions {
            out.push_str(&format!("  - {a}\n"));
        }
    }
    normalize(&out)
}

fn normalize(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for word in text.split_inclusive(|c: char| c.is_whitespace() || c == '(' || c == ')' || c == ',') {
        let (core, tail) = word.split_at(word.trim_end_matches(|c: char| !c.is_alphanumeric() && c != '…').len());
        let placeholder = if core.starts_with("ws-") && core.len() == 15 {
            Some("ws-UID")
        } else if core.ends_with('…') && core.chars().count() == 9 {
            Some("TOKEN…")
        } else if core.len() == 12 && core.chars().all(|c| c.is_ascii_hexdigit()) {
            Some("CONTAINER")
        } else {
            None
        };
        out.push_str(placeholder.unwrap_or(core));
        out.push_str(tail);
    }
    out
}

fn with_spec(extra: &str) -> String {
    WS.replace("spec: {env: {ROLE: dev}}", &format!("spec: {{env: {{ROLE: dev}}, {extra}}}"))
}

#[tokio::test]
async fn a_declared_workspace_is_provisioned_once() {
    let mut bed = Bed::new().await;
    bed.declare(WS);
    assert_eq!(
        bed.reconcile("dev").await,
        "provision: no container\n  \
         - created ws-UID (incarnation 1, image molecule-agent:local) with token TOKEN…\n"
    );
    assert_eq!(bed.reconcile("dev").await, "", "converged: nothing more to do");
}

#[tokio::test]
async fn a_spec_change_recreates_under_immediate_and_waits_under_manual() {
    let mut bed = Bed::new().await;
    bed.declare(WS);
    bed.reconcile("dev").await;
    bed.declare(&WS.replace("ROLE: dev", "ROLE: lead"));
    let log = bed.reconcile("dev").await;
    assert!(log.starts_with("drift: spec changed (hash "), "{log}");
    assert!(
        log.ends_with(
            "  - revoked 1 token: reprovision\n  \
             - created ws-UID (incarnation 2, image molecule-agent:local) with token TOKEN…\n"
        ),
        "{log}"
    );
    bed.declare(&with_spec("updatePolicy: Manual").replace("ROLE: dev", "ROLE: qa"));
    assert_eq!(bed.reconcile("dev").await, "", "Manual: the drift waits for a restart");
}

#[tokio::test]
async fn every_way_a_container_and_its_token_come_apart_heals() {
    let mut bed = Bed::new().await;
    bed.declare(WS);
    bed.reconcile("dev").await;

    bed.sim.remove(&bed.container("dev").await).await.unwrap();
    assert_eq!(
        bed.reconcile("dev").await,
        "provision: no container\n  \
         - revoked 1 token: container-missing\n  \
         - created ws-UID (incarnation 2, image molecule-agent:local) with token TOKEN…\n"
    );

    bed.sim.crash(&bed.container("dev").await).unwrap();
    assert_eq!(
        bed.reconcile("dev").await,
        "provision: container exited\n  \
         - revoked 1 token: reprovision\n  \
         - created ws-UID (incarnation 3, image molecule-agent:local) with token TOKEN…\n"
    );

    bed.overwrite_token_file("dev", "").await;
    assert_eq!(
        bed.reconcile("dev").await,
        "token-file: /configs/.auth_token is missing or empty\n  \
         - wrote token TOKEN… into the container\n  \
         - revoked 1 token: token-file-mismatch\n"
    );

    bed.overwrite_token_file("dev", "garbage-token-that-matches-nothing-at-all-x").await;
    assert_eq!(
        bed.reconcile("dev").await,
        "token-file: the token file holds no live token of incarnation 3\n  \
         - wrote token TOKEN… into the container\n  \
         - revoked 1 token: token-file-mismatch\n"
    );

    let uid = bed.record("dev").await.uid;
    bed.ctx.store.revoke_tokens(&uid, crate::model::RevokeReason::Deleted, None, chrono::Utc::now()).await.unwrap();
    assert_eq!(
        bed.reconcile("dev").await,
        "token-file: the token file holds no live token of incarnation 3\n  \
         - wrote token TOKEN… into the container\n",
        "rows revoked by hand: a new token, nothing else to revoke"
    );
    assert_eq!(bed.reconcile("dev").await, "");
}

#[tokio::test]
async fn pause_resume_and_stop_follow_the_operating_mode() {
    let mut bed = Bed::new().await;
    bed.declare(WS);
    bed.reconcile("dev").await;
    bed.declare(&with_spec("operatingMode: Paused"));
    assert_eq!(bed.reconcile("dev").await, "pause: operating mode is Paused\n  - paused container\n");
    bed.sim.remove(&bed.container("dev").await).await.unwrap();
    assert_eq!(
        bed.reconcile("dev").await,
        "provision: no container\n  \
         - revoked 1 token: container-missing\n  \
         - created ws-UID (incarnation 2, image molecule-agent:local) with token TOKEN…\n",
        "a paused workspace whose container is removed comes back paused"
    );
    let paused = bed.sim.list().await.unwrap();
    assert_eq!(paused[0].state, crate::model::container::ContainerState::Paused, "created paused");
    bed.declare(WS);
    assert_eq!(bed.reconcile("dev").await, "resume: operating mode is Running\n  - unpaused container\n");
    bed.declare(&with_spec("operatingMode: Stopped"));
    assert_eq!(
        bed.reconcile("dev").await,
        "stop: operating mode is Stopped\n  \
         - removed container CONTAINER\n  \
         - revoked 1 token: stopped\n"
    );
    assert_eq!(bed.sim.container_count(), 0);
}

#[tokio::test]
async fn a_team_quota_keeps_the_later_member_waiting_until_there_is_room() {
    let mut bed = Bed::new().await;
    bed.declare(
        "apiVersion: molecule.ai/v1alpha1
kind: Team
metadata: {name: eng}
spec:
  maxWorkspaces: 1
  workspaces:
    - {name: a}
    - {name: b}
",
    );
    assert!(bed.reconcile("eng-a").await.starts_with("provision: no container"));
    assert_eq!(bed.reconcile("eng-b").await, "", "b waits: the team allows one workspace");
    let status = bed.record("eng-b").await.status.expect("a status");
    assert_eq!(status.phase, crate::api::Phase::Pending);
    let quota = status.conditions.iter().find(|c| c.type_ == "QuotaExceeded").expect("QuotaExceeded");
    assert!(quota.message.contains("team eng allows 1 workspaces and 1 are taken"), "{}", quota.message);
}

#[tokio::test]
async fn a_workspace_declared_no_more_is_removed_with_its_tokens_and_volume() {
    let mut bed = Bed::new().await;
    bed.declare(WS);
    bed.reconcile("dev").await;
    bed.declare("");
    assert_eq!(
        bed.reconcile("dev").await,
        "remove: default/dev is declared no more\n  \
         - revoked 1 token: deleted\n  \
         - removed container CONTAINER\n  \
         - removed config volume\n  \
         - forgot the workspace\n"
    );
    assert!(bed.ctx.store.workspace("default/dev").await.unwrap().is_none());
}

#[tokio::test]
async fn a_reconcile_asked_for_a_key_nobody_declared_or_knows_does_nothing() {
    let mut bed = Bed::new().await;
    assert_eq!(bed.reconcile("ghost").await, "");
    assert!(bed.ctx.store.workspace("default/ghost").await.unwrap().is_none());
}

#[tokio::test]
async fn a_reconcile_that_panics_is_reported_failed_and_retried_not_lost() {
    let bed = Bed::with(|ctx| ctx.failpoint = Some("panic:after-provision".into())).await;
    let (trigger, requests) = crate::trigger::Trigger::new();
    let shutdown = tokio_util::sync::CancellationToken::new();
    let queue = tokio::spawn(super::run(bed.ctx.clone(), requests, Duration::from_secs(3600), 2, shutdown.clone()));
    bed.declare(WS);
    let ask = |why| tokio::time::timeout(Duration::from_secs(30), trigger.reconcile_and_wait("default/dev", why));
    let first = ask(crate::trigger::Why::CliRestart).await.expect("the waiter is answered").expect("running");
    let error = first.error.expect("the panic is reported as a failure");
    assert!(error.contains("panicked") && error.contains("failpoint after-provision"), "{error}");
    // The workspace is not left in flight: the next reconcile runs and converges.
    let later = ask(crate::trigger::Why::CliRestart).await.expect("the key was released").expect("running");
    assert_eq!(later.error, None);
    assert_eq!(later.status.map(|s| s.incarnation), Some(1), "the provision before the panic stands");
    assert_eq!(bed.sim.container_count(), 1);
    shutdown.cancel();
    queue.await.expect("the loop stops");
}
