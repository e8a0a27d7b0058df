//! molecule-agent: the smallest workspace agent that behaves like the real runtimes.
//!
//! It reads its token from `$MOLECULE_TOKEN_FILE` (a Pod's mounted Secret) or else
//! `$WORKSPACE_CONFIG_PATH/.auth_token`, registers at
//! `$MOLECULE_REGISTRY_URL/registry/register`, then heartbeats every
//! `$MOLECULE_HEARTBEAT_SECONDS` at `/registry/heartbeat`. It never exits on a 401
//! or a connection error: it retries with capped exponential backoff (0.5 s doubling
//! up to the heartbeat interval), registering again after any failure. It watches
//! the token file while it waits, so a rewritten token is used within half a second.
//!
//! Activity: once `$WORKSPACE_CONFIG_PATH/.active_tasks` exists (an integer, e.g. written
//! with `docker cp` by a test or by whatever runs tasks beside the agent), every
//! heartbeat carries `"active_tasks": N`, the original runtimes' field (0 once the file
//! is gone again; nothing before it ever existed). A change of the file, like a
//! change of the token, sends a heartbeat at once. The lifecycle autopilot never
//! suspends an agent that reports `active_tasks > 0`.
//!
//! A container thawed after a pause heartbeats at once: the operator writes the time
//! into `$WORKSPACE_CONFIG_PATH/.thawed` just before it unpauses a container, so the
//! change is waiting for the agent the moment it runs; and a wait that took much
//! longer than it asked for (the cgroup freezer stopped the process; thawed by
//! someone else) is cut short as well. Without the file a freeze shorter than one
//! wait could not be told apart from no freeze at all, and the first heartbeat after
//! the thaw came up to an interval late.
//!
//! std only, no crates: build.rs compiles this file with plain rustc into a static
//! binary for the `FROM scratch` image (see src/runtime/agent_image.rs); inotify
//! and poll are glibc's own functions, declared below. It logs one
//! line per state change to stderr and never logs more than the token's first 8 chars.
//! A token file longer than `MAX_TOKEN_FILE` bytes is not read: it holds no token.
//!
//! Hidden test modes (the image has no shell and nothing else; the tests run them in
//! a workspace's network namespace with `docker run --network container:<id>`):
//! - `--test-listen ADDR`: a hostile listener. Answers every request 200 and prints
//!   one line per request to stdout: method, path, the body's `workspace_id` and the
//!   bearer's first 8 characters (never more of it).
//! - `--test-probe URL`: one GET; prints `HTTP <status>` or `unreachable: <why>`.
//! - `--test-fill PATH BYTES`: makes PATH a sparse file of BYTES bytes (a huge token file).
//!
//! A warm-pool member (`MOLECULE_POOL` set, no `MOLECULE_WORKSPACE_ID`) has no identity
//! yet: it waits for `$MOLECULE_IDENTITY_FILE` (a Pod's mounted token Secret, key
//! `identity`) or else `$WORKSPACE_CONFIG_PATH/.identity` (written by the operator when
//! a workspace claims it, after the token file), watching the file's directory (or
//! looking every 10 ms without inotify), then registers as the workspace it names. The
//! file's lines: `workspace_id=`, `workspace_name=`, `env.NAME=VALUE` (the env overlay;
//! `\n` and `\\` escaped), and `end` last, so a file still being written is not taken.
//!
//! `molecule-agent pause` does nothing until SIGTERM: the local node runs it as the
//! sandbox that holds a Pod's network namespace (the role of Kubernetes' pause image).

use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::path::PathBuf;
use std::time::{Duration, Instant};
use std::{env, fs, process, thread};

const DEFAULT_HEARTBEAT_SECS: f64 = 30.0;
const MIN_BACKOFF: Duration = Duration::from_millis(500);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const IO_TIMEOUT: Duration = Duration::from_secs(10);
const TOKEN_FILE: &str = ".auth_token";
/// The activity file (see the module doc), in the config directory.
const ACTIVE_TASKS_FILE: &str = ".active_tasks";
/// What the operator rewrites just before it thaws the container, in the config directory.
const THAW_FILE: &str = ".thawed";
/// Longest token file read (a token is 43 characters): a longer one is not a token.
const MAX_TOKEN_FILE: u64 = 4096;
/// How often a waiting agent looks at the token file when it cannot watch it.
const TOKEN_POLL: Duration = Duration::from_millis(500);
/// How often it looks anyway while it watches (a change inotify did not report).
const WATCHED_POLL: Duration = Duration::from_secs(5);
/// The identity a claim writes into a pool member's `/configs`.
const IDENTITY_FILE: &str = ".identity";
/// How often a pool member looks for its identity when it cannot watch for it (a
/// stat: cheap, and the claim's latency is this at most).
const IDENTITY_POLL: Duration = Duration::from_millis(10);
/// How often it looks anyway while it watches.
const IDENTITY_WATCHED_POLL: Duration = Duration::from_secs(1);

fn main() {
    exit_on_sigterm();
    let args: Vec<String> = env::args().skip(1).collect();
    match args.iter().map(String::as_str).collect::<Vec<_>>()[..] {
        ["--version"] => {
            println!("molecule-agent {}", env!("CARGO_PKG_VERSION"));
            return;
        }
        ["--test-listen", addr] => test_mode::listen(addr),
        ["--test-probe", url] => test_mode::probe(url),
        ["--test-fill", path, bytes] => test_mode::fill(path, bytes),
        // The local node's Pod sandbox (src/node), which only holds the Pod's network
        // namespace until it is stopped.
        ["pause"] => loop {
            thread::sleep(Duration::from_secs(3600));
        },
        _ => {}
    }
    let cfg = match Config::from_env() {
        Ok(cfg) => cfg,
        Err(e) => {
            log(&format!("cannot start: {e}"));
            process::exit(2);
        }
    };
    log(&format!(
        "starting: workspace {}, registry http://{}{}, heartbeat every {:?}, token file {}",
        cfg.workspace_id,
        cfg.registry.authority,
        cfg.registry.path_prefix,
        cfg.heartbeat,
        cfg.token_path.display()
    ));
    run(&cfg)
}

/// Registers, heartbeats, and recovers from every failure by retrying; never returns.
fn run(cfg: &Config) -> ! {
    let mut token = TokenFile::new(cfg.token_path.clone());
    let watched: Vec<&std::path::Path> =
        [cfg.token_path.parent(), cfg.activity_path.parent()].into_iter().flatten().collect();
    let mut waker = wake::Waker::new(&watched);
    let mut activity = Activity { path: cfg.activity_path.clone(), reported: None };
    let mut thaw = Marker::new(cfg.thaw_path.clone());
    let mut registered = false;
    let mut backoff = MIN_BACKOFF;
    let mut last_state = String::new();
    loop {
        thaw.note();
        let token_changed = token.refresh();
        let endpoint = if registered { "heartbeat" } else { "register" };
        // Read every time (so a change is noted once); sent with heartbeats only.
        let active = activity.read().filter(|_| endpoint == "heartbeat");
        let outcome = post(&cfg.registry, endpoint, token.value(), &cfg.workspace_id, active);
        // Any failure means registering again.
        registered = matches!(outcome, Ok(200..=299));
        let (state, wait) = match outcome {
            Ok(200..=299) => {
                backoff = MIN_BACKOFF;
                let state = if endpoint == "register" { "registered" } else { "online: heartbeats accepted" };
                (state.to_string(), cfg.heartbeat)
            }
            Ok(401) => (
                format!("{endpoint} answered 401 for token {}; re-reading the token file", token.describe()),
                next_backoff(&mut backoff, cfg.heartbeat),
            ),
            Ok(status) => {
                (format!("{endpoint} answered HTTP {status}; retrying"), next_backoff(&mut backoff, cfg.heartbeat))
            }
            Err(e) => (format!("registry unreachable ({e}); retrying"), next_backoff(&mut backoff, cfg.heartbeat)),
        };
        if state != last_state || token_changed {
            log(&state);
            last_state = state;
        }
        // A rewritten token file cuts the wait short (at once after a 401 if it already
        // changed), as does a changed activity file or a thaw.
        token.wait_for_change(wait, &activity, &thaw, &mut waker);
    }
}

/// Returns the wait before the next attempt and doubles the backoff, capped at the heartbeat.
fn next_backoff(backoff: &mut Duration, cap: Duration) -> Duration {
    let wait = (*backoff).min(cap);
    *backoff = (*backoff * 2).min(cap);
    wait
}

struct Config {
    registry: Registry,
    workspace_id: String,
    heartbeat: Duration,
    token_path: PathBuf,
    activity_path: PathBuf,
    thaw_path: PathBuf,
}

/// A file whose every change means "now" (the thaw file): what it held when last noted.
struct Marker {
    path: PathBuf,
    seen: Option<String>,
}

impl Marker {
    fn new(path: PathBuf) -> Self {
        let seen = fs::read_to_string(&path).ok();
        Self { path, seen }
    }

    fn note(&mut self) {
        self.seen = fs::read_to_string(&self.path).ok();
    }

    fn changed(&self) -> bool {
        fs::read_to_string(&self.path).ok() != self.seen
    }
}

/// The activity file: what the last heartbeat reported from it (None: it never existed).
struct Activity {
    path: PathBuf,
    reported: Option<i64>,
}

impl Activity {
    /// The file's count, 0 once it is gone again; None while it never existed.
    fn current(&self) -> Option<i64> {
        match fs::read_to_string(&self.path) {
            Ok(text) => Some(text.trim().parse::<i64>().unwrap_or(0).max(0)),
            Err(_) => self.reported.map(|_| 0),
        }
    }

    /// What the next heartbeat reports, remembered.
    fn read(&mut self) -> Option<i64> {
        let now = self.current();
        if now.is_some() && now != self.reported {
            log(&format!("active tasks: {}", now.unwrap_or(0)));
        }
        self.reported = now.or(self.reported);
        now
    }

    fn changed(&self) -> bool {
        self.current() != self.reported
    }
}

impl Config {
    fn from_env() -> Result<Self, String> {
        let url = env::var("MOLECULE_REGISTRY_URL").map_err(|_| "MOLECULE_REGISTRY_URL is not set".to_string())?;
        let registry = Registry::parse(&url)?;
        let config_dir = PathBuf::from(env::var("WORKSPACE_CONFIG_PATH").unwrap_or_else(|_| "/configs".to_string()));
        let workspace_id = match (env::var("MOLECULE_WORKSPACE_ID"), env::var("MOLECULE_POOL")) {
            (Ok(id), _) => id,
            (Err(_), Ok(pool)) => {
                // A Pod's claim writes it into the mounted token Secret (the runtime
                // says where); a Docker container's into its config volume.
                let path = match env::var("MOLECULE_IDENTITY_FILE") {
                    Ok(path) if !path.is_empty() => PathBuf::from(path),
                    _ => config_dir.join(IDENTITY_FILE),
                };
                wait_for_identity(&pool, &path)
            }
            (Err(_), Err(_)) => return Err("MOLECULE_WORKSPACE_ID is not set".to_string()),
        };
        let heartbeat = match env::var("MOLECULE_HEARTBEAT_SECONDS") {
            Err(_) => DEFAULT_HEARTBEAT_SECS,
            Ok(s) => s
                .trim()
                .parse::<f64>()
                .ok()
                .filter(|v| v.is_finite() && *v > 0.0)
                .ok_or_else(|| format!("MOLECULE_HEARTBEAT_SECONDS={s:?} is not a positive number of seconds"))?,
        };
        // A Kubernetes Pod reads its token from a mounted Secret (MOLECULE_TOKEN_FILE);
        // a Docker container from its config volume.
        let token_path = match env::var("MOLECULE_TOKEN_FILE") {
            Ok(path) if !path.is_empty() => PathBuf::from(path),
            _ => config_dir.join(TOKEN_FILE),
        };
        let activity_path = config_dir.join(ACTIVE_TASKS_FILE);
        let thaw_path = config_dir.join(THAW_FILE);
        Ok(Self {
            registry,
            workspace_id,
            heartbeat: Duration::from_secs_f64(heartbeat),
            token_path,
            activity_path,
            thaw_path,
        })
    }
}

/// A pool member's wait for a claim: returns the workspace id once the identity file
/// is complete. The env overlay is for the runtime the agent would start; this agent
/// only counts it.
fn wait_for_identity(pool: &str, path: &std::path::Path) -> String {
    log(&format!("warm pool {pool} member: waiting for a claim ({})", path.display()));
    let mut waker = wake::Waker::new(&[path.parent().unwrap_or(std::path::Path::new("/"))]);
    let slice = if waker.watching() { IDENTITY_WATCHED_POLL } else { IDENTITY_POLL };
    loop {
        if let Ok(text) = fs::read_to_string(path)
            && text.lines().last() == Some("end")
        {
            let mut id = None;
            let mut name = String::new();
            let mut overlay = 0;
            for line in text.lines() {
                match line.split_once('=') {
                    Some(("workspace_id", v)) => id = Some(v.to_string()),
                    Some(("workspace_name", v)) => name = v.to_string(),
                    Some((k, _)) if k.starts_with("env.") => overlay += 1,
                    _ => {}
                }
            }
            if let Some(id) = id {
                log(&format!("claimed as {name} ({id}), {overlay} env overlay variable(s)"));
                return id;
            }
        }
        waker.wait(slice);
    }
}

/// `http://host:port[/prefix]`; plain HTTP only (the registry is the host's end of the
/// workspace's own network, or loopback on the host network).
struct Registry {
    /// `host:port`, used to connect and as the Host header.
    authority: String,
    path_prefix: String,
}

impl Registry {
    fn parse(url: &str) -> Result<Self, String> {
        let rest = url
            .strip_prefix("http://")
            .ok_or_else(|| format!("MOLECULE_REGISTRY_URL={url:?} must start with http://"))?;
        let (authority, prefix) = rest.split_once('/').map_or((rest, ""), |(a, p)| (a, p));
        if authority.is_empty() {
            return Err(format!("MOLECULE_REGISTRY_URL={url:?} has no host"));
        }
        let authority = if authority.rsplit_once(':').is_some_and(|(_, p)| p.parse::<u16>().is_ok()) {
            authority.to_string()
        } else {
            format!("{authority}:80")
        };
        let prefix = prefix.trim_end_matches('/');
        Ok(Self { authority, path_prefix: if prefix.is_empty() { String::new() } else { format!("/{prefix}") } })
    }
}

/// The token file's current content, re-read each time it may have changed.
struct TokenFile {
    path: PathBuf,
    content: Option<String>,
    loaded_once: bool,
}

impl TokenFile {
    fn new(path: PathBuf) -> Self {
        Self { path, content: None, loaded_once: false }
    }

    /// The trimmed token, or why there is none. Reads at most MAX_TOKEN_FILE + 1 bytes.
    fn read(&self) -> Result<String, String> {
        let mut bytes = Vec::new();
        let read = fs::File::open(&self.path).and_then(|f| f.take(MAX_TOKEN_FILE + 1).read_to_end(&mut bytes));
        match read {
            Ok(n) if n as u64 > MAX_TOKEN_FILE => Err(format!("the file is longer than {MAX_TOKEN_FILE} bytes")),
            Ok(_) => match String::from_utf8(bytes) {
                Ok(s) if s.trim().is_empty() => Err("the file is empty".to_string()),
                Ok(s) => Ok(s.trim().to_string()),
                Err(_) => Err("the file is not text".to_string()),
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err("no such file".to_string()),
            Err(e) => Err(e.to_string()),
        }
    }

    /// Re-reads the file; true (and one log line) when its content changed.
    fn refresh(&mut self) -> bool {
        let read = self.read();
        let now = read.as_ref().ok().cloned();
        let changed = !self.loaded_once || now != self.content;
        self.loaded_once = true;
        if changed {
            self.content = now;
            match read {
                Ok(_) => log(&format!("token loaded from {} ({})", self.path.display(), self.describe())),
                Err(why) => log(&format!("no token in {} ({why}); registering without one", self.path.display())),
            }
        }
        changed
    }

    /// Waits for `total`, returning early once the file's content differs from the last
    /// read, the activity file changed, or the process was thawed (the thaw file
    /// changed, or a wait took far longer than asked). Looks again whenever the
    /// watched directories change, and every `TOKEN_POLL` when they cannot be watched.
    fn wait_for_change(&self, total: Duration, activity: &Activity, thaw: &Marker, waker: &mut wake::Waker) {
        let deadline = Instant::now() + total;
        let poll = if waker.watching() { WATCHED_POLL } else { TOKEN_POLL };
        while self.read().ok() == self.content && !activity.changed() && !thaw.changed() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return;
            }
            let slice = left.min(poll);
            let before = std::time::SystemTime::now();
            waker.wait(slice);
            if before.elapsed().is_ok_and(|took| took > slice + Duration::from_secs(1)) {
                return; // frozen meanwhile: heartbeat now
            }
        }
    }

    fn value(&self) -> Option<&str> {
        self.content.as_deref()
    }

    /// What may be logged about the token: its first 8 characters at most.
    fn describe(&self) -> String {
        match &self.content {
            Some(t) => format!("prefix {}", t.chars().take(8).collect::<String>()),
            None => "none".to_string(),
        }
    }
}

/// What ends a wait early: a change in a watched directory (inotify). glibc's
/// functions, declared here: the agent has no crates. A wait falls back to plain
/// sleeping when a call fails.
mod wake {
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;
    use std::path::Path;
    use std::time::Duration;

    const O_NONBLOCK: i32 = 0o4000;
    const O_CLOEXEC: i32 = 0o2000000;
    const POLLIN: i16 = 1;
    // Only what ends a write, so a file is never read half-written: close after a
    // write, a rename into the directory (the operator's writes) or out of it (a
    // Secret volume's symlink swap), a deletion, a mode change.
    const IN_ATTRIB: u32 = 0x4;
    const IN_CLOSE_WRITE: u32 = 0x8;
    const IN_MOVED_FROM: u32 = 0x40;
    const IN_MOVED_TO: u32 = 0x80;
    const IN_DELETE: u32 = 0x200;
    const WATCH_MASK: u32 = IN_ATTRIB | IN_CLOSE_WRITE | IN_MOVED_FROM | IN_MOVED_TO | IN_DELETE;

    #[repr(C)]
    struct PollFd {
        fd: i32,
        events: i16,
        revents: i16,
    }

    unsafe extern "C" {
        fn inotify_init1(flags: i32) -> i32;
        fn inotify_add_watch(fd: i32, path: *const std::ffi::c_char, mask: u32) -> i32;
        fn poll(fds: *mut PollFd, nfds: u64, timeout: i32) -> i32;
        fn read(fd: i32, buf: *mut u8, count: usize) -> isize;
        fn close(fd: i32) -> i32;
    }

    /// Watches directories for finished writes; waits for them or the time to run out.
    pub struct Waker {
        inotify: i32,
    }

    impl Drop for Waker {
        fn drop(&mut self) {
            if self.inotify >= 0 {
                // SAFETY: closes the fd this struct owns, once.
                unsafe { close(self.inotify) };
            }
        }
    }

    impl Waker {
        /// Watches `dirs` (those that exist; none at all: every wait is a plain sleep).
        pub fn new(dirs: &[&Path]) -> Self {
            // SAFETY: plain syscalls on an fd this struct owns; the paths are NUL-terminated.
            let inotify = unsafe { inotify_init1(O_NONBLOCK | O_CLOEXEC) };
            let mut watching = false;
            if inotify >= 0 {
                for dir in dirs {
                    let Ok(path) = CString::new(dir.as_os_str().as_bytes()) else { continue };
                    watching |= unsafe { inotify_add_watch(inotify, path.as_ptr(), WATCH_MASK) } >= 0;
                }
                if !watching {
                    unsafe { close(inotify) };
                }
            }
            Self { inotify: if watching { inotify } else { -1 } }
        }

        /// Whether a change in the directories ends a wait (else the caller polls).
        pub fn watching(&self) -> bool {
            self.inotify >= 0
        }

        /// Waits up to `timeout` for a change in a watched directory (true) or the time
        /// to run out (false).
        pub fn wait(&mut self, timeout: Duration) -> bool {
            if self.inotify < 0 {
                std::thread::sleep(timeout);
                return false;
            }
            let mut fd = PollFd { fd: self.inotify, events: POLLIN, revents: 0 };
            let ms = timeout.as_millis().clamp(0, i32::MAX as u128) as i32;
            // SAFETY: one valid pollfd.
            let n = unsafe { poll(&mut fd, 1, ms) };
            if n < 0 {
                // Interrupted or failed: never spin; the caller looks again after this.
                std::thread::sleep(timeout.min(Duration::from_millis(500)));
                return false;
            }
            if n > 0 && fd.revents != 0 {
                let mut buf = [0u8; 4096];
                // SAFETY: reads into a buffer of the given size; the fd is non-blocking.
                while unsafe { read(self.inotify, buf.as_mut_ptr(), buf.len()) } > 0 {}
                return true;
            }
            false
        }
    }
}

/// POSTs `{"workspace_id": ...[, "active_tasks": N]}` to `/registry/<endpoint>` and
/// returns the HTTP status.
fn post(
    registry: &Registry,
    endpoint: &str,
    token: Option<&str>,
    workspace_id: &str,
    active_tasks: Option<i64>,
) -> Result<u16, String> {
    let active = active_tasks.map(|n| format!(",\"active_tasks\":{n}")).unwrap_or_default();
    let body = format!("{{\"workspace_id\":\"{}\"{active}}}", json_escape(workspace_id));
    request(registry, "POST", &format!("/registry/{endpoint}"), token, Some(&body))
}

/// One HTTP/1.1 request to `path` under the registry's prefix (a JSON body if given);
/// returns the status.
fn request(
    registry: &Registry,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<&str>,
) -> Result<u16, String> {
    let addrs: Vec<_> = registry
        .authority
        .to_socket_addrs()
        .map_err(|e| format!("cannot resolve {}: {e}", registry.authority))?
        .collect();
    let mut last_err = format!("{} resolves to no address", registry.authority);
    let mut stream = None;
    for addr in &addrs {
        match TcpStream::connect_timeout(addr, CONNECT_TIMEOUT) {
            Ok(s) => {
                stream = Some(s);
                break;
            }
            Err(e) => last_err = format!("connect {addr}: {e}"),
        }
    }
    let mut stream = stream.ok_or(last_err)?;
    stream.set_read_timeout(Some(IO_TIMEOUT)).map_err(|e| e.to_string())?;
    stream.set_write_timeout(Some(IO_TIMEOUT)).map_err(|e| e.to_string())?;

    let auth = token.map(|t| format!("Authorization: Bearer {t}\r\n")).unwrap_or_default();
    let content =
        body.map(|b| format!("Content-Type: application/json\r\nContent-Length: {}\r\n", b.len())).unwrap_or_default();
    let target = format!("{}{path}", registry.path_prefix);
    let request = format!(
        "{method} {} HTTP/1.1\r\nHost: {}\r\nUser-Agent: molecule-agent\r\n{auth}{content}Connection: close\r\n\r\n{}",
        if target.is_empty() { "/" } else { &target },
        registry.authority,
        body.unwrap_or_default()
    );
    stream.write_all(request.as_bytes()).map_err(|e| format!("send: {e}"))?;

    // Connection: close, so the response ends at EOF; only the status line matters.
    let mut response = Vec::new();
    let _ = stream.take(64 * 1024).read_to_end(&mut response);
    let status_line = response.split(|b| *b == b'\n').next().unwrap_or_default();
    let status_line = String::from_utf8_lossy(status_line);
    let mut parts = status_line.split_whitespace();
    match (parts.next(), parts.next().and_then(|c| c.parse::<u16>().ok())) {
        (Some(v), Some(code)) if v.starts_with("HTTP/") => Ok(code),
        _ if response.is_empty() => Err("connection closed without a response".to_string()),
        _ => Err(format!("malformed response {:?}", status_line.chars().take(40).collect::<String>())),
    }
}

/// Tools for the tests (see the module doc); each runs instead of the agent.
mod test_mode {
    use std::io::{BufRead, BufReader, Read, Write};
    use std::net::{TcpListener, TcpStream};
    use std::time::Duration;
    use std::{fs, process};

    pub fn listen(addr: &str) -> ! {
        let listener = match TcpListener::bind(addr) {
            Ok(l) => l,
            Err(e) => {
                println!("cannot listen on {addr}: {e}");
                process::exit(1);
            }
        };
        println!("listening on {addr}");
        for conn in listener.incoming().flatten() {
            let line = serve(conn).unwrap_or_else(|e| format!("unreadable request: {e}"));
            println!("{line}");
            let _ = std::io::stdout().flush();
        }
        process::exit(0)
    }

    /// Reads one request, answers 200, and describes what it carried.
    fn serve(mut conn: TcpStream) -> std::io::Result<String> {
        conn.set_read_timeout(Some(Duration::from_secs(5)))?;
        let mut reader = BufReader::new(conn.try_clone()?);
        let mut request_line = String::new();
        reader.read_line(&mut request_line)?;
        let (mut length, mut bearer) = (0u64, None);
        loop {
            let mut header = String::new();
            if reader.read_line(&mut header)? == 0 || header.trim().is_empty() {
                break;
            }
            let (name, value) = header.split_once(':').unwrap_or((&header, ""));
            match name.trim().to_ascii_lowercase().as_str() {
                "content-length" => length = value.trim().parse().unwrap_or(0),
                "authorization" => {
                    bearer = value.trim().strip_prefix("Bearer ").map(|t| t.chars().take(8).collect::<String>())
                }
                _ => {}
            }
        }
        let mut body = String::new();
        reader.take(length.min(16 * 1024)).read_to_string(&mut body)?;
        let workspace =
            body.split("\"workspace_id\"").nth(1).and_then(|rest| rest.split('"').nth(1)).unwrap_or("-").to_string();
        let answer = "{\"status\":\"ok\"}";
        write!(
            conn,
            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{answer}",
            answer.len()
        )?;
        let mut parts = request_line.split_whitespace();
        let (method, path) = (parts.next().unwrap_or("-"), parts.next().unwrap_or("-"));
        Ok(format!(
            "request {method} {path} workspace_id={workspace} bearer_prefix={}",
            bearer.as_deref().unwrap_or("-")
        ))
    }

    pub fn probe(url: &str) -> ! {
        let outcome = super::Registry::parse(url).and_then(|r| super::request(&r, "GET", "", None, None));
        match outcome {
            Ok(code) => println!("HTTP {code}"),
            Err(e) => println!("unreachable: {e}"),
        }
        process::exit(0)
    }

    pub fn fill(path: &str, bytes: &str) -> ! {
        let Ok(bytes) = bytes.parse::<u64>() else {
            println!("{bytes:?} is not a number of bytes");
            process::exit(2);
        };
        match fs::File::create(path).and_then(|f| f.set_len(bytes)) {
            Ok(()) => println!("{path} is now {bytes} bytes"),
            Err(e) => {
                println!("cannot fill {path}: {e}");
                process::exit(1);
            }
        }
        process::exit(0)
    }
}

fn json_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out
}

fn log(line: &str) {
    eprintln!("molecule-agent: {line}");
}

/// Docker runs us under its init (`init: true`), where SIGTERM's default action already
/// ends us; as PID 1 without an init the kernel would ignore it, so exit explicitly.
fn exit_on_sigterm() {
    const SIGINT: i32 = 2;
    const SIGTERM: i32 = 15;
    unsafe extern "C" {
        fn signal(signum: i32, handler: extern "C" fn(i32)) -> usize;
        fn _exit(status: i32) -> !;
    }
    extern "C" fn on_signal(_: i32) {
        // SAFETY: _exit is async-signal-safe.
        unsafe { _exit(0) }
    }
    // SAFETY: installs a handler that only calls an async-signal-safe function.
    unsafe {
        signal(SIGTERM, on_signal);
        signal(SIGINT, on_signal);
    }
}
