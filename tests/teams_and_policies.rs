//! Teams (defaults, team-wide operating mode, owned members), the hierarchy rule and
//! update policies, against the real Docker daemon.

mod support;

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::Value;
use support::operator::*;

const UP: Duration = Duration::from_secs(90);
const CONVERGE: Duration = Duration::from_secs(30);

fn team(mode: &str, members: &[&str]) -> String {
    let mut t = format!(
        "apiVersion: molecule.ai/v1alpha1\nkind: Team\nmetadata:\n  name: eng\nspec:\n  operatingMode: {mode}\n  defaults:\n    tier: 1\n    env:\n      TEAM: eng\n  workspaces:\n"
    );
    for m in members {
        t.push_str(&format!("    - name: {m}\n      env:\n        ROLE: {m}\n"));
    }
    t
}

fn cond<'a>(w: &'a Value, t: &str) -> &'a Value {
    w["conditions"].as_array().unwrap().iter().find(|c| c["type"] == t).unwrap_or(&Value::Null)
}

fn wait_containers(op: &Op, n: usize) {
    let t0 = std::time::Instant::now();
    while op.containers().len() != n && t0.elapsed() < CONVERGE {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(op.containers().len(), n);
}

#[test]
fn team_defaults_mode_and_owned_members() {
    if !docker_available() {
        return;
    }
    let mut op = Op::new("team");
    op.write("team.yaml", &team("Running", &["a", "b"]));
    // A workspace joining by spec.team, with its own env on top of the team's.
    op.write("solo.yaml", &format!("{}  team: eng\n", workspace_yaml("solo")));
    op.start();
    let ws = op.wait_online(&["eng-a", "eng-b", "solo"], UP);
    let env = docker(&[
        "inspect",
        "-f",
        "{{range .Config.Env}}{{println .}}{{end}}",
        ws["eng-a"]["container"]["id"].as_str().unwrap(),
    ]);
    assert!(env.contains("TEAM=eng") && env.contains("ROLE=a"), "members inherit team env: {env}");
    assert_eq!(ws["solo"]["team"], "eng");
    let teams = String::from_utf8(op.cli(&["get", "teams"]).stdout).unwrap();
    assert!(teams.contains("eng") && teams.contains('3'), "{teams}");

    // Pausing the team pauses every member; Running restores them.
    op.write("team.yaml", &team("Paused", &["a", "b"]));
    op.wait("team paused", CONVERGE, |ws| ["eng-a", "eng-b", "solo"].iter().all(|n| ws[*n]["phase"] == "Paused"));
    op.write("team.yaml", &team("Running", &["a", "b"]));
    op.wait_online(&["eng-a", "eng-b", "solo"], CONVERGE);

    // A member dropped from the team file is removed; deleting the team removes all it generated.
    op.write("team.yaml", &team("Running", &["a"]));
    op.wait("eng-b removed", CONVERGE, |ws| !ws.contains_key("eng-b"));
    wait_containers(&op, 2);
    op.remove_file("team.yaml");
    op.remove_file("solo.yaml");
    op.wait("team gone", CONVERGE, |ws| ws.is_empty());
    wait_containers(&op, 0);
}

#[test]
fn deleting_a_parent_is_refused_while_children_remain() {
    if !docker_available() {
        return;
    }
    let mut op = Op::new("hier");
    op.write_ws("pm");
    op.write("dev.yaml", &format!("{}  parent: pm\n", workspace_yaml("dev")));
    op.start();
    let ws = op.wait_online(&["pm", "dev"], UP);
    let pm_container = ws["pm"]["container"]["id"].as_str().unwrap().to_string();
    op.remove_file("pm.yaml");
    let ws = op.wait("refusal shown", CONVERGE, |ws| cond(&ws["pm"], "DeletionRefused")["status"] == "True");
    assert!(cond(&ws["pm"], "DeletionRefused")["message"].as_str().unwrap().contains("dev"));
    assert_eq!(ws["pm"]["container"]["id"].as_str(), Some(pm_container.as_str()), "pm keeps running");
    assert_eq!(ws["dev"]["phase"], "Running");
    op.remove_file("dev.yaml");
    op.wait("both gone", CONVERGE, |ws: &BTreeMap<String, Value>| ws.is_empty());
    wait_containers(&op, 0);
}

#[test]
fn on_next_stop_and_manual_wait_for_their_moment() {
    if !docker_available() {
        return;
    }
    let mut op = Op::new("policies");
    let with = |name: &str, policy: &str, role: &str| {
        format!(
            "{}  updatePolicy: {policy}\n",
            workspace_yaml(name).replace(&format!("ROLE: {name}"), &format!("ROLE: {role}"))
        )
    };
    op.write("next.yaml", &with("next", "OnNextStop", "v1"));
    op.write("manual.yaml", &with("manual", "Manual", "v1"));
    op.start();
    let ws = op.wait_online(&["next", "manual"], UP);
    let inc = |ws: &BTreeMap<String, Value>, n: &str| ws[n]["incarnation"].as_i64().unwrap();
    let (next0, manual0) = (inc(&ws, "next"), inc(&ws, "manual"));
    op.write("next.yaml", &with("next", "OnNextStop", "v2"));
    op.write("manual.yaml", &with("manual", "Manual", "v2"));
    let ws = op.wait("drift pending", CONVERGE, |ws| {
        ["next", "manual"].iter().all(|n| cond(&ws[*n], "SpecDrift")["status"] == "True")
    });
    for n in ["next", "manual"] {
        let c = cond(&ws[n], "SpecDrift");
        assert_eq!(c["reason"], "Pending", "{c}");
        assert_eq!(
            ws[n]["incarnation"].as_i64(),
            Some(if n == "next" { next0 } else { manual0 }),
            "{n} must not be recreated yet"
        );
    }
    std::thread::sleep(Duration::from_secs(2));
    let ws = op.get().unwrap();
    assert_eq!(inc(&ws, "next"), next0);
    assert_eq!(inc(&ws, "manual"), manual0);

    // OnNextStop: a stop and start applies it.
    op.write("next.yaml", &format!("{}  operatingMode: Stopped\n", with("next", "OnNextStop", "v2")));
    op.wait("stopped", CONVERGE, |ws| ws["next"]["phase"] == "Stopped");
    op.write("next.yaml", &with("next", "OnNextStop", "v2"));
    let ws = op.wait("applied at start", CONVERGE, |ws| {
        online(&ws["next"]) && cond(&ws["next"], "SpecDrift")["status"] == "False"
    });
    let env = docker(&[
        "inspect",
        "-f",
        "{{range .Config.Env}}{{println .}}{{end}}",
        ws["next"]["container"]["id"].as_str().unwrap(),
    ]);
    assert!(env.lines().any(|l| l == "ROLE=v2"), "{env}");

    // Manual: `molecule-operator restart` applies it.
    assert!(op.cli(&["restart", "workspace", "manual"]).status.success());
    let ws = op.wait("applied by restart", CONVERGE, |ws| {
        online(&ws["manual"])
            && ws["manual"]["incarnation"].as_i64() > Some(manual0)
            && cond(&ws["manual"], "SpecDrift")["status"] == "False"
    });
    let env = docker(&[
        "inspect",
        "-f",
        "{{range .Config.Env}}{{println .}}{{end}}",
        ws["manual"]["container"]["id"].as_str().unwrap(),
    ]);
    assert!(env.lines().any(|l| l == "ROLE=v2"), "{env}");
}

#[test]
fn quota_holds_extra_members_in_line_and_releases_them_when_room_appears() {
    if !docker_available() {
        return;
    }
    let mut op = Op::new("quota");
    let with_quota = |members: &[&str]| team("Running", members).replace("spec:\n", "spec:\n  maxWorkspaces: 2\n");
    op.write("team.yaml", &with_quota(&["a", "b", "c"]));
    op.start();
    let ws = op.wait("two run, one waits", UP, |ws| {
        let online_n = ["eng-a", "eng-b", "eng-c"].iter().filter(|n| ws.get(**n).is_some_and(online)).count();
        let waiting = ["eng-a", "eng-b", "eng-c"]
            .iter()
            .filter(|n| {
                ws.get(**n).is_some_and(|w| w["phase"] == "Pending" && cond(w, "QuotaExceeded")["status"] == "True")
            })
            .count();
        online_n == 2 && waiting == 1
    });
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(op.containers().len(), 2, "never more than the quota");
    let waiting = ["eng-a", "eng-b", "eng-c"].into_iter().find(|n| ws[*n]["phase"] == "Pending").unwrap();
    assert!(cond(&ws[waiting], "QuotaExceeded")["message"].as_str().unwrap().contains("allows 2"));
    // Room appears: the one waiting starts; nothing running was stopped meanwhile.
    let leaving = ["eng-a", "eng-b", "eng-c"].into_iter().find(|n| *n != waiting).unwrap();
    let staying = ["eng-a", "eng-b", "eng-c"].into_iter().find(|n| *n != waiting && *n != leaving).unwrap();
    let staying_container = ws[staying]["container"]["id"].clone();
    let members: Vec<&str> = ["a", "b", "c"].into_iter().filter(|m| format!("eng-{m}") != leaving).collect();
    op.write("team.yaml", &with_quota(&members));
    let ws = op.wait("the waiting one starts", CONVERGE, |ws| {
        ws.get(waiting).is_some_and(online) && !ws.contains_key(leaving)
    });
    assert_eq!(ws[staying]["container"]["id"], staying_container);
    wait_containers(&op, 2);
}

/// 401s the registry answered so far (from /metrics).
fn registry_401s(op: &Op) -> u64 {
    op.metric_sum("molecule_registry_requests_total", &["/registry/", "code=\"401\""])
}

#[test]
fn live_rotation_replaces_the_token_without_a_restart_or_a_single_401() {
    if !docker_available() {
        return;
    }
    let mut op = Op::new("rotate");
    op.write("dev.yaml", &format!("{}  tokenPolicy:\n    rotateEvery: 3s\n    overlap: 2s\n", workspace_yaml("dev")));
    op.start();
    let ws = op.wait_online(&["dev"], UP);
    let container = ws["dev"]["container"]["id"].clone();
    let incarnation = ws["dev"]["incarnation"].clone();
    let mut prefixes = vec![ws["dev"]["token"]["prefix"].as_str().unwrap().to_string()];
    let t0 = std::time::Instant::now();
    while prefixes.len() < 4 && t0.elapsed() < Duration::from_secs(40) {
        if let Some(ws) = op.get()
            && let Some(p) = ws["dev"]["token"]["prefix"].as_str()
            && prefixes.last().map(String::as_str) != Some(p)
        {
            prefixes.push(p.to_string());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(prefixes.len() >= 4, "at least 3 rotations: {prefixes:?}");
    // The agent kept heartbeating on the new tokens: online, heartbeat fresh.
    let ws = op.wait("still online after rotations", CONVERGE, |ws| online(&ws["dev"]));
    assert_eq!(ws["dev"]["container"]["id"], container, "rotation never restarts the container");
    assert_eq!(ws["dev"]["incarnation"], incarnation, "nor makes a new incarnation");
    assert_eq!(registry_401s(&op), 0, "the agent never saw a 401");
    // Old tokens are revoked as `rotated` once their overlap ends; the file's token works.
    let (tok, _, _) = read_token(ws["dev"]["container"]["id"].as_str().unwrap()).unwrap();
    let uid = ws["dev"]["uid"].as_str().unwrap();
    assert_eq!(registry(&op.url(), "/registry/heartbeat", &tok, uid), 200);
    let describe = String::from_utf8(op.cli(&["describe", "workspace", "dev"]).stdout).unwrap();
    assert!(describe.contains("rotated"), "{describe}");
    assert!(!describe.contains(&tok));
    // The 401 count above is real: one bad heartbeat shows up in it.
    assert_eq!(registry(&op.url(), "/registry/heartbeat", "x", uid), 401);
    assert_eq!(registry_401s(&op), 1);
}

fn env_of(w: &Value) -> Vec<String> {
    docker(&["inspect", "-f", "{{range .Config.Env}}{{println .}}{{end}}", w["container"]["id"].as_str().unwrap()])
        .lines()
        .map(str::to_string)
        .collect()
}

#[test]
fn secrets_override_by_scope_restart_only_their_users_and_never_leak() {
    if !docker_available() {
        return;
    }
    let mut op = Op::new("secrets");
    op.write("team.yaml", &team("Running", &["a", "b"]));
    op.write_ws("solo");
    op.start();
    op.wait_online(&["eng-a", "eng-b", "solo"], UP);
    let set = |args: &[&str]| {
        let out = op.cli(&[&["secret", "set"], args].concat());
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    };
    let (g, t, own, t2) = ("global-value-7f3a", "team-value-19cd", "own-value-5e21", "team-value-rotated-88aa");
    set(&["SHARED", "--value", g]);
    set(&["TEAM_ONLY", "--value", t, "--team", "eng"]);
    set(&["SHARED", "--value", own, "--workspace", "eng-a"]);
    let ws = op.wait("secrets delivered", CONVERGE, |ws| {
        ws.values().all(online)
            && env_of(&ws["eng-a"]).contains(&format!("SHARED={own}"))
            && env_of(&ws["eng-b"]).contains(&format!("TEAM_ONLY={t}"))
            && env_of(&ws["solo"]).contains(&format!("SHARED={g}"))
    });
    assert!(env_of(&ws["eng-a"]).contains(&format!("TEAM_ONLY={t}")));
    assert!(
        env_of(&ws["eng-b"]).contains(&format!("SHARED={g}")),
        "the team member without its own value gets the global one"
    );
    assert!(!env_of(&ws["solo"]).iter().any(|l| l.starts_with("TEAM_ONLY=")), "a team secret stays in its team");

    // Changing the team secret recreates exactly the team's members.
    let before: BTreeMap<String, i64> =
        ws.iter().map(|(n, w)| (n.clone(), w["incarnation"].as_i64().unwrap())).collect();
    set(&["TEAM_ONLY", "--team", "eng", "--value", t2]);
    let ws = op.wait("team members recreated", CONVERGE, |ws| {
        ["eng-a", "eng-b"].iter().all(|n| online(&ws[*n]) && env_of(&ws[*n]).contains(&format!("TEAM_ONLY={t2}")))
    });
    assert!(ws["eng-a"]["incarnation"].as_i64() > Some(before["eng-a"]));
    assert_eq!(ws["solo"]["incarnation"].as_i64(), Some(before["solo"]), "solo does not use it and is untouched");

    // Listed by name and version, never by value; no value anywhere a person looks.
    let list = String::from_utf8(op.cli(&["secret", "list"]).stdout).unwrap();
    assert!(list.contains("TEAM_ONLY") && list.contains("team:default/eng"), "{list}");
    let json = String::from_utf8(op.cli(&["get", "workspaces", "-o", "json"]).stdout).unwrap();
    let describe = String::from_utf8(op.cli(&["describe", "workspace", "eng-a"]).stdout).unwrap();
    for v in [g, t, own, t2] {
        for (what, text) in
            [("list", &list), ("get -o json", &json), ("describe", &describe), ("operator log", &op.logs())]
        {
            assert!(!text.contains(v), "secret value found in {what}");
        }
    }
    let db = std::fs::read(op.state.join("state.db")).unwrap();
    assert!(!db.windows(t2.len()).any(|w| w == t2.as_bytes()), "the database holds only ciphertext");
}

#[test]
fn on_resume_reissue_gives_a_thawed_workspace_a_new_token_without_recreating_it() {
    if !docker_available() {
        return;
    }
    let mut op = Op::new("onresume");
    let yaml = |mode: &str| {
        format!("{}  operatingMode: {mode}\n  tokenPolicy:\n    onResume: Reissue\n", workspace_yaml("dev"))
    };
    op.write("dev.yaml", &yaml("Running"));
    op.start();
    let ws = op.wait_online(&["dev"], UP);
    let id = ws["dev"]["container"]["id"].as_str().unwrap().to_string();
    let (old, _, _) = read_token(&id).unwrap();
    op.write("dev.yaml", &yaml("Paused"));
    op.wait("paused", CONVERGE, |ws| ws["dev"]["phase"] == "Paused");
    op.write("dev.yaml", &yaml("Running"));
    let ws = op.wait("resumed on a new token", CONVERGE, |ws| {
        online(&ws["dev"]) && ws["dev"]["token"]["prefix"].as_str() != Some(&old[..8])
    });
    assert_eq!(ws["dev"]["container"]["id"].as_str(), Some(id.as_str()), "the same container, thawed");
    let uid = ws["dev"]["uid"].as_str().unwrap();
    assert_eq!(registry(&op.url(), "/registry/heartbeat", &old, uid), 401);
    let (new, _, _) = read_token(&id).unwrap();
    assert_eq!(registry(&op.url(), "/registry/heartbeat", &new, uid), 200);
}
