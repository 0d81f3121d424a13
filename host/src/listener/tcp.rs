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
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::Tenant;
use crate::plugin::{Connection, Decision, Framing, Instance, Next, endpoint};

/// How much of a connection's stream is read (and handed to the plugin as
/// one `raw` message) at a time.
pub const READ_CHUNK: usize = 16 * 1024;

/// Serves `listener` until the plugin stops it or `shutdown` fires, then
/// gives open connections `grace` to finish.
pub async fn serve(
    listener: TcpListener,
    tenant: Arc<Tenant>,
    shutdown: CancellationToken,
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
                    tracing::warn!(listener = "tcp", "accept failed: {error}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let connection = ConnectionTask {
            stream,
            peer,
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
            framing: Framing::Raw,
        };
        let decision = match instance.on_open(&conn, self.peer).await {
            Ok(decision) => decision,
            Err(error) => return End::Failed(error),
        };
        if let Some(end) = self.carry_out(decision).await {
            return end;
        }
        let mut buf = vec![0u8; READ_CHUNK];
        loop {
            let read = tokio::select! {
                () = self.hard_stop.cancelled() => return End::Shutdown,
                read = self.stream.read(&mut buf) => read,
            };
            let len = match read {
                Ok(0) => return End::PeerClosed,
                Ok(len) => len,
                Err(error) => return End::Io(error),
            };
            let decision = match instance.on_message(&buf[..len]).await {
                Ok(decision) => decision,
                Err(error) => return End::Failed(error),
            };
            if let Some(end) = self.carry_out(decision).await {
                return end;
            }
        }
    }

    /// Sends the reply and says whether the connection ends here.
    async fn carry_out(&mut self, decision: Decision) -> Option<End> {
        if let Some(reply) = decision.reply.filter(|reply| !reply.is_empty()) {
            let written = tokio::select! {
                () = self.hard_stop.cancelled() => return Some(End::Shutdown),
                written = self.stream.write_all(&reply) => written,
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
