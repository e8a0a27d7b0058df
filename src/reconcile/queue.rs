//! The work queue: which workspaces wait for a reconcile, in order, each once; at
//! most one reconcile in flight per workspace (a trigger arriving meanwhile marks it
//! dirty: it runs once more when it finishes, which coalesces any number of triggers
//! into one pass); a finished reconcile may ask to be looked at again after a while;
//! failures back off, doubling. Waiters (`Trigger::reconcile_and_wait`) are answered
//! by the first reconcile of their key that *starts* after they asked.
//!
//! Pure bookkeeping, no IO and no spawning (run.rs drives it), tested below, as
//! kube-runtime tests its scheduler.

use std::collections::{HashMap, HashSet, VecDeque};
use std::time::Duration;

use futures::StreamExt;
use tokio::sync::oneshot;
use tokio_util::time::{DelayQueue, delay_queue};

use crate::trigger::Report;

type Waiter = oneshot::Sender<Report>;

/// How a reconcile ended, as the queue needs to know it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Finished {
    /// Done; look again after this long, if at all.
    Quiet(Option<Duration>),
    /// Failed (an error or a panic): retried with backoff.
    Failed,
}

/// A failed reconcile's place in its backoff.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Retry {
    /// Consecutive failures, this one included.
    pub attempt: u32,
    pub after: Duration,
}

#[derive(Default)]
pub struct WorkQueue {
    /// Keys waiting for a reconcile slot, in order, each once. A set beside the order
    /// keeps "already queued?" O(1): a resync queues every workspace at once, and a scan
    /// per key made that O(n²) (minutes at 100k workspaces).
    order: VecDeque<String>,
    queued: HashSet<String>,
    /// Keys being reconciled: whether a trigger arrived meanwhile, and who waits for
    /// this reconcile's outcome.
    running: HashMap<String, Running>,
    /// Who waits for the next reconcile of a key to start.
    waiting: HashMap<String, Vec<Waiter>>,
    /// Keys to look at again later.
    delayed: DelayQueue<String>,
    delay_keys: HashMap<String, delay_queue::Key>,
    /// Consecutive failures per key.
    failures: HashMap<String, u32>,
}

#[derive(Default)]
struct Running {
    dirty: bool,
    waiters: Vec<Waiter>,
}

impl WorkQueue {
    /// Asks for a reconcile of `key`: queued once, or marked dirty while one runs.
    pub fn add(&mut self, key: String) {
        if let Some(r) = self.running.get_mut(&key) {
            r.dirty = true;
        } else if self.queued.insert(key.clone()) {
            self.order.push_back(key);
        }
    }

    /// `add`, and `waiter` is told the outcome of the first reconcile of `key` that
    /// starts from now on.
    pub fn add_waiting(&mut self, key: String, waiter: Waiter) {
        self.waiting.entry(key.clone()).or_default().push(waiter);
        self.add(key);
    }

    /// The next queued key not being reconciled, now marked as running (its delayed
    /// look, if any, is cancelled: this reconcile is it).
    pub fn start_next(&mut self) -> Option<String> {
        while let Some(key) = self.order.pop_front() {
            self.queued.remove(&key);
            if self.running.contains_key(&key) {
                continue;
            }
            if self.order.is_empty() && self.order.capacity() > 1024 {
                // A burst (a resync, a recovery) is over: its room is not kept for good.
                self.order = VecDeque::new();
                self.queued = HashSet::new();
            }
            if let Some(dk) = self.delay_keys.remove(&key) {
                self.delayed.try_remove(&dk);
            }
            let waiters = self.waiting.remove(&key).unwrap_or_default();
            self.running.insert(key.clone(), Running { dirty: false, waiters });
            return Some(key);
        }
        None
    }

    /// A reconcile of `key` ended. Its waiters are answered with `report`; it is queued
    /// again if it became dirty, else looked at again after the delay it asked for (or
    /// its backoff, if it failed). Returns the retry, for a failure.
    pub fn finish(&mut self, key: &str, finished: Finished, report: &Report) -> Option<Retry> {
        let running = self.running.remove(key).unwrap_or_default();
        for w in running.waiters {
            let _ = w.send(report.clone());
        }
        let (after, retry) = match finished {
            Finished::Quiet(after) => {
                self.failures.remove(key);
                (after, None)
            }
            Finished::Failed => {
                let n = self.failures.entry(key.to_string()).or_insert(0);
                *n = n.saturating_add(1);
                let retry = Retry { attempt: *n, after: backoff(*n) };
                (Some(retry.after), Some(retry))
            }
        };
        if running.dirty {
            self.add(key.to_string());
        } else if let Some(after) = after {
            self.look_again(key, after);
        }
        retry
    }

    /// Looks at `key` after `after`, or sooner if a look is due sooner already.
    pub fn look_after(&mut self, key: String, after: Duration) {
        match self.delay_keys.get(&key) {
            Some(dk) => {
                let due = self.delayed.deadline(dk).saturating_duration_since(tokio::time::Instant::now());
                self.delayed.reset(dk, after.min(due));
            }
            None => self.look_again(&key, after),
        }
    }

    /// Looks at `key` again after `after` (it has no delayed look: starting cancelled it).
    fn look_again(&mut self, key: &str, after: Duration) {
        let dk = self.delayed.insert(key.to_string(), after);
        if let Some(old) = self.delay_keys.insert(key.to_string(), dk) {
            self.delayed.try_remove(&old);
        }
    }

    /// Waits until a delayed look is due and queues it (never returns while none is
    /// delayed, so it can sit in a `select!`).
    pub async fn due(&mut self) {
        if self.delayed.is_empty() {
            return std::future::pending().await;
        }
        if let Some(expired) = self.delayed.next().await {
            let key = expired.into_inner();
            self.delay_keys.remove(&key);
            self.add(key);
        }
    }

    pub fn is_running(&self, key: &str) -> bool {
        self.running.contains_key(key)
    }

    /// Keys queued and not yet started.
    pub fn queued(&self) -> usize {
        self.order.len()
    }

    pub fn idle(&self) -> bool {
        self.order.is_empty() && self.running.is_empty()
    }
}

/// Backoff after the n-th consecutive failure: 0.5 s doubling, at most 30 s.
pub fn backoff(attempt: u32) -> Duration {
    let ms = 500u64.saturating_mul(1 << attempt.saturating_sub(1).min(6));
    Duration::from_millis(ms.min(30_000))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(key: &str) -> Report {
        Report { key: key.into(), ..Report::default() }
    }

    #[test]
    fn each_key_is_queued_once_and_runs_one_at_a_time() {
        let mut q = WorkQueue::default();
        q.add("a".into());
        q.add("b".into());
        q.add("a".into());
        assert_eq!(q.queued(), 2);
        assert_eq!(q.start_next().as_deref(), Some("a"));
        q.add("a".into()); // while a runs: dirty, not queued twice
        assert_eq!(q.start_next().as_deref(), Some("b"));
        assert_eq!(q.start_next(), None, "a is running; it is not started twice");
        assert_eq!(q.finish("a", Finished::Quiet(None), &report("a")), None);
        assert_eq!(q.start_next().as_deref(), Some("a"), "dirty: one more pass");
        q.finish("a", Finished::Quiet(None), &report("a"));
        q.finish("b", Finished::Quiet(None), &report("b"));
        assert!(q.idle());
    }

    #[test]
    fn waiters_hear_the_first_reconcile_that_starts_after_they_asked() {
        let mut q = WorkQueue::default();
        q.add("a".into());
        assert_eq!(q.start_next().as_deref(), Some("a"));
        let (tx, mut rx) = oneshot::channel();
        q.add_waiting("a".into(), tx); // asked while a runs
        q.finish("a", Finished::Quiet(None), &Report { error: Some("first".into()), ..report("a") });
        assert!(rx.try_recv().is_err(), "the running reconcile started before the request");
        assert_eq!(q.start_next().as_deref(), Some("a"));
        q.finish("a", Finished::Quiet(None), &Report { error: Some("second".into()), ..report("a") });
        assert_eq!(rx.try_recv().unwrap().error.as_deref(), Some("second"));
    }

    #[tokio::test(start_paused = true)]
    async fn failures_back_off_doubling_and_success_resets_them() {
        let mut q = WorkQueue::default();
        for attempt in 1..=3 {
            q.add("a".into());
            q.start_next();
            let retry = q.finish("a", Finished::Failed, &report("a")).unwrap();
            assert_eq!(retry, Retry { attempt, after: backoff(attempt) });
        }
        q.add("a".into());
        q.start_next();
        assert_eq!(q.finish("a", Finished::Quiet(None), &report("a")), None);
        q.add("a".into());
        q.start_next();
        assert_eq!(q.finish("a", Finished::Failed, &report("a")).unwrap().attempt, 1);
    }

    #[test]
    fn backoff_doubles_and_caps() {
        assert_eq!(backoff(1), Duration::from_millis(500));
        assert_eq!(backoff(2), Duration::from_secs(1));
        assert_eq!(backoff(20), Duration::from_secs(30));
    }

    #[tokio::test(start_paused = true)]
    async fn a_delayed_look_comes_due_after_the_delay_asked_for() {
        let mut q = WorkQueue::default();
        q.add("a".into());
        q.start_next();
        q.finish("a", Finished::Quiet(Some(Duration::from_secs(5))), &report("a"));
        assert_eq!(q.start_next(), None);
        let t0 = tokio::time::Instant::now();
        q.due().await;
        assert_eq!(t0.elapsed(), Duration::from_secs(5));
        assert_eq!(q.start_next().as_deref(), Some("a"));
    }

    #[tokio::test(start_paused = true)]
    async fn a_reconcile_cancels_the_look_it_makes_unnecessary() {
        let mut q = WorkQueue::default();
        q.add("a".into());
        q.start_next();
        q.finish("a", Finished::Quiet(Some(Duration::from_secs(5))), &report("a"));
        q.add("a".into()); // triggered before the look came due
        q.start_next();
        q.finish("a", Finished::Quiet(None), &report("a"));
        let waited = tokio::time::timeout(Duration::from_secs(60), q.due()).await;
        assert!(waited.is_err(), "no look is left behind");
    }
}
