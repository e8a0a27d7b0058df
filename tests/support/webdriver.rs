//! A real browser for tests: Debian's `chromium`, headless, driven by `chromedriver`
//! over the W3C WebDriver protocol (plain HTTP + JSON; no client crate). Each
//! [`Browser`] runs its own chromedriver on a free port with a fresh profile, and
//! ends both when dropped, also on failure.
//!
//! [`Browser::start`] FAILS when chromium or chromedriver is missing and `CI=true`
//! (`.ci/run` installs them), and otherwise prints a notice and returns None.
#![allow(dead_code)]

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine;
use serde_json::{Value, json};

/// The W3C element reference key.
const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

fn find_program(names: &[&str]) -> Option<String> {
    let path = std::env::var("PATH").unwrap_or_default();
    names.iter().find_map(|name| {
        std::env::split_paths(&path).map(|d| d.join(name)).find(|p| p.is_file()).map(|p| p.display().to_string())
    })
}

pub struct Browser {
    driver: Child,
    base: String,
    session: String,
    http: reqwest::blocking::Client,
    _profile: tempfile::TempDir,
}

impl Browser {
    /// A headless chromium `width`x`height`, or None (locally) without one.
    pub fn start(test: &str, width: u32, height: u32) -> Option<Self> {
        let chromium = std::env::var("CHROMIUM").ok().or_else(|| find_program(&["chromium", "chromium-browser"]));
        let driver = std::env::var("CHROMEDRIVER").ok().or_else(|| find_program(&["chromedriver"]));
        let (Some(chromium), Some(driver)) = (chromium, driver) else {
            if std::env::var("CI").is_ok_and(|v| v == "true") {
                panic!(
                    "{test}: chromium and chromedriver are required (CI=true): apt-get install chromium chromium-driver"
                );
            }
            eprintln!("NOTICE: skipping {test}: chromium or chromedriver is not installed");
            return None;
        };
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let driver = Command::new(driver)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromedriver starts");
        let http = reqwest::blocking::Client::builder().no_proxy().timeout(Duration::from_secs(60)).build().unwrap();
        let base = format!("http://127.0.0.1:{port}");
        let t0 = Instant::now();
        loop {
            let ready = http
                .get(format!("{base}/status"))
                .send()
                .ok()
                .and_then(|r| r.json::<Value>().ok())
                .is_some_and(|v| v["value"]["ready"] == true);
            if ready {
                break;
            }
            assert!(t0.elapsed() < Duration::from_secs(30), "chromedriver did not get ready on port {port}");
            std::thread::sleep(Duration::from_millis(50));
        }
        let profile = tempfile::Builder::new().prefix("mol-chromium-").tempdir().unwrap();
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": chromium,
                "args": [
                    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                    "--no-first-run", "--no-default-browser-check", "--hide-scrollbars",
                    format!("--window-size={width},{height}"),
                    format!("--user-data-dir={}", profile.path().display()),
                ],
            },
            // Network events, with the server-sent events' data, for `network_log`.
            "goog:loggingPrefs": {"performance": "ALL"},
        }}});
        let mut browser = Self { driver, base, session: String::new(), http, _profile: profile };
        let v = browser.call("POST", "/session", Some(caps));
        browser.session = v["sessionId"].as_str().expect("a WebDriver session").to_string();
        Some(browser)
    }

    fn call(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        let url = format!("{}{path}", self.base);
        let request = match method {
            "GET" => self.http.get(&url),
            "DELETE" => self.http.delete(&url),
            _ => self.http.post(&url).json(&body.unwrap_or(json!({}))),
        };
        let response = request.send().unwrap_or_else(|e| panic!("WebDriver {method} {path}: {e}"));
        let status = response.status();
        let v: Value = response.json().unwrap_or(Value::Null);
        assert!(status.is_success(), "WebDriver {method} {path}: {status} {v}");
        v["value"].clone()
    }

    fn session_call(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        self.call(method, &format!("/session/{}{path}", self.session), body)
    }

    pub fn goto(&self, url: &str) {
        self.session_call("POST", "/url", Some(json!({ "url": url })));
    }

    pub fn refresh(&self) {
        self.session_call("POST", "/refresh", None);
    }

    pub fn current_url(&self) -> String {
        self.session_call("GET", "/url", None).as_str().unwrap_or_default().to_string()
    }

    /// Runs `script` (a function body; `arguments` holds `args`) and returns its value.
    pub fn execute(&self, script: &str, args: Value) -> Value {
        self.session_call("POST", "/execute/sync", Some(json!({ "script": script, "args": args })))
    }

    pub fn source(&self) -> String {
        self.session_call("GET", "/source", None).as_str().unwrap_or_default().to_string()
    }

    /// The text of the first element matching `css`, None when there is none.
    pub fn text(&self, css: &str) -> Option<String> {
        self.execute("const e = document.querySelector(arguments[0]); return e ? e.textContent : null;", json!([css]))
            .as_str()
            .map(str::to_string)
    }

    /// Clicks the first element matching `css` (a real click, through WebDriver).
    pub fn click(&self, css: &str) {
        let found = self.session_call("POST", "/element", Some(json!({"using": "css selector", "value": css})));
        let id = found[ELEMENT].as_str().unwrap_or_else(|| panic!("no element {css}: {found}")).to_string();
        self.session_call("POST", &format!("/element/{id}/click"), None);
    }

    /// Polls `script` (returning a value) until `pred` accepts it; panics with the
    /// last value and the page's text after `deadline`.
    pub fn wait_for(&self, what: &str, deadline: Duration, script: &str, pred: impl Fn(&Value) -> bool) -> Value {
        poll_script(what, deadline, script, pred, |script| self.execute(script, json!([])))
    }

    /// A PNG of the viewport.
    pub fn screenshot(&self) -> Vec<u8> {
        let b64 = self.session_call("GET", "/screenshot", None);
        base64::engine::general_purpose::STANDARD.decode(b64.as_str().unwrap_or_default()).expect("a base64 PNG")
    }

    pub fn set_window(&self, width: u32, height: u32) {
        self.session_call("POST", "/window/rect", Some(json!({"width": width, "height": height})));
    }

    /// The browser's cookies as WebDriver sees them (HttpOnly ones included).
    pub fn cookies(&self) -> Vec<Value> {
        self.session_call("GET", "/cookie", None).as_array().cloned().unwrap_or_default()
    }

    /// Every network message since the last call, from Chrome's performance log:
    /// `(method, params)`, e.g. `Network.responseReceived`, `Network.eventSourceMessageReceived`.
    pub fn network_log(&self) -> Vec<(String, Value)> {
        let entries = self.session_call("POST", "/se/log", Some(json!({"type": "performance"})));
        entries
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|e| serde_json::from_str::<Value>(e["message"].as_str()?).ok())
            .filter_map(|m| Some((m["message"]["method"].as_str()?.to_string(), m["message"]["params"].clone())))
            .filter(|(method, _)| method.starts_with("Network."))
            .collect()
    }

    /// A Chrome DevTools command (chromedriver's `goog/cdp/execute`); None when it fails.
    pub fn cdp(&self, cmd: &str, params: Value) -> Option<Value> {
        let url = format!("{}/session/{}/goog/cdp/execute", self.base, self.session);
        let r = self.http.post(url).json(&json!({"cmd": cmd, "params": params})).send().ok()?;
        if !r.status().is_success() {
            return None;
        }
        r.json::<Value>().ok().map(|v| v["value"].clone())
    }
}

/// Runs `script` through `execute` every 100 ms until `pred` accepts its value; panics
/// with the last value and the page's text after `deadline`. Shared by the chromium
/// and the Firefox drivers.
pub fn poll_script(
    what: &str,
    deadline: Duration,
    script: &str,
    pred: impl Fn(&Value) -> bool,
    mut execute: impl FnMut(&str) -> Value,
) -> Value {
    let t0 = Instant::now();
    loop {
        let v = execute(script);
        if pred(&v) {
            return v;
        }
        if t0.elapsed() > deadline {
            let text = execute("return document.body ? document.body.innerText : ''");
            panic!(
                "timed out after {deadline:?} waiting for {what}; last value {v}\npage:\n{}",
                text.as_str().unwrap_or("")
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        if !self.session.is_empty() {
            let _ = self.http.delete(format!("{}/session/{}", self.base, self.session)).send();
        }
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}
