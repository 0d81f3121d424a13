//! A session: one conversation's handler (a plugin instance, or native
//! code) on one version, timing its calls and counting its failures in that
//! version's series. A TCP connection has one for its life; a UDP listener
//! keeps one while it behaves.
//!
//! When to make or drop a session is the listener's business; what a call
//! does inside the sandbox is the plugin's.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use super::native::NativeHandler;
use super::version::Version;
use crate::metrics::FailureKind;
use crate::plugin::{CallError, Connection, Decision, Instance, Next};

/// One conversation's handler and the version it runs.
pub struct Session {
    kind: SessionKind,
    /// Held for the session's life: the version (and its series) stays
    /// while anything runs it.
    version: Arc<Version>,
}

enum SessionKind {
    /// A plugin instance (boxed: a store is large next to a pointer).
    Wasm(Box<Instance>),
    /// Native code.
    Native(Arc<dyn NativeHandler>),
}

impl Session {
    /// A session on `version` with `instance`.
    pub(super) fn wasm(version: Arc<Version>, instance: Instance) -> Self {
        Self::new(version, SessionKind::Wasm(Box::new(instance)))
    }

    /// A session on `version`, running `native`.
    pub(super) fn native(version: Arc<Version>, native: Arc<dyn NativeHandler>) -> Self {
        Self::new(version, SessionKind::Native(native))
    }

    fn new(version: Arc<Version>, kind: SessionKind) -> Self {
        version.series().instance(true);
        Self { kind, version }
    }

    /// The version it runs.
    pub(super) fn version_of(&self) -> &Arc<Version> {
        &self.version
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
    }
}
