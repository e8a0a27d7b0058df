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
}

impl TcpProxy {
    pub async fn start(target: std::net::SocketAddr) -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let mut proxy = Self { port, target, accept: None, connections: Arc::default() };
        proxy.restore().await;
        proxy
    }

    pub async fn restore(&mut self) {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", self.port)).await.unwrap();
        let (connections, target) = (Arc::clone(&self.connections), self.target);
        self.accept = Some(tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                connections.lock().unwrap().push(tokio::spawn(async move {
                    if let Ok(mut server) = tokio::net::TcpStream::connect(target).await {
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
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

impl Drop for TcpProxy {
    fn drop(&mut self) {
        self.cut();
    }
}
