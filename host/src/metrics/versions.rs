//! Per-version series: what each live plugin version of a listener did
//! (failures, call and instantiation times, instances, `plugin_info`), and
//! per-listener totals that keep what retired versions counted.
//!
//! Why these are not in the `metrics` recorder like every other series: the
//! Prometheus exporter never forgets a series it has seen, and it has no way
//! to delete one. Its only pruning, `PrometheusBuilder::idle_timeout`, drops
//! any series not updated for a while, so it would also drop a live version
//! that is merely quiet, and detach the handles its sessions hold (their
//! later counts would vanish). A server that reloads every few seconds grew
//! by some 50 lines a version for as long as it ran. So a version's counts
//! live in atomics owned by its [`VersionSeries`], made once when the
//! version is swapped in; when the version's last holder (the tenant, or
//! the last session on it) lets go, the series leave the page and their
//! counts are added to the listener's totals under the same lock the
//! renderer takes, so a total never dips. This module renders them after
//! the exporter's text; every family here is rendered only here.
//!
//! Recording is a few relaxed atomic adds, and nothing at all when no
//! endpoint serves metrics (as with the `metrics` crate without a
//! recorder). Which version a session runs is the tenant's business.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::Duration;

use metrics_exporter_prometheus::formatting::sanitize_label_value;

use super::BUCKETS;
use crate::plugin::CallError;

/// Whether anything renders these series: set once an endpoint is up, so a
/// server without `--metrics` pays nothing per call.
static RECORDING: AtomicBool = AtomicBool::new(false);

/// Every listener's book, for the renderer. Weak: a listener's book goes
/// when its tenant does.
static BOOKS: Mutex<Vec<Weak<Book>>> = Mutex::new(Vec::new());

/// Starts recording (the endpoint calls this when it starts serving).
pub(super) fn start_recording() {
    RECORDING.store(true, Ordering::Relaxed);
}

fn recording() -> bool {
    RECORDING.load(Ordering::Relaxed)
}

/// How a plugin misbehaved, as the `kind` label says it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FailureKind {
    /// It trapped.
    Trap,
    /// It ran past its deadline.
    Deadline,
    /// It hit its memory limit.
    Memory,
    /// Its reply broke max-reply or the UDP amplification bound, or its
    /// replies to a batch did not fit the batch.
    Reply,
}

impl FailureKind {
    const ALL: [Self; 4] = [Self::Trap, Self::Deadline, Self::Memory, Self::Reply];

    fn label(self) -> &'static str {
        match self {
            Self::Trap => "trap",
            Self::Deadline => "deadline",
            Self::Memory => "memory",
            Self::Reply => "reply",
        }
    }
}

impl From<&CallError> for FailureKind {
    fn from(error: &CallError) -> Self {
        match error {
            CallError::Deadline(_) => Self::Deadline,
            CallError::Limit(_) => Self::Memory,
            CallError::Trap { .. } => Self::Trap,
            CallError::Batch(_) => Self::Reply,
        }
    }
}

/// A histogram of durations over [`BUCKETS`], in atomics: each bucket holds
/// the samples above the previous bound and up to its own (rendered
/// cumulatively); samples above the last bound are only in `count`.
#[derive(Debug, Default)]
struct Timings {
    buckets: [AtomicU64; BUCKETS.len()],
    count: AtomicU64,
    nanos: AtomicU64,
}

impl Timings {
    fn record(&self, elapsed: Duration) {
        let seconds = elapsed.as_secs_f64();
        let index = BUCKETS.partition_point(|bound| *bound < seconds);
        if let Some(bucket) = self.buckets.get(index) {
            bucket.fetch_add(1, Ordering::Relaxed);
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        let nanos = u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX);
        self.nanos.fetch_add(nanos, Ordering::Relaxed);
    }

    fn snapshot(&self) -> TimingCounts {
        TimingCounts {
            buckets: std::array::from_fn(|i| self.buckets[i].load(Ordering::Relaxed)),
            count: self.count.load(Ordering::Relaxed),
            nanos: self.nanos.load(Ordering::Relaxed),
        }
    }
}

/// What a [`Timings`] held at one moment; sums of them are the totals.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct TimingCounts {
    buckets: [u64; BUCKETS.len()],
    count: u64,
    nanos: u64,
}

impl TimingCounts {
    fn add(&mut self, other: &Self) {
        for (mine, theirs) in self.buckets.iter_mut().zip(other.buckets) {
            *mine = mine.wrapping_add(theirs);
        }
        self.count = self.count.wrapping_add(other.count);
        self.nanos = self.nanos.wrapping_add(other.nanos);
    }

    /// Writes the `_bucket`, `_sum` and `_count` lines of `name{labels}`.
    fn render(&self, out: &mut String, name: &str, labels: &str) {
        let mut below = 0u64;
        for (bound, count) in BUCKETS.iter().zip(self.buckets) {
            below = below.wrapping_add(count);
            let _ = writeln!(out, "{name}_bucket{{{labels},le=\"{bound}\"}} {below}");
        }
        let _ = writeln!(out, "{name}_bucket{{{labels},le=\"+Inf\"}} {}", self.count);
        let seconds = Duration::from_nanos(self.nanos).as_secs_f64();
        let _ = writeln!(out, "{name}_sum{{{labels}}} {seconds}");
        let _ = writeln!(out, "{name}_count{{{labels}}} {}", self.count);
    }
}

/// What one version (or, summed, a listener) counted.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Counts {
    failures: [u64; FailureKind::ALL.len()],
    calls: TimingCounts,
    instantiations: TimingCounts,
}

impl Counts {
    fn add(&mut self, other: &Self) {
        for (mine, theirs) in self.failures.iter_mut().zip(other.failures) {
            *mine = mine.wrapping_add(theirs);
        }
        self.calls.add(&other.calls);
        self.instantiations.add(&other.instantiations);
    }
}

/// One version's live counts: recorded through its [`VersionSeries`], read
/// by the renderer through the listener's [`Book`].
#[derive(Debug)]
struct Live {
    /// `listener="…",version="…"`, escaped once.
    labels: String,
    /// `plugin="…",digest="…"` for `wasm_echo_plugin_info`; none for
    /// native code.
    info: Option<String>,
    /// Whether it is the version new sessions get.
    current: AtomicBool,
    /// Whether a rollout judges it: its calls are timed then even without
    /// an endpoint, since the gates read them.
    watched: AtomicBool,
    instances: AtomicI64,
    failures: [AtomicU64; FailureKind::ALL.len()],
    calls: Timings,
    instantiations: Timings,
}

impl Live {
    fn snapshot(&self) -> Counts {
        Counts {
            failures: std::array::from_fn(|i| self.failures[i].load(Ordering::Relaxed)),
            calls: self.calls.snapshot(),
            instantiations: self.instantiations.snapshot(),
        }
    }
}

/// One listener's live versions and what its retired ones counted.
#[derive(Debug)]
struct Book {
    /// `listener="…"`, escaped once.
    labels: String,
    state: Mutex<Shelf>,
}

#[derive(Debug, Default)]
struct Shelf {
    live: Vec<Arc<Live>>,
    retired: Counts,
}

/// What `wasm_echo_plugin_info` says about a version.
#[derive(Clone, Copy, Debug)]
pub struct PluginInfo<'a> {
    /// The plugin's short name.
    pub name: &'a str,
    /// The first 12 hex digits of its component's sha256.
    pub digest: &'a str,
    /// For a plugin from a registry: the reference it was given (a tag,
    /// maybe) and the manifest digest it runs, for `status`.
    pub registry: Option<(&'a str, &'a str)>,
}

/// The per-version series of one listener: makes a [`VersionSeries`] for
/// each version it serves. Held by the listener's metrics.
#[derive(Debug)]
pub struct PluginSeries {
    book: Arc<Book>,
}

impl PluginSeries {
    /// `listener`'s book, known to the renderer from now on.
    pub fn new(listener: &str) -> Self {
        let book = Arc::new(Book {
            labels: format!("listener=\"{}\"", sanitize_label_value(listener)),
            state: Mutex::new(Shelf::default()),
        });
        let mut books = BOOKS.lock().unwrap_or_else(PoisonError::into_inner);
        books.retain(|book| book.strong_count() > 0);
        books.push(Arc::downgrade(&book));
        Self { book }
    }

    /// The series of a version labelled `version` (`name@digest`, or
    /// `native`); `plugin` is what `wasm_echo_plugin_info` says about it.
    /// Made once per version: every session on it shares them.
    pub fn version(&self, version: &str, plugin: Option<PluginInfo<'_>>) -> VersionSeries {
        let live = Arc::new(Live {
            labels: format!(
                "{},version=\"{}\"",
                self.book.labels,
                sanitize_label_value(version)
            ),
            info: plugin.map(|plugin| {
                let mut info = format!(
                    "plugin=\"{}\",digest=\"{}\"",
                    sanitize_label_value(plugin.name),
                    sanitize_label_value(plugin.digest)
                );
                if let Some((reference, pinned)) = plugin.registry {
                    info.push_str(&format!(
                        ",reference=\"{}\",pinned=\"{}\"",
                        sanitize_label_value(reference),
                        sanitize_label_value(pinned)
                    ));
                }
                info
            }),
            current: AtomicBool::new(false),
            watched: AtomicBool::new(false),
            instances: AtomicI64::new(0),
            failures: Default::default(),
            calls: Timings::default(),
            instantiations: Timings::default(),
        });
        self.book
            .state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .live
            .push(live.clone());
        VersionSeries {
            live,
            book: self.book.clone(),
        }
    }
}

/// A version's calls, failures and call-time buckets at one moment, for a
/// rollout's gates.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CallTally {
    /// Calls timed so far.
    pub calls: u64,
    /// Traps, deadline and memory kills so far.
    pub failures: u64,
    /// Calls per bucket of [`BUCKETS`] (not cumulative); calls slower than
    /// the last bound are only in `calls`.
    pub buckets: [u64; BUCKETS.len()],
}

impl CallTally {
    /// What happened between `earlier` and this one.
    #[must_use]
    pub fn since(&self, earlier: &Self) -> Self {
        Self {
            calls: self.calls.saturating_sub(earlier.calls),
            failures: self.failures.saturating_sub(earlier.failures),
            buckets: std::array::from_fn(|i| self.buckets[i].saturating_sub(earlier.buckets[i])),
        }
    }
}

/// One version's series. Dropping it takes them off the page and adds what
/// they counted to the listener's totals.
#[derive(Debug)]
pub struct VersionSeries {
    live: Arc<Live>,
    book: Arc<Book>,
}

impl VersionSeries {
    /// Marks it the version new sessions get (`plugin_info` 1), or a
    /// replaced one still finishing (0).
    pub fn set_current(&self, current: bool) {
        self.live.current.store(current, Ordering::Relaxed);
    }

    /// Times its calls whether or not an endpoint serves metrics: a
    /// rollout's gates read them (see [`VersionSeries::tally`]).
    pub fn watch(&self, watched: bool) {
        self.live.watched.store(watched, Ordering::Relaxed);
    }

    /// What a rollout's gates read now: calls so far, failures that mean
    /// the code is unfit (traps, deadline and memory kills; a refused reply
    /// is the tenant's bound, not a crash), and the calls' time buckets
    /// over [`BUCKETS`]. The gates judge the difference between two of these.
    pub fn tally(&self) -> CallTally {
        let calls = self.live.calls.snapshot();
        let failures = [
            FailureKind::Trap,
            FailureKind::Deadline,
            FailureKind::Memory,
        ]
        .iter()
        .map(|kind| self.live.failures[*kind as usize].load(Ordering::Relaxed))
        .sum();
        CallTally {
            calls: calls.count,
            failures,
            buckets: calls.buckets,
        }
    }

    /// A plugin call took `elapsed`.
    pub fn call(&self, elapsed: Duration) {
        if recording() || self.live.watched.load(Ordering::Relaxed) {
            self.live.calls.record(elapsed);
        }
    }

    /// An instance took `elapsed` to start.
    pub fn instantiated(&self, elapsed: Duration) {
        if recording() {
            self.live.instantiations.record(elapsed);
        }
    }

    /// The plugin failed in a way the host caught.
    pub fn failed(&self, kind: FailureKind) {
        self.live.failures[kind as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// A session on this version began (`up`) or ended.
    pub fn instance(&self, up: bool) {
        let change = if up { 1 } else { -1 };
        self.live.instances.fetch_add(change, Ordering::Relaxed);
    }
}

impl Drop for VersionSeries {
    fn drop(&mut self) {
        let mut shelf = self
            .book
            .state
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        shelf.live.retain(|live| !Arc::ptr_eq(live, &self.live));
        let counted = self.live.snapshot();
        shelf.retired.add(&counted);
    }
}

const FAILURES: &str = "wasm_echo_plugin_failures_total";
const CALLS: &str = "wasm_echo_plugin_call_seconds";
const INSTANTIATIONS: &str = "wasm_echo_instantiation_seconds";
const INSTANCES: &str = "wasm_echo_instances";
const INFO: &str = "wasm_echo_plugin_info";
const TOTAL_FAILURES: &str = "wasm_echo_listener_plugin_failures_total";
const TOTAL_CALLS: &str = "wasm_echo_listener_plugin_call_seconds";
const TOTAL_INSTANTIATIONS: &str = "wasm_echo_listener_instantiation_seconds";

/// The families rendered here, with their types, in page order.
const FAMILIES: [(&str, &str); 8] = [
    (FAILURES, "counter"),
    (CALLS, "histogram"),
    (INSTANTIATIONS, "histogram"),
    (INSTANCES, "gauge"),
    (INFO, "gauge"),
    (TOTAL_FAILURES, "counter"),
    (TOTAL_CALLS, "histogram"),
    (TOTAL_INSTANTIATIONS, "histogram"),
];

/// Appends every listener's per-version series and totals to `out`, in
/// Prometheus text, one block per family.
pub fn render(out: &mut String) {
    let books: Vec<Arc<Book>> = BOOKS
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .iter()
        .filter_map(Weak::upgrade)
        .collect();
    let mut families: [String; FAMILIES.len()] = Default::default();
    for book in &books {
        render_book(book, &mut families);
    }
    for ((name, kind), lines) in FAMILIES.iter().zip(families) {
        if lines.is_empty() {
            continue;
        }
        let _ = writeln!(out, "# TYPE {name} {kind}");
        out.push_str(&lines);
        out.push('\n');
    }
}

/// Renders one listener's series into the families' buffers. Its counts
/// are read under its lock, so a version retiring meanwhile is counted
/// once: either live or in the totals.
fn render_book(book: &Book, families: &mut [String; FAMILIES.len()]) {
    let [
        failures,
        calls,
        instantiations,
        instances,
        info,
        total_failures,
        total_calls,
        total_instantiations,
    ] = families;
    let shelf = book.state.lock().unwrap_or_else(PoisonError::into_inner);
    let mut totals = shelf.retired;
    for live in &shelf.live {
        let counts = live.snapshot();
        totals.add(&counts);
        let labels = &live.labels;
        for (kind, count) in FailureKind::ALL.iter().zip(counts.failures) {
            if count > 0 {
                let kind = kind.label();
                let _ = writeln!(failures, "{}{{{labels},kind=\"{kind}\"}} {count}", FAILURES);
            }
        }
        counts.calls.render(calls, CALLS, labels);
        counts
            .instantiations
            .render(instantiations, INSTANTIATIONS, labels);
        let _ = writeln!(
            instances,
            "{}{{{labels}}} {}",
            INSTANCES,
            live.instances.load(Ordering::Relaxed)
        );
        if let Some(plugin) = &live.info {
            let current = u8::from(live.current.load(Ordering::Relaxed));
            let _ = writeln!(info, "{}{{{labels},{plugin}}} {current}", INFO);
        }
    }
    drop(shelf);
    let labels = &book.labels;
    for (kind, count) in FailureKind::ALL.iter().zip(totals.failures) {
        let kind = kind.label();
        let _ = writeln!(
            total_failures,
            "{}{{{labels},kind=\"{kind}\"}} {count}",
            TOTAL_FAILURES
        );
    }
    totals.calls.render(total_calls, TOTAL_CALLS, labels);
    totals
        .instantiations
        .render(total_instantiations, TOTAL_INSTANTIATIONS, labels);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The lines of the rendered page that name `listener`.
    fn lines_of(listener: &str) -> Vec<String> {
        let mut page = String::new();
        render(&mut page);
        let needle = format!("listener=\"{listener}\"");
        page.lines()
            .filter(|line| line.contains(&needle))
            .map(str::to_owned)
            .collect()
    }

    fn value(lines: &[String], prefix: &str) -> Option<f64> {
        lines
            .iter()
            .find(|line| line.starts_with(prefix))
            .and_then(|line| line.rsplit(' ').next()?.parse().ok())
    }

    #[test]
    fn a_retired_version_leaves_the_page_and_its_counts_stay_in_the_totals() {
        start_recording();
        let series = PluginSeries::new("retire-test");
        let mut current = series.version(
            "p@000000000000",
            Some(PluginInfo {
                name: "p",
                digest: "000000000000",
                registry: None,
            }),
        );
        current.set_current(true);
        current.call(Duration::from_micros(3));
        current.failed(FailureKind::Trap);
        let size = lines_of("retire-test").len();
        for n in 1..=50 {
            let digest = format!("{n:012}");
            let next = series.version(
                &format!("p@{digest}"),
                Some(PluginInfo {
                    name: "p",
                    digest: &digest,
                    registry: None,
                }),
            );
            next.set_current(true);
            current.set_current(false);
            // The replaced version goes with its last holder.
            current = next;
            current.call(Duration::from_millis(2));
        }
        current.failed(FailureKind::Reply);
        let lines = lines_of("retire-test");
        assert_eq!(lines.len(), size, "{lines:#?}");
        assert!(!lines.iter().any(|line| line.contains("p@000000000000")));
        let calls = "wasm_echo_listener_plugin_call_seconds_count{listener=\"retire-test\"}";
        assert_eq!(value(&lines, calls), Some(51.0));
        let traps =
            "wasm_echo_listener_plugin_failures_total{listener=\"retire-test\",kind=\"trap\"}";
        assert_eq!(value(&lines, traps), Some(1.0));
        drop(current);
        let lines = lines_of("retire-test");
        assert!(
            !lines.iter().any(|line| line.contains("version=")),
            "{lines:#?}"
        );
        let replies =
            "wasm_echo_listener_plugin_failures_total{listener=\"retire-test\",kind=\"reply\"}";
        assert_eq!(value(&lines, replies), Some(1.0));
        assert_eq!(value(&lines, calls), Some(51.0));
    }

    #[test]
    fn buckets_are_cumulative_and_the_count_includes_the_slowest() {
        let timings = Timings::default();
        timings.record(Duration::from_nanos(500));
        timings.record(Duration::from_millis(3));
        timings.record(Duration::from_secs(120));
        let mut out = String::new();
        timings.snapshot().render(&mut out, "t", "l=\"x\"");
        assert!(
            out.contains("t_bucket{l=\"x\",le=\"0.000001\"} 1\n"),
            "{out}"
        );
        assert!(out.contains("t_bucket{l=\"x\",le=\"0.005\"} 2\n"), "{out}");
        assert!(out.contains("t_bucket{l=\"x\",le=\"60\"} 2\n"), "{out}");
        assert!(out.contains("t_bucket{l=\"x\",le=\"+Inf\"} 3\n"), "{out}");
        assert!(out.contains("t_count{l=\"x\"} 3\n"), "{out}");
    }
}
