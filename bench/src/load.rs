//! The load generator: clients that drive one server over loopback and
//! measure what comes back. Every loop is bounded twice, by a count and by
//! a time, and every wait for a reply has a timeout, so a run always ends
//! whatever the server does.
//!
//! Which servers exist and how results are summed up is someone else's
//! business; this module only sends, receives and counts.

use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use anyhow::Context;
use nix::sys::socket::setsockopt;
use nix::sys::socket::sockopt::IpBindAddressNoPort;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream, UdpSocket};
use tokio::task::JoinHandle;
use tokio::time::timeout;

/// How long one measurement may go on, and how many operations it may do.
#[derive(Clone, Copy, Debug)]
pub struct Budget {
    /// Operations per client, at most.
    pub count: u64,
    /// Wall-clock time, at most.
    pub time: Duration,
}

/// How long a part of the bench measures: `rounds` rounds of `run` each.
#[derive(Clone, Copy, Debug)]
pub struct Rounds {
    /// Time per workload, server and round.
    pub run: Duration,
    /// Rounds.
    pub rounds: usize,
}

impl Rounds {
    /// One round of 400 ms for a `--quick` run, three rounds of `run`
    /// otherwise.
    pub fn new(quick: bool, run: Duration) -> Self {
        if quick {
            Self {
                run: Duration::from_millis(400),
                rounds: 1,
            }
        } else {
            Self { run, rounds: 3 }
        }
    }
}

/// Round-trip times of a ping-pong run.
#[derive(Debug, Default)]
pub struct Latency {
    /// One round trip each, in nanoseconds.
    pub samples: Vec<u64>,
    /// Requests that got no reply in time.
    pub lost: u64,
}

/// What a throughput run moved.
#[derive(Debug, Default, Clone, Copy)]
pub struct Rate {
    /// Replies (datagrams, connections) completed.
    pub ops: u64,
    /// Payload bytes echoed back.
    pub bytes: u64,
    /// Requests that got no reply in time.
    pub lost: u64,
    /// From the first send to the last reply.
    pub elapsed: Duration,
}

impl Rate {
    /// Completed operations per second.
    pub fn per_second(&self) -> f64 {
        self.ops as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    /// Echoed payload in MiB/s.
    pub fn mib_per_second(&self) -> f64 {
        self.bytes as f64 / (1 << 20) as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    /// Lost requests as a share of all requests.
    pub fn loss(&self) -> f64 {
        self.lost as f64 / (self.ops + self.lost).max(1) as f64
    }

    fn add(&mut self, other: Rate) {
        self.ops += other.ops;
        self.bytes += other.bytes;
        self.lost += other.lost;
    }
}

/// How long a datagram's reply may take before it counts as lost.
const UDP_REPLY_TIMEOUT: Duration = Duration::from_millis(200);
/// How long a TCP read may take before the run gives up on the connection.
const TCP_TIMEOUT: Duration = Duration::from_secs(5);

async fn udp_client(server: SocketAddr) -> anyhow::Result<UdpSocket> {
    let socket = UdpSocket::bind("127.0.0.1:0").await?;
    socket.connect(server).await?;
    Ok(socket)
}

async fn tcp_client(server: SocketAddr) -> anyhow::Result<TcpStream> {
    let stream = TcpStream::connect(server)
        .await
        .with_context(|| format!("connecting to {server}"))?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// One client, one datagram of `size` bytes in flight at a time.
///
/// # Errors
///
/// A socket that cannot be opened.
pub async fn udp_ping_pong(
    server: SocketAddr,
    size: usize,
    budget: Budget,
) -> anyhow::Result<Latency> {
    let socket = udp_client(server).await?;
    let request = vec![b'u'; size];
    let mut reply = vec![0u8; 65_536];
    let mut result = Latency::default();
    let start = Instant::now();
    for _ in 0..budget.count {
        if start.elapsed() >= budget.time {
            break;
        }
        let sent = Instant::now();
        socket.send(&request).await?;
        match timeout(UDP_REPLY_TIMEOUT, socket.recv(&mut reply)).await {
            Ok(Ok(len)) if len == size => result.samples.push(nanos(sent.elapsed())),
            _ => result.lost += 1,
        }
    }
    Ok(result)
}

/// `clients` clients, each keeping up to `window` datagrams of `size` bytes
/// outstanding. A window whose replies stop coming for
/// [`UDP_REPLY_TIMEOUT`] is counted lost and refilled.
///
/// # Errors
///
/// A socket that cannot be opened.
pub async fn udp_flood(
    server: SocketAddr,
    size: usize,
    clients: usize,
    window: u64,
    budget: Budget,
) -> anyhow::Result<Rate> {
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..clients {
        let socket = udp_client(server).await?;
        tasks.push(tokio::spawn(async move {
            let request = vec![b'f'; size];
            let mut reply = vec![0u8; 65_536];
            let mut rate = Rate::default();
            let (mut sent, mut outstanding) = (0u64, 0u64);
            loop {
                let sending = sent < budget.count && start.elapsed() < budget.time;
                while sending && outstanding < window && sent < budget.count {
                    if socket.send(&request).await.is_err() {
                        break;
                    }
                    sent += 1;
                    outstanding += 1;
                }
                if outstanding == 0 {
                    break;
                }
                match timeout(UDP_REPLY_TIMEOUT, socket.recv(&mut reply)).await {
                    Ok(Ok(len)) => {
                        outstanding -= 1;
                        rate.ops += 1;
                        rate.bytes += len as u64;
                    }
                    _ => {
                        rate.lost += outstanding;
                        outstanding = 0;
                    }
                }
            }
            anyhow::Ok(rate)
        }));
    }
    total(tasks, start).await
}

/// One connection, one message of `size` bytes in flight at a time.
///
/// # Errors
///
/// A connection that fails or a reply that does not come.
pub async fn tcp_ping_pong(
    server: SocketAddr,
    size: usize,
    budget: Budget,
) -> anyhow::Result<Latency> {
    let mut stream = tcp_client(server).await?;
    let request = vec![b't'; size];
    let mut reply = vec![0u8; size];
    let mut result = Latency::default();
    let start = Instant::now();
    for _ in 0..budget.count {
        if start.elapsed() >= budget.time {
            break;
        }
        let sent = Instant::now();
        stream.write_all(&request).await?;
        timeout(TCP_TIMEOUT, stream.read_exact(&mut reply))
            .await
            .context("no TCP reply in time")??;
        result.samples.push(nanos(sent.elapsed()));
    }
    Ok(result)
}

/// `clients` connections, each writing `chunk`-byte writes as fast as the
/// server takes them while reading the echo, until the budget is spent
/// (`count` is in chunks per connection); then each half-closes and reads
/// the rest of its echo.
///
/// # Errors
///
/// A connection that fails or stalls.
pub async fn tcp_stream(
    server: SocketAddr,
    chunk: usize,
    clients: usize,
    budget: Budget,
) -> anyhow::Result<Rate> {
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..clients {
        let stream = tcp_client(server).await?;
        tasks.push(tokio::spawn(async move {
            let (mut reader, mut writer) = stream.into_split();
            let writing = tokio::spawn(async move {
                let data = vec![b's'; chunk];
                let mut chunks = 0;
                while chunks < budget.count && start.elapsed() < budget.time {
                    writer.write_all(&data).await?;
                    chunks += 1;
                }
                writer.shutdown().await?;
                anyhow::Ok(chunks * chunk as u64)
            });
            let mut buf = vec![0u8; 64 * 1024];
            let mut echoed = 0u64;
            loop {
                match timeout(TCP_TIMEOUT, reader.read(&mut buf)).await {
                    Ok(Ok(0)) => break,
                    Ok(Ok(n)) => echoed += n as u64,
                    Ok(Err(error)) => return Err(error.into()),
                    Err(_) => anyhow::bail!("the TCP echo stalled"),
                }
            }
            let written = writing.await??;
            anyhow::ensure!(
                echoed == written,
                "{written} bytes written, {echoed} echoed"
            );
            Ok(Rate {
                ops: 1,
                bytes: echoed,
                ..Rate::default()
            })
        }));
    }
    total(tasks, start).await
}

/// `clients` clients, each opening a connection, exchanging one `size`-byte
/// message and closing it, over and over.
///
/// The client closes first, so every connection leaves its port in
/// TIME_WAIT on the client's side; from one source address that capped
/// every server at the same ~19,200 connections a second (the kernel
/// reuses such a port after a second, and 127.0.0.1 has 28,000 of them).
/// Each client therefore connects from 250 loopback addresses in turn
/// (client N from 127.(10+N).0.1 to .250), so each address sees a few
/// hundred connections a second and no port is needed again while it is
/// in TIME_WAIT.
///
/// # Errors
///
/// A connection that fails or stalls.
pub async fn tcp_churn(
    server: SocketAddr,
    size: usize,
    clients: usize,
    budget: Budget,
) -> anyhow::Result<Rate> {
    let start = Instant::now();
    let mut tasks = Vec::new();
    for client in 0..clients {
        let network = 10u8.saturating_add(u8::try_from(client).unwrap_or(u8::MAX));
        tasks.push(tokio::spawn(async move {
            let request = vec![b'c'; size];
            let mut reply = vec![0u8; size];
            let mut rate = Rate::default();
            while rate.ops < budget.count && start.elapsed() < budget.time {
                let host = u8::try_from(rate.ops % 250).unwrap_or(0) + 1;
                let source = SocketAddr::from((Ipv4Addr::new(127, network, 0, host), 0));
                let socket = TcpSocket::new_v4()?;
                // Let connect() pick the port, knowing the destination: a
                // port picked at bind() could never be one in TIME_WAIT.
                setsockopt(&socket, IpBindAddressNoPort, &true)?;
                socket.bind(source)?;
                let mut stream = socket
                    .connect(server)
                    .await
                    .with_context(|| format!("connecting to {server} from {source}"))?;
                stream.set_nodelay(true)?;
                stream.write_all(&request).await?;
                timeout(TCP_TIMEOUT, stream.read_exact(&mut reply))
                    .await
                    .context("no TCP reply in time")??;
                rate.ops += 1;
                rate.bytes += size as u64;
            }
            anyhow::Ok(rate)
        }));
    }
    total(tasks, start).await
}

/// Waits for every client and adds up what they did, over the time since
/// `start`.
async fn total(
    tasks: Vec<JoinHandle<anyhow::Result<Rate>>>,
    start: Instant,
) -> anyhow::Result<Rate> {
    let mut total = Rate::default();
    for task in tasks {
        total.add(task.await??);
    }
    total.elapsed = start.elapsed();
    Ok(total)
}

/// `duration` in whole nanoseconds, as every sample in the harness is kept.
pub fn nanos(duration: Duration) -> u64 {
    u64::try_from(duration.as_nanos()).unwrap_or(u64::MAX)
}

/// The `q`-quantile (0..=1) of `samples`, which must be sorted.
pub fn quantile<T: Copy>(sorted: &[T], q: f64) -> Option<T> {
    if sorted.is_empty() {
        return None;
    }
    let rank = ((sorted.len() as f64 * q).ceil() as usize).clamp(1, sorted.len());
    sorted.get(rank - 1).copied()
}
