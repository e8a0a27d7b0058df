//! An org template's tree (org.yaml with its includes resolved) turned into Workspace
//! objects, one per node, and a Team for the org: no IO but through `TemplateFiles`.
//!
//! Per node, as the original's import (`handlers/org.go`): runtime from the node, then
//! `defaults`, then `langgraph`; tier from the node, then `defaults`, then 3 (the
//! original's self-hosted default); model from the node, then `defaults`, then the
//! runtime's default model. `role` and `model` become `MOLECULE_AGENT_ROLE` and
//! `MODEL`. `files_dir`, `system_prompt`, the prompts and a generated `config.yaml`
//! become `spec.configFiles`; the root's and `files_dir`'s `.env` become secrets.
//! What the operator does not act on is kept in annotations and reported once.
//!
//! One node's problem refuses that node only (it keeps what it had: InvalidSpec);
//! a node that cannot be read at all (no name, a failed include) names the file and
//! the node's place, and what was under it is kept as it was (`keep_under`).

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::Deserialize;
use serde_json::Value;

use super::include::include_error;
use super::names::object_name;
use crate::api::{DEFAULT_NAMESPACE, ObjectKey, OperatingMode, Team, TeamSpec, Workspace, WorkspaceSpec};

/// The runtimes the original platform knows (its manifest's workspace templates, plus
/// `external`).
pub const KNOWN_RUNTIMES: &[&str] = &[
    "claude-code",
    "hermes",
    "openclaw",
    "codex",
    "langgraph",
    "crewai",
    "autogen",
    "deepagents",
    "gemini-cli",
    "external",
];
pub const DEFAULT_RUNTIME: &str = "langgraph";
pub const DEFAULT_TIER: u8 = 3;
const DEFAULT_IDLE_INTERVAL_SECONDS: u64 = 600;
/// Files a `files_dir` may hold, and their total size, per workspace.
const MAX_FILES: usize = 256;
const MAX_FILES_BYTES: usize = 1024 * 1024;

/// Annotations every converted object carries.
pub mod annotations {
    pub const DISPLAY_NAME: &str = "molecule.ai/display-name";
    pub const ORG: &str = "molecule.ai/org-template";
    /// Where in the template the node is, e.g. `workspaces[0].children[1]`.
    pub const NODE: &str = "molecule.ai/org-node";
    /// The template's fields this operator keeps but does not act on, comma-separated.
    pub const NOT_ACTED_ON: &str = "molecule.ai/not-acted-on";
    /// Prefix of one annotation per such field, holding its value as JSON.
    pub const FIELD_PREFIX: &str = "org.molecule.ai/";
}

/// The template's files, paths relative to its root (the directory of org.yaml).
pub trait TemplateFiles {
    /// A file's text; Ok(None) when it does not exist. Paths outside the root fail.
    fn read(&self, rel: &str) -> Result<Option<String>, String>;
    /// Every file under the directory `rel` (recursively), relative to it, sorted.
    fn list(&self, rel: &str) -> Result<Vec<String>, String>;
}

/// What one template declares.
#[derive(Debug, Default)]
pub struct Converted {
    pub team: Option<Team>,
    /// One per node that has a name; Err holds why it is refused.
    pub workspaces: Vec<Result<Workspace, (ObjectKey, String)>>,
    /// Problems not tied to one object (a node without a name, a failed include).
    pub errors: Vec<String>,
    /// The top level cannot be read: keep everything the template declared before.
    pub fatal: bool,
    /// Subtrees that could not be read, by parent (None: the top level): keep what
    /// was declared under them before.
    pub keep_under: Vec<Option<ObjectKey>>,
    /// Fields present that this operator does not act on.
    pub not_acted_on: BTreeSet<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct OrgFile {
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    description: Option<String>,
    #[serde(default)]
    defaults: Defaults,
    #[serde(default)]
    workspaces: Vec<Value>,
    #[serde(default)]
    global_memories: Option<Value>,
    #[serde(default)]
    required_env: Vec<EnvRequirement>,
    #[serde(default)]
    recommended_env: Option<Value>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Defaults {
    runtime: Option<String>,
    tier: Option<i64>,
    model: Option<String>,
    plugins: Option<Value>,
    initial_prompt: Option<String>,
    initial_prompt_file: Option<String>,
    idle_prompt: Option<String>,
    idle_prompt_file: Option<String>,
    idle_interval_seconds: Option<u64>,
    category_routing: Option<Value>,
    initial_memories: Option<Value>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Node {
    /// Read from the raw node before it is typed (a nameless node is not typed).
    #[allow(dead_code)]
    name: String,
    role: Option<String>,
    runtime: Option<String>,
    tier: Option<i64>,
    template: Option<String>,
    files_dir: Option<String>,
    system_prompt: Option<String>,
    model: Option<String>,
    workspace_dir: Option<Value>,
    workspace_access: Option<Value>,
    plugins: Option<Value>,
    initial_prompt: Option<String>,
    initial_prompt_file: Option<String>,
    idle_prompt: Option<String>,
    idle_prompt_file: Option<String>,
    idle_interval_seconds: Option<u64>,
    category_routing: Option<Value>,
    initial_memories: Option<Value>,
    max_concurrent_tasks: Option<Value>,
    schedules: Option<Value>,
    channels: Option<Value>,
    #[serde(default)]
    external: bool,
    url: Option<String>,
    canvas: Option<Value>,
    #[serde(default)]
    required_env: Vec<EnvRequirement>,
    recommended_env: Option<Value>,
    /// Walked as raw values, so that each child is refused on its own.
    #[serde(default)]
    #[allow(dead_code)]
    children: Option<serde::de::IgnoredAny>,
}

/// A plain name, or `{any_of: [...]}`; kept as `A|B` (see `WorkspaceSpec::required_env`).
#[derive(Clone, Debug, Deserialize)]
#[serde(untagged)]
enum EnvRequirement {
    Name(String),
    AnyOf { any_of: Vec<String> },
}

impl EnvRequirement {
    fn names(&self) -> Vec<&str> {
        match self {
            Self::Name(n) => vec![n.as_str()],
            Self::AnyOf { any_of } => any_of.iter().map(String::as_str).collect(),
        }
    }
    fn as_spec(&self) -> String {
        self.names().join("|")
    }
}

/// `^[A-Z][A-Z0-9_]{0,127}$`, the original's rule for env requirement names.
fn env_name_ok(name: &str) -> bool {
    let mut chars = name.chars();
    chars.next().is_some_and(|c| c.is_ascii_uppercase())
        && name.len() <= 128
        && chars.all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_')
}

/// The default model of a runtime (`internal/models/runtime_defaults.go`).
pub fn default_model(runtime: &str) -> &'static str {
    if runtime == "claude-code" { "sonnet" } else { "anthropic:claude-opus-4-7" }
}

/// Converts a template whose org.yaml is `origin` (for messages).
pub fn convert(tree: &Value, files: &dyn TemplateFiles, origin: &str) -> Converted {
    let mut out = Converted::default();
    if let Some(why) = include_error(tree, &["workspaces"]) {
        out.errors.push(format!("{origin}: {why}"));
        out.fatal = true;
        return out;
    }
    let top = match tree {
        Value::Null => OrgFile::default(),
        other => match OrgFile::deserialize(other) {
            Ok(top) => top,
            Err(e) => {
                out.errors.push(format!("{origin}: {e}"));
                out.fatal = true;
                return out;
            }
        },
    };
    let mut org = Org { top: &top, files, origin, root_env: BTreeMap::new(), team: None, out: &mut out };
    if let Some(bad) = top.required_env.iter().flat_map(EnvRequirement::names).find(|n| !env_name_ok(n)) {
        org.out.errors.push(format!("{origin}: required_env: {bad:?} is not a variable name (A-Z, 0-9, _)"));
        org.out.fatal = true;
        return out;
    }
    match org.env_file(".env") {
        Ok(env) => org.root_env = env,
        Err(e) => {
            org.out.errors.push(e);
            org.out.fatal = true;
            return out;
        }
    }
    if let Some(name) = top.name.as_deref().filter(|n| !n.trim().is_empty()) {
        org.team = Some(org.make_team(name));
    }
    for field in ["global_memories", "recommended_env"] {
        let present = if field == "global_memories" { &top.global_memories } else { &top.recommended_env };
        if present.is_some() {
            org.out.not_acted_on.insert(field.to_string());
        }
    }
    let mut placed: BTreeMap<ObjectKey, Vec<(String, String)>> = BTreeMap::new();
    org.walk(&top.workspaces, None, "workspaces", None, &mut placed);
    // Two nodes that map to one name: refused, naming both.
    for (key, nodes) in placed.into_iter().filter(|(_, n)| n.len() > 1) {
        let names: Vec<String> = nodes.iter().map(|(display, at)| format!("{display:?} ({at})")).collect();
        let why = format!(
            "{origin}: nodes {} all map to the name {}; rename all but one of them",
            names.join(" and "),
            key.name
        );
        out.workspaces.retain(|w| match w {
            Ok(w) => w.metadata.name.as_deref() != Some(key.name.as_str()),
            Err((k, _)) => *k != key,
        });
        out.workspaces.push(Err((key, why)));
    }
    out
}

struct Org<'a> {
    top: &'a OrgFile,
    files: &'a dyn TemplateFiles,
    origin: &'a str,
    root_env: BTreeMap<String, String>,
    team: Option<String>,
    out: &'a mut Converted,
}

impl Org<'_> {
    fn make_team(&mut self, display: &str) -> String {
        let name = object_name(display);
        let mut ann = BTreeMap::from([
            (annotations::DISPLAY_NAME.to_string(), display.to_string()),
            (annotations::ORG.to_string(), display.to_string()),
        ]);
        if let Some(d) = &self.top.description {
            ann.insert("molecule.ai/description".into(), d.clone());
        }
        if let Some(m) = &self.top.global_memories {
            ann.insert(format!("{}global_memories", annotations::FIELD_PREFIX), m.to_string());
        }
        self.out.team = Some(Team {
            metadata: ObjectMeta {
                name: Some(name.clone()),
                namespace: Some(DEFAULT_NAMESPACE.into()),
                annotations: Some(ann),
                ..Default::default()
            },
            spec: TeamSpec::default(),
            status: None,
        });
        name
    }

    fn walk(
        &mut self,
        nodes: &[Value],
        parent: Option<(&ObjectKey, &str)>,
        at: &str,
        parent_refused: Option<&str>,
        placed: &mut BTreeMap<ObjectKey, Vec<(String, String)>>,
    ) {
        for (i, raw) in nodes.iter().enumerate() {
            let path = format!("{at}[{i}]");
            let under = parent.map(|(_, d)| format!(" (under {d:?})")).unwrap_or_default();
            let place = format!("{}: {path}{under}", self.origin);
            let Some(map) = raw.as_object() else {
                let why = include_error(raw, &[]).map_or_else(
                    || format!("{place}: expected a mapping with `name:` and the node's fields"),
                    |why| format!("{place}: {why}"),
                );
                self.out.errors.push(format!("{why}; what was declared there is kept until it is fixed"));
                self.out.keep_under.push(parent.map(|(k, _)| k.clone()));
                continue;
            };
            let name = match map.get("name") {
                Some(Value::String(n)) if !n.trim().is_empty() => n.trim().to_string(),
                _ => {
                    let why = include_error(raw, &["children"]).map_or_else(
                        || format!("{place}: the node has no name; give it `name:`"),
                        |why| format!("{place}: {why}"),
                    );
                    self.out.errors.push(format!("{why}; what was declared there is kept until it is fixed"));
                    self.out.keep_under.push(parent.map(|(k, _)| k.clone()));
                    if let Some(Value::Array(children)) = map.get("children") {
                        let refused = format!("{why} (it is this node's parent)");
                        self.walk(children, None, &format!("{path}.children"), Some(&refused), placed);
                    }
                    continue;
                }
            };
            let key = ObjectKey::new(DEFAULT_NAMESPACE, object_name(&name));
            placed.entry(key.clone()).or_default().push((name.clone(), path.clone()));
            let origin = self.origin;
            let node = if let Some(why) = parent_refused {
                Err(why.to_string())
            } else {
                self.workspace(raw, &name, &key, parent.map(|(k, _)| k), &path)
                    .map_err(|why| format!("{origin}: {path} {name:?}{under}: {why}"))
            };
            self.out.workspaces.push(node.map_err(|why| (key.clone(), why)));
            match map.get("children") {
                None | Some(Value::Null) => {}
                Some(Value::Array(children)) => {
                    self.walk(children, Some((&key, &name)), &format!("{path}.children"), parent_refused, placed)
                }
                Some(_) => {
                    self.out.errors.push(format!("{place}: `children` must be a list of nodes"));
                    self.out.keep_under.push(Some(key.clone()));
                }
            }
        }
    }

    /// One node as a Workspace, or why it cannot be one (the caller names the node).
    fn workspace(
        &mut self,
        raw: &Value,
        display: &str,
        key: &ObjectKey,
        parent: Option<&ObjectKey>,
        path: &str,
    ) -> Result<Workspace, String> {
        if let Some(why) = include_error(raw, &["children"]) {
            return Err(why.to_string());
        }
        let node = Node::deserialize(raw).map_err(|e| e.to_string())?;
        let d = &self.top.defaults;
        let runtime = node.runtime.clone().or(d.runtime.clone()).unwrap_or_else(|| DEFAULT_RUNTIME.into());
        if !KNOWN_RUNTIMES.contains(&runtime.as_str()) {
            return Err(format!(
                "runtime {runtime:?} is not one the original platform knows ({})",
                KNOWN_RUNTIMES.join(", ")
            ));
        }
        let tier = match node.tier.or(d.tier) {
            None | Some(0) => DEFAULT_TIER,
            Some(t @ 1..=4) => t as u8,
            Some(t) => return Err(format!("tier {t} is out of range; use 1, 2, 3 or 4")),
        };
        let model = node.model.clone().or(d.model.clone()).unwrap_or_else(|| default_model(&runtime).into());
        let mut required: Vec<String> = Vec::new();
        for r in self.top.required_env.iter().chain(&node.required_env) {
            if let Some(bad) = r.names().into_iter().find(|n| !env_name_ok(n)) {
                return Err(format!("required_env: {bad:?} is not a variable name (A-Z, 0-9, _)"));
            }
            if !required.contains(&r.as_spec()) {
                required.push(r.as_spec());
            }
        }

        let mut env = BTreeMap::from([("MODEL".to_string(), model.clone())]);
        if runtime == "hermes" {
            env.insert("HERMES_DEFAULT_MODEL".into(), model.clone());
        }
        if let Some(role) = node.role.as_deref().filter(|r| !r.is_empty()) {
            env.insert("MOLECULE_AGENT_ROLE".into(), role.to_string());
        }

        // /configs: files_dir's files, then what the node says (which wins).
        let mut files = BTreeMap::new();
        let mut secrets = self.root_env.clone();
        let files_dir = match node.files_dir.as_deref() {
            Some(dir) => Some(clean_rel(dir).map_err(|why| format!("files_dir {dir:?} {why}"))?),
            None => None,
        };
        let mut base_config = serde_json::Map::new();
        if let Some(dir) = &files_dir {
            let listed = self.files.list(dir).map_err(|e| format!("files_dir: {e}"))?;
            if listed.len() > MAX_FILES {
                return Err(format!("files_dir {dir:?} holds {} files; at most {MAX_FILES} are copied", listed.len()));
            }
            let mut total = 0;
            for rel in listed {
                let full = format!("{dir}/{rel}");
                if rel == ".env" {
                    secrets.extend(self.env_file(&full)?);
                    continue;
                }
                let text = self.files.read(&full)?.ok_or_else(|| format!("{full}: vanished while read"))?;
                total += text.len();
                if total > MAX_FILES_BYTES {
                    return Err(format!("files_dir {dir:?} holds more than {} KiB", MAX_FILES_BYTES / 1024));
                }
                if rel == "config.yaml" {
                    base_config = match serde_saphyr::from_str::<Value>(&text) {
                        Ok(Value::Object(m)) => m,
                        Ok(Value::Null) => serde_json::Map::new(),
                        Ok(_) => return Err(format!("{full}: expected a mapping")),
                        Err(e) => return Err(format!("{full}: {e}")),
                    };
                    continue;
                }
                let crlf_to_lf = [".sh", ".py", ".md"].iter().any(|ext| rel.ends_with(ext));
                files.insert(rel, if crlf_to_lf { text.replace("\r\n", "\n") } else { text });
            }
        }
        for r in base_config.get("required_env").and_then(Value::as_array).into_iter().flatten() {
            if let Ok(req) = EnvRequirement::deserialize(r)
                && !required.contains(&req.as_spec())
            {
                required.push(req.as_spec());
            }
        }
        if let Some(prompt) = &node.system_prompt {
            files.insert("system-prompt.md".into(), prompt.clone());
        }
        let initial = self.prompt(
            node.initial_prompt.as_ref().or(d.initial_prompt.as_ref()),
            node.initial_prompt_file.as_ref().or(d.initial_prompt_file.as_ref()),
            files_dir.as_deref(),
            "initial_prompt_file",
        )?;
        let idle = self.prompt(
            node.idle_prompt.as_ref().or(d.idle_prompt.as_ref()),
            node.idle_prompt_file.as_ref().or(d.idle_prompt_file.as_ref()),
            files_dir.as_deref(),
            "idle_prompt_file",
        )?;
        let mut config = base_config;
        config.insert("name".into(), display.into());
        if let Some(role) = &node.role {
            config.insert("description".into(), role.as_str().into());
        }
        config.entry("description").or_insert_with(|| "".into());
        config.entry("version").or_insert_with(|| "1.0.0".into());
        config.insert("tier".into(), tier.into());
        config.insert("runtime".into(), runtime.as_str().into());
        config.insert("model".into(), model.as_str().into());
        config.entry("runtime_config").or_insert_with(|| serde_json::json!({"timeout": 0}));
        if let Some(routing) = node.category_routing.as_ref().or(d.category_routing.as_ref()) {
            config.insert("category_routing".into(), routing.clone());
        }
        if let Some(p) = initial {
            config.insert("initial_prompt".into(), p.into());
        }
        if let Some(p) = idle {
            config.insert("idle_prompt".into(), p.into());
            let every = node.idle_interval_seconds.or(d.idle_interval_seconds).unwrap_or(DEFAULT_IDLE_INTERVAL_SECONDS);
            config.insert("idle_interval_seconds".into(), every.into());
        }
        let config_text = serde_saphyr::to_string(&Value::Object(config)).map_err(|e| format!("config.yaml: {e}"))?;
        files.insert("config.yaml".into(), config_text);
        for path in files.keys() {
            crate::api::interpolate::config_file_path(path).map_err(|why| format!("files_dir file {path:?} {why}"))?;
        }

        // Kept, not acted on.
        let mut ann = BTreeMap::from([
            (annotations::DISPLAY_NAME.to_string(), display.to_string()),
            (annotations::NODE.to_string(), path.to_string()),
        ]);
        if let Some(org) = &self.top.name {
            ann.insert(annotations::ORG.into(), org.clone());
        }
        let mut kept: Vec<(&str, Value)> = Vec::new();
        let mut keep = |field: &'static str, v: Option<Value>| {
            if let Some(v) = v.filter(|v| !v.is_null()) {
                kept.push((field, v));
            }
        };
        keep("plugins", node.plugins.clone().or(d.plugins.clone()));
        keep("schedules", node.schedules.clone());
        keep("channels", node.channels.clone());
        keep("category_routing", node.category_routing.clone().or(d.category_routing.clone()));
        keep("initial_memories", node.initial_memories.clone().or(d.initial_memories.clone()));
        keep("canvas", node.canvas.clone());
        keep("template", node.template.clone().map(Value::String));
        keep("workspace_dir", node.workspace_dir.clone());
        keep("workspace_access", node.workspace_access.clone());
        keep("max_concurrent_tasks", node.max_concurrent_tasks.clone());
        keep("recommended_env", node.recommended_env.clone());
        let external = node.external || runtime == "external";
        if external {
            keep("external", Some(serde_json::json!({"url": node.url})));
        }
        if !kept.is_empty() {
            let names: Vec<&str> = kept.iter().map(|(f, _)| *f).collect();
            ann.insert(annotations::NOT_ACTED_ON.into(), names.join(","));
            for (field, value) in kept {
                self.out.not_acted_on.insert(field.to_string());
                ann.insert(format!("{}{field}", annotations::FIELD_PREFIX), value.to_string());
            }
        }

        let spec = WorkspaceSpec {
            team: self.team.clone(),
            parent: parent.map(|p| p.name.clone()),
            runtime: Some(runtime),
            tier: Some(tier),
            env,
            // An external agent runs elsewhere: no container here.
            operating_mode: external.then_some(OperatingMode::Stopped),
            config_files: files,
            required_env: required,
            source_secrets: secrets,
            ..Default::default()
        };
        Ok(Workspace {
            metadata: ObjectMeta {
                name: Some(key.name.clone()),
                namespace: Some(key.namespace.clone()),
                annotations: Some(ann),
                ..Default::default()
            },
            spec,
            status: None,
        })
    }

    /// A prompt given inline, else read from a file: in `files_dir` when it is there,
    /// else relative to the template root.
    fn prompt(
        &self,
        inline: Option<&String>,
        file: Option<&String>,
        files_dir: Option<&str>,
        field: &str,
    ) -> Result<Option<String>, String> {
        if let Some(text) = inline {
            return Ok(Some(text.clone()));
        }
        let Some(file) = file else { return Ok(None) };
        let rel = clean_rel(file).map_err(|why| format!("{field} {file:?} {why}"))?;
        if let Some(dir) = files_dir
            && let Some(text) = self.files.read(&format!("{dir}/{rel}"))?
        {
            return Ok(Some(text));
        }
        match self.files.read(&rel)? {
            Some(text) => Ok(Some(text)),
            None => Err(format!("{field} {file:?}: no such file in files_dir or the template root")),
        }
    }

    /// A `.env` file's pairs; none when it does not exist.
    fn env_file(&self, rel: &str) -> Result<BTreeMap<String, String>, String> {
        match self.files.read(rel)? {
            Some(text) => super::dotenv::parse(&text, &self.template_path(rel)),
            None => Ok(BTreeMap::new()),
        }
    }

    /// `rel` as a path beside org.yaml, for messages.
    fn template_path(&self, rel: &str) -> String {
        match self.origin.rsplit_once('/') {
            Some((dir, _)) => format!("{dir}/{rel}"),
            None => rel.to_string(),
        }
    }
}

/// A relative path with no `..`, `.` or empty parts (no leading `/`), `/`-separated.
fn clean_rel(path: &str) -> Result<String, String> {
    let trimmed = path.trim().trim_end_matches('/');
    let trimmed = trimmed.strip_prefix("./").unwrap_or(trimmed);
    if trimmed.is_empty()
        || trimmed.starts_with('/')
        || trimmed.split('/').any(|p| p.is_empty() || p == "." || p == "..")
    {
        return Err("must be a path inside the template, relative to it, without `..`".into());
    }
    Ok(trimmed.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A template in memory.
    struct Files(BTreeMap<String, String>);

    impl TemplateFiles for Files {
        fn read(&self, rel: &str) -> Result<Option<String>, String> {
            Ok(self.0.get(rel).cloned())
        }
        fn list(&self, rel: &str) -> Result<Vec<String>, String> {
            let prefix = format!("{rel}/");
            Ok(self.0.keys().filter_map(|k| k.strip_prefix(&prefix)).map(str::to_string).collect())
        }
    }

    fn files(pairs: &[(&str, &str)]) -> Files {
        Files(pairs.iter().map(|(a, b)| (a.to_string(), b.to_string())).collect())
    }

    fn tree(yaml: &str) -> Value {
        serde_saphyr::from_str(yaml).unwrap()
    }

    fn ok<'a>(c: &'a Converted, name: &str) -> &'a Workspace {
        c.workspaces
            .iter()
            .find_map(|w| w.as_ref().ok().filter(|w| w.metadata.name.as_deref() == Some(name)))
            .unwrap_or_else(|| panic!("{name} converted: {:?} {:?}", c.workspaces, c.errors))
    }

    fn refused<'a>(c: &'a Converted, name: &str) -> &'a str {
        c.workspaces
            .iter()
            .find_map(|w| w.as_ref().err().filter(|(k, _)| k.name == name).map(|(_, e)| e.as_str()))
            .unwrap_or_else(|| panic!("{name} refused: {:?}", c.workspaces))
    }

    const ORG: &str = r#"
name: MeDo Studio
defaults:
  runtime: claude-code
  tier: 2
  initial_prompt: Read your system prompt, then wait.
required_env: [ANTHROPIC_API_KEY]
workspaces:
  - name: PM
    role: Product manager
    system_prompt: You plan.
    plugins: [github]
    children:
      - name: MeDo Builder
        files_dir: builder
        runtime: hermes
        model: gpt-x
        idle_prompt_file: idle.md
        canvas: {x: 1, y: 2}
        required_env: [{any_of: [GH_TOKEN, GITHUB_TOKEN]}]
        children:
          - name: QA
            tier: 4
            schedules: [{name: nightly, cron_expr: "0 2 * * *", prompt: test}]
"#;

    fn org_files() -> Files {
        files(&[
            (".env", "ANTHROPIC_API_KEY=sk-root\nSHARED=root\n"),
            ("builder/.env", "SHARED=builder\n"),
            ("builder/idle.md", "Anything new?\n"),
            ("builder/skills/build/SKILL.md", "Build it.\r\n"),
            ("builder/config.yaml", "version: 2.0.0\nrequired_env: [NPM_TOKEN]\nskills: [build]\n"),
        ])
    }

    #[test]
    fn every_node_becomes_a_workspace_with_its_parent_and_the_defaults() {
        let c = convert(&tree(ORG), &org_files(), "org/org.yaml");
        assert!(c.errors.is_empty() && !c.fatal, "{:?}", c.errors);
        assert_eq!(c.team.as_ref().unwrap().metadata.name.as_deref(), Some("medo-studio"));
        let pm = ok(&c, "pm");
        assert_eq!(pm.spec.parent, None);
        assert_eq!(pm.spec.team.as_deref(), Some("medo-studio"));
        assert_eq!((pm.spec.runtime.as_deref(), pm.spec.tier), (Some("claude-code"), Some(2)));
        assert_eq!(pm.spec.env["MODEL"], "sonnet");
        assert_eq!(pm.spec.env["MOLECULE_AGENT_ROLE"], "Product manager");
        assert_eq!(pm.spec.config_files["system-prompt.md"], "You plan.");
        let builder = ok(&c, "medo-builder");
        assert_eq!(builder.spec.parent.as_deref(), Some("pm"));
        assert_eq!(builder.metadata.annotations.as_ref().unwrap()[annotations::DISPLAY_NAME], "MeDo Builder");
        assert_eq!(builder.spec.env["MODEL"], "gpt-x");
        assert_eq!(builder.spec.env["HERMES_DEFAULT_MODEL"], "gpt-x");
        let qa = ok(&c, "qa");
        assert_eq!((qa.spec.parent.as_deref(), qa.spec.tier), (Some("medo-builder"), Some(4)));
        assert_eq!(qa.spec.runtime.as_deref(), Some("claude-code"));
    }

    #[test]
    fn files_dir_prompts_and_config_yaml_go_to_configs_and_env_files_to_secrets() {
        let c = convert(&tree(ORG), &org_files(), "org/org.yaml");
        let b = ok(&c, "medo-builder");
        let f = &b.spec.config_files;
        assert_eq!(f.keys().collect::<Vec<_>>(), vec!["config.yaml", "idle.md", "skills/build/SKILL.md"]);
        assert_eq!(f["skills/build/SKILL.md"], "Build it.\n", "CRLF to LF in .md, as the original");
        let config: Value = serde_saphyr::from_str(&f["config.yaml"]).unwrap();
        assert_eq!(config["name"], "MeDo Builder");
        assert_eq!(config["version"], "2.0.0", "files_dir's config.yaml is the base");
        assert_eq!(config["skills"][0], "build");
        assert_eq!((config["tier"].as_u64(), config["runtime"].as_str()), (Some(2), Some("hermes")));
        assert_eq!(config["initial_prompt"], "Read your system prompt, then wait.");
        assert_eq!(config["idle_prompt"], "Anything new?\n");
        assert_eq!(config["idle_interval_seconds"], 600);
        assert_eq!(config["runtime_config"]["timeout"], 0);
        assert_eq!(b.spec.source_secrets["SHARED"], "builder", "files_dir's .env wins over the root's");
        assert_eq!(b.spec.source_secrets["ANTHROPIC_API_KEY"], "sk-root");
        assert_eq!(b.spec.required_env, vec!["ANTHROPIC_API_KEY", "GH_TOKEN|GITHUB_TOKEN", "NPM_TOKEN"]);
        assert!(!serde_json::to_string(&b.spec).unwrap().contains("sk-root"), "secrets are never serialized");
    }

    #[test]
    fn fields_not_acted_on_are_kept_as_annotations_and_listed() {
        let c = convert(&tree(ORG), &org_files(), "org/org.yaml");
        let expected: BTreeSet<String> = ["canvas", "plugins", "schedules"].iter().map(|s| s.to_string()).collect();
        assert_eq!(c.not_acted_on, expected);
        let pm = ok(&c, "pm").metadata.annotations.clone().unwrap();
        assert_eq!(pm[annotations::NOT_ACTED_ON], "plugins");
        assert_eq!(pm["org.molecule.ai/plugins"], r#"["github"]"#);
        let qa = ok(&c, "qa").metadata.annotations.clone().unwrap();
        assert!(qa["org.molecule.ai/schedules"].contains("cron_expr"));
    }

    #[test]
    fn bad_nodes_are_refused_alone_naming_the_file_and_the_node() {
        let yaml = r#"
workspaces:
  - name: Lead
    children:
      - role: nameless
        children: [{name: Orphan}]
      - name: Typo
        tierr: 2
      - name: Bad Tier
        tier: 9
      - name: Odd
        runtime: cobol
      - name: Fine
"#;
        let c = convert(&tree(yaml), &files(&[]), "t/org.yaml");
        assert!(!c.fatal);
        assert_eq!(
            c.errors,
            vec![
                "t/org.yaml: workspaces[0].children[0] (under \"Lead\"): the node has no name; give it `name:`; \
                 what was declared there is kept until it is fixed"
            ]
        );
        assert_eq!(c.keep_under, vec![Some(ObjectKey::new("default", "lead"))]);
        assert!(refused(&c, "orphan").contains("has no name"));
        let typo = refused(&c, "typo");
        assert!(
            typo.starts_with("t/org.yaml: workspaces[0].children[1] \"Typo\" (under \"Lead\"): unknown field `tierr`"),
            "{typo}"
        );
        assert!(refused(&c, "bad-tier").ends_with("tier 9 is out of range; use 1, 2, 3 or 4"));
        assert!(refused(&c, "odd").contains("runtime \"cobol\" is not one the original platform knows"));
        assert_eq!(ok(&c, "fine").spec.parent.as_deref(), Some("lead"));
        assert_eq!(ok(&c, "lead").spec.tier, Some(DEFAULT_TIER));
        assert_eq!(ok(&c, "lead").spec.runtime.as_deref(), Some(DEFAULT_RUNTIME));
    }

    #[test]
    fn two_nodes_mapping_to_one_name_are_refused_naming_both() {
        let yaml = "workspaces:\n  - name: MeDo Builder\n  - name: medo-builder\n  - name: Other\n";
        let c = convert(&tree(yaml), &files(&[]), "org.yaml");
        let why = refused(&c, "medo-builder");
        assert_eq!(
            why,
            "org.yaml: nodes \"MeDo Builder\" (workspaces[0]) and \"medo-builder\" (workspaces[1]) all map to the name medo-builder; rename all but one of them"
        );
        assert_eq!(c.workspaces.iter().filter(|w| w.is_ok()).count(), 1);
    }

    #[test]
    fn a_failed_include_refuses_its_node_and_keeps_what_was_under_its_parent() {
        let yaml = format!(
            "workspaces:\n  - name: Lead\n    children:\n      - {{{}: 'org.yaml -> a.yaml: `!include b.yaml`: no such file'}}\n",
            super::super::include::INCLUDE_ERROR_KEY
        );
        let c = convert(&tree(&yaml), &files(&[]), "org.yaml");
        assert_eq!(
            c.errors,
            vec![
                "org.yaml: workspaces[0].children[0] (under \"Lead\"): org.yaml -> a.yaml: `!include b.yaml`: no such file; what was declared there is kept until it is fixed"
            ]
        );
        assert_eq!(c.keep_under, vec![Some(ObjectKey::new("default", "lead"))]);
        assert!(ok(&c, "lead").spec.parent.is_none());
    }

    #[test]
    fn an_unreadable_top_level_is_fatal() {
        let c = convert(&tree("nmae: x\n"), &files(&[]), "org.yaml");
        assert!(c.fatal && c.errors[0].starts_with("org.yaml: unknown field `nmae`"), "{:?}", c.errors);
        let c = convert(&tree("workspaces: []\n"), &files(&[(".env", "oops\n")]), "o/org.yaml");
        assert_eq!(c.errors, vec!["o/.env:1: expected KEY=VALUE"]);
    }

    #[test]
    fn files_dir_stays_inside_the_template() {
        let c = convert(&tree("workspaces:\n  - {name: X, files_dir: ../etc}\n"), &files(&[]), "org.yaml");
        assert!(refused(&c, "x").contains("files_dir \"../etc\" must be a path inside the template"));
    }

    #[test]
    fn an_external_node_gets_no_container() {
        let c =
            convert(&tree("workspaces:\n  - {name: Ext, external: true, url: 'http://x'}\n"), &files(&[]), "org.yaml");
        assert_eq!(ok(&c, "ext").spec.operating_mode, Some(OperatingMode::Stopped));
        assert!(c.not_acted_on.contains("external"));
    }
}
