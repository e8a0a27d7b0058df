//! Local mode end to end, against the real Docker daemon: a YAML directory becomes
//! running agents; edits, deletions and out-of-band damage converge back.

mod support;

use std::time::Duration;

use serde_json::Value;
use support::operator::*;

const UP: Duration = Duration::from_secs(90);
const HEAL: Duration = Duration::from_secs(30);

fn uid(ws: &std::collections::BTreeMap<String, Value>, name: &str) -> String {
    ws[name]["uid"].as_str().unwrap().to_string()
}

fn cid(ws: &std::collections::BTreeMap<String, Value>, name: &str) -> String {
    ws[name]["container"]["id"].as_str().unwrap().to_string()
}

fn inc(ws: &std::collections::BTreeMap<String, Value>, name: &str) -> i64 {
    ws[name]["incarnation"].as_i64().unwrap()
}

/// Starts an operator with one workspace `name` and waits for it to be online.
fn one(test: &str, name: &str) -> (Op, std::collections::BTreeMap<String, Value>) {
    let mut op = Op::new(test);
    op.write_ws(name);
    op.start();
    let ws = op.wait_online(&[name], UP);
    (op, ws)
}

/// A new incarnation is online, its token differs from `old_token`, and the old
/// token is answered 401 while the new one is answered 200.
fn assert_healed(op: &Op, name: &str, old_inc: i64, old_token: &str) -> std::collections::BTreeMap<String, Value> {
    let ws = op.wait(&format!("{name} healed past incarnation {old_inc}"), HEAL, |ws| {
        ws.get(name).is_some_and(|w| {
            online(w) && w["incarnation"].as_i64() > Some(old_inc)
                || online(w) && w["token"]["prefix"].as_str() != Some(&old_token[..8])
        })
    });
    let (tok, _, _) = read_token(&cid(&ws, name)).expect("token file readable");
    assert_ne!(tok, old_token, "the token was not replaced");
    let u = uid(&ws, name);
    assert_eq!(registry(&op.url(), "/registry/heartbeat", old_token, &u), 401, "old token still accepted");
    assert_eq!(registry(&op.url(), "/registry/heartbeat", &tok, &u), 200, "new token refused");
    ws
}

fn token_of(ws: &std::collections::BTreeMap<String, Value>, name: &str) -> String {
    read_token(&cid(ws, name)).expect("token file").0
}

#[test]
fn single_workspace_contract() {
    if !docker_available() {
        return;
    }
    let (op, ws) = one("contract", "smoke");
    let w = &ws["smoke"];
    for k in ["name", "uid", "phase", "incarnation", "container", "token", "lastHeartbeatAt", "conditions"] {
        assert!(w.get(k).is_some(), "missing {k} in {w}");
    }
    let (tok, mode, owner) = read_token(&cid(&ws, "smoke")).unwrap();
    assert_eq!(mode & 0o777, 0o600);
    assert_eq!(owner, 65534, "token file must belong to the agent's non-root user");
    assert_eq!(tok.len(), 43);
    assert_eq!(w["token"]["prefix"].as_str().unwrap(), &tok[..8]);
    assert_eq!(registry(&op.url(), "/registry/heartbeat", &tok, &uid(&ws, "smoke")), 200);
    assert_eq!(registry(&op.url(), "/registry/heartbeat", "", &uid(&ws, "smoke")), 401);
    // The table and describe speak to people.
    let table = String::from_utf8(op.cli(&["get", "workspaces"]).stdout).unwrap();
    for col in ["NAME", "PHASE", "INCARNATION", "TOKEN", "LAST HEARTBEAT", "AGE"] {
        assert!(table.contains(col), "{table}");
    }
    assert!(table.contains("smoke") && table.contains("Running"), "{table}");
    let describe = String::from_utf8(op.cli(&["describe", "workspace", "smoke"]).stdout).unwrap();
    assert!(describe.contains("no container"), "describe shows the provision cause:\n{describe}");
    assert!(!describe.contains(&tok), "describe must never show the token");
    assert!(!op.logs().contains(&tok), "operator log must never contain the token");
}

#[test]
fn env_change_recreates_with_new_incarnation_and_token() {
    if !docker_available() {
        return;
    }
    let (op, ws) = one("envchange", "dev");
    let (old_inc, old_tok) = (inc(&ws, "dev"), token_of(&ws, "dev"));
    op.write("dev.yaml", &workspace_yaml("dev").replace("ROLE: dev", "ROLE: lead"));
    let ws = assert_healed(&op, "dev", old_inc, &old_tok);
    assert!(inc(&ws, "dev") > old_inc);
    let env = docker(&["inspect", "-f", "{{range .Config.Env}}{{println .}}{{end}}", &cid(&ws, "dev")]);
    assert!(env.lines().any(|l| l == "ROLE=lead"), "{env}");
    assert_eq!(op.containers().len(), 1, "the old container must be gone");
    let describe = String::from_utf8(op.cli(&["describe", "workspace", "dev"]).stdout).unwrap();
    assert!(describe.contains("spec changed") && describe.contains("reprovision"), "{describe}");
}

#[test]
fn pause_resume_and_stop_by_operating_mode() {
    if !docker_available() {
        return;
    }
    let (op, ws) = one("modes", "dev");
    let id = cid(&ws, "dev");
    let tok = token_of(&ws, "dev");
    let u = uid(&ws, "dev");
    op.write("dev.yaml", &format!("{}  operatingMode: Paused\n", workspace_yaml("dev")));
    op.wait("paused", HEAL, |ws| ws["dev"]["phase"] == "Paused");
    assert_eq!(docker(&["inspect", "-f", "{{.State.Paused}}", &id]), "true");
    op.write("dev.yaml", &workspace_yaml("dev"));
    op.wait("resumed", HEAL, |ws| online(&ws["dev"]) && ws["dev"]["container"]["id"] == id.as_str());
    assert_eq!(docker(&["inspect", "-f", "{{.State.Paused}}", &id]), "false");
    assert_eq!(registry(&op.url(), "/registry/heartbeat", &tok, &u), 200, "pause keeps the token by default");
    op.write("dev.yaml", &format!("{}  operatingMode: Stopped\n", workspace_yaml("dev")));
    op.wait("stopped", HEAL, |ws| ws["dev"]["phase"] == "Stopped");
    assert!(op.containers().is_empty(), "Stopped removes the container");
    assert_eq!(op.volumes().len(), 1, "Stopped keeps the config volume");
    assert_eq!(registry(&op.url(), "/registry/heartbeat", &tok, &u), 401, "Stopped revokes the token");
    op.write("dev.yaml", &workspace_yaml("dev"));
    op.wait_online(&["dev"], HEAL);
}

#[test]
fn restarted_at_bump_restarts_with_a_new_token() {
    if !docker_available() {
        return;
    }
    let (op, ws) = one("restartedat", "dev");
    let (old_inc, old_tok) = (inc(&ws, "dev"), token_of(&ws, "dev"));
    let now = chrono::Utc::now().to_rfc3339();
    op.write("dev.yaml", &format!("{}  restartedAt: \"{now}\"\n", workspace_yaml("dev")));
    assert_healed(&op, "dev", old_inc, &old_tok);
}

#[test]
fn deleting_the_file_removes_container_volume_and_tokens() {
    if !docker_available() {
        return;
    }
    let (op, ws) = one("delete", "dev");
    let tok = token_of(&ws, "dev");
    let u = uid(&ws, "dev");
    op.write_ws("other");
    op.wait_online(&["dev", "other"], UP);
    op.remove_file("dev.yaml");
    op.wait("dev gone", HEAL, |ws| !ws.contains_key("dev"));
    let t0 = std::time::Instant::now();
    while op.containers().len() > 1 && t0.elapsed() < HEAL {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(op.containers().len(), 1, "only `other` remains");
    assert_eq!(op.volumes().len(), 1, "dev's config volume is removed");
    assert_eq!(registry(&op.url(), "/registry/heartbeat", &tok, &u), 401);
}

#[test]
fn cli_restart_pause_resume() {
    if !docker_available() {
        return;
    }
    let (op, ws) = one("cli", "dev");
    let (old_inc, old_tok) = (inc(&ws, "dev"), token_of(&ws, "dev"));
    assert!(op.cli(&["pause", "workspace", "dev"]).status.success());
    op.wait("paused by CLI", HEAL, |ws| ws["dev"]["phase"] == "Paused");
    assert!(op.cli(&["resume", "workspace", "dev"]).status.success());
    op.wait_online(&["dev"], HEAL);
    assert!(op.cli(&["restart", "workspace", "dev"]).status.success());
    assert_healed(&op, "dev", old_inc, &old_tok);
    let out = op.cli(&["restart", "workspace", "nope"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("nope"));
}

// ---- healing: each ends with the agent registered on a NEW token, the old one 401 ----

#[test]
fn heal_container_removed_out_of_band() {
    if !docker_available() {
        return;
    }
    let (op, ws) = one("healrm", "dev");
    let (i, t) = (inc(&ws, "dev"), token_of(&ws, "dev"));
    assert!(docker_ok(&["rm", "-f", &cid(&ws, "dev")]));
    assert_healed(&op, "dev", i, &t);
    assert_eq!(op.containers().len(), 1);
}

/// A container that exits on its own (an agent crash, an OOM kill, `docker kill`) is
/// replaced because it exited, not later because its agent went silent: the heartbeat
/// TTL here is far longer than the wait. Docker 20.10 emits `die` before `docker ps`
/// shows the container exited, so the event alone used to leave it "Running".
#[test]
fn heal_container_that_exits_on_its_own() {
    if !docker_available() {
        return;
    }
    let mut op = Op::new("healexit");
    op.extra = ["--heartbeat-misses", "600", "--resync-seconds", "3600"].map(String::from).to_vec();
    for name in ["killed", "termed"] {
        op.write_ws(name);
    }
    op.start();
    let ws = op.wait_online(&["killed", "termed"], UP);
    let before: Vec<(i64, String)> = ["killed", "termed"].iter().map(|n| (inc(&ws, n), token_of(&ws, n))).collect();
    assert!(docker_ok(&["kill", "-s", "KILL", &cid(&ws, "killed")]));
    assert!(docker_ok(&["kill", "-s", "TERM", &cid(&ws, "termed")]));
    for (name, (i, t)) in ["killed", "termed"].iter().zip(&before) {
        assert_healed(&op, name, *i, t);
        let describe = String::from_utf8(op.cli(&["describe", "workspace", name]).stdout).unwrap();
        let decisions = describe.split("Decisions").nth(1).unwrap_or_default();
        assert!(decisions.contains("container exited"), "healed because it exited:\n{describe}");
        let rules: Vec<&str> = decisions.lines().filter_map(|l| l.split_whitespace().nth(2)).collect();
        assert!(!rules.contains(&"heartbeat"), "not by the heartbeat rule:\n{describe}");
    }
    assert_eq!(op.containers().len(), 2, "the exited containers are replaced, not kept beside");
}

/// Settings changed behind the operator's back on running containers (`docker
/// update` of the memory limit or the restart policy, `docker network connect`) are
/// put back: each container is recreated as declared, and the decision says what
/// differed. Seen failing before the change (the containers kept what was done to them).
#[test]
fn settings_changed_out_of_band_converge_back() {
    if !docker_available() {
        return;
    }
    let mut op = Op::new("outofband");
    op.extra = ["--heartbeat-misses", "600", "--resync-seconds", "3600"].map(String::from).to_vec();
    for name in ["mem", "policy", "net"] {
        op.write_ws(name);
    }
    op.start();
    let ws = op.wait_online(&["mem", "policy", "net"], UP);
    let network = format!("mol-oob-{}", std::process::id());
    assert!(docker_ok(&["network", "create", "--label", &format!("ai.molecule.instance={}", op.instance), &network]));
    struct RemoveNetwork(String);
    impl Drop for RemoveNetwork {
        fn drop(&mut self) {
            docker(&["network", "rm", &self.0]);
        }
    }
    let _network = RemoveNetwork(network.clone());
    let before: Vec<(i64, String)> = ["mem", "policy", "net"].iter().map(|n| (inc(&ws, n), token_of(&ws, n))).collect();
    assert!(docker_ok(&["update", "--memory", "300m", "--memory-swap", "300m", &cid(&ws, "mem")]));
    assert!(docker_ok(&["update", "--restart", "always", &cid(&ws, "policy")]));
    assert!(docker_ok(&["network", "connect", &network, &cid(&ws, "net")]));
    let wants = ["memory limit 300Mi, declared 256Mi", "restart policy always, declared unless-stopped", "networks "];
    for ((name, (i, t)), want) in ["mem", "policy", "net"].iter().zip(&before).zip(wants) {
        let ws = assert_healed(&op, name, *i, t);
        let describe = String::from_utf8(op.cli(&["describe", "workspace", name]).stdout).unwrap();
        assert!(describe.contains("changed out of band") && describe.contains(want), "{name}:\n{describe}");
        if *name == "net" {
            assert!(describe.contains(&network), "names the network that was added:\n{describe}");
            let nets = docker(&[
                "inspect",
                "-f",
                "{{range $k, $v := .NetworkSettings.Networks}}{{$k}} {{end}}",
                &cid(&ws, name),
            ]);
            assert!(!nets.contains(&network), "recreated on its declared network only: {nets}");
        }
    }
    assert_eq!(op.containers().len(), 3);
}

/// The `docker compose down -v` incident: container and config volume gone together.
/// The operator is cut off from Docker (a socket proxy) while both are removed, so it
/// cannot recreate the container between the two removals; then it sees both gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heal_container_and_volume_removed_together() {
    if !docker_available() {
        return;
    }
    let sockdir = tempfile::tempdir().unwrap();
    let mut proxy = support::proxy::SocketProxy::start(sockdir.path().join("docker.sock"));
    let mut op = Op::new("healrmv");
    op.env = vec![("DOCKER_HOST".into(), format!("unix://{}", proxy.path.display()))];
    op.write_ws("dev");
    op.start();
    let ws = tokio::task::block_in_place(|| op.wait_online(&["dev"], UP));
    let (i, t) = (inc(&ws, "dev"), token_of(&ws, "dev"));
    let vol = op.volumes().pop().unwrap();
    proxy.cut();
    assert!(docker_ok(&["rm", "-f", "-v", &cid(&ws, "dev")]));
    assert!(docker_ok(&["volume", "rm", &vol]));
    proxy.restore();
    tokio::task::block_in_place(|| assert_healed(&op, "dev", i, &t));
    assert_eq!(op.volumes(), vec![vol], "the config volume is recreated");
}

#[test]
fn heal_token_file_emptied() {
    if !docker_available() {
        return;
    }
    let (op, ws) = one("healempty", "dev");
    let (i, t) = (inc(&ws, "dev"), token_of(&ws, "dev"));
    overwrite_token(&cid(&ws, "dev"), "");
    assert_healed(&op, "dev", i, &t);
}

#[test]
fn heal_token_file_overwritten() {
    if !docker_available() {
        return;
    }
    let (op, ws) = one("healover", "dev");
    let (i, t) = (inc(&ws, "dev"), token_of(&ws, "dev"));
    overwrite_token(&cid(&ws, "dev"), "garbage-token-that-matches-nothing-at-all-x");
    assert_healed(&op, "dev", i, &t);
}

fn sql(op: &Op, q: &str) {
    let db = op.state.join("state.db");
    let out = std::process::Command::new("sqlite3")
        .args(["-cmd", ".timeout 5000"])
        .arg(&db)
        .arg(q)
        .output()
        .expect("sqlite3 runs");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn heal_token_rows_revoked_by_hand() {
    if !docker_available() {
        return;
    }
    let (op, ws) = one("healrevoke", "dev");
    let (i, t) = (inc(&ws, "dev"), token_of(&ws, "dev"));
    sql(
        &op,
        "UPDATE workspace_auth_tokens SET revoked_at = strftime('%Y-%m-%dT%H:%M:%fZ','now'), revoke_reason = 'by-hand' WHERE revoked_at IS NULL",
    );
    assert_healed(&op, "dev", i, &t);
}

#[test]
fn heal_token_rows_deleted_by_hand() {
    if !docker_available() {
        return;
    }
    let (op, ws) = one("healdelete", "dev");
    let (i, t) = (inc(&ws, "dev"), token_of(&ws, "dev"));
    sql(&op, "DELETE FROM workspace_auth_tokens");
    assert_healed(&op, "dev", i, &t);
}

/// A row edited in the state database by hand (no CLI, no event, no heartbeat refused)
/// is acted on by the next periodic resync, which reads the store's change log, not left
/// for the next full resync (an hour away here). The agent heartbeats every 30 s, so no
/// heartbeat deadline brings a reconcile within the wait either.
#[test]
fn a_row_edited_by_hand_is_acted_on_by_the_next_resync() {
    if !docker_available() {
        return;
    }
    let mut op = Op::new("changelog");
    op.heartbeat_seconds = 30;
    op.extra = ["--resync-seconds", "1", "--full-resync-seconds", "3600"].map(String::from).to_vec();
    op.write_ws("dev");
    op.start();
    let ws = op.wait_online(&["dev"], UP);
    let id = cid(&ws, "dev");
    // After the full resync at start, and one reading the change log: the edit below
    // can only be found by the next ones reading it.
    let deadline = std::time::Instant::now() + HEAL;
    while op.metric_sum("molecule_resyncs_total", &["scope=\"changes\""]) == 0 {
        assert!(std::time::Instant::now() < deadline, "no resync read the change log");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(op.metric_sum("molecule_resyncs_total", &["scope=\"full\""]), 1);
    sql(&op, "UPDATE workspaces SET mode_override = 'Paused' WHERE key = 'default/dev'");
    op.wait("paused by a row edited by hand", HEAL, |ws| ws["dev"]["phase"] == "Paused");
    assert_eq!(docker(&["inspect", "-f", "{{.State.Paused}}", &id]), "true");
}

#[test]
fn heal_damage_done_while_the_operator_was_stopped() {
    if !docker_available() {
        return;
    }
    let mut op = Op::new("healoffline");
    for n in ["a", "b", "c", "d"] {
        op.write_ws(n);
    }
    op.start();
    let ws = op.wait_online(&["a", "b", "c", "d"], UP);
    let before: Vec<(i64, String)> = ["a", "b", "c", "d"].iter().map(|n| (inc(&ws, n), token_of(&ws, n))).collect();
    op.stop();
    assert!(docker_ok(&["rm", "-f", &cid(&ws, "a")]));
    let vol_b = format!("{}-configs", ws["b"]["container"]["name"].as_str().unwrap());
    assert!(docker_ok(&["rm", "-f", "-v", &cid(&ws, "b")]));
    assert!(docker_ok(&["volume", "rm", &vol_b]));
    overwrite_token(&cid(&ws, "c"), "");
    sql(
        &op,
        &format!(
            "UPDATE workspace_auth_tokens SET revoked_at = strftime('%Y-%m-%dT%H:%M:%fZ','now'), revoke_reason = 'by-hand' WHERE workspace_uid = '{}'",
            uid(&ws, "d")
        ),
    );
    op.start();
    for (n, (i, t)) in ["a", "b", "c", "d"].iter().zip(before) {
        assert_healed(&op, n, i, &t);
    }
    assert_eq!(op.containers().len(), 4);
}

#[test]
fn sigkill_in_the_middle_of_provisioning_leaves_no_duplicates_or_orphan_tokens() {
    if !docker_available() {
        return;
    }
    for point in ["provision-after-bump", "provision-after-create", "provision-after-issue"] {
        let mut op = Op::new(&format!("crash{}", point.len()));
        op.write_ws("dev");
        op.env = vec![("MOLECULE_FAILPOINT".into(), point.into())];
        op.start();
        assert!(op.wait_exit(UP), "operator did not stop at failpoint {point}");
        op.env.clear();
        op.start();
        let ws = op.wait_online(&["dev"], UP);
        assert_eq!(op.containers().len(), 1, "duplicate containers after crash at {point}");
        let tok = token_of(&ws, "dev");
        assert_eq!(registry(&op.url(), "/registry/heartbeat", &tok, &uid(&ws, "dev")), 200);
        let live = std::process::Command::new("sqlite3")
            .args(["-cmd", ".timeout 5000"])
            .arg(op.state.join("state.db"))
            .arg("SELECT count(*) FROM workspace_auth_tokens WHERE revoked_at IS NULL")
            .output()
            .unwrap();
        assert_eq!(String::from_utf8_lossy(&live.stdout).trim(), "1", "exactly one live token after crash at {point}");
    }
}

// ---- bad input ----

#[test]
fn broken_yaml_keeps_what_the_file_declared_and_converges_when_fixed() {
    if !docker_available() {
        return;
    }
    let (op, ws) = one("badyaml", "dev");
    let id = cid(&ws, "dev");
    op.write(
        "dev.yaml",
        "apiVersion: molecule.ai/v1alpha1\nkind: Workspace\nmetadata:\n  name: dev\nspec: [unclosed\n",
    );
    let t0 = std::time::Instant::now();
    while !op.logs().contains("dev.yaml:") && t0.elapsed() < HEAL {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(op.logs().contains("dev.yaml:"), "the error names the file and line:\n{}", op.logs());
    std::thread::sleep(Duration::from_secs(2)); // give a wrong deletion time to happen
    assert_eq!(op.containers(), vec![id[..12].to_string()], "a broken file must not delete its workspace");
    op.write("dev.yaml", &workspace_yaml("dev").replace("ROLE: dev", "ROLE: fixed"));
    op.wait("fixed file converges", HEAL, |ws| online(&ws["dev"]) && ws["dev"]["container"]["id"] != id.as_str());
}

#[test]
fn invalid_objects_get_invalid_spec_and_others_proceed() {
    if !docker_available() {
        return;
    }
    let mut op = Op::new("invalid");
    op.write_ws("good");
    op.write("unknown.yaml", &workspace_yaml("unknown").replace("  tier: 1\n", "  tier: 1\n  colour: blue\n"));
    op.write("tier.yaml", &workspace_yaml("tier").replace("tier: 1", "tier: 9"));
    op.write("grace.yaml", &format!("{}  tokenPolicy:\n    staleGrace: soon\n", workspace_yaml("grace")));
    op.write("orphan.yaml", &format!("{}  parent: nobody\n", workspace_yaml("orphan")));
    op.write("cyc1.yaml", &format!("{}  parent: cyc2\n", workspace_yaml("cyc1")));
    op.write("cyc2.yaml", &format!("{}  parent: cyc1\n", workspace_yaml("cyc2")));
    op.write("badname.yaml", &workspace_yaml("Bad_Name"));
    op.start();
    op.wait_online(&["good"], UP);
    let ws = op.wait("invalid ones reported", HEAL, |ws| {
        ["unknown", "tier", "grace", "orphan", "cyc1", "Bad_Name"]
            .iter()
            .all(|n| ws.get(*n).is_some_and(|w| w["phase"] == "Failed"))
    });
    let msg = |n: &str| -> String {
        ws[n]["conditions"].as_array().unwrap().iter().find(|c| c["type"] == "InvalidSpec").unwrap()["message"]
            .as_str()
            .unwrap()
            .to_string()
    };
    assert!(msg("unknown").contains("colour"), "{}", msg("unknown"));
    assert!(msg("tier").contains("tier"), "{}", msg("tier"));
    assert!(msg("grace").contains("staleGrace"), "{}", msg("grace"));
    assert!(msg("orphan").contains("nobody"), "{}", msg("orphan"));
    assert!(msg("cyc1").contains("cycle"), "{}", msg("cyc1"));
    assert!(
        msg("Bad_Name").to_lowercase().contains("dns") || msg("Bad_Name").contains("lowercase"),
        "{}",
        msg("Bad_Name")
    );
    assert_eq!(op.containers().len(), 1, "only the valid workspace runs");
}

#[test]
fn missing_image_fails_with_reason_and_recovers_when_it_appears() {
    if !docker_available() {
        return;
    }
    let mut op = Op::new("noimage");
    let image = format!("molecule-missing-{}:v1", std::process::id());
    op.write("dev.yaml", &format!("{}  image: {image}\n  imagePullPolicy: Never\n", workspace_yaml("dev")));
    op.start();
    let ws = op.wait("Failed with reason", UP, |ws| ws.get("dev").is_some_and(|w| w["phase"] == "Failed"));
    let ready = ws["dev"]["conditions"].as_array().unwrap().iter().find(|c| c["type"] == "Ready").unwrap().clone();
    assert!(ready["message"].as_str().unwrap().contains(&image), "{ready}");
    assert!(docker_ok(&["tag", "molecule-agent:local", &image]));
    struct Untag(String);
    impl Drop for Untag {
        fn drop(&mut self) {
            docker(&["rmi", &self.0]);
        }
    }
    let _untag = Untag(image);
    op.wait_online(&["dev"], Duration::from_secs(60));
}

#[test]
fn silent_agent_is_restarted_within_its_budget_then_degraded() {
    if !docker_available() {
        return;
    }
    // Agents are pointed at a port nobody listens on: containers run, agents never report.
    let mut op = Op::new("hbsilent");
    let dead = free_port();
    op.extra = vec![
        "--registry-url".into(),
        format!("http://127.0.0.1:{dead}"),
        "--restart-budget".into(),
        "2".into(),
        "--restart-backoff-seconds".into(),
        "1".into(),
    ];
    op.write_ws("dev");
    op.start();
    let ws = op.wait("Degraded after the budget", Duration::from_secs(120), |ws| {
        ws.get("dev").is_some_and(|w| w["phase"] == "Degraded")
    });
    let w = &ws["dev"];
    assert_eq!(w["restartCount"].as_i64(), Some(2), "{w}");
    assert!(w["lastRestartReason"].as_str().unwrap().contains("never reported"), "{w}");
    assert_eq!(w["incarnation"].as_i64(), Some(3), "first provision plus two restarts: {w}");
    let ready = w["conditions"].as_array().unwrap().iter().find(|c| c["type"] == "Ready").unwrap();
    assert!(ready["message"].as_str().unwrap().contains("restarted 2 times"), "{ready}");
    assert_eq!(op.containers().len(), 1);
}

#[test]
fn containers_with_our_labels_but_not_our_identity_are_removed_never_adopted() {
    if !docker_available() {
        return;
    }
    let (op, ws) = one("spoof", "dev");
    let u = uid(&ws, "dev");
    let inst = format!("ai.molecule.instance={}", op.instance);
    // A stranger claims to be dev (wrong uid), and another claims a workspace nobody declares.
    for (name, labels) in [
        (
            format!("spoof-a-{}", std::process::id()),
            vec![
                "ai.molecule.workspace=default/dev".to_string(),
                "ai.molecule.uid=ffffffff-0000-0000-0000-000000000000".into(),
                "ai.molecule.incarnation=99".into(),
            ],
        ),
        (
            format!("spoof-b-{}", std::process::id()),
            vec![
                "ai.molecule.workspace=default/ghost".to_string(),
                "ai.molecule.uid=eeeeeeee-0000-0000-0000-000000000000".into(),
            ],
        ),
    ] {
        let mut args = vec![
            "create".to_string(),
            "--name".into(),
            name,
            "--label".into(),
            inst.clone(),
            "--label".into(),
            "ai.molecule.managed=true".into(),
        ];
        for l in labels {
            args.push("--label".into());
            args.push(l);
        }
        args.push("molecule-agent:local".into());
        let a: Vec<&str> = args.iter().map(String::as_str).collect();
        assert!(docker_ok(&a), "docker create failed");
    }
    let t0 = std::time::Instant::now();
    while op.containers().len() > 1 && t0.elapsed() < HEAL {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(
        op.containers(),
        vec![cid(&ws, "dev")[..12].to_string()],
        "strangers must be removed; log:\n{}",
        op.logs()
    );
    let ws2 = op.wait_online(&["dev"], HEAL);
    assert_eq!(uid(&ws2, "dev"), u);
    assert_eq!(inc(&ws2, "dev"), inc(&ws, "dev"), "our own container is untouched");
    assert!(!ws2.contains_key("ghost"), "an undeclared workspace is never adopted");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn docker_unreachable_revokes_and_deletes_nothing_then_converges() {
    if !docker_available() {
        return;
    }
    let sockdir = tempfile::tempdir().unwrap();
    let mut proxy = support::proxy::SocketProxy::start(sockdir.path().join("docker.sock"));
    let mut op = Op::new("dockerdown");
    op.env = vec![("DOCKER_HOST".into(), format!("unix://{}", proxy.path.display()))];
    op.write_ws("dev");
    op.write_ws("other");
    op.start();
    let ws = tokio::task::block_in_place(|| op.wait_online(&["dev", "other"], UP));
    let tok = token_of(&ws, "dev");
    let u = uid(&ws, "dev");
    let before = op.containers();
    proxy.cut();
    // While Docker is unreachable: a spec change and a deleted file must neither
    // revoke tokens nor lose containers.
    op.write("dev.yaml", &workspace_yaml("dev").replace("ROLE: dev", "ROLE: changed"));
    op.remove_file("other.yaml");
    let t0 = std::time::Instant::now();
    while !op.logs().contains("Docker is unreachable") && t0.elapsed() < HEAL {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(op.logs().contains("Docker is unreachable"), "a clear error is logged:\n{}", op.logs());
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(op.containers(), before, "nothing may be removed while Docker is unreachable");
    assert_eq!(
        registry(&op.url(), "/registry/heartbeat", &tok, &u),
        200,
        "no token may be revoked while Docker is unreachable"
    );
    proxy.restore();
    let old_inc = inc(&ws, "dev");
    tokio::task::block_in_place(|| {
        op.wait("converged after Docker returned", Duration::from_secs(60), |ws| {
            !ws.contains_key("other")
                && ws.get("dev").is_some_and(|w| online(w) && w["incarnation"].as_i64() > Some(old_inc))
        });
        let t0 = std::time::Instant::now();
        while op.containers().len() > 1 && t0.elapsed() < HEAL {
            std::thread::sleep(Duration::from_millis(50));
        }
    });
    assert_eq!(op.containers().len(), 1, "other's container is removed once Docker is back");
    assert_eq!(registry(&op.url(), "/registry/heartbeat", &tok, &u), 401, "the replaced token is revoked");
}

#[test]
fn tier_and_image_changes_recreate_with_the_new_limits_and_image() {
    if !docker_available() {
        return;
    }
    let (op, ws) = one("tierimage", "dev");
    let (old_inc, old_tok) = (inc(&ws, "dev"), token_of(&ws, "dev"));
    assert_eq!(
        docker(&["inspect", "-f", "{{.HostConfig.Memory}} {{.HostConfig.ReadonlyRootfs}}", &cid(&ws, "dev")]),
        "268435456 true"
    );
    op.write("dev.yaml", &workspace_yaml("dev").replace("tier: 1", "tier: 2"));
    let ws = assert_healed(&op, "dev", old_inc, &old_tok);
    assert_eq!(
        docker(&["inspect", "-f", "{{.HostConfig.Memory}} {{.HostConfig.ReadonlyRootfs}}", &cid(&ws, "dev")]),
        "536870912 false"
    );
    let image = format!("molecule-agent-copy-{}:v2", std::process::id());
    assert!(docker_ok(&["tag", "molecule-agent:local", &image]));
    struct Untag(String);
    impl Drop for Untag {
        fn drop(&mut self) {
            docker(&["rmi", &self.0]);
        }
    }
    let _untag = Untag(image.clone());
    let (old_inc, old_tok) = (inc(&ws, "dev"), token_of(&ws, "dev"));
    op.write("dev.yaml", &format!("{}  image: {image}\n", workspace_yaml("dev").replace("tier: 1", "tier: 2")));
    let ws = assert_healed(&op, "dev", old_inc, &old_tok);
    assert_eq!(ws["dev"]["container"]["image"].as_str(), Some(image.as_str()));
    assert_eq!(op.containers().len(), 1);
}

#[test]
fn a_second_operator_on_the_same_state_dir_refuses_to_start() {
    if !docker_available() {
        return;
    }
    let (op, _ws) = one("statelock", "dev");
    let out = std::process::Command::new(BIN)
        .args(["up"])
        .arg(op.dir.path())
        .arg("--state")
        .arg(&op.state)
        .args(["--listen", &format!("127.0.0.1:{}", free_port()), "--instance", &op.instance])
        .output()
        .unwrap();
    assert!(!out.status.success(), "the second operator must not run");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("another operator is already running"), "{err}");
    // The first one is unharmed.
    op.wait_online(&["dev"], HEAL);
}

#[test]
fn an_operator_down_longer_than_the_heartbeat_ttl_restarts_no_healthy_agent() {
    if !docker_available() {
        return;
    }
    // Heartbeats every 4 s, 2 misses: the TTL is 10 s. The operator (and its registry)
    // is down for longer than that, so the store holds no beat for well past the TTL;
    // the agent kept running and was never silent, only unheard. After the restart its
    // next beat comes up to 4 s later, the operator's first reconcile sooner.
    let mut op = Op::new("downtime");
    op.heartbeat_seconds = 4;
    op.extra = vec!["--heartbeat-misses".into(), "2".into()];
    op.write_ws("dev");
    op.start();
    let ws = op.wait_online(&["dev"], UP);
    let (container, incarnation) = (cid(&ws, "dev"), inc(&ws, "dev"));
    op.stop();
    std::thread::sleep(Duration::from_secs(14)); // the outage itself
    let back = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    op.start();
    let ws = op.wait("the agent reports to the restarted operator", UP, |ws| {
        ws.get("dev").is_some_and(|w| w["lastHeartbeatAt"].as_str().is_some_and(|t| t > back.as_str()))
    });
    let w = &ws["dev"];
    assert!(w["lastRestartReason"].is_null(), "a healthy agent was restarted for the operator's downtime: {w}");
    assert_eq!(inc(&ws, "dev"), incarnation, "{w}");
    // Docker's word, not the status's: the same container is still the only one.
    let running = docker(&["inspect", "-f", "{{.State.Running}}", &container]);
    assert_eq!(running.trim(), "true", "the agent's container is gone or stopped");
    assert_eq!(op.containers().len(), 1);
}

/// Waits until the operator's output holds `needle`; the output then.
fn output_with(op: &Op, needle: &str, deadline: Duration) -> String {
    let t0 = std::time::Instant::now();
    loop {
        let out = op.logs();
        if out.contains(needle) {
            return out;
        }
        assert!(t0.elapsed() < deadline, "never showed {needle:?}:\n{out}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn up_on_a_terminal_redraws_each_workspace_in_place_then_says_all_are_running() {
    if !docker_available() {
        return;
    }
    let mut op = Op::new("tty");
    op.write_ws("pm");
    op.write_ws("qa");
    op.start_on_terminal(80);
    let screen = output_with(&op, "2/2 running", UP);
    assert!(screen.contains("\x1b[2K") && screen.contains("F\x1b[2K"), "lines are redrawn in place:\n{screen:?}");
    for name in ["pm", "qa"] {
        assert!(
            screen.lines().any(|l| l.contains('✔') && l.contains(name) && l.contains("Running")),
            "{name} shown running:\n{screen}"
        );
    }
    assert!(screen.lines().all(|l| l.chars().count() <= 80 + 12), "cut to the terminal's width:\n{screen}");
    assert!(!screen.contains(" INFO "), "log lines stay off the terminal:\n{screen}");
    let logs = std::fs::read_to_string(op.state.join("operator.log")).unwrap_or_default();
    assert!(logs.contains("operator running"), "the logs went to STATE/operator.log:\n{logs}");
}

#[test]
fn up_off_a_terminal_prints_a_plain_line_per_change_beside_the_logs() {
    if !docker_available() {
        return;
    }
    let mut op = Op::new("plainprogress");
    op.write_ws("pm");
    op.start();
    let out = output_with(&op, "1/1 running", UP);
    assert!(out.contains("pm: Running (incarnation 1)"), "{out}");
    assert!(!out.contains('\x1b'), "no control codes off a terminal");
    assert!(out.contains("operator running"), "logs stay on stderr");
    // A removal out of band shows as the change it is, then as settled again.
    let ws = op.get().unwrap();
    assert!(docker_ok(&["rm", "-f", ws["pm"]["container"]["id"].as_str().unwrap()]));
    output_with(&op, "pm: Running (incarnation 2)", HEAL);
}

#[test]
fn events_lists_the_fleets_decisions_and_watch_prints_each_new_one() {
    if !docker_available() {
        return;
    }
    let (op, _) = one("events", "pm");
    let out = op.cli(&["events"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.lines().any(|l| l.contains("default/pm  provision")), "{text}");
    // Watching: the backlog, then what happens next, as it happens.
    let (mut watch, rx) = op.cli_lines(&["events", "-w", "-o", "json"]);
    let first: Value = serde_json::from_str(&rx.recv_timeout(HEAL).expect("the backlog comes first")).unwrap();
    assert_eq!(first["workspace"], "default/pm");
    assert!(op.cli(&["restart", "workspace", "pm"]).status.success());
    let t0 = std::time::Instant::now();
    let restart = loop {
        let line = rx.recv_timeout(HEAL.saturating_sub(t0.elapsed())).expect("the restart decision is printed live");
        let e: Value = serde_json::from_str(&line).unwrap();
        if e["rule"] == "restart" {
            break e;
        }
    };
    assert_eq!(restart["workspace"], "default/pm");
    assert!(restart["cause"].as_str().is_some_and(|c| !c.is_empty()), "{restart}");
    let _ = watch.kill();
    let _ = watch.wait();
}

#[test]
fn logs_prints_the_agents_output_and_follow_keeps_printing() {
    if !docker_available() {
        return;
    }
    let (op, ws) = one("agentlogs", "pm");
    let out = op.cli(&["logs", "workspace", "pm"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("molecule-agent: token loaded from"), "{text}");
    // Following: what the agent writes later arrives while the command runs. A token
    // overwritten in its file makes the agent log the reload.
    let (mut follow, rx) = op.cli_lines(&["logs", "workspace", "pm", "-f", "--tail", "0"]);
    overwrite_token(&cid(&ws, "pm"), "not-the-token");
    let line = rx.recv_timeout(HEAL).expect("the agent's output while following");
    assert!(line.contains("molecule-agent"), "{line}");
    let _ = follow.kill();
    let _ = follow.wait();
    let missing = op.cli(&["logs", "workspace", "nobody"]);
    assert!(!missing.status.success());
    assert!(
        String::from_utf8_lossy(&missing.stderr).contains("nobody"),
        "{}",
        String::from_utf8_lossy(&missing.stderr)
    );
}

/// A runtime that reports itself wedged (as the original platform's runtimes do) is
/// shown Degraded, and with `healthPolicy.restartWedgedAfter` restarted once the
/// wedge outlasts the grace: a new container and token, the cause in the decision.
#[test]
fn a_runtime_wedged_past_its_grace_is_restarted_by_the_health_policy() {
    if !docker_available() {
        return;
    }
    let mut op = Op::new("wedged");
    op.write(
        "dev.yaml",
        &workspace_yaml("dev").replace("spec:\n", "spec:\n  healthPolicy: {restartWedgedAfter: 3s}\n"),
    );
    op.start();
    let ws = op.wait_online(&["dev"], Duration::from_secs(60));
    let cid = ws["dev"]["container"]["id"].as_str().unwrap().to_string();
    let (token, _, _) = read_token(&cid).expect("dev's token");
    let body = serde_json::json!({"workspace_id": ws["dev"]["uid"], "runtime_state": "wedged",
        "sample_error": "tool call never returned"});
    // The built-in agent's own heartbeats carry no runtime_state: the wedge stays.
    assert_eq!(registry_json(&op.url(), "/registry/heartbeat", &token, &body.to_string()), 200);
    let ws = op.wait("dev shown Degraded", Duration::from_secs(30), |ws| {
        ws["dev"]["phase"] == "Degraded" || ws["dev"]["incarnation"].as_i64() > Some(1)
    });
    if ws["dev"]["incarnation"].as_i64() == Some(1) {
        let healthy = ws["dev"]["conditions"].as_array().unwrap().iter().find(|c| c["type"] == "AgentHealthy");
        assert!(healthy.is_some_and(|c| c["status"] == "False"), "{}", ws["dev"]);
    }
    let ws = op.wait("dev restarted past the grace", Duration::from_secs(60), |ws| {
        ws["dev"]["incarnation"].as_i64() == Some(2) && online(&ws["dev"])
    });
    assert_ne!(ws["dev"]["container"]["id"].as_str(), Some(cid.as_str()), "a new container");
    assert!(ws["dev"]["lastRestartReason"].as_str().unwrap_or_default().contains("wedged"), "{}", ws["dev"]);
    assert_ne!(ws["dev"]["phase"], "Degraded", "the new incarnation's agent has not reported a wedge");
    assert_eq!(registry_json(&op.url(), "/registry/heartbeat", &token, &body.to_string()), 401, "the old token");
    let describe = String::from_utf8(op.cli(&["describe", "workspace", "dev"]).stdout).unwrap();
    assert!(describe.contains("healthPolicy.restartWedgedAfter"), "{describe}");
}
