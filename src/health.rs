//! The operator's own health: what `/readyz` reports beyond "every source was read".
//!
//! No task's failure vanishes. The tasks the operator cannot work without (the desired
//! store, the API servers, the container cache's feeder, the reconcile loop's helpers)
//! run [`essential`]: if one ends before shutdown, by returning an error or by
//! panicking, the failure is logged, `/readyz` turns 503 naming it, and the whole
//! process stops with a non-zero exit, so its supervisor (systemd, Kubernetes, a
//! shell) restarts it whole rather than leaving it half alive (a frozen desired set,
//! an API that logged "serving" with nothing serving). A task that fails and retries
//! by itself (a status writer whose database is down) reports [`Health::failing`]
//! until it [`Health::recovered`]: `/readyz` is 503 meanwhile.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::{Arc, Mutex};

use futures::FutureExt;
use tokio_util::sync::CancellationToken;

#[derive(Debug, Default)]
pub struct Health {
    /// Task -> why it is not working now.
    problems: Mutex<BTreeMap<&'static str, String>>,
    /// The first essential task that stopped, and why: the process exits with it.
    fatal: Mutex<Option<String>>,
}

impl Health {
    /// `task` is failing (and retrying): not ready until it recovers.
    pub fn failing(&self, task: &'static str, why: impl std::fmt::Display) {
        self.lock_problems().insert(task, why.to_string());
    }

    pub fn recovered(&self, task: &'static str) {
        self.lock_problems().remove(task);
    }

    /// Every task that is not working now, with why; empty when all are.
    pub fn problems(&self) -> Vec<(&'static str, String)> {
        self.lock_problems().iter().map(|(k, v)| (*k, v.clone())).collect()
    }

    /// Why the process must stop, once an essential task stopped.
    pub fn fatal(&self) -> Option<String> {
        self.fatal.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn stopped(&self, task: &'static str, why: String) {
        tracing::error!(task, error = %why, "an essential task stopped; the operator stops so that it restarts whole");
        self.failing(task, &why);
        self.fatal.lock().unwrap_or_else(|e| e.into_inner()).get_or_insert(format!("{task}: {why}"));
    }

    fn lock_problems(&self) -> std::sync::MutexGuard<'_, BTreeMap<&'static str, String>> {
        self.problems.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Runs `task`, which must run until `shutdown`. If it ends sooner (an error, a
/// return, a panic), `health` records why and `shutdown` is cancelled: the operator
/// stops, and exits non-zero.
pub fn essential<F>(
    health: &Arc<Health>,
    name: &'static str,
    shutdown: &CancellationToken,
    task: F,
) -> tokio::task::JoinHandle<()>
where
    F: Future<Output = anyhow::Result<()>> + Send + 'static,
{
    let (health, shutdown) = (health.clone(), shutdown.clone());
    tokio::spawn(async move {
        let outcome = std::panic::AssertUnwindSafe(task).catch_unwind().await;
        let why = match outcome {
            Ok(Ok(())) if shutdown.is_cancelled() => return,
            Ok(Ok(())) => "it ended before the operator was told to stop".to_string(),
            Ok(Err(e)) => format!("{e:#}"),
            Err(panic) => {
                let message = panic
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "a panic without a message".into());
                format!("it panicked: {message}")
            }
        };
        health.stopped(name, why);
        shutdown.cancel();
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn an_essential_task_that_panics_stops_the_operator_and_says_why() {
        let (health, shutdown) = (Arc::new(Health::default()), CancellationToken::new());
        essential(&health, "desired-store", &shutdown, async { panic!("merge went wrong") }).await.unwrap();
        assert!(shutdown.is_cancelled(), "the operator stops");
        let fatal = health.fatal().expect("a fatal failure");
        assert!(fatal.contains("desired-store") && fatal.contains("merge went wrong"), "{fatal}");
        assert_eq!(health.problems()[0].0, "desired-store", "readyz names it");
    }

    #[tokio::test]
    async fn an_essential_task_that_ends_early_or_fails_stops_the_operator() {
        let (health, shutdown) = (Arc::new(Health::default()), CancellationToken::new());
        essential(&health, "kube-api", &shutdown, async { Ok(()) }).await.unwrap();
        assert!(shutdown.is_cancelled());
        assert!(health.fatal().unwrap().contains("ended before"));
        let (health, shutdown) = (Arc::new(Health::default()), CancellationToken::new());
        essential(&health, "kube-api", &shutdown, async { anyhow::bail!("bad TLS key") }).await.unwrap();
        assert!(health.fatal().unwrap().contains("bad TLS key"));
    }

    #[tokio::test]
    async fn ending_at_shutdown_is_not_a_failure() {
        let (health, shutdown) = (Arc::new(Health::default()), CancellationToken::new());
        shutdown.cancel();
        essential(&health, "registry", &shutdown, async { Ok(()) }).await.unwrap();
        assert_eq!(health.fatal(), None);
        assert!(health.problems().is_empty());
    }

    #[test]
    fn a_failing_task_is_a_problem_until_it_recovers() {
        let health = Health::default();
        health.failing("postgres-status", "connection refused");
        assert_eq!(health.problems(), vec![("postgres-status", "connection refused".to_string())]);
        health.recovered("postgres-status");
        assert!(health.problems().is_empty());
    }
}
