//! A tenant at run time: one listener's configuration turned into what its
//! sockets need while serving. It holds the current plugin version (which a
//! reload swaps atomically), makes sessions (an instance per TCP connection
//! or per UDP listener), and enforces the tenant's traffic limits: the rate
//! per peer, the number of connections, the size of replies and the UDP
//! amplification bound, and the backoff after repeated failures.
//!
//! Reading sockets is the listeners' business; loading plugins is the
//! runtime's.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::config::{FailurePolicy, ListenerConfig, TrafficLimits};
use crate::metrics::{ListenerMetrics, SessionMetrics};
use crate::plugin::{
    CallError, Connection, Decision, Instance, InstanceSettings, LogBudget, Next, Plugin,
};
use crate::warnings::Warnings;

/// Decides replies without WebAssembly. The benchmark runs the host's I/O
/// path with one in place of a plugin, to measure what the sandbox costs.
pub trait NativeHandler: Send + Sync + 'static {
    /// Answers one datagram.
    fn on_datagram(&self, peer: SocketAddr, data: &[u8]) -> Decision;
    /// Answers one TCP message.
    fn on_message(&self, data: &[u8]) -> Decision;
}

/// The native twin of the `echo` plugin.
#[derive(Clone, Copy, Debug, Default)]
pub struct NativeEcho;

impl NativeHandler for NativeEcho {
    fn on_datagram(&self, _peer: SocketAddr, data: &[u8]) -> Decision {
        Decision {
            reply: Some(data.to_vec()),
            next: Next::CarryOn,
        }
    }

    fn on_message(&self, data: &[u8]) -> Decision {
        Decision {
            reply: Some(data.to_vec()),
            next: Next::CarryOn,
        }
    }
}

/// What answers a tenant's messages.
enum Handler {
    /// The current version of a plugin; reloads swap it.
    Wasm(ArcSwap<Plugin>),
    /// Native code, for benchmarks.
    Native(Arc<dyn NativeHandler>),
}

/// One listener's run-time state.
pub struct Tenant {
    /// The configuration it was made from.
    pub config: ListenerConfig,
    /// Its series in `/metrics`.
    pub metrics: ListenerMetrics,
    handler: Handler,
    /// The budget of the host's own warnings about this tenant.
    warnings: Warnings,
    settings: Arc<InstanceSettings>,
    rate: Option<DefaultKeyedRateLimiter<IpAddr>>,
    connections: Arc<Semaphore>,
    backoff: Mutex<Backoff>,
    /// Whether the last call failed: a success only takes the backoff's
    /// lock after a failure, not on every message.
    failing: AtomicBool,
}

impl fmt::Debug for Tenant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tenant")
            .field("name", &self.config.name)
            .finish_non_exhaustive()
    }
}

impl Tenant {
    /// A tenant served by `plugin`.
    pub fn wasm(config: ListenerConfig, plugin: Arc<Plugin>) -> Self {
        let tenant = Self::new(config, Handler::Wasm(ArcSwap::new(plugin.clone())));
        tenant.metrics.serving(&plugin, None);
        tenant
    }

    /// A tenant served by native code (for benchmarks).
    pub fn native(config: ListenerConfig, handler: Arc<dyn NativeHandler>) -> Self {
        Self::new(config, Handler::Native(handler))
    }

    fn new(config: ListenerConfig, handler: Handler) -> Self {
        let tenant: Arc<str> = config.name.as_str().into();
        let settings = Arc::new(InstanceSettings {
            log_budget: LogBudget::new(
                tenant.clone(),
                config.traffic.log_lines_per_second,
                config.traffic.log_bytes_per_second,
            ),
            tenant,
            config: config.plugin_config.clone(),
            limits: config.limits.clone(),
        });
        let rate = config.traffic.rate_limit.map(|rate| {
            let per_second = NonZeroU32::new(rate.per_second).unwrap_or(NonZeroU32::MIN);
            let burst = NonZeroU32::new(rate.burst).unwrap_or(per_second);
            RateLimiter::keyed(Quota::per_second(per_second).allow_burst(burst))
        });
        let connections = Arc::new(Semaphore::new(config.traffic.max_connections));
        Self {
            metrics: ListenerMetrics::new(&config.name),
            warnings: Warnings::new(&config.name),
            handler,
            settings,
            rate,
            connections,
            backoff: Mutex::new(Backoff::default()),
            failing: AtomicBool::new(false),
            config,
        }
    }

    /// The tenant's name.
    pub fn name(&self) -> &str {
        &self.config.name
    }

    /// The budget every warning the host logs about this tenant's traffic
    /// goes through: a peer must not decide how much the host writes.
    pub fn warnings(&self) -> &Warnings {
        &self.warnings
    }

    /// Its traffic limits.
    pub fn traffic(&self) -> &TrafficLimits {
        &self.config.traffic
    }

    /// The plugin version new sessions get, if the tenant runs a plugin.
    pub fn current(&self) -> Option<Arc<Plugin>> {
        match &self.handler {
            Handler::Wasm(current) => Some(current.load_full()),
            Handler::Native(_) => None,
        }
    }

    /// The current version's label for logs: `name@digest`, or `native`.
    pub fn version_label(&self) -> String {
        self.current()
            .map_or_else(|| "native".to_owned(), |plugin| plugin.version())
    }

    /// Makes `plugin` the version every new session gets, and returns the
    /// one it replaces. Sessions already open keep theirs.
    pub fn swap(&self, plugin: Arc<Plugin>) -> Option<Arc<Plugin>> {
        match &self.handler {
            Handler::Wasm(current) => {
                let previous = current.swap(plugin.clone());
                self.metrics.serving(&plugin, Some(&previous));
                Some(previous)
            }
            Handler::Native(_) => None,
        }
    }

    /// Whether `session` runs the current version (the UDP listener's
    /// long-lived session is replaced once a reload has swapped it).
    pub fn is_current(&self, session: &Session) -> bool {
        match (&self.handler, &session.kind) {
            (Handler::Wasm(current), SessionKind::Wasm(instance)) => {
                Arc::ptr_eq(&current.load(), instance.plugin())
            }
            _ => true,
        }
    }

    /// Starts one instance of `plugin` with this tenant's settings and drops
    /// it: a reload's last check before the swap.
    ///
    /// # Errors
    ///
    /// A [`CallError`] if the instance fails to start.
    pub async fn try_start(&self, plugin: &Arc<Plugin>) -> Result<(), CallError> {
        Instance::new(plugin, self.settings.clone()).await.map(drop)
    }

    /// A session on the current version: a fresh instance for a plugin.
    ///
    /// # Errors
    ///
    /// A [`CallError`] if the instance fails to start.
    pub async fn session(&self) -> Result<Session, CallError> {
        match &self.handler {
            Handler::Wasm(current) => {
                let plugin = current.load_full();
                let started = Instant::now();
                let instance = Instance::new(&plugin, self.settings.clone()).await?;
                let metrics = self.metrics.session(&plugin.version());
                metrics.instantiation.record(started.elapsed());
                Ok(Session {
                    kind: SessionKind::Wasm(Box::new(instance)),
                    metrics,
                })
            }
            Handler::Native(native) => Ok(Session {
                kind: SessionKind::Native(native.clone()),
                metrics: self.metrics.session("native"),
            }),
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
    pub fn admit_connection(&self) -> Option<OwnedSemaphorePermit> {
        self.connections.clone().try_acquire_owned().ok()
    }

    /// Checks a reply against the tenant's bounds; `udp_request` is the
    /// request's size for a datagram's reply.
    ///
    /// # Errors
    ///
    /// The reason a reply is refused, for the log.
    pub fn vet_reply(&self, reply: &[u8], udp_request: Option<usize>) -> Result<(), String> {
        let traffic = &self.config.traffic;
        let limit = match udp_request {
            Some(request) => traffic.max_udp_reply(request),
            None => traffic.max_reply,
        };
        if reply.len() <= limit {
            return Ok(());
        }
        Err(match udp_request {
            Some(request) if limit < traffic.max_reply => format!(
                "reply of {} bytes to a {request}-byte datagram refused (udp-amplification {} allows {limit})",
                reply.len(),
                traffic.udp_amplification
            ),
            _ => format!(
                "reply of {} bytes refused (max-reply is {limit})",
                reply.len()
            ),
        })
    }

    /// What a failed message gets: `Some(request)` to send back when the
    /// tenant fails open.
    pub fn failure_reply<'a>(&self, request: &'a [u8]) -> Option<&'a [u8]> {
        (self.config.on_failure == FailurePolicy::FailOpen).then_some(request)
    }

    /// Whether a new instance may be made now, after failures.
    pub fn may_instantiate(&self) -> bool {
        self.backoff
            .lock()
            .map(|backoff| backoff.ready())
            .unwrap_or(true)
    }

    /// Notes a failed call; repeated failures delay the next instance.
    pub fn record_failure(&self) {
        self.failing.store(true, Ordering::Relaxed);
        if let Ok(mut backoff) = self.backoff.lock() {
            backoff.failed();
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

    fn ready(&self) -> bool {
        self.not_before
            .is_none_or(|not_before| Instant::now() >= not_before)
    }

    fn failed(&mut self) {
        self.failures = self.failures.saturating_add(1);
        if self.failures > Self::FREE_RETRIES {
            let doublings = (self.failures - Self::FREE_RETRIES - 1).min(16);
            let wait = Self::FIRST
                .saturating_mul(1 << doublings)
                .min(Self::LONGEST);
            self.not_before = Some(Instant::now() + wait);
        }
    }

    fn succeeded(&mut self) {
        self.failures = 0;
        self.not_before = None;
    }
}

/// One conversation's handler (a plugin instance, or native code) and the
/// handles that time its calls.
pub struct Session {
    kind: SessionKind,
    metrics: SessionMetrics,
}

enum SessionKind {
    /// A plugin instance (boxed: a store is large next to a pointer).
    Wasm(Box<Instance>),
    /// Native code.
    Native(Arc<dyn NativeHandler>),
}

impl Session {
    /// `name@digest` of the version this session runs, or `native`.
    pub fn version(&self) -> String {
        match &self.kind {
            SessionKind::Wasm(instance) => instance.plugin().version(),
            SessionKind::Native(_) => "native".to_owned(),
        }
    }

    /// See [`Instance::on_datagram`].
    ///
    /// # Errors
    ///
    /// A [`CallError`] from the plugin.
    pub async fn on_datagram(
        &mut self,
        peer: SocketAddr,
        data: &[u8],
    ) -> Result<Decision, CallError> {
        let started = Instant::now();
        let decision = match &mut self.kind {
            SessionKind::Wasm(instance) => instance.on_datagram(peer, data).await,
            SessionKind::Native(native) => Ok(native.on_datagram(peer, data)),
        };
        self.metrics.calls.record(started.elapsed());
        decision
    }

    /// See [`Instance::on_open`].
    ///
    /// # Errors
    ///
    /// A [`CallError`] from the plugin.
    pub async fn on_open(
        &mut self,
        conn: &Connection,
        peer: SocketAddr,
    ) -> Result<Decision, CallError> {
        match &mut self.kind {
            SessionKind::Wasm(instance) => instance.on_open(conn, peer).await,
            SessionKind::Native(_) => Ok(Decision {
                reply: None,
                next: Next::CarryOn,
            }),
        }
    }

    /// See [`Instance::on_message`].
    ///
    /// # Errors
    ///
    /// A [`CallError`] from the plugin.
    pub async fn on_message(&mut self, data: &[u8]) -> Result<Decision, CallError> {
        let started = Instant::now();
        let decision = match &mut self.kind {
            SessionKind::Wasm(instance) => instance.on_message(data).await,
            SessionKind::Native(native) => Ok(native.on_message(data)),
        };
        self.metrics.calls.record(started.elapsed());
        decision
    }

    /// See [`Instance::on_close`].
    ///
    /// # Errors
    ///
    /// A [`CallError`] from the plugin.
    pub async fn on_close(&mut self) -> Result<(), CallError> {
        match &mut self.kind {
            SessionKind::Wasm(instance) => instance.on_close().await,
            SessionKind::Native(_) => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_retries_a_few_times_then_waits_longer_and_longer() {
        let mut backoff = Backoff::default();
        for _ in 0..Backoff::FREE_RETRIES {
            backoff.failed();
            assert!(backoff.ready());
        }
        backoff.failed();
        assert!(!backoff.ready());
        let first = backoff.not_before.expect("waiting");
        backoff.failed();
        assert!(backoff.not_before.expect("waiting") > first);
        backoff.succeeded();
        assert!(backoff.ready());
    }
}
