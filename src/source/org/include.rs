//! Reads `org.yaml` with its `!include`s resolved, as the original platform did: a
//! scalar tagged `!include PATH` is replaced by that file (YAML files parsed, any other
//! file as its text), PATH relative to the including file, confined to the template
//! root (symlinks resolved), at most [`MAX_INCLUDE_DEPTH`] deep, cycles refused.
//!
//! An include that fails does not fail the file: its place holds a marker mapping
//! (`{__include_error__: why}`) naming the chain of files, so only the node it sits
//! in is refused (see convert.rs) and the rest of the org loads.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::rc::Rc;

use serde_json::Value;
use serde_saphyr::{IncludeRequest, IncludeResolveError, InputSource, ResolvedInclude};
use sha2::{Digest, Sha256};

use crate::source::manifest::MAX_FILE_BYTES;

pub const MAX_INCLUDE_DEPTH: usize = 16;
/// The key of the marker that stands where an include failed.
pub const INCLUDE_ERROR_KEY: &str = "__include_error__";

/// The tree and every file it was read from (path relative to the root -> sha256),
/// so a watcher can tell when any of them changed.
#[derive(Debug)]
pub struct Tree {
    pub value: Value,
    pub files: BTreeMap<String, [u8; 32]>,
}

/// Reads `root/org.yaml` with its includes. Fails only when org.yaml itself cannot
/// be read or parsed (the message names it, with line and column).
pub fn read_org(root: &Path) -> Result<Tree, String> {
    let root = root.canonicalize().map_err(|e| format!("{}: cannot read the directory ({e})", root.display()))?;
    let files = Rc::new(RefCell::new(BTreeMap::new()));
    let org = root.join(super::ORG_FILE);
    let value = read_yaml(&root, &org, vec![super::ORG_FILE.to_string()], &files)?;
    let files = files.borrow().clone();
    Ok(Tree { value, files })
}

type Seen = Rc<RefCell<BTreeMap<String, [u8; 32]>>>;

fn read_text(path: &Path, rel: &str, files: &Seen) -> Result<String, String> {
    let bytes = std::fs::read(path).map_err(|e| format!("{rel}: cannot read the file ({e})"))?;
    if bytes.len() > MAX_FILE_BYTES {
        return Err(format!(
            "{rel}: the file is {} bytes; files over {} KiB are refused",
            bytes.len(),
            MAX_FILE_BYTES / 1024
        ));
    }
    files.borrow_mut().insert(rel.to_string(), Sha256::digest(&bytes).into());
    String::from_utf8(bytes).map_err(|_| format!("{rel}: the file is not UTF-8 text; save it as UTF-8"))
}

/// Parses one YAML file; its includes are resolved by recursion, each returned to the
/// parser as JSON (so nothing is parsed twice and no tag survives).
fn read_yaml(root: &Path, file: &Path, chain: Vec<String>, files: &Seen) -> Result<Value, String> {
    let rel = chain.last().cloned().unwrap_or_default();
    let text = read_text(file, &rel, files)?;
    let resolver = {
        let (root, dir, files) = (root.to_path_buf(), file.parent().unwrap_or(root).to_path_buf(), files.clone());
        move |req: IncludeRequest<'_>| -> Result<ResolvedInclude, IncludeResolveError> {
            let json = match resolve(&root, &dir, req.spec.trim(), &chain, &files) {
                Ok(value) => value,
                Err(why) => {
                    Value::Object(serde_json::Map::from_iter([(INCLUDE_ERROR_KEY.to_string(), Value::String(why))]))
                }
            };
            let text = serde_json::to_string(&json).map_err(|e| IncludeResolveError::Message(e.to_string()))?;
            Ok(ResolvedInclude::new(req.spec, req.spec, InputSource::from_string(text)))
        }
    };
    let options = crate::source::manifest::yaml_options().with_include_resolver(resolver);
    serde_saphyr::from_str_with_options::<Value>(&text, options).map_err(|e| format!("{rel}: {e}"))
}

/// The value `spec` (as written in the last file of `chain`, which sits in `dir`)
/// stands for, or why it cannot be included, naming the chain of files.
fn resolve(root: &Path, dir: &Path, spec: &str, chain: &[String], files: &Seen) -> Result<Value, String> {
    let from = chain.join(" -> ");
    if chain.len() > MAX_INCLUDE_DEPTH {
        return Err(format!("{from}: `!include {spec}` nests deeper than {MAX_INCLUDE_DEPTH} files"));
    }
    if spec.is_empty() || Path::new(spec).is_absolute() {
        return Err(format!("{from}: `!include {spec}` must name a file by a path relative to the including file"));
    }
    let target: PathBuf = dir.join(spec);
    let canonical = match target.canonicalize() {
        Ok(p) => p,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(format!("{from}: `!include {spec}`: no such file"));
        }
        Err(e) => return Err(format!("{from}: `!include {spec}`: {e}")),
    };
    let Ok(inside) = canonical.strip_prefix(root) else {
        return Err(format!("{from}: `!include {spec}` escapes the template root; include only files inside it"));
    };
    let rel = inside.to_string_lossy().replace(std::path::MAIN_SEPARATOR, "/");
    if chain.contains(&rel) {
        return Err(format!("{from}: `!include {spec}` is a cycle ({from} -> {rel})"));
    }
    if !canonical.is_file() {
        return Err(format!("{from}: `!include {spec}` is not a file"));
    }
    let is_yaml =
        canonical.extension().is_some_and(|e| e.eq_ignore_ascii_case("yaml") || e.eq_ignore_ascii_case("yml"));
    if is_yaml {
        let mut next = chain.to_vec();
        next.push(rel);
        read_yaml(root, &canonical, next, files).map_err(|e| format!("{from} -> {e}"))
    } else {
        read_text(&canonical, &rel, files).map(Value::String).map_err(|e| format!("{from} -> {e}"))
    }
}

/// The first include failure inside `value`, not looking into `skip` keys of the
/// top mapping (a node's children are checked as nodes of their own).
pub fn include_error<'a>(value: &'a Value, skip: &[&str]) -> Option<&'a str> {
    match value {
        Value::Object(map) => {
            if let Some(Value::String(why)) = map.get(INCLUDE_ERROR_KEY) {
                return Some(why);
            }
            map.iter().filter(|(k, _)| !skip.contains(&k.as_str())).find_map(|(_, v)| include_error(v, &[]))
        }
        Value::Array(items) => items.iter().find_map(|v| include_error(v, &[])),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn template(files: &[(&str, &str)]) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        for (path, text) in files {
            let p = dir.path().join(path);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, text).unwrap();
        }
        dir
    }

    #[test]
    fn includes_resolve_relative_to_the_including_file() {
        let dir = template(&[
            ("org.yaml", "name: Org\nworkspaces:\n  - !include teams/eng.yaml\n"),
            (
                "teams/eng.yaml",
                "name: Eng\nsystem_prompt: !include ../prompts/eng.md\nchildren:\n  - !include dev.yaml\n",
            ),
            ("teams/dev.yaml", "name: Dev\n"),
            ("prompts/eng.md", "You lead engineering.\n"),
        ]);
        let tree = read_org(dir.path()).unwrap();
        let eng = &tree.value["workspaces"][0];
        assert_eq!(eng["name"], "Eng");
        assert_eq!(eng["system_prompt"], "You lead engineering.\n");
        assert_eq!(eng["children"][0]["name"], "Dev");
        assert_eq!(
            tree.files.keys().cloned().collect::<Vec<_>>(),
            vec!["org.yaml", "prompts/eng.md", "teams/dev.yaml", "teams/eng.yaml"]
        );
    }

    #[test]
    fn a_bad_include_marks_its_place_with_the_chain_of_files() {
        let outside = template(&[("secret.yaml", "name: Outside\n")]);
        let escape = format!("{}/secret.yaml", outside.path().display());
        let rel_escape = "../".repeat(12) + &escape[1..];
        let dir = template(&[
            (
                "org.yaml",
                &format!(
                    "workspaces:\n  - !include a.yaml\n  - !include missing.yaml\n  - !include {rel_escape}\n  - name: Fine\n"
                ),
            ),
            ("a.yaml", "name: A\nchildren:\n  - !include b.yaml\n"),
            ("b.yaml", "!include a.yaml\n"),
        ]);
        let tree = read_org(dir.path()).unwrap();
        let nodes = tree.value["workspaces"].as_array().unwrap();
        let cycle = include_error(&nodes[0]["children"][0], &[]).unwrap();
        assert_eq!(
            cycle,
            "org.yaml -> a.yaml -> b.yaml: `!include a.yaml` is a cycle (org.yaml -> a.yaml -> b.yaml -> a.yaml)"
        );
        assert_eq!(include_error(&nodes[0], &["children"]), None, "A itself is fine");
        assert_eq!(include_error(&nodes[1], &[]).unwrap(), "org.yaml: `!include missing.yaml`: no such file");
        assert!(include_error(&nodes[2], &[]).unwrap().contains("escapes the template root"));
        assert_eq!(nodes[3]["name"], "Fine");
    }

    #[test]
    fn includes_nest_at_most_sixteen_deep() {
        let mut files: Vec<(String, String)> =
            (0..20).map(|i| (format!("n{i}.yaml"), format!("!include n{}.yaml\n", i + 1))).collect();
        files.push(("n20.yaml".into(), "name: Deep\n".into()));
        files.push(("org.yaml".into(), "workspaces:\n  - !include n0.yaml\n".into()));
        let refs: Vec<(&str, &str)> = files.iter().map(|(a, b)| (a.as_str(), b.as_str())).collect();
        let dir = template(&refs);
        let tree = read_org(dir.path()).unwrap();
        let why = include_error(&tree.value["workspaces"][0], &[]).unwrap();
        assert!(why.contains("nests deeper than 16 files"), "{why}");
        assert!(why.starts_with("org.yaml -> n0.yaml -> n1.yaml"), "{why}");
    }

    #[test]
    fn a_syntax_error_in_org_yaml_fails_the_file_and_one_in_an_include_only_its_place() {
        let dir = template(&[("org.yaml", "workspaces: [\n"), ("x.yaml", "name: [\n")]);
        assert!(read_org(dir.path()).unwrap_err().starts_with("org.yaml: "));
        std::fs::write(dir.path().join("org.yaml"), "workspaces:\n  - !include x.yaml\n").unwrap();
        let tree = read_org(dir.path()).unwrap();
        assert!(include_error(&tree.value["workspaces"][0], &[]).unwrap().starts_with("org.yaml -> x.yaml: "));
    }
}
