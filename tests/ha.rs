//! Several replicas of one operator against one Postgres: a lease with a fencing
//! epoch, failover, and a deposed leader's writes refused by the database.

mod support;

use std::time::{Duration, Instant};

use molecule::model::RevokeReason;
use molecule::store::lease::{Lease, is_fenced};
use molecule::store::postgres::PostgresStore;
use molecule::store::{Heartbeats, Tokens, Workspaces};
use support::operator::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deposed_leader_can_neither_issue_nor_revoke_tokens() {
    let Some(db) = support::postgres::fresh_database().await else { return };
    let plain = PostgresStore::connect(&db.url).await.unwrap(); // migrations
    let ttl = Duration::from_secs(1);
    let a = Lease::connect(&db.url, "inst", "a", ttl).await.unwrap();
    let b = Lease::connect(&db.url, "inst", "b", ttl).await.unwrap();
    let epoch_a = a.try_acquire().await.unwrap().expect("a leads first");
    assert_eq!(b.try_acquire().await.unwrap(), None, "b follows while a's lease is live");
    let store_a = PostgresStore::connect_fenced(&db.url, Some(&a.fence(epoch_a))).await.unwrap();
    let now = chrono::Utc::now();
    let ws = store_a.ensure_workspace("default/dev", now).await.unwrap();
    let inc = store_a.bump_incarnation(&ws.uid).await.unwrap();
    store_a.issue_token(&ws.uid, inc, now).await.unwrap();

    // a stops renewing (paused); b takes over once a's lease expires.
    let t0 = Instant::now();
    let epoch_b = loop {
        if let Some(e) = b.try_acquire().await.unwrap() {
            break e;
        }
        assert!(t0.elapsed() < Duration::from_secs(10), "b never took over");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(epoch_b > epoch_a, "a new holder gets a higher epoch");
    let store_b = PostgresStore::connect_fenced(&db.url, Some(&b.fence(epoch_b))).await.unwrap();

    // a wakes up: every write it tries is refused by the database.
    let issue = store_a.issue_token(&ws.uid, inc, chrono::Utc::now()).await.unwrap_err();
    assert!(is_fenced(&issue), "{issue}");
    let revoke =
        store_a.revoke_tokens(&ws.uid, RevokeReason::ContainerMissing, None, chrono::Utc::now()).await.unwrap_err();
    assert!(is_fenced(&revoke), "{revoke}");
    assert!(is_fenced(&store_a.bump_incarnation(&ws.uid).await.unwrap_err()));
    assert!(!a.renew(epoch_a).await.unwrap(), "a's lease is gone");
    assert_eq!(store_b.live_tokens(&ws.uid).await.unwrap().len(), 1, "nothing a tried was half-applied");
    // The new leader writes; an unfenced follower's heartbeat bookkeeping passes.
    store_b.issue_token(&ws.uid, inc, chrono::Utc::now()).await.unwrap();
    let live = plain.live_tokens(&ws.uid).await.unwrap();
    plain.record_heartbeat(&live[0].id, &ws.uid, chrono::Utc::now()).await.unwrap();
}

/// Waits (30 s at most) for `line` in `op`'s log: the API may answer before the
/// lease loop has logged its first look.
fn logged(op: &Op, line: &str) {
    let t0 = Instant::now();
    while !op.logs().contains(line) {
        assert!(t0.elapsed() < Duration::from_secs(30), "never logged {line:?}:\n{}", op.logs());
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn replica(test: &str, url: &str, dir: &std::path::Path, instance: &str) -> Op {
    let mut op = Op::new(test);
    op.instance = instance.to_string();
    op.sources = vec![format!("dir:{}", dir.display())];
    op.extra = vec!["--database-url".into(), url.into(), "--lease-seconds".into(), "3".into()];
    op
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_takes_over_when_the_leader_is_killed_and_heals_what_happened() {
    if !docker_available() {
        return;
    }
    let Some(db) = support::postgres::fresh_database().await else { return };
    let org = tempfile::tempdir().unwrap();
    std::fs::write(org.path().join("dev.yaml"), workspace_yaml("dev")).unwrap();
    let mut leader = replica("haleader", &db.url, org.path(), &format!("ha{}", std::process::id()));
    let mut follower = replica("hafollower", &db.url, org.path(), &leader.instance.clone());
    leader.start();
    let ws = tokio::task::block_in_place(|| leader.wait_online(&["dev"], Duration::from_secs(90)));
    follower.start();
    tokio::task::block_in_place(|| {
        follower.wait("follower serving", Duration::from_secs(30), |ws| ws.contains_key("dev"))
    });
    tokio::task::block_in_place(|| logged(&follower, "following"));
    let inc = ws["dev"]["incarnation"].as_i64().unwrap();
    leader.kill();
    assert!(docker_ok(&["rm", "-f", ws["dev"]["container"]["id"].as_str().unwrap()]));
    let t0 = Instant::now();
    tokio::task::block_in_place(|| {
        follower.wait("follower took over and healed", Duration::from_secs(60), |ws| {
            online(&ws["dev"]) && ws["dev"]["incarnation"].as_i64() > Some(inc)
        })
    });
    eprintln!("takeover and heal in {:?}", t0.elapsed());
    assert!(follower.logs().contains("leading"), "{}", follower.logs());
    assert_eq!(follower.containers().len(), 1, "no duplicate containers");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_leader_that_wakes_after_losing_the_lease_stops_without_acting() {
    if !docker_available() {
        return;
    }
    let Some(db) = support::postgres::fresh_database().await else { return };
    let org = tempfile::tempdir().unwrap();
    std::fs::write(org.path().join("dev.yaml"), workspace_yaml("dev")).unwrap();
    let mut leader = replica("hastop", &db.url, org.path(), &format!("hs{}", std::process::id()));
    let mut follower = replica("hastopf", &db.url, org.path(), &leader.instance.clone());
    leader.start();
    let ws = tokio::task::block_in_place(|| leader.wait_online(&["dev"], Duration::from_secs(90)));
    follower.start();
    tokio::task::block_in_place(|| {
        follower.wait("follower serving", Duration::from_secs(30), |ws| ws.contains_key("dev"))
    });
    let inc = ws["dev"]["incarnation"].as_i64().unwrap();
    leader.signal("STOP");
    // While the old leader is frozen, its container goes; the new leader heals it.
    assert!(docker_ok(&["rm", "-f", ws["dev"]["container"]["id"].as_str().unwrap()]));
    let healed = tokio::task::block_in_place(|| {
        follower.wait("new leader healed", Duration::from_secs(60), |ws| {
            online(&ws["dev"]) && ws["dev"]["incarnation"].as_i64() > Some(inc)
        })
    });
    leader.signal("CONT");
    assert!(tokio::task::block_in_place(|| leader.wait_exit(Duration::from_secs(30))), "the deposed leader must stop");
    let logs = leader.logs();
    assert!(logs.contains("lost the lease") || logs.contains("fenced"), "{logs}");
    // Its wake-up changed nothing: same incarnation, one container, one live token.
    let ws = tokio::task::block_in_place(|| follower.wait_online(&["dev"], Duration::from_secs(30)));
    assert_eq!(ws["dev"]["incarnation"], healed["dev"]["incarnation"]);
    assert_eq!(follower.containers().len(), 1);
    let mut c = <sqlx::PgConnection as sqlx::Connection>::connect(&db.url).await.unwrap();
    let live: i64 = sqlx::Row::get(
        &sqlx::query("SELECT count(*) AS n FROM workspace_auth_tokens WHERE revoked_at IS NULL")
            .fetch_one(&mut c)
            .await
            .unwrap(),
        "n",
    );
    assert_eq!(live, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_one_leader_and_exactly_one_successor() {
    if !docker_available() {
        return;
    }
    let Some(db) = support::postgres::fresh_database().await else { return };
    let org = tempfile::tempdir().unwrap();
    std::fs::write(org.path().join("dev.yaml"), workspace_yaml("dev")).unwrap();
    let instance = format!("h3{}", std::process::id());
    let mut first = replica("ha3a", &db.url, org.path(), &instance);
    first.start();
    let ws = tokio::task::block_in_place(|| first.wait_online(&["dev"], Duration::from_secs(90)));
    let mut others = [replica("ha3b", &db.url, org.path(), &instance), replica("ha3c", &db.url, org.path(), &instance)];
    for o in others.iter_mut() {
        o.start();
    }
    for o in &others {
        tokio::task::block_in_place(|| {
            o.wait("follower serving", Duration::from_secs(30), |ws| ws.contains_key("dev"))
        });
    }
    let inc = ws["dev"]["incarnation"].as_i64().unwrap();
    first.kill();
    assert!(docker_ok(&["rm", "-f", ws["dev"]["container"]["id"].as_str().unwrap()]));
    tokio::task::block_in_place(|| {
        others[0].wait("a successor healed", Duration::from_secs(60), |ws| {
            online(&ws["dev"]) && ws["dev"]["incarnation"].as_i64() > Some(inc)
        })
    });
    // Exactly one successor leads; the other keeps following.
    std::thread::sleep(Duration::from_secs(4)); // more than a lease: a second leader would show by now
    let leading = others.iter().filter(|o| o.logs().contains("leading")).count();
    assert_eq!(leading, 1, "exactly one successor");
    assert_eq!(others[0].containers().len(), 1, "no duplicate containers");
    assert_eq!(others[0].get().unwrap()["dev"]["incarnation"].as_i64(), Some(inc + 1), "healed once, not twice");
}

/// A connection of the leader's, carrying its fence as a fenced store's do.
async fn fenced_connection(url: &str, fence: &str) -> sqlx::PgConnection {
    let options: sqlx::postgres::PgConnectOptions = url.parse().unwrap();
    <sqlx::PgConnection as sqlx::Connection>::connect_with(&options.options([("molecule.fence", fence)])).await.unwrap()
}

async fn incarnation(url: &str, key: &str) -> i64 {
    let mut c = <sqlx::PgConnection as sqlx::Connection>::connect(url).await.unwrap();
    sqlx::Row::get(
        &sqlx::query("SELECT incarnation FROM workspaces WHERE key = $1").bind(key).fetch_one(&mut c).await.unwrap(),
        "incarnation",
    )
}

async fn take_over(b: &Lease) -> i64 {
    let t0 = Instant::now();
    loop {
        if let Some(e) = b.try_acquire().await.unwrap() {
            return e;
        }
        assert!(t0.elapsed() < Duration::from_secs(20), "b never took over");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_frozen_inside_a_transaction_cannot_commit_after_a_takeover() {
    let Some(db) = support::postgres::fresh_database().await else { return };
    let plain = PostgresStore::connect(&db.url).await.unwrap(); // migrations
    plain.ensure_workspace("default/dev", chrono::Utc::now()).await.unwrap();
    let ttl = Duration::from_secs(1);
    let a = Lease::connect(&db.url, "inst", "a", ttl).await.unwrap();
    let b = Lease::connect(&db.url, "inst", "b", ttl).await.unwrap();
    let epoch_a = a.try_acquire().await.unwrap().expect("a leads first");
    let mut conn = fenced_connection(&db.url, &a.fence(epoch_a)).await;
    sqlx::raw_sql("BEGIN").execute(&mut conn).await.unwrap();
    sqlx::raw_sql("UPDATE workspaces SET incarnation = incarnation + 100 WHERE key = 'default/dev'")
        .execute(&mut conn)
        .await
        .expect("a's write passes the fence while its lease is live");
    // a freezes here, its transaction open; b takes over once a's lease expires.
    let epoch_b = take_over(&b).await;
    assert!(epoch_b > epoch_a);
    // a wakes: its commit is refused and nothing it wrote is there.
    let commit = sqlx::raw_sql("COMMIT").execute(&mut conn).await;
    assert!(commit.is_err(), "a deposed leader's transaction committed after the takeover");
    assert_eq!(incarnation(&db.url, "default/dev").await, 0, "the deposed leader's write survived");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_begun_under_a_live_lease_cannot_write_once_it_expired() {
    let Some(db) = support::postgres::fresh_database().await else { return };
    let plain = PostgresStore::connect(&db.url).await.unwrap();
    plain.ensure_workspace("default/dev", chrono::Utc::now()).await.unwrap();
    let a = Lease::connect(&db.url, "inst", "a", Duration::from_secs(1)).await.unwrap();
    let epoch_a = a.try_acquire().await.unwrap().expect("a leads");
    let mut conn = fenced_connection(&db.url, &a.fence(epoch_a)).await;
    sqlx::raw_sql("BEGIN; SELECT 1").execute(&mut conn).await.unwrap();
    // Nobody takes over, but the lease runs out while the transaction is open.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let write = sqlx::raw_sql("UPDATE workspaces SET incarnation = incarnation + 1 WHERE key = 'default/dev'")
        .execute(&mut conn)
        .await
        .expect_err("a write after the lease expired passed the fence");
    assert!(write.to_string().contains("fenced"), "{write}");
}

/// Watches two logs at once until each holds its line; when each was first seen.
fn first_seen(a: (&Op, &str), b: (&Op, &str), deadline: Duration) -> (Instant, Instant) {
    let t0 = Instant::now();
    let (mut at_a, mut at_b) = (None, None);
    while at_a.is_none() || at_b.is_none() {
        assert!(t0.elapsed() < deadline, "not both seen: {:?}/{:?}\n{}\n---\n{}", at_a, at_b, a.0.logs(), b.0.logs());
        if at_a.is_none() && a.0.logs().contains(a.1) {
            at_a = Some(Instant::now());
        }
        if at_b.is_none() && b.0.logs().contains(b.1) {
            at_b = Some(Instant::now());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    (at_a.unwrap(), at_b.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_cut_off_by_a_black_hole_stops_acting_before_another_takes_over() {
    if !docker_available() {
        return;
    }
    let Some(db) = support::postgres::fresh_database().await else { return };
    let (proxy, via_proxy) = db.behind_proxy().await;
    let org = tempfile::tempdir().unwrap();
    std::fs::write(org.path().join("dev.yaml"), workspace_yaml("dev")).unwrap();
    let instance = format!("hb{}", std::process::id());
    let mut leader = replica("hablack", &via_proxy, org.path(), &instance);
    let mut follower = replica("hablackf", &db.url, org.path(), &instance);
    leader.start();
    tokio::task::block_in_place(|| leader.wait_online(&["dev"], Duration::from_secs(90)));
    follower.start();
    tokio::task::block_in_place(|| {
        follower.wait("follower serving", Duration::from_secs(30), |ws| ws.contains_key("dev"))
    });
    tokio::task::block_in_place(|| logged(&follower, "following"));
    // The leader's database connections stop answering; nothing is closed.
    proxy.black_hole(true);
    let (stopped, took_over) = tokio::task::block_in_place(|| {
        first_seen((&leader, "could not be renewed in time"), (&follower, "leading"), Duration::from_secs(60))
    });
    assert!(stopped < took_over, "the old leader was still acting when the new one took over");
    eprintln!("the old leader stopped {:?} before the takeover", took_over - stopped);
    // When its network answers again it learns it lost the lease, and exits.
    proxy.black_hole(false);
    assert!(tokio::task::block_in_place(|| leader.wait_exit(Duration::from_secs(60))), "{}", leader.logs());
    assert!(leader.logs().contains("lost the lease"), "{}", leader.logs());
    tokio::task::block_in_place(|| follower.wait_online(&["dev"], Duration::from_secs(60)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_instance_on_the_same_database_refuses_to_start_naming_the_first() {
    let Some(db) = support::postgres::fresh_database().await else { return };
    PostgresStore::connect(&db.url).await.unwrap();
    let ttl = Duration::from_secs(30);
    let first = Lease::connect(&db.url, "team-a", "a1", ttl).await.unwrap();
    first.try_acquire().await.unwrap().expect("the first instance leads");
    let second = Lease::connect(&db.url, "team-b", "b1", ttl).await.unwrap();
    let refused = second.try_acquire().await.expect_err("two instances would both lead");
    assert!(refused.to_string().contains("\"team-a\""), "{refused}");
    // Replicas of the first instance are not refused: they follow.
    let replica = Lease::connect(&db.url, "team-a", "a2", ttl).await.unwrap();
    assert_eq!(replica.try_acquire().await.unwrap(), None);
    // Once the first instance is gone (its lease released), another may use the database.
    first.release(1).await.unwrap();
    assert!(second.try_acquire().await.unwrap().is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_operator_exits_with_a_clear_error_when_another_instance_uses_its_database() {
    if !docker_available() {
        return;
    }
    let Some(db) = support::postgres::fresh_database().await else { return };
    PostgresStore::connect(&db.url).await.unwrap();
    let other = Lease::connect(&db.url, "someone-else", "p1", Duration::from_secs(60)).await.unwrap();
    other.try_acquire().await.unwrap().expect("leads");
    let org = tempfile::tempdir().unwrap();
    let mut op = replica("hatwo", &db.url, org.path(), &format!("ht{}", std::process::id()));
    op.start();
    assert!(tokio::task::block_in_place(|| op.wait_exit(Duration::from_secs(60))), "{}", op.logs());
    assert!(op.logs().contains("\"someone-else\""), "{}", op.logs());
}
