//! One live instance of a plugin: where a `Store` is born and where it dies.
//! Every call into the guest goes through here, starts its deadline, and
//! turns whatever went wrong into a [`CallError`] the listener can log.
//!
//! A deadline is enforced twice over. Wasm code that runs is stopped by the
//! epoch ticker ([`super::host`]); a call that waits instead (blocked in a
//! WASI pollable, `std::thread::sleep` in a guest) runs no Wasm code for the
//! ticker to stop, so every call is also raced against a timer here, and
//! abandoned when the timer wins. An abandoned call leaves its instance in
//! an unknown state: like any failed call, the instance is never used again.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use wasmtime::Store;

use super::Plugin;
use super::batch::{Batch, BatchReplies};
use super::bindings::{Connection, Decision, Endpoint, Exports, SavedState, VersionInfo};
use super::host::{HostState, InstanceSettings};
use super::limits::{DeadlineExceeded, LimitExceeded};
use super::output::escape;
use super::runtime::{Busy, one_line};

/// Why a call into a plugin failed. The message it was handling fails with
/// it; the instance must not be used again.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    /// The call ran past its deadline and was stopped.
    #[error("plugin {0}")]
    Deadline(#[from] DeadlineExceeded),
    /// The instance tried to grow past its memory or table cap.
    #[error("plugin {0}")]
    Limit(#[from] LimitExceeded),
    /// The guest trapped (a panic, an `unreachable`, an out-of-bounds access)
    /// or returned something that does not fit the contract. The text may
    /// hold the guest's own words (its function names in a backtrace, say),
    /// so it is [escaped](escape) and bounded like anything else a plugin
    /// writes before the listeners log it.
    #[error("plugin trapped: {message}")]
    Trap {
        /// What went wrong, on one line, escaped: the trap itself, or the
        /// innermost cause of a call that broke the contract.
        message: String,
        /// wasmtime's whole error: the call's context and the guest's
        /// backtrace, for whoever walks the chain.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// A batch call returned replies that do not fit its datagrams (see
    /// the contract's `udp-batch`): the wrong number of them, or lengths
    /// that do not add up.
    #[error("plugin broke the udp-batch contract: {0}")]
    Batch(String),
}

impl From<wasmtime::Error> for CallError {
    fn from(error: wasmtime::Error) -> Self {
        if let Some(deadline) = error.downcast_ref::<DeadlineExceeded>() {
            return Self::Deadline(DeadlineExceeded(deadline.0));
        }
        if let Some(limit) = error.downcast_ref::<LimitExceeded>() {
            return Self::Limit(LimitExceeded { ..*limit });
        }
        let message = match error.downcast_ref::<wasmtime::Trap>() {
            Some(trap) => escape(&trap.to_string()).into_owned(),
            None => one_line(&error),
        };
        Self::Trap {
            message,
            source: error.into(),
        }
    }
}

/// A plugin instance with its own memory, for one TCP connection or one UDP
/// listener. It keeps its plugin (version) alive: a version's code is freed
/// when its last instance is dropped.
pub struct Instance {
    store: Store<HostState>,
    exports: Exports,
    plugin: Arc<Plugin>,
    /// The last datagram's sender as the plugin sees it: formatting an
    /// address costs more than the call it goes with, and a listener's
    /// datagrams mostly come from the same few peers.
    last_peer: Option<(IpAddr, Endpoint)>,
}

impl Instance {
    /// Instantiates `plugin` in a fresh store, with `settings`.
    ///
    /// # Errors
    ///
    /// A [`CallError`] if the guest's start-up code traps or breaks a limit.
    pub async fn new(
        plugin: &Arc<Plugin>,
        settings: Arc<InstanceSettings>,
    ) -> Result<Self, CallError> {
        let mut store = Store::new(
            plugin.pre.engine(),
            HostState::new(settings, plugin.name.clone(), plugin.ticker.clone()),
        );
        store.limiter(HostState::limiter);
        store.epoch_deadline_callback(|mut ctx| ctx.data_mut().on_epoch_tick());
        let deadline = start_call(&mut store, None, 1);
        let instance = within(deadline, plugin.pre.instantiate_async(&mut store)).await?;
        let exports = plugin.exports.load(&mut store, &instance)?;
        plugin.instances.fetch_add(1, Ordering::Relaxed);
        Ok(Self {
            store,
            exports,
            plugin: plugin.clone(),
            last_peer: None,
        })
    }

    /// The plugin (version) this instance runs.
    pub fn plugin(&self) -> &Arc<Plugin> {
        &self.plugin
    }

    /// The linear memory this instance has grown to, in bytes: a guest
    /// that leaks shows it here long before it meets its memory cap.
    pub fn memory_bytes(&self) -> usize {
        self.store.data().memory_bytes
    }

    /// What this instance was started with: a replacement gets the same.
    pub fn settings(&self) -> &Arc<InstanceSettings> {
        self.store.data().settings()
    }

    /// Whether its memory has grown past the tenant's `recycle-at`.
    pub fn bloated(&self) -> bool {
        self.memory_bytes() > self.settings().limits.recycle_bytes
    }

    /// Hands the plugin one datagram from `peer`.
    ///
    /// # Errors
    ///
    /// A [`CallError`] if the call traps, times out or breaks a limit.
    pub async fn on_datagram(
        &mut self,
        peer: SocketAddr,
        data: &[u8],
    ) -> Result<Decision, CallError> {
        let deadline = start_call(&mut self.store, Some(peer), 1);
        let sender = match &mut self.last_peer {
            Some((ip, sender)) if *ip == peer.ip() => {
                sender.port = peer.port();
                sender
            }
            last => &last.insert((peer.ip(), endpoint(peer))).1,
        };
        let udp = &self.exports.udp;
        within(
            deadline,
            udp.call_on_datagram(&mut self.store, sender, data),
        )
        .await
    }

    /// Whether it answers many datagrams in one call (it exports
    /// `udp-batch`).
    pub fn offers_batch(&self) -> bool {
        self.exports.batch.is_some()
    }

    /// Hands the plugin a batch of datagrams in one call, within the
    /// per-call deadline times the batch's size; the replies are checked
    /// against the batch before they are returned. An instance without
    /// `udp-batch` gets one `on-datagram` call per datagram instead, with
    /// the same result.
    ///
    /// # Errors
    ///
    /// As for [`Instance::on_datagram`], and [`CallError::Batch`] when the
    /// replies do not fit the batch.
    pub async fn on_datagrams(&mut self, batch: &Batch) -> Result<BatchReplies, CallError> {
        let Some(udp_batch) = &self.exports.batch else {
            return self.one_by_one(batch).await;
        };
        let messages = u32::try_from(batch.len()).unwrap_or(u32::MAX);
        let deadline = start_call(&mut self.store, None, messages);
        let replies = within(
            deadline,
            udp_batch.call_on_datagrams(&mut self.store, batch.datagrams()),
        )
        .await?;
        BatchReplies::check(replies, batch.len()).map_err(CallError::Batch)
    }

    /// A batch for a plugin without `udp-batch`: `on-datagram` for each
    /// datagram, up to one that stops the listener.
    async fn one_by_one(&mut self, batch: &Batch) -> Result<BatchReplies, CallError> {
        let mut replies = super::bindings::Replies {
            data: Vec::new(),
            lengths: Vec::with_capacity(batch.len()),
            next: super::bindings::Next::CarryOn,
        };
        for index in 0..batch.len() {
            let Some((peer, data)) = batch.get(index) else {
                break;
            };
            let decision = self.on_datagram(peer, data).await?;
            replies.lengths.push(decision.reply.map(|reply| {
                replies.data.extend_from_slice(&reply);
                u32::try_from(reply.len()).unwrap_or(u32::MAX)
            }));
            if decision.next == super::bindings::Next::StopListener {
                replies.next = decision.next;
                break;
            }
        }
        BatchReplies::check(replies, batch.len()).map_err(CallError::Batch)
    }

    /// Tells the plugin its connection is open.
    ///
    /// # Errors
    ///
    /// As for [`Instance::on_datagram`].
    pub async fn on_open(
        &mut self,
        conn: &Connection,
        peer: SocketAddr,
    ) -> Result<Decision, CallError> {
        let deadline = start_call(&mut self.store, Some(peer), 1);
        let tcp = &self.exports.tcp;
        within(deadline, tcp.call_on_open(&mut self.store, conn)).await
    }

    /// Hands the plugin one message of its connection.
    ///
    /// # Errors
    ///
    /// As for [`Instance::on_datagram`].
    pub async fn on_message(&mut self, data: &[u8]) -> Result<Decision, CallError> {
        let peer = self.store.data().peer;
        let deadline = start_call(&mut self.store, peer, 1);
        let tcp = &self.exports.tcp;
        within(deadline, tcp.call_on_message(&mut self.store, data)).await
    }

    /// Tells the plugin its connection is over.
    ///
    /// # Errors
    ///
    /// As for [`Instance::on_datagram`].
    pub async fn on_close(&mut self) -> Result<(), CallError> {
        let peer = self.store.data().peer;
        let deadline = start_call(&mut self.store, peer, 1);
        let tcp = &self.exports.tcp;
        within(deadline, tcp.call_on_close(&mut self.store)).await
    }

    /// Whether it can hand its state over (it exports `state`).
    pub fn offers_state(&self) -> bool {
        self.exports.state.is_some()
    }

    /// Asks the plugin for its state, to hand to a new version: `None`
    /// when it offers no `state` or has nothing to hand over.
    ///
    /// # Errors
    ///
    /// As for [`Instance::on_datagram`].
    pub async fn snapshot(&mut self) -> Result<Option<SavedState>, CallError> {
        let Some(state) = &self.exports.state else {
            return Ok(None);
        };
        let peer = self.store.data().peer;
        let deadline = start_call(&mut self.store, peer, 1);
        within(deadline, state.call_snapshot(&mut self.store)).await
    }

    /// Hands a fresh instance the state of `previous`. The outer error is
    /// a failed call; the inner one the plugin's own refusal. An instance
    /// without `state` refuses.
    ///
    /// # Errors
    ///
    /// As for [`Instance::on_datagram`].
    pub async fn restore(
        &mut self,
        previous: &VersionInfo,
        snapshot: &SavedState,
    ) -> Result<Result<(), String>, CallError> {
        let Some(state) = &self.exports.state else {
            return Ok(Err("it does not export `state`".to_owned()));
        };
        let peer = self.store.data().peer;
        let deadline = start_call(&mut self.store, peer, 1);
        within(
            deadline,
            state.call_restore(&mut self.store, previous, snapshot),
        )
        .await
    }
}

impl Drop for Instance {
    fn drop(&mut self) {
        self.plugin.instances.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A call's deadline, and its place among the calls in flight (which keeps
/// the epoch ticker ticking until the call is over).
struct Deadline {
    after: Duration,
    _busy: Busy,
}

/// Starts the deadline of the call about to be made, about `peer` (for log
/// lines; `None` for a batch, which is about many) and handling `messages`
/// messages (more than one for a batch), and returns it.
fn start_call(store: &mut Store<HostState>, peer: Option<SocketAddr>, messages: u32) -> Deadline {
    let state = store.data_mut();
    let busy = state.ticker.busy();
    state.call_started = Instant::now();
    state.peer = peer;
    let after = state.call_timeout(messages);
    state.call_budget = after;
    store.set_epoch_deadline(1);
    Deadline { after, _busy: busy }
}

/// Runs one call into the guest, abandoning it at `deadline` whatever the
/// guest is doing. The timer costs nothing for a call that finishes without
/// waiting: `timeout` polls the call first and arms its timer only if the
/// call has to wait.
///
/// Dropping the call's future unwinds the guest's fiber (wasmtime cancels
/// it); the caller must then drop the instance, as for any failed call.
async fn within<T>(
    deadline: Deadline,
    call: impl Future<Output = wasmtime::Result<T>>,
) -> Result<T, CallError> {
    match tokio::time::timeout(deadline.after, call).await {
        Ok(result) => Ok(result?),
        Err(_elapsed) => Err(CallError::Deadline(DeadlineExceeded(deadline.after))),
    }
}

/// The WIT form of a socket address.
pub fn endpoint(addr: SocketAddr) -> Endpoint {
    Endpoint {
        ip: addr.ip().to_string(),
        port: addr.port(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A failed call's message can carry text the guest chose; the
    /// listeners log it, so it must not start a line of its own.
    #[test]
    fn a_failed_calls_message_is_one_escaped_line() {
        let error = wasmtime::Error::msg("bad\nlisten\u{1b}[2J")
            .context("error while executing at wasm backtrace:\n    0: 0x1 - evil\rname");
        let CallError::Trap { message: text, .. } = CallError::from(error) else {
            panic!("not a trap");
        };
        assert!(!text.chars().any(char::is_control), "{text:?}");
        assert!(text.contains("evil\\rname"), "{text:?}");
        assert!(text.contains("listen\\x1b[2J"), "{text:?}");
    }
}
