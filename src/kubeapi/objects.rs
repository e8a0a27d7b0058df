//! The stored kinds (kinds.rs): get, list, watch, create, update, patch (merge,
//! JSON, strategic, server-side apply), delete (propagation policies, grace periods,
//! finalizers), the status subresource, and a Pod's `binding` and `log`
//! subresources. Every write goes through [`commit`] (or [`remove`]) under the
//! server's write lock, so the event history is in resourceVersion order.
//!
//! An object marked for deletion is removed by the first write that leaves it with
//! no finalizers and no grace period running: a Pod deleted gracefully stays
//! (Terminating) until its node deletes it again with a grace period of 0.

use std::sync::Arc;

use axum::body::Bytes;
use axum::http::{HeaderMap, Method};
use axum::response::Response;
use serde_json::{Value, json};

use super::selector::Selector;
use super::status::{ApiError, Cause};
use super::{Kind, KubeApi, Query, WatchEvent, core, json_response, now_rfc3339, schema, strategic, table, watch};
use crate::api::{Team, Workspace, validate};
use crate::store::{ObjectWrite, StoredObject};

const STALE: &str = "the object has been modified; please apply your changes to the latest version and try again";
/// The finalizers a delete's propagation policy adds (the garbage collector acts on them).
pub const ORPHAN_FINALIZER: &str = "orphan";
pub const FOREGROUND_FINALIZER: &str = "foregroundDeletion";

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Part {
    Main,
    Status,
}

/// What a URL under a group version names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target<'a> {
    /// A collection: namespaced kinds in one namespace (or all: None), or a
    /// cluster-scoped kind.
    Collection { kind: Kind, ns: Option<&'a str> },
    /// One object and its subresource path (empty for the object itself).
    Item { kind: Kind, ns: Option<&'a str>, name: &'a str, sub: &'a [&'a str] },
}

/// Parses the path after `/api/v1` or `/apis/GROUP/VERSION`.
pub fn parse_target<'a>(group: &str, rest: &'a [&'a str]) -> Option<Target<'a>> {
    let namespaced = |plural: &str| Kind::from_plural(group, plural).filter(|k| k.namespaced());
    match rest {
        ["namespaces", ns, plural, tail @ ..] if namespaced(plural).is_some() => {
            let kind = namespaced(plural)?;
            match tail {
                [] => Some(Target::Collection { kind, ns: Some(ns) }),
                [name, sub @ ..] => Some(Target::Item { kind, ns: Some(ns), name, sub }),
            }
        }
        [plural] => Some(Target::Collection { kind: Kind::from_plural(group, plural)?, ns: None }),
        [plural, name, sub @ ..] => {
            let kind = Kind::from_plural(group, plural).filter(|k| !k.namespaced())?;
            Some(Target::Item { kind, ns: None, name, sub })
        }
        _ => None,
    }
}

pub async fn route(
    api: &Arc<KubeApi>,
    method: &Method,
    target: Target<'_>,
    query: &Query,
    headers: &HeaderMap,
    body: &Bytes,
) -> Result<Response, ApiError> {
    let content_type = headers.get(axum::http::header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("");
    let decoded;
    let body = if matches!(*method, Method::POST | Method::PUT) && content_type.contains("protobuf") {
        decoded = match super::protobuf::decode(body) {
            Ok(object) => Bytes::from(serde_json::to_vec(&object).unwrap_or_default()),
            Err(super::protobuf::Decoded::Unsupported(what)) => {
                return Err(ApiError::unsupported_media(&format!(
                    "{content_type} ({what}: send it as JSON, e.g. with `kubectl apply -f`)"
                )));
            }
            Err(super::protobuf::Decoded::Malformed(why)) => return Err(ApiError::bad_request(why)),
        };
        &decoded
    } else {
        body
    };
    match target {
        Target::Collection { kind, ns } => match (method.clone(), ns) {
            (Method::GET, _) => list_or_watch(api, kind, ns, query, headers).await,
            (Method::POST, Some(ns)) => create(api, kind, ns, query, body).await,
            (Method::POST, None) if !kind.namespaced() => create(api, kind, "", query, body).await,
            (Method::POST, None) => Err(ApiError::method_not_allowed(format!(
                "{} are created in a namespace: POST to /api/v1/namespaces/NAMESPACE/{}",
                kind.plural(),
                kind.plural()
            ))),
            _ => Err(ApiError::method_not_allowed(format!("{method} is not supported on a collection"))),
        },
        Target::Item { kind, ns, name, sub } => {
            let ns = kind.stored_namespace(ns);
            let part = match sub {
                [] => Part::Main,
                ["status"] if kind.has_status() => Part::Status,
                ["binding"] if kind == Kind::Pod && *method == Method::POST => {
                    return bind(api, ns, name, query, body).await;
                }
                ["log"] if kind == Kind::Pod && *method == Method::GET => {
                    return super::logs::serve(api, ns, name, query).await;
                }
                _ => {
                    return Err(ApiError::not_found_path(&format!("{}/{name}/{}", kind.plural(), sub.join("/"))));
                }
            };
            match (method.clone(), part) {
                (Method::GET, _) => get(api, kind, ns, name, query, headers).await,
                (Method::PUT, _) => update(api, kind, ns, name, part, query, body).await,
                (Method::PATCH, _) => patch(api, kind, ns, name, part, query, headers, body).await,
                (Method::DELETE, Part::Main) => delete(api, kind, ns, name, query, body).await,
                _ => Err(ApiError::method_not_allowed(format!("{method} is not supported on the status subresource"))),
            }
        }
    }
}

async fn get(
    api: &KubeApi,
    kind: Kind,
    ns: &str,
    name: &str,
    query: &Query,
    headers: &HeaderMap,
) -> Result<Response, ApiError> {
    let stored = current(api, kind, ns, name).await?;
    if table::wanted(headers) {
        let t = table::table(api, kind, &[&stored.body], stored.resource_version, query.get("includeObject"));
        return Ok(json_response(200, &t));
    }
    Ok(json_response(200, &stored.body))
}

async fn list_or_watch(
    api: &Arc<KubeApi>,
    kind: Kind,
    ns: Option<&str>,
    query: &Query,
    headers: &HeaderMap,
) -> Result<Response, ApiError> {
    let selector = Selector::parse(kind, query)?;
    if query.flag("watch") {
        return watch::watch(api, kind, ns, selector, query, table::wanted(headers));
    }
    let (objects, revision) = api.store.list_objects(kind.name(), ns).await?;
    let items: Vec<&Value> = objects.iter().map(|o| &o.body).filter(|b| selector.matches(b)).collect();
    if table::wanted(headers) {
        return Ok(json_response(200, &table::table(api, kind, &items, revision, query.get("includeObject"))));
    }
    Ok(json_response(
        200,
        &json!({
            "apiVersion": kind.api_version(),
            "kind": format!("{}List", kind.name()),
            "metadata": {"resourceVersion": revision.to_string()},
            "items": items,
        }),
    ))
}

fn parse_json(body: &Bytes) -> Result<Value, ApiError> {
    serde_json::from_slice(body).map_err(|e| ApiError::bad_request(format!("the request body is not valid JSON: {e}")))
}

/// The body must be an object whose apiVersion and kind (when given) are this URL's.
fn check_identity(kind: Kind, object: &Value) -> Result<(), ApiError> {
    if !object.is_object() {
        return Err(ApiError::bad_request(format!("the request body is not a {} object", kind.name())));
    }
    if object["kind"].as_str().is_some_and(|k| k != kind.name())
        || object["apiVersion"].as_str().is_some_and(|v| v != kind.api_version())
    {
        return Err(ApiError::bad_request(format!(
            "the object is {} {}, but this URL serves {} {}",
            object["apiVersion"].as_str().unwrap_or("?"),
            object["kind"].as_str().unwrap_or("?"),
            kind.api_version(),
            kind.name()
        )));
    }
    if !object["metadata"].is_object() {
        return Err(ApiError::bad_request("the object has no metadata"));
    }
    Ok(())
}

/// What a patch produced must still be an object with metadata: a patch that
/// replaces the root with something else is refused, never stored.
fn check_patched(kind: Kind, name: &str, object: &Value) -> Result<(), ApiError> {
    if object.is_object() && object["metadata"].is_object() {
        return Ok(());
    }
    Err(ApiError::invalid(
        &kind.qualified(),
        name,
        vec![Cause {
            field: if object.is_object() { "metadata".into() } else { "<root>".into() },
            reason: "FieldValueInvalid",
            message: "Invalid value: the patch must leave an object with metadata".into(),
        }],
    ))
}

/// The molecule kinds: schema (types, enums, ranges, unknown fields), name, and the
/// Rust types' own decoding (an object stored here is one the operator can read).
/// The core kinds: core::validate.
fn validate_object(api: &KubeApi, kind: Kind, object: &Value) -> Result<(), ApiError> {
    let name = object["metadata"]["name"].as_str().unwrap_or("");
    let mut causes = Vec::new();
    if kind.is_core() {
        causes = core::validate(kind, object);
    } else {
        if let Err(problem) = validate::dns1123_label(name) {
            causes.push(Cause {
                field: "metadata.name".into(),
                reason: "FieldValueInvalid",
                message: format!("Invalid value: \"{name}\": {problem}"),
            });
        }
        causes.extend(schema::check(&api.info(kind).schema, object));
        if causes.is_empty() {
            let decoded = match kind {
                Kind::Team => serde_path_to_error::deserialize::<_, Team>(object).map(drop),
                Kind::WarmPool => serde_path_to_error::deserialize::<_, crate::api::WarmPool>(object).map(drop),
                _ => serde_path_to_error::deserialize::<_, Workspace>(object).map(drop),
            };
            if let Err(error) = decoded {
                causes.push(Cause {
                    field: error.path().to_string(),
                    reason: "FieldValueInvalid",
                    message: format!("Invalid value: {}", error.inner()),
                });
            }
        }
    }
    if causes.is_empty() { Ok(()) } else { Err(ApiError::invalid(&kind.qualified(), name, causes)) }
}

pub(super) fn stored(kind: Kind, ns: &str, body: Value) -> StoredObject {
    let meta = &body["metadata"];
    StoredObject {
        kind: kind.name().to_string(),
        namespace: ns.to_string(),
        name: meta["name"].as_str().unwrap_or_default().to_string(),
        uid: meta["uid"].as_str().unwrap_or_default().to_string(),
        resource_version: 0,
        generation: meta["generation"].as_i64().unwrap_or(1),
        creation_timestamp: meta["creationTimestamp"].as_str().unwrap_or_default().to_string(),
        deletion_timestamp: meta["deletionTimestamp"].as_str().map(str::to_string),
        body,
    }
}

fn without_rv(body: &Value) -> Value {
    let mut body = body.clone();
    if let Some(meta) = body["metadata"].as_object_mut() {
        meta.remove("resourceVersion");
    }
    body
}

/// No finalizer holds the object (a Namespace's own `spec.finalizers` included).
pub(super) fn finalizers_empty(kind: Kind, body: &Value) -> bool {
    let empty = |v: &Value| v.as_array().is_none_or(|f| f.is_empty());
    empty(&body["metadata"]["finalizers"]) && (kind != Kind::Namespace || empty(&body["spec"]["finalizers"]))
}

/// Marked for deletion, and nothing holds it any more: no finalizer, no grace period.
fn removable(kind: Kind, body: &Value) -> bool {
    body["metadata"]["deletionTimestamp"].is_string()
        && finalizers_empty(kind, body)
        && body["metadata"]["deletionGracePeriodSeconds"].as_i64().unwrap_or(0) <= 0
}

/// Validates and writes `object` (None `existing`: a create), publishing the
/// event. Unchanged objects are not rewritten; a deleting object nothing holds any
/// more is removed.
pub(super) async fn commit(
    api: &KubeApi,
    kind: Kind,
    ns: &str,
    existing: Option<&StoredObject>,
    object: Value,
    query: &Query,
) -> Result<(u16, Value), ApiError> {
    validate_object(api, kind, &object)?;
    let name = object["metadata"]["name"].as_str().unwrap_or_default().to_string();
    let expected = match existing {
        None => None,
        Some(current) => {
            let presented = object["metadata"]["resourceVersion"].as_str().filter(|s| !s.is_empty());
            match presented {
                Some(rv) if rv.parse::<i64>().ok() != Some(current.resource_version) => {
                    return Err(ApiError::conflict(&kind.qualified(), &name, STALE));
                }
                _ => Some(current.resource_version),
            }
        }
    };
    if let Some(current) = existing
        && without_rv(&current.body) == without_rv(&object)
    {
        return Ok((200, current.body.clone()));
    }
    if query.get("dryRun").is_some() {
        return Ok((if existing.is_some() { 200 } else { 201 }, object));
    }
    if let Some(current) = existing.filter(|_| removable(kind, &object)) {
        return remove(api, kind, current, expected).await;
    }
    match api.store.put_object(&stored(kind, ns, object), expected).await? {
        ObjectWrite::Written(written) => {
            let event_type = if existing.is_some() { "MODIFIED" } else { "ADDED" };
            api.publish(WatchEvent {
                rv: written.resource_version,
                kind,
                namespace: ns.to_string(),
                event_type,
                object: written.body.clone(),
            });
            Ok((if existing.is_some() { 200 } else { 201 }, written.body))
        }
        ObjectWrite::Conflict { .. } if existing.is_none() => Err(ApiError::already_exists(&kind.qualified(), &name)),
        ObjectWrite::Conflict { .. } => Err(ApiError::conflict(&kind.qualified(), &name, STALE)),
    }
}

pub(super) async fn remove(
    api: &KubeApi,
    kind: Kind,
    current: &StoredObject,
    expected: Option<i64>,
) -> Result<(u16, Value), ApiError> {
    match api.store.delete_object(kind.name(), &current.namespace, &current.name, expected).await? {
        ObjectWrite::Written(gone) => {
            api.publish(WatchEvent {
                rv: gone.resource_version,
                kind,
                namespace: gone.namespace.clone(),
                event_type: "DELETED",
                object: gone.body.clone(),
            });
            Ok((200, gone.body))
        }
        ObjectWrite::Conflict { current: None } => Err(ApiError::not_found(&kind.qualified(), &current.name)),
        ObjectWrite::Conflict { .. } => Err(ApiError::conflict(&kind.qualified(), &current.name, STALE)),
    }
}

fn respond((code, body): (u16, Value)) -> Response {
    json_response(code, &body)
}

/// Puts the system-owned metadata back and keeps the part this write may not touch.
fn merge_write(kind: Kind, existing: &StoredObject, mut object: Value, part: Part) -> Value {
    match part {
        Part::Status => {
            let mut out = existing.body.clone();
            match object.get_mut("status").map(Value::take) {
                Some(status) if !status.is_null() => out["status"] = status,
                _ => {
                    if let Some(map) = out.as_object_mut() {
                        map.remove("status");
                    }
                }
            }
            if let Some(rv) = object["metadata"].get("resourceVersion") {
                out["metadata"]["resourceVersion"] = rv.clone();
            }
            out
        }
        Part::Main => {
            let old = &existing.body;
            match old.get("status") {
                Some(status) => object["status"] = status.clone(),
                None => {
                    if let Some(map) = object.as_object_mut() {
                        map.remove("status");
                    }
                }
            }
            object["apiVersion"] = json!(kind.api_version());
            object["kind"] = old["kind"].clone();
            if !object["metadata"].is_object() {
                object["metadata"] = json!({});
            }
            let meta = object["metadata"].as_object_mut().expect("metadata is an object");
            for key in [
                "managedFields",
                "uid",
                "creationTimestamp",
                "deletionTimestamp",
                "deletionGracePeriodSeconds",
                "namespace",
                "name",
            ] {
                match old["metadata"].get(key) {
                    Some(v) => {
                        meta.insert(key.into(), v.clone());
                    }
                    None => {
                        meta.remove(key);
                    }
                }
            }
            // A finalizer may be removed from an object being deleted, never added.
            if old["metadata"]["deletionTimestamp"].is_string() {
                let before: Vec<Value> = old["metadata"]["finalizers"].as_array().cloned().unwrap_or_default();
                if let Some(Value::Array(now)) = meta.get_mut("finalizers") {
                    now.retain(|f| before.contains(f));
                }
            }
            if kind.is_core() {
                core::normalize(kind, &mut object);
            }
            let generation = old["metadata"]["generation"].as_i64().unwrap_or(1);
            let bumped = if object.get("spec") != old.get("spec") { generation + 1 } else { generation };
            object["metadata"]["generation"] = json!(bumped);
            object
        }
    }
}

/// Immutability rules of an update to the main resource.
fn check_update(kind: Kind, existing: &StoredObject, object: &Value, part: Part) -> Result<(), ApiError> {
    if part != Part::Main || !kind.is_core() {
        return Ok(());
    }
    let causes = core::validate_update(kind, &existing.body, object);
    if causes.is_empty() { Ok(()) } else { Err(ApiError::invalid(&kind.qualified(), &existing.name, causes)) }
}

async fn create(api: &KubeApi, kind: Kind, ns: &str, query: &Query, body: &Bytes) -> Result<Response, ApiError> {
    let object = parse_json(body)?;
    create_object(api, kind, ns, object, query, None).await.map(respond)
}

/// A namespaced object may only be created in a namespace that exists and is not
/// being deleted, as in a real cluster.
async fn check_namespace(api: &KubeApi, kind: Kind, ns: &str, name: &str) -> Result<(), ApiError> {
    if !kind.namespaced() {
        return Ok(());
    }
    match api.store.get_object(Kind::Namespace.name(), "", ns).await? {
        None => Err(ApiError::not_found(&Kind::Namespace.qualified(), ns)),
        Some(namespace) if namespace.deletion_timestamp.is_some() => Err(ApiError::forbidden(
            kind,
            name,
            format!("unable to create new content in namespace {ns} because it is being terminated"),
        )),
        Some(_) => Ok(()),
    }
}

async fn create_object(
    api: &KubeApi,
    kind: Kind,
    ns: &str,
    mut object: Value,
    query: &Query,
    managed: Option<Value>,
) -> Result<(u16, Value), ApiError> {
    check_identity(kind, &object)?;
    let meta = object["metadata"].as_object_mut().expect("checked");
    if kind.namespaced()
        && let Some(other) = meta.get("namespace").and_then(Value::as_str).filter(|n| !n.is_empty() && *n != ns)
    {
        return Err(ApiError::bad_request(format!(
            "the namespace of the object ({other}) does not match the namespace of the request ({ns})"
        )));
    }
    if meta.get("name").and_then(Value::as_str).is_none_or(str::is_empty) {
        let prefix = meta.get("generateName").and_then(Value::as_str).unwrap_or_default().to_string();
        if prefix.is_empty() {
            return Err(ApiError::invalid(
                &kind.qualified(),
                "",
                vec![Cause {
                    field: "metadata.name".into(),
                    reason: "FieldValueRequired",
                    message: "Required value: name or generateName is required".into(),
                }],
            ));
        }
        let suffix: String =
            uuid::Uuid::new_v4().simple().to_string().chars().filter(char::is_ascii_alphanumeric).take(5).collect();
        meta.insert("name".into(), json!(format!("{prefix}{suffix}")));
    }
    if kind.namespaced() {
        meta.insert("namespace".into(), json!(ns));
    } else {
        meta.remove("namespace");
    }
    meta.insert("uid".into(), json!(uuid::Uuid::new_v4().to_string()));
    meta.insert("creationTimestamp".into(), json!(now_rfc3339()));
    meta.insert("generation".into(), json!(1));
    for key in ["resourceVersion", "deletionTimestamp", "deletionGracePeriodSeconds", "managedFields", "selfLink"] {
        meta.remove(key);
    }
    if let Some(entry) = managed {
        meta.insert("managedFields".into(), json!([entry]));
    }
    let name = meta.get("name").and_then(Value::as_str).unwrap_or_default().to_string();
    object["apiVersion"] = json!(kind.api_version());
    object["kind"] = json!(kind.name());
    // The status subresource is the only way to write status (a Node registers with its own).
    if kind != Kind::Node
        && let Some(map) = object.as_object_mut()
    {
        map.remove("status");
    }
    if kind.is_core() {
        core::normalize(kind, &mut object);
        core::admit_create(kind, &mut object);
    }
    let _guard = api.write_lock.lock().await;
    check_namespace(api, kind, ns, &name).await?;
    if kind == Kind::Service {
        super::services::allocate_cluster_ip(api, &mut object).await?;
    }
    commit(api, kind, ns, None, object, query).await
}

async fn current(api: &KubeApi, kind: Kind, ns: &str, name: &str) -> Result<StoredObject, ApiError> {
    api.current(kind, ns, name).await
}

async fn update(
    api: &KubeApi,
    kind: Kind,
    ns: &str,
    name: &str,
    part: Part,
    query: &Query,
    body: &Bytes,
) -> Result<Response, ApiError> {
    let object = parse_json(body)?;
    check_identity(kind, &object)?;
    if object["metadata"]["name"].as_str().is_some_and(|n| n != name) {
        return Err(ApiError::bad_request(format!(
            "the name of the object does not match the name in the URL ({name})"
        )));
    }
    let _guard = api.write_lock.lock().await;
    let existing = current(api, kind, ns, name).await?;
    let merged = merge_write(kind, &existing, object, part);
    check_update(kind, &existing, &merged, part)?;
    commit(api, kind, ns, Some(&existing), merged, query).await.map(respond)
}

/// Removes `$`-directives of a strategic merge patch; what is left is applied as
/// a JSON merge patch (CRDs have no patch strategies, so lists are replaced either way).
fn strip_directives(value: &mut Value) {
    match value {
        Value::Object(map) => {
            map.retain(|k, _| !k.starts_with('$'));
            map.values_mut().for_each(strip_directives);
        }
        Value::Array(items) => items.iter_mut().for_each(strip_directives),
        _ => {}
    }
}

fn not_an_object_patch(kind: Kind, name: &str) -> ApiError {
    ApiError::invalid(
        &kind.qualified(),
        name,
        vec![Cause {
            field: "<root>".into(),
            reason: "FieldValueInvalid",
            message: "Invalid value: a merge patch must be a JSON object".into(),
        }],
    )
}

#[allow(clippy::too_many_arguments)]
async fn patch(
    api: &KubeApi,
    kind: Kind,
    ns: &str,
    name: &str,
    part: Part,
    query: &Query,
    headers: &HeaderMap,
    body: &Bytes,
) -> Result<Response, ApiError> {
    let content_type = headers
        .get(axum::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_string();
    let _guard = api.write_lock.lock().await;
    let existing = api.store.get_object(kind.name(), ns, name).await?;
    let mut applied_fields = None;
    let patched = match content_type.as_str() {
        "application/merge-patch+json" | "application/strategic-merge-patch+json" => {
            let existing = existing.as_ref().ok_or_else(|| ApiError::not_found(&kind.qualified(), name))?;
            let mut patch = parse_json(body)?;
            if !patch.is_object() {
                return Err(not_an_object_patch(kind, name));
            }
            let mut out = existing.body.clone();
            if content_type == "application/strategic-merge-patch+json" && kind.is_core() {
                strategic::apply(kind, &mut out, &patch).map_err(|problem| {
                    ApiError::invalid(
                        &kind.qualified(),
                        name,
                        vec![Cause { field: "<patch>".into(), reason: "FieldValueInvalid", message: problem }],
                    )
                })?;
            } else {
                strip_directives(&mut patch);
                json_patch::merge(&mut out, &patch);
            }
            out
        }
        "application/json-patch+json" => {
            let existing = existing.as_ref().ok_or_else(|| ApiError::not_found(&kind.qualified(), name))?;
            let mut out = existing.body.clone();
            let not_a_patch = |e: serde_json::Error| {
                ApiError::bad_request(format!("the body is not a JSON patch (a list of operations): {e}"))
            };
            let ops: Vec<Value> = serde_json::from_slice(body).map_err(not_a_patch)?;
            // As the API server's JSON patch: testing an absent field against null passes
            // (kube-rs' finalizer helper sends exactly that before adding the first finalizer).
            let ops: Vec<Value> = ops
                .into_iter()
                .filter(|op| {
                    let absent = op["path"].as_str().is_some_and(|p| out.pointer(p).is_none_or(Value::is_null));
                    !(op["op"] == "test" && op["value"].is_null() && absent)
                })
                .collect();
            let ops: json_patch::Patch = serde_json::from_value(Value::Array(ops)).map_err(not_a_patch)?;
            json_patch::patch(&mut out, &ops).map_err(|e| {
                ApiError::new(
                    422,
                    "Invalid",
                    format!("the JSON patch does not apply to {} \"{name}\": {e}", kind.qualified()),
                )
            })?;
            out
        }
        "application/apply-patch+yaml" | "application/apply-patch+json" => {
            let text = std::str::from_utf8(body)
                .map_err(|_| ApiError::bad_request("the applied configuration is not UTF-8"))?;
            let mut applied: Value = serde_json::from_str(text)
                .or_else(|_| serde_saphyr::from_str(text))
                .map_err(|e| ApiError::bad_request(format!("the applied configuration is not valid YAML: {e}")))?;
            // A status-only configuration may leave metadata out: the URL names the object.
            if applied.is_object() && applied.get("metadata").is_none_or(Value::is_null) {
                applied["metadata"] = json!({"name": name});
            }
            check_identity(kind, &applied)?;
            if applied["metadata"]["name"].as_str().is_some_and(|n| n != name) {
                return Err(ApiError::bad_request(format!(
                    "the name of the applied object does not match the URL ({name})"
                )));
            }
            match (&existing, part) {
                (None, Part::Main) => {
                    let mut object = applied;
                    object["metadata"]["name"] = json!(name);
                    let entry = managed_entry(kind, query, &owned_fields(&object, 0));
                    drop(_guard);
                    return create_object(api, kind, ns, object, query, Some(entry)).await.map(respond);
                }
                (None, Part::Status) => return Err(ApiError::not_found(&kind.qualified(), name)),
                (Some(existing), Part::Status) => {
                    // Status is applied whole by one field manager (the controller).
                    let mut out = existing.body.clone();
                    out["status"] = applied.get("status").cloned().unwrap_or(Value::Null);
                    out
                }
                (Some(existing), Part::Main) => {
                    let mut applied = applied;
                    if let Some(map) = applied.as_object_mut() {
                        map.remove("status");
                    }
                    // Fields this manager applied before and leaves out now are removed.
                    let fields = owned_fields(&applied, 0);
                    let manager = query.get("fieldManager").unwrap_or("unknown");
                    let previous = existing.body["metadata"]["managedFields"]
                        .as_array()
                        .and_then(|all| all.iter().find(|e| e["manager"] == manager && e["operation"] == "Apply"));
                    if let Some(previous) = previous {
                        null_removed(&previous["fieldsV1"], &fields, &mut applied);
                    }
                    applied_fields = Some(managed_entry(kind, query, &fields));
                    let mut out = existing.body.clone();
                    json_patch::merge(&mut out, &applied);
                    out
                }
            }
        }
        other => return Err(ApiError::unsupported_media(other)),
    };
    check_patched(kind, name, &patched)?;
    let existing = existing.ok_or_else(|| ApiError::not_found(&kind.qualified(), name))?;
    let mut merged = merge_write(kind, &existing, patched, part);
    if let Some(entry) = applied_fields {
        let mut entries: Vec<Value> = merged["metadata"]["managedFields"].as_array().cloned().unwrap_or_default();
        entries.retain(|e| !(e["manager"] == entry["manager"] && e["operation"] == "Apply"));
        entries.push(entry);
        merged["metadata"]["managedFields"] = Value::Array(entries);
    }
    check_update(kind, &existing, &merged, part)?;
    commit(api, kind, ns, Some(&existing), merged, query).await.map(respond)
}

/// The fields an applied configuration sets, in managedFields' FieldsV1 form
/// (`{"f:spec": {"f:tier": {}}}`). Lists are atomic; of metadata, labels and
/// annotations count; status is never the main resource's.
fn owned_fields(value: &Value, depth: usize) -> Value {
    let Value::Object(map) = value else { return json!({}) };
    let mut out = serde_json::Map::new();
    for (key, child) in map {
        let skip = depth == 0 && matches!(key.as_str(), "apiVersion" | "kind" | "status");
        if skip {
            continue;
        }
        let fields = if depth == 0 && key == "metadata" {
            let mut meta = serde_json::Map::new();
            for k in ["labels", "annotations"] {
                if let Some(v) = child.get(k) {
                    meta.insert(format!("f:{k}"), owned_fields(v, 2));
                }
            }
            Value::Object(meta)
        } else {
            owned_fields(child, depth + 1)
        };
        out.insert(format!("f:{key}"), fields);
    }
    Value::Object(out)
}

/// Sets to null, in `patch`, every field `previous` owned that `now` does not.
fn null_removed(previous: &Value, now: &Value, patch: &mut Value) {
    let Some(previous) = previous.as_object() else { return };
    for (key, children) in previous {
        let Some(name) = key.strip_prefix("f:") else { continue };
        match now.get(key) {
            None => {
                if let Some(map) = patch.as_object_mut() {
                    map.insert(name.to_string(), Value::Null);
                }
            }
            Some(now_children) => {
                if children.as_object().is_some_and(|c| !c.is_empty())
                    && let Some(child) = patch.get_mut(name).filter(|c| c.is_object())
                {
                    null_removed(children, now_children, child);
                }
            }
        }
    }
}

fn managed_entry(kind: Kind, query: &Query, fields: &Value) -> Value {
    json!({
        "manager": query.get("fieldManager").unwrap_or("unknown"),
        "operation": "Apply",
        "apiVersion": kind.api_version(),
        "time": now_rfc3339(),
        "fieldsType": "FieldsV1",
        "fieldsV1": fields,
    })
}

/// How the dependents of a deleted object go (DeleteOptions.propagationPolicy).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Propagation {
    /// The object goes at once; the garbage collector deletes its dependents after.
    Background,
    /// The object stays (finalizer `foregroundDeletion`) until its blocking dependents are gone.
    Foreground,
    /// The dependents stay, their ownerReferences to it removed (finalizer `orphan`).
    Orphan,
}

/// DeleteOptions, from the body or the query (kubectl sends a body; other clients
/// use query parameters).
#[derive(Clone, Debug, Default)]
pub struct DeleteOptions {
    pub propagation: Option<Propagation>,
    pub grace_period_seconds: Option<i64>,
    precondition_rv: Option<i64>,
    precondition_uid: Option<String>,
    dry_run: bool,
}

impl DeleteOptions {
    fn parse(query: &Query, body: &Bytes) -> Result<Self, ApiError> {
        let options: Value = if body.is_empty() { json!({}) } else { parse_json(body)? };
        if !options.is_object() {
            return Err(ApiError::bad_request("the body of a delete must be a DeleteOptions object"));
        }
        let text = |key: &str| options[key].as_str().map(str::to_string).or_else(|| query.get(key).map(str::to_string));
        let propagation = match text("propagationPolicy").as_deref() {
            None | Some("") => match options["orphanDependents"].as_bool() {
                Some(true) => Some(Propagation::Orphan),
                _ => None,
            },
            Some("Background") => Some(Propagation::Background),
            Some("Foreground") => Some(Propagation::Foreground),
            Some("Orphan") => Some(Propagation::Orphan),
            Some(other) => {
                return Err(ApiError::new(
                    422,
                    "Invalid",
                    format!(
                        "propagationPolicy: Unsupported value: \"{other}\": supported values: \"Foreground\", \"Background\", \"Orphan\""
                    ),
                ));
            }
        };
        let grace = match options["gracePeriodSeconds"].as_i64() {
            Some(g) => Some(g),
            None => match query.get("gracePeriodSeconds") {
                Some(g) => Some(g.parse::<i64>().map_err(|_| {
                    ApiError::bad_request(format!("gracePeriodSeconds {g:?} is not a number of seconds"))
                })?),
                None => None,
            },
        };
        if grace.is_some_and(|g| g < 0) {
            return Err(ApiError::new(422, "Invalid", "gracePeriodSeconds: Invalid value: must be non-negative"));
        }
        Ok(Self {
            propagation,
            grace_period_seconds: grace,
            precondition_rv: options["preconditions"]["resourceVersion"].as_str().and_then(|rv| rv.parse().ok()),
            precondition_uid: options["preconditions"]["uid"].as_str().map(str::to_string),
            dry_run: query.get("dryRun").is_some() || options["dryRun"].as_array().is_some_and(|d| !d.is_empty()),
        })
    }
}

async fn delete(
    api: &KubeApi,
    kind: Kind,
    ns: &str,
    name: &str,
    query: &Query,
    body: &Bytes,
) -> Result<Response, ApiError> {
    let options = DeleteOptions::parse(query, body)?;
    if kind == Kind::Namespace && core::UNDELETABLE_NAMESPACES.contains(&name) {
        return Err(ApiError::forbidden(kind, name, "this namespace may not be deleted".into()));
    }
    let _guard = api.write_lock.lock().await;
    let existing = current(api, kind, ns, name).await?;
    if options.precondition_rv.is_some_and(|rv| rv != existing.resource_version) {
        return Err(ApiError::conflict(&kind.qualified(), name, STALE));
    }
    if let Some(uid) = &options.precondition_uid
        && *uid != existing.uid
    {
        return Err(ApiError::conflict(
            &kind.qualified(),
            name,
            "the UID in the precondition does not match the object",
        ));
    }
    if options.dry_run {
        return Ok(json_response(200, &existing.body));
    }
    delete_locked(api, kind, &existing, &options).await.map(respond)
}

/// How long a Pod's deletion waits for its node: None when it goes at once (not
/// bound to a node, already terminated, or a grace period of 0).
fn pod_grace(pod: &Value, asked: Option<i64>) -> Option<i64> {
    let bound = pod["spec"]["nodeName"].as_str().is_some_and(|n| !n.is_empty());
    let terminated = matches!(pod["status"]["phase"].as_str(), Some("Succeeded" | "Failed"));
    let grace = asked.unwrap_or_else(|| pod["spec"]["terminationGracePeriodSeconds"].as_i64().unwrap_or(30));
    (bound && !terminated && grace > 0).then_some(grace)
}

/// Deletes `existing` (the write lock held): marks it (deletionTimestamp, the
/// propagation policy's finalizer, a Pod's grace period) while anything holds it,
/// removes it otherwise. Also what the garbage collector calls.
pub(super) async fn delete_locked(
    api: &KubeApi,
    kind: Kind,
    existing: &StoredObject,
    options: &DeleteOptions,
) -> Result<(u16, Value), ApiError> {
    let mut object = existing.body.clone();
    let deleting = existing.deletion_timestamp.is_some();
    match options.propagation {
        Some(Propagation::Orphan) if !deleting || !finalizers_empty(kind, &object) => {
            core::add_finalizer(&mut object, ORPHAN_FINALIZER)
        }
        Some(Propagation::Foreground) if !deleting || !finalizers_empty(kind, &object) => {
            core::add_finalizer(&mut object, FOREGROUND_FINALIZER)
        }
        _ => {}
    }
    let now = chrono::Utc::now();
    let stamp = |t: chrono::DateTime<chrono::Utc>| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    let meta = &mut object["metadata"];
    if deleting {
        // Already deleting: a shorter grace period (0: at once) takes over.
        let running = meta["deletionGracePeriodSeconds"].as_i64().unwrap_or(0);
        if let Some(asked) = options.grace_period_seconds.filter(|g| *g < running) {
            meta["deletionGracePeriodSeconds"] = json!(asked);
            meta["deletionTimestamp"] = json!(stamp(now + chrono::TimeDelta::seconds(asked)));
        }
    } else {
        let grace = if kind == Kind::Pod { pod_grace(&existing.body, options.grace_period_seconds) } else { None };
        if grace.is_none() && finalizers_empty(kind, &object) {
            return remove(api, kind, existing, Some(existing.resource_version)).await;
        }
        let meta = &mut object["metadata"];
        meta["deletionTimestamp"] = json!(stamp(now + chrono::TimeDelta::seconds(grace.unwrap_or(0))));
        meta["deletionGracePeriodSeconds"] = json!(grace.unwrap_or(0));
        if kind == Kind::Namespace {
            object["status"]["phase"] = json!("Terminating");
        }
    }
    if removable(kind, &object) {
        return remove(api, kind, existing, Some(existing.resource_version)).await;
    }
    if object == existing.body {
        return Ok((200, object));
    }
    match api.store.put_object(&stored(kind, &existing.namespace, object), Some(existing.resource_version)).await? {
        ObjectWrite::Written(written) => {
            api.publish(WatchEvent {
                rv: written.resource_version,
                kind,
                namespace: existing.namespace.clone(),
                event_type: "MODIFIED",
                object: written.body.clone(),
            });
            Ok((200, written.body))
        }
        ObjectWrite::Conflict { .. } => Err(ApiError::conflict(&kind.qualified(), &existing.name, STALE)),
    }
}

/// `POST pods/NAME/binding`: assigns an unscheduled Pod to a node (what a scheduler
/// does), setting `spec.nodeName` and the PodScheduled condition.
async fn bind(api: &KubeApi, ns: &str, name: &str, query: &Query, body: &Bytes) -> Result<Response, ApiError> {
    let binding = parse_json(body)?;
    let Some(node) = binding["target"]["name"].as_str().filter(|n| !n.is_empty()) else {
        return Err(ApiError::new(422, "Invalid", "Binding: target.name: Required value: the node to bind to"));
    };
    let _guard = api.write_lock.lock().await;
    let existing = current(api, Kind::Pod, ns, name).await?;
    if let Some(assigned) = existing.body["spec"]["nodeName"].as_str().filter(|n| !n.is_empty()) {
        return Err(ApiError::conflict(
            &Kind::Pod.qualified(),
            name,
            &format!("pod {name} is already assigned to node \"{assigned}\""),
        ));
    }
    if existing.deletion_timestamp.is_some() {
        return Err(ApiError::conflict(&Kind::Pod.qualified(), name, "the pod is being deleted"));
    }
    let mut pod = existing.body.clone();
    pod["spec"]["nodeName"] = json!(node);
    let mut conditions: Vec<Value> = pod["status"]["conditions"].as_array().cloned().unwrap_or_default();
    conditions.retain(|c| c["type"] != "PodScheduled");
    conditions.push(json!({"type": "PodScheduled", "status": "True", "lastProbeTime": null,
        "lastTransitionTime": now_rfc3339()}));
    pod["status"]["conditions"] = json!(conditions);
    commit(api, Kind::Pod, ns, Some(&existing), pod, query).await?;
    Ok(json_response(
        201,
        &json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success", "code": 201}),
    ))
}

/// Writes `object` over `existing` as a controller does (the write lock held): no
/// resourceVersion precondition beyond the one read, no immutability checks (a
/// controller only removes finalizers and ownerReferences).
pub(super) async fn write_locked(
    api: &KubeApi,
    kind: Kind,
    existing: &StoredObject,
    object: Value,
) -> Result<(u16, Value), ApiError> {
    commit(api, kind, &existing.namespace.clone(), Some(existing), object, &Query::default()).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_name_collections_items_and_subresources() {
        let parse = |group: &str, path: &str| {
            let segments: Vec<&str> = path.split('/').collect();
            format!("{:?}", parse_target(group, &segments))
        };
        assert_eq!(parse("", "pods"), format!("{:?}", Some(Target::Collection { kind: Kind::Pod, ns: None })));
        assert!(parse("", "namespaces/default/pods/p/log").contains("sub: [\"log\"]"));
        assert!(
            parse("", "namespaces/default").contains("Namespace")
                && parse("", "namespaces/default").contains("name: \"default\"")
        );
        assert!(parse("", "namespaces/default/status").contains("sub: [\"status\"]"));
        assert!(parse("", "nodes/local").contains("Node"));
        // Custom resources are not core: this names namespace `default`'s (unknown) subresource.
        assert!(parse("", "namespaces/default/workspaces").contains("kind: Namespace"));
        assert!(parse("molecule.ai", "namespaces/default/workspaces/a").contains("Workspace"));
    }

    #[test]
    fn pods_bound_to_a_node_wait_for_it_when_deleted() {
        let pod = |node: &str, phase: &str| json!({"spec": {"nodeName": node}, "status": {"phase": phase}});
        assert_eq!(pod_grace(&pod("local", "Running"), None), Some(30));
        assert_eq!(pod_grace(&pod("local", "Running"), Some(0)), None, "a forced delete");
        assert_eq!(pod_grace(&pod("", "Pending"), None), None, "no node to wait for");
        assert_eq!(pod_grace(&pod("local", "Succeeded"), None), None, "nothing runs any more");
    }

    #[test]
    fn strategic_merge_directives_are_dropped() {
        let mut patch = json!({"$setElementOrder/finalizers": [{"x": 1}], "metadata": {"$retainKeys": ["a"], "labels": {"a": "b"}}});
        strip_directives(&mut patch);
        assert_eq!(patch, json!({"metadata": {"labels": {"a": "b"}}}));
    }
}
