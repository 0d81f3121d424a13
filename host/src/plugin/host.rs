//! What a plugin can reach: the store data every instance carries, and the
//! one function ([`capabilities`]) that decides what is linked. A plugin
//! gets the `host` interface of the WIT contract (log, configuration) and a
//! locked-down WASI for the language runtimes that need it: no arguments,
//! no environment, no files, no network, empty stdin, and stdout/stderr
//! sent to the host log tagged with the plugin's name.

use std::collections::BTreeMap;
use std::io;
use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};

use tokio::io::AsyncWrite;
use wasmtime::component::{HasSelf, Linker, ResourceTable};
use wasmtime::{ResourceLimiter, UpdateDeadline};
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::clocks::{HostMonotonicClock, HostWallClock};
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

use super::bindings::{self, Level};
use super::limits::{DeadlineExceeded, LimitExceeded, Limits};

/// The most WASI handles (pollables, streams, other resources) one instance
/// may hold at once. A guest that leaks them gets an error from the call
/// that would exceed this, instead of growing the host's memory; wasmtime's
/// own cap is 100,000 a store, at a cost of about 14 MiB of host memory a
/// connection and a long stall when the store is dropped. A language
/// runtime holds a handful (its stdio streams, a clock pollable or two).
pub const MAX_HANDLES: usize = 1024;

/// The most bytes one `wasi:random` call may ask the host for. The host
/// allocates them before the guest's memory cap is checked, so the WASI
/// default (64 MiB a call) would let every connection make the host
/// allocate that much at once; a seed or a nonce is a few dozen bytes.
pub const MAX_RANDOM_BYTES: u64 = 64 << 10;

/// A plugin's key/value settings, read through `host.get-config`.
pub type PluginConfig = BTreeMap<String, String>;

/// Everything an instance is given besides its code: who it serves, the
/// settings it reads, the limits it runs within and its log budget. One per
/// tenant, shared by all of the tenant's instances.
#[derive(Debug)]
pub struct InstanceSettings {
    /// The tenant (listener) name, for every log line the instance causes.
    pub tenant: Arc<str>,
    /// The settings `get-config` answers from.
    pub config: PluginConfig,
    /// Bounds of every call.
    pub limits: Limits,
    /// How many log lines the tenant's plugin may write.
    pub log_budget: LogBudget,
}

/// The data of one store, that is of one plugin instance.
pub struct HostState {
    settings: Arc<InstanceSettings>,
    /// The plugin's name (it may change with a reload).
    plugin: Arc<str>,
    /// The peer the current call is about, for log lines.
    pub(super) peer: Option<SocketAddr>,
    /// When the current call began; the epoch callback measures from here.
    pub(super) call_started: Instant,
    wasi: WasiCtx,
    table: ResourceTable,
}

impl HostState {
    pub(super) fn new(settings: Arc<InstanceSettings>, plugin: Arc<str>) -> Self {
        let output = |stream| GuestOutput {
            settings: settings.clone(),
            plugin: plugin.clone(),
            stream,
        };
        let wasi = WasiCtx::builder()
            .stdout(output("stdout"))
            .stderr(output("stderr"))
            .allow_tcp(false)
            .allow_udp(false)
            .allow_ip_name_lookup(false)
            .wall_clock(CoarseClock)
            .monotonic_clock(CoarseClock)
            .max_random_size(MAX_RANDOM_BYTES)
            .build();
        let mut table = ResourceTable::new();
        table.set_max_capacity(MAX_HANDLES);
        Self {
            settings,
            plugin,
            peer: None,
            call_started: Instant::now(),
            wasi,
            table,
        }
    }

    /// How long each call of this instance may take.
    pub(super) fn call_timeout(&self) -> Duration {
        self.settings.limits.call_timeout
    }

    /// The epoch callback: a running call yields to the executor at every
    /// tick, so one busy plugin never holds a worker thread, and is stopped
    /// once its deadline has passed.
    pub(super) fn on_epoch_tick(&mut self) -> wasmtime::Result<UpdateDeadline> {
        let timeout = self.settings.limits.call_timeout;
        if self.call_started.elapsed() >= timeout {
            Err(wasmtime::Error::new(DeadlineExceeded(timeout)))
        } else {
            // tokio's own yield goes to the back of the run queue; a plain
            // wake-up would be polled again at once and starve the others.
            Ok(UpdateDeadline::YieldCustom(
                1,
                Box::pin(tokio::task::yield_now()),
            ))
        }
    }

    pub(super) fn limiter(&mut self) -> &mut dyn ResourceLimiter {
        self
    }
}

/// Links everything a plugin may import, and nothing else.
///
/// # Errors
///
/// Fails only if two capabilities define the same import, a programming
/// error.
pub fn capabilities(linker: &mut Linker<HostState>) -> wasmtime::Result<()> {
    wasmtime_wasi::p2::add_to_linker_async(linker)?;
    bindings::Plugin::add_to_linker::<HostState, HasSelf<HostState>>(linker, |state| state)
}

impl WasiView for HostState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

impl bindings::wasm_echo::plugin::types::Host for HostState {}

impl bindings::wasm_echo::plugin::host::Host for HostState {
    fn log(&mut self, level: Level, message: String) {
        let settings = &*self.settings;
        if !settings.log_budget.admit() {
            return;
        }
        let (tenant, plugin) = (&*settings.tenant, &*self.plugin);
        let peer = self.peer.map(|peer| peer.to_string()).unwrap_or_default();
        match level {
            Level::Trace => {
                tracing::trace!(target: "plugin", listener = tenant, plugin, peer, "{message}")
            }
            Level::Debug => {
                tracing::debug!(target: "plugin", listener = tenant, plugin, peer, "{message}")
            }
            Level::Info => {
                tracing::info!(target: "plugin", listener = tenant, plugin, peer, "{message}")
            }
            Level::Warn => {
                tracing::warn!(target: "plugin", listener = tenant, plugin, peer, "{message}")
            }
            Level::Error => {
                tracing::error!(target: "plugin", listener = tenant, plugin, peer, "{message}")
            }
        }
    }

    fn get_config(&mut self, key: String) -> Option<String> {
        self.settings.config.get(&key).cloned()
    }
}

impl ResourceLimiter for HostState {
    fn instances(&self) -> usize {
        self.settings.limits.instances
    }

    fn tables(&self) -> usize {
        self.settings.limits.instances
    }

    fn memories(&self) -> usize {
        self.settings.limits.instances
    }

    fn memory_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        let limit = self.settings.limits.memory_bytes;
        if desired > limit {
            return Err(wasmtime::Error::new(LimitExceeded {
                what: "memory",
                desired,
                limit,
            }));
        }
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        let limit = self.settings.limits.table_elements;
        if desired > limit {
            return Err(wasmtime::Error::new(LimitExceeded {
                what: "table",
                desired,
                limit,
            }));
        }
        Ok(true)
    }
}

/// A guest's stdout or stderr: each line becomes a host log line.
struct GuestOutput {
    settings: Arc<InstanceSettings>,
    plugin: Arc<str>,
    stream: &'static str,
}

impl IsTerminal for GuestOutput {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for GuestOutput {
    fn async_stream(&self) -> Box<dyn AsyncWrite + Send + Sync> {
        Box::new(LineLogger {
            settings: self.settings.clone(),
            plugin: self.plugin.clone(),
            stream: self.stream,
            line: Vec::new(),
        })
    }
}

/// Collects bytes into lines and logs each one.
struct LineLogger {
    settings: Arc<InstanceSettings>,
    plugin: Arc<str>,
    stream: &'static str,
    line: Vec<u8>,
}

impl LineLogger {
    /// A line longer than this is logged in pieces, so a guest that never
    /// writes a newline cannot grow the host's memory.
    const MAX_LINE: usize = 4096;

    fn emit(&mut self) {
        if self.settings.log_budget.admit() {
            let text = String::from_utf8_lossy(&self.line);
            let text = text.trim_end_matches(['\n', '\r']);
            let (tenant, plugin) = (&*self.settings.tenant, &*self.plugin);
            tracing::info!(target: "plugin", listener = tenant, plugin, stream = self.stream, "{text}");
        }
        self.line.clear();
    }
}

impl AsyncWrite for LineLogger {
    fn poll_write(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        for &byte in buf {
            self.line.push(byte);
            if byte == b'\n' || self.line.len() >= Self::MAX_LINE {
                self.emit();
            }
        }
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        if !self.line.is_empty() {
            self.emit();
        }
        Poll::Ready(Ok(()))
    }
}

/// A tenant's budget of plugin log lines: a token bucket, so a chatty plugin
/// cannot flood the host's log. Dropped lines are counted and reported once
/// lines flow again.
#[derive(Debug)]
pub struct LogBudget {
    bucket: DefaultDirectRateLimiter,
    dropped: AtomicU64,
    tenant: Arc<str>,
}

impl LogBudget {
    /// Allows `per_second` lines a second on average, bursts of twice that.
    pub fn new(tenant: Arc<str>, per_second: u32) -> Self {
        let rate = NonZeroU32::new(per_second).unwrap_or(NonZeroU32::MIN);
        let burst = rate.saturating_mul(NonZeroU32::new(2).unwrap_or(NonZeroU32::MIN));
        let bucket = RateLimiter::direct(Quota::per_second(rate).allow_burst(burst));
        Self {
            bucket,
            dropped: AtomicU64::new(0),
            tenant,
        }
    }

    /// Whether one more line may be logged now.
    fn admit(&self) -> bool {
        if self.bucket.check().is_err() {
            self.dropped.fetch_add(1, Ordering::Relaxed);
            return false;
        }
        let dropped = self.dropped.swap(0, Ordering::Relaxed);
        if dropped > 0 {
            tracing::warn!(target: "plugin", listener = &*self.tenant, "{dropped} plugin log lines dropped (log-rate exceeded)");
        }
        true
    }

    /// Lines dropped since the last one that got through.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

/// The clocks a plugin sees: real time, rounded to the millisecond. A
/// handler needs no finer time, and a fine clock is what timing side
/// channels are built from.
struct CoarseClock;

impl CoarseClock {
    const RESOLUTION: Duration = Duration::from_millis(1);

    fn round(nanos: u128) -> u64 {
        let step = Self::RESOLUTION.as_nanos();
        u64::try_from(nanos / step * step).unwrap_or(u64::MAX)
    }
}

impl HostWallClock for CoarseClock {
    fn resolution(&self) -> Duration {
        Self::RESOLUTION
    }

    fn now(&self) -> Duration {
        let since_epoch = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        Duration::from_nanos(Self::round(since_epoch.as_nanos()))
    }
}

impl HostMonotonicClock for CoarseClock {
    fn resolution(&self) -> u64 {
        Self::round(Self::RESOLUTION.as_nanos())
    }

    fn now(&self) -> u64 {
        static START: OnceLock<Instant> = OnceLock::new();
        Self::round(START.get_or_init(Instant::now).elapsed().as_nanos())
    }
}
