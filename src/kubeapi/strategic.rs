//! Strategic merge patch for the core kinds (`application/strategic-merge-patch+json`),
//! what `kubectl apply` (client-side) and `kubectl edit` send for built-in types: a
//! JSON merge patch, except that lists with a merge key (containers by name, env by
//! name, ownerReferences by uid, ...) are merged element by element, lists of
//! primitives with the merge strategy (finalizers) are unions, and the directives
//! `$patch` (replace/delete/merge), `$setElementOrder/<list>`,
//! `$deleteFromPrimitiveList/<list>` and `$retainKeys` are honoured. Lists not in
//! [`list_strategy`] are atomic (replaced whole), as their Go types declare.
//! (The custom resources have no patch strategies; objects.rs applies their
//! strategic patches as merge patches, directives dropped.)

use serde_json::{Map, Value};

use super::Kind;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ListStrategy {
    Atomic,
    MergeByKey(&'static str),
    MergePrimitives,
}

/// The patch strategy of the list at `path` (field names joined by '.', no indices)
/// in an object of `kind`, from the Go types' `patchStrategy`/`patchMergeKey` tags.
fn list_strategy(kind: Kind, path: &str) -> ListStrategy {
    use ListStrategy::*;
    match path {
        "metadata.finalizers" => return MergePrimitives,
        "metadata.ownerReferences" => return MergeByKey("uid"),
        _ => {}
    }
    let containers = ["spec.containers", "spec.initContainers", "spec.ephemeralContainers"];
    match kind {
        Kind::Pod => {
            if containers.contains(&path) {
                return MergeByKey("name");
            }
            if let Some(field) = containers.iter().find_map(|c| path.strip_prefix(c)?.strip_prefix('.')) {
                return match field {
                    "ports" => MergeByKey("containerPort"),
                    "env" => MergeByKey("name"),
                    "volumeMounts" => MergeByKey("mountPath"),
                    "volumeDevices" => MergeByKey("devicePath"),
                    _ => Atomic,
                };
            }
            match path {
                "spec.volumes" | "spec.imagePullSecrets" | "spec.resourceClaims" | "spec.schedulingGates" => {
                    MergeByKey("name")
                }
                "spec.hostAliases" => MergeByKey("ip"),
                "spec.topologySpreadConstraints" => MergeByKey("topologyKey"),
                "status.conditions" => MergeByKey("type"),
                "status.podIPs" | "status.hostIPs" => MergeByKey("ip"),
                _ => Atomic,
            }
        }
        Kind::Service if path == "spec.ports" => MergeByKey("port"),
        Kind::Node if matches!(path, "status.conditions" | "status.addresses") => MergeByKey("type"),
        Kind::Node if path == "spec.taints" => MergeByKey("key"),
        Kind::PersistentVolumeClaim | Kind::Namespace | Kind::Service if path == "status.conditions" => {
            MergeByKey("type")
        }
        _ => Atomic,
    }
}

/// Applies `patch` to `target` (an object of `kind`). Err when the patch is not an
/// object or misuses a directive.
pub fn apply(kind: Kind, target: &mut Value, patch: &Value) -> Result<(), String> {
    let Value::Object(patch) = patch else {
        return Err("a strategic merge patch must be a JSON object".into());
    };
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    if let Some(replaced) = merge_map(kind, target, patch, "")? {
        *target = replaced.unwrap_or_else(|| Value::Object(Map::new()));
    }
    Ok(())
}

fn join(path: &str, key: &str) -> String {
    if path.is_empty() { key.to_string() } else { format!("{path}.{key}") }
}

/// A patch value with every directive removed (what is stored when nothing merges).
fn strip(value: &Value) -> Value {
    match value {
        Value::Object(map) => Value::Object(
            map.iter()
                .filter(|(k, v)| !k.starts_with('$') && !is_directive_only(v))
                .map(|(k, v)| (k.clone(), strip(v)))
                .collect(),
        ),
        Value::Array(items) => Value::Array(items.iter().filter(|v| !is_directive_only(v)).map(strip).collect()),
        other => other.clone(),
    }
}

/// `{"$patch": "replace"}` and the like: an element that only carries a directive.
fn is_directive_only(value: &Value) -> bool {
    value.as_object().is_some_and(|m| !m.is_empty() && m.keys().all(|k| k.starts_with('$')))
}

/// Merges `patch` into the object `target`. Returns Some(new) when a `$patch`
/// directive replaces (Some(Some(v))) or deletes (Some(None)) the whole map.
fn merge_map(
    kind: Kind,
    target: &mut Value,
    patch: &Map<String, Value>,
    path: &str,
) -> Result<Option<Option<Value>>, String> {
    match patch.get("$patch").and_then(Value::as_str) {
        Some("replace") => return Ok(Some(Some(strip(&Value::Object(patch.clone()))))),
        Some("delete") => return Ok(Some(None)),
        Some("merge") | None => {}
        Some(other) => return Err(format!("{path}: unknown $patch directive {other:?}")),
    }
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    // Deletions from primitive lists apply to the original, before the lists merge.
    for (key, value) in patch {
        if let Some(field) = key.strip_prefix("$deleteFromPrimitiveList/") {
            let doomed = value.as_array().cloned().unwrap_or_default();
            if let Some(Value::Array(items)) = target.get_mut(field) {
                items.retain(|v| !doomed.contains(v));
            }
        }
    }
    let mut orders: Vec<(String, Vec<Value>)> = Vec::new();
    for (key, value) in patch {
        if let Some(field) = key.strip_prefix("$setElementOrder/") {
            orders.push((field.to_string(), value.as_array().cloned().unwrap_or_default()));
            continue;
        }
        if key.starts_with('$') {
            continue;
        }
        let child_path = join(path, key);
        let map = target.as_object_mut().expect("made an object above");
        match value {
            Value::Null => {
                map.remove(key);
            }
            Value::Object(child) => {
                let slot = map.entry(key.clone()).or_insert_with(|| Value::Object(Map::new()));
                if !slot.is_object() {
                    *slot = Value::Object(Map::new());
                }
                match merge_map(kind, slot, child, &child_path)? {
                    Some(Some(replaced)) => *slot = replaced,
                    Some(None) => {
                        map.remove(key);
                    }
                    None => {}
                }
            }
            Value::Array(items) => {
                let merged = match list_strategy(kind, &child_path) {
                    ListStrategy::Atomic => strip(value),
                    ListStrategy::MergePrimitives => {
                        let mut out = map.get(key).and_then(Value::as_array).cloned().unwrap_or_default();
                        for item in items.iter().filter(|i| !is_directive_only(i)) {
                            if !out.contains(item) {
                                out.push(item.clone());
                            }
                        }
                        Value::Array(out)
                    }
                    ListStrategy::MergeByKey(merge_key) => {
                        let existing = map.get(key).and_then(Value::as_array).cloned().unwrap_or_default();
                        Value::Array(merge_list(kind, existing, items, merge_key, &child_path)?)
                    }
                };
                map.insert(key.clone(), merged);
            }
            other => {
                map.insert(key.clone(), other.clone());
            }
        }
    }
    for (field, order) in orders {
        let key_of = |v: &Value| match list_strategy(kind, &join(path, &field)) {
            ListStrategy::MergeByKey(k) => v.get(k).cloned(),
            _ => Some(v.clone()),
        };
        if let Some(Value::Array(items)) = target.get_mut(&field) {
            let wanted: Vec<Value> = order.iter().filter_map(key_of).collect();
            let position = |v: &Value| key_of(v).and_then(|k| wanted.iter().position(|w| *w == k));
            // Stable: listed elements in the given order, the others after them as they were.
            items.sort_by_key(|v| position(v).unwrap_or(usize::MAX));
        }
    }
    if let Some(retain) = patch.get("$retainKeys").and_then(Value::as_array)
        && let Some(map) = target.as_object_mut()
    {
        map.retain(|k, _| retain.iter().any(|r| r.as_str() == Some(k)));
    }
    Ok(None)
}

fn merge_list(
    kind: Kind,
    mut existing: Vec<Value>,
    patch: &[Value],
    merge_key: &str,
    path: &str,
) -> Result<Vec<Value>, String> {
    if patch.iter().any(|p| p.get("$patch").and_then(Value::as_str) == Some("replace") && is_directive_only(p)) {
        return Ok(patch.iter().filter(|p| !is_directive_only(p)).map(strip).collect());
    }
    for element in patch {
        let Some(element_map) = element.as_object() else {
            return Err(format!("{path}: an element of a list merged by {merge_key:?} must be an object"));
        };
        let key = element_map.get(merge_key).cloned();
        let found = key.as_ref().and_then(|k| existing.iter().position(|e| e.get(merge_key) == Some(k)));
        if element_map.get("$patch").and_then(Value::as_str) == Some("delete") {
            if let Some(k) = &key {
                existing.retain(|e| e.get(merge_key) != Some(k));
            }
            continue;
        }
        match found {
            Some(i) => {
                if let Some(replaced) = merge_map(kind, &mut existing[i], element_map, path)? {
                    match replaced {
                        Some(v) => existing[i] = v,
                        None => {
                            existing.remove(i);
                        }
                    }
                }
            }
            None => existing.push(strip(element)),
        }
    }
    Ok(existing)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn patched(kind: Kind, mut target: Value, patch: Value) -> Value {
        apply(kind, &mut target, &patch).expect("the patch applies");
        target
    }

    #[test]
    fn containers_merge_by_name_and_env_by_name() {
        let pod = json!({"spec": {"containers": [
            {"name": "a", "image": "x:1", "env": [{"name": "A", "value": "1"}, {"name": "B", "value": "2"}]},
            {"name": "b", "image": "y:1"}]}});
        // What `kubectl apply` sends when only a's image and one env var changed.
        let patch = json!({"spec": {
            "$setElementOrder/containers": [{"name": "a"}, {"name": "b"}],
            "containers": [{"name": "a", "image": "x:2", "$setElementOrder/env": [{"name": "A"}, {"name": "B"}],
                            "env": [{"name": "B", "value": "3"}]}]}});
        let out = patched(Kind::Pod, pod, patch);
        assert_eq!(
            out["spec"]["containers"],
            json!([
                {"name": "a", "image": "x:2", "env": [{"name": "A", "value": "1"}, {"name": "B", "value": "3"}]},
                {"name": "b", "image": "y:1"}
            ])
        );
    }

    #[test]
    fn delete_and_replace_directives() {
        let pod = json!({"spec": {"volumes": [{"name": "a", "emptyDir": {}}, {"name": "b", "emptyDir": {}}],
            "tolerations": [{"key": "x"}]}, "metadata": {"finalizers": ["f1"], "labels": {"a": "1", "b": "2"}}});
        let patch = json!({
            "spec": {"volumes": [{"name": "a", "$patch": "delete"}], "tolerations": [{"key": "y"}]},
            "metadata": {"finalizers": ["f2"], "labels": {"a": null},
                         "$deleteFromPrimitiveList/finalizers": ["f1"]}});
        let out = patched(Kind::Pod, pod, patch);
        assert_eq!(out["spec"]["volumes"], json!([{"name": "b", "emptyDir": {}}]));
        assert_eq!(out["spec"]["tolerations"], json!([{"key": "y"}]), "an atomic list is replaced");
        assert_eq!(out["metadata"]["labels"], json!({"b": "2"}));
        assert_eq!(out["metadata"]["finalizers"], json!(["f2"]), "a union, then the deletion");

        let replaced = patched(
            Kind::Service,
            json!({"spec": {"ports": [{"port": 80}, {"port": 81}]}}),
            json!({"spec": {"ports": [{"$patch": "replace"}, {"port": 90}]}}),
        );
        assert_eq!(replaced["spec"]["ports"], json!([{"port": 90}]));
        let whole = patched(
            Kind::Secret,
            json!({"data": {"a": "YQ==", "b": "Yg=="}}),
            json!({"data": {"$patch": "replace", "c": "Yw=="}}),
        );
        assert_eq!(whole["data"], json!({"c": "Yw=="}));
    }

    #[test]
    fn retain_keys_and_non_object_patches() {
        let out = patched(
            Kind::Pod,
            json!({"spec": {"volumes": [{"name": "v", "emptyDir": {}}]}}),
            json!({"spec": {"volumes": [{"name": "v", "$retainKeys": ["name", "secret"], "secret": {"secretName": "s"}}]}}),
        );
        assert_eq!(out["spec"]["volumes"], json!([{"name": "v", "secret": {"secretName": "s"}}]));
        let mut target = json!({"a": 1});
        assert!(apply(Kind::Pod, &mut target, &json!([1])).is_err());
        assert!(apply(Kind::Pod, &mut target, &json!({"spec": {"containers": [1]}})).is_err());
    }
}
