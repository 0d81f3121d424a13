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
/// unless `WASM_ECHO_LOG` says otherwise (e.g. `debug`,
/// `wasm_echo=debug,plugin=warn`). Installs the global subscriber, so call
/// it once.
pub fn init(format: LogFormat) -> Logs {
    let filter = tracing_subscriber::EnvFilter::try_from_env("WASM_ECHO_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
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
    Logs { guard, dropped }
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
