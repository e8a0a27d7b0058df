//! Per-workspace usage (CPU, memory): sampled every `--usage-seconds` (default
//! [`DEFAULT_EVERY`]) by one task beside the loop, never on a reconcile's path, and
//! kept in memory only ([`UsageBook`]): an observation, not state, so nothing is
//! written to the store per sample. Each round reads the runtime's usage of this
//! instance's running and paused containers as the container cache holds them (no
//! listing), turns two readings of a container into a CPU rate (model/usage.rs), and
//! sets the `/metrics` gauges; a workspace whose container is gone loses its entry
//! and its series in the same round. The admin API, the CLI and the fleet page read
//! the book; the page's stream is told when it changed.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::ContainerCache;
use crate::metrics::Metrics;
use crate::model::container::{ContainerInfo, ContainerState, labels};
use crate::model::usage::{Reading, Usage, usage};
use crate::runtime::Runtime;

/// How often usage is read unless told otherwise.
pub const DEFAULT_EVERY: Duration = Duration::from_secs(15);

/// What each workspace uses, as last read. Shared (in an `Arc`) by the sampler and
/// the registry.
#[derive(Debug)]
pub struct UsageBook {
    state: Mutex<Book>,
    /// Bumped after each round that changed what is shown.
    version: watch::Sender<u64>,
}

impl Default for UsageBook {
    fn default() -> Self {
        Self { state: Mutex::default(), version: watch::channel(0).0 }
    }
}

#[derive(Debug, Default)]
struct Book {
    /// Each container's last reading, for the next rate.
    readings: HashMap<String, Reading>,
    /// By workspace key (`ns/name`).
    shown: BTreeMap<String, Usage>,
}

/// What a round changed.
#[derive(Debug, Default, PartialEq)]
pub struct Changes {
    pub shown: Vec<(String, Usage)>,
    /// Workspaces that show no usage any more.
    pub removed: Vec<String>,
}

impl UsageBook {
    /// Workspace `key`'s usage (`ns/name`), if it has one.
    pub fn get(&self, key: &str) -> Option<Usage> {
        self.lock().shown.get(key).cloned()
    }

    /// Every workspace's usage, by key.
    pub fn all(&self) -> BTreeMap<String, Usage> {
        self.lock().shown.clone()
    }

    /// Changes whenever a round changed what is shown.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.version.subscribe()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Book> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Takes in one round: `live` the containers read, `readings` what was read of them
    /// (None: the runtime reports no usage, so none is shown).
    pub fn update(&self, live: &[ContainerInfo], readings: Option<Vec<Reading>>) -> Changes {
        let mut book = self.lock();
        let changes = book.update(live, readings);
        drop(book);
        if !changes.shown.is_empty() || !changes.removed.is_empty() {
            self.version.send_modify(|v| *v += 1);
        }
        changes
    }
}

impl Book {
    fn update(&mut self, live: &[ContainerInfo], readings: Option<Vec<Reading>>) -> Changes {
        let read: HashMap<String, Reading> =
            readings.unwrap_or_default().into_iter().map(|r| (r.container_id.clone(), r)).collect();
        // A workspace being replaced may have two containers for a moment: its newest.
        let mut current: BTreeMap<&str, &ContainerInfo> = BTreeMap::new();
        for c in live.iter().filter(|c| read.contains_key(&c.id)) {
            let Some(key) = c.workspace() else { continue };
            let newer = |old: &ContainerInfo| incarnation(c) > incarnation(old);
            if current.get(key).is_none_or(|&old| newer(old)) {
                current.insert(key, c);
            }
        }
        let mut shown = BTreeMap::new();
        for (key, c) in current {
            let Some(now) = read.get(&c.id) else { continue };
            shown.insert(key.to_string(), usage(self.readings.get(&c.id), now));
        }
        let removed: Vec<String> = self.shown.keys().filter(|k| !shown.contains_key(*k)).cloned().collect();
        let changed: Vec<(String, Usage)> =
            shown.iter().filter(|(k, u)| self.shown.get(*k) != Some(*u)).map(|(k, u)| (k.clone(), u.clone())).collect();
        self.readings = read;
        self.shown = shown;
        Changes { shown: changed, removed }
    }
}

fn incarnation(c: &ContainerInfo) -> i64 {
    c.label(labels::INCARNATION).and_then(|i| i.parse().ok()).unwrap_or(0)
}

/// Reads usage every `every` until `shutdown`: the book and the gauges follow.
pub async fn sample(
    runtime: Arc<dyn Runtime>,
    cache: Arc<ContainerCache>,
    book: Arc<UsageBook>,
    metrics: Arc<Metrics>,
    every: Duration,
    shutdown: CancellationToken,
) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        // Unknown (the runtime unreachable): what was shown stays until it is known.
        let Some(live) = cache.live() else { continue };
        let live: Vec<ContainerInfo> = live.into_iter().filter(|c| c.state != ContainerState::Unknown).collect();
        let readings = match live.is_empty() {
            true => Some(Vec::new()),
            false => match runtime.usage(&live).await {
                Ok(r) => r,
                Err(e) => {
                    tracing::debug!(error = %e, "could not read the workspaces' usage");
                    continue;
                }
            },
        };
        let changes = book.update(&live, readings);
        for (key, u) in &changes.shown {
            metrics.set_usage(key, Some(u));
        }
        for key in &changes.removed {
            metrics.set_usage(key, None);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::usage::Cpu;
    use chrono::{DateTime, TimeZone, Utc};

    fn at(s: i64) -> DateTime<Utc> {
        Utc.timestamp_opt(1_800_000_000 + s, 0).unwrap()
    }

    fn container(id: &str, key: &str, incarnation: i64) -> ContainerInfo {
        ContainerInfo {
            id: id.into(),
            state: ContainerState::Running,
            labels: [
                (labels::WORKSPACE.to_string(), key.to_string()),
                (labels::INCARNATION.to_string(), incarnation.to_string()),
            ]
            .into(),
            ..Default::default()
        }
    }

    fn reading(id: &str, cpu_s: u64, memory: u64, s: i64) -> Reading {
        Reading {
            container_id: id.into(),
            cpu: Some(Cpu::Total(cpu_s * 1_000_000_000)),
            memory_bytes: Some(memory),
            at: at(s),
        }
    }

    #[test]
    fn two_rounds_make_a_rate_and_a_gone_container_takes_its_workspace_s_usage_along() {
        let book = UsageBook::default();
        let mut version = book.subscribe();
        let live = [container("c1", "default/a", 1), container("c2", "default/b", 1)];
        let first = book.update(&live, Some(vec![reading("c1", 10, 100, 0), reading("c2", 0, 200, 0)]));
        assert_eq!(first.shown.len(), 2);
        assert_eq!(book.get("default/a").unwrap().cpu_cores, None, "one reading: memory, no rate yet");
        assert_eq!(book.get("default/a").unwrap().memory_bytes, Some(100));
        assert!(version.has_changed().unwrap());
        version.mark_unchanged();

        let second = book.update(&live[..1], Some(vec![reading("c1", 12, 150, 10)]));
        assert_eq!(book.get("default/a").unwrap().cpu_cores, Some(0.2));
        assert_eq!(second.removed, ["default/b"]);
        assert_eq!(book.get("default/b"), None);
        assert!(version.has_changed().unwrap());
        version.mark_unchanged();

        let none = book.update(&live[..1], None);
        assert_eq!(none.removed, ["default/a"], "a runtime that reports nothing shows nothing");
        assert!(book.all().is_empty());
        let quiet = book.update(&[], Some(vec![]));
        assert_eq!(quiet, Changes::default());
    }

    #[test]
    fn a_workspace_with_two_containers_shows_its_newest() {
        let book = UsageBook::default();
        let live = [container("old", "default/a", 1), container("new", "default/a", 2)];
        book.update(&live, Some(vec![reading("old", 1, 999, 0), reading("new", 1, 5, 0)]));
        assert_eq!(book.get("default/a").unwrap().memory_bytes, Some(5));
    }
}
