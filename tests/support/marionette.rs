//! A real Firefox for tests: Debian's `firefox-esr`, headless, driven over its own
//! remote protocol, Marionette (what geckodriver speaks to it; geckodriver is not
//! packaged by Debian). Marionette is length-prefixed JSON over TCP: `LEN:[0, id,
//! "WebDriver:Command", params]` out, `LEN:[1, id, error, result]` back; its command
//! names are the W3C WebDriver endpoints' (`WebDriver:Navigate` = `POST /url`).
//!
//! Each [`Firefox`] runs its own browser with a fresh profile whose only proxy is a
//! dead port on loopback, so nothing the browser does reaches past this machine
//! (loopback is never proxied). [`Firefox::start`] FAILS when firefox is missing and
//! `CI=true` (`.ci/run` installs it), and otherwise prints a notice and returns None.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

/// The W3C element reference key.
const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

pub struct Firefox {
    process: Child,
    stream: BufReader<TcpStream>,
    next_id: u64,
    _profile: tempfile::TempDir,
}

fn find_program(names: &[&str]) -> Option<String> {
    let path = std::env::var("PATH").unwrap_or_default();
    names.iter().find_map(|name| {
        std::env::split_paths(&path).map(|d| d.join(name)).find(|p| p.is_file()).map(|p| p.display().to_string())
    })
}

impl Firefox {
    /// A headless Firefox `width`x`height`, or None (locally) without one.
    pub fn start(test: &str, width: u32, height: u32) -> Option<Self> {
        let Some(binary) = std::env::var("FIREFOX").ok().or_else(|| find_program(&["firefox-esr", "firefox"])) else {
            if std::env::var("CI").is_ok_and(|v| v == "true") {
                panic!("{test}: firefox is required (CI=true): apt-get install firefox-esr");
            }
            eprintln!("NOTICE: skipping {test}: firefox is not installed");
            return None;
        };
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let profile = tempfile::Builder::new().prefix("mol-firefox-").tempdir().unwrap();
        let prefs = [
            ("marionette.port", port.to_string()),
            // Everything but loopback goes to a port nobody listens on.
            ("network.proxy.type", "1".into()),
            ("network.proxy.http", "\"127.0.0.1\"".into()),
            ("network.proxy.http_port", dead.to_string()),
            ("network.proxy.ssl", "\"127.0.0.1\"".into()),
            ("network.proxy.ssl_port", dead.to_string()),
            ("network.proxy.share_proxy_settings", "true".into()),
            ("network.proxy.socks_remote_dns", "true".into()),
            ("network.dns.disablePrefetch", "true".into()),
            ("network.captive-portal-service.enabled", "false".into()),
            ("network.connectivity-service.enabled", "false".into()),
            ("browser.safebrowsing.malware.enabled", "false".into()),
            ("browser.safebrowsing.phishing.enabled", "false".into()),
            ("browser.shell.checkDefaultBrowser", "false".into()),
            ("browser.startup.homepage_override.mstone", "\"ignore\"".into()),
            ("browser.startup.page", "0".into()),
            ("datareporting.policy.dataSubmissionEnabled", "false".into()),
            ("toolkit.telemetry.reportingpolicy.firstRun", "false".into()),
            ("app.update.disabledForTesting", "true".into()),
            ("extensions.update.enabled", "false".into()),
        ];
        let user_js: String = prefs.iter().map(|(k, v)| format!("user_pref(\"{k}\", {v});\n")).collect();
        std::fs::write(profile.path().join("user.js"), user_js).unwrap();
        let process = Command::new(binary)
            .args(["--headless", "--marionette", "--no-remote", "--profile"])
            .arg(profile.path())
            .arg(format!("--window-size={width},{height}"))
            .env("MOZ_HEADLESS", "1")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("firefox starts");
        let t0 = Instant::now();
        let stream = loop {
            match TcpStream::connect(("127.0.0.1", port)) {
                Ok(s) => break s,
                Err(e) => {
                    assert!(
                        t0.elapsed() < Duration::from_secs(60),
                        "firefox's Marionette never listened on {port}: {e}"
                    );
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        };
        stream.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        let mut firefox = Self { process, stream: BufReader::new(stream), next_id: 0, _profile: profile };
        let hello = firefox.read();
        assert_eq!(hello["marionetteProtocol"], 3, "Marionette's greeting: {hello}");
        firefox.call("WebDriver:NewSession", json!({"capabilities": {"alwaysMatch": {"acceptInsecureCerts": true}}}));
        Some(firefox)
    }

    /// One length-prefixed JSON message.
    fn read(&mut self) -> Value {
        let mut len = Vec::new();
        self.stream.read_until(b':', &mut len).expect("a message from Marionette");
        let n: usize = std::str::from_utf8(&len[..len.len() - 1]).unwrap().trim().parse().expect("a length");
        let mut body = vec![0u8; n];
        self.stream.read_exact(&mut body).expect("the message's body");
        serde_json::from_slice(&body).expect("JSON from Marionette")
    }

    fn call(&mut self, command: &str, params: Value) -> Value {
        self.next_id += 1;
        let id = self.next_id;
        let message = json!([0, id, command, params]).to_string();
        let stream = self.stream.get_mut();
        stream.write_all(format!("{}:{message}", message.len()).as_bytes()).expect("a command to Marionette");
        loop {
            let reply = self.read();
            if reply[1] != id {
                continue; // an answer to an earlier, timed-out command
            }
            assert!(reply[2].is_null(), "Marionette {command}: {}", reply[2]);
            return reply[3].clone();
        }
    }

    /// A result's `value` (most commands wrap it), else the result itself.
    fn value(result: Value) -> Value {
        match result {
            Value::Object(mut o) if o.contains_key("value") => o.remove("value").unwrap(),
            other => other,
        }
    }

    pub fn goto(&mut self, url: &str) {
        self.call("WebDriver:Navigate", json!({ "url": url }));
    }

    pub fn current_url(&mut self) -> String {
        Self::value(self.call("WebDriver:GetCurrentURL", json!({}))).as_str().unwrap_or_default().to_string()
    }

    pub fn source(&mut self) -> String {
        Self::value(self.call("WebDriver:GetPageSource", json!({}))).as_str().unwrap_or_default().to_string()
    }

    /// Runs `script` (a function body; `arguments` holds `args`) and returns its value.
    pub fn execute(&mut self, script: &str, args: Value) -> Value {
        Self::value(self.call("WebDriver:ExecuteScript", json!({ "script": script, "args": args })))
    }

    /// The text of the first element matching `css`, None when there is none.
    pub fn text(&mut self, css: &str) -> Option<String> {
        self.execute("const e = document.querySelector(arguments[0]); return e ? e.textContent : null;", json!([css]))
            .as_str()
            .map(str::to_string)
    }

    /// Clicks the first element matching `css` (a real click, through Marionette).
    pub fn click(&mut self, css: &str) {
        let found = Self::value(self.call("WebDriver:FindElement", json!({"using": "css selector", "value": css})));
        let id = found[ELEMENT].as_str().unwrap_or_else(|| panic!("no element {css}: {found}")).to_string();
        self.call("WebDriver:ElementClick", json!({ "id": id }));
    }

    /// The browser's cookies (HttpOnly ones included).
    pub fn cookies(&mut self) -> Vec<Value> {
        Self::value(self.call("WebDriver:GetCookies", json!({}))).as_array().cloned().unwrap_or_default()
    }

    /// Polls `script` until `pred` accepts its value; panics with the last value and
    /// the page's text after `deadline`.
    pub fn wait_for(&mut self, what: &str, deadline: Duration, script: &str, pred: impl Fn(&Value) -> bool) -> Value {
        super::webdriver::poll_script(what, deadline, script, pred, |script| self.execute(script, json!([])))
    }
}

impl Drop for Firefox {
    fn drop(&mut self) {
        let _ = self.call_quietly("Marionette:Quit");
        let _ = self.process.kill();
        let _ = self.process.wait();
    }
}

impl Firefox {
    fn call_quietly(&mut self, command: &str) -> std::io::Result<()> {
        self.next_id += 1;
        let message = json!([0, self.next_id, command, {}]).to_string();
        self.stream.get_mut().write_all(format!("{}:{message}", message.len()).as_bytes())
    }
}
