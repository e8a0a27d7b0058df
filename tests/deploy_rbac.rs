//! deploy/ renders with `kubectl kustomize` (offline) and its RBAC grants exactly what
//! cluster mode calls (`molecule::cluster::API_USES`): nothing missing, nothing extra.
//! The install runs workspaces as Pods, with no Docker socket, the registry behind a
//! Service and the secrets key in a Secret the operator creates.

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
    assert_eq!(crds, BTreeSet::from(["teams.molecule.ai", "warmpools.molecule.ai", "workspaces.molecule.ai"]));
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
    // Workspaces are Pods: any container runtime, no Docker socket, nothing of the node.
    assert!(arg_after(&args, "--runtime") == Some("kubernetes"), "{args:?}");
    let volumes = pod["volumes"].as_array().unwrap();
    assert!(volumes.iter().all(|v| v["hostPath"].is_null()), "nothing is mounted from the node: {volumes:?}");
    // Only the leader is ready: a rolling update would wait for a standby forever.
    assert_eq!(deployment["spec"]["strategy"]["type"], "Recreate");
    // The image `molecule-operator image` builds.
    assert_eq!(c["image"], format!("molecule-operator:{}", env!("CARGO_PKG_VERSION")));
}

/// The value after `flag` in `args`.
fn arg_after<'a>(args: &[&'a str], flag: &str) -> Option<&'a str> {
    args.iter().position(|a| *a == flag).and_then(|i| args.get(i + 1).copied())
}

#[test]
fn agents_reach_the_registry_through_a_service_on_the_agents_only_listener() {
    let docs = rendered();
    let deployment = one(&docs, "Deployment");
    let c = &deployment["spec"]["template"]["spec"]["containers"][0];
    let args: Vec<&str> = c["args"].as_array().unwrap().iter().filter_map(Value::as_str).collect();
    let service = one(&docs, "Service");
    let (name, namespace) = (service["metadata"]["name"].as_str().unwrap(), service["metadata"]["namespace"].as_str());
    assert_eq!(namespace, Some(NAMESPACE));
    let port = &service["spec"]["ports"][0];
    let url = format!("http://{name}.{NAMESPACE}.svc:{}", port["port"]);
    assert_eq!(arg_after(&args, "--registry-url"), Some(url.as_str()), "--registry-url names the Service");
    // The Service selects the operator's Pods ...
    let labels = &deployment["spec"]["template"]["metadata"]["labels"];
    for (k, v) in service["spec"]["selector"].as_object().unwrap() {
        assert_eq!(&labels[k], v, "the Service selects the operator's Pods");
    }
    // ... on the port of --agent-listen (registry only), never --listen's (admin API).
    let target = port["targetPort"].as_str().unwrap();
    let container_port = c["ports"].as_array().unwrap().iter().find(|p| p["name"] == target).unwrap();
    let agent_listen = arg_after(&args, "--agent-listen").expect("--agent-listen");
    assert!(agent_listen.ends_with(&format!(":{}", container_port["containerPort"])), "{agent_listen}");
    assert!(!arg_after(&args, "--listen").unwrap().ends_with(&format!(":{}", container_port["containerPort"])));
}

#[test]
fn the_secrets_key_is_a_secret_the_operator_creates_never_a_pod_volume() {
    let docs = rendered();
    let deployment = one(&docs, "Deployment");
    let c = &deployment["spec"]["template"]["spec"]["containers"][0];
    // No MOLECULE_SECRETS_KEY in the env (the operator reads the Secret through the API,
    // where it creates it once) and no key file on a Pod volume: the state dir is an
    // emptyDir, and the key is not kept there in cluster mode.
    let env = c["env"].as_array().unwrap();
    assert!(env.iter().all(|e| e["name"] != "MOLECULE_SECRETS_KEY"), "{env:?}");
    // Creating it is granted in the operator's namespace only.
    let role = one(&docs, "Role");
    assert!(grants(role).contains(&("".into(), "secrets".into(), "create".into())));
    assert!(!grants(one(&docs, "ClusterRole")).contains(&("".into(), "secrets".into(), "create".into())));
}
