//! The recording's writer thread: turns records into JSON lines, writes
//! them through a buffer, and rotates the file at its size cap.
//!
//! It keeps out of serving's way in two ways. It is not woken for each
//! record: once woken by the first record after a quiet spell, it drains
//! the queue every [`DRAIN_EVERY`] until a drain finds it empty, so a
//! steady stream of records costs the serving threads no system call
//! (only the first record of a burst wakes it). And it runs at the lowest
//! priority ([`crate::background::lower_priority`]): when serving needs
//! every core, the writer falls behind, the queue fills and records are
//! dropped and counted, instead of serving slowing down. Encoding reuses
//! its buffers, so a record costs no allocation here. Every file it makes has mode 0600 (recordings
//! hold whatever peers sent) and is made anew (`O_EXCL`), never appended
//! to, so a symlink planted at the path is not followed.
//!
//! A write that fails (a full disk) drops its record and counts it; the
//! writer tries the next one, so a disk that frees up is written again.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write as _};
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, TryRecvError};
use std::time::{Duration, Instant, SystemTime};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use metrics::{Counter, counter};
use serde::Serialize;

use super::{
    Event, FORMAT_VERSION, Message, Outcome, Record, RecordSettings, Tally, framing_name, next_name,
};
use crate::plugin::PluginConfig;
use std::sync::Arc;

/// How often an idle writer looks whether it is to finish.
const IDLE_CHECK: Duration = Duration::from_millis(100);

/// How often a busy writer drains the queue. The queue must hold what
/// comes in meanwhile: 8192 records in 20 ms is 400,000 a second.
const DRAIN_EVERY: Duration = Duration::from_millis(20);

/// How many records the writer encodes before it offers its core to any
/// other thread. A low priority alone does not make the scheduler take the
/// core back from it when a serving thread wakes (Linux lets the running
/// thread finish its time slice, some 0.75 to 3 ms), so without this a
/// drain of 20 ms' worth of records delayed an exchange by up to that:
/// TCP ping-pong p99.9 went from 0.1 to 0.6 ms with recording on. Every
/// 32 records brought it to 0.16 ms, every 8 to 0.11-0.14 ms.
const YIELD_EVERY: usize = 8;

/// How often a failing disk is logged about.
const WARN_EVERY: Duration = Duration::from_secs(60);

/// The header line each file starts with.
#[derive(Serialize)]
struct Header<'a> {
    #[serde(rename = "wasm-echo-recording")]
    format: u64,
    listener: &'a str,
    run: &'a str,
    started: String,
    #[serde(rename = "plugin-config")]
    plugin_config: &'a BTreeMap<String, String>,
}

/// One exchange's line.
#[derive(Serialize)]
struct Line<'a> {
    time: &'a str,
    listener: &'a str,
    kind: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    conn: Option<u64>,
    peer: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    local: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    framing: Option<&'static str>,
    version: &'a str,
    #[serde(rename = "in", skip_serializing_if = "Option::is_none")]
    input: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    reply: Option<Option<&'a str>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    next: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    failed: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<&'a str>,
}

/// An open recording file and what rotating it needs.
pub(super) struct Writer {
    path: PathBuf,
    max_size: u64,
    keep: usize,
    listener: String,
    /// This server run's id, in every header: connection numbers are
    /// unique within it.
    run: String,
    plugin_config: PluginConfig,
    /// The current file; `None` after a rotation failed to make the next
    /// one (it is tried again with the next record).
    file: Option<BufWriter<File>>,
    /// Bytes in the current file.
    size: u64,
    /// Bytes of its header: a file holding only that is not rotated, so a
    /// record larger than the cap gets a file of its own.
    header_len: u64,
    written: Counter,
    dropped_io: Counter,
    rotations: Counter,
    last_warning: Option<Instant>,
    /// Buffers reused for every record.
    scratch: Scratch,
    /// What was written and dropped, for [`super::Recorder::tally`].
    tally: Arc<Tally>,
}

/// The text of one record's fields and its line, kept between records so
/// that encoding one allocates nothing once they have grown.
#[derive(Default)]
struct Scratch {
    time: String,
    peer: String,
    local: String,
    input: String,
    reply: String,
    line: Vec<u8>,
}

impl Writer {
    /// Rotates a file already at the path and makes a fresh one.
    ///
    /// # Errors
    ///
    /// The file cannot be made (a missing folder, no permission).
    pub(super) fn open(
        settings: &RecordSettings,
        listener: &str,
        plugin_config: &PluginConfig,
        tally: Arc<Tally>,
    ) -> anyhow::Result<Self> {
        let run = format!(
            "{:016x}",
            super::splitmix64(
                SystemTime::now()
                    .duration_since(SystemTime::UNIX_EPOCH)
                    .map_or(0, |d| d.as_nanos() as u64)
                    ^ u64::from(std::process::id()).rotate_left(32)
            )
        );
        let mut writer = Self {
            path: settings.path.clone(),
            max_size: settings.max_size,
            keep: settings.keep,
            listener: listener.to_owned(),
            run,
            plugin_config: plugin_config.clone(),
            file: None,
            size: 0,
            header_len: 0,
            written: counter!("wasm_echo_records_total", "listener" => listener.to_owned()),
            dropped_io: counter!("wasm_echo_records_dropped_total", "listener" => listener.to_owned(), "reason" => "io"),
            rotations: counter!("wasm_echo_recording_rotations_total", "listener" => listener.to_owned()),
            last_warning: None,
            scratch: Scratch::default(),
            tally,
        };
        if writer.path.exists() || writer.path.is_symlink() {
            writer.rotate_files()?;
        }
        writer.fresh_file()?;
        Ok(writer)
    }

    /// Writes what comes until told to finish, then flushes.
    pub(super) fn run(mut self, queue: Receiver<Message>, closing: &AtomicBool, listener: &str) {
        crate::background::lower_priority("the recording writer");
        'idle: loop {
            // Quiet: wait to be woken by the next record.
            match queue.recv_timeout(IDLE_CHECK) {
                Ok(message) => self.write(message),
                Err(RecvTimeoutError::Timeout) => {
                    if closing.load(Ordering::Relaxed) {
                        break;
                    }
                    continue;
                }
                Err(RecvTimeoutError::Disconnected) => break,
            }
            // Busy: drain on a timer, unwoken, until a drain finds nothing.
            // It sleeps first: had it drained at once, it would find the
            // queue empty and be woken again by the very next record.
            loop {
                std::thread::sleep(DRAIN_EVERY);
                let Some(drained) = self.drain(&queue) else {
                    break 'idle;
                };
                self.flush();
                if drained == 0 {
                    if closing.load(Ordering::Relaxed) {
                        break 'idle;
                    }
                    continue 'idle;
                }
            }
        }
        while let Ok(message) = queue.try_recv() {
            self.write(message);
        }
        self.flush();
        tracing::debug!(listener, "recording {} closed", self.path.display());
    }

    /// Writes every record queued now, offering its core to other threads
    /// every [`YIELD_EVERY`]; says how many, or `None` once the queue is
    /// closed.
    fn drain(&mut self, queue: &Receiver<Message>) -> Option<usize> {
        let mut drained = 0_usize;
        loop {
            match queue.try_recv() {
                Ok(message) => {
                    self.write(message);
                    drained += 1;
                    if drained.is_multiple_of(YIELD_EVERY) {
                        std::thread::yield_now();
                    }
                }
                Err(TryRecvError::Empty) => return Some(drained),
                Err(TryRecvError::Disconnected) => return None,
            }
        }
    }

    fn write(&mut self, message: Message) {
        let Message::Record(record) = message;
        let mut scratch = std::mem::take(&mut self.scratch);
        if let Err(error) = self.line(&record, &mut scratch) {
            self.scratch = scratch;
            return self.failed("encoding a record", &error);
        }
        self.append(&scratch.line);
        self.scratch = scratch;
    }

    /// Writes one encoded line, rotating first if it would pass the cap.
    fn append(&mut self, line: &[u8]) {
        let len = line.len() as u64;
        if self.file.is_none()
            && let Err(error) = self.fresh_file()
        {
            return self.failed("opening", &error);
        }
        if self.size + len > self.max_size
            && self.size > self.header_len
            && let Err(error) = self.rotate()
        {
            return self.failed("rotating", &error);
        }
        let Some(file) = &mut self.file else {
            return;
        };
        match file.write_all(line) {
            Ok(()) => {
                self.size += len;
                self.written.increment(1);
                self.tally.written.fetch_add(1, Ordering::Relaxed);
            }
            Err(error) => self.failed("writing", &error),
        }
    }

    /// Encodes `record` as one line, newline included, into `scratch.line`.
    fn line(&self, record: &Record, scratch: &mut Scratch) -> serde_json::Result<()> {
        use std::fmt::Write as _;
        let Scratch {
            time,
            peer,
            local,
            input,
            reply,
            line,
        } = scratch;
        for text in [
            &mut *time,
            &mut *peer,
            &mut *local,
            &mut *input,
            &mut *reply,
        ] {
            text.clear();
        }
        line.clear();
        // Writing into a String cannot fail.
        let _ = write!(time, "{}", humantime::format_rfc3339_millis(record.time));
        let _ = write!(peer, "{}", record.peer);
        let (kind, conn, framing) = match &record.event {
            Event::Datagram => ("datagram", None, None),
            Event::Open {
                conn,
                local: address,
                framing,
            } => {
                let _ = write!(local, "{address}");
                ("open", Some(*conn), Some(framing_name(*framing)))
            }
            Event::Message { conn } => ("message", Some(*conn), None),
        };
        let is_open = matches!(record.event, Event::Open { .. });
        if !is_open {
            BASE64.encode_string(&record.input, input);
        }
        let (decided, next, failed, error) = match &record.outcome {
            Outcome::Decided { reply: bytes, next } => {
                if let Some(bytes) = bytes {
                    BASE64.encode_string(bytes, reply);
                }
                (Some(bytes.is_some()), Some(next_name(*next)), None, None)
            }
            Outcome::Failed { kind, error } => {
                (None, None, Some(kind.as_str()), Some(error.as_str()))
            }
        };
        let encoded = Line {
            time,
            listener: &self.listener,
            kind,
            conn,
            peer,
            local: is_open.then_some(local.as_str()),
            framing,
            version: &record.version,
            input: (!is_open).then_some(input.as_str()),
            reply: decided.map(|some| some.then_some(reply.as_str())),
            next,
            failed,
            error,
        };
        serde_json::to_writer(&mut *line, &encoded)?;
        line.push(b'\n');
        Ok(())
    }

    fn flush(&mut self) {
        if let Some(file) = &mut self.file
            && let Err(error) = file.flush()
        {
            self.failed("writing", &error);
        }
    }

    /// Counts a dropped record and says why, at most once a minute.
    fn failed(&mut self, doing: &str, error: &dyn std::fmt::Display) {
        self.dropped_io.increment(1);
        self.tally.dropped.fetch_add(1, Ordering::Relaxed);
        if self
            .last_warning
            .is_some_and(|last| last.elapsed() < WARN_EVERY)
        {
            return;
        }
        self.last_warning = Some(Instant::now());
        tracing::warn!(
            listener = self.listener,
            "recording {}: {doing} failed, records are dropped: {error}",
            self.path.display()
        );
    }

    /// Moves the current file aside and starts a fresh one.
    fn rotate(&mut self) -> std::io::Result<()> {
        if let Some(mut file) = self.file.take() {
            file.flush()?;
        }
        self.rotate_files()?;
        self.fresh_file()?;
        self.rotations.increment(1);
        Ok(())
    }

    /// PATH.(keep-1) to PATH.keep, ..., PATH to PATH.1; the oldest goes.
    fn rotate_files(&self) -> std::io::Result<()> {
        if self.keep == 0 {
            return remove_if_there(&self.path);
        }
        for n in (1..self.keep).rev() {
            let from = numbered(&self.path, n);
            if from.exists() {
                std::fs::rename(&from, numbered(&self.path, n + 1))?;
            }
        }
        std::fs::rename(&self.path, numbered(&self.path, 1))
    }

    /// Makes the file anew, mode 0600, and writes its header.
    fn fresh_file(&mut self) -> std::io::Result<()> {
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&self.path)
            .map_err(|error| {
                std::io::Error::new(
                    error.kind(),
                    format!("cannot record to {}: {error}", self.path.display()),
                )
            })?;
        let mut file = BufWriter::new(file);
        let header = Header {
            format: FORMAT_VERSION,
            listener: &self.listener,
            run: &self.run,
            started: humantime::format_rfc3339_millis(SystemTime::now()).to_string(),
            plugin_config: &self.plugin_config,
        };
        let mut line = serde_json::to_vec(&header).map_err(std::io::Error::other)?;
        line.push(b'\n');
        file.write_all(&line)?;
        file.flush()?;
        self.size = line.len() as u64;
        self.header_len = self.size;
        self.file = Some(file);
        Ok(())
    }
}

/// `PATH.n`.
pub(crate) fn numbered(path: &Path, n: usize) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(format!(".{n}"));
    PathBuf::from(name)
}

fn remove_if_there(path: &Path) -> std::io::Result<()> {
    match std::fs::remove_file(path) {
        Err(error) if error.kind() != std::io::ErrorKind::NotFound => Err(error),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plugin::Next;
    use std::os::unix::fs::PermissionsExt as _;

    /// A file past its cap is rotated: the cap holds for every file, the
    /// oldest beyond `keep` go, every file has its header and mode 0600.
    #[test]
    fn a_full_file_rotates_and_keeps_its_bound() {
        let dir =
            std::env::temp_dir().join(format!("wasm-echo-writer-unit-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("a scratch dir");
        let path = dir.join("rec.jsonl");
        std::fs::write(&path, "yesterday's\n").expect("an old file");
        let settings = RecordSettings {
            path: path.clone(),
            max_size: 1024,
            keep: 2,
            sample: 1.0,
        };
        let tally = Arc::new(Tally::default());
        let mut writer =
            Writer::open(&settings, "main", &PluginConfig::new(), tally.clone()).expect("opens");
        assert_eq!(
            std::fs::read_to_string(numbered(&path, 1)).expect("rotated aside"),
            "yesterday's\n"
        );
        for _ in 0..100 {
            writer.write(Message::Record(Box::new(Record {
                time: SystemTime::now(),
                event: Event::Datagram,
                peer: ([127, 0, 0, 1], 9).into(),
                version: "echo@000000000000".into(),
                input: vec![b'x'; 100],
                outcome: Outcome::Decided {
                    reply: Some(vec![b'y'; 100]),
                    next: Next::CarryOn,
                },
            })));
        }
        writer.flush();
        for file in [path.clone(), numbered(&path, 1), numbered(&path, 2)] {
            let meta = std::fs::metadata(&file).expect("kept");
            assert!(
                meta.len() <= 1024,
                "{} is {} bytes",
                file.display(),
                meta.len()
            );
            assert_eq!(meta.permissions().mode() & 0o777, 0o600);
            let text = std::fs::read_to_string(&file).expect("text");
            assert!(text.starts_with("{\"wasm-echo-recording\":1"), "{text}");
        }
        assert!(!numbered(&path, 3).exists(), "only `keep` rotated files");
        assert_eq!(tally.written.load(Ordering::Relaxed), 100);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
