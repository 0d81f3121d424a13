//! `wasm-echo-bench`: measures what the WebAssembly sandbox costs, side by
//! side with the baselines, in one run on one machine.
//!
//! ```sh
//! cargo run --release -p wasm-echo-bench -- [--quick] [--polyglot DIR]
//! ```
//!
//! It starts three servers in this process on 127.0.0.1 ephemeral ports
//! ([`targets`]), drives each with the same workloads from its own load
//! generator ([`load`]), holds thousands of idle connections against each
//! one in a child process to weigh them ([`memory`]), times the plugin
//! itself without sockets ([`plugin`]), and prints Markdown tables with the
//! absolute figures and the ratios to the baselines ([`report`]). Targets
//! take turns within each round, so drift on a shared machine hits them
//! alike.

mod child;
mod cpu;
mod hostile;
mod load;
mod memory;
mod plugin;
mod record;
mod reload;
mod report;
mod rollout;
mod startup;
mod targets;

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::{Parser, Subcommand};
use wasm_echo::plugin::{PluginSource, Runtime};

use load::Budget;
use report::{Outcome, Workload};
use targets::{Addrs, Kind};

/// Benchmarks wasm-echo (echo plugin) against its native-handler path and a
/// plain tokio echo server, on loopback.
#[derive(Debug, Parser)]
#[command(name = "wasm-echo-bench")]
struct Cli {
    /// Run a small version (under 30 s): one round, short runs, 2,000 idle
    /// connections.
    #[arg(long)]
    quick: bool,
    /// Also measure the Python, JavaScript and C echo components in DIR
    /// (as written by `scripts/build-polyglot.sh DIR`).
    #[arg(long, value_name = "DIR")]
    polyglot: Option<PathBuf>,
    /// Idle connections for the memory workload (default 10,000; 2,000
    /// with --quick).
    #[arg(long, value_name = "N")]
    connections: Option<usize>,
    /// Rounds of every workload against every server (default 3; 1 with
    /// --quick). Rates are the median round, so more rounds steady them on
    /// a noisy machine; each round adds about 30 s. The reload part's two
    /// throughput runs last 8 s for each round asked (one by default).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..=50))]
    rounds: Option<u16>,
    /// Run only the parts named (for profiling): udp-ping, udp-flood,
    /// tcp-ping, tcp-stream, tcp-churn, memory, plugin, reload (hot-reload
    /// latency and throughput during swaps), hostile (a good tenant's
    /// latency beside each hostile one; run only when named), record (p99
    /// with recording on and off; run only when named), soak (1,000,000
    /// calls into one instance of each echo component, weighing its memory;
    /// run only when named), rollout (the stable version's latency with no
    /// rollout, during a canary and in shadow mode; run only when named),
    /// startup (start-up to the first reply with an empty and a warm
    /// compiled-code cache, and reloads back to a version already seen; run
    /// only when named; give --polyglot for Python, JavaScript and C), cpu
    /// (server CPU per message and tails against a C epoll server, each
    /// server in a process of its own). Repeatable.
    #[arg(long, value_name = "PART")]
    only: Vec<String>,
    /// The C epoll echo server for the `cpu` part, built by
    /// scripts/build-bench-baseline.sh (which the bench runs itself when
    /// the file is missing) [default: target/bench/epoll-echo].
    #[arg(long, value_name = "FILE")]
    epoll_server: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Child>,
}

#[derive(Debug, Subcommand)]
enum Child {
    /// Internal: serve one target in a process of its own, for the memory
    /// and CPU workloads.
    #[command(hide = true)]
    Server {
        /// Which server.
        #[arg(long, value_enum)]
        kind: Kind,
        /// The plugin wasm-echo runs.
        #[arg(long)]
        plugin: String,
        /// Connections it must accept at once.
        #[arg(long)]
        connections: usize,
    },
}

/// How big a run is.
#[derive(Clone, Copy, Debug)]
struct Plan {
    rounds: usize,
    budget: Budget,
    clients: usize,
    window: u64,
    connections: usize,
    plugin: plugin::Sizes,
}

impl Plan {
    fn new(cli: &Cli) -> Self {
        let (rounds, time, connections, plugin) = if cli.quick {
            let sizes = plugin::Sizes {
                instantiations: 300,
                calls: 5_000,
                live: 100,
            };
            (1, Duration::from_millis(350), 2_000, sizes)
        } else {
            let sizes = plugin::Sizes {
                instantiations: 3_000,
                calls: 50_000,
                live: 500,
            };
            (3, Duration::from_millis(1_500), 10_000, sizes)
        };
        Self {
            rounds: cli.rounds.map_or(rounds, usize::from),
            budget: Budget {
                count: 2_000_000,
                time,
            },
            clients: 4,
            window: 16,
            connections: cli.connections.unwrap_or(connections),
            plugin,
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Some(Child::Server {
            kind,
            plugin,
            connections,
        }) => child::serve(kind, &plugin, connections),
        None => run(&cli),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: &Cli) -> anyhow::Result<()> {
    let started = Instant::now();
    let plan = Plan::new(cli);
    // Idle connections need a descriptor each, here and in the child (which
    // inherits the limit).
    let nofile = rlimit::increase_nofile_limit(u64::MAX)?;
    anyhow::ensure!(
        nofile >= plan.connections as u64 + 500,
        "{} connections need more file descriptors than the limit allows ({nofile}); use --connections",
        plan.connections
    );
    println!(
        "# wasm-echo-bench{}",
        if cli.quick { " --quick" } else { "" }
    );
    println!();
    println!(
        "{} cores; load average at start: {}",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        loadavg()
    );

    // The servers get a runtime of their own, as they would in their own
    // process; the load generator gets another.
    let servers = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("server")
        .enable_all()
        .build()?;
    let clients = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("client")
        .enable_all()
        .build()?;
    let wasm = Runtime::new()?;
    let mut addrs = HashMap::new();
    for kind in Kind::ALL {
        let started = servers.block_on(targets::start(kind, "echo", 1_000))?;
        addrs.insert(kind, started);
    }

    let mut figures = Vec::new();
    let mut sources = vec![("rust".to_owned(), PluginSource::parse("echo")?)];
    if let Some(dir) = &cli.polyglot {
        sources.extend(plugin::polyglot_sources(dir));
    }
    let wanted = |part: &str| cli.only.is_empty() || cli.only.iter().any(|only| only == part);
    if !wanted("plugin") {
        sources.clear();
    }
    for (label, source) in sources {
        eprintln!("plugin: {label}");
        let measured = clients.block_on(plugin::measure(&wasm, &label, source, plan.plugin))?;
        figures.push(measured);
    }
    let native_call = plugin::native_call(plan.plugin.calls);
    let mut soaks = Vec::new();
    if cli.only.iter().any(|only| only == "soak") {
        let calls = if cli.quick { 20_000 } else { 1_000_000 };
        let mut sources = vec![("rust".to_owned(), PluginSource::parse("echo")?)];
        if let Some(dir) = &cli.polyglot {
            sources.extend(plugin::polyglot_sources(dir));
        }
        for (label, source) in sources {
            eprintln!("soak: {calls} calls into one {label} instance");
            soaks.push(clients.block_on(plugin::soak(&wasm, &label, source, calls))?);
        }
    }
    let reloads = if wanted("reload") {
        Some(reload::measure(
            &clients,
            reload::Sizes::new(cli.quick, cli.rounds.map_or(1, u32::from)),
        )?)
    } else {
        None
    };

    let hostile = if cli.only.iter().any(|only| only == "hostile") {
        Some(hostile::measure(&clients, hostile::Sizes::new(cli.quick))?)
    } else {
        None
    };

    let startup_sizes = startup::Sizes::new(cli.quick);
    let startups = if cli.only.iter().any(|only| only == "startup") {
        Some(startup::measure(
            &startup::subjects(cli.polyglot.as_deref()),
            startup_sizes,
        )?)
    } else {
        None
    };

    let recording = if cli.only.iter().any(|only| only == "record") {
        Some(record::measure(
            &servers,
            &clients,
            load::Rounds::new(cli.quick, record::RUN),
        )?)
    } else {
        None
    };

    let cpu = if wanted("cpu") {
        let sizes = cpu::Sizes {
            // Tails need more rounds than rates to settle.
            rounds: if cli.quick { 1 } else { plan.rounds.max(5) },
            time: plan.budget.time,
        };
        Some(cpu::measure(&clients, &epoll_server(cli)?, sizes)?)
    } else {
        None
    };

    let rollouts = if cli.only.iter().any(|only| only == "rollout") {
        Some(rollout::measure(
            &servers,
            &clients,
            load::Rounds::new(cli.quick, rollout::RUN),
        )?)
    } else {
        None
    };

    let workloads: Vec<Workload> = Workload::ALL
        .into_iter()
        .filter(|workload| wanted(workload.part()))
        .collect();
    let mut outcomes: HashMap<(Workload, Kind), Vec<Outcome>> = HashMap::new();
    for round in 0..plan.rounds {
        for &workload in &workloads {
            for turn in 0..Kind::ALL.len() {
                let kind = Kind::ALL[(round + turn) % Kind::ALL.len()];
                eprintln!("round {}: {workload} against {kind}", round + 1);
                let outcome = clients.block_on(drive(workload, addrs[&kind], &plan))?;
                outcomes.entry((workload, kind)).or_default().push(outcome);
            }
        }
    }

    let mut memory = Vec::new();
    for kind in Kind::ALL.into_iter().filter(|_| wanted("memory")) {
        eprintln!(
            "memory: {} idle connections against {kind}",
            plan.connections
        );
        memory.push((kind, memory::idle_connections(kind, plan.connections)?));
    }

    report::print(
        &plan_summary(cli, &plan),
        &workloads,
        &outcomes,
        &memory,
        &figures,
        native_call,
    );
    if let Some(reloads) = &reloads {
        reload::print(reloads);
    }
    if let Some(hostile) = &hostile {
        hostile::print(hostile);
    }
    if let Some(recording) = &recording {
        record::print(recording);
    }
    if let Some(cpu) = &cpu {
        cpu::print(cpu);
    }
    if !soaks.is_empty() {
        plugin::print_soaks(&soaks);
    }
    if let Some(rollouts) = &rollouts {
        rollout::print(rollouts);
    }
    if let Some(startups) = &startups {
        startup::print(startups, startup_sizes);
    }
    println!();
    println!(
        "Finished in {:.0} s; load average at the end: {}",
        started.elapsed().as_secs_f64(),
        loadavg()
    );
    drop(servers);
    Ok(())
}

async fn drive(workload: Workload, addrs: Addrs, plan: &Plan) -> anyhow::Result<Outcome> {
    let budget = plan.budget;
    Ok(match workload {
        Workload::UdpPingPong(size) => {
            Outcome::Latency(load::udp_ping_pong(addrs.udp, size, budget).await?)
        }
        Workload::UdpFlood(size) => Outcome::Rate(
            load::udp_flood(addrs.udp, size, plan.clients, plan.window, budget).await?,
        ),
        Workload::TcpPingPong(size) => {
            Outcome::Latency(load::tcp_ping_pong(addrs.tcp, size, budget).await?)
        }
        Workload::TcpStream(chunk) => {
            Outcome::Rate(load::tcp_stream(addrs.tcp, chunk, plan.clients, budget).await?)
        }
        Workload::TcpChurn(size) => {
            Outcome::Rate(load::tcp_churn(addrs.tcp, size, plan.clients, budget).await?)
        }
    })
}

/// The C baseline's path, built first if it is missing.
fn epoll_server(cli: &Cli) -> anyhow::Result<PathBuf> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let path = cli
        .epoll_server
        .clone()
        .unwrap_or_else(|| root.join("target/bench/epoll-echo"));
    if !path.exists() {
        eprintln!("cpu: building the C baseline into {}", path.display());
        let status = std::process::Command::new(root.join("scripts/build-bench-baseline.sh"))
            .arg(&path)
            .status()
            .context("running scripts/build-bench-baseline.sh")?;
        anyhow::ensure!(
            status.success(),
            "scripts/build-bench-baseline.sh failed ({status})"
        );
    }
    Ok(path)
}

fn plan_summary(cli: &Cli, plan: &Plan) -> String {
    format!(
        "{} round(s) of {} ms per workload and server; {} concurrent clients for throughput and churn, \
         {} datagrams outstanding per UDP client; 1 client for ping-pong; {} idle connections; {}",
        plan.rounds,
        plan.budget.time.as_millis(),
        plan.clients,
        plan.window,
        plan.connections,
        match &cli.polyglot {
            Some(dir) => format!("polyglot components from {}", dir.display()),
            None => "Rust echo component only".to_owned(),
        }
    )
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|text| {
            text.split_whitespace()
                .take(3)
                .collect::<Vec<_>>()
                .join(" ")
        })
        .unwrap_or_else(|_| "unknown".to_owned())
}
