//! The bounds every plugin call runs within: a deadline and a memory cap.
//! Enforcement lives with the store (`plugin::host`); this module only
//! names the numbers and the errors that say one was hit.

use std::time::Duration;

/// What one plugin instance may use.
#[derive(Clone, Debug)]
pub struct Limits {
    /// Wall-clock time one call (or an instantiation) may run before it is
    /// stopped; the message it was handling fails.
    pub call_timeout: Duration,
    /// Linear memory one instance may grow to, in bytes.
    pub memory_bytes: usize,
    /// Linear memory past which an instance is replaced, between two
    /// messages, by a fresh one of the same version (with its state, when
    /// it offers `state`): a guest whose heap only grows (the JavaScript
    /// and Python runtimes' do, a little every call) is renewed before it
    /// meets `memory_bytes` and fails a message.
    pub recycle_bytes: usize,
    /// Elements one table may hold (function pointers, mostly).
    pub table_elements: usize,
    /// Core instances (and as many tables and memories) one component
    /// instance may create.
    pub instances: usize,
}

impl Limits {
    /// The default deadline: generous for a handler that answers in
    /// microseconds, short enough that a runaway loop is noticed at once.
    pub const DEFAULT_CALL_TIMEOUT: Duration = Duration::from_millis(100);
    /// The default memory cap: room for a Python or JavaScript runtime's
    /// heap, small enough that thousands of connections fit.
    pub const DEFAULT_MEMORY_BYTES: usize = 64 << 20;
    /// The default recycling point for a memory cap: three quarters of
    /// it, which leaves a growing heap room for a few thousand more calls
    /// while the fresh instance starts.
    pub const fn recycle_default(memory_bytes: usize) -> usize {
        memory_bytes / 4 * 3
    }

    /// The default table cap.
    pub const DEFAULT_TABLE_ELEMENTS: usize = 20_000;
    /// The default cap on core instances, tables and memories: a Rust or C
    /// component needs a handful, a JavaScript one a few dozen.
    pub const DEFAULT_INSTANCES: usize = 100;
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            call_timeout: Self::DEFAULT_CALL_TIMEOUT,
            memory_bytes: Self::DEFAULT_MEMORY_BYTES,
            recycle_bytes: Self::recycle_default(Self::DEFAULT_MEMORY_BYTES),
            table_elements: Self::DEFAULT_TABLE_ELEMENTS,
            instances: Self::DEFAULT_INSTANCES,
        }
    }
}

/// A call ran past its deadline; raised from the epoch callback.
#[derive(Debug, thiserror::Error)]
#[error("ran past its {} deadline", humantime::format_duration(*.0))]
pub struct DeadlineExceeded(pub Duration);

/// An instance tried to grow a memory or a table past its cap.
#[derive(Debug, thiserror::Error)]
#[error("tried to grow its {what} to {desired} (limit {limit})")]
pub struct LimitExceeded {
    /// `memory` (bytes) or `table` (elements).
    pub what: &'static str,
    /// The size it asked for.
    pub desired: usize,
    /// The cap.
    pub limit: usize,
}
