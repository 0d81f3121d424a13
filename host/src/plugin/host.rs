//! What a plugin can reach: the store data every instance carries, and the
//! one function ([`capabilities`]) that decides what is linked. A plugin
//! gets the `host` interface of the WIT contract (log, configuration) and a
//! locked-down WASI for the language runtimes that need it: no arguments,
//! no environment, no files, no network, empty stdin, and stdout/stderr
//! sent to the host log tagged with the plugin's name. How what a plugin
//! writes is bounded and escaped on its way there is `plugin::output`'s.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rand::SeedableRng as _;
use rand::rngs::StdRng;

use wasmtime::component::{HasSelf, Linker, ResourceTable};
use wasmtime::{ResourceLimiter, UpdateDeadline};
use wasmtime_wasi::clocks::{HostMonotonicClock, HostWallClock};
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

use super::bindings::{self, Level};
use super::limits::{DeadlineExceeded, LimitExceeded, Limits};
use super::output::{self, GuestOutput, LogBudget};
use super::runtime::Ticker;

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

/// Mixed into a replayed instance's seed for its insecure random source,
/// so that it does not repeat the secure one's numbers.
const INSECURE_SEED: u64 = 0x9e37_79b9_7f4a_7c15;

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
    /// How many log lines, and bytes, the tenant's plugin may write.
    pub log_budget: LogBudget,
    /// Whether the clocks and random sources are the machine's, or the
    /// recorded ones of a replay.
    pub clocks: Clocks,
}

impl InstanceSettings {
    /// Settings with the default limits and log budget, outside any
    /// configured tenant: `check`, a replay, the benchmark.
    pub fn with_defaults(tenant: &str, config: PluginConfig, clocks: Clocks) -> Self {
        let tenant: Arc<str> = tenant.into();
        Self {
            log_budget: LogBudget::new(
                tenant.clone(),
                LogBudget::DEFAULT_LINES_PER_SECOND,
                LogBudget::DEFAULT_BYTES_PER_SECOND,
            ),
            tenant,
            config,
            limits: Limits::default(),
            clocks,
        }
    }
}

/// The time and randomness an instance sees.
#[derive(Clone, Debug, Default)]
pub enum Clocks {
    /// The machine's clocks (rounded to the millisecond) and random
    /// sources: serving.
    #[default]
    Real,
    /// A replay's: the clocks read what the replay sets before each call,
    /// and the random sources are seeded, so the same plugin given the same
    /// recording answers the same way every time.
    Recorded(Arc<RecordedTime>),
}

/// The time a replayed call sees, set by the replay before each call, and
/// the seeds its instances' random sources start from.
#[derive(Debug, Default)]
pub struct RecordedTime {
    /// Wall-clock time, in nanoseconds since the Unix epoch.
    wall_nanos: AtomicU64,
    /// Monotonic time, in nanoseconds since the recording began.
    monotonic_nanos: AtomicU64,
    /// The seed of the next instance's random sources: instances are made
    /// in the recording's order, so each gets the same seed every replay.
    next_seed: AtomicU64,
}

impl RecordedTime {
    /// Clocks that read the recorded time, and random sources seeded from
    /// `seed` onwards, one seed per instance.
    pub fn new(seed: u64) -> Self {
        Self {
            next_seed: AtomicU64::new(seed),
            ..Self::default()
        }
    }

    /// What the clocks read until the next call to `set`.
    pub fn set(&self, wall: Duration, monotonic: Duration) {
        let nanos = |d: Duration| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        self.wall_nanos.store(nanos(wall), Ordering::Relaxed);
        self.monotonic_nanos
            .store(nanos(monotonic), Ordering::Relaxed);
    }

    fn seed(&self) -> u64 {
        self.next_seed.fetch_add(1, Ordering::Relaxed)
    }
}

/// Both WASI clocks of a replayed instance: they read [`RecordedTime`].
struct RecordedClock(Arc<RecordedTime>);

impl HostWallClock for RecordedClock {
    fn resolution(&self) -> Duration {
        CoarseClock::RESOLUTION
    }

    fn now(&self) -> Duration {
        Duration::from_nanos(self.0.wall_nanos.load(Ordering::Relaxed))
    }
}

impl HostMonotonicClock for RecordedClock {
    fn resolution(&self) -> u64 {
        CoarseClock::round(CoarseClock::RESOLUTION.as_nanos())
    }

    fn now(&self) -> u64 {
        self.0.monotonic_nanos.load(Ordering::Relaxed)
    }
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
    /// How long the current call may take: the per-call deadline, times
    /// the datagrams of a batch.
    pub(super) call_budget: Duration,
    /// The epoch ticker driving this instance's deadlines, told of each
    /// call so that it ticks only while calls run.
    pub(super) ticker: Arc<Ticker>,
    /// The instance's WASI context, built the first time the guest calls
    /// into WASI. Most calls never do (a plugin written without std
    /// imports nothing from WASI, and a Rust one with std only reaches it
    /// to print), and building it costs a dozen boxed values per
    /// connection: its streams, clocks and random sources.
    wasi: Option<WasiCtx>,
    /// The seed of a replayed instance's random sources, drawn when the
    /// instance is made (not when its WASI context is), so that each
    /// instance of a replay gets the same seed every time.
    seed: Option<u64>,
    table: ResourceTable,
    /// The linear memory the instance holds, all its memories together:
    /// what its memory cap is measured against, kept for whoever weighs
    /// an instance (the benchmark's long run).
    pub(super) memory_bytes: usize,
}

impl HostState {
    pub(super) fn new(
        settings: Arc<InstanceSettings>,
        plugin: Arc<str>,
        ticker: Arc<Ticker>,
    ) -> Self {
        let seed = match &settings.clocks {
            Clocks::Real => None,
            Clocks::Recorded(time) => Some(time.seed()),
        };
        let mut table = ResourceTable::new();
        table.set_max_capacity(MAX_HANDLES);
        let call_budget = settings.limits.call_timeout;
        Self {
            settings,
            plugin,
            peer: None,
            call_started: Instant::now(),
            call_budget,
            ticker,
            wasi: None,
            seed,
            table,
            memory_bytes: 0,
        }
    }

    /// The locked-down WASI context described at the top of this module,
    /// for an instance of `plugin` with `settings` (and `seed`, replayed).
    fn build_wasi(
        settings: &Arc<InstanceSettings>,
        plugin: &Arc<str>,
        seed: Option<u64>,
    ) -> WasiCtx {
        let sink = |stream| GuestOutput {
            settings: settings.clone(),
            plugin: plugin.clone(),
            stream,
        };
        let mut wasi = WasiCtx::builder();
        wasi.stdout(sink("stdout"))
            .stderr(sink("stderr"))
            .allow_tcp(false)
            .allow_udp(false)
            .allow_ip_name_lookup(false)
            .max_random_size(MAX_RANDOM_BYTES);
        match (&settings.clocks, seed) {
            (Clocks::Recorded(time), Some(seed)) => {
                wasi.wall_clock(RecordedClock(time.clone()))
                    .monotonic_clock(RecordedClock(time.clone()))
                    .secure_random(StdRng::seed_from_u64(seed))
                    .insecure_random(StdRng::seed_from_u64(seed ^ INSECURE_SEED))
                    .insecure_random_seed(u128::from(seed));
            }
            _ => {
                wasi.wall_clock(CoarseClock).monotonic_clock(CoarseClock);
            }
        }
        wasi.build()
    }

    /// What the instance was started with.
    pub(super) fn settings(&self) -> &Arc<InstanceSettings> {
        &self.settings
    }

    /// How long a call of this instance handling `messages` messages (one
    /// but for a batch) may take: the per-call deadline for each, so a
    /// batch keeps the budget per message the operator set.
    pub(super) fn call_timeout(&self, messages: u32) -> Duration {
        self.settings
            .limits
            .call_timeout
            .saturating_mul(messages.max(1))
    }

    /// The epoch callback: a running call yields to the executor at every
    /// tick, so one busy plugin never holds a worker thread, and is stopped
    /// once its deadline has passed.
    pub(super) fn on_epoch_tick(&mut self) -> wasmtime::Result<UpdateDeadline> {
        let timeout = self.call_budget;
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
    bindings::StatefulPlugin::add_to_linker::<HostState, HasSelf<HostState>>(linker, |state| {
        state
    })?;
    bindings::v0_1::Plugin::add_to_linker::<HostState, HasSelf<HostState>>(linker, |state| state)
}

impl WasiView for HostState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        let (settings, plugin, seed) = (&self.settings, &self.plugin, self.seed);
        WasiCtxView {
            ctx: self
                .wasi
                .get_or_insert_with(|| Self::build_wasi(settings, plugin, seed)),
            table: &mut self.table,
        }
    }
}

impl bindings::wasm_echo::plugin::types::Host for HostState {}

impl bindings::wasm_echo::plugin::host::Host for HostState {
    fn log(&mut self, level: Level, message: String) {
        output::log(&self.settings, &self.plugin, self.peer, level, &message);
    }

    fn get_config(&mut self, key: String) -> Option<String> {
        self.settings.config.get(&key).cloned()
    }
}

/// 0.1.0's `host` is 0.2.0's under its old name.
impl bindings::v0_1::wasm_echo::plugin::host::Host for HostState {
    fn log(&mut self, level: bindings::v0_1::wasm_echo::plugin::host::Level, message: String) {
        use bindings::v0_1::wasm_echo::plugin::host::Level as Old;
        let level = match level {
            Old::Trace => Level::Trace,
            Old::Debug => Level::Debug,
            Old::Info => Level::Info,
            Old::Warn => Level::Warn,
            Old::Error => Level::Error,
        };
        bindings::wasm_echo::plugin::host::Host::log(self, level, message);
    }

    fn get_config(&mut self, key: String) -> Option<String> {
        bindings::wasm_echo::plugin::host::Host::get_config(self, key)
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
        current: usize,
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
        self.memory_bytes += desired.saturating_sub(current);
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
