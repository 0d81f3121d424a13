//! Hostile neighbours, measured: the ping-pong latency of a well-behaved
//! tenant alone, then while each hostile tenant on the same server is
//! being hammered (issue 8's benchmark).
//!
//! One server runs in this process on a runtime of its own, built as
//! `wasm-echo serve --config FILE` builds it (the same [`ServerConfig`] from
//! the same TOML, and [`Server::bind`]): a `good` tenant with the built-in
//! `echo` plugin, and one tenant per behaviour of the test-only `hostile`
//! plugin with the limits `tests/e2e/tenants.rs` gives it. Both take the
//! scenarios from [`wasm_echo::testing`], which also names the hostile
//! plugin's path as host's build script built it. No log subscriber is
//! installed, so log lines (the `flood-log` tenant's included) cost only
//! their rate limiting here.
//!
//! For each neighbour in turn, two client tasks on a runtime of their own
//! send it datagrams and open connections to it, one at a time each and
//! with short timeouts (most get no reply), while one client on the
//! harness's client runtime measures the good tenant over UDP, then TCP.
//! The good tenant is measured alone first and again at the end, so drift
//! over the run shows.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};
use tokio::time::timeout;
use wasm_echo::config::{Protocol, ServerConfig};
use wasm_echo::server::{Operations, Server};
use wasm_echo::testing::{HOSTILE, hostile_config};

use crate::load::{self, Budget, Latency, quantile};
use crate::report::cell;

/// The good tenant's name in the configuration.
const GOOD: &str = "good";
/// Bytes per ping-pong message to the good tenant.
const SIZE: usize = 64;
/// How long a hammering client waits for a connection or a reply.
const HAMMER_WAIT: Duration = Duration::from_millis(100);
/// How long the good tenant's TCP reply may take before it counts as lost.
const GOOD_TCP_WAIT: Duration = Duration::from_secs(1);
/// Hammering clients per hostile tenant.
const HAMMERS: usize = 2;
/// Requests each hammering client sends at most per neighbour.
const HAMMER_COUNT: u64 = 1_000_000;
/// Hammering before the good tenant is measured.
const WARMUP: Duration = Duration::from_millis(200);
/// What a hammering client sends.
const PROBE: &[u8] = b"hostile probe";

/// How long each measurement runs.
#[derive(Clone, Copy, Debug)]
pub struct Sizes {
    /// Ping-pong time per protocol and neighbour.
    pub run: Duration,
}

impl Sizes {
    /// The full run (about 45 s) or the `--quick` one (about 12 s).
    pub fn new(quick: bool) -> Self {
        Self {
            run: Duration::from_millis(if quick { 500 } else { 2_000 }),
        }
    }
}

/// What the good tenant saw beside one neighbour (or none).
#[derive(Debug)]
pub struct Phase {
    /// `None` for the good tenant alone.
    pub neighbour: Option<&'static str>,
    pub udp: Latency,
    pub tcp: Latency,
    /// What the hammering clients sent the neighbour.
    pub hammer: Hammered,
}

/// What the hammering clients did and got.
#[derive(Debug, Default, Clone, Copy)]
pub struct Hammered {
    pub datagrams: u64,
    pub datagrams_answered: u64,
    pub connections: u64,
    pub connections_answered: u64,
    pub connections_failed: u64,
    pub elapsed: Duration,
}

impl Hammered {
    fn add(&mut self, other: Self) {
        self.datagrams += other.datagrams;
        self.datagrams_answered += other.datagrams_answered;
        self.connections += other.connections;
        self.connections_answered += other.connections_answered;
        self.connections_failed += other.connections_failed;
    }
}

/// What the measurement found.
#[derive(Debug)]
pub struct Figures {
    pub sizes: Sizes,
    /// Alone, each neighbour in [`HOSTILE`]'s order, alone again.
    pub phases: Vec<Phase>,
}

/// The tenant whose peers never read: `echo`, which answers everything
/// they send, with a short write timeout.
const DEAF: &str = "deaf-peer";
/// How long the deaf peers' tenant lets a reply's write make no progress.
const DEAF_WRITE_TIMEOUT: &str = "500ms";
/// What a deaf peer sends per connection at most: far more than the
/// kernel's buffers hold, so the server's reply is stuck until it gives up.
const DEAF_SENDS: usize = 32 << 20;

fn config_toml() -> String {
    // 100 connections a tenant keep the instance pool small; the clients
    // here never hold more than three at once.
    format!(
        "grace = \"100ms\"\n\n{}[listeners.{DEAF}]\nplugin = \"echo\"\nudp = \"127.0.0.1:0\"\n\
         tcp = \"127.0.0.1:0\"\nmax-connections = 100\nwrite-timeout = \"{DEAF_WRITE_TIMEOUT}\"\n",
        hostile_config("max-connections = 100\n")
    )
}

/// A folder of its own for the configuration file, removed afterwards.
struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The configuration, written and read back as `serve --config` reads it.
fn load_config() -> anyhow::Result<ServerConfig> {
    let dir = Scratch(
        std::env::temp_dir().join(format!("wasm-echo-bench-hostile-{}", std::process::id())),
    );
    std::fs::create_dir_all(&dir.0).with_context(|| format!("creating {}", dir.0.display()))?;
    let path = dir.0.join("tenants.toml");
    std::fs::write(&path, config_toml()).with_context(|| format!("writing {}", path.display()))?;
    Ok(ServerConfig::from_file(&path)?)
}

/// Every tenant's UDP and TCP address, by name.
type Addrs = Vec<(String, SocketAddr, SocketAddr)>;

/// Starts the server and returns every tenant's addresses. It serves until
/// its tokio runtime is dropped.
async fn serve(config: ServerConfig) -> anyhow::Result<Addrs> {
    let server = Server::bind(config, Operations::default()).await?;
    let mut addrs: Addrs = Vec::new();
    let names: Vec<String> = server
        .local_addrs()
        .iter()
        .map(|(name, _, _)| (*name).to_owned())
        .collect();
    for name in names {
        if addrs.iter().any(|(known, _, _)| *known == name) {
            continue;
        }
        let of = |protocol: Protocol| {
            server
                .local_addrs()
                .into_iter()
                .find(|(n, p, _)| *n == name && *p == protocol)
                .map(|(_, _, addr)| addr)
                .with_context(|| format!("tenant `{name}` bound no {protocol} socket"))
        };
        let (udp, tcp) = (of(Protocol::Udp)?, of(Protocol::Tcp)?);
        addrs.push((name, udp, tcp));
    }
    tokio::spawn(server.run(std::future::pending()));
    Ok(addrs)
}

fn addrs_of(addrs: &Addrs, name: &str) -> anyhow::Result<(SocketAddr, SocketAddr)> {
    addrs
        .iter()
        .find(|(known, _, _)| known == name)
        .map(|(_, udp, tcp)| (*udp, *tcp))
        .with_context(|| format!("no tenant `{name}`"))
}

/// Runs every phase, measuring from `clients`.
///
/// # Errors
///
/// The hostile plugin is missing, the server does not start, or the good
/// tenant's TCP connection fails or goes unanswered for 5 s.
pub fn measure(clients: &tokio::runtime::Runtime, sizes: Sizes) -> anyhow::Result<Figures> {
    let config = load_config()?;
    let server = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("hostile-server")
        .enable_all()
        .build()?;
    let hammers = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("hostile-client")
        .enable_all()
        .build()?;
    let result = (|| {
        let addrs = server.block_on(serve(config))?;
        let (udp, tcp) = addrs_of(&addrs, GOOD)?;
        let budget = Budget {
            count: 10_000_000,
            time: sizes.run,
        };
        // Warm up: sockets, the UDP instance, the first connection's.
        clients.block_on(good(
            udp,
            tcp,
            Budget {
                count: 1_000,
                time: Duration::from_millis(200),
            },
        ))?;
        let mut phases = Vec::new();
        let neighbours = std::iter::once(None)
            .chain(HOSTILE.iter().map(|scenario| Some(scenario.behaviour)))
            .chain(std::iter::once(Some(DEAF)))
            .chain(std::iter::once(None));
        for neighbour in neighbours {
            eprintln!(
                "hostile: good tenant beside {}",
                neighbour.unwrap_or("none")
            );
            let stop = Arc::new(AtomicBool::new(false));
            let mut tasks = Vec::new();
            if let Some(behaviour) = neighbour {
                let (hostile_udp, hostile_tcp) = addrs_of(&addrs, behaviour)?;
                // Bounded by the stop flag, and by a time no phase reaches.
                let cap = WARMUP + sizes.run * 4 + Duration::from_secs(5);
                for _ in 0..HAMMERS {
                    let stop = stop.clone();
                    tasks.push(if behaviour == DEAF {
                        hammers.spawn(deaf(hostile_tcp, stop, cap))
                    } else {
                        hammers.spawn(hammer(hostile_udp, hostile_tcp, stop, cap))
                    });
                }
                std::thread::sleep(WARMUP);
            }
            let measured = clients
                .block_on(good(udp, tcp, budget))
                .with_context(|| format!("the good tenant beside {neighbour:?}"));
            stop.store(true, Ordering::Relaxed);
            let mut hammer = Hammered::default();
            for task in tasks {
                let done = hammers.block_on(task)??;
                hammer.elapsed = hammer.elapsed.max(done.elapsed);
                hammer.add(done);
            }
            let (udp, tcp) = measured?;
            phases.push(Phase {
                neighbour,
                udp,
                tcp,
                hammer,
            });
        }
        anyhow::Ok(phases)
    })();
    hammers.shutdown_background();
    server.shutdown_background();
    Ok(Figures {
        sizes,
        phases: result?,
    })
}

/// The good tenant's UDP ping-pong, then its TCP ping-pong.
async fn good(
    udp: SocketAddr,
    tcp: SocketAddr,
    budget: Budget,
) -> anyhow::Result<(Latency, Latency)> {
    let udp = load::udp_ping_pong(udp, SIZE, budget).await?;
    let tcp = tcp_ping_pong(tcp, budget).await?;
    Ok((udp, tcp))
}

/// As [`load::tcp_ping_pong`], but a reply that does not come within
/// [`GOOD_TCP_WAIT`] is counted lost (and the connection replaced) instead
/// of ending the run.
async fn tcp_ping_pong(server: SocketAddr, budget: Budget) -> anyhow::Result<Latency> {
    let connect = || async {
        let stream = timeout(GOOD_TCP_WAIT, TcpStream::connect(server))
            .await
            .context("the good tenant accepted no connection in time")??;
        stream.set_nodelay(true)?;
        anyhow::Ok(stream)
    };
    let mut stream = connect().await?;
    let request = [b't'; SIZE];
    let mut reply = [0u8; SIZE];
    let mut result = Latency::default();
    let start = Instant::now();
    for _ in 0..budget.count {
        if start.elapsed() >= budget.time {
            break;
        }
        let sent = Instant::now();
        stream.write_all(&request).await?;
        match timeout(GOOD_TCP_WAIT, stream.read_exact(&mut reply)).await {
            Ok(Ok(_)) => result.samples.push(load::nanos(sent.elapsed())),
            Ok(Err(error)) => return Err(error.into()),
            Err(_) => {
                result.lost += 1;
                stream = connect().await?;
            }
        }
    }
    Ok(result)
}

/// One hammering client: a datagram, then a connection with one message,
/// over and over, each waiting at most [`HAMMER_WAIT`] for an answer,
/// until `stop` (or `cap`, or [`HAMMER_COUNT`]).
async fn hammer(
    udp: SocketAddr,
    tcp: SocketAddr,
    stop: Arc<AtomicBool>,
    cap: Duration,
) -> anyhow::Result<Hammered> {
    let socket = UdpSocket::bind("127.0.0.1:0").await?;
    socket.connect(udp).await?;
    let mut buf = vec![0u8; 70_000];
    let mut done = Hammered::default();
    let start = Instant::now();
    for _ in 0..HAMMER_COUNT {
        if stop.load(Ordering::Relaxed) || start.elapsed() >= cap {
            break;
        }
        // A send can fail while the socket's buffer is full; that is lost
        // too.
        done.datagrams += 1;
        if socket.send(PROBE).await.is_ok()
            && matches!(timeout(HAMMER_WAIT, socket.recv(&mut buf)).await, Ok(Ok(_)))
        {
            done.datagrams_answered += 1;
        }

        done.connections += 1;
        let mut stream = match timeout(HAMMER_WAIT, TcpStream::connect(tcp)).await {
            Ok(Ok(stream)) => stream,
            _ => {
                done.connections_failed += 1;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        if stream.write_all(PROBE).await.is_ok()
            && matches!(timeout(HAMMER_WAIT, stream.read(&mut buf)).await, Ok(Ok(n)) if n > 0)
        {
            done.connections_answered += 1;
        }
    }
    done.elapsed = start.elapsed();
    Ok(done)
}

/// One peer that never reads: connects, sends echo more than the kernel
/// can buffer, reads nothing, and connects again once the server has given
/// up on it (the connection is reset), until `stop` or `cap`. Counted as
/// connections; "answered" counts the ones the server reset.
async fn deaf(tcp: SocketAddr, stop: Arc<AtomicBool>, cap: Duration) -> anyhow::Result<Hammered> {
    let chunk = vec![b'd'; 64 << 10];
    let mut done = Hammered::default();
    let start = Instant::now();
    for _ in 0..HAMMER_COUNT {
        if stop.load(Ordering::Relaxed) || start.elapsed() >= cap {
            break;
        }
        done.connections += 1;
        let Ok(Ok(mut stream)) = timeout(HAMMER_WAIT, TcpStream::connect(tcp)).await else {
            done.connections_failed += 1;
            continue;
        };
        let mut sent = 0;
        while sent < DEAF_SENDS && !stop.load(Ordering::Relaxed) && start.elapsed() < cap {
            // A write that waits is the server not reading either: its
            // reply is stuck behind ours. Keep trying until it resets us.
            match timeout(HAMMER_WAIT, stream.write_all(&chunk)).await {
                Ok(Ok(())) => sent += chunk.len(),
                Ok(Err(_)) => {
                    done.connections_answered += 1;
                    break;
                }
                Err(_) => {}
            }
        }
    }
    done.elapsed = start.elapsed();
    Ok(done)
}

/// Median, p99 and p99.9 in microseconds.
fn percentiles(latency: &Latency) -> [Option<f64>; 3] {
    let mut samples = latency.samples.clone();
    samples.sort_unstable();
    [0.5, 0.99, 0.999].map(|q| quantile(&samples, q).map(|ns| ns as f64 / 1e3))
}

/// The slowest round trip, in milliseconds.
fn worst_ms(latency: &Latency) -> f64 {
    latency.samples.iter().copied().max().unwrap_or(0) as f64 / 1e6
}

fn ratio(value: Option<f64>, alone: Option<f64>) -> String {
    match (value, alone) {
        (Some(value), Some(alone)) if alone > 0.0 => format!("{:.2}×", value / alone),
        _ => "n/a".to_owned(),
    }
}

/// Prints the figures as a Markdown section, ready for BENCHMARKS.md.
pub fn print(figures: &Figures) {
    if figures.phases.is_empty() {
        return;
    }
    // The reference: both "alone" phases' samples together, so drift over
    // the run weighs on neither end alone.
    let pool = |protocol: fn(&Phase) -> &Latency| {
        let mut pooled = Latency::default();
        for phase in figures
            .phases
            .iter()
            .filter(|phase| phase.neighbour.is_none())
        {
            pooled.samples.extend_from_slice(&protocol(phase).samples);
            pooled.lost += protocol(phase).lost;
        }
        pooled
    };
    let reference = Phase {
        neighbour: None,
        udp: pool(|phase| &phase.udp),
        tcp: pool(|phase| &phase.tcp),
        hammer: Hammered::default(),
    };
    let alone = (percentiles(&reference.udp), percentiles(&reference.tcp));
    println!();
    println!("## Hostile neighbours");
    println!();
    println!(
        "The good tenant (`echo`, {SIZE} B ping-pong, one client, {} ms per protocol) alone, then \
         beside each hostile tenant while {HAMMERS} clients send that tenant a datagram and a \
         connection each in turn (waiting at most {} ms for an answer), then alone again. \
         Latencies in µs; ratios are to both \"alone\" phases' samples pooled.",
        figures.sizes.run.as_millis(),
        HAMMER_WAIT.as_millis()
    );
    println!();
    println!(
        "| beside | UDP p50 | UDP p99 | UDP p99.9 | UDP p50, p99 vs alone | TCP p50 | TCP p99 | \
         TCP p99.9 | TCP p50, p99 vs alone | worst UDP / TCP ms | round trips UDP / TCP | lost UDP / TCP |"
    );
    println!(
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
    );
    let last = figures.phases.len() - 1;
    let rows = std::iter::once((
        "**alone, both pooled (the reference)**".to_owned(),
        &reference,
    ))
    .chain(figures.phases.iter().enumerate().map(|(index, phase)| {
        let label = match phase.neighbour {
            Some(behaviour) => format!("`{behaviour}`"),
            None if index == 0 => "alone, first".to_owned(),
            None if index == last => "alone, again at the end".to_owned(),
            None => "alone".to_owned(),
        };
        (label, phase)
    }));
    for (label, phase) in rows {
        let (udp, tcp) = (percentiles(&phase.udp), percentiles(&phase.tcp));
        println!(
            "| {label} | {} | {} | {} | {}, {} | {} | {} | {} | {}, {} | {:.1} / {:.1} | {} / {} | {} / {} |",
            cell(udp[0]),
            cell(udp[1]),
            cell(udp[2]),
            ratio(udp[0], alone.0[0]),
            ratio(udp[1], alone.0[1]),
            cell(tcp[0]),
            cell(tcp[1]),
            cell(tcp[2]),
            ratio(tcp[0], alone.1[0]),
            ratio(tcp[1], alone.1[1]),
            worst_ms(&phase.udp),
            worst_ms(&phase.tcp),
            phase.udp.samples.len(),
            phase.tcp.samples.len(),
            phase.udp.lost,
            phase.tcp.lost,
        );
    }
    println!();
    println!(
        "| hostile tenant | datagrams sent | answered | connections | answered | not accepted in {} ms | requests/s |",
        HAMMER_WAIT.as_millis()
    );
    println!("| --- | ---: | ---: | ---: | ---: | ---: | ---: |");
    for phase in &figures.phases {
        let Some(behaviour) = phase.neighbour else {
            continue;
        };
        let hammer = phase.hammer;
        println!(
            "| `{behaviour}` | {} | {} | {} | {} | {} | {:.0} |",
            hammer.datagrams,
            hammer.datagrams_answered,
            hammer.connections,
            hammer.connections_answered,
            hammer.connections_failed,
            (hammer.datagrams + hammer.connections) as f64 / hammer.elapsed.as_secs_f64().max(1e-9)
        );
    }
    println!();
    println!(
        "`{DEAF}`: its clients send an `echo` tenant up to {} MiB a connection and never read \
         a byte; its \"answered\" column counts the connections the server reset after its \
         `write-timeout` ({DEAF_WRITE_TIMEOUT}) of no progress.",
        DEAF_SENDS >> 20
    );
}
