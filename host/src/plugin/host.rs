//! What a plugin can reach: the store data every instance carries, and the
//! one function ([`capabilities`]) that decides what is linked. A plugin
//! gets the `host` interface of the WIT contract (log, configuration) and a
//! locked-down WASI for the language runtimes that need it: no arguments,
//! no environment, no files, no network, empty stdin, and stdout/stderr
//! sent to the host log tagged with the plugin's name.

use std::collections::BTreeMap;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::io::AsyncWrite;
use wasmtime::component::{HasSelf, Linker, ResourceTable};
use wasmtime::{ResourceLimiter, UpdateDeadline};
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

use super::bindings::{self, Level};
use super::limits::{DeadlineExceeded, LimitExceeded, Limits};

/// A plugin's key/value settings, read through `host.get-config`.
pub type PluginConfig = BTreeMap<String, String>;

/// The data of one store, that is of one plugin instance.
pub struct HostState {
    /// The plugin's name, for every log line the instance causes.
    plugin: Arc<str>,
    /// The settings `get-config` answers from.
    config: Arc<PluginConfig>,
    /// The peer the current call is about, for log lines.
    pub(super) peer: Option<SocketAddr>,
    /// When the current call began; the epoch callback measures from here.
    pub(super) call_started: Instant,
    /// How long a call may run.
    call_timeout: Duration,
    limits: Limits,
    wasi: WasiCtx,
    table: ResourceTable,
}

impl HostState {
    pub(super) fn new(plugin: Arc<str>, config: Arc<PluginConfig>, limits: &Limits) -> Self {
        let wasi = WasiCtx::builder()
            .stdout(GuestOutput {
                plugin: plugin.clone(),
                stream: "stdout",
            })
            .stderr(GuestOutput {
                plugin: plugin.clone(),
                stream: "stderr",
            })
            .allow_tcp(false)
            .allow_udp(false)
            .allow_ip_name_lookup(false)
            .build();
        Self {
            plugin,
            config,
            peer: None,
            call_started: Instant::now(),
            call_timeout: limits.call_timeout,
            limits: limits.clone(),
            wasi,
            table: ResourceTable::new(),
        }
    }

    /// The epoch callback: a running call yields to the executor at every
    /// tick, so one busy plugin never holds a worker thread, and is stopped
    /// once its deadline has passed.
    pub(super) fn on_epoch_tick(&mut self) -> wasmtime::Result<UpdateDeadline> {
        if self.call_started.elapsed() >= self.call_timeout {
            Err(wasmtime::Error::new(DeadlineExceeded(self.call_timeout)))
        } else {
            Ok(UpdateDeadline::Yield(1))
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
        let plugin = &*self.plugin;
        let peer = self.peer.map(|peer| peer.to_string()).unwrap_or_default();
        match level {
            Level::Trace => tracing::trace!(target: "plugin", plugin, peer, "{message}"),
            Level::Debug => tracing::debug!(target: "plugin", plugin, peer, "{message}"),
            Level::Info => tracing::info!(target: "plugin", plugin, peer, "{message}"),
            Level::Warn => tracing::warn!(target: "plugin", plugin, peer, "{message}"),
            Level::Error => tracing::error!(target: "plugin", plugin, peer, "{message}"),
        }
    }

    fn get_config(&mut self, key: String) -> Option<String> {
        self.config.get(&key).cloned()
    }
}

impl ResourceLimiter for HostState {
    fn memory_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        let limit = self.limits.memory_bytes;
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
        let limit = self.limits.table_elements;
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
            plugin: self.plugin.clone(),
            stream: self.stream,
            line: Vec::new(),
        })
    }
}

/// Collects bytes into lines and logs each one.
struct LineLogger {
    plugin: Arc<str>,
    stream: &'static str,
    line: Vec<u8>,
}

impl LineLogger {
    /// A line longer than this is logged in pieces, so a guest that never
    /// writes a newline cannot grow the host's memory.
    const MAX_LINE: usize = 4096;

    fn emit(&mut self) {
        let text = String::from_utf8_lossy(&self.line);
        let text = text.trim_end_matches(['\n', '\r']);
        tracing::info!(target: "plugin", plugin = &*self.plugin, stream = self.stream, "{text}");
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
