//! Label and field selectors, as list and watch requests carry them
//! (`labelSelector`, `fieldSelector`), parsed once and matched against stored objects.

use serde_json::Value;

use super::status::ApiError;
use super::{Kind, Query, core};

/// Label (`a=b`, `a!=b`, `a`, `!a`, `a in (x,y)`, `a notin (x)`) and field
/// (`metadata.name`, `metadata.namespace`, and the kind's own: `spec.nodeName`,
/// `status.phase`, ... see `core::selectable_fields`) selectors.
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
    pub(super) fn parse(kind: Kind, query: &Query) -> Result<Self, ApiError> {
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
            let field = field.trim();
            let allowed = ["metadata.name", "metadata.namespace"]
                .into_iter()
                .chain(core::selectable_fields(kind).iter().copied());
            if !allowed.clone().any(|f| f == field) {
                return Err(ApiError::bad_request(format!(
                    "field label not supported: {field}: use one of {}",
                    allowed.collect::<Vec<_>>().join(", ")
                )));
            }
            selector.fields.push((field.to_string(), equal, value.trim().to_string()));
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
                // A missing field reads as "" (`spec.nodeName=` selects unscheduled Pods).
                let found = field.split('.').try_fold(object, |v, key| v.get(key));
                let text = match found {
                    Some(Value::String(s)) => s.clone(),
                    Some(Value::Null) | None => String::new(),
                    Some(other) => other.to_string(),
                };
                (text == *value) == *equal
            })
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn selector(labels: &str, fields: &str) -> Selector {
        let raw = format!(
            "labelSelector={}&fieldSelector={}",
            labels.replace(' ', "+").replace('=', "%3D").replace(',', "%2C"),
            fields.replace('=', "%3D")
        );
        Selector::parse(Kind::Pod, &Query::parse(&raw)).expect("the selector parses")
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
        assert_eq!(Selector::parse(Kind::Workspace, &unsupported).unwrap_err().code, 400);
        let node = Query::parse("fieldSelector=spec.nodeName%3D");
        assert_eq!(Selector::parse(Kind::Workspace, &node).unwrap_err().code, 400, "a Workspace has no nodeName");
        let unscheduled = Selector::parse(Kind::Pod, &node).expect("a Pod selects by node");
        assert!(unscheduled.matches(&json!({"metadata": {"name": "p"}, "spec": {}})));
        assert!(!unscheduled.matches(&json!({"metadata": {"name": "p"}, "spec": {"nodeName": "local"}})));
    }
}
