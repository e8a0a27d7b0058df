//! A running local Kubernetes API (src/kubeapi) for one test: 127.0.0.1, a random
//! port, its kubeconfig, a private HOME for kubectl, and helpers to run kubectl and
//! to send raw requests.
#![allow(dead_code)]

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use molecule::kubeapi::{self, KubeApi};
use molecule::store::{self, DynStore};
use serde_json::Value;

pub const TOKEN: &str = "test-admin-token-0123456789";

/// A running API server on 127.0.0.1:random, its kubeconfig, and a private HOME for kubectl.
pub struct Server {
    pub url: String,
    pub kubeconfig: PathBuf,
    pub ca: reqwest::Certificate,
    /// Writes through the API (from `Bound::subscribe`; None when started without `bind`).
    pub changes: Option<tokio::sync::broadcast::Receiver<Arc<kubeapi::WatchEvent>>>,
    pub home: tempfile::TempDir,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Server {
    /// Through the entry point `up --kube-api` uses.
    pub async fn start(store: DynStore, state_dir: &Path) -> Self {
        let bound =
            kubeapi::bind(store, TOKEN, "127.0.0.1:0".parse().unwrap(), state_dir).await.expect("the API binds");
        let (url, kubeconfig) = (bound.url.clone(), bound.kubeconfig.clone());
        let mode = std::fs::metadata(&kubeconfig).expect("the kubeconfig exists").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "the kubeconfig holds the admin token");
        let tls = kubeapi::KubeTls::load_or_create(state_dir).expect("the TLS pair bind made");
        let changes = bound.subscribe();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            bound
                .serve(async {
                    let _ = stopped.await;
                })
                .await
                .expect("the API serves");
        });
        let ca = reqwest::Certificate::from_pem(tls.ca_pem().as_bytes()).expect("the CA parses");
        Self {
            url,
            kubeconfig,
            ca,
            changes: Some(changes),
            home: tempfile::tempdir().expect("a HOME"),
            stop: Some(stop),
            task: Some(task),
        }
    }

    pub async fn start_with(api: KubeApi, state_dir: &Path) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("a loopback port");
        let url = format!("https://{}", listener.local_addr().expect("bound"));
        let tls = kubeapi::KubeTls::load_or_create(state_dir).expect("the TLS pair");
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let router = kubeapi::router(Arc::new(api));
        let serving_tls = tls.clone();
        let task = tokio::spawn(async move {
            kubeapi::serve(listener, router, &serving_tls, async {
                let _ = stopped.await;
            })
            .await
            .expect("the API serves");
        });
        let kubeconfig = kubeapi::write_kubeconfig(state_dir, &url, TOKEN, &tls).expect("the kubeconfig is written");
        let ca = reqwest::Certificate::from_pem(tls.ca_pem().as_bytes()).expect("the CA parses");
        Self {
            url,
            kubeconfig,
            ca,
            changes: None,
            home: tempfile::tempdir().expect("a HOME"),
            stop: Some(stop),
            task: Some(task),
        }
    }

    /// Stops serving (open watches are dropped with the runtime's tasks).
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            // Graceful: open watches end at once, so this is quick.
            tokio::time::timeout(Duration::from_secs(5), task)
                .await
                .expect("the API shuts down within 5 s, open watches included")
                .expect("the API task ends cleanly");
        }
    }

    pub fn kubectl_command(&self, args: &[&str]) -> tokio::process::Command {
        let mut cmd = tokio::process::Command::new("kubectl");
        cmd.arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .args(args)
            .env("HOME", self.home.path())
            .env("KUBECACHEDIR", self.home.path().join("cache"))
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        cmd
    }

    /// Runs kubectl; returns (success, stdout, stderr).
    pub async fn kubectl(&self, args: &[&str]) -> (bool, String, String) {
        let out = tokio::time::timeout(Duration::from_secs(30), self.kubectl_command(args).output())
            .await
            .unwrap_or_else(|_| panic!("kubectl {args:?} took more than 30 s"))
            .expect("kubectl runs (is it installed?)");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// Runs kubectl and expects success; returns stdout.
    pub async fn ok(&self, args: &[&str]) -> String {
        let (ok, out, err) = self.kubectl(args).await;
        assert!(ok, "kubectl {args:?} failed:\nstdout: {out}\nstderr: {err}");
        out
    }

    pub fn http(&self) -> reqwest::Client {
        reqwest::Client::builder().add_root_certificate(self.ca.clone()).build().expect("an HTTPS client")
    }

    pub async fn get_json(&self, path: &str) -> (u16, Value) {
        let resp = self.http().get(format!("{}{path}", self.url)).bearer_auth(TOKEN).send().await.expect("GET");
        let code = resp.status().as_u16();
        (code, resp.json().await.unwrap_or(Value::Null))
    }
}

pub async fn sqlite_store(dir: &Path) -> DynStore {
    store::open(&dir.join("state.db").display().to_string()).await.expect("the SQLite store opens")
}

pub fn write(dir: &Path, name: &str, text: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, text).expect("a manifest is written");
    path.display().to_string()
}

impl Server {
    /// Any request with the admin token: (status, JSON body or Null).
    pub async fn request(&self, method: reqwest::Method, path: &str, content_type: &str, body: &str) -> (u16, Value) {
        let mut req = self.http().request(method, format!("{}{path}", self.url)).bearer_auth(TOKEN);
        if !content_type.is_empty() {
            req = req.header("content-type", content_type).body(body.to_string());
        }
        let resp = req.send().await.expect("the request is answered");
        let code = resp.status().as_u16();
        (code, resp.json().await.unwrap_or(Value::Null))
    }
}
