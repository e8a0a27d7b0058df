//! Discovery (/version, /api, /apis, the group and its resources) and OpenAPI v3:
//! the molecule.ai kinds with their CRD schemas, the core kinds with open schemas
//! (validation is the server's: decoding into the k8s-openapi types). Legacy
//! discovery only: kubectl asks for the aggregated form first and falls back when
//! the answer is plain `application/json`, which is what every answer here is.
//!
//! The core kinds' PATCH operations declare `fieldValidation` (so kubectl leaves
//! validation to this server) but no request body: kubectl then computes its
//! strategic merge patches from its own built-in types, with their merge keys,
//! which strategic.rs applies.

use axum::response::Response;
use serde_json::{Value, json};
use sha2::Digest;

use super::{Kind, KubeApi, json_response};
use crate::api::{API_VERSION, GROUP, VERSION};

/// What discovery says each stored kind supports.
const VERBS: [&str; 8] = ["create", "delete", "deletecollection", "get", "list", "patch", "update", "watch"];

fn resource(kind: Kind) -> Value {
    let verbs: Vec<&str> = VERBS.into_iter().filter(|v| *v != "deletecollection").collect();
    let mut resource = json!({
        "name": kind.plural(),
        "singularName": kind.singular(),
        "namespaced": kind.namespaced(),
        "kind": kind.name(),
        "verbs": verbs,
        "shortNames": kind.short_names(),
    });
    if !kind.is_core() {
        resource["categories"] = json!(["molecule"]);
    } else if matches!(kind, Kind::Pod | Kind::Service) {
        // As in a cluster: `kubectl get all` lists them.
        resource["categories"] = json!(["all"]);
    }
    resource
}

fn subresource(kind: Kind, sub: &str, verbs: &[&str], sub_kind: &str) -> Value {
    json!({
        "name": format!("{}/{sub}", kind.plural()),
        "singularName": "",
        "namespaced": kind.namespaced(),
        "kind": sub_kind,
        "verbs": verbs,
    })
}

pub fn version() -> Response {
    json_response(
        200,
        &json!({
            "major": "1",
            "minor": "32",
            "gitVersion": format!("v1.32.0+molecule-{}", env!("CARGO_PKG_VERSION")),
            "gitCommit": "",
            "gitTreeState": "clean",
            "buildDate": "1970-01-01T00:00:00Z",
            "goVersion": "rust",
            "compiler": "rustc",
            "platform": format!("{}/{}", std::env::consts::OS, std::env::consts::ARCH),
        }),
    )
}

pub fn core_versions() -> Response {
    json_response(
        200,
        &json!({
            "kind": "APIVersions",
            "versions": ["v1"],
            "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": "127.0.0.1"}],
        }),
    )
}

/// The core group: the stored core kinds with their subresources, and events
/// (kept in memory, see events.rs) so that `kubectl describe` and a kube-rs event
/// recorder work.
pub fn core_resources() -> Response {
    let mut list = vec![json!({"name": "events", "singularName": "event", "namespaced": true, "kind": "Event",
        "verbs": ["create", "get", "list", "patch"], "shortNames": ["ev"]})];
    for kind in Kind::CORE {
        list.push(resource(kind));
        if kind.has_status() {
            list.push(subresource(kind, "status", &["get", "patch", "update"], kind.name()));
        }
    }
    list.push(subresource(Kind::Pod, "log", &["get"], "Pod"));
    list.push(subresource(Kind::Pod, "binding", &["create"], "Binding"));
    json_response(200, &json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": "v1", "resources": list}))
}

fn group_json() -> Value {
    let version = json!({"groupVersion": API_VERSION, "version": VERSION});
    json!({"name": GROUP, "versions": [version.clone()], "preferredVersion": version})
}

/// coordination.k8s.io, for the Leases of leader election (leases.rs).
const COORDINATION: &str = "coordination.k8s.io";

fn coordination_json() -> Value {
    let version = json!({"groupVersion": format!("{COORDINATION}/v1"), "version": "v1"});
    json!({"name": COORDINATION, "versions": [version.clone()], "preferredVersion": version})
}

pub fn groups() -> Response {
    json_response(
        200,
        &json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": [group_json(), coordination_json()]}),
    )
}

/// `/apis/coordination.k8s.io`.
pub fn coordination_group() -> Response {
    let mut group = coordination_json();
    group["kind"] = json!("APIGroup");
    group["apiVersion"] = json!("v1");
    json_response(200, &group)
}

/// `/apis/coordination.k8s.io/v1`: Leases (namespaced; no watch is served).
pub fn coordination_resources() -> Response {
    let lease = json!({"name": "leases", "singularName": "lease", "namespaced": true, "kind": "Lease",
        "verbs": ["create", "delete", "get", "list", "patch", "update"]});
    json_response(
        200,
        &json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": format!("{COORDINATION}/v1"),
            "resources": [lease]}),
    )
}

pub fn group() -> Response {
    let mut group = group_json();
    group["kind"] = json!("APIGroup");
    group["apiVersion"] = json!("v1");
    json_response(200, &group)
}

pub fn resources() -> Response {
    let mut list = Vec::new();
    for kind in Kind::MOLECULE {
        list.push(resource(kind));
        list.push(subresource(kind, "status", &["get", "patch", "update"], kind.name()));
    }
    json_response(
        200,
        &json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": API_VERSION, "resources": list}),
    )
}

fn gvk(group: &str, kind: &str) -> Value {
    let version = if group.is_empty() { "v1" } else { VERSION };
    json!({"group": group, "version": version, "kind": kind})
}

fn schema_name(group: &str, kind: &str) -> String {
    // Reverse-DNS of the group, as the API server names its schemas.
    if group.is_empty() { format!("io.k8s.api.core.v1.{kind}") } else { format!("ai.molecule.{VERSION}.{kind}") }
}

/// The OpenAPI v3 document of one group version (molecule.ai/v1alpha1, or core v1
/// when `group` is ""): a schema per kind (with `x-kubernetes-group-version-kind`,
/// which `kubectl explain` looks for) and the paths, whose PATCH operations declare
/// `fieldValidation` so kubectl leaves validation to this server (strict: unknown
/// fields are rejected).
fn openapi_document(api: &KubeApi, group: &str) -> Value {
    let mut schemas = serde_json::Map::new();
    let mut paths = serde_json::Map::new();
    let param = |name: &str, kind: &str| json!({"name": name, "in": "query", "schema": {"type": kind}});
    let path_param = |name: &str| json!({"name": name, "in": "path", "required": true, "schema": {"type": "string"}});
    let kinds: Vec<Kind> = Kind::ALL.into_iter().filter(|k| k.group() == group).collect();
    for kind in kinds {
        let mut schema = if kind.is_core() {
            json!({"type": "object", "description": format!("{} (core/v1): validated by the server", kind.name()),
                "x-kubernetes-preserve-unknown-fields": true})
        } else {
            api.info(kind).schema.clone()
        };
        schema["x-kubernetes-group-version-kind"] = json!([gvk(group, kind.name())]);
        schemas.insert(schema_name(group, kind.name()), schema);
        let list_kind = format!("{}List", kind.name());
        schemas.insert(
            schema_name(group, &list_kind),
            json!({
                "type": "object",
                "required": ["items"],
                "properties": {
                    "apiVersion": {"type": "string"},
                    "kind": {"type": "string"},
                    "metadata": {"type": "object"},
                    "items": {"type": "array", "items": {"$ref": format!("#/components/schemas/{}", schema_name(group, kind.name()))}},
                },
                "x-kubernetes-group-version-kind": [gvk(group, &list_kind)],
            }),
        );
        let one = json!({"content": {"application/json": {"schema": {"$ref": format!("#/components/schemas/{}", schema_name(group, kind.name()))}}}});
        let write_params =
            json!([param("dryRun", "string"), param("fieldManager", "string"), param("fieldValidation", "string")]);
        let scope = if kind.namespaced() { "Namespaced" } else { "" };
        let op = |action: &str, extra: &Value| {
            let mut params = if kind.namespaced() { vec![path_param("namespace")] } else { vec![] };
            params.extend(extra.as_array().cloned().unwrap_or_default());
            json!({
                "operationId": format!("{action}{scope}{}", kind.name()),
                "x-kubernetes-action": action,
                "x-kubernetes-group-version-kind": gvk(group, kind.name()),
                "parameters": params,
                "responses": {"200": {"description": "OK", "content": one["content"].clone()}},
            })
        };
        let mut patch_params = write_params.as_array().cloned().unwrap_or_default();
        patch_params.push(param("force", "boolean"));
        let patch_params = Value::Array(patch_params);
        let prefix = if group.is_empty() { "/api/v1".to_string() } else { format!("/apis/{GROUP}/{VERSION}") };
        let base = if kind.namespaced() {
            format!("{prefix}/namespaces/{{namespace}}/{}", kind.plural())
        } else {
            format!("{prefix}/{}", kind.plural())
        };
        paths.insert(base.clone(), json!({"get": op("list", &json!([])), "post": op("post", &write_params)}));
        let suffixes: &[&str] = if kind.has_status() { &["/{name}", "/{name}/status"] } else { &["/{name}"] };
        for suffix in suffixes {
            let mut item = json!({
                "get": op("get", &json!([path_param("name")])),
                "put": op("put", &json!([path_param("name")])),
                "patch": op("patch", &json!([path_param("name")])),
            });
            for (verb, extra) in [("put", &write_params), ("patch", &patch_params)] {
                if let Some(params) = item[verb]["parameters"].as_array_mut() {
                    params.extend(extra.as_array().cloned().unwrap_or_default());
                }
            }
            if *suffix == "/{name}" {
                item["delete"] = op("delete", &json!([path_param("name")]));
            }
            paths.insert(format!("{base}{suffix}"), item);
        }
    }
    json!({
        "openapi": "3.0.0",
        "info": {"title": "molecule-operator", "version": env!("CARGO_PKG_VERSION")},
        "paths": paths,
        "components": {"schemas": schemas},
    })
}

fn document_hash(doc: &Value) -> String {
    let digest = sha2::Sha256::digest(serde_json::to_vec(doc).unwrap_or_default());
    hex::encode(&digest[..16])
}

pub fn openapi_index(api: &KubeApi) -> Response {
    let molecule = document_hash(&openapi_document(api, GROUP));
    let core = document_hash(&openapi_document(api, ""));
    json_response(
        200,
        &json!({"paths": {
            format!("apis/{GROUP}/{VERSION}"): {"serverRelativeURL": format!("/openapi/v3/apis/{GROUP}/{VERSION}?hash={molecule}")},
            "api/v1": {"serverRelativeURL": format!("/openapi/v3/api/v1?hash={core}")},
        }}),
    )
}

/// The document of molecule.ai (`group` = GROUP) or of core v1 (`group` = "").
pub fn openapi_v3(api: &KubeApi, group: &str) -> Response {
    json_response(200, &openapi_document(api, group))
}
