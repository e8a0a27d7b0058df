//! How the client commands print: tables, relative times and the `describe` report.
//! Pure functions of the views and `now`, so they are tested without a server.

use std::fmt::Write;

use chrono::{DateTime, SecondsFormat, Utc};

use crate::api::EffectiveSpec;
use crate::api::{ConditionStatus, Phase, TokenStatus};
use crate::registry::views::{TeamSummary, WorkspaceDetail, WorkspaceSummary};

/// Columns separated by three spaces, left-aligned, no trailing spaces.
pub fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            if let Some(w) = widths.get_mut(i) {
                *w = (*w).max(cell.chars().count());
            }
        }
    }
    let mut out = String::new();
    let header: Vec<String> = headers.iter().map(|h| h.to_string()).collect();
    for row in std::iter::once(&header).chain(rows) {
        let mut line = String::new();
        for (i, cell) in row.iter().enumerate() {
            if i > 0 {
                line.push_str("   ");
            }
            line.push_str(cell);
            let pad = widths.get(i).copied().unwrap_or(0).saturating_sub(cell.chars().count());
            line.extend(std::iter::repeat_n(' ', pad));
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// A duration in its largest whole unit, kubectl style: `45s`, `5m`, `3h`, `2d`.
pub fn short_duration(seconds: i64) -> String {
    let s = seconds.max(0);
    match s {
        0..60 => format!("{s}s"),
        60..3_600 => format!("{}m", s / 60),
        3_600..86_400 => format!("{}h", s / 3_600),
        _ => format!("{}d", s / 86_400),
    }
}

/// How long ago `t` was (`3s ago`); `-` when unknown. A time slightly in the future
/// (clock skew between operator and CLI) reads as `0s ago`.
pub fn ago(t: Option<DateTime<Utc>>, now: DateTime<Utc>) -> String {
    match t {
        Some(t) => format!("{} ago", short_duration((now - t).num_seconds())),
        None => "-".into(),
    }
}

/// Age of an object (`5m`); `-` when unknown.
pub fn age(t: Option<DateTime<Utc>>, now: DateTime<Utc>) -> String {
    t.map(|t| short_duration((now - t).num_seconds())).unwrap_or_else(|| "-".into())
}

/// An absolute time with its relative one: `2026-03-01T12:00:00Z (3s ago)`.
pub fn when(t: Option<DateTime<Utc>>, now: DateTime<Utc>) -> String {
    match t {
        Some(t) => format!("{} ({})", t.to_rfc3339_opts(SecondsFormat::Secs, true), ago(Some(t), now)),
        None => "-".into(),
    }
}

fn or_dash(s: Option<&str>) -> String {
    s.filter(|s| !s.is_empty()).unwrap_or("-").to_string()
}

/// `get workspaces`. A NAMESPACE column appears when any workspace is outside `default`.
pub fn workspaces_table(workspaces: &[WorkspaceSummary], now: DateTime<Utc>) -> String {
    workspaces_columns(workspaces, now, false)
}

/// `get workspaces -o wide`: the table plus CPU (cores) and MEMORY, the usage last
/// sampled; `-` where none is known (no running container, the runtime reports none,
/// or, for CPU, only one sample so far).
pub fn workspaces_table_wide(workspaces: &[WorkspaceSummary], now: DateTime<Utc>) -> String {
    workspaces_columns(workspaces, now, true)
}

/// A workspace's CPU and memory cells.
pub fn usage_cells(w: &WorkspaceSummary) -> (String, String) {
    let u = w.usage.as_ref();
    (
        u.and_then(|u| u.cpu_cores).map_or_else(|| "-".into(), crate::model::usage::cores_text),
        u.and_then(|u| u.memory_bytes).map_or_else(|| "-".into(), crate::model::usage::bytes_text),
    )
}

fn workspaces_columns(workspaces: &[WorkspaceSummary], now: DateTime<Utc>, wide: bool) -> String {
    if workspaces.is_empty() {
        return "No workspaces are declared.\n".into();
    }
    let namespaced = workspaces.iter().any(|w| w.namespace != crate::api::DEFAULT_NAMESPACE);
    let mut headers = vec!["NAME", "TEAM", "PHASE", "INCARNATION", "TOKEN", "LAST HEARTBEAT", "AGE"];
    if wide {
        headers.extend(["CPU", "MEMORY"]);
    }
    if namespaced {
        headers.insert(0, "NAMESPACE");
    }
    let rows: Vec<Vec<String>> = workspaces
        .iter()
        .map(|w| {
            let mut row = vec![
                w.name.clone(),
                or_dash(w.team.as_deref()),
                w.phase.to_string(),
                w.incarnation.to_string(),
                or_dash(w.token.as_ref().map(|t| t.prefix.as_str())),
                ago(w.last_heartbeat_at, now),
                age(w.created_at, now),
            ];
            if wide {
                let (cpu, memory) = usage_cells(w);
                row.extend([cpu, memory]);
            }
            if namespaced {
                row.insert(0, w.namespace.clone());
            }
            row
        })
        .collect();
    table(&headers, &rows)
}

/// `get warmpools`: size, ready (unclaimed, running), starting and claimed members.
pub fn pools_table(pools: &[crate::registry::admin::PoolSummary]) -> String {
    if pools.is_empty() {
        return "No warm pools are declared.\n".into();
    }
    let headers = ["NAME", "SIZE", "READY", "STARTING", "CLAIMED"];
    let rows: Vec<Vec<String>> = pools
        .iter()
        .map(|p| {
            let name = if p.namespace == crate::api::DEFAULT_NAMESPACE {
                p.name.clone()
            } else {
                format!("{}/{}", p.namespace, p.name)
            };
            let s = &p.status;
            vec![name, s.size.to_string(), s.ready.to_string(), s.starting.to_string(), s.claimed.to_string()]
        })
        .collect();
    table(&headers, &rows)
}

/// `get teams`: members and counts by phase (Pending includes Provisioning; Suspended
/// is the lifecycle autopilot's Paused or Stopped, apart from the owner's).
pub fn teams_table(teams: &[TeamSummary]) -> String {
    if teams.is_empty() {
        return "No teams are declared.\n".into();
    }
    let headers = [
        "NAME",
        "READY",
        "MEMBERS",
        "RUNNING",
        "PENDING",
        "PAUSED",
        "STOPPED",
        "SUSPENDED",
        "DEGRADED",
        "FAILED",
        "MODE",
    ];
    let rows: Vec<Vec<String>> = teams
        .iter()
        .map(|t| {
            let name = if t.namespace == crate::api::DEFAULT_NAMESPACE {
                t.name.clone()
            } else {
                format!("{}/{}", t.namespace, t.name)
            };
            let ready = t.conditions.iter().find(|c| c.type_ == "Ready").map(|c| format!("{:?}", c.status));
            vec![
                name,
                ready.unwrap_or_else(|| "-".into()),
                t.members.to_string(),
                t.count(Phase::Running).to_string(),
                (t.count(Phase::Pending) + t.count(Phase::Provisioning)).to_string(),
                t.count(Phase::Paused).to_string(),
                t.count(Phase::Stopped).to_string(),
                t.count(Phase::Suspended).to_string(),
                t.count(Phase::Degraded).to_string(),
                t.count(Phase::Failed).to_string(),
                match (t.declared, t.operating_mode) {
                    (false, _) => "(no Team object)".into(),
                    (true, Some(m)) => format!("{m:?}"),
                    (true, None) => "-".into(),
                },
            ]
        })
        .collect();
    table(&headers, &rows)
}

/// Bytes as `512Mi`, `2Gi`, or plain bytes when neither divides evenly.
pub fn memory(bytes: i64) -> String {
    const MI: i64 = 1024 * 1024;
    const GI: i64 = 1024 * MI;
    if bytes > 0 && bytes % GI == 0 {
        format!("{}Gi", bytes / GI)
    } else if bytes > 0 && bytes % MI == 0 {
        format!("{}Mi", bytes / MI)
    } else {
        format!("{bytes} bytes")
    }
}

/// `describe`'s Usage line: `0.012 cores, 3.4Mi memory (over 15s, sampled 4s ago)`.
pub fn usage_line(w: &WorkspaceSummary, now: DateTime<Utc>) -> String {
    let Some(u) = &w.usage else {
        return "- (no running container, or the runtime reports no usage)".into();
    };
    let (cpu, memory) = usage_cells(w);
    let cpu = match u.cpu_cores {
        Some(_) => format!("{cpu} cores"),
        None => "CPU - (one sample so far)".into(),
    };
    let window = u.window_seconds.map(|s| format!("over {}, ", short_duration(s.round() as i64))).unwrap_or_default();
    format!("{cpu}, {memory} memory ({window}sampled {})", ago(Some(u.sampled_at), now))
}

/// `describe workspace`: everything about one workspace, for people.
pub fn describe(d: &WorkspaceDetail, now: DateTime<Utc>) -> String {
    let w = &d.summary;
    let mut o = String::new();
    let mut field = |label: &str, value: String| {
        let _ = writeln!(o, "{:<16}{value}", format!("{label}:"));
    };
    field("Name", w.name.clone());
    field("Namespace", w.namespace.clone());
    field("Team", or_dash(w.team.as_deref()));
    field("UID", or_dash(w.uid.as_deref()));
    field("Phase", if w.declared { w.phase.to_string() } else { format!("{} (declared no more)", w.phase) });
    field("Incarnation", w.incarnation.to_string());
    match &w.container {
        Some(c) => {
            field("Container", format!("{} (id {})", c.name, c.id.chars().take(12).collect::<String>()));
            field("Image", or_dash(Some(&c.image)));
            field("Spec hash", or_dash(Some(&c.spec_hash)));
        }
        None => field("Container", "none".into()),
    }
    if let Some(p) = &w.pod {
        let node = p.node.as_deref().map_or("not scheduled yet".to_string(), |n| format!("on node {n}"));
        field("Pod", format!("{} {node}, restarted in place {} times", p.name, p.restarts));
    }
    field("Source", w.source.as_ref().map(|s| format!("{} {}", s.kind, s.reference)).unwrap_or_else(|| "-".into()));
    field("Created", when(w.created_at, now));
    field("Last heartbeat", when(w.last_heartbeat_at, now));
    field(
        "Restarts",
        match &w.last_restart_reason {
            Some(r) => format!("{} (last: {r})", w.restart_count),
            None => w.restart_count.to_string(),
        },
    );
    field("Usage", usage_line(w, now));
    if let Some(a) = &w.agent {
        let mut parts = Vec::new();
        if let Some(task) = &a.current_task {
            parts.push(format!("working on: {task}"));
        }
        if let Some(n) = a.active_tasks {
            parts.push(format!("{n} active tasks"));
        }
        if let Some(rate) = a.error_rate {
            parts.push(format!("error rate {rate:.2}"));
        }
        if let Some(state) = &a.runtime_state {
            parts.push(format!("runtime state {state}"));
        }
        field("Agent", if parts.is_empty() { "-".into() } else { parts.join(", ") });
        if let Some(e) = &a.sample_error {
            field("Last error", e.clone());
        }
        if let Some(url) = &a.url {
            field("Agent URL", format!("{url} ({})", a.delivery_mode.as_deref().unwrap_or("push")));
        }
    }
    if let Some(m) = w.mode_override {
        field("Mode override", format!("{m:?} (set by `molecule-operator pause|resume`)"));
    }
    if d.restart_requested_at.is_some() {
        field("Restart asked", when(d.restart_requested_at, now));
    }

    o.push('\n');
    match (&d.spec, d.spec_errors.is_empty()) {
        (Some(spec), _) => {
            let _ = writeln!(o, "Spec{}:", d.generation.map(|g| format!(" (generation {g})")).unwrap_or_default());
            spec_section(&mut o, spec);
        }
        (None, false) => {
            let _ = writeln!(o, "Spec: invalid, nothing is changed for this workspace until it is fixed:");
            for e in &d.spec_errors {
                let _ = writeln!(o, "  - {e}");
            }
        }
        (None, true) => {
            let _ = writeln!(o, "Spec: not declared (the operator is removing this workspace)");
        }
    }

    o.push('\n');
    if w.conditions.is_empty() {
        let _ = writeln!(o, "Conditions: none reported yet");
    } else {
        let _ = writeln!(o, "Conditions:");
        let rows: Vec<Vec<String>> = w
            .conditions
            .iter()
            .map(|c| {
                vec![
                    c.type_.clone(),
                    match c.status {
                        ConditionStatus::True => "True",
                        ConditionStatus::False => "False",
                        ConditionStatus::Unknown => "Unknown",
                    }
                    .into(),
                    c.reason.clone(),
                    age(Some(c.last_transition_time), now),
                    c.message.clone(),
                ]
            })
            .collect();
        indent(&mut o, &table(&["TYPE", "STATUS", "REASON", "AGE", "MESSAGE"], &rows));
    }

    o.push('\n');
    let _ = writeln!(o, "Token:");
    // The status's token, else the newest live one of this incarnation (the status may lag).
    let current = w.token.clone().or_else(|| {
        d.tokens.iter().find(|t| t.revoked_at.is_none() && t.incarnation == w.incarnation).map(|t| TokenStatus {
            prefix: t.prefix.clone(),
            issued_at: t.issued_at,
            last_used_at: t.last_used_at,
        })
    });
    match &current {
        Some(t) => {
            let _ = writeln!(
                o,
                "  Current:  {}…  issued {}, last used {}",
                t.prefix,
                ago(Some(t.issued_at), now),
                ago(t.last_used_at, now)
            );
        }
        None => {
            let _ = writeln!(o, "  Current:  none");
        }
    }
    if !d.tokens.is_empty() {
        let _ = writeln!(o, "  History (newest first):");
        let rows: Vec<Vec<String>> = d
            .tokens
            .iter()
            .map(|t| {
                vec![
                    t.prefix.clone(),
                    t.incarnation.to_string(),
                    ago(Some(t.issued_at), now),
                    ago(t.last_used_at, now),
                    ago(t.revoked_at, now),
                    or_dash(t.revoke_reason.as_deref()),
                ]
            })
            .collect();
        let t = table(&["PREFIX", "INCARNATION", "ISSUED", "LAST USED", "REVOKED", "REASON"], &rows);
        for line in t.lines() {
            let _ = writeln!(o, "    {line}");
        }
    }

    o.push('\n');
    if d.decisions.is_empty() {
        let _ = writeln!(o, "Decisions: none yet");
    } else {
        let _ = writeln!(o, "Decisions (newest first):");
        let rows: Vec<Vec<String>> = d
            .decisions
            .iter()
            .map(|x| {
                vec![
                    ago(Some(x.at), now),
                    x.rule.clone(),
                    x.cause.clone(),
                    if x.actions.is_empty() { "-".into() } else { x.actions.join("; ") },
                    x.outcome.clone(),
                ]
            })
            .collect();
        indent(&mut o, &table(&["TIME", "RULE", "CAUSE", "ACTIONS", "OUTCOME"], &rows));
    }
    o
}

fn human(d: std::time::Duration) -> String {
    humantime::format_duration(d).to_string()
}

fn indent(o: &mut String, text: &str) {
    for line in text.lines() {
        let _ = writeln!(o, "  {line}");
    }
}

fn spec_section(o: &mut String, s: &EffectiveSpec) {
    let mut field = |label: &str, value: String| {
        let _ = writeln!(o, "  {:<16}{value}", format!("{label}:"));
    };
    field("Runtime", s.runtime.to_string());
    field("Image", format!("{} (pull {:?})", s.image, s.image_pull_policy));
    let mut tier = format!("{} ({} memory, {} CPU", s.tier, memory(s.memory_bytes), s.nano_cpus as f64 / 1e9);
    if s.read_only_root {
        tier.push_str(", read-only root");
    }
    if let Some(t) = s.tmp_tmpfs_bytes {
        let _ = write!(tier, ", /tmp tmpfs {}", memory(t));
    }
    tier.push(')');
    field("Tier", tier);
    field("Operating mode", format!("{:?}", s.operating_mode));
    field("Update policy", format!("{:?}", s.update_policy));
    let p = &s.token_policy;
    field(
        "Token policy",
        format!(
            "staleGrace {}, onPause {:?}, rotateEvery {}, maxAge {}, overlap {}",
            human(p.stale_grace),
            p.on_pause,
            or_dash(p.rotate_every.map(human).as_deref()),
            or_dash(p.max_age.map(human).as_deref()),
            human(p.overlap)
        ),
    );
    let mut security: Vec<&str> = Vec::new();
    if s.security.privileged {
        security.push("privileged");
    }
    if s.security.host_pid {
        security.push("hostPid");
    }
    if s.security.docker_socket {
        security.push("dockerSocket");
    }
    field("Security", if security.is_empty() { "none".into() } else { security.join(", ") });
    field("Network", s.network.to_string());
    if let Some(p) = &s.parent {
        field("Parent", p.clone());
    }
    if let Some(t) = s.restarted_at {
        field("Restarted at", t.to_rfc3339_opts(SecondsFormat::Secs, true));
    }
    field(
        "Env",
        if s.env.is_empty() {
            "-".into()
        } else {
            s.env.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(", ")
        },
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::ALL_PHASES;
    use crate::api::effective::{Defaults, resolve};
    use crate::api::{Condition, ContainerStatus, WorkspaceSpec};
    use crate::model::DecisionRecord;
    use crate::registry::views::TokenView;
    use chrono::{Duration, TimeZone};

    fn now() -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 3, 1, 12, 0, 0).unwrap()
    }

    fn ws(name: &str) -> WorkspaceSummary {
        WorkspaceSummary {
            name: name.into(),
            namespace: "default".into(),
            team: Some("eng".into()),
            parent: None,
            uid: Some("3f2a0c1e-0000-4000-8000-000000000001".into()),
            phase: Phase::Running,
            incarnation: 3,
            container: Some(ContainerStatus {
                id: "0123456789abcdef".into(),
                name: "ws-3f2a0c1e-000".into(),
                spec_hash: "abc".into(),
                image: "molecule-agent:local".into(),
            }),
            pod: None,
            token: Some(TokenStatus {
                prefix: "Ab3x9_Qe".into(),
                issued_at: now() - Duration::minutes(5),
                last_used_at: Some(now() - Duration::seconds(3)),
            }),
            last_heartbeat_at: Some(now() - Duration::seconds(3)),
            restart_count: 0,
            last_restart_reason: None,
            agent: None,
            source: None,
            conditions: vec![Condition::new(
                "Ready",
                ConditionStatus::True,
                "Running",
                "agent online",
                now() - Duration::minutes(4),
            )],
            created_at: Some(now() - Duration::hours(2)),
            declared: true,
            mode_override: None,
            usage: None,
        }
    }

    #[test]
    fn wide_shows_usage_and_a_dash_where_none_is_known() {
        let mut busy = ws("busy");
        busy.usage = Some(crate::model::usage::Usage {
            cpu_cores: Some(0.0123),
            memory_bytes: Some(3_565_158),
            window_seconds: Some(15.2),
            sampled_at: now() - Duration::seconds(4),
        });
        let mut first = ws("first");
        first.usage =
            Some(crate::model::usage::Usage { cpu_cores: None, window_seconds: None, ..busy.usage.clone().unwrap() });
        let out = workspaces_table_wide(&[busy.clone(), first.clone(), ws("stopped")], now());
        let lines: Vec<&str> = out.lines().collect();
        assert!(lines[0].ends_with("AGE   CPU     MEMORY"), "{out}");
        assert!(lines[1].ends_with("2h    0.012   3.4Mi"), "{out}");
        assert!(lines[2].ends_with("2h    -       3.4Mi"), "{out}");
        assert!(lines[3].ends_with("2h    -       -"), "{out}");
        assert!(!workspaces_table(&[busy.clone()], now()).contains("CPU"), "only wide has usage");
        assert_eq!(usage_line(&busy, now()), "0.012 cores, 3.4Mi memory (over 15s, sampled 4s ago)");
        assert_eq!(usage_line(&first, now()), "CPU - (one sample so far), 3.4Mi memory (sampled 4s ago)");
        assert!(usage_line(&ws("x"), now()).starts_with("- "));
    }

    #[test]
    fn relative_times() {
        assert_eq!(ago(Some(now() - Duration::seconds(3)), now()), "3s ago");
        assert_eq!(ago(Some(now() - Duration::seconds(59)), now()), "59s ago");
        assert_eq!(ago(Some(now() - Duration::seconds(60)), now()), "1m ago");
        assert_eq!(ago(Some(now() - Duration::minutes(90)), now()), "1h ago");
        assert_eq!(ago(Some(now() - Duration::hours(49)), now()), "2d ago");
        assert_eq!(ago(Some(now() + Duration::seconds(2)), now()), "0s ago");
        assert_eq!(ago(None, now()), "-");
        assert_eq!(age(Some(now() - Duration::seconds(45)), now()), "45s");
        assert_eq!(age(None, now()), "-");
        assert_eq!(when(Some(now() - Duration::seconds(3)), now()), "2026-03-01T11:59:57Z (3s ago)");
    }

    #[test]
    fn workspace_table_aligns_columns() {
        let mut pending = ws("a-much-longer-name");
        pending.phase = Phase::Pending;
        pending.uid = None;
        pending.token = None;
        pending.last_heartbeat_at = None;
        pending.created_at = None;
        pending.team = None;
        let out = workspaces_table(&[ws("smoke"), pending], now());
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines.len(), 3);
        assert_eq!(lines[0], "NAME                 TEAM   PHASE     INCARNATION   TOKEN      LAST HEARTBEAT   AGE");
        assert_eq!(lines[1], "smoke                eng    Running   3             Ab3x9_Qe   3s ago           2h");
        assert_eq!(lines[2], "a-much-longer-name   -      Pending   3             -          -                -");
        assert!(workspaces_table(&[], now()).contains("No workspaces"));
    }

    #[test]
    fn namespace_column_only_when_needed() {
        let mut other = ws("x");
        other.namespace = "research".into();
        let out = workspaces_table(&[ws("smoke"), other], now());
        assert!(out.starts_with("NAMESPACE   NAME"), "{out}");
        assert!(out.contains("research"), "{out}");
    }

    #[test]
    fn team_table_counts() {
        let mut phases: std::collections::BTreeMap<String, u32> =
            ALL_PHASES.iter().map(|p| (p.to_string(), 0)).collect();
        phases.insert("Running".into(), 2);
        phases.insert("Provisioning".into(), 1);
        phases.insert("Suspended".into(), 1);
        let t = TeamSummary {
            name: "eng".into(),
            namespace: "default".into(),
            members: 4,
            phases,
            operating_mode: None,
            max_workspaces: None,
            max_running: None,
            declared: true,
            conditions: vec![crate::api::Condition::new(
                "Ready",
                crate::api::ConditionStatus::False,
                "MembersNotReady",
                "",
                Utc::now(),
            )],
        };
        let out = teams_table(&[t]);
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(
            lines[0],
            "NAME   READY   MEMBERS   RUNNING   PENDING   PAUSED   STOPPED   SUSPENDED   DEGRADED   FAILED   MODE"
        );
        assert_eq!(
            lines[1],
            "eng    False   4         2         1         0        0         1           0          0        -"
        );
    }

    #[test]
    fn describe_report_has_every_section_and_no_token() {
        let spec = resolve(&WorkspaceSpec { tier: Some(1), ..Default::default() }, &Defaults::default()).unwrap();
        let d = WorkspaceDetail {
            summary: ws("smoke"),
            generation: Some(2),
            spec: Some(spec.clone()),
            spec_errors: vec![],
            restart_requested_at: None,
            tokens: vec![TokenView {
                prefix: "Ab3x9_Qe".into(),
                incarnation: 3,
                issued_at: now() - Duration::minutes(5),
                last_used_at: Some(now() - Duration::seconds(3)),
                revoked_at: None,
                revoke_reason: None,
            }],
            decisions: vec![DecisionRecord {
                at: now() - Duration::minutes(5),
                rule: "provision".into(),
                cause: "declared Running, no container".into(),
                actions: vec!["issued token Ab3x9_Qe".into(), "started ws-3f2a0c1e-000".into()],
                outcome: "ok".into(),
            }],
        };
        let out = describe(&d, now());
        for needle in [
            "UID:            3f2a0c1e-0000-4000-8000-000000000001",
            "Container:      ws-3f2a0c1e-000 (id 0123456789ab)",
            "Spec (generation 2):",
            "Tier:           1 (256Mi memory, 0.5 CPU, read-only root, /tmp tmpfs 64Mi)",
            "Token policy:   staleGrace 5m, onPause Keep, rotateEvery -, maxAge -, overlap 1m",
            "Conditions:",
            "Ready   True     Running   4m    agent online",
            "Current:  Ab3x9_Qe…  issued 5m ago, last used 3s ago",
            "Decisions (newest first):",
            "5m ago   provision   declared Running, no container   issued token Ab3x9_Qe; started ws-3f2a0c1e-000   ok",
        ] {
            assert!(out.contains(needle), "missing {needle:?} in\n{out}");
        }
    }

    #[test]
    fn describe_shows_what_the_agent_reports() {
        let mut summary = ws("dev");
        summary.agent = Some(crate::api::AgentStatus {
            current_task: Some("triage #42".into()),
            active_tasks: Some(1),
            error_rate: Some(0.6),
            sample_error: Some("429 from the model".into()),
            runtime_state: Some("wedged".into()),
            url: Some("http://localhost:8000".into()),
            delivery_mode: Some("push".into()),
        });
        let d = WorkspaceDetail {
            summary,
            generation: None,
            spec: None,
            spec_errors: vec![],
            restart_requested_at: None,
            tokens: vec![],
            decisions: vec![],
        };
        let out = describe(&d, now());
        for needle in [
            "Agent:          working on: triage #42, 1 active tasks, error rate 0.60, runtime state wedged",
            "Last error:     429 from the model",
            "Agent URL:      http://localhost:8000 (push)",
        ] {
            assert!(out.contains(needle), "missing {needle:?} in\n{out}");
        }
    }

    #[test]
    fn describe_invalid_spec_lists_errors() {
        let d = WorkspaceDetail {
            summary: ws("bad"),
            generation: Some(1),
            spec: None,
            spec_errors: vec!["tier: 9 is out of range; use 1, 2, 3 or 4".into()],
            restart_requested_at: None,
            tokens: vec![],
            decisions: vec![],
        };
        let out = describe(&d, now());
        assert!(out.contains("Spec: invalid"), "{out}");
        assert!(out.contains("  - tier: 9 is out of range"), "{out}");
        assert!(out.contains("Decisions: none yet"), "{out}");
    }

    #[test]
    fn describe_current_token_falls_back_to_the_live_row() {
        let mut summary = ws("a");
        summary.token = None;
        let row = |prefix: &str, revoked: bool| TokenView {
            prefix: prefix.into(),
            incarnation: 3,
            issued_at: now() - Duration::minutes(1),
            last_used_at: None,
            revoked_at: revoked.then(now),
            revoke_reason: revoked.then(|| "rotated".into()),
        };
        let d = WorkspaceDetail {
            summary,
            generation: None,
            spec: None,
            spec_errors: vec![],
            restart_requested_at: None,
            tokens: vec![row("REVOKED1", true), row("LIVEONE1", false)],
            decisions: vec![],
        };
        let out = describe(&d, now());
        assert!(out.contains("Current:  LIVEONE1…  issued 1m ago, last used -"), "{out}");
    }
}
