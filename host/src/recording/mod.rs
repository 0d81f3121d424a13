//! Recording a tenant's traffic: each datagram and each TCP message with
//! the decision its plugin version took, written to a file that
//! `wasm-echo replay` reads back (and `jq` reads as well).
//!
//! The serving path only decides whether an exchange is sampled and, if it
//! is, copies its bytes into a [`Record`] and offers it to a bounded queue
//! ([`Recorder::record`]); it never waits. A writer thread of its own
//! ([`writer`]) turns records into JSON lines, writes them and rotates the
//! file at its size cap. When the queue is full (the disk is slower than the
//! traffic) a record is dropped and counted, never waited for.
//!
//! # The format
//!
//! JSON Lines, one object a line. Each file (a rotated one too) starts with
//! a header line, then one line per exchange:
//!
//! ```text
//! {"wasm-echo-recording":1,"listener":"main","run":"…","started":"…","plugin-config":{…}}
//! {"time":"2026-11-27T05:00:00.123Z","listener":"main","kind":"datagram","peer":"127.0.0.1:40000","version":"hello@…","in":"SGVsbG8=","reply":"SGk=","next":"carry-on"}
//! {"time":"…","listener":"main","kind":"open","conn":1,"peer":"…","local":"…","framing":"raw","version":"…","reply":null,"next":"carry-on"}
//! {"time":"…","listener":"main","kind":"message","conn":1,"peer":"…","version":"…","in":"…","reply":"…","next":"close-connection"}
//! {"time":"…","listener":"main","kind":"message","conn":1,"peer":"…","version":"…","in":"…","failed":"trap","error":"plugin trapped: …"}
//! ```
//!
//! Bytes are base64 (`jq -r '.in | @base64d'`); `time` is when the call
//! began, to the millisecond; `conn` numbers a TCP connection within one
//! run of the server (`run` in the header). Reading recordings back, with
//! errors naming the file and line, is [`read`]'s business; replaying them
//! is [`crate::replay`]'s.

pub mod read;
mod writer;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{SyncSender, TrySendError};
use std::time::{Duration, SystemTime};

use metrics::{Counter, counter};

use crate::framing::Framing;
use crate::plugin::{CallError, Decision, Next, PluginConfig};

/// The format's version, in every header. A reader refuses any other.
pub const FORMAT_VERSION: u64 = 1;

/// The header's key that says what the file is.
pub const HEADER_KEY: &str = "wasm-echo-recording";

/// How many records may wait for the writer: at some 100 bytes of overhead
/// plus the message and reply each, a few MiB at most for small messages.
/// Past it, records are dropped rather than waited for.
const QUEUE: usize = 8192;

/// How a tenant records, resolved from its `record*` keys or `serve
/// --record*` flags.
#[derive(Clone, Debug, PartialEq)]
pub struct RecordSettings {
    /// The file; rotated files are `PATH.1` (newest) to `PATH.KEEP`.
    pub path: PathBuf,
    /// The size at which the file is rotated.
    pub max_size: u64,
    /// How many rotated files are kept besides the current one.
    pub keep: usize,
    /// The share of exchanges recorded, in (0, 1]: of datagrams, and of
    /// TCP connections (a sampled connection is recorded whole, so that
    /// its replay starts from the same state).
    pub sample: f64,
}

impl RecordSettings {
    /// The default size cap.
    pub const DEFAULT_MAX_SIZE: u64 = 64 << 20;
    /// The default number of rotated files kept.
    pub const DEFAULT_KEEP: usize = 4;
}

/// What a plugin call came to, as recorded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The plugin decided.
    Decided {
        /// The reply, if any, as the plugin gave it.
        reply: Option<Vec<u8>>,
        /// What it wanted next.
        next: Next,
    },
    /// The call (or the instance's start) failed.
    Failed {
        /// `trap`, `deadline` or `memory`.
        kind: String,
        /// The error, on one line.
        error: String,
    },
}

impl Outcome {
    /// What `called` came to, copying the reply.
    pub fn of(called: &Result<Decision, CallError>) -> Self {
        match called {
            Ok(decision) => Self::Decided {
                reply: decision.reply.clone(),
                next: decision.next,
            },
            Err(error) => Self::failed(error),
        }
    }

    /// A failed call.
    pub fn failed(error: &CallError) -> Self {
        let kind = match error {
            CallError::Deadline(_) => "deadline",
            CallError::Limit(_) => "memory",
            CallError::Trap { .. } => "trap",
            // Not recorded (a recorded listener takes no batches), but a
            // batch's failure reads as a broken reply.
            CallError::Batch(_) => "reply",
        };
        Self::Failed {
            kind: kind.to_owned(),
            error: error.to_string(),
        }
    }
}

/// `next` as the recording spells it.
pub fn next_name(next: Next) -> &'static str {
    match next {
        Next::CarryOn => "carry-on",
        Next::CloseConnection => "close-connection",
        Next::StopListener => "stop-listener",
    }
}

/// `framing` as the recording spells it.
pub fn framing_name(framing: Framing) -> &'static str {
    match framing {
        Framing::Raw => "raw",
        Framing::Lines => "lines",
        Framing::LengthPrefixed => "length-prefixed",
    }
}

/// Which exchange a record is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// A datagram.
    Datagram,
    /// A TCP connection opened (`on-open`).
    Open {
        /// The connection's number in its run.
        conn: u64,
        /// The listener's address the peer connected to.
        local: SocketAddr,
        /// How its stream was cut into messages.
        framing: Framing,
    },
    /// A TCP message (`on-message`).
    Message {
        /// The connection's number in its run.
        conn: u64,
    },
}

/// One exchange, as the serving path hands it to the writer.
#[derive(Debug)]
pub struct Record {
    /// When the call began.
    pub time: SystemTime,
    /// Which exchange.
    pub event: Event,
    /// Who sent it.
    pub peer: SocketAddr,
    /// `name@digest` of the version that answered.
    pub version: Arc<str>,
    /// The bytes the plugin was given (none for `open`).
    pub input: Vec<u8>,
    /// What it decided.
    pub outcome: Outcome,
}

/// What a recording has written and dropped so far, for the benchmark
/// and tests (the same figures as the `wasm_echo_records*` metrics, which
/// count only when a metrics endpoint is installed).
#[derive(Debug, Default)]
pub struct Tally {
    /// Records offered to the writer.
    pub offered: AtomicU64,
    /// Records written to a file.
    pub written: AtomicU64,
    /// Records dropped: the queue was full, or writing failed.
    pub dropped: AtomicU64,
}

/// What the writer thread is sent: a record, boxed so that the queue's
/// slots stay small.
enum Message {
    /// A record to write.
    Record(Box<Record>),
}

/// A tenant's recording: the sampling decision, the queue to the writer
/// thread, and the counts of what was written and dropped.
pub struct Recorder {
    /// The queue to the writer thread.
    sender: SyncSender<Message>,
    /// Sampling: an exchange is kept when a hash of its number falls under
    /// this (`u64::MAX` keeps all).
    threshold: u64,
    /// Exchanges (datagrams and connections) offered so far.
    offered: AtomicU64,
    /// TCP connections numbered so far.
    connections: AtomicU64,
    /// Records dropped because the queue was full.
    dropped_full: Counter,
    /// Told when the writer has written everything and closed the file.
    done: std::sync::Mutex<Option<tokio::sync::oneshot::Receiver<()>>>,
    /// Tells the writer to finish once the queue is empty.
    closing: Arc<std::sync::atomic::AtomicBool>,
    /// What was written and dropped.
    tally: Arc<Tally>,
    path: PathBuf,
}

impl std::fmt::Debug for Recorder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Recorder")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl Recorder {
    /// Opens the recording of `listener` (rotating a file already there, so
    /// nothing is ever appended to or overwritten) and starts its writer
    /// thread.
    ///
    /// # Errors
    ///
    /// The file cannot be made, or the thread cannot be started.
    pub fn start(
        settings: &RecordSettings,
        listener: &str,
        plugin_config: &PluginConfig,
    ) -> anyhow::Result<Self> {
        let (sender, queue) = std::sync::mpsc::sync_channel(QUEUE);
        let (done_tx, done) = tokio::sync::oneshot::channel();
        let closing = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let tally = Arc::new(Tally::default());
        let writer = writer::Writer::open(settings, listener, plugin_config, tally.clone())?;
        let (l, c) = (listener.to_owned(), closing.clone());
        std::thread::Builder::new()
            .name(format!("record {listener}"))
            .spawn(move || {
                writer.run(queue, &c, &l);
                let _ = done_tx.send(());
            })
            .map_err(|error| anyhow::anyhow!("cannot start the recording thread: {error}"))?;
        let threshold = if settings.sample >= 1.0 {
            u64::MAX
        } else {
            // The float-to-int cast saturates; the range is checked.
            (settings.sample * u64::MAX as f64) as u64
        };
        tracing::info!(
            listener,
            "recording to {} (rotated at {} bytes, {} kept, sampling {})",
            settings.path.display(),
            settings.max_size,
            settings.keep,
            settings.sample
        );
        Ok(Self {
            sender,
            threshold,
            offered: AtomicU64::new(0),
            connections: AtomicU64::new(0),
            dropped_full: counter!("wasm_echo_records_dropped_total", "listener" => listener.to_owned(), "reason" => "full"),
            done: std::sync::Mutex::new(Some(done)),
            closing,
            tally,
            path: settings.path.clone(),
        })
    }

    /// The file it writes.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// What it has written and dropped so far.
    pub fn tally(&self) -> &Tally {
        &self.tally
    }

    /// Whether the next exchange (a datagram, or a whole TCP connection) is
    /// recorded.
    pub fn sample(&self) -> bool {
        if self.threshold == u64::MAX {
            return true;
        }
        let n = self.offered.fetch_add(1, Ordering::Relaxed);
        splitmix64(n) < self.threshold
    }

    /// A number for a new TCP connection, if it is sampled.
    pub fn connection(&self) -> Option<u64> {
        self.sample()
            .then(|| self.connections.fetch_add(1, Ordering::Relaxed) + 1)
    }

    /// Offers `record` to the writer; drops (and counts) it when the queue
    /// is full or closed. Never blocks.
    pub fn record(&self, record: Record) {
        if self.closing.load(Ordering::Relaxed) {
            return;
        }
        self.tally.offered.fetch_add(1, Ordering::Relaxed);
        match self.sender.try_send(Message::Record(Box::new(record))) {
            Ok(()) => {}
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                self.dropped_full.increment(1);
                self.tally.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Lets the writer write what is queued and close the file; waits at
    /// most `patience` for it.
    pub async fn finish(&self, patience: Duration) {
        self.closing.store(true, Ordering::Relaxed);
        let done = self.done.lock().ok().and_then(|mut done| done.take());
        if let Some(done) = done
            && tokio::time::timeout(patience, done).await.is_err()
        {
            tracing::warn!(
                "the recording {} was not finished within {}",
                self.path.display(),
                humantime::format_duration(patience)
            );
        }
    }
}

/// A well-mixed hash of `n` (SplitMix64): sampling by it picks exchanges
/// spread evenly, not every k-th one, so a periodic pattern in the traffic
/// (peers taking turns) is not sampled as one side only.
fn splitmix64(n: u64) -> u64 {
    let mut z = n.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(dir: &Path, sample: f64) -> RecordSettings {
        RecordSettings {
            path: dir.join("rec.jsonl"),
            max_size: RecordSettings::DEFAULT_MAX_SIZE,
            keep: 2,
            sample,
        }
    }

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "wasm-echo-recording-unit-{}-{name}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("a scratch dir");
        dir
    }

    #[test]
    fn sampling_keeps_about_the_share_asked_for() {
        let dir = scratch("sample");
        let recorder =
            Recorder::start(&settings(&dir, 0.25), "main", &PluginConfig::new()).expect("starts");
        let kept = (0..10_000).filter(|_| recorder.sample()).count();
        assert!((2_000..3_000).contains(&kept), "kept {kept} of 10000");
        let all =
            Recorder::start(&settings(&dir, 1.0), "all", &PluginConfig::new()).expect("starts");
        assert!((0..1000).all(|_| all.sample()));
    }

    /// The serving path must never wait on the writer: a full queue drops
    /// the record at once.
    #[test]
    fn a_full_queue_drops_instead_of_waiting() {
        let (sender, _queue) = std::sync::mpsc::sync_channel(1);
        let recorder = Recorder {
            sender,
            threshold: u64::MAX,
            offered: AtomicU64::new(0),
            connections: AtomicU64::new(0),
            dropped_full: Counter::noop(),
            done: std::sync::Mutex::new(None),
            closing: Arc::default(),
            tally: Arc::default(),
            path: PathBuf::new(),
        };
        let record = || Record {
            time: SystemTime::now(),
            event: Event::Datagram,
            peer: ([127, 0, 0, 1], 1).into(),
            version: "v".into(),
            input: b"x".to_vec(),
            outcome: Outcome::Decided {
                reply: None,
                next: Next::CarryOn,
            },
        };
        // Nothing reads the queue: had `record` waited, this would hang.
        for _ in 0..1000 {
            recorder.record(record());
        }
        assert!(
            recorder
                .sender
                .try_send(Message::Record(Box::new(record())))
                .is_err()
        );
        assert_eq!(recorder.tally().dropped.load(Ordering::Relaxed), 999);
    }
}
