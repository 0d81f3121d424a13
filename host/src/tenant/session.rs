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
use crate::plugin::{CallError, Connection, Decision, Instance, Next, SavedState, VersionInfo};

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
        let started = Instant::now();
        let decision = match &mut self.kind {
            SessionKind::Wasm(instance) => instance.on_datagram(peer, data).await,
            SessionKind::Native(native) => Ok(native.on_datagram(peer, data)),
        };
        self.version.series().call(started.elapsed());
        self.count(decision)
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
        let started = Instant::now();
        let decision = match &mut self.kind {
            SessionKind::Wasm(instance) => instance.on_message(data).await,
            SessionKind::Native(native) => Ok(native.on_message(data)),
        };
        self.version.series().call(started.elapsed());
        self.count(decision)
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

impl Drop for Session {
    fn drop(&mut self) {
        self.version.series().instance(false);
        if self.movable {
            self.version.movable_sessions(-1);
        }
    }
}
