//! Where the server's own log lines go: stderr, through a bounded queue and
//! a thread of their own, so that logging holds up neither serving nor
//! shutting down, whatever is at the other end of stderr:
//!
//! - a log collector that stopped reading but keeps its pipe open: once the
//!   pipe is full a `write` blocks, and every thread that logged blocked
//!   with it;
//! - a reader that is gone (`serve 2>&1 | head -2`): a `write` fails, and
//!   the failure's report panicked the task that logged (see [`init`]).
//!
//! The queue is bounded: when stderr does not keep up, lines are dropped
//! and counted (`wasm_echo_log_lines_dropped_total`, and a line saying how
//! many once the log flows again). At exit the queue gets a short while to
//! drain, then whatever is left is lost.
//!
//! What is logged, and the plugins' own log budget, are others' business.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use clap::ValueEnum;
use tracing_appender::non_blocking::{ErrorCounter, NonBlockingBuilder, WorkerGuard};

/// How log lines are written.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// For people.
    Text,
    /// One JSON object per line, for machines.
    Json,
}

/// Lines waiting for stderr at most; a few megabytes of text. A collector
/// that catches up after a pause gets this many back; beyond it, lines are
/// dropped rather than held.
const QUEUE: usize = 16 * 1024;

/// How often dropped lines are counted and reported.
const REPORT_EVERY: Duration = Duration::from_secs(10);

/// How long the queued lines may take to be written at exit.
const FLUSH_AT_EXIT: Duration = Duration::from_secs(2);

/// The log writer; [`Logs::finish`] it at exit so the last lines are
/// written (if stderr takes them).
pub struct Logs {
    guard: WorkerGuard,
    dropped: ErrorCounter,
}

/// Sends log lines to stderr through a lossy queue: the level is `info`
/// unless `WASM_ECHO_LOG` says otherwise, read as [`directives`] explains
/// (e.g. `debug`, `info,plugin=warn`). Installs the global subscriber, so
/// call it once.
pub fn init(format: LogFormat) -> Logs {
    let spec = std::env::var("WASM_ECHO_LOG").unwrap_or_default();
    let (filter, refused) = match tracing_subscriber::EnvFilter::try_new(directives(&spec)) {
        Ok(filter) => (filter, None),
        Err(error) => (tracing_subscriber::EnvFilter::new("info"), Some(error)),
    };
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let (writer, guard) = NonBlockingBuilder::default()
        .lossy(true)
        .buffered_lines_limit(QUEUE)
        .thread_name("log-writer")
        .finish(std::io::stderr());
    let dropped = writer.error_counter();
    // A failed write is not reported on stderr: that report is an
    // `eprintln!`, which panics when stderr is a closed pipe (Rust ignores
    // SIGPIPE), killing whichever task was logging. That is how a SIGTERM
    // used to go unanswered once a `| head` had exited: the task that
    // handles signals died logging it. The queue never fails a write, but
    // this must not come back with another writer.
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .log_internal_errors(false)
        .with_writer(writer);
    match format {
        LogFormat::Text => logs.with_ansi(ansi).init(),
        LogFormat::Json => logs.json().init(),
    }
    if let Some(error) = refused {
        tracing::warn!("WASM_ECHO_LOG=`{spec}` ignored, logging at info: {error}");
    }
    Logs { guard, dropped }
}

/// Libraries whose own `debug` and `trace` lines are about their insides,
/// not about serving: Cranelift alone writes thousands of them a second
/// while it compiles. A bare level (`debug`) does not reach them; naming
/// one does (`debug,cranelift_codegen=debug`). Matched as prefixes of a
/// line's target, as every `WASM_ECHO_LOG` directive is.
const INTERNALS: &[&str] = &[
    "cranelift",
    "wasmtime",
    "regalloc2",
    "wasmparser",
    "wasm_encoder",
    "wit_parser",
    "wit_component",
    "winch",
    "pulley",
    "object",
    "gimli",
    "notify",
    "mio",
    "tokio",
    "hyper",
];

/// What `WASM_ECHO_LOG` means, as `EnvFilter` directives. It reads as
/// `RUST_LOG` does, with two differences that make the plain words do what
/// they say:
///
/// - a bare level more verbose than `info` (`debug`, `trace`) is for
///   wasm-echo and its plugins; the libraries in [`INTERNALS`] stay at
///   `info` unless a directive names them;
/// - a spec without a bare level keeps `info` for everything it does not
///   name, so `plugin=warn` quiets plugins, not the host's own warnings.
fn directives(spec: &str) -> String {
    use tracing_subscriber::filter::LevelFilter;
    let spec = spec.trim();
    if spec.is_empty() {
        return "info".to_owned();
    }
    let parts: Vec<&str> = spec
        .split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .collect();
    let bare = parts
        .iter()
        .filter_map(|part| part.parse::<LevelFilter>().ok())
        .next_back();
    // A more specific target wins (`cranelift_codegen=debug` over
    // `cranelift=info`); the same one given twice is left to the user's.
    let named = |target: &str| {
        parts
            .iter()
            .any(|part| part.split(['=', '[']).next() == Some(target))
    };
    let mut out: Vec<String> = Vec::new();
    match bare {
        None => out.push("info".to_owned()),
        Some(level) if level > LevelFilter::INFO => {
            out.extend(
                INTERNALS
                    .iter()
                    .filter(|target| !named(target))
                    .map(|target| format!("{target}=info")),
            );
        }
        Some(_) => {}
    }
    out.extend(parts.iter().map(|part| (*part).to_owned()));
    out.join(",")
}

impl Logs {
    /// Counts and reports lines dropped because stderr did not keep up,
    /// every [`REPORT_EVERY`]; runs until the process ends. At most one
    /// line per period, so a stalled log cannot be flooded by its own
    /// complaints.
    pub fn report_drops(&self) -> impl Future<Output = ()> + Send + 'static {
        let dropped = self.dropped.clone();
        async move {
            let mut every = tokio::time::interval(REPORT_EVERY);
            let mut reported = 0;
            loop {
                every.tick().await;
                let now = dropped.dropped_lines();
                if now > reported {
                    crate::metrics::log_lines_dropped(now as u64);
                    tracing::warn!(
                        "{} log line(s) dropped: stderr was not being read",
                        now - reported
                    );
                    reported = now;
                }
            }
        }
    }

    /// Gives the queued lines [`FLUSH_AT_EXIT`] to be written, then lets
    /// them go. Never waits longer, whatever stderr (or stdout) does.
    pub fn finish(self) {
        // The guard's drop waits about a second for the writer thread, but
        // when the queue is full it prints a complaint to stdout, which
        // blocks forever on a stalled pipe. So it is dropped on a thread of
        // its own, abandoned if it takes too long.
        let slot = Arc::new(Mutex::new(Some(self.guard)));
        let (done, finished) = std::sync::mpsc::channel();
        let flusher = {
            let slot = slot.clone();
            std::thread::Builder::new()
                .name("log-flush".to_owned())
                .spawn(move || {
                    let guard = slot.lock().ok().and_then(|mut slot| slot.take());
                    drop(guard);
                    let _ = done.send(());
                })
        };
        match flusher {
            Ok(_) => {
                let _ = finished.recv_timeout(FLUSH_AT_EXIT);
            }
            // No thread to wait on: the last lines are lost, not the exit.
            Err(_) => {
                if let Some(guard) = slot.lock().ok().and_then(|mut slot| slot.take()) {
                    std::mem::forget(guard);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::directives;

    #[test]
    fn a_bare_debug_leaves_the_compiler_at_info() {
        let debug = directives("debug");
        assert!(
            debug.starts_with("cranelift=info,wasmtime=info,"),
            "{debug}"
        );
        assert!(debug.ends_with(",debug"), "{debug}");
        // Named, it is the user's to set.
        let named = directives("debug,cranelift=trace");
        assert!(!named.contains("cranelift=info"), "{named}");
        assert!(named.contains("wasmtime=info"), "{named}");
        assert!(named.ends_with("debug,cranelift=trace"), "{named}");
    }

    #[test]
    fn a_spec_without_a_level_keeps_info_for_the_rest() {
        assert_eq!(directives("plugin=warn"), "info,plugin=warn");
        assert_eq!(directives("info,plugin=warn"), "info,plugin=warn");
        assert_eq!(directives("warn"), "warn");
        assert_eq!(directives(""), "info");
    }
}
