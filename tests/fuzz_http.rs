//! Hostile requests (proptest) against the two HTTP servers, each over a real SQLite
//! store in a temp dir: the local Kubernetes API and the registry. Whatever the
//! method, path, headers and body, a server answers with a 2xx/4xx (or 405/413) and
//! a body a client can read; it never panics, never answers 500, and keeps serving.
//! The Kubernetes API is fuzzed with no token, a wrong one, a valid registry (agent)
//! token, which it must refuse like any other, and the admin token, against objects
//! of every kind that exist (so patches and deletes reach real objects).

use std::sync::Arc;

use axum::body::Body;
use http::{Method, Request, StatusCode};
use proptest::prelude::*;
use tower::ServiceExt;

const TOKEN: &str = "fuzz-admin-token-0123456789abcdefghijklmnopq";

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap()
}

/// Arbitrary JSON, nested up to a few levels, with the field names the servers know.
fn json_value() -> impl Strategy<Value = serde_json::Value> {
    use serde_json::{Value, json};
    let key = prop_oneof![
        Just("apiVersion".to_string()),
        Just("kind".to_string()),
        Just("metadata".to_string()),
        Just("name".to_string()),
        Just("namespace".to_string()),
        Just("spec".to_string()),
        Just("status".to_string()),
        Just("tier".to_string()),
        Just("env".to_string()),
        Just("envFrom".to_string()),
        Just("finalizers".to_string()),
        Just("resourceVersion".to_string()),
        Just("workspace_id".to_string()),
        Just("op".to_string()),
        Just("path".to_string()),
        Just("value".to_string()),
        "[a-zA-Z$/~]{0,12}",
    ];
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        any::<f64>().prop_map(|f| json!(f)),
        Just(json!("molecule.ai/v1alpha1")),
        Just(json!("Workspace")),
        Just(json!("Team")),
        Just(json!("0a1b2c3d-4e5f-6071-8293-a4b5c6d7e8f9")),
        "\\PC{0,30}".prop_map(Value::String),
    ];
    leaf.prop_recursive(4, 48, 6, move |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            proptest::collection::vec((key.clone(), inner), 0..6)
                .prop_map(|kv| Value::Object(kv.into_iter().collect())),
        ]
    })
}

fn body() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        json_value().prop_map(|v| serde_json::to_vec(&v).unwrap()),
        proptest::collection::vec(any::<u8>(), 0..200),
        Just(Vec::new()),
        Just(b"{\"workspace_id\": \"0a1b2c3d-4e5f-6071-8293-a4b5c6d7e8f9\"}".to_vec()),
        // A document nested past any sensible depth.
        (1usize..20_000).prop_map(|n| format!("{}{}", "[".repeat(n), "]".repeat(n)).into_bytes()),
    ]
}

fn method() -> impl Strategy<Value = Method> {
    prop_oneof![
        Just(Method::GET),
        Just(Method::POST),
        Just(Method::PUT),
        Just(Method::PATCH),
        Just(Method::DELETE),
        Just(Method::HEAD),
        Just(Method::OPTIONS),
    ]
}

fn random_kube_path() -> impl Strategy<Value = String> {
    let segment = prop_oneof![
        Just("apis".to_string()),
        Just("api".to_string()),
        Just("v1".to_string()),
        Just("molecule.ai".to_string()),
        Just("v1alpha1".to_string()),
        Just("namespaces".to_string()),
        Just("default".to_string()),
        Just("workspaces".to_string()),
        Just("teams".to_string()),
        Just("status".to_string()),
        Just("events".to_string()),
        Just("leases".to_string()),
        Just("pods".to_string()),
        Just("secrets".to_string()),
        Just("persistentvolumeclaims".to_string()),
        Just("services".to_string()),
        Just("nodes".to_string()),
        Just("log".to_string()),
        Just("binding".to_string()),
        Just("fuzz".to_string()),
        Just("coordination.k8s.io".to_string()),
        Just("openapi".to_string()),
        Just("v3".to_string()),
        "[a-z0-9.%-]{0,10}",
    ];
    let query = prop_oneof![
        Just(String::new()),
        Just("?watch=true&timeoutSeconds=0".to_string()),
        Just("?watch=1&resourceVersion=1".to_string()),
        Just("?fieldManager=x&force=true".to_string()),
        Just("?labelSelector=%ZZ&limit=-1".to_string()),
        "\\?[ -~]{0,30}",
    ];
    (proptest::collection::vec(segment, 0..9), query).prop_map(|(s, q)| format!("/{}{q}", s.join("/")))
}

/// The seeded objects' own paths (and subresources), so patches and deletes reach them.
fn object_path() -> impl Strategy<Value = String> {
    let object = prop_oneof![
        Just("/apis/molecule.ai/v1alpha1/namespaces/default/workspaces/fuzz"),
        Just("/apis/molecule.ai/v1alpha1/namespaces/default/teams/fuzz"),
        Just("/api/v1/namespaces/default/secrets/fuzz"),
        Just("/api/v1/namespaces/default/persistentvolumeclaims/fuzz"),
        Just("/api/v1/namespaces/default/pods/fuzz"),
        Just("/api/v1/namespaces/default/services/fuzz"),
        Just("/api/v1/nodes/fuzz"),
        Just("/api/v1/namespaces/default"),
        Just("/apis/coordination.k8s.io/v1/namespaces/default/leases/fuzz"),
        Just("/api/v1/namespaces/default/events/fuzz"),
    ];
    let sub = prop_oneof![Just(""), Just("/status"), Just("/log"), Just("/binding"), Just("?dryRun=All")];
    (object, sub).prop_map(|(o, s)| format!("{o}{s}"))
}

fn kube_path() -> impl Strategy<Value = String> {
    prop_oneof![random_kube_path(), object_path()]
}

fn content_type() -> impl Strategy<Value = &'static str> {
    prop_oneof![
        Just("application/json"),
        Just("application/merge-patch+json"),
        Just("application/json-patch+json"),
        Just("application/strategic-merge-patch+json"),
        Just("application/apply-patch+yaml"),
        Just("application/vnd.kubernetes.protobuf"),
        Just("text/plain"),
        Just(""),
    ]
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Bearer {
    None,
    Wrong,
    /// A live registry token: good for the registry, nothing here.
    Agent,
    Admin,
}

fn bearer() -> impl Strategy<Value = Bearer> {
    prop_oneof![1 => Just(Bearer::None), 1 => Just(Bearer::Wrong), 1 => Just(Bearer::Agent), 3 => Just(Bearer::Admin)]
}

/// An object named `fuzz` of every kind, so fuzzed patches and deletes reach real ones.
async fn seed(router: &axum::Router) {
    let objects = [
        (
            "/apis/molecule.ai/v1alpha1/namespaces/default/workspaces",
            r#"{"apiVersion":"molecule.ai/v1alpha1","kind":"Workspace","metadata":{"name":"fuzz"},"spec":{}}"#,
        ),
        (
            "/apis/molecule.ai/v1alpha1/namespaces/default/teams",
            r#"{"apiVersion":"molecule.ai/v1alpha1","kind":"Team","metadata":{"name":"fuzz"},"spec":{}}"#,
        ),
        (
            "/api/v1/namespaces/default/secrets",
            r#"{"apiVersion":"v1","kind":"Secret","metadata":{"name":"fuzz"},"stringData":{"k":"v"}}"#,
        ),
        (
            "/api/v1/namespaces/default/persistentvolumeclaims",
            r#"{"apiVersion":"v1","kind":"PersistentVolumeClaim","metadata":{"name":"fuzz"},"spec":{"accessModes":["ReadWriteOnce"],"resources":{"requests":{"storage":"1Gi"}}}}"#,
        ),
        (
            "/api/v1/namespaces/default/pods",
            r#"{"apiVersion":"v1","kind":"Pod","metadata":{"name":"fuzz"},"spec":{"nodeName":"local","containers":[{"name":"c","image":"x:1"}],"volumes":[{"name":"d","persistentVolumeClaim":{"claimName":"fuzz"}}]}}"#,
        ),
        (
            "/api/v1/namespaces/default/services",
            r#"{"apiVersion":"v1","kind":"Service","metadata":{"name":"fuzz"},"spec":{"ports":[{"port":80}]}}"#,
        ),
        ("/api/v1/nodes", r#"{"apiVersion":"v1","kind":"Node","metadata":{"name":"fuzz"}}"#),
        (
            "/apis/coordination.k8s.io/v1/namespaces/default/leases",
            r#"{"apiVersion":"coordination.k8s.io/v1","kind":"Lease","metadata":{"name":"fuzz"}}"#,
        ),
        ("/api/v1/namespaces/default/events", r#"{"apiVersion":"v1","kind":"Event","metadata":{"name":"fuzz"}}"#),
    ];
    for (path, object) in objects {
        let req = Request::builder()
            .method(Method::POST)
            .uri(path)
            .header("authorization", format!("Bearer {TOKEN}"))
            .header("content-type", "application/json")
            .body(Body::from(object))
            .unwrap();
        let status = router.clone().oneshot(req).await.unwrap().status();
        assert_eq!(status, StatusCode::CREATED, "seeding {path}");
    }
}

/// A readable answer: not a server error, and (if any) a JSON body.
async fn check(response: axum::response::Response, what: &str) -> Result<(), TestCaseError> {
    let status = response.status();
    prop_assert!(!status.is_server_error() || status == StatusCode::SERVICE_UNAVAILABLE, "{what}: {status}");
    let is_json =
        response.headers().get(http::header::CONTENT_TYPE).is_some_and(|v| v.to_str().unwrap_or("").contains("json"));
    // Watches stream until their timeout; only read bodies that are not streams.
    if is_json && !what.contains("watch") {
        let bytes = axum::body::to_bytes(response.into_body(), 16 << 20).await.unwrap();
        prop_assert!(bytes.is_empty() || serde_json::from_slice::<serde_json::Value>(&bytes).is_ok(), "{what}");
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]

    #[test]
    fn the_local_kubernetes_api_answers_any_request_without_panicking(
        requests in proptest::collection::vec((method(), kube_path(), content_type(), body(), bearer()), 1..6)
    ) {
        let rt = runtime();
        rt.block_on(async {
            let dir = tempfile::tempdir().unwrap();
            let store = molecule::store::open(dir.path().join("s.db").to_str().unwrap()).await.unwrap();
            // A registry token that is valid (for the registry): the Kubernetes API must refuse it.
            let record = store.ensure_workspace("default/fuzz", chrono::Utc::now()).await.unwrap();
            let agent_token = store.issue_token(&record.uid, 1, chrono::Utc::now()).await.unwrap().plaintext;
            let api = Arc::new(molecule::kubeapi::KubeApi::new(store, TOKEN).await.unwrap());
            let router = molecule::kubeapi::router(api);
            seed(&router).await;
            for (m, path, ct, bytes, bearer) in requests {
                let what = format!("{m} {path} ({ct}, {} bytes, bearer {bearer:?})", bytes.len());
                let mut req = Request::builder().method(m.clone()).uri(&path);
                match bearer {
                    Bearer::None => {}
                    Bearer::Admin => req = req.header("authorization", format!("Bearer {TOKEN}")),
                    Bearer::Agent => req = req.header("authorization", format!("Bearer {agent_token}")),
                    Bearer::Wrong => req = req.header("authorization", "Bearer wrong-token"),
                }
                if !ct.is_empty() {
                    req = req.header("content-type", ct);
                }
                let Ok(req) = req.body(Body::from(bytes)) else { continue }; // not a valid URI
                let response = tokio::time::timeout(std::time::Duration::from_secs(10), router.clone().oneshot(req))
                    .await
                    .map_err(|_| TestCaseError::fail(format!("{what}: no answer in 10 s")))?
                    .unwrap();
                if bearer != Bearer::Admin {
                    prop_assert_eq!(response.status(), StatusCode::UNAUTHORIZED, "{}", what);
                }
                check(response, &what).await?;
            }
            Ok(())
        })?;
    }

    #[test]
    fn the_registry_answers_any_agent_request_with_a_client_error_or_ok(
        requests in proptest::collection::vec((prop_oneof![Just("/registry/register"), Just("/registry/heartbeat"), Just("/api/v1/workspaces"), Just("/api/v1/secrets?scope=global&name=A")], method(), body(), proptest::option::of("[ -~]{0,80}")), 1..6)
    ) {
        let rt = runtime();
        rt.block_on(async {
            let dir = tempfile::tempdir().unwrap();
            let store = molecule::store::open(dir.path().join("s.db").to_str().unwrap()).await.unwrap();
            let (trigger, _rx) = molecule::trigger::Trigger::new();
            let (_tx, desired) = tokio::sync::watch::channel(Arc::new(molecule::source::desired::DesiredSet::default()));
            let state = molecule::registry::AppState::new(
                store, trigger, desired, TOKEN.to_string(), Arc::new(molecule::metrics::Metrics::new()));
            let router = molecule::registry::router(state);
            for (path, m, bytes, bearer) in requests {
                let what = format!("{m} {path} ({} bytes, bearer {bearer:?})", bytes.len());
                let mut req = Request::builder().method(m).uri(path).header("content-type", "application/json");
                if let Some(b) = &bearer {
                    req = req.header("authorization", format!("Bearer {b}"));
                }
                let Ok(req) = req.body(Body::from(bytes)) else { continue };
                let response = router.clone().oneshot(req).await.unwrap();
                prop_assert!(response.status() != StatusCode::OK || path.starts_with("/registry"), "{}", what);
                check(response, &what).await?;
            }
            Ok(())
        })?;
    }
}
