//! The local Kubernetes-compatible API (src/kubeapi) driven by the real `kubectl`
//! binary and by the kube-rs client, over a real SQLite store (and Postgres in one
//! case). No Docker: this checks the API, not the reconciler behind it.

mod support;

use support::kubeapi::*;

use std::time::Duration;

use futures::StreamExt;
use molecule::api::Workspace;
use molecule::kubeapi::{self, KubeApi};
use molecule::store::{self, DynStore};
use serde_json::{Value, json};
use tokio::io::AsyncReadExt;

const WS: &str = "/apis/molecule.ai/v1alpha1/namespaces/default/workspaces";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_applies_gets_describes_patches_and_deletes() {
    let state = tempfile::tempdir().unwrap();
    let store = sqlite_store(state.path()).await;
    let mut server = Server::start(store.clone(), state.path()).await;

    // A directory of Team and Workspace files.
    let out = server.ok(&["apply", "-f", "examples/org/"]).await;
    assert!(out.contains("workspace.molecule.ai/dev-lead created"), "{out}");
    assert!(out.contains("team.molecule.ai/engineering created"), "{out}");
    // The operator side sees each write (Bound::subscribe) and reads them back decoded.
    let mut changes = server.changes.take().expect("started through bind");
    let mut added = Vec::new();
    while let Ok(change) = changes.try_recv() {
        assert_eq!(change.event_type, "ADDED");
        added.push(change.object["metadata"]["name"].as_str().unwrap_or_default().to_string());
    }
    assert!(added.contains(&"dev-lead".to_string()) && added.contains(&"engineering".to_string()), "{added:?}");
    let (workspaces, teams) = kubeapi::declared(store.as_ref()).await.expect("the declared objects read");
    assert_eq!((workspaces.len(), teams.len()), (added.len() - 1, 1), "{added:?}");
    // Applying again changes nothing.
    let out = server.ok(&["apply", "-f", "examples/org/"]).await;
    assert!(out.contains("workspace.molecule.ai/dev-lead unchanged"), "{out}");

    // A multi-document file.
    let multi = write(
        state.path(),
        "multi.yaml",
        "apiVersion: molecule.ai/v1alpha1\nkind: Workspace\nmetadata: {name: alpha, labels: {tier: one}}\nspec: {tier: 1}\n---\n\
         apiVersion: molecule.ai/v1alpha1\nkind: Workspace\nmetadata: {name: beta}\nspec: {operatingMode: Stopped}\n",
    );
    let out = server.ok(&["apply", "-f", &multi]).await;
    assert!(
        out.contains("workspace.molecule.ai/alpha created") && out.contains("workspace.molecule.ai/beta created"),
        "{out}"
    );

    // Client-side apply of a changed file: kubectl sends its three-way patch.
    write(
        state.path(),
        "multi.yaml",
        "apiVersion: molecule.ai/v1alpha1\nkind: Workspace\nmetadata: {name: beta}\nspec: {operatingMode: Running}\n",
    );
    let out = server.ok(&["apply", "-f", &multi]).await;
    assert!(out.contains("workspace.molecule.ai/beta configured"), "{out}");
    assert_eq!(server.ok(&["get", "ws", "beta", "-o", "jsonpath={.spec.operatingMode}"]).await, "Running");
    write(
        state.path(),
        "multi.yaml",
        "apiVersion: molecule.ai/v1alpha1\nkind: Workspace\nmetadata: {name: beta}\nspec: {operatingMode: Stopped}\n",
    );
    server.ok(&["apply", "-f", &multi]).await;

    // The printer columns.
    let out = server.ok(&["get", "ws"]).await;
    let header = out.lines().next().unwrap_or_default();
    for column in ["NAME", "PHASE", "TEAM", "INCARNATION", "READY", "AGE"] {
        assert!(header.contains(column), "no {column} column in:\n{out}");
    }
    assert!(out.lines().any(|l| l.starts_with("dev-lead") && l.contains("engineering")), "{out}");
    let out = server.ok(&["get", "teams"]).await;
    assert!(out.contains("engineering") && out.contains("MEMBERS"), "{out}");
    let out = server.ok(&["get", "molecule"]).await;
    assert!(out.contains("workspace.molecule.ai/dev-lead") && out.contains("team.molecule.ai/engineering"), "{out}");
    let out = server.ok(&["get", "ws", "-l", "tier=one", "-o", "name"]).await;
    assert_eq!(out.trim(), "workspace.molecule.ai/alpha");

    // JSON: every object, with the metadata the server owns.
    let list: Value = serde_json::from_str(&server.ok(&["get", "ws", "-o", "json"]).await).unwrap();
    let items = list["items"].as_array().unwrap();
    assert!(items.len() >= 5, "{list}");
    let dev_lead = items.iter().find(|w| w["metadata"]["name"] == "dev-lead").unwrap();
    assert_eq!(dev_lead["spec"]["team"], "engineering");
    assert_eq!(dev_lead["metadata"]["generation"], 1);
    assert!(dev_lead["metadata"]["uid"].as_str().is_some_and(|u| u.len() == 36));

    let out = server.ok(&["describe", "ws", "dev-lead"]).await;
    assert!(out.contains("Name:") && out.contains("dev-lead") && out.contains("engineering"), "{out}");

    // Merge patch to Paused and back: the spec changed, so the generation moved.
    let out = server
        .ok(&["patch", "ws", "dev-lead", "--type", "merge", "-p", r#"{"spec":{"operatingMode":"Paused"}}"#])
        .await;
    assert!(out.contains("patched"), "{out}");
    let mode =
        server.ok(&["get", "ws", "dev-lead", "-o", "jsonpath={.spec.operatingMode} {.metadata.generation}"]).await;
    assert_eq!(mode, "Paused 2");
    server.ok(&["patch", "ws", "dev-lead", "--type", "merge", "-p", r#"{"spec":{"operatingMode":"Running"}}"#]).await;
    let mode =
        server.ok(&["get", "ws", "dev-lead", "-o", "jsonpath={.spec.operatingMode} {.metadata.generation}"]).await;
    assert_eq!(mode, "Running 3");
    // JSON patch and the default (strategic, handled as merge) patch.
    server
        .ok(&["patch", "ws", "alpha", "--type", "json", "-p", r#"[{"op":"replace","path":"/spec/tier","value":3}]"#])
        .await;
    server.ok(&["patch", "ws", "alpha", "-p", r#"{"metadata":{"labels":{"extra":"yes"}}}"#]).await;
    let out = server
        .ok(&["get", "ws", "alpha", "-o", "jsonpath={.spec.tier} {.metadata.labels.extra} {.metadata.generation}"])
        .await;
    assert_eq!(out, "3 yes 2", "labels do not bump the generation");

    // Server-side apply: create, then change, with --force-conflicts accepted.
    let ssa = write(
        state.path(),
        "ssa.yaml",
        "apiVersion: molecule.ai/v1alpha1\nkind: Workspace\nmetadata: {name: gamma}\nspec: {tier: 2, env: {ROLE: ssa}}\n",
    );
    let out = server.ok(&["apply", "--server-side", "-f", &ssa]).await;
    assert!(out.contains("workspace.molecule.ai/gamma serverside-applied"), "{out}");
    write(
        state.path(),
        "ssa.yaml",
        "apiVersion: molecule.ai/v1alpha1\nkind: Workspace\nmetadata: {name: gamma}\nspec: {tier: 4, env: {ROLE: ssa}}\n",
    );
    server.ok(&["apply", "--server-side", "--force-conflicts", "-f", &ssa]).await;
    assert_eq!(server.ok(&["get", "ws", "gamma", "-o", "jsonpath={.spec.tier}"]).await, "4");
    // A field the manager applied before and leaves out now is removed; others' fields stay.
    server.ok(&["label", "ws", "gamma", "owner=someone"]).await;
    write(
        state.path(),
        "ssa.yaml",
        "apiVersion: molecule.ai/v1alpha1\nkind: Workspace\nmetadata: {name: gamma}\nspec: {tier: 4}\n",
    );
    server.ok(&["apply", "--server-side", "-f", &ssa]).await;
    let out =
        server.ok(&["get", "ws", "gamma", "-o", "jsonpath={.spec.tier} [{.spec.env}] {.metadata.labels.owner}"]).await;
    assert_eq!(out, "4 [] someone");
    let managers = server
        .ok(&["get", "ws", "gamma", "--show-managed-fields", "-o", "jsonpath={.metadata.managedFields[*].manager}"])
        .await;
    assert_eq!(managers, "kubectl");

    // Delete without finalizers: gone at once.
    let out = server.ok(&["delete", "ws", "beta"]).await;
    assert!(out.contains("workspace.molecule.ai \"beta\" deleted"), "{out}");
    let (ok, _, err) = server.kubectl(&["get", "ws", "beta"]).await;
    assert!(!ok && err.contains("NotFound") && err.contains("\"beta\" not found"), "{err}");

    // With a finalizer: marked deleting and kept until the finalizer goes.
    server
        .ok(&[
            "patch",
            "ws",
            "gamma",
            "--type",
            "merge",
            "-p",
            r#"{"metadata":{"finalizers":["molecule.ai/cleanup"]}}"#,
        ])
        .await;
    server.ok(&["delete", "ws", "gamma", "--wait=false"]).await;
    let ts = server.ok(&["get", "ws", "gamma", "-o", "jsonpath={.metadata.deletionTimestamp}"]).await;
    assert!(ts.ends_with('Z'), "a deleting object carries its deletionTimestamp: {ts:?}");
    server.ok(&["patch", "ws", "gamma", "--type", "merge", "-p", r#"{"metadata":{"finalizers":null}}"#]).await;
    let (ok, _, err) = server.kubectl(&["get", "ws", "gamma"]).await;
    assert!(!ok && err.contains("not found"), "the last finalizer's removal deletes it: {err}");

    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_prints_readable_errors_for_bad_manifests() {
    let state = tempfile::tempdir().unwrap();
    let server = Server::start(sqlite_store(state.path()).await, state.path()).await;
    let bad = |name: &str, spec: &str| {
        write(
            state.path(),
            &format!("{name}.yaml"),
            &format!("apiVersion: molecule.ai/v1alpha1\nkind: Workspace\nmetadata: {{name: {name}}}\nspec: {spec}\n"),
        )
    };
    let cases = [
        (bad("typo", "{teir: 2}"), vec!["typo", "spec.teir", "Unknown field"]),
        (bad("big", "{tier: 9}"), vec!["big", "spec.tier", "less than or equal to 4"]),
        (bad("mode", "{operatingMode: Sleeping}"), vec!["mode", "spec.operatingMode", "Unsupported value", "Paused"]),
        (bad("Upper", "{}"), vec!["metadata.name", "lowercase"]),
    ];
    for (file, wanted) in cases {
        let (ok, out, err) = server.kubectl(&["apply", "-f", &file]).await;
        assert!(!ok, "{file} was accepted: {out}");
        for w in wanted {
            assert!(err.contains(w), "the error for {file} does not mention {w:?}:\n{err}");
        }
        assert!(err.contains("is invalid"), "{err}");
    }
    let (_, list) = server.get_json(WS).await;
    assert_eq!(list["items"], json!([]), "nothing invalid was stored");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_watch_prints_added_and_modified() {
    let state = tempfile::tempdir().unwrap();
    let server = Server::start(sqlite_store(state.path()).await, state.path()).await;
    server.ok(&["apply", "-f", "examples/org/pm.yaml"]).await;
    let mut child = server
        .kubectl_command(&["get", "ws", "-w", "--output-watch-events", "--request-timeout=20s"])
        .spawn()
        .expect("kubectl get -w starts");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    server.ok(&["apply", "-f", "examples/org/qa.yaml"]).await;
    server.ok(&["patch", "ws", "pm", "--type", "merge", "-p", r#"{"spec":{"operatingMode":"Paused"}}"#]).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let _ = child.start_kill();
    let mut out = String::new();
    child.stdout.take().unwrap().read_to_string(&mut out).await.unwrap();
    let _ = child.wait().await;
    assert!(out.lines().any(|l| l.starts_with("ADDED") && l.contains("pm")), "{out}");
    assert!(out.lines().any(|l| l.starts_with("ADDED") && l.contains("qa")), "{out}");
    assert!(out.lines().any(|l| l.starts_with("MODIFIED") && l.contains("pm")), "{out}");
    server.stop().await;
}

/// Objects, uids and resourceVersions survive a restart; a stale update gets 409;
/// a watch from before the history gets 410 Expired; no token, 401.
async fn survives_restart_and_keeps_resource_version_semantics(open: impl AsyncFn() -> DynStore) {
    let state = tempfile::tempdir().unwrap();
    let server = Server::start(open().await, state.path()).await;
    server.ok(&["apply", "-f", "examples/org/"]).await;
    let (_, before) = server.get_json(&format!("{WS}/dev-lead")).await;
    let (_, list_before) = server.get_json(WS).await;
    server.stop().await;

    let server = Server::start_with(
        KubeApi::new(open().await, TOKEN)
            .await
            .unwrap()
            .with_history_limit(2)
            .with_bookmark_interval(Duration::from_millis(200)),
        state.path(),
    )
    .await;
    let (code, after) = server.get_json(&format!("{WS}/dev-lead")).await;
    assert_eq!(code, 200);
    assert_eq!(after, before, "the object, its uid and resourceVersion survive the restart");
    let (_, list_after) = server.get_json(WS).await;
    assert_eq!(list_after["metadata"]["resourceVersion"], list_before["metadata"]["resourceVersion"]);

    // Stale resourceVersion: 409 Conflict, as a Status.
    let http = server.http();
    let mut stale = after.clone();
    stale["spec"]["tier"] = json!(3);
    let fresh = http.put(format!("{}{WS}/dev-lead", server.url)).bearer_auth(TOKEN).json(&stale).send().await.unwrap();
    assert_eq!(fresh.status().as_u16(), 200, "the current resourceVersion is accepted");
    let resp = http.put(format!("{}{WS}/dev-lead", server.url)).bearer_auth(TOKEN).json(&stale).send().await.unwrap();
    assert_eq!(resp.status().as_u16(), 409);
    let status: Value = resp.json().await.unwrap();
    assert_eq!((status["kind"].as_str(), status["reason"].as_str()), (Some("Status"), Some("Conflict")));

    // Three more writes with a history of two: the pre-restart RV is too old.
    for mode in ["Paused", "Running", "Paused"] {
        server
            .ok(&["patch", "ws", "pm", "--type", "merge", "-p", &format!(r#"{{"spec":{{"operatingMode":"{mode}"}}}}"#)])
            .await;
    }
    let old_rv = before["metadata"]["resourceVersion"].as_str().unwrap();
    let resp = http
        .get(format!("{}{WS}?watch=1&resourceVersion={old_rv}&timeoutSeconds=2", server.url))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    let text = resp.text().await.unwrap();
    let event: Value = serde_json::from_str(text.lines().next().unwrap_or("null")).unwrap();
    assert_eq!(event["type"], "ERROR", "{text}");
    assert_eq!((event["object"]["code"].as_i64(), event["object"]["reason"].as_str()), (Some(410), Some("Expired")));

    // A recent RV replays what followed it.
    let (_, pm) = server.get_json(&format!("{WS}/pm")).await;
    let rv: i64 = pm["metadata"]["resourceVersion"].as_str().unwrap().parse().unwrap();
    let resp = http
        .get(format!("{}{WS}?watch=1&resourceVersion={}&timeoutSeconds=1", server.url, rv - 1))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    let text = resp.text().await.unwrap();
    let event: Value = serde_json::from_str(text.lines().next().unwrap_or("null")).unwrap();
    assert_eq!((event["type"].as_str(), event["object"]["metadata"]["name"].as_str()), (Some("MODIFIED"), Some("pm")));

    // Bookmarks when allowed (the interval is 200 ms in this server), and the
    // initial-events stream kube-rs' streaming-list strategy asks for.
    let now = list_after["metadata"]["resourceVersion"].as_str().unwrap().parse::<i64>().unwrap() + 5;
    let text = http
        .get(format!("{}{WS}?watch=1&resourceVersion={now}&allowWatchBookmarks=true&timeoutSeconds=1", server.url))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(text.lines().any(|l| l.contains(r#""type":"BOOKMARK""#)), "{text}");
    let text = http
        .get(format!(
            "{}{WS}?watch=1&sendInitialEvents=true&resourceVersionMatch=NotOlderThan&allowWatchBookmarks=true&timeoutSeconds=1",
            server.url
        ))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let events: Vec<Value> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let added = events.iter().take_while(|e| e["type"] == "ADDED").count();
    assert!(added >= 5, "{text}");
    assert_eq!(events[added]["type"], "BOOKMARK");
    assert_eq!(events[added]["object"]["metadata"]["annotations"]["k8s.io/initial-events-end"], "true");

    let resp = http.get(format!("{}{WS}", server.url)).send().await.unwrap();
    assert_eq!(resp.status().as_u16(), 401);
    let (code, status) = server.get_json("/apis/molecule.ai/v1alpha1/namespaces/default/gadgets").await;
    assert_eq!((code, status["reason"].as_str()), (404, Some("NotFound")));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_objects_survive_restart_with_their_resource_version() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().to_path_buf();
    survives_restart_and_keeps_resource_version_semantics(async || sqlite_store(&path).await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_objects_survive_restart_with_their_resource_version() {
    let Some(db) = support::postgres::fresh_database().await else {
        return;
    };
    let url = db.url.clone();
    survives_restart_and_keeps_resource_version_semantics(async || store::open(&url).await.expect("Postgres")).await;
    drop(db);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kube_rs_lists_watches_patches_status_and_finalizers() {
    use kube::api::{Api, Patch, PatchParams, PostParams};
    use kube::runtime::{WatchStreamExt, watcher};

    let state = tempfile::tempdir().unwrap();
    let server = Server::start(sqlite_store(state.path()).await, state.path()).await;
    server.ok(&["apply", "-f", "examples/org/pm.yaml"]).await;

    let kubeconfig = kube::config::Kubeconfig::read_from(&server.kubeconfig).expect("the kubeconfig reads");
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default()).await.expect("a config");
    let client = kube::Client::try_from(config).expect("a client");
    let api: Api<Workspace> = Api::namespaced(client.clone(), "default");

    let list = api.list(&Default::default()).await.expect("list");
    assert_eq!(list.items.iter().map(|w| w.metadata.name.clone().unwrap()).collect::<Vec<_>>(), ["pm"]);
    let all: Api<Workspace> = Api::all(client);
    assert_eq!(all.list(&Default::default()).await.unwrap().items.len(), 1);

    // The watcher: initial list, then an object created by server-side apply.
    let (seen_tx, mut seen) = tokio::sync::mpsc::unbounded_channel();
    let watch_api = api.clone();
    let watching = tokio::spawn(async move {
        // With a backoff, as the operator's own watchers: without one, once the server is
        // stopped below, the watcher retried in a loop that never yielded, and the test's
        // runtime could not shut down (a hang, under load).
        let mut stream = watcher(watch_api, watcher::Config::default()).default_backoff().boxed();
        while let Some(event) = stream.next().await {
            let _ = seen_tx.send(event.map_err(|e| e.to_string()));
        }
    });
    let applied = json!({"apiVersion": "molecule.ai/v1alpha1", "kind": "Workspace",
        "metadata": {"name": "from-kube-rs"}, "spec": {"tier": 1}});
    api.patch("from-kube-rs", &PatchParams::apply("molecule-test"), &Patch::Apply(&applied))
        .await
        .expect("SSA creates");
    let mut got_apply = false;
    while let Ok(Some(event)) = tokio::time::timeout(Duration::from_secs(10), seen.recv()).await {
        // InitApply when the watcher's first list already had it.
        if let Ok(watcher::Event::Apply(ws) | watcher::Event::InitApply(ws)) = event.as_ref()
            && ws.metadata.name.as_deref() == Some("from-kube-rs")
        {
            got_apply = true;
            break;
        }
    }
    assert!(got_apply, "the watcher saw the applied workspace");

    // Status by server-side apply, forced, as the controller writes it.
    let status = json!({"apiVersion": "molecule.ai/v1alpha1", "kind": "Workspace",
        "status": {"phase": "Running", "observedGeneration": 1, "incarnation": 2}});
    let patched = api
        .patch_status("pm", &PatchParams::apply("molecule-operator").force(), &Patch::Apply(&status))
        .await
        .expect("status SSA");
    let s = patched.status.expect("a status");
    assert_eq!((s.incarnation, s.observed_generation), (2, Some(1)));
    assert_eq!(patched.metadata.generation, Some(1), "status writes never bump the generation");
    // A main-resource write leaves the status alone.
    let mut replaced = api.get("pm").await.unwrap();
    replaced.status = None;
    replaced.spec.tier = Some(3);
    let replaced = api.replace("pm", &PostParams::default(), &replaced).await.expect("replace");
    assert_eq!((replaced.status.map(|s| s.incarnation), replaced.metadata.generation), (Some(2), Some(2)));

    // PUT on /status changes the status only, even when the body says otherwise.
    let mut whole = api.get_status("pm").await.expect("get status");
    whole.spec.tier = Some(1);
    whole.status.as_mut().unwrap().incarnation = 5;
    let after = api.replace_status("pm", &PostParams::default(), &whole).await.expect("replace status");
    assert_eq!((after.status.unwrap().incarnation, after.spec.tier), (5, Some(3)));

    // Events from kube-rs' recorder (create, then a merge patch for the repeat)
    // show in `kubectl describe`.
    use kube::Resource;
    use kube::runtime::events::{Event, EventType, Recorder, Reporter};
    let recorder = Recorder::new(
        kube::Client::try_from(
            kube::Config::from_custom_kubeconfig(
                kube::config::Kubeconfig::read_from(&server.kubeconfig).unwrap(),
                &Default::default(),
            )
            .await
            .unwrap(),
        )
        .unwrap(),
        Reporter { controller: "molecule-operator".into(), instance: None },
    );
    let pm = api.get("pm").await.unwrap();
    let event = Event {
        type_: EventType::Normal,
        reason: "Provisioned".into(),
        note: Some("created container ws-0123456789ab (incarnation 1)".into()),
        action: "Provision".into(),
        secondary: None,
    };
    recorder.publish(&event, &pm.object_ref(&())).await.expect("an event is recorded");
    recorder.publish(&event, &pm.object_ref(&())).await.expect("a repeat patches the series");
    let out = server.ok(&["describe", "ws", "pm"]).await;
    assert!(
        out.contains("Provisioned")
            && out.contains("created container ws-0123456789ab")
            && out.contains("molecule-operator"),
        "{out}"
    );

    // Finalizer add and remove by JSON patch, as kube-runtime's finalizer helper does.
    let add: json_patch::Patch = serde_json::from_value(json!([
        {"op": "test", "path": "/metadata/finalizers", "value": null},
        {"op": "add", "path": "/metadata/finalizers", "value": ["molecule.ai/cleanup"]}]))
    .unwrap();
    api.patch::<()>("pm", &PatchParams::default(), &Patch::Json(add)).await.expect("finalizer added");
    api.delete("pm", &Default::default()).await.expect("delete");
    let deleting = api.get("pm").await.expect("still there while the finalizer holds it");
    assert!(deleting.metadata.deletion_timestamp.is_some());
    let remove: json_patch::Patch = serde_json::from_value(json!([
        {"op": "test", "path": "/metadata/finalizers/0", "value": "molecule.ai/cleanup"},
        {"op": "remove", "path": "/metadata/finalizers/0"}]))
    .unwrap();
    api.patch::<()>("pm", &PatchParams::default(), &Patch::Json(remove)).await.expect("finalizer removed");
    let mut deleted = false;
    while let Ok(Some(event)) = tokio::time::timeout(Duration::from_secs(10), seen.recv()).await {
        if let Ok(watcher::Event::Delete(ws)) = event.as_ref()
            && ws.metadata.name.as_deref() == Some("pm")
        {
            deleted = true;
            break;
        }
    }
    assert!(deleted, "the watcher saw pm go once its finalizer was removed");
    assert!(api.get_opt("pm").await.unwrap().is_none());

    // Leases, for a controller's leader election: create, renew, and a stale renew refused.
    use k8s_openapi::api::coordination::v1::Lease;
    let client = kube::Client::try_from(
        kube::Config::from_custom_kubeconfig(
            kube::config::Kubeconfig::read_from(&server.kubeconfig).unwrap(),
            &Default::default(),
        )
        .await
        .unwrap(),
    )
    .unwrap();
    let leases: Api<Lease> = Api::namespaced(client, "default");
    let lease: Lease = serde_json::from_value(json!({"metadata": {"name": "molecule-operator"},
        "spec": {"holderIdentity": "a", "leaseDurationSeconds": 15}}))
    .unwrap();
    let created = leases.create(&PostParams::default(), &lease).await.expect("a lease is created");
    let mut renewed = created.clone();
    renewed.spec.as_mut().unwrap().holder_identity = Some("b".into());
    let renewed = leases.replace("molecule-operator", &PostParams::default(), &renewed).await.expect("renewed");
    assert_eq!(renewed.spec.unwrap().holder_identity.as_deref(), Some("b"));
    let stale = leases.replace("molecule-operator", &PostParams::default(), &created).await;
    assert!(matches!(stale, Err(kube::Error::Api(ref s)) if s.code == 409), "{stale:?}");
    // kubectl finds them (discovery lists coordination.k8s.io), to see who leads.
    let out = server.ok(&["get", "lease", "molecule-operator", "-o", "jsonpath={.spec.holderIdentity}"]).await;
    assert_eq!(out.trim(), "b");
    assert!(server.ok(&["api-resources", "--api-group=coordination.k8s.io"]).await.contains("leases"));
    // The watcher is still connected: shutting down ends its watch instead of waiting for it.
    server.stop().await;
    watching.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_discovers_and_explains_the_kinds() {
    let state = tempfile::tempdir().unwrap();
    let server = Server::start(sqlite_store(state.path()).await, state.path()).await;
    let out = server.ok(&["api-resources", "--api-group=molecule.ai"]).await;
    let line = out.lines().find(|l| l.starts_with("workspaces")).unwrap_or_else(|| panic!("{out}"));
    for word in ["ws", "molecule.ai/v1alpha1", "true", "Workspace"] {
        assert!(line.split_whitespace().any(|w| w == word), "{word} missing in {line:?}");
    }
    assert!(out.lines().any(|l| l.starts_with("teams")), "{out}");
    assert!(server.ok(&["api-versions"]).await.contains("molecule.ai/v1alpha1"));
    server.ok(&["version"]).await;

    let out = server.ok(&["explain", "ws.spec"]).await;
    assert!(out.contains("tier") && out.contains("operatingMode"), "{out}");

    server.ok(&["apply", "-f", "examples/org/pm.yaml"]).await;
    let out = server.ok(&["get", "ws", "-A"]).await;
    assert!(out.starts_with("NAMESPACE") && out.contains("default") && out.contains("pm"), "{out}");
    let out = server.ok(&["apply", "-f", "examples/org/qa.yaml", "--dry-run=server"]).await;
    assert!(out.contains("qa created (server dry run)"), "{out}");
    let (ok, _, _) = server.kubectl(&["get", "ws", "qa"]).await;
    assert!(!ok, "a dry run stores nothing");
    let generated = write(
        state.path(),
        "generated.yaml",
        "apiVersion: molecule.ai/v1alpha1\nkind: Workspace\nmetadata: {generateName: scratch-}\nspec: {}\n",
    );
    let out = server.ok(&["create", "-f", &generated, "-o", "name"]).await;
    assert!(
        out.trim().starts_with("workspace.molecule.ai/scratch-")
            && out.trim().len() > "workspace.molecule.ai/scratch-".len(),
        "{out}"
    );
    let yaml = server.ok(&["get", "ws", "pm", "-o", "yaml"]).await;
    assert!(yaml.contains("kind: Workspace") && yaml.contains("resourceVersion:"), "{yaml}");
    server.stop().await;
}

/// Numbers, not a check: `cargo test --release --test kubeapi_kubectl -- --ignored --nocapture`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn measure_create_list_and_watch_latency() {
    let state = tempfile::tempdir().unwrap();
    let server = Server::start(sqlite_store(state.path()).await, state.path()).await;
    let http = server.http();
    let mut watch =
        http.get(format!("{}{WS}?watch=1&resourceVersion=0", server.url)).bearer_auth(TOKEN).send().await.unwrap();
    let n = 200;
    let started = std::time::Instant::now();
    for i in 0..n {
        let ws = json!({"apiVersion": "molecule.ai/v1alpha1", "kind": "Workspace",
            "metadata": {"name": format!("w{i}")}, "spec": {"tier": 2, "env": {"I": i.to_string()}}});
        let resp = http.post(format!("{}{WS}", server.url)).bearer_auth(TOKEN).json(&ws).send().await.unwrap();
        assert_eq!(resp.status().as_u16(), 201);
    }
    let created = started.elapsed();
    let mut seen = 0;
    let mut buffer = Vec::new();
    while seen < n {
        let chunk = tokio::time::timeout(Duration::from_secs(10), watch.chunk()).await.unwrap().unwrap().unwrap();
        buffer.extend_from_slice(&chunk);
        seen = buffer.iter().filter(|b| **b == b'\n').count();
    }
    let watched = started.elapsed();
    let t = std::time::Instant::now();
    let (_, list) = server.get_json(WS).await;
    assert_eq!(list["items"].as_array().unwrap().len(), n);
    let listed = t.elapsed();
    let t = std::time::Instant::now();
    server.ok(&["get", "ws"]).await;
    let kubectl_get = t.elapsed();
    eprintln!(
        "{n} creates (HTTPS, one at a time, SQLite): {:.1} ms each; all {n} ADDED events watched after {:?}; \
         list of {n}: {:?}; `kubectl get ws` of {n}: {:?}",
        created.as_secs_f64() * 1000.0 / n as f64,
        watched,
        listed,
        kubectl_get
    );
    server.stop().await;
}
