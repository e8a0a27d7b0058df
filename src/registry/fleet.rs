//! `GET /api/v1/fleet`: what the fleet page shows, in one answer (a [`FleetSnapshot`]):
//! every workspace, the teams, the last decisions and the actions the page offers.
//! With `?watch=true` it is a server-sent event stream instead: the snapshot first,
//! then only what changes, so a page of 500 workspaces is never sent whole again:
//!
//! - `snapshot`: a [`FleetSnapshot`] (again after a reconnect);
//! - `workspaces`: the summaries that changed other than by a heartbeat, and new ones;
//! - `removed`: the keys (`ns/name`) of workspaces that are gone;
//! - `heartbeats`: `{"ns/name": RFC 3339}` for the heartbeats that moved on;
//! - `decisions`: new decisions (`FleetEvent`s), oldest first;
//! - `teams`: every team, when any changed;
//! - `usage`: `{"ns/name": usage or null}` for the workspaces whose usage (CPU, memory)
//!   changed or went, after each round of the usage sampler (observe/usage.rs).
//!
//! It is fed by the loop's report channel, the one `events -w` reads: a finished
//! reconcile (an admin action, a container removed, a phase change all end in one)
//! marks its workspace, a change of the declarations marks them all, and every
//! [`HEARTBEAT_EVERY`] the heartbeats are read (one query, no statuses decoded).
//! Bursts are sent together, at most every [`COALESCE`]. A stream that falls behind
//! the channel reads the whole fleet again instead of what it missed. It ends when the
//! operator stops (an open page must not hold up the server's graceful shutdown).

use std::collections::{BTreeMap, BTreeSet};
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::extract::{Query, State};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use tokio::sync::{broadcast, mpsc};

use super::AppState;
use super::admin::store_failed;
use super::events::FleetEvent;
use super::views::{self, TeamSummary, WorkspaceSummary};
use crate::api::ObjectKey;
use crate::model::usage::Usage;
use crate::store::StoreError;
use crate::trigger::Report;

/// How often the heartbeats are read while the page watches.
pub const HEARTBEAT_EVERY: Duration = Duration::from_secs(5);
/// How long a burst of changes is gathered before it is sent.
pub const COALESCE: Duration = Duration::from_millis(250);
/// Changed workspaces read one by one up to this many; more, and the fleet is read whole.
const READ_ONE_BY_ONE: usize = 16;

/// One button the page shows per workspace: `path` is relative to the operator's
/// base URL, with `{name}` and `{namespace}` to fill in (URL-encoded), and is POSTed.
/// A new admin action (e.g. wake) appears on the page by being listed in [`ACTIONS`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PageAction {
    pub action: String,
    pub path: String,
}

/// The admin actions this operator serves, in the order the page shows them.
pub const ACTIONS: &[(&str, &str)] = &[
    ("pause", "api/v1/workspaces/{name}/pause?namespace={namespace}"),
    ("resume", "api/v1/workspaces/{name}/resume?namespace={namespace}"),
    ("restart", "api/v1/workspaces/{name}/restart?namespace={namespace}"),
    ("wake", "api/v1/workspaces/{namespace}/{name}/wake"),
];

/// Everything the page shows, at one moment.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FleetSnapshot {
    /// The operator's clock when this was read (the page's ages count from it).
    pub now: DateTime<Utc>,
    pub workspaces: Vec<WorkspaceSummary>,
    pub teams: Vec<TeamSummary>,
    /// The fleet's last decisions, oldest first.
    pub decisions: Vec<FleetEvent>,
    pub actions: Vec<PageAction>,
}

#[derive(Debug, Deserialize)]
pub(crate) struct FleetQuery {
    #[serde(default)]
    watch: bool,
}

/// How many past decisions the snapshot carries: enough for a few per workspace.
fn decisions_to_send(workspaces: usize) -> i64 {
    (workspaces * 3).clamp(100, 2000) as i64
}

async fn snapshot(state: &AppState) -> Result<FleetSnapshot, StoreError> {
    let records = state.store.list_workspaces().await?;
    let desired = state.desired();
    let now = Utc::now();
    let workspaces = views::with_usage(views::summaries(&desired, &records, now), &state.usage);
    let teams = views::teams(&desired, &workspaces);
    let mut decisions: Vec<FleetEvent> = state
        .store
        .recent_decisions(decisions_to_send(workspaces.len()))
        .await?
        .into_iter()
        .map(|(workspace, decision)| FleetEvent { workspace, decision })
        .collect();
    decisions.reverse();
    let actions =
        ACTIONS.iter().map(|(action, path)| PageAction { action: (*action).into(), path: (*path).into() }).collect();
    Ok(FleetSnapshot { now, workspaces, teams, decisions, actions })
}

pub(crate) async fn fleet(State(state): State<Arc<AppState>>, Query(q): Query<FleetQuery>) -> Response {
    // Subscribed before the snapshot is read, so nothing falls between the two.
    let live = state.reports.as_ref().map(broadcast::Sender::subscribe);
    let snap = match snapshot(&state).await {
        Ok(s) => s,
        Err(e) => return store_failed(e),
    };
    if !q.watch {
        return Json(snap).into_response();
    }
    let (tx, mut rx) = mpsc::channel::<Event>(16);
    let Some(first) = event("snapshot", &snap) else {
        return super::error(axum::http::StatusCode::INTERNAL_SERVER_ERROR, "cannot encode the fleet");
    };
    let _ = tx.try_send(first);
    tokio::spawn(follow(state, Sent::from(snap), live, tx));
    let stream = futures::stream::poll_fn(move |cx| rx.poll_recv(cx).map(|e| e.map(Ok::<_, Infallible>)));
    Sse::new(stream).keep_alive(KeepAlive::new().interval(Duration::from_secs(15))).into_response()
}

fn event<T: Serialize>(name: &str, data: &T) -> Option<Event> {
    Event::default().event(name).json_data(data).ok()
}

/// What the stream has sent, to send only what differs.
#[derive(Debug, Default)]
struct Sent {
    /// By `ns/name`, with the heartbeat as sent last, without usage (kept apart).
    workspaces: BTreeMap<String, WorkspaceSummary>,
    teams: Vec<TeamSummary>,
    /// Each workspace's usage as sent last.
    usage: BTreeMap<String, Usage>,
}

impl From<FleetSnapshot> for Sent {
    fn from(s: FleetSnapshot) -> Self {
        let mut usage = BTreeMap::new();
        let workspaces = s
            .workspaces
            .into_iter()
            .map(|mut w| {
                let key = w.key().to_string();
                if let Some(u) = w.usage.take() {
                    usage.insert(key.clone(), u);
                }
                (key, w)
            })
            .collect();
        Self { workspaces, teams: s.teams, usage }
    }
}

/// What the stream sends after a look at the fleet.
#[derive(Debug, Default, PartialEq)]
struct Delta {
    workspaces: Vec<WorkspaceSummary>,
    removed: Vec<String>,
    heartbeats: BTreeMap<String, Option<DateTime<Utc>>>,
}

impl Sent {
    /// Takes in fresh summaries of `looked` (the keys looked at; those of them not in
    /// `fresh` are gone) and returns what differs from what was sent.
    fn update(&mut self, looked: &BTreeSet<String>, fresh: Vec<WorkspaceSummary>) -> Delta {
        let mut delta = Delta::default();
        let mut seen = BTreeSet::new();
        for mut w in fresh {
            // Usage goes apart (`Sent::usage`); what is sent gets it back.
            w.usage = None;
            let key = w.key().to_string();
            seen.insert(key.clone());
            match self.workspaces.get(&key) {
                Some(old) if *old == w => {}
                Some(old) if same_but_heartbeat(old, &w) => {
                    delta.heartbeats.insert(key.clone(), w.last_heartbeat_at);
                }
                _ => delta.workspaces.push(w.clone()),
            }
            self.workspaces.insert(key, w);
        }
        for key in looked.iter().filter(|k| !seen.contains(*k)) {
            if self.workspaces.remove(key).is_some() {
                delta.removed.push(key.clone());
            }
        }
        delta
    }

    /// Takes in heartbeats read from the records: returns those that moved on.
    fn heartbeats(&mut self, beats: Vec<(String, Option<DateTime<Utc>>)>) -> BTreeMap<String, Option<DateTime<Utc>>> {
        let mut moved = BTreeMap::new();
        for (key, at) in beats {
            if let Some(w) = self.workspaces.get_mut(&key)
                && at.is_some()
                && w.last_heartbeat_at != at
            {
                w.last_heartbeat_at = at;
                moved.insert(key, at);
            }
        }
        moved
    }

    /// Takes in the usage book: returns what changed (null for a workspace that has
    /// none any more).
    fn usage(&mut self, now: BTreeMap<String, Usage>) -> BTreeMap<String, Option<Usage>> {
        let mut changed: BTreeMap<String, Option<Usage>> =
            self.usage.keys().filter(|k| !now.contains_key(*k)).map(|k| (k.clone(), None)).collect();
        for (k, u) in &now {
            if self.usage.get(k) != Some(u) {
                changed.insert(k.clone(), Some(u.clone()));
            }
        }
        self.usage = now;
        changed
    }

    /// Summaries to send, with their usage as sent.
    fn with_usage(&self, mut workspaces: Vec<WorkspaceSummary>) -> Vec<WorkspaceSummary> {
        for w in &mut workspaces {
            w.usage = self.usage.get(&w.key().to_string()).cloned();
        }
        workspaces
    }

    /// The teams, when they differ from those sent.
    fn teams(&mut self, desired: &crate::source::desired::DesiredSet) -> Option<Vec<TeamSummary>> {
        let all: Vec<WorkspaceSummary> = self.workspaces.values().cloned().collect();
        let teams = views::teams(desired, &all);
        // Conditions carry the time they were computed: compare what the page shows.
        let shown = |t: &[TeamSummary]| -> Vec<(String, u32, BTreeMap<String, u32>)> {
            t.iter().map(|t| (t.name.clone(), t.members, t.phases.clone())).collect()
        };
        if shown(&teams) == shown(&self.teams) {
            return None;
        }
        self.teams = teams.clone();
        Some(teams)
    }
}

fn same_but_heartbeat(a: &WorkspaceSummary, b: &WorkspaceSummary) -> bool {
    let mut a = a.clone();
    a.last_heartbeat_at = b.last_heartbeat_at;
    a == *b
}

/// What happened since the stream last looked.
#[derive(Debug, Default)]
struct Pending {
    decisions: Vec<FleetEvent>,
    /// Workspaces whose reconcile finished.
    keys: BTreeSet<String>,
    /// Look at every workspace (declarations changed, or reports were missed).
    all: bool,
    heartbeats: bool,
    /// The usage sampler finished a round that changed something.
    usage: bool,
}

impl Pending {
    fn note(&mut self, report: Result<Report, broadcast::error::RecvError>) -> bool {
        match report {
            Ok(r) => {
                self.decisions
                    .extend(r.decisions.into_iter().map(|d| FleetEvent { workspace: r.key.clone(), decision: d }));
                self.keys.insert(r.key);
                true
            }
            Err(broadcast::error::RecvError::Lagged(_)) => {
                self.all = true;
                true
            }
            Err(broadcast::error::RecvError::Closed) => false,
        }
    }
}

async fn next_report(live: &mut Option<broadcast::Receiver<Report>>) -> Result<Report, broadcast::error::RecvError> {
    match live {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

/// Sends what changes until the page goes away (or the operator stops).
async fn follow(
    state: Arc<AppState>,
    mut sent: Sent,
    mut live: Option<broadcast::Receiver<Report>>,
    tx: mpsc::Sender<Event>,
) {
    let mut desired = state.desired.clone();
    desired.mark_unchanged();
    let mut usage = state.usage.subscribe();
    usage.mark_unchanged();
    let mut beat = tokio::time::interval_at(tokio::time::Instant::now() + HEARTBEAT_EVERY, HEARTBEAT_EVERY);
    beat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let mut pending = Pending::default();
        tokio::select! {
            _ = tx.closed() => return,
            _ = state.shutdown.cancelled() => return,
            report = next_report(&mut live) => if !pending.note(report) { return },
            changed = desired.changed() => if changed.is_err() { return } else { pending.all = true },
            _ = beat.tick() => pending.heartbeats = true,
            Ok(()) = usage.changed() => pending.usage = true,
        }
        // A burst is sent once.
        tokio::select! {
            _ = tx.closed() => return,
            _ = tokio::time::sleep(COALESCE) => {}
        }
        // And everything that came meanwhile.
        while let Some(rx) = live.as_mut() {
            let report = match rx.try_recv() {
                Ok(r) => Ok(r),
                Err(broadcast::error::TryRecvError::Empty) => break,
                Err(broadcast::error::TryRecvError::Lagged(n)) => Err(broadcast::error::RecvError::Lagged(n)),
                Err(broadcast::error::TryRecvError::Closed) => Err(broadcast::error::RecvError::Closed),
            };
            if !pending.note(report) {
                return;
            }
        }
        pending.usage |= usage.has_changed().unwrap_or(false);
        usage.mark_unchanged();
        if pending.decisions.is_empty()
            && !pending.all
            && pending.keys.is_empty()
            && !pending.heartbeats
            && !pending.usage
        {
            continue;
        }
        if send(&state, &mut sent, &mut pending, &tx).await.is_err() {
            return;
        }
    }
}

/// Reads what `pending` asks for and sends what differs. Err once the page is gone.
async fn send(state: &AppState, sent: &mut Sent, pending: &mut Pending, tx: &mpsc::Sender<Event>) -> Result<(), ()> {
    let mut events = Vec::new();
    if !pending.decisions.is_empty() {
        events.extend(event("decisions", &std::mem::take(&mut pending.decisions)));
    }
    let desired = state.desired();
    let now = Utc::now();
    let whole = pending.all || pending.keys.len() > READ_ONE_BY_ONE;
    if whole {
        if let Ok(records) = state.store.list_workspaces().await {
            let fresh = views::summaries(&desired, &records, now);
            let looked: BTreeSet<String> =
                sent.workspaces.keys().cloned().chain(fresh.iter().map(|w| w.key().to_string())).collect();
            let delta = sent.update(&looked, fresh);
            push_delta(&mut events, sent, delta);
        }
    } else if !pending.keys.is_empty() {
        let mut fresh = Vec::new();
        for key in &pending.keys {
            let k = ObjectKey::parse(key);
            let Ok(record) = state.store.workspace(key).await else { continue };
            let declared = desired.workspaces.get(&k);
            if declared.is_some() || record.is_some() {
                fresh.push(views::summary(&k, declared, record.as_ref(), now));
            }
        }
        let delta = sent.update(&pending.keys, fresh);
        push_delta(&mut events, sent, delta);
    }
    // A whole read has the heartbeats already.
    if pending.heartbeats
        && !whole
        && let Ok(brief) = state.store.list_workspaces_brief(None).await
    {
        let moved = sent.heartbeats(brief.into_iter().map(|(r, _)| (r.key, r.last_heartbeat_at)).collect());
        if !moved.is_empty() {
            events.extend(event("heartbeats", &moved));
        }
    }
    if let Some(teams) = sent.teams(&desired) {
        events.extend(event("teams", &teams));
    }
    if pending.usage {
        let changed = sent.usage(state.usage.all());
        if !changed.is_empty() {
            events.extend(event("usage", &changed));
        }
    }
    for e in events {
        tx.send(e).await.map_err(|_| ())?;
    }
    Ok(())
}

fn push_delta(events: &mut Vec<Event>, sent: &Sent, delta: Delta) {
    if !delta.workspaces.is_empty() {
        events.extend(event("workspaces", &sent.with_usage(delta.workspaces)));
    }
    if !delta.removed.is_empty() {
        events.extend(event("removed", &delta.removed));
    }
    if !delta.heartbeats.is_empty() {
        events.extend(event("heartbeats", &delta.heartbeats));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::Phase;
    use chrono::TimeZone;

    fn ws(name: &str, phase: Phase, beat: i64) -> WorkspaceSummary {
        let mut w: WorkspaceSummary =
            serde_json::from_value(serde_json::json!({"name": name, "namespace": "default", "declared": true}))
                .unwrap();
        w.phase = phase;
        w.last_heartbeat_at = Some(Utc.timestamp_opt(1_700_000_000 + beat, 0).unwrap());
        w
    }

    fn keys(names: &[&str]) -> BTreeSet<String> {
        names.iter().map(|n| format!("default/{n}")).collect()
    }

    #[test]
    fn only_what_changed_is_sent_and_heartbeats_apart() {
        let mut sent = Sent::default();
        let first = sent.update(&keys(&["a", "b"]), vec![ws("a", Phase::Running, 0), ws("b", Phase::Pending, 0)]);
        assert_eq!(first.workspaces.len(), 2, "new workspaces are sent whole");
        let quiet = sent.update(&keys(&["a", "b"]), vec![ws("a", Phase::Running, 0), ws("b", Phase::Pending, 0)]);
        assert_eq!(quiet, Delta::default(), "nothing changed, nothing sent");
        let beat = sent.update(&keys(&["a"]), vec![ws("a", Phase::Running, 5)]);
        assert!(beat.workspaces.is_empty());
        assert_eq!(beat.heartbeats.keys().collect::<Vec<_>>(), ["default/a"]);
        let phase = sent.update(&keys(&["b"]), vec![ws("b", Phase::Running, 5)]);
        assert_eq!(phase.workspaces.iter().map(|w| w.name.as_str()).collect::<Vec<_>>(), ["b"]);
        let gone = sent.update(&keys(&["a"]), vec![]);
        assert_eq!(gone.removed, ["default/a"]);
        assert_eq!(sent.update(&keys(&["a"]), vec![]), Delta::default(), "removed once");
    }

    #[test]
    fn heartbeats_read_alone_send_those_that_moved_on() {
        let mut sent = Sent::default();
        sent.update(&keys(&["a", "b"]), vec![ws("a", Phase::Running, 0), ws("b", Phase::Running, 0)]);
        let at = |s: i64| Some(Utc.timestamp_opt(1_700_000_000 + s, 0).unwrap());
        let moved = sent.heartbeats(vec![
            ("default/a".into(), at(0)),
            ("default/b".into(), at(7)),
            ("default/unknown".into(), at(7)),
        ]);
        assert_eq!(moved, BTreeMap::from([("default/b".to_string(), at(7))]));
        assert!(sent.heartbeats(vec![("default/b".into(), at(7))]).is_empty());
    }

    #[test]
    fn usage_is_sent_apart_and_only_what_changed() {
        let u = |mib: u64| Usage {
            cpu_cores: Some(0.1),
            memory_bytes: Some(mib << 20),
            window_seconds: Some(15.0),
            sampled_at: Utc.timestamp_opt(1_700_000_000, 0).unwrap(),
        };
        let mut a = ws("a", Phase::Running, 0);
        a.usage = Some(u(3));
        let snap = FleetSnapshot {
            now: Utc::now(),
            workspaces: vec![a, ws("b", Phase::Running, 0)],
            teams: vec![],
            decisions: vec![],
            actions: vec![],
        };
        let mut sent = Sent::from(snap);
        assert!(sent.workspaces.values().all(|w| w.usage.is_none()), "kept apart");
        let quiet = sent.update(&keys(&["a", "b"]), vec![ws("a", Phase::Running, 0), ws("b", Phase::Running, 0)]);
        assert_eq!(quiet, Delta::default(), "a summary read without usage is no change");
        let changed = sent.usage(BTreeMap::from([("default/a".into(), u(3)), ("default/b".into(), u(4))]));
        assert_eq!(changed, BTreeMap::from([("default/b".to_string(), Some(u(4)))]));
        let gone = sent.usage(BTreeMap::from([("default/b".into(), u(4))]));
        assert_eq!(gone, BTreeMap::from([("default/a".to_string(), None)]));
        let resent = sent.with_usage(vec![ws("b", Phase::Paused, 0)]);
        assert_eq!(resent[0].usage, Some(u(4)), "a workspace sent again keeps its usage");
    }

    #[test]
    fn the_page_offers_the_admin_actions() {
        let names: Vec<&str> = ACTIONS.iter().map(|(a, _)| *a).collect();
        assert_eq!(names, ["pause", "resume", "restart", "wake"]);
        assert!(ACTIONS.iter().all(|(a, p)| p.contains("{name}") && p.contains("{namespace}") && p.contains(a)));
    }
}
