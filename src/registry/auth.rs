//! Bearer tokens: parsing the header, the admin token (its file and a constant-time
//! check), and the admin routes' guard, which also takes a browser session
//! (login.rs). Workspace tokens are checked in agent.rs by hash lookup.

use std::io::{self, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::Response;
use sha2::{Digest, Sha256};

use super::limit::{Source, too_many};
use super::login::REQUEST_HEADER;
use super::{AppState, admin_token_path, error};
use crate::store::token;

/// The token in `Authorization: Bearer <token>`, if the header has that shape.
pub fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, rest) = value.split_once(' ')?;
    let token = rest.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

/// Compares two secrets in time that depends on neither's content nor length
/// (both are hashed first, then every byte is compared).
pub fn constant_time_eq(a: &str, b: &str) -> bool {
    let (ha, hb) = (Sha256::digest(a.as_bytes()), Sha256::digest(b.as_bytes()));
    ha.iter().zip(hb.iter()).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// 401 with a `WWW-Authenticate` challenge.
pub(crate) fn unauthorized(message: &str) -> Response {
    let mut r = error(StatusCode::UNAUTHORIZED, message);
    r.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    r
}

pub const ADMIN_UNAUTHORIZED: &str =
    "missing or wrong admin token: send `Authorization: Bearer <STATE/admin-token>` (the CLI does this with --state)";

/// How a request proved it may use the admin API.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Credential {
    /// `Authorization: Bearer <admin token>` (the CLI).
    Bearer,
    /// The fleet page's session cookie (login.rs).
    Session,
}

/// The request's admin credential, if it has one: the bearer when one is sent (a
/// wrong bearer is refused even beside a good cookie), else the session cookie.
pub(crate) fn credential(state: &AppState, headers: &HeaderMap) -> Option<Credential> {
    match bearer(headers) {
        Some(t) => constant_time_eq(t, &state.admin_token).then_some(Credential::Bearer),
        None => state.logins.has_session(headers, std::time::Instant::now()).then_some(Credential::Session),
    }
}

/// Admin routes: the admin bearer, or the page's session cookie; with the cookie, a
/// state-changing method also needs `X-Molecule-Request: 1` (login.rs says why).
/// The handler finds the [`Credential`] among the request's extensions.
/// Failures count against the source's allowance (limit.rs): a source that keeps
/// guessing is answered 429, while the right token is always let through.
pub(crate) async fn require_admin(
    State(state): State<Arc<AppState>>,
    Source(ip): Source,
    mut req: Request,
    next: Next,
) -> Response {
    match credential(&state, req.headers()) {
        Some(Credential::Session)
            if !req.method().is_safe() && req.headers().get(REQUEST_HEADER).is_none_or(|v| v.as_bytes() != b"1") =>
        {
            error(
                StatusCode::FORBIDDEN,
                "a change made with the browser session needs the header `X-Molecule-Request: 1` (the fleet page sends it)",
            )
        }
        Some(c) => {
            req.extensions_mut().insert(c);
            next.run(req).await
        }
        None => {
            let now = std::time::Instant::now();
            if let Err(wait) = state.limiter.admit(ip, None, now) {
                return too_many(wait);
            }
            state.limiter.failed(ip, now);
            unauthorized(ADMIN_UNAUTHORIZED)
        }
    }
}

/// Reads `STATE/admin-token`, creating it (mode 0600, a fresh 43-character token)
/// on first start. A file readable by others is narrowed to 0600.
pub fn load_or_create_admin_token(state_dir: &Path) -> io::Result<String> {
    std::fs::create_dir_all(state_dir)?;
    let path = admin_token_path(state_dir);
    match std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&path) {
        Ok(mut f) => {
            let t = token::generate();
            f.write_all(format!("{t}\n").as_bytes())?;
            f.sync_all()?;
            tracing::info!(path = %path.display(), "created the admin token");
            return Ok(t);
        }
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(with_path(e, "cannot create the admin token file", &path)),
    }
    let meta = std::fs::metadata(&path).map_err(|e| with_path(e, "cannot read the admin token file", &path))?;
    if meta.permissions().mode() & 0o077 != 0 {
        tracing::warn!(path = %path.display(), "the admin token file was readable by others; setting it to 0600");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
    }
    let text = std::fs::read_to_string(&path).map_err(|e| with_path(e, "cannot read the admin token file", &path))?;
    let t = text.trim();
    if t.is_empty() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("the admin token file {} is empty; delete it and a new token is created at start", path.display()),
        ));
    }
    Ok(t.to_string())
}

fn with_path(e: io::Error, what: &str, path: &Path) -> io::Error {
    io::Error::new(e.kind(), format!("{what} {}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_shapes() {
        let mut h = HeaderMap::new();
        assert_eq!(bearer(&h), None);
        h.insert(header::AUTHORIZATION, HeaderValue::from_static("Bearer abc"));
        assert_eq!(bearer(&h), Some("abc"));
        h.insert(header::AUTHORIZATION, HeaderValue::from_static("bearer  abc "));
        assert_eq!(bearer(&h), Some("abc"));
        h.insert(header::AUTHORIZATION, HeaderValue::from_static("Bearer "));
        assert_eq!(bearer(&h), None);
        h.insert(header::AUTHORIZATION, HeaderValue::from_static("Basic abc"));
        assert_eq!(bearer(&h), None);
    }

    #[test]
    fn constant_time_eq_compares_content() {
        assert!(constant_time_eq("abc", "abc"));
        assert!(!constant_time_eq("abc", "abd"));
        assert!(!constant_time_eq("abc", "abcd"));
        assert!(!constant_time_eq("", "a"));
    }

    #[test]
    fn admin_token_created_0600_once_then_reused() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        let t = load_or_create_admin_token(&state).unwrap();
        assert!(token::well_formed(&t));
        let mode = std::fs::metadata(admin_token_path(&state)).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(load_or_create_admin_token(&state).unwrap(), t);
        std::fs::set_permissions(admin_token_path(&state), std::fs::Permissions::from_mode(0o644)).unwrap();
        assert_eq!(load_or_create_admin_token(&state).unwrap(), t);
        let mode = std::fs::metadata(admin_token_path(&state)).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }
}
