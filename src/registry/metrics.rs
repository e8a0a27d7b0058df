//! Placeholder until the registry branch lands its Metrics.
#[derive(Default)]
pub struct Metrics;
impl Metrics {
    pub fn revoked(&self, _reason: &str, _n: u64) {}
    pub fn issued(&self, _n: u64) {}
    pub fn reconciled(&self, _rule: &str, _outcome: &str) {}
    pub fn reconcile_error(&self, _label: &str) {}
}
