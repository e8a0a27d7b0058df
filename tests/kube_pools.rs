//! Warm pools in Pod mode (`--runtime kubernetes`), end to end with the real kubectl
//! against the embedded API and the local node: a WarmPool of size 2 keeps 2 member
//! Pods running, each with its own claim and an empty token Secret; a Workspace naming
//! it claims one (its Pod is the member's Pod, same uid, relabelled and owned by the
//! Workspace; a new token and its identity arrive through the Secret); the pool refills;
//! a spec the template cannot satisfy (a tier, config files a Pod would mount) is
//! provisioned as usual, saying why; deleting the
//! claimed Pod heals it like any workspace's; an agent restarted in place after a
//! rotation finds its identity again; the WarmPool's status shows the counts.
//! The operator's guard removes the node's containers, volumes and network.

mod support;

use std::collections::BTreeSet;
use std::time::Duration;

use base64::Engine;
use serde_json::Value;
use support::operator::*;

const UP: Duration = Duration::from_secs(120);
const HEAL: Duration = Duration::from_secs(60);

const POOL: &str = "\
apiVersion: molecule.ai/v1alpha1
kind: WarmPool
metadata: {name: agents, namespace: default}
spec:
  size: 2
  template:
    tier: 1
    env: {MODEL: small}
";

fn start(test: &str) -> (Op, Kubectl) {
    start_local_node(test, &[], &[])
}

fn apply(k: &Kubectl, yaml: &str) {
    kubectl_apply(k, yaml);
}

fn workspace(name: &str, spec: &str) -> String {
    format!(
        "apiVersion: molecule.ai/v1alpha1\nkind: Workspace\nmetadata: {{name: {name}, namespace: default}}\nspec: {spec}\n"
    )
}

/// The Pods `selector` selects: (uid, name, labels) of those whose agent runs.
fn running_pods(k: &Kubectl, selector: &str) -> Vec<(String, String, Value)> {
    let Some(list) = k.get_json(&["pods", "-l", selector]) else { return Vec::new() };
    list["items"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|p| {
            p["metadata"]["deletionTimestamp"].is_null()
                && p["status"]["containerStatuses"][0]["state"]["running"].is_object()
        })
        .map(|p| {
            let m = &p["metadata"];
            (m["uid"].as_str().unwrap().to_string(), m["name"].as_str().unwrap().to_string(), m["labels"].clone())
        })
        .collect()
}

/// Unclaimed members of default/agents whose agent runs.
fn ready_members(k: &Kubectl) -> Vec<(String, String, Value)> {
    running_pods(k, "ai.molecule.pool=agents,!ai.molecule.workspace")
}

/// A key of the Secret `name`, decoded; None when the Secret or the key is missing.
fn secret_key(k: &Kubectl, name: &str, key: &str) -> Option<String> {
    let s = k.get_json(&["secret", name])?;
    let b64 = s["data"][key].as_str()?;
    String::from_utf8(base64::engine::general_purpose::STANDARD.decode(b64).ok()?).ok()
}

fn describe(op: &Op, name: &str) -> String {
    String::from_utf8(op.cli(&["describe", "workspace", name]).stdout).unwrap()
}

/// The WarmPool's status as kubectl shows it, once it has these counts.
fn pool_status_is(k: &Kubectl, ready: u64, claimed: u64) -> Option<Value> {
    let pool = k.get_json(&["warmpool", "agents"])?;
    let st = &pool["status"];
    (st["ready"] == ready && st["claimed"] == claimed && st["size"] == 2).then(|| pool.clone())
}

#[test]
fn a_pool_of_pods_serves_a_claim_in_place_refills_and_heals_like_any_workspace() {
    if !docker_available() {
        return;
    }
    let (op, k) = start("podpools");
    apply(&k, POOL);
    wait_until("2 member Pods running", UP, || ready_members(&k).len() == 2);
    let members = ready_members(&k);
    for (_, name, labels) in &members {
        assert!(labels.get("ai.molecule.workspace").is_none(), "{labels}");
        assert_eq!(secret_key(&k, &format!("{name}-token"), "token"), None, "a member holds no token");
        assert!(k.get_json(&["pvc", &format!("{name}-configs")]).is_some(), "each member has its own claim");
        let pod = k.get_json(&["pod", name]).unwrap();
        assert!(pod["metadata"]["ownerReferences"].is_null(), "no Workspace owns a member");
    }
    // The WarmPool's status subresource, and the same counts from `get warmpools`.
    let mut pool = None;
    wait_until("the WarmPool's status to show 2 ready", UP, || {
        pool = pool_status_is(&k, 2, 0);
        pool.is_some()
    });
    let pool = pool.unwrap();
    assert_eq!(pool["status"]["observedGeneration"], pool["metadata"]["generation"]);
    let ready = pool["status"]["conditions"].as_array().unwrap().iter().find(|c| c["type"] == "Ready").cloned();
    assert_eq!(ready.as_ref().map(|c| c["status"].clone()), Some(Value::from("True")), "{pool}");
    let table = String::from_utf8(op.cli(&["get", "warmpools"]).stdout).unwrap();
    assert!(
        table.lines().any(|l| l.split_whitespace().collect::<Vec<_>>() == ["agents", "2", "2", "0", "0"]),
        "{table}"
    );
    let kubectl_table = k.ok(&["get", "warmpool", "agents"]);
    assert!(kubectl_table.contains("STARTING"), "{kubectl_table}");

    // A claim: the workspace's Pod is a member's Pod, relabelled, with a new token.
    let member_uids: BTreeSet<String> = members.iter().map(|(uid, _, _)| uid.clone()).collect();
    let a_spec =
        "{tier: 1, warmPool: agents, tokenPolicy: {rotateEvery: 5s, overlap: 60s}, env: {MODEL: small, ROLE: a}}";
    apply(&k, &workspace("a", a_spec));
    let all = op.wait_online(&["a"], UP);
    let a = &all["a"];
    let pod_uid = a["container"]["id"].as_str().unwrap().to_string();
    let pod_name = a["container"]["name"].as_str().unwrap().to_string();
    assert!(member_uids.contains(&pod_uid), "a runs in a former member's Pod: {pod_uid} not in {member_uids:?}");
    assert_eq!(a["incarnation"].as_i64(), Some(1));
    let uid = a["uid"].as_str().unwrap().to_string();
    let token = secret_key(&k, &format!("{pod_name}-token"), "token").expect("the claim wrote a token");
    assert_eq!(a["token"]["prefix"].as_str().unwrap(), &token[..8]);
    assert_eq!(registry(&op.url(), "/registry/heartbeat", &token, &uid), 200);
    let identity = secret_key(&k, &format!("{pod_name}-token"), "identity").expect("the identity");
    assert!(identity.contains(&format!("workspace_id={uid}")) && identity.contains("env.ROLE=a"), "{identity}");
    assert!(!identity.contains("MODEL"), "what the template sets is not in the overlay: {identity}");
    let pod = k.get_json(&["pod", &pod_name]).unwrap();
    assert_eq!(pod["metadata"]["labels"]["ai.molecule.workspace"], "a");
    assert_eq!(pod["metadata"]["labels"]["ai.molecule.pool"], "agents", "where it came from stays");
    assert_eq!(pod["metadata"]["ownerReferences"][0]["kind"], "Workspace");
    assert_eq!(pod["metadata"]["ownerReferences"][0]["name"], "a");
    let pvc = k.get_json(&["pvc", &format!("{pod_name}-configs")]).unwrap();
    assert_eq!(pvc["metadata"]["labels"]["ai.molecule.workspace"], "a");
    assert_eq!(pvc["metadata"]["ownerReferences"][0]["kind"], "Workspace");
    let log = describe(&op, "a");
    assert!(log.contains("claim") && log.contains("warm pool default/agents"), "{log}");
    assert!(!log.contains("provision a new incarnation"), "no Pod was created for a:\n{log}");
    assert!(!op.logs().contains(&token), "the operator log never holds a token");

    // A rotation writes the token alone: the identity stays in the Secret, so an agent
    // restarted in place (as a kubelet does) reads it again and registers.
    op.wait("a rotation", HEAL, |ws| ws["a"]["token"]["prefix"].as_str().is_some_and(|p| p != &token[..8]));
    assert_eq!(secret_key(&k, &format!("{pod_name}-token"), "identity").as_deref(), Some(identity.as_str()));
    let agent = pod_agent_container(&pod_uid).expect("the agent's container");
    docker(&["kill", &agent]);
    wait_until("the agent restarted in place and registered as a", HEAL, || {
        pod_agent_container(&pod_uid).filter(|c| *c != agent).is_some_and(|c| {
            let out = std::process::Command::new("docker").args(["logs", &c]).output().unwrap();
            let logs = String::from_utf8_lossy(&out.stderr).to_string() + &String::from_utf8_lossy(&out.stdout);
            logs.contains("claimed as default/a") && logs.contains("registered")
        })
    });
    let ws = op.wait("a online after the restart", HEAL, |ws| online(&ws["a"]));
    assert_eq!(ws["a"]["container"]["id"].as_str(), Some(pod_uid.as_str()), "the same Pod");
    assert_eq!(ws["a"]["incarnation"].as_i64(), Some(1));

    // The pool refills with fresh Pods; the status says so.
    wait_until("the pool to refill", UP, || pool_status_is(&k, 2, 1).is_some());
    let fresh: BTreeSet<String> = ready_members(&k).into_iter().map(|(uid, _, _)| uid).collect();
    assert_eq!(fresh.len(), 2);
    assert!(!fresh.contains(&pod_uid));

    // A spec the template cannot satisfy: a normal provision, and why.
    apply(&k, &workspace("b", "{tier: 2, warmPool: agents}"));
    let all = op.wait_online(&["b"], UP);
    let b_pod = k.get_json(&["pod", all["b"]["container"]["name"].as_str().unwrap()]).unwrap();
    assert!(b_pod["metadata"]["labels"].get("ai.molecule.pool").is_none(), "b has a Pod of its own");
    let log = describe(&op, "b");
    assert!(log.contains("warm pool default/agents cannot serve it: tier differs"), "{log}");

    // Config files other than the template's: a Pod mounts its files when it is
    // created, so this one is provisioned as usual too.
    apply(&k, &workspace("c", "{tier: 1, warmPool: agents, env: {MODEL: small}, configFiles: {prompt.md: hi}}"));
    op.wait_online(&["c"], UP);
    let log = describe(&op, "c");
    assert!(log.contains("warm pool default/agents cannot serve it: config files differ"), "{log}");
    assert_eq!(ready_members(&k).len(), 2, "no member was taken");

    // The claimed Pod deleted: healed like any workspace's, a new Pod and token.
    k.ok(&["delete", "pod", &pod_name, "--wait=false"]);
    let all = op.wait("a online in a new Pod", HEAL, |ws| {
        ws.get("a").is_some_and(|w| online(w) && w["incarnation"].as_i64() > Some(1))
    });
    let a = &all["a"];
    assert_ne!(a["container"]["id"].as_str(), Some(pod_uid.as_str()));
    assert_eq!(a["uid"].as_str(), Some(uid.as_str()), "the workspace keeps the member's uid");
    let token2 = secret_key(&k, &format!("{pod_name}-token"), "token").expect("a new token");
    assert_ne!(token2, token);
    assert_eq!(registry(&op.url(), "/registry/heartbeat", &token, &uid), 401, "the claim's token is refused");
    assert_eq!(registry(&op.url(), "/registry/heartbeat", &token2, &uid), 200);
    let pod = k.get_json(&["pod", &pod_name]).unwrap();
    assert!(pod["metadata"]["labels"].get("ai.molecule.pool").is_none(), "not a member any more");
    wait_until("the pool at size, nothing claimed now", UP, || pool_status_is(&k, 2, 0).is_some());

    // Deleting the Workspace removes its Pod, claim and Secret; the pool stays.
    k.ok(&["delete", "ws", "a"]);
    for (what, name) in
        [("pod", pod_name.clone()), ("pvc", format!("{pod_name}-configs")), ("secret", format!("{pod_name}-token"))]
    {
        wait_until(&format!("{what} {name} removed"), HEAL, || k.get_json(&[what, &name]).is_none());
    }
    assert_eq!(ready_members(&k).len(), 2);
}
