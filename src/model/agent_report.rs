//! What a workspace's agent last told the registry about itself, in the original
//! platform's terms (its `workspaces` columns `url`, `agent_card`, `delivery_mode`,
//! `last_error_rate`, `last_sample_error`, `active_tasks`, `uptime_seconds`,
//! `current_task`, `monthly_spend`, and the heartbeat's `runtime_state` and
//! `runtime_metadata`). Kept per workspace by the store (`AgentReports`), read by the
//! status (`AgentHealthy`, `status.agent`) and by discovery.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// How the agent receives messages (the original's `delivery_mode`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DeliveryMode {
    /// The platform calls the agent at its `url`.
    Push,
    /// The agent fetches its messages; no `url` needed.
    Poll,
}

impl DeliveryMode {
    /// `push` or `poll`; anything else is None.
    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "push" => Some(Self::Push),
            "poll" => Some(Self::Poll),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Push => "push",
            Self::Poll => "poll",
        }
    }
}

/// The last register, card update and heartbeat of a workspace's agent, merged: a
/// heartbeat leaves the registration's fields as they are, and the reverse.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct AgentReport {
    /// The incarnation whose agent reported (a report of an older one is history).
    #[serde(default)]
    pub incarnation: i64,
    // From register / update-card.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_card: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delivery_mode: Option<DeliveryMode>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub registered_at: Option<DateTime<Utc>>,
    // From heartbeat.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_rate: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sample_error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub active_tasks: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uptime_seconds: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current_task: Option<String>,
    /// US cents this month; the original's "0 means no update" is applied on receipt.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub monthly_spend: Option<i64>,
    /// `""` or `"wedged"` in the original runtimes; kept as sent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runtime_state: Option<String>,
    /// `{capabilities: {name: bool}, idle_timeout_seconds?}`, kept as sent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runtime_metadata: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reported_at: Option<DateTime<Utc>>,
    /// The last heartbeat that reported `active_tasks > 0` (the lifecycle's idle clock).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub busy_at: Option<DateTime<Utc>>,
    /// Since when the runtime has reported `wedged` without a break (for a health policy).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wedged_since: Option<DateTime<Utc>>,
}

impl AgentReport {
    /// Whether the agent said in its last heartbeat that it is working on something.
    pub fn busy(&self) -> bool {
        self.active_tasks.is_some_and(|n| n > 0)
    }

    /// Whether the runtime declares a capability in `runtime_metadata.capabilities`.
    pub fn declares(&self, capability: &str) -> bool {
        self.runtime_metadata
            .as_ref()
            .and_then(|m| m.get("capabilities"))
            .and_then(|c| c.get(capability))
            .and_then(serde_json::Value::as_bool)
            .unwrap_or(false)
    }

    /// Whether the runtime reports itself wedged.
    pub fn wedged(&self) -> bool {
        self.runtime_state.as_deref() == Some("wedged")
    }

    /// The fields the status shows, to tell whether a heartbeat changed anything a
    /// user sees (uptime and spend move on every beat and are left out).
    pub fn shown(&self) -> impl PartialEq + '_ {
        (
            self.incarnation,
            (&self.url, &self.delivery_mode, &self.agent_card),
            self.error_rate.map(f64::to_bits),
            (&self.sample_error, self.active_tasks, &self.current_task),
            (&self.runtime_state, self.declares("status_mgmt")),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delivery_modes_are_push_and_poll_only() {
        assert_eq!(DeliveryMode::parse("push"), Some(DeliveryMode::Push));
        assert_eq!(DeliveryMode::parse("poll"), Some(DeliveryMode::Poll));
        assert_eq!(DeliveryMode::parse("Push"), None);
        assert_eq!(DeliveryMode::parse("pull"), None);
    }

    #[test]
    fn capabilities_and_wedge_are_read_from_what_the_runtime_sent() {
        let mut r = AgentReport { runtime_state: Some("wedged".into()), ..Default::default() };
        assert!(r.wedged() && !r.declares("status_mgmt"));
        r.runtime_metadata = Some(serde_json::json!({"capabilities": {"status_mgmt": true, "retry": false}}));
        assert!(r.declares("status_mgmt") && !r.declares("retry") && !r.declares("heartbeat"));
    }

    #[test]
    fn uptime_alone_changes_nothing_shown() {
        let a = AgentReport { uptime_seconds: Some(1), error_rate: Some(0.0), ..Default::default() };
        let b = AgentReport { uptime_seconds: Some(2), ..a.clone() };
        assert!(a.shown() == b.shown());
        let c = AgentReport { current_task: Some("x".into()), ..a.clone() };
        assert!(a.shown() != c.shown());
    }
}
