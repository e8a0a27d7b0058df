//! The local Kubernetes API under hostile or broken input (issue 16): patches that
//! do not leave an object are 422, never a panic; failed admin-token guesses spend
//! the same allowance as on the admin API; an unusable TLS pair fails `bind` with a
//! message naming it. In-process routers over a real SQLite store; no Docker.

use std::sync::Arc;

use axum::body::Body;
use http::{Method, Request, StatusCode};
use serde_json::{Value, json};
use tower::ServiceExt;

const TOKEN: &str = "hardening-admin-token-0123456789abcdefghijk";

async fn api(dir: &std::path::Path) -> Arc<molecule::kubeapi::KubeApi> {
    let store = molecule::store::open(dir.join("s.db").to_str().unwrap()).await.unwrap();
    Arc::new(molecule::kubeapi::KubeApi::new(store, TOKEN).await.unwrap())
}

async fn send(
    router: &axum::Router,
    method: Method,
    path: &str,
    bearer: &str,
    content_type: &str,
    body: &str,
) -> (StatusCode, Value) {
    let request = Request::builder()
        .method(method)
        .uri(path)
        .header("authorization", format!("Bearer {bearer}"))
        .header("content-type", content_type)
        .body(Body::from(body.to_string()))
        .unwrap();
    let response = router.clone().oneshot(request).await.unwrap();
    let status = response.status();
    let bytes = axum::body::to_bytes(response.into_body(), 1 << 20).await.unwrap();
    (status, serde_json::from_slice(&bytes).unwrap_or(Value::Null))
}

#[tokio::test]
async fn patches_that_leave_no_object_are_422_not_a_dropped_connection() {
    let dir = tempfile::tempdir().unwrap();
    let router = molecule::kubeapi::router(api(dir.path()).await);
    let create = |path: &'static str, object: Value| {
        let router = router.clone();
        async move {
            let (code, body) = send(&router, Method::POST, path, TOKEN, "application/json", &object.to_string()).await;
            assert_eq!(code, StatusCode::CREATED, "{path}: {body}");
        }
    };
    create(
        "/apis/molecule.ai/v1alpha1/namespaces/default/workspaces",
        json!({"apiVersion": "molecule.ai/v1alpha1", "kind": "Workspace", "metadata": {"name": "w"}, "spec": {}}),
    )
    .await;
    create(
        "/api/v1/namespaces/default/secrets",
        json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s"}}),
    )
    .await;
    create(
        "/apis/coordination.k8s.io/v1/namespaces/default/leases",
        json!({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease", "metadata": {"name": "l"}}),
    )
    .await;
    create(
        "/api/v1/namespaces/default/events",
        json!({"apiVersion": "v1", "kind": "Event", "metadata": {"name": "e"}}),
    )
    .await;

    let objects = [
        "/apis/molecule.ai/v1alpha1/namespaces/default/workspaces/w",
        "/apis/molecule.ai/v1alpha1/namespaces/default/workspaces/w/status",
        "/api/v1/namespaces/default/secrets/s",
        "/apis/coordination.k8s.io/v1/namespaces/default/leases/l",
        "/api/v1/namespaces/default/events/e",
    ];
    let patches = [
        ("application/merge-patch+json", "5"),
        ("application/merge-patch+json", "\"text\""),
        ("application/merge-patch+json", "[1, 2]"),
        ("application/merge-patch+json", r#"{"metadata": 5}"#),
        ("application/strategic-merge-patch+json", "7"),
        ("application/json-patch+json", r#"[{"op": "replace", "path": "", "value": 5}]"#),
        ("application/json-patch+json", r#"[{"op": "replace", "path": "/metadata", "value": "x"}]"#),
    ];
    for path in objects {
        for (content_type, patch) in patches {
            let (code, body) = send(&router, Method::PATCH, path, TOKEN, content_type, patch).await;
            // Events take no JSON patch (415); everything else says why it refuses.
            assert!(
                code == StatusCode::UNPROCESSABLE_ENTITY
                    || (code == StatusCode::UNSUPPORTED_MEDIA_TYPE && path.contains("/events/")),
                "PATCH {path} ({content_type}) {patch}: {code} {body}"
            );
            assert_eq!(body["kind"], "Status", "a Status a client can read: {body}");
        }
        // The object is still there, unchanged in kind.
        let (code, body) = send(&router, Method::GET, path, TOKEN, "application/json", "").await;
        assert_eq!(code, StatusCode::OK, "{path}: {body}");
        assert!(body.is_object());
    }
    // PUT and POST bodies that are not objects are 400.
    let (code, _) = send(
        &router,
        Method::PUT,
        "/apis/coordination.k8s.io/v1/namespaces/default/leases/l",
        TOKEN,
        "application/json",
        "5",
    )
    .await;
    assert_eq!(code, StatusCode::BAD_REQUEST);
    let (code, _) =
        send(&router, Method::POST, "/api/v1/namespaces/default/events", TOKEN, "application/json", "[]").await;
    assert_eq!(code, StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn admin_token_guesses_on_the_kubernetes_api_spend_the_admin_apis_allowance() {
    let dir = tempfile::tempdir().unwrap();
    let api = api(dir.path()).await;
    let (trigger, _rx) = molecule::trigger::Trigger::new();
    let (_tx, desired) = tokio::sync::watch::channel(Arc::new(molecule::source::desired::DesiredSet::default()));
    let store = molecule::store::open(dir.path().join("s.db").to_str().unwrap()).await.unwrap();
    let state = molecule::registry::AppState::new(
        store,
        trigger,
        desired,
        TOKEN.to_string(),
        Arc::new(molecule::metrics::Metrics::new()),
    );
    // As `up` wires them: one limiter for both servers.
    api.set_limiter(state.limiter.clone());
    let kube = molecule::kubeapi::router(api);
    let admin = molecule::registry::router(state);

    let burst = molecule::registry::limit::BURST as usize;
    for i in 0..burst {
        let (code, _) = send(&kube, Method::GET, "/api/v1/namespaces", &format!("guess-{i}"), "", "").await;
        assert_eq!(code, StatusCode::UNAUTHORIZED, "guess {i}");
    }
    let (code, body) = send(&kube, Method::GET, "/api/v1/namespaces", "guess-more", "", "").await;
    assert_eq!(code, StatusCode::TOO_MANY_REQUESTS, "the allowance is spent: {body}");
    assert_eq!(body["reason"], "TooManyRequests");
    // The admin API refuses the same source's next guess at once.
    let request = Request::builder()
        .uri("/api/v1/workspaces")
        .header("authorization", "Bearer guess-admin")
        .body(Body::empty())
        .unwrap();
    assert_eq!(admin.clone().oneshot(request).await.unwrap().status(), StatusCode::TOO_MANY_REQUESTS);
    // The right token still passes.
    let (code, _) = send(&kube, Method::GET, "/api/v1/namespaces", TOKEN, "", "").await;
    assert_eq!(code, StatusCode::OK);
}

#[tokio::test]
async fn an_unusable_tls_key_fails_bind_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let store = molecule::store::open(dir.path().join("s.db").to_str().unwrap()).await.unwrap();
    // A good pair first, then the key corrupted (as a bad copy or a disk error would).
    molecule::kubeapi::KubeTls::load_or_create(dir.path()).unwrap();
    std::fs::write(
        dir.path().join("kube-api/tls.key"),
        "-----BEGIN PRIVATE KEY-----\nnot a key\n-----END PRIVATE KEY-----\n",
    )
    .unwrap();
    let error = match molecule::kubeapi::bind(store, TOKEN, "127.0.0.1:0".parse().unwrap(), dir.path()).await {
        Ok(_) => panic!("bind accepted an unusable TLS key: it would log serving with nothing serving"),
        Err(e) => e.to_string(),
    };
    assert!(error.contains("kube-api") && error.contains("tls.key"), "{error}");
}
