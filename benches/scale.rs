//! Scale without Docker: the real reconcile queue, the real rules and executor, and the
//! real SQLite store (a file in a temp dir), with Docker replaced by the simulated
//! in-memory runtime (`src/runtime/sim.rs`, feature `sim`). Run through `bench/scale`.
//!
//! For each N (1k, 10k, 100k; `--quick`: 1k) one child process (so that memory
//! figures are that N's own) declares N workspaces and measures:
//! - cold converge: N containers created, tokens written, started;
//! - a full resync sweep (every container listed, every record and token read; at start
//!   and every `--full-resync-seconds`);
//! - a no-op resync right after it (nothing changed: the periodic resync, which reads
//!   the store's change log and looks at what it names);
//! - the same after every agent heartbeated (the steady state: agents heartbeat more
//!   often than the resync runs, and heartbeats are not in the change log);
//! - a 1% change: 1% of the specs change, those workspaces are recreated, and the
//!   resync after it (which finds their changes in the log);
//! - RSS of the process, and how much of it the simulated daemon's own state is.
//!
//! Time is wall time from the trigger to the last reconcile report; CPU is user+sys of
//! the whole process (getrusage) over the same span plus a 200 ms quiet tail.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use futures::StreamExt;
use molecule::api::effective::Defaults;
use molecule::api::{SourceRef, Workspace, WorkspaceSpec};
use molecule::metrics::Metrics;
use molecule::reconcile::{self, Context};
use molecule::rules::Settings;
use molecule::runtime::render::AgentEnv;
use molecule::runtime::sim::SimRuntime;
use molecule::source::desired::{DesiredSet, merge};
use molecule::source::{Snapshot, SourceObject};
use molecule::store::DynStore;
use molecule::store::heartbeats::{Coalescing, DEFAULT_FLUSH_INTERVAL};
use molecule::trigger::{Report, Resync, Trigger, Why};
use serde::{Deserialize, Serialize};
use tokio::sync::{broadcast, watch};
use tokio_util::sync::CancellationToken;

const QUIET: Duration = Duration::from_millis(200);
/// Idle time before memory is sampled.
const SETTLE: Duration = Duration::from_secs(2);
const CONCURRENCY: usize = 8;

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
struct Phase {
    name: String,
    wall_ms: f64,
    cpu_ms: f64,
    reports: u64,
    decisions: u64,
    errors: u64,
    /// Simulated Docker API calls made in the phase.
    docker_calls: BTreeMap<String, u64>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
struct Result {
    workspaces: usize,
    store: String,
    phases: Vec<Phase>,
    rss_mb: f64,
    rss_peak_mb: f64,
    sim_mb: f64,
    /// Live heap (malloc'd and not freed), the simulated daemon's included.
    #[serde(default)]
    heap_mb: f64,
    /// RSS right after the last phase's burst of reconciles (`rss_mb` is after the
    /// operator has then been idle for `SETTLE`).
    #[serde(default)]
    rss_burst_mb: f64,
    /// Bytes per workspace of each per-workspace structure, built alone (10,000 only).
    #[serde(default)]
    structures: Vec<(String, f64)>,
    /// Milliseconds from a trigger to the end of its reconcile, for triggers sent while
    /// a full resync sweep ran (issue 16: the sweep runs beside the loop, not in it).
    #[serde(default)]
    triggers_during_full_resync_ms: Vec<f64>,
    /// How long that full resync took, wall clock.
    #[serde(default)]
    full_resync_wall_ms: f64,
}

fn cpu_now() -> Duration {
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

fn proc_status_mb(field: &str) -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

/// Resident memory grouped by what is mapped (/proc/self/smaps): the main heap, other
/// anonymous mappings (malloc's second arena and large blocks, thread stacks), and the
/// mapped files (the binary's code).
fn resident_by_mapping() -> String {
    let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap_or_default();
    let mut groups: BTreeMap<String, (f64, usize)> = BTreeMap::new();
    let mut current = String::new();
    for line in smaps.lines() {
        let first = line.split_whitespace().next().unwrap_or_default();
        if first.contains('-') && first.chars().all(|c| c.is_ascii_hexdigit() || c == '-') {
            let path = line.split_whitespace().nth(5).unwrap_or("");
            current = match path {
                "" => "anonymous".into(),
                p if p.starts_with('[') => p.into(),
                p => format!("file {}", p.rsplit('/').next().unwrap_or(p)),
            };
        } else if let Some(kb) = line.strip_prefix("Rss:") {
            let kb: f64 = kb.trim().trim_end_matches("kB").trim().parse().unwrap_or(0.0);
            let g = groups.entry(current.clone()).or_default();
            g.0 += kb / 1024.0;
            g.1 += 1;
        }
    }
    let mut v: Vec<_> = groups.into_iter().filter(|(_, (mb, _))| *mb >= 0.1).collect();
    v.sort_by(|a, b| b.1.0.total_cmp(&a.1.0));
    v.iter().map(|(k, (mb, n))| format!("{k} {mb:.1} ({n} mappings)")).collect::<Vec<_>>().join(", ")
}

/// Bytes the Rust code holds (jemalloc, the operator's allocator).
fn rust_heap() -> usize {
    molecule::memory::allocated_bytes().expect("jemalloc is the allocator")
}

/// Bytes the C code holds (glibc malloc: SQLite): arena chunks and mmapped blocks.
fn c_heap() -> usize {
    let mi = unsafe { libc::mallinfo2() };
    mi.uordblks + mi.hblkhd
}

/// Everything allocated and not freed: Rust's (jemalloc) and C's (glibc malloc: SQLite).
fn heap_live_mb() -> f64 {
    (rust_heap() + c_heap()) as f64 / (1024.0 * 1024.0)
}

/// What each structure the operator keeps per workspace costs, in bytes per workspace:
/// each is built alone for `n` workspaces (as the run above has them) and measured as
/// the growth of the Rust heap.
fn per_structure(n: usize) -> Vec<(String, f64)> {
    use molecule::model::container::{ContainerInfo, ContainerState, labels};
    use molecule::observe::cache::ContainerCache;
    use molecule::reconcile::sweep::Phases;
    use molecule::reconcile::token_memo::TokenMemo;
    use molecule::runtime::RuntimeEvent;
    use sha2::{Digest, Sha256};
    let mut out = Vec::new();
    let mut measure = |what: &str, build: &mut dyn FnMut() -> Box<dyn std::any::Any>| {
        let before = rust_heap();
        let built = build();
        out.push((what.to_string(), rust_heap().saturating_sub(before) as f64 / n as f64));
        drop(built);
    };
    let now = Utc::now();
    let infos: Vec<ContainerInfo> = (0..n)
        .map(|i| {
            let uid = format!("{i:08x}-0000-4000-8000-{i:012x}");
            let labels = [
                (labels::MANAGED, "true".to_string()),
                (labels::INSTANCE, "bench".into()),
                (labels::WORKSPACE, format!("default/{}", name(i))),
                (labels::UID, uid.clone()),
                (labels::SPEC_HASH, "0123456789abcdef".into()),
                (labels::INCARNATION, "1".into()),
                (labels::PROVISIONED_AT, "2026-12-06T01:02:03.456Z".into()),
            ];
            ContainerInfo {
                id: hex::encode(Sha256::digest(format!("bench/{i}"))),
                name: format!("ws-{}", &uid[..12]),
                image: "molecule-agent:local".into(),
                state: ContainerState::Running,
                labels: labels.into_iter().map(|(k, v)| (k.to_string(), v)).collect(),
                created_at: Some(now),
                started_at: Some(now),
                ..Default::default()
            }
        })
        .collect();
    measure("desired set (declarations, resolved)", &mut || Box::new(declare(n, &|_| false, &DesiredSet::default())));
    measure("(for comparison) the containers as `ContainerInfo`s", &mut || Box::new(infos.clone()));
    measure("container cache", &mut || {
        let cache = ContainerCache::new();
        cache.apply_full(cache.begin(), infos.clone());
        Box::new(cache)
    });
    measure("token memo (token files' content)", &mut || {
        let memo = TokenMemo::default();
        for (i, c) in infos.iter().enumerate() {
            let key = c.workspace().unwrap_or_default();
            memo.saw_event(&RuntimeEvent {
                workspace: Some(key.into()),
                container_id: c.id.clone(),
                action: "extract-to-dir".into(),
                at: Some(now),
            });
            memo.record(key, &c.id, &hex::encode(Sha256::digest(format!("token {i}"))), now);
        }
        Box::new(memo)
    });
    measure("phases (the workspaces-by-phase gauge)", &mut || {
        let phases = Phases::default();
        for c in &infos {
            phases.set(c.workspace().unwrap_or_default(), Some(molecule::api::Phase::Running));
        }
        Box::new(phases)
    });
    out
}

fn name(i: usize) -> String {
    format!("ws-{i:06}")
}

/// N workspaces in 10 teams (no quotas), merged exactly as the operator merges a source.
fn declare(n: usize, changed: &dyn Fn(usize) -> bool, previous: &DesiredSet) -> DesiredSet {
    let source = SourceRef { kind: "bench".into(), reference: "generated".into() };
    let objects = (0..n)
        .map(|i| {
            let mut env = BTreeMap::from([("ROLE".to_string(), format!("agent-{}", i % 7))]);
            if changed(i) {
                env.insert("CHANGED".into(), "1".into());
            }
            let spec = WorkspaceSpec { tier: Some(2), env, runtime: Some("langgraph".into()), ..Default::default() };
            let mut w = Workspace::new(&name(i), spec);
            w.metadata.namespace = Some("default".into());
            SourceObject::Workspace { object: Box::new(w), source: source.clone() }
        })
        .collect();
    let snap = Snapshot { source: "bench".into(), objects, errors: vec![] };
    let mut set = merge(&[snap], &Defaults::default(), previous);
    set.complete = true;
    set
}

enum Kick {
    /// Publish a new desired set.
    Declare(Arc<DesiredSet>),
    /// A resync (as the periodic one), waiting for the reconciles it queues.
    Resync,
    /// A full resync sweep, waiting for the reconciles it queues.
    FullResync,
    /// Reconcile these workspaces.
    /// Reconciles of these workspaces, asked for this reason.
    Keys(Vec<String>, Why),
}

struct Bench {
    n: usize,
    sim: Arc<SimRuntime>,
    store: DynStore,
    trigger: Trigger,
    desired: watch::Sender<Arc<DesiredSet>>,
    reports: broadcast::Receiver<Report>,
    phases: Vec<Phase>,
}

impl Bench {
    /// Sends one reconcile trigger after another while a full resync sweep runs, and
    /// returns how long each took to be reconciled (request to report), counting only
    /// those that ended before the sweep did; and the sweep's wall time.
    async fn triggers_during_full_resync(&mut self) -> (Vec<f64>, f64) {
        while self.reports.try_recv().is_ok() {}
        let trigger = self.trigger.clone();
        let t0 = Instant::now();
        let sweep = tokio::spawn(async move {
            let queued = trigger.resync_and_wait(Resync::Full).await;
            (queued, Instant::now())
        });
        let mut latencies = Vec::new();
        let mut i = 0usize;
        while !sweep.is_finished() {
            let key = format!("default/{}", name(i % self.n));
            i += 7919;
            let asked = Instant::now();
            self.trigger.reconcile_and_wait(&key, Why::CliRestart).await.expect("queue running");
            if !sweep.is_finished() {
                latencies.push(asked.elapsed().as_secs_f64() * 1e3);
            }
        }
        let (queued, ended) = sweep.await.expect("the sweep ran");
        let wall = (ended - t0).as_secs_f64() * 1e3;
        eprintln!(
            "n={} triggers during a full resync ({wall:.0} ms, queued {queued:?}): {} reconciled",
            self.n,
            latencies.len()
        );
        // Let what the sweep queued finish before the next phase.
        tokio::time::sleep(QUIET).await;
        (latencies, wall)
    }

    /// Starts a phase, then waits until `done(reports, decisions)` holds over the reports
    /// seen and nothing more arrives for QUIET.
    async fn phase(&mut self, name: &str, kick: Kick, done: impl Fn(u64, u64) -> bool) {
        while self.reports.try_recv().is_ok() {} // drain leftovers
        let calls0 = self.sim.calls().snapshot();
        let (t0, c0) = (Instant::now(), cpu_now());
        let mut expect = None;
        match kick {
            Kick::Declare(set) => {
                self.desired.send_replace(set);
            }
            Kick::Resync => {
                expect = Some(self.trigger.resync_and_wait(Resync::Changed).await.expect("queue running") as u64)
            }
            Kick::FullResync => {
                let queued = self.trigger.resync_and_wait(Resync::Full).await.expect("queue running");
                expect = Some(queued as u64);
            }
            Kick::Keys(keys, why) => {
                expect = Some(keys.len() as u64);
                for k in keys {
                    self.trigger.enqueue(&k, why);
                }
            }
        }
        let done = |r: u64, d: u64| expect.is_none_or(|e| r >= e) && done(r, d);
        let (mut reports, mut decisions, mut errors) = (0u64, 0u64, 0u64);
        let mut last = Instant::now();
        let deadline = Duration::from_secs(3600);
        loop {
            let wait = if done(reports, decisions) { QUIET } else { deadline };
            match tokio::time::timeout(wait, self.reports.recv()).await {
                Ok(Ok(r)) => {
                    reports += 1;
                    decisions += r.decisions.len() as u64;
                    errors += u64::from(r.error.is_some());
                    last = Instant::now();
                }
                Ok(Err(broadcast::error::RecvError::Lagged(k))) => {
                    // Too many to keep up with: counted, their decisions are not.
                    reports += k;
                    last = Instant::now();
                }
                Ok(Err(broadcast::error::RecvError::Closed)) => panic!("the queue stopped"),
                Err(_) if done(reports, decisions) => break,
                Err(_) => panic!("{name}: timed out after {reports} reports"),
            }
        }
        let cpu = cpu_now() - c0;
        let calls1 = self.sim.calls().snapshot();
        let docker_calls = calls1
            .iter()
            .map(|(k, v)| (k.to_string(), v - calls0.get(k).copied().unwrap_or(0)))
            .filter(|(_, v)| *v > 0)
            .collect();
        let p = Phase {
            name: name.into(),
            wall_ms: (last - t0).as_secs_f64() * 1e3,
            cpu_ms: cpu.as_secs_f64() * 1e3,
            reports,
            decisions,
            errors,
            docker_calls,
        };
        eprintln!(
            "n={} {name}: wall {:.1} ms, cpu {:.1} ms, {} reports, {} decisions, {} errors, docker {:?}",
            self.n, p.wall_ms, p.cpu_ms, p.reports, p.decisions, p.errors, p.docker_calls
        );
        self.phases.push(p);
    }

    /// Every agent heartbeats once (through the store, as the registry records it).
    /// Returns the workspaces whose status does not show the agent online yet: the
    /// registry queues a reconcile for those (its `nudge`).
    async fn heartbeat_all(&self) -> Vec<String> {
        let records = self.store.list_workspaces().await.expect("list workspaces");
        let store = self.store.clone();
        futures::stream::iter(records)
            .for_each_concurrent(8, |r| {
                let store = store.clone();
                async move {
                    let tokens = store.live_tokens(&r.uid).await.expect("live tokens");
                    if let Some(t) = tokens.iter().rev().find(|t| t.incarnation == r.incarnation) {
                        store.record_heartbeat(&t.id, &r.uid, Utc::now()).await.expect("heartbeat");
                    }
                }
            })
            .await;
        let online = |r: &molecule::model::WorkspaceRecord| {
            r.status
                .as_ref()
                .and_then(|s| molecule::api::condition::find(&s.conditions, "AgentOnline"))
                .is_some_and(|c| c.is_true())
        };
        self.store.list_workspaces().await.expect("list").iter().filter(|r| !online(r)).map(|r| r.key.clone()).collect()
    }
}

async fn run_one(n: usize, store_url: Option<String>) -> Result {
    let dir = tempfile::tempdir().expect("temp dir");
    let (store, store_name) = match store_url {
        Some(url) => (molecule::store::open(&url).await.expect("postgres"), "postgres".to_string()),
        None => {
            let path = dir.path().join("state.db");
            (molecule::store::open(&path.display().to_string()).await.expect("sqlite"), "sqlite".to_string())
        }
    };
    let sim = Arc::new(SimRuntime::new("bench"));
    let (desired_tx, desired_rx) = watch::channel(Arc::new(DesiredSet::default()));
    let settings = Settings {
        heartbeat_interval: Duration::from_secs(30),
        // The simulated agents heartbeat only when the bench says so (heartbeat_all):
        // with the operator's 180 s, a cold converge of 100,000 that takes longer than
        // that had the heartbeat rule restart the first agents as hung, and the
        // converge measured a cascade of restarts instead of itself.
        heartbeat_ttl: Duration::from_secs(3600),
        restart_budget: 3,
        restart_backoff: Duration::from_secs(10),
        freezes: true,
    };
    let agent = AgentEnv { registry_url: "http://127.0.0.1:1".into(), heartbeat_seconds: 30 };
    // As the operator runs it: heartbeats coalesced, everything else straight through.
    let shutdown = CancellationToken::new();
    let coalescing = Arc::new(Coalescing::new(store.clone(), Arc::default()));
    let flusher = coalescing.spawn_flusher(DEFAULT_FLUSH_INTERVAL, shutdown.clone());
    let store = store.with_heartbeats(coalescing);
    let mut ctx =
        Context::new("bench".into(), sim.clone(), store.clone(), desired_rx, settings, agent, Arc::new(Metrics::new()));
    // Full sweeps only when the benchmark asks for one (Kick::FullResync).
    ctx.full_resync = Duration::from_secs(24 * 3600);
    let ctx = Arc::new(ctx);
    let reports = ctx.reports.subscribe();
    let (trigger, trigger_rx) = Trigger::new();
    // The periodic resync is left to the benchmark (Trigger::resync); its first tick at
    // start finds nothing.
    let queue =
        tokio::spawn(reconcile::run(ctx, trigger_rx, Duration::from_secs(24 * 3600), CONCURRENCY, shutdown.clone()));
    let mut b = Bench { n, sim, store, trigger, desired: desired_tx, reports, phases: vec![] };
    tokio::time::sleep(Duration::from_millis(100)).await;

    let set = Arc::new(declare(n, &|_| false, &DesiredSet::default()));
    let nn = n as u64;
    b.phase("cold converge", Kick::Declare(set.clone()), |_, d| d >= nn).await;
    let nudged = b.heartbeat_all().await;
    b.phase("agents come online (the registry queues each)", Kick::Keys(nudged, Why::AgentHeartbeat), |_, _| true)
        .await;
    b.phase("full resync sweep", Kick::FullResync, |_, _| true).await;
    b.phase("no-op resync", Kick::Resync, |_, _| true).await;
    let nudged = b.heartbeat_all().await;
    assert!(nudged.is_empty(), "every agent shows online");
    b.phase("no-op resync, every agent heartbeated since the last", Kick::Resync, |_, _| true).await;
    b.phase("full resync sweep, nothing changed", Kick::FullResync, |_, _| true).await;
    let (triggers_during_full_resync_ms, full_resync_wall_ms) = b.triggers_during_full_resync().await;
    let changed = |i: usize| i.is_multiple_of(100);
    let n_changed = (0..n).filter(|i| changed(*i)).count() as u64;
    let set2 = Arc::new(declare(n, &changed, &set));
    drop(set); // the operator holds one desired set, as it would in production
    b.phase("1% of specs changed (recreated)", Kick::Declare(set2), |_, d| d >= n_changed).await;
    b.phase("no-op resync after the change", Kick::Resync, |_, _| true).await;
    // SCALE_PROFILE_RESYNCS=K: K more no-op resyncs, so that a profiler sees mostly them.
    let extra: usize = std::env::var("SCALE_PROFILE_RESYNCS").ok().and_then(|v| v.parse().ok()).unwrap_or(0);
    for _ in 0..extra {
        b.phase("profiled no-op resync", Kick::Resync, |_, _| true).await;
    }
    b.phases.retain(|p| p.name != "profiled no-op resync");
    let all: Vec<String> = (0..n).map(|i| format!("default/{}", name(i))).collect();
    // What a resync cost before the sweep, and what a cluster-mode controller asks for
    // when it starts (it reconciles every object once).
    let every = Kick::Keys(all, Why::Kubernetes);
    b.phase("every workspace fully reconciled (a resync before the sweep)", every, |_, _| true).await;

    let rss_burst_mb = proc_status_mb("VmRSS:");
    // What `ps` shows of an operator between bursts: jemalloc gives freed pages back a
    // second after they were freed (src/memory.rs).
    tokio::time::sleep(SETTLE).await;
    let rss_mb = proc_status_mb("VmRSS:");
    let rss_peak_mb = proc_status_mb("VmHWM:");
    // The simulated daemon's share: the heap a deep copy of its state takes.
    let before = rust_heap();
    let copy = b.sim.clone_state();
    let sim_mb = rust_heap().saturating_sub(before) as f64 / (1024.0 * 1024.0);
    drop(copy);
    let heap_mb = heap_live_mb();
    // SCALE_EXIT_LIVE=1: exit here without freeing anything, so that a heap profiler's
    // "leaked" report is what is live at the end (heaptrack ... scale --one 10000).
    if std::env::var("SCALE_EXIT_LIVE").is_ok() {
        eprintln!("rss {rss_mb:.1} MB, live heap {heap_mb:.1} MB, of which the simulated daemon {sim_mb:.1} MB");
        eprintln!("of which C code (glibc malloc): {:.1} MB", c_heap() as f64 / 1048576.0);
        for f in ["RssAnon:", "RssFile:", "RssShmem:"] {
            eprintln!("{f} {:.1}", proc_status_mb(f));
        }
        eprintln!("resident MB by mapping: {}", resident_by_mapping());
        let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
        eprintln!("{}", status.lines().find(|l| l.starts_with("Threads:")).unwrap_or_default());
        std::process::exit(0);
    }
    assert_eq!(b.sim.container_count(), n, "one container per workspace");
    shutdown.cancel();
    let _ = queue.await;
    let _ = flusher.await;
    let structures = if n == 10_000 { per_structure(n) } else { vec![] };
    Result {
        workspaces: n,
        store: store_name,
        phases: b.phases,
        rss_mb,
        rss_peak_mb,
        sim_mb,
        heap_mb,
        rss_burst_mb,
        triggers_during_full_resync_ms,
        full_resync_wall_ms,
        structures,
    }
}

fn machine() -> String {
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let mem_gib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| m.lines().next().and_then(|l| l.split_whitespace().nth(1)).and_then(|k| k.parse::<f64>().ok()))
        .map_or(0.0, |kb| kb / 1024.0 / 1024.0);
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_default();
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let load: Vec<&str> = load.split_whitespace().take(3).collect();
    format!("{cores} cores ({model}), {mem_gib:.0} GiB; load average at the end {}", load.join(" "))
}

fn markdown(results: &[Result], command: &str) -> String {
    let mut out = String::new();
    out.push_str("## Scale without Docker (simulated runtime)\n\n");
    out.push_str(&format!("Machine: {}. Release build (bench profile).\n\n", machine()));
    out.push_str(&format!("```sh\n{command}\n```\n\n"));
    out.push_str(
        "The real reconcile queue (concurrency 8), rules, executor and SQLite store (a file in a temp dir); only \
         Docker is replaced, by an in-memory runtime that emits the events Docker emits. Time is wall time from the \
         trigger to the last reconcile; CPU is user+sys of the whole process over the same span (getrusage).\n\n",
    );
    out.push_str("| workspaces | phase | time (ms) | CPU (ms) | reconciles | decisions | simulated Docker calls |\n");
    out.push_str("|---:|---|---:|---:|---:|---:|---|\n");
    for r in results {
        for p in &r.phases {
            let calls: Vec<String> = p.docker_calls.iter().map(|(k, v)| format!("{k} {v}")).collect();
            out.push_str(&format!(
                "| {} | {} | {:.1} | {:.1} | {} | {} | {} |\n",
                r.workspaces,
                p.name,
                p.wall_ms,
                p.cpu_ms,
                p.reports,
                p.decisions,
                calls.join(", ")
            ));
        }
    }
    out.push_str(
        "\n| workspaces | RSS right after the last burst (MB) | RSS 2 s later (MB) | peak RSS (MB) | live heap (MB) | of which the simulated daemon (MB) | operator's live heap (MB) | RSS less the simulated daemon (MB) |\n",
    );
    out.push_str("|---:|---:|---:|---:|---:|---:|---:|---:|\n");
    for r in results {
        out.push_str(&format!(
            "| {} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} |\n",
            r.workspaces,
            r.rss_burst_mb,
            r.rss_mb,
            r.rss_peak_mb,
            r.heap_mb,
            r.sim_mb,
            r.heap_mb - r.sim_mb,
            r.rss_mb - r.sim_mb
        ));
    }
    for r in results.iter().filter(|r| !r.structures.is_empty()) {
        out.push_str(&format!(
            "\nWhat the operator keeps per workspace, by structure, at {} workspaces (each built alone and measured \
             as the growth of the Rust heap, size classes included; hash maps at the load this size gives them):\n\n\
             | structure | bytes per workspace |\n|---|---:|\n",
            r.workspaces
        ));
        for (what, bytes) in &r.structures {
            out.push_str(&format!("| {what} | {bytes:.0} |\n"));
        }
    }
    out.push_str("\nAgainst the targets (issue 7), at 10,000 workspaces:\n\n");
    let held = |ok: bool| if ok { "holds" } else { "**does not hold**" };
    for r in results.iter().filter(|r| r.workspaces == 10_000) {
        for p in r.phases.iter().filter(|p| p.name.starts_with("no-op resync") || p.name.starts_with("full resync")) {
            let verdict = if p.name.starts_with("no-op") { held(p.cpu_ms < 50.0) } else { "not the target's resync" };
            out.push_str(&format!("- {}: {:.1} ms CPU (target: under 50 ms): {verdict}.\n", p.name, p.cpu_ms));
        }
        let rss = r.rss_mb - r.sim_mb;
        let burst = r.rss_burst_mb - r.sim_mb;
        out.push_str(&format!(
            "- RSS: {:.1} MB for the process, {rss:.1} MB less the simulated daemon's heap, {:.0} s after the last \
             burst of reconciles (target: under 40 MB): {}; right after the burst, {burst:.1} MB: {}.\n",
            r.rss_mb,
            SETTLE.as_secs_f64(),
            held(rss < 40.0),
            if burst < 40.0 { "holds too" } else { "does not" },
        ));
    }
    for r in results.iter().filter(|r| !r.triggers_during_full_resync_ms.is_empty()) {
        let mut xs = r.triggers_during_full_resync_ms.clone();
        xs.sort_by(f64::total_cmp);
        let at = |q: f64| xs[((xs.len() - 1) as f64 * q).round() as usize];
        out.push_str(&format!(
            "- At {} workspaces, triggers sent one after another while a full resync sweep ran ({:.0} ms): {} \
             reconciled from request to report in p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms (target, issue 16: \
             handled within 50 ms): {}.\n",
            r.workspaces,
            r.full_resync_wall_ms,
            xs.len(),
            at(0.5),
            at(0.99),
            at(1.0),
            held(at(0.99) < 50.0),
        ));
    }
    out.push('\n');
    if let Ok(notes) = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/bench/scale-notes.md")) {
        out.push_str(&notes);
    }
    out
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let flag = |f: &str| args.iter().any(|a| a == f);
    let value = |f: &str| args.iter().position(|a| a == f).and_then(|i| args.get(i + 1)).cloned();
    let store_url = value("--database-url");
    if std::env::var("RUST_LOG").is_ok() {
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_writer(std::io::stderr)
            .init();
    }
    if let Some(n) = value("--one") {
        let n: usize = n.parse().expect("--one N");
        molecule::memory::tune_allocator(); // as the operator's main does
        let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("runtime");
        let result = rt.block_on(run_one(n, store_url));
        println!("{}", serde_json::to_string(&result).expect("json"));
        return;
    }
    let sizes: Vec<usize> = match value("--sizes") {
        Some(s) => s.split(',').map(|x| x.parse().expect("--sizes 1000,10000")).collect(),
        None if flag("--quick") => vec![1_000],
        None => vec![1_000, 10_000, 100_000],
    };
    let out = value("--out").unwrap_or_else(|| concat!(env!("CARGO_MANIFEST_DIR"), "/bench/results/scale.md").into());
    let command = value("--command").unwrap_or_else(|| "bench/scale".into());
    let exe = std::env::current_exe().expect("current exe");
    let mut results = Vec::new();
    for n in sizes {
        let mut cmd = std::process::Command::new(&exe);
        cmd.arg("--one").arg(n.to_string());
        if let Some(url) = &store_url {
            cmd.arg("--database-url").arg(url);
        }
        let output = cmd.stderr(std::process::Stdio::inherit()).output().expect("run one size");
        assert!(output.status.success(), "the run with {n} workspaces failed");
        let line = String::from_utf8_lossy(&output.stdout);
        let result: Result = serde_json::from_str(line.lines().last().unwrap_or_default()).expect("a JSON result line");
        results.push(result);
    }
    let md = markdown(&results, &command);
    if let Some(parent) = std::path::Path::new(&out).parent() {
        std::fs::create_dir_all(parent).expect("results dir");
    }
    std::fs::write(&out, &md).expect("write results");
    print!("{md}");
    eprintln!("wrote {out}");
}
