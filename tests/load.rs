//! Load: 200 real workspaces (real containers of the tiny agent, real heartbeats),
//! then a quarter of their containers removed out of band in one `docker rm -f`.
//! Every removed workspace heals exactly once (its incarnation goes up by one, its
//! old token is refused), the other 150 are left alone, and at no sampled moment
//! does a workspace have two containers.

mod support;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use serde_json::Value;
use sqlx::{Connection, Row};
use support::operator::*;

const WORKSPACES: usize = 200;
const REMOVED: usize = 50;

fn name(i: usize) -> String {
    format!("w{i:03}")
}

/// Containers (any state) per workspace name, from Docker itself.
fn per_workspace(op: &Op) -> BTreeMap<String, usize> {
    op.containers_per_workspace().into_iter().map(|(k, n)| (k.trim_start_matches("default/").to_string(), n)).collect()
}

/// Polls `get` (once a second: 200 workspaces make a large answer) until `done`
/// holds, asserting at every sample that no workspace has two containers.
fn wait_sampling(
    op: &mut Op,
    what: &str,
    deadline: Duration,
    done: impl Fn(&BTreeMap<String, Value>) -> bool,
) -> BTreeMap<String, Value> {
    let t0 = Instant::now();
    let mut samples = 0;
    let mut last = None;
    loop {
        assert!(op.running(), "the operator exited while waiting for {what}:\n{}", op.logs());
        let counts = per_workspace(op);
        let doubled: Vec<_> = counts.iter().filter(|(_, n)| **n > 1).collect();
        assert!(doubled.is_empty(), "workspaces with two containers while waiting for {what}: {doubled:?}");
        samples += 1;
        if let Some(ws) = op.get() {
            if done(&ws) {
                eprintln!("{what}: {:?}, {samples} samples", t0.elapsed());
                return ws;
            }
            if samples % 30 == 0 {
                let up = ws.values().filter(|w| online(w)).count();
                eprintln!("waiting for {what}: {:?}, {up} of {} online", t0.elapsed(), ws.len());
            }
            last = Some(ws);
        }
        if t0.elapsed() > deadline {
            let not_yet: Vec<_> = last
                .as_ref()
                .map(|ws| ws.iter().filter(|(_, w)| !online(w)).map(|(n, w)| (n.clone(), w["phase"].clone())).collect())
                .unwrap_or_default();
            let logs = op.logs();
            let tail: Vec<_> = logs.lines().rev().take(40).collect();
            panic!(
                "timed out after {deadline:?} waiting for {what}; not online: {not_yet:?}\nlog tail:\n{}",
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
        std::thread::sleep(Duration::from_secs(1));
    }
}

fn all_online(ws: &BTreeMap<String, Value>) -> bool {
    ws.len() == WORKSPACES && ws.values().all(online)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_workspaces_fifty_removed_at_once_each_heals_exactly_once() {
    if !docker_available() {
        return;
    }
    let mut op = Op::new("load");
    // 200 agents at one beat a second would be 200 registry writes a second on a
    // 2-core machine: beat every 5 s (TTL 30 s) to leave the CPU to what is tested.
    op.heartbeat_seconds = 5;
    for i in 0..WORKSPACES {
        op.write_ws(&name(i));
    }
    op.start();
    let before = tokio::task::block_in_place(|| {
        wait_sampling(&mut op, "200 workspaces online", Duration::from_secs(900), all_online)
    });
    assert_eq!(op.containers().len(), WORKSPACES);

    let removed: Vec<String> = (0..WORKSPACES).step_by(WORKSPACES / REMOVED).map(name).collect();
    assert_eq!(removed.len(), REMOVED);
    let old_tokens: BTreeMap<String, String> = tokio::task::block_in_place(|| {
        removed
            .iter()
            .map(|n| (n.clone(), read_token(before[n]["container"]["id"].as_str().unwrap()).unwrap().0))
            .collect()
    });
    let ids: Vec<&str> = removed.iter().map(|n| before[n]["container"]["id"].as_str().unwrap()).collect();
    remove_out_of_band(&ids);

    let inc = |ws: &BTreeMap<String, Value>, n: &str| ws[n]["incarnation"].as_i64().unwrap();
    let after = tokio::task::block_in_place(|| {
        wait_sampling(&mut op, "the 50 removed healed", Duration::from_secs(600), |ws| {
            all_online(ws) && removed.iter().all(|n| inc(ws, n) > inc(&before, n))
        })
    });

    // None twice, none of the others touched.
    for (n, w) in &after {
        let healed = removed.contains(n);
        assert_eq!(
            inc(&after, n),
            inc(&before, n) + i64::from(healed),
            "{n}: incarnation {} before, {} after ({})",
            inc(&before, n),
            inc(&after, n),
            if healed { "removed: healed once" } else { "untouched" }
        );
        if !healed {
            assert_eq!(w["container"]["id"], before[n]["container"]["id"], "{n} kept its container");
        }
    }
    let counts = per_workspace(&op);
    assert_eq!(counts.len(), WORKSPACES, "every workspace has a container");
    assert!(counts.values().all(|c| *c == 1), "exactly one container each");
    assert_eq!(op.containers().len(), WORKSPACES, "exactly {WORKSPACES} containers");
    for n in &removed {
        let uid = after[n]["uid"].as_str().unwrap();
        assert_eq!(registry(&op.url(), "/registry/heartbeat", &old_tokens[n], uid), 401, "{n}'s old token");
    }

    // The store agrees: one live token per workspace; the healed ones' old tokens
    // revoked, once.
    let options = sqlx::sqlite::SqliteConnectOptions::new().filename(op.state.join("state.db"));
    let mut conn = sqlx::SqliteConnection::connect_with(&options).await.unwrap();
    let rows = sqlx::query(
        "SELECT w.key, t.incarnation, t.revoke_reason FROM workspace_auth_tokens t \
         JOIN workspaces w ON w.uid = t.workspace_uid",
    )
    .fetch_all(&mut conn)
    .await
    .unwrap();
    conn.close().await.unwrap();
    let mut tokens: BTreeMap<String, Vec<(i64, Option<String>)>> = BTreeMap::new();
    for r in rows {
        let key: String = r.get("key");
        tokens
            .entry(key.trim_start_matches("default/").to_string())
            .or_default()
            .push((r.get("incarnation"), r.get("revoke_reason")));
    }
    for i in 0..WORKSPACES {
        let n = name(i);
        let rows = &tokens[&n];
        let live: Vec<_> = rows.iter().filter(|(_, r)| r.is_none()).collect();
        assert_eq!(live.len(), 1, "{n}: one live token: {rows:?}");
        assert_eq!(live[0].0, inc(&after, &n), "{n}: the live token is the current incarnation's: {rows:?}");
        if removed.contains(&n) {
            let new = rows.iter().filter(|(i, _)| *i == inc(&after, &n)).count();
            assert_eq!(new, 1, "{n}: one token issued by the heal: {rows:?}");
            let old = rows.iter().filter(|(i, _)| *i == inc(&before, &n)).count();
            assert_eq!(old, 1, "{n}: no token issued for the removed container: {rows:?}");
        }
    }
    op.stop();
}
