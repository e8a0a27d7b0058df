//! `${VAR}` expansion from secrets, the `requiredEnv` check, and which config-file
//! paths may be written into `/configs`. Pure functions; the reconciler applies them
//! once a workspace's secrets are read.

use std::collections::BTreeMap;

/// The operator's token file (`model::container::TOKEN_FILE`; `model` depends on `api`).
const TOKEN_FILE: &str = ".auth_token";
/// Longest config-file path accepted (relative to `/configs`).
const MAX_PATH: usize = 255;

/// Whether `path` may name a file under `/configs`: relative, no `.`/`..` or empty
/// parts, not the token file (the operator's own).
pub fn config_file_path(path: &str) -> Result<(), String> {
    if path.is_empty() || path.len() > MAX_PATH {
        return Err(format!("must be a relative path of 1 to {MAX_PATH} characters"));
    }
    if path.starts_with('/') || path.contains('\\') || path.contains('\0') {
        return Err("must be a relative path with `/` separators (e.g. `skills/x.md`)".into());
    }
    if path.split('/').any(|part| part.is_empty() || part == "." || part == "..") {
        return Err("cannot have empty, `.` or `..` parts".into());
    }
    if path == TOKEN_FILE {
        return Err(format!("is the operator's token file; choose another name than {TOKEN_FILE}"));
    }
    Ok(())
}

/// Replaces every `${NAME}` whose NAME is in `vars`; anything else (unknown names,
/// `$NAME`, an unclosed `${`) is left as written.
pub fn expand(text: &str, vars: &BTreeMap<String, String>) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        match after.find('}') {
            Some(end) if vars.contains_key(&after[..end]) => {
                out.push_str(&vars[&after[..end]]);
                rest = &after[end + 1..];
            }
            _ => {
                out.push_str("${");
                rest = after;
            }
        }
    }
    out.push_str(rest);
    out
}

/// The `requiredEnv` entries that nothing in `env` satisfies (an entry `A|B` is
/// satisfied by either; an empty value counts as unset).
pub fn missing_required(required: &[String], env: &BTreeMap<String, String>) -> Vec<String> {
    required
        .iter()
        .filter(|r| !r.split('|').any(|name| env.get(name).is_some_and(|v| !v.is_empty())))
        .cloned()
        .collect()
}

/// The hold message for missing variables, naming each.
pub fn missing_message(missing: &[String]) -> String {
    let list = missing.iter().map(|m| m.replace('|', " or ")).collect::<Vec<_>>().join(", ");
    format!(
        "required env not set: {list}; set {} with `molecule-operator secret set` (or an org template's .env)",
        if missing.len() == 1 { "it" } else { "them" }
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn only_known_braced_names_expand() {
        let v = vars(&[("TEAM", "core"), ("KEY", "s3cret")]);
        assert_eq!(expand("team ${TEAM}, key ${KEY}", &v), "team core, key s3cret");
        assert_eq!(expand("${OTHER} $TEAM ${TEAM", &v), "${OTHER} $TEAM ${TEAM");
        assert_eq!(expand("${${TEAM}}", &v), "${core}");
    }

    #[test]
    fn required_env_names_what_is_missing() {
        let env = vars(&[("A", "1"), ("EMPTY", "")]);
        let req: Vec<String> = ["A", "B", "EMPTY", "A|C", "C|D"].iter().map(|s| s.to_string()).collect();
        assert_eq!(missing_required(&req, &env), vec!["B", "EMPTY", "C|D"]);
        assert_eq!(
            missing_message(&["B".into(), "C|D".into()]),
            "required env not set: B, C or D; set them with `molecule-operator secret set` (or an org template's .env)"
        );
    }

    #[test]
    fn config_paths_stay_under_configs() {
        assert!(config_file_path("system-prompt.md").is_ok());
        assert!(config_file_path("skills/a/b.md").is_ok());
        for bad in ["", "/etc/passwd", "../x", "a/../../x", "a//b", "./a", ".auth_token", "a\\b"] {
            assert!(config_file_path(bad).is_err(), "{bad}");
        }
    }
}
