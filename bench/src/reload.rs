//! Hot reload, measured: how long a new plugin version takes to answer once
//! it is on disk (through `serve --watch`) or asked for (through the control
//! socket `wasm-echo reload` uses), and how much serving slows down while a
//! swap happens. The two versions are the built-in Rust `echo` and `hello`,
//! which answer differently, so every reply says which version sent it.
//!
//! The server runs in this process, started exactly as `wasm-echo serve
//! --watch --control PATH` starts it (the same [`Server::bind`] and
//! [`Server::run`]), on a runtime of its own. A child process of the `wasm-echo` binary would need that binary
//! built beside this one and could be stale; the library is compiled with
//! the harness, so what is measured is always the code in the tree. Requests
//! still go through the real Unix socket, and swaps through real files
//! renamed over the watched one. No log subscriber is installed, so the
//! server's log lines cost nothing here.
//!
//! The server has a cache directory of the measurement's own. The
//! throughput run is made twice: once with the compiled-code cache emptied
//! before every swap, so that each swap compiles (at the lowest priority,
//! beside the serving), and once with the cache left alone, so that each
//! swap back to a version already seen loads its code from the cache.
//!
//! Starting the other targets and printing their tables is left to the rest
//! of the harness; this module prints its own section.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio::net::UdpSocket;
use tokio::time::timeout;
use wasm_echo::control::{self, Request};
use wasm_echo::plugin::PluginSource;
use wasm_echo::server::Operations;

use crate::load::{nanos, quantile};

/// What every client sends; `echo` sends it back, `hello` greets instead.
const PROBE: [u8; 64] = [b'r'; 64];
/// `hello`'s answer to any datagram.
const GREETING: &[u8] = b"Hello, client!";
/// The listener's name in [`crate::targets::listener_config`].
const LISTENER: &str = "bench";
/// How long a datagram's reply may take before it counts as lost.
const REPLY_TIMEOUT: Duration = Duration::from_millis(200);
/// Pause between probes while waiting for a new version: the resolution of
/// the time-to-first-reply figures, light enough to leave the compiler its
/// core.
const PROBE_GAP: Duration = Duration::from_millis(1);
/// How long a swap may take before the run gives up.
const SWAP_TIMEOUT: Duration = Duration::from_secs(5);
/// Throughput is counted per window of this length.
const WINDOW: Duration = Duration::from_millis(100);
/// Windows at the start of the throughput run left out (sockets and
/// instances warming up).
const WARMUP_WINDOWS: usize = 5;

/// Steady windows a window is set against (see [`Run::during_local`]).
const NEIGHBOURS: usize = 6;

/// How much work the measurement does.
#[derive(Clone, Copy, Debug)]
pub struct Sizes {
    /// Swaps timed by renaming over the watched file, and as many through
    /// the control socket.
    pub swaps: usize,
    /// Length of the throughput run.
    pub run: Duration,
    /// Time between swaps during the throughput run.
    pub every: Duration,
    /// UDP ping-pong clients during the throughput run.
    pub clients: usize,
}

impl Sizes {
    /// The full run (about 20 s, and 16 s more for each round past the
    /// first: each throughput run lasts 8 s a round) or the `--quick` one
    /// (about 6 s, one round whatever `rounds` says).
    pub fn new(quick: bool, rounds: u32) -> Self {
        if quick {
            Self {
                swaps: 4,
                run: Duration::from_secs(3),
                every: Duration::from_millis(500),
                clients: 4,
            }
        } else {
            Self {
                swaps: 12,
                run: Duration::from_secs(8) * rounds.max(1),
                every: Duration::from_millis(700),
                clients: 4,
            }
        }
    }
}

/// What the measurement found.
#[derive(Debug, Default)]
pub struct Figures {
    /// What was run, for the report.
    pub sizes: Option<Sizes>,
    /// Rename over the watched file to the first reply by the new version.
    pub by_rename: Vec<Duration>,
    /// Control request sent to the first reply by the new version.
    pub by_control: Vec<Duration>,
    /// Control request sent to its answer.
    pub control_answer: Vec<Duration>,
    /// The throughput runs: compiling every swap, then from the cache.
    pub runs: Vec<Run>,
    /// Replies during the throughput runs by `echo` and by `hello`.
    pub replies: [u64; 2],
    /// Datagrams without a reply within [`REPLY_TIMEOUT`], in every phase.
    pub lost: u64,
}

/// One throughput run with swaps.
#[derive(Debug, Default)]
pub struct Run {
    /// Whether every swap compiled (the cache emptied before each).
    pub compiling: bool,
    /// Replies per window with no swap in progress.
    pub steady: Vec<u64>,
    /// Replies per window that overlaps a swap (request sent to answered).
    pub during: Vec<u64>,
    /// Each window's replies against the median of the steady windows
    /// nearest it ([`NEIGHBOURS`]): for the windows overlapping a swap,
    /// and for the steady ones (their spread is the noise floor). This
    /// machine's throughput drifts by a third over seconds, with or without
    /// swaps; set against its neighbours, a window shows what happened in it
    /// rather than where the drift was.
    pub during_local: Vec<f64>,
    /// As `during_local`, for the steady windows.
    pub steady_local: Vec<f64>,
    /// Swaps during the run.
    pub swaps: usize,
}

/// The two versions swapped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Version {
    Echo,
    Hello,
}

impl Version {
    fn other(self) -> Self {
        match self {
            Self::Echo => Self::Hello,
            Self::Hello => Self::Echo,
        }
    }

    fn builtin(self) -> &'static str {
        match self {
            Self::Echo => "echo",
            Self::Hello => "hello",
        }
    }

    /// Which version sent `reply`, if either did.
    fn of(reply: &[u8]) -> Option<Self> {
        if reply == PROBE {
            Some(Self::Echo)
        } else if reply == GREETING {
            Some(Self::Hello)
        } else {
            None
        }
    }
}

/// The files one measurement works with, in a folder of its own.
struct Files {
    dir: PathBuf,
    /// The plugin file the listener runs and the watcher watches.
    watched: PathBuf,
    /// Where a new version is written before it is renamed over `watched`.
    next: PathBuf,
    control: PathBuf,
    /// The server's cache directory.
    cache: PathBuf,
}

impl Files {
    fn new() -> anyhow::Result<Self> {
        let dir =
            std::env::temp_dir().join(format!("wasm-echo-bench-reload-{}", std::process::id()));
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let files = Self {
            watched: dir.join("plugin.wasm"),
            next: dir.join("next.wasm"),
            control: dir.join("control.sock"),
            cache: dir.join("cache"),
            dir,
        };
        for version in [Version::Echo, Version::Hello] {
            write_synced(&files.copy_of(version), version)?;
        }
        write_synced(&files.watched, Version::Echo)?;
        Ok(files)
    }

    /// Empties the compiled-code cache, so that the next swap compiles.
    fn forget_compiled(&self) -> anyhow::Result<()> {
        let modules = self.cache.join("compiled").join("modules");
        match std::fs::remove_dir_all(&modules) {
            Err(error) if error.kind() != std::io::ErrorKind::NotFound => {
                Err(error).with_context(|| format!("emptying {}", modules.display()))
            }
            _ => Ok(()),
        }
    }

    /// A file holding `version`, for `reload --plugin PATH`.
    fn copy_of(&self, version: Version) -> PathBuf {
        self.dir.join(format!("{}.wasm", version.builtin()))
    }
}

impl Drop for Files {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Writes `version`'s component to `path` and flushes it to disk, so the
/// timed rename does not wait for the write.
fn write_synced(path: &Path, version: Version) -> anyhow::Result<()> {
    let bytes = PluginSource::parse(version.builtin())?
        .bytes(wasm_echo::plugin::DEFAULT_MAX_PLUGIN_SIZE)?;
    let file =
        std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
    std::io::Write::write_all(&mut &file, &bytes)
        .and_then(|()| file.sync_all())
        .with_context(|| format!("writing {}", path.display()))
}

/// Runs every hot-reload measurement, driving the server from `clients`.
///
/// # Errors
///
/// The server does not start, a swap fails or does not show within
/// [`SWAP_TIMEOUT`], or a reply comes from neither version.
pub fn measure(clients: &tokio::runtime::Runtime, sizes: Sizes) -> anyhow::Result<Figures> {
    let files = Files::new()?;
    let server = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("reload-server")
        .enable_all()
        .build()?;
    let udp = server.block_on(serve(&files))?;
    let result = clients.block_on(async {
        let mut figures = Figures {
            sizes: Some(sizes),
            ..Figures::default()
        };
        let mut current = Version::Echo;
        eprintln!(
            "reload: {} swaps by renaming over the watched file",
            sizes.swaps
        );
        current = by_rename(udp, &files, sizes.swaps, current, &mut figures).await?;
        eprintln!("reload: {} swaps through the control socket", sizes.swaps);
        current = by_control(udp, &files, sizes.swaps, current, &mut figures).await?;
        for compiling in [true, false] {
            if !compiling {
                // The compiling run left only the version it ended on in
                // the cache: swap to the other one and back, untimed, so
                // that every swap of this run does load from the cache.
                for version in [current.other(), current] {
                    ask(files.control.clone(), files.copy_of(version)).await?;
                }
            }
            eprintln!(
                "reload: throughput for {} s with a swap every {} ms{}",
                sizes.run.as_secs(),
                sizes.every.as_millis(),
                if compiling {
                    ", compiling each"
                } else {
                    ", from the cache"
                }
            );
            current = throughput(udp, &files, sizes, current, compiling, &mut figures).await?;
        }
        anyhow::Ok(figures)
    });
    server.shutdown_background();
    result
}

/// Starts the server as `wasm-echo serve --plugin WATCHED --watch --control
/// PATH` does (the same [`Server`], bound and run the same way), and
/// returns its UDP address. It serves until its tokio runtime is dropped.
async fn serve(files: &Files) -> anyhow::Result<SocketAddr> {
    let plugin = files
        .watched
        .to_str()
        .context("the temporary folder's path is not UTF-8")?;
    let mut config = crate::targets::listener_config(plugin, 16)?;
    config.cache_dir = Some(files.cache.clone());
    let operations = Operations {
        control: Some(files.control.clone()),
        control_socket: true,
        watch: true,
        ..Operations::default()
    };
    crate::targets::serve_udp(config, operations).await
}

async fn client(server: SocketAddr) -> anyhow::Result<UdpSocket> {
    let socket = UdpSocket::bind("127.0.0.1:0").await?;
    socket.connect(server).await?;
    Ok(socket)
}

/// Probes every [`PROBE_GAP`] until `want` answers, and returns when it
/// did. Replies from the other version are expected until the swap.
async fn first_reply_from(
    socket: &UdpSocket,
    want: Version,
    lost: &mut u64,
) -> anyhow::Result<Instant> {
    let deadline = Instant::now() + SWAP_TIMEOUT;
    let mut reply = [0u8; 256];
    // Bounded by the deadline, and by a count in case the clock misbehaves.
    for _ in 0..SWAP_TIMEOUT.as_millis() * 10 {
        anyhow::ensure!(
            Instant::now() < deadline,
            "`{}` did not answer within {SWAP_TIMEOUT:?}",
            want.builtin()
        );
        socket.send(&PROBE).await?;
        match timeout(REPLY_TIMEOUT, socket.recv(&mut reply)).await {
            Ok(Ok(len)) => match Version::of(&reply[..len]) {
                Some(version) if version == want => return Ok(Instant::now()),
                Some(_) => {}
                None => anyhow::bail!("a reply from neither version: {:?}", &reply[..len]),
            },
            Ok(Err(error)) => return Err(error.into()),
            Err(_) => *lost += 1,
        }
        tokio::time::sleep(PROBE_GAP).await;
    }
    anyhow::bail!("`{}` did not answer after many probes", want.builtin())
}

/// Swaps by writing the other version beside the watched file and renaming
/// it over, as build tools do; returns the version left running.
async fn by_rename(
    udp: SocketAddr,
    files: &Files,
    swaps: usize,
    mut current: Version,
    figures: &mut Figures,
) -> anyhow::Result<Version> {
    let socket = client(udp).await?;
    first_reply_from(&socket, current, &mut figures.lost).await?;
    for _ in 0..swaps {
        let next = current.other();
        write_synced(&files.next, next)?;
        let start = Instant::now();
        std::fs::rename(&files.next, &files.watched)
            .with_context(|| format!("renaming over {}", files.watched.display()))?;
        let seen = first_reply_from(&socket, next, &mut figures.lost).await?;
        figures.by_rename.push(seen - start);
        current = next;
        // Quiet, so each swap starts from an idle watcher.
        tokio::time::sleep(wasm_echo::watch::DEBOUNCE).await;
    }
    Ok(current)
}

/// Asks through the control socket, as `wasm-echo reload --plugin PATH`
/// does, while probing for the new version.
async fn by_control(
    udp: SocketAddr,
    files: &Files,
    swaps: usize,
    mut current: Version,
    figures: &mut Figures,
) -> anyhow::Result<Version> {
    let socket = client(udp).await?;
    for _ in 0..swaps {
        let next = current.other();
        let start = Instant::now();
        let answer = tokio::spawn(ask(files.control.clone(), files.copy_of(next)));
        let seen = first_reply_from(&socket, next, &mut figures.lost).await?;
        let answered = answer.await??;
        figures.by_control.push(seen - start);
        figures.control_answer.push(answered - start);
        current = next;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(current)
}

/// One `reload --listener bench --plugin PLUGIN` through the control
/// socket; returns when the answer came.
async fn ask(control: PathBuf, plugin: PathBuf) -> anyhow::Result<Instant> {
    let request = Request::Reload {
        listener: Some(LISTENER.to_owned()),
        plugin: Some(plugin.display().to_string()),
    };
    let response = timeout(SWAP_TIMEOUT, control::send(&control, &request))
        .await
        .context("no answer from the control socket")??;
    let answered = Instant::now();
    anyhow::ensure!(
        response.ok && response.swaps.iter().all(|swap| swap.swapped),
        "reload did not swap: {}",
        response.error.unwrap_or_default()
    );
    Ok(answered)
}

/// UDP ping-pong clients count replies per [`WINDOW`] while swaps happen
/// through the control socket every `sizes.every`; windows overlapping a
/// swap are set against the others. With `compiling`, the compiled-code
/// cache is emptied before each swap. Returns the version left running.
async fn throughput(
    udp: SocketAddr,
    files: &Files,
    sizes: Sizes,
    mut current: Version,
    compiling: bool,
    figures: &mut Figures,
) -> anyhow::Result<Version> {
    let windows = (sizes.run.as_millis() / WINDOW.as_millis()) as usize;
    let counts: Arc<Vec<AtomicU64>> = Arc::new((0..windows).map(|_| AtomicU64::new(0)).collect());
    let start = Instant::now();
    let end = start + sizes.run;
    let mut tasks = Vec::new();
    for _ in 0..sizes.clients {
        let socket = client(udp).await?;
        let counts = counts.clone();
        tasks.push(tokio::spawn(async move {
            let mut reply = [0u8; 256];
            let (mut replies, mut lost) = ([0u64; 2], 0u64);
            // Bounded by the run's end, and by a count no loopback reaches.
            for _ in 0..50_000_000u64 {
                if Instant::now() >= end {
                    break;
                }
                socket.send(&PROBE).await?;
                match timeout(REPLY_TIMEOUT, socket.recv(&mut reply)).await {
                    Ok(Ok(len)) => {
                        let version =
                            Version::of(&reply[..len]).context("a reply from neither version")?;
                        replies[version as usize] += 1;
                        let window = (start.elapsed().as_nanos() / WINDOW.as_nanos()) as usize;
                        if let Some(count) = counts.get(window) {
                            count.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    Ok(Err(error)) => return Err(error.into()),
                    Err(_) => lost += 1,
                }
            }
            anyhow::Ok((replies, lost))
        }));
    }

    // Swaps start once the warm-up windows are over and stop a window
    // before the end, so every swap lies inside counted windows.
    let mut swaps = Vec::new();
    let mut at = start + WINDOW * WARMUP_WINDOWS as u32 + sizes.every / 2;
    while at + sizes.every.min(SWAP_TIMEOUT) < end - WINDOW && swaps.len() < 1_000 {
        tokio::time::sleep_until(at.into()).await;
        let next = current.other();
        if compiling {
            files.forget_compiled()?;
        }
        let sent = Instant::now();
        let answered = ask(files.control.clone(), files.copy_of(next)).await?;
        swaps.push((sent - start, answered - start));
        current = next;
        at += sizes.every;
    }
    for task in tasks {
        let (replies, lost) = task.await??;
        figures.replies[0] += replies[0];
        figures.replies[1] += replies[1];
        figures.lost += lost;
    }

    let mut run = Run {
        compiling,
        swaps: swaps.len(),
        ..Run::default()
    };
    let windows: Vec<(u64, bool)> = counts
        .iter()
        .enumerate()
        .skip(WARMUP_WINDOWS)
        .map(|(index, count)| {
            let (from, to) = (WINDOW * index as u32, WINDOW * (index as u32 + 1));
            let swapping = swaps
                .iter()
                .any(|&(sent, answered)| sent < to && answered >= from);
            (count.load(Ordering::Relaxed), swapping)
        })
        .collect();
    for (index, &(count, swapping)) in windows.iter().enumerate() {
        let local = neighbours(&windows, index).map(|median| count as f64 / median.max(1) as f64);
        if swapping {
            run.during.push(count);
            run.during_local.extend(local);
        } else {
            run.steady.push(count);
            run.steady_local.extend(local);
        }
    }
    figures.runs.push(run);
    Ok(current)
}

/// The median of the [`NEIGHBOURS`] steady windows nearest `index` (the
/// nearer first, before and after it alternately), if there are any.
fn neighbours(windows: &[(u64, bool)], index: usize) -> Option<u64> {
    let mut near: Vec<u64> = (1..windows.len())
        .flat_map(|distance| [index.checked_sub(distance), Some(index + distance)])
        .flatten()
        .filter_map(|at| windows.get(at))
        .filter(|&&(_, swapping)| !swapping)
        .map(|&(count, _)| count)
        .take(NEIGHBOURS)
        .collect();
    near.sort_unstable();
    quantile(&near, 0.5)
}

/// Prints the figures as a Markdown section, ready for BENCHMARKS.md.
pub fn print(figures: &Figures) {
    // A file renamed into place is reloaded after the watcher's short
    // settle, not its in-place-write debounce.
    let settle = wasm_echo::watch::SETTLE;
    let unsettled: Vec<Duration> = figures
        .by_rename
        .iter()
        .map(|time| time.saturating_sub(settle))
        .collect();
    println!();
    println!("## Hot reload");
    println!();
    if let Some(sizes) = figures.sizes {
        println!(
            "Built-in `echo` and `hello` swapped back and forth on one listener: {} swaps by \
             rename and {0} through the control socket, one probe datagram per {} ms until the new \
             version answers; then {} UDP ping-pong clients (64 B) for {} s with a swap through \
             the control socket every {} ms.",
            sizes.swaps,
            PROBE_GAP.as_millis(),
            sizes.clients,
            sizes.run.as_secs(),
            sizes.every.as_millis()
        );
        println!();
    }
    println!("| until the first reply by the new version | median ms | max ms | swaps |");
    println!("| --- | ---: | ---: | ---: |");
    let row = |label: &str, times: &[Duration]| {
        let (median, max) = median_max(times);
        println!("| {label} | {median:.1} | {max:.1} | {} |", times.len());
    };
    row(
        "from the rename over the watched file (`serve --watch`)",
        &figures.by_rename,
    );
    println!(
        "| … of which the watcher's settle after a rename | {0:.1} | {0:.1} | |",
        settle.as_secs_f64() * 1e3
    );
    row("… the rest (rename to reply, less the settle)", &unsettled);
    row(
        "from a `reload` request on the control socket",
        &figures.by_control,
    );
    row(
        "control socket: request to its answer",
        &figures.control_answer,
    );
    println!();

    for run in &figures.runs {
        print_run(run);
    }
    println!(
        "{} swaps during the runs; replies by `echo` {}, by `hello` {}; {} datagram(s) without a \
         reply in {} ms over every phase.",
        figures.runs.iter().map(|run| run.swaps).sum::<usize>(),
        figures.replies[0],
        figures.replies[1],
        figures.lost,
        REPLY_TIMEOUT.as_millis()
    );
}

/// One throughput run's table: windows with no swap against those that
/// overlap one.
fn print_run(run: &Run) {
    let mut steady = run.steady.clone();
    steady.sort_unstable();
    let steady_median = quantile(&steady, 0.5).unwrap_or(0);
    let steady_p10 = quantile(&steady, 0.1).unwrap_or(0);
    let during_mean = run.during.iter().sum::<u64>() as f64 / run.during.len().max(1) as f64;
    let during_min = run.during.iter().copied().min().unwrap_or(0);
    let share = |value: f64| 100.0 * value / (steady_median.max(1) as f64);
    println!(
        "{} swaps, {}:",
        run.swaps,
        if run.compiling {
            "each compiling the new version (cache emptied before each)"
        } else {
            "each loading a version already seen from the compiled-code cache"
        }
    );
    println!();
    let mut steady_local = run.steady_local.clone();
    steady_local.sort_unstable_by(f64::total_cmp);
    let local_p10 = quantile(&steady_local, 0.1).unwrap_or(0.0);
    let local_mean = run.during_local.iter().sum::<f64>() / run.during_local.len().max(1) as f64;
    let steady_min = steady.first().copied().unwrap_or(0);
    let local_steady_min = steady_local.first().copied().unwrap_or(0.0);
    let local_min = run
        .during_local
        .iter()
        .copied()
        .min_by(f64::total_cmp)
        .unwrap_or(0.0);
    println!(
        "| replies per {} ms window | windows | replies | of steady median | of its {NEIGHBOURS} nearest steady windows' median |",
        WINDOW.as_millis()
    );
    println!("| --- | ---: | ---: | ---: | ---: |");
    println!(
        "| steady (no swap in progress), median | {} | {steady_median} | 100.0% | |",
        steady.len()
    );
    println!(
        "| steady, 10th percentile (the noise floor) | | {steady_p10} | {:.1}% | {:.1}% |",
        share(steady_p10 as f64),
        100.0 * local_p10
    );
    println!(
        "| steady, worst | | {steady_min} | {:.1}% | {:.1}% |",
        share(steady_min as f64),
        100.0 * local_steady_min
    );
    println!(
        "| overlapping a swap, mean | {} | {during_mean:.0} | {:.1}% | {:.1}% |",
        run.during.len(),
        share(during_mean),
        100.0 * local_mean
    );
    println!(
        "| overlapping a swap, worst | | {during_min} | {:.1}% | {:.1}% |",
        share(during_min as f64),
        100.0 * local_min
    );
    println!();
}

/// Median and maximum, in milliseconds.
fn median_max(times: &[Duration]) -> (f64, f64) {
    let mut samples: Vec<u64> = times.iter().map(|time| nanos(*time)).collect();
    samples.sort_unstable();
    let ms = |value: Option<u64>| value.unwrap_or(0) as f64 / 1e6;
    (ms(quantile(&samples, 0.5)), ms(samples.last().copied()))
}
