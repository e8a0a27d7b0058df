//! `up --kube-api`: the real kubectl drives the operator through its own
//! Kubernetes-compatible API; the kube-rs controller (the same code as cluster mode)
//! reconciles, and real Docker containers follow.

mod support;

use std::time::Duration;

use support::operator::*;

const UP: Duration = Duration::from_secs(120);
const CONVERGE: Duration = Duration::from_secs(40);

#[test]
fn kubectl_drives_real_containers_through_the_operators_own_api() {
    if !docker_available() {
        return;
    }
    let mut op = Op::new("kubelocal");
    let port = free_port();
    op.extra = vec!["--kube-api".into(), format!("127.0.0.1:{port}")];
    op.start();
    let k = Kubectl::new(&op);
    wait_until("kubeconfig written and API up", UP, || k.kubeconfig.exists() && k.run(&["get", "ws"]).status.success());

    // apply a directory (a Team with an inline member and Workspaces), as in a cluster.
    let org = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/org/");
    k.ok(&["apply", "-f", org]);
    let names = ["pm", "dev-lead", "backend", "qa", "research", "engineering-docs"];
    let ws = op.wait_online(&names, UP);
    assert_eq!(ws["pm"]["source"]["kind"], "kubernetes");
    // Status came back through the API (server-side apply by the controller).
    wait_until("kubectl shows Running", CONVERGE, || k.ok(&["get", "ws", "pm"]).contains("Running"));
    let json: serde_json::Value = serde_json::from_str(&k.ok(&["get", "ws", "pm", "-o", "json"])).unwrap();
    assert_eq!(json["status"]["incarnation"], ws["pm"]["incarnation"]);
    assert!(json["metadata"]["finalizers"].as_array().unwrap().iter().any(|f| f == "molecule.ai/cleanup"));
    let describe = k.ok(&["describe", "ws", "pm"]);
    assert!(describe.contains("Provisioned"), "an Event for the decision:\n{describe}");

    // What the agent itself reports shows as Events: once when it turns unhealthy
    // (with its error), once when it recovers (heartbeats as an original runtime sends).
    let pm = ws["pm"]["container"]["id"].as_str().unwrap();
    let (token, _, _) = read_token(pm).expect("pm's token");
    let beat = |rate: f64| {
        let body =
            serde_json::json!({"workspace_id": ws["pm"]["uid"], "error_rate": rate, "sample_error": "upstream 502"});
        registry_json(&op.url(), "/registry/heartbeat", &token, &body.to_string())
    };
    let events = || k.ok(&["get", "events", "--field-selector", "involvedObject.name=pm", "-o", "json"]);
    wait_until("an AgentUnhealthy Event naming the error", CONVERGE, || {
        assert_eq!(beat(0.9), 200);
        events().contains("AgentUnhealthy") && events().contains("upstream 502")
    });
    wait_until("an AgentRecovered Event", CONVERGE, || {
        assert_eq!(beat(0.0), 200);
        events().contains("AgentRecovered")
    });

    // patch: pause and resume the real container.
    let id = ws["qa"]["container"]["id"].as_str().unwrap().to_string();
    k.ok(&["patch", "ws", "qa", "--type", "merge", "-p", r#"{"spec":{"operatingMode":"Paused"}}"#]);
    wait_until("qa paused in Docker", CONVERGE, || docker(&["inspect", "-f", "{{.State.Paused}}", &id]) == "true");
    k.ok(&["patch", "ws", "qa", "--type", "merge", "-p", r#"{"spec":{"operatingMode":"Running"}}"#]);
    wait_until("qa running again", CONVERGE, || docker(&["inspect", "-f", "{{.State.Paused}}", &id]) == "false");

    // delete: the finalizer removes container and volume before the object goes.
    let research = ws["research"]["container"]["id"].as_str().unwrap()[..12].to_string();
    k.ok(&["delete", "ws", "research", "--wait=true", "--timeout=60s"]);
    assert!(!op.containers().contains(&research), "the container is gone once the object is");
    assert!(!k.run(&["get", "ws", "research"]).status.success());

    // A bad manifest is refused by the API with a readable error; nothing changes.
    let bad = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(bad.path(), workspace_yaml("bad").replace("tier: 1", "tier: 9")).unwrap();
    let out = k.run(&["apply", "-f", bad.path().to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("tier"), "{}", String::from_utf8_lossy(&out.stderr));

    // Objects survive an operator restart.
    op.stop();
    op.start();
    wait_until("API back", UP, || k.run(&["get", "ws", "pm"]).status.success());
    let ws2 = op.wait_online(&["pm", "qa"], UP);
    assert_eq!(ws2["pm"]["incarnation"], ws["pm"]["incarnation"], "nothing was recreated by the restart");
}

/// A TLS pair that cannot be used stops the operator with an error naming it (before,
/// the server's failure was dropped: "serving the Kubernetes API" was logged and
/// nothing served).
#[test]
fn a_corrupt_kube_api_key_stops_the_operator_naming_it() {
    let mut op = Op::new("kubetls");
    molecule::kubeapi::KubeTls::load_or_create(&op.state).expect("a TLS pair");
    std::fs::write(
        op.state.join("kube-api/tls.key"),
        "-----BEGIN PRIVATE KEY-----\ngarbage\n-----END PRIVATE KEY-----\n",
    )
    .unwrap();
    op.extra = vec!["--kube-api".into(), format!("127.0.0.1:{}", free_port())];
    op.start();
    assert!(op.wait_exit(UP), "the operator stops instead of running without its API:\n{}", op.logs());
    let logs = op.logs();
    assert!(logs.contains("error:") && logs.contains("tls.key") && logs.contains("kube-api"), "{logs}");
    assert!(!logs.contains("serving the Kubernetes API"), "{logs}");
}
