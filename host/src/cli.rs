//! The command line: `serve`, `client`, `check`, `reload`, `status` and
//! `new`. Parsing is clap's; each verb hands off to its module at once.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand, ValueEnum};
use tokio::signal::unix::{Signal, SignalKind, signal};
use tokio_util::sync::CancellationToken;

use crate::client::{self, Exchange};
use crate::config::{
    Origin, RawConfig, RawListener, ServerConfig, check_max_plugin_size, parse_address, parse_size,
};
use crate::control;
use crate::framing::Framing;
use crate::logging::{self, LogFormat};
use crate::plugin::{DEFAULT_MAX_PLUGIN_SIZE, PluginSource, Runtime};
use crate::server::{DEFAULT_PORT, Operations, Server};

/// A UDP and TCP server whose every response is decided by a sandboxed
/// WebAssembly component.
#[derive(Debug, Parser)]
#[command(name = "wasm-echo", version, about)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve UDP and TCP with a plugin (default: the built-in `hello` on
    /// 0.0.0.0:12345, as in the tutorial).
    Serve(Box<ServeArgs>),
    /// Send one message, print the reply, then send `exit` (the tutorial's
    /// clients).
    Client(ClientArgs),
    /// Check that a plugin loads and fits the wasm-echo:plugin world; print
    /// what it imports and exports. With --config, check a whole
    /// configuration file without serving it.
    Check(CheckArgs),
    /// Ask a running server to reload plugins: from their files, or from a
    /// new plugin. Nothing changes if the new version fails to load.
    Reload(ReloadArgs),
    /// Show a running server's listeners, plugin versions, rates and errors,
    /// read from its `/metrics` (serve --metrics).
    Status(StatusArgs),
    /// Create a plugin project in Rust, Python, JavaScript or C that builds
    /// (with its build.sh) and passes `check` as it is.
    New(NewArgs),
    /// Roll a candidate plugin out on a running server's listener, gated
    /// on its failures, latency and (shadow) differing replies: start,
    /// status, promote, abort.
    #[command(subcommand)]
    Rollout(RolloutCommand),
    /// Replay a recording (serve --record) into a plugin, in process and
    /// without sockets, and compare its replies with the recorded ones;
    /// exit status 1 when more than --max-diff differ.
    Replay(ReplayArgs),
    /// Publish a component to an OCI registry (CNCF Wasm layout) under a
    /// tag, and print the reference pinned to its digest.
    Push(PushArgs),
    /// Fetch a plugin from an OCI registry into the cache ahead of time,
    /// verified, compile it into the compiled-code cache (so that a server
    /// swapping to it later only loads it), and print its digest and where
    /// it is kept.
    Pull(PullArgs),
}

/// How `check`, `push` and `pull` reach registries (`serve` reads the same
/// from its flags or configuration file).
#[derive(Debug, Args)]
struct RegistryArgs {
    /// A registry (HOST:PORT) to reach over plain HTTP instead of HTTPS
    /// (repeatable); loopback registries always are.
    #[arg(long = "insecure-registry", value_name = "HOST:PORT")]
    insecure_registries: Vec<String>,
    /// A docker config.json holding registry credentials (`auths`); or set
    /// WASM_ECHO_REGISTRY_USERNAME and WASM_ECHO_REGISTRY_PASSWORD.
    #[arg(long, value_name = "FILE")]
    registry_auth: Option<PathBuf>,
    /// Where fetched plugins are kept [default: $XDG_CACHE_HOME/wasm-echo
    /// or ~/.cache/wasm-echo].
    #[arg(long, value_name = "DIR")]
    cache_dir: Option<PathBuf>,
}

impl RegistryArgs {
    /// A runtime that reaches registries as these flags say.
    fn runtime(&self, max_plugin_size: u64) -> anyhow::Result<Runtime> {
        let dir = match &self.cache_dir {
            Some(dir) => dir.clone(),
            None => crate::cache::CacheDir::default_path()
                .context("the environment names no home directory: set --cache-dir")?,
        };
        let cache = crate::cache::CacheDir::open(&dir)?;
        let mut runtime =
            Runtime::with_cache(crate::plugin::PoolSize::default(), Some(cache.clone()))?;
        runtime.set_max_plugin_size(max_plugin_size);
        runtime.set_registry(crate::registry::access(
            &self.insecure_registries,
            self.registry_auth.as_deref(),
            Some(&cache),
        )?);
        Ok(runtime)
    }
}

#[derive(Debug, Args)]
struct PushArgs {
    /// The component to publish; it must load as a wasm-echo plugin.
    file: PathBuf,
    /// Where: oci://HOST[:PORT]/REPOSITORY:TAG.
    #[arg(value_name = "REFERENCE")]
    reference: String,
    #[command(flatten)]
    registry: RegistryArgs,
}

#[derive(Debug, Args)]
struct PullArgs {
    /// oci://HOST[:PORT]/REPOSITORY@sha256:DIGEST, or :TAG.
    #[arg(value_name = "REFERENCE")]
    reference: String,
    #[command(flatten)]
    registry: RegistryArgs,
}

#[derive(Debug, Args)]
struct ReplayArgs {
    /// The recording's files, oldest first (rotated ones: FILE.2 FILE.1
    /// FILE).
    #[arg(value_name = "RECORDING", required = true)]
    recordings: Vec<PathBuf>,
    /// The new version: a built-in's name or a .wasm component's path.
    #[arg(long, value_name = "NAME|PATH")]
    plugin: String,
    /// The version that was recorded (or any reference): exchanges it does
    /// not reproduce either (a time, a random value in the reply) are
    /// reported as noisy, not as differences.
    #[arg(long, value_name = "NAME|PATH")]
    baseline: Option<String>,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
    /// Exit with status 1 when more exchanges than this differ (noisy ones
    /// do not count).
    #[arg(long, value_name = "N", default_value_t = 0)]
    max_diff: usize,
    /// How many differences to show per listener.
    #[arg(long, value_name = "N", default_value_t = 3)]
    examples: usize,
    /// A setting the plugin reads with `get-config`, over the recorded
    /// ones (repeatable).
    #[arg(long = "plugin-config", value_name = "KEY=VALUE", value_parser = parse_setting)]
    settings: Vec<(String, String)>,
}

#[derive(Debug, Args)]
struct ServeArgs {
    /// Serve the listeners described in this TOML file (see
    /// wasm-echo.example.toml) instead of one plugin given by flags.
    #[arg(long, value_name = "FILE", conflicts_with_all = [
        "plugin", "udp", "tcp", "settings", "call_timeout", "memory_limit", "framing", "max_message", "grace", "drain_delay",
        "max_plugin_size", "record", "record_max_size", "record_sample", "allow_tags",
        "tag_poll_interval", "insecure_registries", "registry_auth",
    ])]
    config: Option<PathBuf>,
    /// Serve Prometheus metrics at http://ADDR/metrics (port 0: any free
    /// port, printed as `listening metrics ADDR`).
    #[arg(long, value_name = "ADDR", value_parser = parse_address)]
    metrics: Option<SocketAddr>,
    /// Log lines as human-readable text or as one JSON object per line.
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    /// Reload a listener's plugin when its file changes (written in place
    /// or renamed over). After `wasm-echo reload --plugin`, the new file is
    /// watched instead (none for a built-in). SIGHUP and `wasm-echo reload`
    /// work either way.
    #[arg(long)]
    watch: bool,
    /// The control socket `wasm-echo reload` talks to [default:
    /// $XDG_RUNTIME_DIR/wasm-echo/serve-PID.sock (FILE-PID.sock with
    /// --config FILE.toml), or /tmp/wasm-echo-UID/ without
    /// $XDG_RUNTIME_DIR].
    #[arg(long, value_name = "PATH")]
    control: Option<PathBuf>,
    /// The plugin: a built-in's name (hello, echo, counter), the path of a
    /// .wasm component, or oci://HOST[:PORT]/REPOSITORY@sha256:DIGEST.
    #[arg(long, value_name = "NAME|PATH|REF")]
    plugin: Option<String>,
    /// Accept an oci:// plugin reference by tag (:TAG), and follow the tag:
    /// when it moves, reload to the digest it points to.
    #[arg(long)]
    allow_tags: bool,
    /// How often a followed tag is asked about [default: 30s].
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    tag_poll_interval: Option<Duration>,
    /// A registry (HOST:PORT) to reach over plain HTTP instead of HTTPS
    /// (repeatable); loopback registries always are.
    #[arg(long = "insecure-registry", value_name = "HOST:PORT")]
    insecure_registries: Vec<String>,
    /// A docker config.json holding registry credentials (`auths`); or set
    /// WASM_ECHO_REGISTRY_USERNAME and WASM_ECHO_REGISTRY_PASSWORD.
    #[arg(long, value_name = "FILE")]
    registry_auth: Option<PathBuf>,
    /// Serve UDP on this IP address and port (port 0: any free port).
    /// Without --udp and --tcp both are served on 0.0.0.0:12345; with only
    /// one of them, only that one.
    #[arg(long, value_name = "ADDR", value_parser = parse_address)]
    udp: Option<SocketAddr>,
    /// Serve TCP on this IP address and port (see --udp).
    #[arg(long, value_name = "ADDR", value_parser = parse_address)]
    tcp: Option<SocketAddr>,
    /// A setting the plugin reads with `get-config` (repeatable), e.g.
    /// `--plugin-config udp-greeting=Hi`.
    #[arg(long = "plugin-config", value_name = "KEY=VALUE", value_parser = parse_setting)]
    settings: Vec<(String, String)>,
    /// How long one plugin call may run before it is stopped and its
    /// message fails [default: 100ms].
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    call_timeout: Option<Duration>,
    /// How much linear memory one plugin instance may use [default: 64MiB].
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    memory_limit: Option<usize>,
    /// How the TCP byte stream is cut into messages: `raw` (each chunk as
    /// read, as in the tutorial), `lines` (`\n`-terminated) or
    /// `length-prefixed` (big-endian u32 length, then the bytes)
    /// [default: raw].
    #[arg(long, value_enum)]
    framing: Option<Framing>,
    /// The longest TCP message a peer may send in `lines` or
    /// `length-prefixed` mode; a longer one closes its connection
    /// [default: 1MiB].
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    max_message: Option<usize>,
    /// How long open TCP connections may go on after their listener stops
    /// (on Ctrl-C, SIGTERM or the plugin's `exit`) [default: 5s].
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    grace: Option<Duration>,
    /// After Ctrl-C or SIGTERM, how long to go on serving with `/readyz`
    /// answering 503 before no longer accepting, so that a load balancer
    /// takes the server out first; a second signal ends it [default: 0s].
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    drain_delay: Option<Duration>,
    /// The largest plugin file read, here and on reloads; a larger one is
    /// refused unread [default: 128MiB].
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    max_plugin_size: Option<usize>,
    /// Where fetched and compiled plugins are kept between runs; it must
    /// belong to this user and be writable by no one else [default:
    /// $XDG_CACHE_HOME/wasm-echo or ~/.cache/wasm-echo].
    #[arg(long, value_name = "DIR")]
    cache_dir: Option<PathBuf>,
    /// Record every exchange (datagrams, TCP messages, the plugin's
    /// decisions) to this file, as JSON lines, for `wasm-echo replay`;
    /// mode 0600, rotated at --record-max-size.
    #[arg(long, value_name = "FILE")]
    record: Option<PathBuf>,
    /// Rotate the recording to FILE.1 when it reaches this size (4 older
    /// files are kept) [default: 64MiB].
    #[arg(long, value_name = "SIZE", value_parser = parse_size, requires = "record")]
    record_max_size: Option<usize>,
    /// Record only this share of datagrams and TCP connections, above 0 and
    /// up to 1 [default: 1].
    #[arg(long, value_name = "RATE", requires = "record")]
    record_sample: Option<f64>,
}

impl ServeArgs {
    /// The configuration the flags describe, as given: one listener,
    /// `main`, resolved and checked exactly as a file's would be.
    fn into_raw(self) -> RawConfig {
        let (udp, tcp) = match (self.udp, self.tcp) {
            (None, None) => {
                let all: SocketAddr = ([0, 0, 0, 0], DEFAULT_PORT).into();
                (Some(all), Some(all))
            }
            addrs => addrs,
        };
        let listener = RawListener {
            plugin: self.plugin.unwrap_or_else(|| "hello".to_owned()),
            plugin_config: self.settings.into_iter().collect(),
            udp,
            tcp,
            framing: self.framing,
            max_message: self.max_message,
            call_timeout: self.call_timeout,
            memory_limit: self.memory_limit,
            record: self.record,
            record_max_size: self.record_max_size,
            record_sample: self.record_sample,
            allow_tags: Some(self.allow_tags),
            tag_poll_interval: self.tag_poll_interval,
            ..RawListener::default()
        };
        RawConfig {
            grace: self.grace,
            drain_delay: self.drain_delay,
            max_plugin_size: self.max_plugin_size,
            cache_dir: self.cache_dir,
            insecure_registries: Some(self.insecure_registries),
            registry_auth: self.registry_auth,
            listeners: [("main".to_owned(), listener)].into(),
        }
    }
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Protocol {
    Udp,
    Tcp,
}

#[derive(Debug, Args)]
struct ClientArgs {
    /// Which client.
    protocol: Protocol,
    /// The server's HOST:PORT.
    #[arg(default_value = "127.0.0.1:12345")]
    addr: String,
    /// What to send (default: the tutorial's "Hello, server!" for UDP,
    /// "hello, server" for TCP).
    message: Option<String>,
    /// Do not send `exit` after the reply (leave the server running).
    #[arg(long)]
    no_exit: bool,
    /// How TCP messages are cut, as the listener's `--framing` says:
    /// `raw` (as they are), `lines` (each ends with `\n`) or
    /// `length-prefixed` (a big-endian u32 length first) [default: raw].
    #[arg(long, value_enum)]
    framing: Option<Framing>,
    /// How long to wait for the connection and for the reply.
    #[arg(long, value_name = "DURATION", default_value = "2s", value_parser = humantime::parse_duration)]
    timeout: Duration,
}

#[derive(Debug, Args)]
struct StatusArgs {
    /// The server's metrics address (as given to `serve --metrics`).
    #[arg(default_value = "127.0.0.1:9100")]
    addr: String,
    /// How long to watch before computing rates: the metrics are read
    /// twice, this far apart.
    #[arg(long, value_name = "DURATION", default_value = "1s", value_parser = humantime::parse_duration)]
    interval: Duration,
}

#[derive(Debug, Args)]
struct ReloadArgs {
    /// The new plugin: a built-in's name, a .wasm component's path or an
    /// oci:// reference [default: each listener's own source, read again].
    #[arg(long, value_name = "NAME|PATH|REF")]
    plugin: Option<String>,
    /// Reload only this listener [default: all of them].
    #[arg(long, value_name = "NAME")]
    listener: Option<String>,
    /// The server's control socket (as given to `serve --control`)
    /// [default: the one server running, found in $XDG_RUNTIME_DIR/wasm-echo/
    /// or /tmp/wasm-echo-UID/].
    #[arg(long, value_name = "PATH")]
    control: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
enum RolloutCommand {
    /// Run a candidate beside a listener's stable version; the gates
    /// promote it or roll it back.
    Start(RolloutStartArgs),
    /// Show each rollout's mode, step, weight and gate figures (the last
    /// one, once it has ended).
    Status(RolloutTarget),
    /// Promote the candidate now, whatever its step.
    Promote(RolloutTarget),
    /// Send all traffic back to the stable version now.
    Abort(RolloutTarget),
}

#[derive(Debug, Args)]
struct RolloutStartArgs {
    /// The listener to roll the candidate out on.
    listener: String,
    /// The candidate: a built-in's name or a .wasm component's path.
    #[arg(long, value_name = "NAME|PATH")]
    plugin: String,
    /// canary: a share of the traffic, raised in steps; shadow: a copy of
    /// every message, replies compared and never sent [default: canary].
    #[arg(long)]
    mode: Option<crate::rollout::Mode>,
    /// The candidate's share at each step, in percent, rising to 100
    /// [default: 10,25,50,100].
    #[arg(long, value_delimiter = ',', value_name = "PERCENT,...")]
    steps: Option<Vec<u8>>,
    /// How long each step is watched before the gates judge it [default: 30s].
    #[arg(long, value_name = "DURATION")]
    interval: Option<String>,
    /// Candidate calls an interval needs before it is judged [default: 100].
    #[arg(long, value_name = "N")]
    min_calls: Option<u64>,
    /// The candidate's largest failure rate (traps, deadline and memory
    /// kills per call) that passes, from 0 to 1 [default: 0.01].
    #[arg(long, value_name = "RATE")]
    max_failure_rate: Option<f64>,
    /// The largest candidate call-time p99 that passes, as a multiple of the
    /// stable version's [default: 2].
    #[arg(long, value_name = "RATIO")]
    max_p99_ratio: Option<f64>,
    /// Shadow mode: the largest share of differing replies that passes,
    /// from 0 to 1 [default: 0.01].
    #[arg(long, value_name = "RATE")]
    max_diff_rate: Option<f64>,
    /// Failed judgements in a row that roll the candidate back [default: 3].
    #[arg(long, value_name = "N")]
    failure_limit: Option<u32>,
    /// A setting for the candidate's plugin (repeat it); without any, the
    /// candidate gets the listener's own settings.
    #[arg(long = "plugin-config", value_name = "KEY=VALUE", value_parser = parse_setting)]
    plugin_config: Vec<(String, String)>,
    /// The server's control socket [default: the one server running].
    #[arg(long, value_name = "PATH")]
    control: Option<PathBuf>,
}

#[derive(Debug, Args)]
struct RolloutTarget {
    /// The listener [status: default all of them].
    listener: Option<String>,
    /// The server's control socket [default: the one server running].
    #[arg(long, value_name = "PATH")]
    control: Option<PathBuf>,
}

#[derive(Debug, Args)]
struct CheckArgs {
    /// A built-in's name, the path of a .wasm component, or an oci://
    /// reference (fetched through the cache).
    #[arg(value_name = "NAME|PATH|REF", required_unless_present = "config")]
    plugin: Option<String>,
    /// Check a configuration file instead, as `serve --config` would before
    /// binding: every key, and every listener's plugin loaded and started
    /// with its settings and limits. Nothing is bound.
    #[arg(long, value_name = "FILE", conflicts_with_all = ["plugin", "max_plugin_size"])]
    config: Option<PathBuf>,
    /// The largest plugin file read [default: 128MiB].
    #[arg(long, value_name = "SIZE", value_parser = parse_plugin_size)]
    max_plugin_size: Option<u64>,
    #[command(flatten)]
    registry: RegistryArgs,
}

#[derive(Debug, Args)]
struct NewArgs {
    /// The plugin's language.
    #[arg(long, value_enum)]
    lang: crate::scaffold::Language,
    /// The plugin's name: lowercase letters, digits, `-` and `_`; it names
    /// the project and the .wasm it builds.
    name: String,
    /// Where to create the project [default: ./NAME]; it must not exist or
    /// be empty.
    #[arg(long, value_name = "DIR")]
    dir: Option<PathBuf>,
}

/// How long the runtime's tasks get to stop once the command is done; a
/// thread stuck in a system call is then left behind, not waited for.
const RUNTIME_SHUTDOWN: Duration = Duration::from_secs(1);

/// How long past the grace period a shutdown may take before the server
/// gives up on whatever is still running and exits anyway.
const SHUTDOWN_OVERRUN: Duration = Duration::from_secs(5);

/// Runs the parsed command and returns the process's exit code.
///
/// # Errors
///
/// Anything that should end the process with a one-line error.
pub fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    // The log writer outlives the runtime, so the last lines (listeners
    // stopping) are written if stderr takes them.
    let logs = match &cli.command {
        Command::Serve(args) => Some(logging::init(args.log_format)),
        _ => None,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let report_drops = logs.as_ref().map(logging::Logs::report_drops);
    let outcome = runtime.block_on(async move {
        match cli.command {
            Command::Serve(args) => {
                if let Some(report_drops) = report_drops {
                    tokio::spawn(report_drops);
                }
                serve(*args).await
            }
            Command::Client(args) => client(args).await,
            Command::Check(args) => check(args).await,
            Command::Reload(args) => reload(args).await,
            Command::Status(args) => {
                say(crate::status::status(&args.addr, args.interval).await?)?;
                Ok(ExitCode::SUCCESS)
            }
            Command::New(args) => new(args.lang, &args.name, args.dir.as_deref()),
            Command::Replay(args) => replay(args).await,
            Command::Rollout(command) => rollout(command).await,
            Command::Push(args) => push(args).await,
            Command::Pull(args) => pull(args).await,
        }
    });
    // Dropping the runtime would wait for every task and blocking thread;
    // nothing left at this point may keep the process from exiting.
    runtime.shutdown_timeout(RUNTIME_SHUTDOWN);
    if let Some(logs) = logs {
        logs.finish();
    }
    outcome
}

/// Writes `text` to stdout. A reader that has gone away (`| head`) is not
/// an error: there is nobody left to tell. Unlike `print!`, which panics.
///
/// # Errors
///
/// Any other write error.
pub(crate) fn say(text: impl std::fmt::Display) -> anyhow::Result<()> {
    use std::io::Write as _;
    let mut out = std::io::stdout().lock();
    match write!(out, "{text}").and_then(|()| out.flush()) {
        Err(error) if error.kind() != std::io::ErrorKind::BrokenPipe => {
            Err(anyhow::Error::from(error).context("writing to stdout"))
        }
        _ => Ok(()),
    }
}

async fn serve(mut args: ServeArgs) -> anyhow::Result<ExitCode> {
    let operations = Operations {
        metrics: args.metrics,
        control: args.control.take(),
        control_socket: true,
        watch: args.watch,
        reload_on_sighup: true,
    };
    let config = match args.config.take() {
        Some(path) => {
            let mut config = ServerConfig::from_file(&path)?;
            // The one flag a file's settings give way to: where a machine
            // keeps its cache is the machine's business, not the file's.
            if let Some(dir) = args.cache_dir.take() {
                config.cache_dir = Some(dir);
            }
            config
        }
        None => args.into_raw().resolve(Origin::Flags)?,
    };
    // Registered before the server announces itself, so that an early
    // signal is never the default, fatal one.
    let interrupt = signal(SignalKind::interrupt()).context("listening for Ctrl-C")?;
    let terminate = signal(SignalKind::terminate()).context("listening for SIGTERM")?;
    // The overrun watch starts at the signal: the drain delay comes first.
    let (grace, drain_delay) = (config.grace, config.drain_delay);
    let server = Server::bind(config, operations).await?;
    let (shutdown, abort) = (CancellationToken::new(), CancellationToken::new());
    tokio::spawn(stop_on_signals(
        interrupt,
        terminate,
        drain_delay,
        shutdown.clone(),
        abort.clone(),
    ));
    // Scripts and tests read these lines to learn the real ports, and take
    // them to mean "ready": they are printed once the server has started
    // and `/readyz` says so. Nobody reading them any more is no reason to
    // stop serving.
    let mut announce = server
        .local_addrs()
        .into_iter()
        .map(|(name, protocol, addr)| format!("listening {protocol} {addr} {name}\n"))
        .collect::<String>();
    if let Some(addr) = server.metrics_addr() {
        announce.push_str(&format!("listening metrics {addr}\n"));
    }
    let serving = server.start()?;
    if let Err(error) = say(announce) {
        tracing::warn!("{error:#}");
    }
    let serving = serving.serve_until(
        shutdown.clone().cancelled_owned(),
        abort.clone().cancelled_owned(),
    );
    tokio::select! {
        () = serving => Ok(ExitCode::SUCCESS),
        () = overrun(shutdown, abort, drain_delay + grace) => {
            tracing::error!(
                "shutdown took {} past the grace period: exiting without waiting for the rest",
                humantime::format_duration(SHUTDOWN_OVERRUN)
            );
            Ok(ExitCode::FAILURE)
        }
    }
}

/// The first Ctrl-C or SIGTERM shuts down gracefully (drain delay, then
/// grace period); a second one ends both at once. (Both are registered
/// before the server announces itself, so an early signal is never the
/// default, fatal one.)
async fn stop_on_signals(
    mut interrupt: Signal,
    mut terminate: Signal,
    drain_delay: Duration,
    shutdown: CancellationToken,
    abort: CancellationToken,
) {
    // Each token is cancelled before the line about it is logged: nothing
    // the log does may stand between a signal and what it asks for.
    wait_for_signal(&mut interrupt, &mut terminate).await;
    shutdown.cancel();
    if drain_delay.is_zero() {
        tracing::info!(
            "shutting down: no new connections; open ones may finish (a second signal closes them now)"
        );
    } else {
        tracing::info!(
            "shutting down: draining, /readyz answers 503; serving on for {} (drain-delay), then no new connections; open ones may finish (a second signal closes them now)",
            humantime::format_duration(drain_delay)
        );
    }
    wait_for_signal(&mut interrupt, &mut terminate).await;
    abort.cancel();
    tracing::info!("second signal: closing open connections now");
}

/// Completes [`SHUTDOWN_OVERRUN`] after the drain delay and grace period
/// (`grace`, both together) of a shutdown, or after a second signal cut
/// them short: the last resort against anything that would keep the
/// process from exiting.
async fn overrun(shutdown: CancellationToken, abort: CancellationToken, grace: Duration) {
    shutdown.cancelled().await;
    tokio::select! {
        () = tokio::time::sleep(grace) => {}
        () = abort.cancelled() => {}
    }
    tokio::time::sleep(SHUTDOWN_OVERRUN).await;
}

async fn reload(args: ReloadArgs) -> anyhow::Result<ExitCode> {
    let path = match args.control {
        Some(path) => path,
        None => control::find()?,
    };
    // A path is the caller's: resolved here, where it was typed, not in the
    // server's working directory.
    let plugin = match args
        .plugin
        .as_deref()
        .map(PluginSource::parse)
        .transpose()?
    {
        Some(PluginSource::File(file)) => Some(
            std::path::absolute(&file)
                .with_context(|| format!("resolving {}", file.display()))?
                .to_string_lossy()
                .into_owned(),
        ),
        Some(PluginSource::Builtin(name)) => Some(name.to_owned()),
        Some(PluginSource::Oci(reference)) => Some(reference.to_string()),
        None => None,
    };
    let request = control::Request::Reload {
        listener: args.listener,
        plugin,
    };
    let response = control::send(&path, &request).await?;
    match response.error {
        Some(error) if !response.ok => anyhow::bail!("reload failed, nothing changed: {error}"),
        _ => {
            for swap in response.swaps {
                say(format_args!("{swap}\n"))?;
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// `wasm-echo rollout`: sends the request, prints each rollout's line.
async fn rollout(command: RolloutCommand) -> anyhow::Result<ExitCode> {
    let need = |listener: Option<String>| {
        listener.ok_or_else(|| {
            anyhow::anyhow!("name the listener: wasm-echo rollout promote|abort LISTENER")
        })
    };
    let (control, request) = match command {
        RolloutCommand::Start(args) => {
            // A path is the caller's: resolved here, where it was typed.
            let candidate = match PluginSource::parse(&args.plugin)? {
                PluginSource::File(file) => std::path::absolute(&file)
                    .with_context(|| format!("resolving {}", file.display()))?
                    .to_string_lossy()
                    .into_owned(),
                PluginSource::Builtin(name) => name.to_owned(),
                PluginSource::Oci(reference) => reference.to_string(),
            };
            let plan = crate::rollout::RawRollout {
                candidate,
                mode: args.mode,
                steps: args.steps,
                interval: args.interval,
                min_calls: args.min_calls,
                max_failure_rate: args.max_failure_rate,
                max_p99_ratio: args.max_p99_ratio,
                max_diff_rate: args.max_diff_rate,
                failure_limit: args.failure_limit,
                plugin_config: (!args.plugin_config.is_empty())
                    .then(|| args.plugin_config.into_iter().collect()),
            };
            let request = control::Request::RolloutStart {
                listener: args.listener,
                plan,
            };
            (args.control, request)
        }
        RolloutCommand::Status(target) => (
            target.control,
            control::Request::RolloutStatus {
                listener: target.listener,
            },
        ),
        RolloutCommand::Promote(target) => (
            target.control,
            control::Request::RolloutPromote {
                listener: need(target.listener)?,
            },
        ),
        RolloutCommand::Abort(target) => (
            target.control,
            control::Request::RolloutAbort {
                listener: need(target.listener)?,
            },
        ),
    };
    let path = match control {
        Some(path) => path,
        None => control::find()?,
    };
    let response = control::send(&path, &request).await?;
    match response.error {
        Some(error) if !response.ok => anyhow::bail!("rollout: {error}"),
        _ => {
            if response.rollouts.is_empty() {
                say("no rollout has run\n")?;
            }
            for rollout in response.rollouts {
                say(format_args!("{rollout}\n"))?;
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// `wasm-echo replay`: replays, prints the report, and gates on
/// `--max-diff`.
async fn replay(args: ReplayArgs) -> anyhow::Result<ExitCode> {
    let options = crate::replay::Options {
        recordings: args.recordings,
        plugin: PluginSource::parse(&args.plugin)?,
        baseline: args
            .baseline
            .as_deref()
            .map(PluginSource::parse)
            .transpose()?,
        settings: args.settings,
        examples: args.examples,
    };
    let report = crate::replay::replay(&options).await?;
    if args.json {
        say(format_args!(
            "{}\n",
            crate::replay::report::json(&report, args.max_diff)
        ))?;
    } else {
        say(crate::replay::report::text(&report, args.max_diff))?;
    }
    Ok(if report.regressions() > args.max_diff {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

/// `wasm-echo new`: creates the project and says what to do next.
fn new(
    lang: crate::scaffold::Language,
    name: &str,
    dir: Option<&std::path::Path>,
) -> anyhow::Result<ExitCode> {
    let dir = crate::scaffold::create(lang, name, dir)?;
    let shown = dir.display();
    say(format_args!(
        "created the {lang} plugin `{name}` in {shown}\n\
         next:\n  \
         cd {shown} && ./build.sh             # writes {name}.wasm\n  \
         wasm-echo check {name}.wasm\n  \
         wasm-echo serve --plugin {name}.wasm\n"
    ))?;
    Ok(ExitCode::SUCCESS)
}

async fn client(args: ClientArgs) -> anyhow::Result<ExitCode> {
    let default = match args.protocol {
        Protocol::Udp => client::UDP_MESSAGE,
        Protocol::Tcp => client::TCP_MESSAGE,
    };
    let framing = match (args.protocol, args.framing) {
        (Protocol::Udp, Some(framing)) if framing != Framing::Raw => {
            anyhow::bail!("--framing is for tcp: a datagram is one message already")
        }
        (_, framing) => framing.unwrap_or_default(),
    };
    let exchange = Exchange {
        addr: args.addr,
        framing,
        message: args
            .message
            .unwrap_or_else(|| default.to_owned())
            .into_bytes(),
        send_exit: !args.no_exit,
        timeout: args.timeout,
    };
    let reply = match args.protocol {
        Protocol::Udp => client::udp(&exchange).await?,
        Protocol::Tcp => client::tcp(&exchange).await?,
    };
    say(format_args!("{}\n", String::from_utf8_lossy(&reply)))?;
    Ok(ExitCode::SUCCESS)
}

async fn check(args: CheckArgs) -> anyhow::Result<ExitCode> {
    if let Some(path) = &args.config {
        say(crate::check::check_config(path).await?)?;
        return Ok(ExitCode::SUCCESS);
    }
    // clap asks for a plugin whenever --config is missing.
    let plugin = args.plugin.context("no plugin to check")?;
    let source = PluginSource::parse(&plugin)?;
    let max = args.max_plugin_size.unwrap_or(DEFAULT_MAX_PLUGIN_SIZE);
    let runtime = match &source {
        PluginSource::Oci(_) => args.registry.runtime(max)?,
        _ => {
            let cache = crate::cache::CacheDir::open_default();
            let mut runtime = Runtime::with_cache(crate::plugin::PoolSize::default(), cache)?;
            runtime.set_max_plugin_size(max);
            runtime
        }
    };
    say(crate::check::check(&runtime, &source).await?)?;
    Ok(ExitCode::SUCCESS)
}

/// `wasm-echo push`: checks the file loads as a plugin, publishes it, and
/// prints the reference to pin.
async fn push(args: PushArgs) -> anyhow::Result<ExitCode> {
    let reference = crate::registry::OciReference::parse(&args.reference)?;
    if reference.tag().is_none() {
        anyhow::bail!(
            "{reference}: push to a tag (oci://HOST[:PORT]/REPOSITORY:TAG); the digest is printed once it is there"
        );
    }
    let runtime = args.registry.runtime(DEFAULT_MAX_PLUGIN_SIZE)?;
    let source = PluginSource::File(args.file.clone());
    // A file that would not serve is refused before anything is sent.
    runtime.load(&source)?;
    let bytes = source.bytes(DEFAULT_MAX_PLUGIN_SIZE)?.into_owned();
    let pinned = runtime.registry().push(&reference, bytes).await?;
    say(format_args!("pushed {pinned}\n"))?;
    Ok(ExitCode::SUCCESS)
}

/// `wasm-echo pull`: fetches into the cache, compiles into the compiled-code
/// cache, and says where both are.
async fn pull(args: PullArgs) -> anyhow::Result<ExitCode> {
    let reference = crate::registry::OciReference::parse(&args.reference)?;
    let runtime = args.registry.runtime(DEFAULT_MAX_PLUGIN_SIZE)?;
    let source = PluginSource::Oci(reference.clone());
    let fetched = runtime
        .fetch(&source)
        .await?
        .context("not a registry reference")?;
    let (pinned, size) = (reference.pinned(&fetched.digest), fetched.bytes.len());
    let Some(cache) = runtime.cache().map(|cache| cache.path().to_owned()) else {
        say(format_args!("pulled {pinned} ({size} bytes)\n"))?;
        return Ok(ExitCode::SUCCESS);
    };
    // Compiled too, into the compiled-code cache a server with this cache
    // folder reads: a later start, reload or tag move to this version then
    // loads its code in milliseconds instead of compiling it while it
    // serves.
    runtime.load_fetched(&source, Some(fetched))?;
    say(format_args!(
        "pulled {pinned} ({size} bytes) into {}, compiled into {}\n",
        cache.join("oci").display(),
        cache.join(crate::plugin::COMPILED).display()
    ))?;
    Ok(ExitCode::SUCCESS)
}

/// Resolves on Ctrl-C or SIGTERM.
async fn wait_for_signal(interrupt: &mut Signal, terminate: &mut Signal) {
    tokio::select! {
        _ = interrupt.recv() => {}
        _ = terminate.recv() => {}
    }
}

/// An error and its causes on one line, as `main` prints it. A cause whose
/// words an outer message already quotes is not repeated, and a cause that
/// spans lines (a guest's backtrace) is folded onto the one line.
pub fn report(error: &anyhow::Error) -> String {
    let mut text = String::new();
    for cause in error.chain() {
        let cause = crate::plugin::fold_lines(&cause.to_string());
        if cause.is_empty() || text.contains(&cause) {
            continue;
        }
        if !text.is_empty() {
            text.push_str(": ");
        }
        text.push_str(&cause);
    }
    text.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}

/// Parses and checks a `--max-plugin-size`.
fn parse_plugin_size(text: &str) -> Result<u64, String> {
    check_max_plugin_size(parse_size(text)? as u64)
}

/// Parses `KEY=VALUE`.
fn parse_setting(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((key, value)) if !key.is_empty() => Ok((key.to_owned(), value.to_owned())),
        _ => Err(format!("expected KEY=VALUE, got `{text}`")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_report_says_each_cause_once_on_one_line() {
        let error = anyhow::Error::from(std::io::Error::other("disk on fire"))
            .context("cannot read x.wasm: disk on fire")
            .context("loading\nthe plugin");
        assert_eq!(
            report(&error),
            "loading the plugin: cannot read x.wasm: disk on fire"
        );
    }

    #[test]
    fn settings_need_a_key() {
        assert_eq!(parse_setting("a=b=c"), Ok(("a".into(), "b=c".into())));
        assert!(parse_setting("=x").is_err());
        assert!(parse_setting("novalue").is_err());
    }

    #[test]
    fn the_command_line_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
