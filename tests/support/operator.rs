//! Runs a real operator (`molecule-operator up`) against the real Docker daemon for
//! one test: its own org dir, state dir, port and instance id, and a guard that
//! removes its containers and volumes at the end, also on failure.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

pub const BIN: &str = env!("CARGO_BIN_EXE_molecule-operator");

/// Docker must be there. In CI a missing daemon fails the test; locally it skips.
pub fn docker_available() -> bool {
    let ok = Command::new("docker")
        .args(["info", "--format", "{{.ServerVersion}}"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        if std::env::var("CI").is_ok_and(|v| v == "true") {
            panic!("Docker is required (CI=true) but `docker info` failed: is the daemon running?");
        }
        eprintln!("skipping: Docker is not available");
    }
    ok
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

pub fn docker(args: &[&str]) -> String {
    let out = Command::new("docker").args(args).output().expect("docker runs");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

pub fn docker_ok(args: &[&str]) -> bool {
    let run = || {
        Command::new("docker")
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    // Under heavy load Docker's `rm` on fuse-overlayfs fails now and then with
    // "device or resource busy" and succeeds when repeated: that is the daemon, not
    // what a test is about.
    let attempts = if args.first() == Some(&"rm") { 4 } else { 1 };
    (0..attempts).any(|i| {
        if i > 0 {
            std::thread::sleep(Duration::from_millis(250));
        }
        run()
    })
}

/// `docker rm -f` of every id in ONE command (an out-of-band removal, all at once).
/// fuse-overlayfs (this project's VMs) sometimes fails a removal with "directory not
/// empty": those containers are removed again until they are gone. Any other failure
/// fails the test.
pub fn remove_out_of_band(ids: &[&str]) {
    let out = Command::new("docker").args(["rm", "-f"]).args(ids).output().expect("docker runs");
    if out.status.success() {
        return;
    }
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    eprintln!("docker rm -f of {} containers: {stderr}", ids.len());
    for line in stderr.lines().filter(|l| !l.trim().is_empty()) {
        assert!(line.contains("directory not empty"), "docker rm -f failed: {line}");
    }
    for id in ids {
        let mut tries = 0;
        while docker_ok(&["inspect", id]) && !docker_ok(&["rm", "-f", id]) {
            tries += 1;
            assert!(tries < 10, "docker rm -f {id} keeps failing");
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

pub const WS: &str = "apiVersion: molecule.ai/v1alpha1
kind: Workspace
metadata:
  name: NAME
spec:
  runtime: langgraph
  tier: 1
  env:
    ROLE: NAME
";

pub fn workspace_yaml(name: &str) -> String {
    WS.replace("NAME", name)
}

pub struct Op {
    pub dir: tempfile::TempDir,
    pub state: PathBuf,
    _state_root: tempfile::TempDir,
    pub port: u16,
    pub instance: String,
    pub extra: Vec<String>,
    pub env: Vec<(String, String)>,
    /// `--heartbeat-seconds` (1 unless a test sets it).
    pub heartbeat_seconds: u64,
    /// `run --source ...` instead of `up DIR` when set.
    pub sources: Vec<String>,
    child: Option<Child>,
    pub log: PathBuf,
}

impl Op {
    pub fn new(test: &str) -> Self {
        let dir = tempfile::Builder::new().prefix("mol-org-").tempdir().unwrap();
        let state_root = tempfile::Builder::new().prefix("mol-state-").tempdir().unwrap();
        let state = state_root.path().join("state");
        let instance = format!(
            "t{}-{}",
            std::process::id(),
            test.chars().filter(|c| c.is_ascii_alphanumeric()).take(20).collect::<String>()
        );
        let log = state_root.path().join("operator.log");
        Self {
            dir,
            state,
            _state_root: state_root,
            port: free_port(),
            instance,
            extra: vec![],
            env: vec![],
            heartbeat_seconds: 1,
            sources: vec![],
            child: None,
            log,
        }
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn write(&self, file: &str, text: &str) {
        let p = self.dir.path().join(file);
        let tmp = self.dir.path().join(format!(".{file}.tmp"));
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(tmp, p).unwrap();
    }

    pub fn write_ws(&self, name: &str) {
        self.write(&format!("{name}.yaml"), &workspace_yaml(name));
    }

    pub fn remove_file(&self, file: &str) {
        std::fs::remove_file(self.dir.path().join(file)).unwrap();
    }

    /// The operator's command line (without the binary).
    fn args(&self) -> Vec<String> {
        let mut args = Vec::new();
        if self.sources.is_empty() {
            args.extend(["up".to_string(), self.dir.path().display().to_string()]);
        } else {
            args.push("run".into());
            for s in &self.sources {
                args.extend(["--source".to_string(), s.clone()]);
            }
        }
        args.extend(["--state".to_string(), self.state.display().to_string()]);
        args.extend(["--listen".to_string(), format!("127.0.0.1:{}", self.port)]);
        args.extend(["--instance".to_string(), self.instance.clone()]);
        args.extend(["--heartbeat-seconds".to_string(), self.heartbeat_seconds.to_string()]);
        args.extend(self.extra.iter().cloned());
        args
    }

    pub fn start(&mut self) {
        let mut cmd = Command::new(BIN);
        cmd.args(self.args());
        self.spawn(cmd);
    }

    /// Starts the operator on a pseudo-terminal (util-linux `script`), `columns` wide:
    /// what it draws there, control codes and all, goes to `self.log`.
    pub fn start_on_terminal(&mut self, columns: u16) {
        let quoted: Vec<String> = std::iter::once(BIN.to_string())
            .chain(self.args())
            .map(|a| format!("'{}'", a.replace('\'', "'\\''")))
            .collect();
        let mut cmd = Command::new("script");
        cmd.args(["-qfec", &quoted.join(" "), "/dev/null"]).env("COLUMNS", columns.to_string());
        self.spawn(cmd);
    }

    fn spawn(&mut self, mut cmd: Command) {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&self.log).unwrap();
        cmd.env("RUST_LOG", "info,molecule=debug").stdout(log.try_clone().unwrap()).stderr(log);
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        self.child = Some(cmd.spawn().expect("operator starts"));
    }

    /// SIGTERM and wait (graceful).
    pub fn stop(&mut self) {
        self.stop_within(Duration::from_secs(20));
    }

    /// SIGTERM, then SIGKILL if it has not exited within `grace`.
    pub fn stop_within(&mut self, grace: Duration) {
        if let Some(mut c) = self.child.take() {
            unsafe_kill(c.id(), "TERM");
            let t0 = Instant::now();
            while t0.elapsed() < grace {
                if c.try_wait().ok().flatten().is_some() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// The operator's process id while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Sends a signal (e.g. "STOP", "CONT") to the operator process.
    pub fn signal(&self, sig: &str) {
        if let Some(c) = &self.child {
            unsafe_kill(c.id(), sig);
        }
    }

    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Whether the operator process is still running (false once it exited, whatever the reason).
    pub fn running(&mut self) -> bool {
        self.child.as_mut().is_some_and(|c| c.try_wait().ok().flatten().is_none())
    }

    /// Waits for the operator process to exit on its own (e.g. a failpoint abort).
    pub fn wait_exit(&mut self, deadline: Duration) -> bool {
        let t0 = Instant::now();
        while t0.elapsed() < deadline {
            if let Some(c) = self.child.as_mut()
                && c.try_wait().ok().flatten().is_some()
            {
                self.child = None;
                return true;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        false
    }

    pub fn logs(&self) -> String {
        let mut s = String::new();
        if let Ok(mut f) = std::fs::File::open(&self.log) {
            let _ = f.read_to_string(&mut s);
        }
        s
    }

    pub fn cli(&self, args: &[&str]) -> std::process::Output {
        Command::new(BIN).args(args).arg("--state").arg(&self.state).args(["--server", &self.url()]).output().unwrap()
    }

    /// A CLI command that keeps printing (`events -w`, `logs -f`): the process, and
    /// its stdout's lines as they come.
    pub fn cli_lines(&self, args: &[&str]) -> (Child, std::sync::mpsc::Receiver<String>) {
        let mut child = Command::new(BIN)
            .args(args)
            .arg("--state")
            .arg(&self.state)
            .args(["--server", &self.url()])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let stdout = child.stdout.take().unwrap();
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        (child, rx)
    }

    /// `get workspaces -o json`, by name.
    pub fn get(&self) -> Option<BTreeMap<String, Value>> {
        let out = self.cli(&["get", "workspaces", "-o", "json"]);
        if !out.status.success() {
            return None;
        }
        let v: Vec<Value> = serde_json::from_slice(&out.stdout).ok()?;
        Some(v.into_iter().filter_map(|w| Some((w["name"].as_str()?.to_string(), w))).collect())
    }

    /// Polls `get` until `pred` holds; panics with the last state and the log tail.
    pub fn wait(
        &self,
        what: &str,
        deadline: Duration,
        pred: impl Fn(&BTreeMap<String, Value>) -> bool,
    ) -> BTreeMap<String, Value> {
        let t0 = Instant::now();
        let mut last = None;
        while t0.elapsed() < deadline {
            if let Some(ws) = self.get() {
                if pred(&ws) {
                    return ws;
                }
                last = Some(ws);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let logs = self.logs();
        let tail: String =
            logs.lines().rev().take(40).collect::<Vec<_>>().into_iter().rev().collect::<Vec<_>>().join("\n");
        panic!(
            "timed out after {deadline:?} waiting for {what}\nlast state: {}\nlog tail:\n{tail}",
            serde_json::to_string_pretty(&last).unwrap_or_default()
        );
    }

    /// Waits until every named workspace is Running with a heartbeat from its current container.
    pub fn wait_online(&self, names: &[&str], deadline: Duration) -> BTreeMap<String, Value> {
        self.wait(&format!("{names:?} online"), deadline, |ws| names.iter().all(|n| ws.get(*n).is_some_and(online)))
    }

    /// The containers (any state) of each workspace key (`ns/name`), by id, from Docker itself.
    pub fn container_ids_per_workspace(&self) -> BTreeMap<String, Vec<String>> {
        let out = docker(&[
            "ps",
            "-a",
            "--filter",
            &format!("label=ai.molecule.instance={}", self.instance),
            "--format",
            "{{.ID}} {{.Label \"ai.molecule.workspace\"}}",
        ]);
        let mut n: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for (id, w) in out.lines().filter_map(|l| l.split_once(' ')) {
            n.entry(w.to_string()).or_default().push(id.to_string());
        }
        n
    }

    /// How many containers (any state) each workspace key (`ns/name`) has, from Docker itself.
    pub fn containers_per_workspace(&self) -> BTreeMap<String, usize> {
        let by_key = self.container_ids_per_workspace().into_iter();
        by_key.filter(|(w, _)| !w.is_empty()).map(|(w, ids)| (w, ids.len())).collect()
    }

    /// Containers carrying this operator's instance label (any state).
    /// The sum of the samples of metric `name` whose labels contain every one of
    /// `having`, from `GET /metrics` (0 when it cannot be read).
    pub fn metric_sum(&self, name: &str, having: &[&str]) -> u64 {
        let out = Command::new("curl").args(["-s", &format!("{}/metrics", self.url())]).output().unwrap();
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| l.split(['{', ' ']).next() == Some(name) && having.iter().all(|h| l.contains(h)))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .sum()
    }

    pub fn containers(&self) -> Vec<String> {
        docker(&["ps", "-a", "-q", "--filter", &format!("label=ai.molecule.instance={}", self.instance)])
            .split_whitespace()
            .map(str::to_string)
            .collect()
    }

    pub fn volumes(&self) -> Vec<String> {
        docker(&["volume", "ls", "-q", "--filter", &format!("label=ai.molecule.instance={}", self.instance)])
            .split_whitespace()
            .map(str::to_string)
            .collect()
    }

    pub fn cleanup(&mut self) {
        // Gracefully where it can: an operator killed in the middle of creating a
        // container can leave Docker a stale endpoint that keeps the network forever.
        self.signal("CONT");
        self.stop_within(Duration::from_secs(10));
        let ids = self.containers();
        // A volume removed out of band at the instant its container is created is
        // re-created by Docker without labels: remove config volumes by name too.
        let names = if ids.is_empty() {
            String::new()
        } else {
            let mut args = vec!["inspect", "-f", "{{.Name}}"];
            args.extend(ids.iter().map(String::as_str));
            docker(&args)
        };
        if !ids.is_empty() {
            let mut args = vec!["rm", "-f", "-v"];
            args.extend(ids.iter().map(String::as_str));
            docker(&args);
        }
        // fuse-overlayfs fails a removal now and then ("directory not empty"): those
        // once more, one at a time (a container left would also keep the network).
        for id in self.containers() {
            docker_ok(&["rm", "-f", "-v", &id]);
        }
        for v in self.volumes() {
            docker(&["volume", "rm", "-f", &v]);
        }
        for name in names.lines() {
            docker(&["volume", "rm", "-f", &format!("{}-configs", name.trim_start_matches('/'))]);
        }
        // What the local node made for this instance's Pods (`--runtime kubernetes`).
        let node = format!("label=ai.molecule.node={}", self.instance);
        let pods: Vec<String> =
            docker(&["ps", "-aq", "--filter", &node]).split_whitespace().map(str::to_string).collect();
        if !pods.is_empty() {
            let mut args = vec!["rm", "-f"];
            args.extend(pods.iter().map(String::as_str));
            docker(&args);
        }
        for v in docker(&["volume", "ls", "-q", "--filter", &node]).split_whitespace() {
            docker(&["volume", "rm", "-f", v]);
        }
        for n in docker(&["network", "ls", "-q", "--filter", &node]).split_whitespace() {
            docker(&["network", "rm", n]);
        }
        // The workspaces' own network (runtime::network), once no container uses it:
        // Docker may take a moment to release the endpoints of containers just removed,
        // and a network left behind takes an address pool from every later test.
        for n in self.networks() {
            for _ in 0..25 {
                if docker_ok(&["network", "rm", &n]) {
                    break;
                }
                std::thread::sleep(Duration::from_millis(200));
            }
        }
    }

    /// Docker networks labelled with this operator's instance (its own network).
    pub fn networks(&self) -> Vec<String> {
        docker(&["network", "ls", "-q", "--filter", &format!("label=ai.molecule.instance={}", self.instance)])
            .split_whitespace()
            .map(str::to_string)
            .collect()
    }
}

/// The real kubectl against an operator's `--kube-api` (its STATE/kubeconfig), with a
/// private HOME.
pub struct Kubectl {
    pub kubeconfig: std::path::PathBuf,
    pub home: tempfile::TempDir,
}

impl Kubectl {
    pub fn new(op: &Op) -> Self {
        Self { kubeconfig: op.state.join("kubeconfig"), home: tempfile::tempdir().unwrap() }
    }

    pub fn run(&self, args: &[&str]) -> std::process::Output {
        Command::new("kubectl")
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .args(args)
            .env("HOME", self.home.path())
            .env("KUBECACHEDIR", self.home.path().join("cache"))
            .output()
            .expect("kubectl runs")
    }

    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(out.status.success(), "kubectl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).to_string()
    }

    /// `kubectl get WHAT -o json`, parsed; None when kubectl fails (e.g. not found).
    pub fn get_json(&self, what: &[&str]) -> Option<Value> {
        let mut args = vec!["get"];
        args.extend(what);
        args.extend(["-o", "json"]);
        let out = self.run(&args);
        out.status.success().then(|| serde_json::from_slice(&out.stdout).unwrap())
    }
}

/// An operator with the embedded Kubernetes API and its local node
/// (`--kube-api ADDR --runtime kubernetes`, plus `extra`, with `env` set), and kubectl
/// for it, once Node `local` is registered.
#[allow(dead_code)]
pub fn start_local_node(test: &str, extra: &[&str], env: &[(&str, &str)]) -> (Op, Kubectl) {
    let mut op = Op::new(test);
    op.extra = vec!["--kube-api".into(), format!("127.0.0.1:{}", free_port()), "--runtime".into(), "kubernetes".into()];
    op.extra.extend(extra.iter().map(|s| s.to_string()));
    op.env = env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    op.start();
    let k = Kubectl::new(&op);
    wait_until("the local node registered", Duration::from_secs(120), || {
        k.kubeconfig.exists() && k.run(&["get", "node", "local"]).status.success()
    });
    (op, k)
}

/// The running agent container of the Pod `pod_uid` on the local node.
#[allow(dead_code)]
pub fn pod_agent_container(pod_uid: &str) -> Option<String> {
    let ids = docker(&[
        "ps",
        "-q",
        "--filter",
        &format!("label=io.kubernetes.pod.uid={pod_uid}"),
        "--filter",
        "label=io.kubernetes.container.name=agent",
    ]);
    ids.lines().next().map(str::to_string)
}

/// `kubectl apply` of `yaml`; kubectl's output.
#[allow(dead_code)]
pub fn kubectl_apply(k: &Kubectl, yaml: &str) -> String {
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), yaml).unwrap();
    k.ok(&["apply", "-f", file.path().to_str().unwrap()])
}

pub fn wait_until(what: &str, deadline: Duration, mut f: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while t0.elapsed() < deadline {
        if f() {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("timed out waiting for {what}");
}

impl Drop for Op {
    fn drop(&mut self) {
        self.cleanup();
    }
}

fn unsafe_kill(pid: u32, sig: &str) {
    let _ = Command::new("kill").args([&format!("-{sig}"), &pid.to_string()]).status();
}

/// An operator (with `extra` flags) running workspaces `names` (the `WS` manifest),
/// once every one of them is online (90 s at most), and their states.
pub fn online_op(test: &str, names: &[&str], extra: &[&str]) -> (Op, BTreeMap<String, Value>) {
    let mut op = Op::new(test);
    op.extra = extra.iter().map(|a| a.to_string()).collect();
    for name in names {
        op.write_ws(name);
    }
    op.start();
    let ws = op.wait_online(names, Duration::from_secs(90));
    (op, ws)
}

pub fn online(w: &Value) -> bool {
    w["phase"] == "Running" && w["container"]["id"].is_string() && w["lastHeartbeatAt"].is_string()
}

/// Reads /configs/.auth_token from a container: (content, mode, uid).
pub fn read_token(container: &str) -> Option<(String, u32, u64)> {
    let out = Command::new("docker").args(["cp", &format!("{container}:/configs/.auth_token"), "-"]).output().ok()?;
    if !out.status.success() {
        return None;
    }
    let mut ar = tar::Archive::new(&out.stdout[..]);
    let mut entry = ar.entries().ok()?.next()?.ok()?;
    let mode = entry.header().mode().ok()?;
    let uid = entry.header().uid().ok()?;
    let mut s = String::new();
    entry.read_to_string(&mut s).ok()?;
    Some((s.trim().to_string(), mode, uid))
}

/// Overwrites the token file inside a running container (as the agent's user would).
pub fn overwrite_token(container: &str, content: &str) {
    put_file(container, ".auth_token", content);
}

/// Writes `/configs/NAME` in a container (mode 0600, the agent's user), as `docker cp` does.
pub fn put_file(container: &str, name: &str, content: &str) {
    let mut b = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_gnu();
    h.set_size(content.len() as u64);
    h.set_mode(0o600);
    h.set_uid(65534);
    h.set_gid(65534);
    h.set_cksum();
    b.append_data(&mut h, name, content.as_bytes()).unwrap();
    let data = b.into_inner().unwrap();
    let mut child = Command::new("docker")
        .args(["cp", "-", &format!("{container}:/configs")])
        .stdin(Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child.stdin.take().unwrap().write_all(&data).unwrap();
    assert!(child.wait().unwrap().success(), "docker cp into {container} failed");
}

/// POSTs `{"workspace_id": uid}` to the registry; returns the HTTP status.
pub fn registry(url: &str, path: &str, token: &str, uid: &str) -> u16 {
    registry_json(url, path, token, &format!("{{\"workspace_id\":\"{uid}\"}}"))
}

/// POSTs a JSON body to the registry, as an agent; returns the HTTP status.
pub fn registry_json(url: &str, path: &str, token: &str, body: &str) -> u16 {
    let out = Command::new("curl")
        .args(["-s", "-o", "/dev/null", "-w", "%{http_code}", "-X", "POST", "-H", "Content-Type: application/json"])
        .args(["-H", &format!("Authorization: Bearer {token}"), "--data", body, &format!("{url}{path}")])
        .output()
        .expect("curl runs");
    String::from_utf8_lossy(&out.stdout).trim().parse().unwrap_or(0)
}

pub fn path_str(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// A file in a container (running or not), following symlinks (Secret volumes are
/// symlinks): its text, or None when it cannot be read.
pub fn read_file_in(container: &str, path: &str) -> Option<String> {
    let out = Command::new("docker").args(["cp", "-L", &format!("{container}:{path}"), "-"]).output().ok()?;
    if !out.status.success() {
        return None;
    }
    let mut archive = tar::Archive::new(&out.stdout[..]);
    let mut entry = archive.entries().ok()?.next()?.ok()?;
    let mut text = String::new();
    std::io::Read::read_to_string(&mut entry, &mut text).ok()?;
    Some(text)
}
