//! The directory source: every `*.yaml`/`*.yml` file under a directory (hidden files
//! and directories skipped), watched with inotify (notify) and rescanned after each
//! burst of changes.
//!
//! A directory holding an `org.yaml` is an org template in the original platform's
//! format (see `source::org`), read as one unit: its other YAML files are includes.
//!
//! A file that stops parsing keeps its last good objects (its error is reported); a
//! deleted file drops its objects; a directory that cannot be read keeps everything
//! that was read from it. A broken file is never read as "delete its workspaces".

use std::collections::{BTreeMap, BTreeSet};
use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use notify::event::{AccessKind, AccessMode};
use notify::{EventKind, RecursiveMode, Watcher};
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::manifest::{self, MAX_FILE_BYTES};
use super::{Snapshot, SourceObject};
use crate::api::SourceRef;

/// Quiet time that ends a burst of file events (editors write several events per save)
/// unless the burst already says every file in it is complete (see [`Change`]).
pub const DEBOUNCE: Duration = Duration::from_millis(75);
/// A burst never delays a rescan longer than this.
const MAX_BURST: Duration = Duration::from_secs(1);
/// Rescan even without events: covers missed events (network filesystems, inotify
/// limits) and a directory that appears or is replaced.
pub const RESCAN_EVERY: Duration = Duration::from_secs(30);
/// Subdirectories deeper than this are not read (a guard, not a feature).
const MAX_DEPTH: usize = 32;

/// Reads a directory of Workspace and Team manifests.
#[derive(Debug)]
pub struct DirSource {
    root: PathBuf,
    /// Last objects per file (path relative to `root`), kept while the file is broken.
    files: BTreeMap<PathBuf, FileState>,
    /// Digest of the last snapshot's content, to send only snapshots that changed.
    last_digest: Option<[u8; 32]>,
    rescan_every: Duration,
}

#[derive(Clone, Debug)]
struct FileState {
    objects: Vec<SourceObject>,
    /// sha256 of the file's text and source ref: what the objects were made from.
    digest: [u8; 32],
}

impl DirSource {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into(), files: BTreeMap::new(), last_digest: None, rescan_every: RESCAN_EVERY }
    }

    /// How often `watch` rescans without any file event (default 30 s).
    pub fn with_rescan_interval(mut self, every: Duration) -> Self {
        self.rescan_every = every;
        self
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// `dir:<path>`, the name snapshots and conflict messages use.
    pub fn source_name(&self) -> String {
        format!("dir:{}", self.root.display())
    }

    /// Reads the directory now. Files that fail keep their last good objects.
    pub fn scan(&mut self) -> Snapshot {
        self.scan_changed().0
    }

    /// Reads the directory now; the flag says whether anything differs from the
    /// previous scan (files, their contents or source refs, errors).
    pub fn scan_changed(&mut self) -> (Snapshot, bool) {
        let mut errors = Vec::new();
        let mut files = BTreeMap::new();
        match list_files(&self.root) {
            Err(e) => {
                let kept: usize = self.files.values().map(|f| f.objects.len()).sum();
                errors.push(format!("{}: cannot read the directory ({e}){}", self.root.display(), kept_note(kept)));
                files = self.files.clone();
            }
            Ok(listing) => {
                let git = git_revision(&self.root);
                for rel in &listing.files {
                    if let Some(state) = self.read_file(rel, git.as_ref(), &mut errors) {
                        files.insert(rel.clone(), state);
                    }
                }
                for dir in &listing.orgs {
                    let rel = dir.join(super::org::ORG_FILE);
                    files.insert(rel.clone(), self.read_org(dir, &rel, git.as_ref(), &mut errors));
                }
                for (dir, e) in &listing.unreadable_dirs {
                    let kept: Vec<_> = self.files.iter().filter(|(rel, _)| rel.starts_with(dir)).collect();
                    let count: usize = kept.iter().map(|(_, f)| f.objects.len()).sum();
                    errors.push(format!(
                        "{}: cannot read the directory ({e}){}",
                        self.root.join(dir).display(),
                        kept_note(count)
                    ));
                    for (rel, state) in kept {
                        files.entry(rel.clone()).or_insert_with(|| state.clone());
                    }
                }
            }
        }
        self.files = files;

        let mut hasher = Sha256::new();
        for (rel, state) in &self.files {
            hasher.update(rel.to_string_lossy().as_bytes());
            hasher.update(state.digest);
        }
        for e in &errors {
            hasher.update(e.as_bytes());
        }
        let digest: [u8; 32] = hasher.finalize().into();
        let changed = self.last_digest != Some(digest);
        self.last_digest = Some(digest);

        let objects = self.files.values().flat_map(|f| f.objects.iter().cloned()).collect();
        (Snapshot { source: self.source_name(), objects, errors }, changed)
    }

    /// Reads and parses one file. `None` drops the file (it is gone); a file that
    /// cannot be read or parsed returns its previous state, if any.
    fn read_file(&self, rel: &Path, git: Option<&GitRevision>, errors: &mut Vec<String>) -> Option<FileState> {
        let path = self.root.join(rel);
        let origin = path.display().to_string();
        let previous = self.files.get(rel);
        let keep_previous = |problem: String, errors: &mut Vec<String>| {
            let kept = previous.map_or(0, |p| p.objects.len());
            let note = if kept > 0 {
                format!(" (keeping the {kept} objects it declared before until it is fixed)")
            } else {
                String::new()
            };
            errors.push(format!("{problem}{note}"));
            previous.cloned()
        };
        let metadata = match std::fs::metadata(&path) {
            Ok(m) => m,
            Err(e) if e.kind() == ErrorKind::NotFound => return None,
            Err(e) => return keep_previous(format!("{origin}: cannot read the file ({e})"), errors),
        };
        if metadata.len() > MAX_FILE_BYTES as u64 {
            let problem = format!(
                "{origin}: the file is {} bytes; files over {} KiB are refused, split it into several files",
                metadata.len(),
                MAX_FILE_BYTES / 1024
            );
            return keep_previous(problem, errors);
        }
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == ErrorKind::NotFound => return None,
            Err(e) => return keep_previous(format!("{origin}: cannot read the file ({e})"), errors),
        };
        let Ok(text) = String::from_utf8(bytes) else {
            return keep_previous(format!("{origin}: the file is not UTF-8 text; save it as UTF-8"), errors);
        };
        let rel_text = rel.to_string_lossy().replace(std::path::MAIN_SEPARATOR, "/");
        let reference = match git {
            Some(g) => format!("{}{rel_text}@{}", g.prefix, g.commit),
            None => {
                let modified = metadata.modified().map(chrono::DateTime::<chrono::Utc>::from).unwrap_or_default();
                format!("{rel_text}@{}", modified.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
            }
        };
        let source = SourceRef { kind: "dir".to_string(), reference };
        let parsed = manifest::parse_file(&text, &origin, &source);
        if parsed.failed {
            let (last, rest) = parsed.errors.split_last().map_or((None, &[][..]), |(l, r)| (Some(l), r));
            errors.extend(rest.iter().cloned());
            return keep_previous(last.cloned().unwrap_or_else(|| format!("{origin}: cannot be read")), errors);
        }
        errors.extend(parsed.errors);
        let mut hasher = Sha256::new();
        hasher.update(source.reference.as_bytes());
        hasher.update([0]);
        hasher.update(text.as_bytes());
        Some(FileState { objects: parsed.objects, digest: hasher.finalize().into() })
    }

    /// Reads the org template in `dir` (its org.yaml at `rel`). A template whose top
    /// level cannot be read keeps everything it declared before; a part of it that
    /// cannot be read keeps what was declared under it. What it has that the operator
    /// does not act on is logged once per change of the template.
    fn read_org(&self, dir: &Path, rel: &Path, git: Option<&GitRevision>, errors: &mut Vec<String>) -> FileState {
        let loaded = super::org::load(&self.root.join(dir));
        let previous = self.files.get(rel);
        let rel_text = rel.to_string_lossy().replace(std::path::MAIN_SEPARATOR, "/");
        let reference = match git {
            Some(g) => format!("{}{rel_text}@{}", g.prefix, g.commit),
            None => format!("{rel_text}@sha256:{}", &hex::encode(loaded.digest)[..12]),
        };
        let source = SourceRef { kind: "dir".to_string(), reference };
        let c = &loaded.converted;
        let mut objects = if c.fatal { Vec::new() } else { loaded.objects(&source) };
        let kept = loaded.kept_from(previous.map_or(&[][..], |p| &p.objects[..]));
        let note = if kept.is_empty() {
            String::new()
        } else {
            format!(" (keeping the {} objects it declared there before until it is fixed)", kept.len())
        };
        if let Some((last, rest)) = c.errors.split_last() {
            errors.extend(rest.iter().cloned());
            errors.push(format!("{last}{note}"));
        }
        objects.extend(kept);
        let mut hasher = Sha256::new();
        hasher.update(source.reference.as_bytes());
        hasher.update(loaded.digest);
        let digest: [u8; 32] = hasher.finalize().into();
        if previous.is_none_or(|p| p.digest != digest) && !c.not_acted_on.is_empty() {
            let fields: Vec<&str> = c.not_acted_on.iter().map(String::as_str).collect();
            tracing::warn!(
                template = %self.root.join(rel).display(),
                "org template fields kept as annotations, not acted on by this operator: {}",
                fields.join(", ")
            );
        }
        FileState { objects, digest }
    }

    /// Sends a snapshot now and a fresh one after every burst of changes under the
    /// directory (debounced), plus a rescan every `rescan_every`; only snapshots that
    /// differ from the last one sent are sent after the first. Copes with editors that
    /// save by rename and with the directory being replaced or appearing later. Ends
    /// when the receiver is dropped.
    pub fn watch(self, tx: mpsc::Sender<Snapshot>) -> JoinHandle<()> {
        tokio::spawn(self.run_watch(tx))
    }

    async fn run_watch(mut self, tx: mpsc::Sender<Snapshot>) {
        let root = std::path::absolute(&self.root).unwrap_or_else(|_| self.root.clone());
        let (events_tx, mut events) = mpsc::unbounded_channel::<Change>();
        // Held here so the channel stays open even if the watcher cannot be made.
        let _events_open = events_tx.clone();
        let handler = {
            let root = root.clone();
            move |event: notify::Result<notify::Event>| match event {
                Ok(e) if is_relevant(&root, &e) => {
                    for change in Change::of(&e) {
                        let _ = events_tx.send(change);
                    }
                }
                Ok(_) => {}
                // An error from the watcher (e.g. queue overflow) also asks for a rescan.
                Err(_) => {
                    let _ = events_tx.send(Change::Other);
                }
            }
        };
        let mut watcher = match notify::recommended_watcher(handler) {
            Ok(w) => Some(w),
            Err(e) => {
                tracing::warn!(dir = %self.root.display(), error = %e, "cannot watch the directory; rescanning every {:?} instead", self.rescan_every);
                None
            }
        };
        // The parent is watched too, so a directory that is replaced (or created later)
        // is noticed at once and watched again.
        if let (Some(w), Some(parent)) = (watcher.as_mut(), root.parent())
            && let Err(e) = w.watch(parent, RecursiveMode::NonRecursive)
        {
            tracing::debug!(dir = %parent.display(), error = %e, "cannot watch the parent directory");
        }
        let mut watched: Option<DirIdentity> = None;
        let mut first = true;
        loop {
            if let Some(w) = watcher.as_mut() {
                rewatch_if_replaced(w, &root, &mut watched);
            }
            let scanned = tokio::task::spawn_blocking(move || {
                let (snapshot, changed) = self.scan_changed();
                (self, snapshot, changed)
            })
            .await;
            let Ok((source, snapshot, changed)) = scanned else { return };
            self = source;
            if first || changed {
                first = false;
                if tx.send(snapshot).await.is_err() {
                    return;
                }
            }
            tokio::select! {
                _ = tx.closed() => return,
                _ = tokio::time::sleep(self.rescan_every) => {}
                Some(change) = events.recv() => {
                    // Wait for the burst to end: every file in it complete, else no
                    // event for DEBOUNCE (at most MAX_BURST).
                    let mut burst = Burst::default();
                    burst.note(change);
                    let burst_end = tokio::time::Instant::now() + MAX_BURST;
                    loop {
                        while let Ok(change) = events.try_recv() {
                            burst.note(change);
                        }
                        if burst.complete() {
                            break;
                        }
                        let quiet = (tokio::time::Instant::now() + DEBOUNCE).min(burst_end);
                        match tokio::time::timeout_at(quiet, events.recv()).await {
                            Ok(Some(change)) => burst.note(change),
                            _ => break,
                        }
                    }
                }
            }
        }
    }
}

/// What one file event says about the burst it is part of. A manifest is read as soon
/// as the burst holds one that is complete (closed after writing, renamed into place
/// or away, removed) and no file in it is still being written: a writer that writes in
/// place is read after it closes the file, never half-written. Anything less certain
/// (another kind of file, a directory, metadata, an error) waits for the quiet time.
#[derive(Debug, PartialEq)]
enum Change {
    /// Created or written to: incomplete until it is closed, renamed or removed.
    Writing(PathBuf),
    /// Closed after writing, renamed, or removed; `manifest` when it is a YAML file.
    Done {
        path: PathBuf,
        manifest: bool,
    },
    Other,
}

impl Change {
    fn of(event: &notify::Event) -> Vec<Change> {
        use notify::event::{CreateKind, ModifyKind};
        let done = |p: &PathBuf| Change::Done { path: p.clone(), manifest: is_manifest(p) };
        match event.kind {
            EventKind::Create(CreateKind::File) | EventKind::Modify(ModifyKind::Data(_)) => {
                event.paths.iter().map(|p| Change::Writing(p.clone())).collect()
            }
            EventKind::Access(AccessKind::Close(AccessMode::Write))
            | EventKind::Modify(ModifyKind::Name(_))
            | EventKind::Remove(_)
                if !event.paths.is_empty() =>
            {
                event.paths.iter().map(done).collect()
            }
            _ => vec![Change::Other],
        }
    }
}

/// The changes of one burst, so far.
#[derive(Debug, Default)]
struct Burst {
    writing: BTreeSet<PathBuf>,
    manifest_done: bool,
}

impl Burst {
    fn note(&mut self, change: Change) {
        match change {
            Change::Writing(p) => {
                self.writing.insert(p);
            }
            Change::Done { path, manifest } => {
                self.writing.remove(&path);
                self.manifest_done |= manifest;
            }
            Change::Other => {}
        }
    }

    /// Read now, without waiting for the quiet time.
    fn complete(&self) -> bool {
        self.manifest_done && self.writing.is_empty()
    }
}

fn kept_note(objects: usize) -> String {
    if objects == 0 { String::new() } else { format!("; keeping the {objects} objects read from it before") }
}

/// Events inside the directory (not under hidden paths) and events on the directory
/// itself; opening and reading files (our own scans do that) are not changes.
fn is_relevant(root: &Path, event: &notify::Event) -> bool {
    match event.kind {
        EventKind::Access(AccessKind::Close(AccessMode::Write)) => {}
        EventKind::Access(_) => return false,
        _ => {}
    }
    event.paths.is_empty()
        || event.paths.iter().any(|p| p.strip_prefix(root).is_ok_and(|rel| !is_hidden(rel)))
        || event.need_rescan()
}

/// Hidden, but for `.env` files (an org template's secrets).
fn is_hidden(rel: &Path) -> bool {
    rel.components().any(|c| {
        let name = c.as_os_str().to_string_lossy();
        name.starts_with('.') && name != ".env"
    })
}

type DirIdentity = (u64, u64);

#[cfg(unix)]
fn dir_identity(path: &Path) -> Option<DirIdentity> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).ok().filter(|m| m.is_dir()).map(|m| (m.dev(), m.ino()))
}

#[cfg(not(unix))]
fn dir_identity(path: &Path) -> Option<DirIdentity> {
    std::fs::metadata(path).ok().filter(|m| m.is_dir()).map(|_| (0, 0))
}

/// Watches `root` recursively, again whenever it is a different directory than the
/// one watched (replaced by rename, deleted and recreated, or created late).
fn rewatch_if_replaced(watcher: &mut impl Watcher, root: &Path, watched: &mut Option<DirIdentity>) {
    let now = dir_identity(root);
    if now == *watched {
        return;
    }
    if watched.is_some() {
        let _ = watcher.unwatch(root);
    }
    *watched = None;
    if now.is_some() {
        match watcher.watch(root, RecursiveMode::Recursive) {
            Ok(()) => *watched = now,
            Err(e) => tracing::warn!(dir = %root.display(), error = %e, "cannot watch the directory; will retry"),
        }
    }
}

struct Listing {
    /// Manifest files, relative to the root, in path order.
    files: BTreeSet<PathBuf>,
    /// Directories holding an `org.yaml` (relative; empty for the root itself): each
    /// is one org template, and its other YAML files are its includes.
    orgs: BTreeSet<PathBuf>,
    /// Subdirectories (relative) that could not be read, and why.
    unreadable_dirs: Vec<(PathBuf, std::io::Error)>,
}

/// Every `*.yaml`/`*.yml` file under `root`, skipping hidden entries. Symlinks to
/// files are followed (as in a Kubernetes ConfigMap mount); symlinks to directories
/// are not (no loops). Fails only when `root` itself cannot be read.
fn list_files(root: &Path) -> std::io::Result<Listing> {
    let mut listing = Listing { files: BTreeSet::new(), orgs: BTreeSet::new(), unreadable_dirs: Vec::new() };
    let mut pending = vec![(PathBuf::new(), 0usize)];
    while let Some((rel, depth)) = pending.pop() {
        if super::org::is_org_dir(&root.join(&rel)) {
            listing.orgs.insert(rel);
            continue;
        }
        let entries = match std::fs::read_dir(root.join(&rel)) {
            Ok(entries) => entries,
            Err(e) if rel.as_os_str().is_empty() => return Err(e),
            Err(e) if e.kind() == ErrorKind::NotFound => continue, // removed while listing
            Err(e) => {
                listing.unreadable_dirs.push((rel, e));
                continue;
            }
        };
        for entry in entries {
            let entry = match entry {
                Ok(entry) => entry,
                Err(e) => {
                    listing.unreadable_dirs.push((rel.clone(), e));
                    break;
                }
            };
            let name = entry.file_name();
            if name.to_string_lossy().starts_with('.') {
                continue;
            }
            let child = rel.join(&name);
            let Ok(file_type) = entry.file_type() else { continue };
            if file_type.is_dir() {
                if depth < MAX_DEPTH {
                    pending.push((child, depth + 1));
                }
            } else if is_manifest(&child)
                && (file_type.is_file() || std::fs::metadata(entry.path()).is_ok_and(|m| m.is_file()))
            {
                listing.files.insert(child);
            }
        }
    }
    Ok(listing)
}

fn is_manifest(path: &Path) -> bool {
    path.extension().is_some_and(|e| e.eq_ignore_ascii_case("yaml") || e.eq_ignore_ascii_case("yml"))
}

struct GitRevision {
    commit: String,
    /// The directory's path inside the checkout (`org/` or empty), so a ref reads
    /// like `org/eng.yaml@<commit>`.
    prefix: String,
}

/// The commit checked out where `dir` is, if it is inside a git checkout.
fn git_revision(dir: &Path) -> Option<GitRevision> {
    let output = Command::new("git")
        .arg("-C")
        .arg(dir)
        .args(["rev-parse", "HEAD", "--show-prefix"])
        .env("GIT_OPTIONAL_LOCKS", "0")
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .ok()
        .filter(|o| o.status.success())?;
    let text = String::from_utf8(output.stdout).ok()?;
    let mut lines = text.lines();
    let commit = lines.next()?.trim().to_string();
    let prefix = lines.next().unwrap_or_default().trim().to_string();
    (!commit.is_empty()).then_some(GitRevision { commit, prefix })
}

#[cfg(test)]
mod tests {
    use super::*;
    use notify::event::{CreateKind, DataChange, ModifyKind, RenameMode};

    fn event(kind: EventKind, path: &str) -> notify::Event {
        notify::Event::new(kind).add_path(PathBuf::from(path))
    }

    fn burst(events: &[notify::Event]) -> Burst {
        let mut b = Burst::default();
        for e in events {
            for c in Change::of(e) {
                b.note(c);
            }
        }
        b
    }

    #[test]
    fn a_file_written_in_place_is_read_once_it_is_closed() {
        let created = event(EventKind::Create(CreateKind::File), "/d/a.yaml");
        let written = event(EventKind::Modify(ModifyKind::Data(DataChange::Any)), "/d/a.yaml");
        let closed = event(EventKind::Access(AccessKind::Close(AccessMode::Write)), "/d/a.yaml");
        assert!(!burst(&[created.clone(), written.clone()]).complete(), "half-written: wait");
        assert!(burst(&[created, written, closed]).complete());
    }

    #[test]
    fn a_manifest_renamed_into_place_is_read_at_once() {
        let tmp = [
            event(EventKind::Create(CreateKind::File), "/d/a.yaml.tmp"),
            event(EventKind::Modify(ModifyKind::Data(DataChange::Any)), "/d/a.yaml.tmp"),
            event(EventKind::Access(AccessKind::Close(AccessMode::Write)), "/d/a.yaml.tmp"),
        ];
        assert!(!burst(&tmp).complete(), "no manifest is complete yet: the quiet time decides");
        let mut all = tmp.to_vec();
        all.push(event(EventKind::Modify(ModifyKind::Name(RenameMode::To)), "/d/a.yaml"));
        assert!(burst(&all).complete());
    }

    #[test]
    fn another_file_still_being_written_holds_the_burst() {
        let b = burst(&[
            event(EventKind::Modify(ModifyKind::Data(DataChange::Any)), "/d/b.yaml"),
            event(EventKind::Remove(notify::event::RemoveKind::File), "/d/a.yaml"),
        ]);
        assert!(!b.complete());
        assert!(!burst(&[event(EventKind::Create(CreateKind::Folder), "/d/sub")]).complete());
    }
}
