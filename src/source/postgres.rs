//! `--source postgres`: Workspaces and Teams as rows of `desired_objects` (spec as
//! JSONB, generation, soft delete by `deleted_at`). A trigger NOTIFYs on every
//! declared change and the source LISTENs, so a row change is reconciled within a
//! second; a periodic reload catches anything missed, and after a lost connection
//! the source reloads everything. A failed load keeps the last good snapshot. Status
//! is written back to the row's `status` column.

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::{Value, json};
use sqlx::Row;
use sqlx::postgres::{PgListener, PgPool, PgPoolOptions};
use tokio::sync::{broadcast, mpsc};
use tokio_util::sync::CancellationToken;

use super::{Snapshot, SourceObject};
use crate::api::{ObjectKey, SourceRef, Team, Workspace, WorkspaceStatus};
use crate::trigger::Report;

pub const SOURCE_NAME: &str = "postgres";
pub const CHANNEL: &str = "molecule_desired";
/// Reload everything this often even without a notification.
pub const RELOAD_EVERY: Duration = Duration::from_secs(30);
/// The status writer's name in `/readyz`.
const STATUS_TASK: &str = "postgres-status-writer";
const RETRY_MIN: Duration = Duration::from_millis(500);
const RETRY_MAX: Duration = Duration::from_secs(15);

#[derive(Clone)]
pub struct PostgresSource {
    pool: PgPool,
    url: String,
}

impl PostgresSource {
    /// Connects; the tables come from the state store's migrations (the same database).
    pub async fn connect(url: &str) -> Result<Self, sqlx::Error> {
        let pool = PgPoolOptions::new().max_connections(4).acquire_timeout(Duration::from_secs(5)).connect(url).await?;
        Ok(Self { pool, url: url.to_string() })
    }

    /// Every declared (not soft-deleted) row, as source objects.
    pub async fn load(&self) -> Result<Snapshot, sqlx::Error> {
        let rows = sqlx::query(
            "SELECT kind, namespace, name, spec::text AS spec, labels::text AS labels, generation \
             FROM desired_objects WHERE deleted_at IS NULL ORDER BY kind, namespace, name",
        )
        .fetch_all(&self.pool)
        .await?;
        let mut objects = Vec::with_capacity(rows.len());
        for row in &rows {
            let (kind, namespace, name): (String, String, String) =
                (row.try_get("kind")?, row.try_get("namespace")?, row.try_get("name")?);
            let generation: i64 = row.try_get("generation")?;
            let spec: String = row.try_get("spec")?;
            let labels: String = row.try_get("labels")?;
            let source = SourceRef {
                kind: SOURCE_NAME.into(),
                reference: format!("desired_objects/{kind}/{namespace}/{name}@{generation}"),
            };
            objects.push(object(&kind, &namespace, &name, generation, &spec, &labels, source));
        }
        Ok(Snapshot { source: SOURCE_NAME.into(), objects, errors: Vec::new() })
    }

    /// Sends a snapshot now, then after every notification burst and every
    /// RELOAD_EVERY; reconnects by itself.
    pub fn watch(self, tx: mpsc::Sender<Snapshot>, shutdown: CancellationToken) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            let mut last_sent: Option<String> = None;
            let mut listener: Option<PgListener> = None;
            let mut tick = tokio::time::interval(RELOAD_EVERY);
            loop {
                if listener.is_none() {
                    listener = match PgListener::connect(&self.url).await {
                        Ok(mut l) => match l.listen(CHANNEL).await {
                            Ok(()) => Some(l),
                            Err(e) => {
                                tracing::warn!(error = %e, "postgres source: LISTEN failed; retrying");
                                None
                            }
                        },
                        Err(e) => {
                            tracing::warn!(error = %e, "postgres source: the database is unreachable; keeping the last rows read");
                            None
                        }
                    };
                }
                // (Re)load: after (re)connecting, a notification, or the tick.
                match self.load().await {
                    Ok(snap) => {
                        let fingerprint = format!("{:?}", snap.objects);
                        if last_sent.as_ref() != Some(&fingerprint) {
                            last_sent = Some(fingerprint);
                            if tx.send(snap).await.is_err() {
                                return;
                            }
                        }
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "postgres source: reading desired_objects failed; keeping the last rows read")
                    }
                }
                let wait_listener = async {
                    match listener.as_mut() {
                        Some(l) => l.try_recv().await,
                        None => std::future::pending().await,
                    }
                };
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tick.tick() => {}
                    r = wait_listener => match r {
                        Ok(Some(_)) => {
                            // Coalesce a burst of notifications into one reload.
                            tokio::time::sleep(Duration::from_millis(20)).await;
                        }
                        // Connection lost: reconnect, and reload (notifications may be lost).
                        Ok(None) | Err(_) => {
                            tracing::warn!("postgres source: lost the connection to the database; reconnecting, then reloading everything");
                            listener = None;
                            tokio::time::sleep(Duration::from_millis(500)).await;
                        }
                    },
                }
            }
        })
    }

    /// Writes each reported status into its Workspace row (whole; skipped when equal).
    ///
    /// Nothing is dropped: statuses that could not be written (the database is down)
    /// wait and are retried with backoff, the newest per workspace, while `/readyz`
    /// says so; when the writer falls behind the reports (the broadcast lagged), it
    /// rewrites every status the state store holds.
    pub fn write_status(
        self,
        mut reports: broadcast::Receiver<Report>,
        store: crate::store::DynStore,
        health: std::sync::Arc<crate::health::Health>,
        shutdown: CancellationToken,
    ) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            let mut pending: BTreeMap<String, WorkspaceStatus> = BTreeMap::new();
            let mut reread_all = false;
            let mut backoff = RETRY_MIN;
            let mut retry_at: Option<tokio::time::Instant> = None;
            loop {
                let retry = async {
                    match retry_at {
                        Some(at) => tokio::time::sleep_until(at).await,
                        None => std::future::pending().await,
                    }
                };
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = retry => retry_at = None,
                    r = reports.recv() => match r {
                        Ok(report) => {
                            if let Some(status) = report.status {
                                pending.insert(report.key, status);
                            }
                        }
                        Err(broadcast::error::RecvError::Lagged(missed)) => {
                            tracing::warn!(missed, "postgres source: the status writer fell behind; rewriting every status");
                            reread_all = true;
                        }
                        Err(broadcast::error::RecvError::Closed) => return,
                    },
                }
                if retry_at.is_some() {
                    continue; // failing: wait for the retry, collecting the newest statuses
                }
                let written = async {
                    if reread_all {
                        for record in store.list_workspaces().await.map_err(|e| e.to_string())? {
                            if let Some(status) = record.status {
                                pending.entry(record.key).or_insert(status);
                            }
                        }
                        reread_all = false;
                    }
                    self.write_pending(&mut pending).await.map_err(|e| e.to_string())
                };
                match written.await {
                    Ok(()) => {
                        health.recovered(STATUS_TASK);
                        backoff = RETRY_MIN;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, retry_in = ?backoff, waiting = pending.len(), "postgres source: writing status back failed");
                        health.failing(STATUS_TASK, format!("writing status into desired_objects failed: {e}"));
                        retry_at = Some(tokio::time::Instant::now() + backoff);
                        backoff = (backoff * 2).min(RETRY_MAX);
                    }
                }
            }
        })
    }

    /// Writes the pending statuses, each removed once written; stops at the first error.
    async fn write_pending(&self, pending: &mut BTreeMap<String, WorkspaceStatus>) -> Result<(), sqlx::Error> {
        while let Some((key, status)) = pending.pop_first() {
            let okey = ObjectKey::parse(&key);
            let Ok(json) = serde_json::to_string(&status) else { continue };
            let done = sqlx::query(
                "UPDATE desired_objects SET status = $1::jsonb, status_updated_at = now() \
                 WHERE kind = 'Workspace' AND namespace = $2 AND name = $3 AND status IS DISTINCT FROM $1::jsonb",
            )
            .bind(&json)
            .bind(&okey.namespace)
            .bind(&okey.name)
            .execute(&self.pool)
            .await;
            if let Err(e) = done {
                pending.insert(key, status);
                return Err(e);
            }
        }
        Ok(())
    }

    /// Upserts objects (what `molecule-operator apply --database-url` writes) in one
    /// transaction: all of them or, on any failure, none. An object applied again
    /// after a soft delete is declared again.
    pub async fn upsert_all(&self, objects: &[DesiredRow]) -> Result<(), UpsertError> {
        let mut tx = self.pool.begin().await.map_err(|error| UpsertError { object: None, error })?;
        for o in objects {
            sqlx::query(
                "INSERT INTO desired_objects (kind, namespace, name, spec, labels) VALUES ($1, $2, $3, $4::jsonb, $5::jsonb) \
                 ON CONFLICT (kind, namespace, name) DO UPDATE SET spec = excluded.spec, labels = excluded.labels, deleted_at = NULL",
            )
            .bind(&o.kind)
            .bind(&o.namespace)
            .bind(&o.name)
            .bind(o.spec.to_string())
            .bind(o.labels.to_string())
            .execute(&mut *tx)
            .await
            .map_err(|error| UpsertError { object: Some(format!("{} {}/{}", o.kind, o.namespace, o.name)), error })?;
        }
        tx.commit().await.map_err(|error| UpsertError { object: None, error })
    }
}

/// One object as `apply` writes it into `desired_objects`.
#[derive(Clone, Debug)]
pub struct DesiredRow {
    pub kind: String,
    pub namespace: String,
    pub name: String,
    pub spec: Value,
    pub labels: Value,
}

/// An `upsert_all` that wrote nothing, and which object (if any) the database refused.
#[derive(Debug, thiserror::Error)]
#[error("{}: {error}", object.as_deref().map_or("the transaction failed".to_string(), |o| format!("cannot write {o}")))]
pub struct UpsertError {
    pub object: Option<String>,
    #[source]
    pub error: sqlx::Error,
}

/// A row as a typed object, or Invalid with what to fix.
fn object(
    kind: &str,
    namespace: &str,
    name: &str,
    generation: i64,
    spec: &str,
    labels: &str,
    source: SourceRef,
) -> SourceObject {
    let key = ObjectKey::new(namespace, name);
    let invalid = |error: String| SourceObject::Invalid {
        kind: kind.to_string(),
        key: key.clone(),
        source: source.clone(),
        error,
    };
    let parse = |text: &str, what: &str| {
        serde_json::from_str::<Value>(text)
            .map_err(|e| format!("desired_objects {kind} {key}: {what} is not JSON: {e}"))
    };
    let (spec, labels) = match (parse(spec, "spec"), parse(labels, "labels")) {
        (Ok(s), Ok(l)) => (s, l),
        (Err(e), _) | (_, Err(e)) => return invalid(e),
    };
    let doc = json!({
        "apiVersion": crate::api::API_VERSION,
        "kind": kind,
        "metadata": {"name": name, "namespace": namespace, "labels": labels, "generation": generation},
        "spec": spec,
    });
    let err = |e: serde_json::Error| format!("desired_objects {kind} {key}: {e}");
    match kind {
        "Workspace" => match serde_json::from_value::<Workspace>(doc) {
            Ok(object) => SourceObject::Workspace { object: Box::new(object), source },
            Err(e) => invalid(err(e)),
        },
        "WarmPool" => match serde_json::from_value::<crate::api::WarmPool>(doc) {
            Ok(object) => SourceObject::WarmPool { object: Box::new(object), source },
            Err(e) => invalid(err(e)),
        },
        _ => match serde_json::from_value::<Team>(doc) {
            Ok(object) => SourceObject::Team { object: Box::new(object), source },
            Err(e) => invalid(err(e)),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn src() -> SourceRef {
        SourceRef { kind: "postgres".into(), reference: "x".into() }
    }

    #[test]
    fn rows_become_typed_objects_and_bad_rows_invalid() {
        let ok = object("Workspace", "default", "dev", 3, r#"{"tier": 1, "env": {"PORT": 8080}}"#, "{}", src());
        let SourceObject::Workspace { object: ws, .. } = ok else { panic!("{ok:?}") };
        assert_eq!(ws.spec.tier, Some(1));
        assert_eq!(ws.spec.env["PORT"], "8080");
        assert_eq!(ws.metadata.generation, Some(3));
        let bad = object("Workspace", "default", "dev", 1, r#"{"colour": "blue"}"#, "{}", src());
        let SourceObject::Invalid { error, .. } = bad else { panic!("{bad:?}") };
        assert!(error.contains("colour") && error.contains("default/dev"), "{error}");
        let team = object("Team", "default", "eng", 1, r#"{"workspaces": [{"name": "a"}]}"#, "{}", src());
        assert!(matches!(team, SourceObject::Team { .. }));
    }
}
