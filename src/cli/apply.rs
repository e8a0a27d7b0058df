//! `molecule-operator apply -f FILE|DIR --database-url URL`: validates manifests and
//! upserts them as rows of `desired_objects`, so a git-held org template can be pushed
//! into a database-backed deployment. Nothing is written unless everything applied
//! is valid.

use std::path::PathBuf;

use anyhow::{Context, bail};

use crate::api::SourceRef;
use crate::api::effective::Defaults;
use crate::source::desired::{DesiredSet, merge};
use crate::source::postgres::PostgresSource;
use crate::source::{Snapshot, SourceObject, dir::DirSource, manifest};

#[derive(Clone, Debug, clap::Args)]
pub struct ApplyArgs {
    /// A YAML file or a directory of them (repeatable).
    #[arg(short = 'f', long = "filename", required = true, value_name = "FILE|DIR")]
    pub files: Vec<PathBuf>,
    /// The Postgres database the operator reads with `--source postgres`.
    #[arg(long, env = "MOLECULE_DATABASE_URL")]
    pub database_url: String,
    /// Validate only; write nothing.
    #[arg(long)]
    pub dry_run: bool,
}

fn read(files: &[PathBuf]) -> anyhow::Result<Snapshot> {
    let mut snap = Snapshot { source: "apply".into(), ..Snapshot::default() };
    for path in files {
        if path.is_dir() {
            let s = DirSource::new(path).scan();
            snap.objects.extend(s.objects);
            snap.errors.extend(s.errors);
        } else {
            let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
            let origin = path.display().to_string();
            let parsed =
                manifest::parse_file(&text, &origin, &SourceRef { kind: "apply".into(), reference: origin.clone() });
            snap.objects.extend(parsed.objects);
            snap.errors.extend(parsed.errors);
        }
    }
    Ok(snap)
}

pub async fn apply(args: &ApplyArgs) -> anyhow::Result<String> {
    if !args.database_url.starts_with("postgres") {
        bail!("apply writes into a Postgres desired-state database: --database-url postgres://...");
    }
    let snap = read(&args.files)?;
    let mut problems = snap.errors.clone();
    for o in &snap.objects {
        if let SourceObject::Invalid { error, .. } = o {
            problems.push(error.clone());
        }
    }
    // Validate against what the database already declares (parents, teams), the
    // applied objects winning.
    crate::store::open(&args.database_url).await.context("cannot open the database (migrations)")?;
    let db = PostgresSource::connect(&args.database_url).await.context("cannot connect to the database")?;
    let current = db.load().await.context("cannot read desired_objects")?;
    let set: DesiredSet = merge(
        &[snap.clone(), current],
        &Defaults { allow_privileged: true, ..Defaults::default() },
        &DesiredSet::default(),
    );
    for w in set.workspaces.values().filter(|w| w.source.kind == "apply" || w.source.kind == "dir") {
        if let Err(errors) = &w.spec {
            problems.push(format!("Workspace {}: {}", w.key, errors.join("; ")));
        }
    }
    problems.sort();
    problems.dedup();
    if !problems.is_empty() {
        bail!("nothing was applied; fix these first:\n  {}", problems.join("\n  "));
    }
    let mut out = String::new();
    for o in &snap.objects {
        let (kind, meta, spec) = match o {
            SourceObject::Workspace { object, .. } => {
                ("Workspace", &object.metadata, serde_json::to_value(&object.spec)?)
            }
            SourceObject::Team { object, .. } => ("Team", &object.metadata, serde_json::to_value(&object.spec)?),
            SourceObject::Invalid { .. } => continue,
        };
        let namespace = meta.namespace.clone().unwrap_or_else(|| crate::api::DEFAULT_NAMESPACE.into());
        let name = meta.name.clone().unwrap_or_default();
        let labels = serde_json::to_value(meta.labels.clone().unwrap_or_default())?;
        if !args.dry_run {
            db.upsert(kind, &namespace, &name, &spec, &labels)
                .await
                .with_context(|| format!("cannot write {kind} {namespace}/{name}"))?;
        }
        out.push_str(&format!(
            "{}.molecule.ai/{name} {}{}\n",
            kind.to_lowercase(),
            if namespace == crate::api::DEFAULT_NAMESPACE { String::new() } else { format!("in {namespace} ") },
            if args.dry_run { "valid (dry run)" } else { "applied" }
        ));
    }
    Ok(out)
}
