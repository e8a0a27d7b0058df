//! What each workspace's token file holds, remembered between reconciles, so that a
//! reconcile reads the file through Docker's archive API only when it may have changed.
//!
//! Reading the file costs the daemon a process spawn and a mount (on the order of
//! 100 ms of its CPU, as much as creating the container), and a cold start runs
//! three or four reconciles per workspace (provision, the events of its own create,
//! token write and start, the agent's register): reading every time made the
//! operator's converge twice the work of `docker run`.
//!
//! The memo holds, per workspace, the container, the hash of the file's content and
//! when that was known: after the operator wrote the file itself (the time the write
//! returned), or when a read started. An entry stops counting, and the next reconcile
//! reads the file again, when
//! - the daemon reports a write into that container newer than the entry: a copy
//!   into it (`extract-to-dir`, as `docker cp` makes) or an exec (`exec_create`,
//!   `exec_start`, `exec_die`: a shell in it may write anything);
//! - the registry refuses the workspace's agent (a 401 or 403): the agent presents
//!   what the file holds and re-reads it every half second, so any write nothing
//!   reports (from a process inside the container, or into the volume's directory on
//!   the host) that breaks the token shows up here within a second. Refusals read the
//!   file at most once per `REFUSAL_REREAD` per workspace: a refusal within that time
//!   of the last read or write is noted, and the first look after it reads the file.
//!   Anyone can make the registry refuse a request naming any workspace, and a read
//!   costs the daemon as much as a container create: unbounded, a flood of 401s would
//!   be a flood of reads;
//! - it is older than `MAX_AGE`, the net for writes nothing reports (a process inside
//!   the container, or the volume's directory on the host, while the agent is down);
//! - the container is another one (a new incarnation).
//!
//! The comparison with live tokens still happens on every pass, from the store: only
//! the file's content is remembered, never whether it is valid.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use chrono::{DateTime, Utc};

use crate::compact::Hex;
use crate::rules::{Observed, TokenFile};
use crate::runtime::{Runtime, RuntimeEvent};

/// Longest an entry is trusted without a read (the net for unreported writes).
pub const MAX_AGE: Duration = Duration::from_secs(300);
/// Least time between a read (or write) of a workspace's file and the read a refusal
/// of its agent causes. The agent retries a refusal within a second (its backoff
/// starts at half a second), so a broken file is still read within about that.
pub const REFUSAL_REREAD: Duration = Duration::from_secs(1);

/// Ids and hashes as bytes: one of these per workspace (bench/scale).
#[derive(Clone, Debug)]
struct Entry {
    container_id: Hex,
    hash: Hex,
    at: DateTime<Utc>,
    /// The agent was refused since `at`: read again once REFUSAL_REREAD has passed.
    refused: bool,
}

#[derive(Debug, Default)]
pub struct TokenMemo {
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    /// By workspace key.
    entries: HashMap<Box<str>, Entry>,
    /// The newest event that may have changed files, by container id. Kept apart from
    /// the entries so an event handled before a reconcile records its entry still counts.
    last_event: HashMap<Hex, DateTime<Utc>>,
}

impl TokenMemo {
    /// The file's content as last known, if nothing since may have changed it.
    pub fn known(&self, key: &str, container_id: &str, now: DateTime<Utc>) -> Option<String> {
        let inner = self.inner.lock().ok()?;
        let id = Hex::new(container_id);
        let e = inner.entries.get(key).filter(|e| e.container_id == id)?;
        let max_age = chrono::Duration::from_std(MAX_AGE).ok()?;
        if now - e.at > max_age {
            return None;
        }
        if inner.last_event.get(&id).is_some_and(|t| *t > e.at) {
            return None;
        }
        if e.refused && now - e.at >= chrono::Duration::from_std(REFUSAL_REREAD).ok()? {
            return None;
        }
        Some(e.hash.to_string())
    }

    /// The file in `container_id` held (or was just written with) content hashing to
    /// `hash` as of `at`.
    pub fn record(&self, key: &str, container_id: &str, hash: &str, at: DateTime<Utc>) {
        if let Ok(mut inner) = self.inner.lock() {
            let container_id = Hex::new(container_id);
            // An event no newer than what is now known can never outdate it: not kept
            // (one per container otherwise, from the operator's own token writes).
            if inner.last_event.get(&container_id).is_some_and(|t| *t <= at) {
                inner.last_event.remove(&container_id);
            }
            inner.entries.insert(key.into(), Entry { container_id, hash: hash.into(), at, refused: false });
        }
    }

    /// The registry refused the workspace's agent at `now`: its file is read again at
    /// the next look, or, if it was read or written less than REFUSAL_REREAD before,
    /// at the first look once that has passed. Returns how long until then (zero: now).
    pub fn refused(&self, key: &str, now: DateTime<Utc>) -> Duration {
        let Ok(mut inner) = self.inner.lock() else { return Duration::ZERO };
        let Some(e) = inner.entries.get_mut(key) else { return Duration::ZERO };
        let due = e.at + chrono::Duration::from_std(REFUSAL_REREAD).unwrap_or_default();
        match (due - now).to_std() {
            Ok(wait) if !wait.is_zero() => {
                e.refused = true;
                wait
            }
            _ => {
                inner.entries.remove(key);
                Duration::ZERO
            }
        }
    }

    /// The workspace's file must be read again (reading it failed).
    pub fn forget(&self, key: &str) {
        if let Ok(mut inner) = self.inner.lock() {
            inner.entries.remove(key);
        }
    }

    /// Called with every runtime event of this instance (not only lifecycle ones).
    pub fn saw_event(&self, ev: &RuntimeEvent) {
        let Ok(mut inner) = self.inner.lock() else { return };
        let id = Hex::new(&ev.container_id);
        if ev.action == "destroy" {
            inner.last_event.remove(&id);
            if let Some(key) = ev.workspace.as_deref()
                && inner.entries.get(key).is_some_and(|e| e.container_id == id)
            {
                inner.entries.remove(key);
            }
            return;
        }
        if !may_change_files(&ev.action) {
            return;
        }
        // An event without a time counts as happening now: it outdates everything before.
        let at = ev.at.unwrap_or_else(Utc::now);
        let known_since = ev.workspace.as_deref().and_then(|k| inner.entries.get(k)).filter(|e| e.container_id == id);
        if known_since.is_some_and(|e| e.at >= at) {
            return; // older than what is known: it can never outdate it
        }
        let slot = inner.last_event.entry(id).or_insert(at);
        *slot = (*slot).max(at);
    }

    /// Fills `obs.token_file` for the container the token-file rule checks (running, of
    /// the current incarnation): from the memo when nothing may have changed the file
    /// since it was last known, else by reading it (and remembering what was read).
    pub async fn observe(&self, runtime: &dyn Runtime, key: &str, obs: &mut Observed) {
        let Some(c) = obs.token_holder() else { return };
        let id = c.id.clone();
        let now = Utc::now();
        if let Some(hash) = self.known(key, &id, now) {
            obs.token_file = TokenFile::Hash(hash);
            return;
        }
        obs.token_file = crate::observe::read_token(runtime, &id).await;
        match &obs.token_file {
            // Known as of when the read started: a write racing with it has a later event.
            TokenFile::Hash(hash) => self.record(key, &id, hash, now),
            _ => self.forget(key),
        }
    }
}

/// Whether an event reports something that may have written files in the container:
/// a copy into it or an exec. Lifecycle events (the operator's own create and start
/// among them) and reads (`archive-path`, the operator's own checks) do not.
fn may_change_files(action: &str) -> bool {
    action == "extract-to-dir" || action.starts_with("exec_")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(action: &str, id: &str, at: Option<DateTime<Utc>>) -> RuntimeEvent {
        RuntimeEvent { workspace: Some("default/a".into()), container_id: id.into(), action: action.into(), at }
    }

    #[test]
    fn a_recorded_content_counts_until_an_event_newer_than_it() {
        let m = TokenMemo::default();
        let t0 = Utc::now();
        let later = t0 + chrono::Duration::milliseconds(5);
        m.record("default/a", "c1", "h1", t0);
        assert_eq!(m.known("default/a", "c1", t0).as_deref(), Some("h1"));
        // Its own write's event is not newer; reads and lifecycle events do not count.
        m.saw_event(&ev("extract-to-dir", "c1", Some(t0 - chrono::Duration::milliseconds(1))));
        m.saw_event(&ev("archive-path", "c1", Some(later)));
        m.saw_event(&ev("start", "c1", Some(later)));
        assert_eq!(m.known("default/a", "c1", later).as_deref(), Some("h1"));
        // Someone copies into it afterwards.
        m.saw_event(&ev("extract-to-dir", "c1", Some(later)));
        assert_eq!(m.known("default/a", "c1", later), None);
    }

    #[test]
    fn an_event_handled_before_the_entry_is_recorded_still_counts() {
        let m = TokenMemo::default();
        let t0 = Utc::now();
        m.saw_event(&ev("exec_start", "c1", Some(t0 + chrono::Duration::milliseconds(1))));
        m.record("default/a", "c1", "h1", t0);
        assert_eq!(m.known("default/a", "c1", t0), None);
    }

    #[test]
    fn another_container_a_refusal_or_age_means_reading_again() {
        let m = TokenMemo::default();
        let t0 = Utc::now();
        m.record("default/a", "c1", "h1", t0);
        assert_eq!(m.known("default/a", "c2", t0), None, "a new incarnation's container");
        let too_old = t0 + chrono::Duration::from_std(MAX_AGE).unwrap() + chrono::Duration::seconds(1);
        assert_eq!(m.known("default/a", "c1", too_old), None);
        m.forget("default/a");
        assert_eq!(m.known("default/a", "c1", t0), None);
        m.record("default/a", "c1", "h1", t0);
        m.saw_event(&ev("exec_die", "c1", None));
        assert_eq!(m.known("default/a", "c1", t0), None, "an event without a time counts as now");
    }

    #[test]
    fn refusals_read_again_at_most_once_per_interval() {
        let m = TokenMemo::default();
        let t0 = Utc::now();
        let ms = chrono::Duration::milliseconds;
        m.record("default/a", "c1", "h1", t0);
        // Refused right after the file was read: not read again yet...
        assert_eq!(m.refused("default/a", t0 + ms(200)), Duration::from_millis(800));
        assert_eq!(m.known("default/a", "c1", t0 + ms(300)).as_deref(), Some("h1"));
        assert_eq!(m.refused("default/a", t0 + ms(900)), Duration::from_millis(100));
        // ...but at the first look once the interval has passed, even with no new refusal.
        assert_eq!(m.known("default/a", "c1", t0 + ms(1000)), None);
        // A read then resets it; a refusal long after a read reads at once.
        m.record("default/a", "c1", "h1", t0 + ms(1000));
        assert_eq!(m.known("default/a", "c1", t0 + ms(1500)).as_deref(), Some("h1"));
        assert_eq!(m.refused("default/a", t0 + ms(2500)), Duration::ZERO);
        assert_eq!(m.known("default/a", "c1", t0 + ms(2500)), None);
        assert_eq!(m.refused("default/b", t0), Duration::ZERO, "nothing known: read");
    }

    #[test]
    fn destroy_forgets_the_container() {
        let m = TokenMemo::default();
        let t0 = Utc::now();
        m.saw_event(&ev("start", "c1", Some(t0)));
        m.record("default/a", "c1", "h1", t0);
        m.saw_event(&ev("destroy", "c1", Some(t0)));
        assert_eq!(m.known("default/a", "c1", t0), None);
        assert!(m.inner.lock().unwrap().last_event.is_empty());
    }

    #[test]
    fn events_older_than_what_is_known_are_not_kept() {
        let m = TokenMemo::default();
        let t0 = Utc::now();
        let later = t0 + chrono::Duration::milliseconds(5);
        // The operator's own write: its copy event arrives before and after the record.
        m.saw_event(&ev("extract-to-dir", "c1", Some(t0)));
        m.record("default/a", "c1", "h1", later);
        m.saw_event(&ev("extract-to-dir", "c1", Some(t0)));
        assert!(m.inner.lock().unwrap().last_event.is_empty());
        assert_eq!(m.known("default/a", "c1", later).as_deref(), Some("h1"));
        // A newer one is kept, and counts.
        m.saw_event(&ev("exec_start", "c1", Some(later + chrono::Duration::milliseconds(1))));
        assert_eq!(m.known("default/a", "c1", later), None);
    }
}
