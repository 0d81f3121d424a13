//! Recording, measured (issue 18): the ping-pong latency and the UDP flood
//! rate of the `echo` plugin with its traffic recorded and without, on two
//! servers that differ only in that.
//!
//! Both run in this process on the harness's server runtime, built by
//! [`Server::bind`] from the configuration the other workloads use; the
//! recording one writes to a temporary folder with a small size cap, so
//! the file rotates many times during the run (rotation is on the writer
//! thread, so it must not show in the serving figures). The servers take
//! turns within each round, so drift on a shared machine hits both alike.
//! What the recording wrote, rotated and dropped (its queue full) is read
//! back from the files.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use wasm_echo::recording::RecordSettings;
use wasm_echo::server::{Operations, Server};
use wasm_echo::tenant::Tenant;

use crate::load::{self, Budget, Latency, Rate, Rounds, quantile};
use crate::report::cell;
use crate::targets::{self, Addrs};

/// Bytes per ping-pong message.
const SIZE: usize = 64;
/// The recording's size cap: small, so that it rotates during the run.
const CAP: u64 = 1 << 20;

/// How long recording on and off runs in a full (not `--quick`) round.
pub const RUN: Duration = Duration::from_millis(1_500);

/// One server's figures, over every round.
#[derive(Debug, Default)]
pub struct Side {
    udp: Latency,
    tcp: Latency,
    flood: Vec<Rate>,
    /// Records offered to the writer and dropped, per workload (UDP
    /// ping-pong, TCP ping-pong, UDP flood): only the recording side has any.
    records: [(u64, u64); 3],
}

/// Both servers' figures, and what the recording wrote.
#[derive(Debug)]
pub struct Figures {
    off: Side,
    on: Side,
    sizes: Rounds,
    /// Recording files left (the current one and the rotated ones kept).
    files: usize,
    /// Bytes in them.
    bytes: u64,
}

/// Starts both servers on `servers` and drives them from `clients`.
///
/// # Errors
///
/// A server that does not start, or a client socket that cannot be opened.
pub fn measure(
    servers: &tokio::runtime::Runtime,
    clients: &tokio::runtime::Runtime,
    sizes: Rounds,
) -> anyhow::Result<Figures> {
    let dir = std::env::temp_dir().join(format!("wasm-echo-bench-record-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let path = dir.join("traffic.jsonl");
    let (off, _) = servers.block_on(start(None))?;
    let (on, tenants) = servers.block_on(start(Some(RecordSettings {
        path: path.clone(),
        max_size: CAP,
        keep: RecordSettings::DEFAULT_KEEP,
        sample: 1.0,
    })))?;
    let budget = Budget {
        count: 2_000_000,
        time: sizes.run,
    };
    let mut figures = (Side::default(), Side::default());
    for round in 0..sizes.rounds {
        for turn in 0..2 {
            let recording = (round + turn) % 2 == 1;
            let (addrs, side) = if recording {
                (on, &mut figures.1)
            } else {
                (off, &mut figures.0)
            };
            eprintln!(
                "round {}: recording {}",
                round + 1,
                if recording { "on" } else { "off" }
            );
            clients.block_on(async {
                let before = tally(&tenants);
                let udp = load::udp_ping_pong(addrs.udp, SIZE, budget).await?;
                let after_udp = tally(&tenants);
                let tcp = load::tcp_ping_pong(addrs.tcp, SIZE, budget).await?;
                let after_tcp = tally(&tenants);
                let flood = load::udp_flood(addrs.udp, SIZE, 4, 16, budget).await?;
                let after_flood = tally(&tenants);
                for (slot, (from, to)) in side.records.iter_mut().zip([
                    (before, after_udp),
                    (after_udp, after_tcp),
                    (after_tcp, after_flood),
                ]) {
                    slot.0 += to.0 - from.0;
                    slot.1 += to.1 - from.1;
                }
                side.udp.samples.extend(udp.samples);
                side.udp.lost += udp.lost;
                side.tcp.samples.extend(tcp.samples);
                side.tcp.lost += tcp.lost;
                side.flood.push(flood);
                anyhow::Ok(())
            })?;
        }
    }
    let files: Vec<PathBuf> = std::fs::read_dir(&dir)?
        .filter_map(|entry| entry.ok().map(|entry| entry.path()))
        .collect();
    let bytes = files
        .iter()
        .filter_map(|file| std::fs::metadata(file).ok())
        .map(|meta| meta.len())
        .sum();
    let figures = Figures {
        off: figures.0,
        on: figures.1,
        sizes,
        files: files.len(),
        bytes,
    };
    let _ = std::fs::remove_dir_all(&dir);
    Ok(figures)
}

/// The benchmark's `echo` server, recording with `record` if given, and
/// its tenants (whose recordings [`tally`] reads).
async fn start(record: Option<RecordSettings>) -> anyhow::Result<(Addrs, Vec<Arc<Tenant>>)> {
    let mut config = targets::listener_config("echo", 1_000)?;
    for listener in &mut config.listeners {
        listener.record = record.clone();
    }
    let server = Server::bind(config, Operations::default()).await?;
    let addrs = targets::addrs_of(&server)?;
    let tenants = server.tenants().to_vec();
    tokio::spawn(server.run(std::future::pending()));
    Ok((addrs, tenants))
}

/// Records offered and dropped so far, over every tenant's recording.
fn tally(tenants: &[Arc<Tenant>]) -> (u64, u64) {
    tenants
        .iter()
        .filter_map(|tenant| tenant.recorder())
        .map(|recorder| {
            let tally = recorder.tally();
            (
                tally.offered.load(Ordering::Relaxed),
                tally.dropped.load(Ordering::Relaxed),
            )
        })
        .fold((0, 0), |sum, one| (sum.0 + one.0, sum.1 + one.1))
}

/// p50, p99 and p99.9 in microseconds.
fn percentiles(latency: &Latency) -> [String; 3] {
    let mut sorted = latency.samples.clone();
    sorted.sort_unstable();
    [0.5, 0.99, 0.999].map(|q| {
        quantile(&sorted, q).map_or_else(|| "-".to_owned(), |ns| format!("{:.1}", ns as f64 / 1e3))
    })
}

/// The median round's datagrams a second.
fn median_rate(rates: &[Rate]) -> f64 {
    let mut per_second: Vec<f64> = rates.iter().map(Rate::per_second).collect();
    per_second.sort_by(f64::total_cmp);
    per_second.get(per_second.len() / 2).copied().unwrap_or(0.0)
}

/// Prints the section.
pub fn print(figures: &Figures) {
    println!();
    println!("## Recording on and off");
    println!();
    println!(
        "`echo`, {SIZE} B messages: one ping-pong client per protocol, then 4 UDP clients with 16 \
         datagrams outstanding each; {} round(s) of {} ms per workload and server, taking turns. \
         The recording server records every exchange to a file capped at {} KiB (rotated, {} kept): \
         {} file(s), {} KiB, at the end.",
        figures.sizes.rounds,
        figures.sizes.run.as_millis(),
        CAP >> 10,
        RecordSettings::DEFAULT_KEEP,
        figures.files,
        figures.bytes >> 10
    );
    println!();
    println!(
        "| recording | UDP p50 µs | UDP p99 µs | UDP p99.9 µs | TCP p50 µs | TCP p99 µs | TCP p99.9 µs | lost | UDP flood dgram/s |"
    );
    println!("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |");
    for (label, side) in [("off", &figures.off), ("on", &figures.on)] {
        let [u50, u99, u999] = percentiles(&side.udp);
        let [t50, t99, t999] = percentiles(&side.tcp);
        println!(
            "| {label} | {u50} | {u99} | {u999} | {t50} | {t99} | {t999} | {} | {} |",
            side.udp.lost + side.tcp.lost,
            cell(Some(median_rate(&side.flood))),
        );
    }
    println!();
    println!(
        "Records the recording server offered to its writer, and dropped because the queue was full \
         (the writer runs at the lowest priority and gives way to serving):"
    );
    println!();
    println!("| workload | records | dropped | dropped % |");
    println!("| --- | ---: | ---: | ---: |");
    for (workload, (offered, dropped)) in ["UDP ping-pong", "TCP ping-pong", "UDP flood"]
        .iter()
        .zip(figures.on.records)
    {
        let share = if offered == 0 {
            0.0
        } else {
            dropped as f64 * 100.0 / offered as f64
        };
        println!("| {workload} | {offered} | {dropped} | {share:.1} |");
    }
}
