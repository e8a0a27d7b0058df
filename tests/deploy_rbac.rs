//! deploy/ renders with `kubectl kustomize` (offline) and its RBAC grants exactly what
//! cluster mode calls (`molecule::cluster::API_USES`): nothing missing, nothing extra.

use std::collections::BTreeSet;
use std::process::Command;

use molecule::cluster::API_USES;
use serde_json::Value;

const NAMESPACE: &str = "molecule-system";

fn rendered() -> Vec<Value> {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy");
    let out = Command::new("kubectl")
        .args(["kustomize", dir])
        .output()
        .expect("kubectl is needed for this test (Debian package kubernetes-client or the upstream binary)");
    assert!(out.status.success(), "kubectl kustomize deploy/ failed: {}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8(out.stdout).unwrap();
    serde_saphyr::from_multiple::<Value>(&text).expect("kustomize output is YAML")
}

fn find<'a>(docs: &'a [Value], kind: &str) -> Vec<&'a Value> {
    docs.iter().filter(|d| d["kind"] == kind).collect()
}

fn one<'a>(docs: &'a [Value], kind: &str) -> &'a Value {
    let found = find(docs, kind);
    assert_eq!(found.len(), 1, "expected one {kind} in deploy/");
    found[0]
}

/// Every (group, resource, verb) a Role or ClusterRole grants.
fn grants(role: &Value) -> BTreeSet<(String, String, String)> {
    let mut out = BTreeSet::new();
    let strings = |v: &Value| -> Vec<String> {
        v.as_array().into_iter().flatten().filter_map(|s| s.as_str().map(str::to_string)).collect()
    };
    for rule in role["rules"].as_array().expect("rules") {
        for g in strings(&rule["apiGroups"]) {
            for r in strings(&rule["resources"]) {
                for v in strings(&rule["verbs"]) {
                    assert!(g != "*" && r != "*" && v != "*", "wildcards are not least privilege: {rule}");
                    out.insert((g.clone(), r.clone(), v));
                }
            }
        }
    }
    out
}

fn used(own_namespace: bool) -> BTreeSet<(String, String, String)> {
    API_USES
        .iter()
        .filter(|u| u.own_namespace == own_namespace)
        .flat_map(|u| u.verbs.iter().map(move |v| (u.group.to_string(), u.resource.to_string(), v.to_string())))
        .collect()
}

#[test]
fn the_cluster_role_and_the_leader_role_grant_exactly_what_the_controller_calls() {
    let docs = rendered();
    let cluster_role = one(&docs, "ClusterRole");
    assert_eq!(grants(cluster_role), used(false), "ClusterRole molecule-operator differs from API_USES");
    let role = one(&docs, "Role");
    assert_eq!(role["metadata"]["namespace"], NAMESPACE);
    assert_eq!(grants(role), used(true), "Role molecule-operator-leader differs from API_USES");

    // Both are bound to the ServiceAccount the Deployment runs as.
    let sa = one(&docs, "ServiceAccount");
    let deployment = one(&docs, "Deployment");
    let sa_name = sa["metadata"]["name"].as_str().unwrap();
    assert_eq!(deployment["spec"]["template"]["spec"]["serviceAccountName"], sa_name);
    for (kind, role_kind, role_name) in [
        ("ClusterRoleBinding", "ClusterRole", &cluster_role["metadata"]["name"]),
        ("RoleBinding", "Role", &role["metadata"]["name"]),
    ] {
        let b = one(&docs, kind);
        assert_eq!(&b["roleRef"]["kind"], role_kind);
        assert_eq!(&b["roleRef"]["name"], role_name);
        let subject = &b["subjects"][0];
        assert_eq!(subject["kind"], "ServiceAccount");
        assert_eq!(subject["name"], sa_name);
        assert_eq!(subject["namespace"], NAMESPACE);
    }
}

#[test]
fn deploy_includes_the_generated_crds_and_a_hardened_deployment() {
    let docs = rendered();
    let crds: BTreeSet<&str> =
        find(&docs, "CustomResourceDefinition").iter().filter_map(|c| c["metadata"]["name"].as_str()).collect();
    assert_eq!(crds, BTreeSet::from(["teams.molecule.ai", "workspaces.molecule.ai"]));
    assert_eq!(one(&docs, "Namespace")["metadata"]["name"], NAMESPACE);

    let deployment = one(&docs, "Deployment");
    assert_eq!(deployment["metadata"]["namespace"], NAMESPACE);
    let pod = &deployment["spec"]["template"]["spec"];
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    let c = &pod["containers"][0];
    let args: Vec<&str> = c["args"].as_array().unwrap().iter().filter_map(Value::as_str).collect();
    assert_eq!(&args[..3], ["run", "--source", "kubernetes"]);
    // The database URL (with its password) never goes on the command line, which any
    // process on the node can read: the operator takes it from its environment.
    assert!(!args.iter().any(|a| a.contains("--database-url") || a.contains("DATABASE_URL")), "{args:?}");
    let env = c["env"].as_array().unwrap();
    let database = env.iter().find(|e| e["name"] == "MOLECULE_DATABASE_URL").expect("MOLECULE_DATABASE_URL env");
    assert!(database["valueFrom"]["secretKeyRef"]["name"].is_string(), "the URL comes from a Secret");
    assert_eq!(c["livenessProbe"]["httpGet"]["path"], "/healthz");
    assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/readyz");
    assert!(c["resources"]["limits"]["memory"].is_string() && c["resources"]["limits"]["cpu"].is_string());
    let sc = &c["securityContext"];
    assert_eq!(sc["readOnlyRootFilesystem"], true);
    assert_eq!(sc["allowPrivilegeEscalation"], false);
    assert_eq!(sc["capabilities"]["drop"], serde_json::json!(["ALL"]));
    let socket = pod["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["hostPath"]["path"] == "/var/run/docker.sock")
        .expect("the Docker socket is mounted from the host");
    assert!(
        c["volumeMounts"].as_array().unwrap().iter().any(|m| m["name"] == socket["name"]),
        "the Docker socket volume is mounted into the container"
    );
}
