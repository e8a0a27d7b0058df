//! The core/v1 kinds of the local Kubernetes API (Pods, Secrets, PVCs, Services,
//! Namespaces, Nodes) driven by the real kubectl and by raw requests, over a real
//! SQLite store. No Docker and no node: this checks the API server's part (storage,
//! validation, defaults, patches, deletion, garbage collection, PVC protection,
//! namespaces, watches, tables), not the node that runs Pods (tests/kube_node.rs).

mod support;

use std::time::Duration;

use reqwest::Method;
use serde_json::{Value, json};
use support::kubeapi::*;

async fn server() -> (tempfile::TempDir, Server) {
    let state = tempfile::tempdir().unwrap();
    let store = sqlite_store(state.path()).await;
    let server = Server::start(store, state.path()).await;
    (state, server)
}

/// Polls `f` every 50 ms until it holds; panics naming `what` after `deadline`.
async fn eventually<F: AsyncFnMut() -> bool>(what: &str, deadline: Duration, mut f: F) {
    let t0 = std::time::Instant::now();
    while t0.elapsed() < deadline {
        if f().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("timed out waiting for {what}");
}

const PODS: &str = "/api/v1/namespaces/default/pods";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_applies_lists_and_patches_the_core_kinds() {
    let (state, server) = server().await;
    let manifest = write(
        state.path(),
        "app.yaml",
        r#"apiVersion: v1
kind: Secret
metadata: {name: token}
stringData: {token: hunter2}
---
apiVersion: v1
kind: PersistentVolumeClaim
metadata: {name: data}
spec:
  accessModes: [ReadWriteOnce]
  resources: {requests: {storage: 1Gi}}
---
apiVersion: v1
kind: Pod
metadata: {name: agent, labels: {app: agent}}
spec:
  containers:
  - name: agent
    image: molecule-agent:v1
    env: [{name: A, value: "1"}, {name: B, value: "2"}]
    resources: {limits: {cpu: 500m, memory: 256Mi}}
  - {name: sidecar, image: molecule-agent:v1}
---
apiVersion: v1
kind: Service
metadata: {name: registry}
spec:
  selector: {app: agent}
  ports: [{port: 8080}]
"#,
    );
    let out = server.ok(&["apply", "-f", &manifest]).await;
    for created in
        ["secret/token created", "persistentvolumeclaim/data created", "pod/agent created", "service/registry created"]
    {
        assert!(out.contains(created), "{out}");
    }

    // What a real API server stores: stringData folded into data, defaults, status.
    let secret: Value = serde_json::from_str(&server.ok(&["get", "secret", "token", "-o", "json"]).await).unwrap();
    assert_eq!(secret["data"]["token"], "aHVudGVyMg==");
    assert_eq!(secret.get("stringData"), None);
    assert_eq!(secret["type"], "Opaque");
    let pod: Value = serde_json::from_str(&server.ok(&["get", "pod", "agent", "-o", "json"]).await).unwrap();
    assert_eq!(pod["spec"]["restartPolicy"], "Always");
    assert_eq!(pod["spec"]["containers"][0]["imagePullPolicy"], "IfNotPresent");
    assert_eq!(pod["spec"]["containers"][0]["resources"]["requests"], json!({"cpu": "500m", "memory": "256Mi"}));
    assert_eq!(pod["status"], json!({"phase": "Pending", "qosClass": "Burstable"}));
    let pvc: Value = serde_json::from_str(&server.ok(&["get", "pvc", "data", "-o", "json"]).await).unwrap();
    assert_eq!(pvc["metadata"]["finalizers"], json!(["kubernetes.io/pvc-protection"]));

    // Tables read like a cluster's.
    let pods = server.ok(&["get", "pods"]).await;
    assert!(pods.contains("READY") && pods.contains("0/2") && pods.contains("Pending"), "{pods}");
    let secrets = server.ok(&["get", "secrets"]).await;
    assert!(secrets.contains("token") && secrets.contains("Opaque") && secrets.contains('1'), "{secrets}");
    let claims = server.ok(&["get", "pvc"]).await;
    assert!(claims.contains("data") && claims.contains("Pending"), "{claims}");
    let services = server.ok(&["get", "svc"]).await;
    assert!(services.contains("10.96.0.2") && services.contains("8080/TCP"), "{services}");
    let namespaces = server.ok(&["get", "namespaces"]).await;
    assert!(namespaces.contains("default") && namespaces.contains("Active"), "{namespaces}");

    // A client-side apply of a changed image is a strategic merge patch: the
    // containers merge by name, so the other fields and containers stay.
    let changed = std::fs::read_to_string(&manifest)
        .unwrap()
        .replace("image: molecule-agent:v1\n    env", "image: molecule-agent:v2\n    env");
    std::fs::write(&manifest, changed).unwrap();
    let out = server.ok(&["apply", "-f", &manifest]).await;
    assert!(out.contains("pod/agent configured"), "{out}");
    let pod: Value = serde_json::from_str(&server.ok(&["get", "pod", "agent", "-o", "json"]).await).unwrap();
    let containers = &pod["spec"]["containers"];
    assert_eq!(
        (containers[0]["image"].as_str(), containers[1]["image"].as_str()),
        (Some("molecule-agent:v2"), Some("molecule-agent:v1"))
    );
    assert_eq!(containers[0]["env"].as_array().map(Vec::len), Some(2));
    assert_eq!(pod["metadata"]["generation"], 2);

    // A Pod's spec is otherwise immutable, as in a cluster.
    let (ok, _, err) = server.kubectl(&["patch", "pod", "agent", "-p", r#"{"spec":{"restartPolicy":"Never"}}"#]).await;
    assert!(!ok && err.contains("pod updates may not change fields"), "{err}");
    // Unknown fields and values that do not decode are 422 naming the field.
    let typo = write(
        state.path(),
        "typo.yaml",
        "apiVersion: v1\nkind: Pod\nmetadata: {name: typo}\nspec:\n  containers: [{name: c, image: x, imagePulPolicy: Never}]\n",
    );
    let (ok, _, err) = server.kubectl(&["apply", "-f", &typo]).await;
    assert!(!ok && err.contains("imagePulPolicy"), "{err}");
    let (code, status) = server
        .request(Method::POST, PODS, "application/json", r#"{"apiVersion":"v1","kind":"Pod","metadata":{"name":"p"},"spec":{"containers":[{"name":"c","image":"x","ports":[{"containerPort":"http"}]}]}}"#)
        .await;
    assert_eq!(code, 422, "{status}");
    assert_eq!(status["details"]["causes"][0]["field"], "spec.containers[0].ports[0].containerPort");

    // Namespaces: kubectl create (a protobuf body), creation in a missing one is 404.
    let out = server.ok(&["create", "namespace", "team-a"]).await;
    assert!(out.contains("namespace/team-a created"), "{out}");
    server.ok(&["-n", "team-a", "create", "secret", "generic", "s", "--from-literal=k=v"]).await;
    let (ok, _, err) =
        server.kubectl(&["-n", "nowhere", "create", "secret", "generic", "s", "--from-literal=k=v"]).await;
    assert!(!ok && err.contains("namespaces \"nowhere\" not found"), "{err}");
    let (ok, _, err) = server.kubectl(&["delete", "namespace", "default"]).await;
    assert!(!ok && err.contains("may not be deleted"), "{err}");
    // Deleting a namespace deletes what is in it, then the namespace.
    server.ok(&["delete", "namespace", "team-a", "--wait=true", "--timeout=30s"]).await;
    let (ok, _, _) = server.kubectl(&["get", "namespace", "team-a"]).await;
    assert!(!ok, "the namespace is gone");
    server.stop().await;
}

fn owned_by(kind: &str, api_version: &str, name: &str, uid: &str) -> Value {
    json!([{"apiVersion": api_version, "kind": kind, "name": name, "uid": uid, "controller": true, "blockOwnerDeletion": true}])
}

async fn create(server: &Server, path: &str, object: Value) -> Value {
    let (code, body) = server.request(Method::POST, path, "application/json", &object.to_string()).await;
    assert_eq!(code, 201, "POST {path}: {body}");
    body
}

async fn exists(server: &Server, path: &str) -> bool {
    server.get_json(path).await.0 == 200
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_an_owner_collects_its_dependents_as_the_garbage_collector_would() {
    let (state, server) = server().await;
    let ws = write(
        state.path(),
        "ws.yaml",
        "apiVersion: molecule.ai/v1alpha1\nkind: Workspace\nmetadata: {name: owner}\nspec: {tier: 1}\n",
    );
    server.ok(&["apply", "-f", &ws]).await;
    let owner: Value = serde_json::from_str(&server.ok(&["get", "ws", "owner", "-o", "json"]).await).unwrap();
    let refs = owned_by("Workspace", "molecule.ai/v1alpha1", "owner", owner["metadata"]["uid"].as_str().unwrap());
    create(
        &server,
        PODS,
        json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "ws-pod", "ownerReferences": refs},
        "spec": {"containers": [{"name": "c", "image": "x:1"}]}}),
    )
    .await;
    create(
        &server,
        "/api/v1/namespaces/default/secrets",
        json!({"apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": "ws-token", "ownerReferences": refs}, "stringData": {"token": "t"}}),
    )
    .await;
    create(
        &server,
        "/api/v1/namespaces/default/persistentvolumeclaims",
        json!({"apiVersion": "v1", "kind": "PersistentVolumeClaim",
        "metadata": {"name": "ws-configs", "ownerReferences": refs},
        "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}}}),
    )
    .await;

    // Background (kubectl's default): the owner goes at once, its dependents after.
    server.ok(&["delete", "ws", "owner"]).await;
    for dependent in ["pods/ws-pod", "secrets/ws-token", "persistentvolumeclaims/ws-configs"] {
        let path = format!("/api/v1/namespaces/default/{dependent}");
        eventually(&format!("{dependent} collected"), Duration::from_secs(10), async || !exists(&server, &path).await)
            .await;
    }

    // Orphan: the dependents stay, without their reference to the owner.
    let owner = create(
        &server,
        "/api/v1/namespaces/default/secrets",
        json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "owner"}}),
    )
    .await;
    let refs = owned_by("Secret", "v1", "owner", owner["metadata"]["uid"].as_str().unwrap());
    for name in ["kept", "going"] {
        create(
            &server,
            "/api/v1/namespaces/default/secrets",
            json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name, "ownerReferences": refs}}),
        )
        .await;
    }
    server.ok(&["delete", "secret", "owner", "--cascade=orphan", "--wait=true", "--timeout=20s"]).await;
    let (code, kept) = server.get_json("/api/v1/namespaces/default/secrets/kept").await;
    assert_eq!(code, 200, "an orphaned dependent stays");
    assert_eq!(kept["metadata"].get("ownerReferences"), None, "{kept}");

    // Foreground: the owner stays until its blocking dependents are gone.
    let owner = create(
        &server,
        "/api/v1/namespaces/default/secrets",
        json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "owner2"}}),
    )
    .await;
    let refs = owned_by("Secret", "v1", "owner2", owner["metadata"]["uid"].as_str().unwrap());
    create(
        &server,
        "/api/v1/namespaces/default/secrets",
        json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "child", "ownerReferences": refs}}),
    )
    .await;
    server.ok(&["delete", "secret", "owner2", "--cascade=foreground", "--wait=true", "--timeout=20s"]).await;
    assert!(!exists(&server, "/api/v1/namespaces/default/secrets/child").await, "the dependent went first");
    assert!(!exists(&server, "/api/v1/namespaces/default/secrets/owner2").await);

    // A dependent whose owner never existed is collected too.
    create(&server, "/api/v1/namespaces/default/secrets", json!({"apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": "dangling", "ownerReferences": owned_by("Secret", "v1", "nobody", "00000000-0000-0000-0000-000000000000")}})).await;
    eventually("the dangling dependent collected", Duration::from_secs(10), async || {
        !exists(&server, "/api/v1/namespaces/default/secrets/dangling").await
    })
    .await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_in_use_waits_for_its_pod_and_a_bound_pod_for_its_node() {
    let (state, server) = server().await;
    let manifest = write(
        state.path(),
        "claim.yaml",
        "apiVersion: v1\nkind: PersistentVolumeClaim\nmetadata: {name: data}\nspec:\n  accessModes: [ReadWriteOnce]\n  resources: {requests: {storage: 1Gi}}\n---\n\
         apiVersion: v1\nkind: Pod\nmetadata: {name: user}\nspec:\n  nodeName: local\n  containers: [{name: c, image: x:1}]\n  volumes: [{name: d, persistentVolumeClaim: {claimName: data}}]\n",
    );
    server.ok(&["apply", "-f", &manifest]).await;
    server.ok(&["delete", "pvc", "data", "--wait=false"]).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (code, claim) = server.get_json("/api/v1/namespaces/default/persistentvolumeclaims/data").await;
    assert_eq!(code, 200, "a claim a running Pod uses stays");
    assert!(claim["metadata"]["deletionTimestamp"].is_string());
    assert!(server.ok(&["get", "pvc", "data"]).await.contains("Terminating"));

    // A Pod bound to a node is deleted gracefully: it waits for its node (none runs here).
    server.ok(&["delete", "pod", "user", "--wait=false"]).await;
    let (code, pod) = server.get_json(&format!("{PODS}/user")).await;
    assert_eq!(code, 200, "a bound Pod waits for its node to stop it");
    assert_eq!(pod["metadata"]["deletionGracePeriodSeconds"], 30);
    assert!(server.ok(&["get", "pods"]).await.contains("Terminating"));
    // Forced, as its node does once the containers are gone: then the claim goes too.
    server.ok(&["delete", "pod", "user", "--force", "--grace-period=0"]).await;
    eventually("the claim released", Duration::from_secs(10), async || {
        !exists(&server, "/api/v1/namespaces/default/persistentvolumeclaims/data").await
    })
    .await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pod_watches_resume_select_by_node_and_expire() {
    let state = tempfile::tempdir().unwrap();
    let store = sqlite_store(state.path()).await;
    let api = molecule::kubeapi::KubeApi::new(store, TOKEN).await.unwrap().with_history_limit(5);
    let server = Server::start_with(api, state.path()).await;
    let pod = |name: &str, node: &str| {
        let mut spec = json!({"containers": [{"name": "c", "image": "x:1"}]});
        if !node.is_empty() {
            spec["nodeName"] = json!(node);
        }
        json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name}, "spec": spec})
    };
    create(&server, PODS, pod("a", "local")).await;
    create(&server, PODS, pod("b", "")).await;
    let (_, list) = server.get_json(&format!("{PODS}?fieldSelector=spec.nodeName%3Dlocal")).await;
    let names: Vec<&str> =
        list["items"].as_array().unwrap().iter().map(|p| p["metadata"]["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["a"]);
    let (_, unscheduled) = server.get_json(&format!("{PODS}?fieldSelector=spec.nodeName%3D")).await;
    assert_eq!(unscheduled["items"][0]["metadata"]["name"], "b");
    let rv = list["metadata"]["resourceVersion"].as_str().unwrap().to_string();

    // A watch from the list's resourceVersion sees only what came after, selected.
    create(&server, PODS, pod("c", "local")).await;
    create(&server, PODS, pod("d", "")).await;
    let url = format!(
        "{}{PODS}?watch=true&resourceVersion={rv}&fieldSelector=spec.nodeName%3Dlocal&timeoutSeconds=1",
        server.url
    );
    let text = server.http().get(&url).bearer_auth(TOKEN).send().await.unwrap().text().await.unwrap();
    let events: Vec<Value> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(events.len(), 1, "{text}");
    assert_eq!(
        (events[0]["type"].as_str(), events[0]["object"]["metadata"]["name"].as_str()),
        (Some("ADDED"), Some("c"))
    );

    // Past the history, a resume is 410 Expired.
    for i in 0..6 {
        create(
            &server,
            "/api/v1/namespaces/default/secrets",
            json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": format!("s{i}")}}),
        )
        .await;
    }
    let text = server.http().get(&url).bearer_auth(TOKEN).send().await.unwrap().text().await.unwrap();
    let event: Value = serde_json::from_str(text.lines().next().unwrap()).unwrap();
    assert_eq!((event["type"].as_str(), event["object"]["code"].as_i64()), (Some("ERROR"), Some(410)), "{text}");
    server.stop().await;
}
