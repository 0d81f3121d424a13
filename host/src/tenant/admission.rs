//! Admission: what a tenant lets in. The rate per peer (a datagram over it
//! is dropped, a TCP connection is read more slowly), the number of open
//! connections, and the backoff that stops a plugin failing again and again
//! from being re-instantiated at full speed.
//!
//! Counting and logging what is refused are the listeners' business.

use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::config::TrafficLimits;

/// A tenant's gates.
#[derive(Debug)]
pub struct Admission {
    /// Per peer address, when the tenant has a rate limit.
    rate: Option<DefaultKeyedRateLimiter<IpAddr>>,
    /// A permit per open connection, up to max-connections.
    connections: Arc<Semaphore>,
    backoff: Mutex<Backoff>,
    /// Whether the last call failed: a success only takes the backoff's
    /// lock after a failure, not on every message.
    failing: AtomicBool,
}

impl Admission {
    /// The gates of a tenant with `traffic` limits.
    pub fn new(traffic: &TrafficLimits) -> Self {
        let rate = traffic.rate_limit.map(|rate| {
            let per_second = NonZeroU32::new(rate.per_second).unwrap_or(NonZeroU32::MIN);
            let burst = NonZeroU32::new(rate.burst).unwrap_or(per_second);
            RateLimiter::keyed(Quota::per_second(per_second).allow_burst(burst))
        });
        Self {
            rate,
            connections: Arc::new(Semaphore::new(traffic.max_connections)),
            backoff: Mutex::new(Backoff::default()),
            failing: AtomicBool::new(false),
        }
    }

    /// Whether a message from `ip` is within the rate limit now (UDP: the
    /// datagram is dropped otherwise).
    pub fn admit_message(&self, ip: IpAddr) -> bool {
        self.rate
            .as_ref()
            .is_none_or(|rate| rate.check_key(&ip).is_ok())
    }

    /// Waits until a message from `ip` is within the rate limit (TCP: the
    /// connection is simply read more slowly).
    pub async fn pace(&self, ip: IpAddr) {
        if let Some(rate) = &self.rate {
            rate.until_key_ready(&ip).await;
        }
    }

    /// Forgets peers that have been quiet, so the limiter's memory does not
    /// grow with every address ever seen. Call now and then.
    pub fn forget_quiet_peers(&self) {
        if let Some(rate) = &self.rate {
            rate.retain_recent();
        }
    }

    /// A slot for one more connection, or `None` when the tenant is full.
    /// The slot is given back when the permit is dropped.
    pub fn admit_connection(&self) -> Option<OwnedSemaphorePermit> {
        self.connections.clone().try_acquire_owned().ok()
    }

    /// Whether a new instance may be made now, after failures.
    pub fn may_instantiate(&self) -> bool {
        self.backoff
            .lock()
            .map(|backoff| backoff.ready(Instant::now()))
            .unwrap_or(true)
    }

    /// Notes a failed call; repeated failures delay the next instance.
    pub fn record_failure(&self) {
        self.failing.store(true, Ordering::Relaxed);
        if let Ok(mut backoff) = self.backoff.lock() {
            backoff.failed(Instant::now());
        }
    }

    /// Notes a successful call.
    pub fn record_success(&self) {
        if !self.failing.swap(false, Ordering::Relaxed) {
            return;
        }
        if let Ok(mut backoff) = self.backoff.lock() {
            backoff.succeeded();
        }
    }
}

/// Exponential backoff for re-instantiating a plugin that keeps failing:
/// the first few failures are retried at once, then the wait doubles from
/// 10 ms up to 5 s, and one success resets it.
#[derive(Debug, Default)]
struct Backoff {
    failures: u32,
    not_before: Option<Instant>,
}

impl Backoff {
    const FREE_RETRIES: u32 = 3;
    const FIRST: Duration = Duration::from_millis(10);
    const LONGEST: Duration = Duration::from_secs(5);

    fn ready(&self, now: Instant) -> bool {
        self.not_before.is_none_or(|not_before| now >= not_before)
    }

    /// How long the next instance waits after the failures so far.
    fn wait(&self) -> Duration {
        if self.failures <= Self::FREE_RETRIES {
            return Duration::ZERO;
        }
        let doublings = (self.failures - Self::FREE_RETRIES - 1).min(16);
        Self::FIRST
            .saturating_mul(1 << doublings)
            .min(Self::LONGEST)
    }

    fn failed(&mut self, now: Instant) {
        self.failures = self.failures.saturating_add(1);
        let wait = self.wait();
        self.not_before = (!wait.is_zero()).then(|| now + wait);
    }

    fn succeeded(&mut self) {
        self.failures = 0;
        self.not_before = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::RateLimit;

    fn limits(rate_limit: Option<RateLimit>, max_connections: usize) -> TrafficLimits {
        TrafficLimits {
            rate_limit,
            max_connections,
            ..TrafficLimits::default()
        }
    }

    /// Guards against a backoff that does not grow (a constant wait) and
    /// one that is not capped: the waits are exactly three free retries,
    /// then 10 ms doubling, then 5 s from the first doubling past it on.
    #[test]
    fn backoff_retries_a_few_times_then_waits_twice_as_long_up_to_five_seconds() {
        let mut backoff = Backoff::default();
        let now = Instant::now();
        let mut waits = Vec::new();
        for _ in 0..20 {
            backoff.failed(now);
            waits.push(backoff.wait());
        }
        let ms = Duration::from_millis;
        let mut expected = vec![Duration::ZERO; 3];
        expected.extend([10, 20, 40, 80, 160, 320, 640, 1280, 2560].map(ms));
        expected.resize(20, Duration::from_secs(5));
        assert_eq!(waits, expected);
        // The wait is measured from the last failure, and then it is over.
        assert!(!backoff.ready(now + ms(4_999)));
        assert!(backoff.ready(now + Duration::from_secs(5)));
        backoff.succeeded();
        assert!(backoff.ready(now));
        assert_eq!(backoff.wait(), Duration::ZERO);
    }

    #[test]
    fn repeated_failures_hold_back_instances_until_a_success() {
        let admission = Admission::new(&limits(None, 10));
        for _ in 0..Backoff::FREE_RETRIES {
            admission.record_failure();
            assert!(admission.may_instantiate());
        }
        admission.record_failure();
        assert!(!admission.may_instantiate());
        admission.record_success();
        assert!(admission.may_instantiate());
    }

    #[test]
    fn the_rate_limit_is_per_peer_and_allows_the_burst() {
        let admission = Admission::new(&limits(
            Some(RateLimit {
                per_second: 1,
                burst: 3,
            }),
            10,
        ));
        let (one, two) = ([10, 0, 0, 1].into(), [10, 0, 0, 2].into());
        for _ in 0..3 {
            assert!(admission.admit_message(one));
        }
        assert!(!admission.admit_message(one));
        assert!(admission.admit_message(two), "another peer has its own");
    }

    /// Guards the limiter's memory: every peer ever seen stayed in the
    /// rate limiter's table unless quiet peers are forgotten.
    #[test]
    fn quiet_peers_are_forgotten() {
        let admission = Admission::new(&limits(
            Some(RateLimit {
                per_second: 1000,
                burst: 1,
            }),
            10,
        ));
        let peers = |admission: &Admission| admission.rate.as_ref().map_or(0, |rate| rate.len());
        for last in 1..=3 {
            assert!(admission.admit_message([10, 0, 0, last].into()));
        }
        assert_eq!(peers(&admission), 3);
        // At 1,000 a second, a peer's one-message burst is back after 1 ms.
        std::thread::sleep(std::time::Duration::from_millis(20));
        admission.forget_quiet_peers();
        assert_eq!(peers(&admission), 0);
    }

    #[test]
    fn without_a_rate_limit_everything_is_admitted() {
        let admission = Admission::new(&limits(None, 10));
        let peer = [10, 0, 0, 1].into();
        assert!((0..10_000).all(|_| admission.admit_message(peer)));
    }

    #[tokio::test]
    async fn pace_waits_for_the_next_token_instead_of_refusing() {
        let admission = Admission::new(&limits(
            Some(RateLimit {
                per_second: 20,
                burst: 1,
            }),
            10,
        ));
        let peer = [10, 0, 0, 1].into();
        admission.pace(peer).await;
        let started = Instant::now();
        admission.pace(peer).await;
        // One token every 50 ms: the second message had to wait for it.
        assert!(
            started.elapsed() >= Duration::from_millis(40),
            "{:?}",
            started.elapsed()
        );
        assert!(!admission.admit_message(peer));
    }

    #[test]
    fn connections_are_capped_and_a_closed_one_frees_its_slot() {
        let admission = Admission::new(&limits(None, 2));
        let first = admission.admit_connection().expect("first");
        let _second = admission.admit_connection().expect("second");
        assert!(admission.admit_connection().is_none(), "the cap is 2");
        drop(first);
        assert!(admission.admit_connection().is_some());
    }
}
