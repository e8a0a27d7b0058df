//! Warm pools end to end, against the real Docker daemon (issue 19): a pool fills to
//! its size; a workspace naming it comes online in a former member, with a fresh
//! token and its identity in `/configs`, and no container is created for it; the pool
//! refills; a spec the template cannot satisfy is provisioned as usual with the reason
//! in the decision log; a missing pool is InvalidSpec; removing a claimed workspace
//! removes its container while the pool stays at size.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use serde_json::Value;
use support::operator::*;

const UP: Duration = Duration::from_secs(90);

const POOL: &str = "\
apiVersion: molecule.ai/v1alpha1
kind: WarmPool
metadata:
  name: agents
spec:
  size: 2
  template:
    runtime: langgraph
    tier: 1
    env:
      MODEL: small
";

fn ws(name: &str, spec: &str) -> String {
    format!("apiVersion: molecule.ai/v1alpha1\nkind: Workspace\nmetadata:\n  name: {name}\nspec:\n{spec}")
}

/// `get warmpools -o json`, by name.
fn pools(op: &Op) -> BTreeMap<String, Value> {
    let out = op.cli(&["get", "warmpools", "-o", "json"]);
    let all: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap_or_default();
    all.into_iter().filter_map(|p| Some((p["name"].as_str()?.to_string(), p))).collect()
}

fn pool_is(op: &Op, ready: u64, claimed: u64) -> bool {
    pools(op).get("agents").is_some_and(|p| p["ready"] == ready && p["claimed"] == claimed)
}

/// The ids of containers labelled as members of default/agents (claimed or not).
fn member_ids(op: &Op) -> BTreeSet<String> {
    docker(&[
        "ps",
        "-aq",
        "--no-trunc",
        "--filter",
        &format!("label=ai.molecule.instance={}", op.instance),
        "--filter",
        "label=ai.molecule.pool=default/agents",
    ])
    .split_whitespace()
    .map(str::to_string)
    .collect()
}

fn describe(op: &Op, name: &str) -> String {
    String::from_utf8(op.cli(&["describe", "workspace", name]).stdout).unwrap()
}

#[test]
fn a_pool_fills_serves_claims_without_creating_containers_and_refills() {
    if !docker_available() {
        return;
    }
    let mut op = Op::new("pools");
    op.write("pool.yaml", POOL);
    op.start();
    wait_until("the pool to fill to 2", UP, || pool_is(&op, 2, 0));
    let members = member_ids(&op);
    assert_eq!(members.len(), 2, "{members:?}");
    for m in &members {
        assert_eq!(read_token(m), None, "a member holds no token before it is claimed");
    }
    let table = String::from_utf8(op.cli(&["get", "warmpools"]).stdout).unwrap();
    assert!(table.contains("SIZE") && table.contains("READY") && table.contains("CLAIMED"), "{table}");

    // A claim: online in a former member, with a fresh token and its identity.
    op.write(
        "a.yaml",
        &ws("a", "  runtime: langgraph\n  tier: 1\n  warmPool: agents\n  env: {MODEL: small, ROLE: a}\n"),
    );
    let all = op.wait_online(&["a"], UP);
    let a = &all["a"];
    let cid = a["container"]["id"].as_str().unwrap().to_string();
    assert!(members.contains(&cid), "a runs in a former member: {cid} not in {members:?}");
    let (token, mode, _) = read_token(&cid).expect("the claim wrote a token");
    assert_eq!(mode & 0o777, 0o600);
    assert_eq!(a["token"]["prefix"].as_str().unwrap(), &token[..8]);
    let uid = a["uid"].as_str().unwrap();
    assert_eq!(registry(&op.url(), "/registry/heartbeat", &token, uid), 200);
    let identity = read_file_in(&cid, "/configs/.identity").expect("identity file");
    assert!(identity.contains(&format!("workspace_id={uid}")) && identity.contains("env.ROLE=a"), "{identity}");
    assert!(!identity.contains("MODEL"), "what the template already sets is not in the overlay: {identity}");
    let log = describe(&op, "a");
    assert!(log.contains("claim") && log.contains("warm pool default/agents"), "{log}");
    assert!(!log.contains("provision a new incarnation"), "no container was created for a:\n{log}");
    assert!(!op.logs().contains(&token), "the operator log never holds a token");

    // The pool refills in the background with fresh members.
    wait_until("the pool to refill", UP, || pool_is(&op, 2, 1));
    let now = member_ids(&op);
    assert_eq!(now.len(), 3, "two ready and the claimed one: {now:?}");
    assert!(op.metric_sum("molecule_pool_members", &["pool=\"default/agents\"", "state=\"ready\""]) == 2);

    // A spec the template does not satisfy: a normal provision, and why.
    op.write("b.yaml", &ws("b", "  runtime: langgraph\n  tier: 2\n  warmPool: agents\n"));
    let all = op.wait_online(&["b"], UP);
    let b_cid = all["b"]["container"]["id"].as_str().unwrap().to_string();
    assert!(!member_ids(&op).contains(&b_cid), "b has a container of its own");
    let log = describe(&op, "b");
    assert!(log.contains("warm pool default/agents cannot serve it: tier differs"), "{log}");

    // A missing pool is InvalidSpec naming the field, and nothing else changes.
    op.write("c.yaml", &ws("c", "  runtime: langgraph\n  tier: 1\n  warmPool: nope\n"));
    let all = op.wait("c to be InvalidSpec", UP, |ws| {
        ws.get("c").is_some_and(|c| {
            c["conditions"].as_array().is_some_and(|cs| {
                cs.iter().any(|x| {
                    x["type"] == "InvalidSpec"
                        && x["status"] == "True"
                        && x["message"].as_str().is_some_and(|m| m.contains("spec.warmPool: no WarmPool nope"))
                })
            })
        })
    });
    assert!(all["c"]["container"].is_null(), "nothing is created for an invalid spec");
    assert_eq!(all["a"]["container"]["id"].as_str(), Some(cid.as_str()), "a is untouched");
    assert!(pool_is(&op, 2, 1));

    // Removing a claimed workspace removes its container; the pool stays at size.
    op.remove_file("a.yaml");
    wait_until("a and its container to go", UP, || {
        op.get().is_some_and(|ws| !ws.contains_key("a")) && !docker_ok(&["inspect", &cid])
    });
    wait_until("the pool at size with nothing claimed", UP, || pool_is(&op, 2, 0));
    assert!(!member_ids(&op).contains(&cid));
}
