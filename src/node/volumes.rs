//! The node's directories for Pod volumes, under `STATE/node/pods/<uid>/volumes/`:
//! Secret volumes (bind-mounted read-only, a directory never a single file) and
//! emptyDirs. A Secret volume is written as the kubelet's AtomicWriter does: the
//! files go into a fresh `..<timestamp>` directory, a `..data` symlink is swapped to
//! it by rename, and each top-level name is a symlink through `..data`, so a running
//! container sees the old set of files or the new one, never a mix. `fsGroup` makes
//! files group-owned by it and group-readable, as the kubelet's volume ownership does.

use std::io::Write;
use std::os::unix::fs::{MetadataExt, PermissionsExt, symlink};
use std::path::{Path, PathBuf};

/// `STATE/node/pods/<uid>/volumes/<plugin>/<name>`.
pub fn volume_dir(root: &Path, pod_uid: &str, plugin: &str, name: &str) -> PathBuf {
    root.join("pods").join(pod_uid).join("volumes").join(plugin).join(name)
}

pub fn pod_dir(root: &Path, pod_uid: &str) -> PathBuf {
    root.join("pods").join(pod_uid)
}

/// The files `..data` shows now: (relative path, content, mode).
fn current_files(dir: &Path) -> Option<Vec<(String, Vec<u8>, u32)>> {
    let target = std::fs::read_link(dir.join("..data")).ok()?;
    let root = dir.join(target);
    let mut out = Vec::new();
    let mut stack = vec![root.clone()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).ok()?.flatten() {
            let path = entry.path();
            let meta = entry.metadata().ok()?;
            if meta.is_dir() {
                stack.push(path);
            } else {
                let rel = path.strip_prefix(&root).ok()?.to_string_lossy().to_string();
                out.push((rel, std::fs::read(&path).ok()?, meta.permissions().mode() & 0o777));
            }
        }
    }
    out.sort();
    Some(out)
}

/// Makes `dir` show exactly `files` (relative path, content, mode); false when it
/// already did. `fs_group`: the files' group, made group-readable.
pub fn write_atomically(dir: &Path, files: &[(String, Vec<u8>, u32)], fs_group: Option<u32>) -> std::io::Result<bool> {
    let with_group = |mode: u32| if fs_group.is_some() { mode | 0o440 } else { mode };
    let mut wanted: Vec<(String, Vec<u8>, u32)> =
        files.iter().map(|(p, c, m)| (p.clone(), c.clone(), with_group(*m))).collect();
    wanted.sort();
    if current_files(dir).is_some_and(|now| now == wanted) {
        return Ok(false);
    }
    std::fs::create_dir_all(dir)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755))?;
    let chown = |path: &Path| -> std::io::Result<()> {
        match fs_group {
            Some(gid) => std::os::unix::fs::lchown(path, None, Some(gid)),
            None => Ok(()),
        }
    };
    chown(dir)?;
    let stamp = format!("..{}", chrono::Utc::now().format("%Y_%m_%d_%H_%M_%S.%f"));
    let fresh = dir.join(&stamp);
    std::fs::create_dir(&fresh)?;
    std::fs::set_permissions(&fresh, std::fs::Permissions::from_mode(0o755))?;
    chown(&fresh)?;
    for (path, content, mode) in &wanted {
        let file = fresh.join(path);
        if let Some(parent) = file.parent().filter(|p| *p != fresh) {
            std::fs::create_dir_all(parent)?;
            std::fs::set_permissions(parent, std::fs::Permissions::from_mode(0o755))?;
            chown(parent)?;
        }
        let mut f = std::fs::File::create(&file)?;
        f.write_all(content)?;
        f.sync_all()?;
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(*mode))?;
        chown(&file)?;
    }
    let old = std::fs::read_link(dir.join("..data")).ok();
    // The swap: a new symlink renamed over `..data`.
    let tmp = dir.join("..data_tmp");
    let _ = std::fs::remove_file(&tmp);
    symlink(&stamp, &tmp)?;
    std::fs::rename(&tmp, dir.join("..data"))?;
    let tops: std::collections::BTreeSet<String> =
        wanted.iter().filter_map(|(p, _, _)| p.split('/').next().map(str::to_string)).collect();
    for top in &tops {
        let link = dir.join(top);
        if std::fs::read_link(&link).ok().as_deref() != Some(Path::new(&format!("..data/{top}"))) {
            let tmp = dir.join(format!("..{top}_tmp"));
            let _ = std::fs::remove_file(&tmp);
            symlink(format!("..data/{top}"), &tmp)?;
            std::fs::rename(&tmp, &link)?;
        }
    }
    for entry in std::fs::read_dir(dir)?.flatten() {
        let name = entry.file_name().to_string_lossy().to_string();
        if !name.starts_with("..") && !tops.contains(&name) {
            let _ = std::fs::remove_file(entry.path());
        }
    }
    if let Some(old) = old.filter(|o| o != Path::new(&stamp)) {
        let _ = std::fs::remove_dir_all(dir.join(old));
    }
    Ok(true)
}

/// An emptyDir's directory: everyone may write (mode 1777 would stop renames of
/// others' files; the kubelet uses 0777), group fsGroup with setgid when given.
pub fn empty_dir(dir: &Path, fs_group: Option<u32>) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let mut mode = 0o777;
    if let Some(gid) = fs_group {
        std::os::unix::fs::lchown(dir, None, Some(gid))?;
        mode |= 0o2000;
    }
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode))
}

/// Gives a volume's files to `gid` (group read/write, setgid directories) unless its
/// root already belongs to it (the kubelet's `OnRootMismatch`). Symlinks are left.
pub fn apply_fs_group(root: &Path, gid: u32) -> std::io::Result<()> {
    if std::fs::metadata(root)?.gid() == gid {
        return Ok(());
    }
    let mut stack = vec![root.to_path_buf()];
    while let Some(path) = stack.pop() {
        let meta = std::fs::symlink_metadata(&path)?;
        if meta.file_type().is_symlink() {
            continue;
        }
        std::os::unix::fs::lchown(&path, None, Some(gid))?;
        let mode = meta.permissions().mode() & 0o7777;
        let wanted = if meta.is_dir() { mode | 0o2070 } else { mode | 0o060 };
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(wanted))?;
        if meta.is_dir() {
            stack.extend(std::fs::read_dir(&path)?.flatten().map(|e| e.path()));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(dir: &Path, name: &str) -> String {
        std::fs::read_to_string(dir.join(name)).unwrap()
    }

    #[test]
    fn secret_files_are_swapped_whole_and_old_ones_go() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("token");
        let v1 = vec![("token".to_string(), b"one".to_vec(), 0o400), ("ca/crt".to_string(), b"c".to_vec(), 0o644)];
        assert!(write_atomically(&dir, &v1, None).unwrap());
        assert_eq!(read(&dir, "token"), "one");
        assert_eq!(read(&dir, "ca/crt"), "c");
        assert_eq!(std::fs::metadata(dir.join("token")).unwrap().permissions().mode() & 0o777, 0o400);
        assert!(!write_atomically(&dir, &v1, None).unwrap(), "unchanged content is not rewritten");
        let first = std::fs::read_link(dir.join("..data")).unwrap();
        let v2 = vec![("token".to_string(), b"two".to_vec(), 0o400)];
        assert!(write_atomically(&dir, &v2, None).unwrap());
        assert_eq!(read(&dir, "token"), "two");
        assert!(!dir.join("ca").exists(), "a key removed from the Secret is gone");
        assert!(!dir.join(first).exists(), "the previous generation is removed");
        assert!(std::fs::symlink_metadata(dir.join("token")).unwrap().file_type().is_symlink());
    }
}
