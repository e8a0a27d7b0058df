//! Crash consistency at every step: the operator is started with
//! `MOLECULE_FAILPOINT=<point>`, driven through the flow that reaches the point
//! (provision, recreate, token reissue, rotation, pause/resume, removal, a warm-pool
//! claim), aborts
//! there, and is started again without it. After that restart the end state is the
//! declared one, with no duplicate container and no live token without its
//! container: exactly one container, its token file holds a live token the registry
//! accepts, and every other unrevoked token is inside a rotation overlap; or, for a
//! removal, no container, no volume, no unrevoked token and no record.
//!
//! A unit test checks that every point the executor knows (`FAILPOINTS`) is crashed
//! at by one of the flows here (or is named in `NOT_REACHED` with the reason).

mod support;

use std::time::Duration;

use support::operator::*;

const UP: Duration = Duration::from_secs(90);

#[derive(Clone, Copy, Debug, PartialEq)]
enum Flow {
    /// First provision of a new workspace.
    Provision,
    /// An env change recreates it: the second provision crashes (`@2`).
    Recreate,
    /// The token file is overwritten: a reissue.
    Reissue,
    /// rotateEvery 2s, overlap 1s: rotation, then the overlap's end revokes by id.
    Rotate,
    /// Paused, then Running again.
    PauseResume,
    /// The file is deleted: revoke, remove container and volume, forget.
    Remove,
    /// A workspace naming a full warm pool of one claims its member.
    Claim,
}

const FLOWS: &[(Flow, &[&str])] = &[
    (
        Flow::Provision,
        &[
            "provision-after-bump",
            "provision-after-remove",
            "provision-after-create",
            "provision-after-issue",
            "provision-after-write",
            "provision-after-start",
            "after-provision",
        ],
    ),
    (Flow::Recreate, &["provision-after-bump@2", "provision-after-create@2", "provision-after-write@2"]),
    (Flow::Reissue, &["reissue-after-issue", "reissue-after-write", "after-reissue-token"]),
    (Flow::Rotate, &["rotate-after-issue", "rotate-after-write", "after-rotate-token", "after-revoke-token-ids"]),
    (Flow::PauseResume, &["after-pause", "after-unpause"]),
    (Flow::Remove, &["after-revoke-tokens", "after-remove-container", "after-remove-volume", "after-forget"]),
    (
        Flow::Claim,
        &["claim-after-store", "claim-after-issue", "claim-after-write", "claim-after-identity", "after-claim"],
    ),
];

/// Points no flow here reaches, and why they are safe to leave to unit tests.
const NOT_REACHED: &[(&str, &str)] = &[
    (
        "after-revoke-stale-tokens",
        "needs a token idle past its grace with no container while declared, which the provision rule \
         pre-empts; the single-statement UPDATE it follows is atomic",
    ),
    ("after-record-restart", "heartbeat restarts: the Provision that follows is covered by the Provision flow"),
    ("after-reset-restarts", "a counter reset; a crash after it only leaves the counter at zero"),
    (
        "after-suspend",
        "one record write; a crash after it leaves the suspension recorded and the pause rule carries it out on restart",
    ),
    (
        "after-lifetime-clock",
        "one record write; a crash after it leaves the clock as written (the next pass re-judges it)",
    ),
];

#[test]
fn every_failpoint_is_crashed_at_by_some_flow() {
    for point in molecule::execute::FAILPOINTS {
        let covered = FLOWS.iter().flat_map(|(_, ps)| ps.iter()).any(|p| p.split('@').next() == Some(*point));
        let excused = NOT_REACHED.iter().any(|(p, _)| p == point);
        assert!(covered || excused, "failpoint {point} is crashed at by no flow in tests/crash.rs");
    }
}

fn yaml(extra: &str) -> String {
    format!("{}{extra}", workspace_yaml("dev"))
}

fn sqlite(op: &Op, q: &str) -> String {
    let out = std::process::Command::new("sqlite3")
        .args(["-cmd", ".timeout 5000"])
        .arg(op.state.join("state.db"))
        .arg(q)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn run(flow: Flow, point: &str) {
    if flow == Flow::Claim {
        return run_claim(point);
    }
    let mut op = Op::new(&format!("crash-{}", point.replace(['@', '-'], "")));
    let spec = match flow {
        Flow::Rotate => "  tokenPolicy:\n    rotateEvery: 2s\n    overlap: 1s\n",
        _ => "",
    };
    op.write("dev.yaml", &yaml(spec));
    op.env = vec![("MOLECULE_FAILPOINT".into(), point.into())];
    op.start();
    // A rotation is due 2 s after the start: it may crash before the first status.
    if !matches!(flow, Flow::Provision | Flow::Rotate) {
        let ws = op.wait_online(&["dev"], UP);
        match flow {
            Flow::Recreate => op.write("dev.yaml", &yaml("").replace("ROLE: dev", "ROLE: changed")),
            Flow::Reissue => overwrite_token(ws["dev"]["container"]["id"].as_str().unwrap(), "not-a-token"),
            Flow::PauseResume => {
                op.write("dev.yaml", &yaml("  operatingMode: Paused\n"));
                if point == "after-unpause" {
                    op.wait("paused", UP, |ws| ws.get("dev").is_some_and(|w| w["phase"] == "Paused"));
                    op.write("dev.yaml", &yaml("  operatingMode: Running\n"));
                }
            }
            Flow::Remove => op.remove_file("dev.yaml"),
            Flow::Provision | Flow::Rotate | Flow::Claim => {}
        }
    }
    assert!(op.wait_exit(UP), "the operator never reached failpoint {point}");
    assert!(op.logs().contains("failpoint reached"), "{point}: exited without reaching it:\n{}", op.logs());

    op.env.clear();
    if flow == Flow::PauseResume && point == "after-pause" {
        op.write("dev.yaml", &yaml("  operatingMode: Running\n"));
    }
    op.start();
    if flow == Flow::Remove {
        let t0 = std::time::Instant::now();
        loop {
            let gone = op.containers().is_empty()
                && op.volumes().is_empty()
                && sqlite(&op, "SELECT count(*) FROM workspace_auth_tokens WHERE revoked_at IS NULL") == "0"
                && op.get().is_some_and(|ws| !ws.contains_key("dev"));
            if gone {
                break;
            }
            assert!(t0.elapsed() < UP, "{point}: not fully removed after the restart:\n{}", op.logs());
            std::thread::sleep(Duration::from_millis(100));
        }
        return;
    }
    op.wait_online(&["dev"], UP);
    if flow == Flow::Recreate {
        op.wait("the change applied", UP, |ws| {
            ws.get("dev").is_some_and(|w| online(w) && w["incarnation"].as_i64() >= Some(2))
        });
    }
    // The status may still say Running from before the crash: poll until the
    // invariants hold (or say which one never did).
    let t0 = std::time::Instant::now();
    loop {
        let ws = op.get().unwrap();
        let containers = op.containers().len();
        let token = read_token(ws["dev"]["container"]["id"].as_str().unwrap_or("none")).map(|t| t.0);
        let uid = ws["dev"]["uid"].as_str().unwrap_or_default();
        let accepted = token.as_ref().map(|t| registry(&op.url(), "/registry/heartbeat", t, uid));
        // Live tokens without an expiry: exactly the one in the container (a rotation's
        // previous token may still be inside its overlap, with an expiry).
        let open =
            sqlite(&op, "SELECT count(*) FROM workspace_auth_tokens WHERE revoked_at IS NULL AND expires_at IS NULL");
        if containers == 1 && accepted == Some(200) && open == "1" {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "{point}: after the restart: {containers} container(s), the file's token answered {accepted:?}, \
             {open} live token(s) without an expiry\n{}",
            op.logs()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

const POOL: &str = "apiVersion: molecule.ai/v1alpha1
kind: WarmPool
metadata:
  name: agents
spec:
  size: 1
  template:
    runtime: langgraph
    tier: 1
";

/// `get warmpools -o json`: (ready, claimed) of default/agents.
fn pool(op: &Op) -> Option<(u64, u64)> {
    let out = op.cli(&["get", "warmpools", "-o", "json"]);
    let all: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).ok()?;
    let p = all.iter().find(|p| p["name"] == "agents")?;
    Some((p["ready"].as_u64()?, p["claimed"].as_u64()?))
}

/// A crash at each step of a claim: after the restart the workspace is online in the
/// member it claimed (not replaced: incarnation 1), with one live token, the one in
/// the file; the pool is refilled and no member is left over.
fn run_claim(point: &str) {
    let mut op = Op::new(&format!("crash-{}", point.replace(['@', '-'], "")));
    op.write("pool.yaml", POOL);
    op.env = vec![("MOLECULE_FAILPOINT".into(), point.into())];
    op.start();
    wait_until("the pool to fill", UP, || pool(&op) == Some((1, 0)));
    let members = op.containers();
    assert_eq!(members.len(), 1, "{members:?}");
    op.write("dev.yaml", &yaml("  warmPool: agents\n"));
    assert!(op.wait_exit(UP), "the operator never reached failpoint {point}");
    assert!(op.logs().contains("failpoint reached"), "{point}: exited without reaching it:\n{}", op.logs());

    op.env.clear();
    op.start();
    let t0 = std::time::Instant::now();
    loop {
        let ws = op.get().unwrap_or_default();
        let dev = ws.get("dev").cloned().unwrap_or_default();
        let cid = dev["container"]["id"].as_str().unwrap_or("none").to_string();
        let token = read_token(&cid).map(|t| t.0);
        let uid = dev["uid"].as_str().unwrap_or_default();
        let accepted = token.as_ref().map(|t| registry(&op.url(), "/registry/heartbeat", t, uid));
        let open =
            sqlite(&op, "SELECT count(*) FROM workspace_auth_tokens WHERE revoked_at IS NULL AND expires_at IS NULL");
        let in_member = members.iter().any(|m| cid.starts_with(m.as_str()));
        let containers = op.containers().len();
        let refilled = pool(&op);
        if online(&dev)
            && in_member
            && dev["incarnation"] == 1
            && accepted == Some(200)
            && open == "1"
            && refilled == Some((1, 1))
            && containers == 2
        {
            break;
        }
        assert!(
            t0.elapsed() < UP,
            "{point}: after the restart: online {}, in the claimed member {in_member} ({cid}), incarnation {}, \
             the file's token answered {accepted:?}, {open} live token(s), pool (ready, claimed) {refilled:?}, \
             {containers} container(s)\n{}",
            online(&dev),
            dev["incarnation"],
            op.logs()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let log = String::from_utf8(op.cli(&["describe", "workspace", "dev"]).stdout).unwrap();
    assert!(!log.contains("provision a new incarnation"), "{point}: the member was replaced:\n{log}");
    // Mid-claim, the claim was carried out again; after it, nothing was left to do.
    assert_eq!(log.contains("was not finished"), point != "after-claim", "{point}:\n{log}");
}

fn run_flow(flow: Flow) {
    if !docker_available() {
        return;
    }
    let (_, points) = FLOWS.iter().find(|(f, _)| *f == flow).unwrap();
    for point in *points {
        run(flow, point);
    }
}

#[test]
fn crash_during_the_first_provision() {
    run_flow(Flow::Provision);
}

#[test]
fn crash_during_a_recreate() {
    run_flow(Flow::Recreate);
}

#[test]
fn crash_during_a_token_reissue() {
    run_flow(Flow::Reissue);
}

#[test]
fn crash_during_a_rotation() {
    run_flow(Flow::Rotate);
}

#[test]
fn crash_during_pause_and_resume() {
    run_flow(Flow::PauseResume);
}

#[test]
fn crash_during_a_removal() {
    run_flow(Flow::Remove);
}

#[test]
fn crash_during_a_warm_pool_claim() {
    run_flow(Flow::Claim);
}
