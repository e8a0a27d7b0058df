//! `up`'s progress view, as `docker compose up` shows it: on a terminal, one line per
//! workspace redrawn in place and a summary (`6/6 running`, or what is not and why);
//! elsewhere, a plain line whenever a workspace changes. [`view`] is the whole
//! picture, pure; [`show`] draws it from the store and the desired set.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::Write as _;
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use tokio::sync::{broadcast, watch};
use tokio_util::sync::CancellationToken;

use crate::api::{ConditionStatus, Phase};
use crate::registry::views::{self, WorkspaceSummary};
use crate::source::desired::DesiredSet;
use crate::store::DynStore;
use crate::trigger::Report;

/// One workspace as the view shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Row {
    pub name: String,
    pub phase: Phase,
    pub incarnation: i64,
    /// Why it is not where it is going, or what it is waiting for; empty when settled.
    pub why: String,
}

/// The whole picture at one moment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct View {
    pub rows: Vec<Row>,
    /// `6/6 running`, or `4/6 running · 1 paused · 1 failed`.
    pub summary: String,
    /// Every workspace is where its spec says (running with its agent online, paused,
    /// stopped) or failed for good.
    pub settled: bool,
}

/// Whether a workspace has arrived: running with its agent heard from, or held where
/// its spec (or a pause) says.
fn arrived(w: &WorkspaceSummary) -> bool {
    match w.phase {
        Phase::Running => w.last_heartbeat_at.is_some(),
        Phase::Paused | Phase::Stopped | Phase::Suspended | Phase::Failed => true,
        _ => false,
    }
}

/// What a workspace is waiting for, in one short clause.
fn why(w: &WorkspaceSummary) -> String {
    if arrived(w) && w.phase != Phase::Failed {
        return String::new();
    }
    if !w.declared {
        return "being removed".into();
    }
    let failing = w.conditions.iter().find(|c| c.status == ConditionStatus::False && c.type_ != "Ready");
    match failing {
        Some(c) if !c.message.is_empty() => c.message.clone(),
        Some(c) => c.reason.clone(),
        None if w.phase == Phase::Running => "waiting for the agent's first heartbeat".into(),
        None if w.container.is_none() => "creating its container".into(),
        None => "starting".into(),
    }
}

pub fn view(workspaces: &[WorkspaceSummary]) -> View {
    let rows: Vec<Row> = workspaces
        .iter()
        .map(|w| Row {
            name: if w.namespace == "default" { w.name.clone() } else { format!("{}/{}", w.namespace, w.name) },
            phase: w.phase,
            incarnation: w.incarnation,
            why: why(w),
        })
        .collect();
    let declared: Vec<&WorkspaceSummary> = workspaces.iter().filter(|w| w.declared).collect();
    let running = declared.iter().filter(|w| w.phase == Phase::Running && w.last_heartbeat_at.is_some()).count();
    let mut summary = format!("{running}/{} running", declared.len());
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    for w in &declared {
        match w.phase {
            Phase::Paused => *counts.entry("paused").or_default() += 1,
            Phase::Stopped => *counts.entry("stopped").or_default() += 1,
            Phase::Suspended => *counts.entry("suspended").or_default() += 1,
            Phase::Failed => *counts.entry("failed").or_default() += 1,
            Phase::Running if w.last_heartbeat_at.is_some() => {}
            _ => *counts.entry("starting").or_default() += 1,
        }
    }
    let removing = workspaces.len() - declared.len();
    if removing > 0 {
        counts.insert("being removed", removing);
    }
    for (what, n) in counts {
        let _ = write!(summary, " · {n} {what}");
    }
    View { rows, summary, settled: workspaces.iter().all(|w| w.declared && arrived(w)) }
}

/// The view as terminal lines, padded into columns and cut to `width`.
pub fn lines(view: &View, width: usize) -> Vec<String> {
    let name_w = view.rows.iter().map(|r| r.name.len()).max().unwrap_or(0).max(4);
    let mut out: Vec<String> = view
        .rows
        .iter()
        .map(|r| {
            let mark = if r.why.is_empty() {
                "✔"
            } else if r.phase == Phase::Failed {
                "✘"
            } else {
                "…"
            };
            let mut line = format!(
                " {mark} {:<name_w$}  {:<12} #{:<3} {}",
                r.name,
                format!("{:?}", r.phase),
                r.incarnation,
                r.why
            );
            cut(&mut line, width);
            line
        })
        .collect();
    let mut summary = view.summary.clone();
    cut(&mut summary, width);
    out.push(summary);
    out
}

fn cut(line: &mut String, width: usize) {
    if width > 1 && line.chars().count() > width {
        let keep: String = line.chars().take(width - 1).collect();
        *line = keep + "…";
    }
}

/// Plain lines for what changed between two views (no terminal control codes).
pub fn changes(before: Option<&View>, now: &View) -> Vec<String> {
    let old: BTreeMap<&str, &Row> =
        before.map(|v| v.rows.iter().map(|r| (r.name.as_str(), r)).collect()).unwrap_or_default();
    let mut out = Vec::new();
    for r in &now.rows {
        if old.get(r.name.as_str()).is_some_and(|o| *o == r) {
            continue;
        }
        let mut line = format!("{}: {:?} (incarnation {})", r.name, r.phase, r.incarnation);
        if !r.why.is_empty() {
            let _ = write!(line, ": {}", r.why);
        }
        out.push(line);
    }
    if before.is_none_or(|b| b.summary != now.summary) {
        out.push(now.summary.clone());
    }
    out
}

/// Draws the view until `shutdown`: redrawn in place on a terminal (`tty`), plain
/// changed lines otherwise. It reads what the admin API reads, but only when
/// something happened: a reconcile finished (`reports`; an agent's first heartbeat
/// queues one too) or the declarations changed, at most four times a second, and
/// every 5 s regardless (the ages it shows move on). An idle fleet costs no reads.
pub async fn show(
    store: DynStore,
    mut desired: watch::Receiver<Arc<DesiredSet>>,
    mut reports: broadcast::Receiver<Report>,
    tty: bool,
    logs: Option<std::path::PathBuf>,
    shutdown: CancellationToken,
) {
    let mut last: Option<View> = None;
    let mut drawn = 0usize;
    let mut announced_settled = false;
    if let (true, Some(path)) = (tty, &logs) {
        println!("logs: {}", path.display());
    }
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            report = reports.recv() => if matches!(report, Err(broadcast::error::RecvError::Closed)) { return },
            changed = desired.changed() => if changed.is_err() { return },
            _ = tokio::time::sleep(Duration::from_secs(5)) => {}
        }
        // A burst of reconciles is drawn once.
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_millis(250)) => {}
        }
        reports = reports.resubscribe();
        let Ok(records) = store.list_workspaces().await else { continue };
        let set = desired.borrow().clone();
        let now = view(&views::summaries(&set, &records, Utc::now()));
        if last.as_ref() == Some(&now) {
            continue;
        }
        let mut out = std::io::stdout().lock();
        if tty {
            let width = terminal_width();
            // Up over what was drawn, then each line cleared and written anew.
            if drawn > 0 {
                let _ = write!(out, "\x1b[{drawn}F");
            }
            let new = lines(&now, width);
            for l in &new {
                let _ = writeln!(out, "\x1b[2K{l}");
            }
            for _ in new.len()..drawn {
                let _ = writeln!(out, "\x1b[2K");
            }
            drawn = new.len().max(drawn);
        } else {
            for l in changes(last.as_ref(), &now) {
                let _ = writeln!(out, "{l}");
            }
        }
        if now.settled && !announced_settled && !tty {
            let _ = writeln!(out, "all workspaces settled: {}", now.summary);
        }
        announced_settled = now.settled;
        let _ = out.flush();
        last = Some(now);
    }
}

/// Columns of the terminal on stdout (`COLUMNS`, else 100).
fn terminal_width() -> usize {
    std::env::var("COLUMNS").ok().and_then(|c| c.parse().ok()).unwrap_or(100)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::Condition;

    fn ws(name: &str, phase: Phase, online: bool) -> WorkspaceSummary {
        let mut w: WorkspaceSummary = serde_json::from_value(serde_json::json!({
            "name": name, "namespace": "default", "declared": true, "incarnation": 1
        }))
        .unwrap();
        w.phase = phase;
        w.last_heartbeat_at = online.then(Utc::now);
        w
    }

    #[test]
    fn all_running_and_heard_from_is_settled() {
        let v = view(&[ws("pm", Phase::Running, true), ws("qa", Phase::Running, true)]);
        assert_eq!(v.summary, "2/2 running");
        assert!(v.settled);
        assert!(v.rows.iter().all(|r| r.why.is_empty()));
    }

    #[test]
    fn what_is_not_running_is_counted_and_says_why() {
        let mut held = ws("dev", Phase::Pending, false);
        held.conditions.push(Condition::new(
            "SecretsResolved",
            ConditionStatus::False,
            "SecretMissing",
            "secret OPENAI_KEY is not set: `molecule-operator secret set OPENAI_KEY`",
            Utc::now(),
        ));
        let v = view(&[
            ws("pm", Phase::Running, true),
            ws("qa", Phase::Running, false),
            ws("ops", Phase::Paused, false),
            held,
        ]);
        assert_eq!(v.summary, "1/4 running · 1 paused · 2 starting");
        assert!(!v.settled);
        let why: BTreeMap<_, _> = v.rows.iter().map(|r| (r.name.as_str(), r.why.as_str())).collect();
        assert_eq!(why["qa"], "waiting for the agent's first heartbeat");
        assert!(why["dev"].contains("OPENAI_KEY"), "{}", why["dev"]);
        assert_eq!(why["ops"], "");
    }

    #[test]
    fn plain_mode_prints_only_what_changed() {
        let first = view(&[ws("pm", Phase::Provisioning, false), ws("qa", Phase::Running, true)]);
        let second = view(&[ws("pm", Phase::Running, true), ws("qa", Phase::Running, true)]);
        assert_eq!(
            changes(None, &first),
            vec![
                "pm: Provisioning (incarnation 1): creating its container",
                "qa: Running (incarnation 1)",
                "1/2 running · 1 starting"
            ]
        );
        assert_eq!(changes(Some(&first), &second), vec!["pm: Running (incarnation 1)", "2/2 running"]);
        assert!(changes(Some(&second), &second).is_empty());
    }

    #[test]
    fn terminal_lines_fit_the_width() {
        let mut w = ws("a-workspace-with-a-long-name", Phase::Pending, false);
        w.conditions.push(Condition::new("Ready", ConditionStatus::False, "X", "y", Utc::now()));
        for l in lines(&view(&[w]), 30) {
            assert!(l.chars().count() <= 30, "{l}");
        }
    }
}
