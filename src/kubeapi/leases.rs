//! coordination.k8s.io/v1 Leases, for leader election by a controller that runs
//! against this server: get, list, create, update (optimistic concurrency),
//! patch, delete, stored durably beside the molecule.ai objects. No watch and no
//! schema beyond kind and name: a Lease is the controller's own bookkeeping.

use axum::body::Bytes;
use axum::http::{HeaderMap, Method};
use axum::response::Response;
use serde_json::{Value, json};

use super::status::ApiError;
use super::{KubeApi, json_response, now_rfc3339};
use crate::store::{ObjectWrite, StoredObject};

const KIND: &str = "Lease";
const API_VERSION: &str = "coordination.k8s.io/v1";
const QUALIFIED: &str = "Lease.coordination.k8s.io";

fn parse(body: &Bytes) -> Result<Value, ApiError> {
    serde_json::from_slice(body).map_err(|e| ApiError::bad_request(format!("the Lease is not valid JSON: {e}")))
}

/// A Lease (as sent, or as a patch left it) must be an object whose metadata, if
/// any, is an object: anything else is refused, never indexed into.
fn check_object(lease: &Value, code: u16) -> Result<(), ApiError> {
    if lease.is_object() && lease.get("metadata").is_none_or(Value::is_object) {
        return Ok(());
    }
    Err(ApiError::new(
        code,
        if code == 422 { "Invalid" } else { "BadRequest" },
        "the Lease is not an object with metadata",
    ))
}

fn to_stored(ns: &str, body: Value) -> StoredObject {
    let meta = &body["metadata"];
    StoredObject {
        kind: KIND.into(),
        namespace: ns.into(),
        name: meta["name"].as_str().unwrap_or_default().into(),
        uid: meta["uid"].as_str().unwrap_or_default().into(),
        resource_version: 0,
        generation: 1,
        creation_timestamp: meta["creationTimestamp"].as_str().unwrap_or_default().into(),
        deletion_timestamp: None,
        body,
    }
}

fn written(result: ObjectWrite, name: &str, create: bool) -> Result<Value, ApiError> {
    match result {
        ObjectWrite::Written(object) => Ok(object.body),
        ObjectWrite::Conflict { .. } if create => Err(ApiError::already_exists(QUALIFIED, name)),
        ObjectWrite::Conflict { current: None } => Err(ApiError::not_found(QUALIFIED, name)),
        ObjectWrite::Conflict { .. } => Err(stale(name)),
    }
}

fn stale(name: &str) -> ApiError {
    ApiError::conflict(
        QUALIFIED,
        name,
        "the object has been modified; please apply your changes to the latest version and try again",
    )
}

pub async fn handle(
    api: &KubeApi,
    method: &Method,
    ns: &str,
    name: Option<&str>,
    headers: &HeaderMap,
    body: &Bytes,
) -> Result<Response, ApiError> {
    let store = &api.store;
    let _guard = api.write_lock.lock().await;
    match (method.clone(), name) {
        (Method::GET, None) => {
            let (items, rv) = store.list_objects(KIND, Some(ns)).await?;
            let items: Vec<Value> = items.into_iter().map(|o| o.body).collect();
            Ok(json_response(
                200,
                &json!({"apiVersion": API_VERSION, "kind": "LeaseList", "metadata": {"resourceVersion": rv.to_string()}, "items": items}),
            ))
        }
        (Method::GET, Some(name)) => match store.get_object(KIND, ns, name).await? {
            Some(object) => Ok(json_response(200, &object.body)),
            None => Err(ApiError::not_found(QUALIFIED, name)),
        },
        (Method::POST, None) => {
            let mut lease = parse(body)?;
            check_object(&lease, 400)?;
            let name = lease["metadata"]["name"].as_str().unwrap_or_default().to_string();
            if name.is_empty() {
                return Err(ApiError::bad_request("a Lease needs metadata.name"));
            }
            lease["apiVersion"] = json!(API_VERSION);
            lease["kind"] = json!(KIND);
            lease["metadata"]["namespace"] = json!(ns);
            lease["metadata"]["uid"] = json!(uuid::Uuid::new_v4().to_string());
            lease["metadata"]["creationTimestamp"] = json!(now_rfc3339());
            let body = written(store.put_object(&to_stored(ns, lease), None).await?, &name, true)?;
            Ok(json_response(201, &body))
        }
        (Method::PUT | Method::PATCH, Some(name)) => {
            let current =
                store.get_object(KIND, ns, name).await?.ok_or_else(|| ApiError::not_found(QUALIFIED, name))?;
            let incoming = parse(body)?;
            let mut lease = if *method == Method::PUT {
                check_object(&incoming, 400)?;
                incoming
            } else {
                let content_type =
                    headers.get(axum::http::header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("");
                let mut out = current.body.clone();
                if content_type.starts_with("application/json-patch+json") {
                    let ops: json_patch::Patch = serde_json::from_value(incoming)
                        .map_err(|e| ApiError::bad_request(format!("the body is not a JSON patch: {e}")))?;
                    json_patch::patch(&mut out, &ops)
                        .map_err(|e| ApiError::new(422, "Invalid", format!("the JSON patch does not apply: {e}")))?;
                } else {
                    check_object(&incoming, 422)?;
                    json_patch::merge(&mut out, &incoming);
                }
                // A JSON patch may replace the root, or metadata, with anything.
                check_object(&out, 422)?;
                out
            };
            let presented = lease["metadata"]["resourceVersion"].as_str().filter(|s| !s.is_empty());
            if presented.is_some_and(|rv| rv.parse::<i64>().ok() != Some(current.resource_version)) {
                return Err(stale(name));
            }
            lease["apiVersion"] = json!(API_VERSION);
            lease["kind"] = json!(KIND);
            for key in ["name", "namespace", "uid", "creationTimestamp"] {
                lease["metadata"][key] = current.body["metadata"][key].clone();
            }
            let result = store.put_object(&to_stored(ns, lease), Some(current.resource_version)).await?;
            Ok(json_response(200, &written(result, name, false)?))
        }
        (Method::DELETE, Some(name)) => {
            let result = store.delete_object(KIND, ns, name, None).await?;
            Ok(json_response(200, &written(result, name, false)?))
        }
        _ => Err(ApiError::method_not_allowed(format!("{method} is not supported on leases"))),
    }
}
