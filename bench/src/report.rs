//! Sums up the measurements and prints them as Markdown tables, ready to
//! paste into BENCHMARKS.md: absolute figures for each server, then the
//! ratios of wasm-echo to each baseline measured in the same run.
//!
//! Latency percentiles are taken over the samples of every round together;
//! throughput is the median of the rounds.

use std::collections::HashMap;
use std::fmt;

use crate::load::{Latency, Rate, quantile};
use crate::memory::Memory;
use crate::plugin::Figures;
use crate::targets::Kind;

/// One kind of load.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Workload {
    /// One datagram of this size in flight.
    UdpPingPong(usize),
    /// Many datagrams of this size in flight.
    UdpFlood(usize),
    /// One TCP message of this size in flight.
    TcpPingPong(usize),
    /// TCP writes of this size, streamed both ways.
    TcpStream(usize),
    /// Connect, one exchange of this size, close.
    TcpChurn(usize),
}

impl Workload {
    /// Every workload, in the order they run and print.
    pub const ALL: [Self; 7] = [
        Self::UdpPingPong(64),
        Self::UdpPingPong(1400),
        Self::UdpFlood(64),
        Self::UdpFlood(1400),
        Self::TcpPingPong(64),
        Self::TcpStream(16 * 1024),
        Self::TcpChurn(64),
    ];
}

impl Workload {
    /// The name `--only` knows it by.
    pub fn part(self) -> &'static str {
        match self {
            Self::UdpPingPong(_) => "udp-ping",
            Self::UdpFlood(_) => "udp-flood",
            Self::TcpPingPong(_) => "tcp-ping",
            Self::TcpStream(_) => "tcp-stream",
            Self::TcpChurn(_) => "tcp-churn",
        }
    }
}

impl fmt::Display for Workload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::UdpPingPong(size) => write!(f, "UDP ping-pong {size} B"),
            Self::UdpFlood(size) => write!(f, "UDP throughput {size} B"),
            Self::TcpPingPong(size) => write!(f, "TCP ping-pong {size} B"),
            Self::TcpStream(size) => write!(f, "TCP stream {} KiB writes", size / 1024),
            Self::TcpChurn(size) => write!(f, "TCP churn ({size} B exchange)"),
        }
    }
}

/// What one run of a workload against one server measured.
#[derive(Debug)]
pub enum Outcome {
    /// Round trips.
    Latency(Latency),
    /// A rate.
    Rate(Rate),
}

/// How a row's figure is read off a throughput run.
type Figure = fn(&Rate) -> f64;

/// A row's figure for each server.
struct Row {
    metric: String,
    values: HashMap<Kind, f64>,
    /// Whether a larger figure is better (rates) or worse (latency, memory).
    higher_is_better: bool,
}

/// A figure for a table cell, with as many decimals as its size warrants.
pub fn cell(value: Option<f64>) -> String {
    match value {
        Some(v) if v >= 100.0 => format!("{v:.0}"),
        Some(v) if v >= 10.0 => format!("{v:.1}"),
        Some(v) => format!("{v:.2}"),
        None => "n/a".to_owned(),
    }
}

fn ratio(row: &Row, baseline: Kind) -> String {
    match (row.values.get(&Kind::Wasm), row.values.get(&baseline)) {
        (Some(wasm), Some(base)) if *base > 0.0 => format!("{:.2}×", wasm / base),
        _ => "n/a".to_owned(),
    }
}

fn rows_for(workload: Workload, outcomes: &HashMap<(Workload, Kind), Vec<Outcome>>) -> Vec<Row> {
    let runs = |kind: Kind| {
        outcomes
            .get(&(workload, kind))
            .map_or(&[][..], Vec::as_slice)
    };
    let mut rows = Vec::new();
    match workload {
        Workload::UdpPingPong(_) | Workload::TcpPingPong(_) => {
            let mut sorted: HashMap<Kind, (Vec<u64>, u64)> = HashMap::new();
            for kind in Kind::ALL {
                let mut samples = Vec::new();
                let mut lost = 0;
                for run in runs(kind) {
                    if let Outcome::Latency(latency) = run {
                        samples.extend_from_slice(&latency.samples);
                        lost += latency.lost;
                    }
                }
                samples.sort_unstable();
                sorted.insert(kind, (samples, lost));
            }
            for (name, q) in [("p50 µs", 0.5), ("p99 µs", 0.99), ("p99.9 µs", 0.999)] {
                rows.push(Row {
                    metric: name.to_owned(),
                    values: sorted
                        .iter()
                        .filter_map(|(kind, (s, _))| {
                            quantile(s, q).map(|ns| (*kind, ns as f64 / 1e3))
                        })
                        .collect(),
                    higher_is_better: false,
                });
            }
            rows.push(Row {
                metric: "round trips/s".to_owned(),
                values: sorted
                    .iter()
                    .filter_map(|(kind, (s, _))| {
                        let total: u64 = s.iter().sum();
                        (total > 0).then(|| (*kind, s.len() as f64 / (total as f64 / 1e9)))
                    })
                    .collect(),
                higher_is_better: true,
            });
        }
        Workload::UdpFlood(_) | Workload::TcpStream(_) | Workload::TcpChurn(_) => {
            let median = |kind: Kind, figure: Figure| {
                let mut values: Vec<f64> = runs(kind)
                    .iter()
                    .filter_map(|run| match run {
                        Outcome::Rate(rate) => Some(figure(rate)),
                        Outcome::Latency(_) => None,
                    })
                    .collect();
                values.sort_by(f64::total_cmp);
                values.get(values.len() / 2).copied()
            };
            let figures: Vec<(&str, Figure, bool)> = match workload {
                Workload::UdpFlood(_) => vec![
                    ("k datagrams/s", |r: &Rate| r.per_second() / 1e3, true),
                    ("MiB/s", |r: &Rate| r.mib_per_second(), true),
                    ("loss %", |r: &Rate| r.loss() * 100.0, false),
                ],
                Workload::TcpStream(_) => {
                    vec![("MiB/s echoed", |r: &Rate| r.mib_per_second(), true)]
                }
                _ => vec![("connections/s", |r: &Rate| r.per_second(), true)],
            };
            for (name, figure, higher_is_better) in figures {
                rows.push(Row {
                    metric: name.to_owned(),
                    values: Kind::ALL
                        .iter()
                        .filter_map(|kind| median(*kind, figure).map(|v| (*kind, v)))
                        .collect(),
                    higher_is_better,
                });
            }
        }
    }
    rows
}

/// Prints every table.
pub fn print(
    summary: &str,
    workloads: &[Workload],
    outcomes: &HashMap<(Workload, Kind), Vec<Outcome>>,
    memory: &[(Kind, Memory)],
    plugins: &[Figures],
    native_call: (u64, u64),
) {
    println!();
    println!("{summary}");
    println!();
    println!("## Throughput and latency");
    println!();
    println!(
        "| workload | metric | {} | {} | {} | wasm/native | wasm/tokio |",
        Kind::Wasm,
        Kind::Native,
        Kind::Tokio
    );
    println!("| --- | --- | ---: | ---: | ---: | ---: | ---: |");
    for workload in workloads {
        for row in rows_for(*workload, outcomes) {
            let better = if row.higher_is_better { "↑" } else { "↓" };
            println!(
                "| {workload} | {} {better} | {} | {} | {} | {} | {} |",
                row.metric,
                cell(row.values.get(&Kind::Wasm).copied()),
                cell(row.values.get(&Kind::Native).copied()),
                cell(row.values.get(&Kind::Tokio).copied()),
                ratio(&row, Kind::Native),
                ratio(&row, Kind::Tokio),
            );
        }
        if let Workload::UdpPingPong(_) | Workload::TcpPingPong(_) = workload {
            let rows = rows_for(*workload, outcomes);
            if let Some(p99) = rows.get(1)
                && let (Some(w), Some(n)) =
                    (p99.values.get(&Kind::Wasm), p99.values.get(&Kind::Native))
            {
                println!(
                    "| {workload} | added p99 vs native µs | {:+.1} | | | | |",
                    w - n
                );
            }
        }
    }

    println!();
    println!("## Memory per idle connection (server process RSS delta)");
    println!();
    println!(
        "| server | connections | RSS before MiB | RSS after MiB | KiB per connection ↓ | open+1 exchange each, s | ratio to native | ratio to tokio |"
    );
    println!("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |");
    let per = |kind: Kind| {
        memory
            .iter()
            .find(|(k, _)| *k == kind)
            .map(|(_, m)| m.per_connection())
    };
    for (kind, m) in memory {
        let ratio_to = |base: Kind| match (per(*kind), per(base)) {
            (Some(a), Some(b)) if b > 0.0 => format!("{:.2}×", a / b),
            _ => "n/a".to_owned(),
        };
        println!(
            "| {kind}{} | {} | {:.1} | {:.1} | {:.1} | {:.2} | {} | {} |",
            if *kind == Kind::Wasm {
                " (counter plugin)"
            } else {
                ""
            },
            m.connections,
            m.before as f64 / (1 << 20) as f64,
            m.after as f64 / (1 << 20) as f64,
            m.per_connection() / 1024.0,
            m.open_time.as_secs_f64(),
            ratio_to(Kind::Native),
            ratio_to(Kind::Tokio),
        );
    }
    for (kind, m) in memory {
        if let Some(failure) = &m.failure {
            println!();
            println!("{kind} stopped taking connections: {failure}");
        }
    }

    println!();
    println!("## The echo plugin itself (no sockets)");
    println!();
    println!(
        "| echo in | component KiB | compile + pre-link ms | instantiate p50 / p99 µs | drop p50 / p99 µs | call p50 / p99 µs | memory per live instance KiB |"
    );
    println!("| --- | ---: | ---: | ---: | ---: | ---: | ---: |");
    for f in plugins {
        println!(
            "| {} | {:.0} | {:.0} | {:.1} / {:.1} | {:.1} / {:.1} | {:.2} / {:.2} | {:.0} |",
            f.label,
            f.size as f64 / 1024.0,
            f.compile.as_secs_f64() * 1e3,
            f.instantiate.0 as f64 / 1e3,
            f.instantiate.1 as f64 / 1e3,
            f.teardown.0 as f64 / 1e3,
            f.teardown.1 as f64 / 1e3,
            f.call.0 as f64 / 1e3,
            f.call.1 as f64 / 1e3,
            f.memory / 1024.0,
        );
    }
    println!(
        "| native (NativeEcho, for scale) | | | | | {:.2} / {:.2} | |",
        native_call.0 as f64 / 1e3,
        native_call.1 as f64 / 1e3
    );
    for f in plugins.iter().filter(|f| !f.batched.is_empty()) {
        println!();
        println!(
            "{}: µs per datagram in groups of 32 from 4 peers, by one `on-datagram` call each and by one `udp-batch` call",
            f.label
        );
        println!();
        println!(
            "| datagram | one call each p50 / p99 | one batch call p50 / p99 | batch / one each (p50) |"
        );
        println!("| --- | ---: | ---: | ---: |");
        for cost in &f.batched {
            println!(
                "| {} B | {:.3} / {:.3} | {:.3} / {:.3} | {:.2}× |",
                cost.size,
                cost.single.0 as f64 / 1e3,
                cost.single.1 as f64 / 1e3,
                cost.batch.0 as f64 / 1e3,
                cost.batch.1 as f64 / 1e3,
                cost.batch.0 as f64 / cost.single.0.max(1) as f64,
            );
        }
    }
    for f in plugins {
        if let Some(failure) = &f.call_failure {
            println!();
            println!("{}: {failure}", f.label);
        }
    }
}
