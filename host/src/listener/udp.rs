//! The UDP listener: one socket, one session that lives as long as it
//! behaves, one call per datagram.
//!
//! A datagram whose call fails gets no reply (or, for a tenant that fails
//! open, its own bytes back); the failure is logged with the peer, the
//! instance is dropped and a later datagram gets a fresh one, after a
//! backoff if failures repeat.

use std::fmt::Display;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::UdpSocket;
use tokio_util::sync::CancellationToken;

use crate::metrics::NoReply;
use crate::plugin::Next;
use crate::tenant::{Session, Tenant};

/// The largest payload a UDP datagram can carry over IPv4.
pub const MAX_DATAGRAM: usize = 65_507;

/// Datagrams handled one after another before the listener checks for
/// shutdown and housekeeping again.
const BATCH: usize = 64;

/// How often the per-peer rate limiter forgets quiet peers.
const HOUSEKEEPING: Duration = Duration::from_secs(60);

/// Serves `socket` until the plugin stops the listener or `shutdown` fires.
pub async fn serve(socket: UdpSocket, tenant: Arc<Tenant>, shutdown: CancellationToken) {
    let local = socket.local_addr().ok();
    // One buffer for the listener's life: a datagram is handled before the
    // next one is read.
    let mut buf = vec![0u8; MAX_DATAGRAM + 1];
    let mut session: Option<Session> = None;
    let mut housekeeping = tokio::time::interval(HOUSEKEEPING);
    // Made once: a fresh `cancelled()` per datagram would register and
    // unregister a waiter (a lock each) every time round.
    let cancelled = shutdown.cancelled();
    tokio::pin!(cancelled);
    'serving: loop {
        tokio::select! {
            () = &mut cancelled => break,
            _ = housekeeping.tick() => {
                tenant.forget_quiet_peers();
                continue;
            }
            ready = socket.readable() => if let Err(error) = ready {
                tracing::debug!(%error, "udp socket not readable");
                continue;
            },
        }
        // Handle what has queued up before waiting again, up to a batch, so
        // a busy listener pays for the wait once per batch rather than once
        // per datagram and still checks for shutdown between batches.
        for _ in 0..BATCH {
            let (len, peer) = match socket.try_recv_from(&mut buf) {
                Ok(received) => received,
                Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(error) => {
                    // ICMP errors from earlier replies surface here on some
                    // systems; they concern one peer, not the listener.
                    tracing::debug!(%error, "udp receive failed");
                    continue;
                }
            };
            tenant.metrics.datagram_in(len);
            if !tenant.admit_message(peer.ip()) {
                tenant.metrics.dropped(NoReply::RateLimit);
                tracing::debug!(listener = tenant.name(), %peer, "datagram dropped: rate limit");
                continue;
            }
            if handle(&socket, &tenant, &mut session, peer, &buf[..len]).await
                == Some(Next::StopListener)
            {
                if tenant.config.honor_stop {
                    tracing::info!(listener = tenant.name(), %peer, "plugin stopped the udp listener");
                    break 'serving;
                }
                tracing::warn!(listener = tenant.name(), %peer, "plugin asked to stop the listener; ignored (honor-stop = false)");
            }
        }
    }
    if let Some(local) = local {
        tracing::info!(listener = tenant.name(), "udp listener on {local} stopped");
    }
}

/// Runs one datagram through the plugin and sends the reply. Returns what
/// the plugin wants next, or `None` when the message failed.
async fn handle(
    socket: &UdpSocket,
    tenant: &Tenant,
    session: &mut Option<Session>,
    peer: SocketAddr,
    data: &[u8],
) -> Option<Next> {
    // After a reload, the next datagram is the new version's.
    if session
        .as_ref()
        .is_some_and(|live| !tenant.is_current(live))
    {
        *session = None;
    }
    let live = match session {
        Some(live) => live,
        None if !tenant.may_instantiate() => {
            fail(
                socket,
                tenant,
                peer,
                data,
                &tenant.version_label(),
                "plugin is backing off after repeated failures",
            )
            .await;
            return None;
        }
        None => match tenant.session().await {
            Ok(fresh) => session.insert(fresh),
            Err(error) => {
                tenant.record_failure();
                fail(
                    socket,
                    tenant,
                    peer,
                    data,
                    &tenant.version_label(),
                    format!("instantiation failed: {error}"),
                )
                .await;
                return None;
            }
        },
    };
    let decision = match live.on_datagram(peer, data).await {
        Ok(decision) => decision,
        Err(error) => {
            let version = live.version();
            *session = None;
            tenant.record_failure();
            tenant.metrics.failed(&version, &error);
            fail(socket, tenant, peer, data, &version, error).await;
            return None;
        }
    };
    tenant.record_success();
    if let Some(reply) = &decision.reply {
        if let Err(reason) = tenant.vet_reply(reply, Some(data.len())) {
            tenant.metrics.failure(&live.version(), "reply");
            fail(socket, tenant, peer, data, &live.version(), reason).await;
            return None;
        }
        send(socket, tenant, peer, reply).await;
    }
    Some(decision.next)
}

/// A failed datagram: logged, and answered with its own bytes if the tenant
/// fails open.
async fn fail(
    socket: &UdpSocket,
    tenant: &Tenant,
    peer: SocketAddr,
    data: &[u8],
    version: &str,
    reason: impl Display,
) {
    tenant.metrics.dropped(NoReply::Failed);
    match tenant.failure_reply(data) {
        Some(echo) => {
            tracing::warn!(listener = tenant.name(), version, %peer, "datagram failed, echoed (fail-open): {reason}");
            send(socket, tenant, peer, echo).await;
        }
        None => {
            tracing::warn!(listener = tenant.name(), version, %peer, "datagram dropped: {reason}")
        }
    }
}

async fn send(socket: &UdpSocket, tenant: &Tenant, peer: SocketAddr, reply: &[u8]) {
    match socket.send_to(reply, peer).await {
        Ok(sent) => tenant.metrics.datagram_out(sent),
        Err(error) => {
            tracing::warn!(listener = tenant.name(), %peer, "reply of {} bytes not sent: {error}", reply.len());
        }
    }
}
