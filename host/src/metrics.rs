//! Metrics: what every listener and plugin version is doing, in Prometheus
//! text exposition at `/metrics` (`serve --metrics ADDR`). The `metrics`
//! crate records, `metrics-exporter-prometheus` renders; this module names
//! the series, keeps ready handles for the ones the hot path touches, and
//! answers HTTP requests for the rendering. Per-version series are kept
//! and rendered by [`versions`] instead, so that they leave the page with
//! their version (see there why the exporter cannot do that).
//!
//! Without `--metrics` no recorder is installed and every record is a no-op.
//!
//! | series | labels |
//! | --- | --- |
//! | `wasm_echo_datagrams_total` | listener |
//! | `wasm_echo_tcp_connections_total`, `wasm_echo_tcp_messages_total` | listener |
//! | `wasm_echo_bytes_in_total`, `wasm_echo_bytes_out_total`, `wasm_echo_replies_total` | listener, protocol |
//! | `wasm_echo_drops_total` (datagrams and messages whose plugin reply was not sent: rate-limit, failed, refused-reply) | listener, reason |
//! | `wasm_echo_closes_total` (TCP connections ended) | listener, reason |
//! | `wasm_echo_rejected_connections_total` | listener |
//! | `wasm_echo_open_connections` | listener |
//! | `wasm_echo_reloads_total` | listener, result |
//! | `wasm_echo_plugin_failures_total` | listener, version, kind (trap, deadline, memory, reply) |
//! | `wasm_echo_plugin_call_seconds`, `wasm_echo_instantiation_seconds` (histograms) | listener, version |
//! | `wasm_echo_instances` | listener, version |
//! | `wasm_echo_plugin_info` (1 for the current version, 0 for replaced ones still running) | listener, version, plugin, digest |
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
use std::time::Duration;

use anyhow::Context as _;
use metrics::{Counter, Gauge, counter, gauge};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

mod versions;

pub use versions::{FailureKind, PluginSeries, VersionSeries};

/// Histogram buckets for plugin calls and instantiations, in seconds: from
/// a microsecond to the longest deadline.
const BUCKETS: &[f64] = &[
    1e-6, 2.5e-6, 5e-6, 1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2,
    5e-2, 0.1, 0.25, 0.5, 1.0, 5.0, 60.0,
];

/// Installs the recorder and binds the HTTP endpoint; returns the bound
/// address (the real port when port 0 was asked for).
///
/// # Errors
///
/// A recorder is already installed, or the address cannot be bound.
pub async fn serve(addr: SocketAddr) -> anyhow::Result<SocketAddr> {
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".to_owned()), BUCKETS)
        .context("configuring histogram buckets")?
        .install_recorder()
        .context("installing the metrics recorder")?;
    let listener = TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot serve metrics on {addr}"))?;
    let bound = listener
        .local_addr()
        .context("reading the metrics address")?;
    versions::start_recording();
    tokio::spawn(upkeep(handle.clone()));
    tokio::spawn(answer_scrapes(listener, handle));
    Ok(bound)
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

/// The HTTP side, just enough for a scraper: every `GET /metrics` gets the
/// rendering, anything else a 404. One request per connection.
async fn answer_scrapes(listener: TcpListener, handle: PrometheusHandle) {
    loop {
        let Ok((mut stream, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let handle = handle.clone();
        tokio::spawn(async move {
            let mut request = Vec::with_capacity(1024);
            let mut buf = [0u8; 1024];
            let read_head = async {
                while !request.windows(4).any(|w| w == b"\r\n\r\n") && request.len() < 16 * 1024 {
                    match stream.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(len) => request.extend_from_slice(&buf[..len]),
                    }
                }
            };
            if tokio::time::timeout(Duration::from_secs(5), read_head)
                .await
                .is_err()
            {
                return;
            }
            let line = request
                .split(|byte| *byte == b'\r')
                .next()
                .unwrap_or_default();
            let (status, content_type, body) = if line.starts_with(b"GET /metrics ") {
                ("200 OK", "text/plain; version=0.0.4", render(&handle))
            } else {
                ("404 Not Found", "text/plain", "try /metrics\n".to_owned())
            };
            let head = format!(
                "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            );
            let _ = stream.write_all(head.as_bytes()).await;
            let _ = stream.write_all(body.as_bytes()).await;
            let _ = stream.shutdown().await;
        });
    }
}

/// The whole page: the exporter's series, then the per-version ones.
fn render(handle: &PrometheusHandle) -> String {
    let mut page = handle.render();
    versions::render(&mut page);
    page
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
    drops: [Counter; 3],
    closes: [Counter; 7],
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
            drops: [drop("rate-limit"), drop("failed"), drop("refused-reply")],
            closes: [
                close("peer"),
                close("plugin"),
                close("idle"),
                close("protocol"),
                close("failed"),
                close("shutdown"),
                close("io"),
            ],
            plugins: PluginSeries::new(listener),
            listener: l,
        }
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
    pub fn reloaded(&self, ok: bool) {
        let result = if ok { "ok" } else { "failed" };
        counter!("wasm_echo_reloads_total", "listener" => self.listener.clone(), "result" => result).increment(1);
    }

    /// The series of one version of this listener's plugin; see
    /// [`PluginSeries::version`].
    pub fn version(&self, version: &str, plugin: Option<(&str, &str)>) -> VersionSeries {
        self.plugins.version(version, plugin)
    }
}
