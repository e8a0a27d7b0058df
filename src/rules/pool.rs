//! pool-refill: a warm pool keeps `size` unclaimed members running from its template.
//! Members that exited, never started, or run an older template are removed; missing
//! ones are created (in the background: a claim never waits for this); extra ones
//! (the size went down) and every unclaimed member of a pool declared no more are
//! removed. A claimed member is a workspace's container: it is never touched here.

use chrono::{DateTime, Utc};

use crate::model::container::{ContainerInfo, ContainerState};

/// One pool, as the pool pass saw it.
#[derive(Clone, Debug)]
pub struct PoolFacts<'a> {
    /// `namespace/name`.
    pub pool: &'a str,
    /// None: declared no more, or its template is invalid (then nothing is created
    /// and its members are removed: InvalidSpec is shown on the workspaces naming it).
    pub declared: Option<DeclaredPool<'a>>,
    /// Its unclaimed members (pool label, uid no workspace has taken), oldest first.
    pub members: &'a [ContainerInfo],
    pub now: DateTime<Utc>,
}

#[derive(Clone, Copy, Debug)]
pub struct DeclaredPool<'a> {
    pub size: u32,
    /// The spec hash a member of the current template carries.
    pub member_hash: &'a str,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PoolAction {
    /// Create and start this many fresh members.
    Create {
        count: u32,
    },
    Remove {
        id: String,
    },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PoolDecision {
    pub rule: &'static str,
    pub cause: String,
    pub actions: Vec<PoolAction>,
}

/// A member's age after which, still not running, it is replaced (a start in progress
/// is not a failure).
const START_GRACE: chrono::Duration = chrono::Duration::seconds(30);

/// What to do about one pool now; None when it is as declared.
pub fn plan(facts: &PoolFacts<'_>) -> Option<PoolDecision> {
    let Some(declared) = facts.declared else {
        if facts.members.is_empty() {
            return None;
        }
        return Some(decision(
            format!(
                "warm pool {} is declared no more (or invalid): its {} unclaimed member(s) go",
                facts.pool,
                facts.members.len()
            ),
            facts.members.iter().map(remove).collect(),
        ));
    };
    let mut causes = Vec::new();
    let mut actions = Vec::new();
    let mut good = Vec::new();
    for m in facts.members {
        let stale = m.spec_hash() != Some(declared.member_hash);
        let dead = matches!(m.state, ContainerState::Exited | ContainerState::Dead);
        let stuck =
            m.state == ContainerState::Created && m.provisioned_at().is_some_and(|at| facts.now - at > START_GRACE);
        if stale {
            causes.push(format!("{} runs an older template", m.name));
            actions.push(remove(m));
        } else if dead || stuck {
            causes.push(format!("{} is {:?}", m.name, m.state).to_lowercase());
            actions.push(remove(m));
        } else {
            good.push(m);
        }
    }
    let size = declared.size as usize;
    if good.len() > size {
        // The newest go: the oldest are the likeliest to be ready.
        for m in &good[size..] {
            actions.push(remove(m));
        }
        causes.push(format!("{} members for size {size}", good.len()));
    } else if good.len() < size {
        let missing = (size - good.len()) as u32;
        causes.push(format!("{} of {size} members", good.len()));
        actions.push(PoolAction::Create { count: missing });
    }
    if actions.is_empty() {
        return None;
    }
    Some(decision(format!("warm pool {}: {}", facts.pool, causes.join("; ")), actions))
}

fn remove(m: &ContainerInfo) -> PoolAction {
    PoolAction::Remove { id: m.id.clone() }
}

fn decision(cause: String, actions: Vec<PoolAction>) -> PoolDecision {
    PoolDecision { rule: "pool-refill", cause, actions }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::container::labels;

    fn now() -> DateTime<Utc> {
        DateTime::parse_from_rfc3339("2026-01-01T00:10:00Z").unwrap().with_timezone(&Utc)
    }

    fn member(id: &str, state: ContainerState, hash: &str) -> ContainerInfo {
        ContainerInfo {
            id: id.into(),
            name: format!("ws-{id}"),
            state,
            labels: [
                (labels::SPEC_HASH.to_string(), hash.to_string()),
                (labels::PROVISIONED_AT.to_string(), "2026-01-01T00:00:00Z".to_string()),
            ]
            .into(),
            ..Default::default()
        }
    }

    fn plan_for(size: u32, members: &[ContainerInfo]) -> Option<PoolDecision> {
        let declared = Some(DeclaredPool { size, member_hash: "h1" });
        plan(&PoolFacts { pool: "default/p", declared, members, now: now() })
    }

    #[test]
    fn an_empty_pool_is_filled_to_size_and_a_full_one_is_left_alone() {
        let d = plan_for(3, &[]).unwrap();
        assert_eq!(d.actions, vec![PoolAction::Create { count: 3 }]);
        assert_eq!(d.cause, "warm pool default/p: 0 of 3 members");
        let full: Vec<_> = ["a", "b"].iter().map(|id| member(id, ContainerState::Running, "h1")).collect();
        assert_eq!(plan_for(2, &full), None);
    }

    #[test]
    fn exited_and_stale_members_are_replaced_and_extras_removed() {
        let ms = vec![
            member("a", ContainerState::Running, "h1"),
            member("b", ContainerState::Exited, "h1"),
            member("c", ContainerState::Running, "h0"),
        ];
        let d = plan_for(2, &ms).unwrap();
        assert_eq!(
            d.actions,
            vec![
                PoolAction::Remove { id: "b".into() },
                PoolAction::Remove { id: "c".into() },
                PoolAction::Create { count: 1 }
            ]
        );
        assert!(d.cause.contains("ws-c runs an older template") && d.cause.contains("ws-b is exited"), "{}", d.cause);
        let d = plan_for(1, &[member("a", ContainerState::Running, "h1"), member("b", ContainerState::Running, "h1")])
            .unwrap();
        assert_eq!(d.actions, vec![PoolAction::Remove { id: "b".into() }]);
    }

    #[test]
    fn a_member_still_starting_is_waited_for_and_one_stuck_is_replaced() {
        let mut starting = member("a", ContainerState::Created, "h1");
        starting.labels.insert(labels::PROVISIONED_AT.into(), "2026-01-01T00:09:50Z".into());
        assert_eq!(plan_for(1, &[starting]), None);
        // A Pod the runtime is still starting (scheduling, its volume, its image) is
        // not replaced: a new one would wait the same.
        assert_eq!(plan_for(1, &[member("a", ContainerState::Waiting, "h1")]), None);
        let stuck = member("a", ContainerState::Created, "h1");
        assert_eq!(
            plan_for(1, &[stuck]).unwrap().actions,
            vec![PoolAction::Remove { id: "a".into() }, PoolAction::Create { count: 1 }]
        );
    }

    #[test]
    fn a_pool_declared_no_more_loses_its_unclaimed_members() {
        let ms = vec![member("a", ContainerState::Running, "h1")];
        let d = plan(&PoolFacts { pool: "default/p", declared: None, members: &ms, now: now() }).unwrap();
        assert_eq!(d.actions, vec![PoolAction::Remove { id: "a".into() }]);
        assert_eq!(plan(&PoolFacts { pool: "default/p", declared: None, members: &[], now: now() }), None);
    }
}
