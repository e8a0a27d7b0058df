//! Does the registry's answer time tell which kind of bad token was sent?
//!
//! The registry router, in process, over a real SQLite store in a temp dir, gets
//! heartbeats with each kind of credential, interleaved round-robin so that drift
//! (cache warmth, the machine's load) hits every kind alike. Each request comes from
//! its own source address, so the failure limiter never throttles the run. Reports
//! p50/p90/p99 per kind, the p50 difference to the "unknown token" kind, and whether
//! every 401 body is the same bytes. Run through `bench/auth_timing`.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::ConnectInfo;
use chrono::Utc;
use http::Request;
use http_body_util::BodyExt;
use molecule::metrics::Metrics;
use molecule::model::RevokeReason;
use molecule::registry::AppState;
use molecule::store::token;
use tower::ServiceExt;

struct Kind {
    name: &'static str,
    bearer: Option<String>,
    uid: String,
    times: Vec<Duration>,
    statuses: std::collections::BTreeSet<u16>,
    bodies: std::collections::BTreeSet<Vec<u8>>,
}

fn pct(sorted: &[Duration], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i].as_secs_f64() * 1e6
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let quick = args.iter().any(|a| a == "--quick");
    let rounds: usize = if quick { 300 } else { 5000 };
    let results = std::env::var("BENCH_RESULTS").unwrap_or_else(|_| "bench/results".into());
    let out = format!("{results}/auth_timing.md");

    let dir = tempfile::tempdir().unwrap();
    let store = molecule::store::open(dir.path().join("state.db").to_str().unwrap()).await.unwrap();
    let now = Utc::now();
    // 1000 workspaces with a token each, so lookups hit a realistic index.
    let mut recs = Vec::new();
    for i in 0..1000 {
        let rec = store.ensure_workspace(&format!("default/w{i}"), now).await.unwrap();
        let inc = store.bump_incarnation(&rec.uid).await.unwrap();
        let tok = store.issue_token(&rec.uid, inc, now).await.unwrap();
        recs.push((rec.uid, tok));
    }
    let mut recs = recs.into_iter();
    let (a_uid, a_good) = recs.next().unwrap();
    let (b_uid, b_good) = recs.next().unwrap();
    // Revoked: issued, then every token but a newer one revoked.
    let (c_uid, c_old) = recs.next().unwrap();
    let c_new = store.issue_token(&c_uid, 1, now).await.unwrap();
    store.revoke_tokens(&c_uid, RevokeReason::Rotated, Some(&c_new.row.id), now).await.unwrap();
    // Superseded: a live token of incarnation 1, the workspace is at 2.
    let (d_uid, d_old) = recs.next().unwrap();
    store.bump_incarnation(&d_uid).await.unwrap();
    // Expired: rotated out, past its overlap.
    let (e_uid, e_old) = recs.next().unwrap();
    store.issue_token(&e_uid, 1, now).await.unwrap();
    store.expire_token(&e_uid, &e_old.row.id, now - chrono::Duration::seconds(1)).await.unwrap();

    let (trigger, mut triggered) = molecule::trigger::Trigger::new();
    tokio::spawn(async move { while triggered.recv().await.is_some() {} });
    let (_desired_tx, desired) =
        tokio::sync::watch::channel(Arc::new(molecule::source::desired::DesiredSet::default()));
    let state = AppState::new(store, trigger, desired, token::generate(), Arc::new(Metrics::new()));
    let router = molecule::registry::router(state);

    let bearer = |t: &str| Some(format!("Bearer {t}"));
    let mut kinds: Vec<Kind> = [
        ("good (200)", bearer(&a_good.plaintext), a_uid.clone()),
        ("missing", None, a_uid.clone()),
        ("malformed", Some("Bearer not-a-token".to_string()), a_uid.clone()),
        ("unknown", bearer(&token::generate()), a_uid.clone()),
        ("revoked", bearer(&c_old.plaintext), c_uid.clone()),
        ("superseded incarnation", bearer(&d_old.plaintext), d_uid.clone()),
        ("expired (rotated out)", bearer(&e_old.plaintext), e_uid.clone()),
        ("other workspace's (403)", bearer(&b_good.plaintext), a_uid.clone()),
    ]
    .into_iter()
    .map(|(name, bearer, uid)| Kind {
        name,
        bearer,
        uid,
        times: Vec::with_capacity(rounds),
        statuses: Default::default(),
        bodies: Default::default(),
    })
    .collect();
    let _ = b_uid;

    let mut n: u32 = 0;
    for round in 0..rounds + rounds / 10 {
        for k in kinds.iter_mut() {
            n = n.wrapping_add(1);
            let mut req = Request::post("/registry/heartbeat")
                .header("content-type", "application/json")
                .body(Body::from(format!("{{\"workspace_id\":\"{}\"}}", k.uid)))
                .unwrap();
            if let Some(b) = &k.bearer {
                req.headers_mut().insert("authorization", b.parse().unwrap());
            }
            let ip = Ipv4Addr::from(0x0a00_0000 | n); // its own source: never throttled
            req.extensions_mut().insert(ConnectInfo(SocketAddr::from((ip, 40000))));
            let t0 = Instant::now();
            let resp = router.clone().oneshot(req).await.unwrap();
            let status = resp.status().as_u16();
            let body = resp.into_body().collect().await.unwrap().to_bytes().to_vec();
            let took = t0.elapsed();
            if round >= rounds / 10 {
                // the first tenth warms up
                k.times.push(took);
                k.statuses.insert(status);
                if status == 401 {
                    k.bodies.insert(body);
                }
            }
        }
    }

    let unknown_p50 = {
        let mut t = kinds.iter().find(|k| k.name == "unknown").unwrap().times.clone();
        t.sort();
        pct(&t, 0.5)
    };
    let mut all_401_bodies = std::collections::BTreeSet::new();
    let mut rows = String::new();
    for k in kinds.iter_mut() {
        k.times.sort();
        all_401_bodies.extend(k.bodies.iter().cloned());
        let p50 = pct(&k.times, 0.5);
        rows += &format!(
            "| {} | {} | {:.0} | {:.0} | {:.0} | {:+.0} |\n",
            k.name,
            k.statuses.iter().map(u16::to_string).collect::<Vec<_>>().join(","),
            p50,
            pct(&k.times, 0.9),
            pct(&k.times, 0.99),
            p50 - unknown_p50
        );
    }
    let command = format!("bench/auth_timing{}", if quick { " --quick" } else { "" });
    let text = format!(
        "## Registry 401 timing\n\n\
         Command: `{command}`\n\n\
         {rounds} heartbeats of each kind, interleaved round-robin, through the registry router in \
         process (no socket) over a real SQLite store holding 1000 workspaces and their tokens. \
         Times in microseconds from request to the end of the body.\n\n\
         | credential | status | p50 µs | p90 µs | p99 µs | p50 − unknown's |\n|---|---|---|---|---|---|\n{rows}\n\
         Distinct 401 bodies across every kind: **{}** (one means the body tells nothing).\n\n\
         What it means: every kind that carries a well-formed token costs one indexed \
         lookup of its hash, then the same workspace lookup; compare the last column with the \
         spread (p90 against p50). A superseded-incarnation token (a live row of an older \
         incarnation: a transient state, since every reprovision revokes the old incarnation's \
         tokens) is found and then refused, the others are not found or are refused on the same \
         row read, so small differences remain. Missing and malformed bearers are answered without a lookup and so \
         are faster, but they tell the caller nothing it did not already know: it chose to send \
         no token or a malformed one. Over a real socket each answer also costs the connection \
         and HTTP framing, which blurs the differences further.\n",
        all_401_bodies.len()
    );
    std::fs::create_dir_all(&results).unwrap();
    std::fs::write(&out, &text).unwrap();
    println!("{text}");
}
