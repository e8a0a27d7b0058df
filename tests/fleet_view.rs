//! The fleet page in a real browser: Debian's chromium, headless, driven over
//! WebDriver (tests/support/webdriver.rs).
//!
//! - Against a real operator running examples/org on real Docker: 401 without a login;
//!   `open` logs the browser in with a one-time code; the tree shows every workspace
//!   under its parent; a container removed out of band shows its new incarnation
//!   without a reload; the Pause button pauses the container; neither the page nor
//!   anything it fetched holds a token. With `MOLECULE_SCREENSHOT=PATH` the page is
//!   also saved there as a PNG (docs/fleet-view.png is made so).
//! - The same page in Debian's firefox-esr, driven over Marionette
//!   (tests/support/marionette.rs): login, the tree, a heal shown live, the Pause
//!   button, a narrow window.
//! - Against the registry in-process with 500 declared workspaces: all are drawn, and
//!   a change to one touches only that one's element.

mod support;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};
use support::marionette::Firefox;
use support::operator::*;
use support::webdriver::Browser;

const UP: Duration = Duration::from_secs(90);
const HEAL: Duration = Duration::from_secs(30);
const PAGE: Duration = Duration::from_secs(60);

/// examples/org: each workspace with the one it reports to.
const ORG: [(&str, Option<&str>); 6] = [
    ("pm", None),
    ("dev-lead", Some("pm")),
    ("backend", Some("dev-lead")),
    ("qa", Some("dev-lead")),
    ("engineering-docs", Some("dev-lead")),
    ("research", Some("pm")),
];

fn names() -> Vec<&'static str> {
    ORG.iter().map(|(n, _)| *n).collect()
}

/// Each row's `key=phase`.
const ROWS: &str = "return [...document.querySelectorAll('li.node')].map(li => li.dataset.key + '=' + \
                    li.querySelector('[data-field=phase]').textContent)";

/// Each row's key with the key of the row it sits under (null for a root).
const PARENTS: &str = "const out = {}; for (const li of document.querySelectorAll('li.node')) { \
                       const up = li.parentElement.closest('li.node'); out[li.dataset.key] = up ? up.dataset.key : null; } \
                       return out;";

fn every_row_running(rows: &Value) -> bool {
    rows.as_array().is_some_and(|r| {
        r.len() == ORG.len() && r.iter().all(|row| row.as_str().is_some_and(|s| s.ends_with("=Running")))
    })
}

/// The files of examples/org into the operator's directory.
fn write_examples_org(op: &Op) {
    let org = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/org");
    for entry in std::fs::read_dir(&org).unwrap() {
        let path = entry.unwrap().path();
        op.write(path.file_name().unwrap().to_str().unwrap(), &std::fs::read_to_string(&path).unwrap());
    }
}

fn http() -> reqwest::blocking::Client {
    reqwest::blocking::Client::builder().no_proxy().redirect(reqwest::redirect::Policy::none()).build().unwrap()
}

/// The text of `field` in workspace `name`'s row.
fn field(browser: &Browser, name: &str, field: &str) -> Option<String> {
    browser.text(&format!("li.node[data-key=\"default/{name}\"] > .ws [data-field=\"{field}\"]"))
}

/// `molecule-operator open` with a $BROWSER that writes down the URL it is given.
fn open_login_url(op: &Op) -> String {
    let dir = tempfile::tempdir().unwrap();
    let seen = dir.path().join("url");
    let script = dir.path().join("browser");
    std::fs::write(&script, format!("#!/bin/sh\nprintf '%s' \"$1\" > '{}'\n", seen.display())).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    let out = std::process::Command::new(BIN)
        .args(["open", "--state"])
        .arg(&op.state)
        .args(["--server", &op.url()])
        .env("BROWSER", &script)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success(), "open: {stdout}{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("opened the fleet page") && !stdout.contains("code="), "{stdout}");
    std::fs::read_to_string(seen).expect("open ran $BROWSER with the URL")
}

/// Every secret the operator holds now: the admin token and each workspace's token file.
fn secrets(op: &Op) -> BTreeSet<String> {
    let mut all = BTreeSet::from([std::fs::read_to_string(op.state.join("admin-token")).unwrap().trim().to_string()]);
    for ids in op.container_ids_per_workspace().values() {
        all.extend(ids.iter().filter_map(|id| read_token(id)).map(|(t, _, _)| t));
    }
    all.retain(|t| t.len() >= 32);
    all
}

/// What the page fetched, as the browser saw it: every response body (through the
/// DevTools protocol, else fetched again with the page's cookie) and every server-sent
/// event's data. Returns (url or "event", text).
fn fetched(browser: &Browser, cookie: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for (method, params) in browser.network_log() {
        match method.as_str() {
            "Network.responseReceived" => {
                let url = params["response"]["url"].as_str().unwrap_or_default().to_string();
                // The browser's own pages (its new tab) are not the fleet page's.
                if !url.starts_with("http") || params["type"] == "EventSource" || url.contains("watch=true") {
                    continue;
                }
                let body = browser
                    .cdp("Network.getResponseBody", json!({"requestId": params["requestId"]}))
                    .and_then(|v| v["body"].as_str().map(str::to_string))
                    .or_else(|| http().get(&url).header("Cookie", cookie).send().ok()?.text().ok())
                    .unwrap_or_default();
                out.push((url, body));
            }
            "Network.eventSourceMessageReceived" => {
                out.push(("event".into(), params["data"].as_str().unwrap_or_default().to_string()));
            }
            _ => {}
        }
    }
    out
}

#[test]
fn the_fleet_page_shows_examples_org_live_and_its_buttons_act() {
    if !docker_available() {
        return;
    }
    let Some(browser) = Browser::start("fleet_page", 1440, 900) else { return };
    let mut op = Op::new("fleetpage");
    op.extra = vec!["--usage-seconds".into(), "2".into()];
    write_examples_org(&op);
    op.start();
    let ws = op.wait_online(&names(), UP);

    // No login, no page: the page, its data and its script all answer 401.
    for path in ["/", "/api/v1/fleet", "/assets/fleet.js", "/login?code=made-up"] {
        let r = http().get(format!("{}{path}", op.url())).send().unwrap();
        assert_eq!(r.status().as_u16(), 401, "{path} without a login");
        if path == "/" {
            assert!(r.text().unwrap().contains("molecule-operator open"), "the 401 page says how to log in");
        }
    }
    browser.goto(&format!("{}/", op.url()));
    assert!(browser.source().contains("molecule-operator open"));

    // `open` hands the browser a one-time login; the address bar keeps no secret.
    let login = open_login_url(&op);
    assert!(login.starts_with(&format!("{}/login?code=", op.url())), "{login}");
    browser.goto(&login);
    browser.wait_for("the stream", PAGE, "return document.getElementById('conn').dataset.state", |v| v == "live");
    assert_eq!(browser.current_url(), format!("{}/", op.url()), "the code is gone from the address bar");
    assert_eq!(http().get(&login).send().unwrap().status().as_u16(), 401, "a login code works once");
    let cookies = browser.cookies();
    let session = cookies.iter().find(|c| c["name"].as_str().is_some_and(|n| n.starts_with("molecule_session_")));
    let session = session.expect("a session cookie");
    assert_eq!(session["httpOnly"], true, "{session}");
    assert_eq!(session["sameSite"], "Strict", "{session}");
    let cookie = format!("{}={}", session["name"].as_str().unwrap(), session["value"].as_str().unwrap());
    assert_eq!(browser.execute("return document.cookie", json!([])), "", "the script cannot read the session");

    // Every workspace of examples/org, under the one it reports to, with what `get` says.
    browser.wait_for("every workspace Running", PAGE, ROWS, every_row_running);
    let parents = browser.execute(PARENTS, json!([]));
    for (name, parent) in ORG {
        assert_eq!(parents[format!("default/{name}")], json!(parent.map(|p| format!("default/{p}"))), "{name}'s place");
        let prefix = ws[name]["token"]["prefix"].as_str().unwrap();
        assert_eq!(field(&browser, name, "token").unwrap(), format!("{prefix}…"));
        assert_eq!(field(&browser, name, "incarnation").unwrap(), ws[name]["incarnation"].to_string());
    }
    assert!(browser.text("#summary").unwrap().starts_with("6/6 running"), "{:?}", browser.text("#summary"));
    assert_eq!(browser.text("[data-team=\"default/engineering\"] b").as_deref(), Some("engineering"));
    let decisions = field(&browser, "pm", "decisions").unwrap();
    assert!(decisions.contains("provision"), "the last decisions, with their causes: {decisions}");
    // Usage (CPU, memory) comes with the sampler's rounds, without a reload.
    browser.wait_for(
        "pm's usage",
        PAGE,
        "const r = document.querySelector('li.node[data-key=\"default/pm\"] > .ws'); \
         return [r.querySelector('[data-field=cpu]').textContent, r.querySelector('[data-field=memory]').textContent]",
        |v| {
            v[0].as_str().is_some_and(|c| c.parse::<f64>().is_ok())
                && v[1].as_str().is_some_and(|m| ["Ki", "Mi", "Gi"].iter().any(|u| m.ends_with(u)))
        },
    );

    // A container removed out of band: the new incarnation shows, without a reload.
    browser.execute("window.notReloaded = true", json!([]));
    let qa = ws["qa"]["container"]["id"].as_str().unwrap();
    // Every token there was, the replaced one included, for the check at the end.
    let mut tokens = secrets(&op);
    let old = ws["qa"]["incarnation"].as_i64().unwrap();
    remove_out_of_band(&[qa]);
    let script = "const r = document.querySelector('li.node[data-key=\"default/qa\"] > .ws'); \
                  return [r.querySelector('[data-field=incarnation]').textContent, r.dataset.phase]";
    browser.wait_for("qa's new incarnation", HEAL, script, |v| {
        v[0].as_str().and_then(|s| s.parse::<i64>().ok()).is_some_and(|i| i > old) && v[1] == "Running"
    });
    assert_eq!(browser.execute("return window.notReloaded === true", json!([])), true, "the page was not reloaded");
    let qa_decisions = field(&browser, "qa", "decisions").unwrap();
    assert!(qa_decisions.contains("container"), "why qa was replaced: {qa_decisions}");

    tokens.extend(secrets(&op));
    // Pause: the button calls the admin API, the container is frozen, the outcome shows.
    browser.click("li.node[data-key=\"default/research\"] > .ws button[data-action=\"pause\"]");
    browser.wait_for(
        "the pause outcome",
        PAGE,
        "return document.querySelector('li.node[data-key=\"default/research\"] > .ws [data-field=outcome]').textContent",
        |v| v.as_str().is_some_and(|s| s.contains("pausing")),
    );
    let research = ws["research"]["container"]["id"].as_str().unwrap().to_string();
    wait_until("research's container paused", HEAL, || {
        docker(&["inspect", "-f", "{{.State.Paused}}", &research]) == "true"
    });
    browser.wait_for(
        "research Paused on the page, with Resume offered",
        HEAL,
        "const r = document.querySelector('li.node[data-key=\"default/research\"] > .ws'); \
         return [r.dataset.phase, r.querySelector('button[data-action=resume]').hidden]",
        |v| v[0] == "Paused" && v[1] == false,
    );

    // The cookie alone does not change anything: a change needs the page's header.
    let bare = http()
        .post(format!("{}/api/v1/workspaces/research/resume?namespace=default", op.url()))
        .header("Cookie", &cookie)
        .send()
        .unwrap();
    assert_eq!(bare.status().as_u16(), 403, "a cookie-only POST (what a cross-site form sends) is refused");
    let mint = http()
        .post(format!("{}/api/v1/logins", op.url()))
        .header("Cookie", &cookie)
        .header("X-Molecule-Request", "1")
        .send()
        .unwrap();
    assert_eq!(mint.status().as_u16(), 403, "a browser session mints no logins");
    assert_eq!(docker(&["inspect", "-f", "{{.State.Paused}}", &research]), "true");

    if let Ok(path) = std::env::var("MOLECULE_SCREENSHOT") {
        browser.wait_for("a settled summary", PAGE, "return document.getElementById('summary').textContent", |v| {
            v.as_str().is_some_and(|s| s.starts_with("5/6 running"))
        });
        browser.wait_for("no row flashing", PAGE, "return document.querySelectorAll('.flash').length", |v| v == 0);
        std::fs::write(&path, browser.screenshot()).unwrap();
    }

    // No token anywhere: not in the page, not in anything it fetched or was sent.
    tokens.extend(secrets(&op));
    assert_eq!(tokens.len(), 8, "the admin token, each workspace's and qa's replaced one");
    let mut seen = fetched(&browser, &cookie);
    seen.push(("page source".into(), browser.source()));
    seen.push(("DOM".into(), browser.execute("return document.documentElement.outerHTML", json!([])).to_string()));
    let storage = browser.execute("return JSON.stringify([localStorage, sessionStorage])", json!([]));
    seen.push(("storage".into(), storage.to_string()));
    let urls: Vec<&str> = seen.iter().map(|(u, _)| u.as_str()).collect();
    for want in ["/assets/fleet.js", "/assets/fleet.css", "event"] {
        assert!(urls.iter().any(|u| u.ends_with(want)), "{want} was not among what the page fetched: {urls:?}");
    }
    assert!(seen.iter().any(|(u, b)| u == "event" && b.contains("\"workspaces\"")), "the snapshot event was seen");
    for (url, body) in &seen {
        for secret in &tokens {
            assert!(!body.contains(secret.as_str()), "{url} holds a token ({}…)", &secret[..8]);
        }
    }

    // Narrow screens: nothing wider than the window.
    browser.set_window(420, 900);
    browser.wait_for(
        "no horizontal scrolling at 420 px",
        PAGE,
        "return [...document.querySelectorAll('body *')].filter(e => e.getBoundingClientRect().right > window.innerWidth + 0.5) \
           .map(e => e.tagName + '.' + e.className + ' ' + Math.round(e.getBoundingClientRect().right))",
        |v| v.as_array().is_some_and(Vec::is_empty),
    );

    // An open page does not hold the operator up when it stops: the stream ends.
    op.stop();
    let logs = op.logs();
    let tail: Vec<&str> = logs.lines().rev().take(15).collect();
    assert!(logs.contains("operator stopped"), "the operator did not stop cleanly with the page open: {tail:#?}");
    op.cleanup();
}

#[test]
fn the_fleet_page_works_in_firefox() {
    if !docker_available() {
        return;
    }
    let Some(mut firefox) = Firefox::start("fleet_page_firefox", 1280, 900) else { return };
    let mut op = Op::new("fleetfox");
    write_examples_org(&op);
    op.start();
    let ws = op.wait_online(&names(), UP);

    firefox.goto(&format!("{}/", op.url()));
    assert!(firefox.source().contains("molecule-operator open"), "without a login, the page says how to get one");
    let login = open_login_url(&op);
    firefox.goto(&login);
    firefox.wait_for("the stream", PAGE, "return document.getElementById('conn').dataset.state", |v| v == "live");
    assert_eq!(firefox.current_url(), format!("{}/", op.url()), "the code is gone from the address bar");
    let cookies = firefox.cookies();
    let session = cookies.iter().find(|c| c["name"].as_str().is_some_and(|n| n.starts_with("molecule_session_")));
    assert_eq!(session.expect("a session cookie")["httpOnly"], true);
    assert_eq!(firefox.execute("return document.cookie", json!([])), "", "the script cannot read the session");

    // The tree: every workspace Running, under the one it reports to.
    firefox.wait_for("every workspace Running", PAGE, ROWS, every_row_running);
    let parents = firefox.execute(PARENTS, json!([]));
    for (name, parent) in ORG {
        assert_eq!(parents[format!("default/{name}")], json!(parent.map(|p| format!("default/{p}"))), "{name}'s place");
    }
    assert!(firefox.text("#summary").unwrap().starts_with("6/6 running"), "{:?}", firefox.text("#summary"));

    // A heal shows without a reload.
    firefox.execute("window.notReloaded = true", json!([]));
    let old = ws["qa"]["incarnation"].as_i64().unwrap();
    remove_out_of_band(&[ws["qa"]["container"]["id"].as_str().unwrap()]);
    let script = "const r = document.querySelector('li.node[data-key=\"default/qa\"] > .ws'); \
                  return [r.querySelector('[data-field=incarnation]').textContent, r.dataset.phase]";
    firefox.wait_for("qa's new incarnation", HEAL, script, |v| {
        v[0].as_str().and_then(|s| s.parse::<i64>().ok()).is_some_and(|i| i > old) && v[1] == "Running"
    });
    assert_eq!(firefox.execute("return window.notReloaded === true", json!([])), true, "the page was not reloaded");

    // The Pause button pauses the container.
    firefox.click("li.node[data-key=\"default/research\"] > .ws button[data-action=\"pause\"]");
    let research = ws["research"]["container"]["id"].as_str().unwrap().to_string();
    wait_until("research's container paused", HEAL, || {
        docker(&["inspect", "-f", "{{.State.Paused}}", &research]) == "true"
    });
    firefox.wait_for(
        "research Paused on the page",
        HEAL,
        "return document.querySelector('li.node[data-key=\"default/research\"] > .ws').dataset.phase",
        |v| v == "Paused",
    );

    // No token in the page.
    let dom = firefox.execute("return document.documentElement.outerHTML", json!([])).to_string();
    for secret in secrets(&op) {
        assert!(!dom.contains(secret.as_str()), "the page holds a token ({}…)", &secret[..8]);
    }
    op.stop();
    op.cleanup();
}

// ---------------------------------------------------------------------------
// 500 workspaces, in-process

/// The registry with `n` declared workspaces (a tree: each reports to the one at half
/// its index), each with a record, a Running status and a live token, on its own
/// runtime thread; the reports channel is the test's to send on.
struct Fleet {
    url: String,
    admin_token: String,
    tokens: Vec<String>,
    store: molecule::store::DynStore,
    reports: tokio::sync::broadcast::Sender<molecule::trigger::Report>,
    runtime: tokio::runtime::Runtime,
    _dir: tempfile::TempDir,
}

impl Fleet {
    fn start(n: usize) -> Self {
        use molecule::api::effective::{Defaults, resolve};
        use molecule::api::{ObjectKey, SourceRef, TokenStatus, WorkspaceSpec};
        use molecule::source::desired::DesiredWorkspace;
        let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let name = |i: usize| format!("agent-{i:03}");
        let declared = (0..n).map(|i| {
            let spec = WorkspaceSpec {
                parent: (i > 0).then(|| name((i - 1) / 2)),
                team: Some(format!("team-{}", i % 7)),
                ..Default::default()
            };
            DesiredWorkspace {
                key: ObjectKey::new("default", name(i)),
                generation: 1,
                spec: resolve(&spec, &Defaults::default()),
                source: SourceRef { kind: "dir".into(), reference: format!("{}.yaml", name(i)) }.into(),
                conflict: None,
                owner_team: None,
                deletion_refused: None,
            }
        });
        let desired = support::registry::desired_set(declared);
        let (url, admin_token, tokens, store, reports) = runtime.block_on(async {
            let store = molecule::store::open(&dir.path().join("state.db").display().to_string()).await.unwrap();
            let mut tokens = Vec::new();
            for i in 0..n {
                let rec = store.ensure_workspace(&format!("default/{}", name(i)), chrono::Utc::now()).await.unwrap();
                let inc = store.bump_incarnation(&rec.uid).await.unwrap();
                let tok = store.issue_token(&rec.uid, inc, chrono::Utc::now()).await.unwrap();
                let mut status = support::registry::online_status();
                status.incarnation = inc;
                status.token = Some(TokenStatus {
                    prefix: tok.row.prefix.clone(),
                    issued_at: chrono::Utc::now(),
                    last_used_at: None,
                });
                store.save_status(&rec.uid, &status).await.unwrap();
                tokens.push(tok.plaintext);
            }
            let (trigger, triggers) = molecule::trigger::Trigger::new();
            std::mem::forget(triggers);
            let (desired_tx, desired_rx) = tokio::sync::watch::channel(Arc::new(desired));
            std::mem::forget(desired_tx);
            let admin_token = molecule::registry::load_or_create_admin_token(dir.path()).unwrap();
            let mut state = molecule::registry::AppState::new(
                store.clone(),
                trigger,
                desired_rx,
                admin_token.clone(),
                Arc::new(molecule::metrics::Metrics::new()),
            );
            let reports = tokio::sync::broadcast::channel(1024).0;
            state.reports = Some(reports.clone());
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let url = molecule::registry::address_url(listener.local_addr().unwrap());
            tokio::spawn(molecule::registry::serve(
                listener,
                molecule::registry::router(state),
                std::future::pending(),
            ));
            (url, admin_token, tokens, store, reports)
        });
        Self { url, admin_token, tokens, store, reports, runtime, _dir: dir }
    }

    /// A login URL, as `open` gets one.
    fn login(&self) -> String {
        let r = http().post(format!("{}/api/v1/logins", self.url)).bearer_auth(&self.admin_token).send().unwrap();
        assert_eq!(r.status().as_u16(), 201);
        let v: Value = r.json().unwrap();
        format!("{}/{}", self.url, v["path"].as_str().unwrap())
    }

    /// Gives workspace `name` a new incarnation and tells the stream, as a reconcile would.
    fn reprovision(&self, name: &str, incarnation: i64) {
        self.runtime.block_on(async {
            let key = format!("default/{name}");
            let rec = self.store.workspace(&key).await.unwrap().unwrap();
            let mut status = rec.status.clone().unwrap();
            status.incarnation = incarnation;
            self.store.save_status(&rec.uid, &status).await.unwrap();
            let decision = molecule::model::DecisionRecord {
                at: chrono::Utc::now(),
                rule: "provision".into(),
                cause: "the test replaced it".into(),
                actions: vec![],
                outcome: "ok".into(),
            };
            let _ = self.reports.send(molecule::trigger::Report {
                key,
                status: Some(status),
                decisions: vec![decision],
                forgotten: false,
                error: None,
            });
        });
    }
}

#[test]
fn five_hundred_workspaces_are_drawn_once_and_a_change_touches_only_its_own_row() {
    let Some(browser) = Browser::start("fleet_500", 1280, 900) else { return };
    let fleet = Fleet::start(500);
    browser.goto(&fleet.login());
    browser.wait_for("500 workspaces", PAGE, "return document.querySelectorAll('li.node').length", |v| v == 500);
    browser.wait_for("the stream", PAGE, "return document.getElementById('conn').dataset.state", |v| v == "live");
    let depth = browser.execute(
        "let d = 0, e = document.querySelector('li.node[data-key=\"default/agent-499\"]'); \
         while ((e = e.parentElement.closest('li.node'))) d++; return d;",
        json!([]),
    );
    assert_eq!(depth, 8, "agent-499 sits 8 levels under agent-000");
    assert!(browser.text("#summary").unwrap().starts_with("500/500 running"));

    // Record every change to the tree from now on, by the row it falls in.
    browser.execute(
        "window.touched = {}; new MutationObserver((records) => { for (const r of records) { \
           const t = r.target.nodeType === 1 ? r.target : r.target.parentElement; \
           const li = t.closest('li.node'); const k = li ? li.dataset.key : '(tree)'; \
           const own = li && (t === li || li.querySelector(':scope > .ws').contains(t)); \
           window.touched[own ? k : k + ' (children)'] = true; } }) \
           .observe(document.getElementById('tree'), {subtree: true, childList: true, characterData: true, attributes: true});",
        json!([]),
    );
    fleet.reprovision("agent-321", 2);
    browser.wait_for(
        "agent-321's new incarnation",
        PAGE,
        "return document.querySelector('li.node[data-key=\"default/agent-321\"] > .ws [data-field=incarnation]').textContent",
        |v| v == "2",
    );
    // The flash class comes and goes on the row itself; nothing else in the tree moved.
    let touched = browser.execute("return Object.keys(window.touched).sort()", json!([]));
    assert_eq!(touched, json!(["default/agent-321"]), "only the changed row is touched");
    let decisions = browser.text("li.node[data-key=\"default/agent-321\"] > .ws [data-field=decisions]").unwrap();
    assert!(decisions.contains("the test replaced it"), "{decisions}");

    let mut all = fleet.tokens.clone();
    all.push(fleet.admin_token.clone());
    let source = browser.execute("return document.documentElement.outerHTML", json!([])).to_string();
    for t in &all {
        assert!(!source.contains(t.as_str()), "the page holds a token");
    }
}
