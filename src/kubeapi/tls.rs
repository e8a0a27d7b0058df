//! TLS for the local API. kubectl (client-go's clientcmd) sends a kubeconfig's
//! credentials only over TLS, so a bearer token over plain http never arrives:
//! the server uses a self-signed certificate for 127.0.0.1 and localhost, kept in
//! `STATE/kube-api/` so restarts keep it, and the kubeconfig trusts exactly it.

use std::io;
use std::net::SocketAddr;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;

/// A TLS handshake that takes longer than this is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The server's certificate and key (PEM).
#[derive(Clone)]
pub struct KubeTls {
    cert_pem: String,
    key_pem: String,
}

impl std::fmt::Debug for KubeTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeTls").finish_non_exhaustive()
    }
}

impl KubeTls {
    /// Loads `STATE_DIR/kube-api/tls.crt` and `tls.key`, creating a self-signed
    /// pair for 127.0.0.1 and localhost first when they are missing.
    pub fn load_or_create(state_dir: &Path) -> io::Result<Self> {
        let dir = Self::dir(state_dir);
        let (cert_path, key_path) = (dir.join("tls.crt"), dir.join("tls.key"));
        if cert_path.exists() && key_path.exists() {
            return Ok(Self {
                cert_pem: std::fs::read_to_string(cert_path)?,
                key_pem: std::fs::read_to_string(key_path)?,
            });
        }
        std::fs::DirBuilder::new().recursive(true).mode(0o700).create(&dir)?;
        let tls = Self::generate()?;
        write_private(&key_path, &tls.key_pem)?;
        write_private(&cert_path, &tls.cert_pem)?;
        Ok(tls)
    }

    /// Where the pair lives: `STATE/kube-api/` (`tls.crt`, `tls.key`).
    pub fn dir(state_dir: &Path) -> std::path::PathBuf {
        state_dir.join("kube-api")
    }

    /// A fresh self-signed pair, kept in memory only.
    pub fn generate() -> io::Result<Self> {
        let names = vec!["127.0.0.1".to_string(), "localhost".to_string(), "::1".to_string()];
        let pair = rcgen::generate_simple_self_signed(names)
            .map_err(|e| io::Error::other(format!("cannot make the kube-api TLS certificate: {e}")))?;
        Ok(Self { cert_pem: pair.cert.pem(), key_pem: pair.key_pair.serialize_pem() })
    }

    /// The certificate clients must trust (the kubeconfig's certificate-authority-data).
    pub fn ca_pem(&self) -> &str {
        &self.cert_pem
    }

    fn acceptor(&self) -> io::Result<TlsAcceptor> {
        let invalid = |what: &str, e: &dyn std::fmt::Display| {
            io::Error::new(io::ErrorKind::InvalidData, format!("the kube-api TLS {what} is unusable: {e}"))
        };
        let certs = CertificateDer::pem_slice_iter(self.cert_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| invalid("certificate (tls.crt)", &e))?;
        let key = PrivateKeyDer::from_pem_slice(self.key_pem.as_bytes()).map_err(|e| invalid("key (tls.key)", &e))?;
        let mut config =
            rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()
                .map_err(|e| invalid("configuration", &e))?
                .with_no_client_auth()
                .with_single_cert(certs, key)
                .map_err(|e| invalid("certificate and key (tls.crt, tls.key)", &e))?;
        // axum serves HTTP/1.1 here (its http2 feature is off).
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(TlsAcceptor::from(Arc::new(config)))
    }
}

fn write_private(path: &Path, text: &str) -> io::Result<()> {
    use std::io::Write;
    let mut file = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(path)?;
    file.write_all(text.as_bytes())?;
    file.sync_all()
}

/// A TCP listener whose connections are TLS; handshakes run concurrently, so a
/// slow or broken client never holds up the others.
pub struct TlsListener {
    local: SocketAddr,
    ready: mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr)>,
    accepting: tokio::task::JoinHandle<()>,
}

impl TlsListener {
    pub fn new(tcp: TcpListener, tls: &KubeTls) -> io::Result<Self> {
        let acceptor = tls.acceptor()?;
        let local = tcp.local_addr()?;
        let (tx, ready) = mpsc::channel(64);
        let accepting = tokio::spawn(async move {
            loop {
                let (stream, peer) = match tcp.accept().await {
                    Ok(accepted) => accepted,
                    Err(error) => {
                        tracing::warn!(%error, "kube-api: accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let (acceptor, tx) = (acceptor.clone(), tx.clone());
                tokio::spawn(async move {
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                        Ok(Ok(tls)) => {
                            let _ = tx.send((tls, peer)).await;
                        }
                        Ok(Err(error)) => tracing::debug!(%peer, %error, "kube-api: TLS handshake failed"),
                        Err(_) => tracing::debug!(%peer, "kube-api: TLS handshake timed out"),
                    }
                });
            }
        });
        Ok(Self { local, ready, accepting })
    }
}

impl Drop for TlsListener {
    fn drop(&mut self) {
        self.accepting.abort();
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.ready.recv().await {
            Some(accepted) => accepted,
            // The accept loop only ends when this listener is dropped.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        Ok(self.local)
    }
}
