//! The shape of the crate: its top-level modules depend on each other without cycles
//! (a newcomer can read them bottom up: `api`, `model`, `rules`, ... up to `operator`), and
//! the pure layers do no IO. Read from the sources: every `crate::<module>` a file
//! names counts as a dependency of the top-level module the file belongs to.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("src/ is readable") {
        let path = entry.expect("a directory entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The top-level module a file of src/ belongs to (None for lib.rs, main.rs, bin/).
fn module_of(src: &Path, file: &Path) -> Option<String> {
    let rel = file.strip_prefix(src).ok()?;
    let first = rel.components().next()?.as_os_str().to_str()?;
    match first {
        "lib.rs" | "main.rs" | "bin" => None,
        f => Some(f.trim_end_matches(".rs").to_string()),
    }
}

/// Top-level module -> the top-level modules its files name as `crate::<module>`.
fn dependencies() -> BTreeMap<String, BTreeSet<String>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut deps: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for file in files {
        let Some(module) = module_of(&src, &file) else { continue };
        let text = std::fs::read_to_string(&file).expect("a source file is readable");
        let entry = deps.entry(module.clone()).or_default();
        for (i, _) in text.match_indices("crate::") {
            // `crate::` inside a longer path (e.g. `my_crate::`) is not ours.
            if text[..i].chars().next_back().is_some_and(|c| c.is_alphanumeric() || c == '_') {
                continue;
            }
            let name: String =
                text[i + "crate::".len()..].chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect();
            if !name.is_empty() && name != module {
                entry.insert(name);
            }
        }
    }
    deps
}

/// One cycle through the graph, if there is any.
fn find_cycle(deps: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        node: &str,
        deps: &BTreeMap<String, BTreeSet<String>>,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(at) = path.iter().position(|n| n == node) {
            let mut cycle = path[at..].to_vec();
            cycle.push(node.to_string());
            return Some(cycle);
        }
        if done.contains(node) {
            return None;
        }
        path.push(node.to_string());
        for next in deps.get(node).into_iter().flatten() {
            if let Some(cycle) = visit(next, deps, path, done) {
                return Some(cycle);
            }
        }
        path.pop();
        done.insert(node.to_string());
        None
    }
    let mut done = BTreeSet::new();
    deps.keys().find_map(|start| visit(start, deps, &mut Vec::new(), &mut done))
}

#[test]
fn the_top_level_modules_form_no_cycle() {
    let deps = dependencies();
    assert!(deps.len() > 10, "the crate's modules were read: {:?}", deps.keys());
    if let Some(cycle) = find_cycle(&deps) {
        panic!("the top-level modules depend on each other in a circle: {}", cycle.join(" -> "));
    }
}

#[test]
fn the_cycle_finder_finds_a_cycle() {
    let deps: BTreeMap<String, BTreeSet<String>> = [
        ("a".to_string(), BTreeSet::from(["b".to_string()])),
        ("b".to_string(), BTreeSet::from(["c".to_string()])),
        ("c".to_string(), BTreeSet::from(["a".to_string()])),
    ]
    .into();
    assert_eq!(find_cycle(&deps), Some(vec!["a".into(), "b".into(), "c".into(), "a".into()]));
}

#[test]
fn the_pure_layers_do_no_io() {
    // What decides (rules), what is computed (status) and what is data (api, model)
    // reach none of the modules that do IO or spawn. (status reads the desired set,
    // source's merged view; the rest of source is IO but not reached from here.)
    let deps = dependencies();
    let io = ["store", "runtime", "execute", "reconcile", "registry", "operator", "kubeapi", "node", "cluster", "cli"];
    for pure in ["rules", "status", "api", "model"] {
        let uses = deps.get(pure).unwrap_or_else(|| panic!("module {pure} exists"));
        for module in io {
            assert!(!uses.contains(module), "{pure} depends on {module}: {uses:?}");
        }
    }
    assert!(!deps["rules"].contains("source") && !deps["model"].contains("source") && !deps["api"].contains("source"));
}
