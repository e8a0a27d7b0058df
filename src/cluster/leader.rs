//! Leader election on a `coordination.k8s.io/v1` Lease, so two replicas never act at
//! once. [`decide`] is the whole policy, pure; [`acquire`] applies it with optimistic
//! concurrency (a create that may find the Lease taken, a replace carrying the
//! resourceVersion that may conflict), then keeps renewing in the background and
//! cancels [`Leadership::lost`] as soon as this replica can no longer be sure it leads.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::api::PostParams;
use kube::{Api, Client};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::Error;

/// What to do about the Lease now.
#[derive(Clone, Debug, PartialEq)]
pub enum Decision {
    /// No Lease yet: create it, holding it.
    Create(LeaseSpec),
    /// We hold it: renew (same acquireTime and transitions, new renewTime).
    Renew(LeaseSpec),
    /// Free or expired: take it over (new acquireTime, transitions + 1).
    TakeOver(LeaseSpec),
    /// Someone else holds a live Lease: look again after `retry_in`.
    Wait { holder: String, retry_in: Duration },
}

/// The election policy. `duration` is ours; an existing Lease's own
/// `leaseDurationSeconds` decides when it expires, counted from when this replica
/// first saw the record as it is now (`unchanged_for`), as client-go does: never
/// from the `renewTime` written by another machine's clock. `now` only stamps
/// what we write.
pub fn decide(
    lease: Option<&Lease>,
    identity: &str,
    now: Timestamp,
    duration: Duration,
    unchanged_for: Duration,
) -> Decision {
    let seconds = duration.as_secs().clamp(1, i32::MAX as u64) as i32;
    let fresh = |transitions: i32| LeaseSpec {
        holder_identity: Some(identity.to_string()),
        lease_duration_seconds: Some(seconds),
        acquire_time: Some(MicroTime(now)),
        renew_time: Some(MicroTime(now)),
        lease_transitions: Some(transitions),
        ..LeaseSpec::default()
    };
    let Some(spec) = lease.and_then(|l| l.spec.as_ref()) else {
        return match lease {
            None => Decision::Create(fresh(0)),
            Some(_) => Decision::TakeOver(fresh(0)),
        };
    };
    let transitions = spec.lease_transitions.unwrap_or(0);
    let holder = spec.holder_identity.as_deref().unwrap_or("");
    if holder == identity {
        return Decision::Renew(LeaseSpec {
            renew_time: Some(MicroTime(now)),
            lease_duration_seconds: Some(seconds),
            ..spec.clone()
        });
    }
    let held_for = Duration::from_secs(spec.lease_duration_seconds.unwrap_or(seconds).max(1) as u64);
    if !holder.is_empty() && unchanged_for < held_for {
        let left = held_for - unchanged_for;
        return Decision::Wait {
            holder: holder.to_string(),
            retry_in: left.min(duration / 2).max(Duration::from_millis(200)),
        };
    }
    Decision::TakeOver(fresh(transitions + 1))
}

/// Where the Lease is and who we are.
#[derive(Clone, Debug)]
pub struct LeaseConfig {
    pub name: String,
    /// The operator's own namespace.
    pub namespace: String,
    /// Unique per replica, e.g. the pod name.
    pub identity: String,
    /// `--lease-seconds` (default 15).
    pub duration: Duration,
}

impl LeaseConfig {
    pub fn new(namespace: impl Into<String>, identity: impl Into<String>, duration: Duration) -> Self {
        Self { name: super::LEASE_NAME.to_string(), namespace: namespace.into(), identity: identity.into(), duration }
    }
}

/// What one attempt found.
#[derive(Debug, PartialEq)]
enum Attempt {
    Held,
    NotHeld { holder: String, retry_in: Duration },
}

/// One look at the Lease: get it, decide, write. A write that loses a race (409)
/// counts as not held.
async fn attempt(api: &Api<Lease>, cfg: &LeaseConfig, seen: &mut Observed) -> Result<Attempt, kube::Error> {
    let current = api.get_opt(&cfg.name).await?;
    let lost_race = |e: &kube::Error| matches!(e, kube::Error::Api(s) if s.code == 409);
    let soon = Duration::from_millis(200);
    let unchanged_for = seen.unchanged_for(current.as_ref());
    let write = match decide(current.as_ref(), &cfg.identity, Timestamp::now(), cfg.duration, unchanged_for) {
        Decision::Wait { holder, retry_in } => return Ok(Attempt::NotHeld { holder, retry_in }),
        Decision::Create(spec) => {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(cfg.name.clone()),
                    namespace: Some(cfg.namespace.clone()),
                    ..ObjectMeta::default()
                },
                spec: Some(spec),
            };
            api.create(&PostParams::default(), &lease).await.map(|_| ())
        }
        Decision::Renew(spec) | Decision::TakeOver(spec) => {
            // Carries metadata.resourceVersion: the server refuses it if anyone wrote since.
            let mut lease = current.unwrap_or_default();
            lease.spec = Some(spec);
            api.replace(&cfg.name, &PostParams::default(), &lease).await.map(|_| ())
        }
    };
    match write {
        Ok(()) => Ok(Attempt::Held),
        Err(e) if lost_race(&e) => Ok(Attempt::NotHeld { holder: "(another replica)".into(), retry_in: soon }),
        Err(e) => Err(e),
    }
}

/// When this replica first saw the Lease record it sees now: its resourceVersion
/// (every write changes it, so an unchanged one means nobody renewed) and since when.
#[derive(Default)]
struct Observed(Option<(Option<String>, tokio::time::Instant)>);

impl Observed {
    fn unchanged_for(&mut self, lease: Option<&Lease>) -> Duration {
        let version = lease.and_then(|l| l.metadata.resource_version.clone());
        let now = tokio::time::Instant::now();
        match &self.0 {
            Some((seen, since)) if *seen == version => now - *since,
            _ => {
                self.0 = Some((version, now));
                Duration::ZERO
            }
        }
    }
}

/// This replica leads until `lost` is cancelled.
pub struct Leadership {
    /// Cancelled when the Lease was taken by another replica or could not be renewed
    /// within its duration: stop acting at once (the simplest correct reaction is to
    /// exit and let the Deployment restart the pod as a follower).
    pub lost: CancellationToken,
    renewer: JoinHandle<()>,
}

impl Leadership {
    /// Stops renewing (the Lease then expires after its duration).
    pub fn abandon(self) {
        self.renewer.abort();
    }
}

/// Waits until this replica holds the Lease (or `shutdown`), then renews it every
/// third of its duration in the background.
pub async fn acquire(client: Client, cfg: LeaseConfig, shutdown: CancellationToken) -> Result<Leadership, Error> {
    let api: Api<Lease> = Api::namespaced(client, &cfg.namespace);
    let mut last_holder = String::new();
    let mut seen = Observed::default();
    let sent = loop {
        // A call that hangs (a black-holed connection) is a failed attempt, not a wait
        // of kube-rs's read timeout (~5 minutes).
        let sent = tokio::time::Instant::now();
        let tried = tokio::time::timeout(cfg.duration / 3, attempt(&api, &cfg, &mut seen)).await;
        let wait = match tried.unwrap_or_else(|_| Err(timed_out(&cfg))) {
            Ok(Attempt::Held) => break sent,
            Ok(Attempt::NotHeld { holder, retry_in }) => {
                if holder != last_holder {
                    tracing::info!(lease = %cfg.name, %holder, "another replica leads; standing by");
                    last_holder = holder;
                }
                retry_in
            }
            Err(e) => {
                tracing::warn!(lease = %cfg.name, error = %e, "cannot read or write the leader Lease; retrying");
                cfg.duration / 3
            }
        };
        tokio::select! {
            _ = shutdown.cancelled() => return Err(Error::ShuttingDown),
            _ = tokio::time::sleep(wait) => {}
        }
    };
    tracing::info!(lease = %cfg.name, identity = %cfg.identity, "acquired leadership");
    let lost = CancellationToken::new();
    let renewer = tokio::spawn(renew(api, cfg, sent, lost.clone(), shutdown));
    Ok(Leadership { lost, renewer })
}

/// A kube error for an attempt that did not finish in time.
fn timed_out(cfg: &LeaseConfig) -> kube::Error {
    kube::Error::Service(format!("no answer about the Lease within {:?}", cfg.duration / 3).into())
}

/// Renews every third of the duration. Leadership ends (`lost`) when the Lease is
/// held by another, or when no renewal succeeded by `sent + duration - margin`,
/// where `sent` is when the last successful renewal was sent: judged on this
/// replica's clock alone, and however long a request hangs, since each attempt is
/// cut off at that deadline. A standby counts the same duration from when it saw
/// the record last change, so it cannot take over before we stop.
async fn renew(
    api: Api<Lease>,
    cfg: LeaseConfig,
    sent: tokio::time::Instant,
    lost: CancellationToken,
    shutdown: CancellationToken,
) {
    // Give up a little before the Lease expires, so a new leader never overlaps with us.
    let margin = (cfg.duration / 5).max(Duration::from_millis(100));
    let mut deadline = sent + cfg.duration - margin;
    let mut seen = Observed::default();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => {
                release(&api, &cfg).await;
                return;
            }
            _ = tokio::time::sleep(cfg.duration / 3) => {}
        }
        let sent = tokio::time::Instant::now();
        let tried = tokio::time::timeout_at(deadline.max(sent), attempt(&api, &cfg, &mut seen)).await;
        match tried.unwrap_or_else(|_| Err(timed_out(&cfg))) {
            Ok(Attempt::Held) => deadline = sent + cfg.duration - margin,
            Ok(Attempt::NotHeld { holder, .. }) => {
                tracing::error!(lease = %cfg.name, %holder, "lost leadership");
                lost.cancel();
                return;
            }
            Err(e) => {
                tracing::warn!(lease = %cfg.name, error = %e, "cannot renew the leader Lease");
                if tokio::time::Instant::now() >= deadline {
                    tracing::error!(lease = %cfg.name, "could not renew the leader Lease in time; stopping");
                    lost.cancel();
                    return;
                }
            }
        }
    }
}

/// On a clean shutdown, hand the Lease back so a standby takes over at once.
async fn release(api: &Api<Lease>, cfg: &LeaseConfig) {
    let Ok(Some(mut lease)) = api.get_opt(&cfg.name).await else { return };
    let Some(spec) = lease.spec.as_mut() else { return };
    if spec.holder_identity.as_deref() != Some(cfg.identity.as_str()) {
        return;
    }
    spec.holder_identity = None;
    if let Err(e) = api.replace(&cfg.name, &PostParams::default(), &lease).await {
        tracing::debug!(error = %e, "could not release the leader Lease; it expires by itself");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: Duration = Duration::from_secs(15);

    fn t(s: i64) -> Timestamp {
        Timestamp::from_second(1_800_000_000 + s).unwrap()
    }

    fn lease(holder: Option<&str>, renewed: i64, transitions: i32) -> Lease {
        Lease {
            metadata: ObjectMeta {
                name: Some("molecule-operator".into()),
                resource_version: Some("5".into()),
                ..Default::default()
            },
            spec: Some(LeaseSpec {
                holder_identity: holder.map(str::to_string),
                lease_duration_seconds: Some(15),
                acquire_time: Some(MicroTime(t(0))),
                renew_time: Some(MicroTime(t(renewed))),
                lease_transitions: Some(transitions),
                ..Default::default()
            }),
        }
    }

    #[test]
    fn no_lease_is_created_held_by_us() {
        match decide(None, "a", t(100), D, Duration::ZERO) {
            Decision::Create(spec) => {
                assert_eq!(spec.holder_identity.as_deref(), Some("a"));
                assert_eq!(spec.lease_duration_seconds, Some(15));
                assert_eq!(spec.lease_transitions, Some(0));
                assert_eq!(spec.renew_time, Some(MicroTime(t(100))));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn our_lease_is_renewed_keeping_acquire_time_and_transitions() {
        match decide(Some(&lease(Some("a"), 10, 3)), "a", t(20), D, Duration::ZERO) {
            Decision::Renew(spec) => {
                assert_eq!(spec.acquire_time, Some(MicroTime(t(0))));
                assert_eq!(spec.renew_time, Some(MicroTime(t(20))));
                assert_eq!(spec.lease_transitions, Some(3));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_live_lease_of_another_replica_is_waited_for() {
        let seen_for = Duration::from_secs(10);
        match decide(Some(&lease(Some("b"), 10, 3)), "a", t(20), D, seen_for) {
            Decision::Wait { holder, retry_in } => {
                assert_eq!(holder, "b");
                assert_eq!(retry_in, Duration::from_secs(5)); // unchanged for 10 of its 15 s
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn expiry_is_counted_on_our_clock_never_from_the_remote_renew_time() {
        // Renewed "an hour ago" by a clock that is behind ours, or "in an hour" by one
        // ahead: either way a record just seen is live for its whole duration, and a
        // record unchanged for its duration is expired.
        for renewed in [-3600, 3600] {
            let l = lease(Some("b"), renewed, 3);
            assert!(matches!(decide(Some(&l), "a", t(0), D, Duration::ZERO), Decision::Wait { .. }));
            assert!(matches!(decide(Some(&l), "a", t(0), D, D), Decision::TakeOver(_)));
        }
    }

    #[test]
    fn an_expired_or_released_lease_is_taken_over_with_one_more_transition() {
        for (l, seen_for) in [(lease(Some("b"), 10, 3), Duration::from_secs(16)), (lease(None, 24, 3), Duration::ZERO)]
        {
            match decide(Some(&l), "a", t(26), D, seen_for) {
                Decision::TakeOver(spec) => {
                    assert_eq!(spec.holder_identity.as_deref(), Some("a"));
                    assert_eq!(spec.acquire_time, Some(MicroTime(t(26))));
                    assert_eq!(spec.lease_transitions, Some(4));
                }
                other => panic!("{other:?}"),
            }
        }
    }

    #[test]
    fn the_lease_uses_its_own_duration_to_expire() {
        let mut l = lease(Some("b"), 10, 0);
        l.spec.as_mut().unwrap().lease_duration_seconds = Some(60);
        assert!(matches!(decide(Some(&l), "a", t(30), D, Duration::from_secs(20)), Decision::Wait { .. }));
    }
}
