//! Browser logins for the fleet page. A browser cannot send the admin bearer on a page
//! load or an `EventSource`, so the admin token is traded in two steps:
//!
//! 1. `molecule-operator open` (admin bearer) asks `POST /api/v1/logins` for a login
//!    code: random, single use, valid [`CODE_TTL`].
//! 2. The browser opens `GET /login?code=...`, which spends the code, sets a session
//!    cookie (HttpOnly, SameSite=Strict, [`SESSION_TTL`]) and answers 303 to `/`, so
//!    the address bar and the history hold no secret.
//!
//! The admin routes and the page accept the cookie in place of the bearer (auth.rs).
//! A state-changing request made with the cookie must also carry
//! [`REQUEST_HEADER`]`: 1`: no cross-site form can send a custom header, and a
//! cross-site script could only send it after a CORS preflight this server never
//! grants. SameSite=Strict keeps the cookie off cross-site requests besides.
//!
//! Codes and sessions live in memory, stored by hash (a lookup reveals nothing through
//! its timing), bounded in number: a restarted operator has forgotten them (run
//! `open` again). Cookies are not scoped by port, so each operator process names its
//! cookie with a random suffix: two operators on one host never read each other's.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use axum::extract::{Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::AppState;
use super::auth::Credential;
use super::limit::{Source, too_many};
use crate::store::token;

/// How long a login code may wait to be used.
pub const CODE_TTL: Duration = Duration::from_secs(60);
/// How long a browser session lasts (from its login; it is not extended by use).
pub const SESSION_TTL: Duration = Duration::from_secs(8 * 3600);
/// The header a state-changing request made with the session cookie must carry (value `1`).
pub const REQUEST_HEADER: &str = "x-molecule-request";
/// Cookie names start with this; the rest is random per operator process.
pub const COOKIE_PREFIX: &str = "molecule_session_";
/// Outstanding codes and live sessions kept at most (the oldest go first).
const MAX_CODES: usize = 64;
const MAX_SESSIONS: usize = 256;

type Digest32 = [u8; 32];

fn digest(secret: &str) -> Digest32 {
    Sha256::digest(secret.as_bytes()).into()
}

/// Login codes and browser sessions of one operator process.
#[derive(Debug)]
pub struct Logins {
    cookie: String,
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    /// Code digest -> when it expires.
    codes: HashMap<Digest32, Instant>,
    /// Session id digest -> when it expires.
    sessions: HashMap<Digest32, Instant>,
}

/// Drops what has expired, then the soonest to expire until there is room for one more.
fn make_room(map: &mut HashMap<Digest32, Instant>, max: usize, now: Instant) {
    map.retain(|_, until| *until > now);
    while map.len() >= max {
        let Some(oldest) = map.iter().min_by_key(|(_, until)| **until).map(|(k, _)| *k) else { break };
        map.remove(&oldest);
    }
}

impl Default for Logins {
    fn default() -> Self {
        Self::new()
    }
}

impl Logins {
    pub fn new() -> Self {
        let suffix: String = token::generate().chars().filter(char::is_ascii_alphanumeric).take(10).collect();
        Self { cookie: format!("{COOKIE_PREFIX}{suffix}"), inner: Mutex::default() }
    }

    fn inner(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The session cookie's name.
    pub fn cookie_name(&self) -> &str {
        &self.cookie
    }

    /// A new login code, valid for [`CODE_TTL`] from `now`, once.
    pub fn issue_code(&self, now: Instant) -> String {
        let code = token::generate();
        let mut inner = self.inner();
        make_room(&mut inner.codes, MAX_CODES, now);
        inner.codes.insert(digest(&code), now + CODE_TTL);
        code
    }

    /// Spends `code`: a new session id when it was issued, unused and unexpired.
    pub fn redeem(&self, code: &str, now: Instant) -> Option<String> {
        let mut inner = self.inner();
        let until = inner.codes.remove(&digest(code))?;
        if until <= now {
            return None;
        }
        let session = token::generate();
        make_room(&mut inner.sessions, MAX_SESSIONS, now);
        inner.sessions.insert(digest(&session), now + SESSION_TTL);
        Some(session)
    }

    /// Whether `id` is a live session.
    pub fn is_session(&self, id: &str, now: Instant) -> bool {
        self.inner().sessions.get(&digest(id)).is_some_and(|until| *until > now)
    }

    /// Whether the request carries this operator's cookie with a live session.
    pub fn has_session(&self, headers: &HeaderMap, now: Instant) -> bool {
        cookies(headers).any(|(name, value)| name == self.cookie && self.is_session(value, now))
    }

    /// The `Set-Cookie` value for a new session.
    fn set_cookie(&self, session: &str) -> String {
        format!("{}={session}; Path=/; HttpOnly; SameSite=Strict; Max-Age={}", self.cookie, SESSION_TTL.as_secs())
    }
}

/// Every `name=value` pair of the request's `Cookie` headers.
fn cookies(headers: &HeaderMap) -> impl Iterator<Item = (&str, &str)> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
}

/// What `POST /api/v1/logins` answers.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LoginCode {
    pub code: String,
    /// Where the browser goes with it, relative to the operator's base URL: `login?code=...`.
    pub path: String,
    pub expires_in_seconds: u64,
}

/// `POST /api/v1/logins` (the admin bearer only, never a session: a browser cannot
/// mint itself new logins): a one-time login code for `molecule-operator open`.
pub(crate) async fn create(State(state): State<Arc<AppState>>, Extension(by): Extension<Credential>) -> Response {
    if by != Credential::Bearer {
        return super::error(
            StatusCode::FORBIDDEN,
            "login codes are issued for the admin token only (`molecule-operator open`), not for a browser session",
        );
    }
    let code = state.logins.issue_code(Instant::now());
    let path = format!("login?code={code}");
    (StatusCode::CREATED, Json(LoginCode { code, path, expires_in_seconds: CODE_TTL.as_secs() })).into_response()
}

#[derive(Deserialize)]
pub(crate) struct LoginQuery {
    code: Option<String>,
}

/// `GET /login?code=...`: spends the code, sets the session cookie, sends the browser
/// to the page. A wrong code counts against the source's allowance (limit.rs).
pub(crate) async fn login(
    State(state): State<Arc<AppState>>,
    Source(ip): Source,
    Query(q): Query<LoginQuery>,
) -> Response {
    let now = Instant::now();
    if let Err(wait) = state.limiter.admit(ip, None, now) {
        return too_many(wait);
    }
    let session = q.code.as_deref().and_then(|c| state.logins.redeem(c, now));
    let Some(session) = session else {
        state.limiter.failed(ip, now);
        return super::page::login_needed(
            "This login link was used already or has expired (it works once, within a minute).",
        );
    };
    let mut response = (StatusCode::SEE_OTHER, [(header::LOCATION, HeaderValue::from_static("./"))]).into_response();
    let headers = response.headers_mut();
    if let Ok(cookie) = HeaderValue::from_str(&state.logins.set_cookie(&session)) {
        headers.insert(header::SET_COOKIE, cookie);
    }
    super::page::private(headers);
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_code_works_once_and_only_before_it_expires() {
        let logins = Logins::new();
        let t0 = Instant::now();
        let code = logins.issue_code(t0);
        assert!(token::well_formed(&code));
        let session = logins.redeem(&code, t0 + Duration::from_secs(1)).expect("a fresh code logs in");
        assert!(logins.is_session(&session, t0 + Duration::from_secs(2)));
        assert_eq!(logins.redeem(&code, t0 + Duration::from_secs(2)), None, "a code works once");
        let late = logins.issue_code(t0);
        assert_eq!(logins.redeem(&late, t0 + CODE_TTL), None, "an expired code is refused");
        assert_eq!(logins.redeem("made-up", t0), None);
        assert!(!logins.is_session(&code, t0), "a code is no session");
    }

    #[test]
    fn sessions_expire() {
        let logins = Logins::new();
        let t0 = Instant::now();
        let session = logins.redeem(&logins.issue_code(t0), t0).unwrap();
        assert!(logins.is_session(&session, t0 + SESSION_TTL - Duration::from_secs(1)));
        assert!(!logins.is_session(&session, t0 + SESSION_TTL));
    }

    #[test]
    fn the_cookie_is_found_by_this_operators_name_only() {
        let (a, b) = (Logins::new(), Logins::new());
        assert_ne!(a.cookie_name(), b.cookie_name(), "two operators on one host have cookies of their own");
        let t0 = Instant::now();
        let session = a.redeem(&a.issue_code(t0), t0).unwrap();
        let mut headers = HeaderMap::new();
        let other = format!("{}={session}", b.cookie_name());
        headers.insert(header::COOKIE, HeaderValue::from_str(&other).unwrap());
        assert!(!a.has_session(&headers, t0), "the value under another name does not count");
        let both = format!("x=1; {}={session}; y=2", a.cookie_name());
        headers.append(header::COOKIE, HeaderValue::from_str(&both).unwrap());
        assert!(a.has_session(&headers, t0));
        assert!(!b.has_session(&headers, t0));
        let set = a.set_cookie(&session);
        for attribute in ["HttpOnly", "SameSite=Strict", "Path=/", "Max-Age="] {
            assert!(set.contains(attribute), "{set}");
        }
    }

    #[test]
    fn codes_and_sessions_are_bounded() {
        let logins = Logins::new();
        let t0 = Instant::now();
        let first = logins.issue_code(t0);
        for i in 0..MAX_CODES {
            logins.issue_code(t0 + Duration::from_millis(i as u64 + 1));
        }
        assert_eq!(logins.inner().codes.len(), MAX_CODES);
        assert_eq!(logins.redeem(&first, t0), None, "the oldest code made room");
    }
}
