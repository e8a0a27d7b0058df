//! A throwaway PostgreSQL for a benchmark, the way tests/support/postgres.rs starts
//! one (initdb as the `postgres` OS user when run as root, a watchdog that stops the
//! server and removes its directory however this process ends), except that the
//! durability settings are PostgreSQL's defaults (fsync, synchronous_commit and
//! full_page_writes on): the tests turn them off for speed, a benchmark must not.
//!
//! The directory is on tmpfs (/dev/shm) unless the bench is given another parent,
//! e.g. a directory on the real disk to include the cost of its fsyncs.

use std::fs::File;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};

pub struct Cluster {
    pub dir: PathBuf,
    pub port: u16,
    pub version: String,
    watchdog: Option<(Child, ChildStdin)>,
}

const WATCHDOG: &str = r#"
while read -r _; do :; done
for attempt in 1 2 3; do
    if [ -f "$2/data/postmaster.pid" ]; then "$1" -D "$2/data" -m immediate -w stop >/dev/null 2>&1; fi
    rm -rf "$2" 2>/dev/null
    [ -e "$2" ] || exit 0
    sleep 1
done
"#;

impl Cluster {
    /// Starts a cluster in a new directory under `parent` (None: /dev/shm) with
    /// `extra` server settings (`name=value`) on top of the defaults.
    pub fn start(parent: Option<&Path>, extra: &[&str]) -> Result<Self, String> {
        let bin = find_bin_dir().ok_or("no PostgreSQL binaries (initdb, pg_ctl) in /usr/lib/postgresql/*/bin")?;
        let owner = cluster_owner()?;
        let parent = parent.map(Path::to_path_buf).unwrap_or_else(|| PathBuf::from("/dev/shm"));
        let dir = tempfile::Builder::new()
            .prefix("molecule-bench-pg-")
            .tempdir_in(&parent)
            .map_err(|e| format!("cannot create a directory in {}: {e}", parent.display()))?
            .keep();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).map_err(|e| e.to_string())?;
        if let Some((uid, gid)) = owner {
            std::os::unix::fs::chown(&dir, Some(uid), Some(gid)).map_err(|e| e.to_string())?;
        }
        let mut watchdog = Command::new("/bin/sh");
        watchdog
            .args(["-c", WATCHDOG, "molecule-bench-pg-watchdog"])
            .arg(bin.join("pg_ctl"))
            .arg(&dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .current_dir("/")
            .process_group(0);
        run_as(&mut watchdog, owner);
        let mut child = watchdog.spawn().map_err(|e| format!("cannot start the watchdog: {e}"))?;
        let pipe = child.stdin.take().ok_or("the watchdog has no stdin")?;
        let mut cluster = Cluster { dir, port: 0, version: String::new(), watchdog: Some((child, pipe)) };

        let data = cluster.dir.join("data");
        let mut initdb = Command::new(bin.join("initdb"));
        initdb.arg("-D").arg(&data).args(["-A", "trust", "-U", "postgres", "-E", "UTF8", "--locale=C"]);
        cluster.run(&mut initdb, owner, "initdb.log")?;
        let port =
            std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map_err(|e| e.to_string())?.port();
        let mut options = format!("-p {port} -k {} -c listen_addresses=127.0.0.1", cluster.dir.display());
        for e in extra {
            options.push_str(" -c ");
            options.push_str(e);
        }
        let mut pg_ctl = Command::new(bin.join("pg_ctl"));
        pg_ctl
            .arg("-D")
            .arg(&data)
            .args(["-w", "-t", "60", "-l"])
            .arg(cluster.dir.join("postgres.log"))
            .arg("-o")
            .arg(options)
            .arg("start");
        cluster.run(&mut pg_ctl, owner, "pg_ctl.log")?;
        cluster.port = port;
        let out = Command::new(bin.join("postgres")).arg("--version").output().map_err(|e| e.to_string())?;
        cluster.version = String::from_utf8_lossy(&out.stdout).trim().to_string();
        Ok(cluster)
    }

    /// A URL for database `name` (created with [`Cluster::create_database`]).
    pub fn url(&self, name: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{name}", self.port)
    }

    pub async fn create_database(&self, name: &str) -> Result<String, String> {
        use sqlx::{Connection, Executor};
        let mut conn = sqlx::PgConnection::connect(&self.url("postgres")).await.map_err(|e| e.to_string())?;
        conn.execute(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}"))).await.map_err(|e| e.to_string())?;
        let _ = conn.close().await;
        Ok(self.url(name))
    }

    fn run(&self, cmd: &mut Command, owner: Option<(u32, u32)>, log: &str) -> Result<(), String> {
        let log_path = self.dir.join(log);
        let f = File::create(&log_path).map_err(|e| e.to_string())?;
        let g = f.try_clone().map_err(|e| e.to_string())?;
        cmd.stdin(Stdio::null()).stdout(f).stderr(g).current_dir(&self.dir).env("LC_ALL", "C");
        run_as(cmd, owner);
        let status = cmd.status().map_err(|e| format!("cannot run {:?}: {e}", cmd.get_program()))?;
        if status.success() {
            Ok(())
        } else {
            let log = std::fs::read_to_string(&log_path).unwrap_or_default();
            let server = std::fs::read_to_string(self.dir.join("postgres.log")).unwrap_or_default();
            Err(format!("{:?} failed ({status}):\n{log}\n{server}", cmd.get_program()))
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if let Some((mut child, pipe)) = self.watchdog.take() {
            drop(pipe);
            let _ = child.wait();
        }
    }
}

fn run_as(cmd: &mut Command, owner: Option<(u32, u32)>) {
    if let Some((uid, gid)) = owner {
        cmd.uid(uid).gid(gid);
    }
}

fn find_bin_dir() -> Option<PathBuf> {
    let has_tools = |dir: &Path| dir.join("initdb").is_file() && dir.join("pg_ctl").is_file();
    if let Some(dir) = std::env::var_os("MOLECULE_TEST_PG_BIN") {
        let dir = PathBuf::from(dir);
        return has_tools(&dir).then_some(dir);
    }
    std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let major: u32 = e.file_name().to_str()?.split('.').next()?.parse().ok()?;
            let bin = e.path().join("bin");
            has_tools(&bin).then_some((major, bin))
        })
        .max_by_key(|(major, _)| *major)
        .map(|(_, bin)| bin)
}

/// The `postgres` OS user when running as root (PostgreSQL refuses root).
fn cluster_owner() -> Result<Option<(u32, u32)>, String> {
    let euid = std::fs::metadata("/proc/self").map(|m| m.uid()).map_err(|e| e.to_string())?;
    if euid != 0 {
        return Ok(None);
    }
    let passwd = std::fs::read_to_string("/etc/passwd").unwrap_or_default();
    passwd
        .lines()
        .map(|l| l.split(':').collect::<Vec<_>>())
        .find(|f| f.first() == Some(&"postgres"))
        .and_then(|f| Some((f.get(2)?.parse().ok()?, f.get(3)?.parse().ok()?)))
        .map(Some)
        .ok_or_else(|| "running as root and there is no `postgres` OS user".to_string())
}
