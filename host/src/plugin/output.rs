//! Plugin text on its way into the host's log: every path by which a
//! plugin's words reach it (`log` calls, stdout and stderr, and the trap
//! and error messages a failed call carries) comes through here, and leaves
//! bounded and escaped.
//!
//! - [`escape`] makes plugin text one line that cannot pass for the host's
//!   own: newlines, carriage returns, terminal escape sequences and other
//!   control characters become visible escapes (`\n`, `\x1b`, `\u{9b}`),
//!   and a line longer than [`MAX_LINE`] bytes is cut with a mark saying how
//!   long it was.
//! - [`LogBudget`] bounds how many lines *and* bytes of plugin text a tenant
//!   may have written per second; the rest is counted and dropped.
//! - [`GuestOutput`] turns a guest's stdout and stderr into log lines under
//!   the same rules.
//!
//! What a plugin may reach at all is `plugin::host`'s business; the
//! listeners decide which failures are logged.

use std::borrow::Cow;
use std::fmt::Write as _;
use std::io;
use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};

use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use tokio::io::AsyncWrite;
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};

use super::bindings::Level;
use super::host::InstanceSettings;

/// The longest plugin line the host writes, in bytes of escaped text before
/// the truncation mark: room for any message worth reading, small enough
/// that one call cannot make the host write much.
pub const MAX_LINE: usize = 4096;

/// `text` with its lines trimmed and joined by spaces, blank ones dropped:
/// a multi-line error (a guest's backtrace) as one log or CLI line.
pub fn fold_lines(text: &str) -> String {
    text.lines()
        .map(str::trim)
        .filter(|line| !line.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
}

/// `text` as the host may log it: escaped ([`escape_char`]) and at most
/// [`MAX_LINE`] bytes, followed by `… [truncated, N bytes in all]` when it
/// was cut. Text that needs neither is borrowed, not copied.
///
/// Only as much of `text` is read as fits, so a 20 MiB message costs no
/// more to log than a 4 KiB one.
pub fn escape(text: &str) -> Cow<'_, str> {
    escape_cut(text, text.len())
}

/// Like [`escape`], for text that is the start of something `total` bytes
/// long (a guest's stdout line of which only the start was kept): the mark
/// is added whenever `total` exceeds what is shown.
fn escape_cut(text: &str, total: usize) -> Cow<'_, str> {
    let clean = text.len() <= MAX_LINE && !text.chars().any(needs_escape);
    if clean && total <= text.len() {
        return Cow::Borrowed(text);
    }
    let mut line = String::with_capacity(text.len().min(MAX_LINE) + 48);
    let mut cut = text.len() < total;
    for c in text.chars() {
        let before = line.len();
        escape_char(&mut line, c);
        if line.len() > MAX_LINE {
            line.truncate(before);
            cut = true;
            break;
        }
    }
    if cut {
        let _ = write!(line, "… [truncated, {total} bytes in all]");
    }
    Cow::Owned(line)
}

/// Whether `c` could end a line, move the cursor, start a terminal escape
/// sequence or reorder what a reader sees: C0 and C1 controls, DEL, the
/// Unicode line and paragraph separators and the bidirectional overrides.
fn needs_escape(c: char) -> bool {
    c.is_control()
        || matches!(c, '\u{2028}' | '\u{2029}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

/// Appends `c`, or its visible escape if it [needs one](needs_escape):
/// `\n`, `\r`, `\t`, `\xNN` for the other ASCII controls and DEL, `\u{NN}`
/// beyond ASCII. A backslash is left alone, so plugin text that contains
/// `\n` literally reads the same as an escaped newline: harmless, since
/// either way it stays on its one line.
fn escape_char(line: &mut String, c: char) {
    match c {
        '\n' => line.push_str("\\n"),
        '\r' => line.push_str("\\r"),
        '\t' => line.push_str("\\t"),
        c if c.is_ascii() && needs_escape(c) => {
            let _ = write!(line, "\\x{:02x}", u32::from(c));
        }
        c if needs_escape(c) => {
            let _ = write!(line, "\\u{{{:x}}}", u32::from(c));
        }
        c => line.push(c),
    }
}

/// A tenant's budget of plugin log output: token buckets of lines and of
/// bytes per second, so that neither a chatty plugin nor one that writes
/// long lines can flood the host's log. Dropped lines are counted, with
/// their bytes, and reported once lines flow again.
#[derive(Debug)]
pub struct LogBudget {
    lines: DefaultDirectRateLimiter,
    bytes: DefaultDirectRateLimiter,
    dropped_lines: AtomicU64,
    dropped_bytes: AtomicU64,
    tenant: Arc<str>,
}

impl LogBudget {
    /// The default line rate (`log-rate`).
    pub const DEFAULT_LINES_PER_SECOND: u32 = 100;
    /// The default byte rate (`log-bytes-rate`): sixteen full lines a
    /// second, or a hundred of 650 bytes.
    pub const DEFAULT_BYTES_PER_SECOND: u32 = 64 << 10;
    /// The smallest byte rate a configuration may set: its burst (twice the
    /// rate) must hold the longest line with its truncation mark, or long
    /// lines could never be written.
    pub const MIN_BYTES_PER_SECOND: u32 = MAX_LINE as u32;

    /// Allows `lines_per_second` lines and `bytes_per_second` bytes of
    /// plugin text a second on average, bursts of twice either.
    pub fn new(tenant: Arc<str>, lines_per_second: u32, bytes_per_second: u32) -> Self {
        Self {
            lines: bucket(lines_per_second),
            bytes: bucket(bytes_per_second),
            dropped_lines: AtomicU64::new(0),
            dropped_bytes: AtomicU64::new(0),
            tenant,
        }
    }

    /// `text`, the start of a line `total` bytes long, as it may be logged
    /// now ([escaped](escape) and cut), or `None` if it is over budget.
    fn admit<'a>(&self, text: &'a str, total: usize) -> Option<Cow<'a, str>> {
        if self.lines.check().is_err() {
            self.drop_line(total);
            return None;
        }
        let line = escape_cut(text, total);
        let cost = NonZeroU32::new(u32::try_from(line.len()).unwrap_or(u32::MAX));
        if let Some(cost) = cost
            && !matches!(self.bytes.check_n(cost), Ok(Ok(())))
        {
            self.drop_line(total);
            return None;
        }
        let lines = self.dropped_lines.swap(0, Ordering::Relaxed);
        let bytes = self.dropped_bytes.swap(0, Ordering::Relaxed);
        if lines > 0 {
            tracing::warn!(target: "plugin", listener = &*self.tenant, "{lines} plugin log lines dropped ({bytes} bytes; over log-rate or log-bytes-rate)");
        }
        Some(line)
    }

    fn drop_line(&self, bytes: usize) {
        self.dropped_lines.fetch_add(1, Ordering::Relaxed);
        self.dropped_bytes
            .fetch_add(u64::try_from(bytes).unwrap_or(u64::MAX), Ordering::Relaxed);
    }

    /// Lines dropped since the last one that got through.
    pub fn dropped(&self) -> u64 {
        self.dropped_lines.load(Ordering::Relaxed)
    }
}

/// A token bucket of `per_second` a second, bursts of twice that.
fn bucket(per_second: u32) -> DefaultDirectRateLimiter {
    let rate = NonZeroU32::new(per_second).unwrap_or(NonZeroU32::MIN);
    let burst = rate.saturating_mul(NonZeroU32::new(2).unwrap_or(NonZeroU32::MIN));
    RateLimiter::direct(Quota::per_second(rate).allow_burst(burst))
}

/// Carries out a plugin's `log` call, within its tenant's budget.
pub(super) fn log(
    settings: &InstanceSettings,
    plugin: &str,
    peer: Option<SocketAddr>,
    level: Level,
    message: &str,
) {
    let Some(message) = settings.log_budget.admit(message, message.len()) else {
        return;
    };
    let tenant = &*settings.tenant;
    let peer = peer.map(|peer| peer.to_string()).unwrap_or_default();
    match level {
        Level::Trace => {
            tracing::trace!(target: "plugin", listener = tenant, plugin, peer, "{message}")
        }
        Level::Debug => {
            tracing::debug!(target: "plugin", listener = tenant, plugin, peer, "{message}")
        }
        Level::Info => {
            tracing::info!(target: "plugin", listener = tenant, plugin, peer, "{message}")
        }
        Level::Warn => {
            tracing::warn!(target: "plugin", listener = tenant, plugin, peer, "{message}")
        }
        Level::Error => {
            tracing::error!(target: "plugin", listener = tenant, plugin, peer, "{message}")
        }
    }
}

/// A guest's stdout or stderr: each line becomes a host log line.
pub(super) struct GuestOutput {
    pub(super) settings: Arc<InstanceSettings>,
    pub(super) plugin: Arc<str>,
    pub(super) stream: &'static str,
}

impl IsTerminal for GuestOutput {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for GuestOutput {
    fn async_stream(&self) -> Box<dyn AsyncWrite + Send + Sync> {
        Box::new(LineLogger {
            settings: self.settings.clone(),
            plugin: self.plugin.clone(),
            stream: self.stream,
            line: Vec::new(),
            length: 0,
            panic: None,
            blank: false,
        })
    }
}

/// Collects bytes into lines and logs each one, when its newline comes or
/// when the stream goes (with its instance). Only the first [`MAX_LINE`]
/// bytes of a line are kept, so a guest that never writes a newline cannot
/// grow the host's memory, and writes one marked line, not thousands.
struct LineLogger {
    settings: Arc<InstanceSettings>,
    plugin: Arc<str>,
    stream: &'static str,
    /// The start of the current line.
    line: Vec<u8>,
    /// The current line's length so far, kept or not.
    length: usize,
    /// A Rust panic's report being gathered (its lines so far, their
    /// length kept or not, how many): it becomes one warning, not a handful of
    /// `info` lines, when its closing note comes or the stream goes.
    panic: Option<(String, usize, usize)>,
    /// An empty line held back: a Rust panic's report starts with one,
    /// which is dropped if a report follows.
    blank: bool,
}

/// How a Rust panic's report on stderr starts (`thread '<unnamed>'
/// panicked at src/lib.rs:26:21:`, with the thread's id in newer Rusts).
fn is_panic_header(line: &str) -> bool {
    line.starts_with("thread '") && line.contains(" panicked at ")
}

/// How a Rust panic's report ends, backtraces being out of reach (a plugin
/// has no environment to set `RUST_BACKTRACE` in).
const PANIC_NOTE: &str = "note: run with `RUST_BACKTRACE=1`";

impl LineLogger {
    fn emit(&mut self) {
        let text = String::from_utf8_lossy(&self.line).into_owned();
        let (text, length) = match text.strip_suffix('\r') {
            Some(text) if self.length == self.line.len() => (text, self.length - 1),
            _ => (&*text, self.length),
        };
        self.route(text, length);
        self.line.clear();
        self.length = 0;
    }

    /// Logs a whole line, unless it belongs to a panic's report.
    fn route(&mut self, text: &str, length: usize) {
        if let Some((report, total, lines)) = &mut self.panic {
            if text.starts_with(PANIC_NOTE) {
                self.finish_panic();
                return;
            }
            // The header and the message's first line read as one
            // sentence; later lines stay apart, as escaped `\n`s.
            report.push(if *lines == 1 { ' ' } else { '\n' });
            let mut room = MAX_LINE.saturating_sub(report.len()).min(text.len());
            while !text.is_char_boundary(room) {
                room -= 1;
            }
            report.push_str(&text[..room]);
            *total = total.saturating_add(1 + length);
            *lines += 1;
            return;
        }
        if is_panic_header(text) {
            self.blank = false;
            self.panic = Some((text.to_owned(), length, 1));
            return;
        }
        if std::mem::take(&mut self.blank) {
            self.log("");
        }
        if text.is_empty() {
            self.blank = true;
            return;
        }
        self.log_cut(text, length);
    }

    fn log(&self, text: &str) {
        self.log_cut(text, text.len());
    }

    /// Logs `text`, the kept start of a line of `length` bytes.
    fn log_cut(&self, text: &str, length: usize) {
        if let Some(text) = self.settings.log_budget.admit(text, length) {
            let (tenant, plugin) = (&*self.settings.tenant, &*self.plugin);
            tracing::info!(target: "plugin", listener = tenant, plugin, stream = self.stream, "{text}");
        }
    }

    /// Logs the panic's report gathered so far as one warning.
    fn finish_panic(&mut self) {
        let Some((report, total, _)) = self.panic.take() else {
            return;
        };
        if let Some(text) = self.settings.log_budget.admit(&report, total) {
            let (tenant, plugin) = (&*self.settings.tenant, &*self.plugin);
            tracing::warn!(target: "plugin", listener = tenant, plugin, stream = self.stream, "{text}");
        }
    }

    /// Logs whatever is held: a last line without its newline, a panic's
    /// report without its note, an empty line.
    fn finish(&mut self) {
        if self.length > 0 {
            self.emit();
        }
        self.finish_panic();
        if std::mem::take(&mut self.blank) {
            self.log("");
        }
    }

    /// Adds `bytes` (no newline among them) to the current line.
    fn extend(&mut self, bytes: &[u8]) {
        let room = MAX_LINE.saturating_sub(self.line.len());
        self.line.extend_from_slice(&bytes[..bytes.len().min(room)]);
        self.length = self.length.saturating_add(bytes.len());
    }
}

impl AsyncWrite for LineLogger {
    fn poll_write(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let mut lines = buf.split(|&byte| byte == b'\n');
        if let Some(first) = lines.next() {
            self.extend(first);
        }
        for line in lines {
            self.emit();
            self.extend(line);
        }
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.finish();
        Poll::Ready(Ok(()))
    }
}

impl Drop for LineLogger {
    /// The last line of a guest that ended without a newline (or trapped
    /// halfway through one) is logged too.
    fn drop(&mut self) {
        self.finish();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escaping_keeps_plugin_text_on_one_line() {
        let forged = "ok\n1999-12-31T23:59:59Z  WARN wasm_echo::listener::tcp: x\r\x1b[31m\u{9b}2J\u{7f}\0\t\u{2028}\u{202e}";
        assert_eq!(
            escape(forged),
            "ok\\n1999-12-31T23:59:59Z  WARN wasm_echo::listener::tcp: x\\r\\x1b[31m\\u{9b}2J\\x7f\\x00\\t\\u{2028}\\u{202e}"
        );
        assert!(matches!(escape("plain text, café"), Cow::Borrowed(_)));
    }

    #[test]
    fn a_long_line_is_cut_with_a_mark() {
        let long = "x".repeat(20 << 20);
        let line = escape(&long);
        assert_eq!(
            line,
            format!(
                "{}… [truncated, 20971520 bytes in all]",
                "x".repeat(MAX_LINE)
            )
        );
        // Escapes count towards the bound, and none is cut in half.
        let controls = "\x1b".repeat(MAX_LINE);
        let line = escape(&controls);
        let (shown, mark) = line.split_once('…').expect("a mark");
        assert_eq!(shown, "\\x1b".repeat(MAX_LINE / 4));
        assert_eq!(mark, format!(" [truncated, {MAX_LINE} bytes in all]"));
        // The start of a longer line is marked even if it fits.
        assert_eq!(escape_cut("abc", 10), "abc… [truncated, 10 bytes in all]");
    }

    #[test]
    fn the_byte_budget_drops_lines_past_its_burst() {
        let budget = LogBudget::new("t".into(), 1_000_000, LogBudget::MIN_BYTES_PER_SECOND);
        let line = "y".repeat(MAX_LINE);
        // A burst of twice the rate: two full lines, not a third.
        assert!(budget.admit(&line, line.len()).is_some());
        assert!(budget.admit(&line, line.len()).is_some());
        assert!(budget.admit(&line, line.len()).is_none());
        assert_eq!(budget.dropped(), 1);
        assert_eq!(
            budget.dropped_bytes.load(Ordering::Relaxed),
            MAX_LINE as u64
        );
    }

    #[test]
    fn a_cut_line_fits_the_smallest_burst() {
        let budget = LogBudget::new("t".into(), 1_000_000, LogBudget::MIN_BYTES_PER_SECOND);
        let huge = "z".repeat(1 << 20);
        assert!(budget.admit(&huge, huge.len()).is_some());
    }
}
