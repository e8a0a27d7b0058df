//! How much Docker containers use, read as cheaply as the host allows.
//!
//! Docker's stats endpoint costs the daemon a request per container (and a second of
//! waiting unless `one-shot`), so where the operator runs on the daemon's host it reads
//! the containers' cgroup files instead, which costs the daemon nothing and the
//! operator three small reads per container:
//!
//! - cgroup v2: `cpu.stat` (`usage_usec`), `memory.current`, `memory.stat`;
//! - cgroup v1: `cpuacct.usage`, `memory.usage_in_bytes`, `memory.stat`.
//!
//! A container's directory is looked for once: first where Docker's cgroupfs and
//! systemd drivers put it (`docker/ID`, `system.slice/docker-ID.scope`), then where
//! `/proc/PID/cgroup` of its main process says (one inspect, for a `--cgroup-parent`
//! or a rootless daemon). When neither is readable (the operator in a container of its
//! own, a remote daemon) the container is read through the one-shot stats API, a few
//! at a time.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use bollard::Docker;
use bollard::query_parameters::StatsOptionsBuilder;
use chrono::Utc;
use futures::StreamExt;

use crate::model::container::ContainerInfo;
use crate::model::usage::{self, Cpu, Reading};

/// Where cgroup file systems are mounted.
const CGROUP_ROOT: &str = "/sys/fs/cgroup";
/// Stats requests in flight at once when cgroups cannot be read.
const STATS_AT_ONCE: usize = 4;

/// Where one container's usage is read.
#[derive(Clone, Debug, PartialEq)]
enum Source {
    /// A cgroup v2 directory.
    V2(PathBuf),
    /// cgroup v1 directories of the cpuacct and memory controllers.
    V1 { cpu: PathBuf, memory: PathBuf },
    /// Docker's stats API.
    Api,
}

/// Remembers where each container's usage is read (shared by the runtime's clones).
#[derive(Debug)]
pub struct UsageReader {
    root: PathBuf,
    found: Mutex<HashMap<String, Source>>,
}

impl Default for UsageReader {
    fn default() -> Self {
        Self { root: PathBuf::from(CGROUP_ROOT), found: Mutex::default() }
    }
}

impl UsageReader {
    /// One reading of each of `containers` it can read; those it cannot are left out.
    pub async fn read(&self, docker: &Docker, containers: &[ContainerInfo]) -> Vec<Reading> {
        let ids: Vec<String> = containers.iter().map(|c| c.id.clone()).collect();
        let (known, unknown) = {
            let mut found = self.found.lock().unwrap_or_else(|e| e.into_inner());
            found.retain(|id, _| ids.contains(id));
            let unknown: Vec<String> = ids.iter().filter(|id| !found.contains_key(*id)).cloned().collect();
            (found.clone(), unknown)
        };
        let mut located = HashMap::new();
        for id in unknown {
            let source = self.locate(docker, &id).await;
            tracing::debug!(container = %id, ?source, "where this container's usage is read");
            located.insert(id, source);
        }
        if !located.is_empty() {
            self.found.lock().unwrap_or_else(|e| e.into_inner()).extend(located.clone());
        }
        let all: Vec<(String, Source)> = known.into_iter().chain(located).collect();
        let (files, api): (Vec<_>, Vec<_>) = all.into_iter().partition(|(_, s)| *s != Source::Api);
        let read = tokio::task::spawn_blocking(move || {
            files.into_iter().map(|(id, source)| (read_files(&source), id)).collect::<Vec<_>>()
        })
        .await
        .unwrap_or_default();
        let mut out = Vec::new();
        for (reading, id) in read {
            match reading {
                Some((cpu, memory_bytes)) => {
                    out.push(Reading { container_id: id, cpu: cpu.map(Cpu::Total), memory_bytes, at: Utc::now() })
                }
                // Gone, or moved: looked for again next time.
                None => {
                    self.found.lock().unwrap_or_else(|e| e.into_inner()).remove(&id);
                }
            }
        }
        let stats = futures::stream::iter(api.into_iter().map(|(id, _)| stats(docker, id)))
            .buffer_unordered(STATS_AT_ONCE)
            .filter_map(|r| async move { r })
            .collect::<Vec<_>>()
            .await;
        out.extend(stats);
        out
    }

    /// Where container `id` is read: its cgroup files when reachable, else the API.
    async fn locate(&self, docker: &Docker, id: &str) -> Source {
        let (root, owned) = (self.root.clone(), id.to_string());
        let guessed = tokio::task::spawn_blocking(move || guess(&root, &owned)).await.ok().flatten();
        if let Some(s) = guessed {
            return s;
        }
        let pid = docker.inspect_container(id, None).await.ok().and_then(|c| c.state?.pid).filter(|p| *p > 0);
        let Some(pid) = pid else { return Source::Api };
        let root = self.root.clone();
        tokio::task::spawn_blocking(move || from_proc(&root, pid)).await.ok().flatten().unwrap_or(Source::Api)
    }
}

/// Where Docker's cgroup drivers put container `id`'s cgroup, if it is there.
fn guess(root: &Path, id: &str) -> Option<Source> {
    let places = [format!("docker/{id}"), format!("system.slice/docker-{id}.scope")];
    for place in &places {
        if let Some(s) = v2_at(&root.join(place)) {
            return Some(s);
        }
    }
    for place in &places {
        if let Some(s) = v1_at(root, place) {
            return Some(s);
        }
    }
    None
}

/// Where `/proc/PID/cgroup` puts process `pid`'s cgroup, if it is readable here.
fn from_proc(root: &Path, pid: i64) -> Option<Source> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    let (cpu, memory) = (usage::cgroup_path(&text, Some("cpuacct")), usage::cgroup_path(&text, Some("memory")));
    if let (Some(cpu), Some(memory)) = (cpu, memory) {
        let (cpu, memory) = (root.join("cpuacct").join(rel(&cpu)), root.join("memory").join(rel(&memory)));
        if cpu.join("cpuacct.usage").is_file() && memory.join("memory.usage_in_bytes").is_file() {
            return Some(Source::V1 { cpu, memory });
        }
    }
    let unified = usage::cgroup_path(&text, None)?;
    // "/" in a v2 file means the process is not in a cgroup of its own (or a namespace
    // hides where it is): the root's files are the whole host's.
    if unified.trim_matches('/').is_empty() {
        return None;
    }
    v2_at(&root.join(rel(&unified))).or_else(|| v2_at(&root.join("unified").join(rel(&unified))))
}

fn rel(path: &str) -> &str {
    path.trim_start_matches('/')
}

fn v2_at(dir: &Path) -> Option<Source> {
    (dir.join("cpu.stat").is_file() && dir.join("memory.current").is_file()).then(|| Source::V2(dir.to_path_buf()))
}

fn v1_at(root: &Path, place: &str) -> Option<Source> {
    let (cpu, memory) = (root.join("cpuacct").join(place), root.join("memory").join(place));
    (cpu.join("cpuacct.usage").is_file() && memory.join("memory.usage_in_bytes").is_file())
        .then_some(Source::V1 { cpu, memory })
}

/// CPU time (ns) and memory in use; None when the files are gone.
fn read_files(source: &Source) -> Option<(Option<u64>, Option<u64>)> {
    let read = |p: PathBuf| std::fs::read_to_string(p).ok();
    match source {
        Source::V2(dir) => {
            let cpu = read(dir.join("cpu.stat"))?;
            let current = read(dir.join("memory.current"))?;
            let stat = read(dir.join("memory.stat"));
            let memory = usage::single_value(&current).map(|c| usage::memory_in_use(c, stat.as_deref()));
            Some((usage::cpu_v2(&cpu), memory))
        }
        Source::V1 { cpu, memory } => {
            let cpu = read(cpu.join("cpuacct.usage"))?;
            let current = read(memory.join("memory.usage_in_bytes"))?;
            let stat = read(memory.join("memory.stat"));
            let memory = usage::single_value(&current).map(|c| usage::memory_in_use(c, stat.as_deref()));
            Some((usage::single_value(&cpu), memory))
        }
        Source::Api => None,
    }
}

/// One reading through the one-shot stats API (no second sample waited for: the
/// rate comes from two of these readings, apart by the sampling interval).
async fn stats(docker: &Docker, id: String) -> Option<Reading> {
    let options = StatsOptionsBuilder::new().stream(false).one_shot(true).build();
    let mut answers = std::pin::pin!(docker.stats(&id, Some(options)));
    let s = answers.next().await?.ok()?;
    let cpu = s.cpu_stats.and_then(|c| c.cpu_usage?.total_usage).filter(|t| *t > 0);
    let memory = s.memory_stats.and_then(|m| {
        let stat: Option<String> =
            m.stats.map(|map| map.into_iter().map(|(k, v)| format!("{k} {v}\n")).collect::<String>());
        Some(usage::memory_in_use(m.usage?, stat.as_deref()))
    });
    Some(Reading { container_id: id, cpu: cpu.map(Cpu::Total), memory_bytes: memory, at: Utc::now() })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(path: &Path, text: &str) {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, text).unwrap();
    }

    #[test]
    fn finds_and_reads_the_cgroup_layouts_docker_makes() {
        let root = tempfile::tempdir().unwrap();
        let r = root.path();
        // v2, systemd driver.
        let v2 = r.join("system.slice/docker-aaa.scope");
        write(&v2.join("cpu.stat"), "usage_usec 2000\n");
        write(&v2.join("memory.current"), "4096\n");
        write(&v2.join("memory.stat"), "inactive_file 1024\n");
        // v1, cgroupfs driver.
        write(&r.join("cpuacct/docker/bbb/cpuacct.usage"), "5000\n");
        write(&r.join("memory/docker/bbb/memory.usage_in_bytes"), "8192\n");
        assert_eq!(guess(r, "aaa"), Some(Source::V2(v2.clone())));
        let v1 = guess(r, "bbb").unwrap();
        assert!(matches!(v1, Source::V1 { .. }), "{v1:?}");
        assert_eq!(guess(r, "ccc"), None);
        assert_eq!(read_files(&Source::V2(v2)), Some((Some(2_000_000), Some(3072))));
        assert_eq!(read_files(&v1), Some((Some(5000), Some(8192))));
        assert_eq!(read_files(&Source::V2(r.join("gone"))), None);
    }
}
