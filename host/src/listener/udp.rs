//! The UDP listener: one socket, one plugin instance that lives as long as
//! it behaves, one call per datagram.
//!
//! A datagram whose call fails gets no reply; the failure is logged with the
//! peer, the instance is dropped and the next datagram gets a fresh one.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::UdpSocket;
use tokio_util::sync::CancellationToken;

use super::Tenant;
use crate::plugin::{Instance, Next};

/// The largest payload a UDP datagram can carry over IPv4.
pub const MAX_DATAGRAM: usize = 65_507;

/// Serves `socket` until the plugin stops the listener or `shutdown` fires.
pub async fn serve(socket: UdpSocket, tenant: Arc<Tenant>, shutdown: CancellationToken) {
    let local = socket.local_addr().ok();
    // One buffer for the listener's life: a datagram is handled before the
    // next one is read.
    let mut buf = vec![0u8; MAX_DATAGRAM + 1];
    let mut instance: Option<Instance> = None;
    loop {
        let (len, peer) = tokio::select! {
            () = shutdown.cancelled() => break,
            received = socket.recv_from(&mut buf) => match received {
                Ok(received) => received,
                Err(error) => {
                    // ICMP errors from earlier replies surface here on some
                    // systems; they concern one peer, not the listener.
                    tracing::debug!(%error, "udp receive failed");
                    continue;
                }
            },
        };
        let Some(next) = handle(&socket, &tenant, &mut instance, peer, &buf[..len]).await else {
            continue;
        };
        if next == Next::StopListener {
            tracing::info!(listener = "udp", plugin = tenant.plugin.name(), %peer, "plugin stopped the listener");
            break;
        }
    }
    if let Some(local) = local {
        tracing::info!("udp listener on {local} stopped");
    }
}

/// Runs one datagram through the plugin and sends the reply. Returns what
/// the plugin wants next, or `None` when the call failed.
async fn handle(
    socket: &UdpSocket,
    tenant: &Tenant,
    instance: &mut Option<Instance>,
    peer: SocketAddr,
    data: &[u8],
) -> Option<Next> {
    let plugin = tenant.plugin.name();
    let live = match instance {
        Some(live) => live,
        None => match Instance::new(&tenant.plugin, tenant.config.clone(), &tenant.limits).await {
            Ok(fresh) => instance.insert(fresh),
            Err(error) => {
                tracing::warn!(listener = "udp", plugin, %peer, "datagram dropped: instantiation failed: {error}");
                return None;
            }
        },
    };
    let decision = match live.on_datagram(peer, data).await {
        Ok(decision) => decision,
        Err(error) => {
            tracing::warn!(listener = "udp", plugin, %peer, "datagram dropped: {error}");
            *instance = None;
            return None;
        }
    };
    if let Some(reply) = decision.reply
        && let Err(error) = socket.send_to(&reply, peer).await
    {
        tracing::warn!(listener = "udp", plugin, %peer, "reply of {} bytes not sent: {error}", reply.len());
    }
    Some(decision.next)
}
