//! The reconcile queue and loop (being written).

use tokio::sync::mpsc;

/// Asks for a workspace (`ns/name`) to be reconciled soon. Cheap and non-blocking;
/// repeated requests for the same key coalesce.
#[derive(Clone, Debug)]
pub struct Trigger {
    tx: mpsc::UnboundedSender<(String, &'static str)>,
}

impl Trigger {
    pub fn new() -> (Self, mpsc::UnboundedReceiver<(String, &'static str)>) {
        let (tx, rx) = mpsc::unbounded_channel();
        (Self { tx }, rx)
    }

    /// `why` names the trigger for logs and metrics: "registry-401", "docker-event", ...
    pub fn enqueue(&self, key: &str, why: &'static str) {
        let _ = self.tx.send((key.to_string(), why));
    }
}
