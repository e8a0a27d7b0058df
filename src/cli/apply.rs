//! `molecule-operator apply -f FILE|DIR --database-url URL`: validates manifests and
//! upserts them as rows of `desired_objects`, so a git-held org template can be pushed
//! into a database-backed deployment. Nothing is written unless everything applied
//! is valid, and then everything in one transaction. `--dry-run` writes nothing at all,
//! not even the schema's migrations.

use std::path::PathBuf;

use anyhow::{Context, bail};

use crate::api::SourceRef;
use crate::api::effective::Defaults;
use crate::source::desired::{DesiredSet, merge};
use crate::source::postgres::{DesiredRow, PostgresSource};
use crate::source::{Snapshot, SourceObject, dir::DirSource, manifest};
use crate::store::DatabaseUrl;

#[derive(Clone, Debug, clap::Args)]
pub struct ApplyArgs {
    /// A YAML file or a directory of them (repeatable).
    #[arg(short = 'f', long = "filename", required = true, value_name = "FILE|DIR")]
    pub files: Vec<PathBuf>,
    /// The Postgres database the operator reads with `--source postgres`. Prefer the
    /// environment variable: a command line is visible in the process list.
    #[arg(long, env = "MOLECULE_DATABASE_URL", hide_env_values = true)]
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
    let database = DatabaseUrl::parse(&args.database_url).map_err(|e| anyhow::anyhow!("--database-url: {e}"))?;
    let Some(url) = database.postgres() else {
        bail!("apply writes into a Postgres desired-state database: --database-url postgres://... (not {database})");
    };
    let snap = read(&args.files)?;
    let mut problems = snap.errors.clone();
    for o in &snap.objects {
        if let SourceObject::Invalid { error, .. } = o {
            problems.push(error.clone());
        }
    }
    // Validate against what the database already declares (parents, teams), the
    // applied objects winning. A dry run changes nothing, not even the schema: it
    // reads what is there, and a database never migrated declares nothing yet.
    if !args.dry_run {
        crate::store::open_url(&database).await.with_context(|| format!("cannot migrate the database {database}"))?;
    }
    let db =
        PostgresSource::connect(url).await.with_context(|| format!("cannot connect to the database {database}"))?;
    let current = match db.load().await {
        Ok(current) => current,
        Err(sqlx::Error::Database(e)) if args.dry_run && e.code().as_deref() == Some(UNDEFINED_TABLE) => {
            Snapshot { source: crate::source::postgres::SOURCE_NAME.into(), ..Snapshot::default() }
        }
        Err(e) => return Err(e).context("cannot read desired_objects"),
    };
    let set: DesiredSet = merge(
        &[snap.clone(), current],
        // The operator's heartbeat interval is not known here: it checks `idleAfter` against it.
        &Defaults { allow_privileged: true, heartbeat_interval: std::time::Duration::ZERO, ..Defaults::default() },
        &DesiredSet::default(),
    );
    for w in set.workspaces.values().filter(|w| w.source.kind == "apply" || w.source.kind == "dir") {
        if let Err(errors) = &w.spec {
            problems.push(format!("Workspace {}: {}", w.key, errors.join("; ")));
        }
    }
    for p in set.pools.values().filter(|p| p.source.kind == "apply") {
        if let Err(errors) = &p.template {
            problems.push(format!("WarmPool {}: {}", p.key, errors.join("; ")));
        }
    }
    problems.sort();
    problems.dedup();
    if !problems.is_empty() {
        bail!("nothing was applied; fix these first:\n  {}", problems.join("\n  "));
    }
    let mut rows = Vec::new();
    for o in &snap.objects {
        let (kind, meta, spec) = match o {
            SourceObject::Workspace { object, .. } => {
                ("Workspace", &object.metadata, serde_json::to_value(&object.spec)?)
            }
            SourceObject::Team { object, .. } => ("Team", &object.metadata, serde_json::to_value(&object.spec)?),
            SourceObject::WarmPool { object, .. } => {
                ("WarmPool", &object.metadata, serde_json::to_value(&object.spec)?)
            }
            SourceObject::Invalid { .. } => continue,
        };
        rows.push(DesiredRow {
            kind: kind.to_string(),
            namespace: meta.namespace.clone().unwrap_or_else(|| crate::api::DEFAULT_NAMESPACE.into()),
            name: meta.name.clone().unwrap_or_default(),
            spec,
            labels: serde_json::to_value(meta.labels.clone().unwrap_or_default())?,
        });
    }
    // All or nothing: one transaction.
    if !args.dry_run {
        db.upsert_all(&rows).await.context("nothing was applied")?;
    }
    let mut out = String::new();
    for row in &rows {
        out.push_str(&format!(
            "{}.molecule.ai/{} {}{}\n",
            row.kind.to_lowercase(),
            row.name,
            if row.namespace == crate::api::DEFAULT_NAMESPACE {
                String::new()
            } else {
                format!("in {} ", row.namespace)
            },
            if args.dry_run { "valid (dry run)" } else { "applied" }
        ));
    }
    // An org template's .env values are secrets: never written into desired_objects.
    for o in &snap.objects {
        if let SourceObject::Workspace { object, .. } = o
            && !object.spec.source_secrets.is_empty()
        {
            let names: Vec<&str> = object.spec.source_secrets.keys().map(String::as_str).collect();
            out.push_str(&format!(
                "note: workspace {}: its .env values ({}) are not written to the database; set them with `molecule-operator secret set NAME --workspace {}`\n",
                object.metadata.name.as_deref().unwrap_or_default(),
                names.join(", "),
                object.metadata.name.as_deref().unwrap_or_default()
            ));
        }
    }
    Ok(out)
}

/// Postgres' SQLSTATE for a table that does not exist.
const UNDEFINED_TABLE: &str = "42P01";
