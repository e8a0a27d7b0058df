//! HA in Pod mode, as deploy/ runs it: the Kubernetes API and its node in one process
//! (here the test's: the embedded API and the local node, as `up --kube-api --runtime
//! kubernetes` serves them), two `run --source kubernetes --runtime kubernetes
//! --kubeconfig FILE` replicas as its clients, sharing Postgres and one instance id,
//! their agents' registry behind one address (a proxy standing in for the Service,
//! forwarding to a replica that answers). SIGKILL the leader: the survivor takes the
//! Lease and goes on with the same Pod (same uid, same incarnation), re-provisioning
//! nothing, because the Pods live in the cluster, not with the leader.

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use serde_json::Value;
use support::operator::*;
use tokio_util::sync::CancellationToken;

const UP: Duration = Duration::from_secs(120);

/// Forwards every connection on `listener` to the first of `targets` that accepts it,
/// as a Service forwards to a ready endpoint.
fn service(listener: tokio::net::TcpListener, targets: Vec<SocketAddr>, stop: CancellationToken) {
    tokio::spawn(async move {
        loop {
            let (mut client, _) = tokio::select! {
                _ = stop.cancelled() => return,
                accepted = listener.accept() => match accepted { Ok(a) => a, Err(_) => return },
            };
            let targets = targets.clone();
            tokio::spawn(async move {
                for t in targets {
                    if let Ok(mut upstream) = tokio::net::TcpStream::connect(t).await {
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
                        return;
                    }
                }
            });
        }
    });
}

fn replica(
    name: &str,
    instance: &str,
    kubeconfig: &std::path::Path,
    db: &str,
    registry: &str,
    agents: SocketAddr,
) -> Op {
    let mut op = Op::new(name);
    op.instance = instance.to_string();
    op.sources = vec!["kubernetes".into()];
    op.extra = vec![
        "--runtime".into(),
        "kubernetes".into(),
        "--kubeconfig".into(),
        kubeconfig.display().to_string(),
        "--lease-seconds".into(),
        "3".into(),
        "--registry-url".into(),
        registry.into(),
        "--agent-listen".into(),
        agents.to_string(),
    ];
    // Leader identity, as the Deployment's downward API gives it; the URL by env only.
    op.env = vec![("POD_NAME".into(), name.into()), ("MOLECULE_DATABASE_URL".into(), db.into())];
    op
}

/// Who holds the leader Lease (the embedded API serves Leases but does not list them
/// in discovery, so `kubectl get lease` does not know the kind: a raw GET).
fn lease_holder(k: &Kubectl) -> Option<String> {
    let out = k.run(&["get", "--raw", "/apis/coordination.k8s.io/v1/namespaces/default/leases/molecule-operator"]);
    let lease: Value = serde_json::from_slice(&out.stdout).ok().filter(|_| out.status.success())?;
    lease["spec"]["holderIdentity"].as_str().map(str::to_string)
}

/// (uid, name) of every Pod of the instance.
fn pods(k: &Kubectl, instance: &str) -> Vec<(String, String)> {
    let selector = format!("ai.molecule.instance={instance}");
    let list = k.get_json(&["pods", "-l", &selector]).unwrap_or_default();
    list["items"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|p| (p["metadata"]["uid"].as_str().unwrap().to_string(), p["metadata"]["name"].as_str().unwrap().into()))
        .collect()
}

/// The local node, stopped before the replicas' guards remove what it ran (declare it
/// after them): a node still running would start the Pods' containers again.
struct Node {
    node: std::sync::Arc<molecule::node::LocalNode>,
    stop: CancellationToken,
}

impl Drop for Node {
    fn drop(&mut self) {
        self.stop.cancel();
        // Its tasks each hold the node: it has stopped when only this handle is left.
        let t0 = std::time::Instant::now();
        while std::sync::Arc::strong_count(&self.node) > 1 && t0.elapsed() < Duration::from_secs(10) {
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_survivor_of_a_killed_leader_keeps_every_pod() {
    if !docker_available() {
        return;
    }
    let Some(db) = support::postgres::fresh_database().await else { return };
    // The agent image the node runs (a cluster's replicas build no image).
    let docker = molecule::runtime::docker::DockerRuntime::connect("kube-pods-ha").await.unwrap();
    docker.ensure_agent_image().await.unwrap();

    // The cluster: the API and its node.
    let api_dir = tempfile::tempdir().unwrap();
    let store = support::kubeapi::sqlite_store(api_dir.path()).await;
    let server = support::kubeapi::Server::start(store, api_dir.path()).await;
    let stop = CancellationToken::new();
    let mut replicas: Vec<Op> = Vec::new(); // dropped after the node
    let instance = format!("podha{}", std::process::id());
    let client = molecule::cluster::client(Some(&server.kubeconfig)).await.unwrap();
    let config = molecule::node::NodeConfig { instance: instance.clone(), dir: api_dir.path().join("node") };
    let node_stop = stop.child_token();
    let node = molecule::node::start(client, config, node_stop.clone()).await.expect("the local node starts");
    let gateway: std::net::IpAddr = node.gateway().parse().unwrap();
    let node = Node { node, stop: node_stop };

    // The registry's Service, on the node's gateway, in front of both replicas.
    let listener = tokio::net::TcpListener::bind((gateway, 0)).await.unwrap();
    let registry = format!("http://{}", listener.local_addr().unwrap());
    let agents = [SocketAddr::new(gateway, free_port()), SocketAddr::new(gateway, free_port())];
    service(listener, agents.to_vec(), stop.clone());

    replicas.push(replica("podha-a", &instance, &server.kubeconfig, &db.url, &registry, agents[0]));
    replicas.push(replica("podha-b", &instance, &server.kubeconfig, &db.url, &registry, agents[1]));
    let [a, b] = &mut replicas[..] else { unreachable!() };
    a.start();
    b.start();
    let k = Kubectl { kubeconfig: server.kubeconfig.clone(), home: tempfile::tempdir().unwrap() };
    let ws = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(
        ws.path(),
        "apiVersion: molecule.ai/v1alpha1\nkind: Workspace\nmetadata: {name: dev, namespace: default}\nspec: {}\n",
    )
    .unwrap();
    k.ok(&["apply", "-f", ws.path().to_str().unwrap()]);

    let holder = tokio::task::block_in_place(|| {
        let t0 = std::time::Instant::now();
        while lease_holder(&k).is_none() {
            assert!(t0.elapsed() < UP, "no leader:\n--- a:\n{}\n--- b:\n{}", a.logs(), b.logs());
            std::thread::sleep(Duration::from_millis(100));
        }
        lease_holder(&k).unwrap()
    });
    let (leader, survivor) = if holder == "podha-a" { (a, b) } else { (b, a) };
    let before = tokio::task::block_in_place(|| {
        leader.wait("dev online through the Service", UP, |ws| ws.get("dev").is_some_and(online))
    });
    let pods_before = pods(&k, &instance);
    assert_eq!(pods_before.len(), 1, "{pods_before:?}");
    assert_eq!(before["dev"]["container"]["id"].as_str(), Some(pods_before[0].0.as_str()), "id = the Pod's uid");
    let incarnation = before["dev"]["incarnation"].as_i64();

    leader.kill(); // SIGKILL
    let killed_at = chrono::Utc::now();
    let survivor_name = if holder == "podha-a" { "podha-b" } else { "podha-a" };
    tokio::task::block_in_place(|| {
        wait_until("the survivor holds the Lease", UP, || lease_holder(&k).as_deref() == Some(survivor_name));
        eprintln!("lease taken over {:?} after the kill", (chrono::Utc::now() - killed_at).to_std());
        // The survivor's controller has driven a reconcile of the Workspace through the
        // rules (which provision when they see no Pod) ...
        wait_until("the survivor reconciled dev", UP, || survivor.logs().contains("reconciled workspace="));
        // ... and the agent's heartbeats reach its registry through the Service: online,
        // heard after the kill, in the same incarnation.
        survivor.wait("dev heard by the survivor", UP, |ws| {
            ws.get("dev").is_some_and(|w| {
                let heard = w["lastHeartbeatAt"].as_str().and_then(|t| t.parse::<chrono::DateTime<chrono::Utc>>().ok());
                online(w) && heard > Some(killed_at) && w["incarnation"].as_i64() == incarnation
            })
        });
    });
    eprintln!("heard by the survivor {:?} after the kill", (chrono::Utc::now() - killed_at).to_std());
    let logs = survivor.logs();
    assert!(logs.contains("leading: reconciling"), "{logs}");
    assert!(!logs.contains("rule=\"provision\""), "the survivor provisioned nothing:\n{logs}");
    assert_eq!(pods(&k, &instance), pods_before, "the same Pod (uid), not recreated");

    survivor.stop();
    tokio::task::block_in_place(|| drop(node)); // then the replicas' guards remove the Pods' containers
    server.stop().await;
}
