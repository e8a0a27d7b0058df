//! The admin API client: finds the running operator (`--server`, else
//! `STATE/address`), authenticates with `STATE/admin-token`, and turns every failure
//! into a sentence that says what to do.

use std::path::{Path, PathBuf};
use std::time::Duration;

use reqwest::{Method, StatusCode, Url};
use serde::de::DeserializeOwned;

use super::ClientArgs;
use crate::api::ObjectKey;
use crate::registry::events::FleetEvent;
use crate::registry::views::{ActionResponse, ErrorBody, TeamSummary, WorkspaceDetail, WorkspaceSummary};
use crate::registry::{address_path, admin_token_path};

const TIMEOUT: Duration = Duration::from_secs(10);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error("{0}")]
    Input(String),
    #[error(
        "cannot find the running operator: {path} does not exist ({source}). Is `molecule-operator up` running with --state {state}? Or name it with --server URL"
    )]
    NoAddress { path: PathBuf, state: PathBuf, source: std::io::Error },
    #[error("--server {url:?} is not a URL like http://127.0.0.1:8080")]
    BadServer { url: String },
    #[error(
        "cannot read the admin token {path} ({source}); the operator creates it on first start: pass --state with the directory the operator runs with"
    )]
    NoAdminToken { path: PathBuf, source: std::io::Error },
    #[error("the operator is not running at {url} (is `molecule-operator up` running? {hint})")]
    Unreachable { url: String, hint: String },
    #[error("the operator at {url} did not answer within {}s", TIMEOUT.as_secs())]
    Timeout { url: String },
    #[error(
        "the operator at {url} refused the admin token from {path} (401): is --state the directory that operator runs with?"
    )]
    Unauthorized { url: String, path: PathBuf },
    #[error("{0}")]
    NotFound(String),
    #[error("the operator at {url} answered {status}: {message}")]
    Server { url: String, status: StatusCode, message: String },
    #[error("unexpected answer from {url}: {message}")]
    Protocol { url: String, message: String },
    #[error("cannot print the result: {0}")]
    Output(String),
}

/// Where the address came from, for error messages.
#[derive(Clone, Debug)]
enum AddressFrom {
    Flag,
    File(PathBuf),
}

/// A connection to one running operator's admin API.
#[derive(Clone, Debug)]
pub struct Client {
    http: reqwest::Client,
    base: Url,
    admin_token: String,
    token_path: PathBuf,
    from: AddressFrom,
}

impl Client {
    /// Reads the address (unless `--server`) and the admin token from the state dir.
    pub fn new(args: &ClientArgs) -> Result<Self, CliError> {
        let (server, from) = match &args.server {
            Some(s) => (s.trim().to_string(), AddressFrom::Flag),
            None => {
                let path = address_path(&args.state);
                let text = std::fs::read_to_string(&path).map_err(|source| CliError::NoAddress {
                    path: path.clone(),
                    state: args.state.clone(),
                    source,
                })?;
                (text.trim().to_string(), AddressFrom::File(path))
            }
        };
        let base = parse_base(&server)?;
        let token_path = admin_token_path(&args.state);
        let admin_token = read_admin_token(&token_path)?;
        let http = reqwest::Client::builder()
            .timeout(TIMEOUT)
            .connect_timeout(CONNECT_TIMEOUT)
            // The admin API is local or on the cluster network: never via a proxy.
            .no_proxy()
            .build()
            .map_err(|e| CliError::Protocol { url: base.to_string(), message: e.to_string() })?;
        Ok(Self { http, base, admin_token, token_path, from })
    }

    pub async fn workspaces(&self) -> Result<Vec<WorkspaceSummary>, CliError> {
        self.call(Method::GET, &["api", "v1", "workspaces"], None).await
    }

    pub async fn workspace(&self, key: &ObjectKey) -> Result<WorkspaceDetail, CliError> {
        self.call(Method::GET, &["api", "v1", "workspaces", &key.name], Some(&key.namespace)).await
    }

    pub async fn teams(&self) -> Result<Vec<TeamSummary>, CliError> {
        self.call(Method::GET, &["api", "v1", "teams"], None).await
    }

    pub async fn pools(&self) -> Result<Vec<crate::registry::admin::PoolSummary>, CliError> {
        self.call(Method::GET, &["api", "v1", "warmpools"], None).await
    }

    /// `action` is `restart`, `pause` or `resume`.
    pub async fn act(&self, action: &str, key: &ObjectKey) -> Result<ActionResponse, CliError> {
        self.call(Method::POST, &["api", "v1", "workspaces", &key.name, action], Some(&key.namespace)).await
    }

    /// Wakes a workspace (`POST /api/v1/workspaces/{namespace}/{name}/wake`); with
    /// `wait`, answers once its agent is heard from, or fails past `wait`.
    pub async fn wake(&self, key: &ObjectKey, wait: Option<Duration>) -> Result<ActionResponse, CliError> {
        let mut url = self.url(&["api", "v1", "workspaces", &key.namespace, &key.name, "wake"], None);
        if let Some(w) = wait {
            url.query_pairs_mut().append_pair("wait", "true").append_pair("timeout", &w.as_secs_f64().to_string());
        }
        let request =
            self.http.post(url.clone()).bearer_auth(&self.admin_token).timeout(wait.unwrap_or_default() + TIMEOUT);
        self.send_json(request, &url).await
    }

    /// A one-time login for the fleet page: its full URL and how many seconds it is valid.
    pub async fn login(&self) -> Result<(Url, u64), CliError> {
        let code: crate::registry::login::LoginCode =
            self.call_with(Method::POST, &["api", "v1", "logins"], &[], None).await?;
        let mut url = self.url(&["login"], None);
        url.query_pairs_mut().append_pair("code", &code.code);
        Ok((url, code.expires_in_seconds))
    }

    /// The fleet's last `limit` decisions, oldest first.
    pub async fn events(&self, limit: usize) -> Result<Vec<FleetEvent>, CliError> {
        let limit = limit.to_string();
        self.call_with(Method::GET, &["api", "v1", "events"], &[("limit", &limit)], None).await
    }

    /// The last `limit` decisions, then each new one as it is made, until the operator
    /// goes away (an error) or `each` says stop (false).
    pub async fn watch_events(&self, limit: usize, mut each: impl FnMut(FleetEvent) -> bool) -> Result<(), CliError> {
        let limit = limit.to_string();
        let url = self.url(&["api", "v1", "events"], None);
        let mut pending = Vec::new();
        let mut bad = None;
        self.stream(url.clone(), &[("watch", "true"), ("limit", &limit)], |chunk| {
            pending.extend_from_slice(chunk);
            while let Some(end) = pending.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = pending.drain(..=end).collect();
                match serde_json::from_slice(&line) {
                    Ok(event) => {
                        if !each(event) {
                            return false;
                        }
                    }
                    Err(e) => {
                        bad = Some(e.to_string());
                        return false;
                    }
                }
            }
            true
        })
        .await?;
        match bad {
            Some(message) => Err(CliError::Protocol { url: url.to_string(), message }),
            None => Ok(()),
        }
    }

    /// A workspace's agent output: the last `tail` lines, and with `follow` what
    /// follows, each chunk handed to `each` as it arrives.
    pub async fn logs(
        &self,
        key: &ObjectKey,
        follow: bool,
        tail: usize,
        each: impl FnMut(&[u8]) -> bool,
    ) -> Result<(), CliError> {
        let url = self.url(&["api", "v1", "workspaces", &key.name, "logs"], None);
        let tail = tail.to_string();
        let query =
            [("namespace", key.namespace.as_str()), ("follow", if follow { "true" } else { "false" }), ("tail", &tail)];
        self.stream(url, &query, each).await
    }

    /// GETs `url` and hands each chunk of the answer to `each` as it arrives, for as
    /// long as the answer lasts (no overall timeout: a watch or a follow has no end).
    async fn stream(
        &self,
        mut url: Url,
        query: &[(&str, &str)],
        mut each: impl FnMut(&[u8]) -> bool,
    ) -> Result<(), CliError> {
        url.query_pairs_mut().extend_pairs(query);
        let mut response = self
            .http
            .get(url.clone())
            .bearer_auth(&self.admin_token)
            .timeout(Duration::from_secs(365 * 24 * 3600))
            .send()
            .await
            .map_err(|e| self.transport(e))?;
        let status = response.status();
        if !status.is_success() {
            let body = response.bytes().await.unwrap_or_default();
            return Err(self.refusal(status, &body));
        }
        while let Some(chunk) = response.chunk().await.map_err(|e| self.transport(e))? {
            if !each(&chunk) {
                break;
            }
        }
        Ok(())
    }

    pub async fn secrets(&self) -> Result<Vec<crate::registry::secrets::SecretView>, CliError> {
        self.call(Method::GET, &["api", "v1", "secrets"], None).await
    }

    /// Sets a secret; returns the operator's sentence about it.
    pub async fn set_secret(&self, scope: &str, name: &str, value: &str) -> Result<String, CliError> {
        let body = serde_json::json!({ "value": value });
        let v: serde_json::Value = self
            .call_with(Method::PUT, &["api", "v1", "secrets"], &[("scope", scope), ("name", name)], Some(body))
            .await?;
        Ok(v["message"].as_str().unwrap_or_default().to_string())
    }

    pub async fn delete_secret(&self, scope: &str, name: &str) -> Result<String, CliError> {
        let v: serde_json::Value = self
            .call_with(Method::DELETE, &["api", "v1", "secrets"], &[("scope", scope), ("name", name)], None)
            .await?;
        Ok(v["message"].as_str().unwrap_or_default().to_string())
    }

    fn url(&self, segments: &[&str], namespace: Option<&str>) -> Url {
        let mut url = self.base.clone();
        if let Ok(mut path) = url.path_segments_mut() {
            path.pop_if_empty().extend(segments);
        }
        if let Some(ns) = namespace {
            url.query_pairs_mut().append_pair("namespace", ns);
        }
        url
    }

    async fn call<T: DeserializeOwned>(
        &self,
        method: Method,
        segments: &[&str],
        namespace: Option<&str>,
    ) -> Result<T, CliError> {
        let query: Vec<(&str, &str)> = namespace.map(|ns| ("namespace", ns)).into_iter().collect();
        self.call_with(method, segments, &query, None).await
    }

    async fn call_with<T: DeserializeOwned>(
        &self,
        method: Method,
        segments: &[&str],
        query: &[(&str, &str)],
        body: Option<serde_json::Value>,
    ) -> Result<T, CliError> {
        let mut url = self.url(segments, None);
        if !query.is_empty() {
            url.query_pairs_mut().extend_pairs(query);
        }
        let mut request = self.http.request(method, url.clone()).bearer_auth(&self.admin_token);
        if let Some(b) = body {
            request = request.json(&b);
        }
        self.send_json(request, &url).await
    }

    /// Sends `request` (made for `url`) and reads its JSON answer, or the refusal.
    async fn send_json<T: DeserializeOwned>(&self, request: reqwest::RequestBuilder, url: &Url) -> Result<T, CliError> {
        let response = request.send().await.map_err(|e| self.transport(e))?;
        let status = response.status();
        let body = response.bytes().await.map_err(|e| self.transport(e))?;
        if status.is_success() {
            return serde_json::from_slice(&body)
                .map_err(|e| CliError::Protocol { url: url.to_string(), message: e.to_string() });
        }
        Err(self.refusal(status, &body))
    }

    /// The error for a non-success answer.
    fn refusal(&self, status: StatusCode, body: &[u8]) -> CliError {
        let message = serde_json::from_slice::<ErrorBody>(body)
            .map(|b| b.error)
            .unwrap_or_else(|_| String::from_utf8_lossy(body).trim().to_string());
        match status {
            StatusCode::UNAUTHORIZED => CliError::Unauthorized { url: self.base_str(), path: self.token_path.clone() },
            StatusCode::NOT_FOUND => CliError::NotFound(message),
            _ => CliError::Server { url: self.base_str(), status, message },
        }
    }

    fn base_str(&self) -> String {
        self.base.as_str().trim_end_matches('/').to_string()
    }

    fn transport(&self, e: reqwest::Error) -> CliError {
        let url = self.base_str();
        if e.is_timeout() {
            return CliError::Timeout { url };
        }
        if e.is_connect() {
            let hint = match &self.from {
                AddressFrom::Flag => "the address came from --server".to_string(),
                AddressFrom::File(p) => format!("looked for the address in {}", p.display()),
            };
            return CliError::Unreachable { url, hint };
        }
        CliError::Protocol { url, message: e.to_string() }
    }
}

fn parse_base(server: &str) -> Result<Url, CliError> {
    let with_scheme = if server.contains("://") { server.to_string() } else { format!("http://{server}") };
    match Url::parse(&with_scheme) {
        Ok(u) if (u.scheme() == "http" || u.scheme() == "https") && u.host().is_some() => Ok(u),
        _ => Err(CliError::BadServer { url: server.to_string() }),
    }
}

fn read_admin_token(path: &Path) -> Result<String, CliError> {
    let text = std::fs::read_to_string(path).map_err(|source| CliError::NoAdminToken { path: path.into(), source })?;
    let t = text.trim();
    if t.is_empty() {
        return Err(CliError::NoAdminToken {
            path: path.into(),
            source: std::io::Error::new(std::io::ErrorKind::InvalidData, "the file is empty"),
        });
    }
    Ok(t.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_urls() {
        assert_eq!(parse_base("http://127.0.0.1:8080").unwrap().as_str(), "http://127.0.0.1:8080/");
        assert_eq!(parse_base("127.0.0.1:8080").unwrap().as_str(), "http://127.0.0.1:8080/");
        assert!(parse_base("ftp://x").is_err());
        assert!(parse_base("").is_err());
    }

    #[test]
    fn paths_are_escaped_and_namespaced() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("admin-token"), "t\n").unwrap();
        let args = ClientArgs { state: dir.path().into(), server: Some("http://127.0.0.1:1/prefix".into()) };
        let c = Client::new(&args).unwrap();
        let url = c.url(&["api", "v1", "workspaces", "a b/c"], Some("research"));
        assert_eq!(url.as_str(), "http://127.0.0.1:1/prefix/api/v1/workspaces/a%20b%2Fc?namespace=research");
    }

    #[test]
    fn missing_files_are_explained() {
        let dir = tempfile::tempdir().unwrap();
        let args = ClientArgs { state: dir.path().into(), server: None };
        let e = Client::new(&args).unwrap_err().to_string();
        assert!(e.contains("molecule-operator up") && e.contains("address") && e.contains("--server"), "{e}");
        let args = ClientArgs { state: dir.path().into(), server: Some("http://127.0.0.1:1".into()) };
        let e = Client::new(&args).unwrap_err().to_string();
        assert!(e.contains("admin-token") && e.contains("--state"), "{e}");
    }
}
