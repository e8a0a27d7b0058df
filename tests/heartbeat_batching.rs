//! Heartbeats batched in memory (store::heartbeats) keep every property the rules
//! rely on. Each case runs against a real SQLite file and a real PostgreSQL, with the
//! registry served over HTTP on 127.0.0.1 where the case is about the registry.
//! No timing thresholds: every assertion is about order and content.

mod support;

use std::sync::Arc;

use chrono::{DateTime, Duration, TimeZone, Utc};
use molecule::metrics::Metrics;
use molecule::model::{Heartbeat, IssuedToken, RevokeReason, WorkspaceRecord};
use molecule::registry::{self, AppState};
use molecule::source::desired::DesiredSet;
use molecule::store::heartbeats::Coalescing;
use molecule::store::{self, DynStore, LostHeartbeats};
use molecule::trigger::{Request, Trigger, Why};
use support::registry::online_status;
use tokio::sync::{mpsc, watch};

/// A store under test: its URL (to open more stores on the same database, as a
/// restart or another replica would) and what keeps the database alive.
struct Db {
    url: String,
    _keep: Keep,
}

enum Keep {
    Dir(#[allow(dead_code)] tempfile::TempDir),
    Pg(#[allow(dead_code)] support::postgres::TestDatabase),
}

impl Db {
    async fn sqlite() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let url = dir.path().join("state.db").display().to_string();
        Self { url, _keep: Keep::Dir(dir) }
    }

    async fn postgres() -> Option<Self> {
        let db = support::postgres::fresh_database().await?;
        Some(Self { url: db.url.clone(), _keep: Keep::Pg(db) })
    }

    async fn open(&self) -> DynStore {
        store::open(&self.url).await.expect("the store opens")
    }
}

fn t0() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 11, 24, 10, 0, 0).unwrap()
}

fn secs(n: i64) -> Duration {
    Duration::seconds(n)
}

/// A workspace at incarnation 1 with one live token issued at t0.
async fn workspace(store: &DynStore, name: &str) -> (WorkspaceRecord, IssuedToken) {
    let rec = store.ensure_workspace(&format!("default/{name}"), t0()).await.unwrap();
    let inc = store.bump_incarnation(&rec.uid).await.unwrap();
    let tok = store.issue_token(&rec.uid, inc, t0()).await.unwrap();
    (store.workspace_by_uid(&rec.uid).await.unwrap().unwrap(), tok)
}

async fn last_used(store: &DynStore, uid: &str, token_id: &str) -> Option<DateTime<Utc>> {
    let history = store.token_history(uid, 100).await.unwrap();
    history.into_iter().find(|t| t.id == token_id).unwrap().last_used_at
}

async fn last_heartbeat(store: &DynStore, uid: &str) -> Option<DateTime<Utc>> {
    store.workspace_by_uid(uid).await.unwrap().unwrap().last_heartbeat_at
}

/// `raw` with its heartbeats batched, as the operator wires it: the batching (to
/// flush and look into) and the whole store, whose heartbeat role it takes.
fn batched(raw: &DynStore, lost: Arc<LostHeartbeats>) -> (Arc<Coalescing>, DynStore) {
    let batching = Arc::new(Coalescing::new(raw.clone(), lost));
    let store = raw.with_heartbeats(batching.clone());
    (batching, store)
}

fn beat(tok: &IssuedToken, at: DateTime<Utc>) -> Heartbeat {
    Heartbeat { token_id: tok.row.id.clone(), workspace_uid: tok.row.workspace_uid.clone(), at }
}

mod cases {
    use super::*;

    /// One batch moves every live token and its workspace forward, never back, and
    /// leaves a revoked token (and its workspace) alone: the revoke wins.
    pub async fn a_batch_moves_live_rows_forward_only(db: &Db) {
        let store = db.open().await;
        let (a, ta) = workspace(&store, "a").await;
        let (b, tb) = workspace(&store, "b").await;
        let (c, tc) = workspace(&store, "c").await;
        store.record_heartbeat(&tb.row.id, &b.uid, t0() + secs(50)).await.unwrap();
        assert_eq!(store.revoke_tokens(&c.uid, RevokeReason::Reprovision, None, t0() + secs(5)).await.unwrap(), 1);

        let moved = store
            .record_heartbeats(&[
                beat(&ta, t0() + secs(7)),
                beat(&ta, t0() + secs(10)),
                beat(&tb, t0() + secs(20)),
                beat(&tc, t0() + secs(30)),
                beat(&ta, t0() + secs(8)),
            ])
            .await
            .unwrap();
        assert_eq!(moved, 1, "only a's token moves (to its latest): b's is newer already, c's is revoked");
        assert_eq!(last_used(&store, &a.uid, &ta.row.id).await, Some(t0() + secs(10)));
        assert_eq!(last_heartbeat(&store, &a.uid).await, Some(t0() + secs(10)));
        assert_eq!(last_used(&store, &b.uid, &tb.row.id).await, Some(t0() + secs(50)), "never back");
        assert_eq!(last_heartbeat(&store, &b.uid).await, Some(t0() + secs(50)), "never back");
        let revoked = &store.token_history(&c.uid, 1).await.unwrap()[0];
        assert_eq!((revoked.last_used_at, revoked.revoke_reason.as_deref()), (None, Some("reprovision")));
        assert_eq!(revoked.revoked_at, Some(t0() + secs(5)), "the revocation is untouched");
        assert_eq!(last_heartbeat(&store, &c.uid).await, None, "a revoked token's heartbeat leaves no trace");
        assert_eq!(store.record_heartbeats(&[]).await.unwrap(), 0);
    }

    /// Noted heartbeats wait in memory (the latest per token) until a flush writes
    /// them in one go; nothing else about the store changes.
    pub async fn noted_heartbeats_are_written_by_the_flush(db: &Db) {
        let raw = db.open().await;
        let (batching, store) = batched(&raw, Arc::default());
        let (a, ta) = workspace(&raw, "a").await;
        let (b, tb) = workspace(&raw, "b").await;
        store.note_heartbeat(&ta.row.id, &a.uid, t0() + secs(2)).await.unwrap();
        store.note_heartbeat(&ta.row.id, &a.uid, t0() + secs(3)).await.unwrap();
        store.note_heartbeat(&ta.row.id, &a.uid, t0() + secs(1)).await.unwrap();
        store.note_heartbeat(&tb.row.id, &b.uid, t0() + secs(4)).await.unwrap();
        assert_eq!(batching.buffer().len(), 2, "one entry per token");
        assert_eq!(last_used(&raw, &a.uid, &ta.row.id).await, None, "not written yet");
        assert_eq!(last_heartbeat(&raw, &a.uid).await, None);

        assert_eq!(batching.flush().await.unwrap(), 2);
        assert!(batching.buffer().is_empty());
        assert_eq!(last_used(&raw, &a.uid, &ta.row.id).await, Some(t0() + secs(3)), "the latest wins");
        assert_eq!(last_heartbeat(&raw, &a.uid).await, Some(t0() + secs(3)));
        assert_eq!(last_used(&raw, &b.uid, &tb.row.id).await, Some(t0() + secs(4)));
        assert_eq!(batching.flush().await.unwrap(), 0, "nothing left");

        // record_heartbeat (registers, status catch-up) writes at once.
        store.record_heartbeat(&tb.row.id, &b.uid, t0() + secs(9)).await.unwrap();
        assert_eq!(last_heartbeat(&raw, &b.uid).await, Some(t0() + secs(9)));
    }

    /// A token revoked while its heartbeat waits stays revoked, and the heartbeat
    /// neither touches it nor makes its workspace look alive.
    pub async fn a_revoke_wins_over_a_pending_heartbeat(db: &Db) {
        let raw = db.open().await;
        let (batching, store) = batched(&raw, Arc::default());
        let (a, ta) = workspace(&raw, "a").await;
        store.note_heartbeat(&ta.row.id, &a.uid, t0() + secs(10)).await.unwrap();
        assert_eq!(
            store.revoke_tokens(&a.uid, RevokeReason::TokenFileMismatch, None, t0() + secs(5)).await.unwrap(),
            1
        );
        batching.flush().await.unwrap();
        let row = &store.token_history(&a.uid, 1).await.unwrap()[0];
        assert_eq!(row.revoked_at, Some(t0() + secs(5)));
        assert_eq!(row.revoke_reason.as_deref(), Some("token-file-mismatch"));
        assert_eq!(row.last_used_at, None);
        assert_eq!(last_heartbeat(&raw, &a.uid).await, None);
        assert!(store.token_owner(&ta.row.token_hash).await.unwrap().is_none(), "refused from now on");

        // The same for a workspace deleted while its heartbeat waits.
        let (b, tb) = workspace(&raw, "b").await;
        store.note_heartbeat(&tb.row.id, &b.uid, t0() + secs(10)).await.unwrap();
        store.delete_workspace(&b.uid).await.unwrap();
        batching.flush().await.unwrap();
        assert_eq!(store.workspace_by_uid(&b.uid).await.unwrap(), None);
        let row = &store.token_history(&b.uid, 1).await.unwrap()[0];
        assert_eq!((row.last_used_at, row.revoke_reason.as_deref()), (None, Some("deleted")));
    }

    /// The stale-token rule looks (the token seems stale: its heartbeat is still in
    /// memory), then revokes: the revoke writes pending heartbeats first and repeats
    /// the condition, so the heartbeat wins, as it does with one write per heartbeat.
    pub async fn a_pending_heartbeat_protects_the_token_from_the_stale_rule(db: &Db) {
        let raw = db.open().await;
        let (_, store) = batched(&raw, Arc::default());
        let (a, ta) = workspace(&raw, "a").await;
        let now = t0() + Duration::minutes(6);
        let cutoff = now - Duration::minutes(5);
        store.note_heartbeat(&ta.row.id, &a.uid, now).await.unwrap();
        assert!(store.live_tokens(&a.uid).await.unwrap()[0].last_activity() < cutoff, "the rule's look: stale");
        let revoked = store.revoke_stale_tokens(&a.uid, cutoff, RevokeReason::ContainerMissing, now).await.unwrap();
        assert_eq!(revoked, 0, "the heartbeat wins");
        assert_eq!(last_used(&raw, &a.uid, &ta.row.id).await, Some(now));

        // With no heartbeat, the same call revokes.
        let (b, _) = workspace(&raw, "b").await;
        let revoked = store.revoke_stale_tokens(&b.uid, cutoff, RevokeReason::ContainerMissing, now).await.unwrap();
        assert_eq!(revoked, 1);
    }

    /// The same under concurrency: a flusher writing every millisecond and many
    /// heartbeats, each followed by a stale-token revoke. A revoke that starts after
    /// a heartbeat was noted never revokes that token, whichever flush (the timer's,
    /// already running, or its own) writes the heartbeat.
    pub async fn concurrent_flushes_never_let_a_revoke_pass_a_noted_heartbeat(db: &Db) {
        let raw = db.open().await;
        let (batching, store) = batched(&raw, Arc::default());
        let stop = tokio_util::sync::CancellationToken::new();
        let flusher = batching.spawn_flusher(std::time::Duration::from_millis(1), stop.clone());
        let mut workspaces = Vec::new();
        for i in 0..8 {
            workspaces.push(workspace(&raw, &format!("w{i}")).await);
        }
        let mut tasks = Vec::new();
        for (w, tok) in workspaces {
            let store = store.clone();
            tasks.push(tokio::spawn(async move {
                for round in 1..=25i64 {
                    // Each round: the token has been idle for the grace, then beats.
                    let now = t0() + Duration::minutes(10 * round);
                    store.note_heartbeat(&tok.row.id, &w.uid, now).await.unwrap();
                    let cutoff = now - Duration::minutes(5);
                    let n = store.revoke_stale_tokens(&w.uid, cutoff, RevokeReason::ContainerMissing, now).await;
                    assert_eq!(n.unwrap(), 0, "round {round} of {}: a noted heartbeat was passed", w.key);
                }
                (w, tok)
            }));
        }
        for t in tasks {
            let (w, tok) = t.await.unwrap();
            assert_eq!(last_used(&raw, &w.uid, &tok.row.id).await, Some(t0() + Duration::minutes(250)));
        }
        stop.cancel();
        flusher.await.unwrap();
    }

    /// A process that dies with heartbeats in memory loses exactly those: each
    /// token and workspace keeps its last flushed time (as if one beat was missed),
    /// nothing moves back, and the next heartbeat after a restart moves it on.
    pub async fn a_crash_loses_only_the_pending_heartbeats(db: &Db) {
        let raw = db.open().await;
        let (a, ta) = workspace(&raw, "a").await;
        {
            let (batching, store) = batched(&raw, Arc::default());
            store.note_heartbeat(&ta.row.id, &a.uid, t0() + secs(30)).await.unwrap();
            batching.flush().await.unwrap();
            store.note_heartbeat(&ta.row.id, &a.uid, t0() + secs(60)).await.unwrap();
            // The process dies here: no flush.
        }
        drop(raw);
        let restarted = db.open().await;
        assert_eq!(last_used(&restarted, &a.uid, &ta.row.id).await, Some(t0() + secs(30)));
        assert_eq!(last_heartbeat(&restarted, &a.uid).await, Some(t0() + secs(30)));
        assert!(restarted.token_owner(&ta.row.token_hash).await.unwrap().is_some(), "the token is still live");
        let (batching, store) = batched(&restarted, Arc::default());
        store.note_heartbeat(&ta.row.id, &a.uid, t0() + secs(90)).await.unwrap();
        batching.flush().await.unwrap();
        assert_eq!(last_heartbeat(&restarted, &a.uid).await, Some(t0() + secs(90)));
    }

    /// A flush that fails (here: the database refuses the statement) keeps its
    /// heartbeats, merged with newer ones, and the next flush writes them.
    pub async fn a_failed_flush_keeps_its_heartbeats(db: &Db) {
        let raw = db.open().await;
        let lost = Arc::new(LostHeartbeats::default());
        let (batching, store) = batched(&raw, lost.clone());
        let (a, ta) = workspace(&raw, "a").await;
        store.note_heartbeat(&ta.row.id, &a.uid, t0() + secs(10)).await.unwrap();
        assert_eq!(batching.flush().await.unwrap(), 1);
        assert_eq!(lost.last(), None, "a flush that succeeds notes nothing");
        store.note_heartbeat(&ta.row.id, &a.uid, t0() + secs(15)).await.unwrap();
        execute(db, "ALTER TABLE heartbeats RENAME TO heartbeats_away").await;
        let failed_at = Utc::now();
        assert!(batching.flush().await.is_err());
        assert_eq!(batching.buffer().len(), 1, "kept");
        // The heartbeats it could not write were answered before it failed: noted as
        // lost, so the heartbeat rule counts no silence of their agents from before.
        assert!(lost.last().is_some_and(|t| t >= failed_at), "noted: {:?}", lost.last());
        // A stale-token revoke cannot flush either: it fails rather than revoke on
        // what may be out of date.
        let cutoff = t0() + secs(5);
        let revoke = store.revoke_stale_tokens(&a.uid, cutoff, RevokeReason::ContainerMissing, t0() + secs(20)).await;
        assert!(revoke.is_err());
        store.note_heartbeat(&ta.row.id, &a.uid, t0() + secs(20)).await.unwrap();
        execute(db, "ALTER TABLE heartbeats_away RENAME TO heartbeats").await;
        // Nothing half-written: the failed statement changed nothing.
        assert_eq!(last_used(&raw, &a.uid, &ta.row.id).await, Some(t0() + secs(10)));
        assert_eq!(batching.flush().await.unwrap(), 1);
        assert_eq!(last_used(&raw, &a.uid, &ta.row.id).await, Some(t0() + secs(20)));
        assert_eq!(last_heartbeat(&raw, &a.uid).await, Some(t0() + secs(20)));
    }

    /// Postgres HA: the leader's fenced store is another store on the same database;
    /// sharing the registry's buffer, its stale-token revoke still flushes first.
    pub async fn a_store_sharing_the_buffer_flushes_before_its_revoke(db: &Db) {
        let (registry_batching, registry_store) = batched(&db.open().await, Arc::default());
        let fenced = db.open().await;
        let leader = fenced.with_heartbeats(Arc::new(registry_batching.sharing(fenced.clone())));
        let (a, ta) = workspace(&leader, "a").await;
        let now = t0() + Duration::minutes(6);
        registry_store.note_heartbeat(&ta.row.id, &a.uid, now).await.unwrap();
        let cutoff = now - Duration::minutes(5);
        assert_eq!(leader.revoke_stale_tokens(&a.uid, cutoff, RevokeReason::ContainerMissing, now).await.unwrap(), 0);
        assert!(registry_batching.buffer().is_empty());
    }

    /// A flush that hangs (another connection holds the write lock) notes the
    /// heartbeats as lost while it waits, before it fails or ends: the agents it
    /// answered never look silent for the database's stall; once the lock is gone the
    /// heartbeat is written.
    pub async fn a_hanging_flush_notes_its_heartbeats_as_lost(db: &Db) {
        let raw = db.open().await;
        let lost = Arc::new(LostHeartbeats::default());
        let (batching, store) = batched(&raw, lost.clone());
        let (a, ta) = workspace(&raw, "a").await;
        let lock = WriteLock::take(db).await;
        let stop = tokio_util::sync::CancellationToken::new();
        let flusher = batching.spawn_flusher(std::time::Duration::from_millis(10), stop.clone());
        store.note_heartbeat(&ta.row.id, &a.uid, t0() + secs(10)).await.unwrap();
        wait_for("the stalled flush to note lost heartbeats", || async { lost.last().is_some() }).await;
        assert_eq!(last_used(&raw, &a.uid, &ta.row.id).await, None, "not written while the lock is held");
        lock.release().await;
        wait_for("the heartbeat to be written", || async {
            last_heartbeat(&raw, &a.uid).await == Some(t0() + secs(10))
        })
        .await;
        stop.cancel();
        flusher.await.unwrap();
    }

    /// Over HTTP: a heartbeat whose token the store cannot even look up is a 503 and
    /// is noted as lost (the registry's record, read by the heartbeat rule).
    pub async fn the_registry_notes_a_heartbeat_it_cannot_record(db: &Db) {
        let raw = db.open().await;
        let lost = Arc::new(LostHeartbeats::default());
        let (_, store) = batched(&raw, lost.clone());
        let (a, ta) = workspace(&raw, "a").await;
        let (url, _triggers, _stop) = serve_noting(store.clone(), lost.clone()).await;
        let http = reqwest::Client::builder().no_proxy().build().unwrap();
        let beat = || {
            http.post(format!("{url}/registry/heartbeat"))
                .header("Authorization", format!("Bearer {}", ta.plaintext))
                .body(format!("{{\"workspace_id\":\"{}\"}}", a.uid))
                .send()
        };
        assert_eq!(beat().await.unwrap().status(), 200);
        assert_eq!(lost.last(), None);
        execute(db, "ALTER TABLE workspace_auth_tokens RENAME TO tokens_away").await;
        let failed_at = Utc::now();
        assert_eq!(beat().await.unwrap().status(), 503);
        assert!(lost.last().is_some_and(|t| t >= failed_at), "noted: {:?}", lost.last());
        execute(db, "ALTER TABLE tokens_away RENAME TO workspace_auth_tokens").await;
        assert_eq!(beat().await.unwrap().status(), 200);
    }

    /// Over HTTP: a heartbeat is answered at once and batched; once the token is
    /// revoked the very next heartbeat is a 401 (validation never waits for, or
    /// reads, the buffer); a register is written at once; a heartbeat from a
    /// workspace whose status lags is written at once and queues a reconcile.
    pub async fn the_registry_refuses_a_revoked_token_at_once(db: &Db) {
        let raw = db.open().await;
        let (batching, store) = batched(&raw, Arc::default());
        let (online, tok) = workspace(&raw, "online").await;
        raw.save_status(&online.uid, &online_status()).await.unwrap();
        let (behind, tok_behind) = workspace(&raw, "behind").await;
        let (url, mut triggers, _stop) = serve(store.clone()).await;
        let http = reqwest::Client::builder().no_proxy().build().unwrap();
        let call = |path: &'static str, token: &IssuedToken, uid: &str| {
            http.post(format!("{url}{path}"))
                .header("Authorization", format!("Bearer {}", token.plaintext))
                .body(format!("{{\"workspace_id\":\"{uid}\"}}"))
                .send()
        };

        assert_eq!(call("/registry/heartbeat", &tok, &online.uid).await.unwrap().status(), 200);
        assert_eq!(batching.buffer().len(), 1, "batched");
        assert_eq!(last_heartbeat(&raw, &online.uid).await, None);
        assert!(triggers.try_recv().is_err(), "the status shows the agent online: nothing queued");

        assert_eq!(raw.revoke_tokens(&online.uid, RevokeReason::TokenFileMismatch, None, Utc::now()).await.unwrap(), 1);
        assert_eq!(call("/registry/heartbeat", &tok, &online.uid).await.unwrap().status(), 401);
        assert_eq!(batching.buffer().len(), 1, "the refused heartbeat is not noted");
        let (key, why) = queued(&mut triggers);
        assert_eq!((key.as_str(), why), ("default/online", Why::TokenRefused));
        batching.flush().await.unwrap();
        assert_eq!(last_heartbeat(&raw, &online.uid).await, None, "the revoke won over the pending heartbeat");

        assert_eq!(call("/registry/register", &tok_behind, &behind.uid).await.unwrap().status(), 200);
        assert!(last_heartbeat(&raw, &behind.uid).await.is_some(), "a register is written at once");
        assert_eq!(queued(&mut triggers).0, "default/behind");
        let before = last_heartbeat(&raw, &behind.uid).await.unwrap();
        assert_eq!(call("/registry/heartbeat", &tok_behind, &behind.uid).await.unwrap().status(), 200);
        assert!(last_heartbeat(&raw, &behind.uid).await.unwrap() > before, "a catch-up heartbeat is written at once");
        assert_eq!(queued(&mut triggers).1, Why::AgentHeartbeat);
    }
}

/// The next reconcile the registry asked for: (workspace, why).
fn queued(triggers: &mut mpsc::UnboundedReceiver<Request>) -> (String, Why) {
    match triggers.try_recv() {
        Ok(Request::Reconcile { key, why, .. }) => (key, why),
        other => panic!("expected a reconcile request, got {other:?}"),
    }
}

type Served = (String, mpsc::UnboundedReceiver<Request>, tokio::sync::oneshot::Sender<()>);

/// Serves the registry router on 127.0.0.1:0 over `store`; returns its URL, the
/// reconcile queue and what stops it when dropped.
async fn serve(store: DynStore) -> Served {
    serve_noting(store, Arc::default()).await
}

/// [`serve`], with the registry noting unrecorded heartbeats in `lost`.
async fn serve_noting(store: DynStore, lost: Arc<LostHeartbeats>) -> Served {
    let (trigger, triggers) = Trigger::new();
    let (_tx, desired) = watch::channel(Arc::new(DesiredSet { complete: true, ..Default::default() }));
    let mut state = AppState::new(store, trigger, desired, "admin".into(), Arc::new(Metrics::new()));
    state.lost_heartbeats = lost;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = registry::address_url(listener.local_addr().unwrap());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(registry::serve(listener, registry::router(state), async move {
        let _ = stopped.await;
    }));
    (url, triggers, stop)
}

/// Runs one statement on the database behind the store's back.
async fn execute(db: &Db, sql: &str) {
    use sqlx::Connection;
    let sql = sqlx::AssertSqlSafe(sql.to_string());
    if db.url.starts_with("postgres") {
        let mut conn = sqlx::PgConnection::connect(&db.url).await.unwrap();
        sqlx::query(sql).execute(&mut conn).await.unwrap();
    } else {
        let options = sqlx::sqlite::SqliteConnectOptions::new().filename(&db.url);
        let mut conn = sqlx::SqliteConnection::connect_with(&options).await.unwrap();
        sqlx::query(sql).execute(&mut conn).await.unwrap();
    }
}

/// Polls `done` until it holds (a wait for a condition, not a timing assertion);
/// gives up after a minute so a broken case fails instead of hanging.
async fn wait_for<F, Fut>(what: &str, mut done: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(60);
    while !done().await {
        assert!(tokio::time::Instant::now() < deadline, "gave up waiting for {what}");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// Another connection holding the database's write lock on the token rows (SQLite:
/// an immediate transaction; Postgres: an exclusive table lock), until released.
enum WriteLock {
    Sqlite(sqlx::SqliteConnection),
    Pg(sqlx::PgConnection),
}

impl WriteLock {
    async fn take(db: &Db) -> Self {
        use sqlx::Connection;
        if db.url.starts_with("postgres") {
            let mut conn = sqlx::PgConnection::connect(&db.url).await.unwrap();
            sqlx::query("BEGIN").execute(&mut conn).await.unwrap();
            sqlx::query("LOCK TABLE workspace_auth_tokens IN EXCLUSIVE MODE").execute(&mut conn).await.unwrap();
            Self::Pg(conn)
        } else {
            let options = sqlx::sqlite::SqliteConnectOptions::new().filename(&db.url);
            let mut conn = sqlx::SqliteConnection::connect_with(&options).await.unwrap();
            sqlx::query("BEGIN IMMEDIATE").execute(&mut conn).await.unwrap();
            Self::Sqlite(conn)
        }
    }

    async fn release(self) {
        match self {
            Self::Pg(mut conn) => drop(sqlx::query("ROLLBACK").execute(&mut conn).await.unwrap()),
            Self::Sqlite(mut conn) => drop(sqlx::query("ROLLBACK").execute(&mut conn).await.unwrap()),
        }
    }
}

macro_rules! both_stores {
    ($($case:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    super::cases::$case(&super::Db::sqlite().await).await;
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    let Some(db) = super::Db::postgres().await else { return };
                    super::cases::$case(&db).await;
                }
            )*
        }
    };
}

both_stores!(
    a_batch_moves_live_rows_forward_only,
    noted_heartbeats_are_written_by_the_flush,
    a_revoke_wins_over_a_pending_heartbeat,
    a_pending_heartbeat_protects_the_token_from_the_stale_rule,
    concurrent_flushes_never_let_a_revoke_pass_a_noted_heartbeat,
    a_crash_loses_only_the_pending_heartbeats,
    a_failed_flush_keeps_its_heartbeats,
    a_store_sharing_the_buffer_flushes_before_its_revoke,
    a_hanging_flush_notes_its_heartbeats_as_lost,
    the_registry_notes_a_heartbeat_it_cannot_record,
    the_registry_refuses_a_revoked_token_at_once,
);
