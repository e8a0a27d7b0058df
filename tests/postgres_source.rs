//! `--source postgres`: desired state as rows, LISTEN/NOTIFY, status written back,
//! `apply` into the database, several sources at once, and the database going away.

mod support;

use std::time::Duration;

use serde_json::Value;
use sqlx::{Connection, PgConnection, Row};
use support::operator::*;

const UP: Duration = Duration::from_secs(90);
const CONVERGE: Duration = Duration::from_secs(30);

async fn sql(url: &str, q: &str) {
    let mut c = PgConnection::connect(url).await.unwrap();
    sqlx::query(sqlx::AssertSqlSafe(q.to_string())).execute(&mut c).await.unwrap();
}

/// `apply -f PATH [extra]`, the database URL passed in the environment (never argv).
fn apply_with(url: &str, path: &str, extra: &[&str]) -> std::process::Output {
    std::process::Command::new(BIN)
        .args(["apply", "-f", path])
        .args(extra)
        .env("MOLECULE_DATABASE_URL", url)
        .output()
        .unwrap()
}

fn apply(url: &str, path: &str) -> std::process::Output {
    apply_with(url, path, &[])
}

async fn count(url: &str, q: &str) -> i64 {
    let mut c = PgConnection::connect(url).await.unwrap();
    sqlx::query(sqlx::AssertSqlSafe(q.to_string())).fetch_one(&mut c).await.unwrap().get(0)
}

fn cond<'a>(w: &'a Value, t: &str) -> &'a Value {
    w["conditions"].as_array().unwrap().iter().find(|c| c["type"] == t).unwrap_or(&Value::Null)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_are_reconciled_through_notify_and_status_is_written_back() {
    if !docker_available() {
        return;
    }
    let Some(db) = support::postgres::fresh_database().await else { return };
    // apply validates and pushes the example org into the database.
    let org = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/org");
    let out = apply(&db.url, org);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("workspace.molecule.ai/pm applied"));

    let mut op = Op::new("pgsrc");
    op.sources = vec!["postgres".into()];
    // A long resync: changes must arrive by NOTIFY, not by the periodic passes.
    op.extra = vec!["--database-url".into(), db.url.clone(), "--resync-seconds".into(), "600".into()];
    op.start();
    let names = ["pm", "dev-lead", "backend", "qa", "research", "engineering-docs"];
    let ws = tokio::task::block_in_place(|| op.wait_online(&names, UP));
    assert_eq!(ws["pm"]["source"]["kind"], "postgres");
    assert!(ws["pm"]["source"]["ref"].as_str().unwrap().starts_with("desired_objects/Workspace/default/pm@"));

    // Status is written back to the row, readable by any SQL client.
    let t0 = std::time::Instant::now();
    let mut phase = String::new();
    while t0.elapsed() < CONVERGE {
        let mut c = PgConnection::connect(&db.url).await.unwrap();
        let row = sqlx::query(
            "SELECT status->>'phase' AS phase FROM desired_objects WHERE kind = 'Workspace' AND name = 'pm'",
        )
        .fetch_one(&mut c)
        .await
        .unwrap();
        phase = row.get::<Option<String>, _>("phase").unwrap_or_default();
        if phase == "Running" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(phase, "Running");

    // A row change is reconciled promptly (NOTIFY), well before any reload.
    let inc = ws["qa"]["incarnation"].as_i64().unwrap();
    let changed = std::time::Instant::now();
    sql(&db.url, r#"UPDATE desired_objects SET spec = jsonb_set(spec, '{env,ROLE}', '"qa-lead"') WHERE kind = 'Workspace' AND name = 'qa'"#).await;
    tokio::task::block_in_place(|| {
        op.wait("qa recreated", CONVERGE, |ws| online(&ws["qa"]) && ws["qa"]["incarnation"].as_i64() > Some(inc))
    });
    assert!(changed.elapsed() < Duration::from_secs(25), "took {:?}: not NOTIFY-driven", changed.elapsed());

    // A soft delete removes the workspace.
    sql(&db.url, "UPDATE desired_objects SET deleted_at = now() WHERE kind = 'Workspace' AND name = 'research'").await;
    tokio::task::block_in_place(|| op.wait("research removed", CONVERGE, |ws| !ws.contains_key("research")));

    // An invalid row is InvalidSpec; the others are untouched.
    sql(&db.url, r#"INSERT INTO desired_objects (kind, name, spec) VALUES ('Workspace', 'broken', '{"tier": 9}')"#)
        .await;
    let ws = tokio::task::block_in_place(|| {
        op.wait("broken reported", CONVERGE, |ws| {
            ws.get("broken").is_some_and(|w| cond(w, "InvalidSpec")["status"] == "True")
        })
    });
    assert!(online(&ws["pm"]));
    op.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apply_refuses_invalid_manifests_and_writes_nothing() {
    let Some(db) = support::postgres::fresh_database().await else { return };
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("ok.yaml"), workspace_yaml("ok")).unwrap();
    std::fs::write(dir.path().join("bad.yaml"), workspace_yaml("bad").replace("tier: 1", "tier: 9")).unwrap();
    let out = apply(&db.url, dir.path().to_str().unwrap());
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("nothing was applied") && err.contains("tier"), "{err}");
    assert_eq!(count(&db.url, "SELECT count(*) FROM desired_objects").await, 0, "a refused apply writes nothing");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apply_dry_run_writes_nothing_not_even_the_schema() {
    let Some(db) = support::postgres::fresh_database().await else { return };
    let org = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/org");
    let out = apply_with(&db.url, org, &["--dry-run"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("workspace.molecule.ai/pm valid (dry run)"));
    let tables = "SELECT count(*) FROM information_schema.tables WHERE table_schema = 'public'";
    assert_eq!(count(&db.url, tables).await, 0, "a dry run created tables (ran migrations) in an empty database");
    // Against a database that has the schema, it validates against what is there and
    // still writes nothing.
    assert!(apply(&db.url, &format!("{org}/pm.yaml")).status.success());
    let rows = "SELECT count(*) FROM desired_objects";
    assert_eq!(count(&db.url, rows).await, 1);
    let out = apply_with(&db.url, org, &["--dry-run"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(count(&db.url, rows).await, 1, "a dry run wrote rows");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apply_is_all_or_nothing() {
    let Some(db) = support::postgres::fresh_database().await else { return };
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("a.yaml"), workspace_yaml("a")).unwrap();
    assert!(apply(&db.url, dir.path().to_str().unwrap()).status.success(), "the schema is there");
    sql(&db.url, "DELETE FROM desired_objects").await;
    // Valid manifests the database refuses half-way (a rule of the database's own).
    sql(
        &db.url,
        "CREATE FUNCTION refuse_boom() RETURNS trigger LANGUAGE plpgsql AS \
         $$ BEGIN RAISE EXCEPTION 'no workspace called boom here'; END $$",
    )
    .await;
    sql(
        &db.url,
        "CREATE TRIGGER refuse_boom BEFORE INSERT ON desired_objects FOR EACH ROW \
         WHEN (NEW.name = 'boom') EXECUTE FUNCTION refuse_boom()",
    )
    .await;
    std::fs::write(dir.path().join("boom.yaml"), workspace_yaml("boom")).unwrap();
    std::fs::write(dir.path().join("c.yaml"), workspace_yaml("c")).unwrap();
    let out = apply(&db.url, dir.path().to_str().unwrap());
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("nothing was applied") && err.contains("Workspace default/boom"), "{err}");
    let n = count(&db.url, "SELECT count(*) FROM desired_objects").await;
    assert_eq!(n, 0, "an apply that failed half-way left {n} of its objects written");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_workspace_from_two_sources_is_a_conflict_and_the_first_wins() {
    if !docker_available() {
        return;
    }
    let Some(db) = support::postgres::fresh_database().await else { return };
    let mut op = Op::new("conflict");
    op.write("dev.yaml", &workspace_yaml("dev").replace("ROLE: dev", "ROLE: from-dir"));
    let pg_dir = tempfile::tempdir().unwrap();
    std::fs::write(pg_dir.path().join("dev.yaml"), workspace_yaml("dev").replace("ROLE: dev", "ROLE: from-postgres"))
        .unwrap();
    assert!(apply(&db.url, pg_dir.path().to_str().unwrap()).status.success());
    op.sources = vec![format!("dir:{}", op.dir.path().display()), "postgres".into()];
    op.extra = vec!["--database-url".into(), db.url.clone()];
    op.start();
    let ws = tokio::task::block_in_place(|| {
        op.wait("conflict shown", UP, |ws| {
            ws.get("dev").is_some_and(|w| online(w) && cond(w, "SourceConflict")["status"] == "True")
        })
    });
    let msg = cond(&ws["dev"], "SourceConflict")["message"].as_str().unwrap().to_string();
    assert!(msg.contains("postgres"), "{msg}");
    let env = docker(&[
        "inspect",
        "-f",
        "{{range .Config.Env}}{{println .}}{{end}}",
        ws["dev"]["container"]["id"].as_str().unwrap(),
    ]);
    assert!(env.lines().any(|l| l == "ROLE=from-dir"), "the first-listed source wins: {env}");
    assert_eq!(ws["dev"]["source"]["kind"], "dir");
    op.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_made_while_the_database_was_away_are_caught_up() {
    if !docker_available() {
        return;
    }
    let Some(db) = support::postgres::fresh_database().await else { return };
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("a.yaml"), workspace_yaml("a")).unwrap();
    std::fs::write(dir.path().join("b.yaml"), workspace_yaml("b")).unwrap();
    assert!(apply(&db.url, dir.path().to_str().unwrap()).status.success());
    let (mut proxy, via_proxy) = db.behind_proxy().await;
    let mut op = Op::new("pgaway");
    op.sources = vec!["postgres".into()];
    op.extra = vec!["--database-url".into(), via_proxy];
    op.start();
    let ws = tokio::task::block_in_place(|| op.wait_online(&["a", "b"], UP));
    let (tok_a, _, _) = read_token(ws["a"]["container"]["id"].as_str().unwrap()).unwrap();
    proxy.cut();
    // While the operator cannot see the database: b is deleted, a is changed.
    sql(&db.url, "UPDATE desired_objects SET deleted_at = now() WHERE name = 'b'").await;
    sql(&db.url, r#"UPDATE desired_objects SET spec = jsonb_set(spec, '{env,ROLE}', '"a2"') WHERE name = 'a'"#).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(op.containers().len(), 2, "nothing is removed while the database is away");
    proxy.restore().await;
    tokio::task::block_in_place(|| {
        op.wait("caught up", Duration::from_secs(60), |ws| {
            !ws.contains_key("b")
                && ws.get("a").is_some_and(|w| online(w) && w["token"]["prefix"].as_str() != Some(&tok_a[..8]))
        })
    });
    op.stop();
}

/// Writing status back into `desired_objects` fails (here a trigger refuses it): the
/// operator says so in `/readyz` and keeps every status, newest per workspace, until
/// the write succeeds; then the row has it. Before, a failed write was logged and the
/// status dropped until some later reconcile happened to write another.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_status_the_database_refuses_is_kept_and_written_once_it_accepts() {
    if !docker_available() {
        return;
    }
    let Some(db) = support::postgres::fresh_database().await else { return };
    let migrate = std::process::Command::new(BIN).args(["migrate", "--database-url", &db.url]).output().unwrap();
    assert!(migrate.status.success(), "{}", String::from_utf8_lossy(&migrate.stderr));
    sql(
        &db.url,
        "CREATE FUNCTION refuse_status() RETURNS trigger LANGUAGE plpgsql AS \
         $$ BEGIN RAISE EXCEPTION 'status writes are refused for this test'; END $$",
    )
    .await;
    sql(&db.url, "CREATE TRIGGER refuse_status BEFORE UPDATE OF status ON desired_objects FOR EACH ROW EXECUTE FUNCTION refuse_status()").await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("w.yaml"), workspace_yaml("written")).unwrap();
    let out = apply(&db.url, dir.path().to_str().unwrap());
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    let mut op = Op::new("pgstatusretry");
    op.sources = vec!["postgres".into()];
    op.extra = vec!["--database-url".into(), db.url.clone(), "--resync-seconds".into(), "600".into()];
    op.start();
    tokio::task::block_in_place(|| op.wait_online(&["written"], UP));
    let readyz = || {
        let out = std::process::Command::new("curl").args(["-s", &format!("{}/readyz", op.url())]).output().unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let t0 = std::time::Instant::now();
    while !readyz().contains("postgres-status-writer") && t0.elapsed() < CONVERGE {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(readyz().contains("not ready") && readyz().contains("refused for this test"), "{}", readyz());

    sql(&db.url, "DROP TRIGGER refuse_status ON desired_objects").await;
    let t0 = std::time::Instant::now();
    let mut phase = None;
    while t0.elapsed() < CONVERGE {
        let mut c = PgConnection::connect(&db.url).await.unwrap();
        let row = sqlx::query("SELECT status->>'phase' AS phase FROM desired_objects WHERE name = 'written'")
            .fetch_one(&mut c)
            .await
            .unwrap();
        phase = row.get::<Option<String>, _>("phase");
        if phase.as_deref() == Some("Running") && readyz().contains("\"ready\"") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(phase.as_deref(), Some("Running"), "the kept status was written once the database took it");
    assert!(readyz().contains("\"status\":\"ready\""), "{}", readyz());
}
