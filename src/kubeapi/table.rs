//! `Table` responses (`Accept: application/json;as=Table;v=v1;g=meta.k8s.io`):
//! what `kubectl get` prints. The molecule.ai kinds use their CRD's printer
//! columns; the core kinds the columns kubectl prints for them from a real API
//! server (a Pod's READY, STATUS and RESTARTS computed as kubectl's printer does).

use axum::http::HeaderMap;
use serde_json::{Value, json};

use super::{Kind, KubeApi};

/// Whether the client asked for a Table.
pub fn wanted(headers: &HeaderMap) -> bool {
    headers.get_all(axum::http::header::ACCEPT).iter().filter_map(|v| v.to_str().ok()).any(|v| v.contains("as=Table"))
}

fn column(name: &str, kind: &str, priority: u8, description: &str) -> Value {
    let format = if name == "Name" { "name" } else { "" };
    json!({"name": name, "type": kind, "format": format, "description": description, "priority": priority})
}

/// The columns after Name, and how each row fills them.
fn core_columns(kind: Kind) -> Vec<Value> {
    let age = column("Age", "string", 0, "Time since the object was created.");
    match kind {
        Kind::Pod => vec![
            column("Ready", "string", 0, "Ready containers of all containers."),
            column("Status", "string", 0, "What the Pod is doing, as kubectl summarizes it."),
            column("Restarts", "string", 0, "Container restarts."),
            age,
            column("IP", "string", 1, "The Pod's IP address."),
            column("Node", "string", 1, "The node the Pod is bound to."),
            column("Nominated Node", "string", 1, "The node the Pod is nominated for."),
            column("Readiness Gates", "string", 1, "Readiness gates."),
        ],
        Kind::Secret => vec![
            column("Type", "string", 0, "The Secret's type."),
            column("Data", "string", 0, "How many keys it holds."),
            age,
        ],
        Kind::PersistentVolumeClaim => vec![
            column("Status", "string", 0, "Pending, Bound or Lost."),
            column("Volume", "string", 0, "The volume it is bound to."),
            column("Capacity", "string", 0, "The capacity of the volume."),
            column("Access Modes", "string", 0, "How the volume may be mounted."),
            column("StorageClass", "string", 0, "The storage class."),
            column("VolumeAttributesClass", "string", 0, "The volume attributes class."),
            age,
            column("VolumeMode", "string", 1, "Filesystem or Block."),
        ],
        Kind::Service => vec![
            column("Type", "string", 0, "ClusterIP, NodePort, LoadBalancer or ExternalName."),
            column("Cluster-IP", "string", 0, "The cluster IP (not routed here)."),
            column("External-IP", "string", 0, "External IPs."),
            column("Port(s)", "string", 0, "Ports."),
            age,
            column("Selector", "string", 1, "The Pods it selects."),
        ],
        Kind::Namespace => vec![column("Status", "string", 0, "Active or Terminating."), age],
        Kind::Node => vec![
            column("Status", "string", 0, "Ready or NotReady."),
            column("Roles", "string", 0, "Node roles."),
            age,
            column("Version", "string", 0, "The node's kubelet version."),
            column("Internal-IP", "string", 1, "The node's internal IP."),
        ],
        Kind::Workspace | Kind::Team | Kind::WarmPool => vec![],
    }
}

fn text(value: &Value) -> String {
    match value.as_str() {
        Some(s) if !s.is_empty() => s.to_string(),
        _ => "<none>".into(),
    }
}

fn age(object: &Value, now: chrono::DateTime<chrono::Utc>) -> Value {
    since(&object["metadata"]["creationTimestamp"], now).map_or(json!("<unknown>"), |a| json!(a))
}

fn since(stamp: &Value, now: chrono::DateTime<chrono::Utc>) -> Option<String> {
    let t = chrono::DateTime::parse_from_rfc3339(stamp.as_str()?).ok()?;
    Some(human_duration(now.signed_duration_since(t.with_timezone(&chrono::Utc))))
}

/// kubectl's pod printer: READY, STATUS, RESTARTS.
fn pod_cells(pod: &Value, now: chrono::DateTime<chrono::Utc>) -> Vec<Value> {
    let total = pod["spec"]["containers"].as_array().map_or(0, Vec::len);
    let status = &pod["status"];
    let mut reason = status["reason"].as_str().or(status["phase"].as_str()).unwrap_or("Pending").to_string();
    let (mut restarts, mut ready, mut running, mut last_restart) = (0, 0, false, None::<String>);
    for c in status["containerStatuses"].as_array().into_iter().flatten().rev() {
        restarts += c["restartCount"].as_i64().unwrap_or(0);
        if let Some(finished) = c["lastState"]["terminated"]["finishedAt"].as_str()
            && last_restart.as_deref().is_none_or(|l| l < finished)
        {
            last_restart = Some(finished.to_string());
        }
        let state = &c["state"];
        if let Some(r) = state["waiting"]["reason"].as_str().filter(|r| !r.is_empty()) {
            reason = r.to_string();
        } else if let Some(r) = state["terminated"]["reason"].as_str().filter(|r| !r.is_empty()) {
            reason = r.to_string();
        } else if state["terminated"].is_object() {
            reason = match state["terminated"]["signal"].as_i64().filter(|s| *s != 0) {
                Some(signal) => format!("Signal:{signal}"),
                None => format!("ExitCode:{}", state["terminated"]["exitCode"].as_i64().unwrap_or(0)),
            };
        } else if c["ready"] == true && state["running"].is_object() {
            running = true;
            ready += 1;
        }
    }
    if reason == "Completed" && running {
        let pod_ready = status["conditions"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|c| c["type"] == "Ready" && c["status"] == "True");
        reason = if pod_ready { "Running" } else { "NotReady" }.into();
    }
    if pod["metadata"]["deletionTimestamp"].is_string() {
        reason = "Terminating".into();
    }
    let restarts = match last_restart.and_then(|t| since(&json!(t), now)) {
        Some(ago) if restarts > 0 => format!("{restarts} ({ago} ago)"),
        _ => restarts.to_string(),
    };
    vec![
        json!(format!("{ready}/{total}")),
        json!(reason),
        json!(restarts),
        age(pod, now),
        json!(text(&status["podIP"])),
        json!(text(&pod["spec"]["nodeName"])),
        json!(text(&status["nominatedNodeName"])),
        json!("<none>"),
    ]
}

fn core_cells(kind: Kind, object: &Value, now: chrono::DateTime<chrono::Utc>) -> Vec<Value> {
    let join = |v: &Value| -> String {
        let items: Vec<&str> = v.as_array().into_iter().flatten().filter_map(Value::as_str).collect();
        if items.is_empty() { "<none>".into() } else { items.join(",") }
    };
    match kind {
        Kind::Pod => pod_cells(object, now),
        Kind::Secret => vec![
            json!(text(&object["type"])),
            json!(object["data"].as_object().map_or(0, |d| d.len())),
            age(object, now),
        ],
        Kind::PersistentVolumeClaim => {
            let modes: Vec<&str> = object["status"]["accessModes"]
                .as_array()
                .or(object["spec"]["accessModes"].as_array())
                .into_iter()
                .flatten()
                .filter_map(Value::as_str)
                .map(|m| match m {
                    "ReadWriteOnce" => "RWO",
                    "ReadOnlyMany" => "ROX",
                    "ReadWriteMany" => "RWX",
                    "ReadWriteOncePod" => "RWOP",
                    other => other,
                })
                .collect();
            let bound = object["status"]["phase"] == "Bound";
            let phase = if object["metadata"]["deletionTimestamp"].is_string() {
                "Terminating"
            } else {
                object["status"]["phase"].as_str().unwrap_or("Pending")
            };
            vec![
                json!(phase),
                json!(object["spec"]["volumeName"].as_str().unwrap_or("")),
                json!(if bound { object["status"]["capacity"]["storage"].as_str().unwrap_or("") } else { "" }),
                json!(if bound { modes.join(",") } else { String::new() }),
                json!(text(&object["spec"]["storageClassName"])),
                json!(text(&object["spec"]["volumeAttributesClassName"])),
                age(object, now),
                json!(object["spec"]["volumeMode"].as_str().unwrap_or("Filesystem")),
            ]
        }
        Kind::Service => {
            let ports: Vec<String> = object["spec"]["ports"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|p| format!("{}/{}", p["port"], p["protocol"].as_str().unwrap_or("TCP")))
                .collect();
            let selector: Vec<String> = object["spec"]["selector"]
                .as_object()
                .into_iter()
                .flatten()
                .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or("")))
                .collect();
            vec![
                json!(object["spec"]["type"].as_str().unwrap_or("ClusterIP")),
                json!(text(&object["spec"]["clusterIP"])),
                json!(join(&object["spec"]["externalIPs"])),
                json!(if ports.is_empty() { "<none>".to_string() } else { ports.join(",") }),
                age(object, now),
                json!(if selector.is_empty() { "<none>".to_string() } else { selector.join(",") }),
            ]
        }
        Kind::Namespace => vec![json!(object["status"]["phase"].as_str().unwrap_or("Active")), age(object, now)],
        Kind::Node => {
            let ready = object["status"]["conditions"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|c| c["type"] == "Ready" && c["status"] == "True");
            let ip = object["status"]["addresses"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|a| a["type"] == "InternalIP")
                .map_or(json!("<none>"), |a| a["address"].clone());
            vec![
                json!(if ready { "Ready" } else { "NotReady" }),
                json!("<none>"),
                age(object, now),
                json!(object["status"]["nodeInfo"]["kubeletVersion"].as_str().unwrap_or("")),
                ip,
            ]
        }
        Kind::Workspace | Kind::Team | Kind::WarmPool => vec![],
    }
}

/// A Table of `objects`. `include` is the `includeObject` parameter (None,
/// Metadata — the default — or Object).
pub fn table(api: &KubeApi, kind: Kind, objects: &[&Value], resource_version: i64, include: Option<&str>) -> Value {
    let mut definitions = vec![column("Name", "string", 0, "Name must be unique within a namespace.")];
    let printer_columns: &[Value] = if kind.is_core() { &[] } else { &api.info(kind).columns };
    if kind.is_core() {
        definitions.extend(core_columns(kind));
    }
    for c in printer_columns {
        definitions.push(json!({
            "name": c["name"],
            "type": c["type"],
            "format": c.get("format").cloned().unwrap_or(json!("")),
            "description": c.get("description").cloned().unwrap_or(json!("")),
            "priority": c.get("priority").cloned().unwrap_or(json!(0)),
        }));
    }
    let now = chrono::Utc::now();
    let rows: Vec<Value> = objects
        .iter()
        .map(|object| {
            let mut cells = vec![object["metadata"]["name"].clone()];
            if kind.is_core() {
                cells.extend(core_cells(kind, object, now));
            }
            for c in printer_columns {
                let path = c["jsonPath"].as_str().unwrap_or("");
                let cell = lookup(object, path).cloned().unwrap_or(Value::Null);
                let cell = match (c["type"].as_str(), cell.as_str()) {
                    (Some("date"), Some(text)) => chrono::DateTime::parse_from_rfc3339(text)
                        .map(|t| json!(human_duration(now.signed_duration_since(t.with_timezone(&chrono::Utc)))))
                        .unwrap_or(cell),
                    _ => cell,
                };
                cells.push(cell);
            }
            let embedded = match include {
                Some("None") => Value::Null,
                Some("Object") => (*object).clone(),
                _ => json!({"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1", "metadata": object["metadata"]}),
            };
            json!({"cells": cells, "object": embedded})
        })
        .collect();
    json!({
        "kind": "Table",
        "apiVersion": "meta.k8s.io/v1",
        "metadata": {"resourceVersion": resource_version.to_string()},
        "columnDefinitions": definitions,
        "rows": rows,
    })
}

/// The JSONPath subset printer columns use: `.a.b`, and `.list[?(@.k=="v")].f`.
fn lookup<'a>(value: &'a Value, path: &str) -> Option<&'a Value> {
    let mut current = value;
    let mut rest = path.strip_prefix('.').unwrap_or(path);
    while !rest.is_empty() {
        let end = rest.find(['.', '[']).unwrap_or(rest.len());
        let (key, tail) = rest.split_at(end);
        if !key.is_empty() {
            current = current.get(key)?;
        }
        rest = tail;
        if let Some(filter) = rest.strip_prefix("[?(@.") {
            let close = filter.find(")]")?;
            let (field, wanted) = filter[..close].split_once("==")?;
            let wanted = wanted.trim().trim_matches('"').trim_matches('\'');
            current = current
                .as_array()?
                .iter()
                .find(|item| item.get(field.trim()).and_then(Value::as_str) == Some(wanted))?;
            rest = &filter[close + 2..];
        }
        rest = rest.strip_prefix('.').unwrap_or(rest);
    }
    Some(current)
}

/// Kubernetes' HumanDuration: `45s`, `3m12s`, `5h`, `3d4h`, `400d`, `2y10d`.
pub fn human_duration(d: chrono::TimeDelta) -> String {
    let s = d.num_seconds();
    if s < -1 {
        return "<invalid>".into();
    }
    let s = s.max(0);
    let (m, h, days) = (s / 60, s / 3600, s / 86400);
    match s {
        _ if s < 120 => format!("{s}s"),
        _ if m < 10 => match s % 60 {
            0 => format!("{m}m"),
            r => format!("{m}m{r}s"),
        },
        _ if h < 3 => format!("{m}m"),
        _ if h < 8 => match m % 60 {
            0 => format!("{h}h"),
            r => format!("{h}h{r}m"),
        },
        _ if h < 48 => format!("{h}h"),
        _ if h < 24 * 8 => match h % 24 {
            0 => format!("{days}d"),
            r => format!("{days}d{r}h"),
        },
        _ if days < 365 * 2 => format!("{days}d"),
        _ if days < 365 * 8 => format!("{}y{}d", days / 365, days % 365),
        _ => format!("{}y", days / 365),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn printer_column_paths() {
        let ws = json!({"status": {"phase": "Running", "conditions": [
            {"type": "Other", "status": "False"}, {"type": "Ready", "status": "True"}]}});
        assert_eq!(lookup(&ws, ".status.phase"), Some(&json!("Running")));
        assert_eq!(lookup(&ws, ".status.conditions[?(@.type==\"Ready\")].status"), Some(&json!("True")));
        assert_eq!(lookup(&ws, ".spec.team"), None);
    }

    #[test]
    fn pods_read_like_kubectl_prints_them() {
        let now = chrono::Utc::now();
        let pod = json!({"spec": {"containers": [{"name": "a"}, {"name": "b"}], "nodeName": "local"},
            "status": {"phase": "Running", "podIP": "10.0.0.2", "containerStatuses": [
                {"name": "a", "ready": true, "restartCount": 2, "state": {"running": {}},
                 "lastState": {"terminated": {"finishedAt": (now - chrono::TimeDelta::seconds(5)).to_rfc3339()}}},
                {"name": "b", "ready": false, "restartCount": 0, "state": {"waiting": {"reason": "ErrImagePull"}}}]}});
        let cells = pod_cells(&pod, now);
        assert_eq!(cells[..3], [json!("1/2"), json!("ErrImagePull"), json!("2 (5s ago)")]);
        assert_eq!(cells[4..6], [json!("10.0.0.2"), json!("local")]);
        let mut deleting = pod.clone();
        deleting["metadata"]["deletionTimestamp"] = json!("2024-01-01T00:00:00Z");
        assert_eq!(pod_cells(&deleting, now)[1], "Terminating");
    }

    #[test]
    fn ages_read_like_kubectl() {
        let s = chrono::TimeDelta::seconds;
        assert_eq!(human_duration(s(5)), "5s");
        assert_eq!(human_duration(s(192)), "3m12s");
        assert_eq!(human_duration(s(3600 * 5)), "5h");
        assert_eq!(human_duration(s(86400 * 3 + 3600 * 4)), "3d4h");
    }
}
