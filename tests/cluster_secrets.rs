//! `envFrom` in cluster mode, end to end but for the API server (none can be had
//! here): Kubernetes Secrets come from a tower-test mock apiserver into the real
//! reflector (`cluster::secrets`), and the real reconcile queue puts them into real
//! Docker containers, with a SQLite state store in a temp dir.

#[path = "support/docker.rs"]
mod docker_support;

use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use docker_support::{NO_REGISTRY, TestDocker};
use http::{Request, Response};
use kube::Client;
use kube::client::Body;
use molecule::api::effective::Defaults;
use molecule::api::{ConditionStatus, Phase, SourceRef, Workspace};
use molecule::metrics::Metrics;
use molecule::reconcile::Context;
use molecule::rules::Settings;
use molecule::runtime::Runtime;
use molecule::runtime::render::AgentEnv;
use molecule::secrets::{Keyring, SecretScope};
use molecule::source::desired::{DesiredSet, merge};
use molecule::source::{Snapshot, SourceObject};
use molecule::trigger::{Report, Trigger};
use serde_json::{Value, json};
use tokio::sync::{broadcast, watch};
use tokio_util::sync::CancellationToken;

type Handle = tower_test::mock::Handle<Request<Body>, Response<Body>>;

fn secret(name: &str, rv: &str, data: &[(&str, &str)]) -> Value {
    let b64 = base64::engine::general_purpose::STANDARD;
    let data: serde_json::Map<String, Value> =
        data.iter().map(|(k, v)| (k.to_string(), json!(b64.encode(v)))).collect();
    json!({"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
           "metadata": {"name": name, "namespace": "default", "resourceVersion": rv}, "data": data})
}

fn workspace(name: &str, spec: Value) -> SourceObject {
    let object: Workspace = serde_json::from_value(json!({
        "apiVersion": "molecule.ai/v1alpha1", "kind": "Workspace",
        "metadata": {"name": name, "namespace": "default"}, "spec": spec}))
    .unwrap();
    SourceObject::Workspace {
        object: Box::new(object),
        source: SourceRef { kind: "kubernetes".into(), reference: name.into() },
    }
}

/// The container's env as `KEY=value` strings, and its id.
async fn env_of(d: &TestDocker, name: &str) -> Option<(String, Vec<String>)> {
    let containers = d.runtime.list().await.ok()?;
    let key = format!("default/{name}");
    let c = containers.iter().find(|c| c.workspace() == Some(key.as_str()))?;
    let inspect = d.docker.inspect_container(&c.id, None).await.ok()?;
    Some((c.id.clone(), inspect.config?.env.unwrap_or_default()))
}

/// Polls until the container of `name` has `var` in its env; returns its id and env.
async fn env_with(d: &TestDocker, name: &str, var: &str) -> (String, Vec<String>) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(found) = env_of(d, name).await.filter(|(_, env)| env.iter().any(|e| e == var)) {
            return found;
        }
        assert!(tokio::time::Instant::now() < deadline, "{name} never got {var}: {:?}", env_of(d, name).await);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Answers the next request, which must be a watch of Secrets, with `events`.
async fn answer_watch(api: &mut Handle, events: &[Value]) {
    let (req, reply) = tokio::time::timeout(Duration::from_secs(10), api.next_request()).await.unwrap().unwrap();
    assert_eq!(req.uri().path(), "/api/v1/secrets");
    assert!(req.uri().query().unwrap().contains("watch=true"), "{:?}", req.uri());
    let body: Vec<u8> = events.iter().flat_map(|e| format!("{e}\n").into_bytes()).collect();
    reply.send_response(Response::new(Body::from(body)));
}

/// Waits for a report on `key` that satisfies `ok`.
async fn report_where(
    reports: &mut broadcast::Receiver<Report>,
    key: &str,
    what: &str,
    ok: impl Fn(&Report) -> bool,
) -> Report {
    tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            match reports.recv().await {
                Ok(r) if r.key == key && ok(&r) => return r,
                Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {}
                Err(e) => panic!("reports closed: {e}"),
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("no report on {key}: {what}"))
}

fn secrets_ready(r: &Report) -> Option<(ConditionStatus, String)> {
    let st = r.status.as_ref()?;
    let c = st.conditions.iter().find(|c| c.type_ == "SecretsReady")?;
    Some((c.status, c.message.clone()))
}

#[tokio::test]
async fn env_from_secrets_reach_the_container_override_order_holds_and_a_change_restarts_only_their_users() {
    let Some(d) = TestDocker::connect("envfrom").await else { return };
    d.agent_image().await;
    let dir = tempfile::tempdir().unwrap();
    let store = molecule::store::open(dir.path().join("state.db").to_str().unwrap()).await.unwrap();
    let keyring = Arc::new(Keyring::from_keys(&[9; 32], &[]));
    // The operator's own secret for this one workspace wins over the Secret's key.
    let sealed = keyring.seal(&SecretScope::Workspace("default/uses".into()), "SHARED", "from-operator-store");
    store.put_secret("workspace:default/uses", "SHARED", &sealed, chrono::Utc::now()).await.unwrap();

    let snap = Snapshot {
        source: "kubernetes".into(),
        objects: vec![
            workspace(
                "uses",
                json!({"env": {"PLAIN": "x", "API_KEY": "from-env"},
                       "envFrom": [{"secretRef": {"name": "keys"}}, {"secretRef": {"name": "maybe", "optional": true}},
                                   {"secretRef": {"name": "keys"}, "prefix": "COPY_"}]}),
            ),
            workspace("plain", json!({"env": {"PLAIN": "y"}})),
        ],
        errors: vec![],
    };
    let set = merge(&[snap], &Defaults::default(), &DesiredSet::default());
    assert!(set.complete || set.workspaces.len() == 2, "both declared");
    let (_desired_tx, desired_rx) = watch::channel(Arc::new(DesiredSet { complete: true, ..set }));

    let runtime = molecule::runtime::docker::DockerRuntime::connect(&d.instance).await.unwrap();
    let settings = Settings {
        heartbeat_interval: Duration::from_secs(1),
        heartbeat_ttl: Duration::from_secs(600),
        restart_budget: 3,
        restart_backoff: Duration::from_secs(1),
        freezes: true,
    };
    let agent = AgentEnv { registry_url: NO_REGISTRY.into(), heartbeat_seconds: 1 };
    let mut ctx = Context::new(
        d.instance.clone(),
        Arc::new(runtime),
        store.clone(),
        desired_rx.clone(),
        settings,
        agent,
        Arc::new(Metrics::new()),
    );
    ctx.keyring = Some(keyring);
    let (objects, feed) = molecule::cluster::secrets::reflector();
    ctx.secret_objects = Some(Arc::new(objects));
    let ctx = Arc::new(ctx);
    let mut reports = ctx.reports.subscribe();
    let shutdown = CancellationToken::new();
    let _stop = shutdown.clone().drop_guard();
    let (trigger, trigger_rx) = Trigger::new();
    tokio::spawn(molecule::reconcile::run(ctx.clone(), trigger_rx, Duration::from_secs(600), 4, shutdown.clone()));

    // Before the Secrets are listed, the user of one waits; the other starts.
    let held = report_where(&mut reports, "default/uses", "held before the list", |r| {
        secrets_ready(r).is_some_and(|(s, _)| s == ConditionStatus::False)
    })
    .await;
    assert_eq!(held.status.as_ref().unwrap().phase, Phase::Pending);
    assert!(env_of(&d, "uses").await.is_none(), "no container without its secrets");

    let (service, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let mut api: Handle = handle;
    let client = Client::new(service, "default");
    tokio::spawn(molecule::cluster::secrets::run(
        kube::Api::all(client),
        feed,
        desired_rx.clone(),
        trigger.clone(),
        shutdown.clone(),
    ));
    let (req, reply) = api.next_request().await.unwrap();
    assert_eq!(req.uri().path(), "/api/v1/secrets");
    assert!(req.uri().query().unwrap().contains("fieldSelector=type%3DOpaque"), "{:?}", req.uri());
    let list = json!({"apiVersion": "v1", "kind": "SecretList", "metadata": {"resourceVersion": "10"},
        "items": [secret("keys", "5", &[("API_KEY", "sk-one"), ("SHARED", "from-secret")]),
                  secret("unused", "6", &[("X", "1")])]});
    reply.send_response(Response::new(Body::from(serde_json::to_vec(&list).unwrap())));

    let (uses_id, env) = env_with(&d, "uses", "API_KEY=sk-one").await;
    for want in ["API_KEY=sk-one", "COPY_API_KEY=sk-one", "SHARED=from-operator-store", "PLAIN=x"] {
        assert!(env.iter().any(|e| e == want), "{want} missing from {env:?}");
    }
    assert!(!env.iter().any(|e| e.starts_with("X=")), "only named Secrets are read");
    let (plain_id, plain_env) = env_of(&d, "plain").await.expect("the workspace without envFrom runs");
    assert!(!plain_env.iter().any(|e| e.contains("sk-one")));
    report_where(&mut reports, "default/uses", "SecretsReady", |r| {
        secrets_ready(r).is_some_and(|(s, _)| s == ConditionStatus::True)
    })
    .await;

    // The Secret changes: its user is recreated with the new value, the other is not.
    let modified =
        json!({"type": "MODIFIED", "object": secret("keys", "11", &[("API_KEY", "sk-two"), ("SHARED", "s")])});
    answer_watch(&mut api, &[modified]).await;
    let (new_id, _) = env_with(&d, "uses", "API_KEY=sk-two").await;
    assert_ne!(new_id, uses_id);
    assert_eq!(env_of(&d, "plain").await.unwrap().0, plain_id, "a workspace that does not use the Secret is untouched");

    // It is deleted: the running container is kept, and nothing new may start.
    answer_watch(&mut api, &[json!({"type": "DELETED", "object": secret("keys", "12", &[])})]).await;
    let r = report_where(&mut reports, "default/uses", "held after the delete", |r| {
        secrets_ready(r).is_some_and(|(s, m)| s == ConditionStatus::False && m.contains("default/keys not found"))
    })
    .await;
    assert_ne!(r.status.unwrap().phase, Phase::Pending, "still running on its old values");
    assert_eq!(env_of(&d, "uses").await.unwrap().0, new_id, "a running container is kept");
    // Removed out of band while its Secret is gone: it is not recreated without it.
    let force = bollard::query_parameters::RemoveContainerOptionsBuilder::new().force(true).build();
    d.docker.remove_container(&new_id, Some(force)).await.unwrap();
    let r = report_where(&mut reports, "default/uses", "the removal seen", |r| {
        r.status.as_ref().is_some_and(|s| s.phase == Phase::Pending)
    })
    .await;
    assert!(secrets_ready(&r).unwrap().1.contains("not found"));
    assert!(env_of(&d, "uses").await.is_none());

    // The Secret comes back: the workspace starts again with it.
    answer_watch(&mut api, &[json!({"type": "ADDED", "object": secret("keys", "13", &[("API_KEY", "sk-three")])})])
        .await;
    env_with(&d, "uses", "API_KEY=sk-three").await;
}
