//! Reads YAML manifests (one or more `---`-separated documents) into `SourceObject`s.
//!
//! Two passes over the text: first every document as plain data, to check its
//! header (apiVersion, kind, metadata.name) and to catch syntax errors for the whole
//! file; then the typed pass, per document, so an unknown field or a bad value is
//! reported with its line and column and makes only that object invalid.

use std::borrow::Cow;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::Deserialize;
use serde::de::{DeserializeOwned, IgnoredAny};
use serde_json::Value;
use serde_saphyr::{DefaultMessageFormatter, MessageFormatter, Spanned};

use super::SourceObject;
use crate::api::{
    API_VERSION, DEFAULT_NAMESPACE, ObjectKey, SourceRef, Team, TeamSpec, WarmPool, WarmPoolSpec, Workspace,
    WorkspaceSpec,
};

/// Larger files are refused before parsing: an org template is a few KiB.
pub const MAX_FILE_BYTES: usize = 1024 * 1024;

/// The result of reading one file.
#[derive(Clone, Debug, Default)]
pub struct ParsedFile {
    pub objects: Vec<SourceObject>,
    /// Every problem, each starting with `FILE:LINE:COL:` (or `FILE:` when no line applies).
    pub errors: Vec<String>,
    /// The file as a whole could not be read (syntax error, a document whose kind or
    /// name cannot be told, too large): `objects` is empty and a watcher should keep
    /// the file's last good objects rather than read this as "all deleted".
    pub failed: bool,
}

/// Parses a YAML text of Workspace and Team documents. `origin` names the file in
/// messages; every object gets `source`. A syntax error yields no objects at all.
pub fn parse_documents(text: &str, origin: &str, source: &SourceRef) -> (Vec<SourceObject>, Vec<String>) {
    let parsed = parse_file(text, origin, source);
    (parsed.objects, parsed.errors)
}

/// Like [`parse_documents`], and also says whether the file failed as a whole.
pub fn parse_file(text: &str, origin: &str, source: &SourceRef) -> ParsedFile {
    let failed = |errors: Vec<String>| ParsedFile { objects: Vec::new(), errors, failed: true };
    if text.len() > MAX_FILE_BYTES {
        return failed(vec![format!(
            "{origin}: the file is {} bytes; files over {} KiB are refused, split it into several files",
            text.len(),
            MAX_FILE_BYTES / 1024
        )]);
    }
    let documents: Vec<Spanned<Value>> = match serde_saphyr::from_multiple_with_options(text, yaml_options()) {
        Ok(docs) => docs,
        Err(e) => return failed(vec![yaml_error(origin, &e, None)]),
    };

    let mut errors = Vec::new();
    let mut fatal = false;
    let mut headers = Vec::with_capacity(documents.len());
    for (index, doc) in documents.iter().enumerate() {
        let at = format!("{origin}:{}: document {}", doc.referenced.line(), index + 1);
        match header(&doc.value) {
            Ok(h) => headers.push(Some(h)),
            Err(HeaderError::NotOurs(e)) => {
                errors.push(format!("{at}: {e}"));
                headers.push(None);
            }
            Err(HeaderError::Unreadable(e)) => {
                errors.push(format!("{at}: {e}"));
                fatal = true;
                headers.push(None);
            }
        }
    }
    if fatal {
        return failed(errors);
    }

    let wants = |kind: Kind| headers.iter().flatten().any(|h| h.kind == kind);
    let mut typed_workspaces =
        if wants(Kind::Workspace) { typed_pass::<WorkspaceSpec>(text, documents.len()) } else { Vec::new() };
    let mut typed_teams = if wants(Kind::Team) { typed_pass::<TeamSpec>(text, documents.len()) } else { Vec::new() };
    let mut typed_pools =
        if wants(Kind::WarmPool) { typed_pass::<WarmPoolSpec>(text, documents.len()) } else { Vec::new() };

    let mut objects = Vec::new();
    for (index, (doc, header)) in documents.into_iter().zip(headers).enumerate() {
        let Some(Header { kind, key }) = header else { continue };
        let what = format!("{} {key}", kind.as_str());
        let invalid = |error: String| SourceObject::Invalid {
            kind: kind.as_str().to_string(),
            key: key.clone(),
            source: source.clone(),
            error,
        };
        let line = doc.referenced.line();
        let object = match kind {
            Kind::Workspace => match typed(&mut typed_workspaces, index, doc.value, origin, line, &what) {
                Ok((metadata, spec)) => SourceObject::Workspace {
                    object: Box::new(Workspace { metadata: with_namespace(metadata, &key), spec, status: None }),
                    source: source.clone(),
                },
                Err(e) => invalid(e),
            },
            Kind::Team => match typed(&mut typed_teams, index, doc.value, origin, line, &what) {
                Ok((metadata, spec)) => SourceObject::Team {
                    object: Box::new(Team { metadata: with_namespace(metadata, &key), spec, status: None }),
                    source: source.clone(),
                },
                Err(e) => invalid(e),
            },
            Kind::WarmPool => match typed(&mut typed_pools, index, doc.value, origin, line, &what) {
                Ok((metadata, spec)) => SourceObject::WarmPool {
                    object: Box::new(WarmPool { metadata: with_namespace(metadata, &key), spec, status: None }),
                    source: source.clone(),
                },
                Err(e) => invalid(e),
            },
        };
        objects.push(object);
    }
    ParsedFile { objects, errors, failed: false }
}

/// Limits well above any real org template and far below what hurts: alias bombs,
/// deep nesting and document storms fail fast with a budget error.
pub(crate) fn yaml_options() -> serde_saphyr::Options {
    serde_saphyr::options! {
        budget: serde_saphyr::budget! {
            max_reader_input_bytes: Some(MAX_FILE_BYTES),
            max_depth: 32,
            max_documents: 1_000,
            max_nodes: 100_000,
            max_events: 400_000,
            max_aliases: 1_000,
            max_anchors: 1_000,
            max_total_scalar_bytes: MAX_FILE_BYTES,
        },
        alias_limits: serde_saphyr::alias_limits! {
            max_total_replayed_events: 100_000,
            max_replay_stack_depth: 16,
        },
        with_snippet: false,
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Workspace,
    Team,
    WarmPool,
}

impl Kind {
    fn as_str(self) -> &'static str {
        match self {
            Kind::Workspace => "Workspace",
            Kind::Team => "Team",
            Kind::WarmPool => "WarmPool",
        }
    }
}

struct Header {
    kind: Kind,
    key: ObjectKey,
}

enum HeaderError {
    /// Plainly some other kind of manifest: reported and skipped.
    NotOurs(String),
    /// Looks like ours but cannot be told apart (kind or name missing or wrong): the
    /// whole file fails so a half-edited object never reads as deleted.
    Unreadable(String),
}

const SUPPORTED: &str = "supported: apiVersion molecule.ai/v1alpha1 with kind Workspace, Team or WarmPool";

/// ObjectMeta fields; anything else under `metadata` is a typo (say `namepsace`)
/// that would otherwise be silently dropped.
const METADATA_FIELDS: &[&str] = &[
    "name",
    "namespace",
    "labels",
    "annotations",
    "uid",
    "resourceVersion",
    "generation",
    "creationTimestamp",
    "deletionTimestamp",
    "deletionGracePeriodSeconds",
    "finalizers",
    "generateName",
    "managedFields",
    "ownerReferences",
    "selfLink",
];

fn header(doc: &Value) -> Result<Header, HeaderError> {
    use HeaderError::{NotOurs, Unreadable};
    let Some(map) = doc.as_object() else {
        return Err(Unreadable(format!("expected a mapping with apiVersion, kind, metadata and spec; {SUPPORTED}")));
    };
    let api_version = map.get("apiVersion").and_then(Value::as_str);
    let kind = map.get("kind").and_then(Value::as_str);
    let ours_by_group = api_version.is_some_and(|v| v.starts_with("molecule.ai/"));
    let ours_by_kind = matches!(kind, Some("Workspace" | "Team" | "WarmPool"));
    if !ours_by_group && !ours_by_kind {
        return Err(match (api_version, kind) {
            (Some(v), Some(k)) => NotOurs(format!("{v} {k} is not supported here ({SUPPORTED}); skipped")),
            _ => Unreadable(format!("apiVersion and kind are required ({SUPPORTED})")),
        });
    }
    let kind = match kind {
        Some("Workspace") => Kind::Workspace,
        Some("Team") => Kind::Team,
        Some("WarmPool") => Kind::WarmPool,
        Some(other) => return Err(Unreadable(format!("kind {other:?} is not supported; {SUPPORTED}"))),
        None => return Err(Unreadable(format!("kind is missing; {SUPPORTED}"))),
    };
    if api_version != Some(API_VERSION) {
        let found = api_version.map_or("missing".to_string(), |v| format!("{v:?}"));
        return Err(Unreadable(format!("{}: apiVersion is {found}; write `apiVersion: {API_VERSION}`", kind.as_str())));
    }
    let metadata = map.get("metadata").and_then(Value::as_object);
    let name = match metadata.and_then(|m| m.get("name")) {
        Some(Value::String(n)) => n.clone(),
        Some(other) => {
            return Err(Unreadable(format!(
                "{}: metadata.name must be a string, found {other}; quote it",
                kind.as_str()
            )));
        }
        None => return Err(Unreadable(format!("{}: metadata.name is required", kind.as_str()))),
    };
    let namespace = match metadata.and_then(|m| m.get("namespace")) {
        None | Some(Value::Null) => DEFAULT_NAMESPACE.to_string(),
        Some(Value::String(ns)) => ns.clone(),
        Some(other) => {
            return Err(Unreadable(format!(
                "{} {name}: metadata.namespace must be a string, found {other}; quote it",
                kind.as_str()
            )));
        }
    };
    if let Some(unknown) = metadata.and_then(|m| m.keys().find(|k| !METADATA_FIELDS.contains(&k.as_str()))) {
        let hint = did_you_mean(unknown, METADATA_FIELDS.iter().copied());
        return Err(Unreadable(format!(
            "{} {namespace}/{name}: unknown field `metadata.{unknown}`{hint}; metadata takes name, namespace, labels and annotations",
            kind.as_str()
        )));
    }
    Ok(Header { kind, key: ObjectKey::new(namespace, name) })
}

/// The typed shape of one document: `status` is accepted and ignored (the operator
/// owns it), anything else unknown is an error.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Document<S> {
    #[serde(default)]
    #[allow(dead_code)]
    api_version: Option<IgnoredAny>,
    #[serde(default)]
    #[allow(dead_code)]
    kind: Option<IgnoredAny>,
    metadata: ObjectMeta,
    #[serde(default)]
    spec: Option<S>,
    #[serde(default)]
    #[allow(dead_code)]
    status: Option<IgnoredAny>,
}

type TypedResult<S> = Result<Document<S>, serde_saphyr::Error>;

/// Reads every document of the text as `Document<S>`; a document that is not an
/// `S` fails alone, with its line and column. `None` when the stream did not yield
/// one result per document (then the caller falls back to the untyped values).
fn typed_pass<S: DeserializeOwned + Default>(text: &str, documents: usize) -> Vec<Option<TypedResult<S>>> {
    let mut reader = std::io::Cursor::new(text.as_bytes());
    let results: Vec<Option<TypedResult<S>>> =
        serde_saphyr::read_with_options(&mut reader, yaml_options()).map(Some).collect();
    if results.len() == documents { results } else { Vec::new() }
}

/// The typed object for document `index`; `what` (kind and key) prefixes errors.
fn typed<S: DeserializeOwned + Default>(
    pass: &mut [Option<TypedResult<S>>],
    index: usize,
    value: Value,
    origin: &str,
    line: u64,
    what: &str,
) -> Result<(ObjectMeta, S), String> {
    let document: Document<S> = match pass.get_mut(index).and_then(Option::take) {
        Some(Ok(document)) => document,
        Some(Err(e)) => return Err(yaml_error(origin, &e, Some(what))),
        // The typed pass could not be aligned with the documents: convert the plain
        // value, which holds the same data (errors then carry the document's line only).
        None => serde_json::from_value(value)
            .map_err(|e| format!("{origin}:{line}: {what}: {}", with_hint(&e.to_string())))?,
    };
    Ok((document.metadata, document.spec.unwrap_or_default()))
}

fn with_namespace(mut metadata: ObjectMeta, key: &ObjectKey) -> ObjectMeta {
    metadata.namespace = Some(key.namespace.clone());
    metadata
}

/// `FILE:LINE:COL: [WHAT: ]message` from a serde-saphyr error, on one line.
fn yaml_error(origin: &str, error: &serde_saphyr::Error, what: Option<&str>) -> String {
    let mut inner = error;
    while let serde_saphyr::Error::AliasError { error, .. } | serde_saphyr::Error::WithSnippet { error, .. } = inner {
        inner = error;
    }
    let message: String = sanitize(DefaultMessageFormatter.format_message(inner));
    use serde_saphyr::Error as E;
    let limit = matches!(
        inner,
        E::Budget { .. }
            | E::AliasReplayLimitExceeded { .. }
            | E::AliasExpansionLimitExceeded { .. }
            | E::AliasReplayStackDepthExceeded { .. }
            | E::AliasReplayCounterOverflow { .. }
    );
    let message = if limit {
        format!("{message}: the YAML is too large, too deeply nested or expands too many aliases; simplify it")
    } else {
        with_hint(&message)
    };
    let what = what.map(|w| format!("{w}: ")).unwrap_or_default();
    match error.location() {
        Some(l) if l.line() > 0 => format!("{origin}:{}:{}: {what}{message}", l.line(), l.column()),
        _ => format!("{origin}: {what}{message}"),
    }
}

/// Control characters from the input never reach logs or terminals.
fn sanitize(text: Cow<'_, str>) -> String {
    text.chars().map(|c| if c.is_control() { ' ' } else { c }).collect()
}

/// Adds "did you mean" to serde's `unknown field `x`, expected one of ...`.
fn with_hint(message: &str) -> String {
    let Some((_, rest)) = message.split_once("unknown field `") else { return message.to_string() };
    let Some((field, expected)) = rest.split_once('`') else { return message.to_string() };
    let candidates = expected.split(|c: char| !(c.is_alphanumeric() || c == '_')).filter(|s| !s.is_empty());
    format!("{message}{}", did_you_mean(field, candidates))
}

fn did_you_mean<'a>(word: &str, candidates: impl Iterator<Item = &'a str>) -> String {
    candidates
        .filter(|c| *c != "expected" && *c != "one" && *c != "of")
        .map(|c| (edit_distance(&word.to_ascii_lowercase(), &c.to_ascii_lowercase()), c))
        .filter(|(d, c)| *d <= 2.max(c.len() / 4))
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| format!(" (did you mean `{c}`?)"))
        .unwrap_or_default()
}

/// Edit distance counting a swap of two neighbours as one edit (`teir` is one from `tier`).
fn edit_distance(a: &str, b: &str) -> usize {
    let (a, b): (Vec<char>, Vec<char>) = (a.chars().collect(), b.chars().collect());
    let mut d = vec![vec![0usize; b.len() + 1]; a.len() + 1];
    for (i, row) in d.iter_mut().enumerate() {
        row[0] = i;
    }
    for (j, cell) in d[0].iter_mut().enumerate() {
        *cell = j;
    }
    for i in 1..=a.len() {
        for j in 1..=b.len() {
            let cost = usize::from(a[i - 1] != b[j - 1]);
            d[i][j] = (d[i - 1][j] + 1).min(d[i][j - 1] + 1).min(d[i - 1][j - 1] + cost);
            if i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] {
                d[i][j] = d[i][j].min(d[i - 2][j - 2] + 1);
            }
        }
    }
    d[a.len()][b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn src() -> SourceRef {
        SourceRef { kind: "dir".into(), reference: "org/a.yaml@abc".into() }
    }

    fn parse(text: &str) -> ParsedFile {
        parse_file(text, "org/a.yaml", &src())
    }

    fn invalid_error(o: &SourceObject) -> &str {
        match o {
            SourceObject::Invalid { error, .. } => error,
            other => panic!("expected Invalid, got {other:?}"),
        }
    }

    #[test]
    fn multi_document_file_yields_every_object_and_skips_empty_documents() {
        let p = parse(
            "apiVersion: molecule.ai/v1alpha1\nkind: Workspace\nmetadata: {name: pm}\nspec: {tier: 1, env: {PORT: 8080}}\n\
             ---\n---\n# only a comment\n---\n\
             apiVersion: molecule.ai/v1alpha1\nkind: Team\nmetadata: {name: eng, namespace: prod}\nspec:\n  workspaces:\n  - name: dev\n    tier: 2\n",
        );
        assert!(p.errors.is_empty() && !p.failed, "{:?}", p.errors);
        assert_eq!(p.objects.len(), 2);
        match &p.objects[0] {
            SourceObject::Workspace { object, source } => {
                assert_eq!(object.metadata.name.as_deref(), Some("pm"));
                assert_eq!(object.metadata.namespace.as_deref(), Some("default"));
                assert_eq!(object.spec.tier, Some(1));
                assert_eq!(object.spec.env["PORT"], "8080", "unquoted numbers are read as strings in env");
                assert_eq!(source, &src());
            }
            other => panic!("{other:?}"),
        }
        match &p.objects[1] {
            SourceObject::Team { object, .. } => {
                assert_eq!(object.metadata.namespace.as_deref(), Some("prod"));
                assert_eq!(object.spec.workspaces[0].name, "dev");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn missing_spec_means_all_defaults() {
        let p = parse("apiVersion: molecule.ai/v1alpha1\nkind: Workspace\nmetadata: {name: pm}\n");
        assert!(
            matches!(&p.objects[..], [SourceObject::Workspace { object, .. }] if object.spec == WorkspaceSpec::default())
        );
    }

    #[test]
    fn syntax_error_fails_the_whole_file_with_line_and_column() {
        let p = parse(
            "apiVersion: molecule.ai/v1alpha1\nkind: Workspace\nmetadata: {name: pm}\n---\nkind: [Team\nspec: x\n",
        );
        assert!(p.failed && p.objects.is_empty());
        assert_eq!(p.errors.len(), 1);
        assert!(p.errors[0].starts_with("org/a.yaml:6:"), "{}", p.errors[0]);
        let (objects, errors) = parse_documents("a: b\n  c: d\n", "x.yaml", &src());
        assert!(objects.is_empty());
        assert!(errors[0].starts_with("x.yaml:2:4: "), "{errors:?}");
    }

    #[test]
    fn unknown_field_makes_only_that_object_invalid_and_names_the_field() {
        let p = parse(
            "apiVersion: molecule.ai/v1alpha1\nkind: Workspace\nmetadata: {name: good}\nspec: {tier: 1}\n---\n\
             apiVersion: molecule.ai/v1alpha1\nkind: Workspace\nmetadata: {name: bad}\nspec:\n  tierr: 3\n",
        );
        assert!(!p.failed && p.errors.is_empty(), "{:?}", p.errors);
        assert!(matches!(p.objects[0], SourceObject::Workspace { .. }));
        let e = invalid_error(&p.objects[1]);
        assert!(e.starts_with("org/a.yaml:10:3: Workspace default/bad: unknown field `tierr`"), "{e}");
        assert!(e.contains("did you mean `tier`?"), "{e}");
    }

    #[test]
    fn bad_enum_value_and_wrong_type_are_invalid_objects() {
        let p = parse(
            "apiVersion: molecule.ai/v1alpha1\nkind: Workspace\nmetadata: {name: a}\nspec: {operatingMode: Walking}\n---\n\
             apiVersion: molecule.ai/v1alpha1\nkind: Team\nmetadata: {name: t}\nspec: {workspaces: 3}\n---\n\
             apiVersion: molecule.ai/v1alpha1\nkind: Workspace\nmetadata: {name: c, labels: {x: y}}\nstatus: {phase: Running}\nspec: {}\n",
        );
        assert!(!p.failed, "{:?}", p.errors);
        let e = invalid_error(&p.objects[0]);
        assert!(e.contains("Workspace default/a") && e.contains("Walking") && e.contains("Running"), "{e}");
        let e = invalid_error(&p.objects[1]);
        assert!(e.starts_with("org/a.yaml:9:") && e.contains("Team default/t"), "{e}");
        assert!(matches!(p.objects[2], SourceObject::Workspace { .. }), "status is ignored");
    }

    #[test]
    fn unknown_member_field_names_the_member() {
        let p = parse(
            "apiVersion: molecule.ai/v1alpha1\nkind: Team\nmetadata: {name: eng}\nspec:\n  workspaces:\n  - name: dev\n    teir: 2\n",
        );
        let e = invalid_error(&p.objects[0]);
        assert!(e.contains("Team default/eng") && e.contains("member `dev`") && e.contains("teir"), "{e}");
        assert!(e.contains("did you mean `tier`?"), "{e}");
    }

    #[test]
    fn unknown_top_level_field_is_invalid() {
        let p = parse("apiVersion: molecule.ai/v1alpha1\nkind: Workspace\nmetadata: {name: a}\nspce: {}\n");
        let e = invalid_error(&p.objects[0]);
        assert!(e.contains("unknown field `spce`") && e.contains("did you mean `spec`?"), "{e}");
    }

    #[test]
    fn other_kinds_are_skipped_with_an_error_but_ours_with_bad_headers_fail_the_file() {
        let p = parse(
            "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: x}\n---\n\
             apiVersion: molecule.ai/v1alpha1\nkind: Workspace\nmetadata: {name: a}\n",
        );
        assert!(!p.failed);
        assert_eq!(p.objects.len(), 1);
        assert!(p.errors[0].starts_with("org/a.yaml:1: document 1: v1 ConfigMap is not supported"), "{:?}", p.errors);
        assert!(p.errors[0].contains("Workspace, Team or WarmPool"), "{:?}", p.errors);

        for (text, expect) in [
            ("apiVersion: molecule.ai/v1alpha1\nkind: Workspace\nmetadata: {}\n", "metadata.name is required"),
            (
                "apiVersion: molecule.ai/v1\nkind: Workspace\nmetadata: {name: a}\n",
                "write `apiVersion: molecule.ai/v1alpha1`",
            ),
            (
                "apiVersion: molecule.ai/v1alpha1\nkind: Workpsace\nmetadata: {name: a}\n",
                "kind \"Workpsace\" is not supported",
            ),
            ("kind: Workspace\nmetadata: {name: a}\n", "apiVersion is missing"),
            (
                "apiVersion: molecule.ai/v1alpha1\nkind: Team\nmetadata: {name: a, namepsace: x}\n",
                "did you mean `namespace`?",
            ),
            ("- just\n- a list\n", "expected a mapping"),
        ] {
            let p = parse(text);
            assert!(p.failed && p.objects.is_empty(), "{text}");
            assert!(
                p.errors.iter().any(|e| e.contains(expect) && e.starts_with("org/a.yaml:1: document 1:")),
                "{text}: {:?}",
                p.errors
            );
        }
    }

    #[test]
    fn huge_files_and_alias_bombs_are_refused() {
        let big = format!("# {}\n", "x".repeat(MAX_FILE_BYTES));
        let p = parse(&big);
        assert!(p.failed && p.errors[0].contains("over 1024 KiB"), "{:?}", p.errors);

        let mut bomb = String::from("a: &a [x,x,x,x,x,x,x,x,x,x]\n");
        for (prev, name) in
            ["a", "b", "c", "d", "e", "f", "g", "h"].iter().zip(["b", "c", "d", "e", "f", "g", "h", "i"])
        {
            bomb.push_str(&format!("{name}: &{name} [{}]\n", vec![format!("*{prev}"); 10].join(",")));
        }
        // Refused by the alias budget, not expanded (no timing threshold here: the
        // budget error itself shows the expansion was cut short).
        let p = parse(&bomb);
        assert!(p.failed, "{:?}", p.objects);
        assert!(p.errors[0].starts_with("org/a.yaml:") && p.errors[0].contains("simplify it"), "{:?}", p.errors);

        let deep = format!("{}1{}", "[".repeat(200), "]".repeat(200));
        assert!(parse(&deep).failed);
    }

    #[test]
    fn duplicate_keys_are_syntax_errors() {
        let p =
            parse("apiVersion: molecule.ai/v1alpha1\nkind: Workspace\nmetadata: {name: a}\nspec: {tier: 1, tier: 2}\n");
        assert!(p.failed && p.errors[0].starts_with("org/a.yaml:4:"), "{:?}", p.errors);
    }

    #[test]
    fn edit_distance_counts_swaps_as_one() {
        assert_eq!(edit_distance("tierr", "tier"), 1);
        assert_eq!(edit_distance("teir", "tier"), 1);
        assert_eq!(edit_distance("kitten", "sitting"), 3);
        assert_eq!(edit_distance("", "abc"), 3);
        assert_eq!(did_you_mean("zzzzzz", ["tier", "env"].into_iter()), "");
    }

    mod fuzz {
        //! Hostile input: whatever the text, parsing ends (quickly, within the budget),
        //! never panics, and every error names the file.
        use super::*;
        use proptest::prelude::*;

        /// YAML-shaped text: manifest keys, values, anchors, aliases, flow and block
        /// nesting, document markers, tabs and odd scalars, glued at random.
        fn yamlish() -> impl Strategy<Value = String> {
            let piece = prop_oneof![
                Just("apiVersion: molecule.ai/v1alpha1\n".to_string()),
                Just("kind: Workspace\n".to_string()),
                Just("kind: Team\n".to_string()),
                Just("metadata: {name: a}\n".to_string()),
                Just("metadata:\n  name: b\n  namespace: x\n".to_string()),
                Just("spec:\n".to_string()),
                Just("  tier: 2\n".to_string()),
                Just("  env: {A: 1, B: true, C: ~}\n".to_string()),
                Just("  envFrom: [{secretRef: {name: k}}]\n".to_string()),
                Just("  workspaces: [{name: m}]\n".to_string()),
                Just("---\n".to_string()),
                Just("...\n".to_string()),
                Just("a: &x [1, 2]\nb: [*x, *x, *x]\n".to_string()),
                Just("*undefined\n".to_string()),
                Just("[[[[{{{{".to_string()),
                Just("}}]]".to_string()),
                Just("\t- \"unterminated\n".to_string()),
                Just("? complex key\n: value\n".to_string()),
                Just("!!binary aGVsbG8=\n".to_string()),
                Just("%YAML 1.2\n".to_string()),
                "[ -~]{0,40}\n",
                "\\PC{0,20}",
            ];
            proptest::collection::vec(piece, 0..30).prop_map(|v| v.concat())
        }

        proptest! {
            #![proptest_config(ProptestConfig { cases: 3000, ..ProptestConfig::default() })]

            #[test]
            fn any_text_parses_or_is_refused_with_the_file_named(text in yamlish()) {
                let p = parse(&text);
                for e in &p.errors {
                    prop_assert!(e.starts_with("org/a.yaml"), "{e}");
                }
                if p.failed {
                    prop_assert!(p.objects.is_empty() && !p.errors.is_empty());
                }
            }

            #[test]
            fn arbitrary_bytes_as_text_never_panic(text in "\\PC{0,400}") {
                let _ = parse(&text);
            }

            #[test]
            fn deep_nesting_of_any_shape_is_refused_not_followed(depth in 33usize..5000, flow in any::<bool>()) {
                let text = if flow {
                    format!("spec: {}1{}", "[".repeat(depth), "]".repeat(depth))
                } else {
                    (0..depth.min(400)).map(|i| format!("{}- \n", "  ".repeat(i))).collect()
                };
                let p = parse(&text);
                prop_assert!(p.failed || p.objects.is_empty(), "{:?}", p.objects.len());
            }
        }
    }
}
