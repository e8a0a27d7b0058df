//! The Docker API failing under a running operator: a fault-injecting proxy between
//! it and the real daemon answers a share of requests with 500s, dropped
//! connections, 2-second delays and hangs. Meanwhile one workspace's container is
//! removed out of band and another's spec changes. The operator must retry with
//! backoff; never hold two containers for one workspace; never revoke a token or
//! remove a container of the untouched workspace because a call failed; and
//! converge once the proxy heals.

mod support;

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::time::Duration;

use serde_json::Value;
use support::operator::*;
use support::proxy::{FaultProxy, Faults};

const UP: Duration = Duration::from_secs(90);

fn field(ws: &BTreeMap<String, Value>, name: &str, path: &[&str]) -> Value {
    let mut v = &ws[name];
    for p in path {
        v = &v[*p];
    }
    v.clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn docker_faults_are_retried_never_revoke_or_duplicate_and_converge_once_healed() {
    if !docker_available() {
        return;
    }
    let sockdir = tempfile::tempdir().unwrap();
    let proxy = FaultProxy::start(sockdir.path().join("docker.sock"), 0x5eed);
    let mut op = Op::new("dockerfaults");
    op.env = vec![("DOCKER_HOST".into(), format!("unix://{}", proxy.path.display()))];
    for n in ["a", "b", "c"] {
        op.write_ws(n);
    }
    op.start();
    let ws = tokio::task::block_in_place(|| op.wait_online(&["a", "b", "c"], UP));
    let c_container = field(&ws, "c", &["container", "id"]);
    let c_uid = field(&ws, "c", &["uid"]).as_str().unwrap().to_string();
    let c_token = read_token(c_container.as_str().unwrap()).unwrap().0;
    let b_token = read_token(field(&ws, "b", &["container", "id"]).as_str().unwrap()).unwrap().0;
    let b_uid = field(&ws, "b", &["uid"]).as_str().unwrap().to_string();
    let (a_inc, b_inc) = (field(&ws, "a", &["incarnation"]), field(&ws, "b", &["incarnation"]));

    proxy.set(Faults { error_500: 0.25, reset: 0.15, slow: 0.15, delay: Duration::from_secs(2), hang: 0.03 });
    assert!(docker_ok(&["rm", "-f", field(&ws, "a", &["container", "id"]).as_str().unwrap()]));
    op.write("b.yaml", &workspace_yaml("b").replace("ROLE: b", "ROLE: changed"));

    // Under faults: at most one container per workspace, and c keeps its token.
    let t0 = std::time::Instant::now();
    while proxy.counts.faulted.load(Ordering::Relaxed) < 40 && t0.elapsed() < Duration::from_secs(60) {
        let counts = op.containers_per_workspace();
        assert!(counts.values().all(|n| *n <= 1), "two containers for one workspace under faults: {counts:?}");
        assert_eq!(
            registry(&op.url(), "/registry/heartbeat", &c_token, &c_uid),
            200,
            "the untouched workspace's token was revoked because a Docker call failed"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let faulted = proxy.counts.faulted.load(Ordering::Relaxed);
    assert!(faulted >= 10, "the proxy injected only {faulted} faults: the test did not test");
    assert!(op.logs().contains("injected fault") || op.logs().contains("reconcile failed"), "failures are logged");

    proxy.set(Faults::default());
    let ws = tokio::task::block_in_place(|| {
        op.wait("converged once Docker is healthy again", UP, |ws| {
            ["a", "b", "c"].iter().all(|n| ws.get(*n).is_some_and(online))
                && ws["a"]["incarnation"].as_i64() > a_inc.as_i64()
                && ws["b"]["incarnation"].as_i64() > b_inc.as_i64()
        })
    });
    assert_eq!(
        op.containers_per_workspace().values().copied().collect::<Vec<_>>(),
        vec![1, 1, 1],
        "one container each"
    );
    assert_eq!(field(&ws, "c", &["container", "id"]), c_container, "the untouched workspace kept its container");
    assert_eq!(registry(&op.url(), "/registry/heartbeat", &c_token, &c_uid), 200);
    assert_eq!(registry(&op.url(), "/registry/heartbeat", &b_token, &b_uid), 401, "b's replaced token is revoked");
}
