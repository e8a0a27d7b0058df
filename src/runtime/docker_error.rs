//! What Docker's errors mean to the operator: a daemon that cannot be reached is
//! `Unavailable` (retried; never read as "nothing exists"), a refusal is `Api` with
//! the daemon's message and status. Shared by everything that talks to Docker (the
//! runtime, the agent image build).

use std::fmt;

use bollard::errors::Error as DockerError;

use super::RuntimeError;

pub(crate) fn status(e: &DockerError) -> Option<u16> {
    match e {
        DockerError::DockerResponseServerError { status_code, .. } => Some(*status_code),
        _ => None,
    }
}

pub(crate) fn message(e: &DockerError) -> &str {
    match e {
        DockerError::DockerResponseServerError { message, .. } => message,
        _ => "",
    }
}

/// Failures to reach the daemon at all, as opposed to the daemon refusing a request.
pub(crate) fn is_unavailable(e: &DockerError) -> bool {
    matches!(
        e,
        DockerError::HyperLegacyError { .. }
            | DockerError::HyperResponseError { .. }
            | DockerError::IOError { .. }
            | DockerError::RequestTimeoutError
            | DockerError::SocketNotFoundError(_)
    )
}

pub(crate) fn api_error(what: impl fmt::Display, e: DockerError) -> RuntimeError {
    if is_unavailable(&e) {
        return unavailable(format!("{what}: {}", chain(&e)));
    }
    match &e {
        DockerError::DockerResponseServerError { status_code, message } => {
            RuntimeError::Api(format!("{what}: {message} (HTTP {status_code})"))
        }
        _ => RuntimeError::Api(format!("{what}: {}", chain(&e))),
    }
}

/// An error with its causes: hyper's top-level messages alone say little.
pub(crate) fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    out
}

/// The daemon cannot be reached at all: said as a sentence with what to check.
pub(crate) fn unavailable(detail: String) -> RuntimeError {
    RuntimeError::Unavailable(format!(
        "Docker is unreachable ({detail}); is the daemon running and /var/run/docker.sock readable?"
    ))
}
