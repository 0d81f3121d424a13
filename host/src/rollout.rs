//! Safe rollout: a listener runs a candidate version beside its stable one,
//! and gates, not a person, decide whether it takes over.
//!
//! - **canary**: a share of the traffic goes to the candidate (new TCP
//!   connections, and UDP peers by a hash of their address with a seed of
//!   the rollout's own, so a peer stays on one version), raised step by
//!   step, an interval apart, while the candidate stays healthy;
//! - **shadow**: every message goes to the stable version, whose reply
//!   alone is sent and whose `next` alone is obeyed; a copy goes, after
//!   that reply, through a bounded queue to the candidate, whose reply is
//!   compared with it. A candidate that falls behind loses copies
//!   (counted), never the stable version's time.
//!
//! At the end of each interval the gates judge what the interval saw
//! ([`judge`]): enough candidate calls, its failure rate, its call-time p99
//! against the stable version's, and in shadow mode its rate of differing
//! replies. A candidate that fails a gate `failure-limit` times in a row is
//! rolled back (all traffic to stable); one that passes its last step is
//! promoted with the reload's own swap ([`Reloader::promote`]).
//!
//! Which session a message goes to is the tenant's and the listeners'
//! business; this module owns the plan, the state, the gates and the
//! driver, and the control socket's `rollout` verbs.

use std::collections::BTreeMap;
use std::fmt;
use std::hash::{BuildHasher, RandomState};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::Duration;

use metrics::{Counter, Gauge, counter, gauge};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::metrics::{BUCKETS, CallTally};
use crate::plugin::{Connection, PluginConfig, PluginSource};
use crate::reload::{ReloadError, Reloader};
use crate::tenant::{Session, Tenant, Version};

/// How the candidate gets its traffic.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// A share of the traffic, raised in steps.
    #[default]
    Canary,
    /// A copy of every message; its replies are compared, never sent.
    Shadow,
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Canary => "canary",
            Self::Shadow => "shadow",
        })
    }
}

/// A rollout as the TOML table `[listeners.NAME.rollout]` and `wasm-echo
/// rollout start` give it, before defaults and checks. Every key is
/// documented in wasm-echo.example.toml.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
#[allow(missing_docs)] // the keys are documented in wasm-echo.example.toml
pub struct RawRollout {
    pub candidate: String,
    pub mode: Option<Mode>,
    pub steps: Option<Vec<u8>>,
    pub interval: Option<String>,
    pub min_calls: Option<u64>,
    pub max_failure_rate: Option<f64>,
    pub max_p99_ratio: Option<f64>,
    pub max_diff_rate: Option<f64>,
    pub failure_limit: Option<u32>,
    /// The candidate's own plugin settings; the listener's when absent.
    pub plugin_config: Option<BTreeMap<String, String>>,
}

/// The gates and the pace of a rollout, resolved and checked.
#[derive(Clone, Debug, PartialEq)]
pub struct Settings {
    /// Canary or shadow.
    pub mode: Mode,
    /// The candidate's share at each step, in percent, rising to 100 (in
    /// shadow mode only their number counts: the intervals to pass).
    pub steps: Vec<u8>,
    /// How long each judgement watches.
    pub interval: Duration,
    /// Fewer candidate calls than this in an interval: no judgement.
    pub min_calls: u64,
    /// The candidate's largest failure rate (traps, deadline and memory
    /// kills per call) that passes.
    pub max_failure_rate: f64,
    /// The largest candidate call-time p99 that passes, as a multiple of
    /// the stable version's over the same interval.
    pub max_p99_ratio: f64,
    /// Shadow mode: the largest share of differing replies that passes.
    pub max_diff_rate: f64,
    /// Failed judgements in a row that roll the candidate back.
    pub failure_limit: u32,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            mode: Mode::Canary,
            steps: vec![10, 25, 50, 100],
            interval: Duration::from_secs(30),
            min_calls: 100,
            max_failure_rate: 0.01,
            max_p99_ratio: 2.0,
            max_diff_rate: 0.01,
            failure_limit: 3,
        }
    }
}

/// A rollout to start: the candidate, its settings and the gates.
#[derive(Clone, Debug)]
pub struct Plan {
    /// Where the candidate comes from.
    pub candidate: PluginSource,
    /// The candidate's plugin settings; the listener's when `None`.
    pub plugin_config: Option<PluginConfig>,
    /// Its pace and gates.
    pub settings: Settings,
}

impl RawRollout {
    /// Checks every key and fills in the defaults; `base` resolves a
    /// relative candidate path (the configuration file's folder).
    ///
    /// # Errors
    ///
    /// The key at fault and why, for the caller to place.
    pub fn resolve(self, base: &std::path::Path) -> Result<Plan, (&'static str, String)> {
        let defaults = Settings::default();
        let candidate = match PluginSource::parse(&self.candidate) {
            Ok(PluginSource::File(file)) if file.is_relative() => {
                PluginSource::File(base.join(file))
            }
            Ok(source) => source,
            Err(error) => return Err(("candidate", error.to_string())),
        };
        let mode = self.mode.unwrap_or_default();
        let steps = self.steps.unwrap_or(defaults.steps);
        if steps.is_empty() || steps.len() > 100 {
            return Err((
                "steps",
                "give 1 to 100 steps, e.g. [10, 25, 50, 100]".into(),
            ));
        }
        if steps.iter().any(|step| !(1..=100).contains(step))
            || steps.windows(2).any(|pair| pair[0] >= pair[1])
        {
            return Err((
                "steps",
                format!("{steps:?}: weights must rise, each from 1 to 100"),
            ));
        }
        if mode == Mode::Canary && steps.last() != Some(&100) {
            return Err((
                "steps",
                format!("{steps:?}: a canary's last step must be 100, where it is promoted"),
            ));
        }
        let interval = match self.interval {
            None => defaults.interval,
            Some(text) => humantime::parse_duration(&text)
                .map_err(|error| ("interval", format!("`{text}`: {error}")))?,
        };
        if !(Duration::from_millis(100)..=Duration::from_secs(24 * 3600)).contains(&interval) {
            return Err(("interval", "must be from 100ms to 24h".into()));
        }
        let rate = |key: &'static str, value: Option<f64>, default: f64| match value {
            None => Ok(default),
            Some(rate) if (0.0..=1.0).contains(&rate) => Ok(rate),
            Some(rate) => Err((key, format!("{rate} is not a rate from 0 to 1"))),
        };
        let max_p99_ratio = self.max_p99_ratio.unwrap_or(defaults.max_p99_ratio);
        if !(1.0..=1000.0).contains(&max_p99_ratio) {
            return Err((
                "max-p99-ratio",
                format!("{max_p99_ratio} is not from 1 to 1000"),
            ));
        }
        let failure_limit = self.failure_limit.unwrap_or(defaults.failure_limit);
        if !(1..=1000).contains(&failure_limit) {
            return Err((
                "failure-limit",
                format!("{failure_limit} is not from 1 to 1000"),
            ));
        }
        Ok(Plan {
            candidate,
            plugin_config: self.plugin_config,
            settings: Settings {
                mode,
                steps,
                interval,
                min_calls: self.min_calls.unwrap_or(defaults.min_calls).max(1),
                max_failure_rate: rate(
                    "max-failure-rate",
                    self.max_failure_rate,
                    defaults.max_failure_rate,
                )?,
                max_p99_ratio,
                max_diff_rate: rate("max-diff-rate", self.max_diff_rate, defaults.max_diff_rate)?,
                failure_limit,
            },
        })
    }
}

// The gates.

/// What one interval saw of both versions.
#[derive(Clone, Copy, Debug, Default)]
pub struct Interval {
    /// The stable version's calls, failures and times.
    pub stable: CallTally,
    /// The candidate's.
    pub candidate: CallTally,
    /// Shadow mode: candidate replies equal to the stable one.
    pub same: u64,
    /// Shadow mode: candidate replies that differ.
    pub different: u64,
}

/// The figures the gates judged, for status and metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Figures {
    /// Candidate calls in the interval.
    pub calls: u64,
    /// Its failures per call.
    pub failure_rate: f64,
    /// Its call-time p99 over the stable version's, when both had calls.
    pub p99_ratio: Option<f64>,
    /// Shadow mode: differing replies per comparison.
    pub diff_rate: Option<f64>,
}

/// What the gates say of one interval.
#[derive(Clone, Debug, PartialEq)]
pub enum Verdict {
    /// Too few calls to judge.
    Wait,
    /// Every gate passed.
    Pass,
    /// A gate failed, and why.
    Fail(String),
}

/// The p99 of calls counted per bucket of [`BUCKETS`] (`calls` in all,
/// slower ones beyond the last bound), in seconds, interpolated within
/// its bucket as Prometheus's `histogram_quantile` does; `None` without
/// calls.
pub fn p99(buckets: &[u64], calls: u64) -> Option<f64> {
    if calls == 0 {
        return None;
    }
    #[allow(clippy::cast_precision_loss)] // counts far below 2^52
    let rank = 0.99 * calls as f64;
    let mut below = 0u64;
    let mut lower = 0.0;
    for (bound, count) in BUCKETS.iter().zip(buckets) {
        #[allow(clippy::cast_precision_loss)]
        if *count > 0 && (below + count) as f64 >= rank {
            let into = (rank - below as f64) / *count as f64;
            return Some(lower + (bound - lower) * into.clamp(0.0, 1.0));
        }
        below += count;
        lower = *bound;
    }
    BUCKETS.last().copied()
}

/// Judges one interval against `settings`: the failure rate first, then the
/// p99 ratio (only when the stable version had calls too: at a canary's
/// 100% it has none), then, in shadow mode, the rate of differing replies.
pub fn judge(settings: &Settings, interval: &Interval) -> (Figures, Verdict) {
    let calls = interval.candidate.calls;
    #[allow(clippy::cast_precision_loss)]
    let failure_rate = if calls == 0 {
        0.0
    } else {
        interval.candidate.failures as f64 / calls as f64
    };
    let p99_ratio = match (
        p99(&interval.candidate.buckets, calls),
        p99(&interval.stable.buckets, interval.stable.calls),
    ) {
        // A floor of a microsecond, the finest bucket: below it the ratio
        // of two near-zero times says nothing.
        (Some(candidate), Some(stable)) => Some(candidate.max(1e-6) / stable.max(1e-6)),
        _ => None,
    };
    let compared = interval.same + interval.different;
    #[allow(clippy::cast_precision_loss)]
    let diff_rate = (settings.mode == Mode::Shadow && compared > 0)
        .then(|| interval.different as f64 / compared as f64);
    let figures = Figures {
        calls,
        failure_rate,
        p99_ratio,
        diff_rate,
    };
    if calls < settings.min_calls {
        return (figures, Verdict::Wait);
    }
    if failure_rate > settings.max_failure_rate {
        return (
            figures,
            Verdict::Fail(format!(
                "failure rate {:.2}% over max-failure-rate {:.2}% ({} of {calls} calls)",
                failure_rate * 100.0,
                settings.max_failure_rate * 100.0,
                interval.candidate.failures
            )),
        );
    }
    if let Some(ratio) = p99_ratio
        && ratio > settings.max_p99_ratio
    {
        return (
            figures,
            Verdict::Fail(format!(
                "call-time p99 {ratio:.2}x the stable version's, over max-p99-ratio {}",
                settings.max_p99_ratio
            )),
        );
    }
    if let Some(rate) = diff_rate
        && rate > settings.max_diff_rate
    {
        return (
            figures,
            Verdict::Fail(format!(
                "{:.2}% of replies differ, over max-diff-rate {:.2}% ({} of {compared})",
                rate * 100.0,
                settings.max_diff_rate * 100.0,
                interval.different
            )),
        );
    }
    (figures, Verdict::Pass)
}

// The state.

/// How a rollout ended, as `wasm_echo_rollouts_total`'s `outcome` says.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Outcome {
    /// The candidate became the stable version.
    Promoted,
    /// The gates sent all traffic back to stable.
    RolledBack,
    /// An operator sent all traffic back to stable.
    Aborted,
}

impl Outcome {
    fn label(self) -> &'static str {
        match self {
            Self::Promoted => "promoted",
            Self::RolledBack => "rolled-back",
            Self::Aborted => "aborted",
        }
    }
}

/// A rollout as `rollout status` reports it.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Report {
    /// The listener.
    pub listener: String,
    /// `name@digest` of the stable version.
    pub stable: String,
    /// `name@digest` of the candidate.
    pub candidate: String,
    /// Canary or shadow.
    pub mode: Mode,
    /// The step it is at (1-based), of `steps`.
    pub step: usize,
    /// How many steps there are.
    pub steps: usize,
    /// The candidate's share now, in percent (0 in shadow mode).
    pub weight: u8,
    /// Failed judgements in a row so far, of `failure_limit`.
    pub failures_in_a_row: u32,
    /// Failed judgements in a row that roll back.
    pub failure_limit: u32,
    /// The last interval's figures.
    pub figures: Figures,
    /// What the last judgement said.
    pub verdict: String,
    /// Shadow mode: replies compared equal, so far.
    pub same: u64,
    /// Shadow mode: replies that differed, so far.
    pub different: u64,
    /// Shadow mode: copies the candidate fell too far behind to take.
    pub shadow_dropped: u64,
    /// How it ended, once it has.
    pub outcome: Option<Outcome>,
    /// Why it ended.
    pub reason: Option<String>,
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "listener `{}`: {} {} -> {}, step {}/{}, weight {}%, failed {}/{} in a row; \
             last interval {} calls, failure rate {:.2}%",
            self.listener,
            self.mode,
            self.stable,
            self.candidate,
            self.step,
            self.steps,
            self.weight,
            self.failures_in_a_row,
            self.failure_limit,
            self.figures.calls,
            self.figures.failure_rate * 100.0,
        )?;
        if let Some(ratio) = self.figures.p99_ratio {
            write!(f, ", p99 ratio {ratio:.2}")?;
        }
        if self.mode == Mode::Shadow {
            write!(
                f,
                "; replies same {}, different {}, dropped {}",
                self.same, self.different, self.shadow_dropped
            )?;
        }
        if !self.verdict.is_empty() {
            write!(f, "; {}", self.verdict)?;
        }
        match (self.outcome, &self.reason) {
            (Some(outcome), Some(reason)) => write!(f, "; {}: {reason}", outcome.label()),
            (Some(outcome), None) => write!(f, "; {}", outcome.label()),
            _ => Ok(()),
        }
    }
}

/// The rollout's series in `/metrics`.
struct Series {
    state: Gauge,
    weight: Gauge,
    step: Gauge,
    failure_rate: Gauge,
    p99_ratio: Gauge,
    diff_rate: Gauge,
    same: Counter,
    different: Counter,
    dropped: Counter,
}

impl Series {
    fn new(listener: &str) -> Self {
        let l = listener.to_owned();
        let gate = |name: &'static str| gauge!("wasm_echo_rollout_gate", "listener" => l.clone(), "gate" => name);
        let compared = |result: &'static str| counter!("wasm_echo_shadow_comparisons_total", "listener" => l.clone(), "result" => result);
        Self {
            state: gauge!("wasm_echo_rollout_state", "listener" => l.clone()),
            weight: gauge!("wasm_echo_rollout_weight", "listener" => l.clone()),
            step: gauge!("wasm_echo_rollout_step", "listener" => l.clone()),
            failure_rate: gate("failure-rate"),
            p99_ratio: gate("p99-ratio"),
            diff_rate: gate("diff-rate"),
            same: compared("same"),
            different: compared("different"),
            dropped: counter!("wasm_echo_shadow_dropped_total", "listener" => l.clone()),
        }
    }
}

/// How many message copies a shadow candidate may have waiting: enough to
/// ride out a slow call, few enough that one that stays behind costs a
/// bounded amount of memory (copies past it are dropped and counted).
const SHADOW_QUEUE: usize = 1024;

/// A running (or finished) rollout on one listener: shared by the driver,
/// the listeners that route by it and the control socket.
pub struct Rollout {
    listener: String,
    /// The stable version's label when it started.
    stable: Arc<str>,
    candidate: Arc<Version>,
    /// What the candidate's instances are started with (its own plugin
    /// settings, the listener's limits).
    instance_settings: Arc<crate::plugin::InstanceSettings>,
    settings: Settings,
    /// The candidate's share now, in percent: read for every new
    /// connection and every datagram.
    weight: AtomicU8,
    step: AtomicUsize,
    failures_in_a_row: AtomicU32,
    /// The per-rollout seed of the peer hash: which peers go first differs
    /// from one rollout to the next.
    seed: RandomState,
    same: AtomicU64,
    different: AtomicU64,
    dropped: AtomicU64,
    /// Fires when it ends: shadow workers stop, the driver stops.
    ended: CancellationToken,
    /// Set by whoever ends it, so it ends once.
    finished: AtomicBool,
    /// The UDP listener's shadow feed, made with its first copy.
    udp_shadow: OnceLock<ShadowFeed>,
    /// What status shows between judgements.
    report: Mutex<Report>,
    /// Where shadow workers run: the server's multi-threaded runtime, not
    /// the UDP listener's own thread, so a slow candidate never holds it.
    runtime: tokio::runtime::Handle,
    series: Series,
}

impl Rollout {
    /// The candidate version.
    pub fn candidate(&self) -> &Arc<Version> {
        &self.candidate
    }

    /// What the candidate's instances start with.
    pub fn instance_settings(&self) -> &Arc<crate::plugin::InstanceSettings> {
        &self.instance_settings
    }

    /// Canary or shadow.
    pub fn mode(&self) -> Mode {
        self.settings.mode
    }

    /// Whether a canary sends `peer` to the candidate now. A stable hash
    /// of the address with the rollout's seed, against the weight: a peer
    /// stays put within a step, and as the weight rises peers only move
    /// from stable to the candidate, never back.
    pub fn picks(&self, peer: SocketAddr) -> bool {
        self.settings.mode == Mode::Canary
            && (self.seed.hash_one(peer) % 100) < u64::from(self.weight.load(Ordering::Relaxed))
    }

    /// Shadow mode: the UDP listener's feed (its worker is started with
    /// the first copy).
    pub fn udp_shadow(self: &Arc<Self>, tenant: &Arc<Tenant>) -> &ShadowFeed {
        self.udp_shadow
            .get_or_init(|| ShadowFeed::start(tenant.clone(), self.clone(), None))
    }

    /// Shadow mode: a feed for one TCP connection, whose candidate instance
    /// is opened with `conn`.
    pub fn tcp_shadow(
        self: &Arc<Self>,
        tenant: &Arc<Tenant>,
        conn: Connection,
        peer: SocketAddr,
    ) -> ShadowFeed {
        ShadowFeed::start(tenant.clone(), self.clone(), Some((conn, peer)))
    }

    /// What status shows now.
    pub fn report(&self) -> Report {
        let mut report = self
            .report
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        report.same = self.same.load(Ordering::Relaxed);
        report.different = self.different.load(Ordering::Relaxed);
        report.shadow_dropped = self.dropped.load(Ordering::Relaxed);
        report
    }

    fn compared(&self, same: bool) {
        if same {
            self.same.fetch_add(1, Ordering::Relaxed);
            self.series.same.increment(1);
        } else {
            self.different.fetch_add(1, Ordering::Relaxed);
            self.series.different.increment(1);
        }
    }

    fn set_step(&self, step: usize) {
        let weight = match self.settings.mode {
            Mode::Canary => self.settings.steps.get(step).copied().unwrap_or(100),
            Mode::Shadow => 0,
        };
        self.step.store(step, Ordering::Relaxed);
        self.weight.store(weight, Ordering::Relaxed);
        self.series.weight.set(f64::from(weight));
        #[allow(clippy::cast_precision_loss)]
        self.series.step.set((step + 1) as f64);
        let mut report = self.report.lock().unwrap_or_else(PoisonError::into_inner);
        report.step = step + 1;
        report.weight = weight;
    }
}

// Shadow traffic.

/// One copy for a shadow candidate: the message and the stable reply.
struct Copy {
    /// The datagram's sender; `None` for a TCP message.
    peer: Option<SocketAddr>,
    data: Vec<u8>,
    stable: Option<Vec<u8>>,
}

/// Where a conversation's copies go: a bounded queue to a worker that runs
/// them through a candidate instance of its own. Dropping it ends the
/// worker (after `on-close`, for a connection's).
pub struct ShadowFeed {
    queue: mpsc::Sender<Copy>,
    rollout: Arc<Rollout>,
}

impl ShadowFeed {
    fn start(
        tenant: Arc<Tenant>,
        rollout: Arc<Rollout>,
        open: Option<(Connection, SocketAddr)>,
    ) -> Self {
        let (queue, copies) = mpsc::channel(SHADOW_QUEUE);
        rollout
            .runtime
            .spawn(shadow(tenant, rollout.clone(), copies, open));
        Self { queue, rollout }
    }

    /// Offers the candidate a copy of a datagram from `peer` (`None` for a
    /// TCP message) and the reply the stable version sent. Called after
    /// that reply is on its way; never waits: a full queue drops the copy
    /// (counted).
    pub fn offer(&self, peer: Option<SocketAddr>, data: &[u8], stable: Option<&[u8]>) {
        // A copy per message is the price of shadowing, paid only then.
        let copy = Copy {
            peer,
            data: data.to_vec(),
            stable: stable.map(<[u8]>::to_vec),
        };
        if self.queue.try_send(copy).is_err() {
            self.rollout.dropped.fetch_add(1, Ordering::Relaxed);
            self.rollout.series.dropped.increment(1);
        }
    }
}

/// A shadow worker: runs each copy through a candidate instance and
/// compares its reply with the stable one. A failed call is counted in the
/// candidate's series (the gates read it) and the instance is replaced;
/// the candidate's `next` is ignored.
async fn shadow(
    tenant: Arc<Tenant>,
    rollout: Arc<Rollout>,
    mut copies: mpsc::Receiver<Copy>,
    open: Option<(Connection, SocketAddr)>,
) {
    let mut session: Option<Session> = None;
    loop {
        let copy = tokio::select! {
            () = rollout.ended.cancelled() => break,
            copy = copies.recv() => match copy {
                Some(copy) => copy,
                None => break,
            },
        };
        if session.is_none() {
            session = start_shadow_session(&tenant, &rollout, open.as_ref()).await;
        }
        let Some(live) = session.as_mut() else {
            continue;
        };
        let called = match copy.peer {
            Some(peer) => live.on_datagram(peer, &copy.data).await,
            None => live.on_message(&copy.data).await,
        };
        match called {
            Ok(decision) => rollout.compared(decision.reply == copy.stable),
            Err(error) => {
                tracing::debug!(listener = tenant.name(), "shadow candidate failed: {error}");
                session = None;
            }
        }
    }
    if open.is_some()
        && let Some(mut live) = session
        && let Err(error) = live.on_close().await
    {
        tracing::debug!(
            listener = tenant.name(),
            "shadow candidate's on-close failed: {error}"
        );
    }
}

async fn start_shadow_session(
    tenant: &Tenant,
    rollout: &Rollout,
    open: Option<&(Connection, SocketAddr)>,
) -> Option<Session> {
    let mut session = match tenant.candidate_session(rollout).await {
        Ok(session) => session,
        Err(error) => {
            tracing::debug!(
                listener = tenant.name(),
                "shadow candidate did not start: {error}"
            );
            return None;
        }
    };
    if let Some((conn, peer)) = open {
        // Its greeting is not compared: the peer only ever got stable's.
        if let Err(error) = session.on_open(conn, *peer).await {
            tracing::debug!(
                listener = tenant.name(),
                "shadow candidate's on-open failed: {error}"
            );
            return None;
        }
    }
    Some(session)
}

// Starting, driving and ending.

/// Why a rollout request changed nothing.
#[derive(Debug, thiserror::Error)]
pub enum RolloutError {
    /// The listener is unknown, or the candidate does not load or start.
    #[error(transparent)]
    Reload(#[from] ReloadError),
    /// A `[listeners.NAME.rollout]` setting or a flag is out of range.
    #[error("listener `{listener}`: rollout `{key}`: {reason}")]
    Setting {
        /// Whose rollout.
        listener: String,
        /// The key at fault.
        key: &'static str,
        /// Why.
        reason: String,
    },
    /// One rollout at a time per listener.
    #[error("listener `{0}` already has a rollout running; promote or abort it first")]
    Running(String),
    /// Nothing to promote or abort.
    #[error("listener `{0}` has no rollout running")]
    NotRunning(String),
    /// The candidate is the version already serving.
    #[error("listener `{listener}` already runs {version}; a candidate must differ")]
    Same {
        /// Whose rollout.
        listener: String,
        /// The version.
        version: String,
    },
}

/// Starts a rollout of `plan` on `listener`: loads the candidate off the
/// serving path, starts one instance of it with its settings, and only then
/// routes traffic to it. A failure changes nothing.
///
/// # Errors
///
/// A [`RolloutError`] saying why nothing changed.
pub async fn start(
    reloader: &Arc<Reloader>,
    listener: &str,
    plan: Plan,
) -> Result<Report, RolloutError> {
    let tenant = reloader.tenant(listener)?.clone();
    if tenant.rollout().is_some() {
        return Err(RolloutError::Running(listener.to_owned()));
    }
    let stable = tenant
        .current()
        .ok_or_else(|| ReloadError::Native(listener.to_owned()))?;
    let plugin = reloader.load(&tenant, &plan.candidate).await?;
    if plugin.digest() == stable.digest() && plugin.name() == stable.name() {
        return Err(RolloutError::Same {
            listener: listener.to_owned(),
            version: stable.version(),
        });
    }
    let instance_settings = tenant.candidate_settings(plan.plugin_config);
    crate::plugin::Instance::new(&plugin, instance_settings.clone())
        .await
        .map_err(|error| ReloadError::Start {
            listener: listener.to_owned(),
            version: plugin.version(),
            error,
        })?;
    let candidate = tenant.candidate_version(plugin);
    let settings = plan.settings;
    let rollout = Arc::new(Rollout {
        listener: listener.to_owned(),
        stable: stable.version().into(),
        report: Mutex::new(Report {
            listener: listener.to_owned(),
            stable: stable.version(),
            candidate: candidate.label().to_string(),
            mode: settings.mode,
            steps: settings.steps.len(),
            failure_limit: settings.failure_limit,
            verdict: "waiting for the first interval".to_owned(),
            ..Report::default()
        }),
        candidate,
        instance_settings,
        weight: AtomicU8::new(0),
        step: AtomicUsize::new(0),
        failures_in_a_row: AtomicU32::new(0),
        seed: RandomState::new(),
        same: AtomicU64::new(0),
        different: AtomicU64::new(0),
        dropped: AtomicU64::new(0),
        ended: CancellationToken::new(),
        finished: AtomicBool::new(false),
        udp_shadow: OnceLock::new(),
        runtime: tokio::runtime::Handle::current(),
        series: Series::new(listener),
        settings,
    });
    rollout.series.state.set(match rollout.settings.mode {
        Mode::Canary => 1.0,
        Mode::Shadow => 2.0,
    });
    rollout.set_step(0);
    // The gates read call times whether or not metrics are served.
    tenant.version_series_watch(true);
    rollout.candidate.series().watch(true);
    if !tenant.begin_rollout(rollout.clone()) {
        return Err(RolloutError::Running(listener.to_owned()));
    }
    tracing::info!(
        listener,
        "rollout started: {} {} -> {}, steps {:?} every {}",
        rollout.settings.mode,
        rollout.stable,
        rollout.candidate.label(),
        rollout.settings.steps,
        humantime::format_duration(rollout.settings.interval)
    );
    tokio::spawn(drive(reloader.clone(), tenant, rollout.clone()));
    Ok(rollout.report())
}

/// The reports of `listener`'s rollout (every listener's when `None`):
/// the running one, or else the last one, finished.
///
/// # Errors
///
/// An unknown listener.
pub fn status(reloader: &Reloader, listener: Option<&str>) -> Result<Vec<Report>, RolloutError> {
    let tenants: Vec<&Arc<Tenant>> = match listener {
        Some(name) => vec![reloader.tenant(name)?],
        None => reloader.tenants().iter().collect(),
    };
    Ok(tenants
        .into_iter()
        .filter_map(|tenant| tenant.last_rollout().map(|rollout| rollout.report()))
        .collect())
}

/// Promotes `listener`'s candidate now, whatever its step (`promote`), or
/// sends all its traffic back to stable (`abort`).
///
/// # Errors
///
/// An unknown listener, or none running.
pub async fn conclude(
    reloader: &Reloader,
    listener: &str,
    promote: bool,
) -> Result<Report, RolloutError> {
    let tenant = reloader.tenant(listener)?;
    let rollout = tenant
        .rollout()
        .ok_or_else(|| RolloutError::NotRunning(listener.to_owned()))?;
    if promote {
        finish(
            reloader,
            tenant,
            &rollout,
            Outcome::Promoted,
            "promoted by an operator".into(),
        )
        .await;
    } else {
        finish(
            reloader,
            tenant,
            &rollout,
            Outcome::Aborted,
            "aborted by an operator".into(),
        )
        .await;
    }
    Ok(rollout.report())
}

/// Carries out a control socket's `rollout` request.
///
/// # Errors
///
/// A [`RolloutError`] saying why nothing changed.
pub async fn answer(
    reloader: &Arc<Reloader>,
    request: crate::control::Request,
) -> Result<Vec<Report>, RolloutError> {
    use crate::control::Request;
    match request {
        Request::RolloutStart { listener, plan } => {
            // The client sends absolute paths: relative to what else?
            let plan = plan
                .resolve(std::path::Path::new("/"))
                .map_err(|(key, reason)| RolloutError::Setting {
                    listener: listener.clone(),
                    key,
                    reason,
                })?;
            Ok(vec![start(reloader, &listener, plan).await?])
        }
        Request::RolloutStatus { listener } => status(reloader, listener.as_deref()),
        Request::RolloutPromote { listener } => {
            Ok(vec![conclude(reloader, &listener, true).await?])
        }
        Request::RolloutAbort { listener } => Ok(vec![conclude(reloader, &listener, false).await?]),
        Request::Reload { .. } => Ok(Vec::new()),
    }
}

/// Judges `rollout` at the end of every interval and carries out what the
/// gates say, until it ends.
async fn drive(reloader: Arc<Reloader>, tenant: Arc<Tenant>, rollout: Arc<Rollout>) {
    let settings = rollout.settings.clone();
    let stable = tenant.stable_version();
    let gauges = |rollout: &Rollout| {
        (
            stable.series().tally(),
            rollout.candidate.series().tally(),
            rollout.same.load(Ordering::Relaxed),
            rollout.different.load(Ordering::Relaxed),
        )
    };
    let mut last = gauges(&rollout);
    let mut every = tokio::time::interval_at(
        tokio::time::Instant::now() + settings.interval,
        settings.interval,
    );
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = rollout.ended.cancelled() => return,
            _ = every.tick() => {}
        }
        let now = gauges(&rollout);
        let interval = Interval {
            stable: now.0.since(&last.0),
            candidate: now.1.since(&last.1),
            same: now.2.saturating_sub(last.2),
            different: now.3.saturating_sub(last.3),
        };
        last = now;
        let (figures, verdict) = judge(&settings, &interval);
        rollout.series.failure_rate.set(figures.failure_rate);
        rollout
            .series
            .p99_ratio
            .set(figures.p99_ratio.unwrap_or(0.0));
        rollout
            .series
            .diff_rate
            .set(figures.diff_rate.unwrap_or(0.0));
        let step = rollout.step.load(Ordering::Relaxed);
        let said = match &verdict {
            Verdict::Wait => format!(
                "waiting: {} candidate calls of min-calls {}",
                figures.calls, settings.min_calls
            ),
            Verdict::Pass => format!("step {} passed", step + 1),
            Verdict::Fail(reason) => format!("step {} failed: {reason}", step + 1),
        };
        tracing::info!(
            listener = tenant.name(),
            "rollout of {}: {said}",
            rollout.candidate.label()
        );
        {
            let mut report = rollout
                .report
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            report.figures = figures;
            report.verdict = said;
        }
        match verdict {
            Verdict::Wait => {}
            Verdict::Pass => {
                rollout.failures_in_a_row.store(0, Ordering::Relaxed);
                rollout
                    .report
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .failures_in_a_row = 0;
                if step + 1 >= settings.steps.len() {
                    let reason = format!("passed all {} steps", settings.steps.len());
                    finish(&reloader, &tenant, &rollout, Outcome::Promoted, reason).await;
                    return;
                }
                rollout.set_step(step + 1);
            }
            Verdict::Fail(reason) => {
                let failed = rollout.failures_in_a_row.fetch_add(1, Ordering::Relaxed) + 1;
                rollout
                    .report
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .failures_in_a_row = failed;
                if failed >= settings.failure_limit {
                    let reason = format!("{reason} ({failed} intervals in a row)");
                    finish(&reloader, &tenant, &rollout, Outcome::RolledBack, reason).await;
                    return;
                }
            }
        }
    }
}

/// Ends `rollout` once: a promotion swaps the candidate in with the
/// reload's swap, then routing stops; a rollback or an abort stops routing
/// and retires the candidate (its sessions move to stable at their next
/// message; calls in flight on it finish).
async fn finish(
    reloader: &Reloader,
    tenant: &Arc<Tenant>,
    rollout: &Arc<Rollout>,
    outcome: Outcome,
    reason: String,
) {
    if rollout.finished.swap(true, Ordering::SeqCst) {
        return;
    }
    match outcome {
        Outcome::Promoted => {
            reloader.promote(tenant, rollout.candidate.clone()).await;
            tenant.end_rollout();
            tracing::info!(
                listener = tenant.name(),
                "rollout promoted {} ({reason})",
                rollout.candidate.label()
            );
        }
        Outcome::RolledBack | Outcome::Aborted => {
            tenant.end_rollout();
            rollout.candidate.retire();
            tracing::warn!(
                listener = tenant.name(),
                "rollout of {} {}: all traffic back to {}: {reason}",
                rollout.candidate.label(),
                outcome.label(),
                rollout.stable
            );
        }
    }
    rollout.ended.cancel();
    rollout.candidate.series().watch(false);
    tenant.version_series_watch(false);
    rollout.weight.store(0, Ordering::Relaxed);
    rollout.series.state.set(0.0);
    rollout.series.weight.set(0.0);
    counter!("wasm_echo_rollouts_total", "listener" => rollout.listener.clone(), "outcome" => outcome.label()).increment(1);
    let mut report = rollout
        .report
        .lock()
        .unwrap_or_else(PoisonError::into_inner);
    report.outcome = Some(outcome);
    report.reason = Some(reason);
    report.weight = 0;
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `calls` calls all taking about `seconds`.
    fn gauge(calls: u64, failures: u64, seconds: f64) -> CallTally {
        let mut buckets = [0; BUCKETS.len()];
        let index = BUCKETS.partition_point(|bound| *bound < seconds);
        buckets[index] = calls;
        CallTally {
            calls,
            failures,
            buckets,
        }
    }

    fn settings() -> Settings {
        Settings {
            min_calls: 100,
            max_failure_rate: 0.05,
            max_p99_ratio: 3.0,
            max_diff_rate: 0.01,
            ..Settings::default()
        }
    }

    #[test]
    fn too_few_calls_are_not_judged() {
        let interval = Interval {
            stable: gauge(1000, 0, 1e-5),
            candidate: gauge(99, 99, 1e-5),
            ..Interval::default()
        };
        assert_eq!(judge(&settings(), &interval).1, Verdict::Wait);
    }

    #[test]
    fn one_trap_in_ten_fails_the_failure_rate() {
        let interval = Interval {
            stable: gauge(1000, 0, 1e-5),
            candidate: gauge(1000, 100, 1e-5),
            ..Interval::default()
        };
        let (figures, verdict) = judge(&settings(), &interval);
        assert!((figures.failure_rate - 0.1).abs() < 1e-9, "{figures:?}");
        assert!(matches!(verdict, Verdict::Fail(reason) if reason.contains("failure rate 10.00%")));
    }

    #[test]
    fn a_failure_rate_at_the_limit_passes() {
        let interval = Interval {
            stable: gauge(1000, 0, 1e-5),
            candidate: gauge(1000, 50, 1e-5),
            ..Interval::default()
        };
        assert_eq!(judge(&settings(), &interval).1, Verdict::Pass);
    }

    #[test]
    fn a_slow_candidate_fails_the_p99_ratio() {
        let interval = Interval {
            stable: gauge(1000, 0, 1e-5),
            candidate: gauge(1000, 0, 1e-3),
            ..Interval::default()
        };
        let (figures, verdict) = judge(&settings(), &interval);
        assert!(
            figures.p99_ratio.is_some_and(|ratio| ratio > 50.0),
            "{figures:?}"
        );
        assert!(matches!(verdict, Verdict::Fail(reason) if reason.contains("p99")));
    }

    #[test]
    fn without_stable_calls_the_p99_gate_is_skipped() {
        let interval = Interval {
            stable: CallTally::default(),
            candidate: gauge(1000, 0, 1e-3),
            ..Interval::default()
        };
        let (figures, verdict) = judge(&settings(), &interval);
        assert_eq!(figures.p99_ratio, None);
        assert_eq!(verdict, Verdict::Pass);
    }

    #[test]
    fn shadow_diff_rate_is_judged_only_in_shadow_mode() {
        let interval = Interval {
            stable: gauge(1000, 0, 1e-5),
            candidate: gauge(1000, 0, 1e-5),
            same: 900,
            different: 100,
        };
        assert_eq!(judge(&settings(), &interval).1, Verdict::Pass);
        let shadow = Settings {
            mode: Mode::Shadow,
            ..settings()
        };
        let (figures, verdict) = judge(&shadow, &interval);
        assert_eq!(figures.diff_rate, Some(0.1));
        assert!(matches!(verdict, Verdict::Fail(reason) if reason.contains("differ")));
    }

    #[test]
    fn p99_interpolates_within_its_bucket() {
        // 100 calls in the (5µs, 10µs] bucket: the 99th is near its top.
        let one_bucket = gauge(100, 0, 8e-6);
        let p = p99(&one_bucket.buckets, 100).unwrap_or_default();
        assert!((5e-6..=1e-5).contains(&p), "{p}");
        assert_eq!(p99(&[0; BUCKETS.len()], 0), None);
        // Calls slower than the last bound report the last bound.
        assert_eq!(p99(&[0; BUCKETS.len()], 10), BUCKETS.last().copied());
    }

    #[test]
    fn settings_are_checked() {
        let base = std::path::Path::new("/");
        let raw = |steps: Vec<u8>| RawRollout {
            candidate: "echo".into(),
            steps: Some(steps),
            ..RawRollout::default()
        };
        assert!(raw(vec![10, 50, 100]).resolve(base).is_ok());
        assert_eq!(
            raw(vec![50, 10, 100]).resolve(base).err().map(|e| e.0),
            Some("steps")
        );
        assert_eq!(
            raw(vec![10, 50]).resolve(base).err().map(|e| e.0),
            Some("steps")
        );
        assert_eq!(raw(vec![]).resolve(base).err().map(|e| e.0), Some("steps"));
        let shadow = RawRollout {
            mode: Some(Mode::Shadow),
            ..raw(vec![1, 2])
        };
        assert!(shadow.resolve(base).is_ok());
        let bad_rate = RawRollout {
            max_failure_rate: Some(1.5),
            ..raw(vec![100])
        };
        assert_eq!(
            bad_rate.resolve(base).err().map(|e| e.0),
            Some("max-failure-rate")
        );
    }

    #[test]
    fn a_peer_stays_put_and_rising_weights_only_move_peers_to_the_candidate() {
        let seed = RandomState::new();
        let peers: Vec<SocketAddr> = (0..2000u16)
            .map(|port| SocketAddr::from(([127, 0, 0, 1], 10_000 + port)))
            .collect();
        let on_candidate = |weight: u64| -> Vec<bool> {
            peers
                .iter()
                .map(|peer| seed.hash_one(peer) % 100 < weight)
                .collect()
        };
        let mut before = on_candidate(0);
        for weight in [10, 25, 50, 100] {
            let now = on_candidate(weight);
            assert_eq!(now, on_candidate(weight), "a peer flipped within a step");
            assert!(
                before.iter().zip(&now).all(|(was, is)| !was || *is),
                "a peer moved back"
            );
            let share = now.iter().filter(|on| **on).count();
            #[allow(clippy::cast_possible_truncation)]
            let expected = peers.len() * weight as usize / 100;
            assert!(
                share.abs_diff(expected) <= peers.len() / 20,
                "{weight}%: {share}"
            );
            before = now;
        }
    }
}
