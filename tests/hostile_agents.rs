//! What a hostile agent cannot do, against the real Docker daemon:
//! - steal other workspaces' tokens: with the operator stopped, a hostile process in
//!   one workspace's network namespace, listening where its agent sends its
//!   heartbeats, receives no request of any agent (on the default network,
//!   src/runtime/network.rs; with `--network host` it receives every agent's token);
//! - reach the admin API or anything else on the host's loopback (on the gateway:
//!   only the registry and `/healthz`); `--network host` is still there, as an
//!   explicit choice;
//! - make the operator do unbounded work: a 1 GiB token file does not grow the
//!   operator's memory (it is read no further than 4 KiB, a mismatch, and replaced),
//!   and a flood of 401s naming a workspace reads its token file at most once a second.
//!
//! The hostile process and the probes are the agent binary's hidden test modes
//! (`--test-listen`, `--test-probe`), run in a workspace's namespace with
//! `docker run --network container:<id>`, as unprivileged as the agent.

mod support;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use support::operator::*;

/// The image `container` runs, by id: the agent this operator built. (Other checkouts
/// sharing the daemon may have re-tagged `molecule-agent:local` with their own agent.)
fn image_of(container: &str) -> String {
    docker(&["inspect", "-f", "{{.Image}}", container])
}

/// Runs one of the agent's test modes in `container`'s network namespace, as the agent
/// runs (user 65534, no capabilities), and returns what it printed.
fn in_namespace_of(container: &str, args: &[&str]) -> String {
    let out = std::process::Command::new("docker")
        .args(["run", "--rm", "--network", &format!("container:{container}"), "--user", "65534:65534"])
        .args(["--cap-drop", "ALL", "--security-opt", "no-new-privileges:true", &image_of(container)])
        .args(args)
        .output()
        .expect("docker runs");
    assert!(out.status.success(), "docker run {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// GET `url` from inside `container`'s network namespace: `HTTP <code>` or `unreachable: ...`.
fn probe(container: &str, url: &str) -> String {
    in_namespace_of(container, &["--test-probe", url])
}

/// The registry URL the operator gave a container (`MOLECULE_REGISTRY_URL`), as
/// (host, port).
fn registry_of(container: &str) -> (String, u16) {
    let env = docker(&["inspect", "-f", "{{range .Config.Env}}{{println .}}{{end}}", container]);
    let url = env
        .lines()
        .find_map(|l| l.strip_prefix("MOLECULE_REGISTRY_URL="))
        .unwrap_or_else(|| panic!("no MOLECULE_REGISTRY_URL in {container}'s env: {env}"));
    let authority = url.strip_prefix("http://").unwrap().trim_end_matches('/');
    let (host, port) = authority.rsplit_once(':').unwrap();
    (host.to_string(), port.parse().unwrap())
}

fn network_mode(container: &str) -> String {
    docker(&["inspect", "-f", "{{.HostConfig.NetworkMode}}", container])
}

/// A detached container, removed at the end of the test (also on failure).
struct Detached(String);

impl Drop for Detached {
    fn drop(&mut self) {
        docker(&["rm", "-f", &self.0]);
    }
}

/// Reads one HTTP request and returns its body's `workspace_id` (or `-`); answers 503,
/// so agents keep retrying.
fn read_request(mut conn: TcpStream) -> std::io::Result<String> {
    conn.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut reader = BufReader::new(conn.try_clone()?);
    let mut length = 0u64;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 || line.trim().is_empty() {
            break;
        }
        if let Some((name, value)) = line.split_once(':')
            && name.eq_ignore_ascii_case("content-length")
        {
            length = value.trim().parse().unwrap_or(0);
        }
    }
    let mut body = String::new();
    reader.take(length.min(16 * 1024)).read_to_string(&mut body)?;
    conn.write_all(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")?;
    let id = body.split("\"workspace_id\"").nth(1).and_then(|r| r.split('"').nth(1)).unwrap_or("-");
    Ok(id.to_string())
}

/// The workspace ids of the requests a listener on the host received, if it could
/// listen at `addr` (it cannot when a hostile listener holds the address on the host
/// network: then that one's log is the witness).
fn witness(addr: &str) -> Option<Arc<Mutex<Vec<String>>>> {
    let listener = TcpListener::bind(addr).ok()?;
    let seen = Arc::new(Mutex::new(Vec::new()));
    let record = seen.clone();
    std::thread::spawn(move || {
        for conn in listener.incoming().flatten() {
            if let Ok(id) = read_request(conn) {
                record.lock().unwrap().push(id);
            }
        }
    });
    Some(seen)
}

#[test]
fn with_the_operator_stopped_a_listener_inside_a_workspace_receives_no_other_workspaces_token() {
    if !docker_available() {
        return;
    }
    let (mut op, ws) = online_op("hostile", &["a", "b"], &[]);
    let (a, b) = (&ws["a"], &ws["b"]);
    let (a_id, b_uid) = (a["container"]["id"].as_str().unwrap().to_string(), b["uid"].as_str().unwrap().to_string());
    let b_prefix = b["token"]["prefix"].as_str().unwrap().to_string();
    let (host, port) = registry_of(&a_id);
    assert_eq!(registry_of(b["container"]["id"].as_str().unwrap()), (host.clone(), port), "one registry URL");

    // Ctrl-C, as the README allows: the containers keep running and their agents retry.
    op.stop();
    // The hostile process: in a's network namespace, as unprivileged as a's agent,
    // listening on every address of that namespace at the registry's port.
    let hostile = Detached(format!("{}-hostile", op.instance));
    let started = docker(&[
        "run",
        "-d",
        "--name",
        &hostile.0,
        "--network",
        &format!("container:{a_id}"),
        "--user",
        "65534:65534",
        "--cap-drop",
        "ALL",
        "--security-opt",
        "no-new-privileges:true",
        &image_of(&a_id),
        "--test-listen",
        &format!("0.0.0.0:{port}"),
    ]);
    assert!(!started.is_empty(), "the hostile listener starts");
    let hostile_log = || docker(&["logs", &hostile.0]);
    let t0 = Instant::now();
    while !hostile_log().contains("listening on") {
        assert!(!hostile_log().contains("cannot listen"), "{}", hostile_log());
        assert!(t0.elapsed() < Duration::from_secs(20), "the hostile listener never listened: {}", hostile_log());
        std::thread::sleep(Duration::from_millis(100));
    }
    // It really answers there: a request from inside the namespace reaches it.
    assert_eq!(probe(&a_id, &format!("http://127.0.0.1:{port}/registry/heartbeat")), "HTTP 200");

    // b's agent keeps retrying where it was told to: a listener on the host at that
    // address sees it (on the host network the hostile one holds that address).
    let seen_on_host = witness(&format!("{host}:{port}"));
    let requests_of = |uid: &str| -> usize {
        let hostile = hostile_log().lines().filter(|l| l.contains(&format!("workspace_id={uid}"))).count();
        let host = seen_on_host.as_ref().map_or(0, |s| s.lock().unwrap().iter().filter(|id| *id == uid).count());
        hostile + host
    };
    let t0 = Instant::now();
    while requests_of(&b_uid) < 3 {
        assert!(t0.elapsed() < Duration::from_secs(30), "b's agent did not retry within 30 s");
        std::thread::sleep(Duration::from_millis(100));
    }
    let log = hostile_log();
    let stolen: Vec<&str> = log.lines().filter(|l| l.contains(&b_uid) || l.contains(&b_prefix)).collect();
    assert!(
        stolen.is_empty(),
        "the hostile listener in a's namespace received {} of b's requests, with its token (prefix {b_prefix})",
        stolen.len()
    );
    let a_uid = a["uid"].as_str().unwrap();
    assert!(!log.contains(a_uid), "not even a's own agent talks to it: {log}");
}

#[test]
fn a_workspace_reaches_neither_the_admin_api_nor_the_hosts_loopback() {
    if !docker_available() {
        return;
    }
    let (op, ws) = online_op("noadmin", &["a"], &[]);
    let a = ws["a"]["container"]["id"].as_str().unwrap().to_string();
    let (gateway, port) = registry_of(&a);
    assert_eq!(port, op.port, "agents use the --listen port, on the gateway");
    assert_ne!(gateway, "127.0.0.1");
    assert_eq!(network_mode(&a), format!("molecule-{}", op.instance), "the operator's own network by default");

    // The operator's admin API listens on the host's loopback: not the workspace's.
    let admin = probe(&a, &format!("http://127.0.0.1:{}/api/v1/workspaces", op.port));
    assert!(admin.starts_with("unreachable"), "the admin API on 127.0.0.1 answered a workspace: {admin}");
    // Nor anything else on the host's loopback (a local database, say).
    let local_service = TcpListener::bind("127.0.0.1:0").unwrap();
    let local_port = local_service.local_addr().unwrap().port();
    for url in [format!("http://127.0.0.1:{local_port}/"), format!("http://{gateway}:{local_port}/")] {
        let got = probe(&a, &url);
        assert!(got.starts_with("unreachable"), "{url} answered a workspace: {got}");
    }
    // On the gateway, the registry and liveness only.
    for path in ["/api/v1/workspaces", "/api/v1/secrets", "/metrics", "/readyz"] {
        assert_eq!(probe(&a, &format!("http://{gateway}:{port}{path}")), "HTTP 404", "{path} on the gateway");
    }
    assert_eq!(probe(&a, &format!("http://{gateway}:{port}/healthz")), "HTTP 200");
    // The host still has everything on --listen.
    let out = op.cli(&["get", "workspaces"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn the_host_network_is_an_explicit_choice_and_still_works() {
    if !docker_available() {
        return;
    }
    let (op, ws) = online_op("hostnet", &["a"], &["--network", "host"]);
    let a = ws["a"]["container"]["id"].as_str().unwrap();
    assert_eq!(network_mode(a), "host");
    assert_eq!(registry_of(a), ("127.0.0.1".to_string(), op.port));
    assert!(op.networks().is_empty(), "no network of its own on the host network");
}

/// The process's peak resident set (VmHWM), in KiB.
fn peak_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("the operator's /proc status");
    let line = status.lines().find(|l| l.starts_with("VmHWM:")).expect("VmHWM in /proc/PID/status");
    line.split_whitespace().nth(1).and_then(|n| n.parse().ok()).expect("VmHWM in kB")
}

#[test]
fn a_huge_token_file_costs_the_operator_no_memory_and_is_replaced() {
    if !docker_available() {
        return;
    }
    let (op, ws) = online_op("hugefile", &["big"], &[]);
    let (id, prefix) = (ws["big"]["container"]["id"].as_str().unwrap(), ws["big"]["token"]["prefix"].clone());
    let volume = format!("{}-configs", ws["big"]["container"]["name"].as_str().unwrap());
    let pid = op.pid().unwrap();
    let before = peak_rss_kib(pid);

    // Whatever runs in the workspace (its user, its volume) makes the token file 1 GiB
    // long (sparse: it costs no disk, and reads as 1 GiB of zeros).
    let out = docker(&[
        "run",
        "--rm",
        "--user",
        "65534:65534",
        "--cap-drop",
        "ALL",
        "-v",
        &format!("{volume}:/configs"),
        &image_of(id),
        "--test-fill",
        "/configs/.auth_token",
        "1073741824",
    ]);
    assert!(out.ends_with("is now 1073741824 bytes"), "{out}");
    // The agent finds no token there and is refused; the refusal makes the operator
    // read the file: a mismatch, replaced by a new token, and the agent is back.
    op.wait("big online on a new token", Duration::from_secs(60), |ws| {
        ws.get("big").is_some_and(|w| online(w) && w["token"]["prefix"] != prefix)
    });
    let (token, _, _) = read_token(id).expect("a token file again");
    assert_eq!(token.len(), 43, "the huge file was replaced by a token");
    let grown_mib = peak_rss_kib(pid).saturating_sub(before) / 1024;
    eprintln!("MEASURE peak RSS growth over a 1 GiB token file: {grown_mib} MiB");
    assert!(grown_mib < 100, "the operator's peak memory grew by {grown_mib} MiB over a 1 GiB token file");
    assert!(op.logs().contains("the token file holds no live token"), "read as a mismatch");
}

#[test]
fn refusals_read_a_workspaces_token_file_at_most_once_a_second() {
    if !docker_available() {
        return;
    }
    let (op, ws) = online_op("401flood", &["w"], &[]);
    let (id, uid) = (ws["w"]["container"]["id"].as_str().unwrap(), ws["w"]["uid"].as_str().unwrap());
    let unix_now = || std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs_f64();
    let since = unix_now();
    let t0 = Instant::now();
    let triggers_before = op.metric_sum("molecule_reconcile_triggers_total", &["registry-401"]);

    // Anyone may send requests naming the workspace with a wrong token: 25 over ~2.5 s
    // (within the failure limiter's burst, so each is a 401 and queues a reconcile).
    let wrong = "A".repeat(43);
    for _ in 0..25 {
        assert_eq!(registry(&op.url(), "/registry/heartbeat", &wrong, uid), 401);
        std::thread::sleep(Duration::from_millis(100));
    }
    let waited = Instant::now();
    while op.metric_sum("molecule_reconcile_triggers_total", &["registry-401"]) < triggers_before + 25 {
        assert!(waited.elapsed() < Duration::from_secs(10), "the 401s did not all queue a reconcile");
        std::thread::sleep(Duration::from_millis(50));
    }
    // A reconcile queued by the last refusal may still be reading: counting events up
    // to now, the promise is at most one read per second since the first refusal, plus
    // the one it may start at once.
    let elapsed = t0.elapsed().as_secs_f64();
    let until = format!("{:.3}", unix_now());
    let reads = docker(&[
        "events",
        "--since",
        &format!("{since:.3}"),
        "--until",
        &until,
        "--filter",
        &format!("container={id}"),
        "--filter",
        "event=archive-path",
        "--format",
        "{{.Action}}",
    ]);
    let reads = reads.lines().filter(|l| !l.trim().is_empty()).count();
    assert!(reads >= 1, "a refusal reads the token file (a broken file is found that way)");
    let bound = elapsed.ceil() as usize + 1;
    eprintln!("MEASURE {reads} reads of the token file in {elapsed:.1} s of refusals");
    assert!(reads <= bound, "{reads} reads of the token file in {elapsed:.1} s of refusals (at most {bound})");
}
