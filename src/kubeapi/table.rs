//! `Table` responses (`Accept: application/json;as=Table;v=v1;g=meta.k8s.io`):
//! what `kubectl get` prints, with the CRD's printer columns.

use axum::http::HeaderMap;
use serde_json::{Value, json};

use super::{Kind, KubeApi};

/// Whether the client asked for a Table.
pub fn wanted(headers: &HeaderMap) -> bool {
    headers.get_all(axum::http::header::ACCEPT).iter().filter_map(|v| v.to_str().ok()).any(|v| v.contains("as=Table"))
}

/// A Table of `objects`. `include` is the `includeObject` parameter (None,
/// Metadata — the default — or Object).
pub fn table(api: &KubeApi, kind: Kind, objects: &[&Value], resource_version: i64, include: Option<&str>) -> Value {
    let columns = &api.info(kind).columns;
    let mut definitions = vec![
        json!({"name": "Name", "type": "string", "format": "name", "description": "Name must be unique within a namespace.", "priority": 0}),
    ];
    for column in columns {
        definitions.push(json!({
            "name": column["name"],
            "type": column["type"],
            "format": column.get("format").cloned().unwrap_or(json!("")),
            "description": column.get("description").cloned().unwrap_or(json!("")),
            "priority": column.get("priority").cloned().unwrap_or(json!(0)),
        }));
    }
    let now = chrono::Utc::now();
    let rows: Vec<Value> = objects
        .iter()
        .map(|object| {
            let mut cells = vec![object["metadata"]["name"].clone()];
            for column in columns {
                let path = column["jsonPath"].as_str().unwrap_or("");
                let cell = lookup(object, path).cloned().unwrap_or(Value::Null);
                let cell = match (column["type"].as_str(), cell.as_str()) {
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
    fn ages_read_like_kubectl() {
        let s = chrono::TimeDelta::seconds;
        assert_eq!(human_duration(s(5)), "5s");
        assert_eq!(human_duration(s(192)), "3m12s");
        assert_eq!(human_duration(s(3600 * 5)), "5h");
        assert_eq!(human_duration(s(86400 * 3 + 3600 * 4)), "3d4h");
    }
}
