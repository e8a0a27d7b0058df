//! A mock Kubernetes API server (tower-test, as kube-rs/controller-rs tests use):
//! each test answers the requests its client makes, checking method, path and body,
//! and every request is checked against `molecule::cluster::API_USES`, which is what
//! deploy/'s RBAC grants (tests/deploy_rbac.rs).

use std::time::Duration;

use http::{Method, Request, Response, StatusCode};
use kube::client::Body;
use molecule::cluster::API_USES;
use serde_json::Value;

pub type Handle = tower_test::mock::Handle<Request<Body>, Response<Body>>;

/// The apiserver side: takes the next request, checks it is an allowed call.
pub struct ApiServer(pub Handle);

pub struct Seen {
    pub method: Method,
    pub path: String,
    pub query: String,
    pub content_type: String,
    pub body: Value,
    pub reply: tower_test::mock::SendResponse<Response<Body>>,
}

impl Seen {
    pub fn respond(self, status: StatusCode, body: Value) {
        self.respond_raw(status, serde_json::to_vec(&body).unwrap());
    }

    pub fn respond_raw(self, status: StatusCode, bytes: Vec<u8>) {
        self.reply.send_response(Response::builder().status(status).body(Body::from(bytes)).unwrap());
    }

    pub fn is_watch(&self) -> bool {
        self.query.contains("watch=true")
    }
}

impl ApiServer {
    pub async fn next(&mut self) -> Seen {
        let (request, reply) = tokio::time::timeout(Duration::from_secs(10), self.0.next_request())
            .await
            .expect("the controller made no request")
            .expect("the client is gone");
        let method = request.method().clone();
        let path = request.uri().path().to_string();
        let query = request.uri().query().unwrap_or("").to_string();
        let content_type = request
            .headers()
            .get(http::header::CONTENT_TYPE)
            .map(|v| v.to_str().unwrap().to_string())
            .unwrap_or_default();
        let bytes = request.into_body().collect_bytes().await.unwrap();
        let body = if bytes.is_empty() { Value::Null } else { serde_json::from_slice(&bytes).unwrap() };
        assert_allowed(&method, &path, &query);
        Seen { method, path, query, content_type, body, reply }
    }

    /// No request arrives within a short while.
    pub async fn quiet(&mut self) {
        if let Ok(Some((r, _))) = tokio::time::timeout(Duration::from_millis(200), self.0.next_request()).await {
            panic!("unexpected request {} {}", r.method(), r.uri());
        }
    }
}

/// (group, resource, verb) of a request, checked against API_USES.
pub fn assert_allowed(method: &Method, path: &str, query: &str) {
    let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let (group, rest) = match parts[0] {
        "api" => ("", &parts[2..]),
        _ => (parts[1], &parts[3..]),
    };
    let rest = if rest.first() == Some(&"namespaces") { &rest[2..] } else { rest };
    let resource = match rest {
        [r] | [r, _] => r.to_string(),
        [r, _, sub] => format!("{r}/{sub}"),
        _ => panic!("unexpected path {path}"),
    };
    let named = rest.len() >= 2;
    let verb = match *method {
        Method::GET if named => "get",
        Method::GET if query.contains("watch=true") => "watch",
        Method::GET => "list",
        Method::POST => "create",
        Method::PUT => "update",
        Method::PATCH => "patch",
        Method::DELETE => "delete",
        _ => panic!("unexpected method {method}"),
    };
    assert!(
        API_USES.iter().any(|u| u.group == group && u.resource == resource && u.verbs.contains(&verb)),
        "{method} {path} is ({group}, {resource}, {verb}), which API_USES (and so deploy/'s RBAC) does not list"
    );
}
