//! A session: one conversation's handler (a plugin instance, or native
//! code) on one version, timing its calls and counting its failures in that
//! version's series. A TCP connection has one for its life; a UDP listener
//! keeps one while it behaves.
//!
//! When to make or drop a session is the listener's business; what a call
//! does inside the sandbox is the plugin's.

use std::net::SocketAddr;
use std::sync::{Arc, Weak};
use std::time::Instant;

use super::native::NativeHandler;
use super::version::Version;
use crate::metrics::FailureKind;
use crate::plugin::{
    Batch, BatchReplies, CallError, Connection, Decision, Instance, InstanceSettings, Next, Plugin,
    SavedState, VersionInfo,
};

/// One conversation's handler and the version it runs.
pub struct Session {
    kind: SessionKind,
    /// Held for the session's life: the version (and its series) stays
    /// while anything runs it.
    version: Arc<Version>,
    /// Whether it moves to a new version after a swap (the UDP listener's
    /// always does; a connection's with `upgrade-connections`): counted in
    /// its version, so a swap knows how many moves to wait for.
    movable: bool,
    /// The version a hand-over to failed (or was skipped for): not tried
    /// again until another one is swapped in. Weak: a declined version
    /// must not be kept alive by the sessions that declined it.
    declined: Option<Weak<Version>>,
    /// Whether its instance is still renewed when it grows past
    /// `recycle-at` (see [`Session::recycle_if_bloated`]); off once a
    /// renewal failed or could not help.
    recycling: bool,
    /// Whether this is a TCP connection's (it has had `on-open`): a fresh
    /// instance there can only go on with the conversation's state.
    opened: bool,
}

enum SessionKind {
    /// A plugin instance (boxed: a store is large next to a pointer).
    Wasm(Box<Instance>),
    /// Native code.
    Native(Arc<dyn NativeHandler>),
}

impl Session {
    /// A session on `version` with `instance`.
    pub(super) fn wasm(version: Arc<Version>, instance: Instance, movable: bool) -> Self {
        Self::new(version, SessionKind::Wasm(Box::new(instance)), movable)
    }

    /// A session on `version`, running `native`.
    pub(super) fn native(version: Arc<Version>, native: Arc<dyn NativeHandler>) -> Self {
        Self::new(version, SessionKind::Native(native), false)
    }

    fn new(version: Arc<Version>, kind: SessionKind, movable: bool) -> Self {
        version.series().instance(true);
        if movable {
            version.movable_sessions(1);
        }
        Self {
            kind,
            version,
            movable,
            declined: None,
            recycling: true,
            opened: false,
        }
    }

    /// Whether a hand-over to `target` was already tried and declined.
    pub(super) fn declined(&self, target: &Arc<Version>) -> bool {
        self.declined
            .as_ref()
            .is_some_and(|declined| std::ptr::eq(declined.as_ptr(), Arc::as_ptr(target)))
    }

    /// Notes that it stays off `target`.
    pub(super) fn decline(&mut self, target: &Arc<Version>) {
        self.declined = Some(Arc::downgrade(target));
    }

    /// Whether its instance can hand its state over.
    pub(super) fn offers_state(&self) -> bool {
        match &self.kind {
            SessionKind::Wasm(instance) => instance.offers_state(),
            SessionKind::Native(_) => false,
        }
    }

    /// The identity `restore` is told of this session's version.
    pub(super) fn version_info(&self) -> VersionInfo {
        match &self.kind {
            SessionKind::Wasm(instance) => instance.plugin().version_info(),
            SessionKind::Native(_) => VersionInfo {
                name: "native".to_owned(),
                digest: String::new(),
                contract: String::new(),
            },
        }
    }

    /// See [`Instance::snapshot`]. A failure is counted in the version's
    /// series, as for any call.
    pub(super) async fn snapshot(&mut self) -> Result<Option<SavedState>, CallError> {
        let saved = match &mut self.kind {
            SessionKind::Wasm(instance) => instance.snapshot().await,
            SessionKind::Native(_) => Ok(None),
        };
        self.count(saved)
    }

    /// See [`Instance::restore`].
    pub(super) async fn restore(
        &mut self,
        previous: &VersionInfo,
        state: &SavedState,
    ) -> Result<Result<(), String>, CallError> {
        let restored = match &mut self.kind {
            SessionKind::Wasm(instance) => instance.restore(previous, state).await,
            SessionKind::Native(_) => Ok(Err("native code keeps no state".to_owned())),
        };
        self.count(restored)
    }

    /// The version it runs.
    pub(super) fn version_of(&self) -> &Arc<Version> {
        &self.version
    }

    /// Whether it runs `version`.
    pub fn runs(&self, version: &Arc<Version>) -> bool {
        Arc::ptr_eq(&self.version, version)
    }

    /// Whether it runs a rolled-back candidate, and must leave it (see
    /// [`Tenant::leave_candidate`](super::Tenant::leave_candidate)).
    pub fn on_retired(&self) -> bool {
        self.version.is_retired()
    }

    /// `name@digest` of the version this session runs, or `native`.
    pub fn version(&self) -> Arc<str> {
        self.version.label().clone()
    }

    /// Counts a failed call in the version's series.
    fn count<T>(&self, called: Result<T, CallError>) -> Result<T, CallError> {
        if let Err(error) = &called {
            self.version.series().failed(FailureKind::from(error));
        }
        called
    }

    /// See [`Instance::on_datagram`].
    ///
    /// # Errors
    ///
    /// A [`CallError`] from the plugin.
    pub async fn on_datagram(
        &mut self,
        peer: SocketAddr,
        data: &[u8],
    ) -> Result<Decision, CallError> {
        self.recycle_if_bloated().await?;
        let started = Instant::now();
        let decision = match &mut self.kind {
            SessionKind::Wasm(instance) => instance.on_datagram(peer, data).await,
            SessionKind::Native(native) => Ok(native.on_datagram(peer, data)),
        };
        self.version.series().call(started.elapsed());
        self.count(decision)
    }

    /// Whether it answers a batch of datagrams in one call (its plugin
    /// exports `udp-batch`).
    pub fn offers_batch(&self) -> bool {
        match &self.kind {
            SessionKind::Wasm(instance) => instance.offers_batch(),
            SessionKind::Native(_) => false,
        }
    }

    /// See [`Instance::on_datagrams`]. The call's time is recorded as that
    /// many calls of its share each, and a failed batch as a failure per
    /// datagram, so the version's series count datagrams either way.
    ///
    /// # Errors
    ///
    /// A [`CallError`] from the plugin; the whole batch failed.
    pub async fn on_datagrams(&mut self, batch: &Batch) -> Result<BatchReplies, CallError> {
        self.recycle_if_bloated().await?;
        let started = Instant::now();
        let replies = match &mut self.kind {
            SessionKind::Wasm(instance) => instance.on_datagrams(batch).await,
            SessionKind::Native(_) => {
                Err(CallError::Batch("native code takes no batches".to_owned()))
            }
        };
        let count = u32::try_from(batch.len()).unwrap_or(u32::MAX).max(1);
        let share = started.elapsed() / count;
        for _ in 0..count {
            self.version.series().call(share);
        }
        if let Err(error) = &replies {
            for _ in 0..count {
                self.version.series().failed(FailureKind::from(error));
            }
        }
        replies
    }

    /// See [`Instance::on_open`].
    ///
    /// # Errors
    ///
    /// A [`CallError`] from the plugin.
    pub async fn on_open(
        &mut self,
        conn: &Connection,
        peer: SocketAddr,
    ) -> Result<Decision, CallError> {
        self.opened = true;
        let opened = match &mut self.kind {
            SessionKind::Wasm(instance) => instance.on_open(conn, peer).await,
            SessionKind::Native(_) => Ok(Decision {
                reply: None,
                next: Next::CarryOn,
            }),
        };
        self.count(opened)
    }

    /// See [`Instance::on_message`].
    ///
    /// # Errors
    ///
    /// A [`CallError`] from the plugin.
    pub async fn on_message(&mut self, data: &[u8]) -> Result<Decision, CallError> {
        self.recycle_if_bloated().await?;
        let started = Instant::now();
        let decision = match &mut self.kind {
            SessionKind::Wasm(instance) => instance.on_message(data).await,
            SessionKind::Native(native) => Ok(native.on_message(data)),
        };
        self.version.series().call(started.elapsed());
        self.count(decision)
    }

    /// Renews an instance whose memory has grown past `recycle-at`, before
    /// its next message: a fresh instance of the same version takes over,
    /// `restore`d from the old one's `snapshot` when the plugin offers
    /// `state`. A UDP listener's instance without `state` starts afresh (it
    /// would anyway once it met its memory cap, and fail a datagram doing
    /// so); a TCP connection's is renewed only with its state, since a
    /// fresh instance would not know the conversation. When renewing fails,
    /// or the fresh instance is as big at once, the session stays as it is
    /// and is not renewed again.
    ///
    /// # Errors
    ///
    /// The old instance trapped in `snapshot`: it cannot go on, and the
    /// message fails as if its own call had.
    async fn recycle_if_bloated(&mut self) -> Result<(), CallError> {
        let bloated = matches!(&self.kind, SessionKind::Wasm(instance) if instance.bloated());
        if !self.recycling || !bloated {
            return Ok(());
        }
        // Boxed, as every rare path that makes an instance: its future
        // holds a whole instantiation, and inline it would size every
        // call's future, and so every connection's task, for good.
        Box::pin(self.recycle()).await
    }

    /// Renews the instance (see [`Session::recycle_if_bloated`]).
    async fn recycle(&mut self) -> Result<(), CallError> {
        let SessionKind::Wasm(instance) = &mut self.kind else {
            return Ok(());
        };
        let stateful = instance.offers_state();
        if self.opened && !stateful {
            self.recycling = false;
            return Ok(());
        }
        let (grown, settings) = (instance.memory_bytes(), instance.settings().clone());
        let saved = if stateful {
            match instance.snapshot().await {
                Ok(saved) => saved,
                Err(error) => {
                    self.recycling = false;
                    self.version.series().failed(FailureKind::from(&error));
                    return Err(error);
                }
            }
        } else {
            None
        };
        let plugin = instance.plugin().clone();
        let renewal = match renew(plugin, settings.clone(), saved.as_ref()).await {
            Ok(Ok(fresh)) => {
                self.recycling = !fresh.bloated();
                **instance = fresh;
                if saved.is_some() {
                    Renewal::WithState
                } else {
                    Renewal::Fresh
                }
            }
            Ok(Err(reason)) => {
                self.recycling = false;
                Renewal::Failed(format!("restore refused: {reason}"))
            }
            Err(error) => {
                self.recycling = false;
                self.version.series().failed(FailureKind::from(&error));
                Renewal::Failed(error.to_string())
            }
        };
        tracing::info!(
            listener = %settings.tenant,
            "an instance of {} grew to {} MiB, past recycle-at ({} MiB): {renewal}",
            self.version.label(),
            grown >> 20,
            settings.limits.recycle_bytes >> 20,
        );
        metrics::counter!(
            "wasm_echo_instances_renewed_total",
            "listener" => settings.tenant.to_string(),
            "outcome" => renewal.label(),
        )
        .increment(1);
        Ok(())
    }

    /// See [`Instance::on_close`]. Its failure is logged by the listener,
    /// not counted: the conversation is over either way.
    ///
    /// # Errors
    ///
    /// A [`CallError`] from the plugin.
    pub async fn on_close(&mut self) -> Result<(), CallError> {
        match &mut self.kind {
            SessionKind::Wasm(instance) => instance.on_close().await,
            SessionKind::Native(_) => Ok(()),
        }
    }
}

/// A fresh instance of `plugin` with `settings`, given `saved` (the old
/// instance's state) if there is any. `Ok(Err)`: the fresh
/// instance refused the state.
async fn renew(
    plugin: Arc<Plugin>,
    settings: Arc<InstanceSettings>,
    saved: Option<&SavedState>,
) -> Result<Result<Instance, String>, CallError> {
    let mut fresh = Instance::new(&plugin, settings).await?;
    if let Some(saved) = saved
        && let Err(reason) = fresh.restore(&plugin.version_info(), saved).await?
    {
        return Ok(Err(reason));
    }
    Ok(Ok(fresh))
}

/// What renewing a grown instance came to.
enum Renewal {
    /// A fresh instance took over with the old one's state.
    WithState,
    /// A fresh instance took over; there was no state to hand over.
    Fresh,
    /// The old instance goes on, and is not renewed again.
    Failed(String),
}

impl Renewal {
    fn label(&self) -> &'static str {
        match self {
            Self::WithState => "with-state",
            Self::Fresh => "fresh",
            Self::Failed(_) => "failed",
        }
    }
}

impl std::fmt::Display for Renewal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::WithState => f.write_str("renewed, with its state"),
            Self::Fresh => f.write_str("renewed afresh (the plugin offers no state)"),
            Self::Failed(why) => write!(f, "not renewed ({why}); it goes on as it is"),
        }
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        self.version.series().instance(false);
        if self.movable {
            self.version.movable_sessions(-1);
        }
    }
}
