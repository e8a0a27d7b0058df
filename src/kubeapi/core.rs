//! The API server's own rules for the core/v1 kinds, as pure functions over JSON:
//! conversions and defaults applied on every write ([`normalize`]), validation
//! ([`validate`]: decoding into the k8s-openapi types, fields those types do not
//! know, and the checks a real API server makes that the runtime relies on),
//! immutability on update ([`validate_update`]), and what a create adds
//! ([`admit_create`]: initial status, the PVC protection finalizer, a namespace's
//! finalizer). A real API server does more; what is left out is listed in mod.rs.
//!
//! Secrets: `stringData` is folded into `data` (base64) here, before anything is
//! stored, and no message about a Secret's data ever quotes a value.

use std::collections::BTreeSet;

use base64::Engine;
use serde_json::{Value, json};

use super::Kind;
use super::quantity;
use super::status::Cause;
use crate::api::validate::{dns_subdomain, dns1123_label};

/// The finalizer the API adds to every PVC; the protection controller (gc.rs)
/// removes it once no Pod uses the claim.
pub const PVC_PROTECTION: &str = "kubernetes.io/pvc-protection";
/// A namespace's own finalizer (in `spec.finalizers`): its content is deleted first.
pub const NAMESPACE_FINALIZER: &str = "kubernetes";
/// Namespaces a real cluster refuses to delete.
pub const UNDELETABLE_NAMESPACES: [&str; 2] = ["default", "kube-system"];

fn cause(field: impl Into<String>, reason: &'static str, message: impl Into<String>) -> Cause {
    Cause { field: field.into(), reason, message: message.into() }
}

/// Conversions and defaults, as the API server applies them on every write.
pub fn normalize(kind: Kind, object: &mut Value) {
    match kind {
        Kind::Secret => normalize_secret(object),
        Kind::Pod => default_pod(object),
        Kind::PersistentVolumeClaim if object["spec"].is_object() => {
            object["spec"].as_object_mut().expect("checked").entry("volumeMode").or_insert(json!("Filesystem"));
        }
        Kind::Service => default_service(object),
        Kind::Namespace => {
            if !object["spec"].is_object() {
                object["spec"] = json!({});
            }
            object["spec"]
                .as_object_mut()
                .expect("made an object")
                .entry("finalizers")
                .or_insert(json!([NAMESPACE_FINALIZER]));
        }
        _ => {}
    }
}

fn normalize_secret(object: &mut Value) {
    let Some(map) = object.as_object_mut() else { return };
    if let Some(Value::Object(strings)) = map.remove("stringData") {
        let data = map.entry("data").or_insert_with(|| json!({}));
        if !data.is_object() {
            *data = json!({});
        }
        for (key, value) in strings {
            // A non-string value is left for validation to refuse (without quoting it).
            let encoded = match &value {
                Value::String(text) => json!(base64::engine::general_purpose::STANDARD.encode(text)),
                _ => value,
            };
            data[key] = encoded;
        }
    }
    let typ = map.entry("type").or_insert(json!("Opaque"));
    if typ == "" {
        *typ = json!("Opaque");
    }
}

/// `Always` for `:latest` or an untagged image, else `IfNotPresent` (Kubernetes' rule).
pub fn default_pull_policy(image: &str) -> &'static str {
    let last = image.rsplit('/').next().unwrap_or(image);
    let tag = if image.contains('@') { None } else { last.split_once(':').map(|(_, t)| t) };
    match tag {
        None | Some("latest") if !image.contains('@') => "Always",
        _ => "IfNotPresent",
    }
}

fn default_pod(pod: &mut Value) {
    let Some(spec) = pod.get_mut("spec").and_then(Value::as_object_mut) else { return };
    for (key, value) in [
        ("restartPolicy", json!("Always")),
        ("terminationGracePeriodSeconds", json!(30)),
        ("dnsPolicy", json!("ClusterFirst")),
        ("schedulerName", json!("default-scheduler")),
        ("securityContext", json!({})),
        ("enableServiceLinks", json!(true)),
        ("priority", json!(0)),
        ("preemptionPolicy", json!("PreemptLowerPriority")),
    ] {
        spec.entry(key).or_insert(value);
    }
    for list in ["containers", "initContainers"] {
        let Some(containers) = spec.get_mut(list).and_then(Value::as_array_mut) else { continue };
        for container in containers.iter_mut().filter_map(Value::as_object_mut) {
            let policy = default_pull_policy(container.get("image").and_then(Value::as_str).unwrap_or(""));
            container.entry("imagePullPolicy").or_insert(json!(policy));
            container.entry("terminationMessagePath").or_insert(json!("/dev/termination-log"));
            container.entry("terminationMessagePolicy").or_insert(json!("File"));
            let resources = container.entry("resources").or_insert(json!({}));
            // Requests default to limits.
            if let Some(limits) = resources.get("limits").and_then(Value::as_object).cloned()
                && let Some(resources) = resources.as_object_mut()
            {
                let requests = resources.entry("requests").or_insert(json!({}));
                if let Some(requests) = requests.as_object_mut() {
                    for (name, value) in limits {
                        requests.entry(name).or_insert(value);
                    }
                }
            }
            if let Some(ports) = container.get_mut("ports").and_then(Value::as_array_mut) {
                for port in ports.iter_mut().filter_map(Value::as_object_mut) {
                    port.entry("protocol").or_insert(json!("TCP"));
                }
            }
            if let Some(env) = container.get_mut("env").and_then(Value::as_array_mut) {
                for var in env.iter_mut() {
                    if let Some(field_ref) = var.pointer_mut("/valueFrom/fieldRef").and_then(Value::as_object_mut) {
                        field_ref.entry("apiVersion").or_insert(json!("v1"));
                    }
                }
            }
        }
    }
    if let Some(volumes) = spec.get_mut("volumes").and_then(Value::as_array_mut) {
        for volume in volumes.iter_mut().filter_map(Value::as_object_mut) {
            if let Some(secret) = volume.get_mut("secret").and_then(Value::as_object_mut) {
                secret.entry("defaultMode").or_insert(json!(0o644));
            }
        }
    }
}

fn default_service(service: &mut Value) {
    let Some(spec) = service.get_mut("spec").and_then(Value::as_object_mut) else { return };
    spec.entry("type").or_insert(json!("ClusterIP"));
    spec.entry("sessionAffinity").or_insert(json!("None"));
    spec.entry("internalTrafficPolicy").or_insert(json!("Cluster"));
    if let Some(ports) = spec.get_mut("ports").and_then(Value::as_array_mut) {
        for port in ports.iter_mut().filter_map(Value::as_object_mut) {
            port.entry("protocol").or_insert(json!("TCP"));
            if let Some(number) = port.get("port").cloned() {
                port.entry("targetPort").or_insert(number);
            }
        }
    }
}

/// Everything wrong with `object` (already normalized), each with its field path.
pub fn validate(kind: Kind, object: &Value) -> Vec<Cause> {
    let name = object["metadata"]["name"].as_str().unwrap_or("");
    let mut causes = Vec::new();
    let named = match kind {
        Kind::Namespace | Kind::Service => dns1123_label(name),
        _ => dns_subdomain(name),
    };
    if let Err(problem) = named {
        causes.push(cause("metadata.name", "FieldValueInvalid", format!("Invalid value: \"{name}\": {problem}")));
    }
    use k8s_openapi::api::core::v1 as core;
    let decoded = match kind {
        Kind::Pod => decode::<core::Pod>(object),
        Kind::Secret => decode::<core::Secret>(object),
        Kind::PersistentVolumeClaim => decode::<core::PersistentVolumeClaim>(object),
        Kind::Service => decode::<core::Service>(object),
        Kind::Namespace => decode::<core::Namespace>(object),
        Kind::Node => decode::<core::Node>(object),
        Kind::Workspace | Kind::Team | Kind::WarmPool => Ok(()),
    };
    match decoded {
        Err(mut problems) => {
            if kind == Kind::Secret {
                // A decoding message may quote a byte of the value: say what is wanted instead.
                for c in problems.iter_mut().filter(|c| c.field.starts_with("data")) {
                    c.message = "Invalid value: a base64-encoded string is required".into();
                }
            }
            causes.extend(problems);
        }
        Ok(()) => match kind {
            Kind::Pod => validate_pod(object, &mut causes),
            Kind::Secret => validate_secret(object, &mut causes),
            Kind::PersistentVolumeClaim => validate_pvc(object, &mut causes),
            Kind::Service => validate_service(object, &mut causes),
            _ => {}
        },
    }
    causes
}

/// Decodes into the k8s-openapi type, then finds the fields that type does not know
/// (strict field validation: serde alone would ignore them).
fn decode<T: serde::de::DeserializeOwned + serde::Serialize>(object: &Value) -> Result<(), Vec<Cause>> {
    let decoded: T = serde_path_to_error::deserialize(object).map_err(|error| {
        vec![cause(error.path().to_string(), "FieldValueInvalid", format!("Invalid value: {}", error.inner()))]
    })?;
    let known = serde_json::to_value(&decoded)
        .map_err(|e| vec![cause("", "FieldValueInvalid", format!("the object does not encode: {e}"))])?;
    let mut causes = Vec::new();
    unknown_fields(object, &known, "", &mut causes);
    if causes.is_empty() { Ok(()) } else { Err(causes) }
}

fn unknown_fields(input: &Value, known: &Value, path: &str, causes: &mut Vec<Cause>) {
    match (input, known) {
        (Value::Object(given), Value::Object(kept)) => {
            for (key, value) in given.iter().filter(|(_, v)| !v.is_null()) {
                let child = if path.is_empty() { key.clone() } else { format!("{path}.{key}") };
                match kept.get(key) {
                    None => causes.push(cause(
                        child,
                        "FieldValueInvalid",
                        format!("Unknown field \"{key}\": it is not declared in the schema (check its spelling)"),
                    )),
                    Some(kept_value) => unknown_fields(value, kept_value, &child, causes),
                }
            }
        }
        (Value::Array(given), Value::Array(kept)) => {
            for (i, (g, k)) in given.iter().zip(kept).enumerate() {
                unknown_fields(g, k, &format!("{path}[{i}]"), causes);
            }
        }
        _ => {}
    }
}

fn items<'a>(value: &'a Value, key: &str) -> impl Iterator<Item = (usize, &'a Value)> {
    value.get(key).and_then(Value::as_array).into_iter().flatten().enumerate()
}

fn validate_pod(pod: &Value, causes: &mut Vec<Cause>) {
    let spec = &pod["spec"];
    if items(spec, "containers").next().is_none() {
        causes.push(cause("spec.containers", "FieldValueRequired", "Required value"));
    }
    let mut volumes = BTreeSet::new();
    for (i, volume) in items(spec, "volumes") {
        let name = volume["name"].as_str().unwrap_or("");
        if let Err(problem) = dns1123_label(name) {
            causes.push(cause(format!("spec.volumes[{i}].name"), "FieldValueInvalid", problem));
        } else if !volumes.insert(name) {
            causes.push(cause(
                format!("spec.volumes[{i}].name"),
                "FieldValueDuplicate",
                format!("Duplicate value: \"{name}\""),
            ));
        }
        if volume.get("secret").is_some() && volume["secret"]["secretName"].as_str().is_none_or(str::is_empty) {
            causes.push(cause(format!("spec.volumes[{i}].secret.secretName"), "FieldValueRequired", "Required value"));
        }
        if volume.get("persistentVolumeClaim").is_some()
            && volume["persistentVolumeClaim"]["claimName"].as_str().is_none_or(str::is_empty)
        {
            causes.push(cause(
                format!("spec.volumes[{i}].persistentVolumeClaim.claimName"),
                "FieldValueRequired",
                "Required value",
            ));
        }
    }
    let mut names = BTreeSet::new();
    for list in ["initContainers", "containers"] {
        for (i, container) in items(spec, list) {
            let at = format!("spec.{list}[{i}]");
            let name = container["name"].as_str().unwrap_or("");
            if let Err(problem) = dns1123_label(name) {
                causes.push(cause(format!("{at}.name"), "FieldValueInvalid", problem));
            } else if !names.insert(name) {
                causes.push(cause(format!("{at}.name"), "FieldValueDuplicate", format!("Duplicate value: \"{name}\"")));
            }
            if container["image"].as_str().is_none_or(|i| i.trim().is_empty()) {
                causes.push(cause(format!("{at}.image"), "FieldValueRequired", "Required value"));
            }
            let mut paths = BTreeSet::new();
            for (j, mount) in items(container, "volumeMounts") {
                let volume = mount["name"].as_str().unwrap_or("");
                if !volumes.contains(volume) {
                    causes.push(cause(
                        format!("{at}.volumeMounts[{j}].name"),
                        "FieldValueNotFound",
                        format!("Not found: \"{volume}\""),
                    ));
                }
                let path = mount["mountPath"].as_str().unwrap_or("");
                if path.is_empty() {
                    causes.push(cause(
                        format!("{at}.volumeMounts[{j}].mountPath"),
                        "FieldValueRequired",
                        "Required value",
                    ));
                } else if !paths.insert(path) {
                    causes.push(cause(
                        format!("{at}.volumeMounts[{j}].mountPath"),
                        "FieldValueInvalid",
                        format!("Invalid value: \"{path}\": must be unique"),
                    ));
                }
            }
            for (j, var) in items(container, "env") {
                if var["name"].as_str().is_none_or(str::is_empty) {
                    causes.push(cause(format!("{at}.env[{j}].name"), "FieldValueRequired", "Required value"));
                }
            }
            validate_resources(&container["resources"], &format!("{at}.resources"), causes);
        }
    }
    if let Some(policy) = spec["restartPolicy"].as_str()
        && !matches!(policy, "Always" | "OnFailure" | "Never")
    {
        causes.push(cause(
            "spec.restartPolicy",
            "FieldValueNotSupported",
            format!("Unsupported value: \"{policy}\": supported values: \"Always\", \"OnFailure\", \"Never\""),
        ));
    }
}

fn validate_resources(resources: &Value, at: &str, causes: &mut Vec<Cause>) {
    let mut parsed = |part: &str, name: &str| -> Option<f64> {
        let text = resources[part][name].as_str()?;
        match quantity::parse(text) {
            Ok(v) if v >= 0.0 => Some(v),
            Ok(_) => {
                causes.push(cause(
                    format!("{at}.{part}.{name}"),
                    "FieldValueInvalid",
                    "must be greater than or equal to 0",
                ));
                None
            }
            Err(problem) => {
                causes.push(cause(
                    format!("{at}.{part}.{name}"),
                    "FieldValueInvalid",
                    format!("Invalid value: {problem}"),
                ));
                None
            }
        }
    };
    let mut exceeded = Vec::new();
    for name in ["cpu", "memory", "ephemeral-storage"] {
        let (request, limit) = (parsed("requests", name), parsed("limits", name));
        if let (Some(request), Some(limit)) = (request, limit)
            && request > limit
        {
            exceeded.push(name);
        }
    }
    for name in exceeded {
        causes.push(cause(
            format!("{at}.requests.{name}"),
            "FieldValueInvalid",
            format!("Invalid value: must be less than or equal to {name} limit"),
        ));
    }
}

fn validate_secret(secret: &Value, causes: &mut Vec<Cause>) {
    let valid_key = |k: &str| {
        !k.is_empty() && k.len() <= 253 && k.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    };
    let mut total = 0usize;
    for (key, value) in secret["data"].as_object().into_iter().flatten() {
        if !valid_key(key) {
            causes.push(cause(
                format!("data[{key}]"),
                "FieldValueInvalid",
                "Invalid value: a valid config key must consist of alphanumeric characters, '-', '_' or '.'",
            ));
        }
        total += value.as_str().map_or(0, |v| v.len() / 4 * 3);
    }
    if total > 1 << 20 {
        causes.push(cause("data", "FieldValueTooLong", "Too long: must have at most 1048576 bytes"));
    }
}

fn validate_pvc(pvc: &Value, causes: &mut Vec<Cause>) {
    let spec = &pvc["spec"];
    let modes: Vec<&str> = spec["accessModes"].as_array().into_iter().flatten().filter_map(Value::as_str).collect();
    if modes.is_empty() {
        causes.push(cause(
            "spec.accessModes",
            "FieldValueRequired",
            "Required value: at least 1 access mode is required",
        ));
    }
    for (i, mode) in modes.iter().enumerate() {
        if !matches!(*mode, "ReadWriteOnce" | "ReadOnlyMany" | "ReadWriteMany" | "ReadWriteOncePod") {
            causes.push(cause(
                format!("spec.accessModes[{i}]"),
                "FieldValueNotSupported",
                format!("Unsupported value: \"{mode}\""),
            ));
        }
    }
    match spec["resources"]["requests"]["storage"].as_str() {
        None => causes.push(cause("spec.resources[storage]", "FieldValueRequired", "Required value")),
        Some(text) => {
            if let Err(problem) = quantity::parse(text) {
                causes.push(cause(
                    "spec.resources.requests.storage",
                    "FieldValueInvalid",
                    format!("Invalid value: {problem}"),
                ));
            }
        }
    }
}

fn validate_service(service: &Value, causes: &mut Vec<Cause>) {
    let spec = &service["spec"];
    let headless = spec["clusterIP"] == "None";
    if !headless && spec["type"] != "ExternalName" && items(spec, "ports").next().is_none() {
        causes.push(cause("spec.ports", "FieldValueRequired", "Required value"));
    }
    for (i, port) in items(spec, "ports") {
        if let Some(protocol) = port["protocol"].as_str()
            && !matches!(protocol, "TCP" | "UDP" | "SCTP")
        {
            causes.push(cause(format!("spec.ports[{i}].protocol"), "FieldValueNotSupported", "Unsupported value"));
        }
    }
}

/// What an update may not change, per kind.
pub fn validate_update(kind: Kind, old: &Value, new: &Value) -> Vec<Cause> {
    let mut causes = Vec::new();
    match kind {
        Kind::Pod => {
            // Only images (and a few scheduling fields) of a Pod's spec may change.
            let comparable = |pod: &Value| {
                let mut spec = pod["spec"].clone();
                for list in ["containers", "initContainers"] {
                    if let Some(containers) = spec.get_mut(list).and_then(Value::as_array_mut) {
                        for c in containers.iter_mut().filter_map(Value::as_object_mut) {
                            c.remove("image");
                        }
                    }
                }
                if let Some(map) = spec.as_object_mut() {
                    for key in ["activeDeadlineSeconds", "tolerations", "terminationGracePeriodSeconds"] {
                        map.remove(key);
                    }
                }
                spec
            };
            if comparable(old) != comparable(new) {
                causes.push(cause(
                    "spec",
                    "FieldValueForbidden",
                    "Forbidden: pod updates may not change fields other than `spec.containers[*].image`, \
                     `spec.initContainers[*].image`, `spec.activeDeadlineSeconds`, `spec.tolerations` (only \
                     additions to existing tolerations) or `spec.terminationGracePeriodSeconds`; delete and \
                     recreate the Pod instead",
                ));
            }
        }
        Kind::Secret => {
            if old["immutable"] == true && (old["data"] != new["data"] || new["immutable"] != true) {
                causes.push(cause(
                    "data",
                    "FieldValueForbidden",
                    "Forbidden: field is immutable when `immutable` is set",
                ));
            }
            if old["type"] != new["type"] {
                causes.push(cause("type", "FieldValueInvalid", "Invalid value: field is immutable"));
            }
        }
        Kind::PersistentVolumeClaim => {
            let comparable = |pvc: &Value| {
                let mut spec = pvc["spec"].clone();
                if let Some(map) = spec.as_object_mut() {
                    map.remove("resources");
                    map.remove("volumeName");
                }
                spec
            };
            let volume_changed = old["spec"]["volumeName"].as_str().is_some_and(|v| !v.is_empty())
                && old["spec"]["volumeName"] != new["spec"]["volumeName"];
            if comparable(old) != comparable(new) || volume_changed {
                causes.push(cause(
                    "spec",
                    "FieldValueForbidden",
                    "Forbidden: spec is immutable after creation except resources.requests and \
                     volumeAttributesClassName for bound claims",
                ));
            }
        }
        Kind::Service => {
            let old_ip = old["spec"]["clusterIP"].as_str().unwrap_or("");
            if !old_ip.is_empty() && new["spec"]["clusterIP"].as_str().is_some_and(|ip| ip != old_ip) {
                causes.push(cause("spec.clusterIP", "FieldValueInvalid", "Invalid value: field is immutable"));
            }
        }
        _ => {}
    }
    causes
}

/// What a create adds: the initial status, admission's finalizers.
pub fn admit_create(kind: Kind, object: &mut Value) {
    match kind {
        Kind::Pod => object["status"] = json!({"phase": "Pending", "qosClass": qos_class(object)}),
        Kind::PersistentVolumeClaim => {
            object["status"] = json!({"phase": "Pending"});
            add_finalizer(object, PVC_PROTECTION);
        }
        Kind::Namespace => object["status"] = json!({"phase": "Active"}),
        Kind::Service => object["status"] = json!({"loadBalancer": {}}),
        _ => {}
    }
}

pub fn add_finalizer(object: &mut Value, finalizer: &str) {
    if !object["metadata"].is_object() {
        object["metadata"] = json!({});
    }
    let list = object["metadata"].as_object_mut().expect("made an object").entry("finalizers").or_insert(json!([]));
    if !list.is_array() {
        *list = json!([]);
    }
    let list = list.as_array_mut().expect("made an array");
    if !list.iter().any(|f| f == finalizer) {
        list.push(json!(finalizer));
    }
}

/// Guaranteed, Burstable or BestEffort, from the containers' requests and limits.
pub fn qos_class(pod: &Value) -> &'static str {
    let containers: Vec<&Value> = items(&pod["spec"], "containers").map(|(_, c)| c).collect();
    let mut any = false;
    let mut guaranteed = true;
    for container in &containers {
        let resources = &container["resources"];
        let requests = resources["requests"].as_object().cloned().unwrap_or_default();
        let limits = resources["limits"].as_object().cloned().unwrap_or_default();
        if !requests.is_empty() || !limits.is_empty() {
            any = true;
        }
        for name in ["cpu", "memory"] {
            let limit = limits.get(name).and_then(Value::as_str).and_then(|q| quantity::parse(q).ok());
            let request = requests.get(name).and_then(Value::as_str).and_then(|q| quantity::parse(q).ok()).or(limit);
            if limit.is_none() || request != limit {
                guaranteed = false;
            }
        }
    }
    match (any, guaranteed) {
        (false, _) => "BestEffort",
        (true, true) => "Guaranteed",
        (true, false) => "Burstable",
    }
}

/// Which fields a field selector may name, per kind (beyond metadata.name and
/// metadata.namespace), as the API server allows them.
pub fn selectable_fields(kind: Kind) -> &'static [&'static str] {
    match kind {
        Kind::Pod => &[
            "spec.nodeName",
            "spec.restartPolicy",
            "spec.schedulerName",
            "spec.serviceAccountName",
            "spec.hostNetwork",
            "status.phase",
            "status.podIP",
            "status.nominatedNodeName",
        ],
        Kind::Secret => &["type"],
        Kind::Namespace => &["status.phase"],
        Kind::Node => &["spec.unschedulable"],
        _ => &[],
    }
}

/// The ownerReferences of an object: (apiVersion, kind, name, uid, blockOwnerDeletion).
pub fn owner_references(object: &Value) -> Vec<(&str, &str, &str, &str, bool)> {
    object["metadata"]["ownerReferences"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|r| {
            Some((
                r["apiVersion"].as_str()?,
                r["kind"].as_str()?,
                r["name"].as_str()?,
                r["uid"].as_str()?,
                r["blockOwnerDeletion"].as_bool().unwrap_or(false),
            ))
        })
        .collect()
}

/// The claim names a Pod's volumes use.
pub fn pod_claims(pod: &Value) -> Vec<&str> {
    items(&pod["spec"], "volumes").filter_map(|(_, v)| v["persistentVolumeClaim"]["claimName"].as_str()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(spec: Value) -> Value {
        json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"}, "spec": spec})
    }

    fn fields(causes: Vec<Cause>) -> Vec<String> {
        causes.into_iter().map(|c| c.field).collect()
    }

    #[test]
    fn secrets_fold_string_data_and_never_quote_values() {
        let mut secret = json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s"},
            "data": {"a": "YQ=="}, "stringData": {"token": "hunter2"}});
        normalize(Kind::Secret, &mut secret);
        assert_eq!(secret["data"], json!({"a": "YQ==", "token": "aHVudGVyMg=="}));
        assert_eq!(secret.get("stringData"), None);
        assert_eq!(secret["type"], "Opaque");
        assert!(validate(Kind::Secret, &secret).is_empty());

        let bad =
            json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s"}, "data": {"k": "!!hunter2!!"}});
        let causes = validate(Kind::Secret, &bad);
        assert_eq!(fields(causes.clone()), vec!["data.k"]);
        assert!(!format!("{causes:?}").contains("hunter"), "{causes:?}");
    }

    #[test]
    fn pods_get_defaults_and_unknown_fields_are_refused() {
        let mut p = pod(json!({"containers": [{"name": "c", "image": "agent:1",
            "resources": {"limits": {"cpu": "500m", "memory": "256Mi"}}}]}));
        normalize(Kind::Pod, &mut p);
        assert_eq!(p["spec"]["restartPolicy"], "Always");
        assert_eq!(p["spec"]["containers"][0]["imagePullPolicy"], "IfNotPresent");
        assert_eq!(p["spec"]["containers"][0]["resources"]["requests"], json!({"cpu": "500m", "memory": "256Mi"}));
        assert!(validate(Kind::Pod, &p).is_empty(), "{:?}", validate(Kind::Pod, &p));
        assert_eq!(qos_class(&p), "Guaranteed");
        assert_eq!(default_pull_policy("agent"), "Always");
        assert_eq!(default_pull_policy("registry:5000/agent:latest"), "Always");
        assert_eq!(default_pull_policy("registry:5000/agent"), "Always");
        assert_eq!(default_pull_policy("agent@sha256:00"), "IfNotPresent");

        let typo = pod(json!({"containers": [{"name": "c", "image": "x", "imagePulPolicy": "Never"}]}));
        assert_eq!(fields(validate(Kind::Pod, &typo)), vec!["spec.containers[0].imagePulPolicy"]);
        let wrong_type =
            pod(json!({"containers": [{"name": "c", "image": "x", "ports": [{"containerPort": "http"}]}]}));
        assert_eq!(fields(validate(Kind::Pod, &wrong_type)), vec!["spec.containers[0].ports[0].containerPort"]);
    }

    #[test]
    fn pod_semantics_name_each_field() {
        let p = pod(json!({"containers": [
            {"name": "c", "image": "", "volumeMounts": [{"name": "nope", "mountPath": "/x"}],
             "resources": {"requests": {"cpu": "2"}, "limits": {"cpu": "1", "memory": "lots"}}},
            {"name": "c", "image": "x"}], "restartPolicy": "Sometimes"}));
        let got = fields(validate(Kind::Pod, &p));
        for field in [
            "spec.containers[0].image",
            "spec.containers[0].volumeMounts[0].name",
            "spec.containers[0].resources.limits.memory",
            "spec.containers[0].resources.requests.cpu",
            "spec.containers[1].name",
            "spec.restartPolicy",
        ] {
            assert!(got.contains(&field.to_string()), "{field} in {got:?}");
        }
        assert_eq!(fields(validate(Kind::Pod, &pod(json!({"containers": []})))), vec!["spec.containers"]);
    }

    #[test]
    fn updates_keep_what_is_immutable() {
        let old = pod(json!({"containers": [{"name": "c", "image": "a:1"}], "nodeName": "local"}));
        let image = pod(json!({"containers": [{"name": "c", "image": "a:2"}], "nodeName": "local"}));
        let env =
            pod(json!({"containers": [{"name": "c", "image": "a:1", "env": [{"name": "A"}]}], "nodeName": "local"}));
        assert!(validate_update(Kind::Pod, &old, &image).is_empty());
        assert_eq!(fields(validate_update(Kind::Pod, &old, &env)), vec!["spec"]);
        let secret = json!({"immutable": true, "data": {"a": "YQ=="}, "type": "Opaque"});
        let changed = json!({"immutable": true, "data": {"a": "Yg=="}, "type": "Opaque"});
        assert_eq!(fields(validate_update(Kind::Secret, &secret, &changed)), vec!["data"]);
    }

    #[test]
    fn creates_get_status_and_finalizers() {
        let mut pvc = json!({"metadata": {"name": "c"}, "spec": {}});
        admit_create(Kind::PersistentVolumeClaim, &mut pvc);
        assert_eq!(pvc["metadata"]["finalizers"], json!([PVC_PROTECTION]));
        assert_eq!(pvc["status"]["phase"], "Pending");
        let mut p = pod(json!({"containers": [{"name": "c", "image": "x"}]}));
        admit_create(Kind::Pod, &mut p);
        assert_eq!(p["status"], json!({"phase": "Pending", "qosClass": "BestEffort"}));
    }
}
