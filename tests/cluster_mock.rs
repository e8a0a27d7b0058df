//! Cluster mode against a mock apiserver (tower-test, as kube-rs/controller-rs does):
//! each scenario answers the requests the controller makes and checks their method,
//! path and body. The reconcile queue's other end is a tiny task answering
//! `reconcile_and_wait` with canned Reports; no Docker, no database.
//!
//! Every request seen is also checked against `molecule::cluster::API_USES`, which is
//! what deploy/'s RBAC grants (tests/deploy_rbac.rs).

mod support;

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::{Method, Request, Response, StatusCode};
use kube::Client;
use kube::client::Body;
use kube::runtime::controller::Action;
use kube::runtime::reflector::{self, Store};
use kube::runtime::watcher;
use molecule::api::effective::Defaults;
use molecule::api::{Phase, WorkspaceStatus};
use molecule::cluster::controller::{ControllerContext, error_policy, reconcile};
use molecule::cluster::source::{GuardedTeam, GuardedWorkspace, SentMap, sent_map, snapshot};
use molecule::cluster::{Error, Options};
use molecule::model::DecisionRecord;
use molecule::source::desired::{DesiredSet, merge};
use molecule::trigger::{Report, Request as ReconcileRequest, Trigger, Why};
use serde_json::{Value, json};
use support::mockapi::ApiServer;
use tokio::sync::{mpsc, watch};

/// The reconcile queue's other end: answers each request with the next canned Report.
struct Queue {
    asked: Arc<AtomicUsize>,
    reports: Arc<Mutex<VecDeque<Report>>>,
}

impl Queue {
    fn start(mut rx: mpsc::UnboundedReceiver<ReconcileRequest>) -> Self {
        let asked = Arc::new(AtomicUsize::new(0));
        let reports: Arc<Mutex<VecDeque<Report>>> = Arc::default();
        let (a, r) = (asked.clone(), reports.clone());
        tokio::spawn(async move {
            while let Some(req) = rx.recv().await {
                let ReconcileRequest::Reconcile { key, why, done } = req else { panic!("a resync nobody expected") };
                assert_eq!(why, Why::Kubernetes);
                a.fetch_add(1, Ordering::SeqCst);
                let mut report = r.lock().unwrap().pop_front().expect("a reconcile nobody expected");
                report.key = key.clone();
                if let Some(done) = done {
                    let _ = done.send(report);
                }
            }
        });
        Self { asked, reports }
    }

    fn will_answer(&self, report: Report) {
        self.reports.lock().unwrap().push_back(report);
    }

    fn asked(&self) -> usize {
        self.asked.load(Ordering::SeqCst)
    }
}

struct Harness {
    ctx: Arc<ControllerContext>,
    api: ApiServer,
    queue: Queue,
    desired: watch::Sender<Arc<DesiredSet>>,
    sent: watch::Sender<SentMap>,
    objects: reflector::store::Writer<GuardedWorkspace>,
    teams: reflector::store::Writer<GuardedTeam>,
}

fn harness() -> Harness {
    let (service, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let client = Client::new(service, "default");
    let (trigger, rx) = Trigger::new();
    let (desired, desired_rx) = watch::channel(Arc::new(DesiredSet { complete: true, ..DesiredSet::default() }));
    let (sent, sent_rx) = watch::channel(SentMap::new());
    let (store, objects): (Store<GuardedWorkspace>, _) = reflector::store();
    let (team_store, teams) = reflector::store();
    let options = Options { desired_wait: Duration::from_millis(300), ..Options::default() };
    let ctx = Arc::new(ControllerContext::new(client, &options, trigger, desired_rx, sent_rx, store, team_store));
    Harness { ctx, api: ApiServer(handle), queue: Queue::start(rx), desired, sent, objects, teams }
}

impl Harness {
    /// What the Kubernetes source and the desired store would do with these objects:
    /// the source's snapshot, merged.
    fn declare(&self, objects: &[Arc<GuardedWorkspace>]) {
        let set = merge(&[snapshot(objects, &[])], &Defaults::default(), &DesiredSet::default());
        self.desired.send_replace(Arc::new(set));
        self.sent.send_replace(sent_map(objects));
    }

    /// The controller's reflector sees the object.
    fn observe(&mut self, obj: &Arc<GuardedWorkspace>) {
        self.objects.apply_watcher_event(&watcher::Event::Apply(obj.as_ref().clone()));
    }
}

fn workspace(spec: Value, finalizers: &[&str], deleting: bool) -> Value {
    let mut v = json!({
        "apiVersion": "molecule.ai/v1alpha1",
        "kind": "Workspace",
        "metadata": {"name": "a", "namespace": "eng", "uid": "uid-a", "resourceVersion": "10", "generation": 3},
        "spec": spec,
    });
    if !finalizers.is_empty() {
        v["metadata"]["finalizers"] = json!(finalizers);
    }
    if deleting {
        v["metadata"]["deletionTimestamp"] = json!("2026-11-25T07:00:00Z");
    }
    v
}

fn guard(v: &Value) -> Arc<GuardedWorkspace> {
    Arc::new(serde_json::from_value(v.clone()).unwrap())
}

fn decision(rule: &str, cause: &str, actions: &[&str]) -> DecisionRecord {
    DecisionRecord {
        at: chrono::Utc::now(),
        rule: rule.into(),
        cause: cause.into(),
        actions: actions.iter().map(|s| s.to_string()).collect(),
        outcome: "ok".into(),
    }
}

fn running(incarnation: i64) -> WorkspaceStatus {
    WorkspaceStatus { phase: Phase::Running, incarnation, uid: Some("7f3c".into()), ..Default::default() }
}

const WS_PATH: &str = "/apis/molecule.ai/v1alpha1/namespaces/eng/workspaces/a";

#[tokio::test]
async fn the_first_reconcile_adds_the_finalizer_with_a_json_patch_and_nothing_else() {
    let mut h = harness();
    let obj = workspace(json!({"tier": 2}), &[], false);
    let run = tokio::spawn(reconcile(guard(&obj), h.ctx.clone()));

    let req = h.api.next().await;
    assert_eq!(req.method, Method::PATCH);
    assert_eq!(req.path, WS_PATH);
    assert_eq!(req.content_type, "application/json-patch+json");
    assert_eq!(
        req.body,
        json!([
            {"op": "test", "path": "/metadata/finalizers", "value": null},
            {"op": "add", "path": "/metadata/finalizers", "value": ["molecule.ai/cleanup"]},
        ])
    );
    req.respond(StatusCode::OK, workspace(json!({"tier": 2}), &["molecule.ai/cleanup"], false));

    assert_eq!(run.await.unwrap().unwrap(), Action::await_change());
    assert_eq!(h.queue.asked(), 0, "no reconcile before the finalizer is in place");
}

#[tokio::test]
async fn apply_reconciles_through_the_queue_and_writes_status_whole_by_server_side_apply() {
    let mut h = harness();
    let obj = guard(&workspace(json!({"tier": 2}), &["molecule.ai/cleanup"], false));
    h.declare(std::slice::from_ref(&obj));
    h.queue.will_answer(Report {
        status: Some(running(1)),
        decisions: vec![decision("provision", "no container", &["created container ws-7f3c"])],
        ..Default::default()
    });
    let run = tokio::spawn(reconcile(obj.clone(), h.ctx.clone()));

    let req = h.api.next().await;
    assert_eq!(req.method, Method::PATCH);
    assert_eq!(req.path, format!("{WS_PATH}/status"));
    assert_eq!(req.content_type, "application/apply-patch+yaml");
    assert!(req.query.contains("fieldManager=molecule-operator"), "{}", req.query);
    assert!(req.query.contains("force=true"), "{}", req.query);
    assert_eq!(req.body["apiVersion"], "molecule.ai/v1alpha1");
    assert_eq!(req.body["kind"], "Workspace");
    assert_eq!(req.body["status"]["phase"], "Running");
    assert_eq!(req.body["status"]["incarnation"], 1);
    assert_eq!(req.body["status"]["observedGeneration"], 3, "metadata.generation of the object");
    assert!(req.body.get("spec").is_none(), "status only: the spec belongs to the user");
    req.respond(StatusCode::OK, workspace(json!({"tier": 2}), &["molecule.ai/cleanup"], false));

    assert_eq!(run.await.unwrap().unwrap(), Action::requeue(Duration::from_secs(300)));
    assert_eq!(h.queue.asked(), 1);

    // Our own status write wakes the controller: the same generation was just
    // reconciled, so it neither asks the queue again nor writes anything.
    let run = tokio::spawn(reconcile(obj.clone(), h.ctx.clone()));
    h.api.quiet().await;
    let action = run.await.unwrap().unwrap();
    assert!(action != Action::await_change() && action != Action::requeue(Duration::from_secs(300)), "{action:?}");
    assert_eq!(h.queue.asked(), 1);

    // A new generation is reconciled, and its status written with its observedGeneration.
    let mut edited = workspace(json!({"tier": 3}), &["molecule.ai/cleanup"], false);
    edited["metadata"]["generation"] = json!(4);
    let edited = guard(&edited);
    h.declare(std::slice::from_ref(&edited));
    h.queue.will_answer(Report { status: Some(running(1)), ..Default::default() });
    let run = tokio::spawn(reconcile(edited, h.ctx.clone()));
    let req = h.api.next().await;
    assert_eq!(req.body["status"]["observedGeneration"], 4, "observedGeneration follows the object");
    req.respond(StatusCode::OK, workspace(json!({"tier": 3}), &["molecule.ai/cleanup"], false));
    assert!(run.await.unwrap().is_ok());
    assert_eq!(h.queue.asked(), 2);

    // The same status again (e.g. from the report writer) is not written again.
    let key = molecule::api::ObjectKey::new("eng", "a");
    let write = tokio::spawn({
        let ctx = h.ctx.clone();
        async move { ctx.write_status(&key, Some(4), running(1)).await }
    });
    h.api.quiet().await;
    write.await.unwrap().unwrap();
}

#[tokio::test]
async fn apply_waits_for_the_desired_store_before_asking_for_a_reconcile() {
    let h = harness();
    let obj = guard(&workspace(json!({}), &["molecule.ai/cleanup"], false));
    // Declared at generation 2 only: the source has not sent generation 3 yet.
    let mut older = workspace(json!({}), &["molecule.ai/cleanup"], false);
    older["metadata"]["generation"] = json!(2);
    h.declare(&[guard(&older)]);
    let err = reconcile(obj.clone(), h.ctx.clone()).await.unwrap_err();
    assert!(matches!(err.inner(), Error::NotYetDesired(_)), "{err}");
    assert_eq!(error_policy(obj, &err, h.ctx.clone()), Action::requeue(Duration::from_secs(1)));
    assert_eq!(h.queue.asked(), 0);
}

#[tokio::test]
async fn a_decision_a_user_should_see_is_published_as_an_event_then_status_is_written() {
    let mut h = harness();
    let obj = guard(&workspace(json!({}), &["molecule.ai/cleanup"], false));
    h.observe(&obj);
    let report = Report {
        key: "eng/a".into(),
        status: Some(running(2)),
        decisions: vec![decision(
            "provision",
            "no container",
            &["revoked 1 token: container-missing", "created container ws-7f3c"],
        )],
        ..Default::default()
    };
    let ctx = h.ctx.clone();
    let run = tokio::spawn(async move { ctx.handle_report(&report).await });

    for (reason, note) in
        [("Recreated", "no container: revoked 1 token"), ("TokenRevoked", "revoked 1 token: container-missing")]
    {
        let req = h.api.next().await;
        assert_eq!(req.method, Method::POST);
        assert_eq!(req.path, "/apis/events.k8s.io/v1/namespaces/eng/events");
        assert_eq!(req.body["reason"], reason);
        assert_eq!(req.body["type"], "Normal");
        assert!(req.body["note"].as_str().unwrap().starts_with(note), "{}", req.body["note"]);
        assert_eq!(req.body["reportingController"], "molecule-operator");
        assert_eq!(req.body["regarding"]["kind"], "Workspace");
        assert_eq!(req.body["regarding"]["name"], "a");
        assert_eq!(req.body["regarding"]["uid"], "uid-a");
        let body = req.body.clone();
        req.respond(StatusCode::CREATED, body);
    }
    let req = h.api.next().await;
    assert_eq!(req.path, format!("{WS_PATH}/status"));
    assert_eq!(req.body["status"]["incarnation"], 2);
    req.respond(StatusCode::OK, workspace(json!({}), &["molecule.ai/cleanup"], false));
    run.await.unwrap();

    // Reports for workspaces that are not Kubernetes objects (a directory source's,
    // a Team's inline members) are none of this controller's business.
    let other = Report { key: "eng/not-here".into(), status: Some(running(1)), ..Default::default() };
    h.ctx.handle_report(&other).await;
    h.api.quiet().await;
}

#[tokio::test]
async fn deletion_keeps_the_finalizer_until_the_report_says_forgotten() {
    let mut h = harness();
    let obj = guard(&workspace(json!({}), &["molecule.ai/cleanup"], true));

    // The source has not left it out yet: nothing is asked, the finalizer stays.
    h.declare(std::slice::from_ref(&guard(&workspace(json!({}), &["molecule.ai/cleanup"], false))));
    let err = reconcile(obj.clone(), h.ctx.clone()).await.unwrap_err();
    assert!(matches!(err.inner(), Error::CleanupPending(_)), "{err}");
    assert_eq!(h.queue.asked(), 0);

    // Left out of the desired set now; the first pass only stops the container.
    h.declare(&[]);
    h.queue.will_answer(Report {
        status: Some(WorkspaceStatus { phase: Phase::Terminating, ..Default::default() }),
        decisions: vec![decision("remove", "no longer declared", &["removed container ws-7f3c"])],
        ..Default::default()
    });
    let err = reconcile(obj.clone(), h.ctx.clone()).await.unwrap_err();
    assert!(matches!(err.inner(), Error::CleanupPending(_)), "{err}");
    assert_eq!(error_policy(obj.clone(), &err, h.ctx.clone()), Action::requeue(Duration::from_secs(1)));
    h.api.quiet().await;

    // Forgotten: container, volume and tokens are gone; only now the finalizer goes.
    h.queue.will_answer(Report {
        decisions: vec![decision("remove", "no longer declared", &["revoked 1 token: deleted", "forget workspace"])],
        forgotten: true,
        ..Default::default()
    });
    let run = tokio::spawn(reconcile(obj, h.ctx.clone()));
    let req = h.api.next().await;
    assert_eq!(req.method, Method::PATCH);
    assert_eq!(req.path, WS_PATH);
    assert_eq!(req.content_type, "application/json-patch+json");
    assert_eq!(
        req.body,
        json!([
            {"op": "test", "path": "/metadata/finalizers/0", "value": "molecule.ai/cleanup"},
            {"op": "remove", "path": "/metadata/finalizers/0"},
        ])
    );
    req.respond(StatusCode::OK, workspace(json!({}), &[], true));
    assert_eq!(run.await.unwrap().unwrap(), Action::await_change());
    assert_eq!(h.queue.asked(), 2);
}

#[tokio::test]
async fn deleting_a_workspace_the_operator_never_knew_releases_the_finalizer_at_once() {
    let mut h = harness();
    let obj = guard(&workspace(json!({}), &["other.io/keep", "molecule.ai/cleanup"], true));
    h.declare(&[]);
    h.queue.will_answer(Report::default()); // no status, no decisions: never known
    let run = tokio::spawn(reconcile(obj, h.ctx.clone()));
    let req = h.api.next().await;
    assert_eq!(req.body[0]["path"], "/metadata/finalizers/1", "only our finalizer is removed");
    req.respond(StatusCode::OK, workspace(json!({}), &["other.io/keep"], true));
    assert_eq!(run.await.unwrap().unwrap(), Action::await_change());
}

#[tokio::test]
async fn an_invalid_spec_gets_the_invalid_spec_condition_and_waits_for_a_change() {
    let mut h = harness();
    let bad = workspace(json!({"tier": 2, "colour": "blue"}), &["molecule.ai/cleanup"], false);
    let obj = guard(&bad);
    assert!(obj.0.is_err(), "the guard keeps the malformed object");
    h.declare(std::slice::from_ref(&obj));
    h.queue.will_answer(Report::default()); // the reconciler has nothing yet
    let run = tokio::spawn(reconcile(obj.clone(), h.ctx.clone()));

    let req = h.api.next().await;
    assert_eq!(req.path, format!("{WS_PATH}/status"));
    assert_eq!(req.body["status"]["phase"], "Failed");
    let conditions = req.body["status"]["conditions"].as_array().unwrap();
    let invalid = conditions.iter().find(|c| c["type"] == "InvalidSpec").unwrap();
    assert_eq!(invalid["status"], "True");
    assert!(invalid["message"].as_str().unwrap().contains("colour"), "{invalid}");
    req.respond(StatusCode::OK, bad);

    let err = run.await.unwrap().unwrap_err();
    assert!(matches!(err.inner(), Error::InvalidSpec(_)), "{err}");
    assert_eq!(err.metric_label(), "invalid_spec");
    assert_eq!(error_policy(obj, &err, h.ctx.clone()), Action::await_change(), "no requeue storm");
}

#[tokio::test]
async fn a_failing_reconcile_shows_in_status_and_is_requeued_with_growing_backoff() {
    let mut h = harness();
    let obj = guard(&workspace(json!({}), &["molecule.ai/cleanup"], false));
    h.declare(std::slice::from_ref(&obj));
    let failed = || Report {
        status: Some(WorkspaceStatus { phase: Phase::Failed, ..Default::default() }),
        error: Some("image molecule-agent:local is missing".into()),
        ..Default::default()
    };
    h.queue.will_answer(failed());
    let run = tokio::spawn(reconcile(obj.clone(), h.ctx.clone()));
    let req = h.api.next().await;
    assert_eq!(req.body["status"]["phase"], "Failed");
    req.respond(StatusCode::OK, workspace(json!({}), &["molecule.ai/cleanup"], false));
    let err = run.await.unwrap().unwrap_err();
    assert!(matches!(err.inner(), Error::ReconcileFailed { .. }), "{err}");
    assert_eq!(err.metric_label(), "reconcile_failed");
    let first = error_policy(obj.clone(), &err, h.ctx.clone());
    let second = error_policy(obj.clone(), &err, h.ctx.clone());
    assert_eq!(first, Action::requeue(Duration::from_millis(500)));
    assert_eq!(second, Action::requeue(Duration::from_secs(1)));

    // A status write the apiserver refuses is an error too, and is retried.
    h.queue.will_answer(Report { status: Some(running(1)), ..Default::default() });
    let run = tokio::spawn(reconcile(obj, h.ctx.clone()));
    let req = h.api.next().await;
    req.respond(
        StatusCode::INTERNAL_SERVER_ERROR,
        json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
        "message": "etcd is down", "reason": "InternalError", "code": 500}),
    );
    let err = run.await.unwrap().unwrap_err();
    assert_eq!(err.metric_label(), "kube");
}

#[tokio::test]
async fn leadership_is_acquired_by_creating_the_lease_and_handed_back_on_shutdown() {
    use molecule::cluster::leader::{LeaseConfig, acquire};
    let (service, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let mut api = ApiServer(handle);
    let client = Client::new(service, "default");
    let shutdown = tokio_util::sync::CancellationToken::new();
    let cfg = LeaseConfig::new("molecule-system", "pod-a", Duration::from_secs(15));
    let run = tokio::spawn(acquire(client, cfg, shutdown.clone()));
    let lease_path = "/apis/coordination.k8s.io/v1/namespaces/molecule-system/leases";

    let req = api.next().await;
    assert_eq!(
        (req.method.clone(), req.path.as_str()),
        (Method::GET, format!("{lease_path}/molecule-operator").as_str())
    );
    req.respond(
        StatusCode::NOT_FOUND,
        json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
        "reason": "NotFound", "code": 404}),
    );
    let req = api.next().await;
    assert_eq!((req.method.clone(), req.path.as_str()), (Method::POST, lease_path));
    assert_eq!(req.body["spec"]["holderIdentity"], "pod-a");
    assert_eq!(req.body["spec"]["leaseDurationSeconds"], 15);
    assert_eq!(req.body["spec"]["leaseTransitions"], 0);
    let mut created = req.body.clone();
    created["metadata"]["resourceVersion"] = json!("1");
    req.respond(StatusCode::CREATED, created.clone());
    let leadership = run.await.unwrap().expect("leads");
    assert!(!leadership.lost.is_cancelled());

    shutdown.cancel();
    let req = api.next().await;
    assert_eq!(req.method, Method::GET);
    req.respond(StatusCode::OK, created);
    let req = api.next().await;
    assert_eq!(req.method, Method::PUT, "an update carrying the resourceVersion");
    assert_eq!(req.body["metadata"]["resourceVersion"], "1");
    assert!(req.body["spec"].get("holderIdentity").is_none_or(Value::is_null), "released");
    let body = req.body.clone();
    req.respond(StatusCode::OK, body);
}

fn list(kind: &str, items: Vec<Value>) -> Value {
    json!({"apiVersion": "molecule.ai/v1alpha1", "kind": format!("{kind}List"),
           "metadata": {"resourceVersion": "100"}, "items": items})
}

fn named(name: &str, rv: &str, generation: i64, spec: Value) -> Value {
    let mut v = workspace(spec, &["molecule.ai/cleanup"], false);
    v["metadata"]["name"] = json!(name);
    v["metadata"]["resourceVersion"] = json!(rv);
    v["metadata"]["generation"] = json!(generation);
    v
}

#[tokio::test]
async fn the_source_sends_what_the_cluster_declares_and_again_only_when_a_spec_changes() {
    use molecule::source::SourceObject;
    let (service, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let mut api = ApiServer(handle);
    let client = Client::new(service, "default");
    let (snap_tx, mut snaps) = mpsc::channel(8);
    let (sent_tx, sent_rx) = watch::channel(SentMap::new());
    let shutdown = tokio_util::sync::CancellationToken::new();
    let (team_store, team_writer) = reflector::store::<GuardedTeam>();
    let (_pools, pool_writer) = reflector::store::<molecule::cluster::source::GuardedPool>();
    let run = tokio::spawn(molecule::cluster::source::run(
        client,
        None,
        snap_tx,
        sent_tx,
        team_writer,
        pool_writer,
        shutdown.clone(),
    ));

    let mut deleting = named("leaving", "11", 1, json!({}));
    deleting["metadata"]["deletionTimestamp"] = json!("2026-11-25T07:00:00Z");
    let team = json!({"apiVersion": "molecule.ai/v1alpha1", "kind": "Team",
        "metadata": {"name": "core", "namespace": "eng", "resourceVersion": "12"}, "spec": {"workspaces": [{"name": "x"}]}});
    let mut watches = Vec::new();
    let mut lists = 0;
    while lists < 3 {
        let req = api.next().await;
        assert_eq!(req.method, Method::GET);
        if req.is_watch() {
            watches.push(req);
        } else if req.path == "/apis/molecule.ai/v1alpha1/workspaces" {
            lists += 1;
            let items = vec![
                named("good", "10", 1, json!({"tier": 2})),
                named("bad", "10", 1, json!({"tier": "two"})),
                deleting.clone(),
            ];
            req.respond(StatusCode::OK, list("Workspace", items));
        } else if req.path == "/apis/molecule.ai/v1alpha1/teams" {
            lists += 1;
            req.respond(StatusCode::OK, list("Team", vec![team.clone()]));
        } else if req.path == "/apis/molecule.ai/v1alpha1/warmpools" {
            lists += 1;
            req.respond(StatusCode::OK, list("WarmPool", vec![]));
        } else {
            panic!("unexpected {} {}", req.method, req.path);
        }
    }
    let snap = tokio::time::timeout(Duration::from_secs(5), snaps.recv()).await.expect("a snapshot").unwrap();
    assert_eq!(snap.source, "kubernetes");
    let names: Vec<String> = snap
        .objects
        .iter()
        .map(|o| match o {
            SourceObject::Workspace { object, source } => {
                format!("ws {} {}", object.metadata.name.as_deref().unwrap(), source.reference)
            }
            SourceObject::Team { object, .. } => format!("team {}", object.metadata.name.as_deref().unwrap()),
            SourceObject::WarmPool { object, .. } => format!("pool {}", object.metadata.name.as_deref().unwrap()),
            SourceObject::Invalid { kind, key, .. } => format!("invalid {kind} {key}"),
        })
        .collect();
    assert_eq!(
        names,
        ["invalid Workspace eng/bad", "ws good eng/good@10", "team core"],
        "the one being deleted is left out"
    );
    assert_eq!(sent_rx.borrow().len(), 2);

    // A spec change arrives on the Workspace watch: a new snapshot.
    let ws_watch = loop {
        if let Some(i) = watches.iter().position(|w| w.path.ends_with("/workspaces")) {
            break watches.remove(i);
        }
        let req = api.next().await;
        assert!(req.is_watch(), "{} {}", req.method, req.path);
        watches.push(req);
    };
    let modified = |obj: Value| format!("{}\n", json!({"type": "MODIFIED", "object": obj})).into_bytes();
    let mut events = modified(named("good", "20", 2, json!({"tier": 3})));
    // ...and then a status write: same generation and spec, new resourceVersion.
    let mut status_only = named("good", "21", 2, json!({"tier": 3}));
    status_only["status"] = json!({"phase": "Running"});
    events.extend(modified(status_only));
    ws_watch.respond_raw(StatusCode::OK, events);
    let snap = tokio::time::timeout(Duration::from_secs(5), snaps.recv()).await.expect("a second snapshot").unwrap();
    let good = snap.objects.iter().find_map(|o| match o {
        SourceObject::Workspace { object, source } => Some((object.spec.tier, source.reference.clone())),
        _ => None,
    });
    assert_eq!(good, Some((Some(3), "eng/good@20".to_string())));
    assert!(
        tokio::time::timeout(Duration::from_millis(300), snaps.recv()).await.is_err(),
        "a status-only change sends no snapshot"
    );
    assert_eq!(team_store.state().len(), 1, "the controller reads Teams from the source's store");
    shutdown.cancel();
    drop(watches);
    run.await.unwrap().unwrap();
}

#[tokio::test]
async fn a_team_gets_its_members_rolled_up_into_its_status() {
    let mut h = harness();
    let team = json!({"apiVersion": "molecule.ai/v1alpha1", "kind": "Team",
        "metadata": {"name": "core", "namespace": "eng", "resourceVersion": "5", "generation": 2},
        "spec": {"workspaces": [{"name": "x"}]}});
    let team_obj: GuardedTeam = serde_json::from_value(team.clone()).unwrap();
    let set = merge(&[snapshot(&[], &[Arc::new(team_obj.clone())])], &Defaults::default(), &DesiredSet::default());
    h.desired.send_replace(Arc::new(set));
    h.teams.apply_watcher_event(&watcher::Event::Apply(team_obj));

    // An inline member (not a Kubernetes object of its own) reports Running.
    let report = Report { key: "eng/core-x".into(), status: Some(running(1)), ..Default::default() };
    let ctx = h.ctx.clone();
    let run = tokio::spawn(async move { ctx.handle_report(&report).await });
    let req = h.api.next().await;
    assert_eq!(req.method, Method::PATCH);
    assert_eq!(req.path, "/apis/molecule.ai/v1alpha1/namespaces/eng/teams/core/status");
    assert_eq!(req.content_type, "application/apply-patch+yaml");
    assert!(req.query.contains("fieldManager=molecule-operator"));
    assert_eq!(req.body["kind"], "Team");
    assert_eq!(req.body["status"]["members"], 1);
    assert_eq!(req.body["status"]["phases"], json!({"Running": 1}));
    assert_eq!(req.body["status"]["observedGeneration"], 2);
    assert_eq!(req.body["status"]["conditions"][0]["type"], "Ready");
    assert_eq!(req.body["status"]["conditions"][0]["status"], "True");
    req.respond(StatusCode::OK, team);
    run.await.unwrap();

    // Unchanged rollup: no write.
    let again = Report { key: "eng/core-x".into(), status: Some(running(1)), ..Default::default() };
    h.ctx.handle_report(&again).await;
    h.api.quiet().await;
}

#[tokio::test]
async fn a_client_is_built_from_a_kubeconfig_file_such_as_local_modes() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("kubeconfig");
    std::fs::write(
        &path,
        "apiVersion: v1\nkind: Config\ncurrent-context: molecule\nclusters:\n- name: molecule\n  cluster:\n    server: http://127.0.0.1:6443\ncontexts:\n- name: molecule\n  context:\n    cluster: molecule\n    user: admin\n    namespace: eng\nusers:\n- name: admin\n  user:\n    token: t0ken\n",
    )
    .unwrap();
    let client = molecule::cluster::client(Some(&path)).await.expect("a client");
    assert_eq!(client.default_namespace(), "eng");
    let Err(err) = molecule::cluster::client(Some(&dir.path().join("missing"))).await else {
        panic!("no kubeconfig there")
    };
    assert!(err.to_string().contains("cannot read kubeconfig"), "{err}");
}

/// The entry point as the operator calls it: source, controller and status writer
/// together, until shutdown.
#[tokio::test]
async fn run_wires_source_controller_and_status_writer_and_stops_on_shutdown() {
    use molecule::cluster::{Wiring, run};
    let (service, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let mut api = ApiServer(handle);
    let client = Client::new(service, "default");
    let (snap_tx, mut snaps) = mpsc::channel(8);
    let (desired_tx, desired_rx) = watch::channel(Arc::new(DesiredSet::default()));
    let (trigger, trigger_rx) = Trigger::new();
    let queue = Queue::start(trigger_rx);
    queue.will_answer(Report { status: Some(running(1)), ..Default::default() });
    let (reports, _) = tokio::sync::broadcast::channel(16);
    let shutdown = tokio_util::sync::CancellationToken::new();
    let wiring =
        Wiring { snapshots: snap_tx, desired: desired_rx, trigger, reports, secrets: None, store: None, pools: None };
    let running_op = tokio::spawn(run(client, Options::default(), wiring, shutdown.clone()));

    let fresh = named("a", "10", 1, json!({"tier": 2}));
    let mut fresh_no_finalizer = fresh.clone();
    fresh_no_finalizer["metadata"].as_object_mut().unwrap().remove("finalizers");
    let with_finalizer = named("a", "11", 1, json!({"tier": 2}));
    let modified = format!("{}\n", json!({"type": "MODIFIED", "object": with_finalizer})).into_bytes();

    let mut held = Vec::new();
    let mut finalizer_added = false;
    let mut status = None;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while status.is_none() {
        assert!(tokio::time::Instant::now() < deadline, "no status write (finalizer added: {finalizer_added})");
        tokio::select! {
            req = api.next() => match (req.method.clone(), req.path.as_str(), req.is_watch()) {
                (Method::GET, "/apis/molecule.ai/v1alpha1/workspaces", false) => {
                    req.respond(StatusCode::OK, list("Workspace", vec![fresh_no_finalizer.clone()]));
                }
                (Method::GET, "/apis/molecule.ai/v1alpha1/teams", false) => req.respond(StatusCode::OK, list("Team", vec![])),
                (Method::GET, "/apis/molecule.ai/v1alpha1/warmpools", false) => {
                    req.respond(StatusCode::OK, list("WarmPool", vec![]))
                }
                (Method::GET, p, true) if finalizer_added && p.ends_with("/workspaces") => {
                    req.respond_raw(StatusCode::OK, modified.clone());
                }
                (Method::GET, _, true) => held.push(req),
                (Method::PATCH, WS_PATH, _) => {
                    assert_eq!(req.body[1]["value"], json!(["molecule.ai/cleanup"]));
                    finalizer_added = true;
                    req.respond(StatusCode::OK, with_finalizer.clone());
                    // The change reaches the watchers.
                    for w in std::mem::take(&mut held) {
                        if w.path.ends_with("/workspaces") {
                            w.respond_raw(StatusCode::OK, modified.clone());
                        } else {
                            held.push(w);
                        }
                    }
                }
                (Method::PATCH, p, _) if p == format!("{WS_PATH}/status") => {
                    status = Some(req.body.clone());
                    req.respond(StatusCode::OK, with_finalizer.clone());
                }
                (m, p, w) => panic!("unexpected {m} {p} watch={w}"),
            },
            Some(snap) = snaps.recv() => {
                // The desired store's part.
                let previous = desired_tx.borrow().clone();
                desired_tx.send_replace(Arc::new(merge(&[snap], &Defaults::default(), &previous)));
            }
        }
    }
    let status = status.unwrap();
    assert_eq!(status["status"]["phase"], "Running");
    assert_eq!(status["status"]["observedGeneration"], 1);
    assert_eq!(queue.asked(), 1);

    shutdown.cancel();
    let stopped = tokio::time::timeout(Duration::from_secs(5), running_op).await.expect("run stops on shutdown");
    stopped.unwrap().expect("a clean stop");
}

fn lease(holder: &str, renewed: k8s_openapi::jiff::Timestamp, rv: &str, transitions: i32) -> Value {
    json!({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
        "metadata": {"name": "molecule-operator", "namespace": "molecule-system", "resourceVersion": rv},
        "spec": {"holderIdentity": holder, "leaseDurationSeconds": 1, "acquireTime": renewed.to_string(),
                 "renewTime": renewed.to_string(), "leaseTransitions": transitions}})
}

#[tokio::test]
async fn a_standby_waits_for_the_live_lease_takes_over_when_it_expires_and_notices_when_it_is_lost() {
    use k8s_openapi::jiff::{SignedDuration, Timestamp};
    use molecule::cluster::leader::{LeaseConfig, acquire};
    let (service, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let mut api = ApiServer(handle);
    let client = Client::new(service, "default");
    let shutdown = tokio_util::sync::CancellationToken::new();
    let cfg = LeaseConfig::new("molecule-system", "pod-a", Duration::from_secs(1));
    let run = tokio::spawn(acquire(client, cfg, shutdown.clone()));

    // pod-b holds a Lease whose renewTime, by pod-b's clock, is an hour old. Expiry is
    // counted on our clock from when we first saw this record: wait, do not write, for
    // a whole duration; then take over with a guarded update.
    let first_seen = std::time::Instant::now();
    let stale = lease("pod-b", Timestamp::now() - SignedDuration::from_hours(1), "7", 2);
    let req = loop {
        let req = api.next().await;
        if req.method != Method::GET {
            break req;
        }
        req.respond(StatusCode::OK, stale.clone());
    };
    assert_eq!(req.method, Method::PUT);
    assert!(
        first_seen.elapsed() >= Duration::from_secs(1),
        "took over before the record sat unchanged for its duration"
    );
    assert_eq!(req.body["metadata"]["resourceVersion"], "7", "optimistic concurrency");
    assert_eq!(req.body["spec"]["holderIdentity"], "pod-a");
    assert_eq!(req.body["spec"]["leaseTransitions"], 3);
    let body = req.body.clone();
    req.respond(StatusCode::OK, body);
    let leadership = run.await.unwrap().expect("leads");

    // At the next renewal pod-b holds it again (e.g. we were partitioned): leadership is lost.
    let req = api.next().await;
    assert_eq!(req.method, Method::GET);
    req.respond(StatusCode::OK, lease("pod-b", Timestamp::now(), "9", 4));
    tokio::time::timeout(Duration::from_secs(5), leadership.lost.cancelled()).await.expect("lost is signalled");
}

#[tokio::test]
async fn losing_the_race_to_renew_is_losing_leadership() {
    use k8s_openapi::jiff::Timestamp;
    use molecule::cluster::leader::{LeaseConfig, acquire};
    let (service, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let mut api = ApiServer(handle);
    let client = Client::new(service, "default");
    let cfg = LeaseConfig::new("molecule-system", "pod-a", Duration::from_secs(1));
    let run = tokio::spawn(acquire(client, cfg, tokio_util::sync::CancellationToken::new()));
    let req = api.next().await;
    req.respond(StatusCode::OK, lease("pod-a", Timestamp::now(), "3", 0));
    let req = api.next().await;
    assert_eq!(req.method, Method::PUT, "renew");
    let body = req.body.clone();
    req.respond(StatusCode::OK, body);
    let leadership = run.await.unwrap().expect("leads");
    let req = api.next().await;
    req.respond(StatusCode::OK, lease("pod-a", Timestamp::now(), "4", 0));
    let req = api.next().await;
    assert_eq!(req.method, Method::PUT);
    req.respond(
        StatusCode::CONFLICT,
        json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
        "reason": "Conflict", "code": 409, "message": "the object has been modified"}),
    );
    tokio::time::timeout(Duration::from_secs(5), leadership.lost.cancelled()).await.expect("lost is signalled");
}

#[tokio::test]
async fn a_leader_whose_renewals_go_unanswered_stops_before_its_lease_can_expire() {
    use k8s_openapi::jiff::Timestamp;
    use molecule::cluster::leader::{LeaseConfig, acquire};
    let (service, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let mut api = ApiServer(handle);
    let client = Client::new(service, "default");
    let duration = Duration::from_secs(1);
    let cfg = LeaseConfig::new("molecule-system", "pod-a", duration);
    let run = tokio::spawn(acquire(client, cfg, tokio_util::sync::CancellationToken::new()));
    let req = api.next().await;
    req.respond(StatusCode::OK, lease("pod-a", Timestamp::now(), "3", 0));
    let sent = std::time::Instant::now(); // no later than the renewal below was sent
    let req = api.next().await;
    assert_eq!(req.method, Method::PUT, "renew");
    let body = req.body.clone();
    req.respond(StatusCode::OK, body);
    let leadership = run.await.unwrap().expect("leads");
    // The next renewal is sent and never answered, nor refused: a black hole (kube-rs
    // would wait ~5 minutes for it). Leadership must end before the Lease could expire
    // for a standby, i.e. within its duration of the last renewal that went through.
    let unanswered = api.next().await;
    assert_eq!(unanswered.method, Method::GET);
    tokio::time::timeout(Duration::from_secs(10), leadership.lost.cancelled())
        .await
        .expect("a leader cut off must stop acting");
    assert!(
        sent.elapsed() < duration,
        "stopped {:?} after the last renewal: a standby may already lead",
        sent.elapsed()
    );
    drop(unanswered);
}

#[tokio::test]
async fn a_warm_pools_status_is_written_by_server_side_apply_when_it_changes_and_only_then() {
    use molecule::api::{ObjectKey, SourceRef, WarmPoolStatus};
    use molecule::cluster::source::GuardedPool;
    use molecule::reconcile::pools::Pools;
    use molecule::source::desired::DesiredPool;
    let (service, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let mut api = ApiServer(handle);
    let client = Client::new(service, "default");
    let (store, mut writer) = reflector::store::<GuardedPool>();
    let object: GuardedPool = serde_json::from_value(json!({"apiVersion": "molecule.ai/v1alpha1", "kind": "WarmPool",
        "metadata": {"name": "agents", "namespace": "eng", "uid": "pool-uid", "generation": 3},
        "spec": {"size": 2, "template": {}}}))
    .unwrap();
    writer.apply_watcher_event(&watcher::Event::Apply(object));
    let key = ObjectKey::new("eng", "agents");
    let template = molecule::api::effective::resolve(&Default::default(), &Defaults::default()).map(Arc::new);
    let mut set = DesiredSet::default();
    set.pools.insert(
        key.clone(),
        DesiredPool {
            key: key.clone(),
            size: 2,
            template,
            source: SourceRef { kind: "kubernetes".into(), reference: "eng/agents@1".into() },
            generation: Some(3),
        },
    );
    let (_desired_tx, desired) = watch::channel(Arc::new(set));
    let pools = Arc::new(Pools::default());
    let status = WarmPoolStatus { size: 2, ready: 1, starting: 1, observed_generation: Some(3), ..Default::default() };
    pools.status.lock().unwrap().insert("eng/agents".into(), status.clone());
    pools.published.notify_one();
    let shutdown = tokio_util::sync::CancellationToken::new();
    let run = tokio::spawn(molecule::cluster::pools::run(client, store, pools.clone(), desired, shutdown.clone()));

    let req = api.next().await;
    assert_eq!(
        (req.method.clone(), req.path.as_str()),
        (Method::PATCH, "/apis/molecule.ai/v1alpha1/namespaces/eng/warmpools/agents/status")
    );
    assert_eq!(req.content_type, "application/apply-patch+yaml");
    assert!(req.query.contains("fieldManager=molecule-operator") && req.query.contains("force=true"), "{}", req.query);
    assert_eq!(req.body["kind"], "WarmPool");
    assert_eq!(req.body["status"], serde_json::to_value(&status).unwrap());
    assert_eq!(req.body["status"]["observedGeneration"], 3);
    let body = req.body.clone();
    req.respond(StatusCode::OK, body);

    // The same status published again: nothing is written; a change is.
    pools.published.notify_one();
    api.quiet().await;
    pools.status.lock().unwrap().get_mut("eng/agents").unwrap().ready = 2;
    pools.published.notify_one();
    let req = api.next().await;
    assert_eq!(req.body["status"]["ready"], 2);
    let body = req.body.clone();
    req.respond(StatusCode::OK, body);
    shutdown.cancel();
    run.await.unwrap();
}
