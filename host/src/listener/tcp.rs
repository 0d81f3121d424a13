//! The TCP listener: accepts connections and gives each its own session, a
//! plugin instance born with the connection and dropped with it, so a
//! plugin's memory is that connection's state and a failure ends only that
//! connection.
//!
//! A connection keeps the plugin version it started with until it closes,
//! even when a reload swaps in a new one: it never sees two versions;
//! unless its tenant has `upgrade-connections`: then it moves to the new
//! version at its next message boundary (at once when it is waiting for
//! the peer), on the same socket, handing its state over (see
//! [`crate::tenant`]'s migration).
//!
//! A connection ends when its peer closes it, when nothing arrives for the
//! tenant's idle timeout, or when the peer takes no byte of a reply for the
//! write timeout (it sends but does not read); neither a silent peer nor a
//! deaf one holds its slot and its instance for longer.
//!
//! During a rollout ([`crate::rollout`]) a canary sends the new
//! connections its hash picks to the candidate; in shadow mode a new
//! connection's messages are copied, after each stable reply, to a
//! candidate instance of its own on another task. A connection on a
//! rolled-back candidate moves to the stable version at its next message.
//!
//! Stopping: when the plugin asks (`stop-listener`) or the server shuts
//! down, the listener stops accepting at once; open connections may finish
//! their exchange for a grace period (cut short by a second signal), then
//! they are closed.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::OwnedSemaphorePermit;
use tokio::time::Instant;
use tokio_util::bytes::{Buf, Bytes, BytesMut};
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};
use tokio_util::task::TaskTracker;

use crate::framing::{FrameError, Framed, MessageReader};
use crate::metrics::{CloseReason, NoReply};
use crate::plugin::{CallError, Connection, Decision, Next, endpoint};
use crate::recording::{Event, Outcome, Record, Recorder};
use crate::rollout::{Mode, ShadowFeed};
use crate::tenant::{Open, Session, Tenant};

/// The most of a connection's stream read (and handed to the plugin as one
/// `raw` message) at a time: a busy stream is read in large pieces, so it
/// costs fewer system calls and plugin calls per byte.
pub const READ_CHUNK: usize = 64 * 1024;

/// The most reply bytes a connection keeps queued in the kernel unsent
/// (`TCP_NOTSENT_LOWAT`). By default the kernel lets a writer queue the
/// whole send buffer (up to 4 MiB) and only wakes it once a third of that
/// has gone, so a peer reading a few hundred kilobytes a second could look
/// idle to the write timeout for seconds, and one that reads nothing holds
/// megabytes of kernel memory. With this mark the writer is woken each
/// time the peer has taken some 64 KiB: a peer that reads at all keeps its
/// connection. A fast peer never has this much unsent, so it costs nothing
/// there.
#[cfg(target_os = "linux")]
const UNSENT_LOW_WATER: u32 = 128 * 1024;

/// What a connection's first read asks for. Each read that fills its room
/// doubles the next, up to [`READ_CHUNK`], so a connection that only ever
/// exchanges short messages keeps a small buffer.
const FIRST_READ: usize = 4 * 1024;

/// How long a load balancer may take to send a PROXY header (or the idle
/// timeout, if shorter): it sends it at once, with or before the client's
/// first bytes.
const PROXY_HEADER_TIMEOUT: Duration = Duration::from_secs(5);

/// Serves `listener` until the plugin stops it or `shutdown` fires, then
/// gives open connections `grace` to finish, or less if `abort` fires.
pub async fn serve(
    listener: TcpListener,
    tenant: Arc<Tenant>,
    shutdown: CancellationToken,
    abort: CancellationToken,
    grace: Duration,
) {
    let local = listener.local_addr().ok();
    // `stop` ends accepting; `hard_stop` ends connections after the grace.
    let stop = shutdown.child_token();
    let hard_stop = CancellationToken::new();
    let connections = TaskTracker::new();
    loop {
        let (stream, peer) = tokio::select! {
            () = stop.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // Out of file descriptors, mostly: back off instead of
                    // spinning, and keep serving the connections we have.
                    if tenant.warnings().admit("accept failed") {
                        tracing::warn!(listener = tenant.name(), "accept failed: {error}");
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Some(permit) = tenant.admit_connection() else {
            tenant.metrics().rejected();
            tracing::debug!(
                listener = tenant.name(),
                %peer,
                "connection refused: max-connections ({}) reached",
                tenant.max_connections()
            );
            continue;
        };
        let connection = ConnectionTask {
            stream,
            peer,
            tenant: tenant.clone(),
            stop: stop.clone(),
            hard_stop: Box::pin(hard_stop.clone().cancelled_owned()),
            permit: Some(permit),
            recorded: tenant.recorder().and_then(Recorder::connection),
            early: BytesMut::new(),
        };
        connections.spawn(connection.run());
    }
    drop(listener);
    connections.close();
    if !connections.is_empty() {
        tracing::info!(
            listener = tenant.name(),
            "tcp listener stopped accepting; {} connection(s) have {} to finish",
            connections.len(),
            humantime::format_duration(grace)
        );
    }
    let cut_short = tokio::select! {
        () = connections.wait() => None,
        () = tokio::time::sleep(grace) => Some("grace period over"),
        () = abort.cancelled() => Some("grace period cut short"),
    };
    if let Some(why) = cut_short {
        tracing::info!(
            listener = tenant.name(),
            "{why}: closing {} connection(s)",
            connections.len()
        );
        hard_stop.cancel();
        connections.wait().await;
    }
    if let Some(local) = local {
        tracing::info!(listener = tenant.name(), "tcp listener on {local} stopped");
    }
}

/// One accepted connection and what it needs to serve itself.
///
/// Its task holds the future of [`ConnectionTask::run`] for as long as the
/// connection is open, and that future is as large as the largest future it
/// awaits. So what is awaited and large but rare (making an instance,
/// moving to another version) or short beside the wait for the peer (each
/// plugin call) is boxed: made when it is needed and freed after, it does
/// not size the task that every idle connection holds. Inline, they made
/// the task 4.5 KiB.
struct ConnectionTask {
    stream: TcpStream,
    peer: SocketAddr,
    tenant: Arc<Tenant>,
    /// Cancelled to stop the listener (the plugin's `stop-listener`).
    stop: CancellationToken,
    /// Completes when the grace period is over. Made once per connection:
    /// a fresh `cancelled()` per read or write would register and unregister
    /// a waiter (a lock each) every time.
    hard_stop: Pin<Box<WaitForCancellationFutureOwned>>,
    /// This connection's place under the tenant's `max-connections`, given
    /// back once the plugin's `on-close` has run, just before the
    /// connection is counted closed: a connection counted closed has freed
    /// its place.
    permit: Option<OwnedSemaphorePermit>,
    /// Its number in the tenant's recording, if it is recorded: a sampled
    /// connection is recorded whole.
    recorded: Option<u64>,
    /// What arrived after a PROXY header, read with it: the start of the
    /// stream the plugin sees.
    early: BytesMut,
}

/// How a connection ended, for the log.
enum End {
    /// The peer closed its side.
    PeerClosed,
    /// The plugin asked to close (or to stop the listener).
    PluginClosed,
    /// The server's grace period ran out.
    Shutdown,
    /// The grace period ran out during a plugin call: the call was
    /// abandoned, and its instance with it (no `on-close`).
    Abandoned,
    /// Nothing arrived for the tenant's idle timeout.
    Idle,
    /// The peer took no byte of a reply for the tenant's write timeout.
    WriteTimeout(Duration),
    /// A read or write failed.
    Io(std::io::Error),
    /// The peer broke the framing.
    Protocol(FrameError),
    /// A plugin call failed (or its reply broke a limit); the connection is
    /// closed without `on-close`.
    Failed(Failure),
}

/// Why a plugin ended its connection by failing, with the cause kept.
#[derive(Debug, thiserror::Error)]
enum Failure {
    /// A call into the instance failed.
    #[error("{version}: {error}")]
    Call {
        /// The version that failed.
        version: Arc<str>,
        /// How.
        #[source]
        error: CallError,
    },
    /// The fresh instance that was to take over (failing open) did not
    /// start.
    #[error("instantiation failed: {0}")]
    Start(#[source] CallError),
    /// The hand-over to a new version failed in the old instance's
    /// `snapshot`, and no fresh instance could take over.
    #[error("the state hand-over to a new version failed and no instance could take over")]
    Migration,
    /// The reply broke `max-reply`.
    #[error("{version}: {reason}")]
    Refused {
        /// The version that answered.
        version: Arc<str>,
        /// What the reply policy said.
        reason: String,
    },
}

impl ConnectionTask {
    async fn run(mut self) {
        let peer = self.peer;
        let tenant = self.tenant.clone();
        let listener = tenant.name();
        // Replies are small and request/response latency matters more than
        // packing segments.
        if let Err(error) = self.stream.set_nodelay(true) {
            tracing::debug!(listener, %peer, "TCP_NODELAY not set: {error}");
        }
        #[cfg(target_os = "linux")]
        if let Err(error) =
            socket2::SockRef::from(&self.stream).set_tcp_notsent_lowat(UNSENT_LOW_WATER)
        {
            tracing::debug!(listener, %peer, "TCP_NOTSENT_LOWAT not set: {error}");
        }
        // Behind a balancer the real client comes first, before any
        // instance is made for the connection.
        if let Some(policy) = tenant.proxy() {
            let header = tokio::select! {
                () = &mut self.hard_stop => return,
                header = super::proxy::read_header(
                    &mut self.stream,
                    peer,
                    policy,
                    tenant.idle_timeout().min(PROXY_HEADER_TIMEOUT),
                ) => header,
            };
            match header {
                Ok(accepted) => {
                    self.peer = accepted.peer;
                    self.early = accepted.rest;
                }
                Err(refusal) => {
                    tenant.metrics().proxy_refused(refusal);
                    if tenant.warnings().admit("connection refused (PROXY header)") {
                        tracing::warn!(listener, %peer, "connection closed: {refusal}");
                    }
                    let _ = self.stream.shutdown().await;
                    return;
                }
            }
        }
        let peer = self.peer;
        let mut session = match Box::pin(tenant.session_for(peer, tenant.upgrade_connections()))
            .await
        {
            Ok(session) => session,
            Err(error) => {
                tenant.record_failure();
                if tenant.warnings().admit("connection refused") {
                    tracing::warn!(listener, %peer, "connection refused: instantiation failed: {error}");
                }
                return;
            }
        };
        tenant.metrics().opened();
        let end = self.exchange(&mut session).await;
        let reason = match &end {
            End::PeerClosed => CloseReason::Peer,
            End::PluginClosed => CloseReason::Plugin,
            End::Shutdown | End::Abandoned => CloseReason::Shutdown,
            End::Idle => CloseReason::Idle,
            End::WriteTimeout(_) => CloseReason::WriteTimeout,
            End::Io(_) => CloseReason::Io,
            End::Protocol(_) => CloseReason::Protocol,
            End::Failed(_) => CloseReason::Failed,
        };
        let version = session.version();
        let version = &*version;
        // After the grace period the plugin gets no more calls: shutdown
        // must not wait for them.
        if !matches!(end, End::Failed(_) | End::Shutdown | End::Abandoned) {
            let closed = tokio::select! {
                () = &mut self.hard_stop => Ok(()),
                closed = Box::pin(session.on_close()) => closed,
            };
            if let Err(error) = closed
                && tenant.warnings().admit("on-close failed")
            {
                tracing::warn!(listener, %peer, version, "on-close failed: {error}");
            }
        }
        // Regression (metrics::rejections_closes_failures_…): the gauge of
        // open connections fell before on-close ran and the place was given
        // back, so a client that waited for it to fall could still be
        // refused for want of a place.
        drop(self.permit.take());
        tenant.metrics().closed(reason);
        match end {
            End::Failed(reason) => {
                if tenant.warnings().admit("connection closed (plugin failed)") {
                    tracing::warn!(listener, %peer, version, "connection closed: {reason}");
                }
            }
            End::Protocol(error) => {
                if tenant.warnings().admit("connection closed (framing)") {
                    tracing::warn!(listener, %peer, version, "connection closed: {error}");
                }
            }
            End::Idle => tracing::debug!(listener, %peer, version, "connection closed: idle"),
            // At debug, like idle: a peer must not decide how many lines
            // the host writes; the metrics count these.
            End::WriteTimeout(after) => tracing::debug!(
                listener,
                %peer,
                version,
                "connection reset: the peer took no byte of a reply for {}",
                humantime::format_duration(after)
            ),
            End::Io(error) => tracing::debug!(listener, %peer, version, "connection lost: {error}"),
            End::PeerClosed | End::PluginClosed | End::Shutdown | End::Abandoned => {}
        }
        // Send FIN after the last reply rather than relying on drop. This
        // cannot hang on a peer that does not read: the FIN is queued behind
        // the unsent bytes and `shutdown(2)` returns at once.
        let _ = self.stream.shutdown().await;
    }

    /// Opens the conversation and serves messages until it ends.
    async fn exchange(&mut self, session: &mut Session) -> End {
        let local = match self.stream.local_addr() {
            Ok(local) => local,
            Err(error) => return End::Io(error),
        };
        let conn = Connection {
            peer: endpoint(self.peer),
            local: endpoint(local),
            framing: self.tenant.framing().into(),
        };
        let started = self.recorded.map(|_| SystemTime::now());
        let opened = tokio::select! {
            () = &mut self.hard_stop => return End::Abandoned,
            opened = Box::pin(session.on_open(&conn, self.peer)) => opened,
        };
        let framing = self.tenant.framing();
        self.record(session, started, &opened, &[], |conn| Event::Open {
            conn,
            local,
            framing,
        });
        let decision = match opened {
            Ok(decision) => decision,
            Err(error) => {
                let version = session.version();
                return End::Failed(Failure::Call { version, error });
            }
        };
        if let Some(end) = self.carry_out(session, decision, None).await {
            return end;
        }
        // Only a connection on the stable version is shadowed: one a
        // canary gave the candidate has no stable reply to compare with.
        let shadow = self
            .tenant
            .rollout()
            .filter(|rollout| rollout.mode() == Mode::Shadow && !session.runs(rollout.candidate()))
            .map(|rollout| rollout.tcp_shadow(&self.tenant, conn.clone(), self.peer));
        let mut reader = MessageReader::new(self.tenant.framing(), self.tenant.max_message());
        let mut want = FIRST_READ;
        let mut buf = std::mem::take(&mut self.early);
        let mut peer_closed = false;
        // The idle timer is set once and only moved when it fires after
        // activity, rather than re-armed (a trip through tokio's timer
        // wheel) on every read.
        let idle_timeout = self.tenant.idle_timeout();
        let mut last_read = Instant::now();
        let idle = tokio::time::sleep(idle_timeout);
        tokio::pin!(idle);
        let mut swaps = self.tenant.swaps();
        let mut upgrading = self.tenant.upgrade_connections();
        loop {
            let next = if peer_closed {
                reader.next_at_eof(&mut buf)
            } else {
                reader.next(&mut buf)
            };
            match next {
                Ok(Some(message)) => {
                    if upgrading && let Some(end) = self.upgrade(session, &conn).await {
                        return end;
                    }
                    if session.on_retired() {
                        let open = Open {
                            conn: &conn,
                            peer: self.peer,
                        };
                        if !Box::pin(self.tenant.leave_candidate(session, Some(open))).await {
                            return End::Failed(Failure::Migration);
                        }
                    }
                    if let Some(end) = self.deliver(session, message, shadow.as_ref()).await {
                        return end;
                    }
                    continue;
                }
                Ok(None) if peer_closed => return End::PeerClosed,
                Ok(None) => {}
                Err(error) => return End::Protocol(error),
            }
            // A connection waiting for its peer holds no read buffer: with
            // no partial message in it, it is given back before the wait and
            // taken again once there is something to read. Most connections
            // spend most of their life waiting, and 10,000 idle ones would
            // otherwise hold 40 MiB of buffers. It costs an allocation per
            // read (tens of nanoseconds beside a plugin call and two system
            // calls).
            if buf.is_empty() && buf.capacity() > 0 {
                buf = BytesMut::new();
            }
            let ready = tokio::select! {
                () = &mut self.hard_stop => return End::Shutdown,
                () = &mut idle => {
                    let deadline = last_read + idle_timeout;
                    if deadline <= Instant::now() {
                        return End::Idle;
                    }
                    idle.as_mut().reset(deadline);
                    continue;
                }
                ready = self.stream.readable() => ready,
                // Waiting for the peer is a message boundary: move now.
                swapped = swaps.changed(), if upgrading => {
                    match swapped {
                        Ok(()) => if let Some(end) = self.upgrade(session, &conn).await {
                            return end;
                        },
                        // The tenant is going away: no more swaps.
                        Err(_) => upgrading = false,
                    }
                    continue;
                }
            };
            if let Err(error) = ready {
                return End::Io(error);
            }
            buf.reserve(want);
            let room = buf.capacity() - buf.len();
            match self.stream.try_read_buf(&mut buf) {
                Ok(0) => peer_closed = true,
                Ok(read) => {
                    last_read = Instant::now();
                    if read == room {
                        want = (want * 2).min(READ_CHUNK);
                    }
                }
                // Readiness can be stale: wait again.
                Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(error) => return End::Io(error),
            }
        }
    }

    /// Moves the connection to the current version, if it runs another;
    /// says whether the connection ends here (its old instance trapped in
    /// `snapshot` and no fresh one could take over).
    async fn upgrade(&mut self, session: &mut Session, conn: &Connection) -> Option<End> {
        if self.tenant.is_current(session) {
            return None;
        }
        let open = Open {
            conn,
            peer: self.peer,
        };
        let upgraded = tokio::select! {
            () = &mut self.hard_stop => return Some(End::Abandoned),
            upgraded = Box::pin(self.tenant.upgrade(session, Some(open))) => upgraded,
        };
        match upgraded {
            (_, true) => None,
            (_, false) => Some(End::Failed(Failure::Migration)),
        }
    }

    /// Hands one message to the plugin, within the peer's rate limit, and
    /// carries out the decision. Says whether the connection ends here.
    async fn deliver(
        &mut self,
        session: &mut Session,
        message: Bytes,
        shadow: Option<&ShadowFeed>,
    ) -> Option<End> {
        tokio::select! {
            () = &mut self.hard_stop => return Some(End::Shutdown),
            () = self.tenant.pace(self.peer.ip()) => {}
        }
        self.tenant.metrics().message_in(message.len());
        let started = self.recorded.map(|_| SystemTime::now());
        let called = tokio::select! {
            () = &mut self.hard_stop => return Some(End::Abandoned),
            called = Box::pin(session.on_message(&message)) => called,
        };
        self.record(session, started, &called, &message, |conn| Event::Message {
            conn,
        });
        match called {
            Ok(decision) => {
                // The copy is queued, not run: the candidate's call is
                // another task's, and never delays this reply.
                if let Some(feed) = shadow {
                    feed.offer(None, &message, decision.reply.as_deref());
                }
                self.carry_out(session, decision, Some(&message)).await
            }
            Err(error) => self.fail(session, &message, error).await,
        }
    }

    /// Records one exchange of this connection, if it is recorded (then
    /// `started` is when the call began); `event` makes the record's event
    /// from the connection's number.
    fn record(
        &self,
        session: &Session,
        started: Option<SystemTime>,
        called: &Result<Decision, CallError>,
        input: &[u8],
        event: impl FnOnce(u64) -> Event,
    ) {
        let (Some(conn), Some(time), Some(recorder)) =
            (self.recorded, started, self.tenant.recorder())
        else {
            return;
        };
        // Recording copies the message and the reply.
        recorder.record(Record {
            time,
            event: event(conn),
            peer: self.peer,
            version: session.version(),
            input: input.to_vec(),
            outcome: Outcome::of(called),
        });
    }

    /// A failed message: the connection closes, or, for a tenant that fails
    /// open, the message is echoed and a fresh instance takes over.
    async fn fail(
        &mut self,
        session: &mut Session,
        message: &[u8],
        error: CallError,
    ) -> Option<End> {
        self.tenant.record_failure();
        self.tenant.metrics().dropped(NoReply::Failed);
        let version = session.version();
        let failure = Failure::Call {
            version: version.clone(),
            error,
        };
        let Some(echo) = self.tenant.failure_reply(message) else {
            return Some(End::Failed(failure));
        };
        if self.tenant.warnings().admit("message failed, echoed") {
            tracing::warn!(listener = self.tenant.name(),
                version = &*version, peer = %self.peer, "message failed, echoed (fail-open): {failure}");
        }
        if let Some(end) = self.send(echo).await {
            return Some(end);
        }
        match Box::pin(self.tenant.session(self.tenant.upgrade_connections())).await {
            Ok(fresh) => *session = fresh,
            Err(error) => return Some(End::Failed(Failure::Start(error))),
        }
        None
    }

    /// Sends the reply and says whether the connection ends here.
    async fn carry_out(
        &mut self,
        session: &mut Session,
        decision: Decision,
        request: Option<&[u8]>,
    ) -> Option<End> {
        if let Some(reply) = decision.reply {
            if let Err(reason) = self.tenant.vet_reply(session, &reply, None) {
                self.tenant.metrics().dropped(NoReply::RefusedReply);
                let version = session.version();
                return match request.and_then(|request| self.tenant.failure_reply(request)) {
                    Some(echo) => self.send(echo).await,
                    None => Some(End::Failed(Failure::Refused { version, reason })),
                };
            }
            if let Some(end) = self.send(&reply).await {
                return Some(end);
            }
        }
        self.tenant.record_success();
        match decision.next {
            Next::CarryOn => None,
            Next::CloseConnection => Some(End::PluginClosed),
            Next::StopListener if !self.tenant.honor_stop() => {
                if self.tenant.warnings().admit("stop ignored") {
                    tracing::warn!(
                        listener = self.tenant.name(),
                        peer = %self.peer,
                        "plugin asked to stop the listener; ignored (honor-stop = false)"
                    );
                }
                None
            }
            Next::StopListener => {
                tracing::info!(listener = self.tenant.name(), peer = %self.peer, "plugin stopped the tcp listener");
                self.stop.cancel();
                Some(End::PluginClosed)
            }
        }
    }

    /// Frames and writes one reply.
    ///
    /// Each write must make progress within the tenant's write timeout: a
    /// peer that reads, however slowly, keeps its connection, but one that
    /// takes no byte for that long is not reading, and would otherwise hold
    /// its slot and its instance for good (the idle timer only runs while
    /// the server waits to read). Such a connection, and one whose grace
    /// period ends mid-reply, is reset: the unsent rest is discarded rather
    /// than left in the kernel's buffers after the socket is closed.
    async fn send(&mut self, reply: &[u8]) -> Option<End> {
        let framed = match Framed::new(self.tenant.framing(), reply) {
            Ok(framed) => framed,
            Err(error) => return Some(End::Protocol(error)),
        };
        let mut wire = framed.as_buf();
        let write_timeout = self.tenant.write_timeout();
        while wire.has_remaining() {
            // The write is polled first: a timer is only registered when
            // the socket's buffer is full, not for every reply.
            let stalled = tokio::time::sleep(write_timeout);
            let written = tokio::select! {
                biased;
                written = self.stream.write_buf(&mut wire) => written,
                () = &mut self.hard_stop => return Some(self.abandon(End::Shutdown)),
                () = stalled => return Some(self.abandon(End::WriteTimeout(write_timeout))),
            };
            match written {
                Ok(0) => return Some(End::Io(std::io::ErrorKind::WriteZero.into())),
                Ok(_) => {}
                Err(error) => return Some(End::Io(error)),
            }
        }
        self.tenant.metrics().message_out(framed.len());
        None
    }

    /// Ends the connection mid-reply: it will be reset when closed.
    fn abandon(&self, end: End) -> End {
        if let Err(error) = self.stream.set_zero_linger() {
            tracing::debug!(listener = self.tenant.name(), peer = %self.peer, "SO_LINGER not set: {error}");
        }
        end
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The size of the future `f` returns, without making one.
    fn future_size<A, F: Future>(_: impl FnOnce(A) -> F) -> usize {
        std::mem::size_of::<F>()
    }

    /// Regression (memory per idle connection): the calls and the
    /// instantiations a connection awaits were inline in its future, which
    /// made every connection's task 4.5 KiB, most of it never used again
    /// once the connection waited for its peer.
    #[test]
    fn a_connections_task_stays_small() {
        let size = future_size(ConnectionTask::run);
        assert!(size <= 2048, "a connection's future is {size} bytes");
    }
}
