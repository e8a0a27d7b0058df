//! Events that arrive before the listings show them. Docker 20.10 logs `die` before it
//! updates the copy of its containers that `docker ps` reads, so a re-read made at the
//! event can still list the container as running, and with no later event nothing
//! would look again: a crashed agent stayed "Running" until its heartbeat TTL ran out.
//!
//! Each such event says what any read made after the daemon caught up must show
//! ([`Expect`]). An id whose re-read does not show it yet is re-read again after a
//! short wait that doubles, until it does, a newer event for it replaces the
//! expectation, or [`GIVE_UP`] passes (the periodic resync is the net after that).
//! The bookkeeping is pure; the feeder (cache.rs) does the reads.

use std::collections::HashMap;
use std::time::Duration;

use tokio::time::Instant;

use crate::model::container::ContainerState;

/// The first re-read after an event the listing did not show yet.
const FIRST_WAIT: Duration = Duration::from_millis(10);
/// The longest wait between two re-reads.
const MAX_WAIT: Duration = Duration::from_millis(500);
/// How long the listing may lag an event before the feeder stops asking.
pub const GIVE_UP: Duration = Duration::from_secs(10);

/// What a listing that has caught up with an event must show of its container.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Expect {
    /// `die`, `stop`: its process is gone (exited, dead, restarting or removed).
    NotRunning,
    /// `destroy`: the container is gone.
    Gone,
    /// `pause`.
    Paused,
    /// `unpause`.
    NotPaused,
}

impl Expect {
    /// What an event's action promises, if anything. `kill` promises nothing (a
    /// signal the process survives), nor `start` (it may have exited since).
    pub fn of(action: &str) -> Option<Self> {
        match action {
            "die" | "stop" => Some(Self::NotRunning),
            "destroy" => Some(Self::Gone),
            "pause" => Some(Self::Paused),
            "unpause" => Some(Self::NotPaused),
            _ => None,
        }
    }

    /// Whether a listing shows it. `state` None: the listing did not return the container.
    pub fn holds(self, state: Option<ContainerState>) -> bool {
        match self {
            Self::NotRunning => !matches!(state, Some(ContainerState::Running | ContainerState::Paused)),
            Self::Gone => state.is_none(),
            Self::Paused => state != Some(ContainerState::Running),
            Self::NotPaused => state != Some(ContainerState::Paused),
        }
    }
}

#[derive(Debug)]
struct Pending {
    expect: Expect,
    /// The action that set it, for the log line when the listing never catches up.
    action: String,
    due: Instant,
    wait: Duration,
    give_up: Instant,
}

/// Container ids whose last event the listings do not show yet.
#[derive(Debug, Default)]
pub struct Settling {
    pending: HashMap<String, Pending>,
}

/// What [`Settling::checked`] concluded for one id.
#[derive(Debug, PartialEq, Eq)]
pub enum Checked {
    /// Nothing is expected of it (any more).
    Settled,
    /// Not shown yet: it will be re-read.
    Waiting,
    /// Not shown after [`GIVE_UP`]: no more re-reads. Carries the event's action.
    GaveUp(String),
}

impl Settling {
    /// The latest event seen for `id`: its expectation replaces any earlier one; an
    /// event that changes the state without promising one (`start`, `restart`,
    /// `create`) clears it; the rest (a network disconnect after a `die`, an `update`)
    /// change nothing here.
    pub fn saw(&mut self, id: &str, action: &str, now: Instant) {
        match Expect::of(action) {
            Some(expect) => {
                self.pending.insert(
                    id.to_string(),
                    Pending { expect, action: action.to_string(), due: now, wait: FIRST_WAIT, give_up: now + GIVE_UP },
                );
            }
            None if matches!(action, "start" | "restart" | "create") => {
                self.pending.remove(id);
            }
            None => {}
        }
    }

    /// A read started after the last event for `id` returned `state` (None: not listed).
    pub fn checked(&mut self, id: &str, state: Option<ContainerState>, now: Instant) -> Checked {
        let Some(p) = self.pending.get_mut(id) else { return Checked::Settled };
        if p.expect.holds(state) {
            self.pending.remove(id);
            return Checked::Settled;
        }
        if now >= p.give_up {
            let p = self.pending.remove(id).expect("present");
            return Checked::GaveUp(p.action);
        }
        p.due = now + p.wait;
        p.wait = (p.wait * 2).min(MAX_WAIT);
        Checked::Waiting
    }

    /// Forgets everything (a full listing is coming; it repairs what events missed).
    pub fn clear(&mut self) {
        self.pending.clear();
    }

    /// When the next re-read is due, if any is.
    pub fn next_due(&self) -> Option<Instant> {
        self.pending.values().map(|p| p.due).min()
    }

    /// The ids due for a re-read at `now`.
    pub fn due(&self, now: Instant) -> Vec<String> {
        self.pending.iter().filter(|(_, p)| p.due <= now).map(|(id, _)| id.clone()).collect()
    }

    /// Every id still expected to show its last event.
    pub fn ids(&self) -> Vec<String> {
        self.pending.keys().cloned().collect()
    }

    pub fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ContainerState::{Exited, Paused, Running};

    #[test]
    fn each_event_promises_what_a_caught_up_listing_shows() {
        assert_eq!(Expect::of("die"), Some(Expect::NotRunning));
        assert_eq!(Expect::of("kill"), None, "a signal may be survived");
        assert_eq!(Expect::of("start"), None, "a started container may have exited since");
        assert!(Expect::NotRunning.holds(Some(Exited)) && Expect::NotRunning.holds(None));
        assert!(!Expect::NotRunning.holds(Some(Running)));
        assert!(Expect::Gone.holds(None) && !Expect::Gone.holds(Some(Exited)));
        assert!(Expect::Paused.holds(Some(Paused)) && !Expect::Paused.holds(Some(Running)));
        assert!(Expect::NotPaused.holds(Some(Running)) && !Expect::NotPaused.holds(Some(Paused)));
    }

    #[test]
    fn a_die_the_listing_does_not_show_yet_is_read_again_with_growing_waits() {
        let t0 = Instant::now();
        let mut s = Settling::default();
        s.saw("c", "die", t0);
        assert_eq!(s.checked("c", Some(Running), t0), Checked::Waiting);
        assert_eq!(s.next_due(), Some(t0 + FIRST_WAIT));
        assert!(s.due(t0).is_empty());
        let t1 = t0 + FIRST_WAIT;
        assert_eq!(s.due(t1), vec!["c".to_string()]);
        assert_eq!(s.checked("c", Some(Running), t1), Checked::Waiting);
        assert_eq!(s.next_due(), Some(t1 + FIRST_WAIT * 2), "the wait doubles");
        assert_eq!(s.checked("c", Some(Exited), t1 + FIRST_WAIT * 2), Checked::Settled);
        assert!(s.is_empty() && s.next_due().is_none());
    }

    #[test]
    fn a_newer_event_replaces_the_expectation_and_shown_ones_need_nothing() {
        let t0 = Instant::now();
        let mut s = Settling::default();
        s.saw("c", "die", t0);
        s.saw("c", "start", t0); // restarted since: running is right
        assert_eq!(s.checked("c", Some(Running), t0), Checked::Settled);
        s.saw("d", "die", t0);
        assert_eq!(s.checked("d", Some(Exited), t0), Checked::Settled);
        assert!(s.is_empty());
        // A bridge container is disconnected from its network right after it dies: that
        // says nothing of its state, and the die must still settle.
        s.saw("e", "die", t0);
        s.saw("e", "disconnect", t0);
        assert_eq!(s.checked("e", Some(Running), t0), Checked::Waiting);
    }

    #[test]
    fn a_listing_that_never_catches_up_is_given_up_on() {
        let t0 = Instant::now();
        let mut s = Settling::default();
        s.saw("c", "die", t0);
        assert_eq!(s.checked("c", Some(Running), t0 + GIVE_UP), Checked::GaveUp("die".into()));
        assert!(s.is_empty());
    }
}
