//! `bench/registry`: heartbeats from 10,000 simulated agents over loopback
//! (127.0.0.1 only) against the operator's real registry router, on SQLite and on
//! Postgres. Writes `$BENCH_RESULTS/registry.md` (default `bench/results/registry.md`).
//!
//! ```sh
//! bench/registry            # every run below, 10 s each
//! bench/registry --quick    # the same runs, 2 s each
//! ```
//!
//! The server is `registry::router` exactly as `up` serves it, on a runtime of its
//! own with 2 worker threads (the operator's default on this machine). The load
//! generator runs in the same process on one other thread (a current-thread
//! runtime), so both share the machine's 2 cores, as they would with real agents on
//! the same host. Every run is bounded in time and in requests, and stops by itself.
//!
//! Two kinds of client:
//! - `agent`: a new TCP connection per heartbeat with `Connection: close`, what
//!   `molecule-agent` does;
//! - `keep-alive`: persistent HTTP/1.1 connections (a proxy in front, or an agent
//!   that keeps its connection).
//!
//! Two kinds of load:
//! - closed loop: C clients each sending the next heartbeat as soon as the last one
//!   is answered: the most the server does per second;
//! - open loop at a fixed rate (5,000/s: 10,000 agents beating every 2 s): latency is
//!   counted from when a heartbeat was due, so a server that falls behind shows it.

mod common;

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use chrono::Utc;
use common::pg::Cluster;
use common::{Args, Report, Stats, ms};
use molecule::api::{Condition, ConditionStatus, Phase, WorkspaceStatus};
use molecule::metrics::Metrics;
use molecule::registry::{self, AppState};
use molecule::source::desired::DesiredSet;
use molecule::store::heartbeats::{Coalescing, DEFAULT_FLUSH_INTERVAL};
use molecule::store::{self, DynStore};
use molecule::trigger::Trigger;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::watch;

const AGENTS: usize = 10_000;
/// Most requests one run sends, whatever its duration.
const MAX_REQUESTS: usize = 2_000_000;
/// Open-loop heartbeats in flight beyond which new ones are counted as refused to
/// start (the server is hopelessly behind; the run still ends on time).
const MAX_IN_FLIGHT: usize = 4096;

#[derive(Clone, Copy, PartialEq, Debug)]
enum Client {
    Agent,
    KeepAlive,
}

impl Client {
    fn name(self) -> &'static str {
        match self {
            Client::Agent => "agent (connection per heartbeat)",
            Client::KeepAlive => "keep-alive",
        }
    }
}

#[derive(Clone, Copy, PartialEq, Debug)]
enum Load {
    Closed { clients: usize },
    Open { rate: u64 },
}

impl Load {
    fn name(self) -> String {
        match self {
            Load::Closed { clients } => format!("closed loop, {clients} clients"),
            Load::Open { rate } => format!("open loop, {rate}/s offered"),
        }
    }
}

struct Agent {
    request: Vec<u8>,
}

/// The 10,000 agents' requests, prebuilt (the generator only copies bytes).
fn requests(addr: std::net::SocketAddr, agents: &[(String, String)], client: Client) -> Arc<Vec<Agent>> {
    Arc::new(
        agents
            .iter()
            .map(|(uid, token)| {
                let body = format!("{{\"workspace_id\":\"{uid}\"}}");
                let close = if client == Client::Agent { "Connection: close\r\n" } else { "" };
                let request = format!(
                    "POST /registry/heartbeat HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {token}\r\n\
                     Content-Type: application/json\r\nContent-Length: {}\r\n{close}\r\n{body}",
                    body.len()
                );
                Agent { request: request.into_bytes() }
            })
            .collect(),
    )
}

/// Reads one response; returns its status code. `close`: the response ends at EOF.
async fn read_response(stream: &mut TcpStream, buf: &mut Vec<u8>, close: bool) -> std::io::Result<u16> {
    buf.clear();
    let mut chunk = [0u8; 1024];
    loop {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
        if !close && let Some(end) = find(buf, b"\r\n\r\n") {
            let head = std::str::from_utf8(&buf[..end]).unwrap_or("");
            let len: usize = head
                .lines()
                .find_map(|l| l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().to_string()))
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            if buf.len() >= end + 4 + len {
                break;
            }
        }
    }
    let code = buf.get(9..12).and_then(|c| std::str::from_utf8(c).ok()).and_then(|c| c.parse().ok()).unwrap_or(0);
    if code == 0 {
        return Err(std::io::Error::other("no HTTP response"));
    }
    Ok(code)
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// One heartbeat on a connection of its own (what molecule-agent does).
async fn agent_heartbeat(addr: std::net::SocketAddr, agent: &Agent, buf: &mut Vec<u8>) -> std::io::Result<u16> {
    let mut stream = TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    stream.write_all(&agent.request).await?;
    read_response(&mut stream, buf, true).await
}

#[derive(Default)]
struct Outcome {
    latencies: Vec<Duration>,
    ok: usize,
    errors: usize,
    not_started: usize,
    elapsed: Duration,
    /// CPU seconds of the generator's thread.
    generator_cpu: f64,
}

/// Closed loop: `clients` tasks, each sending the next agent's heartbeat as soon as
/// the previous one is answered, until `duration` or MAX_REQUESTS.
async fn closed(
    addr: std::net::SocketAddr,
    agents: Arc<Vec<Agent>>,
    client: Client,
    clients: usize,
    duration: Duration,
) -> Outcome {
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let deadline = started + duration;
    let mut tasks = Vec::new();
    for _ in 0..clients {
        let (agents, next) = (agents.clone(), next.clone());
        tasks.push(tokio::spawn(async move {
            let mut out = Outcome::default();
            let mut buf = Vec::with_capacity(512);
            let mut conn: Option<TcpStream> = None;
            while Instant::now() < deadline {
                let n = next.fetch_add(1, Ordering::Relaxed);
                if n >= MAX_REQUESTS {
                    break;
                }
                let agent = &agents[n % agents.len()];
                let t = Instant::now();
                let result = match client {
                    Client::Agent => agent_heartbeat(addr, agent, &mut buf).await,
                    Client::KeepAlive => {
                        if conn.is_none() {
                            let s = TcpStream::connect(addr).await.expect("connect");
                            s.set_nodelay(true).unwrap();
                            conn = Some(s);
                        }
                        let s = conn.as_mut().unwrap();
                        match s.write_all(&agent.request).await {
                            Ok(()) => read_response(s, &mut buf, false).await,
                            Err(e) => Err(e),
                        }
                    }
                };
                out.latencies.push(t.elapsed());
                match result {
                    Ok(200) => out.ok += 1,
                    Ok(_) => out.errors += 1,
                    Err(_) => {
                        out.errors += 1;
                        conn = None;
                    }
                }
            }
            out
        }));
    }
    let mut total = Outcome::default();
    for t in tasks {
        let o = t.await.unwrap();
        total.latencies.extend(o.latencies);
        total.ok += o.ok;
        total.errors += o.errors;
    }
    total.elapsed = started.elapsed();
    total
}

/// Open loop at `rate` per second for `duration`: heartbeat n is due at n/rate;
/// its latency counts from then. A pacer thread starts each heartbeat when it is due
/// (`std::thread::sleep`, accurate to tens of µs); the requests run on this task's
/// runtime. (A tokio interval would start them in bursts on its 1 ms timer wheel, up
/// to a tick late: a millisecond of the generator's own added to every latency.)
async fn open(
    addr: std::net::SocketAddr,
    agents: Arc<Vec<Agent>>,
    client: Client,
    rate: u64,
    duration: Duration,
) -> Outcome {
    let started = Instant::now();
    let total = ((rate as f64 * duration.as_secs_f64()) as usize).min(MAX_REQUESTS);
    let in_flight = Arc::new(AtomicUsize::new(0));
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(Duration, u16, bool)>();
    let not_started = Arc::new(AtomicU64::new(0));
    // Keep-alive: a pool of idle connections, opened as needed.
    let pool: Arc<std::sync::Mutex<VecDeque<TcpStream>>> = Arc::default();
    let runtime = tokio::runtime::Handle::current();
    let pacer = {
        let (in_flight, not_started) = (in_flight.clone(), not_started.clone());
        std::thread::Builder::new()
            .name("loadgen-pacer".into())
            .spawn(move || {
                let before = stat_cpu("/proc/thread-self/stat").map(|(_, s)| s).unwrap_or(0.0);
                for n in 0..total {
                    let due = started + Duration::from_secs_f64(n as f64 / rate as f64);
                    if let Some(wait) = due.checked_duration_since(Instant::now()) {
                        std::thread::sleep(wait);
                    }
                    if in_flight.load(Ordering::Relaxed) >= MAX_IN_FLIGHT {
                        not_started.fetch_add(1, Ordering::Relaxed);
                        continue;
                    }
                    in_flight.fetch_add(1, Ordering::Relaxed);
                    let (agents, tx, in_flight, pool) = (agents.clone(), tx.clone(), in_flight.clone(), pool.clone());
                    runtime.spawn(async move {
                        let agent = &agents[n % agents.len()];
                        let mut buf = Vec::with_capacity(512);
                        let result = match client {
                            Client::Agent => agent_heartbeat(addr, agent, &mut buf).await,
                            Client::KeepAlive => {
                                let conn = pool.lock().unwrap().pop_front();
                                let mut s = match conn {
                                    Some(s) => s,
                                    None => {
                                        let s = TcpStream::connect(addr).await.expect("connect");
                                        s.set_nodelay(true).unwrap();
                                        s
                                    }
                                };
                                let r = match s.write_all(&agent.request).await {
                                    Ok(()) => read_response(&mut s, &mut buf, false).await,
                                    Err(e) => Err(e),
                                };
                                if r.is_ok() {
                                    pool.lock().unwrap().push_back(s);
                                }
                                r
                            }
                        };
                        let latency = due.elapsed();
                        let _ = match result {
                            Ok(code) => tx.send((latency, code, true)),
                            Err(_) => tx.send((latency, 0, false)),
                        };
                        in_flight.fetch_sub(1, Ordering::Relaxed);
                    });
                }
                stat_cpu("/proc/thread-self/stat").map(|(_, s)| s).unwrap_or(0.0) - before
            })
            .unwrap()
    };
    let mut out = Outcome::default();
    // Bounded: whatever is still in flight 10 s after the last heartbeat was due is an error.
    let last_due = started + Duration::from_secs_f64(total as f64 / rate as f64);
    let deadline = tokio::time::Instant::from_std(last_due) + Duration::from_secs(10);
    loop {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some((latency, code, _))) => {
                out.latencies.push(latency);
                if code == 200 { out.ok += 1 } else { out.errors += 1 }
            }
            Ok(None) => break,
            Err(_) => {
                out.errors += in_flight.load(Ordering::Relaxed);
                break;
            }
        }
    }
    out.not_started = not_started.load(Ordering::Relaxed) as usize;
    out.elapsed = started.elapsed();
    out.generator_cpu += pacer.join().expect("the pacer thread");
    out
}

/// CPU seconds (user + system) of this process's threads, by role (the server's
/// runtime, the load generator, the database's threads), and of other processes
/// (the Postgres backends).
#[derive(Clone, Copy, Default, Debug)]
struct Cpu {
    server: f64,
    generator: f64,
    other_threads: f64,
    postgres: f64,
}

fn ticks() -> f64 {
    100.0
}

fn stat_cpu(path: &str) -> Option<(String, f64)> {
    let text = std::fs::read_to_string(path).ok()?;
    let (head, rest) = text.rsplit_once(')')?;
    let name = head.split_once('(')?.1.to_string();
    let f: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = f.get(11)?.parse().ok()?;
    let stime: f64 = f.get(12)?.parse().ok()?;
    Some((name, (utime + stime) / ticks()))
}

fn cpu_now(postmaster: Option<u32>) -> Cpu {
    let mut cpu = Cpu::default();
    if let Ok(tasks) = std::fs::read_dir("/proc/self/task") {
        for t in tasks.flatten() {
            if let Some((name, secs)) = stat_cpu(&format!("{}/stat", t.path().display())) {
                if name.starts_with("server") {
                    cpu.server += secs;
                } else if name.starts_with("loadgen") {
                    cpu.generator += secs;
                } else {
                    cpu.other_threads += secs;
                }
            }
        }
    }
    if let Some(pm) = postmaster
        && let Ok(procs) = std::fs::read_dir("/proc")
    {
        for p in procs.flatten() {
            let Ok(pid) = p.file_name().to_string_lossy().parse::<u32>() else { continue };
            let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { continue };
            let ppid: Option<u32> = text.rsplit_once(')').and_then(|(_, r)| r.split_whitespace().nth(1)?.parse().ok());
            if pid == pm || ppid == Some(pm) {
                cpu.postgres += stat_cpu(&format!("/proc/{pid}/stat")).map(|(_, s)| s).unwrap_or(0.0);
            }
        }
    }
    cpu
}

fn postmaster_pid(cluster: &Cluster) -> Option<u32> {
    let text = std::fs::read_to_string(cluster.dir.join("data/postmaster.pid")).ok()?;
    text.lines().next()?.trim().parse().ok()
}

/// A status that shows the agent online (the steady state: heartbeats queue nothing).
fn online_status() -> WorkspaceStatus {
    let now = Utc::now();
    WorkspaceStatus {
        phase: Phase::Running,
        incarnation: 1,
        conditions: vec![
            Condition::new("Ready", ConditionStatus::True, "Running", "running", now),
            Condition::new("AgentOnline", ConditionStatus::True, "Heartbeating", "heartbeating", now),
        ],
        ..Default::default()
    }
}

/// 10,000 workspaces, each with incarnation 1, a live token and an online status.
async fn fixture(store: &DynStore) -> Vec<(String, String)> {
    let mut out = Vec::with_capacity(AGENTS);
    let status = online_status();
    let chunks: Vec<Vec<usize>> = (0..AGENTS).collect::<Vec<_>>().chunks(AGENTS / 8).map(|c| c.to_vec()).collect();
    let mut tasks = Vec::new();
    for chunk in chunks {
        let (store, status) = (store.clone(), status.clone());
        tasks.push(tokio::spawn(async move {
            let mut out = Vec::new();
            for i in chunk {
                let now = Utc::now();
                let rec = store.ensure_workspace(&format!("default/agent-{i}"), now).await.unwrap();
                let inc = store.bump_incarnation(&rec.uid).await.unwrap();
                let tok = store.issue_token(&rec.uid, inc, now).await.unwrap();
                store.save_status(&rec.uid, &WorkspaceStatus { incarnation: inc, ..status.clone() }).await.unwrap();
                out.push((rec.uid, tok.plaintext));
            }
            out
        }));
    }
    for t in tasks {
        out.extend(t.await.unwrap());
    }
    out
}

struct Server {
    addr: std::net::SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<u64>>,
}

/// Serves the registry router on its own 2-thread runtime (threads named `server-*`),
/// over the store as `up` wires it: heartbeats batched (store::heartbeats), flushed
/// every 100 ms; or, with `batched` false, written one by one.
fn serve(store: DynStore, batched: bool, flush: Duration) -> Server {
    let (addr_tx, addr_rx) = std::sync::mpsc::channel();
    let (stop, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let thread = std::thread::Builder::new()
        .name("server-main".into())
        .spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .thread_name("server-worker")
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let (trigger, mut triggers) = Trigger::new();
                let queued = Arc::new(AtomicU64::new(0));
                let q = queued.clone();
                tokio::spawn(async move {
                    while triggers.recv().await.is_some() {
                        q.fetch_add(1, Ordering::Relaxed);
                    }
                });
                let desired = DesiredSet { complete: true, ..Default::default() };
                let (_desired_tx, desired_rx) = watch::channel(Arc::new(desired));
                let stop_flusher = tokio_util::sync::CancellationToken::new();
                let (store, flusher): (DynStore, _) = if batched {
                    let coalescing = Arc::new(Coalescing::new(store.clone(), Arc::default()));
                    let flusher = coalescing.spawn_flusher(flush, stop_flusher.clone());
                    (store.with_heartbeats(coalescing), Some(flusher))
                } else {
                    (store, None)
                };
                let state = AppState::new(store, trigger, desired_rx, "admin".into(), Arc::new(Metrics::new()));
                state.set_ready(true);
                let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
                addr_tx.send(listener.local_addr().unwrap()).unwrap();
                // Spawned, as `up` spawns it: the accept loop then runs on a worker, and
                // each connection's task starts on the worker that accepted it (from the
                // runtime's main thread, every connection was a hand-off to a worker).
                let serving = tokio::spawn(registry::serve(listener, registry::router(state), async move {
                    let _ = stop_rx.await;
                }));
                serving.await.unwrap().unwrap();
                stop_flusher.cancel();
                if let Some(f) = flusher {
                    f.await.unwrap();
                }
                queued.load(Ordering::Relaxed)
            })
        })
        .unwrap();
    Server { addr: addr_rx.recv().unwrap(), stop: Some(stop), thread: Some(thread) }
}

impl Server {
    /// Stops the server; returns how many reconciles the registry queued.
    fn stop(mut self) -> u64 {
        let _ = self.stop.take().unwrap().send(());
        self.thread.take().unwrap().join().unwrap()
    }
}

struct RunResult {
    store: String,
    batched: bool,
    client: Client,
    load: Load,
    outcome: Outcome,
    stats: Stats,
    cpu: Cpu,
}

/// Runs one load against the server from a generator thread (`loadgen`).
fn run_load(
    addr: std::net::SocketAddr,
    agents: Arc<Vec<Agent>>,
    client: Client,
    load: Load,
    duration: Duration,
) -> Outcome {
    std::thread::Builder::new()
        .name("loadgen".into())
        .spawn(move || {
            let thread_cpu = || stat_cpu("/proc/thread-self/stat").map(|(_, s)| s).unwrap_or(0.0);
            let before = thread_cpu();
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            let mut out = rt.block_on(async move {
                match load {
                    Load::Closed { clients } => closed(addr, agents, client, clients, duration).await,
                    Load::Open { rate } => open(addr, agents, client, rate, duration).await,
                }
            });
            out.generator_cpu += thread_cpu() - before;
            out
        })
        .unwrap()
        .join()
        .unwrap()
}

async fn bench_store(
    name: &str,
    store: DynStore,
    postmaster: Option<u32>,
    runs: &[(bool, Client, Load)],
    duration: Duration,
    results: &mut Vec<RunResult>,
) {
    eprintln!("{name}: creating {AGENTS} workspaces and tokens");
    let agents = fixture(&store).await;
    for batched in [true, false] {
        let runs: Vec<(Client, Load)> = runs.iter().filter(|r| r.0 == batched).map(|r| (r.1, r.2)).collect();
        if runs.is_empty() {
            continue;
        }
        let server = serve(store.clone(), batched, flush_interval());
        run_all(name, batched, &server, &agents, &runs, postmaster, duration, results).await;
        let queued = server.stop();
        eprintln!("  the registry queued {queued} reconciles (0 expected: every status shows the agent online)");
    }
}

/// The flush interval: the operator's, unless `--flush-ms N` (to see what it costs).
fn flush_interval() -> Duration {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == "--flush-ms")
        .and_then(|i| args.get(i + 1))
        .map(|v| Duration::from_millis(v.parse().expect("--flush-ms N")))
        .unwrap_or(DEFAULT_FLUSH_INTERVAL)
}

#[allow(clippy::too_many_arguments)]
async fn run_all(
    name: &str,
    batched: bool,
    server: &Server,
    agents: &[(String, String)],
    runs: &[(Client, Load)],
    postmaster: Option<u32>,
    duration: Duration,
    results: &mut Vec<RunResult>,
) {
    for &(client, load) in runs {
        let reqs = requests(server.addr, agents, client);
        // A short warm-up at the same load (connections, caches, prepared statements).
        let _ = tokio::task::spawn_blocking({
            let reqs = reqs.clone();
            let addr = server.addr;
            move || run_load(addr, reqs, client, load, Duration::from_millis(500))
        })
        .await
        .unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
        eprintln!("  measuring (pid {}) {} {}", std::process::id(), client.name(), load.name());
        let before = cpu_now(postmaster);
        let addr = server.addr;
        let mut outcome =
            tokio::task::spawn_blocking(move || run_load(addr, reqs, client, load, duration)).await.unwrap();
        let after = cpu_now(postmaster);
        let cpu = Cpu {
            server: after.server - before.server,
            generator: outcome.generator_cpu,
            other_threads: after.other_threads - before.other_threads,
            postgres: after.postgres - before.postgres,
        };
        let stats = Stats::of(&mut outcome.latencies);
        eprintln!(
            "  {:<9} {:<36} {:<28} {:>8.0} ok/s  p50 {} ms  p99 {} ms  max {} ms  errors {}  not started {}  cpu {:?}",
            if batched { "batched" } else { "one by one" },
            client.name(),
            load.name(),
            outcome.ok as f64 / outcome.elapsed.as_secs_f64(),
            ms(stats.p50),
            ms(stats.p99),
            ms(stats.max),
            outcome.errors,
            outcome.not_started,
            cpu
        );
        results.push(RunResult { store: name.to_string(), batched, client, load, outcome, stats, cpu });
        // Let TIME_WAIT sockets and the database settle between runs.
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let args = Args::parse("bench/results/registry.md", "bench/registry");
    let duration = Duration::from_secs_f64(
        args.value("seconds").map(|v| v.parse().expect("--seconds N")).unwrap_or(if args.quick { 2.0 } else { 10.0 }),
    );
    let only: Option<&str> = args.value("store");
    let runs: Vec<(bool, Client, Load)> = vec![
        (true, Client::Agent, Load::Closed { clients: 32 }),
        (true, Client::Agent, Load::Open { rate: 5000 }),
        (true, Client::KeepAlive, Load::Closed { clients: 32 }),
        (true, Client::KeepAlive, Load::Open { rate: 5000 }),
        // The same server with heartbeats written one by one, for comparison.
        (false, Client::KeepAlive, Load::Closed { clients: 32 }),
        (false, Client::Agent, Load::Open { rate: 5000 }),
    ];
    // `--run N[,M...]`: only these runs (0-based, in the order above), e.g. to profile one.
    let runs: Vec<(bool, Client, Load)> = match args.value("run") {
        Some(list) => {
            let keep: Vec<usize> = list.split(',').map(|n| n.parse().expect("--run N[,M...]")).collect();
            runs.into_iter().enumerate().filter(|(i, _)| keep.contains(i)).map(|(_, r)| r).collect()
        }
        None => runs,
    };
    let scratch = common::scratch_dir(&args, "registry-");
    let mut results = Vec::new();
    let mut versions = Vec::new();

    if only.is_none_or(|s| s == "sqlite") {
        let path = scratch.path().join("state.db");
        let store = store::open(&path.display().to_string()).await.expect("SQLite store");
        bench_store("SQLite", store, None, &runs, duration, &mut results).await;
    }
    if only.is_none_or(|s| s == "postgres") {
        let cluster = Cluster::start(None, &[]).expect("start PostgreSQL");
        versions.push(cluster.version.clone());
        let url = cluster.create_database("registry").await.unwrap();
        let store = store::open(&url).await.expect("Postgres store");
        bench_store("Postgres (tmpfs)", store, postmaster_pid(&cluster), &runs, duration, &mut results).await;
    }
    if !args.quick && only.is_none_or(|s| s == "postgres-disk") {
        let cluster = Cluster::start(Some(scratch.path()), &[]).expect("start PostgreSQL on disk");
        let url = cluster.create_database("registry").await.unwrap();
        let store = store::open(&url).await.expect("Postgres store");
        bench_store("Postgres (ext4 disk)", store, postmaster_pid(&cluster), &runs, duration, &mut results).await;
    }

    let mut report = Report::default();
    report.line("## Registry throughput: heartbeats from 10,000 agents (issue 7, item 5)\n");
    report.line(format!("```sh\n{}\n```\n", args.command));
    report.line(format!("Machine: {}.\n", common::machine()));
    report.line(format!(
        "Server: `registry::router` as `up` serves it, on a 2-worker tokio runtime, with the store as the operator \
         opens it (SQLite: WAL, synchronous=NORMAL, a file on the ext4 disk; {}: default durability settings, \
         fsync and synchronous_commit on; `tmpfs` = data directory in /dev/shm, where an fsync costs nothing, \
         `ext4 disk` = on this machine's disk). Load generator: the same process, one thread, so server and \
         generator share the 2 cores. {AGENTS} workspaces, each with a live token and a status showing its agent \
         online; every heartbeat is a real `POST /registry/heartbeat` with its own agent's bearer token; the \
         agents are taken round-robin. {} s per run after a 0.5 s warm-up.\n",
        versions.first().map(String::as_str).unwrap_or("PostgreSQL"),
        duration.as_secs_f64()
    ));
    let body: Vec<Vec<String>> = results
        .iter()
        .map(|r| {
            let rate = r.outcome.ok as f64 / r.outcome.elapsed.as_secs_f64();
            let per_req = |cpu: f64| {
                if r.outcome.ok > 0 { format!("{:.0}", cpu * 1e6 / r.outcome.ok as f64) } else { "-".into() }
            };
            vec![
                r.store.clone(),
                if r.batched { "batched".into() } else { "one by one".into() },
                r.client.name().to_string(),
                r.load.name(),
                format!("{rate:.0}"),
                ms(r.stats.p50),
                ms(r.stats.p99),
                ms(r.stats.max),
                format!("{}", r.outcome.errors + r.outcome.not_started),
                format!(
                    "{} / {} / {}",
                    per_req(r.cpu.server + r.cpu.other_threads),
                    per_req(r.cpu.postgres),
                    per_req(r.cpu.generator)
                ),
            ]
        })
        .collect();
    report.table(
        &[
            "store",
            "heartbeat writes",
            "client",
            "load",
            "heartbeats/s (200)",
            "p50 ms",
            "p99 ms",
            "max ms",
            "errors",
            "CPU µs/heartbeat: operator / postgres / generator",
        ],
        &body,
    );
    report.line(verdict(&results, args.quick));
    report.line(NOTES);
    report.write(&args);
}

/// The target's verdict, from the open-loop runs at 5,000 heartbeats/s offered with
/// heartbeats batched (as `up` runs).
fn verdict(results: &[RunResult], quick: bool) -> String {
    let mut out = String::from(
        "### Against the target (issue 7): at least 5,000 heartbeats/s with p99 under 5 ms

",
    );
    for r in results.iter().filter(|r| r.batched && matches!(r.load, Load::Open { .. })) {
        let Load::Open { rate } = r.load else { continue };
        let achieved = r.outcome.ok as f64 / r.outcome.elapsed.as_secs_f64();
        let failed = r.outcome.errors + r.outcome.not_started;
        let met = achieved >= 0.98 * rate as f64 && failed == 0 && r.stats.p99 < Duration::from_millis(5);
        // How busy the machine's cores were over the run: operator, Postgres and the
        // generator together (a tail that grows with it is queueing for a core).
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
        let cpu = r.cpu.server + r.cpu.other_threads + r.cpu.postgres + r.cpu.generator;
        let busy = 100.0 * cpu / r.outcome.elapsed.as_secs_f64() / cores;
        out.push_str(&format!(
            "- {}, {} client, {rate}/s offered: {achieved:.0} answered 200 per second, p99 {} ms, {failed} failed, \
             the {cores} cores {busy:.0}% busy: {}.\n",
            r.store,
            r.client.name(),
            ms(r.stats.p99),
            if met { "**met**" } else { "**missed**" }
        ));
    }
    if quick {
        out.push_str("\n_A `--quick` run: 2 s per run; run `bench/registry` for the numbers to quote._\n");
    }
    out
}

const NOTES: &str = "### What the numbers mean

- **Heartbeats/s** counts answers with status 200 per second of the run; **p50/p99/max**
  are client-side, from sending the request (closed loop) or from when the heartbeat
  was due (open loop: a server that falls behind shows it in its latency, not only in
  its rate) to the last byte of the answer. **Errors** are non-200 answers, failed
  connections, and open-loop heartbeats not started because 4,096 were already in
  flight.
- **Closed loop** (32 clients, each sending the next heartbeat when the last is
  answered) measures the most the server answers per second; **open loop at 5,000/s**
  (10,000 agents beating every 2 s) is the target's load.
- **`agent`** opens a TCP connection per heartbeat, as `molecule-agent` does, so a
  heartbeat also pays a TCP handshake and teardown on both sides; **`keep-alive`**
  reuses connections (what a proxy in front would do).
- **Batched** is how `up` runs the registry: a heartbeat is validated against the
  database at once (`token_owner`: a revoked token is refused by the very next
  request) and its time is written with the others every 100 ms, in one upsert into
  the narrow `heartbeats` table (src/store/heartbeats.rs explains why the stale-token
  and heartbeat rules stay correct, and how a failed flush is noted so no healthy
  agent looks silent). **One by one** writes each heartbeat in its own statement, as
  before batching.
- **CPU µs/heartbeat** splits the CPU the run used per answered heartbeat between the
  operator's threads (server and SQLite), the Postgres server processes, and the load
  generator (which shares the machine: the operator had 2 cores minus the
  generator's).
- Postgres `tmpfs` has its data directory in /dev/shm (an fsync costs nothing),
  `ext4 disk` on this machine's disk (full runs only): with batching, the fsync per
  commit is paid 10 times a second, not per heartbeat.
- **Why the connection-per-heartbeat client misses the tail target here.** Its p50 is
  well under a millisecond; its p99 is queueing for a core. Per heartbeat it costs the
  operator about 200 µs of CPU (most of it the kernel's: accepting and closing a TCP
  connection on both ends, and waking the threads that handle it), the generator 100
  µs more, and Postgres 100 µs: at 5,000/s the 2 cores are about 75% busy with SQLite
  and 85% with Postgres (the verdict above gives each run's figure), and at that load
  a few requests in a hundred wait behind others. The keep-alive client costs less
  per heartbeat (the cores about 60% busy with SQLite, 75% with Postgres) and meets
  the target on both stores. Where the agents do not share the operator's 2 cores,
  the same code has that headroom; on this machine the cores are the limit. Measured
  (not adopted): the flush ten times a second is what separates the tails with and
  without batched writes (keep-alive p99 0.7-1.0 ms with the flush off, 2.4-4 ms on).
  Each flush of 500 heartbeats rewrites about 300 pages of the WAL (the updates land
  on nearly every leaf of a 10,000-row table) and fsyncs at every third checkpoint;
  running the flush on a connection of its own, on a thread at nice 10 or 19, changed
  the p99 by less than the run-to-run spread (7 runs each: median 4.9 against 5.3 ms
  per connection, 3.2 against 3.7 ms keep-alive). Smaller rows (an integer time, no
  workspace column) would cut the pages per flush by about 40%.
- The machine is shared with other builds and tests; the load average at the start is
  in the machine line above. Every run is bounded (its seconds, and 2,000,000 requests)
  and talks to 127.0.0.1 only.
";
