//! The lifecycle autopilot against the real Docker daemon (rules::suspend): idle and
//! lifetime suspensions with their causes, a busy agent left alone, wakes by the CLI
//! and the admin API, heals of a suspended workspace, and bad input. The built-in
//! agent reports `active_tasks` from `/configs/.active_tasks` (src/bin/molecule-agent.rs).

mod support;

use std::collections::BTreeMap;
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;
use support::operator::*;

const UP: Duration = Duration::from_secs(90);
const SETTLE: Duration = Duration::from_secs(60);

type Ws = BTreeMap<String, Value>;

fn manifest(name: &str, lifecycle: &str, extra: &str) -> String {
    format!(
        "apiVersion: molecule.ai/v1alpha1\nkind: Workspace\nmetadata: {{name: {name}}}\n\
         spec:\n  env: {{ROLE: {name}}}\n  lifecycle: {lifecycle}\n{extra}"
    )
}

/// An operator (heartbeat 1 s) running `name` with `lifecycle`, once it is online.
fn start(test: &str, name: &str, lifecycle: &str, extra: &str) -> (Op, Ws) {
    let mut op = Op::new(test);
    op.write(&format!("{name}.yaml"), &manifest(name, lifecycle, extra));
    op.start();
    let ws = op.wait_online(&[name], UP);
    (op, ws)
}

fn condition<'a>(w: &'a Value, kind: &str) -> &'a Value {
    w["conditions"].as_array().and_then(|cs| cs.iter().find(|c| c["type"] == kind)).unwrap_or(&Value::Null)
}

fn suspended_for(w: &Value, cause: &str) -> bool {
    w["phase"] == "Suspended"
        && condition(w, "Suspended")["status"] == "True"
        && condition(w, "Suspended")["reason"] == cause
}

fn cid(w: &Value) -> String {
    w["container"]["id"].as_str().unwrap_or_default().to_string()
}

fn docker_state(id: &str) -> String {
    docker(&["inspect", "-f", "{{.State.Status}}", id]).trim().to_string()
}

/// `POST /api/v1/workspaces/default/NAME/wake?QUERY` with the admin token: (status, body).
fn wake_api(op: &Op, name: &str, query: &str) -> (u16, String, String) {
    let token = std::fs::read_to_string(op.state.join("admin-token")).expect("admin token");
    let out = Command::new("curl")
        .args(["-s", "-D", "-", "-X", "POST", "-H", &format!("Authorization: Bearer {}", token.trim())])
        .arg(format!("{}/api/v1/workspaces/default/{name}/wake?{query}", op.url()))
        .output()
        .expect("curl runs");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let code = text.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    (code, head.to_lowercase(), body.to_string())
}

#[test]
fn an_idle_agent_is_suspended_and_the_cli_wakes_it_with_a_new_token() {
    if !docker_available() {
        return;
    }
    let (op, ws) = start("idle-cli", "dev", "{idleAfter: 3s}", "  tokenPolicy: {onPause: Revoke}\n");
    let before = ws["dev"].clone();
    let (old_token, _, _) = read_token(&cid(&before)).expect("token file");
    let ws = op.wait("dev suspended as Idle", SETTLE, |ws| ws.get("dev").is_some_and(|w| suspended_for(w, "Idle")));
    assert_eq!(docker_state(&cid(&before)), "paused", "Paused is the default suspendTo");
    assert_eq!(ws["dev"]["incarnation"], before["incarnation"], "frozen, not replaced");
    assert!(condition(&ws["dev"], "Suspended")["message"].as_str().unwrap().contains("wake workspace dev"));
    let table = String::from_utf8(op.cli(&["get", "workspaces"]).stdout).unwrap();
    assert!(table.contains("Suspended"), "{table}");
    assert_eq!(op.metric_sum("molecule_suspensions_total", &["Idle"]), 1);
    assert_eq!(op.metric_sum("molecule_workspaces", &["phase=\"Suspended\""]), 1);
    let describe = String::from_utf8(op.cli(&["describe", "workspace", "dev"]).stdout).unwrap();
    assert!(describe.contains("idle for"), "the decision log names the cause:\n{describe}");

    let out = op.cli(&["wake", "workspace", "dev", "--wait", "--timeout", "60"]);
    assert!(out.status.success(), "wake failed: {}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("online"), "{}", String::from_utf8_lossy(&out.stdout));
    let ws = op.wait_online(&["dev"], SETTLE);
    assert_eq!(docker_state(&cid(&ws["dev"])), "running");
    assert_eq!(condition(&ws["dev"], "Suspended")["status"], "False");
    let (new_token, _, _) = read_token(&cid(&ws["dev"])).expect("token file");
    assert_ne!(new_token, old_token, "onPause: Revoke means a new token on wake");
    let u = ws["dev"]["uid"].as_str().unwrap();
    assert_eq!(registry(&op.url(), "/registry/heartbeat", &old_token, u), 401);
    assert_eq!(op.metric_sum("molecule_wake_seconds_count", &[]), 1);
}

#[test]
fn a_busy_agent_is_never_suspended_and_is_once_it_is_done() {
    if !docker_available() {
        return;
    }
    let (op, ws) = start("busy", "dev", "{idleAfter: 3s}", "");
    let id = cid(&ws["dev"]);
    put_file(&id, ".active_tasks", "2");
    let seen = op.wait("dev reports 2 active tasks", SETTLE, |ws| ws["dev"]["agent"]["activeTasks"] == 2);
    assert_eq!(seen["dev"]["phase"], "Running");
    // Three times idleAfter with the agent busy: never suspended.
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(9) {
        let ws = op.get().expect("get");
        assert_ne!(ws["dev"]["phase"], "Suspended", "a busy agent was suspended");
        std::thread::sleep(Duration::from_millis(250));
    }
    assert_eq!(docker_state(&id), "running");
    put_file(&id, ".active_tasks", "0");
    op.wait("dev suspended as Idle once done", SETTLE, |ws| suspended_for(&ws["dev"], "Idle"));
}

#[test]
fn max_lifetime_suspends_to_stopped_and_the_api_wakes_it_when_online() {
    if !docker_available() {
        return;
    }
    let (op, ws) = start("lifetime", "dev", "{maxLifetime: 6s, suspendTo: Stopped}", "");
    let inc = ws["dev"]["incarnation"].as_i64().unwrap();
    // Busy agents are never suspended, so this one reports nothing: idle, but no idleAfter.
    let ws = op.wait("dev suspended for its lifetime", SETTLE, |ws| suspended_for(&ws["dev"], "MaxLifetime"));
    assert!(ws["dev"]["container"].is_null(), "Stopped: no container");
    assert!(op.containers().is_empty(), "Stopped: no container left: {:?}", op.containers());
    assert_eq!(op.volumes().len(), 1, "the config volume stays");

    let (code, head, body) = wake_api(&op, "dev", "");
    assert_eq!(code, 202, "{head}{body}");
    assert!(head.contains("retry-after: 1"), "{head}");
    let (code, _, body) = wake_api(&op, "dev", "wait=true&timeout=60");
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("online"), "{body}");
    let ws = op.wait_online(&["dev"], SETTLE);
    assert!(ws["dev"]["incarnation"].as_i64().unwrap() > inc, "Stopped: a new incarnation on wake");
    // A new lifetime: suspended again after another maxLifetime.
    op.wait("dev suspended again", SETTLE, |ws| suspended_for(&ws["dev"], "MaxLifetime"));
}

#[test]
fn a_suspended_workspace_whose_container_is_removed_comes_back_suspended() {
    if !docker_available() {
        return;
    }
    let mut op = Op::new("heal-suspended");
    op.write("team.yaml", "apiVersion: molecule.ai/v1alpha1\nkind: Team\nmetadata: {name: eng}\nspec: {}\n");
    op.write("dev.yaml", &manifest("dev", "{idleAfter: 2s}", "  team: eng\n"));
    op.start();
    let ws = op.wait_online(&["dev"], UP);
    let old = cid(&ws["dev"]);
    op.wait("dev suspended", SETTLE, |ws| suspended_for(&ws["dev"], "Idle"));
    // `get teams` counts it, as settled.
    let teams: Vec<Value> = serde_json::from_slice(&op.cli(&["get", "teams", "-o", "json"]).stdout).unwrap();
    let eng = teams.iter().find(|t| t["name"] == "eng").expect("team eng");
    assert_eq!(eng["phases"]["Suspended"], 1, "{eng}");
    let ready = eng["conditions"].as_array().unwrap().iter().find(|c| c["type"] == "Ready").unwrap();
    assert_eq!(ready["status"], "True", "a suspended member is settled: {ready}");
    let table = String::from_utf8(op.cli(&["get", "teams"]).stdout).unwrap();
    let mut lines = table.lines();
    let head: Vec<&str> = lines.next().unwrap().split_whitespace().collect();
    let row: Vec<&str> = lines.next().unwrap().split_whitespace().collect();
    let col = head.iter().position(|h| *h == "SUSPENDED").unwrap_or_else(|| panic!("no SUSPENDED column:\n{table}"));
    assert_eq!(row[col], "1", "{table}");
    remove_out_of_band(&[&old]);
    let ws = op.wait("dev back, suspended, in a new container", SETTLE, |ws| {
        let w = &ws["dev"];
        suspended_for(w, "Idle") && !cid(w).is_empty() && cid(w) != old
    });
    assert_eq!(docker_state(&cid(&ws["dev"])), "paused", "it came back frozen, not running");
}

/// Paused by the file for longer than the heartbeat TTL, then Running again: the same
/// container thaws (no new incarnation, no restart for the silence while frozen), with
/// the new token `onPause: Revoke` asks for written before the thaw.
#[test]
fn a_long_pause_by_the_file_ends_in_a_thaw_not_a_restart() {
    if !docker_available() {
        return;
    }
    let file =
        |mode: &str| format!("{}  operatingMode: {mode}\n  tokenPolicy: {{onPause: Revoke}}\n", workspace_yaml("dev"));
    let mut op = Op::new("long-pause");
    op.write("dev.yaml", &file("Running"));
    op.start();
    let ws = op.wait_online(&["dev"], UP);
    let (id, inc) = (cid(&ws["dev"]), ws["dev"]["incarnation"].clone());
    let (old_token, _, _) = read_token(&id).expect("token file");

    op.write("dev.yaml", &file("Paused"));
    op.wait("dev paused", SETTLE, |ws| ws["dev"]["phase"] == "Paused");
    assert_eq!(docker_state(&id), "paused");
    // Longer than the TTL (10 s at least) since the agent was last heard.
    let heard = |w: &Value| w["lastHeartbeatAt"].as_str().and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok());
    let last = heard(&op.get().unwrap()["dev"]).expect("heard before the pause");
    wait_until("the pause to outlast the heartbeat TTL", SETTLE, || {
        chrono::Utc::now().signed_duration_since(last) > chrono::Duration::seconds(12)
    });

    let resumed = chrono::Utc::now();
    op.write("dev.yaml", &file("Running"));
    let ws = op.wait("dev online again, heard after the pause", SETTLE, |ws| {
        online(&ws["dev"]) && heard(&ws["dev"]).is_some_and(|h| h > last)
    });
    assert_eq!(cid(&ws["dev"]), id, "the same container thawed");
    assert_eq!(ws["dev"]["incarnation"], inc, "no new incarnation");
    assert_eq!(docker_state(&id), "running");
    let (token, _, _) = read_token(&id).expect("token file");
    assert_ne!(token, old_token, "onPause: Revoke: a new token");
    let uid = ws["dev"]["uid"].as_str().unwrap();
    assert_eq!(registry(&op.url(), "/registry/heartbeat", &token, uid), 200);
    assert!(read_file_in(&id, "/configs/.thawed").is_some(), "the thaw was announced in /configs/.thawed");
    let describe = String::from_utf8(op.cli(&["describe", "workspace", "dev"]).stdout).unwrap();
    assert!(!describe.contains("agent silent"), "restarted for its silence while frozen:\n{describe}");
    assert!(!describe.contains("token-file"), "the token was written before the thaw, not after:\n{describe}");
    // Whether the agent or the next look comes first after the thaw is a race: what
    // makes it safe is that the thaw is recorded as a wake, from which silence counts.
    let out = Command::new("sqlite3")
        .arg(op.state.join("state.db"))
        .arg("SELECT woken_at FROM workspaces WHERE key = 'default/dev'")
        .output()
        .expect("sqlite3 runs");
    let woken = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let woken = chrono::DateTime::parse_from_rfc3339(&woken.replace(' ', "T"))
        .unwrap_or_else(|e| panic!("woken_at {woken:?}: {e}"));
    assert!(woken >= resumed, "the thaw is recorded as a wake: {woken} before the resume at {resumed}");
}

#[test]
fn bad_lifecycle_input_is_invalid_spec_naming_the_field_and_nothing_else_is_affected() {
    if !docker_available() {
        return;
    }
    let mut op = Op::new("lifecycle-bad");
    op.write("good.yaml", &manifest("good", "{idleAfter: 1h}", ""));
    op.write("zero.yaml", &manifest("zero", "{idleAfter: 0s}", ""));
    op.write("negative.yaml", &manifest("negative", "{maxLifetime: -5m}", ""));
    op.write("short.yaml", &manifest("short", "{idleAfter: 1s}", ""));
    op.start();
    let ws = op.wait("good online and the others failed", UP, |ws| {
        ws.get("good").is_some_and(online)
            && ["zero", "negative", "short"].iter().all(|n| ws.get(*n).is_some_and(|w| w["phase"] == "Failed"))
    });
    for (name, field) in
        [("zero", "lifecycle.idleAfter"), ("negative", "lifecycle.maxLifetime"), ("short", "lifecycle.idleAfter")]
    {
        let c = condition(&ws[name], "InvalidSpec");
        assert_eq!(c["status"], "True", "{name}: {c}");
        assert!(c["message"].as_str().unwrap().contains(field), "{name}: {c}");
        assert!(ws[name]["container"].is_null(), "{name} got a container");
    }
    assert!(
        condition(&ws["short"], "InvalidSpec")["message"].as_str().unwrap().contains("twice the heartbeat interval")
    );
}

#[test]
fn pods_suspend_as_stopped_and_the_wake_annotation_wakes_them() {
    if !docker_available() {
        return;
    }
    let mut op = Op::new("lifecycle-pods");
    op.extra = vec!["--kube-api".into(), format!("127.0.0.1:{}", free_port()), "--runtime".into(), "kubernetes".into()];
    op.start();
    let k = Kubectl::new(&op);
    wait_until("the local node registered", UP, || {
        k.kubeconfig.exists() && k.run(&["get", "node", "local"]).status.success()
    });
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), manifest("dev", "{idleAfter: 2s}", "")).unwrap();
    k.ok(&["apply", "-f", file.path().to_str().unwrap()]);
    let ws = op.wait_online(&["dev"], UP);
    let (inc, pod) =
        (ws["dev"]["incarnation"].as_i64().unwrap(), ws["dev"]["container"]["name"].as_str().unwrap().to_string());
    let ws = op.wait("dev suspended in Pod mode", SETTLE, |ws| suspended_for(&ws["dev"], "Idle"));
    let message = condition(&ws["dev"], "Suspended")["message"].as_str().unwrap().to_string();
    assert!(message.contains("acts as Stopped"), "describe says a Paused suspension stops here: {message}");
    assert!(!k.run(&["get", "pod", &pod]).status.success(), "no freezer: the Pod is gone");
    assert!(k.run(&["get", "pvc", &format!("{pod}-configs")]).status.success(), "its claim stays");
    let table = k.ok(&["get", "ws", "dev"]);
    assert!(table.contains("Suspended"), "kubectl get ws shows it:\n{table}");

    let now = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    k.ok(&["annotate", "ws", "dev", &format!("molecule.ai/wake={now}"), "--overwrite"]);
    op.wait("dev woken by the annotation", SETTLE, |ws| {
        online(&ws["dev"]) && ws["dev"]["incarnation"].as_i64() > Some(inc)
    });
}
