//! The fleet page at `/`: plain HTML, CSS and JavaScript from `web/`, compiled into
//! the binary (no build step). It needs the admin credential like the admin API (the
//! browser's session cookie, login.rs); without one it answers 401 with a page that
//! says how to log in. It holds no data: the script reads `/api/v1/fleet?watch=true`
//! (fleet.rs) and calls the admin API for the buttons.
//!
//! Every answer here is private: not cached, not framed, no referrer sent onwards,
//! and a content security policy that lets the page run only its own script and talk
//! only to its own origin.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::AppState;

const INDEX_HTML: &str = include_str!("web/index.html");
const FLEET_CSS: &str = include_str!("web/fleet.css");
const FLEET_JS: &str = include_str!("web/fleet.js");

const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; \
                   base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

/// The headers every page answer carries.
pub(crate) fn private(headers: &mut HeaderMap) {
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    headers.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    headers.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    headers.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(CSP));
}

/// The page's routes: the admin bearer or a session, else [`login_needed`].
pub(crate) async fn require_login(State(state): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    if super::auth::credential(&state, req.headers()).is_none() {
        return login_needed("The fleet page needs a login.");
    }
    let mut response = next.run(req).await;
    private(response.headers_mut());
    response
}

/// 401: a short page that says `why` and how to log in.
pub(crate) fn login_needed(why: &str) -> Response {
    let html = format!(
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>molecule fleet: log in</title></head>\
         <body><h1>Log in to the fleet page</h1><p>{}</p><p>Run <code>molecule-operator open</code> (with the \
         operator's <code>--state</code>): it opens this page with a one-time login. \
         <code>molecule-operator open --no-browser</code> prints the link instead.</p></body></html>\n",
        escape(why)
    );
    let mut response =
        (StatusCode::UNAUTHORIZED, [(header::CONTENT_TYPE, "text/html; charset=utf-8")], html).into_response();
    private(response.headers_mut());
    response
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

pub(crate) async fn index() -> Response {
    ([(header::CONTENT_TYPE, "text/html; charset=utf-8")], INDEX_HTML).into_response()
}

pub(crate) async fn css() -> Response {
    ([(header::CONTENT_TYPE, "text/css; charset=utf-8")], FLEET_CSS).into_response()
}

pub(crate) async fn js() -> Response {
    ([(header::CONTENT_TYPE, "text/javascript; charset=utf-8")], FLEET_JS).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_page_loads_only_its_own_assets() {
        assert!(INDEX_HTML.contains("assets/fleet.js") && INDEX_HTML.contains("assets/fleet.css"));
        assert!(!INDEX_HTML.contains("<script>"), "no inline script: the CSP forbids it");
        assert!(!INDEX_HTML.contains("http://") && !INDEX_HTML.contains("https://"), "nothing from elsewhere");
        // Data reaches the DOM as text only: workspace names and causes are not markup.
        assert!(!FLEET_JS.contains("innerHTML"), "fleet.js must set text, never markup");
    }

    #[test]
    fn escapes_markup() {
        assert_eq!(escape("<b>&\"</b>"), "&lt;b&gt;&amp;&quot;&lt;/b&gt;");
    }
}
