//! Team quotas (a hold, see `Hold`): `maxWorkspaces` caps how many members have a container, `maxRunning`
//! how many run unpaused. Members over quota wait (Pending, QuotaExceeded) in a
//! deterministic order: first seen, first served (ties by name). Nothing that holds
//! a slot is ever stopped to make room; waiting members start as room appears.

use chrono::{DateTime, Utc};

use super::{ContainerState, Facts};
use crate::api::OperatingMode;

/// The rest of a workspace's team, as its quota needs it (observed by the reconciler:
/// the other members' records and containers).
#[derive(Clone, Debug, Default, PartialEq)]
pub enum TeamView {
    /// Not a member of a team with quotas.
    #[default]
    NoQuota,
    /// A member of a team with quotas whose members' containers cannot be listed now:
    /// it waits (a member is never counted as having no container on unknown).
    Unknown,
    /// The team's name and limits, and every other member.
    Known { team: String, limits: Limits, others: Vec<Member> },
}

/// Why the workspace of `facts` must wait for its team's quota, if it must.
pub fn hold(facts: &Facts<'_>) -> Option<String> {
    match &facts.observed.team {
        TeamView::NoQuota => None,
        TeamView::Unknown => Some("waiting until Docker's containers can be listed".into()),
        TeamView::Known { team, limits, others } => {
            let me = Member::of(facts)?;
            let mut members = others.clone();
            members.push(me.clone());
            hold_in(team, *limits, &members, &me.name)
        }
    }
}

impl Member {
    /// The workspace of `facts` as its team's quota sees it (None while Docker cannot
    /// be listed or before it is declared).
    pub fn of(facts: &Facts<'_>) -> Option<Self> {
        let desired = facts.desired?;
        let containers = facts.observed.containers.as_ref()?;
        let record = facts.observed.record.as_ref();
        let mine: Vec<_> =
            containers.iter().filter(|c| record.is_some_and(|r| c.uid() == Some(r.uid.as_str()))).collect();
        let mode = facts.mode();
        Some(Member {
            name: desired.key.name.clone(),
            first_seen: record.map(|r| r.created_at),
            has_container: !mine.is_empty(),
            running: mine.iter().any(|c| c.state == ContainerState::Running),
            wants_container: mode.is_some_and(|m| m != OperatingMode::Stopped),
            wants_running: mode == Some(OperatingMode::Running),
        })
    }
}

/// One team member as the quota sees it.
#[derive(Clone, Debug, PartialEq)]
pub struct Member {
    pub name: String,
    /// When the operator first saw it (store record), None if not yet.
    pub first_seen: Option<DateTime<Utc>>,
    /// Has a container in any state (holds a workspace slot).
    pub has_container: bool,
    /// Has a running, unpaused container (holds a running slot).
    pub running: bool,
    /// Its effective mode is not Stopped (wants a container).
    pub wants_container: bool,
    /// Its effective mode is Running (wants a running container).
    pub wants_running: bool,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Limits {
    pub max_workspaces: Option<u32>,
    pub max_running: Option<u32>,
}

/// Why `me` must wait, or None when it may have what it wants.
pub fn hold_in(team: &str, limits: Limits, members: &[Member], me: &str) -> Option<String> {
    let mine = members.iter().find(|m| m.name == me)?;
    let order = |m: &&Member| (m.first_seen.unwrap_or(DateTime::<Utc>::MAX_UTC), m.name.clone());
    let check =
        |max: Option<u32>, holds: fn(&Member) -> bool, wants: fn(&Member) -> bool, what: &str| -> Option<String> {
            let max = max? as usize;
            if holds(mine) || !wants(mine) {
                return None;
            }
            let held = members.iter().filter(|m| holds(m)).count();
            let mut waiting: Vec<&Member> = members.iter().filter(|m| !holds(m) && wants(m)).collect();
            waiting.sort_by_key(order);
            let place = waiting.iter().position(|m| m.name == me)?;
            let room = max.saturating_sub(held);
            (place >= room).then(|| {
                format!(
                    "team {team} allows {max} {what} and {held} are taken; this one is number {} in line",
                    place + 1 - room
                )
            })
        };
    check(limits.max_workspaces, |m| m.has_container, |m| m.wants_container, "workspaces")
        .or_else(|| check(limits.max_running, |m| m.running, |m| m.wants_running, "running workspaces"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn m(name: &str, seen: i64, has: bool, running: bool) -> Member {
        Member {
            name: name.into(),
            first_seen: Some(Utc.timestamp_opt(seen, 0).unwrap()),
            has_container: has,
            running,
            wants_container: true,
            wants_running: true,
        }
    }

    #[test]
    fn first_seen_first_served() {
        let members = [m("c", 3, false, false), m("a", 1, false, false), m("b", 2, false, false)];
        let l = Limits { max_workspaces: Some(2), max_running: None };
        assert_eq!(hold_in("t", l, &members, "a"), None);
        assert_eq!(hold_in("t", l, &members, "b"), None);
        assert!(hold_in("t", l, &members, "c").unwrap().contains("allows 2 workspaces"));
    }

    #[test]
    fn holders_are_never_displaced_even_over_quota() {
        // Quota lowered to 1 while 2 run: both keep their slots, the newcomer waits.
        let members = [m("a", 1, true, true), m("b", 2, true, true), m("c", 0, false, false)];
        let l = Limits { max_workspaces: Some(1), max_running: None };
        assert_eq!(hold_in("t", l, &members, "a"), None);
        assert_eq!(hold_in("t", l, &members, "b"), None);
        assert!(hold_in("t", l, &members, "c").is_some());
    }

    #[test]
    fn room_appearing_lets_the_next_in_line_start() {
        let l = Limits { max_workspaces: Some(2), max_running: None };
        let members = [m("a", 1, true, true), m("c", 3, false, false), m("b", 2, false, false)];
        assert_eq!(hold_in("t", l, &members, "b"), None);
        assert!(hold_in("t", l, &members, "c").is_some());
    }

    #[test]
    fn max_running_counts_unpaused_containers_and_gates_resume() {
        let l = Limits { max_workspaces: None, max_running: Some(1) };
        let mut paused = m("b", 2, true, false);
        paused.wants_running = true;
        let members = [m("a", 1, true, true), paused];
        assert!(hold_in("t", l, &members, "b").unwrap().contains("running workspaces"));
        let mut stays_paused = m("b", 2, true, false);
        stays_paused.wants_running = false;
        assert_eq!(hold_in("t", l, &[m("a", 1, true, true), stays_paused], "b"), None);
    }

    #[test]
    fn no_limits_no_hold() {
        assert_eq!(hold_in("t", Limits::default(), &[m("a", 1, false, false)], "a"), None);
    }
}
