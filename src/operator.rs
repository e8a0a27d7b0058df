//! `up` / `run`: wires sources, the desired store, the runtime, the state store, the
//! registry server and the reconcile loop together, and shuts them down cleanly.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context as _, bail};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::api::effective::Defaults;
use crate::config::OperatorArgs;
use crate::metrics::Metrics;
use crate::reconcile::{self, Context};
use crate::registry::{self, AppState};
use crate::rules::Settings;
use crate::runtime::docker::DockerRuntime;
use crate::runtime::network::{NetworkChoice, agent_endpoint};
use crate::runtime::render::AgentEnv;
use crate::source::Snapshot;
use crate::source::desired::{DesiredSet, merge};
use crate::source::dir::DirSource;
use crate::trigger::Trigger;

/// Where desired state comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SourceSpec {
    Dir(PathBuf),
    /// Workspace/Team custom resources in the cluster the operator runs in (or the one
    /// $KUBECONFIG names); with leader election on a Lease.
    Kubernetes,
    /// Rows of `desired_objects` in the `--database-url` Postgres.
    Postgres,
}

impl std::str::FromStr for SourceSpec {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.split_once(':') {
            Some(("dir", path)) if !path.is_empty() => Ok(Self::Dir(PathBuf::from(path))),
            None if s == "kubernetes" => Ok(Self::Kubernetes),
            None if s == "postgres" => Ok(Self::Postgres),
            _ => Err(format!("unknown source {s:?}; use dir:PATH, postgres or kubernetes")),
        }
    }
}

/// Connects to Docker, retrying with backoff and a clear message until it answers
/// or `shutdown` fires.
async fn connect_docker(instance: &str, shutdown: &CancellationToken) -> anyhow::Result<DockerRuntime> {
    let mut wait = Duration::from_millis(500);
    loop {
        match DockerRuntime::connect(instance).await {
            Ok(d) => return Ok(d),
            Err(e) => {
                tracing::error!(error = %e, retry_in = ?wait, "cannot reach Docker; retrying");
                tokio::select! {
                    _ = shutdown.cancelled() => bail!("stopped while waiting for Docker: {e}"),
                    _ = tokio::time::sleep(wait) => {}
                }
                wait = (wait * 2).min(Duration::from_secs(15));
            }
        }
    }
}

fn prepare_state_dir(state: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(state).with_context(|| format!("cannot create the state directory {}", state.display()))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let _ = std::fs::set_permissions(state, std::fs::Permissions::from_mode(0o700));
    }
    Ok(())
}

/// Holds STATE/lock for the life of the process: a second operator on the same state
/// directory would share its SQLite file, admin token and address file, so it is
/// refused with a clear message instead. The OS drops the lock when the process dies,
/// even by SIGKILL.
fn lock_state_dir(state: &Path) -> anyhow::Result<std::fs::File> {
    let path = state.join("lock");
    use std::os::unix::fs::OpenOptionsExt;
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(&path)
        .with_context(|| format!("cannot open {}", path.display()))?;
    // A lock file made by an older version may be 0644.
    let _ = file.set_permissions(std::os::unix::fs::PermissionsExt::from_mode(0o600));
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => bail!(
            "another operator is already running with --state {} (it holds {}); stop it, or give this one its own --state",
            state.display(),
            path.display()
        ),
        Err(std::fs::TryLockError::Error(e)) => Err(e).with_context(|| format!("cannot lock {}", path.display())),
    }
}

/// Runs the operator until Ctrl-C or SIGTERM.
pub async fn run(args: OperatorArgs, sources: Vec<SourceSpec>) -> anyhow::Result<()> {
    if sources.is_empty() {
        bail!("no source given: `up DIR` or `run --source dir:PATH`");
    }
    for source in &sources {
        if let SourceSpec::Dir(p) = source
            && !p.is_dir()
        {
            bail!("{} is not a directory: point `up` at a directory of Workspace/Team YAML files", p.display());
        }
    }
    let cluster_mode = sources.contains(&SourceSpec::Kubernetes);
    if cluster_mode && args.kube_api.is_some() {
        bail!(
            "--kube-api serves the Kubernetes API in local mode; with --source kubernetes the cluster's API is the source"
        );
    }
    let pods = args.runtime_kind(cluster_mode) == crate::config::RuntimeKind::Kubernetes;
    if pods && !cluster_mode && args.kube_api.is_none() {
        bail!(
            "--runtime kubernetes runs workspaces as Pods: give --kube-api ADDR (the embedded API and its local node \
             run them as Docker containers) or --source kubernetes (a cluster runs them)"
        );
    }
    let db = args.database().map_err(anyhow::Error::msg)?;
    let pg_source = match (sources.contains(&SourceSpec::Postgres), db.postgres()) {
        (false, _) => None,
        (true, Some(url)) => Some(url.to_string()),
        (true, None) => bail!("--source postgres reads the database named by --database-url postgres://..."),
    };
    let shutdown = CancellationToken::new();
    spawn_signal_handler(shutdown.clone());
    let health = Arc::new(crate::health::Health::default());

    let instance = args.instance_id();
    prepare_state_dir(&args.state)?;
    let _lock = lock_state_dir(&args.state)?;
    // Shown with its password hidden (DatabaseUrl's Display).
    let store = crate::store::open_url(&db).await.with_context(|| format!("cannot open the state store at {db}"))?;
    // The registry's heartbeats are coalesced in memory and written in one transaction
    // every 100 ms (store::heartbeats explains why the rules stay correct).
    // Heartbeats it could not write are noted where the heartbeat rule reads them.
    let lost_heartbeats = Arc::new(crate::store::LostHeartbeats::default());
    let heartbeats = Arc::new(crate::store::heartbeats::Coalescing::new(store.clone(), lost_heartbeats.clone()));
    let heartbeat_flusher =
        heartbeats.spawn_flusher(crate::store::heartbeats::DEFAULT_FLUSH_INTERVAL, shutdown.clone());
    let store = store.with_heartbeats(heartbeats.clone());
    let admin_token = registry::load_or_create_admin_token(&args.state)
        .with_context(|| format!("cannot read or create the admin token in {}", args.state.display()))?;
    // Failed admin-token guesses count here, on the admin API and the Kubernetes API alike.
    let limiter = Arc::new(crate::registry::limit::FailureLimiter::default());
    // Bound before anything waits on Docker: an unusable address or TLS pair stops
    // the start with its error at once.
    let bound = match args.kube_api {
        Some(addr) => {
            let bound = crate::kubeapi::bind(store.clone(), &admin_token, addr, &args.state)
                .await
                .context("cannot serve the Kubernetes API (--kube-api)")?;
            bound.api().set_limiter(limiter.clone());
            Some(bound)
        }
        None => None,
    };

    // Docker: the runtime itself, or, for Pods, the local node's engine. A cluster's
    // Pods need none (its nodes may run containerd).
    let docker = match pods && cluster_mode {
        true => None,
        false => Some(connect_docker(&instance, &shutdown).await?),
    };
    if let Some(docker) = &docker
        && args.image_template == crate::runtime::agent_image::AGENT_IMAGE
    {
        match docker.ensure_agent_image().await {
            Ok(true) => tracing::info!(image = crate::runtime::agent_image::AGENT_IMAGE, "built the agent image"),
            Ok(false) => {}
            Err(e) => {
                tracing::error!(error = %e, "could not build the agent image; workspaces using it will fail until it exists")
            }
        }
    }
    // The workspaces' network (runtime::network): the operator's own bridge unless
    // --network says otherwise. Pods are on their cluster's network (the local node's
    // bridge in local mode, found below).
    let mut network_choice = args.network_choice();
    let mut network = match (&network_choice, &docker) {
        (_, None) => None,
        _ if pods => None,
        (NetworkChoice::Host, _) => None,
        (NetworkChoice::Own(name), Some(docker)) => Some(docker.ensure_own_network(name).await?),
        (NetworkChoice::Named(name), Some(docker)) => Some(docker.find_network(name).await?.with_context(|| {
            format!("there is no Docker network {name} (--network): create it, or leave --network out to use the operator's own")
        })?),
    };

    // Sources -> desired store.
    let defaults = Defaults {
        image_template: args.image_template.clone(),
        network: match pods {
            // A Pod uses the node's network only when a workspace asks for `host`.
            true => "pod".to_string(),
            false => network_choice.name().to_string(),
        },
        allow_privileged: args.allow_privileged,
        heartbeat_interval: args.heartbeat_interval(),
        ..Defaults::default()
    };
    let (desired_tx, desired_rx) = watch::channel(Arc::new(DesiredSet::default()));
    let (snap_tx, snap_rx) = mpsc::channel::<Snapshot>(16);
    let mut source_names = Vec::new();
    for source in &sources {
        match source {
            SourceSpec::Dir(path) => {
                let src = DirSource::new(path);
                source_names.push(src.source_name());
                src.watch(snap_tx.clone());
            }
            SourceSpec::Kubernetes => source_names.push(crate::cluster::SOURCE_NAME.to_string()),
            SourceSpec::Postgres => source_names.push(crate::source::postgres::SOURCE_NAME.to_string()),
        }
    }
    // Local mode speaking the Kubernetes API: objects applied with kubectl live in the
    // state store, and the same kube-rs controller as in a cluster reads them back
    // through this API (the operator is its own client).
    let kube_api = match bound {
        Some(bound) => {
            tracing::info!(url = %bound.url, kubeconfig = %bound.kubeconfig.display(), "serving the Kubernetes API");
            source_names.push(crate::cluster::SOURCE_NAME.to_string());
            let kubeconfig = bound.kubeconfig.clone();
            let api = bound.api().clone();
            let stop = shutdown.clone();
            crate::health::essential(&health, "kube-api", &shutdown, async move {
                bound.serve(async move { stop.cancelled().await }).await.context("the Kubernetes API stopped serving")
            });
            if pods {
                let client =
                    crate::cluster::client(Some(&kubeconfig)).await.context("cannot reach our own Kubernetes API")?;
                let config = crate::node::NodeConfig { instance: instance.clone(), dir: args.state.join("node") };
                let node = crate::node::start(client, config, shutdown.clone())
                    .await
                    .context("cannot start the local node")?;
                // Its Pods reach the registry on the node's bridge, as agents reach it on
                // the operator's own network in Docker mode.
                let name = crate::node::network_name(&instance);
                network = Some(crate::runtime::network::WorkspaceNetwork {
                    name: name.clone(),
                    gateway: node.gateway().parse().ok(),
                });
                network_choice = NetworkChoice::Named(name);
                api.set_pod_logs(node.clone());
                api.set_pod_usage(node);
            }
            Some(kubeconfig)
        }
        None => None,
    };
    let pg_source = match pg_source {
        Some(url) => {
            let src = crate::source::postgres::PostgresSource::connect(&url)
                .await
                .context("cannot connect to the desired-state database (--source postgres)")?;
            src.clone().watch(snap_tx.clone(), shutdown.clone());
            Some(src)
        }
        None => None,
    };
    crate::health::essential(&health, "desired-store", &shutdown, async move {
        desired_store(snap_rx, source_names, defaults, desired_tx).await;
        Ok(())
    });

    // In a cluster the key lives in a Secret of the operator's namespace (made once by
    // whichever replica comes first): a Pod's files go with the Pod.
    let keyring = match (cluster_mode, crate::secrets::Keyring::key_from_env()) {
        (true, None) => {
            let client =
                crate::cluster::client(args.kubeconfig.as_deref()).await.context("cannot reach the Kubernetes API")?;
            let namespace = own_namespace(&client);
            crate::cluster::secrets_key::load_or_create(client, &namespace, &args.secrets_key_secret)
                .await
                .context("cannot load the secrets key")?
        }
        _ => crate::secrets::Keyring::load(&args.state).context("cannot load the secrets key")?,
    };
    let keyring = Arc::new(keyring);
    let metrics = Arc::new(Metrics::new());
    let (trigger, trigger_rx) = Trigger::new();
    let mut state = AppState::new(store.clone(), trigger.clone(), desired_rx.clone(), admin_token, metrics.clone());
    state.health = health.clone();
    state.limiter = limiter;
    state.keyring = Some(keyring.clone());
    state.lost_heartbeats = lost_heartbeats;
    state.shutdown = shutdown.clone();
    // Every finished reconcile: status writers and `events -w` subscribe.
    let reports = tokio::sync::broadcast::channel(1024).0;
    state.reports = Some(reports.clone());
    let listener = tokio::net::TcpListener::bind(args.listen).await.with_context(|| {
        format!("cannot listen on {} (is another operator running there? use --listen)", args.listen)
    })?;
    let addr = listener.local_addr()?;
    let url = registry::write_address(&args.state, addr)?;
    let server = {
        let router = registry::router(state.clone());
        let stop = shutdown.clone();
        crate::health::essential(&health, "registry", &shutdown, async move {
            registry::serve(listener, router, async move { stop.cancelled().await })
                .await
                .context("the registry and admin API stopped serving")
        })
    };
    // Agents on a bridge network reach the registry, and only the registry, on its
    // gateway. A cluster's Pods reach it through a Service, which only the person
    // installing the operator knows the name of.
    if pods && cluster_mode && args.registry_url.is_none() {
        bail!(
            "--runtime kubernetes in a cluster: agents reach the registry through a Service in front of the \
             operator; pass --registry-url http://SERVICE.NAMESPACE:PORT (deploy/ names it)"
        );
    }
    let endpoint = agent_endpoint(&network_choice, network.as_ref(), args.registry_url.as_deref(), addr)
        .map_err(anyhow::Error::msg)?;
    // The agents-only listener: on a bridge's gateway, or where --agent-listen says
    // (in a cluster, the port the registry's Service targets).
    let agent_server = match endpoint.listen.or(args.agent_listen) {
        Some(at) => {
            let listener = tokio::net::TcpListener::bind(at).await.with_context(|| match endpoint.listen {
                Some(_) => format!(
                    "cannot listen for the workspaces' agents on {at}, the gateway of Docker network {}: pass \
                     --registry-url URL if they reach the operator another way",
                    network_choice.name()
                ),
                None => format!("cannot listen for the workspaces' agents on {at} (--agent-listen)"),
            })?;
            match endpoint.listen {
                Some(_) => {
                    tracing::info!(url = %endpoint.url, network = network_choice.name(), "serving the registry to the workspaces' network")
                }
                None => tracing::info!(%at, url = %endpoint.url, "serving the registry to the agents (--agent-listen)"),
            }
            let router = registry::agent_router(state.clone());
            let stop = shutdown.clone();
            Some(tokio::spawn(
                async move { registry::serve(listener, router, async move { stop.cancelled().await }).await },
            ))
        }
        None => None,
    };

    // What runs the workspaces.
    let runtime: Arc<dyn crate::runtime::Runtime> = match (pods, &docker) {
        (false, Some(docker)) => Arc::new(docker.clone()),
        _ => {
            // Pods: through the embedded API in local mode, else the cluster's.
            let client = crate::cluster::client(kube_api.as_deref().or(args.kubeconfig.as_deref()))
                .await
                .context("cannot reach the Kubernetes API")?;
            Arc::new(crate::runtime::kubernetes::KubeRuntime::new(client, &instance))
        }
    };
    let _ = state.runtime.set(runtime.clone());
    let settings = Settings {
        heartbeat_interval: args.heartbeat_interval(),
        heartbeat_ttl: (args.heartbeat_interval() * args.heartbeat_misses.max(2)).max(Duration::from_secs(10)),
        restart_budget: args.restart_budget.max(0),
        restart_backoff: Duration::from_secs(args.restart_backoff_seconds),
        freezes: runtime.freezes(),
    };
    let agent = AgentEnv { registry_url: endpoint.url.clone(), heartbeat_seconds: args.heartbeat_interval().as_secs() };
    // With Postgres, replicas of this instance share the database: only the holder of
    // the lease reconciles, through a store the database fences by epoch.
    let lease_unconfirmed = Arc::new(AtomicBool::new(false));
    let reconcile_store: crate::store::DynStore = match db.postgres() {
        // The leader's fenced store shares the heartbeat buffer: its stale-token
        // revokes flush the registry's pending heartbeats first.
        Some(url) => {
            let ttl = Duration::from_secs(args.lease_seconds.max(2));
            let fenced = lead_with_postgres_lease(url, &instance, ttl, lease_unconfirmed.clone(), &shutdown).await?;
            fenced.with_heartbeats(Arc::new(heartbeats.sharing(fenced.clone())))
        }
        None => store,
    };
    let mut ctx =
        Context::new(instance.clone(), runtime, reconcile_store, desired_rx.clone(), settings, agent, metrics);
    ctx.reports = reports;
    ctx.pools = Arc::new(crate::reconcile::pools::Pools { status: state.pools.clone(), ..Default::default() });
    ctx.keyring = Some(keyring);
    ctx.lost_heartbeats = state.lost_heartbeats.clone();
    let limiter = state.limiter.clone();
    ctx.tokens_issued = Some(Arc::new(move |hash: &str| limiter.vouch(hash, std::time::Instant::now())));
    // While no operator ran (down, restarting, or a standby before it took the lease)
    // agents' heartbeats could not be recorded either: their silence counts from now,
    // so an operator restart after a long downtime restarts no healthy agent.
    ctx.lost_heartbeats.note(chrono::Utc::now());
    ctx.lease_unconfirmed = lease_unconfirmed;
    ctx.health = health.clone();
    ctx.full_resync = Duration::from_secs(args.full_resync_seconds.max(args.resync_seconds).max(1));
    // In a cluster, envFrom reads Kubernetes Secrets. The local API of `--kube-api`
    // stores Secrets too (for Pods), but local mode's envFrom does not read them:
    // there, secrets are set with `secret set`.
    let mut secrets_feed = None;
    if cluster_mode {
        let (objects, feed) = crate::cluster::secrets::reflector();
        ctx.secret_objects = Some(Arc::new(objects));
        secrets_feed = Some(feed);
    }
    let ctx = Arc::new(ctx);
    // Usage (CPU, memory) per workspace, read beside the loop (observe/usage.rs).
    if args.usage_seconds > 0 {
        tokio::spawn(crate::observe::usage::sample(
            ctx.runtime.clone(),
            ctx.containers.clone(),
            state.usage.clone(),
            ctx.metrics.clone(),
            Duration::from_secs(args.usage_seconds),
            shutdown.clone(),
        ));
    }
    if let Some(src) = pg_source {
        src.write_status(ctx.reports.subscribe(), ctx.store.clone(), health.clone(), shutdown.clone());
    }

    // Kubernetes: one more source, driven by the kube-rs controller, which writes
    // status and events back. In a cluster only the Lease holder acts.
    if cluster_mode {
        let client =
            crate::cluster::client(args.kubeconfig.as_deref()).await.context("cannot reach the Kubernetes API")?;
        let namespace = own_namespace(&client);
        let identity = std::env::var("POD_NAME").unwrap_or_else(|_| instance.clone());
        tracing::info!(%namespace, %identity, "waiting for leadership");
        let leadership = crate::cluster::wait_for_leadership(
            client.clone(),
            crate::cluster::leader::LeaseConfig::new(
                namespace,
                identity.clone(),
                Duration::from_secs(args.lease_seconds.max(3)),
            ),
            shutdown.clone(),
        )
        .await?;
        tracing::info!("leading: reconciling");
        {
            let (lost, stop) = (leadership.lost.clone(), shutdown.clone());
            tokio::spawn(async move {
                lost.cancelled().await;
                tracing::error!("lost the leader Lease: stopping so a restart rejoins as a follower");
                stop.cancel();
            });
        }
        let wiring = cluster_wiring(&snap_tx, &desired_rx, &trigger, &ctx, secrets_feed.take());
        spawn_cluster(client, identity, wiring, &shutdown);
    }
    if let Some(kubeconfig) = kube_api {
        let client = crate::cluster::client(Some(&kubeconfig)).await.context("cannot reach our own Kubernetes API")?;
        let wiring = cluster_wiring(&snap_tx, &desired_rx, &trigger, &ctx, None);
        spawn_cluster(client, instance.clone(), wiring, &shutdown);
    }
    drop(snap_tx);
    {
        let mut rx = desired_rx.clone();
        let state = state.clone();
        tokio::spawn(async move {
            while !rx.borrow_and_update().complete {
                if rx.changed().await.is_err() {
                    return;
                }
            }
            state.set_ready(true);
        });
    }
    tracing::info!(%instance, %url, state = %args.state.display(), "operator running");
    if let Some(tty) = args.progress_view() {
        let (store, reports) = (state.store.clone(), ctx.reports.subscribe());
        let view =
            crate::cli::progress::show(store, desired_rx.clone(), reports, tty, args.log_file(), shutdown.clone());
        tokio::spawn(view);
    }
    reconcile::run(
        ctx,
        trigger_rx,
        Duration::from_secs(args.resync_seconds.max(1)),
        args.concurrency.max(1),
        shutdown.clone(),
    )
    .await;
    let _ = server.await;
    if let Some(agent_server) = agent_server {
        let _ = agent_server.await;
    }
    // The last heartbeats the server answered.
    let _ = heartbeat_flusher.await;
    if let Err(e) = heartbeats.flush().await {
        tracing::warn!(error = %e, "could not write the last heartbeats");
    }
    let _ = registry::remove_address(&args.state);
    // The own network goes with the last workspace. Not with Postgres: replicas of this
    // instance may share it (one with no containers yet would lose it under its feet).
    if let (NetworkChoice::Own(name), Some(docker)) = (&network_choice, &docker)
        && !db.is_postgres()
    {
        match docker.remove_own_network_if_unused(name).await {
            Ok(true) => {
                tracing::info!(network = %name, "removed the workspaces' network: no workspace container is left")
            }
            Ok(false) => {}
            Err(e) => tracing::warn!(network = %name, error = %e, "could not remove the workspaces' network"),
        }
    }
    if let Some(why) = health.fatal() {
        bail!("the operator stopped because an essential task failed: {why}");
    }
    tracing::info!("operator stopped");
    Ok(())
}

/// Waits until this process holds the instance's lease in Postgres, keeps renewing
/// it, and returns a store fenced with its epoch. Losing the lease stops the process
/// (a deposed leader's writes are refused by the database meanwhile).
///
/// The database being unreachable is not losing the lease: past the TTL without a
/// renewal, `unconfirmed` is set (reconciles pause) and renewal goes on. Once the
/// database answers, the lease is taken back if it is still ours, i.e. no other
/// replica took it meanwhile (then holder and epoch are unchanged, the fence stays
/// valid) and reconciling resumes; if another replica took it, the process stops as
/// before. A single replica thus rides out a database outage of any length instead
/// of exiting.
async fn lead_with_postgres_lease(
    url: &str,
    instance: &str,
    ttl: Duration,
    unconfirmed: Arc<AtomicBool>,
    shutdown: &CancellationToken,
) -> anyhow::Result<crate::store::DynStore> {
    use crate::store::lease::Lease;
    let holder = format!("{}-{}", std::process::id(), &crate::store::token::generate()[..8]);
    let lease = Lease::connect(url, instance, &holder, ttl).await.context("cannot reach the lease table")?;
    // No call to the database may hang past the point where its answer still matters.
    let bounded = ttl / 3;
    let mut announced = false;
    let (epoch, sent) = loop {
        let sent = tokio::time::Instant::now();
        match tokio::time::timeout(bounded, lease.try_acquire()).await {
            Ok(Ok(Some(epoch))) => break (epoch, sent),
            Ok(Ok(None)) if !announced => {
                tracing::info!(%instance, "another replica leads; following (serving the API, not reconciling)");
                announced = true;
            }
            Ok(Ok(None)) => {}
            Ok(Err(e @ crate::store::StoreError::OtherInstance(_))) => bail!("{e}"),
            Ok(Err(e)) => tracing::warn!(error = %e, "cannot read the lease; retrying"),
            Err(_) => tracing::warn!("the database did not answer the lease query in time; retrying"),
        }
        tokio::select! {
            _ = shutdown.cancelled() => bail!("stopped while following"),
            _ = tokio::time::sleep(ttl / 3) => {}
        }
    };
    tracing::info!(%instance, epoch, "leading: reconciling (fencing epoch {epoch})");
    let store: crate::store::DynStore =
        Arc::new(crate::store::postgres::PostgresStore::connect_fenced(url, Some(&lease.fence(epoch))).await?);
    // Until when this replica may act, judged on its own clock as client-go does: the
    // database set the lease's expiry at or after the moment the last successful
    // request was sent, so `sent + ttl` is never later than the real expiry; a margin
    // keeps clear of it. Nothing here compares against the database's clock.
    let margin = (ttl / 5).max(Duration::from_millis(100));
    let (confirmed, until) = watch::channel(sent + ttl - margin);
    tokio::spawn(lease_watchdog(until, Arc::clone(&unconfirmed)));
    let stop = shutdown.clone();
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = stop.cancelled() => {
                    let _ = tokio::time::timeout(bounded, lease.release(epoch)).await;
                    return;
                }
                _ = tokio::time::sleep(ttl / 3) => {}
            }
            let sent = tokio::time::Instant::now();
            let renewed = match tokio::time::timeout(bounded, renew_or_retake(&lease, epoch)).await {
                Ok(Ok(true)) => Ok(()),
                Ok(Ok(false)) => {
                    tracing::error!(epoch, "lost the lease to another replica: stopping");
                    stop.cancel();
                    return;
                }
                Ok(Err(e)) => Err(e.to_string()),
                Err(_) => Err(format!("no answer within {bounded:?}")),
            };
            match renewed {
                Ok(()) => {
                    confirmed.send_replace(sent + ttl - margin);
                    if unconfirmed.swap(false, Ordering::AcqRel) {
                        tracing::info!(epoch, "the lease is confirmed again: reconciling");
                    }
                }
                Err(e) => tracing::warn!(error = %e, "lease renewal failed; retrying"),
            }
        }
    });
    Ok(store)
}

/// Renews the lease; if it expired meanwhile (the database was unreachable past the
/// TTL), takes it back, which succeeds only if nobody took it over (same epoch). False
/// when another replica holds it now.
async fn renew_or_retake(lease: &crate::store::lease::Lease, epoch: i64) -> crate::store::StoreResult<bool> {
    if lease.renew(epoch).await? {
        return Ok(true);
    }
    match lease.try_acquire().await? {
        Some(e) if e == epoch => Ok(true),
        Some(e) => {
            let _ = lease.release(e).await; // taken back under a new epoch our fence lacks
            Ok(false)
        }
        None => Ok(false),
    }
}

/// Sets `unconfirmed` (reconciles stop) the moment the confirmed lease time passes
/// without a renewal, however long the renewal itself hangs; the renewal loop clears
/// it when the database answers again.
async fn lease_watchdog(mut until: watch::Receiver<tokio::time::Instant>, unconfirmed: Arc<AtomicBool>) {
    loop {
        let deadline = *until.borrow_and_update();
        tokio::select! {
            _ = tokio::time::sleep_until(deadline) => {
                let extended = *until.borrow() > deadline;
                if !extended && !unconfirmed.swap(true, Ordering::AcqRel) {
                    tracing::error!("the lease could not be renewed in time: not reconciling until the database answers");
                }
                if until.changed().await.is_err() {
                    return;
                }
            }
            changed = until.changed() => if changed.is_err() { return },
        }
    }
}

/// The operator's own namespace in a cluster (its Lease and secrets key live there):
/// POD_NAMESPACE (the Deployment sets it), else the kubeconfig's.
fn own_namespace(client: &kube::Client) -> String {
    std::env::var("POD_NAMESPACE").unwrap_or_else(|_| client.default_namespace().to_string())
}

/// What the cluster controller needs from the rest of the operator.
fn cluster_wiring(
    snapshots: &mpsc::Sender<Snapshot>,
    desired: &watch::Receiver<Arc<DesiredSet>>,
    trigger: &Trigger,
    ctx: &Arc<Context>,
    secrets: Option<crate::cluster::secrets::SecretsWriter>,
) -> crate::cluster::Wiring {
    crate::cluster::Wiring {
        snapshots: snapshots.clone(),
        desired: desired.clone(),
        trigger: trigger.clone(),
        reports: ctx.reports.clone(),
        secrets,
        store: Some(ctx.store.clone()),
        pools: Some(ctx.pools.clone()),
    }
}

/// Runs the Kubernetes source and controller against `client` until shutdown.
fn spawn_cluster(client: kube::Client, identity: String, wiring: crate::cluster::Wiring, shutdown: &CancellationToken) {
    let options = crate::cluster::Options { identity, ..Default::default() };
    let stop = shutdown.clone();
    tokio::spawn(async move {
        if let Err(e) = crate::cluster::run(client, options, wiring, stop.clone()).await {
            tracing::error!(error = %e, "the Kubernetes controller stopped; shutting down");
            stop.cancel();
        }
    });
}

/// Merges every source's latest snapshot into the desired set. The set is complete
/// once each source has delivered at least one snapshot.
async fn desired_store(
    mut rx: mpsc::Receiver<Snapshot>,
    order: Vec<String>,
    defaults: Defaults,
    tx: watch::Sender<Arc<DesiredSet>>,
) {
    let mut latest: Vec<Option<Snapshot>> = vec![None; order.len()];
    while let Some(snap) = rx.recv().await {
        for e in &snap.errors {
            tracing::error!(source = %snap.source, "{e}");
        }
        if let Some(i) = order.iter().position(|n| *n == snap.source) {
            latest[i] = Some(snap);
        }
        let snaps: Vec<Snapshot> = latest.iter().flatten().cloned().collect();
        let previous = tx.borrow().clone();
        let mut set = merge(&snaps, &defaults, &previous);
        set.complete = latest.iter().all(Option::is_some);
        for (key, w) in &set.workspaces {
            if let Err(errors) = &w.spec {
                tracing::warn!(workspace = %key, "invalid spec: {}", errors.join("; "));
            }
        }
        tx.send_replace(Arc::new(set));
    }
}

fn spawn_signal_handler(shutdown: CancellationToken) {
    tokio::spawn(async move {
        let ctrl_c = tokio::signal::ctrl_c();
        #[cfg(unix)]
        {
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("SIGTERM handler");
            tokio::select! {
                _ = ctrl_c => {}
                _ = term.recv() => {}
            }
        }
        #[cfg(not(unix))]
        let _ = ctrl_c.await;
        tracing::info!("shutting down");
        shutdown.cancel();
    });
}
