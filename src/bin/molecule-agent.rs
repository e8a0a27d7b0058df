//! molecule-agent: the smallest workspace agent that behaves like the real runtimes.
//!
//! It reads its token from `$WORKSPACE_CONFIG_PATH/.auth_token`, registers at
//! `$MOLECULE_REGISTRY_URL/registry/register`, then heartbeats every
//! `$MOLECULE_HEARTBEAT_SECONDS` at `/registry/heartbeat`. It never exits on a 401
//! or a connection error: it retries with capped exponential backoff (0.5 s doubling
//! up to the heartbeat interval), registering again after any failure. It watches
//! the token file while it waits, so a rewritten token is used within half a second.
//!
//! std only, no crates: build.rs compiles this file with plain rustc into a static
//! binary for the `FROM scratch` image (see src/runtime/agent_image.rs). It logs one
//! line per state change to stderr and never logs more than the token's first 8 chars.
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
/// How often a waiting agent looks at the token file.
const TOKEN_POLL: Duration = Duration::from_millis(500);

fn main() {
    exit_on_sigterm();
    // `molecule-agent pause`: the local node's Pod sandbox (src/node), which only
    // holds the Pod's network namespace until it is stopped.
    if env::args().nth(1).as_deref() == Some("pause") {
        loop {
            thread::sleep(Duration::from_secs(3600));
        }
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
    let mut registered = false;
    let mut backoff = MIN_BACKOFF;
    let mut last_state = String::new();
    loop {
        let token_changed = token.refresh();
        let endpoint = if registered { "heartbeat" } else { "register" };
        let outcome = post(&cfg.registry, endpoint, token.value(), &cfg.workspace_id);
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
        // A rewritten token file cuts the wait short (at once after a 401 if it already changed).
        token.wait_for_change(wait);
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
}

impl Config {
    fn from_env() -> Result<Self, String> {
        let url = env::var("MOLECULE_REGISTRY_URL").map_err(|_| "MOLECULE_REGISTRY_URL is not set".to_string())?;
        let registry = Registry::parse(&url)?;
        let workspace_id =
            env::var("MOLECULE_WORKSPACE_ID").map_err(|_| "MOLECULE_WORKSPACE_ID is not set".to_string())?;
        let heartbeat = match env::var("MOLECULE_HEARTBEAT_SECONDS") {
            Err(_) => DEFAULT_HEARTBEAT_SECS,
            Ok(s) => s
                .trim()
                .parse::<f64>()
                .ok()
                .filter(|v| v.is_finite() && *v > 0.0)
                .ok_or_else(|| format!("MOLECULE_HEARTBEAT_SECONDS={s:?} is not a positive number of seconds"))?,
        };
        let dir = env::var("WORKSPACE_CONFIG_PATH").unwrap_or_else(|_| "/configs".to_string());
        Ok(Self {
            registry,
            workspace_id,
            heartbeat: Duration::from_secs_f64(heartbeat),
            token_path: PathBuf::from(dir).join(TOKEN_FILE),
        })
    }
}

/// `http://host:port[/prefix]`; plain HTTP only (the registry listens on loopback).
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

    /// The trimmed token, or why there is none.
    fn read(&self) -> Result<String, String> {
        match fs::read_to_string(&self.path) {
            Ok(s) if s.trim().is_empty() => Err("the file is empty".to_string()),
            Ok(s) => Ok(s.trim().to_string()),
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

    /// Sleeps for `total`, returning early once the file's content differs from the last read.
    fn wait_for_change(&self, total: Duration) {
        let deadline = Instant::now() + total;
        while self.read().ok() == self.content {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return;
            }
            thread::sleep(left.min(TOKEN_POLL));
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

/// POSTs `{"workspace_id": ...}` to `/registry/<endpoint>` and returns the HTTP status.
fn post(registry: &Registry, endpoint: &str, token: Option<&str>, workspace_id: &str) -> Result<u16, String> {
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

    let body = format!("{{\"workspace_id\":\"{}\"}}", json_escape(workspace_id));
    let auth = token.map(|t| format!("Authorization: Bearer {t}\r\n")).unwrap_or_default();
    let request = format!(
        "POST {}/registry/{endpoint} HTTP/1.1\r\nHost: {}\r\nUser-Agent: molecule-agent\r\n{auth}\
         Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        registry.path_prefix,
        registry.authority,
        body.len()
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
