//! The runtime owns what every plugin shares: the wasmtime `Engine` (its
//! configuration decides how code is compiled, where instances live and how
//! calls are interrupted), the `Linker` holding the host's capabilities, and
//! the one epoch-ticker thread of the process that drives every call's
//! deadline.
//!
//! The ticker ticks only while calls run: each call counts itself in flight
//! for as long as guest code may run ([`Ticker::busy`]), and once no call
//! has been seen in flight for [`LINGER`] the ticker parks until the next
//! call wakes it. An idle server therefore wakes no thread at all, and a
//! busy one pays for a wake-up at most once per [`LINGER`], not per call.
//!
//! Instances come from wasmtime's pooling allocator: the address space for
//! every instance's memory, tables, metadata and async stack is reserved
//! once, at start-up, sized by [`PoolSize`], and a new connection's instance
//! takes a free slot (copy-on-write from the component's memory image)
//! instead of mapping and unmapping its own regions. That is what makes an
//! instance per connection cheap, and what keeps 10,000 of them within the
//! kernel's limit on mappings. Each instance still has its own slot: nothing
//! is shared between connections or tenants.
//!
//! Compiled code is kept between runs by wasmtime's own compilation cache,
//! in `<cache-dir>/compiled`, when the runtime is given a cache directory
//! ([`Runtime::with_cache`]). wasmtime keys each entry by the component's
//! bytes, the engine's settings and wasmtime's version, so an entry is only
//! ever used by an engine that would have compiled the same code; an entry
//! it cannot read (truncated, not zstd, not code for this engine) is
//! compiled afresh and overwritten. What lies in the cache directory is run,
//! which is why [`CacheDir`] holds it to the private-to-the-user rule.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::thread::{self, Thread};
use std::time::{Duration, SystemTime};

use sha2::{Digest, Sha256};

use wasmtime::component::{Component, Linker};
use wasmtime::{
    Cache, CacheConfig, Config, Enabled, Engine, InstanceAllocationStrategy,
    PoolingAllocationConfig,
};

use super::host::{self, HostState};
use super::output::{escape, fold_lines};
use super::{Limits, LoadError, Plugin, PluginSource, bindings};
use crate::cache::CacheDir;
use crate::registry::{Credentials, Fetched, RegistryAccess};

/// How often the epoch advances: the granularity of deadlines, and how
/// often a long-running call yields its thread to other work.
pub const EPOCH_TICK: Duration = Duration::from_millis(1);

/// How long the ticker goes on ticking after it last saw a call in flight,
/// before it parks. Calls shorter than a tick are mostly not seen, so under
/// steady traffic it parks about this often and the next call wakes it.
const LINGER: Duration = Duration::from_millis(100);

/// The subdirectory of the cache directory that holds compiled code. It
/// is wasmtime's alone: its cache worker deletes any file in it that it did
/// not write.
pub const COMPILED: &str = "compiled";

/// The size of a WebAssembly page.
const WASM_PAGE: usize = 64 << 10;

/// How much of the memory an instance wrote is restored in place, rather
/// than dropped, when its slot is freed (where the kernel can say which
/// pages were written). It bounds what a free slot keeps resident.
const KEEP_RESIDENT_SCANNED: usize = 512 << 10;

/// How many instances the pool holds at once, and how large each one's
/// memory and tables may grow. A tenant's own limits (the `ResourceLimiter`)
/// still apply within a slot; the slot only has to be large enough for the
/// largest of them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PoolSize {
    /// Component instances alive at once: one per open TCP connection and
    /// one per UDP listener. Past this, new connections are refused with an
    /// instantiation error until some close.
    pub instances: u32,
    /// The largest linear memory any instance may grow to, in bytes.
    pub memory_bytes: usize,
    /// The most elements any table may hold.
    pub table_elements: usize,
}

impl PoolSize {
    /// Core instances (a component's modules) per component instance, on
    /// average: a Rust or C component needs a few, a Python or JavaScript
    /// one a few dozen, so a pool full of those holds fewer connections.
    const CORE_INSTANCES_PER_COMPONENT: u32 = 8;
    /// Linear memories per component instance, on average.
    const MEMORIES_PER_COMPONENT: u32 = 2;
    /// Tables per component instance, on average.
    const TABLES_PER_COMPONENT: u32 = 4;
    /// The most instances any configuration gets a pool for: beyond this
    /// the reserved address space (about 100 MiB per instance with the
    /// default memory limit) stops being small next to the machine's.
    pub const MAX_INSTANCES: u32 = 200_000;
    /// Memory mappings one pooled instance costs the process: two for its
    /// async stack (guard page and stack, made at start-up) and about four
    /// for a live memory slot (copy-on-write image, heap, the rest).
    const MAPPINGS_PER_INSTANCE: u64 = 6;
    /// Mappings left for everything else: code, heap, threads.
    const MAPPINGS_RESERVED: u64 = 4096;

    /// This size, cut down to what the kernel's limit on a process's memory
    /// mappings (`vm.max_map_count`, 65,530 by default) can hold: past it,
    /// the pool could not even be set up. With the default limit that is
    /// about 10,000 instances; raise the sysctl for more.
    fn fitted(self) -> Self {
        let Some(max_map_count) = std::fs::read_to_string("/proc/sys/vm/max_map_count")
            .ok()
            .and_then(|text| text.trim().parse::<u64>().ok())
        else {
            return self;
        };
        let fits =
            max_map_count.saturating_sub(Self::MAPPINGS_RESERVED) / Self::MAPPINGS_PER_INSTANCE;
        let fits = u32::try_from(fits).unwrap_or(u32::MAX).max(1);
        // Not a warning: two listeners with the default max-connections
        // already ask for more, and a full pool says so itself when a
        // connection finds no slot.
        if self.instances > fits {
            tracing::debug!(
                "instance pool cut from {} to {fits} instances by vm.max_map_count ({max_map_count}); \
                 raise it (sysctl vm.max_map_count) to serve more connections at once",
                self.instances
            );
        }
        Self {
            instances: self.instances.min(fits),
            ..self
        }
    }

    /// A pool for `instances` instances whose memories and tables may grow
    /// to `memory_bytes` and `table_elements`, with headroom for instances
    /// being made while others are being dropped (and for a connection that
    /// fails open: its fresh instance is made before the failed one goes).
    pub fn sized(instances: usize, memory_bytes: usize, table_elements: usize) -> Self {
        let instances = instances.saturating_add(instances / 64 + 16);
        Self {
            instances: u32::try_from(instances)
                .unwrap_or(u32::MAX)
                .min(Self::MAX_INSTANCES),
            memory_bytes,
            table_elements,
        }
    }
}

impl Default for PoolSize {
    /// One listener with the default limits: 10,000 connections (the
    /// default `max-connections`; a test in `config` keeps the two in
    /// step) and its UDP instance.
    fn default() -> Self {
        let limits = Limits::default();
        Self::sized(10_001, limits.memory_bytes, limits.table_elements)
    }
}

/// The shared wasmtime state. Create one per process.
pub struct Runtime {
    engine: Engine,
    linker: Linker<HostState>,
    ticker: Arc<Ticker>,
    /// The largest component file [`Runtime::load`] reads.
    max_plugin_bytes: u64,
    /// Where fetched and compiled plugins are kept between runs, when the
    /// server has a cache.
    cache: Option<CacheDir>,
    /// How `oci://` plugins are fetched: registries, credentials and the
    /// blob cache.
    registry: RegistryAccess,
    /// The engine's compiled-code cache, kept here for its hit count: how
    /// [`Runtime::load`] tells code loaded from the cache from code it
    /// compiled.
    compiled: Option<Cache>,
}

/// The epoch ticker's handle. The runtime and every plugin it loaded hold
/// it, so deadlines keep being enforced for as long as any plugin can still
/// run, even after the `Runtime` itself is gone; the last one dropped stops
/// the thread.
#[derive(Debug)]
pub(super) struct Ticker {
    state: &'static TickerState,
}

/// What the ticker thread and the calls share. It is leaked (a few bytes
/// per runtime, and a process has one), so that a call's [`Busy`] is a
/// plain reference, not a reference count touched twice a call.
#[derive(Debug, Default)]
pub(super) struct TickerState {
    /// Calls that may be running guest code now.
    in_flight: AtomicUsize,
    /// Set by the ticker just before it parks; a call that sees it wakes
    /// the ticker.
    parked: AtomicBool,
    /// Set when the last handle goes.
    stop: AtomicBool,
    /// The ticker thread, to wake it.
    thread: OnceLock<Thread>,
}

/// A call in flight: the ticker keeps ticking while one exists.
#[derive(Debug)]
pub(super) struct Busy(&'static TickerState);

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Ticker {
    /// Starts the ticker thread advancing `engine`'s epoch.
    fn start(engine: Engine) -> std::io::Result<Self> {
        let state: &'static TickerState = Box::leak(Box::default());
        let thread = thread::Builder::new()
            .name("epoch-ticker".into())
            .spawn(move || state.run(&engine))?;
        let _ = state.thread.set(thread.thread().clone());
        Ok(Self { state })
    }

    /// Counts a call in flight until the returned guard is dropped, waking
    /// the ticker if it is parked.
    pub(super) fn busy(&self) -> Busy {
        let state = self.state;
        state.in_flight.fetch_add(1, Ordering::SeqCst);
        // Either this sees `parked`, or the ticker, which sets `parked`
        // before it looks at `in_flight` (both sequentially consistent),
        // sees this call and does not park.
        if state.parked.load(Ordering::SeqCst)
            && let Some(thread) = state.thread.get()
        {
            thread.unpark();
        }
        Busy(state)
    }
}

impl Drop for Ticker {
    fn drop(&mut self) {
        self.state.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.state.thread.get() {
            thread.unpark();
        }
    }
}

impl TickerState {
    /// The ticker thread: ticks every [`EPOCH_TICK`] while calls run,
    /// parks after [`LINGER`] without one.
    fn run(&self, engine: &Engine) {
        let linger = (LINGER.as_nanos() / EPOCH_TICK.as_nanos()).max(1);
        let mut quiet = 0;
        while !self.stop.load(Ordering::SeqCst) {
            if self.in_flight.load(Ordering::SeqCst) > 0 {
                quiet = 0;
            } else {
                quiet += 1;
                if quiet >= linger {
                    self.parked.store(true, Ordering::SeqCst);
                    if self.in_flight.load(Ordering::SeqCst) == 0
                        && !self.stop.load(Ordering::SeqCst)
                    {
                        thread::park();
                    }
                    self.parked.store(false, Ordering::SeqCst);
                    quiet = 0;
                    continue;
                }
            }
            thread::sleep(EPOCH_TICK);
            engine.increment_epoch();
        }
    }
}

impl Runtime {
    /// A runtime whose pool fits one listener with the default limits,
    /// compiling every plugin afresh.
    ///
    /// # Errors
    ///
    /// As for [`Runtime::with_pool`].
    pub fn new() -> anyhow::Result<Self> {
        Self::with_pool(PoolSize::default())
    }

    /// A runtime with an instance pool of `pool`'s size that compiles every
    /// plugin afresh (tests, and whatever has no cache directory).
    ///
    /// # Errors
    ///
    /// As for [`Runtime::with_cache`].
    pub fn with_pool(pool: PoolSize) -> anyhow::Result<Self> {
        Self::with_cache(pool, None)
    }

    /// Configures the engine with an instance pool of `pool`'s size and,
    /// given a `cache`, a compiled-code cache in its `compiled`
    /// subdirectory; links the capabilities and starts the ticker. The
    /// engine is built knowing its cache because wasmtime fixes the cache
    /// with the rest of the engine's configuration.
    ///
    /// # Errors
    ///
    /// Fails if wasmtime rejects the configuration on this machine (for
    /// instance when the pool's address space cannot be reserved), or if
    /// `compiled` cannot be made private to this user.
    pub fn with_cache(pool: PoolSize, cache: Option<CacheDir>) -> anyhow::Result<Self> {
        let pool = pool.fitted();
        let mut config = Config::new();
        let compiled = match &cache {
            Some(cache) => {
                let compiled = cache.subdir(COMPILED)?;
                let mut settings = CacheConfig::new();
                settings.with_directory(compiled.path());
                let compiled = Cache::new(settings).map_err(|e| {
                    anyhow::anyhow!(
                        "compiled-code cache in {}: {e:#}",
                        compiled.path().display()
                    )
                })?;
                config.cache(Some(compiled.clone()));
                Some(compiled)
            }
            None => None,
        };
        config.epoch_interruption(true);
        // A memory slot is as large as the largest memory limit rather than
        // the usual 4 GiB, so that tens of thousands of slots fit in the
        // address space; compiled code then checks bounds explicitly where
        // a 4 GiB slot would let guard pages do it.
        let memory_bytes = pool.memory_bytes.next_multiple_of(WASM_PAGE);
        config.memory_reservation(memory_bytes as u64);
        config.memory_init_cow(true);
        // Since bounds are checked explicitly anyway, no part of a slot is
        // left inaccessible for the hardware to catch: no guard region, and
        // traps are found by checks in the code rather than by signals.
        // Otherwise, every instance that grew its memory (a Rust guest's
        // allocator always does) would have its slot's protection put back
        // with `mprotect` when the slot is next used, and each of those
        // flushes the TLB of every core running the server: that was the
        // largest single cost of a short connection (issue 15). The slot's
        // contents are still reset between instances, and a guest still
        // cannot reach past its own memory's size.
        config.memory_guard_size(0);
        config.signals_based_traps(false);
        let mut pooling = PoolingAllocationConfig::new();
        pooling
            .total_component_instances(pool.instances)
            .total_core_instances(
                pool.instances
                    .saturating_mul(PoolSize::CORE_INSTANCES_PER_COMPONENT),
            )
            .total_memories(
                pool.instances
                    .saturating_mul(PoolSize::MEMORIES_PER_COMPONENT),
            )
            .total_tables(
                pool.instances
                    .saturating_mul(PoolSize::TABLES_PER_COMPONENT),
            )
            .total_stacks(pool.instances)
            .max_memory_size(memory_bytes)
            .table_elements(pool.table_elements)
            .max_tables_per_module(4);
        // How a freed slot is made clean for its next instance. By default
        // the kernel drops its pages (madvise), and every dropped page costs
        // the next instance a page fault and every other core a TLB flush:
        // that was most of what a short connection cost. With PAGEMAP_SCAN
        // (Linux 6.7+) wasmtime finds the pages the instance wrote and copies
        // the original contents back over just those, so the slot's pages
        // stay mapped; a Rust or C handler writes a few dozen KiB. Without
        // it, only the start of the slot is cleaned by hand (it cannot tell
        // which pages were written) and the rest is dropped.
        if PoolingAllocationConfig::is_pagemap_scan_available() {
            pooling
                .pagemap_scan(Enabled::Yes)
                .linear_memory_keep_resident(KEEP_RESIDENT_SCANNED)
                .table_keep_resident(KEEP_RESIDENT_SCANNED);
        } else {
            pooling
                .linear_memory_keep_resident(64 << 10)
                .table_keep_resident(16 << 10);
        }
        config.allocation_strategy(InstanceAllocationStrategy::Pooling(pooling));
        let engine = Engine::new(&config).map_err(|e| anyhow::anyhow!("{e:#}"))?;
        let mut linker = Linker::new(&engine);
        host::capabilities(&mut linker).map_err(|e| anyhow::anyhow!("{e:#}"))?;

        let ticker = Ticker::start(engine.clone())?;
        Ok(Self {
            engine,
            linker,
            ticker: Arc::new(ticker),
            max_plugin_bytes: super::DEFAULT_MAX_PLUGIN_SIZE,
            cache,
            compiled,
            registry: RegistryAccess::new([], Credentials::default(), None),
        })
    }

    /// Refuses component files larger than `bytes` from now on.
    pub fn set_max_plugin_size(&mut self, bytes: u64) {
        self.max_plugin_bytes = bytes;
    }

    /// The server's cache directory, if it has one.
    pub fn cache(&self) -> Option<&CacheDir> {
        self.cache.as_ref()
    }

    /// Reaches registries as `registry` says from now on.
    pub fn set_registry(&mut self, registry: RegistryAccess) {
        self.registry = registry;
    }

    /// How this runtime reaches registries.
    pub fn registry(&self) -> &RegistryAccess {
        &self.registry
    }

    /// For an `oci://` source, its component fetched and verified (network
    /// I/O, done before [`Runtime::load_fetched`] compiles, so that
    /// compiling never waits on a registry); `None` for any other source.
    ///
    /// # Errors
    ///
    /// [`LoadError::Registry`] saying why the registry or cache gave
    /// nothing usable.
    pub async fn fetch(&self, source: &PluginSource) -> Result<Option<Fetched>, LoadError> {
        let PluginSource::Oci(reference) = source else {
            return Ok(None);
        };
        let max = usize::try_from(self.max_plugin_bytes).unwrap_or(usize::MAX);
        let fetched = self.registry.fetch(reference, max).await?;
        if fetched.from_cache && reference.tag().is_none() {
            tracing::info!(
                "{reference}: {} read from the cache, verified; no registry contacted",
                fetched.digest
            );
        } else if fetched.from_cache {
            tracing::info!(
                "{reference}: {} read from the cache, verified",
                fetched.digest
            );
        } else {
            tracing::info!(
                "{reference}: {} fetched from the registry, verified and cached",
                fetched.digest
            );
        }
        Ok(Some(fetched))
    }

    /// [`Runtime::fetch`], then [`Runtime::load_fetched`]: a whole load
    /// for a caller that may wait on both.
    ///
    /// # Errors
    ///
    /// As for those two.
    pub async fn fetch_and_load(&self, source: &PluginSource) -> Result<Plugin, LoadError> {
        let fetched = self.fetch(source).await?;
        self.load_fetched(source, fetched)
    }

    /// Reads, compiles, type-checks and pre-links a plugin. This is the
    /// slow step (Cranelift); instances are then cheap. An `oci://` source
    /// must go through [`Runtime::fetch`] first.
    ///
    /// # Errors
    ///
    /// A [`LoadError`] saying what is wrong with the plugin.
    pub fn load(&self, source: &PluginSource) -> Result<Plugin, LoadError> {
        self.load_fetched(source, None)
    }

    /// [`Runtime::load`], from the bytes [`Runtime::fetch`] gave when it
    /// gave some.
    ///
    /// # Errors
    ///
    /// As for [`Runtime::load`].
    pub fn load_fetched(
        &self,
        source: &PluginSource,
        fetched: Option<Fetched>,
    ) -> Result<Plugin, LoadError> {
        let (bytes, pinned) = match fetched {
            Some(fetched) => (std::borrow::Cow::Owned(fetched.bytes), Some(fetched.digest)),
            None => (source.bytes(self.max_plugin_bytes)?, None),
        };
        if wasmparser::Parser::is_core_wasm(&bytes) {
            return Err(LoadError::CoreModule {
                plugin: source.clone(),
            });
        }
        if !wasmparser::Parser::is_component(&bytes) {
            return Err(LoadError::NotWasm {
                plugin: source.clone(),
            });
        }
        let compiling = std::time::Instant::now();
        let before = self
            .compiled
            .as_ref()
            .map(|cache| (cache.cache_hits(), cache.cache_misses()));
        let component = Component::new(&self.engine, &bytes).map_err(|e| LoadError::Compile {
            plugin: source.clone(),
            reason: one_line(&e),
            source: e.into(),
        })?;
        // wasmtime counts a hit once an entry was read and accepted, and a
        // miss once fresh code was written. Loads in one process run one at
        // a time (start-up loads in turn, reloads are serialised), so a
        // count that moved is this load's.
        let (hit, kept) = match (&self.compiled, before) {
            (Some(cache), Some((hits, misses))) => {
                (cache.cache_hits() > hits, cache.cache_misses() > misses)
            }
            _ => (false, false),
        };
        let (size, took) = (bytes.len(), compiling.elapsed());
        match (hit, kept, self.compiled.is_some()) {
            (true, _, _) => tracing::debug!(
                "compiled code for {source} ({size} bytes) loaded from the cache in {took:.1?}"
            ),
            (false, true, _) => {
                tracing::debug!("compiled {source} ({size} bytes) in {took:.1?}; kept in the cache")
            }
            (false, false, true) => tracing::debug!(
                "compiled {source} ({size} bytes) in {took:.1?}; the cache could not keep it"
            ),
            (false, false, false) => {
                tracing::debug!("compiled {source} ({size} bytes) in {took:.1?}")
            }
        }

        let link_error = |e: wasmtime::Error| LoadError::Link {
            plugin: source.clone(),
            reason: one_line(&e),
            source: e.into(),
        };
        // Exports first: a component for another world is told so, rather
        // than which of its imports the host lacks.
        let wrong_world = |missing| LoadError::WrongWorld {
            plugin: source.clone(),
            missing,
        };
        bindings::ExportIndices::check_required(&component).map_err(wrong_world)?;
        let pre = self
            .linker
            .instantiate_pre(&component)
            .map_err(link_error)?;
        let exports = bindings::ExportIndices::find(&pre).map_err(|error| match error {
            bindings::FindError::Missing(missing) => wrong_world(missing),
            bindings::FindError::Shape(error) => link_error(error),
        })?;
        let digest = Sha256::digest(&bytes)
            .iter()
            .take(6)
            .map(|byte| format!("{byte:02x}"))
            .collect();
        Ok(Plugin {
            name: source.name().into(),
            source: source.clone(),
            digest,
            pinned,
            loaded_at: SystemTime::now(),
            component,
            pre,
            exports,
            instances: AtomicUsize::new(0),
            ticker: self.ticker.clone(),
        })
    }
}

/// wasmtime's errors chain causes and may carry a multi-line backtrace; a
/// log line or a CLI error wants the chain on one line. The text can name
/// what the plugin named (its functions in a backtrace, its imports in a
/// link error), so it is [escaped](escape) and bounded as plugin text is.
pub(super) fn one_line(error: &wasmtime::Error) -> String {
    escape(&fold_lines(&format!("{error:#}"))).into_owned()
}
