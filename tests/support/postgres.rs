//! A real PostgreSQL for tests, leaving nothing behind.
//!
//! ```ignore
//! mod support;
//!
//! #[tokio::test]
//! async fn something_with_postgres() {
//!     let Some(db) = support::postgres::fresh_database().await else { return }; // skipped, notice printed
//!     let store = molecule::store::open(&db.url).await.unwrap();
//!     // Keep `db` while the test uses the database: dropping the last one stops the server.
//! }
//! ```
//!
//! Every call gives the test an empty database of its own (`CREATE DATABASE
//! t_<random>`), so tests run in parallel, on:
//! - the server `MOLECULE_TEST_DATABASE_URL` names, when set (its user must be
//!   allowed to create databases; each test's database is dropped after it), or
//! - a throwaway cluster this process starts. Binaries: `MOLECULE_TEST_PG_BIN`,
//!   else the newest `/usr/lib/postgresql/*/bin`, else `initdb` on `PATH`.
//!   `initdb -A trust -U postgres` into `/dev/shm/molecule-pg-XXXXXX` (tmpfs;
//!   `$TMPDIR` when there is no writable /dev/shm), then `pg_ctl -w start` on a free
//!   127.0.0.1 port, socket in that directory, durability off (fsync,
//!   synchronous_commit, full_page_writes). PostgreSQL refuses to run as root, so
//!   when the tests run as root the directory belongs to the `postgres` OS user
//!   and every PostgreSQL command runs as that user (`Command::uid/gid`, like
//!   `su postgres -c` without the shell quoting).
//!
//! Lifetime: tests share the process's cluster through their `TestDatabase`; when
//! the last one drops, the cluster is stopped (`pg_ctl -m immediate`) and its
//! directory removed before the test returns. With nextest every test is its own
//! process, so that happens at the end of each test. Should the process die first
//! (abort, a timeout's kill of the whole process group), a watchdog does the same
//! cleanup: a small `sh`, started before `initdb` in a process group of its own,
//! blocked reading a pipe whose only writer is this process; the kernel closes
//! that pipe however the process ends.
//!
//! Cost, measured on the project's 2-core VM: ~0.7 s per process (initdb ~0.6 s,
//! start ~0.1 s), 1.0-1.3 s while other builds load the machine; stopping takes
//! ~0.1 s. On the ext4 disk under /tmp initdb alone took 2-3 s, hence tmpfs. At
//! that price one cluster per process is kept rather than one shared across
//! processes (which would need cross-process reference counting and leave a
//! server lingering after the run). Each start prints its cost to stderr (`cargo
//! nextest run --no-capture` shows it).
//!
//! A test that stops or restarts the server takes [`private_database`] instead: a
//! cluster of its own (same setup, same cleanup), never shared and never
//! `MOLECULE_TEST_DATABASE_URL`'s, with `stop_server`, `start_server` (same port)
//! and `restart_server`.
//!
//! No PostgreSQL installed: the test prints a notice and passes, unless `CI` is
//! `true` (or `1`), where it fails saying what to install.

use std::fs::File;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::{Arc, Mutex, Weak};
use std::time::Instant;

use sqlx::{AssertSqlSafe, Connection, Executor, PgConnection};

/// An empty database of the test's own, on a running server.
pub struct TestDatabase {
    /// `postgres://` URL of the database.
    pub url: String,
    /// Its name, `t_<32 hex>`.
    pub name: String,
    server: Arc<Server>,
}

/// A fresh database, or `None` (after printing why) when PostgreSQL is not
/// installed and `CI` is not `true`. Panics when a server cannot be started.
pub async fn fresh_database() -> Option<TestDatabase> {
    let server = match shared_server() {
        Ok(server) => server,
        Err(Unavailable::Missing(why)) if ci() => panic!(
            "{why}. CI=true requires the Postgres tests to run: install PostgreSQL (apt-get install postgresql) \
             or set MOLECULE_TEST_DATABASE_URL to a server the tests may create databases on"
        ),
        Err(Unavailable::Missing(why)) => {
            eprintln!("notice: skipping this Postgres test: {why} (set CI=true to make this a failure)");
            return None;
        }
        Err(Unavailable::Failed(why)) => panic!("{why}"),
    };
    let name = format!("t_{}", uuid::Uuid::new_v4().simple());
    let admin_url = server.admin_url();
    let mut conn = PgConnection::connect(&admin_url)
        .await
        .unwrap_or_else(|e| panic!("cannot connect to the test PostgreSQL server: {e}"));
    conn.execute(AssertSqlSafe(format!("CREATE DATABASE {name}")))
        .await
        .unwrap_or_else(|e| panic!("cannot create test database {name}: {e}"));
    let _ = conn.close().await;
    Some(TestDatabase { url: with_database(&admin_url, &name), name, server })
}

impl TestDatabase {
    /// The database behind a TCP proxy on 127.0.0.1 that the test can cut and restore
    /// (an outage without touching the server): the proxy, and the URL through it.
    pub async fn behind_proxy(&self) -> (super::proxy::TcpProxy, String) {
        let mut url = url::Url::parse(&self.url).unwrap();
        let target = std::net::SocketAddr::from(([127, 0, 0, 1], url.port().unwrap()));
        let proxy = super::proxy::TcpProxy::start(target).await;
        url.set_port(Some(proxy.port)).unwrap();
        (proxy, url.to_string())
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        // A throwaway cluster goes away whole; a server of the developer's keeps
        // only what it had.
        if let Server::External(admin_url) = &*self.server {
            let (admin_url, name) = (admin_url.clone(), self.name.clone());
            let dropped = std::thread::spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
                runtime.block_on(async {
                    let mut conn = PgConnection::connect(&admin_url).await?;
                    conn.execute(AssertSqlSafe(format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))).await?;
                    conn.close().await?;
                    Ok::<_, sqlx::Error>(())
                })?;
                Ok::<_, Box<dyn std::error::Error + Send + Sync>>(())
            })
            .join();
            if let Ok(Err(e)) = dropped {
                eprintln!("warning: could not drop test database {}: {e}", self.name);
            }
        }
    }
}

/// A database on a PostgreSQL server of the test's own, which the test may stop
/// and start again (a restart, a crash) without disturbing any other test: never the
/// process's shared server, never `MOLECULE_TEST_DATABASE_URL`'s. Dropping it stops
/// the server and removes its directory.
pub struct PrivateDatabase {
    /// `postgres://` URL of the database (the server keeps its port across restarts).
    pub url: String,
    pub port: u16,
    cluster: Cluster,
}

/// Like [`fresh_database`], on a server of its own (see [`PrivateDatabase`]).
pub async fn private_database() -> Option<PrivateDatabase> {
    let cluster = match Cluster::start() {
        Ok(cluster) => cluster,
        Err(Unavailable::Missing(why)) if ci() => {
            panic!("{why}. CI=true requires the Postgres tests to run: install PostgreSQL (apt-get install postgresql)")
        }
        Err(Unavailable::Missing(why)) => {
            eprintln!("notice: skipping this Postgres test: {why} (set CI=true to make this a failure)");
            return None;
        }
        Err(Unavailable::Failed(why)) => panic!("{why}"),
    };
    let admin_url = format!("postgres://postgres@127.0.0.1:{}/postgres", cluster.port);
    let mut conn = PgConnection::connect(&admin_url)
        .await
        .unwrap_or_else(|e| panic!("cannot connect to the test PostgreSQL server: {e}"));
    conn.execute("CREATE DATABASE molecule").await.unwrap_or_else(|e| panic!("cannot create the test database: {e}"));
    let _ = conn.close().await;
    Some(PrivateDatabase { url: with_database(&admin_url, "molecule"), port: cluster.port, cluster })
}

impl PrivateDatabase {
    /// Stops the server: `fast` disconnects every client and shuts down cleanly,
    /// `immediate` is a crash (the next start recovers from the WAL). Blocks until it
    /// is down.
    pub fn stop_server(&self, mode: &str) {
        self.cluster.pg_ctl_stop(mode).unwrap_or_else(|e| panic!("cannot stop the test PostgreSQL: {e}"));
        eprintln!("test PostgreSQL on 127.0.0.1:{} stopped ({mode})", self.port);
    }

    /// Starts the stopped server again on the same port; blocks until it accepts
    /// connections.
    pub fn start_server(&self) {
        self.cluster.pg_ctl_start(self.port).unwrap_or_else(|e| panic!("cannot start the test PostgreSQL again: {e}"));
        eprintln!("test PostgreSQL on 127.0.0.1:{} started again", self.port);
    }

    /// `stop_server(mode)` then `start_server()`.
    pub fn restart_server(&self, mode: &str) {
        self.stop_server(mode);
        self.start_server();
    }
}

fn ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v.eq_ignore_ascii_case("true") || v == "1")
}

enum Unavailable {
    /// No PostgreSQL to run here: skipped unless CI.
    Missing(String),
    /// PostgreSQL is there but would not start: always a failure.
    Failed(String),
}

enum Server {
    /// `MOLECULE_TEST_DATABASE_URL`.
    External(String),
    Local(Cluster),
}

impl Server {
    fn admin_url(&self) -> String {
        match self {
            Self::External(url) => url.clone(),
            Self::Local(cluster) => format!("postgres://postgres@127.0.0.1:{}/postgres", cluster.port),
        }
    }
}

/// The process's server while any test holds it.
static SERVER: Mutex<Weak<Server>> = Mutex::new(Weak::new());

fn shared_server() -> Result<Arc<Server>, Unavailable> {
    let mut slot = SERVER.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    if let Some(server) = slot.upgrade() {
        return Ok(server);
    }
    let server = match std::env::var("MOLECULE_TEST_DATABASE_URL") {
        Ok(url) if !url.is_empty() => Server::External(url),
        _ => Server::Local(Cluster::start()?),
    };
    let server = Arc::new(server);
    *slot = Arc::downgrade(&server);
    Ok(server)
}

/// A PostgreSQL cluster in a temporary directory, stopped and removed on drop.
struct Cluster {
    dir: PathBuf,
    port: u16,
    /// Where pg_ctl is, and who runs it: kept for [`PrivateDatabase::stop_server`] and `start_server`.
    bin: PathBuf,
    owner: Option<(u32, u32)>,
    watchdog: Option<(Child, ChildStdin)>,
}

/// Waits for its pipe to close, then stops the cluster in "$2" with the pg_ctl at
/// "$1" and removes the directory; tries again should a server still be starting.
/// (A postmaster whose directory vanishes anyway shuts itself down within a minute.)
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
    fn start() -> Result<Self, Unavailable> {
        let started = Instant::now();
        let bin = find_bin_dir().ok_or_else(|| {
            Unavailable::Missing(
                "PostgreSQL binaries (initdb, pg_ctl) were found neither in MOLECULE_TEST_PG_BIN, \
                 /usr/lib/postgresql/*/bin nor on PATH"
                    .into(),
            )
        })?;
        let owner = cluster_owner()?;
        let failed =
            |what: &str, e: &dyn std::fmt::Display| Unavailable::Failed(format!("test PostgreSQL: {what}: {e}"));

        let dir = tempfile::Builder::new()
            .prefix("molecule-pg-")
            .tempdir_in(scratch_root())
            .map_err(|e| failed("cannot create a temporary directory", &e))?
            .keep();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))
            .map_err(|e| failed("cannot chmod the cluster directory", &e))?;
        if let Some((uid, gid)) = owner {
            std::os::unix::fs::chown(&dir, Some(uid), Some(gid))
                .map_err(|e| failed("cannot give the cluster directory to the postgres user", &e))?;
        }

        // The watchdog first: from here on, any failure (or panic) cleans up.
        let mut watchdog = Command::new("/bin/sh");
        watchdog
            .args(["-c", WATCHDOG, "molecule-pg-watchdog"])
            .arg(bin.join("pg_ctl"))
            .arg(&dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .current_dir("/")
            .process_group(0);
        run_as(&mut watchdog, owner);
        let mut child = watchdog.spawn().map_err(|e| failed("cannot start the cleanup watchdog", &e))?;
        let pipe = child.stdin.take().ok_or_else(|| failed("the watchdog has no stdin", &"piped stdin missing"))?;
        let mut cluster = Cluster { dir, port: 0, bin: bin.clone(), owner, watchdog: Some((child, pipe)) };

        let data = cluster.dir.join("data");
        let mut initdb = Command::new(bin.join("initdb"));
        initdb.arg("-D").arg(&data).args(["-A", "trust", "-U", "postgres", "-E", "UTF8", "--locale=C", "--no-sync"]);
        cluster.run(&mut initdb, owner, "initdb.log").map_err(Unavailable::Failed)?;

        // A free port can be taken between our look and the server's bind: retry.
        let mut last_error = String::new();
        for _ in 0..5 {
            let port = free_port().map_err(|e| failed("cannot find a free port", &e))?;
            match cluster.pg_ctl_start(port) {
                Ok(()) => {
                    cluster.port = port;
                    eprintln!(
                        "test PostgreSQL ({}) started in {:.2} s on 127.0.0.1:{port}, in {}",
                        bin.display(),
                        started.elapsed().as_secs_f64(),
                        cluster.dir.display()
                    );
                    return Ok(cluster);
                }
                Err(e) => last_error = e,
            }
        }
        Err(Unavailable::Failed(last_error))
    }

    /// `pg_ctl start` on `port`, waiting until the server accepts connections.
    fn pg_ctl_start(&self, port: u16) -> Result<(), String> {
        let mut pg_ctl = Command::new(self.bin.join("pg_ctl"));
        pg_ctl
            .arg("-D")
            .arg(self.dir.join("data"))
            .args(["-w", "-t", "60", "-l"])
            .arg(self.dir.join("postgres.log"))
            .arg("-o")
            .arg(format!(
                "-p {port} -k {} -c listen_addresses=127.0.0.1 -c fsync=off -c synchronous_commit=off \
                 -c full_page_writes=off",
                self.dir.display()
            ));
        pg_ctl.arg("start");
        self.run(&mut pg_ctl, self.owner, "pg_ctl.log")
    }

    /// `pg_ctl stop` in `mode` (`fast`: clients are disconnected, a clean shutdown;
    /// `immediate`: like a crash, recovery at the next start).
    fn pg_ctl_stop(&self, mode: &str) -> Result<(), String> {
        let mut pg_ctl = Command::new(self.bin.join("pg_ctl"));
        pg_ctl.arg("-D").arg(self.dir.join("data")).args(["-m", mode, "-w", "-t", "60", "stop"]);
        self.run(&mut pg_ctl, self.owner, "pg_ctl-stop.log")
    }

    /// Runs a PostgreSQL tool to completion, its output in `log` inside the cluster
    /// directory (quoted in the error when it fails).
    fn run(&self, cmd: &mut Command, owner: Option<(u32, u32)>, log: &str) -> Result<(), String> {
        let log_path = self.dir.join(log);
        let log_file = File::create(&log_path).map_err(|e| format!("cannot create {}: {e}", log_path.display()))?;
        let log_err = log_file.try_clone().map_err(|e| format!("cannot create {}: {e}", log_path.display()))?;
        cmd.stdin(Stdio::null()).stdout(log_file).stderr(log_err).current_dir(&self.dir).env("LC_ALL", "C");
        run_as(cmd, owner);
        let program = cmd.get_program().to_string_lossy().into_owned();
        let status = cmd.status().map_err(|e| format!("cannot run {program}: {e}"))?;
        if status.success() {
            return Ok(());
        }
        let tail = |path: &Path| {
            let text = std::fs::read_to_string(path).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            lines[lines.len().saturating_sub(15)..].join("\n")
        };
        Err(format!(
            "test PostgreSQL: {program} failed ({status}):\n{}\n{}",
            tail(&log_path),
            tail(&self.dir.join("postgres.log"))
        ))
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // Closing the pipe lets the watchdog stop the server and remove the
        // directory; waiting for it means nothing is left when the test returns.
        if let Some((mut child, pipe)) = self.watchdog.take() {
            drop(pipe);
            let _ = child.wait();
        }
    }
}

/// tmpfs when there is one: on this project's VMs initdb takes ~0.6 s there and
/// 2-3 s on the ext4 disk.
fn scratch_root() -> PathBuf {
    let shm = Path::new("/dev/shm");
    let writable = shm.metadata().is_ok_and(|m| m.is_dir() && m.permissions().mode() & 0o002 != 0);
    if writable { shm.to_path_buf() } else { std::env::temp_dir() }
}

fn run_as(cmd: &mut Command, owner: Option<(u32, u32)>) {
    if let Some((uid, gid)) = owner {
        cmd.uid(uid).gid(gid);
    }
}

/// `MOLECULE_TEST_PG_BIN` when set; else the newest `/usr/lib/postgresql/<major>/bin`
/// (Debian, Ubuntu), else the directory of `initdb` on `PATH`.
fn find_bin_dir() -> Option<PathBuf> {
    let has_tools = |dir: &Path| dir.join("initdb").is_file() && dir.join("pg_ctl").is_file();
    if let Some(dir) = std::env::var_os("MOLECULE_TEST_PG_BIN") {
        let dir = PathBuf::from(dir);
        return has_tools(&dir).then_some(dir);
    }
    let debian = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .filter_map(|entry| entry.ok())
        .filter_map(|entry| {
            let major: u32 = entry.file_name().to_str()?.split('.').next()?.parse().ok()?;
            let bin = entry.path().join("bin");
            has_tools(&bin).then_some((major, bin))
        })
        .max_by_key(|(major, _)| *major)
        .map(|(_, bin)| bin);
    debian.or_else(|| std::env::split_paths(&std::env::var_os("PATH")?).find(|dir| has_tools(dir)))
}

/// `None` to run PostgreSQL as ourselves; `Some((uid, gid))` of the `postgres`
/// OS user when we are root (PostgreSQL refuses to run as root).
fn cluster_owner() -> Result<Option<(u32, u32)>, Unavailable> {
    let euid = std::fs::metadata("/proc/self")
        .map(|m| m.uid())
        .map_err(|e| Unavailable::Failed(format!("test PostgreSQL: cannot tell which user runs the tests: {e}")))?;
    if euid != 0 {
        return Ok(None);
    }
    let passwd = std::fs::read_to_string("/etc/passwd").unwrap_or_default();
    passwd
        .lines()
        .map(|line| line.split(':').collect::<Vec<_>>())
        .find(|fields| fields.first() == Some(&"postgres"))
        .and_then(|fields| Some((fields.get(2)?.parse().ok()?, fields.get(3)?.parse().ok()?)))
        .map(Some)
        .ok_or_else(|| {
            Unavailable::Missing(
                "the tests run as root, PostgreSQL refuses to, and there is no `postgres` OS user to run it as".into(),
            )
        })
}

fn free_port() -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// `url` with its database (the path) replaced by `name`, query kept.
fn with_database(url: &str, name: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((base, query)) => (base, Some(query)),
        None => (url, None),
    };
    let authority = base.find("://").map_or(0, |i| i + 3);
    let path = base[authority..].find('/').map_or(base.len(), |i| authority + i);
    let mut out = format!("{}/{name}", &base[..path]);
    if let Some(query) = query {
        out.push('?');
        out.push_str(query);
    }
    out
}
