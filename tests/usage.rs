//! Per-workspace usage (CPU, memory) against the real Docker daemon: what a user sees in
//! `get -o wide`, `describe` and `/metrics`, and that a removed workspace's series go.

mod support;

use std::collections::BTreeMap;
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;
use support::operator::*;

const UP: Duration = Duration::from_secs(90);
/// Two samples apart (the CPU figure is a rate) at `--usage-seconds 1`, with room for a
/// loaded machine.
const SAMPLED: Duration = Duration::from_secs(60);

fn metrics(op: &Op) -> String {
    let out = Command::new("curl").args(["-s", &format!("{}/metrics", op.url())]).output().unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The value of the sample of `family` for workspace `default/name`, if there is one.
fn sample(text: &str, family: &str, name: &str) -> Option<f64> {
    let series = format!("{family}{{workspace=\"default/{name}\"}} ");
    text.lines().find_map(|l| l.strip_prefix(&series)?.trim().parse().ok())
}

/// Polls `/metrics` until `done` holds; panics with the last text.
fn wait_metrics(op: &Op, what: &str, done: impl Fn(&str) -> bool) -> String {
    let t0 = Instant::now();
    loop {
        let text = metrics(op);
        if done(&text) {
            return text;
        }
        assert!(t0.elapsed() < SAMPLED, "timed out waiting for {what} in /metrics:\n{text}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn stdout(out: std::process::Output) -> String {
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

fn sampled(w: &Value) -> bool {
    w["usage"]["memoryBytes"].as_u64().is_some_and(|b| b > 0) && w["usage"]["cpuCores"].as_f64().is_some()
}

#[test]
fn usage_shows_in_get_wide_describe_and_metrics_and_goes_with_the_workspace() {
    if !docker_available() {
        return;
    }
    let mut op = Op::new("usage");
    op.extra = vec!["--usage-seconds".into(), "1".into()];
    op.write_ws("busy");
    op.write_ws("leaving");
    op.write("stopped.yaml", &workspace_yaml("stopped").replace("tier: 1", "tier: 1\n  operatingMode: Stopped"));
    op.start();
    op.wait_online(&["busy", "leaving"], UP);

    // JSON: memory in bytes and CPU in cores, for every workspace with a container.
    let ws = op.wait("usage of the running workspaces", SAMPLED, |ws: &BTreeMap<String, Value>| {
        ["busy", "leaving"].iter().all(|n| ws.get(*n).is_some_and(sampled))
    });
    assert!(ws["stopped"]["usage"].is_null(), "no container, no usage: {}", ws["stopped"]);

    // The wide table: CPU and MEMORY columns, `-` for the workspace without a container.
    let wide = stdout(op.cli(&["get", "workspaces", "-o", "wide"]));
    let lines: Vec<&str> = wide.lines().collect();
    assert!(lines[0].split_whitespace().rev().take(2).eq(["MEMORY", "CPU"]), "{wide}");
    let row = |name: &str| -> Vec<&str> {
        lines.iter().find(|l| l.starts_with(&format!("{name} "))).unwrap().split_whitespace().collect()
    };
    let busy = row("busy");
    let memory = busy[busy.len() - 1];
    assert!(["Ki", "Mi", "Gi"].iter().any(|u| memory.ends_with(u)), "memory is human-readable: {wide}");
    assert!(busy[busy.len() - 2].parse::<f64>().is_ok(), "CPU in cores: {wide}");
    let stopped = row("stopped");
    assert_eq!(stopped[stopped.len() - 2..], ["-", "-"], "{wide}");
    let plain = stdout(op.cli(&["get", "workspaces"]));
    assert!(!plain.contains("MEMORY"), "only -o wide shows usage:\n{plain}");

    // describe: one Usage line.
    let describe = stdout(op.cli(&["describe", "workspace", "busy"]));
    let usage = describe.lines().find(|l| l.starts_with("Usage:")).unwrap_or_else(|| panic!("{describe}"));
    assert!(usage.contains(" cores, ") && usage.contains(" memory (over "), "{usage}");
    let describe = stdout(op.cli(&["describe", "workspace", "stopped"]));
    assert!(describe.lines().any(|l| l.starts_with("Usage:") && l.contains("- (no running container")), "{describe}");

    // /metrics: gauges per workspace, labelled namespace and name.
    let text = wait_metrics(&op, "both workspaces' usage", |t| {
        ["busy", "leaving"].iter().all(|n| {
            sample(t, "molecule_workspace_memory_bytes", n).is_some_and(|b| b > 0.0)
                && sample(t, "molecule_workspace_cpu_cores", n).is_some()
        })
    });
    assert!(sample(&text, "molecule_workspace_memory_bytes", "stopped").is_none(), "{text}");
    assert!(text.contains("# TYPE molecule_workspace_cpu_cores gauge"), "{text}");

    // A workspace declared no more is removed, and its series go with it.
    op.remove_file("leaving.yaml");
    op.wait("leaving removed", UP, |ws| !ws.contains_key("leaving"));
    let text = wait_metrics(&op, "leaving's series gone", |t| {
        sample(t, "molecule_workspace_memory_bytes", "leaving").is_none()
            && sample(t, "molecule_workspace_cpu_cores", "leaving").is_none()
    });
    assert!(sample(&text, "molecule_workspace_memory_bytes", "busy").is_some(), "busy's series stay:\n{text}");
    op.cleanup();
}

/// Pods (`--runtime kubernetes`): usage comes from the metrics API (`metrics.k8s.io`),
/// which the embedded API serves for the local node's Pods as metrics-server would.
#[test]
fn pods_show_the_usage_the_metrics_api_reports() {
    if !docker_available() {
        return;
    }
    let mut op = Op::new("podusage");
    op.extra = vec![
        "--kube-api".into(),
        format!("127.0.0.1:{}", free_port()),
        "--runtime".into(),
        "kubernetes".into(),
        "--usage-seconds".into(),
        "1".into(),
    ];
    op.start();
    let k = Kubectl::new(&op);
    wait_until("the local node registered", UP, || {
        k.kubeconfig.exists() && k.run(&["get", "node", "local"]).status.success()
    });
    let file = tempfile::NamedTempFile::new().unwrap();
    let yaml = "apiVersion: molecule.ai/v1alpha1\nkind: Workspace\nmetadata: {name: dev, namespace: default}\n\
                spec: {tier: 1}\n";
    std::fs::write(file.path(), yaml).unwrap();
    k.ok(&["apply", "-f", file.path().to_str().unwrap()]);
    let ws = op.wait("dev online", UP, |ws| ws.get("dev").is_some_and(online));
    let pod = ws["dev"]["container"]["name"].as_str().unwrap().to_string();

    // What metrics-server would answer, for the Pods the selector names.
    let raw = k.ok(&[
        "get",
        "--raw",
        &format!(
            "/apis/metrics.k8s.io/v1beta1/namespaces/default/pods?labelSelector=ai.molecule.instance%3D{}",
            op.instance
        ),
    ]);
    let list: Value = serde_json::from_str(&raw).unwrap();
    assert_eq!(list["kind"], "PodMetricsList", "{raw}");
    let item = list["items"].as_array().unwrap().iter().find(|i| i["metadata"]["name"] == pod.as_str());
    let item = item.unwrap_or_else(|| panic!("{pod} in {raw}"));
    assert!(item["containers"][0]["usage"]["memory"].as_str().is_some_and(|m| m.ends_with("Ki")), "{raw}");

    let ws = op.wait("dev's usage", SAMPLED, |ws| ws.get("dev").is_some_and(sampled));
    assert!(ws["dev"]["usage"]["windowSeconds"].as_f64().is_some(), "{}", ws["dev"]);
    let wide = stdout(op.cli(&["get", "workspaces", "-o", "wide"]));
    let row: Vec<&str> = wide.lines().find(|l| l.starts_with("dev ")).unwrap().split_whitespace().collect();
    assert_ne!(row[row.len() - 1], "-", "{wide}");
    op.cleanup();
}
