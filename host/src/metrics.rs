//! Metrics: what every listener and plugin version is doing, in Prometheus
//! text exposition at `/metrics` (`serve --metrics ADDR`). The `metrics`
//! crate records, `metrics-exporter-prometheus` renders; this module names
//! the series, keeps ready handles for the ones the hot path touches, and
//! renders the page [`crate::admin`] serves. Per-version series are kept
//! and rendered by [`versions`] instead, so that they leave the page with
//! their version (see there why the exporter cannot do that).
//!
//! Without `--metrics` no recorder is installed and every record is a no-op.
//!
//! | series | labels |
//! | --- | --- |
//! | `wasm_echo_datagrams_total` | listener |
//! | `wasm_echo_udp_batch_calls_total`, `wasm_echo_udp_batched_datagrams_total` | listener |
//! | `wasm_echo_tcp_connections_total`, `wasm_echo_tcp_messages_total` | listener |
//! | `wasm_echo_bytes_in_total`, `wasm_echo_bytes_out_total`, `wasm_echo_replies_total` | listener, protocol |
//! | `wasm_echo_drops_total` (datagrams and messages that got no reply) | listener, reason (rate-limit, failed, refused-reply, unsent) |
//! | `wasm_echo_closes_total` (TCP connections ended) | listener, reason (peer, plugin, idle, protocol, failed, shutdown, io, write-timeout) |
//! | `wasm_echo_rejected_connections_total` | listener |
//! | `wasm_echo_proxy_refused_total` (TCP connections closed for their PROXY header, before the plugin saw them) | listener, reason (truncated, signature, family, source, invalid) |
//! | `wasm_echo_open_connections` | listener |
//! | `wasm_echo_reloads_total` | listener, result (ok: swapped, unchanged: the same bytes again, failed) |
//! | `wasm_echo_migrations_total` (sessions moved to a new version after a swap) | listener, outcome (migrated: with state, fresh: nothing to hand over, skipped: a connection left where it was, kept: hand-over failed and stayed, reset: hand-over failed and moved without state) |
//! | `wasm_echo_instances_renewed_total` (instances replaced past `recycle-at`) | listener, outcome (with-state, fresh, failed) |
//! | `wasm_echo_plugin_failures_total` | listener, version, kind (trap, deadline, memory, reply) |
//! | `wasm_echo_plugin_call_seconds`, `wasm_echo_instantiation_seconds` (histograms) | listener, version |
//! | `wasm_echo_instances` | listener, version |
//! | `wasm_echo_plugin_info` (1 for the current version, 0 for replaced ones still running) | listener, version, plugin, digest |
//! | `wasm_echo_log_lines_dropped_total` (host log lines lost because stderr was stalled) | |
//! | `wasm_echo_warnings_suppressed_total` (host warnings about a tenant held back by its budget, see [`crate::warnings`]) | listener |
//! | `wasm_echo_listener_plugin_failures_total` | listener, kind |
//! | `wasm_echo_listener_plugin_call_seconds`, `wasm_echo_listener_instantiation_seconds` (histograms) | listener |
//!
//! The series with a `version` label exist only while that version does:
//! while it is current, or while a session still runs it after a reload.
//! Once its last instance is gone they leave the page, and what they
//! counted stays in the `wasm_echo_listener_*` totals, which count every
//! version the listener ever ran (live ones included), so they never go
//! down. Sum those for a listener across reloads; use the per-version ones
//! to compare versions.

use std::net::SocketAddr;
use std::sync::OnceLock;
use std::time::Duration;

use anyhow::Context as _;
use metrics::{Counter, Gauge, counter, gauge};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tokio::net::TcpListener;

mod versions;

pub use versions::{CallTally, FailureKind, PluginInfo, PluginSeries, VersionSeries};

/// How a reload of one listener ended, as `wasm_echo_reloads_total`'s
/// `result` label says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReloadOutcome {
    /// A new version was swapped in (`ok`).
    Swapped,
    /// The new bytes were the ones running: nothing to swap (`unchanged`),
    /// as after a SIGHUP with no file changed.
    Unchanged,
    /// Nothing changed because the new version did not load or start
    /// (`failed`).
    Failed,
}

/// Histogram buckets for plugin calls and instantiations, in seconds: from
/// a microsecond to the longest deadline.
pub const BUCKETS: &[f64] = &[
    1e-6, 2.5e-6, 5e-6, 1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2,
    5e-2, 0.1, 0.25, 0.5, 1.0, 5.0, 60.0,
];

/// The admin endpoint (`/metrics`, `/healthz`, `/readyz`), bound and not
/// yet answering.
pub struct MetricsEndpoint {
    listener: TcpListener,
    handle: PrometheusHandle,
}

/// The process's one recorder: installed by the first endpoint bound, and
/// shared by any later one (tests run several servers in one process).
static RECORDER: OnceLock<PrometheusHandle> = OnceLock::new();

/// Installs the recorder (once per process) and binds the HTTP endpoint.
/// Call it before any series is registered: a series registered while no
/// recorder is installed records nothing, ever.
///
/// # Errors
///
/// Another recorder is installed, or the address cannot be bound.
pub async fn bind(addr: SocketAddr) -> anyhow::Result<MetricsEndpoint> {
    let handle = match RECORDER.get() {
        Some(handle) => handle.clone(),
        None => {
            let handle = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".to_owned()), BUCKETS)
                .context("configuring histogram buckets")?
                .install_recorder()
                .context("installing the metrics recorder")?;
            RECORDER.get_or_init(|| handle).clone()
        }
    };
    // On the page from the start, at 0 (the counter only ever rises to the
    // logger's total): a series that appears only once something goes
    // wrong cannot be charted or alerted on until then.
    log_lines_dropped(0);
    let listener = TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot serve metrics on {addr}"))?;
    versions::start_recording();
    Ok(MetricsEndpoint { listener, handle })
}

impl MetricsEndpoint {
    /// The bound address (the real port when port 0 was asked for).
    ///
    /// # Errors
    ///
    /// The socket cannot say.
    pub fn addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Answers the admin endpoint's requests (see [`crate::admin`]) and
    /// folds histogram samples until `stop`.
    pub async fn serve(
        self,
        readiness: std::sync::Arc<crate::admin::Readiness>,
        stop: tokio_util::sync::CancellationToken,
    ) {
        tokio::select! {
            () = stop.cancelled() => {}
            () = upkeep(self.handle.clone()) => {}
            () = crate::admin::serve(self.listener, self.handle, readiness) => {}
        }
    }
}

/// How often histogram samples are folded into their buckets.
const UPKEEP: Duration = Duration::from_secs(5);

/// Folds recorded histogram samples into their buckets now and then. The
/// recorder queues every sample until then: without this, a server nobody
/// scrapes would hold every call's timing forever (8 bytes a message).
async fn upkeep(handle: PrometheusHandle) {
    let mut every = tokio::time::interval(UPKEEP);
    loop {
        every.tick().await;
        handle.run_upkeep();
    }
}

/// The whole page: the exporter's series, then the per-version ones.
pub(crate) fn render(handle: &PrometheusHandle) -> String {
    let mut page = handle.render();
    versions::render(&mut page);
    page
}

/// `total` host log lines have been dropped so far because stderr did not
/// take them (see [`crate::logging`]).
pub fn log_lines_dropped(total: u64) {
    counter!("wasm_echo_log_lines_dropped_total").absolute(total);
}

/// Why a message got no reply.
#[derive(Clone, Copy, Debug)]
pub enum NoReply {
    /// Over the peer's rate limit.
    RateLimit,
    /// The plugin call failed (or the tenant was backing off).
    Failed,
    /// The reply broke max-reply or the UDP amplification bound.
    RefusedReply,
    /// The kernel refused the reply datagram, or the socket stayed full
    /// for the write timeout.
    Unsent,
}

impl NoReply {
    /// Every reason, in the order of their discriminants (the index of each
    /// one's counter).
    const ALL: [Self; 4] = [
        Self::RateLimit,
        Self::Failed,
        Self::RefusedReply,
        Self::Unsent,
    ];

    /// The `reason` label.
    fn label(self) -> &'static str {
        match self {
            Self::RateLimit => "rate-limit",
            Self::Failed => "failed",
            Self::RefusedReply => "refused-reply",
            Self::Unsent => "unsent",
        }
    }
}

/// Why a TCP connection ended.
#[derive(Clone, Copy, Debug)]
pub enum CloseReason {
    /// The peer closed it.
    Peer,
    /// The plugin asked.
    Plugin,
    /// Nothing arrived for the idle timeout.
    Idle,
    /// The peer broke the framing.
    Protocol,
    /// A plugin call failed.
    Failed,
    /// The server shut down.
    Shutdown,
    /// A read or write failed.
    Io,
    /// The peer accepted no byte of a reply for the write timeout.
    WriteTimeout,
}

impl CloseReason {
    /// Every reason, in the order of their discriminants (the index of each
    /// one's counter).
    const ALL: [Self; 8] = [
        Self::Peer,
        Self::Plugin,
        Self::Idle,
        Self::Protocol,
        Self::Failed,
        Self::Shutdown,
        Self::Io,
        Self::WriteTimeout,
    ];

    /// The `reason` label.
    fn label(self) -> &'static str {
        match self {
            Self::Peer => "peer",
            Self::Plugin => "plugin",
            Self::Idle => "idle",
            Self::Protocol => "protocol",
            Self::Failed => "failed",
            Self::Shutdown => "shutdown",
            Self::Io => "io",
            Self::WriteTimeout => "write-timeout",
        }
    }
}

/// One listener's counters, registered once so the hot path only adds.
#[derive(Debug)]
pub struct ListenerMetrics {
    listener: String,
    datagrams: Counter,
    connections: Counter,
    messages: Counter,
    rejected: Counter,
    open_connections: Gauge,
    udp_in: Counter,
    udp_out: Counter,
    tcp_in: Counter,
    tcp_out: Counter,
    udp_replies: Counter,
    tcp_replies: Counter,
    /// Datagrams handed to a plugin in `udp-batch` calls, and the calls:
    /// whether batching happens, and how large batches are.
    batched: Counter,
    batches: Counter,
    /// Indexed by [`NoReply`].
    drops: [Counter; NoReply::ALL.len()],
    /// Indexed by [`CloseReason`].
    closes: [Counter; CloseReason::ALL.len()],
    /// Indexed by [`Refusal`](crate::listener::proxy::Refusal).
    proxy_refused: [Counter; crate::listener::proxy::Refusal::ALL.len()],
    /// Its plugin versions' series.
    plugins: PluginSeries,
}

impl ListenerMetrics {
    /// Registers `listener`'s series.
    pub fn new(listener: &str) -> Self {
        let l = listener.to_owned();
        let bytes_in = |protocol: &'static str| counter!("wasm_echo_bytes_in_total", "listener" => l.clone(), "protocol" => protocol);
        let bytes_out = |protocol: &'static str| counter!("wasm_echo_bytes_out_total", "listener" => l.clone(), "protocol" => protocol);
        let replies = |protocol: &'static str| counter!("wasm_echo_replies_total", "listener" => l.clone(), "protocol" => protocol);
        let drop = |reason: &'static str| counter!("wasm_echo_drops_total", "listener" => l.clone(), "reason" => reason);
        let close = |reason: &'static str| counter!("wasm_echo_closes_total", "listener" => l.clone(), "reason" => reason);
        Self {
            datagrams: counter!("wasm_echo_datagrams_total", "listener" => l.clone()),
            connections: counter!("wasm_echo_tcp_connections_total", "listener" => l.clone()),
            messages: counter!("wasm_echo_tcp_messages_total", "listener" => l.clone()),
            rejected: counter!("wasm_echo_rejected_connections_total", "listener" => l.clone()),
            open_connections: gauge!("wasm_echo_open_connections", "listener" => l.clone()),
            udp_in: bytes_in("udp"),
            udp_out: bytes_out("udp"),
            tcp_in: bytes_in("tcp"),
            tcp_out: bytes_out("tcp"),
            udp_replies: replies("udp"),
            tcp_replies: replies("tcp"),
            batched: counter!("wasm_echo_udp_batched_datagrams_total", "listener" => l.clone()),
            batches: counter!("wasm_echo_udp_batch_calls_total", "listener" => l.clone()),
            drops: NoReply::ALL.map(|why| drop(why.label())),
            closes: CloseReason::ALL.map(|why| close(why.label())),
            proxy_refused: crate::listener::proxy::Refusal::ALL.map(|why| {
                counter!("wasm_echo_proxy_refused_total", "listener" => l.clone(), "reason" => why.label())
            }),
            plugins: PluginSeries::new(listener),
            listener: l,
        }
    }

    /// `datagrams` datagrams went to the plugin in one `udp-batch` call.
    pub fn batch(&self, datagrams: usize) {
        self.batches.increment(1);
        self.batched.increment(datagrams as u64);
    }

    /// A datagram of `len` bytes arrived.
    pub fn datagram_in(&self, len: usize) {
        self.datagrams.increment(1);
        self.udp_in.increment(len as u64);
    }

    /// A reply datagram of `len` bytes was sent.
    pub fn datagram_out(&self, len: usize) {
        self.udp_replies.increment(1);
        self.udp_out.increment(len as u64);
    }

    /// A TCP message of `len` bytes arrived.
    pub fn message_in(&self, len: usize) {
        self.messages.increment(1);
        self.tcp_in.increment(len as u64);
    }

    /// A TCP reply of `len` bytes (as framed) was sent.
    pub fn message_out(&self, len: usize) {
        self.tcp_replies.increment(1);
        self.tcp_out.increment(len as u64);
    }

    /// A message got no reply from its plugin.
    pub fn dropped(&self, why: NoReply) {
        self.drops[why as usize].increment(1);
    }

    /// A connection was closed for its PROXY header, unseen by the plugin.
    pub fn proxy_refused(&self, why: crate::listener::proxy::Refusal) {
        self.proxy_refused[why as usize].increment(1);
    }

    /// A connection was refused at max-connections.
    pub fn rejected(&self) {
        self.rejected.increment(1);
    }

    /// A connection is being served.
    pub fn opened(&self) {
        self.connections.increment(1);
        self.open_connections.increment(1.0);
    }

    /// A connection [`opened`](Self::opened) ended.
    pub fn closed(&self, why: CloseReason) {
        self.open_connections.decrement(1.0);
        self.closes[why as usize].increment(1);
    }

    /// A reload of this listener finished.
    pub fn reloaded(&self, outcome: ReloadOutcome) {
        let result = match outcome {
            ReloadOutcome::Swapped => "ok",
            ReloadOutcome::Unchanged => "unchanged",
            ReloadOutcome::Failed => "failed",
        };
        counter!("wasm_echo_reloads_total", "listener" => self.listener.clone(), "result" => result).increment(1);
    }

    /// A session moved to a new version, or did not (`outcome`).
    pub fn migrated(&self, outcome: crate::tenant::MigrationOutcome) {
        counter!("wasm_echo_migrations_total", "listener" => self.listener.clone(), "outcome" => outcome.label()).increment(1);
    }

    /// The series of one version of this listener's plugin; see
    /// [`PluginSeries::version`].
    pub fn version(&self, version: &str, plugin: Option<PluginInfo<'_>>) -> VersionSeries {
        self.plugins.version(version, plugin)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_reason_indexes_its_own_counter() {
        for (index, why) in NoReply::ALL.iter().enumerate() {
            assert_eq!(*why as usize, index, "{why:?}");
        }
        for (index, why) in CloseReason::ALL.iter().enumerate() {
            assert_eq!(*why as usize, index, "{why:?}");
        }
    }
}
