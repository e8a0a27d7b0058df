//! The local node (`up --kube-api ADDR --runtime kubernetes`): Pods applied with the
//! real kubectl run as real Docker containers. Each test runs its own operator
//! (instance, state dir, ports); its guard removes the node's containers, volumes
//! and network, also when the test fails.

mod support;

use std::io::{BufRead, BufReader};

use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::Value;
use support::operator::*;

const UP: Duration = Duration::from_secs(120);
const CONVERGE: Duration = Duration::from_secs(60);

/// An operator with the embedded API and its local node, and kubectl for it.
fn start(test: &str) -> (Op, Kubectl) {
    start_with(test, &[])
}

fn start_with(test: &str, env: &[(&str, &str)]) -> (Op, Kubectl) {
    start_local_node(test, &[], env)
}

fn apply(k: &Kubectl, yaml: &str) -> String {
    kubectl_apply(k, yaml)
}

fn pod(k: &Kubectl, name: &str) -> Value {
    serde_json::from_str(&k.ok(&["get", "pod", name, "-o", "json"])).unwrap()
}

fn running(k: &Kubectl, name: &str) -> Value {
    wait_until(&format!("pod {name} Running and ready"), CONVERGE, || {
        k.get_json(&[&format!("pod/{name}")])
            .is_some_and(|p| p["status"]["phase"] == "Running" && p["status"]["containerStatuses"][0]["ready"] == true)
    });
    pod(k, name)
}

/// The Docker id from a containerStatus' `docker://<id>`.
fn container_id(pod: &Value, i: usize) -> String {
    pod["status"]["containerStatuses"][i]["containerID"].as_str().unwrap().trim_start_matches("docker://").to_string()
}

/// The containers (any state) Docker has for a Pod's uid (by name, which says whose a
/// container is now: a kept sandbox passes to the next Pod of its name).
fn containers_of(uid: &str) -> Vec<String> {
    docker(&["ps", "-aq", "--no-trunc", "--filter", &format!("name=_{uid}_")])
        .split_whitespace()
        .map(str::to_string)
        .collect()
}

/// A file in a running container, following symlinks (Secret volumes are symlinks).
fn read_in(container: &str, path: &str) -> Option<String> {
    read_file_in(container, path)
}

const AGENT_POD: &str = r#"apiVersion: v1
kind: Secret
metadata: {name: agent-token}
stringData: {.auth_token: first-token}
---
apiVersion: v1
kind: PersistentVolumeClaim
metadata: {name: agent-configs}
spec:
  accessModes: [ReadWriteOnce]
  resources: {requests: {storage: 1Gi}}
---
apiVersion: v1
kind: Pod
metadata: {name: agent}
spec:
  automountServiceAccountToken: false
  securityContext: {runAsNonRoot: true, runAsUser: 65534, runAsGroup: 65534, fsGroup: 65534, seccompProfile: {type: RuntimeDefault}}
  containers:
  - name: agent
    image: molecule-agent:local
    env:
    - {name: MOLECULE_REGISTRY_URL, value: "http://127.0.0.1:1"}
    - {name: MOLECULE_WORKSPACE_ID, value: 0a1b2c3d-4e5f-6071-8293-a4b5c6d7e8f9}
    - {name: WORKSPACE_CONFIG_PATH, value: /var/run/molecule/token}
    - {name: MOLECULE_HEARTBEAT_SECONDS, value: "1"}
    resources: {limits: {cpu: 500m, memory: 64Mi}}
    securityContext: {readOnlyRootFilesystem: true, allowPrivilegeEscalation: false, capabilities: {drop: [ALL]}}
    volumeMounts:
    - {name: token, mountPath: /var/run/molecule/token, readOnly: true}
    - {name: configs, mountPath: /configs}
  volumes:
  - {name: token, secret: {secretName: agent-token, defaultMode: 0400}}
  - {name: configs, persistentVolumeClaim: {claimName: agent-configs}}
"#;

#[test]
fn a_pod_runs_as_specified_its_secret_stays_in_sync_and_it_restarts() {
    if !docker_available() {
        return;
    }
    let (op, k) = start_with("nodepod", &[("MOLECULE_NODE_KEEP_SANDBOX_SECONDS", "5")]);
    apply(&k, AGENT_POD);
    let p = running(&k, "agent");
    let id = container_id(&p, 0);
    let uid = p["metadata"]["uid"].as_str().unwrap().to_string();
    assert_eq!(p["spec"]["nodeName"], "local", "the node scheduled it onto itself");
    assert!(p["status"]["podIP"].is_string() && p["status"]["hostIP"].is_string(), "{}", p["status"]);
    for condition in ["PodScheduled", "Initialized", "ContainersReady", "Ready"] {
        let found = p["status"]["conditions"]
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c["type"] == condition && c["status"] == "True");
        assert!(found, "{condition}: {}", p["status"]);
    }

    // The container has what the Pod asked for.
    let inspect: Value = serde_json::from_str(&docker(&["inspect", &id])).unwrap();
    let (config, host) = (&inspect[0]["Config"], &inspect[0]["HostConfig"]);
    assert_eq!(host["Memory"], 64 << 20);
    assert_eq!(host["NanoCpus"], 500_000_000);
    assert_eq!(config["User"], "65534:65534");
    assert_eq!(host["CapDrop"], serde_json::json!(["ALL"]));
    assert_eq!(host["ReadonlyRootfs"], true);
    assert!(host["SecurityOpt"].to_string().contains("no-new-privileges"), "{}", host["SecurityOpt"]);
    assert_eq!(config["Labels"]["io.kubernetes.pod.uid"], uid.as_str());
    assert_eq!(config["Labels"]["ai.molecule.node"], op.instance.as_str());
    assert!(config["Labels"].get("ai.molecule.instance").is_none(), "the Docker runtime's label is not used");
    let mounts = inspect[0]["Mounts"].as_array().unwrap();
    let claim: Value = serde_json::from_str(&k.ok(&["get", "pvc", "agent-configs", "-o", "json"])).unwrap();
    assert_eq!(claim["status"]["phase"], "Bound");
    let volume = claim["spec"]["volumeName"].as_str().unwrap();
    assert!(mounts.iter().any(|m| m["Destination"] == "/configs" && m["Name"] == volume), "{mounts:?}");
    assert!(mounts.iter().any(|m| m["Destination"] == "/var/run/molecule/token" && m["RW"] == false), "{mounts:?}");
    assert_eq!(read_in(&id, "/var/run/molecule/token/.auth_token").as_deref(), Some("first-token"));

    // kubectl logs, and -f streams what comes next.
    wait_until("the agent's first log line", CONVERGE, || k.ok(&["logs", "agent"]).contains("starting"));
    let mut follow = Command::new("kubectl")
        .arg("--kubeconfig")
        .arg(&k.kubeconfig)
        .args(["logs", "-f", "agent"])
        .env("HOME", k.home.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let logged = k.ok(&["logs", "agent"]).lines().count();
    let (line_tx, followed) = std::sync::mpsc::channel();
    let stdout = follow.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if line_tx.send(line).is_err() {
                return;
            }
        }
    });
    let first = followed.recv_timeout(CONVERGE).expect("-f shows what was logged before");
    assert!(first.contains("starting"), "{first}");
    for _ in 1..logged {
        followed.recv_timeout(CONVERGE).expect("-f shows every line logged before");
    }

    // Editing the Secret rewrites the file in the running container (no restart);
    // the agent sees the new token, which it logs, and -f shows that line.
    k.ok(&["patch", "secret", "agent-token", "-p", r#"{"stringData":{".auth_token":"second-token"}}"#]);
    wait_until("the new token in the container", CONVERGE, || {
        read_in(&id, "/var/run/molecule/token/.auth_token").as_deref() == Some("second-token")
    });
    let next = followed.recv_timeout(CONVERGE).expect("-f streams the line logged after it started");
    assert!(next.contains("molecule-agent"), "{next}");
    let _ = follow.kill();
    let _ = follow.wait();
    assert_eq!(container_id(&pod(&k, "agent"), 0), id, "the Secret's change restarted nothing");

    // A container killed out of band shows, and restartPolicy Always restarts it.
    docker(&["kill", &id]);
    wait_until("the restart shows in containerStatuses", CONVERGE, || {
        k.get_json(&["pod/agent"]).is_some_and(|p| {
            let s = &p["status"]["containerStatuses"][0];
            s["restartCount"] == 1 && s["lastState"]["terminated"]["exitCode"] == 137 && s["ready"] == true
        })
    });
    let restarted = container_id(&pod(&k, "agent"), 0);
    assert_ne!(restarted, id, "each restart is a new container");
    assert!(k.ok(&["get", "pods"]).contains("1 ("), "RESTARTS shows the restart");

    // Deleting the Pod removes its containers, then the Pod; its running sandbox is
    // kept a while for the next Pod of its name.
    assert!(containers_of(&uid).len() >= 2);
    let pod_ip = pod(&k, "agent")["status"]["podIP"].as_str().unwrap().to_string();
    k.ok(&["delete", "pod", "agent", "--timeout=60s"]);
    assert!(containers_of(&uid).is_empty(), "left: {:?}", containers_of(&uid));
    let node = format!("label=ai.molecule.node={}", op.instance);
    let kept = docker(&["ps", "-q", "--filter", &node, "--filter", "name=k8s_POD_agent_default_kept_0"]);
    assert!(!kept.is_empty(), "the sandbox is kept");

    // The next Pod of the name gets it: its network and address are ready.
    apply(&k, AGENT_POD);
    let again = running(&k, "agent");
    let new_uid = again["metadata"]["uid"].as_str().unwrap().to_string();
    assert_ne!(new_uid, uid);
    assert_eq!(again["status"]["podIP"], pod_ip.as_str(), "the kept sandbox's address");
    let sandbox = docker(&["ps", "-q", "--filter", &format!("name=k8s_POD_agent_default_{new_uid}_0")]);
    assert!(!sandbox.is_empty() && kept == sandbox, "the kept sandbox {kept} became the Pod's ({sandbox})");
    assert!(docker(&["ps", "-aq", "--filter", &node, "--filter", "name=_kept_"]).is_empty(), "taken, not kept");

    // A kept sandbox no Pod takes goes after MOLECULE_NODE_KEEP_SANDBOX_SECONDS (5 here).
    k.ok(&["delete", "pod", "agent", "--timeout=60s"]);
    assert!(containers_of(&new_uid).is_empty(), "left: {:?}", containers_of(&new_uid));
    wait_until("the kept sandbox removed", CONVERGE, || docker(&["ps", "-aq", "--filter", &node]).is_empty());
    drop(op);
}

#[test]
fn claims_owners_and_missing_images_behave_as_in_a_cluster() {
    if !docker_available() {
        return;
    }
    let (op, k) = start("nodegc");
    let sleeper = |name: &str, claim: &str| {
        format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}}}\nspec:\n  terminationGracePeriodSeconds: 5\n  securityContext: {{runAsUser: 65534}}\n  containers: [{{name: c, image: \"molecule-agent:local\", command: [/molecule-agent, pause], volumeMounts: [{{name: d, mountPath: /data}}]}}]\n  volumes: [{{name: d, persistentVolumeClaim: {{claimName: {claim}}}}}]\n"
        )
    };
    let claim = |name: &str| {
        format!(
            "apiVersion: v1\nkind: PersistentVolumeClaim\nmetadata: {{name: {name}}}\nspec:\n  accessModes: [ReadWriteOnce]\n  resources: {{requests: {{storage: 1Gi}}}}\n"
        )
    };

    // A claim in use stays (Terminating) until its Pod is gone; then its volume goes.
    apply(&k, &format!("{}---\n{}", claim("data"), sleeper("user", "data")));
    running(&k, "user");
    let volume = k.get_json(&["pvc/data"]).unwrap()["spec"]["volumeName"].as_str().unwrap().to_string();
    k.ok(&["delete", "pvc", "data", "--wait=false"]);
    assert!(k.ok(&["get", "pvc", "data"]).contains("Terminating"), "a claim a running Pod uses stays");
    assert!(!docker(&["volume", "ls", "-q", "--filter", &format!("name={volume}")]).is_empty());
    k.ok(&["delete", "pod", "user", "--timeout=60s"]);
    wait_until("the claim and its volume gone", CONVERGE, || {
        k.get_json(&["pvc/data"]).is_none()
            && docker(&["volume", "ls", "-q", "--filter", &format!("name={volume}")]).is_empty()
    });

    // Deleting an owner collects its Pod, Secret and claim (and their containers and volume).
    k.ok(&["create", "secret", "generic", "owner", "--from-literal=k=v"]);
    let owner_uid = k.get_json(&["secret/owner"]).unwrap()["metadata"]["uid"].as_str().unwrap().to_string();
    let owned = |yaml: String| {
        yaml.replacen(
            "metadata: {name: ",
            &format!(
                "metadata: {{ownerReferences: [{{apiVersion: v1, kind: Secret, name: owner, uid: {owner_uid}}}], name: "
            ),
            1,
        )
    };
    let secret = "apiVersion: v1\nkind: Secret\nmetadata: {name: owned-token}\nstringData: {token: t}\n".to_string();
    apply(&k, &format!("{}---\n{}---\n{}", owned(claim("owned")), owned(sleeper("owned", "owned")), owned(secret)));
    let p = running(&k, "owned");
    let uid = p["metadata"]["uid"].as_str().unwrap().to_string();
    let volume = k.get_json(&["pvc/owned"]).unwrap()["spec"]["volumeName"].as_str().unwrap().to_string();
    k.ok(&["delete", "secret", "owner"]);
    wait_until("the dependents, their containers and volume gone", CONVERGE, || {
        k.get_json(&["pod/owned"]).is_none()
            && k.get_json(&["secret/owned-token"]).is_none()
            && k.get_json(&["pvc/owned"]).is_none()
            && containers_of(&uid).is_empty()
            && docker(&["volume", "ls", "-q", "--filter", &format!("name={volume}")]).is_empty()
    });

    // An image that is absent and cannot be pulled: the Pod waits, saying so.
    apply(
        &k,
        "apiVersion: v1\nkind: Pod\nmetadata: {name: missing}\nspec:\n  containers: [{name: c, image: \"127.0.0.1:1/molecule-test/missing:v1\"}]\n",
    );
    wait_until("ErrImagePull", CONVERGE, || {
        k.get_json(&["pod/missing"]).is_some_and(|p| {
            let waiting = &p["status"]["containerStatuses"][0]["state"]["waiting"];
            matches!(waiting["reason"].as_str(), Some("ErrImagePull" | "ImagePullBackOff"))
                && p["status"]["phase"] == "Pending"
        })
    });
    let table = k.ok(&["get", "pod", "missing"]);
    assert!(table.contains("ErrImagePull") || table.contains("ImagePullBackOff"), "{table}");
    drop(op);
}

#[test]
fn an_operator_restart_adopts_running_pods() {
    if !docker_available() {
        return;
    }
    let (mut op, k) = start("nodeadopt");
    let sleeper = |name: &str| {
        format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}}}\nspec:\n  containers: [{{name: c, image: \"molecule-agent:local\", command: [/molecule-agent, pause]}}]\n"
        )
    };
    apply(&k, &sleeper("before"));
    let p = running(&k, "before");
    let (id, uid) = (container_id(&p, 0), p["metadata"]["uid"].as_str().unwrap().to_string());
    let containers = containers_of(&uid);

    op.stop();
    assert_eq!(docker(&["inspect", "-f", "{{.State.Running}}", &id]), "true", "Pods run on while the operator is down");
    op.start();
    wait_until("the node back", UP, || k.run(&["get", "node", "local"]).status.success());
    // A Pod made after the restart runs: the node is working (and adopted what it found first).
    apply(&k, &sleeper("after"));
    running(&k, "after");
    let p = running(&k, "before");
    assert_eq!(container_id(&p, 0), id, "the running container was adopted, not recreated");
    assert_eq!(p["status"]["containerStatuses"][0]["restartCount"], 0);
    assert_eq!(containers_of(&uid), containers, "no container was added or removed");
    k.ok(&["delete", "pod", "before", "--timeout=60s"]);
    assert!(containers_of(&uid).is_empty());
    drop(op);
}
