//! The plugin itself, without sockets: how big a component is, how long it
//! takes to compile, to instantiate and to call, and how much memory a live
//! instance holds. Measured for the built-in Rust `echo` always, and for the
//! Python, JavaScript and C echo components when `--polyglot DIR` names
//! where `scripts/build-polyglot.sh` put them.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use wasm_echo::plugin::{Batch, Instance, InstanceSettings, Plugin, PluginSource, Runtime};
use wasm_echo::tenant::{NativeEcho, NativeHandler};

use crate::load::{nanos, quantile};

/// How much work each measurement does.
#[derive(Clone, Copy, Debug)]
pub struct Sizes {
    /// Instances made (and dropped) one after another.
    pub instantiations: usize,
    /// Calls into one instance.
    pub calls: usize,
    /// Instances kept alive at once for the memory figure.
    pub live: usize,
}

/// One component's figures.
#[derive(Debug)]
pub struct Figures {
    /// What it is (`rust`, `python`, ...).
    pub label: String,
    /// Component size in bytes.
    pub size: usize,
    /// Compile and pre-link (`Runtime::load`).
    pub compile: Duration,
    /// Median and p99 of one instantiation, in nanoseconds.
    pub instantiate: (u64, u64),
    /// Median and p99 of dropping an instance that has handled one call
    /// (its pool slot is cleaned for the next), in nanoseconds.
    pub teardown: (u64, u64),
    /// Median and p99 of one 64-byte `on-datagram` call, in nanoseconds.
    pub call: (u64, u64),
    /// Resident bytes per live instance that has handled one call.
    pub memory: f64,
    /// What a datagram costs one call at a time and in a `udp-batch` call,
    /// for a component that exports it.
    pub batched: Vec<BatchCost>,
    /// Why the calls stopped before the number asked for, if they did: a
    /// call that fails is a result (the instance is then dropped, as the
    /// server would drop it), measured with the calls made until then.
    pub call_failure: Option<String>,
}

/// What a datagram of `size` bytes costs in a group of [`BATCH`]: by
/// `on-datagram` calls one after another, and by one `on-datagrams` call.
#[derive(Debug)]
pub struct BatchCost {
    /// Datagram size in bytes.
    pub size: usize,
    /// Median and p99 per datagram, one call each, in nanoseconds.
    pub single: (u64, u64),
    /// Median and p99 per datagram, one call for the group, in nanoseconds.
    pub batch: (u64, u64),
}

/// Datagrams in a group: what the listener reads at most at once.
const BATCH: usize = 32;

/// The polyglot components the build script writes, by language.
pub const POLYGLOT: [(&str, &str); 3] = [
    ("python", "echo-python.wasm"),
    ("js", "echo-js.wasm"),
    ("c", "echo-c.wasm"),
];

fn settings() -> Arc<InstanceSettings> {
    Arc::new(InstanceSettings::with_defaults(
        "bench",
        Default::default(),
        Default::default(),
    ))
}

/// Measures the component at `source`.
///
/// # Errors
///
/// A component that does not load, instantiate or answer.
pub async fn measure(
    runtime: &Runtime,
    label: &str,
    source: PluginSource,
    sizes: Sizes,
) -> anyhow::Result<Figures> {
    let size = source
        .bytes(wasm_echo::plugin::DEFAULT_MAX_PLUGIN_SIZE)?
        .len();
    let start = Instant::now();
    let plugin = Arc::new(runtime.load(&source)?);
    let compile = start.elapsed();
    let settings = settings();
    let peer: SocketAddr = ([127, 0, 0, 1], 40_000).into();
    let data = [b'p'; 64];

    // The first instances pay for faulting in code and the allocator's
    // structures; they are not what a connection costs.
    for _ in 0..sizes.instantiations.min(20) {
        drop(Instance::new(&plugin, settings.clone()).await?);
    }
    // A connection's life: an instance is made, handles a message (which
    // dirties some of its memory), and is dropped.
    let mut times = Vec::with_capacity(sizes.instantiations);
    let mut drops = Vec::with_capacity(sizes.instantiations);
    for _ in 0..sizes.instantiations {
        let start = Instant::now();
        let mut instance = Instance::new(&plugin, settings.clone()).await?;
        times.push(nanos(start.elapsed()));
        instance.on_datagram(peer, &data).await?;
        let start = Instant::now();
        drop(instance);
        drops.push(nanos(start.elapsed()));
    }
    let instantiate = median_p99(&mut times);
    let teardown = median_p99(&mut drops);

    let mut instance = Instance::new(&plugin, settings.clone()).await?;
    let mut times = Vec::with_capacity(sizes.calls);
    let mut call_failure = None;
    for i in 0..sizes.calls + 100 {
        let start = Instant::now();
        let decision = match instance.on_datagram(peer, &data).await {
            Ok(decision) => decision,
            Err(error) => {
                call_failure = Some(format!("call {} into one instance failed: {error}", i + 1));
                break;
            }
        };
        if i >= 100 {
            times.push(nanos(start.elapsed()));
        }
        anyhow::ensure!(
            decision.reply.as_deref() == Some(&data[..]),
            "{label} did not echo"
        );
    }
    let batched = if call_failure.is_none() && instance.offers_batch() {
        let groups = sizes.calls / BATCH;
        vec![
            batch_cost(&mut instance, 64, groups).await?,
            batch_cost(&mut instance, 1400, groups).await?,
        ]
    } else {
        Vec::new()
    };
    drop(instance);
    let call = median_p99(&mut times);

    let memory = live_memory(&plugin, &settings, sizes.live, peer).await?;
    Ok(Figures {
        label: label.to_owned(),
        size,
        compile,
        instantiate,
        teardown,
        call,
        memory,
        batched,
        call_failure,
    })
}

/// Times `groups` groups of [`BATCH`] datagrams of `size` bytes from four
/// peers through `instance`, each group one call at a time and then in one
/// batch call, and checks that both echo.
async fn batch_cost(
    instance: &mut Instance,
    size: usize,
    groups: usize,
) -> anyhow::Result<BatchCost> {
    let peers: Vec<SocketAddr> = (0..4)
        .map(|n| SocketAddr::from(([127, 0, 0, 1], 40_000 + n)))
        .collect();
    let data = vec![b'b'; size];
    let mut batch = Batch::new();
    for n in 0..BATCH {
        batch.push(peers[n % peers.len()], &data);
    }
    let (mut single, mut batched) = (Vec::with_capacity(groups), Vec::with_capacity(groups));
    for group in 0..groups + 10 {
        let start = Instant::now();
        for n in 0..BATCH {
            let decision = instance.on_datagram(peers[n % peers.len()], &data).await?;
            anyhow::ensure!(decision.reply.as_deref() == Some(&data[..]), "did not echo");
        }
        let one_by_one = nanos(start.elapsed()) / BATCH as u64;
        let start = Instant::now();
        let replies = instance.on_datagrams(&batch).await?;
        let in_batch = nanos(start.elapsed()) / BATCH as u64;
        anyhow::ensure!(
            replies.handled() == BATCH && replies.iter().all(|reply| reply == Some(&data[..])),
            "the batch did not echo"
        );
        // The first groups fault in the buffers' pages.
        if group >= 10 {
            single.push(one_by_one);
            batched.push(in_batch);
        }
    }
    Ok(BatchCost {
        size,
        single: median_p99(&mut single),
        batch: median_p99(&mut batched),
    })
}

/// Resident bytes per instance with `live` instances alive at once, each
/// having handled one datagram.
async fn live_memory(
    plugin: &Arc<Plugin>,
    settings: &Arc<InstanceSettings>,
    live: usize,
    peer: SocketAddr,
) -> anyhow::Result<f64> {
    let pid = std::process::id();
    let before = crate::memory::rss(pid)?;
    let mut instances = Vec::with_capacity(live);
    for _ in 0..live {
        let mut instance = Instance::new(plugin, settings.clone()).await?;
        instance.on_datagram(peer, b"hello").await?;
        instances.push(instance);
    }
    let after = crate::memory::rss(pid)?;
    drop(instances);
    Ok(after.saturating_sub(before) as f64 / live.max(1) as f64)
}

/// The same call answered by native code, for scale.
pub fn native_call(calls: usize) -> (u64, u64) {
    let peer: SocketAddr = ([127, 0, 0, 1], 40_000).into();
    let data = [b'p'; 64];
    let mut times = Vec::with_capacity(calls);
    for _ in 0..calls {
        let start = Instant::now();
        let decision = NativeEcho.on_datagram(peer, std::hint::black_box(&data));
        std::hint::black_box(decision);
        times.push(nanos(start.elapsed()));
    }
    median_p99(&mut times)
}

/// The polyglot components found in `dir`, with their labels.
pub fn polyglot_sources(dir: &Path) -> Vec<(String, PluginSource)> {
    POLYGLOT
        .iter()
        .map(|(label, file)| ((*label).to_owned(), PluginSource::File(dir.join(file))))
        .collect()
}

fn median_p99(times: &mut [u64]) -> (u64, u64) {
    times.sort_unstable();
    (
        quantile(times, 0.5).unwrap_or(0),
        quantile(times, 0.99).unwrap_or(0),
    )
}

/// What a long run of calls into one instance did to its memory.
#[derive(Debug)]
pub struct Soak {
    /// What it is (`rust`, `js`, ...).
    pub label: String,
    /// Calls made (all of those asked for, unless one failed).
    pub calls: usize,
    /// The instance's linear memory after its first call, in bytes.
    pub first: usize,
    /// And after the last call.
    pub last: usize,
    /// The memory cap it ran under.
    pub cap: usize,
    /// How long the calls took.
    pub elapsed: Duration,
    /// Why the calls stopped early, if they did.
    pub failure: Option<String>,
}

/// Makes `calls` 64-byte `on-datagram` calls into one instance of
/// `source`, as a UDP listener's instance lives, and weighs its memory
/// before and after: a guest whose heap grows with every call meets its
/// memory cap here.
///
/// # Errors
///
/// A component that does not load or instantiate.
pub async fn soak(
    runtime: &Runtime,
    label: &str,
    source: PluginSource,
    calls: usize,
) -> anyhow::Result<Soak> {
    let plugin = Arc::new(runtime.load(&source)?);
    let settings = settings();
    let cap = settings.limits.memory_bytes;
    let peer: SocketAddr = ([127, 0, 0, 1], 40_000).into();
    let data = [b's'; 64];
    let mut instance = Instance::new(&plugin, settings).await?;
    let start = Instant::now();
    let (mut first, mut made, mut failure) = (0, 0, None);
    for i in 0..calls {
        if let Err(error) = instance.on_datagram(peer, &data).await {
            failure = Some(format!("call {} failed: {error}", i + 1));
            break;
        }
        made += 1;
        if i == 0 {
            first = instance.memory_bytes();
        }
    }
    Ok(Soak {
        label: label.to_owned(),
        calls: made,
        first,
        last: instance.memory_bytes(),
        cap,
        elapsed: start.elapsed(),
        failure,
    })
}

/// Prints the long runs as a table.
pub fn print_soaks(soaks: &[Soak]) {
    let mib = |bytes: usize| bytes as f64 / f64::from(1 << 20);
    println!();
    println!("## Memory over a long run of calls into one instance");
    println!();
    println!(
        "| echo in | calls made | memory after call 1 MiB | after the last MiB | cap MiB | µs per call | stopped because |"
    );
    println!("|---|---:|---:|---:|---:|---:|---|");
    for soak in soaks {
        println!(
            "| {} | {} | {:.2} | {:.2} | {:.0} | {:.2} | {} |",
            soak.label,
            soak.calls,
            mib(soak.first),
            mib(soak.last),
            mib(soak.cap),
            soak.elapsed.as_secs_f64() * 1e6 / soak.calls.max(1) as f64,
            soak.failure.as_deref().unwrap_or("—"),
        );
    }
}
