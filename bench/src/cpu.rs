//! Server CPU per message and tail latency, against a server that is not
//! tokio: every other baseline in the harness runs on tokio, so none of them
//! can show what tokio's scheduling costs.
//!
//! Each server runs in a process of its own ([`crate::child`]): wasm-echo
//! with the echo plugin, its native-handler path, the plain tokio server,
//! and `bench/c/epoll-echo.c`, a single-threaded C server using epoll and
//! recvmmsg/sendmmsg (built by `scripts/build-bench-baseline.sh`). The
//! server's CPU time (user and system, from `/proc/PID/stat`) over a
//! workload divided by the messages it answered is its CPU per message.
//! Tails are taken per round and the median round is reported, so one
//! noisy round does not decide them. Under the UDP flood a ping-pong probe
//! runs beside the flood, which gives the tail under maximal load.

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use tokio::runtime::Runtime;

use crate::child::ChildServer;
use crate::load::{self, Budget, Latency, quantile};
use crate::report::cell;
use crate::targets::Kind;

/// A server in the comparison.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Server {
    /// One of the harness's own targets.
    Target(Kind),
    /// The C epoll server.
    Epoll,
}

impl Server {
    const ALL: [Self; 4] = [
        Self::Target(Kind::Wasm),
        Self::Target(Kind::Native),
        Self::Target(Kind::Tokio),
        Self::Epoll,
    ];

    fn name(self) -> String {
        match self {
            Self::Target(kind) => kind.to_string(),
            Self::Epoll => "C epoll".to_owned(),
        }
    }
}

/// The workloads compared.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Workload {
    /// Four clients with 16 datagrams of 64 B outstanding each, and a
    /// ping-pong probe beside them.
    UdpFlood,
    /// One 64 B datagram in flight.
    UdpPing,
    /// One 64 B TCP message in flight.
    TcpPing,
}

impl Workload {
    const ALL: [Self; 3] = [Self::UdpFlood, Self::UdpPing, Self::TcpPing];

    fn name(self) -> &'static str {
        match self {
            Self::UdpFlood => "UDP flood 64 B (probe latency)",
            Self::UdpPing => "UDP ping-pong 64 B",
            Self::TcpPing => "TCP ping-pong 64 B",
        }
    }
}

/// How much to measure.
#[derive(Clone, Copy, Debug)]
pub struct Sizes {
    /// Rounds; each server runs every workload once a round.
    pub rounds: usize,
    /// Each workload's length.
    pub time: Duration,
}

/// What one workload against one server measured in one round.
#[derive(Debug)]
struct Run {
    /// Server CPU time per message answered, in nanoseconds.
    cpu_per_message: f64,
    /// Messages answered per second.
    rate: f64,
    /// Round-trip percentiles, in nanoseconds: p50, p99, p99.9.
    tails: [Option<u64>; 3],
}

/// Every round's runs.
pub struct Figures {
    sizes: Sizes,
    runs: HashMap<(Workload, Server), Vec<Run>>,
}

/// Runs every workload against every server, `sizes.rounds` times, with the
/// servers taking turns within each round.
///
/// # Errors
///
/// A server that does not start or a workload that fails.
pub fn measure(clients: &Runtime, epoll: &Path, sizes: Sizes) -> anyhow::Result<Figures> {
    let mut runs: HashMap<(Workload, Server), Vec<Run>> = HashMap::new();
    for round in 0..sizes.rounds {
        for turn in 0..Server::ALL.len() {
            let server = Server::ALL[(round + turn) % Server::ALL.len()];
            eprintln!("cpu: round {} against {}", round + 1, server.name());
            let child = match server {
                Server::Target(kind) => ChildServer::target(kind, "echo", 100)?,
                Server::Epoll => ChildServer::program(epoll)?,
            };
            // Warm up: code paths, caches, the first instance.
            let warm = Budget {
                count: u64::MAX,
                time: Duration::from_millis(200),
            };
            clients.block_on(load::udp_flood(child.addrs.udp, 64, 4, 16, warm))?;
            clients.block_on(load::tcp_ping_pong(child.addrs.tcp, 64, warm))?;
            for workload in Workload::ALL {
                let run = clients.block_on(drive(&child, workload, sizes.time))?;
                runs.entry((workload, server)).or_default().push(run);
            }
        }
    }
    Ok(Figures { sizes, runs })
}

async fn drive(child: &ChildServer, workload: Workload, time: Duration) -> anyhow::Result<Run> {
    let budget = Budget {
        count: u64::MAX,
        time,
    };
    let before = child.cpu_time()?;
    let (messages, latency, elapsed) = match workload {
        Workload::UdpFlood => {
            let (rate, probe) = tokio::join!(
                load::udp_flood(child.addrs.udp, 64, 4, 16, budget),
                load::udp_ping_pong(child.addrs.udp, 64, budget),
            );
            let (rate, probe) = (rate?, probe?);
            (rate.ops + probe.samples.len() as u64, probe, rate.elapsed)
        }
        Workload::UdpPing => {
            let latency = load::udp_ping_pong(child.addrs.udp, 64, budget).await?;
            (latency.samples.len() as u64, latency, time)
        }
        Workload::TcpPing => {
            let latency = load::tcp_ping_pong(child.addrs.tcp, 64, budget).await?;
            (latency.samples.len() as u64, latency, time)
        }
    };
    let cpu = child.cpu_time()?.saturating_sub(before);
    Ok(Run {
        cpu_per_message: cpu.as_nanos() as f64 / messages.max(1) as f64,
        rate: messages as f64 / elapsed.as_secs_f64().max(1e-9),
        tails: tails(latency),
    })
}

fn tails(mut latency: Latency) -> [Option<u64>; 3] {
    latency.samples.sort_unstable();
    [0.5, 0.99, 0.999].map(|q| quantile(&latency.samples, q))
}

/// The median of `values`, if there are any.
fn median(mut values: Vec<f64>) -> Option<f64> {
    values.sort_by(f64::total_cmp);
    values.get(values.len() / 2).copied()
}

impl Figures {
    fn median_of(
        &self,
        workload: Workload,
        server: Server,
        figure: impl Fn(&Run) -> Option<f64>,
    ) -> Option<f64> {
        let runs = self.runs.get(&(workload, server))?;
        median(runs.iter().filter_map(figure).collect())
    }
}

/// Prints the figures, then each server's ratios to the C server.
pub fn print(figures: &Figures) {
    println!();
    println!("## Server CPU per message and tails, against a C epoll server");
    println!();
    println!(
        "Each server in a process of its own; {} round(s) of {} ms per workload; CPU time from \
         /proc/PID/stat (10 ms resolution) over messages answered; percentiles per round, \
         median round shown.",
        figures.sizes.rounds,
        figures.sizes.time.as_millis()
    );
    println!();
    println!("| workload | server | CPU µs/msg | msgs/s | p50 µs | p99 µs | p99.9 µs |");
    println!("|---|---|---:|---:|---:|---:|---:|");
    let micros = |nanos: Option<f64>| cell(nanos.map(|n| n / 1000.0));
    for workload in Workload::ALL {
        for server in Server::ALL {
            let tail = |i: usize| {
                figures.median_of(workload, server, |run| run.tails[i].map(|t| t as f64))
            };
            println!(
                "| {} | {} | {} | {} | {} | {} | {} |",
                workload.name(),
                server.name(),
                micros(figures.median_of(workload, server, |run| Some(run.cpu_per_message))),
                cell(figures.median_of(workload, server, |run| Some(run.rate))),
                micros(tail(0)),
                micros(tail(1)),
                micros(tail(2)),
            );
        }
    }
    println!();
    println!(
        "Ratios to the C epoll server (CPU: lower is better; targets for wasm-echo: CPU ≤ 1.3, p99 and p99.9 ≤ 1.2):"
    );
    println!();
    println!("| workload | server | CPU/msg | p99 | p99.9 |");
    println!("|---|---|---:|---:|---:|");
    for workload in Workload::ALL {
        let base = |figure: &dyn Fn(&Run) -> Option<f64>| {
            figures.median_of(workload, Server::Epoll, figure)
        };
        for server in Server::ALL.into_iter().filter(|s| *s != Server::Epoll) {
            let ratio = |figure: &dyn Fn(&Run) -> Option<f64>| match (
                figures.median_of(workload, server, figure),
                base(figure),
            ) {
                (Some(value), Some(base)) if base > 0.0 => Some(value / base),
                _ => None,
            };
            println!(
                "| {} | {} | {} | {} | {} |",
                workload.name(),
                server.name(),
                cell(ratio(&|run| Some(run.cpu_per_message))),
                cell(ratio(&|run| run.tails[1].map(|t| t as f64))),
                cell(ratio(&|run| run.tails[2].map(|t| t as f64))),
            );
        }
    }
}
