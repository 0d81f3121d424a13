//! A tenant at run time: one listener's configuration turned into what its
//! sockets need while serving. It is composed of one part per concern, and
//! this file is all a listener sees of them:
//!
//! - [`version`]: which version answers (swapped atomically by a reload),
//!   with its label and metric series made once per version;
//! - [`admission`]: what may come in (the rate per peer, the number of
//!   connections, the backoff after repeated failures);
//! - [`reply`]: what may go out (max-reply, the UDP amplification bound) and
//!   what a failed message gets;
//! - [`session`]: a conversation on one version (an instance per TCP
//!   connection, one per UDP listener while it behaves);
//! - [`migration`]: moving a session to a new version with its state;
//! - [`native`]: handlers in Rust in place of a plugin, for the benchmark;
//! - a running [`Rollout`](crate::rollout::Rollout), if any: which
//!   conversations its candidate gets.
//!
//! Reading sockets is the listeners' business; loading plugins is the
//! runtime's.

mod admission;
mod migration;
mod native;
mod reply;
mod session;
mod version;

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::OwnedSemaphorePermit;

use crate::config::ListenerConfig;
use crate::framing::Framing;
use crate::metrics::{FailureKind, ListenerMetrics};
use crate::plugin::{CallError, Clocks, Instance, InstanceSettings, LogBudget, Plugin};
use crate::recording::Recorder;
use crate::warnings::Warnings;

use admission::Admission;
pub use migration::{MigrationFailurePolicy, MigrationOutcome, Open};

pub use native::{NativeEcho, NativeHandler};
use reply::ReplyPolicy;
pub use session::Session;
pub use version::Version;
use version::{Code, Handler};

use crate::rollout::Rollout;

/// One listener's run-time state.
pub struct Tenant {
    /// The configuration it was made from, read through the accessors.
    config: ListenerConfig,
    /// Its series in `/metrics`.
    metrics: ListenerMetrics,
    handler: Handler,
    admission: Admission,
    reply: ReplyPolicy,
    /// The budget of the host's own warnings about this tenant.
    warnings: Warnings,
    /// What every instance of this tenant is started with.
    settings: Arc<InstanceSettings>,
    /// Its traffic's recording, if it is recorded.
    recorder: Option<Recorder>,
    /// Changes at every swap, so that sessions waiting between messages
    /// move to the new version at once (see [`migration`]).
    swaps: tokio::sync::watch::Sender<()>,
    /// The rollout running, if any: read for every new connection and
    /// every datagram (an atomic load when there is none).
    rollout: arc_swap::ArcSwapOption<Rollout>,
    /// The last rollout started, running or finished, for `rollout status`.
    last_rollout: arc_swap::ArcSwapOption<Rollout>,
}

/// How the moves after one swap ended, as far as the swap waited.
#[derive(Clone, Copy, Debug, Default)]
pub struct Migrations {
    /// Sessions whose state was handed over.
    pub migrated: usize,
    /// Sessions that moved without state (nothing to hand over, or the
    /// hand-over failed and the policy is `fresh`).
    pub fresh: usize,
    /// Sessions that stayed on the old version (a failed or skipped
    /// hand-over).
    pub kept: usize,
}

impl Migrations {
    fn of(next: &Version) -> Self {
        let tally = next.tally();
        Self {
            migrated: tally.count(MigrationOutcome::Migrated),
            fresh: tally.count(MigrationOutcome::Fresh) + tally.count(MigrationOutcome::Reset),
            kept: tally.count(MigrationOutcome::Kept) + tally.count(MigrationOutcome::Skipped),
        }
    }
}

impl fmt::Debug for Tenant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tenant")
            .field("name", &self.config.name)
            .finish_non_exhaustive()
    }
}

/// What each instance of `config`'s plugin is given: its settings, limits
/// and log budget (one per tenant, shared by its instances). `check
/// --config` starts each plugin with these too.
pub fn instance_settings(config: &ListenerConfig) -> InstanceSettings {
    let tenant: Arc<str> = config.name.as_str().into();
    InstanceSettings {
        log_budget: LogBudget::new(
            tenant.clone(),
            config.traffic.log_lines_per_second,
            config.traffic.log_bytes_per_second,
        ),
        tenant,
        config: config.plugin_config.clone(),
        limits: config.limits.clone(),
        clocks: Clocks::Real,
    }
}

impl Tenant {
    /// A tenant served by `plugin`.
    pub fn wasm(config: ListenerConfig, plugin: Arc<Plugin>) -> Self {
        let metrics = ListenerMetrics::new(&config.name);
        let handler = Handler::wasm(plugin, &metrics);
        Self::new(config, metrics, handler)
    }

    /// A tenant served by native code (for benchmarks).
    pub fn native(config: ListenerConfig, native: Arc<dyn NativeHandler>) -> Self {
        let metrics = ListenerMetrics::new(&config.name);
        let handler = Handler::native(native, &metrics);
        Self::new(config, metrics, handler)
    }

    fn new(config: ListenerConfig, metrics: ListenerMetrics, handler: Handler) -> Self {
        let settings = Arc::new(instance_settings(&config));
        Self {
            metrics,
            warnings: Warnings::new(&config.name),
            handler,
            settings,
            admission: Admission::new(&config.traffic),
            reply: ReplyPolicy::new(&config.traffic, config.on_failure),
            config,
            recorder: None,
            swaps: tokio::sync::watch::Sender::new(()),
            rollout: arc_swap::ArcSwapOption::empty(),
            last_rollout: arc_swap::ArcSwapOption::empty(),
        }
    }

    /// The same tenant, recording its traffic with `recorder`.
    #[must_use]
    pub fn recording(self, recorder: Recorder) -> Self {
        Self {
            recorder: Some(recorder),
            ..self
        }
    }

    /// Its recording, if its traffic is recorded.
    pub fn recorder(&self) -> Option<&Recorder> {
        self.recorder.as_ref()
    }

    // What the listener is.

    /// The tenant's name.
    pub fn name(&self) -> &str {
        &self.config.name
    }

    /// The addresses it was asked to serve, UDP first.
    pub fn sockets(&self) -> impl Iterator<Item = (crate::config::Protocol, SocketAddr)> + use<> {
        self.config.sockets()
    }

    /// How long a reply's write may make no progress before the peer is
    /// dropped (a TCP connection reset, a UDP reply given up).
    pub fn write_timeout(&self) -> std::time::Duration {
        self.config.traffic.write_timeout
    }

    /// The UDP address it was asked to serve, if any.
    pub fn udp_addr(&self) -> Option<SocketAddr> {
        self.config.udp
    }

    /// The TCP address it was asked to serve, if any.
    pub fn tcp_addr(&self) -> Option<SocketAddr> {
        self.config.tcp
    }

    /// How its TCP stream is cut into messages.
    pub fn framing(&self) -> Framing {
        self.config.framing
    }

    /// The longest TCP message it accepts.
    pub fn max_message(&self) -> usize {
        self.config.max_message
    }

    /// Whether a plugin's `stop-listener` stops it.
    pub fn honor_stop(&self) -> bool {
        self.config.honor_stop
    }

    /// Whether the UDP listener may hand a batching plugin many datagrams
    /// in one call.
    pub fn udp_batch(&self) -> bool {
        self.config.udp_batch
    }

    /// Whether its TCP connections open with a PROXY protocol header, and
    /// from where.
    pub fn proxy(&self) -> Option<&crate::config::ProxyPolicy> {
        self.config.proxy.as_ref()
    }

    /// Whether its sockets are bound with `SO_REUSEPORT`.
    pub fn reuse_port(&self) -> bool {
        self.config.reuse_port
    }

    /// Whether its plugin may be an `oci://` reference by tag.
    pub fn allow_tags(&self) -> bool {
        self.config.allow_tags
    }

    /// How often a tag it follows is asked about.
    pub fn tag_poll_interval(&self) -> Duration {
        self.config.tag_poll_interval
    }

    /// How long a TCP connection may stay silent.
    pub fn idle_timeout(&self) -> Duration {
        self.config.traffic.idle_timeout
    }

    /// How many TCP connections it serves at once.
    pub fn max_connections(&self) -> usize {
        self.config.traffic.max_connections
    }

    /// Its series in `/metrics`, for the listener to count what it does.
    pub fn metrics(&self) -> &ListenerMetrics {
        &self.metrics
    }

    /// The budget every warning the host logs about this tenant's traffic
    /// goes through: a peer must not decide how much the host writes.
    pub fn warnings(&self) -> &Warnings {
        &self.warnings
    }

    // Which version answers.

    /// The plugin version new sessions get, if the tenant runs a plugin.
    pub fn current(&self) -> Option<Arc<Plugin>> {
        self.handler.current_plugin()
    }

    /// The current version's label for logs: `name@digest`, or `native`.
    pub fn version_label(&self) -> Arc<str> {
        self.handler.current().label().clone()
    }

    /// Whether open TCP connections move to a new version after a swap
    /// (`upgrade-connections`).
    pub fn upgrade_connections(&self) -> bool {
        self.config.upgrade_connections
    }

    /// Changes at every swap: sessions between messages watch it to move
    /// to the new version at once.
    pub fn swaps(&self) -> tokio::sync::watch::Receiver<()> {
        self.swaps.subscribe()
    }

    /// Makes `plugin` the version every new session gets, tells the
    /// sessions that move on (the UDP listener's; connections' with
    /// `upgrade-connections`), and waits a little for them to have moved:
    /// until each has moved or been kept, or [`Tenant::settle_time`] has
    /// passed. Says how their moves ended.
    pub async fn swap(&self, plugin: Arc<Plugin>) -> Migrations {
        let Some((previous, next)) = self.handler.swap(plugin, &self.metrics) else {
            return Migrations::default();
        };
        self.settle(previous, next).await
    }

    /// Makes a rollout's candidate the version every new session gets, as
    /// [`Tenant::swap`] does a reloaded plugin: the same swap, the same
    /// moves, the same wait.
    pub(crate) async fn promote(&self, candidate: Arc<Version>) -> Migrations {
        let Some((previous, next)) = self.handler.install(candidate) else {
            return Migrations::default();
        };
        self.settle(previous, next).await
    }

    /// Announces a swap from `previous` to `next` and waits for the
    /// sessions that move to have moved (see [`Tenant::swap`]).
    async fn settle(&self, previous: Arc<Version>, next: Arc<Version>) -> Migrations {
        self.swaps.send_replace(());
        let settle = tokio::time::Instant::now() + self.settle_time();
        loop {
            let stayed = next.tally().count(MigrationOutcome::Kept)
                + next.tally().count(MigrationOutcome::Skipped);
            if previous.movable() <= stayed || tokio::time::Instant::now() >= settle {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(2)).await;
        }
        Migrations::of(&next)
    }

    /// How long a swap waits for sessions to move: a session between
    /// messages moves at once, one in a call moves after it (within the
    /// call deadline), each move is two calls.
    fn settle_time(&self) -> Duration {
        self.config.limits.call_timeout * 4 + Duration::from_millis(200)
    }

    /// Whether `session` runs the current version (the UDP listener's
    /// long-lived session is replaced once a reload has swapped it).
    pub fn is_current(&self, session: &Session) -> bool {
        self.handler.is_current(session.version_of())
    }

    /// Starts one instance of `plugin` with this tenant's settings and drops
    /// it: a reload's last check before the swap.
    ///
    /// # Errors
    ///
    /// A [`CallError`] if the instance fails to start.
    pub async fn try_start(&self, plugin: &Arc<Plugin>) -> Result<(), CallError> {
        Instance::new(plugin, self.settings.clone()).await.map(drop)
    }

    /// A session on the current version: a fresh instance for a plugin.
    /// `movable`: it will move to a new version after a swap. A failure to
    /// start is counted in the version's series.
    ///
    /// # Errors
    ///
    /// A [`CallError`] if the instance fails to start.
    pub async fn session(&self, movable: bool) -> Result<Session, CallError> {
        self.session_on(self.handler.current(), movable).await
    }

    async fn session_on(&self, version: Arc<Version>, movable: bool) -> Result<Session, CallError> {
        self.session_with(version, self.settings.clone(), movable)
            .await
    }

    async fn session_with(
        &self,
        version: Arc<Version>,
        settings: Arc<InstanceSettings>,
        movable: bool,
    ) -> Result<Session, CallError> {
        match version.code() {
            Code::Wasm(plugin) => {
                let started = Instant::now();
                match Instance::new(plugin, settings).await {
                    Ok(instance) => {
                        version.series().instantiated(started.elapsed());
                        Ok(Session::wasm(version, instance, movable))
                    }
                    Err(error) => {
                        version.series().failed(FailureKind::from(&error));
                        Err(error)
                    }
                }
            }
            Code::Native(native) => {
                let native = native.clone();
                Ok(Session::native(version, native))
            }
        }
    }

    // A rollout's candidate.

    /// The rollout its configuration starts with the server, if any.
    pub fn rollout_plan(&self) -> Option<&crate::rollout::Plan> {
        self.config.rollout.as_ref()
    }

    /// The rollout running, if any.
    pub fn rollout(&self) -> Option<Arc<Rollout>> {
        self.rollout.load_full()
    }

    /// The rollout running, without touching its reference count: what
    /// the UDP listener reads for every datagram.
    pub fn rollout_now(&self) -> arc_swap::Guard<Option<Arc<Rollout>>> {
        self.rollout.load()
    }

    /// The last rollout started, running or finished.
    pub fn last_rollout(&self) -> Option<Arc<Rollout>> {
        self.last_rollout.load_full()
    }

    /// Starts routing by `rollout`; false when another one runs.
    pub(crate) fn begin_rollout(&self, rollout: Arc<Rollout>) -> bool {
        let previous = self
            .rollout
            .compare_and_swap(&None::<Arc<Rollout>>, Some(rollout.clone()));
        if previous.is_some() {
            return false;
        }
        self.last_rollout.store(Some(rollout));
        true
    }

    /// Stops routing by the running rollout.
    pub(crate) fn end_rollout(&self) {
        self.rollout.store(None);
    }

    /// The version a rollout started from (the current one).
    pub(crate) fn stable_version(&self) -> Arc<Version> {
        self.handler.current()
    }

    /// Times the current version's calls for a rollout's gates, or stops.
    pub(crate) fn version_series_watch(&self, watched: bool) {
        self.handler.current().series().watch(watched);
    }

    /// A candidate version of `plugin`, with its own series.
    pub(crate) fn candidate_version(&self, plugin: Arc<Plugin>) -> Arc<Version> {
        Arc::new(Version::candidate(plugin, &self.metrics))
    }

    /// What a candidate's instances start with: the tenant's limits and
    /// log budget, and `config` as plugin settings when given.
    pub(crate) fn candidate_settings(
        &self,
        config: Option<crate::plugin::PluginConfig>,
    ) -> Arc<InstanceSettings> {
        let mut settings = instance_settings(&self.config);
        if let Some(config) = config {
            settings.config = config;
        }
        Arc::new(settings)
    }

    /// A session on `rollout`'s candidate (never movable: a swap moves
    /// nothing off it; a rollback does, see [`Tenant::leave_candidate`]).
    ///
    /// # Errors
    ///
    /// A [`CallError`] if the instance fails to start.
    pub async fn candidate_session(&self, rollout: &Rollout) -> Result<Session, CallError> {
        self.session_with(
            rollout.candidate().clone(),
            rollout.instance_settings().clone(),
            false,
        )
        .await
    }

    /// A session for a new TCP connection from `peer`: on a canary's
    /// candidate when the canary picks the peer, else as
    /// [`Tenant::session`].
    ///
    /// # Errors
    ///
    /// A [`CallError`] if the instance fails to start.
    pub async fn session_for(&self, peer: SocketAddr, movable: bool) -> Result<Session, CallError> {
        if let Some(rollout) = &*self.rollout.load()
            && rollout.picks(peer)
        {
            return self.candidate_session(rollout).await;
        }
        self.session(movable).await
    }

    // What may come in.

    /// Whether a message from `ip` is within the rate limit now (UDP: the
    /// datagram is dropped otherwise).
    pub fn admit_message(&self, ip: IpAddr) -> bool {
        self.admission.admit_message(ip)
    }

    /// Waits until a message from `ip` is within the rate limit (TCP: the
    /// connection is simply read more slowly).
    pub async fn pace(&self, ip: IpAddr) {
        self.admission.pace(ip).await;
    }

    /// Forgets peers that have been quiet, so the limiter's memory does not
    /// grow with every address ever seen. Call now and then.
    pub fn forget_quiet_peers(&self) {
        self.admission.forget_quiet_peers();
    }

    /// A slot for one more connection, or `None` when the tenant is full.
    pub fn admit_connection(&self) -> Option<OwnedSemaphorePermit> {
        self.admission.admit_connection()
    }

    /// Whether a new instance may be made now, after failures.
    pub fn may_instantiate(&self) -> bool {
        self.admission.may_instantiate()
    }

    /// Notes a failed call; repeated failures delay the next instance.
    pub fn record_failure(&self) {
        self.admission.record_failure();
    }

    /// Notes a successful call.
    pub fn record_success(&self) {
        self.admission.record_success();
    }

    // What may go out.

    /// Checks a reply from `session` against the tenant's bounds;
    /// `udp_request` is the request's size for a datagram's reply. A refusal
    /// is counted as a `reply` failure of the session's version; the drop is
    /// the listener's to count.
    ///
    /// # Errors
    ///
    /// The reason a reply is refused, for the log.
    pub fn vet_reply(
        &self,
        session: &Session,
        reply: &[u8],
        udp_request: Option<usize>,
    ) -> Result<(), String> {
        let vetted = self.reply.vet(reply, udp_request);
        if vetted.is_err() {
            session.version_of().series().failed(FailureKind::Reply);
        }
        vetted
    }

    /// What a failed message gets: `Some(request)` to send back when the
    /// tenant fails open.
    pub fn failure_reply<'a>(&self, request: &'a [u8]) -> Option<&'a [u8]> {
        self.reply.failure_reply(request)
    }
}
