//! A unix-socket proxy in front of the real Docker daemon that a test can cut and
//! restore: the operator sees the daemon vanish and come back, without touching
//! the daemon other tests share.

use std::sync::{Arc, Mutex};

/// A unix-socket proxy to the real daemon that can be cut and restored, to
/// interrupt the event stream without restarting Docker.
pub struct SocketProxy {
    pub path: std::path::PathBuf,
    accept: Option<tokio::task::JoinHandle<()>>,
    connections: Arc<Mutex<Vec<tokio::task::JoinHandle<()>>>>,
}

impl SocketProxy {
    pub fn start(path: std::path::PathBuf) -> Self {
        let mut proxy = Self { path, accept: None, connections: Arc::default() };
        proxy.restore();
        proxy
    }

    pub fn restore(&mut self) {
        let listener = tokio::net::UnixListener::bind(&self.path).unwrap();
        let connections = Arc::clone(&self.connections);
        self.accept = Some(tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                connections.lock().unwrap().push(tokio::spawn(async move {
                    if let Ok(mut daemon) = tokio::net::UnixStream::connect("/var/run/docker.sock").await {
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut daemon).await;
                    }
                }));
            }
        }));
    }

    /// Drops every connection and stops listening: clients see the daemon vanish.
    pub fn cut(&mut self) {
        if let Some(accept) = self.accept.take() {
            accept.abort();
        }
        for connection in self.connections.lock().unwrap().drain(..) {
            connection.abort();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

impl Drop for SocketProxy {
    fn drop(&mut self) {
        self.cut();
    }
}

/// The same for TCP (e.g. in front of Postgres): `cut` drops every connection and
/// stops listening; `restore` listens again on the same port.
pub struct TcpProxy {
    pub port: u16,
    target: std::net::SocketAddr,
    accept: Option<tokio::task::JoinHandle<()>>,
    connections: Arc<Mutex<Vec<tokio::task::JoinHandle<()>>>>,
    /// While set, nothing is forwarded either way and nothing is closed: a network
    /// that silently drops packets, which only a client's own deadlines notice.
    black_hole: Arc<std::sync::atomic::AtomicBool>,
}

impl TcpProxy {
    pub async fn start(target: std::net::SocketAddr) -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let mut proxy = Self { port, target, accept: None, connections: Arc::default(), black_hole: Arc::default() };
        proxy.restore().await;
        proxy
    }

    pub async fn restore(&mut self) {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", self.port)).await.unwrap();
        let (connections, target) = (Arc::clone(&self.connections), self.target);
        let hole = Arc::clone(&self.black_hole);
        self.accept = Some(tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let hole = Arc::clone(&hole);
                connections.lock().unwrap().push(tokio::spawn(async move {
                    if let Ok(server) = tokio::net::TcpStream::connect(target).await {
                        let (client_read, client_write) = client.into_split();
                        let (server_read, server_write) = server.into_split();
                        tokio::join!(
                            pump(client_read, server_write, Arc::clone(&hole)),
                            pump(server_read, client_write, hole)
                        );
                    }
                }));
            }
        }));
    }

    pub fn cut(&mut self) {
        if let Some(accept) = self.accept.take() {
            accept.abort();
        }
        for connection in self.connections.lock().unwrap().drain(..) {
            connection.abort();
        }
    }
}

impl TcpProxy {
    /// Stops forwarding without closing anything (`false` resumes).
    pub fn black_hole(&self, on: bool) {
        self.black_hole.store(on, std::sync::atomic::Ordering::SeqCst);
    }
}

/// Copies one direction; while the black hole is on, what arrives is dropped.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    hole: Arc<std::sync::atomic::AtomicBool>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if hole.load(std::sync::atomic::Ordering::SeqCst) {
            continue;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            break;
        }
    }
    let _ = to.shutdown().await;
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        self.cut();
    }
}

/// Faults a [`FaultProxy`] injects, each a probability per request (the rest are
/// forwarded untouched).
#[derive(Clone, Copy, Debug, Default)]
pub struct Faults {
    /// Answer 500 with a Docker-style error body.
    pub error_500: f64,
    /// Drop the connection without an answer.
    pub reset: f64,
    /// Forward after `delay`.
    pub slow: f64,
    pub delay: std::time::Duration,
    /// Never answer (the client's own timeout ends it).
    pub hang: f64,
}

/// Counts of what a [`FaultProxy`] did.
#[derive(Debug, Default)]
pub struct FaultCounts {
    pub forwarded: std::sync::atomic::AtomicU64,
    pub faulted: std::sync::atomic::AtomicU64,
}

/// An HTTP-aware unix-socket proxy to the real Docker daemon that fails requests at
/// random (seeded): 500s, dropped connections, delays and hangs.
pub struct FaultProxy {
    pub path: std::path::PathBuf,
    pub counts: Arc<FaultCounts>,
    faults: Arc<Mutex<Faults>>,
    accept: tokio::task::JoinHandle<()>,
}

impl FaultProxy {
    pub fn start(path: std::path::PathBuf, seed: u64) -> Self {
        let listener = tokio::net::UnixListener::bind(&path).unwrap();
        let faults: Arc<Mutex<Faults>> = Arc::default();
        let counts: Arc<FaultCounts> = Arc::default();
        let rng = Arc::new(Mutex::new(seed.max(1)));
        let (f, c) = (faults.clone(), counts.clone());
        let accept = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let (f, c, rng) = (f.clone(), c.clone(), rng.clone());
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req| {
                        let pick = pick(&f.lock().unwrap(), &mut rng.lock().unwrap());
                        let c = c.clone();
                        async move { answer(req, pick, &c).await }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(client), service)
                        .await;
                });
            }
        });
        Self { path, counts, faults, accept }
    }

    /// From now on, inject these faults (`Faults::default()` heals the proxy).
    pub fn set(&self, faults: Faults) {
        *self.faults.lock().unwrap() = faults;
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.accept.abort();
        let _ = std::fs::remove_file(&self.path);
    }
}

#[derive(Clone, Copy, Debug)]
enum Pick {
    Forward,
    Error500,
    Reset,
    Slow(std::time::Duration),
    Hang,
}

/// xorshift64: reproducible from the seed.
fn next(state: &mut u64) -> f64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    (*state >> 11) as f64 / (1u64 << 53) as f64
}

fn pick(f: &Faults, rng: &mut u64) -> Pick {
    let x = next(rng);
    let mut edge = f.error_500;
    if x < edge {
        return Pick::Error500;
    }
    edge += f.reset;
    if x < edge {
        return Pick::Reset;
    }
    edge += f.slow;
    if x < edge {
        return Pick::Slow(f.delay);
    }
    edge += f.hang;
    if x < edge {
        return Pick::Hang;
    }
    Pick::Forward
}

type ProxyBody = http_body_util::combinators::BoxBody<bytes::Bytes, hyper::Error>;

async fn answer(
    req: hyper::Request<hyper::body::Incoming>,
    pick: Pick,
    counts: &FaultCounts,
) -> Result<hyper::Response<ProxyBody>, std::io::Error> {
    use http_body_util::BodyExt;
    use std::sync::atomic::Ordering;
    let faulted = || counts.faulted.fetch_add(1, Ordering::Relaxed);
    match pick {
        Pick::Forward => {}
        Pick::Error500 => {
            faulted();
            let body = http_body_util::Full::new(bytes::Bytes::from_static(b"{\"message\":\"injected fault\"}"))
                .map_err(|never| match never {})
                .boxed();
            let mut r = hyper::Response::new(body);
            *r.status_mut() = hyper::StatusCode::INTERNAL_SERVER_ERROR;
            r.headers_mut().insert("content-type", "application/json".parse().unwrap());
            return Ok(r);
        }
        Pick::Reset => {
            faulted();
            return Err(std::io::Error::other("injected connection reset"));
        }
        Pick::Slow(d) => {
            faulted();
            tokio::time::sleep(d).await;
        }
        Pick::Hang => {
            faulted();
            std::future::pending::<()>().await;
        }
    }
    counts.forwarded.fetch_add(1, Ordering::Relaxed);
    let daemon = tokio::net::UnixStream::connect("/var/run/docker.sock").await?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(daemon))
        .await
        .map_err(std::io::Error::other)?;
    tokio::spawn(conn);
    let response = sender.send_request(req).await.map_err(std::io::Error::other)?;
    Ok(response.map(|b| b.boxed()))
}
