//! WarmPool status: its members by state and a Ready condition, from what the pool
//! pass (reconcile/pools.rs) last saw. Pure; the same in every mode (`get warmpools`),
//! and written to the WarmPool's status subresource where the pool is a Kubernetes
//! object (cluster/pools.rs).

use chrono::{DateTime, Utc};

use crate::api::condition::carry_transition_times;
use crate::api::{Condition, ConditionStatus, WarmPoolStatus};

/// What the pool pass counted of one declared pool.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PoolCounts {
    pub size: u32,
    /// Unclaimed members of the current template that run.
    pub ready: u32,
    /// Unclaimed members of the current template still being started (a container
    /// created, a Pod waiting to be scheduled, for its volume or its image).
    pub starting: u32,
    /// Members workspaces took (they run as those workspaces now).
    pub claimed: u32,
}

/// The status of a pool: Ready when `size` members are ready; InvalidSpec (and not
/// Ready) when its template is invalid, with every reason. Unchanged conditions keep
/// the transition time of `previous`.
pub fn status(
    counts: PoolCounts,
    template_errors: Option<&[String]>,
    generation: Option<i64>,
    previous: Option<&WarmPoolStatus>,
    now: DateTime<Utc>,
) -> WarmPoolStatus {
    let PoolCounts { size, ready, starting, claimed } = counts;
    let mut conditions = Vec::new();
    let ready_condition = match template_errors {
        Some(errs) => {
            conditions.push(Condition::new(
                "InvalidSpec",
                ConditionStatus::True,
                "InvalidTemplate",
                errs.join("; "),
                now,
            ));
            Condition::new(
                "Ready",
                ConditionStatus::False,
                "InvalidTemplate",
                "no member is kept while the template is invalid",
                now,
            )
        }
        None if ready >= size => {
            Condition::new("Ready", ConditionStatus::True, "Filled", format!("{ready} of {size} members ready"), now)
        }
        None => Condition::new(
            "Ready",
            ConditionStatus::False,
            "Filling",
            format!("{ready} of {size} members ready, {starting} starting"),
            now,
        ),
    };
    conditions.insert(0, ready_condition);
    if let Some(p) = previous {
        carry_transition_times(&p.conditions, &mut conditions);
    }
    WarmPoolStatus { size, ready, starting, claimed, observed_generation: generation, conditions }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    #[test]
    fn a_pool_is_ready_when_full_and_says_what_it_waits_for_otherwise() {
        let now = t("2026-12-07T10:00:00Z");
        let filling = status(PoolCounts { size: 2, ready: 1, starting: 1, claimed: 3 }, None, Some(4), None, now);
        assert_eq!((filling.ready, filling.starting, filling.claimed, filling.observed_generation), (1, 1, 3, Some(4)));
        let ready = &filling.conditions[0];
        assert_eq!(
            (ready.type_.as_str(), ready.status, ready.reason.as_str()),
            ("Ready", ConditionStatus::False, "Filling")
        );
        assert_eq!(ready.message, "1 of 2 members ready, 1 starting");

        let later = t("2026-12-07T10:00:05Z");
        let full =
            status(PoolCounts { size: 2, ready: 2, starting: 0, claimed: 3 }, None, Some(4), Some(&filling), later);
        assert_eq!(
            (full.conditions[0].status, full.conditions[0].last_transition_time),
            (ConditionStatus::True, later)
        );
        let again = status(
            PoolCounts { size: 2, ready: 2, starting: 0, claimed: 3 },
            None,
            Some(4),
            Some(&full),
            t("2026-12-07T10:01:00Z"),
        );
        assert_eq!(again, full, "an unchanged status is the same status, time and all");
    }

    #[test]
    fn an_invalid_template_is_not_ready_and_says_why() {
        let errs = vec!["spec.template.tier: 9 is not a tier".to_string()];
        let st =
            status(PoolCounts { size: 2, ..Default::default() }, Some(&errs), None, None, t("2026-12-07T10:00:00Z"));
        let types: Vec<_> = st.conditions.iter().map(|c| (c.type_.as_str(), c.status)).collect();
        assert_eq!(types, vec![("Ready", ConditionStatus::False), ("InvalidSpec", ConditionStatus::True)]);
        assert!(st.conditions[1].message.contains("9 is not a tier"));
    }
}
