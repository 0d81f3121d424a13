//! The TCP listener: accepts connections and gives each its own plugin
//! instance, born with the connection and dropped with it, so a plugin's
//! memory is that connection's state and a failure ends only that
//! connection.
//!
//! Stopping: when the plugin asks (`stop-listener`) or the server shuts
//! down, the listener stops accepting at once; open connections may finish
//! their exchange for a grace period, then they are closed.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::bytes::BytesMut;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::Tenant;
use crate::framing::{FrameError, Framing, MessageReader, frame_reply};
use crate::plugin::{Connection, Decision, Instance, Next, endpoint};

/// How much of a connection's stream is read (and handed to the plugin as
/// one `raw` message) at a time.
pub const READ_CHUNK: usize = 16 * 1024;

/// How a TCP listener treats its connections.
#[derive(Clone, Copy, Debug)]
pub struct TcpSettings {
    /// How the byte stream is cut into messages.
    pub framing: Framing,
    /// The longest message a peer may send in `lines` or `length-prefixed`
    /// mode.
    pub max_message: usize,
    /// How long open connections may go on once the listener stops.
    pub grace: Duration,
}

/// Serves `listener` until the plugin stops it or `shutdown` fires, then
/// gives open connections the grace period to finish.
pub async fn serve(
    listener: TcpListener,
    tenant: Arc<Tenant>,
    shutdown: CancellationToken,
    settings: TcpSettings,
) {
    let grace = settings.grace;
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
                    tracing::warn!(listener = "tcp", "accept failed: {error}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let connection = ConnectionTask {
            stream,
            peer,
            settings,
            reply: BytesMut::new(),
            tenant: tenant.clone(),
            stop: stop.clone(),
            hard_stop: hard_stop.clone(),
        };
        connections.spawn(connection.run());
    }
    drop(listener);
    connections.close();
    if !connections.is_empty() {
        tracing::info!(
            "tcp listener stopped accepting; {} connection(s) have {grace:?} to finish",
            connections.len()
        );
    }
    if tokio::time::timeout(grace, connections.wait())
        .await
        .is_err()
    {
        tracing::info!(
            "grace period over: closing {} connection(s)",
            connections.len()
        );
        hard_stop.cancel();
        connections.wait().await;
    }
    if let Some(local) = local {
        tracing::info!("tcp listener on {local} stopped");
    }
}

/// One accepted connection and what it needs to serve itself.
struct ConnectionTask {
    stream: TcpStream,
    peer: SocketAddr,
    settings: TcpSettings,
    /// The framed reply, reused across messages.
    reply: BytesMut,
    tenant: Arc<Tenant>,
    /// Cancelled to stop the listener (the plugin's `stop-listener`).
    stop: CancellationToken,
    /// Cancelled when the grace period is over.
    hard_stop: CancellationToken,
}

/// How a connection ended, for the log.
enum End {
    /// The peer closed its side.
    PeerClosed,
    /// The plugin asked to close (or to stop the listener).
    PluginClosed,
    /// The server's grace period ran out.
    Shutdown,
    /// A read or write failed.
    Io(std::io::Error),
    /// The peer broke the framing.
    Protocol(FrameError),
    /// A plugin call failed; the connection is closed without `on-close`.
    Failed(crate::plugin::CallError),
}

impl ConnectionTask {
    async fn run(mut self) {
        let plugin = self.tenant.plugin.name().to_owned();
        let peer = self.peer;
        // Replies are small and request/response latency matters more than
        // packing segments.
        if let Err(error) = self.stream.set_nodelay(true) {
            tracing::debug!(%peer, "TCP_NODELAY not set: {error}");
        }
        let tenant = self.tenant.clone();
        let mut instance = match Instance::new(
            &tenant.plugin,
            tenant.config.clone(),
            &tenant.limits,
        )
        .await
        {
            Ok(instance) => instance,
            Err(error) => {
                tracing::warn!(listener = "tcp", plugin, %peer, "connection refused: instantiation failed: {error}");
                return;
            }
        };
        let end = self.exchange(&mut instance).await;
        if !matches!(end, End::Failed(_))
            && let Err(error) = instance.on_close().await
        {
            tracing::warn!(listener = "tcp", plugin, %peer, "on-close failed: {error}");
        }
        match end {
            End::Failed(error) => {
                tracing::warn!(listener = "tcp", plugin, %peer, "connection closed: {error}");
            }
            End::Protocol(error) => {
                tracing::warn!(listener = "tcp", plugin, %peer, "connection closed: {error}");
            }
            End::Io(error) => {
                tracing::debug!(listener = "tcp", plugin, %peer, "connection lost: {error}")
            }
            End::PeerClosed | End::PluginClosed | End::Shutdown => {}
        }
        // Send FIN after the last reply rather than relying on drop.
        let _ = self.stream.shutdown().await;
    }

    /// Opens the conversation and serves messages until it ends.
    async fn exchange(&mut self, instance: &mut Instance) -> End {
        let local = match self.stream.local_addr() {
            Ok(local) => local,
            Err(error) => return End::Io(error),
        };
        let conn = Connection {
            peer: endpoint(self.peer),
            local: endpoint(local),
            framing: self.settings.framing.into(),
        };
        let decision = match instance.on_open(&conn, self.peer).await {
            Ok(decision) => decision,
            Err(error) => return End::Failed(error),
        };
        if let Some(end) = self.carry_out(decision).await {
            return end;
        }
        let mut reader = MessageReader::new(self.settings.framing, self.settings.max_message);
        let mut buf = BytesMut::with_capacity(READ_CHUNK);
        let mut peer_closed = false;
        loop {
            let next = if peer_closed {
                reader.next_at_eof(&mut buf)
            } else {
                reader.next(&mut buf)
            };
            match next {
                Ok(Some(message)) => {
                    let decision = match instance.on_message(&message).await {
                        Ok(decision) => decision,
                        Err(error) => return End::Failed(error),
                    };
                    if let Some(end) = self.carry_out(decision).await {
                        return end;
                    }
                    continue;
                }
                Ok(None) if peer_closed => return End::PeerClosed,
                Ok(None) => {}
                Err(error) => return End::Protocol(error),
            }
            buf.reserve(READ_CHUNK);
            let read = tokio::select! {
                () = self.hard_stop.cancelled() => return End::Shutdown,
                read = self.stream.read_buf(&mut buf) => read,
            };
            match read {
                Ok(0) => peer_closed = true,
                Ok(_) => {}
                Err(error) => return End::Io(error),
            }
        }
    }

    /// Sends the reply and says whether the connection ends here.
    async fn carry_out(&mut self, decision: Decision) -> Option<End> {
        if let Some(reply) = decision.reply {
            if let Err(error) = frame_reply(self.settings.framing, &reply, &mut self.reply) {
                return Some(End::Protocol(error));
            }
            let written = tokio::select! {
                () = self.hard_stop.cancelled() => return Some(End::Shutdown),
                written = self.stream.write_all(&self.reply) => written,
            };
            if let Err(error) = written {
                return Some(End::Io(error));
            }
        }
        match decision.next {
            Next::CarryOn => None,
            Next::CloseConnection => Some(End::PluginClosed),
            Next::StopListener => {
                tracing::info!(
                    listener = "tcp",
                    plugin = self.tenant.plugin.name(),
                    peer = %self.peer,
                    "plugin stopped the listener"
                );
                self.stop.cancel();
                Some(End::PluginClosed)
            }
        }
    }
}
