//! Errors as Kubernetes `Status` objects, so kubectl and kube-rs print them.

use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

/// One field problem: `field` is a path such as `spec.tier`.
#[derive(Clone, Debug, PartialEq)]
pub struct Cause {
    pub field: String,
    pub reason: &'static str,
    pub message: String,
}

/// A failed request, rendered as `kind: Status, status: Failure`.
#[derive(Clone, Debug)]
pub struct ApiError {
    pub code: u16,
    pub reason: &'static str,
    pub message: String,
    pub details: Option<Value>,
}

impl ApiError {
    pub fn new(code: u16, reason: &'static str, message: impl Into<String>) -> Self {
        Self { code, reason, message: message.into(), details: None }
    }
    pub fn unauthorized() -> Self {
        Self::new(
            401,
            "Unauthorized",
            "Unauthorized: send the operator's admin token as `Authorization: Bearer <token>` (STATE/kubeconfig has it)",
        )
    }
    pub fn not_found_path(path: &str) -> Self {
        Self::new(404, "NotFound", format!("the server could not find the requested resource ({path})"))
    }
    pub fn not_found(qualified_kind: &str, name: &str) -> Self {
        let (kind, group) = qualified_kind.split_once('.').unwrap_or((qualified_kind, ""));
        let plural = format!("{}s", kind.to_lowercase());
        let resource = if group.is_empty() { plural.clone() } else { format!("{plural}.{group}") };
        let mut e = Self::new(404, "NotFound", format!("{resource} \"{name}\" not found"));
        e.details = Some(json!({"name": name, "group": group, "kind": plural}));
        e
    }
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(400, "BadRequest", message)
    }
    pub fn method_not_allowed(message: impl Into<String>) -> Self {
        Self::new(405, "MethodNotAllowed", message)
    }
    pub fn unsupported_media(content_type: &str) -> Self {
        Self::new(
            415,
            "UnsupportedMediaType",
            format!("the body of the request was in an unknown format: {content_type}"),
        )
    }
    pub fn conflict(qualified_kind: &str, name: &str, why: &str) -> Self {
        Self::new(409, "Conflict", format!("Operation cannot be fulfilled on {qualified_kind} \"{name}\": {why}"))
    }
    pub fn already_exists(qualified_kind: &str, name: &str) -> Self {
        Self::new(409, "AlreadyExists", format!("{qualified_kind} \"{name}\" already exists"))
    }
    /// 403: `pods "x" is forbidden: <why>`.
    pub fn forbidden(kind: super::Kind, name: &str, why: String) -> Self {
        let resource = if kind.group().is_empty() {
            kind.plural().to_string()
        } else {
            format!("{}.{}", kind.plural(), kind.group())
        };
        let mut e = Self::new(403, "Forbidden", format!("{resource} \"{name}\" is forbidden: {why}"));
        e.details = Some(json!({"name": name, "group": kind.group(), "kind": kind.plural()}));
        e
    }
    /// 429 with the wait, for a source that failed to authenticate too often.
    pub fn too_many_requests(wait: std::time::Duration) -> Self {
        let seconds = wait.as_secs().max(1);
        let mut e = Self::new(
            429,
            "TooManyRequests",
            format!("too many failed authentications from this address; retry in {seconds} s"),
        );
        e.details = Some(json!({"retryAfterSeconds": seconds}));
        e
    }
    pub fn service_unavailable(message: impl Into<String>) -> Self {
        Self::new(503, "ServiceUnavailable", message)
    }
    pub fn gone(message: impl Into<String>) -> Self {
        Self::new(410, "Expired", message)
    }
    /// 422 naming the object and every field at fault, as `kubectl` prints them.
    pub fn invalid(qualified_kind: &str, name: &str, causes: Vec<Cause>) -> Self {
        let list = causes.iter().map(|c| format!("{}: {}", c.field, c.message)).collect::<Vec<_>>();
        let message = match list.as_slice() {
            [one] => format!("{qualified_kind} \"{name}\" is invalid: {one}"),
            many => format!("{qualified_kind} \"{name}\" is invalid: [{}]", many.join(", ")),
        };
        let (kind, group) = qualified_kind.split_once('.').unwrap_or((qualified_kind, ""));
        let causes: Vec<Value> =
            causes.iter().map(|c| json!({"reason": c.reason, "message": c.message, "field": c.field})).collect();
        let mut e = Self::new(422, "Invalid", message);
        e.details = Some(json!({"name": name, "group": group, "kind": kind, "causes": causes}));
        e
    }
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(500, "InternalError", message)
    }

    /// The `Status` object (also what a watch's ERROR event carries).
    pub fn status(&self) -> Value {
        let mut status = json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code,
        });
        if let Some(details) = &self.details {
            status["details"] = details.clone();
        }
        status
    }
}

impl From<crate::store::StoreError> for ApiError {
    fn from(error: crate::store::StoreError) -> Self {
        tracing::warn!(%error, "kube-api: state store failed");
        Self::internal(format!("the operator's state store failed: {error}"))
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let retry_after = self.details.as_ref().and_then(|d| d["retryAfterSeconds"].as_u64());
        let mut response = super::json_response(self.code, &self.status());
        if let Some(seconds) = retry_after
            && let Ok(value) = axum::http::HeaderValue::from_str(&seconds.to_string())
        {
            response.headers_mut().insert(axum::http::header::RETRY_AFTER, value);
        }
        response
    }
}
