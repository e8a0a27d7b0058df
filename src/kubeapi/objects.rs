//! The molecule.ai/v1alpha1 resources: get, list, create, update, patch (merge,
//! JSON, strategic-as-merge, server-side apply), delete with finalizers, and the
//! status subresource. Every write goes through [`commit`], under the server's
//! write lock, so the event history is in resourceVersion order.

use axum::body::Bytes;
use axum::http::{HeaderMap, Method};
use axum::response::Response;
use serde_json::{Value, json};

use super::status::{ApiError, Cause};
use super::{Kind, KubeApi, Query, WatchEvent, json_response, now_rfc3339, schema, table, watch};
use crate::api::{API_VERSION, Team, Workspace, validate};
use crate::store::{ObjectWrite, StoredObject};

const STALE: &str = "the object has been modified; please apply your changes to the latest version and try again";

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Part {
    Main,
    Status,
}

pub async fn route(
    api: &std::sync::Arc<KubeApi>,
    method: &Method,
    rest: &[&str],
    query: &Query,
    headers: &HeaderMap,
    body: &Bytes,
) -> Result<Response, ApiError> {
    let unknown = || ApiError::not_found_path(&format!("/apis/{API_VERSION}/{}", rest.join("/")));
    match rest {
        [plural] => {
            let kind = Kind::from_plural(plural).ok_or_else(unknown)?;
            match *method {
                Method::GET => list_or_watch(api, kind, None, query, headers).await,
                _ => Err(ApiError::method_not_allowed(format!("{} on all namespaces: only get/list/watch", method))),
            }
        }
        ["namespaces", ns, plural] => {
            let kind = Kind::from_plural(plural).ok_or_else(unknown)?;
            match *method {
                Method::GET => list_or_watch(api, kind, Some(ns), query, headers).await,
                Method::POST => create(api, kind, ns, query, body).await,
                _ => Err(ApiError::method_not_allowed(format!("{method} is not supported on a collection"))),
            }
        }
        ["namespaces", ns, plural, name, sub @ ..] => {
            let kind = Kind::from_plural(plural).ok_or_else(unknown)?;
            let part = match sub {
                [] => Part::Main,
                ["status"] => Part::Status,
                _ => return Err(unknown()),
            };
            match (method.clone(), part) {
                (Method::GET, _) => get(api, kind, ns, name, query, headers).await,
                (Method::PUT, _) => update(api, kind, ns, name, part, query, body).await,
                (Method::PATCH, _) => patch(api, kind, ns, name, part, query, headers, body).await,
                (Method::DELETE, Part::Main) => delete(api, kind, ns, name, body).await,
                _ => Err(ApiError::method_not_allowed(format!("{method} is not supported on the status subresource"))),
            }
        }
        _ => Err(unknown()),
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
    let stored = api
        .store
        .get_object(kind.name(), ns, name)
        .await?
        .ok_or_else(|| ApiError::not_found(&kind.qualified(), name))?;
    if table::wanted(headers) {
        let t = table::table(api, kind, &[&stored.body], stored.resource_version, query.get("includeObject"));
        return Ok(json_response(200, &t));
    }
    Ok(json_response(200, &stored.body))
}

async fn list_or_watch(
    api: &std::sync::Arc<KubeApi>,
    kind: Kind,
    ns: Option<&str>,
    query: &Query,
    headers: &HeaderMap,
) -> Result<Response, ApiError> {
    let selector = Selector::parse(query)?;
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
            "apiVersion": API_VERSION,
            "kind": format!("{}List", kind.name()),
            "metadata": {"resourceVersion": revision.to_string()},
            "items": items,
        }),
    ))
}

/// Label (`a=b`, `a!=b`, `a`, `!a`, `a in (x,y)`, `a notin (x)`) and field
/// (`metadata.name`, `metadata.namespace`) selectors.
#[derive(Clone, Debug, Default)]
pub struct Selector {
    labels: Vec<(String, Op, Vec<String>)>,
    fields: Vec<(String, bool, String)>,
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Op {
    In,
    NotIn,
    Exists,
    NotExists,
}

fn split_top(s: &str) -> Vec<&str> {
    let (mut parts, mut depth, mut start) = (Vec::new(), 0, 0);
    for (i, c) in s.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth == 0 => {
                parts.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(&s[start..]);
    parts.into_iter().map(str::trim).filter(|p| !p.is_empty()).collect()
}

impl Selector {
    fn parse(query: &Query) -> Result<Self, ApiError> {
        let mut selector = Selector::default();
        for req in split_top(query.get("labelSelector").unwrap_or("")) {
            let set = |rest: &str| -> Vec<String> {
                rest.trim()
                    .trim_start_matches('(')
                    .trim_end_matches(')')
                    .split(',')
                    .map(|v| v.trim().to_string())
                    .collect()
            };
            let parsed = if let Some((k, v)) = req.split_once("!=") {
                (k.trim().to_string(), Op::NotIn, vec![v.trim().to_string()])
            } else if let Some((k, v)) = req.split_once("==").or_else(|| req.split_once('=')) {
                (k.trim().to_string(), Op::In, vec![v.trim().to_string()])
            } else if let Some((k, rest)) = req.split_once(" notin ") {
                (k.trim().to_string(), Op::NotIn, set(rest))
            } else if let Some((k, rest)) = req.split_once(" in ") {
                (k.trim().to_string(), Op::In, set(rest))
            } else if let Some(k) = req.strip_prefix('!') {
                (k.trim().to_string(), Op::NotExists, vec![])
            } else if !req.contains([' ', '(', ')']) {
                (req.to_string(), Op::Exists, vec![])
            } else {
                return Err(ApiError::bad_request(format!(
                    "unable to parse requirement {req:?} of the label selector"
                )));
            };
            selector.labels.push(parsed);
        }
        for req in split_top(query.get("fieldSelector").unwrap_or("")) {
            let (field, equal, value) = if let Some((k, v)) = req.split_once("!=") {
                (k, false, v)
            } else if let Some((k, v)) = req.split_once("==").or_else(|| req.split_once('=')) {
                (k, true, v)
            } else {
                return Err(ApiError::bad_request(format!("invalid field selector {req:?}")));
            };
            if !matches!(field.trim(), "metadata.name" | "metadata.namespace") {
                return Err(ApiError::bad_request(format!(
                    "field label not supported: {}: use metadata.name or metadata.namespace",
                    field.trim()
                )));
            }
            selector.fields.push((field.trim().to_string(), equal, value.trim().to_string()));
        }
        Ok(selector)
    }

    pub fn matches(&self, object: &Value) -> bool {
        let labels = &object["metadata"]["labels"];
        let labels_ok = self.labels.iter().all(|(key, op, values)| {
            let value = labels.get(key).and_then(Value::as_str);
            match op {
                Op::Exists => value.is_some(),
                Op::NotExists => value.is_none(),
                Op::In => value.is_some_and(|v| values.iter().any(|x| x == v)),
                Op::NotIn => value.is_none_or(|v| values.iter().all(|x| x != v)),
            }
        });
        labels_ok
            && self.fields.iter().all(|(field, equal, value)| {
                let key = field.trim_start_matches("metadata.");
                (object["metadata"][key].as_str() == Some(value.as_str())) == *equal
            })
    }
}

fn parse_json(body: &Bytes) -> Result<Value, ApiError> {
    serde_json::from_slice(body).map_err(|e| ApiError::bad_request(format!("the request body is not valid JSON: {e}")))
}

fn check_identity(kind: Kind, object: &Value) -> Result<(), ApiError> {
    if object["kind"].as_str().is_some_and(|k| k != kind.name())
        || object["apiVersion"].as_str().is_some_and(|v| v != API_VERSION)
    {
        return Err(ApiError::bad_request(format!(
            "the object is {} {}, but this URL serves {API_VERSION} {}",
            object["apiVersion"].as_str().unwrap_or("?"),
            object["kind"].as_str().unwrap_or("?"),
            kind.name()
        )));
    }
    if !object["metadata"].is_object() {
        return Err(ApiError::bad_request("the object has no metadata"));
    }
    Ok(())
}

/// Schema (types, enums, ranges, unknown fields), name, and the Rust types' own
/// decoding: an object stored here is one the operator can read.
fn validate_object(api: &KubeApi, kind: Kind, object: &Value) -> Result<(), ApiError> {
    let name = object["metadata"]["name"].as_str().unwrap_or("");
    let mut causes = Vec::new();
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
            Kind::Workspace => serde_path_to_error::deserialize::<_, Workspace>(object).map(drop),
            Kind::Team => serde_path_to_error::deserialize::<_, Team>(object).map(drop),
        };
        if let Err(error) = decoded {
            causes.push(Cause {
                field: error.path().to_string(),
                reason: "FieldValueInvalid",
                message: format!("Invalid value: {}", error.inner()),
            });
        }
    }
    if causes.is_empty() { Ok(()) } else { Err(ApiError::invalid(&kind.qualified(), name, causes)) }
}

fn stored(kind: Kind, ns: &str, body: Value) -> StoredObject {
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

fn finalizers_empty(body: &Value) -> bool {
    body["metadata"]["finalizers"].as_array().is_none_or(|f| f.is_empty())
}

/// Validates and writes `object` (None `existing`: a create), publishing the
/// event. Unchanged objects are not rewritten; a deleting object whose last
/// finalizer is gone is removed.
async fn commit(
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
    if let Some(current) = existing.filter(|c| c.deletion_timestamp.is_some() && finalizers_empty(&object)) {
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

async fn remove(
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
fn merge_write(existing: &StoredObject, mut object: Value, part: Part) -> Value {
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
            object["apiVersion"] = json!(API_VERSION);
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
            let generation = old["metadata"]["generation"].as_i64().unwrap_or(1);
            let bumped = if object.get("spec") != old.get("spec") { generation + 1 } else { generation };
            object["metadata"]["generation"] = json!(bumped);
            object
        }
    }
}

async fn create(api: &KubeApi, kind: Kind, ns: &str, query: &Query, body: &Bytes) -> Result<Response, ApiError> {
    let object = parse_json(body)?;
    create_object(api, kind, ns, object, query, None).await.map(respond)
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
    if let Some(other) = meta.get("namespace").and_then(Value::as_str).filter(|n| *n != ns) {
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
    meta.insert("namespace".into(), json!(ns));
    meta.insert("uid".into(), json!(uuid::Uuid::new_v4().to_string()));
    meta.insert("creationTimestamp".into(), json!(now_rfc3339()));
    meta.insert("generation".into(), json!(1));
    for key in ["resourceVersion", "deletionTimestamp", "deletionGracePeriodSeconds", "managedFields", "selfLink"] {
        meta.remove(key);
    }
    if let Some(entry) = managed {
        meta.insert("managedFields".into(), json!([entry]));
    }
    object["apiVersion"] = json!(API_VERSION);
    object["kind"] = json!(kind.name());
    if let Some(map) = object.as_object_mut() {
        // The status subresource is the only way to write status.
        map.remove("status");
    }
    let _guard = api.write_lock.lock().await;
    commit(api, kind, ns, None, object, query).await
}

async fn current(api: &KubeApi, kind: Kind, ns: &str, name: &str) -> Result<StoredObject, ApiError> {
    api.store.get_object(kind.name(), ns, name).await?.ok_or_else(|| ApiError::not_found(&kind.qualified(), name))
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
    let merged = merge_write(&existing, object, part);
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
            strip_directives(&mut patch);
            let mut out = existing.body.clone();
            json_patch::merge(&mut out, &patch);
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
                    let entry = managed_entry(query, &owned_fields(&object, 0));
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
                    applied_fields = Some(managed_entry(query, &fields));
                    let mut out = existing.body.clone();
                    json_patch::merge(&mut out, &applied);
                    out
                }
            }
        }
        other => return Err(ApiError::unsupported_media(other)),
    };
    let existing = existing.ok_or_else(|| ApiError::not_found(&kind.qualified(), name))?;
    let mut merged = merge_write(&existing, patched, part);
    if let Some(entry) = applied_fields {
        let mut entries: Vec<Value> = merged["metadata"]["managedFields"].as_array().cloned().unwrap_or_default();
        entries.retain(|e| !(e["manager"] == entry["manager"] && e["operation"] == "Apply"));
        entries.push(entry);
        merged["metadata"]["managedFields"] = Value::Array(entries);
    }
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

fn managed_entry(query: &Query, fields: &Value) -> Value {
    json!({
        "manager": query.get("fieldManager").unwrap_or("unknown"),
        "operation": "Apply",
        "apiVersion": API_VERSION,
        "time": now_rfc3339(),
        "fieldsType": "FieldsV1",
        "fieldsV1": fields,
    })
}

async fn delete(api: &KubeApi, kind: Kind, ns: &str, name: &str, body: &Bytes) -> Result<Response, ApiError> {
    let options: Value = if body.is_empty() { json!({}) } else { parse_json(body)? };
    let _guard = api.write_lock.lock().await;
    let existing = current(api, kind, ns, name).await?;
    let precondition = options["preconditions"]["resourceVersion"].as_str().and_then(|rv| rv.parse::<i64>().ok());
    if precondition.is_some_and(|rv| rv != existing.resource_version) {
        return Err(ApiError::conflict(&kind.qualified(), name, STALE));
    }
    if let Some(uid) = options["preconditions"]["uid"].as_str()
        && uid != existing.uid
    {
        return Err(ApiError::conflict(
            &kind.qualified(),
            name,
            "the UID in the precondition does not match the object",
        ));
    }
    if finalizers_empty(&existing.body) {
        return remove(api, kind, &existing, Some(existing.resource_version)).await.map(respond);
    }
    if existing.deletion_timestamp.is_some() {
        return Ok(json_response(200, &existing.body));
    }
    // Finalizers hold it: mark it deleting; the last finalizer's removal deletes it.
    let mut object = existing.body.clone();
    object["metadata"]["deletionTimestamp"] = json!(now_rfc3339());
    object["metadata"]["deletionGracePeriodSeconds"] = json!(0);
    match api.store.put_object(&stored(kind, ns, object), Some(existing.resource_version)).await? {
        ObjectWrite::Written(written) => {
            api.publish(WatchEvent {
                rv: written.resource_version,
                kind,
                namespace: ns.to_string(),
                event_type: "MODIFIED",
                object: written.body.clone(),
            });
            Ok(json_response(200, &written.body))
        }
        ObjectWrite::Conflict { .. } => Err(ApiError::conflict(&kind.qualified(), name, STALE)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn selector(labels: &str, fields: &str) -> Selector {
        let raw = format!(
            "labelSelector={}&fieldSelector={}",
            labels.replace(' ', "+").replace('=', "%3D").replace(',', "%2C"),
            fields.replace('=', "%3D")
        );
        Selector::parse(&Query::parse(&raw)).expect("the selector parses")
    }

    #[test]
    fn label_and_field_selectors_match_like_the_api_server() {
        let ws = json!({"metadata": {"name": "a", "namespace": "default", "labels": {"team": "eng", "tier": "1"}}});
        for (labels, fields, wanted) in [
            ("team=eng", "", true),
            ("team==eng,tier=1", "", true),
            ("team!=eng", "", false),
            ("team", "", true),
            ("!team", "", false),
            ("!missing", "", true),
            ("tier in (1,2)", "", true),
            ("tier notin (1,2)", "", false),
            ("", "metadata.name=a", true),
            ("", "metadata.name=b", false),
            ("team=eng", "metadata.namespace!=default", false),
        ] {
            assert_eq!(selector(labels, fields).matches(&ws), wanted, "{labels:?} {fields:?}");
        }
        let unsupported = Query::parse("fieldSelector=spec.team%3Deng");
        assert_eq!(Selector::parse(&unsupported).unwrap_err().code, 400);
    }

    #[test]
    fn strategic_merge_directives_are_dropped() {
        let mut patch = json!({"$setElementOrder/finalizers": [{"x": 1}], "metadata": {"$retainKeys": ["a"], "labels": {"a": "b"}}});
        strip_directives(&mut patch);
        assert_eq!(patch, json!({"metadata": {"labels": {"a": "b"}}}));
    }
}
