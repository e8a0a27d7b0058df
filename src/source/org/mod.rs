//! Org templates in the original platform's format: a directory holding `org.yaml`
//! (`defaults`, nested `workspaces`/`children`, `!include`, `files_dir`, prompts,
//! `.env`, `required_env`). The directory source reads such a directory as one
//! template (its other YAML files are includes, not manifests); `convert` prints the
//! equivalent manifests.
//!
//! include.rs reads the tree, convert.rs turns it into objects without IO, names.rs
//! maps display names to object names, dotenv.rs reads `.env` files.

pub mod convert;
pub mod dotenv;
pub mod include;
pub mod names;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use super::SourceObject;
use crate::api::{ObjectKey, SourceRef};
pub use convert::{Converted, TemplateFiles};

/// The file that makes a directory an org template.
pub const ORG_FILE: &str = "org.yaml";

/// Whether `dir` holds an org template.
pub fn is_org_dir(dir: &Path) -> bool {
    dir.join(ORG_FILE).is_file()
}

/// One template as read now.
#[derive(Debug, Default)]
pub struct LoadedOrg {
    pub converted: Converted,
    /// sha256 over every file read (org.yaml, includes, prompts, files_dir, .env).
    pub digest: [u8; 32],
}

impl LoadedOrg {
    /// The objects, each with `source`.
    pub fn objects(&self, source: &SourceRef) -> Vec<SourceObject> {
        let mut out = Vec::new();
        if let Some(team) = &self.converted.team {
            out.push(SourceObject::Team { object: Box::new(team.clone()), source: source.clone() });
        }
        for w in &self.converted.workspaces {
            out.push(match w {
                Ok(w) => SourceObject::Workspace { object: Box::new(w.clone()), source: source.clone() },
                Err((key, error)) => SourceObject::Invalid {
                    kind: "Workspace".into(),
                    key: key.clone(),
                    source: source.clone(),
                    error: error.clone(),
                },
            });
        }
        out
    }

    /// What was declared before and must be kept because the part of the template
    /// that declared it cannot be read now: everything when the top level failed,
    /// else what sat under each subtree that failed (and is not declared now).
    pub fn kept_from(&self, previous: &[SourceObject]) -> Vec<SourceObject> {
        if self.converted.fatal {
            return previous.to_vec();
        }
        if self.converted.keep_under.is_empty() {
            return Vec::new();
        }
        let declared: std::collections::BTreeSet<ObjectKey> =
            self.objects(&SourceRef::default()).iter().map(key_of).collect();
        let parents: BTreeMap<ObjectKey, Option<String>> = previous
            .iter()
            .filter_map(|o| match o {
                SourceObject::Workspace { object, .. } => Some((key_of(o), object.spec.parent.clone())),
                _ => None,
            })
            .collect();
        // Up from `key` to the first ancestor declared now (whose subtree is known),
        // or the top: kept if an unreadable part is on the way.
        let under = |key: &ObjectKey| -> bool {
            let mut at = key.clone();
            for _ in 0..64 {
                let parent = parents.get(&at).cloned().flatten().map(|p| ObjectKey::new(&at.namespace, p));
                if self.converted.keep_under.contains(&parent) {
                    return true;
                }
                match parent {
                    Some(p) if !declared.contains(&p) => at = p,
                    _ => return false,
                }
            }
            false
        };
        previous
            .iter()
            .filter(|o| !matches!(o, SourceObject::Team { .. }))
            .filter(|o| !declared.contains(&key_of(o)) && under(&key_of(o)))
            .cloned()
            .collect()
    }
}

fn key_of(o: &SourceObject) -> ObjectKey {
    match o {
        SourceObject::Workspace { object, .. } => ObjectKey::new(
            object.metadata.namespace.clone().unwrap_or_default(),
            object.metadata.name.clone().unwrap_or_default(),
        ),
        SourceObject::Team { object, .. } => ObjectKey::new(
            object.metadata.namespace.clone().unwrap_or_default(),
            object.metadata.name.clone().unwrap_or_default(),
        ),
        SourceObject::WarmPool { object, .. } => ObjectKey::new(
            object.metadata.namespace.clone().unwrap_or_default(),
            object.metadata.name.clone().unwrap_or_default(),
        ),
        SourceObject::Invalid { key, .. } => key.clone(),
    }
}

/// Reads the template in `root`. `origin` names org.yaml in messages.
pub fn load(root: &Path) -> LoadedOrg {
    let origin = root.join(ORG_FILE).display().to_string();
    let tree = match include::read_org(root) {
        Ok(tree) => tree,
        Err(e) => {
            let dir = root.display().to_string();
            let message = if e.starts_with(ORG_FILE) { format!("{dir}/{e}") } else { e };
            let converted = Converted { errors: vec![message], fatal: true, ..Default::default() };
            return LoadedOrg { converted, digest: [0; 32] };
        }
    };
    let files = FsFiles::new(root);
    let converted = convert::convert(&tree.value, &files, &origin);
    let mut hasher = Sha256::new();
    for (path, digest) in tree.files.iter().chain(files.read.borrow().iter()) {
        hasher.update(path.as_bytes());
        hasher.update(digest);
    }
    LoadedOrg { converted, digest: hasher.finalize().into() }
}

/// The template's files on disk, confined to its root (symlinks resolved).
pub struct FsFiles {
    root: PathBuf,
    /// Every file read (relative path -> sha256), for the template's digest.
    read: std::cell::RefCell<BTreeMap<String, [u8; 32]>>,
}

impl FsFiles {
    pub fn new(root: &Path) -> Self {
        Self { root: root.canonicalize().unwrap_or_else(|_| root.to_path_buf()), read: Default::default() }
    }

    fn inside(&self, rel: &str) -> Result<Option<PathBuf>, String> {
        match self.root.join(rel).canonicalize() {
            Ok(p) if p.starts_with(&self.root) => Ok(Some(p)),
            Ok(_) => Err(format!("{rel}: escapes the template root (through a symlink); keep it inside")),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(format!("{rel}: {e}")),
        }
    }
}

impl TemplateFiles for FsFiles {
    fn read(&self, rel: &str) -> Result<Option<String>, String> {
        let Some(path) = self.inside(rel)? else { return Ok(None) };
        if !path.is_file() {
            return Ok(None);
        }
        let bytes = std::fs::read(&path).map_err(|e| format!("{rel}: cannot read the file ({e})"))?;
        if bytes.len() > super::manifest::MAX_FILE_BYTES {
            return Err(format!("{rel}: the file is {} bytes; files over 1 MiB are refused", bytes.len()));
        }
        self.read.borrow_mut().insert(rel.to_string(), Sha256::digest(&bytes).into());
        String::from_utf8(bytes).map(Some).map_err(|_| format!("{rel}: only UTF-8 text files can go into /configs"))
    }

    fn list(&self, rel: &str) -> Result<Vec<String>, String> {
        let Some(dir) = self.inside(rel)?.filter(|p| p.is_dir()) else {
            return Err(format!("{rel}: no such directory in the template"));
        };
        let mut out = Vec::new();
        let mut pending = vec![(dir.clone(), 0usize)];
        while let Some((at, depth)) = pending.pop() {
            let entries = std::fs::read_dir(&at).map_err(|e| format!("{rel}: cannot read the directory ({e})"))?;
            for entry in entries.flatten() {
                let path = entry.path();
                let Ok(meta) = std::fs::metadata(&path) else { continue };
                let sub =
                    path.strip_prefix(&dir).unwrap_or(&path).to_string_lossy().replace(std::path::MAIN_SEPARATOR, "/");
                if meta.is_dir() {
                    if depth < 16 && !entry.file_type().is_ok_and(|t| t.is_symlink()) {
                        pending.push((path, depth + 1));
                    }
                } else if meta.is_file() {
                    out.push(sub);
                }
            }
        }
        out.sort();
        Ok(out)
    }
}

/// The template as multi-document YAML: the Team, then every Workspace, each with a
/// comment naming the secrets its `.env` files give it (values never printed). Nodes
/// that cannot be converted are listed in `errors`.
pub fn manifests(loaded: &LoadedOrg) -> (String, Vec<String>) {
    let c = &loaded.converted;
    let mut out = String::new();
    let mut errors = c.errors.clone();
    if let Some(team) = &c.team {
        out.push_str("---\n");
        out.push_str(&object_yaml("Team", &team.metadata, &team.spec));
    }
    for w in &c.workspaces {
        match w {
            Ok(w) => {
                out.push_str("---\n");
                if !w.spec.source_secrets.is_empty() {
                    let names: Vec<&str> = w.spec.source_secrets.keys().map(String::as_str).collect();
                    out.push_str(&format!(
                        "# secrets from .env (not printed): {}\n# set them with: molecule-operator secret set NAME --workspace {}\n",
                        names.join(", "),
                        w.metadata.name.as_deref().unwrap_or_default()
                    ));
                }
                out.push_str(&object_yaml("Workspace", &w.metadata, &w.spec));
            }
            Err((_, why)) => errors.push(why.clone()),
        }
    }
    if !c.not_acted_on.is_empty() {
        let list: Vec<&str> = c.not_acted_on.iter().map(String::as_str).collect();
        out.push_str(&format!("# kept as annotations, not acted on by this operator: {}\n", list.join(", ")));
    }
    (out, errors)
}

fn object_yaml<S: serde::Serialize>(
    kind: &str,
    metadata: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
    spec: &S,
) -> String {
    let doc = serde_json::json!({
        "apiVersion": crate::api::API_VERSION,
        "kind": kind,
        "metadata": metadata,
        "spec": spec,
    });
    serde_saphyr::to_string(&doc).unwrap_or_else(|e| format!("# cannot print {kind}: {e}\n"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{Workspace, WorkspaceSpec};

    fn ws(name: &str, parent: Option<&str>) -> SourceObject {
        let mut w = Workspace::new(name, WorkspaceSpec { parent: parent.map(str::to_string), ..Default::default() });
        w.metadata.namespace = Some("default".into());
        SourceObject::Workspace { object: Box::new(w), source: SourceRef::default() }
    }

    fn names(objects: &[SourceObject]) -> Vec<String> {
        objects.iter().map(|o| key_of(o).name).collect()
    }

    #[test]
    fn what_sat_under_an_unreadable_part_is_kept_and_nothing_else() {
        let previous = vec![ws("lead", None), ws("a", Some("lead")), ws("a1", Some("a")), ws("other", None)];
        let mut loaded = LoadedOrg::default();
        assert!(loaded.kept_from(&previous).is_empty(), "all readable: nothing kept");
        loaded.converted.workspaces.push(Ok(match &previous[0] {
            SourceObject::Workspace { object, .. } => (**object).clone(),
            _ => unreachable!(),
        }));
        loaded.converted.keep_under.push(Some(ObjectKey::new("default", "lead")));
        assert_eq!(names(&loaded.kept_from(&previous)), vec!["a", "a1"], "lead is declared now; other is not under it");
        loaded.converted.keep_under = vec![None];
        assert_eq!(names(&loaded.kept_from(&previous)), vec!["other"], "a root node failed: the other roots are kept");
        loaded.converted.fatal = true;
        assert_eq!(loaded.kept_from(&previous).len(), 4);
    }
}
