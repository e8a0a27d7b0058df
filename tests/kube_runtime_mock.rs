//! The Pod runtime's requests, checked against a mock apiserver (tower-test): what a
//! provision, a token write, a token read and a removal send, in which namespace, with
//! which body; and that each call is one deploy/'s RBAC grants. The objects' full
//! shapes are YAML fixtures (src/runtime/kubernetes/objects.rs); the runtime against
//! a real API and node is tests/kube_pods.rs.

mod support;

use base64::Engine;
use http::{Method, Request, Response, StatusCode};
use kube::Client;
use kube::client::Body;
use molecule::api::WorkspaceSpec;
use molecule::api::effective::{Defaults, resolve};
use molecule::model::container::{ContainerSpec, labels};
use molecule::runtime::Runtime;
use molecule::runtime::kubernetes::KubeRuntime;
use molecule::runtime::render::{AgentEnv, Identity, render};
use serde_json::json;
use support::mockapi::ApiServer;

const UID: &str = "0a1b2c3d-4e5f-6071-8293-a4b5c6d7e8f9";
const POD: &str = "ws-0a1b2c3d-4e5";

fn harness() -> (KubeRuntime, ApiServer) {
    let (service, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    (KubeRuntime::new(Client::new(service, "default"), "t1"), ApiServer(handle))
}

fn spec() -> ContainerSpec {
    let eff = resolve(&WorkspaceSpec::default(), &Defaults { network: "pod".into(), ..Defaults::default() }).unwrap();
    let agent = AgentEnv { registry_url: "http://registry:8080".into(), heartbeat_seconds: 30 };
    let mut cs = render(&eff, &Identity { instance: "t1", key: "team-a/dev", uid: UID }, &agent);
    cs.labels.insert(labels::INCARNATION.into(), "1".into());
    cs
}

fn list(items: serde_json::Value) -> serde_json::Value {
    json!({"apiVersion": "v1", "kind": "List", "metadata": {"resourceVersion": "1"}, "items": items})
}

fn not_found() -> serde_json::Value {
    json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound", "code": 404, "message": "not found"})
}

/// Answers the runtime's read of the Workspace `team-a/dev` (for the owner reference).
fn answer_workspace_dev(req: support::mockapi::Seen) {
    assert_eq!(req.path, "/apis/molecule.ai/v1alpha1/namespaces/team-a/workspaces/dev");
    req.respond(
        StatusCode::OK,
        json!({"apiVersion": "molecule.ai/v1alpha1", "kind": "Workspace",
               "metadata": {"name": "dev", "namespace": "team-a", "uid": "ws-object-uid"}, "spec": {}}),
    );
}

fn pod_object() -> serde_json::Value {
    json!({"apiVersion": "v1", "kind": "Pod", "metadata": {
        "name": POD, "namespace": "team-a", "uid": "pod-1",
        "labels": {labels::INSTANCE: "t1", labels::WORKSPACE: "dev", labels::UID: UID}}})
}

#[tokio::test]
async fn a_provision_makes_a_claim_and_a_pod_owned_by_the_workspace() {
    let (rt, mut api) = harness();
    let cs = spec();
    let volume = tokio::spawn({
        let labels = cs.labels.clone();
        async move { (rt.ensure_volume(&format!("{POD}-configs"), &labels).await, rt) }
    });
    let req = api.next().await; // is there such a claim already?
    assert_eq!((req.method.clone(), req.path.as_str()), (Method::GET, "/api/v1/persistentvolumeclaims"));
    assert!(req.query.contains("fieldSelector=metadata.name%3Dws-0a1b2c3d-4e5-configs"), "{}", req.query);
    assert!(req.query.contains("labelSelector=ai.molecule.instance%3Dt1"), "{}", req.query);
    req.respond(StatusCode::OK, list(json!([])));
    let req = api.next().await; // the Workspace, to own the claim: none here
    assert_eq!(req.path, "/apis/molecule.ai/v1alpha1/namespaces/team-a/workspaces/dev");
    req.respond(StatusCode::NOT_FOUND, not_found());
    let req = api.next().await;
    assert_eq!(
        (req.method.clone(), req.path.as_str()),
        (Method::POST, "/api/v1/namespaces/team-a/persistentvolumeclaims")
    );
    assert_eq!(req.body["metadata"]["name"], "ws-0a1b2c3d-4e5-configs");
    assert_eq!(req.body["metadata"]["labels"][labels::WORKSPACE], "dev", "label values hold no '/'");
    assert!(req.body["metadata"]["ownerReferences"].is_null(), "no Workspace object, no owner");
    let body = req.body.clone();
    req.respond(StatusCode::CREATED, body);
    let (done, rt) = volume.await.unwrap();
    done.unwrap();

    let create = tokio::spawn(async move { (rt.create(&spec()).await, rt) });
    let req = api.next().await;
    answer_workspace_dev(req);
    let req = api.next().await;
    assert_eq!((req.method.clone(), req.path.as_str()), (Method::POST, "/api/v1/namespaces/team-a/pods"));
    let owner = &req.body["metadata"]["ownerReferences"][0];
    assert_eq!(
        (owner["kind"].as_str(), owner["uid"].as_str(), owner["controller"].as_bool()),
        (Some("Workspace"), Some("ws-object-uid"), Some(true))
    );
    assert_eq!(req.body["metadata"]["annotations"]["molecule.ai/workspace"], "team-a/dev");
    assert_eq!(req.body["spec"]["automountServiceAccountToken"], false);
    assert!(req.body["spec"]["hostNetwork"].is_null(), "the cluster's network, not the node's");
    let mut created = req.body.clone();
    created["metadata"]["uid"] = json!("pod-1");
    req.respond(StatusCode::CREATED, created);
    let (id, _rt) = create.await.unwrap();
    assert_eq!(id.unwrap(), "pod-1", "a container's id is its Pod's uid");
}

#[tokio::test]
async fn the_token_is_the_pods_secret_written_by_server_side_apply_and_read_back() {
    let (rt, mut api) = harness();
    let write = tokio::spawn(async move {
        let r = rt.write_file("pod-1", "/configs", ".auth_token", b"tok", 0o600).await;
        (r, rt)
    });
    let req = api.next().await; // which Pod is pod-1?
    assert_eq!((req.method.clone(), req.path.as_str()), (Method::GET, "/api/v1/pods"));
    req.respond(StatusCode::OK, list(json!([pod_object()])));
    let req = api.next().await;
    assert_eq!(
        (req.method.clone(), req.path.as_str()),
        (Method::PATCH, "/api/v1/namespaces/team-a/secrets/ws-0a1b2c3d-4e5-token")
    );
    assert_eq!(req.content_type, "application/apply-patch+yaml");
    assert!(req.query.contains("fieldManager=molecule-operator") && req.query.contains("force=true"), "{}", req.query);
    let encoded = base64::engine::general_purpose::STANDARD.encode("tok");
    assert_eq!(req.body["data"]["token"], encoded.as_str());
    assert_eq!(req.body["metadata"]["labels"][labels::UID], UID, "labelled, so its changes are watched");
    let body = req.body.clone();
    req.respond(StatusCode::OK, body);
    let (written, rt) = write.await.unwrap();
    written.unwrap();

    let read = tokio::spawn(async move { rt.read_file("pod-1", "/configs/.auth_token").await });
    api.next().await.respond(StatusCode::OK, list(json!([pod_object()])));
    let req = api.next().await;
    assert_eq!(
        (req.method.clone(), req.path.as_str()),
        (Method::GET, "/api/v1/namespaces/team-a/secrets/ws-0a1b2c3d-4e5-token")
    );
    req.respond(StatusCode::NOT_FOUND, not_found());
    assert_eq!(read.await.unwrap().unwrap(), None, "a deleted Secret reads as a missing token file");
}

#[tokio::test]
async fn a_removal_deletes_the_pod_at_once_and_waits_until_its_name_is_free() {
    let (rt, mut api) = harness();
    let remove = tokio::spawn(async move { rt.remove("pod-1").await });
    api.next().await.respond(StatusCode::OK, list(json!([pod_object()])));
    let req = api.next().await;
    assert_eq!(
        (req.method.clone(), req.path.as_str()),
        (Method::DELETE, &*format!("/api/v1/namespaces/team-a/pods/{POD}"))
    );
    assert_eq!(req.body["gracePeriodSeconds"], 0);
    assert_eq!(req.body["propagationPolicy"], "Background");
    req.respond(StatusCode::OK, pod_object());
    // Its token and files Secrets go with it (a next Pod of the name must not start on
    // a revoked token); one already gone is fine.
    for (secret, found) in [("token", true), ("files", false)] {
        let req = api.next().await;
        assert_eq!(
            (req.method.clone(), req.path.as_str()),
            (Method::DELETE, &*format!("/api/v1/namespaces/team-a/secrets/{POD}-{secret}"))
        );
        match found {
            true => req.respond(StatusCode::OK, json!({"kind": "Status", "apiVersion": "v1", "status": "Success"})),
            false => req.respond(StatusCode::NOT_FOUND, not_found()),
        }
    }
    // Then it watches that one Pod (no polling) until the API server removes it.
    let req = api.next().await;
    assert_eq!((req.method.clone(), req.path.as_str()), (Method::GET, "/api/v1/namespaces/team-a/pods"));
    assert!(req.query.contains(&format!("fieldSelector=metadata.name%3D{POD}")), "{}", req.query);
    assert!(!req.is_watch(), "a list first: {}", req.query);
    req.respond(StatusCode::OK, list(json!([pod_object()]))); // still there
    let req = api.next().await;
    assert!(req.is_watch() && req.query.contains("resourceVersion=1"), "then a watch from the list: {}", req.query);
    assert!(!remove.is_finished(), "the removal waits while the Pod is there");
    let mut gone = pod_object();
    gone["metadata"]["resourceVersion"] = json!("2");
    let deleted = json!({"type": "DELETED", "object": gone});
    req.respond_raw(StatusCode::OK, format!("{deleted}\n").into_bytes());
    remove.await.unwrap().unwrap();
}

#[tokio::test]
async fn an_unreachable_api_server_is_unknown_never_empty() {
    let (rt, api) = harness();
    drop(api); // nothing answers
    let err = rt.list().await.unwrap_err();
    assert_eq!(err.metric_label(), "runtime_unavailable", "{err}");
    assert!(err.to_string().contains("Kubernetes API cannot be reached"), "{err}");
}

/// A Status the API server answers a refusal with.
fn refused(code: u16, reason: &str, message: &str, details: serde_json::Value) -> serde_json::Value {
    json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": reason, "code": code,
           "message": message, "details": details})
}

#[tokio::test]
async fn a_workspace_whose_namespace_does_not_exist_fails_naming_the_namespace() {
    let (rt, mut api) = harness();
    let cs = spec();
    let volume = tokio::spawn(async move { rt.ensure_volume(&format!("{POD}-configs"), &cs.labels).await });
    api.next().await.respond(StatusCode::OK, list(json!([]))); // no such claim
    api.next().await.respond(StatusCode::NOT_FOUND, not_found()); // no Workspace object
    let req = api.next().await;
    assert_eq!(req.path, "/api/v1/namespaces/team-a/persistentvolumeclaims");
    req.respond(
        StatusCode::NOT_FOUND,
        refused(404, "NotFound", "namespaces \"team-a\" not found", json!({"name": "team-a", "kind": "namespaces"})),
    );
    let err = volume.await.unwrap().unwrap_err();
    let text = err.to_string();
    assert!(
        text.contains("namespace team-a does not exist") && text.contains("kubectl create namespace team-a"),
        "{text}"
    );
    assert!(!text.contains("Docker"), "{text}");
    assert_eq!(err.metric_label(), "kubernetes");
    api.quiet().await; // one refusal, no retry of its own: the queue's backoff retries
}

#[tokio::test]
async fn a_quota_the_namespace_refuses_fails_naming_the_quota() {
    let (rt, mut api) = harness();
    let create = tokio::spawn(async move { rt.create(&spec()).await });
    api.next().await.respond(StatusCode::NOT_FOUND, not_found()); // no Workspace object
    let req = api.next().await;
    assert_eq!((req.method.clone(), req.path.as_str()), (Method::POST, "/api/v1/namespaces/team-a/pods"));
    let message = format!(
        "pods \"{POD}\" is forbidden: exceeded quota: compute, requested: limits.memory=512Mi, used: \
         limits.memory=1Gi, limited: limits.memory=1Gi"
    );
    req.respond(StatusCode::FORBIDDEN, refused(403, "Forbidden", &message, json!({"name": POD, "kind": "pods"})));
    let text = create.await.unwrap().unwrap_err().to_string();
    assert!(text.contains(&format!("creating Pod team-a/{POD}")), "{text}");
    assert!(text.contains("ResourceQuota refuses it") && text.contains("exceeded quota: compute"), "{text}");
    api.quiet().await;
}

/// A Pod of workspace `dev` in team-a with `status`, mounting `claim`.
fn pod_with(uid: &str, claim: &str, status: serde_json::Value) -> serde_json::Value {
    let mut pod = pod_object();
    pod["metadata"]["uid"] = json!(uid);
    pod["spec"] = json!({"containers": [{"name": "agent", "image": "ghcr.io/x/missing:v1"}],
        "volumes": [{"name": "configs", "persistentVolumeClaim": {"claimName": claim}}]});
    pod["status"] = status;
    pod
}

fn claim(name: &str, phase: &str) -> serde_json::Value {
    json!({"apiVersion": "v1", "kind": "PersistentVolumeClaim",
           "metadata": {"name": name, "namespace": "team-a", "labels": {labels::INSTANCE: "t1"}},
           "spec": {}, "status": {"phase": phase}})
}

#[tokio::test]
async fn an_image_that_cannot_be_pulled_and_a_claim_that_never_binds_are_waiting_with_their_cause() {
    let (rt, mut api) = harness();
    let listing = tokio::spawn(async move { rt.list().await });
    let req = api.next().await;
    assert_eq!(req.path, "/api/v1/pods");
    req.respond(
        StatusCode::OK,
        list(json!([
            pod_with(
                "pull",
                "bound-configs",
                json!({"phase": "Pending", "containerStatuses": [{
                "name": "agent", "image": "ghcr.io/x/missing:v1", "imageID": "", "ready": false, "restartCount": 0,
                "state": {"waiting": {"reason": "ImagePullBackOff",
                          "message": "Back-off pulling image \"ghcr.io/x/missing:v1\""}}}]})
            ),
            pod_with(
                "unbound",
                "pending-configs",
                json!({"phase": "Pending", "conditions": [{
                "type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                "message": "0/3 nodes are available: pod has unbound immediate PersistentVolumeClaims."}]})
            ),
        ])),
    );
    let req = api.next().await;
    assert_eq!(req.path, "/api/v1/persistentvolumeclaims");
    req.respond(StatusCode::OK, list(json!([claim("bound-configs", "Bound"), claim("pending-configs", "Pending")])));
    let seen = listing.await.unwrap().unwrap();
    let of = |id: &str| seen.iter().find(|c| c.id == id).unwrap();
    assert_eq!(of("pull").state, molecule::model::container::ContainerState::Waiting);
    assert_eq!(of("pull").detail.as_deref(), Some("ImagePullBackOff: Back-off pulling image \"ghcr.io/x/missing:v1\""));
    assert_eq!(of("unbound").state, molecule::model::container::ContainerState::Waiting);
    let why = of("unbound").detail.clone().unwrap();
    assert!(why.starts_with("its volume claim pending-configs is not bound"), "{why}");
    assert!(why.contains("unbound immediate PersistentVolumeClaims"), "{why}");
}

/// A warm-pool member of team-a/agents, rendered from a plain template.
fn member_spec() -> ContainerSpec {
    let eff = resolve(&WorkspaceSpec::default(), &Defaults { network: "pod".into(), ..Defaults::default() }).unwrap();
    let agent = AgentEnv { registry_url: "http://registry:8080".into(), heartbeat_seconds: 30 };
    molecule::runtime::render::render_member(&eff, "t1", "team-a/agents", UID, &agent)
}

#[tokio::test]
async fn a_member_starts_on_an_empty_token_secret_and_a_claim_relabels_it_and_writes_the_identity_beside_the_token() {
    let (rt, mut api) = harness();
    // No Workspace to own a member: no lookup; the Pod is in its pool's namespace.
    let create = tokio::spawn(async move { (rt.create(&member_spec()).await, rt) });
    let req = api.next().await;
    assert_eq!((req.method.clone(), req.path.as_str()), (Method::POST, "/api/v1/namespaces/team-a/pods"));
    assert_eq!(req.body["metadata"]["labels"][labels::POOL], "agents", "label values hold no '/'");
    assert!(req.body["metadata"]["labels"][labels::WORKSPACE].is_null());
    assert!(req.body["metadata"]["ownerReferences"].is_null());
    let mut created = req.body.clone();
    created["metadata"]["uid"] = json!("pod-1");
    req.respond(StatusCode::CREATED, created);
    let req = api.next().await; // its token Secret, empty: the Pod starts on it
    assert_eq!(
        (req.method.clone(), req.path.as_str()),
        (Method::PATCH, "/api/v1/namespaces/team-a/secrets/ws-0a1b2c3d-4e5-token")
    );
    assert_eq!(req.body["data"], json!({}), "a member holds no token");
    let body = req.body.clone();
    req.respond(StatusCode::OK, body);
    let (id, rt) = create.await.unwrap();
    assert_eq!(id.unwrap(), "pod-1");

    // The claim: the Pod and its claim relabelled (merge patch), owned by the Workspace.
    let member_pod = json!({"apiVersion": "v1", "kind": "Pod", "metadata": {
        "name": POD, "namespace": "team-a", "uid": "pod-1",
        "labels": {labels::INSTANCE: "t1", labels::POOL: "agents", labels::UID: UID}},
        "spec": {"containers": [], "volumes": [{"name": "configs",
            "persistentVolumeClaim": {"claimName": "ws-0a1b2c3d-4e5-configs"}}]}});
    let adopt = tokio::spawn(async move {
        let mut cs = spec();
        cs.labels.insert(labels::PROVISIONED_AT.into(), "2026-12-07T10:00:00.000Z".into());
        (rt.adopt("pod-1", &cs).await, rt)
    });
    api.next().await.respond(StatusCode::OK, list(json!([member_pod.clone()])));
    let req = api.next().await;
    answer_workspace_dev(req);
    let req = api.next().await;
    assert_eq!(
        (req.method.clone(), req.path.as_str()),
        (Method::PATCH, "/api/v1/namespaces/team-a/pods/ws-0a1b2c3d-4e5")
    );
    assert_eq!(req.content_type, "application/merge-patch+json");
    assert_eq!(req.body["metadata"]["labels"][labels::WORKSPACE], "dev");
    assert!(req.body["metadata"]["labels"][labels::POOL].is_null(), "the pool label is left as it is");
    assert_eq!(req.body["metadata"]["annotations"]["molecule.ai/workspace"], "team-a/dev");
    assert_eq!(req.body["metadata"]["annotations"]["molecule.ai/provisioned-at"], "2026-12-07T10:00:00.000Z");
    assert_eq!(req.body["metadata"]["ownerReferences"][0]["uid"], "ws-object-uid");
    req.respond(StatusCode::OK, member_pod.clone());
    let req = api.next().await;
    assert_eq!(
        (req.method.clone(), req.path.as_str()),
        (Method::PATCH, "/api/v1/namespaces/team-a/persistentvolumeclaims/ws-0a1b2c3d-4e5-configs")
    );
    assert_eq!(req.body["metadata"]["labels"][labels::WORKSPACE], "dev");
    assert_eq!(req.body["metadata"]["ownerReferences"][0]["kind"], "Workspace");
    req.respond(
        StatusCode::OK,
        json!({"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": "ws-0a1b2c3d-4e5-configs"}}),
    );
    let (adopted, rt) = adopt.await.unwrap();
    adopted.unwrap();

    // The identity: beside the token, applied by a field manager of its own.
    let write =
        tokio::spawn(
            async move { rt.write_file("pod-1", "/configs", ".identity", b"workspace_id=x\nend\n", 0o600).await },
        );
    api.next().await.respond(StatusCode::OK, list(json!([pod_object()])));
    let req = api.next().await;
    assert_eq!(
        (req.method.clone(), req.path.as_str()),
        (Method::PATCH, "/api/v1/namespaces/team-a/secrets/ws-0a1b2c3d-4e5-token")
    );
    assert!(req.query.contains("fieldManager=molecule-operator-claim"), "{}", req.query);
    let encoded = base64::engine::general_purpose::STANDARD.encode("workspace_id=x\nend\n");
    assert_eq!(req.body["data"], json!({"identity": encoded}), "the identity alone: the token is another manager's");
    let body = req.body.clone();
    req.respond(StatusCode::OK, body);
    write.await.unwrap().unwrap();
}

/// The re-read an event asks for (`list_ids`) is answered from what the runtime's own
/// watch has seen, an informer's cache: no listing of every Pod and claim per event,
/// which at N Pods made each event cost O(N) at the API server. Before the watch has
/// listed, it asks the API server.
#[tokio::test]
async fn an_events_re_read_is_answered_from_the_watch_not_a_listing() {
    use futures::StreamExt;
    use molecule::model::container::ContainerState;
    let (rt, mut api) = harness();
    let rt = std::sync::Arc::new(rt);
    let running = json!({"phase": "Running", "containerStatuses": [{"name": "agent", "image": "agent:v1",
        "imageID": "", "ready": true, "restartCount": 0, "state": {"running": {"startedAt": "2026-12-01T00:00:00Z"}}}]});

    // Before the watch has listed: a listing.
    let early = tokio::spawn({
        let rt = rt.clone();
        async move { rt.list_ids(&["p1".to_string()]).await }
    });
    let req = api.next().await;
    assert_eq!((req.is_watch(), req.path.as_str()), (false, "/api/v1/pods"));
    req.respond(StatusCode::OK, list(json!([pod_with("p1", "bound-configs", running.clone())])));
    api.next().await.respond(StatusCode::OK, list(json!([claim("bound-configs", "Bound")])));
    assert_eq!(early.await.unwrap().unwrap()[0].state, ContainerState::Running);

    // The watch lists each kind once, then watches.
    let (seen_tx, mut seen) = tokio::sync::mpsc::unbounded_channel();
    let mut watch = rt.watch();
    tokio::spawn(async move {
        while let Some(item) = watch.next().await {
            let _ = seen_tx.send(item);
        }
    });
    let (mut pod_watch, mut held) = (None, Vec::new());
    while pod_watch.is_none() || held.len() < 2 {
        let req = api.next().await;
        match (req.is_watch(), req.path.as_str()) {
            (false, "/api/v1/pods") => {
                req.respond(StatusCode::OK, list(json!([pod_with("p1", "bound-configs", running.clone())])))
            }
            (false, "/api/v1/persistentvolumeclaims") => {
                req.respond(StatusCode::OK, list(json!([claim("bound-configs", "Bound")])))
            }
            (false, "/api/v1/secrets") => req.respond(StatusCode::OK, list(json!([]))),
            (true, "/api/v1/pods") => pod_watch = Some(req),
            (true, _) => held.push(req), // open, quiet
            (_, path) => panic!("unexpected request {path}"),
        }
    }
    // Now an event's re-read asks nothing of the API server.
    let found = rt.list_ids(&["p1".to_string(), "gone".to_string()]).await.unwrap();
    assert_eq!(found.iter().map(|c| (c.id.as_str(), c.state)).collect::<Vec<_>>(), [("p1", ContainerState::Running)]);
    api.quiet().await;

    // The Pod is deleted: once its event is out, the re-read shows it, still without a listing.
    let mut deleting = pod_with("p1", "bound-configs", running);
    deleting["metadata"]["resourceVersion"] = json!("2");
    deleting["metadata"]["deletionTimestamp"] = json!("2026-12-01T00:01:00Z");
    let event = json!({"type": "MODIFIED", "object": deleting});
    while seen.try_recv().is_ok() {} // the first listing's news, out before its watch began
    pod_watch.unwrap().respond_raw(StatusCode::OK, format!("{event}\n").into_bytes());
    loop {
        let item = tokio::time::timeout(std::time::Duration::from_secs(10), seen.recv()).await.unwrap().unwrap();
        if matches!(&item, molecule::runtime::Watched::Event(e) if e.container_id == "p1") {
            break;
        }
    }
    let found = rt.list_ids(&["p1".to_string()]).await.unwrap();
    assert_eq!(found[0].state, ContainerState::Dead);
    assert_eq!(found[0].detail.as_deref(), Some("the Pod is being deleted"));
    drop(held);
}
