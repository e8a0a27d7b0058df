//! Whether a workspace's agent is alive: computed once, here, from its container and
//! its last recorded heartbeat, for the heartbeat rule (restart a hung agent), for when
//! to look again (the TTL's end), and for the status (AgentOnline, phase Running).
//!
//! Only a heartbeat since the container was provisioned counts (an older one is the
//! previous incarnation's agent). Silence is counted from the later of that heartbeat
//! (or the container's start, before the first one) and the last moment the registry
//! could not record heartbeats (`Observed::heartbeats_lost_at`): beats the operator
//! could not record are not the agent's silence.

use chrono::{DateTime, Utc};

use super::{ContainerState, Observed};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Liveness {
    /// No running container: no heartbeat is expected.
    NotExpected,
    /// Heard within the TTL. `deadline`: when the silence since would pass the TTL.
    Online { last: DateTime<Utc>, deadline: DateTime<Utc> },
    /// Not heard within the TTL, but not silent past it either (counting from the
    /// container's start or an outage of the store). `heard`: a heartbeat since the
    /// container started, if any; `from`: that heartbeat, or the container's start.
    Waiting { heard: Option<DateTime<Utc>>, from: DateTime<Utc>, deadline: DateTime<Utc> },
    /// Silent past the TTL, counting from `since`.
    Silent { heard: Option<DateTime<Utc>>, since: DateTime<Utc> },
}

impl Liveness {
    pub fn of(observed: &Observed, now: DateTime<Utc>, ttl: std::time::Duration) -> Self {
        let Some(c) = observed.container().filter(|c| c.state == ContainerState::Running) else {
            return Self::NotExpected;
        };
        let ttl = chrono::Duration::from_std(ttl).unwrap_or(chrono::Duration::MAX);
        let heard = last_heard(observed);
        // A container always has a creation time; should it not, count from now.
        let from = heard.or(c.provisioned_at()).unwrap_or(now);
        let since = silent_since(from, observed);
        let deadline = since.checked_add_signed(ttl).unwrap_or(DateTime::<Utc>::MAX_UTC);
        match heard {
            Some(last) if now - last <= ttl => Self::Online { last, deadline },
            _ if now <= deadline => Self::Waiting { heard, from, deadline },
            _ => Self::Silent { heard, since },
        }
    }

    pub fn is_online(&self) -> bool {
        matches!(self, Self::Online { .. })
    }
}

/// The last heartbeat of the current container's agent: recorded after the container
/// was provisioned (any, when there is no container to compare with).
pub fn last_heard(observed: &Observed) -> Option<DateTime<Utc>> {
    let heard = observed.record.as_ref()?.last_heartbeat_at?;
    let provisioned = observed.container().and_then(|c| c.provisioned_at());
    provisioned.is_none_or(|p| heard >= p).then_some(heard)
}

/// Where silence starts counting: at `from`, or later if the registry failed to record
/// heartbeats since (the state store was down or locked), so an outage of the
/// operator's own database never restarts healthy agents nor revokes their tokens;
/// or later if the workspace was woken or resumed since (`WorkspaceRecord::woken_at`):
/// an agent frozen meanwhile could not beat, and its silence before the thaw is not a hang.
pub fn silent_since(from: DateTime<Utc>, observed: &Observed) -> DateTime<Utc> {
    let woken = observed.record.as_ref().and_then(|r| r.woken_at);
    [observed.heartbeats_lost_at, woken].into_iter().flatten().fold(from, DateTime::max)
}

#[cfg(test)]
mod tests {
    use super::super::fixtures::*;
    use super::*;

    fn at(obs: &Observed, secs_after_now: i64) -> Liveness {
        Liveness::of(obs, now() + chrono::Duration::seconds(secs_after_now), settings().heartbeat_ttl)
    }

    #[test]
    fn heard_within_the_ttl_is_online_until_the_ttl_runs_out() {
        let obs = healthy(); // heard at now - 1 s, TTL 10 s
        let last = now() - chrono::Duration::seconds(1);
        let deadline = last + chrono::Duration::seconds(10);
        assert_eq!(at(&obs, 0), Liveness::Online { last, deadline });
        assert_eq!(at(&obs, 9), Liveness::Online { last, deadline });
        assert_eq!(at(&obs, 10), Liveness::Silent { heard: Some(last), since: last });
    }

    #[test]
    fn an_agent_thawed_after_a_long_pause_is_waited_for_from_the_wake() {
        // Heard at now - 1 s, frozen, woken (or resumed) 60 s later: not silent yet.
        let woken = now() + chrono::Duration::seconds(59);
        let obs = healthy().record_with(|r| r.woken_at = Some(woken));
        let l = at(&obs, 60);
        assert_eq!(
            l,
            Liveness::Waiting {
                heard: Some(now() - chrono::Duration::seconds(1)),
                from: now() - chrono::Duration::seconds(1),
                deadline: woken + chrono::Duration::seconds(10)
            }
        );
        assert!(matches!(at(&obs, 70), Liveness::Silent { .. }), "silent a TTL after the wake");
    }

    #[test]
    fn a_new_agent_is_waited_for_from_its_container_start() {
        let obs = healthy().never_heard(); // container provisioned at t(100)
        let l = Liveness::of(&obs, t(105), settings().heartbeat_ttl);
        assert_eq!(l, Liveness::Waiting { heard: None, from: t(100), deadline: t(110) });
        assert!(matches!(Liveness::of(&obs, t(111), settings().heartbeat_ttl), Liveness::Silent { .. }));
    }

    #[test]
    fn a_heartbeat_of_an_earlier_incarnation_does_not_count() {
        let obs = healthy().record_with(|r| r.last_heartbeat_at = Some(t(50))); // before the container's t(100)
        assert_eq!(last_heard(&obs), None);
    }

    #[test]
    fn a_store_outage_moves_the_start_of_silence() {
        let obs = healthy().silent_for(30).heartbeats_lost(2);
        assert!(matches!(at(&obs, 0), Liveness::Waiting { .. }), "not silent past the TTL since the outage");
    }

    #[test]
    fn paused_or_missing_containers_are_not_expected_to_heartbeat() {
        assert_eq!(at(&healthy().with_container(container(1, ContainerState::Paused)), 0), Liveness::NotExpected);
        assert_eq!(at(&healthy().without_container(), 0), Liveness::NotExpected);
    }
}
