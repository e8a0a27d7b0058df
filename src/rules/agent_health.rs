//! agent health: whether a workspace whose agent is online is healthy or Degraded, by
//! what its runtime reports in its heartbeats, with the original platform's
//! transitions (its `evaluateStatus`):
//! - healthy → Degraded when the runtime reports `runtime_state: "wedged"`, or an
//!   `error_rate` of 0.5 or more, unless it declares the `status_mgmt` capability (it
//!   then manages its own status, and an error rate alone does not degrade it);
//! - Degraded → healthy only when the error rate is below 0.1 and no wedge is reported;
//! - in between (0.1 to 0.5), the workspace stays as it was.
//!
//! A report of another incarnation than the current one says nothing about this one.

use crate::model::AgentReport;

/// At or above: degraded (unless the runtime manages its own status).
pub const DEGRADE_AT: f64 = 0.5;
/// Below, with no wedge: healthy again.
pub const RECOVER_BELOW: f64 = 0.1;

/// The `AgentHealthy` condition's verdict.
#[derive(Clone, Debug, PartialEq)]
pub enum AgentHealth {
    /// Healthy; the reason word for the condition (`Healthy`, `Recovered`).
    Healthy(&'static str),
    /// Degraded: the reason word (`Wedged`, `ErrorRate`) and a sentence.
    Degraded(&'static str, String),
}

impl AgentHealth {
    pub fn is_healthy(&self) -> bool {
        matches!(self, Self::Healthy(_))
    }
}

/// The next health of the agent of `incarnation`, from its last `report` and whether
/// the status showed it healthy before (`previously_healthy`). None when there is
/// nothing to judge by: no report from this incarnation's agent.
pub fn evaluate(previously_healthy: bool, report: Option<&AgentReport>, incarnation: i64) -> Option<AgentHealth> {
    let report = report.filter(|r| r.incarnation == incarnation && r.reported_at.is_some())?;
    let rate = report.error_rate.unwrap_or(0.0);
    let sample = report.sample_error.as_deref().filter(|s| !s.is_empty());
    let with_sample = |text: String| match sample {
        Some(s) => format!("{text}; last error: {s}"),
        None => text,
    };
    if report.wedged() {
        return Some(AgentHealth::Degraded("Wedged", with_sample("the runtime reports it is wedged".into())));
    }
    if previously_healthy {
        if rate >= DEGRADE_AT && !report.declares("status_mgmt") {
            let text = format!("error rate {rate:.2} (degraded at {DEGRADE_AT})");
            return Some(AgentHealth::Degraded("ErrorRate", with_sample(text)));
        }
        return Some(AgentHealth::Healthy("Healthy"));
    }
    let runtime_state_empty = report.runtime_state.as_deref().is_none_or(str::is_empty);
    if rate < RECOVER_BELOW && runtime_state_empty {
        return Some(AgentHealth::Healthy("Recovered"));
    }
    let text = format!("error rate {rate:.2} (healthy again below {RECOVER_BELOW} with no wedge)");
    Some(AgentHealth::Degraded("ErrorRate", with_sample(text)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(rate: f64, state: &str) -> AgentReport {
        AgentReport {
            incarnation: 1,
            error_rate: Some(rate),
            runtime_state: Some(state.into()),
            reported_at: Some(chrono::Utc::now()),
            ..Default::default()
        }
    }

    fn healthy(previously: bool, r: &AgentReport) -> bool {
        evaluate(previously, Some(r), 1).unwrap().is_healthy()
    }

    #[test]
    fn no_report_of_this_incarnation_says_nothing() {
        assert_eq!(evaluate(true, None, 1), None);
        assert_eq!(evaluate(true, Some(&report(0.9, "wedged")), 2), None);
        let registered_only = AgentReport { incarnation: 1, ..Default::default() };
        assert_eq!(evaluate(true, Some(&registered_only), 1), None);
    }

    #[test]
    fn an_error_rate_of_half_or_more_degrades() {
        assert!(healthy(true, &report(0.49, "")));
        assert!(!healthy(true, &report(0.5, "")));
        let d = evaluate(true, Some(&report(0.9, "")), 1).unwrap();
        assert!(matches!(d, AgentHealth::Degraded("ErrorRate", ref m) if m.contains("0.90")));
    }

    #[test]
    fn a_runtime_managing_its_own_status_is_not_degraded_by_its_error_rate() {
        let mut r = report(0.9, "");
        r.runtime_metadata = Some(serde_json::json!({"capabilities": {"status_mgmt": true}}));
        assert!(healthy(true, &r));
        r.runtime_state = Some("wedged".into());
        assert!(!healthy(true, &r), "a wedge degrades whatever the runtime declares");
    }

    #[test]
    fn a_wedge_degrades_and_names_the_sample_error() {
        let mut r = report(0.0, "wedged");
        r.sample_error = Some("claude: session lost".into());
        let d = evaluate(true, Some(&r), 1).unwrap();
        assert_eq!(
            d,
            AgentHealth::Degraded(
                "Wedged",
                "the runtime reports it is wedged; last error: claude: session lost".into()
            )
        );
    }

    #[test]
    fn recovery_needs_an_error_rate_below_a_tenth_and_no_wedge() {
        assert!(!healthy(false, &report(0.3, "")), "between the thresholds it stays degraded");
        assert!(!healthy(false, &report(0.05, "wedged")));
        assert!(healthy(false, &report(0.09, "")));
        assert_eq!(evaluate(false, Some(&report(0.0, "")), 1), Some(AgentHealth::Healthy("Recovered")));
        assert!(healthy(true, &report(0.3, "")), "between the thresholds it stays healthy");
    }
}
