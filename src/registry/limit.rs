//! Rate limiting of failed authentication, per source address.
//!
//! Every registry request with a well-formed token costs a database lookup, and every
//! wrong admin token is a guess. A source whose requests keep failing (401/403) spends
//! its allowance (a token bucket: [`BURST`] failures at once, refilled at
//! [`REFILL_PER_SECOND`]); once it is spent, that source's requests are answered 429
//! with `Retry-After` **before** any lookup, so a flood of bad tokens costs the store
//! nothing and guessing is slowed to the refill rate.
//!
//! Agents on the host network all come from 127.0.0.1, the same source as any local
//! process that floods the registry. So throttling a source must not lock its good
//! agents out: a request whose token was accepted recently ([`KNOWN_GOOD_FOR`]) is
//! still checked against the database as usual, throttled or not, and so is a token
//! this process has just issued (the executor vouches for it). Being remembered
//! only lets a token *be checked*; it never accepts one, so a revoked token is refused
//! the moment it is revoked, as always. Only a token neither issued by this process
//! nor accepted by it (one issued by another replica in HA mode) is answered 429 from
//! a throttled source; its agent retries with backoff until the flood stops.
//!
//! Memory is bounded: at most [`MAX_SOURCES`] buckets (full ones are dropped first)
//! and [`MAX_KNOWN_GOOD`] remembered token hashes.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use axum::extract::{ConnectInfo, FromRequestParts};
use axum::http::request::Parts;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::Response;

/// Failures a source may have at once before it is throttled.
pub const BURST: f64 = 30.0;
/// Failures per second a source regains.
pub const REFILL_PER_SECOND: f64 = 2.0;
/// How long a token that was accepted may still be checked from a throttled source.
pub const KNOWN_GOOD_FOR: Duration = Duration::from_secs(30 * 60);
const MAX_SOURCES: usize = 16_384;
const MAX_KNOWN_GOOD: usize = 200_000;

/// The 429 body.
pub const THROTTLED: &str = "too many failed authentications from this address; retry later";

/// The peer address of the connection (127.0.0.1 when the server was not started with
/// connection info, e.g. a router driven in-process).
#[derive(Clone, Copy, Debug)]
pub struct Source(pub IpAddr);

impl<S: Send + Sync> FromRequestParts<S> for Source {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        let ip = parts.extensions.get::<ConnectInfo<SocketAddr>>().map_or(Ipv4Addr::LOCALHOST.into(), |c| c.0.ip());
        Ok(Source(ip))
    }
}

#[derive(Debug)]
struct Bucket {
    left: f64,
    at: Instant,
}

impl Bucket {
    fn refill(&mut self, now: Instant) {
        let gained = now.saturating_duration_since(self.at).as_secs_f64() * REFILL_PER_SECOND;
        self.left = (self.left + gained).min(BURST);
        self.at = now;
    }
}

#[derive(Debug, Default)]
pub struct FailureLimiter {
    sources: Mutex<HashMap<IpAddr, Bucket>>,
    known_good: Mutex<HashMap<String, Instant>>,
}

impl FailureLimiter {
    /// How long until `ip` may fail again, if it is throttled now.
    pub fn throttled(&self, ip: IpAddr, now: Instant) -> Option<Duration> {
        let mut sources = self.sources.lock().unwrap_or_else(PoisonError::into_inner);
        let bucket = sources.get_mut(&ip)?;
        bucket.refill(now);
        (bucket.left < 1.0).then(|| Duration::from_secs_f64((1.0 - bucket.left) / REFILL_PER_SECOND))
    }

    /// `ip` failed to authenticate: spends one from its allowance.
    pub fn failed(&self, ip: IpAddr, now: Instant) {
        let mut sources = self.sources.lock().unwrap_or_else(PoisonError::into_inner);
        if sources.len() >= MAX_SOURCES && !sources.contains_key(&ip) {
            sources.retain(|_, b| {
                b.refill(now);
                b.left < BURST
            });
        }
        let bucket = sources.entry(ip).or_insert(Bucket { left: BURST, at: now });
        bucket.refill(now);
        bucket.left = (bucket.left - 1.0).max(0.0);
    }

    /// A token (by hash) is good: the registry accepted it, or the operator issued it.
    pub fn vouch(&self, token_hash: &str, now: Instant) {
        let mut known = self.known_good.lock().unwrap_or_else(PoisonError::into_inner);
        if known.len() >= MAX_KNOWN_GOOD && !known.contains_key(token_hash) {
            known.retain(|_, at| now.saturating_duration_since(*at) < KNOWN_GOOD_FOR);
            if known.len() >= MAX_KNOWN_GOOD {
                known.clear(); // only costs good agents a retry while their host floods us
            }
        }
        known.insert(token_hash.to_string(), now);
    }

    /// Whether a request from `ip` presenting this token (by hash, if it has a
    /// well-formed one) may be checked now, or is answered 429 (with the wait).
    pub fn admit(&self, ip: IpAddr, token_hash: Option<&str>, now: Instant) -> Result<(), Duration> {
        let Some(wait) = self.throttled(ip, now) else { return Ok(()) };
        let known = self.known_good.lock().unwrap_or_else(PoisonError::into_inner);
        match token_hash.and_then(|h| known.get(h)) {
            Some(at) if now.saturating_duration_since(*at) < KNOWN_GOOD_FOR => Ok(()),
            _ => Err(wait),
        }
    }
}

/// 429 with `Retry-After` (whole seconds, at least 1).
pub fn too_many(wait: Duration) -> Response {
    let mut r = super::error(StatusCode::TOO_MANY_REQUESTS, THROTTLED);
    let secs = wait.as_secs_f64().ceil().max(1.0) as u64;
    r.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(secs));
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 1));
    const B: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));

    #[test]
    fn a_source_is_throttled_after_its_burst_and_recovers_at_the_refill_rate() {
        let l = FailureLimiter::default();
        let t0 = Instant::now();
        for _ in 0..BURST as usize {
            assert_eq!(l.admit(A, None, t0), Ok(()));
            l.failed(A, t0);
        }
        let wait = l.admit(A, None, t0).expect_err("throttled after the burst");
        assert_eq!(wait, Duration::from_secs_f64(1.0 / REFILL_PER_SECOND));
        assert_eq!(l.admit(B, None, t0), Ok(()), "another source is not affected");
        assert_eq!(l.admit(A, None, t0 + wait), Ok(()), "one failure regained after the wait");
        l.failed(A, t0 + wait);
        assert!(l.admit(A, None, t0 + wait).is_err(), "and spent again");
    }

    #[test]
    fn a_recently_accepted_token_is_still_checked_from_a_throttled_source() {
        let l = FailureLimiter::default();
        let t0 = Instant::now();
        l.vouch("good", t0);
        for _ in 0..100 {
            l.failed(A, t0);
        }
        assert_eq!(l.admit(A, Some("good"), t0), Ok(()));
        assert!(l.admit(A, Some("other"), t0).is_err());
        assert!(l.admit(A, None, t0).is_err());
        let later = t0 + KNOWN_GOOD_FOR;
        for _ in 0..100 {
            l.failed(A, later);
        }
        assert!(l.admit(A, Some("good"), later).is_err(), "remembered only for KNOWN_GOOD_FOR");
    }

    #[test]
    fn memory_stays_bounded_under_many_sources() {
        let l = FailureLimiter::default();
        let t0 = Instant::now();
        for i in 0..(MAX_SOURCES as u32 + 1000) {
            l.failed(IpAddr::V4(Ipv4Addr::from(i)), t0 + Duration::from_secs(u64::from(i)));
        }
        assert!(l.sources.lock().unwrap().len() <= MAX_SOURCES);
    }
}
