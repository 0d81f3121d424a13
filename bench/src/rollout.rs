//! Safe rollout, measured (issue 17): the stable version's UDP ping-pong
//! latency with no rollout, during a canary and during shadow mode, on
//! three servers that differ only in that.
//!
//! All three serve the built-in `echo`; the two with a rollout start one
//! from their configuration, as `[listeners.NAME.rollout]` would, with the
//! built-in `hello` as the candidate (it answers every datagram with its
//! greeting, so a reply says which version sent it) and an interval of a
//! day, so no gate moves them during the run. The canary sends half of its
//! peers to the candidate: the probe uses a socket the canary left on the
//! stable version (the first of up to 64 whose reply is an echo), so the
//! figures are the stable version's, with the routing on its path. In
//! shadow mode every datagram is copied to the candidate, which runs on
//! the server's other threads. The servers take turns within each round,
//! so drift on a shared machine hits all alike.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio::net::UdpSocket;
use wasm_echo::plugin::PluginSource;
use wasm_echo::rollout::{Mode, Plan, Settings};
use wasm_echo::server::{Operations, Server};

use crate::load::{Latency, Rounds, nanos, quantile};
use crate::targets;

/// Bytes per ping-pong message.
const SIZE: usize = 64;
/// How long a reply may take before it counts as lost.
const REPLY_TIMEOUT: Duration = Duration::from_millis(200);
/// Sockets tried to find one the canary leaves on the stable version.
const PEERS_TRIED: usize = 64;

/// How long each rollout phase runs in a full (not `--quick`) round.
pub const RUN: Duration = Duration::from_millis(2_000);

/// The three servers' latencies, in the order of [`SIDES`].
#[derive(Debug)]
pub struct Figures {
    sides: [Latency; 3],
    sizes: Rounds,
}

/// The servers compared.
const SIDES: [&str; 3] = ["no rollout", "canary (50%)", "shadow"];

/// Starts the three servers on `servers` and drives them from `clients`.
///
/// # Errors
///
/// A server that does not start, or a client socket that cannot be opened.
pub fn measure(
    servers: &tokio::runtime::Runtime,
    clients: &tokio::runtime::Runtime,
    sizes: Rounds,
) -> anyhow::Result<Figures> {
    let addrs = [
        servers.block_on(start(None))?,
        servers.block_on(start(Some(Mode::Canary)))?,
        servers.block_on(start(Some(Mode::Shadow)))?,
    ];
    let mut sides: [Latency; 3] = Default::default();
    for round in 0..sizes.rounds {
        for turn in 0..SIDES.len() {
            let side = (round + turn) % SIDES.len();
            eprintln!("round {}: rollout bench, {}", round + 1, SIDES[side]);
            let latency = clients.block_on(ping_pong(addrs[side], sizes.run))?;
            sides[side].samples.extend(latency.samples);
            sides[side].lost += latency.lost;
        }
    }
    Ok(Figures { sides, sizes })
}

/// The benchmark's `echo` server, with a rollout of `hello` in `mode`.
async fn start(mode: Option<Mode>) -> anyhow::Result<SocketAddr> {
    let mut config = targets::listener_config("echo", 1_000)?;
    for listener in &mut config.listeners {
        listener.rollout = mode.map(|mode| Plan {
            candidate: PluginSource::Builtin("hello"),
            plugin_config: None,
            settings: Settings {
                mode,
                steps: vec![50, 100],
                interval: Duration::from_secs(24 * 3600),
                ..Settings::default()
            },
        });
    }
    let server = Server::bind(config, Operations::default()).await?;
    let addrs = targets::addrs_of(&server)?;
    tokio::spawn(server.run(std::future::pending()));
    Ok(addrs.udp)
}

/// Ping-pong for `run` from a socket the stable version answers.
async fn ping_pong(server: SocketAddr, run: Duration) -> anyhow::Result<Latency> {
    let request = [b'r'; SIZE];
    let mut reply = vec![0u8; 2048];
    let mut stable = None;
    for _ in 0..PEERS_TRIED {
        let socket = UdpSocket::bind("127.0.0.1:0").await?;
        socket.connect(server).await?;
        socket.send(&request).await?;
        let got = tokio::time::timeout(Duration::from_secs(5), socket.recv(&mut reply))
            .await
            .context("no reply to the first probe")??;
        if reply.get(..got) == Some(&request[..]) {
            stable = Some(socket);
            break;
        }
    }
    let socket = stable.context("no socket on the stable version")?;
    let mut latency = Latency::default();
    let started = Instant::now();
    while started.elapsed() < run {
        let sent = Instant::now();
        socket.send(&request).await?;
        match tokio::time::timeout(REPLY_TIMEOUT, socket.recv(&mut reply)).await {
            Ok(got) => {
                got?;
                latency.samples.push(nanos(sent.elapsed()));
            }
            Err(_) => latency.lost += 1,
        }
    }
    Ok(latency)
}

/// Prints the section.
pub fn print(figures: &Figures) {
    println!();
    println!(
        "Safe rollout: the stable version's UDP ping-pong ({SIZE} B, 1 client), {} round(s) of {} ms per server",
        figures.sizes.rounds,
        figures.sizes.run.as_millis()
    );
    println!();
    println!("| server | p50 µs | p99 µs | round trips | lost |");
    println!("| --- | ---: | ---: | ---: | ---: |");
    for (name, latency) in SIDES.iter().zip(&figures.sides) {
        let mut sorted = latency.samples.clone();
        sorted.sort_unstable();
        let [p50, p99] = [0.5, 0.99].map(|q| {
            quantile(&sorted, q)
                .map_or_else(|| "-".to_owned(), |ns| format!("{:.1}", ns as f64 / 1e3))
        });
        println!(
            "| {name} | {p50} | {p99} | {} | {} |",
            sorted.len(),
            latency.lost
        );
    }
}
