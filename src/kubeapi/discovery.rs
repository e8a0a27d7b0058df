//! Discovery (/version, /api, /apis, the group and its resources) and OpenAPI v3
//! derived from the CRD schemas. Legacy discovery only: kubectl asks for the
//! aggregated form first and falls back when the answer is plain
//! `application/json`, which is what every answer here is.

use axum::response::Response;
use serde_json::{Value, json};
use sha2::Digest;

use super::{Kind, KubeApi, json_response};
use crate::api::{API_VERSION, GROUP, VERSION};

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

/// The core group holds only events (kept in memory, see events.rs), so that
/// `kubectl describe` and a kube-rs event recorder work.
pub fn core_resources() -> Response {
    let events = json!({"name": "events", "singularName": "event", "namespaced": true, "kind": "Event",
        "verbs": ["create", "get", "list", "patch"], "shortNames": ["ev"]});
    json_response(
        200,
        &json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": "v1", "resources": [events]}),
    )
}

fn group_json() -> Value {
    let version = json!({"groupVersion": API_VERSION, "version": VERSION});
    json!({"name": GROUP, "versions": [version.clone()], "preferredVersion": version})
}

pub fn groups() -> Response {
    json_response(200, &json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": [group_json()]}))
}

pub fn group() -> Response {
    let mut group = group_json();
    group["kind"] = json!("APIGroup");
    group["apiVersion"] = json!("v1");
    json_response(200, &group)
}

pub fn resources() -> Response {
    let mut list = Vec::new();
    for kind in Kind::ALL {
        list.push(json!({
            "name": kind.plural(),
            "singularName": kind.singular(),
            "namespaced": true,
            "kind": kind.name(),
            "verbs": ["create", "delete", "get", "list", "patch", "update", "watch"],
            "shortNames": [kind.short_name()],
            "categories": ["molecule"],
        }));
        list.push(json!({
            "name": format!("{}/status", kind.plural()),
            "singularName": "",
            "namespaced": true,
            "kind": kind.name(),
            "verbs": ["get", "patch", "update"],
        }));
    }
    json_response(
        200,
        &json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": API_VERSION, "resources": list}),
    )
}

fn gvk(kind: &str) -> Value {
    json!({"group": GROUP, "version": VERSION, "kind": kind})
}

fn schema_name(kind: &str) -> String {
    // Reverse-DNS of the group, as the API server names CRD schemas.
    format!("ai.molecule.{VERSION}.{kind}")
}

/// The OpenAPI v3 document of molecule.ai/v1alpha1: a schema per kind (with
/// `x-kubernetes-group-version-kind`, which `kubectl explain` looks for) and the
/// paths, whose PATCH operations declare `fieldValidation` so kubectl leaves
/// validation to this server (strict: unknown fields are rejected).
fn openapi_document(api: &KubeApi) -> Value {
    let mut schemas = serde_json::Map::new();
    let mut paths = serde_json::Map::new();
    let param = |name: &str, kind: &str| json!({"name": name, "in": "query", "schema": {"type": kind}});
    let path_param = |name: &str| json!({"name": name, "in": "path", "required": true, "schema": {"type": "string"}});
    for kind in Kind::ALL {
        let mut schema = api.info(kind).schema.clone();
        schema["x-kubernetes-group-version-kind"] = json!([gvk(kind.name())]);
        schemas.insert(schema_name(kind.name()), schema);
        let list_kind = format!("{}List", kind.name());
        schemas.insert(
            schema_name(&list_kind),
            json!({
                "type": "object",
                "required": ["items"],
                "properties": {
                    "apiVersion": {"type": "string"},
                    "kind": {"type": "string"},
                    "metadata": {"type": "object"},
                    "items": {"type": "array", "items": {"$ref": format!("#/components/schemas/{}", schema_name(kind.name()))}},
                },
                "x-kubernetes-group-version-kind": [gvk(&list_kind)],
            }),
        );
        let one = json!({"content": {"application/json": {"schema": {"$ref": format!("#/components/schemas/{}", schema_name(kind.name()))}}}});
        let write_params =
            json!([param("dryRun", "string"), param("fieldManager", "string"), param("fieldValidation", "string")]);
        let op = |action: &str, extra: &Value| {
            let mut params = vec![path_param("namespace")];
            params.extend(extra.as_array().cloned().unwrap_or_default());
            json!({
                "operationId": format!("{action}Namespaced{}", kind.name()),
                "x-kubernetes-action": action,
                "x-kubernetes-group-version-kind": gvk(kind.name()),
                "parameters": params,
                "responses": {"200": {"description": "OK", "content": one["content"].clone()}},
            })
        };
        let mut patch_params = write_params.as_array().cloned().unwrap_or_default();
        patch_params.push(param("force", "boolean"));
        let patch_params = Value::Array(patch_params);
        let base = format!("/apis/{GROUP}/{VERSION}/namespaces/{{namespace}}/{}", kind.plural());
        paths.insert(base.clone(), json!({"get": op("list", &json!([])), "post": op("post", &write_params)}));
        for suffix in ["/{name}", "/{name}/status"] {
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
            if suffix == "/{name}" {
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
    let hash = document_hash(&openapi_document(api));
    json_response(
        200,
        &json!({"paths": {
            format!("apis/{GROUP}/{VERSION}"): {"serverRelativeURL": format!("/openapi/v3/apis/{GROUP}/{VERSION}?hash={hash}")},
        }}),
    )
}

pub fn openapi_v3(api: &KubeApi) -> Response {
    json_response(200, &openapi_document(api))
}
