//! Workspaces as Pods (`--runtime kubernetes`), end to end: Workspaces applied with the
//! real kubectl to the embedded API become a Pod, a claim and a token Secret, which the
//! local node runs as Docker containers; the agent comes online through its mounted
//! Secret; every way the three come apart heals with its decision; pausing keeps the
//! claim; deleting the Workspace removes all three; a restarted operator adopts them.
//! Each test runs its own operator (instance, state dir, ports); its guard removes the
//! node's containers, volumes and network, also when the test fails.

mod support;

use std::collections::BTreeMap;
use std::time::Duration;

use base64::Engine;
use serde_json::Value;
use support::operator::*;

const UP: Duration = Duration::from_secs(120);
const HEAL: Duration = Duration::from_secs(60);

fn start(test: &str, extra: &[&str]) -> (Op, Kubectl) {
    start_local_node(test, extra, &[])
}

fn apply(k: &Kubectl, yaml: &str) {
    kubectl_apply(k, yaml);
}

fn workspace(name: &str, extra_spec: &str) -> String {
    format!(
        "apiVersion: molecule.ai/v1alpha1\nkind: Workspace\nmetadata: {{name: {name}, namespace: default}}\n\
         spec: {{env: {{ROLE: {name}}}{extra_spec}}}\n"
    )
}

/// The token in the workspace's Secret (what its agent reads).
fn secret_token(k: &Kubectl, pod: &str) -> Option<String> {
    let s = k.get_json(&["secret", &format!("{pod}-token")])?;
    let b64 = s["data"]["token"].as_str()?;
    String::from_utf8(base64::engine::general_purpose::STANDARD.decode(b64).ok()?).ok()
}

fn decisions(op: &Op, name: &str) -> String {
    let describe = String::from_utf8(op.cli(&["describe", "workspace", name]).stdout).unwrap();
    describe.split("Decisions").nth(1).unwrap_or_default().to_string()
}

/// Waits for `name` online on an incarnation past `after`; its state and token.
fn online_past(op: &Op, k: &Kubectl, name: &str, after: i64) -> (BTreeMap<String, Value>, String) {
    let ws = op.wait(&format!("{name} online past incarnation {after}"), HEAL, |ws| {
        ws.get(name).is_some_and(|w| online(w) && w["incarnation"].as_i64() > Some(after))
    });
    let pod = ws[name]["container"]["name"].as_str().unwrap().to_string();
    let token = secret_token(k, &pod).expect("the token Secret");
    (ws, token)
}

#[test]
fn a_workspace_becomes_a_pod_claim_and_secret_and_every_break_heals() {
    if !docker_available() {
        return;
    }
    let (op, k) = start("podsheal", &["--heartbeat-misses", "600"]);
    apply(&k, &workspace("dev", ", tier: 1"));
    let (ws, token) = online_past(&op, &k, "dev", 0);
    let w = &ws["dev"];
    let pod_name = w["container"]["name"].as_str().unwrap().to_string();
    let uid = w["uid"].as_str().unwrap().to_string();
    assert_eq!(&token[..8], w["token"]["prefix"].as_str().unwrap());
    assert_eq!(registry(&op.url(), "/registry/heartbeat", &token, &uid), 200);

    // The Pod: owned by its Workspace, locked down, its id the container's id.
    let pod = k.get_json(&["pod", &pod_name]).expect("the Pod");
    assert_eq!(pod["metadata"]["uid"], w["container"]["id"], "container.id is the Pod's uid");
    assert_eq!(pod["metadata"]["ownerReferences"][0]["kind"], "Workspace");
    let sc = &pod["spec"]["containers"][0]["securityContext"];
    assert_eq!((sc["runAsNonRoot"].as_bool(), sc["readOnlyRootFilesystem"].as_bool()), (Some(true), Some(true)));
    assert_eq!(sc["capabilities"]["drop"][0], "ALL");
    assert_eq!(pod["spec"]["automountServiceAccountToken"], false);
    assert_eq!(pod["spec"]["containers"][0]["resources"]["limits"]["memory"], "256Mi", "tier 1");
    assert_eq!(w["pod"]["node"], "local", "get -o json shows the Pod's node");
    assert!(k.get_json(&["pvc", &format!("{pod_name}-configs")]).is_some(), "the config volume claim");

    // Pod deleted: a new incarnation with a new token; the old one is refused.
    k.ok(&["delete", "pod", &pod_name, "--wait=false"]);
    let (ws, token2) = online_past(&op, &k, "dev", 1);
    assert_ne!(token2, token);
    assert_eq!(registry(&op.url(), "/registry/heartbeat", &token, &uid), 401, "the old token is refused");
    assert_eq!(registry(&op.url(), "/registry/heartbeat", &token2, &uid), 200);
    assert!(decisions(&op, "dev").contains("the Pod is being deleted"), "{}", decisions(&op, "dev"));

    // Token Secret deleted: reissued into the same Pod, no new incarnation.
    let incarnation = ws["dev"]["incarnation"].as_i64().unwrap();
    let pod_uid = ws["dev"]["container"]["id"].clone();
    k.ok(&["delete", "secret", &format!("{pod_name}-token")]);
    let ws = op.wait("a new token in the same Pod", HEAL, |ws| {
        online(&ws["dev"]) && ws["dev"]["token"]["prefix"].as_str() != Some(&token2[..8])
    });
    assert_eq!(ws["dev"]["incarnation"].as_i64(), Some(incarnation), "the Pod stays");
    assert_eq!(ws["dev"]["container"]["id"], pod_uid);
    assert_eq!(registry(&op.url(), "/registry/heartbeat", &token2, &uid), 401);
    assert!(decisions(&op, "dev").contains("token-file"));

    // Token Secret edited by hand: the same.
    let edited = r#"{"data":{"token":"Z2FyYmFnZQ=="}}"#;
    let before = ws["dev"]["token"]["prefix"].as_str().unwrap().to_string();
    k.ok(&["patch", "secret", &format!("{pod_name}-token"), "--type", "merge", "-p", edited]);
    op.wait("the edited Secret rewritten", HEAL, |ws| {
        online(&ws["dev"]) && ws["dev"]["token"]["prefix"].as_str() != Some(before.as_str())
    });

    // Claim deleted (held by its Pod until the Pod goes): a new claim and incarnation.
    let claim_uid = k.get_json(&["pvc", &format!("{pod_name}-configs")]).unwrap()["metadata"]["uid"].clone();
    k.ok(&["delete", "pvc", &format!("{pod_name}-configs"), "--wait=false"]);
    let _ = online_past(&op, &k, "dev", incarnation);
    let claim = k.get_json(&["pvc", &format!("{pod_name}-configs")]).expect("the claim is made anew");
    assert_ne!(claim["metadata"]["uid"], claim_uid);
    assert!(
        decisions(&op, "dev").contains("is being deleted"),
        "the cause names the claim:\n{}",
        decisions(&op, "dev")
    );
}

#[test]
fn pause_keeps_the_claim_delete_removes_everything_and_a_restart_adopts() {
    if !docker_available() {
        return;
    }
    let (mut op, k) = start("podsmodes", &[]);
    apply(&k, &workspace("dev", ""));
    let (ws, _) = online_past(&op, &k, "dev", 0);
    let pod_name = ws["dev"]["container"]["name"].as_str().unwrap().to_string();

    // An operator restart adopts the Pod: nothing is re-provisioned.
    let pod_uid = ws["dev"]["container"]["id"].clone();
    op.stop();
    op.start();
    let ws = op.wait("dev online after the restart", UP, |ws| ws.get("dev").is_some_and(online));
    assert_eq!(ws["dev"]["container"]["id"], pod_uid, "the same Pod");
    assert_eq!(ws["dev"]["incarnation"].as_i64(), Some(1));

    // Paused: no freezer in Kubernetes; the Pod goes, the claim stays.
    k.ok(&["patch", "ws", "dev", "--type", "merge", "-p", r#"{"spec":{"operatingMode":"Paused"}}"#]);
    op.wait("dev paused", HEAL, |ws| ws["dev"]["phase"] == "Paused");
    wait_until("the Pod gone", HEAL, || k.get_json(&["pod", &pod_name]).is_none());
    assert!(k.get_json(&["pvc", &format!("{pod_name}-configs")]).is_some(), "the claim is kept");
    assert!(decisions(&op, "dev").contains("no freezer"), "describe says why:\n{}", decisions(&op, "dev"));
    k.ok(&["patch", "ws", "dev", "--type", "merge", "-p", r#"{"spec":{"operatingMode":"Running"}}"#]);
    let _ = online_past(&op, &k, "dev", 1);

    // Deleted: Pod, claim and Secret go; the finalizer waits for them.
    k.ok(&["delete", "ws", "dev"]);
    for what in ["pod", "pvc", "secret"] {
        let name = match what {
            "pod" => pod_name.clone(),
            "pvc" => format!("{pod_name}-configs"),
            _ => format!("{pod_name}-token"),
        };
        wait_until(&format!("{what} {name} removed"), HEAL, || k.get_json(&[what, &name]).is_none());
    }
    assert!(op.get().is_some_and(|ws| !ws.contains_key("dev")));
}

#[test]
fn a_rotation_reaches_the_agent_through_its_secret_with_no_refusal() {
    if !docker_available() {
        return;
    }
    let (op, k) = start("podsrotate", &[]);
    apply(&k, &workspace("dev", ", tokenPolicy: {rotateEvery: 5s, overlap: 30s}"));
    let (ws, first) = online_past(&op, &k, "dev", 0);
    let uid = ws["dev"]["uid"].as_str().unwrap().to_string();
    let refused = |op: &Op| op.metric_sum("molecule_registry_requests_total", &["code=\"401\""]);
    let refusals = refused(&op);
    // Two rotations: the agent picks each token up from the updated Secret file.
    let seen = std::cell::RefCell::new(vec![first[..8].to_string()]);
    op.wait("two rotations", HEAL, |ws| {
        let prefix = ws["dev"]["token"]["prefix"].as_str().unwrap_or_default().to_string();
        let mut seen = seen.borrow_mut();
        if !seen.contains(&prefix) {
            seen.push(prefix);
        }
        seen.len() >= 3 && online(&ws["dev"])
    });
    let ws = op.get().unwrap();
    let latest = secret_token(&k, ws["dev"]["container"]["name"].as_str().unwrap()).unwrap();
    assert_eq!(registry(&op.url(), "/registry/heartbeat", &latest, &uid), 200);
    assert_eq!(ws["dev"]["incarnation"].as_i64(), Some(1), "a rotation restarts nothing");
    assert_eq!(refused(&op), refusals, "the agent was never refused across the rotations");
}

/// The agent's file at `path` under /configs of the Pod `pod_uid`, read from its
/// container on the local node.
fn config_file(pod_uid: &str, path: &str) -> Option<String> {
    read_file_in(&pod_agent_container(pod_uid)?, &format!("/configs/{path}"))
}

#[test]
fn config_files_are_in_configs_when_the_agent_starts_and_an_edit_is_a_new_pod() {
    if !docker_available() {
        return;
    }
    let (op, k) = start("podsfiles", &[]);
    let files =
        |prompt: &str| format!(", configFiles: {{system-prompt.md: '{prompt}', skills/build/SKILL.md: '# Build'}}");
    apply(&k, &workspace("dev", &files("You lead the team.")));
    let (ws, _) = online_past(&op, &k, "dev", 0);
    let pod_name = ws["dev"]["container"]["name"].as_str().unwrap().to_string();
    let pod_uid = ws["dev"]["container"]["id"].as_str().unwrap().to_string();
    assert_eq!(config_file(&pod_uid, "system-prompt.md").as_deref(), Some("You lead the team."));
    assert_eq!(config_file(&pod_uid, "skills/build/SKILL.md").as_deref(), Some("# Build"));
    let secret = k.get_json(&["secret", &format!("{pod_name}-files")]).expect("the files Secret");
    assert_eq!(secret["metadata"]["ownerReferences"][0]["kind"], "Workspace");

    // An edit is spec drift: a new Pod with the new text.
    apply(&k, &workspace("dev", &files("You review.")));
    let (ws, _) = online_past(&op, &k, "dev", 1);
    let pod_uid = ws["dev"]["container"]["id"].as_str().unwrap().to_string();
    assert_eq!(config_file(&pod_uid, "system-prompt.md").as_deref(), Some("You review."));

    // Deleting the Workspace removes the files Secret with the rest.
    k.ok(&["delete", "ws", "dev"]);
    wait_until("the files Secret removed", HEAL, || k.get_json(&["secret", &format!("{pod_name}-files")]).is_none());
}
