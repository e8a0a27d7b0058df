//! What an operator holding credentials must never do, checked on a real run:
//! - every file it keeps in its state directory is private (0600, or 0700 for
//!   directories), and it listens on loopback unless told otherwise;
//! - no token or secret value reaches any log: the operator's own (at debug level)
//!   and every agent's, across provisioning, a secret change, live rotations, a
//!   token-file reissue and an operator restart.

mod support;

use std::collections::BTreeSet;
use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use support::operator::*;

const UP: Duration = Duration::from_secs(90);

#[test]
fn the_registry_listens_on_loopback_by_default() {
    let out = std::process::Command::new(BIN).args(["up", "--help"]).output().unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(help.contains("[default: 127.0.0.1:8080]"), "{help}");
}

fn private_files(dir: &std::path::Path, bad: &mut Vec<String>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let entry = entry.unwrap();
        let meta = std::fs::symlink_metadata(entry.path()).unwrap();
        let mode = meta.permissions().mode() & 0o777;
        if meta.is_dir() {
            if mode & 0o077 != 0 {
                bad.push(format!("{} is a directory with mode {mode:o}", entry.path().display()));
            }
            private_files(&entry.path(), bad);
        } else if mode & 0o077 != 0 {
            bad.push(format!("{} has mode {mode:o}", entry.path().display()));
        }
    }
}

#[test]
fn state_files_are_private_and_no_token_or_secret_reaches_a_log() {
    if !docker_available() {
        return;
    }
    let mut op = Op::new("nolog");
    op.extra = vec!["--kube-api".into(), "127.0.0.1:0".into()];
    op.write_ws("plain");
    op.write(
        "rotating.yaml",
        &format!("{}  tokenPolicy:\n    rotateEvery: 2s\n    overlap: 1s\n", workspace_yaml("rotating")),
    );
    op.start();
    op.wait_online(&["plain", "rotating"], UP);
    let secret = "sk-live-do-not-log-4b1d9e";
    let out = op.cli(&["secret", "set", "API_KEY", "--value", secret]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    // Collect every token the containers hold over a while: rotations every 2 s,
    // a reissue after the plain one's file is overwritten, and what comes after a
    // restart of the operator.
    let mut tokens = BTreeSet::new();
    let mut containers = BTreeSet::new();
    let mut collect = |op: &Op, tokens: &mut BTreeSet<String>| {
        if let Some(ws) = op.get() {
            for w in ws.values() {
                if let Some(id) = w["container"]["id"].as_str() {
                    containers.insert(id.to_string());
                    if let Some((t, _, _)) = read_token(id) {
                        tokens.insert(t);
                    }
                }
            }
        }
    };
    let t0 = std::time::Instant::now();
    while t0.elapsed() < Duration::from_secs(6) {
        collect(&op, &mut tokens);
        std::thread::sleep(Duration::from_millis(250));
    }
    // The global secret recreated both: take the current container.
    let ws = op.wait_online(&["plain", "rotating"], UP);
    overwrite_token(ws["plain"]["container"]["id"].as_str().unwrap(), "junk-written-by-hand");
    op.wait("plain reissued", UP, |ws| ws.get("plain").is_some_and(online));
    op.stop();
    op.start();
    op.wait_online(&["plain", "rotating"], UP);
    let t0 = std::time::Instant::now();
    while t0.elapsed() < Duration::from_secs(4) {
        collect(&op, &mut tokens);
        std::thread::sleep(Duration::from_millis(250));
    }
    assert!(tokens.len() >= 4, "rotations and the reissue gave only {} distinct tokens", tokens.len());

    let mut logs = op.logs();
    for id in &containers {
        // The agent logs to stderr, which `docker logs` passes on as its own stderr.
        if let Ok(out) = std::process::Command::new("docker").args(["logs", id]).output() {
            logs.push_str(&String::from_utf8_lossy(&out.stdout));
            logs.push_str(&String::from_utf8_lossy(&out.stderr));
        }
    }
    // The agent logs as much as the operator: make sure there is something to search.
    assert!(logs.contains("molecule-agent: token loaded"), "no agent log to search:\n{logs}");
    for t in &tokens {
        assert!(!logs.contains(t.as_str()), "a token ({}…) appears in a log", &t[..8]);
    }
    assert!(!logs.contains(secret), "the secret's value appears in a log");
    // Nor in `describe` or `get -o json`.
    for args in [&["describe", "workspace", "plain"][..], &["get", "workspaces", "-o", "json"][..]] {
        let out = String::from_utf8_lossy(&op.cli(args).stdout).to_string();
        assert!(!out.contains(secret) && tokens.iter().all(|t| !out.contains(t.as_str())), "{args:?} shows a value");
    }

    let mut bad = Vec::new();
    private_files(&op.state, &mut bad);
    assert!(bad.is_empty(), "state files readable by others:\n{}", bad.join("\n"));
}
