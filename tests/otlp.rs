//! Traces over OTLP (`--otlp-endpoint`): a receiver in this test stands in for a
//! collector and decodes what arrives (OTLP/HTTP, JSON bodies). A workspace's
//! provision shows as a `reconcile` span with the decision's rule and cause, and its
//! steps (observe, plan, execute provision) as children of it.

mod support;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;
use support::operator::*;

/// Every span the receiver got, flattened: (name, attributes as JSON, span id, parent
/// span id, trace id), plus the resource attributes of each batch.
#[derive(Default)]
struct Received {
    spans: Vec<Span>,
    resources: Vec<Value>,
    content_types: Vec<String>,
}

#[derive(Clone, Debug)]
struct Span {
    name: String,
    attributes: Value,
    span_id: String,
    parent: String,
    trace: String,
}

impl Span {
    fn attribute(&self, key: &str) -> Option<String> {
        let a = self.attributes.as_array()?.iter().find(|a| a["key"] == key)?;
        let v = &a["value"];
        v["stringValue"].as_str().map(str::to_string).or_else(|| Some(v.to_string()))
    }
}

/// A collector's OTLP/HTTP endpoint on a free port; returns its base URL.
fn receiver(got: Arc<Mutex<Received>>) -> String {
    use axum::routing::post;
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async move {
            let app = axum::Router::new().route(
                "/v1/traces",
                post(move |headers: axum::http::HeaderMap, body: axum::body::Bytes| {
                    let got = got.clone();
                    async move {
                        let batch: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
                        let mut got = got.lock().unwrap();
                        let ct = headers.get("content-type").and_then(|v| v.to_str().ok()).unwrap_or_default();
                        got.content_types.push(ct.to_string());
                        for rs in batch["resourceSpans"].as_array().into_iter().flatten() {
                            got.resources.push(rs["resource"]["attributes"].clone());
                            for ss in rs["scopeSpans"].as_array().into_iter().flatten() {
                                for s in ss["spans"].as_array().into_iter().flatten() {
                                    got.spans.push(Span {
                                        name: s["name"].as_str().unwrap_or_default().to_string(),
                                        attributes: s["attributes"].clone(),
                                        span_id: s["spanId"].as_str().unwrap_or_default().to_string(),
                                        parent: s["parentSpanId"].as_str().unwrap_or_default().to_string(),
                                        trace: s["traceId"].as_str().unwrap_or_default().to_string(),
                                    });
                                }
                            }
                        }
                        "{}"
                    }
                }),
            );
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            axum::serve(listener, app).await.unwrap();
        });
    });
    url
}

#[test]
fn each_reconcile_is_a_trace_with_its_steps_and_its_decision() {
    if !docker_available() {
        return;
    }
    let got = Arc::new(Mutex::new(Received::default()));
    let url = receiver(got.clone());
    let mut op = Op::new("otlp");
    op.extra = vec!["--otlp-endpoint".into(), url];
    // Batches go out every 200 ms instead of every 5 s (the SDK's standard variable).
    op.env = vec![("OTEL_BSP_SCHEDULE_DELAY".into(), "200".into())];
    op.write_ws("dev");
    op.start();
    op.wait_online(&["dev"], Duration::from_secs(60));

    // The provision: a reconcile span with its rule and cause, and its steps under it.
    let deadline = Duration::from_secs(30);
    let mut provision: Option<Span> = None;
    wait_until("the provision's reconcile span", deadline, || {
        provision = got
            .lock()
            .unwrap()
            .spans
            .iter()
            .find(|s| s.name == "reconcile" && s.attribute("rule").as_deref() == Some("provision"))
            .cloned();
        provision.is_some()
    });
    let provision = provision.unwrap();
    assert_eq!(provision.attribute("workspace").as_deref(), Some("default/dev"));
    assert_eq!(provision.attribute("cause").as_deref(), Some("no container"));
    assert!(provision.parent.is_empty(), "a reconcile is a trace's root: {provision:?}");
    let children = |root: &Span| -> Vec<Span> {
        got.lock()
            .unwrap()
            .spans
            .iter()
            .filter(|s| s.parent == root.span_id && s.trace == root.trace)
            .cloned()
            .collect()
    };
    wait_until("observe, plan and execute under the reconcile", deadline, || {
        let names: Vec<String> = children(&provision).iter().map(|s| s.name.clone()).collect();
        ["observe", "plan", "execute provision"].iter().all(|n| names.iter().any(|m| m == n))
    });
    let kids = children(&provision);
    let plan = kids.iter().find(|s| s.name == "plan" && s.attribute("rule").is_some()).expect("a plan that decided");
    assert_eq!(plan.attribute("cause").as_deref(), Some("no container"));
    let exec = kids.iter().find(|s| s.name == "execute provision").unwrap();
    assert_eq!(exec.attribute("action").as_deref(), Some("provision"));

    // Who sent them, and how.
    let got = got.lock().unwrap();
    let service = got
        .resources
        .iter()
        .flat_map(|r| r.as_array().cloned().unwrap_or_default())
        .find(|a| a["key"] == "service.name");
    assert_eq!(service.map(|a| a["value"]["stringValue"].clone()), Some(Value::from("molecule-operator")));
    assert!(got.content_types.iter().all(|c| c.starts_with("application/json")), "{:?}", got.content_types);
}
