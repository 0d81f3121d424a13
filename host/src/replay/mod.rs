//! Replaying a recording into a plugin, in process and without a socket,
//! and comparing what it decides with what was recorded (`wasm-echo
//! replay`).
//!
//! Each recorded TCP connection gets an instance of its own and its
//! messages in order, after its `on-open`; each listener's datagrams go to
//! one instance in order, a fresh one where the recorded server had one (a
//! reload, a failed call). The plugin's clocks read the recorded time (the
//! wall clock the time of the call, the monotonic clock the time since the
//! recording's first exchange) and its random sources are seeded, so the
//! same plugin and recording give the same replies every time.
//!
//! With a baseline (the version that was recorded, say), the baseline is
//! replayed too: an exchange the baseline itself does not reproduce (a
//! reply that embeds a time, a random value, the process's uptime) is
//! noise, and the new version differing there is reported as noisy, not as
//! a regression. What the report looks like is [`report`]'s.

pub mod report;

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use crate::plugin::{
    CallError, Clocks, Connection, Instance, InstanceSettings, Limits, Plugin, PluginConfig,
    PluginSource, PoolSize, RecordedTime, Runtime, endpoint,
};
use crate::recording::read::{Exchange, Recording};
use crate::recording::{Event, Outcome};

/// What to replay, into what.
#[derive(Clone, Debug)]
pub struct Options {
    /// The recording's files, oldest first.
    pub recordings: Vec<PathBuf>,
    /// The new version.
    pub plugin: PluginSource,
    /// The version that was recorded (or any reference), for noise.
    pub baseline: Option<PluginSource>,
    /// Plugin settings over the recorded ones (`KEY=VALUE`).
    pub settings: Vec<(String, String)>,
    /// How many differences each listener shows.
    pub examples: usize,
}

/// How a replayed exchange compares with its recording.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// The same reply and the same `next` (or both failed).
    Same,
    /// Another reply (or a decision where the recording has a failure).
    DifferentReply,
    /// The same reply, another `next`.
    DifferentNext,
    /// The call failed where the recorded one did not.
    Failure,
    /// Different, where the baseline does not reproduce the recording
    /// either: noise, not a regression.
    Noisy,
}

impl Verdict {
    /// Compares a replayed outcome with the recorded one.
    pub fn of(recorded: &Outcome, replayed: &Outcome) -> Self {
        match (recorded, replayed) {
            (
                Outcome::Decided { reply, next },
                Outcome::Decided {
                    reply: new_reply,
                    next: new_next,
                },
            ) => {
                if reply != new_reply {
                    Self::DifferentReply
                } else if next != new_next {
                    Self::DifferentNext
                } else {
                    Self::Same
                }
            }
            (Outcome::Failed { .. }, Outcome::Failed { .. }) => Self::Same,
            (Outcome::Decided { .. }, Outcome::Failed { .. }) => Self::Failure,
            (Outcome::Failed { .. }, Outcome::Decided { .. }) => Self::DifferentReply,
        }
    }

    /// Whether it counts against `--max-diff`.
    pub fn is_regression(self) -> bool {
        matches!(
            self,
            Self::DifferentReply | Self::DifferentNext | Self::Failure
        )
    }
}

/// One exchange that did not replay the same, for the report.
#[derive(Debug)]
pub struct Difference {
    /// The recorded exchange.
    pub exchange: Exchange,
    /// How it compares.
    pub verdict: Verdict,
    /// What the new version decided.
    pub replayed: Outcome,
    /// What the baseline decided, with `--baseline`.
    pub baseline: Option<Outcome>,
}

/// One listener's tally.
#[derive(Debug, Default)]
pub struct ListenerReport {
    /// Exchanges replayed: datagrams, TCP messages and TCP opens (whose
    /// decision, a greeting say, is compared too).
    pub exchanges: usize,
    /// Of those, TCP opens.
    pub opens: usize,
    /// Of those, the same.
    pub same: usize,
    /// With another reply.
    pub different_reply: usize,
    /// With the same reply and another `next`.
    pub different_next: usize,
    /// Failed where the recording did not.
    pub failure: usize,
    /// Different, but the baseline does not reproduce them either.
    pub noisy: usize,
    /// The versions recorded, as `name@digest`.
    pub recorded_versions: Vec<String>,
    /// The first few regressions.
    pub differences: Vec<Difference>,
    /// The first few noisy exchanges.
    pub noise: Vec<Difference>,
}

impl ListenerReport {
    /// Regressions: different replies, different `next`s and failures.
    pub fn regressions(&self) -> usize {
        self.different_reply + self.different_next + self.failure
    }
}

/// The whole replay's result.
#[derive(Debug)]
pub struct Report {
    /// The new version, `name@digest`.
    pub plugin: String,
    /// The baseline, `name@digest`, with `--baseline`.
    pub baseline: Option<String>,
    /// Per listener, by name.
    pub listeners: BTreeMap<String, ListenerReport>,
}

impl Report {
    /// Regressions over every listener.
    pub fn regressions(&self) -> usize {
        self.listeners
            .values()
            .map(ListenerReport::regressions)
            .sum()
    }
}

/// Reads the recording, replays it into the new version (and the
/// baseline), and compares.
///
/// # Errors
///
/// The recording cannot be read (the error names the file and line), or a
/// plugin does not load.
pub async fn replay(options: &Options) -> anyhow::Result<Report> {
    let recording = Recording::read(&options.recordings)?;
    if recording.exchanges.is_empty() {
        anyhow::bail!(
            "{}: no exchanges recorded, nothing to replay",
            options
                .recordings
                .iter()
                .map(|path| path.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    // Replays are sequential: a connection's instance and each listener's
    // UDP instance are all that live at once.
    let limits = Limits::default();
    let runtime = Runtime::with_cache(
        PoolSize::sized(
            recording.plugin_config.len().max(1) * 2 + 2,
            limits.memory_bytes,
            limits.table_elements,
        ),
        crate::cache::CacheDir::open_default(),
    )?;
    let plugin = Arc::new(runtime.load(&options.plugin)?);
    let replayed = run(&plugin, &recording, &options.settings).await;
    let baseline = match &options.baseline {
        Some(source) => {
            let baseline = Arc::new(runtime.load(source)?);
            let outcomes = run(&baseline, &recording, &options.settings).await;
            Some((baseline.version(), outcomes))
        }
        None => None,
    };
    let mut listeners: BTreeMap<String, ListenerReport> = BTreeMap::new();
    for (index, exchange) in recording.exchanges.iter().enumerate() {
        let report = listeners.entry(exchange.listener.to_string()).or_default();
        report.exchanges += 1;
        report.opens += usize::from(matches!(exchange.event, Event::Open { .. }));
        if !report
            .recorded_versions
            .iter()
            .any(|version| **version == *exchange.version)
        {
            report.recorded_versions.push(exchange.version.to_string());
        }
        let replayed = &replayed[index];
        let mut verdict = Verdict::of(&exchange.outcome, replayed);
        let baseline = baseline.as_ref().map(|(_, outcomes)| &outcomes[index]);
        if verdict != Verdict::Same
            && baseline
                .is_some_and(|baseline| Verdict::of(&exchange.outcome, baseline) != Verdict::Same)
        {
            verdict = Verdict::Noisy;
        }
        let shown = match verdict {
            Verdict::Same => {
                report.same += 1;
                continue;
            }
            Verdict::DifferentReply => {
                report.different_reply += 1;
                &mut report.differences
            }
            Verdict::DifferentNext => {
                report.different_next += 1;
                &mut report.differences
            }
            Verdict::Failure => {
                report.failure += 1;
                &mut report.differences
            }
            Verdict::Noisy => {
                report.noisy += 1;
                &mut report.noise
            }
        };
        if shown.len() < options.examples {
            shown.push(Difference {
                exchange: exchange.clone(),
                verdict,
                replayed: replayed.clone(),
                baseline: baseline.cloned(),
            });
        }
    }
    Ok(Report {
        plugin: plugin.version(),
        baseline: baseline.map(|(version, _)| version),
        listeners,
    })
}

/// A conversation being replayed: a TCP connection, or a listener's
/// datagrams.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum Conversation {
    /// A listener's datagrams.
    Udp(Arc<str>),
    /// One TCP connection: its run, listener and number.
    Tcp(Arc<str>, Arc<str>, u64),
}

/// Replays every exchange of `recording` into `plugin`; the outcomes are in
/// the recording's order.
async fn run(
    plugin: &Arc<Plugin>,
    recording: &Recording,
    overrides: &[(String, String)],
) -> Vec<Outcome> {
    let time = Arc::new(RecordedTime::new(0));
    let settings: HashMap<&str, Arc<InstanceSettings>> = recording
        .exchanges
        .iter()
        .map(|exchange| &*exchange.listener)
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .map(|listener| {
            let mut config: PluginConfig = recording
                .plugin_config
                .get(listener)
                .cloned()
                .unwrap_or_default();
            config.extend(overrides.iter().cloned());
            (listener, instance_settings(listener, config, &time))
        })
        .collect();
    let origin = recording
        .exchanges
        .iter()
        .map(|exchange| exchange.time)
        .min()
        .unwrap_or(SystemTime::UNIX_EPOCH);
    // Conversations in the order they began, each with its exchanges.
    let mut order: Vec<Conversation> = Vec::new();
    let mut members: HashMap<Conversation, Vec<usize>> = HashMap::new();
    for (index, exchange) in recording.exchanges.iter().enumerate() {
        let conversation = match &exchange.event {
            Event::Datagram => Conversation::Udp(exchange.listener.clone()),
            Event::Open { conn, .. } | Event::Message { conn } => {
                Conversation::Tcp(exchange.run.clone(), exchange.listener.clone(), *conn)
            }
        };
        members
            .entry(conversation.clone())
            .or_insert_with(|| {
                order.push(conversation);
                Vec::new()
            })
            .push(index);
    }
    let mut outcomes: Vec<Option<Outcome>> = vec![None; recording.exchanges.len()];
    for conversation in &order {
        let indices = &members[conversation];
        let listener = match conversation {
            Conversation::Udp(listener) | Conversation::Tcp(_, listener, _) => listener,
        };
        let Some(settings) = settings.get(&**listener) else {
            continue;
        };
        let mut replay = Replay {
            plugin,
            settings,
            time: &time,
            origin,
            instance: None,
            last_version: None,
        };
        for &index in indices {
            let exchange = &recording.exchanges[index];
            outcomes[index] = Some(replay.exchange(exchange).await);
        }
        if let Some(mut instance) = replay.instance.take()
            && matches!(conversation, Conversation::Tcp(..))
        {
            let _ = instance.on_close().await;
        }
    }
    outcomes
        .into_iter()
        .map(|outcome| {
            outcome.unwrap_or(Outcome::Failed {
                kind: "skipped".to_owned(),
                error: "not replayed".to_owned(),
            })
        })
        .collect()
}

/// The settings a replayed instance of `listener` gets: the default
/// limits, the recorded plugin settings, the recorded clocks.
fn instance_settings(
    listener: &str,
    config: PluginConfig,
    time: &Arc<RecordedTime>,
) -> Arc<InstanceSettings> {
    Arc::new(InstanceSettings::with_defaults(
        listener,
        config,
        Clocks::Recorded(time.clone()),
    ))
}

/// One conversation's replay state.
struct Replay<'a> {
    plugin: &'a Arc<Plugin>,
    settings: &'a Arc<InstanceSettings>,
    time: &'a RecordedTime,
    /// The recording's first exchange: the monotonic clock's zero.
    origin: SystemTime,
    /// The live instance, if any: dropped after any failure.
    instance: Option<Instance>,
    /// The version the last exchange was recorded with: the recorded server
    /// gave its UDP listener a fresh instance when that changed.
    last_version: Option<Arc<str>>,
}

impl Replay<'_> {
    /// Replays one exchange.
    async fn exchange(&mut self, exchange: &Exchange) -> Outcome {
        let wall = exchange
            .time
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default();
        let monotonic = exchange
            .time
            .duration_since(self.origin)
            .unwrap_or(Duration::ZERO);
        if self
            .last_version
            .as_ref()
            .is_some_and(|last| *last != exchange.version)
        {
            self.instance = None;
        }
        self.last_version = Some(exchange.version.clone());
        self.time.set(wall, monotonic);
        let called = match &exchange.event {
            Event::Datagram => match self.instance().await {
                Ok(instance) => instance.on_datagram(exchange.peer, &exchange.input).await,
                Err(error) => Err(error),
            },
            Event::Open { local, framing, .. } => {
                self.instance = None;
                let conn = Connection {
                    peer: endpoint(exchange.peer),
                    local: endpoint(*local),
                    framing: (*framing).into(),
                };
                match self.instance().await {
                    Ok(instance) => instance.on_open(&conn, exchange.peer).await,
                    Err(error) => Err(error),
                }
            }
            Event::Message { .. } => {
                if self.instance.is_none() {
                    // The connection's open was rotated away, or the new
                    // version failed earlier in it: a fresh instance is
                    // opened (its greeting is not compared) and goes on.
                    let conn = Connection {
                        peer: endpoint(exchange.peer),
                        local: endpoint(([0, 0, 0, 0], 0).into()),
                        framing: crate::framing::Framing::Raw.into(),
                    };
                    if let Err(error) = self.opened(&conn, exchange).await {
                        self.instance = None;
                        return Outcome::failed(&error);
                    }
                }
                match self.instance().await {
                    Ok(instance) => instance.on_message(&exchange.input).await,
                    Err(error) => Err(error),
                }
            }
        };
        let outcome = Outcome::of(&called);
        // A failed instance is never used again, as when serving; and
        // where the recorded call failed, the server started afresh too.
        if called.is_err() || matches!(exchange.outcome, Outcome::Failed { .. }) {
            self.instance = None;
        }
        outcome
    }

    /// A fresh instance, opened with `conn`, its decision ignored.
    async fn opened(&mut self, conn: &Connection, exchange: &Exchange) -> Result<(), CallError> {
        let instance = self.instance().await?;
        instance.on_open(conn, exchange.peer).await.map(drop)
    }

    /// The conversation's instance, started if there is none.
    async fn instance(&mut self) -> Result<&mut Instance, CallError> {
        let instance = match self.instance.take() {
            Some(instance) => instance,
            None => Instance::new(self.plugin, self.settings.clone()).await?,
        };
        Ok(self.instance.insert(instance))
    }
}
