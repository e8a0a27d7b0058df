//! The same operator with its state in a real Postgres (`--database-url`).

mod support;

use std::time::Duration;

use sqlx::{Connection, PgConnection, Row};
use support::operator::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_state_store_provisions_and_heals() {
    if !docker_available() {
        return;
    }
    let Some(db) = support::postgres::fresh_database().await else { return };
    let mut op = Op::new("pgmode");
    op.extra = vec!["--database-url".into(), db.url.clone()];
    op.write_ws("dev");
    op.start();
    let ws = tokio::task::block_in_place(|| op.wait_online(&["dev"], Duration::from_secs(90)));
    let (tok, _, _) = read_token(ws["dev"]["container"]["id"].as_str().unwrap()).unwrap();
    let uid = ws["dev"]["uid"].as_str().unwrap().to_string();
    assert!(!op.state.join("state.db").exists(), "with --database-url no SQLite file is made");
    assert!(docker_ok(&["rm", "-f", ws["dev"]["container"]["id"].as_str().unwrap()]));
    let old_inc = ws["dev"]["incarnation"].as_i64().unwrap();
    let ws = tokio::task::block_in_place(|| {
        op.wait("healed", Duration::from_secs(30), |ws| {
            online(&ws["dev"]) && ws["dev"]["incarnation"].as_i64() > Some(old_inc)
        })
    });
    let (new_tok, _, _) = read_token(ws["dev"]["container"]["id"].as_str().unwrap()).unwrap();
    assert_ne!(tok, new_tok);
    assert_eq!(registry(&op.url(), "/registry/heartbeat", &tok, &uid), 401);
    assert_eq!(registry(&op.url(), "/registry/heartbeat", &new_tok, &uid), 200);
    let mut conn = PgConnection::connect(&db.url).await.unwrap();
    let rows = sqlx::query(
        "SELECT revoke_reason, prefix FROM workspace_auth_tokens WHERE workspace_uid = $1 ORDER BY created_at",
    )
    .bind(&uid)
    .fetch_all(&mut conn)
    .await
    .unwrap();
    let reasons: Vec<Option<String>> = rows.iter().map(|r| r.get("revoke_reason")).collect();
    // The reconcile may see the container already gone (container-missing) or still
    // dying from `rm -f` (exited: reprovision); either way the old token is revoked
    // with a reason and exactly one is live.
    let (live, revoked): (Vec<_>, Vec<_>) = reasons.iter().partition(|r| r.is_none());
    assert_eq!(live.len(), 1, "exactly one live token: {reasons:?}");
    assert_eq!(reasons.last(), Some(&None), "the live one is the newest: {reasons:?}");
    assert!(!revoked.is_empty(), "{reasons:?}");
    assert!(revoked.iter().all(|r| matches!(r.as_deref(), Some("container-missing" | "reprovision"))), "{reasons:?}");
    // (Under load the heal may take two provisions, so take the live row, not rows[1].)
    let live_prefix: String = rows.last().unwrap().get("prefix");
    assert_eq!(live_prefix, new_tok[..8]);
    op.stop();
    drop(db);
}

/// The state database goes away mid-run: the operator keeps running, says why,
/// changes nothing it cannot record, and heals once the database is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn database_unreachable_is_waited_out_then_healed() {
    if !docker_available() {
        return;
    }
    let Some(db) = support::postgres::fresh_database().await else { return };
    let (mut proxy, via_proxy) = db.behind_proxy().await;
    let mut op = Op::new("pgdown");
    op.extra = vec!["--database-url".into(), via_proxy];
    op.write_ws("dev");
    op.start();
    let ws = tokio::task::block_in_place(|| op.wait_online(&["dev"], Duration::from_secs(90)));
    let old_inc = ws["dev"]["incarnation"].as_i64().unwrap();
    proxy.cut();
    assert!(docker_ok(&["rm", "-f", ws["dev"]["container"]["id"].as_str().unwrap()]));
    let t0 = std::time::Instant::now();
    while !op.logs().contains("state database is unreachable") && t0.elapsed() < Duration::from_secs(30) {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(op.logs().contains("state database is unreachable"), "a clear error is logged:\n{}", op.logs());
    assert!(op.containers().is_empty(), "nothing is provisioned that could not be recorded");
    proxy.restore().await;
    tokio::task::block_in_place(|| {
        op.wait("healed after the database returned", Duration::from_secs(60), |ws| {
            online(&ws["dev"]) && ws["dev"]["incarnation"].as_i64() > Some(old_inc)
        })
    });
    assert_eq!(op.containers().len(), 1);
    op.stop();
}
