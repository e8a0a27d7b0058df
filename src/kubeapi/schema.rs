//! Checks an object against its CRD's openAPIV3Schema, as the API server does:
//! types, enums, ranges, required fields, and (strict field validation) fields
//! the schema does not declare. Every problem names its field path.

use serde_json::Value;

use super::status::Cause;

/// All problems of `value` under `schema`; `metadata` is the API server's own
/// business and is not checked here.
pub fn check(schema: &Value, value: &Value) -> Vec<Cause> {
    let mut causes = Vec::new();
    walk(schema, value, "", &mut causes);
    causes
}

fn join(path: &str, key: &str) -> String {
    if path.is_empty() { key.to_string() } else { format!("{path}.{key}") }
}

fn type_name(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(n) if n.is_i64() || n.is_u64() => "integer",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

fn shown(value: &Value) -> String {
    match value {
        Value::String(s) => format!("\"{s}\""),
        other => other.to_string(),
    }
}

fn walk(schema: &Value, value: &Value, path: &str, causes: &mut Vec<Cause>) {
    let invalid = |causes: &mut Vec<Cause>, reason: &'static str, message: String| {
        causes.push(Cause { field: path.to_string(), reason, message })
    };
    if value.is_null() {
        // Optional fields are nullable in the generated schemas; a null means "unset".
        return;
    }
    if schema.get("x-kubernetes-int-or-string").and_then(Value::as_bool) == Some(true) {
        if !(value.is_string() || value.is_i64() || value.is_u64()) {
            invalid(
                causes,
                "FieldValueTypeInvalid",
                format!("Invalid value: {}: must be an integer or a string", shown(value)),
            );
        }
        return;
    }
    // anyOf / oneOf: valid if any branch has no problems.
    for key in ["anyOf", "oneOf"] {
        if let Some(branches) = schema.get(key).and_then(Value::as_array)
            && !branches.is_empty()
            && !branches.iter().any(|b| check_at(b, value, path).is_empty())
        {
            let mut first = check_at(&branches[0], value, path);
            causes.append(&mut first);
            return;
        }
    }
    if let Some(expected) = schema.get("type").and_then(Value::as_str) {
        let actual = type_name(value);
        let ok = actual == expected || (expected == "number" && actual == "integer");
        if !ok {
            invalid(
                causes,
                "FieldValueTypeInvalid",
                format!("Invalid value: \"{actual}\": {path} in body must be of type {expected}: \"{actual}\""),
            );
            return;
        }
    }
    if let Some(options) = schema.get("enum").and_then(Value::as_array)
        && !options.contains(value)
    {
        let list = options.iter().map(shown).collect::<Vec<_>>().join(", ");
        invalid(
            causes,
            "FieldValueNotSupported",
            format!("Unsupported value: {}: supported values: {list}", shown(value)),
        );
    }
    if let Some(n) = value.as_f64() {
        if let Some(min) = schema.get("minimum").and_then(Value::as_f64)
            && n < min
        {
            invalid(
                causes,
                "FieldValueInvalid",
                format!("Invalid value: {value}: {path} in body should be greater than or equal to {min}"),
            );
        }
        if let Some(max) = schema.get("maximum").and_then(Value::as_f64)
            && n > max
        {
            invalid(
                causes,
                "FieldValueInvalid",
                format!("Invalid value: {value}: {path} in body should be less than or equal to {max}"),
            );
        }
    }
    match value {
        Value::Object(map) => {
            if path == "metadata"
                || schema.get("x-kubernetes-preserve-unknown-fields").and_then(Value::as_bool) == Some(true)
            {
                return;
            }
            if let Some(required) = schema.get("required").and_then(Value::as_array) {
                for field in required.iter().filter_map(Value::as_str) {
                    if !map.contains_key(field) {
                        causes.push(Cause {
                            field: join(path, field),
                            reason: "FieldValueRequired",
                            message: "Required value".into(),
                        });
                    }
                }
            }
            let properties = schema.get("properties").and_then(Value::as_object);
            let additional = schema.get("additionalProperties");
            for (key, item) in map {
                let child = join(path, key);
                if let Some(sub) = properties.and_then(|p| p.get(key)) {
                    walk(sub, item, &child, causes);
                } else if let Some(sub) = additional.filter(|a| a.is_object()) {
                    walk(sub, item, &child, causes);
                } else if additional.and_then(Value::as_bool) == Some(true) {
                } else if properties.is_some() || additional.is_some() {
                    causes.push(Cause {
                        field: child,
                        reason: "FieldValueInvalid",
                        message: "Unknown field: it is not declared in the schema (check its spelling)".into(),
                    });
                }
            }
        }
        Value::Array(items) => {
            if let Some(sub) = schema.get("items") {
                for (i, item) in items.iter().enumerate() {
                    walk(sub, item, &format!("{path}[{i}]"), causes);
                }
            }
        }
        _ => {}
    }
}

fn check_at(schema: &Value, value: &Value, path: &str) -> Vec<Cause> {
    let mut causes = Vec::new();
    walk(schema, value, path, &mut causes);
    causes
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kubeapi::Kind;

    fn schema(kind: Kind) -> Value {
        crate::kubeapi::kind_info(kind).schema
    }

    #[test]
    fn a_valid_workspace_passes() {
        let ws = serde_json::json!({"apiVersion": "molecule.ai/v1alpha1", "kind": "Workspace",
            "metadata": {"name": "a", "labels": {"x": "y"}},
            "spec": {"tier": 2, "env": {"A": "b"}, "operatingMode": "Paused"}});
        assert_eq!(check(&schema(Kind::Workspace), &ws), vec![]);
    }

    #[test]
    fn bad_values_and_unknown_fields_name_their_path() {
        let ws = serde_json::json!({"apiVersion": "molecule.ai/v1alpha1", "kind": "Workspace",
            "metadata": {"name": "a"}, "spec": {"tier": 9, "operatingMode": "Sleeping", "teir": 2}});
        let fields: Vec<String> = check(&schema(Kind::Workspace), &ws).into_iter().map(|c| c.field).collect();
        assert!(fields.contains(&"spec.tier".to_string()), "{fields:?}");
        assert!(fields.contains(&"spec.operatingMode".to_string()), "{fields:?}");
        assert!(fields.contains(&"spec.teir".to_string()), "{fields:?}");
    }
}
