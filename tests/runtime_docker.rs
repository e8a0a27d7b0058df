//! DockerRuntime and the molecule-agent image against the real Docker daemon.
//! Every test has its own instance id and its guard removes what it made, also on
//! failure. Without Docker they print a notice and pass, except under CI=true (where
//! the tests of the direct write path also fail when volume directories are out of
//! reach, instead of passing without having run).

mod support;

use std::collections::{BTreeMap, HashSet};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use support::proxy::SocketProxy;

use bollard::query_parameters::StopContainerOptionsBuilder;
use molecule::api::{ImagePullPolicy, WorkspaceSpec};
use molecule::model::container::{AGENT_UID, CONFIGS_DIR, ContainerState, TOKEN_FILE, labels};
use molecule::runtime::agent_image::{self, AGENT_IMAGE, VERSION_LABEL};
use molecule::runtime::docker::DockerRuntime;
use molecule::runtime::{Runtime, RuntimeError};
use support::docker::{NO_REGISTRY, TestDocker, collect_until, wait_for};

const TOKEN_PATH: &str = "/configs/.auth_token";

macro_rules! docker_or_return {
    ($test:expr) => {
        match TestDocker::connect($test).await {
            Some(t) => t,
            None => return,
        }
    };
}

fn tier(n: u8) -> WorkspaceSpec {
    WorkspaceSpec { tier: Some(n), ..Default::default() }
}

/// A 43-character token, like the operator's (base64url of 32 bytes).
fn token() -> String {
    format!("{}{}", uuid::Uuid::new_v4().simple(), uuid::Uuid::new_v4().simple())[..43].to_string()
}

async fn write_token(t: &TestDocker, id: &str, token: &str) {
    t.runtime.write_file(id, CONFIGS_DIR, TOKEN_FILE, token.as_bytes(), 0o600).await.expect("write token");
}

async fn wait_for_log(t: &TestDocker, id: &str, needle: &str) {
    wait_for(&format!("{needle:?} in the agent's log"), Duration::from_secs(15), || async {
        t.logs(id).await.contains(needle)
    })
    .await;
}

#[tokio::test]
async fn connect_reports_a_missing_socket_as_unavailable() {
    let err = DockerRuntime::connect_unix("/nonexistent/docker.sock", "x").await.unwrap_err();
    assert!(matches!(err, RuntimeError::Unavailable(_)), "{err:?}");
    assert!(err.to_string().contains("/nonexistent/docker.sock"), "{err}");
}

/// Which way `write_file` is meant to go in a test.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum WritePath {
    /// Straight into the volume's directory (the operator is root on the daemon's host).
    Direct,
    /// Docker's archive API.
    Upload,
}

/// Asserts that every file this runtime wrote so far went the way the test meant:
/// `writes` of them, all by `path`.
fn assert_written_by(t: &TestDocker, path: WritePath, writes: u64) {
    let w = t.runtime.file_writes();
    let (direct, uploaded) = (w.direct.load(Ordering::Relaxed), w.uploaded.load(Ordering::Relaxed));
    let expected = match path {
        WritePath::Direct => (writes, 0),
        WritePath::Upload => (0, writes),
    };
    assert_eq!((direct, uploaded), expected, "(direct, uploaded) writes for a test of the {path:?} path");
}

#[tokio::test]
async fn token_written_before_start_is_owned_by_and_readable_for_the_agent() {
    let t = docker_or_return!("token-before-start");
    token_written_before_start(&t, WritePath::Direct).await;
}

/// The same through Docker's archive API, which is what an operator that cannot reach
/// the volume's directory (not root, or not on the daemon's host) uses.
#[tokio::test]
async fn token_uploaded_before_start_is_owned_by_and_readable_for_the_agent() {
    let mut t = docker_or_return!("token-upload-before-start");
    t.runtime = t.runtime.clone().archive_writes_only();
    token_written_before_start(&t, WritePath::Upload).await;
}

async fn token_written_before_start(t: &TestDocker, path: WritePath) {
    t.agent_image().await;
    let spec = t.spec("tok", tier(2), NO_REGISTRY);

    let started = Instant::now();
    let id = t.runtime.create(&spec).await.unwrap();
    if path == WritePath::Direct && t.reachable_volume_dir(&spec.config_volume).await.is_none() {
        return;
    }
    let token = token();
    write_token(t, &id, &token).await;
    t.runtime.start(&id).await.unwrap();
    eprintln!("MEASURE create+write token+start: {:?}", started.elapsed());

    let file = t.stat(&id, TOKEN_PATH).await.expect("token file exists");
    assert_eq!((file.uid, file.gid, file.mode), (AGENT_UID, AGENT_UID, 0o600));
    assert_eq!(file.content, token.as_bytes());
    let dir = t.stat(&id, CONFIGS_DIR).await.expect("/configs exists");
    assert!(dir.is_dir);
    assert_eq!((dir.uid, dir.gid, dir.mode), (AGENT_UID, AGENT_UID, 0o755));

    assert_eq!(t.runtime.read_file(&id, TOKEN_PATH).await.unwrap(), Some(token.clone().into_bytes()));
    assert_eq!(t.runtime.read_file(&id, "/configs/missing").await.unwrap(), None);
    // The agent (uid 65534) read it: it logs the prefix only.
    wait_for_log(t, &id, &format!("token loaded from /configs/.auth_token (prefix {})", &token[..8])).await;

    // Replacing it in the running container works the same way.
    let rotated = self::token();
    write_token(t, &id, &rotated).await;
    assert_eq!(t.runtime.read_file(&id, TOKEN_PATH).await.unwrap(), Some(rotated.into_bytes()));
    assert!(!t.logs(&id).await.contains(&token));
    assert_written_by(t, path, 2);

    // A container removed meanwhile: unknown, not "no token file".
    t.runtime.remove(&id).await.unwrap();
    let gone = t.runtime.read_file(&id, TOKEN_PATH).await;
    assert!(gone.is_err(), "reading from a removed container is an error, not a missing file: {gone:?}");
}

#[tokio::test]
async fn fresh_root_owned_volume_is_handed_to_the_agent_by_the_archive_upload() {
    let mut t = docker_or_return!("bare-volume");
    t.runtime = t.runtime.clone().archive_writes_only();
    fresh_root_owned_volume_is_handed_to_the_agent(&t, WritePath::Upload).await;
}

#[tokio::test]
async fn fresh_root_owned_volume_is_handed_to_the_agent_by_a_direct_write() {
    let t = docker_or_return!("bare-volume-direct");
    fresh_root_owned_volume_is_handed_to_the_agent(&t, WritePath::Direct).await;
}

async fn fresh_root_owned_volume_is_handed_to_the_agent(t: &TestDocker, path: WritePath) {
    let image = t.bare_agent_image().await;
    let mut spec = t.spec("bare", tier(2), NO_REGISTRY);
    spec.image = image;

    let id = t.runtime.create(&spec).await.unwrap();
    if path == WritePath::Direct && t.reachable_volume_dir(&spec.config_volume).await.is_none() {
        return;
    }
    let before = t.stat(&id, CONFIGS_DIR).await.expect("the mount point exists");
    assert_eq!((before.uid, before.mode), (0, 0o755), "Docker makes a fresh volume's root root-owned");

    let token = token();
    write_token(t, &id, &token).await;
    let dir = t.stat(&id, CONFIGS_DIR).await.unwrap();
    assert_eq!((dir.uid, dir.gid, dir.mode), (AGENT_UID, AGENT_UID, 0o755), "the write re-owns the volume root");
    let file = t.stat(&id, TOKEN_PATH).await.unwrap();
    assert_eq!((file.uid, file.gid, file.mode), (AGENT_UID, AGENT_UID, 0o600));
    assert_written_by(t, path, 1);

    t.runtime.start(&id).await.unwrap();
    wait_for_log(t, &id, &format!("(prefix {})", &token[..8])).await;
}

/// A container owns its volume's content: a symlink it leaves where the token goes
/// must never make the operator (root, on the host) write through it.
#[tokio::test]
async fn a_direct_write_replaces_a_symlink_and_never_follows_it() {
    let t = docker_or_return!("symlink-token");
    t.agent_image().await;
    let spec = t.spec("sym", tier(2), NO_REGISTRY);
    let id = t.runtime.create(&spec).await.unwrap();
    let Some(volume_dir) = t.reachable_volume_dir(&spec.config_volume).await else { return };
    let outside = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(outside.path(), b"host file").unwrap();
    std::os::unix::fs::symlink(outside.path(), volume_dir.join(TOKEN_FILE)).unwrap();

    let token = token();
    write_token(&t, &id, &token).await;
    assert_eq!(std::fs::read(outside.path()).unwrap(), b"host file", "the symlink's target is untouched");
    let meta = std::fs::symlink_metadata(volume_dir.join(TOKEN_FILE)).unwrap();
    assert!(meta.file_type().is_file(), "the symlink was replaced by a regular file");
    let file = t.stat(&id, TOKEN_PATH).await.unwrap();
    assert_eq!((file.uid, file.gid, file.mode, file.content), (AGENT_UID, AGENT_UID, 0o600, token.into_bytes()));
    let leftovers: Vec<_> = std::fs::read_dir(&volume_dir).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(leftovers, vec![std::ffi::OsString::from(TOKEN_FILE)], "no temporary file is left behind");
    assert_written_by(&t, WritePath::Direct, 1);
}

#[tokio::test]
async fn read_only_root_with_tmpfs_runs_and_still_takes_the_token() {
    let t = docker_or_return!("read-only-root");
    t.agent_image().await;
    let spec = t.spec("t1", tier(1), NO_REGISTRY);
    assert!(spec.read_only_root && spec.tmp_tmpfs_bytes == Some(64 << 20), "tier 1 is read-only with a 64 MiB /tmp");

    let id = t.runtime.create(&spec).await.unwrap();
    let token = token();
    write_token(&t, &id, &token).await;
    t.runtime.start(&id).await.unwrap();

    let inspect = t.docker.inspect_container(&id, None).await.unwrap();
    let hc = inspect.host_config.unwrap();
    assert_eq!(hc.readonly_rootfs, Some(true));
    assert_eq!(hc.tmpfs.unwrap()["/tmp"], "rw,noexec,nosuid,size=67108864");
    // The root filesystem refuses writes; only the volume takes them.
    let refused = t.runtime.write_file(&id, "/etc", "x", b"x", 0o600).await.unwrap_err();
    assert!(refused.to_string().contains("read-only"), "{refused}");

    let file = t.stat(&id, TOKEN_PATH).await.unwrap();
    assert_eq!((file.uid, file.mode, file.content.as_slice()), (AGENT_UID, 0o600, token.as_bytes()));
    // The agent image ships /configs owned by the agent, and Docker copies that onto the fresh volume.
    let dir = t.stat(&id, CONFIGS_DIR).await.unwrap();
    assert_eq!((dir.uid, dir.mode), (AGENT_UID, 0o755));
    wait_for_log(&t, &id, &format!("(prefix {})", &token[..8])).await;
    wait_for_log(&t, &id, "registry unreachable").await;
    assert_eq!(t.state(&id).await, "running");
}

#[tokio::test]
async fn create_applies_limits_and_hardening() {
    let t = docker_or_return!("hardening");
    t.agent_image().await;
    let spec = t.spec("hard", tier(2), NO_REGISTRY);
    let id = t.runtime.create(&spec).await.unwrap();

    let c = t.docker.inspect_container(&id, None).await.unwrap();
    let config = c.config.unwrap();
    assert_eq!(config.user.as_deref(), Some("65534:65534"));
    assert_eq!(config.image.as_deref(), Some(AGENT_IMAGE));
    let env = config.env.unwrap();
    assert!(env.contains(&format!("MOLECULE_WORKSPACE_ID={}", spec.env["MOLECULE_WORKSPACE_ID"])), "{env:?}");
    let container_labels = config.labels.unwrap();
    for (k, v) in &spec.labels {
        assert_eq!(container_labels.get(k), Some(v), "label {k}");
    }
    let hc = c.host_config.unwrap();
    assert_eq!(hc.init, Some(true));
    assert_eq!(hc.memory, Some(512 << 20));
    assert_eq!(hc.nano_cpus, Some(1_000_000_000));
    assert_eq!(hc.cap_drop.unwrap(), vec!["ALL"]);
    assert_eq!(hc.security_opt.unwrap(), vec!["no-new-privileges:true"]);
    assert_eq!(hc.network_mode.as_deref(), Some("host"));
    assert_eq!(hc.privileged, Some(false));
    assert_eq!(hc.restart_policy.unwrap().name.map(|n| n.to_string()).as_deref(), Some("unless-stopped"));
    assert_eq!(hc.readonly_rootfs, Some(false));
    let mount = &c.mounts.unwrap()[0];
    assert_eq!(mount.name.as_deref(), Some(spec.config_volume.as_str()));
    assert_eq!(mount.destination.as_deref(), Some(CONFIGS_DIR));

    // create also made the config volume, labelled as ours.
    let volume = t.docker.inspect_volume(&spec.config_volume).await.unwrap();
    assert_eq!(volume.labels.get(labels::INSTANCE), Some(&t.instance));
    assert_eq!(volume.labels.get(labels::UID), spec.labels.get(labels::UID));
}

#[tokio::test]
async fn list_sees_only_this_instance() {
    let a = docker_or_return!("list-a");
    let b = a.other_instance("list-b").await;
    a.agent_image().await;
    let spec_a = a.spec("mine", tier(2), NO_REGISTRY);
    let spec_b = b.spec("theirs", tier(2), NO_REGISTRY);
    let id_a = a.runtime.create(&spec_a).await.unwrap();
    let id_b = b.runtime.create(&spec_b).await.unwrap();

    let listed = a.runtime.list().await.unwrap();
    assert_eq!(listed.len(), 1, "{listed:?}");
    let c = &listed[0];
    assert_eq!((c.id.as_str(), c.name.as_str(), c.image.as_str()), (id_a.as_str(), spec_a.name.as_str(), AGENT_IMAGE));
    assert_eq!(c.state, ContainerState::Created);
    assert_eq!(c.workspace(), Some("default/mine"));
    assert_eq!(c.uid(), spec_a.labels.get(labels::UID).map(String::as_str));
    assert_eq!(c.incarnation(), Some(1));
    assert_eq!(c.spec_hash(), spec_a.labels.get(labels::SPEC_HASH).map(String::as_str));
    let age = chrono::Utc::now() - c.created_at.expect("created_at from the list");
    assert!(age < chrono::Duration::minutes(1), "{age}");
    assert_eq!(c.started_at, None, "list does not inspect");
    assert_eq!(b.runtime.list().await.unwrap().iter().map(|c| c.id.clone()).collect::<Vec<_>>(), vec![id_b.clone()]);

    // Fencing: names are global, but another instance's container is never touched.
    let refused = a.runtime.remove(&spec_b.name).await.unwrap_err();
    assert!(refused.to_string().contains("belongs to operator instance"), "{refused}");
    assert_eq!(a.runtime.inspect(&id_b).await.unwrap(), None);
    assert_eq!(b.runtime.list().await.unwrap().len(), 1);

    // inspect fills started_at once the container ran.
    assert_eq!(a.runtime.inspect(&id_a).await.unwrap().unwrap().started_at, None);
    a.runtime.start(&id_a).await.unwrap();
    let info = a.runtime.inspect(&id_a).await.unwrap().unwrap();
    assert_eq!(info.state, ContainerState::Running);
    assert!(info.started_at.is_some_and(|t| chrono::Utc::now() - t < chrono::Duration::minutes(1)));
}

#[tokio::test]
async fn pause_unpause_start_and_remove_are_idempotent() {
    let t = docker_or_return!("idempotent");
    t.agent_image().await;
    let spec = t.spec("idem", tier(2), NO_REGISTRY);
    let id = t.runtime.create(&spec).await.unwrap();
    assert!(t.runtime.pause(&id).await.is_err(), "a container that is not running cannot be paused");
    t.runtime.start(&id).await.unwrap();
    t.runtime.start(&id).await.unwrap();

    let state = || async { t.runtime.list().await.unwrap()[0].state };
    t.runtime.pause(&id).await.unwrap();
    t.runtime.pause(&id).await.unwrap();
    assert_eq!(state().await, ContainerState::Paused);
    t.runtime.unpause(&id).await.unwrap();
    t.runtime.unpause(&id).await.unwrap();
    assert_eq!(state().await, ContainerState::Running);

    t.runtime.remove(&id).await.unwrap();
    t.runtime.remove(&id).await.unwrap();
    t.runtime.remove("molecule-test-no-such-container").await.unwrap();
    assert!(t.runtime.list().await.unwrap().is_empty());
    // The config volume outlives the container (operatingMode Stopped keeps it).
    assert!(t.runtime.volume_exists(&spec.config_volume).await.unwrap());
}

#[tokio::test]
async fn volumes_are_ensured_and_removed_idempotently() {
    let t = docker_or_return!("volumes");
    let name = format!("{}-vol", t.instance);
    let volume_labels = BTreeMap::from([
        (labels::MANAGED.to_string(), "true".to_string()),
        (labels::INSTANCE.to_string(), t.instance.clone()),
    ]);
    assert!(!t.runtime.volume_exists(&name).await.unwrap());
    t.runtime.ensure_volume(&name, &volume_labels).await.unwrap();
    t.runtime.ensure_volume(&name, &volume_labels).await.unwrap();
    assert!(t.runtime.volume_exists(&name).await.unwrap());
    let volume = t.docker.inspect_volume(&name).await.unwrap();
    assert_eq!(volume.labels.get(labels::INSTANCE), Some(&t.instance));
    t.runtime.remove_volume(&name).await.unwrap();
    t.runtime.remove_volume(&name).await.unwrap();
    assert!(!t.runtime.volume_exists(&name).await.unwrap());
}

#[tokio::test]
async fn images_follow_the_pull_policy() {
    let t = docker_or_return!("images");
    t.agent_image().await;
    let absent = format!("molecule-test-absent-{}:nope", t.instance);
    match t.runtime.ensure_image(&absent, ImagePullPolicy::Never).await {
        Err(RuntimeError::ImageMissing { image }) => assert_eq!(image, absent),
        other => panic!("want ImageMissing, got {other:?}"),
    }
    // No registry is reachable from here: the pull must fail, with the daemon's reason.
    let started = Instant::now();
    match t.runtime.ensure_image(&absent, ImagePullPolicy::IfNotPresent).await {
        Err(RuntimeError::PullFailed { image, message }) => {
            assert_eq!(image, absent);
            assert!(!message.is_empty());
            eprintln!("MEASURE failed pull: {:?} ({message})", started.elapsed());
        }
        other => panic!("want PullFailed, got {other:?}"),
    }
    assert!(matches!(
        t.runtime.ensure_image(AGENT_IMAGE, ImagePullPolicy::Always).await,
        Err(RuntimeError::PullFailed { .. })
    ));
    t.runtime.ensure_image(AGENT_IMAGE, ImagePullPolicy::Never).await.unwrap();
    t.runtime.ensure_image(AGENT_IMAGE, ImagePullPolicy::IfNotPresent).await.unwrap();
}

#[tokio::test]
async fn events_report_lifecycle_of_this_instance_only() {
    let a = docker_or_return!("events-a");
    let b = a.other_instance("events-b").await;
    a.agent_image().await;
    // Subscribed before anything happens; the stream is not polled until later on purpose.
    let mut events = a.runtime.events();
    let spec_a = a.spec("ev", tier(2), NO_REGISTRY);
    let spec_b = b.spec("ev-other", tier(2), NO_REGISTRY);
    let id_b = b.runtime.create(&spec_b).await.unwrap();
    let id_a = a.runtime.create(&spec_a).await.unwrap();
    b.runtime.start(&id_b).await.unwrap();
    a.runtime.start(&id_a).await.unwrap();
    a.runtime.remove(&id_a).await.unwrap();
    b.runtime.remove(&id_b).await.unwrap();

    let seen = collect_until(&mut events, Duration::from_secs(20), |seen: &[molecule::runtime::RuntimeEvent]| {
        seen.iter().any(|e| e.action == "destroy")
    })
    .await;
    let actions: Vec<&str> = seen.iter().map(|e| e.action.as_str()).collect();
    assert!(seen.iter().all(|e| e.container_id == id_a), "only our container's events: {seen:?}");
    assert!(seen.iter().all(|e| e.workspace.as_deref() == Some("default/ev")), "{seen:?}");
    let pos = |a: &str| actions.iter().position(|x| *x == a).unwrap_or_else(|| panic!("no {a} event in {actions:?}"));
    assert!(pos("create") < pos("start") && pos("start") < pos("destroy"), "{actions:?}");
}

#[tokio::test]
async fn events_survive_a_lost_connection_without_losing_events() {
    let _ = tracing_subscriber::fmt().with_test_writer().try_init();
    let t = docker_or_return!("events-reconnect");
    t.agent_image().await;
    let dir = tempfile::tempdir().unwrap();
    let mut proxy = SocketProxy::start(dir.path().join("docker.sock"));
    let socket = proxy.path.display().to_string();
    let through_proxy = DockerRuntime::connect_unix(&socket, &t.instance).await.unwrap();
    let mut events = through_proxy.events();
    let created = |id: String| {
        move |seen: &[molecule::runtime::RuntimeEvent]| {
            seen.iter().any(|e| e.container_id == id && e.action == "create")
        }
    };

    let first = t.runtime.create(&t.spec("before-cut", tier(2), NO_REGISTRY)).await.unwrap();
    let seen = collect_until(&mut events, Duration::from_secs(10), created(first.clone())).await;
    assert!(created(first)(&seen), "{seen:?}");

    proxy.cut();
    let second = t.runtime.create(&t.spec("during-cut", tier(2), NO_REGISTRY)).await.unwrap();
    // While the daemon is unreachable the stream retries with backoff and delivers nothing.
    let during = collect_until(&mut events, Duration::from_millis(1500), |_| false).await;
    assert!(during.is_empty(), "{during:?}");

    proxy.restore();
    let seen = collect_until(&mut events, Duration::from_secs(15), created(second.clone())).await;
    assert!(created(second)(&seen), "the event from the gap is replayed after reconnecting: {seen:?}");
}

#[tokio::test]
async fn agent_image_builds_is_current_and_its_agent_retries_and_stops_fast() {
    let t = docker_or_return!("agent-runs");
    let started = Instant::now();
    t.runtime.build_agent_image().await.unwrap();
    eprintln!("MEASURE agent image build (build_agent_image): {:?}", started.elapsed());
    assert!(!t.runtime.ensure_agent_image().await.unwrap(), "a current image is not rebuilt");
    let image = t.docker.inspect_image(AGENT_IMAGE).await.unwrap();
    let image_labels = image.config.and_then(|c| c.labels).unwrap_or_default();
    assert_eq!(image_labels.get(VERSION_LABEL).map(String::as_str), Some(agent_image::agent_version()));

    let spec = t.spec("runs", tier(2), NO_REGISTRY);
    let started = Instant::now();
    let id = t.runtime.create(&spec).await.unwrap();
    write_token(&t, &id, &token()).await;
    t.runtime.start(&id).await.unwrap();
    eprintln!("MEASURE create+write token+start: {:?}", started.elapsed());

    wait_for_log(&t, &id, "registry unreachable").await;
    // With nothing listening it keeps retrying: still running, never restarted, for 3 s.
    let running_since = Instant::now();
    wait_for("the agent to keep running for 3 s", Duration::from_secs(10), || async {
        let c = t.docker.inspect_container(&id, None).await.unwrap();
        let running = c.state.and_then(|s| s.running) == Some(true);
        assert!(running && c.restart_count == Some(0), "the agent exited: {}", t.logs(&id).await);
        running_since.elapsed() >= Duration::from_secs(3)
    })
    .await;

    let started = Instant::now();
    t.docker.stop_container(&id, Some(StopContainerOptionsBuilder::new().t(10).build())).await.unwrap();
    let stop = started.elapsed();
    eprintln!("MEASURE docker stop: {stop:?}");
    assert!(stop < Duration::from_secs(3), "SIGTERM must end the agent at once, took {stop:?}");
    assert_eq!(t.state(&id).await, "exited");
}

#[tokio::test]
async fn a_stale_agent_image_is_rebuilt() {
    let t = docker_or_return!("stale-image");
    let tag = t.bare_agent_image().await; // no version label: stale
    let docker = &t.docker;
    let stale = docker.inspect_image(&tag).await.unwrap().id.unwrap();
    assert!(agent_image::ensure_agent_image(docker, &tag).await.unwrap(), "a stale image is rebuilt");
    assert!(docker.inspect_image(&stale).await.is_err(), "the replaced image is removed, not left dangling");
    assert!(!agent_image::ensure_agent_image(docker, &tag).await.unwrap(), "then it is current");
    let image = docker.inspect_image(&tag).await.unwrap();
    let image_labels = image.config.and_then(|c| c.labels).unwrap_or_default();
    assert_eq!(image_labels.get(VERSION_LABEL).map(String::as_str), Some(agent_image::agent_version()));
}

/// What the registry stub saw: one request.
#[derive(Clone, Debug)]
struct Seen {
    path: String,
    bearer: Option<String>,
    body: String,
    status: u16,
}

/// A registry on a loopback port: 200 for accepted bearer tokens, 401 otherwise.
struct RegistryStub {
    port: u16,
    accepted: Arc<Mutex<HashSet<String>>>,
    seen: Arc<Mutex<Vec<Seen>>>,
    stop: Arc<AtomicBool>,
}

impl RegistryStub {
    fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let (accepted, seen, stop) = (Arc::default(), Arc::default(), Arc::new(AtomicBool::new(false)));
        let (a, s, st) = (Arc::clone(&accepted), Arc::clone(&seen), Arc::clone(&stop));
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                if st.load(Ordering::SeqCst) {
                    break;
                }
                if let Ok(conn) = conn {
                    let _ = serve(conn, &a, &s);
                }
            }
        });
        Self { port, accepted, seen, stop }
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn accept_only(&self, tokens: &[&str]) {
        *self.accepted.lock().unwrap() = tokens.iter().map(|t| t.to_string()).collect();
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }
}

impl Drop for RegistryStub {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(("127.0.0.1", self.port)); // wakes the accept loop
    }
}

fn serve(conn: TcpStream, accepted: &Mutex<HashSet<String>>, seen: &Mutex<Vec<Seen>>) -> std::io::Result<()> {
    conn.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut reader = BufReader::new(conn);
    let mut request_line = String::new();
    reader.read_line(&mut request_line)?;
    let path = request_line.split_whitespace().nth(1).unwrap_or_default().to_string();
    let (mut bearer, mut length) = (None, 0);
    loop {
        let mut line = String::new();
        reader.read_line(&mut line)?;
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        let (name, value) = line.split_once(':').unwrap_or((line, ""));
        match name.to_ascii_lowercase().as_str() {
            "authorization" => bearer = value.trim().strip_prefix("Bearer ").map(str::to_string),
            "content-length" => length = value.trim().parse().unwrap_or(0),
            _ => {}
        }
    }
    let mut body = vec![0; length];
    reader.read_exact(&mut body)?;
    let body = String::from_utf8_lossy(&body).into_owned();
    let known = path == "/registry/register" || path == "/registry/heartbeat";
    let status = match &bearer {
        _ if !known => 404,
        Some(token) if accepted.lock().unwrap().contains(token) => 200,
        _ => 401,
    };
    seen.lock().unwrap().push(Seen { path, bearer, body, status });
    let mut conn = reader.into_inner();
    write!(conn, "HTTP/1.1 {status} X\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")?;
    conn.flush()
}

#[tokio::test]
async fn agent_registers_heartbeats_and_recovers_from_token_changes_and_401s() {
    let t = docker_or_return!("agent-registry");
    t.agent_image().await;
    let registry = RegistryStub::start();
    let mut spec = t.spec("reg", tier(2), &registry.url());
    // Long enough that picking up a rewritten token file visibly beats the next heartbeat.
    spec.env.insert("MOLECULE_HEARTBEAT_SECONDS".into(), "3".into());
    let uid = spec.env["MOLECULE_WORKSPACE_ID"].clone();
    let (first, second, third) = (token(), token(), token());
    registry.accept_only(&[&first]);

    let id = t.runtime.create(&spec).await.unwrap();
    write_token(&t, &id, &first).await;
    t.runtime.start(&id).await.unwrap();

    let count = |path: &str, token: &str, status: u16| {
        registry
            .seen()
            .iter()
            .filter(|s| s.path == path && s.bearer.as_deref() == Some(token) && s.status == status)
            .count()
    };
    let deadline = Duration::from_secs(20);
    wait_for("register then a heartbeat with the first token", deadline, || async {
        count("/registry/heartbeat", &first, 200) >= 1
    })
    .await;
    let seen = registry.seen();
    assert_eq!(seen[0].path, "/registry/register", "{seen:?}");
    assert_eq!(seen[0].bearer.as_deref(), Some(first.as_str()));
    assert_eq!(seen[0].body, format!("{{\"workspace_id\":\"{uid}\"}}"));

    // A rewritten token file is picked up by content, without waiting for a 401.
    registry.accept_only(&[&first, &second]);
    let before = registry.seen().len();
    write_token(&t, &id, &second).await;
    let picked_up = wait_for("a heartbeat with the second token", deadline, || async {
        count("/registry/heartbeat", &second, 200) >= 1
    })
    .await;
    assert!(picked_up < Duration::from_secs(2), "took {picked_up:?}; the heartbeat interval is 3 s");
    assert!(registry.seen()[before..].iter().all(|s| s.status == 200), "no 401 on a token change");

    // Revoked: the agent gets 401s and keeps retrying (register again) instead of exiting.
    registry.accept_only(&[&third]);
    let before = registry.seen().len();
    wait_for("three 401s in a row", deadline, || async {
        registry.seen()[before..].iter().filter(|s| s.status == 401).count() >= 3
    })
    .await;
    assert!(count("/registry/register", &second, 401) >= 1, "it registers again after a failure");
    assert_eq!(t.state(&id).await, "running");

    // A valid token in the file heals it.
    write_token(&t, &id, &third).await;
    wait_for("register and a heartbeat with the third token", deadline, || async {
        count("/registry/register", &third, 200) >= 1 && count("/registry/heartbeat", &third, 200) >= 1
    })
    .await;

    let logs = t.logs(&id).await;
    eprintln!("agent log:\n{logs}");
    for secret in [&first, &second, &third] {
        assert!(!logs.contains(secret.as_str()), "a token leaked into the agent's log");
        assert!(logs.contains(&secret[..8]), "the log names the token by its prefix");
    }
    assert!(logs.contains("answered 401"), "{logs}");
    let restarts = t.docker.inspect_container(&id, None).await.unwrap().restart_count;
    assert_eq!(restarts, Some(0));
}
