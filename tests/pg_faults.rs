//! The state database failing under a running operator, with real Docker and real
//! agents heartbeating through the registry the whole time:
//!
//! - Postgres unreachable for half a minute (a TCP proxy between the operator and
//!   the server is cut), while one workspace's container is removed and another's
//!   spec changes;
//! - Postgres crashed and restarted in the middle of provisioning, then stopped for
//!   twenty seconds while a container is removed;
//! - SQLite's write lock held by another connection past the operator's busy timeout
//!   and past the heartbeat TTL, while a container is removed.
//!
//! Each time: the operator keeps running; nothing is provisioned that could not be
//! recorded; the registry answers "unavailable" rather than 401 while it cannot look
//! a token up; once the database is back, the removed workspace gets its old token
//! revoked and a new container (exactly one), the changed one is recreated, and the
//! untouched workspaces keep their container, incarnation and token: agents whose
//! heartbeats could not be recorded are not taken for hung ones.

mod support;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use serde_json::Value;
use sqlx::{Connection, Row};
use support::operator::*;

const UP: Duration = Duration::from_secs(120);

/// What a test remembers of one workspace before the fault.
#[derive(Clone, Debug)]
struct Seen {
    uid: String,
    container: String,
    incarnation: i64,
    token: String,
}

fn seen(ws: &BTreeMap<String, Value>, names: &[&str]) -> BTreeMap<String, Seen> {
    names
        .iter()
        .map(|n| {
            let w = &ws[*n];
            let container = w["container"]["id"].as_str().unwrap().to_string();
            let token = read_token(&container).expect("the token file is readable").0;
            let s = Seen {
                uid: w["uid"].as_str().unwrap().to_string(),
                incarnation: w["incarnation"].as_i64().unwrap(),
                container,
                token,
            };
            (n.to_string(), s)
        })
        .collect()
}

/// Containers (any state) per workspace name, from Docker itself.
fn per_workspace(op: &Op) -> BTreeMap<String, Vec<String>> {
    let by_key = op.container_ids_per_workspace();
    by_key.into_iter().map(|(w, ids)| (w.trim_start_matches("default/").to_string(), ids)).collect()
}

fn heartbeat(op: &Op, s: &Seen) -> u16 {
    registry(&op.url(), "/registry/heartbeat", &s.token, &s.uid)
}

/// Keeps the fault in place for `length`, checking every half second that the
/// operator is alive and that `check` holds.
fn hold_fault(op: &mut Op, what: &str, length: Duration, mut check: impl FnMut(&mut Op)) {
    let t0 = Instant::now();
    let mut samples = 0;
    while t0.elapsed() < length {
        assert!(op.running(), "the operator exited while {what}:\n{}", op.logs());
        check(op);
        samples += 1;
        std::thread::sleep(Duration::from_millis(500));
    }
    eprintln!("{what}: held for {:?}, {samples} samples", t0.elapsed());
}

/// Waits until the operator's log says `needle` (it noticed the fault).
fn wait_log(op: &Op, needle: &str, deadline: Duration) {
    let t0 = Instant::now();
    while !op.logs().contains(needle) {
        assert!(t0.elapsed() < deadline, "the log never said {needle:?}:\n{}", op.logs());
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// After the fault: `changed` workspaces run a newer incarnation with a new token and
/// their old token is refused; every other one of `before` kept its container,
/// incarnation and token; one container per workspace.
fn assert_caught_up(op: &Op, before: &BTreeMap<String, Seen>, changed: &[&str], ws: &BTreeMap<String, Value>) {
    let containers = per_workspace(op);
    for (name, ids) in &containers {
        assert_eq!(ids.len(), 1, "{name} has {} containers: {containers:?}", ids.len());
    }
    assert_eq!(containers.len(), ws.len(), "one container per workspace: {containers:?}");
    for (name, old) in before {
        let w = &ws[name];
        let container = w["container"]["id"].as_str().unwrap();
        let incarnation = w["incarnation"].as_i64().unwrap();
        if changed.contains(&name.as_str()) {
            assert!(incarnation > old.incarnation, "{name} was re-provisioned");
            assert_ne!(container, old.container);
            assert_eq!(heartbeat(op, old), 401, "{name}'s old token must be refused");
            let token = read_token(container).unwrap().0;
            assert_ne!(token, old.token);
            let new = Seen { token, ..old.clone() };
            assert_eq!(heartbeat(op, &new), 200, "{name}'s new token works");
        } else {
            assert_eq!(
                (container, incarnation),
                (old.container.as_str(), old.incarnation),
                "{name} was untouched by the fault and must keep its container and incarnation; its decisions:\n{}",
                String::from_utf8_lossy(&op.cli(&["describe", "workspace", name]).stdout)
            );
            assert_eq!(heartbeat(op, old), 200, "{name}'s token must stay valid");
        }
    }
}

/// Token rows per workspace uid: (incarnation, revoke_reason), oldest first.
async fn pg_tokens(url: &str) -> BTreeMap<String, Vec<(i64, Option<String>)>> {
    let mut conn = sqlx::PgConnection::connect(url).await.unwrap();
    let rows = sqlx::query(
        "SELECT workspace_uid::text AS uid, incarnation, revoke_reason FROM workspace_auth_tokens ORDER BY created_at",
    )
    .fetch_all(&mut conn)
    .await
    .unwrap();
    let _ = conn.close().await;
    let mut out: BTreeMap<String, Vec<(i64, Option<String>)>> = BTreeMap::new();
    for r in rows {
        out.entry(r.get("uid")).or_default().push((r.get("incarnation"), r.get("revoke_reason")));
    }
    out
}

/// Exactly one live token per workspace; the removed ones' old tokens revoked with
/// a reason that says the container went (or was replaced).
fn assert_token_rows(
    tokens: &BTreeMap<String, Vec<(i64, Option<String>)>>,
    before: &BTreeMap<String, Seen>,
    removed: &[&str],
) {
    for (name, s) in before {
        let rows = &tokens[&s.uid];
        let live = rows.iter().filter(|(_, r)| r.is_none()).count();
        assert_eq!(live, 1, "{name}: exactly one live token: {rows:?}");
        if removed.contains(&name.as_str()) {
            let old: Vec<_> = rows.iter().filter(|(inc, _)| *inc == s.incarnation).collect();
            assert!(
                old.iter().all(|(_, r)| matches!(r.as_deref(), Some("container-missing" | "reprovision"))),
                "{name}: the removed container's token is revoked as container-missing: {rows:?}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_unreachable_for_half_a_minute_is_waited_out_then_caught_up() {
    if !docker_available() {
        return;
    }
    let Some(db) = support::postgres::fresh_database().await else { return };
    let (mut proxy, via_proxy) = db.behind_proxy().await;
    let mut op = Op::new("pgcut");
    op.extra = vec!["--database-url".into(), via_proxy];
    let names = ["a", "b", "c", "d"];
    for n in names {
        op.write_ws(n);
    }
    op.start();
    let ws = tokio::task::block_in_place(|| op.wait_online(&names, UP));
    let before = tokio::task::block_in_place(|| seen(&ws, &names));

    proxy.cut();
    remove_out_of_band(&[&before["a"].container]);
    op.write("b.yaml", &workspace_yaml("b").replace("ROLE: b", "ROLE: changed"));
    tokio::task::block_in_place(|| {
        wait_log(&op, "state database is unreachable", Duration::from_secs(30));
        hold_fault(&mut op, "Postgres is unreachable", Duration::from_secs(30), |op| {
            let containers = per_workspace(op);
            assert!(!containers.contains_key("a"), "a was provisioned while nothing could be recorded: {containers:?}");
            assert_eq!(containers["b"], vec![before["b"].container[..12].to_string()], "b was recreated unrecorded");
            let code = heartbeat(op, &before["c"]);
            assert_ne!(code, 401, "the registry refused a valid token because it could not look it up");
        });
    });
    assert_ne!(heartbeat(&op, &before["a"]), 401, "not even the removed one's is judged without the database");

    proxy.restore().await;
    let ws = tokio::task::block_in_place(|| {
        op.wait("caught up once the database is back", UP, |ws| {
            names.iter().all(|n| ws.get(*n).is_some_and(online))
                && ws["a"]["incarnation"].as_i64() > Some(before["a"].incarnation)
                && ws["b"]["incarnation"].as_i64() > Some(before["b"].incarnation)
        })
    });
    assert!(op.running(), "{}", op.logs());
    tokio::task::block_in_place(|| assert_caught_up(&op, &before, &["a", "b"], &ws));
    assert_token_rows(&pg_tokens(&db.url).await, &before, &["a"]);
    op.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_restarted_mid_provision_and_stopped_for_a_while_converges() {
    if !docker_available() {
        return;
    }
    let Some(db) = support::postgres::private_database().await else { return };
    let mut op = Op::new("pgrestart");
    op.extra = vec!["--database-url".into(), db.url.clone()];
    for n in ["a", "b", "c"] {
        op.write_ws(n);
    }
    op.start();
    tokio::task::block_in_place(|| op.wait_online(&["a", "b", "c"], UP));

    // A crash and restart of the server while two new workspaces are being provisioned.
    op.write_ws("e");
    op.write_ws("f");
    tokio::task::block_in_place(|| {
        op.wait("provisioning under way", UP, |ws| ws.contains_key("e") || ws.contains_key("f"));
        db.restart_server("immediate");
    });
    let names = ["a", "b", "c", "e", "f"];
    let ws = tokio::task::block_in_place(|| op.wait_online(&names, UP));
    assert!(op.running(), "{}", op.logs());
    for (name, ids) in per_workspace(&op) {
        assert_eq!(ids.len(), 1, "{name}: one container after the restart: {ids:?}");
    }
    let before = tokio::task::block_in_place(|| seen(&ws, &names));

    // Down for twenty seconds (past the heartbeat TTL) while a container is removed.
    tokio::task::block_in_place(|| db.stop_server("fast"));
    remove_out_of_band(&[&before["a"].container]);
    tokio::task::block_in_place(|| {
        wait_log(&op, "state database is unreachable", Duration::from_secs(30));
        hold_fault(&mut op, "Postgres is down", Duration::from_secs(20), |op| {
            let containers = per_workspace(op);
            assert!(!containers.contains_key("a"), "a was provisioned while nothing could be recorded: {containers:?}");
            assert_ne!(heartbeat(op, &before["c"]), 401, "a valid token refused while the database is down");
        });
        db.start_server();
    });
    let ws = tokio::task::block_in_place(|| {
        op.wait("caught up once the database is back", UP, |ws| {
            names.iter().all(|n| ws.get(*n).is_some_and(online))
                && ws["a"]["incarnation"].as_i64() > Some(before["a"].incarnation)
        })
    });
    assert!(op.running(), "{}", op.logs());
    tokio::task::block_in_place(|| assert_caught_up(&op, &before, &["a"], &ws));
    assert_token_rows(&pg_tokens(&db.url).await, &before, &["a"]);
    op.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_write_lock_held_elsewhere_is_retried_without_wrong_revocations() {
    if !docker_available() {
        return;
    }
    let mut op = Op::new("sqlitelock");
    let names = ["a", "b", "c"];
    for n in names {
        op.write_ws(n);
    }
    op.start();
    let ws = tokio::task::block_in_place(|| op.wait_online(&names, UP));
    let before = tokio::task::block_in_place(|| seen(&ws, &names));

    // Another process's connection takes the write lock and keeps it for 15 s: longer
    // than the operator's busy timeout (5 s) and than the heartbeat TTL (10 s).
    let options = sqlx::sqlite::SqliteConnectOptions::new()
        .filename(op.state.join("state.db"))
        .busy_timeout(Duration::from_secs(30));
    let mut holder = sqlx::SqliteConnection::connect_with(&options).await.unwrap();
    sqlx::query("BEGIN EXCLUSIVE").execute(&mut holder).await.unwrap();
    remove_out_of_band(&[&before["a"].container]);
    tokio::task::block_in_place(|| {
        hold_fault(&mut op, "state.db is locked", Duration::from_secs(15), |op| {
            let containers = per_workspace(op);
            assert!(!containers.contains_key("a"), "a was provisioned while nothing could be recorded: {containers:?}");
            assert_ne!(heartbeat(op, &before["c"]), 401, "a valid token refused while the database is locked");
        });
    });
    assert!(op.logs().contains("database is locked"), "the lock is what failed, and it is logged:\n{}", op.logs());
    sqlx::query("ROLLBACK").execute(&mut holder).await.unwrap();
    holder.close().await.unwrap();

    let ws = tokio::task::block_in_place(|| {
        op.wait("caught up once the lock is released", UP, |ws| {
            names.iter().all(|n| ws.get(*n).is_some_and(online))
                && ws["a"]["incarnation"].as_i64() > Some(before["a"].incarnation)
        })
    });
    assert!(op.running(), "{}", op.logs());
    tokio::task::block_in_place(|| assert_caught_up(&op, &before, &["a"], &ws));

    let mut conn = sqlx::SqliteConnection::connect_with(&options).await.unwrap();
    let rows =
        sqlx::query("SELECT workspace_uid, incarnation, revoke_reason FROM workspace_auth_tokens ORDER BY created_at")
            .fetch_all(&mut conn)
            .await
            .unwrap();
    let mut tokens: BTreeMap<String, Vec<(i64, Option<String>)>> = BTreeMap::new();
    for r in rows {
        tokens.entry(r.get("workspace_uid")).or_default().push((r.get("incarnation"), r.get("revoke_reason")));
    }
    conn.close().await.unwrap();
    assert_token_rows(&tokens, &before, &["a"]);
    op.stop();
}
