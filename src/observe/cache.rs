//! The container cache: this instance's containers as the runtime last reported them,
//! kept current by its events, so that observing one workspace reads memory instead
//! of listing every container (which made a resync of n workspaces O(n²)).
//!
//! - One full listing at start, on every resync and after any failure (a lost event
//!   stream, a failed read) fills it; until a full listing that *started after* the
//!   failure has succeeded, the cache is **unknown** and every read answers `None`,
//!   which the rules treat as "unknown", never as "no containers": nothing is revoked,
//!   removed or provisioned on it.
//! - Each burst of lifecycle events re-reads just the containers it names (one
//!   `list_ids` call), before the events are passed on to the queue: a reconcile an
//!   event triggers sees what the event changed.
//! - A reconcile that created, removed, paused or unpaused containers re-reads its
//!   workspace's containers (`list_labeled`) before it looks again (read-your-writes).
//!
//! Reads race each other (a full listing, an event refresh and a reconcile's refresh
//! may overlap). Each read takes a ticket from one counter *before* it asks the runtime,
//! and per container id the answer of the latest-started read wins, including "gone"
//! (a tombstone, or the last full listing's ticket for ids it did not return): an
//! older answer that arrives late never resurrects a removed container or undoes a
//! newer state. Every change made to a container produces an event whose refresh
//! starts after the change, so the cache converges to the truth after every change.
//!
//! The bookkeeping (`begin`, `apply_full`, `apply_partial`, `mark_unknown`, the reads)
//! is pure and unit-tested here; the IO wrappers (`relist`, `refresh_ids`,
//! `refresh_workspace`) and `feed` are exercised against the real Docker daemon by the
//! integration tests.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use futures::{FutureExt, StreamExt};
use smallvec::SmallVec;
use tokio::sync::{Notify, mpsc};
use tokio_util::sync::CancellationToken;

use super::settle::{self, Checked, Settling};
use crate::compact::Interner;
use crate::model::container::{ContainerInfo, ContainerState, labels};
use crate::runtime::{Runtime, RuntimeError, Watched};

/// A read's place in time: taken before the runtime is asked.
pub type Ticket = u64;

#[derive(Default)]
pub struct ContainerCache {
    seq: AtomicU64,
    state: Mutex<State>,
    /// Warm-pool members claimed by workspaces (container id → workspace key): their
    /// labels name no workspace, and Docker cannot relabel them, so their events are
    /// routed to the workspace through this.
    adopted: Mutex<HashMap<Box<str>, Box<str>>>,
    /// Woken when the cache becomes unknown (the feeder then re-lists, with backoff).
    unknown: Notify,
}

#[derive(Default)]
struct State {
    /// False until the first full listing, and from a failure until a full listing
    /// started after it succeeds.
    known: bool,
    /// Whether it has ever been known (a return from unknown then asks for a resync).
    was_known: bool,
    /// Ticket of the last failure; a full listing must have started after it.
    failed_at: Ticket,
    why_unknown: String,
    /// Ticket of the last applied full listing: the floor for ids it did not return.
    full_at: Ticket,
    /// Boxed: a map's empty slots then cost 24 bytes each, not an entry's 140.
    containers: HashMap<Arc<str>, Box<Entry>>,
    /// Removed ids and the ticket of the read that saw them gone (cleared by the next
    /// full listing, whose ticket then serves as the floor).
    gone: HashMap<Box<str>, Ticket>,
    by_workspace: HashMap<Arc<str>, Ids>,
    by_uid: HashMap<Arc<str>, Ids>,
    /// Image names, each kept once (a fleet runs a handful of images).
    images: Interner<str>,
}

/// Container ids, sorted, each once: nearly always one (a workspace's container), kept
/// inline. The id's text is shared with the container's entry.
type Ids = SmallVec<[Arc<str>; 1]>;

fn add_id(ids: &mut Ids, id: &Arc<str>) {
    if let Err(at) = ids.binary_search_by(|x| (**x).cmp(id)) {
        ids.insert(at, id.clone());
    }
}

/// The same text as an `Arc` already in `map`'s keys, or a new one.
fn shared<V>(map: &HashMap<Arc<str>, V>, text: &str) -> Arc<str> {
    map.get_key_value(text).map_or_else(|| Arc::from(text), |(k, _)| k.clone())
}

struct Entry {
    kept: CachedContainer,
    seen_at: Ticket,
}

/// One container as the cache keeps it: what the rules read, in few allocations. As
/// `ContainerInfo`s, with every label in a map of its own, 10,000 containers took
/// 21 MB; this way about a third of that (bench/scale). Reads rebuild the
/// `ContainerInfo`.
#[derive(PartialEq)]
struct CachedContainer {
    name: Box<str>,
    image: Arc<str>,
    state: ContainerState,
    created_at: Option<DateTime<Utc>>,
    started_at: Option<DateTime<Utc>>,
    /// The workspace and uid labels, shared with the indexes' keys.
    workspace: Option<Arc<str>>,
    uid: Option<Arc<str>>,
    /// The operator's other labels (`ai.molecule.*`; nothing reads any other), packed.
    labels: Packed,
    /// What the runtime says beyond the state (Kubernetes Pods only; see ContainerInfo).
    extra: Option<Box<RuntimeDetail>>,
}

/// The rarely set part of a `ContainerInfo`, boxed so most containers pay 8 bytes.
#[derive(Clone, PartialEq)]
struct RuntimeDetail {
    detail: Option<Box<str>>,
    node: Option<Box<str>>,
    restarts: u32,
    /// Read after an out-of-band change (a listing does not show it: kept across them).
    applied: Option<crate::model::container::AppliedConfig>,
}

/// `ai.molecule.` label pairs in one allocation: for each, the key without that prefix
/// and the value, each preceded by its length (LEB128).
#[derive(PartialEq)]
struct Packed(Box<[u8]>);

const PREFIX: &str = "ai.molecule.";

impl Packed {
    fn new<'a>(pairs: impl Iterator<Item = (&'a str, &'a str)>) -> Self {
        let mut buf = Vec::new();
        for (k, v) in pairs {
            for part in [k, v] {
                let mut n = part.len();
                loop {
                    let byte = (n & 0x7f) as u8;
                    n >>= 7;
                    buf.push(if n == 0 { byte } else { byte | 0x80 });
                    if n == 0 {
                        break;
                    }
                }
                buf.extend_from_slice(part.as_bytes());
            }
        }
        Self(buf.into_boxed_slice())
    }

    /// The (short key, value) pairs.
    fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        let mut rest: &[u8] = &self.0;
        let mut next = move || -> Option<&str> {
            let (mut n, mut shift) = (0usize, 0);
            loop {
                let (&byte, tail) = rest.split_first()?;
                rest = tail;
                n |= usize::from(byte & 0x7f) << shift;
                shift += 7;
                if byte & 0x80 == 0 {
                    break;
                }
            }
            let (text, tail) = rest.split_at_checked(n)?;
            rest = tail;
            // Only ever built from &str parts, whole.
            std::str::from_utf8(text).ok()
        };
        std::iter::from_fn(move || Some((next()?, next()?)))
    }
}

impl CachedContainer {
    fn applied(&self) -> Option<&crate::model::container::AppliedConfig> {
        self.extra.as_ref()?.applied.as_ref()
    }

    fn set_applied(&mut self, applied: Option<crate::model::container::AppliedConfig>) {
        let extra = self
            .extra
            .get_or_insert_with(|| Box::new(RuntimeDetail { detail: None, node: None, restarts: 0, applied: None }));
        extra.applied = applied;
    }

    fn label(&self, key: &str) -> Option<&str> {
        match key {
            labels::WORKSPACE => self.workspace.as_deref(),
            labels::UID => self.uid.as_deref(),
            _ => {
                let short = key.strip_prefix(PREFIX)?;
                self.labels.iter().find(|(k, _)| *k == short).map(|(_, v)| v)
            }
        }
    }

    fn info(&self, id: &str) -> ContainerInfo {
        let mut labels: BTreeMap<String, String> =
            self.labels.iter().map(|(k, v)| (format!("{PREFIX}{k}"), v.to_string())).collect();
        for (k, v) in [(labels::WORKSPACE, &self.workspace), (labels::UID, &self.uid)] {
            if let Some(v) = v {
                labels.insert(k.to_string(), v.to_string());
            }
        }
        ContainerInfo {
            id: id.to_string(),
            name: self.name.to_string(),
            image: self.image.to_string(),
            state: self.state,
            labels,
            created_at: self.created_at,
            started_at: self.started_at,
            detail: self.extra.as_ref().and_then(|e| e.detail.as_deref().map(str::to_string)),
            node: self.extra.as_ref().and_then(|e| e.node.as_deref().map(str::to_string)),
            restarts: self.extra.as_ref().map_or(0, |e| e.restarts),
            applied: self.extra.as_ref().and_then(|e| e.applied.clone()),
        }
    }
}

/// Which containers a partial read covered: those it did not return are gone.
#[derive(Clone, Copy, Debug)]
pub enum Covered<'a> {
    Ids(&'a [String]),
    /// Every container labelled `key=value`.
    Label(&'a str, &'a str),
}

/// What a full listing changed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Applied {
    /// Workspace keys (from the labels) whose containers appeared, vanished or changed.
    pub changed: BTreeSet<String>,
    /// The cache was known before, became unknown, and is known again: whatever was
    /// missed meanwhile is worth a look everywhere.
    pub recovered: bool,
}

impl State {
    /// What the cache keeps of `info`, its texts shared with what it holds already.
    fn keep(&mut self, info: &ContainerInfo) -> CachedContainer {
        let image = self.images.get(&info.image, || Arc::from(info.image.as_str()));
        CachedContainer {
            name: info.name.as_str().into(),
            image,
            state: info.state,
            created_at: info.created_at,
            started_at: info.started_at,
            workspace: info.workspace().map(|w| shared(&self.by_workspace, w)),
            uid: info.uid().map(|u| shared(&self.by_uid, u)),
            labels: Packed::new(info.labels.iter().filter_map(|(k, v)| {
                let short = k.strip_prefix(PREFIX)?;
                (k != labels::WORKSPACE && k != labels::UID).then_some((short, v.as_str()))
            })),
            extra: (info.detail.is_some() || info.node.is_some() || info.restarts > 0 || info.applied.is_some()).then(
                || {
                    Box::new(RuntimeDetail {
                        detail: info.detail.as_deref().map(Into::into),
                        node: info.node.as_deref().map(Into::into),
                        restarts: info.restarts,
                        applied: info.applied.clone(),
                    })
                },
            ),
        }
    }

    fn index(&mut self, id: &Arc<str>, kept: &CachedContainer) {
        if let Some(w) = &kept.workspace {
            add_id(self.by_workspace.entry(w.clone()).or_default(), id);
        }
        if let Some(u) = &kept.uid {
            add_id(self.by_uid.entry(u.clone()).or_default(), id);
        }
    }

    fn unindex(&mut self, id: &str, kept: &CachedContainer) {
        fn drop_id(map: &mut HashMap<Arc<str>, Ids>, k: Option<&Arc<str>>, id: &str) {
            if let Some(k) = k
                && let Some(ids) = map.get_mut(&**k)
            {
                ids.retain(|x| &**x != id);
                if ids.is_empty() {
                    map.remove(&**k);
                }
            }
        }
        drop_id(&mut self.by_workspace, kept.workspace.as_ref(), id);
        drop_id(&mut self.by_uid, kept.uid.as_ref(), id);
    }

    /// Stores what a read started at `t` saw of one container; true if that changed
    /// anything.
    fn upsert(&mut self, t: Ticket, info: &ContainerInfo, changed: &mut BTreeSet<String>) {
        let id = info.id.as_str();
        let floor = match self.containers.get(id) {
            Some(e) => e.seen_at,
            None => self.gone.get(id).copied().unwrap_or(self.full_at),
        };
        if t <= floor {
            return; // an older answer than the one already applied
        }
        self.gone.remove(id);
        let mut kept = self.keep(info);
        // A listing does not show what an inspect read after an out-of-band change.
        if let Some(applied) = self.containers.get(id).and_then(|e| e.kept.applied()).filter(|_| info.applied.is_none())
        {
            kept.set_applied(Some(applied.clone()));
        }
        match self.containers.get_mut(id) {
            Some(e) if e.kept == kept => e.seen_at = t,
            Some(_) => {
                let (id, old) = self.containers.remove_entry(id).expect("present");
                self.unindex(&id, &old.kept);
                changed.extend(old.kept.workspace.as_deref().map(str::to_string));
                self.insert(t, id, kept, changed);
            }
            None => self.insert(t, Arc::from(id), kept, changed),
        }
    }

    fn insert(&mut self, t: Ticket, id: Arc<str>, kept: CachedContainer, changed: &mut BTreeSet<String>) {
        changed.extend(kept.workspace.as_deref().map(str::to_string));
        self.index(&id, &kept);
        self.containers.insert(id, Box::new(Entry { kept, seen_at: t }));
    }

    /// A read started at `t` did not see container `id`.
    fn remove(&mut self, t: Ticket, id: &str, changed: &mut BTreeSet<String>) {
        let Some(e) = self.containers.get(id) else { return };
        if t <= e.seen_at {
            return;
        }
        let (id, old) = self.containers.remove_entry(id).expect("present");
        self.unindex(&id, &old.kept);
        changed.extend(old.kept.workspace.as_deref().map(str::to_string));
        self.gone.insert((*id).into(), t);
    }

    fn ids_in(&self, scope: Covered<'_>) -> Vec<String> {
        let of = |ids: Option<&Ids>| ids.into_iter().flatten().map(|id| id.to_string()).collect();
        match scope {
            Covered::Ids(ids) => ids.to_vec(),
            Covered::Label(k, v) if k == labels::WORKSPACE => of(self.by_workspace.get(v)),
            Covered::Label(k, v) if k == labels::UID => of(self.by_uid.get(v)),
            Covered::Label(k, v) => self
                .containers
                .iter()
                .filter(|(_, e)| e.kept.label(k) == Some(v))
                .map(|(id, _)| id.to_string())
                .collect(),
        }
    }

    fn get(&self, ids: Option<&Ids>) -> impl Iterator<Item = ContainerInfo> {
        ids.into_iter().flatten().filter_map(|id| self.containers.get(id).map(|e| e.kept.info(id)))
    }
}

impl ContainerCache {
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // The state stays consistent under a panic elsewhere (every method finishes its
        // update before it could panic), so a poisoned lock is still usable.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Takes the ticket for a read that is about to start.
    pub fn begin(&self) -> Ticket {
        self.seq.fetch_add(1, Ordering::SeqCst) + 1
    }

    /// Applies a full listing (every container of this instance) read from ticket `t`.
    pub fn apply_full(&self, t: Ticket, all: Vec<ContainerInfo>) -> Applied {
        let mut st = self.lock();
        let mut changed = BTreeSet::new();
        let listed: HashSet<&str> = all.iter().map(|c| c.id.as_str()).collect();
        for info in &all {
            st.upsert(t, info, &mut changed);
        }
        let missing: Vec<Arc<str>> = st.containers.keys().filter(|id| !listed.contains(&***id)).cloned().collect();
        for id in missing {
            st.remove(t, &id, &mut changed);
        }
        if t > st.full_at {
            st.full_at = t;
            st.gone.retain(|_, at| *at > t);
        }
        let mut recovered = false;
        if t > st.failed_at && !st.known {
            st.known = true;
            recovered = st.was_known;
            st.was_known = true;
            st.why_unknown.clear();
        }
        Applied { changed, recovered }
    }

    /// Applies a partial read from ticket `t` covering `scope`; returns the workspace
    /// keys whose containers changed.
    pub fn apply_partial(&self, t: Ticket, scope: Covered<'_>, found: Vec<ContainerInfo>) -> BTreeSet<String> {
        let mut st = self.lock();
        let mut changed = BTreeSet::new();
        let covered = st.ids_in(scope);
        let found_ids: HashSet<&str> = found.iter().map(|c| c.id.as_str()).collect();
        for info in &found {
            st.upsert(t, info, &mut changed);
        }
        for id in covered.iter().filter(|id| !found_ids.contains(id.as_str())) {
            st.remove(t, id, &mut changed);
        }
        if let Covered::Ids(ids) = scope {
            // Ids the cache never had and the read did not find: remember they are gone,
            // so that an older answer arriving later cannot bring them back.
            let unseen: Vec<&String> = ids
                .iter()
                .filter(|id| !found_ids.contains(id.as_str()) && !st.containers.contains_key(id.as_str()))
                .collect();
            for id in unseen {
                let at = st.gone.entry(id.as_str().into()).or_insert(t);
                *at = (*at).max(t);
            }
        }
        changed
    }

    /// The runtime failed (a read, or the event stream): unknown until a full listing
    /// that starts after this succeeds.
    pub fn mark_unknown(&self, why: &str) {
        let t = self.begin();
        {
            let mut st = self.lock();
            st.failed_at = st.failed_at.max(t);
            if st.known {
                tracing::warn!(error = why, "container cache is unknown until Docker can be listed again");
            }
            st.known = false;
            st.why_unknown = why.to_string();
        }
        self.unknown.notify_one();
    }

    pub fn is_known(&self) -> bool {
        self.lock().known
    }

    /// Why it is unknown (empty while known).
    pub fn why_unknown(&self) -> String {
        self.lock().why_unknown.clone()
    }

    /// The containers of one workspace: labelled with its key, or with its uid. None
    /// when unknown.
    pub fn containers_of(&self, key: &str, uid: Option<&str>) -> Option<Vec<ContainerInfo>> {
        let st = self.lock();
        if !st.known {
            return None;
        }
        let mut out: Vec<ContainerInfo> = st.get(st.by_workspace.get(key)).collect();
        if let Some(uid) = uid {
            out.extend(st.get(st.by_uid.get(uid)).filter(|c| c.workspace() != Some(key)));
        }
        Some(out)
    }

    /// The state of container `id` as cached: None when the cache is unknown, Some(None)
    /// when it is not there.
    pub fn state_of(&self, id: &str) -> Option<Option<ContainerState>> {
        let st = self.lock();
        st.known.then(|| st.containers.get(id).map(|e| e.kept.state))
    }

    /// Records what container `id` runs with, read after an out-of-band change; true
    /// when that changed what the cache held. The workspace it belongs to, if cached.
    pub fn set_applied(&self, id: &str, applied: crate::model::container::AppliedConfig) -> Option<String> {
        let mut st = self.lock();
        let e = st.containers.get_mut(id)?;
        if e.kept.applied() == Some(&applied) {
            return None;
        }
        e.kept.set_applied(Some(applied));
        e.kept.workspace.as_deref().map(str::to_string)
    }

    /// The workspace container `id` belongs to, if it is cached (or was claimed).
    pub fn workspace_of(&self, id: &str) -> Option<String> {
        let labelled = self.lock().containers.get(id).and_then(|e| e.kept.workspace.as_deref().map(str::to_string));
        labelled.or_else(|| self.adopted.lock().ok()?.get(id).map(|k| k.to_string()))
    }

    /// Routes the events of claimed warm-pool member `id` to workspace `key`.
    pub fn adopt(&self, id: &str, key: &str) {
        if let Ok(mut a) = self.adopted.lock() {
            a.insert(id.into(), key.into());
        }
    }

    /// This instance's containers that carry label `key`, whatever its value. None when
    /// unknown.
    pub fn labelled_any(&self, key: &str) -> Option<Vec<ContainerInfo>> {
        let st = self.lock();
        st.known.then(|| {
            st.containers.iter().filter(|(_, e)| e.kept.label(key).is_some()).map(|(id, e)| e.kept.info(id)).collect()
        })
    }

    /// This instance's containers labelled `key=value` (e.g. a pool's members). None
    /// when unknown.
    pub fn labelled(&self, key: &str, value: &str) -> Option<Vec<ContainerInfo>> {
        let st = self.lock();
        if !st.known {
            return None;
        }
        Some(
            st.containers
                .iter()
                .filter(|(_, e)| e.kept.label(key) == Some(value))
                .map(|(id, e)| e.kept.info(id))
                .collect(),
        )
    }

    /// Containers labelled with this uid. None when unknown.
    pub fn containers_of_uid(&self, uid: &str) -> Option<Vec<ContainerInfo>> {
        let st = self.lock();
        st.known.then(|| st.get(st.by_uid.get(uid)).collect())
    }

    /// The containers that run (or are paused) and belong to a workspace: what the
    /// usage sampler reads. None when unknown.
    pub fn live(&self) -> Option<Vec<ContainerInfo>> {
        let st = self.lock();
        st.known.then(|| {
            st.containers
                .iter()
                .filter(|(_, e)| {
                    e.kept.workspace.is_some()
                        && matches!(e.kept.state, ContainerState::Running | ContainerState::Paused)
                })
                .map(|(id, e)| e.kept.info(id))
                .collect()
        })
    }

    /// Every workspace key a container is labelled with. None when unknown.
    pub fn workspace_keys(&self) -> Option<Vec<String>> {
        let st = self.lock();
        st.known.then(|| st.by_workspace.keys().map(|k| k.to_string()).collect())
    }

    pub fn len(&self) -> usize {
        self.lock().containers.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    // ---- IO ----

    /// Lists every container and applies it. On failure the cache is unknown.
    pub async fn relist(&self, runtime: &dyn Runtime) -> Result<Applied, RuntimeError> {
        let t = self.begin();
        match runtime.list().await {
            Ok(all) => Ok(self.apply_full(t, all)),
            Err(e) => {
                self.mark_unknown(&e.to_string());
                Err(e)
            }
        }
    }

    /// Re-reads the named containers. On failure the cache is unknown.
    pub async fn refresh_ids(&self, runtime: &dyn Runtime, ids: &[String]) -> Result<BTreeSet<String>, RuntimeError> {
        let t = self.begin();
        match runtime.list_ids(ids).await {
            Ok(found) => Ok(self.apply_partial(t, Covered::Ids(ids), found)),
            Err(e) => {
                self.mark_unknown(&e.to_string());
                Err(e)
            }
        }
    }

    /// Re-reads one workspace's containers (by its key label and its uid label), after
    /// the reconciler changed them. On failure the cache is unknown.
    pub async fn refresh_workspace(
        &self,
        runtime: &dyn Runtime,
        key: &str,
        uid: Option<&str>,
    ) -> Result<(), RuntimeError> {
        let t = self.begin();
        let result = async {
            let by_key = runtime.list_labeled(labels::WORKSPACE, key).await?;
            let by_uid = match uid {
                Some(uid) => Some(runtime.list_labeled(labels::UID, uid).await?),
                None => None,
            };
            Ok::<_, RuntimeError>((by_key, by_uid))
        }
        .await;
        match result {
            Ok((by_key, by_uid)) => {
                self.apply_partial(t, Covered::Label(labels::WORKSPACE, key), by_key);
                if let (Some(uid), Some(found)) = (uid, by_uid) {
                    self.apply_partial(t, Covered::Label(labels::UID, uid), found);
                }
                Ok(())
            }
            Err(e) => {
                self.mark_unknown(&e.to_string());
                Err(e)
            }
        }
    }
}

/// What the feeder tells the reconcile queue.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CacheNews {
    /// This workspace's containers changed (an event, or a difference a listing found).
    Changed { key: String, action: String },
    /// The cache is known again after an outage: look at everything.
    Recovered,
    /// Every event of this instance's containers as the runtime reported it (lifecycle
    /// or not: the token memo watches copies into containers and execs in them).
    Seen(crate::runtime::RuntimeEvent),
}

const RELIST_BACKOFF_MIN: Duration = Duration::from_millis(500);
const RELIST_BACKOFF_MAX: Duration = Duration::from_secs(5);
/// Most events refreshed with one read.
const BURST: usize = 512;

/// Keeps `cache` current from the runtime's events until `shutdown`, and passes each
/// lifecycle event on to the queue (`out`) only after the cache reflects it. Lists
/// everything at start and whenever the cache becomes unknown (with backoff until
/// that works).
pub async fn feed(
    cache: std::sync::Arc<ContainerCache>,
    runtime: std::sync::Arc<dyn Runtime>,
    out: mpsc::UnboundedSender<CacheNews>,
    shutdown: CancellationToken,
) {
    let mut watch = runtime.watch();
    let mut backoff = RELIST_BACKOFF_MIN;
    let mut relist_at = Some(tokio::time::Instant::now());
    let mut settling = Settling::default();
    loop {
        let sleep = async {
            match relist_at {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        let settle = async {
            match settling.next_due() {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = cache.unknown.notified() => {
                relist_at.get_or_insert_with(|| tokio::time::Instant::now() + backoff);
            }
            _ = sleep => {
                match cache.relist(runtime.as_ref()).await {
                    Ok(applied) => {
                        settling.clear();
                        relist_at = None;
                        backoff = RELIST_BACKOFF_MIN;
                        if applied.recovered {
                            tracing::info!("Docker can be listed again; looking at every workspace");
                            let _ = out.send(CacheNews::Recovered);
                        }
                        for key in applied.changed {
                            let _ = out.send(CacheNews::Changed { key, action: "relisted".into() });
                        }
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, retry_in = ?backoff, "listing containers failed; nothing will be revoked or removed until it works");
                        relist_at = Some(tokio::time::Instant::now() + backoff);
                        backoff = (backoff * 2).min(RELIST_BACKOFF_MAX);
                    }
                }
            }
            _ = settle => {
                let ids = settling.due(tokio::time::Instant::now());
                match cache.refresh_ids(runtime.as_ref(), &ids).await {
                    Ok(changed) => {
                        let now = tokio::time::Instant::now();
                        for id in &ids {
                            check_settled(&cache, &mut settling, id, now);
                        }
                        for key in changed {
                            let _ = out.send(CacheNews::Changed { key, action: "settled".into() });
                        }
                    }
                    Err(e) => {
                        // The cache is unknown now; the full listing that follows repairs it.
                        settling.clear();
                        tracing::warn!(error = %e, "re-reading containers whose events the listing did not show failed");
                    }
                }
            }
            item = watch.next() => {
                let Some(item) = item else {
                    cache.mark_unknown("the runtime's event stream ended");
                    return;
                };
                let mut burst = vec![item];
                while burst.len() < BURST {
                    match watch.next().now_or_never() {
                        Some(Some(item)) => burst.push(item),
                        _ => break,
                    }
                }
                let mut ids: Vec<String> = Vec::new();
                for item in &burst {
                    match item {
                        Watched::Lost(why) => cache.mark_unknown(why),
                        Watched::Event(ev) if ev.is_lifecycle() && !ids.contains(&ev.container_id) => {
                            ids.push(ev.container_id.clone());
                        }
                        Watched::Event(_) => {}
                    }
                }
                if !ids.is_empty()
                    && let Err(e) = cache.refresh_ids(runtime.as_ref(), &ids).await
                {
                    tracing::warn!(error = %e, "re-reading containers named by events failed");
                }
                let now = tokio::time::Instant::now();
                for item in &burst {
                    if let Watched::Event(ev) = item
                        && ev.is_lifecycle()
                    {
                        settling.saw(&ev.container_id, &ev.action, now);
                    }
                }
                for id in &ids {
                    check_settled(&cache, &mut settling, id, now);
                }
                read_applied(&cache, runtime.as_ref(), &burst).await;
                for item in burst {
                    if let Watched::Event(ev) = item {
                        let _ = out.send(CacheNews::Seen(ev.clone()));
                        // Network events name a container, not its workspace.
                        let key = ev.workspace.clone().or_else(|| cache.workspace_of(&ev.container_id));
                        if ev.is_lifecycle()
                            && let Some(key) = key
                        {
                            let _ = out.send(CacheNews::Changed { key, action: ev.action });
                        }
                    }
                }
            }
        }
    }
}

/// After a change made behind the operator's back (`docker update`, a network connect
/// or disconnect), reads what each named container of this instance runs with now.
async fn read_applied(cache: &ContainerCache, runtime: &dyn Runtime, burst: &[Watched]) {
    let mut ids: Vec<&str> = burst
        .iter()
        .filter_map(|w| match w {
            Watched::Event(ev) if ev.changes_settings() => Some(ev.container_id.as_str()),
            _ => None,
        })
        .collect();
    ids.sort_unstable();
    ids.dedup();
    for id in ids.into_iter().filter(|id| cache.workspace_of(id).is_some()) {
        match runtime.applied_config(id).await {
            Ok(Some(applied)) => {
                cache.set_applied(id, applied);
            }
            Ok(None) => {}
            Err(e) => tracing::warn!(container = id, error = %e, "reading a container changed out of band failed"),
        }
    }
}

/// Whether the cache shows what the last event of `id` promised; when it does not,
/// the id stays in `settling` to be read again (see settle.rs).
fn check_settled(cache: &ContainerCache, settling: &mut Settling, id: &str, now: tokio::time::Instant) {
    let Some(state) = cache.state_of(id) else {
        settling.clear(); // unknown: the full listing that follows repairs everything
        return;
    };
    if let Checked::GaveUp(action) = settling.checked(id, state, now) {
        tracing::warn!(container = id, %action, after = ?settle::GIVE_UP, ?state, "Docker's listing still does not show an event; the periodic resync will look again");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(id: &str, ws: &str, uid: &str, state: ContainerState) -> ContainerInfo {
        ContainerInfo {
            id: id.into(),
            name: format!("n-{id}"),
            image: "img".into(),
            state,
            labels: [(labels::WORKSPACE.to_string(), ws.to_string()), (labels::UID.to_string(), uid.to_string())]
                .into(),
            created_at: None,
            started_at: None,
            ..Default::default()
        }
    }
    use ContainerState::{Exited, Running};

    fn ids(v: Option<Vec<ContainerInfo>>) -> Option<Vec<String>> {
        v.map(|v| v.into_iter().map(|c| c.id).collect())
    }

    #[test]
    fn a_container_reads_back_as_listed_with_the_operators_labels_only() {
        let mut listed = c("x", "default/a", "u1", Running);
        listed.created_at = Some(Utc::now());
        let long = "v".repeat(300); // a length that takes two bytes to write
        for (k, v) in [
            (labels::INCARNATION, "7"),
            (labels::SPEC_HASH, "0123456789abcdef"),
            (labels::TEAM, ""),
            ("ai.molecule.future", long.as_str()),
            ("org.opencontainers.image.title", "from the image"),
        ] {
            listed.labels.insert(k.into(), v.into());
        }
        let cache = ContainerCache::new();
        cache.apply_full(cache.begin(), vec![listed.clone()]);
        let read = cache.containers_of("default/a", None).unwrap().remove(0);
        listed.labels.remove("org.opencontainers.image.title");
        assert_eq!(read, listed);
        assert_eq!(read.incarnation(), Some(7));
        let t = cache.begin();
        assert!(cache.apply_partial(t, Covered::Label("ai.molecule.future", &long), vec![read]).is_empty());
        assert_eq!(cache.len(), 1, "a scan by another label finds it, unchanged");
    }

    #[test]
    fn unknown_until_the_first_full_listing_and_never_empty_meanwhile() {
        let cache = ContainerCache::new();
        assert_eq!(cache.containers_of("default/a", Some("u1")), None);
        assert_eq!(cache.workspace_keys(), None);
        let t = cache.begin();
        cache.apply_partial(t, Covered::Ids(&["x".into()]), vec![c("x", "default/a", "u1", Running)]);
        assert_eq!(cache.containers_of("default/a", Some("u1")), None, "a partial read does not make it known");
        let t = cache.begin();
        let applied = cache.apply_full(t, vec![c("x", "default/a", "u1", Running)]);
        assert!(!applied.recovered, "the first listing is not a recovery");
        assert_eq!(ids(cache.containers_of("default/a", Some("u1"))), Some(vec!["x".into()]));
        assert_eq!(ids(cache.containers_of("default/b", None)), Some(vec![]), "known and absent is empty");
    }

    #[test]
    fn a_failure_makes_it_unknown_until_a_listing_started_after_it_succeeds() {
        let cache = ContainerCache::new();
        let t = cache.begin();
        cache.apply_full(t, vec![c("x", "default/a", "u1", Running)]);
        let before_failure = cache.begin();
        cache.mark_unknown("Docker is unreachable");
        assert_eq!(cache.containers_of("default/a", Some("u1")), None);
        assert_eq!(cache.why_unknown(), "Docker is unreachable");
        // A listing that started before the failure proves nothing about after it.
        assert!(!cache.apply_full(before_failure, vec![c("x", "default/a", "u1", Running)]).recovered);
        assert_eq!(cache.containers_of("default/a", Some("u1")), None);
        let t = cache.begin();
        let applied = cache.apply_full(t, vec![]);
        assert!(applied.recovered && cache.is_known());
        assert_eq!(applied.changed, BTreeSet::from(["default/a".to_string()]), "x is gone");
        assert_eq!(ids(cache.containers_of("default/a", Some("u1"))), Some(vec![]));
    }

    #[test]
    fn the_latest_started_read_wins_per_container() {
        let cache = ContainerCache::new();
        let t0 = cache.begin();
        cache.apply_full(t0, vec![c("x", "default/a", "u1", Running)]);
        // A slow full listing starts, then an event refresh sees x destroyed.
        let slow = cache.begin();
        let fresh = cache.begin();
        let changed = cache.apply_partial(fresh, Covered::Ids(&["x".into()]), vec![]);
        assert_eq!(changed, BTreeSet::from(["default/a".to_string()]));
        // The slow listing (x still there) lands late: x stays gone.
        cache.apply_full(slow, vec![c("x", "default/a", "u1", Running)]);
        assert_eq!(ids(cache.containers_of("default/a", Some("u1"))), Some(vec![]));
        // And a container created after the slow listing started survives it.
        let slow = cache.begin();
        let fresh = cache.begin();
        cache.apply_partial(fresh, Covered::Ids(&["y".into()]), vec![c("y", "default/a", "u1", Running)]);
        cache.apply_full(slow, vec![]);
        assert_eq!(ids(cache.containers_of("default/a", Some("u1"))), Some(vec!["y".into()]));
        // An older read of y's state never undoes a newer one.
        let old = cache.begin();
        let new = cache.begin();
        cache.apply_partial(new, Covered::Ids(&["y".into()]), vec![c("y", "default/a", "u1", Exited)]);
        cache.apply_partial(old, Covered::Ids(&["y".into()]), vec![c("y", "default/a", "u1", Running)]);
        assert_eq!(cache.containers_of("default/a", None).unwrap()[0].state, Exited);
    }

    #[test]
    fn an_old_read_never_resurrects_a_container_a_newer_one_saw_gone() {
        let cache = ContainerCache::new();
        let t = cache.begin();
        cache.apply_full(t, vec![]);
        let old = cache.begin();
        let new = cache.begin();
        // The newer read (an event for z) finds z already gone; the older one still saw it.
        cache.apply_partial(new, Covered::Ids(&["z".into()]), vec![]);
        cache.apply_partial(old, Covered::Ids(&["z".into()]), vec![c("z", "default/a", "u1", Running)]);
        assert_eq!(ids(cache.containers_of("default/a", Some("u1"))), Some(vec![]));
        // Nor does a full listing older than the last full one.
        let older = cache.begin();
        let t = cache.begin();
        cache.apply_full(t, vec![]);
        cache.apply_partial(older, Covered::Ids(&["w".into()]), vec![c("w", "default/b", "u2", Running)]);
        assert_eq!(ids(cache.containers_of("default/b", Some("u2"))), Some(vec![]));
    }

    #[test]
    fn workspace_refresh_covers_key_and_uid_labels() {
        let cache = ContainerCache::new();
        let t = cache.begin();
        cache.apply_full(
            t,
            vec![
                c("mine", "default/dev", "u1", Running),
                // A stranger claiming dev's key with another uid, and one with dev's uid
                // under another key: both are dev's to look at (the orphan rule removes them).
                c("spoof-key", "default/dev", "u9", Running),
                c("spoof-uid", "default/ghost", "u1", Running),
                c("other", "default/other", "u2", Running),
            ],
        );
        let mut of_dev = ids(cache.containers_of("default/dev", Some("u1"))).unwrap();
        of_dev.sort();
        assert_eq!(of_dev, ["mine", "spoof-key", "spoof-uid"]);
        // The reconciler removed the strangers and re-read dev's labels.
        let t = cache.begin();
        cache.apply_partial(
            t,
            Covered::Label(labels::WORKSPACE, "default/dev"),
            vec![c("mine", "default/dev", "u1", Running)],
        );
        cache.apply_partial(t, Covered::Label(labels::UID, "u1"), vec![c("mine", "default/dev", "u1", Running)]);
        assert_eq!(ids(cache.containers_of("default/dev", Some("u1"))), Some(vec!["mine".into()]));
        assert_eq!(ids(cache.containers_of("default/other", Some("u2"))), Some(vec!["other".into()]));
        let mut keys = cache.workspace_keys().unwrap();
        keys.sort();
        assert_eq!(keys, ["default/dev", "default/other"]);
    }

    #[test]
    fn a_full_listing_reports_what_changed() {
        let cache = ContainerCache::new();
        let t = cache.begin();
        cache.apply_full(t, vec![c("x", "default/a", "u1", Running), c("y", "default/b", "u2", Running)]);
        let t = cache.begin();
        let applied = cache.apply_full(
            t,
            vec![
                c("x", "default/a", "u1", Running),
                c("y", "default/b", "u2", Exited),
                c("z", "default/c", "u3", Running),
            ],
        );
        assert_eq!(applied.changed, BTreeSet::from(["default/b".to_string(), "default/c".to_string()]));
        assert!(cache.apply_full(cache.begin(), vec![]).changed.len() == 3);
        assert!(cache.is_empty());
    }
}
