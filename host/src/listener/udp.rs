//! The UDP listener: one socket on a thread of its own, one session that
//! lives as long as it behaves, one call per datagram, datagrams read and
//! answered in batches.
//!
//! After a reload the listener's session moves to the new version at once,
//! between two datagrams, handing its state over when both versions offer
//! `state` (see [`crate::tenant`]'s migration): no datagram is handled by
//! either version meanwhile.
//!
//! A plugin that exports the contract's optional `udp-batch` gets the
//! datagrams of a read in one call instead (see [`batchable`] for when it
//! does not); rate limits, reply checks, metrics and failures still apply
//! datagram by datagram, and a batch that fails fails each of its
//! datagrams as a failed call would.
//!
//! A datagram whose call fails gets no reply (or, for a tenant that fails
//! open, its own bytes back); the failure is logged with the peer, the
//! instance is dropped and a later datagram gets a fresh one, after a
//! backoff if failures repeat.
//!
//! During a rollout ([`crate::rollout`]) a canary's candidate gets a
//! session of its own beside the stable one, and the peers its hash picks;
//! in shadow mode each datagram answered by the stable version is copied to
//! the candidate's worker, off this thread. Once the rollout ends, the
//! candidate's session goes and every datagram is the stable session's.
//!
//! Replies wait at most the tenant's write timeout for room on the socket;
//! then they are dropped and counted, so a socket that stays full never
//! holds the listener (or a shutdown) up.

use std::fmt::Display;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use tokio::net::UdpSocket;
use tokio_util::sync::CancellationToken;

use super::datagrams::{Inbox, Outbox};
use crate::metrics::NoReply;
use crate::plugin::{Batch, Next};
use crate::recording::{Event, Outcome, Record};
use crate::rollout::{Mode, Rollout, ShadowFeed};
use crate::tenant::{Session, Tenant};

/// The largest payload a UDP datagram can carry over IPv4.
pub const MAX_DATAGRAM: usize = 65_507;

/// How often the per-peer rate limiter forgets quiet peers.
const HOUSEKEEPING: Duration = Duration::from_secs(60);

/// The longest a reply waits for the rest of its batch to be handled: a
/// slow plugin's first replies go out without waiting for 32 calls.
const FLUSH_AFTER: Duration = Duration::from_micros(200);

/// Serves `socket` on a thread of its own, with a single-threaded tokio
/// runtime, until the plugin stops the listener or `shutdown` fires; the
/// returned future ends with it.
///
/// A UDP listener is one task that handles its datagrams in order. On the
/// shared worker threads it was parked and woken around every batch, and
/// the wake-ups cost as much as the plugin calls (BENCHMARKS.md: 1.4x the
/// datagrams a second on its own thread). It also keeps a plugin that spins
/// until its deadline off the threads that serve TCP connections. The cost
/// is one mostly idle thread per UDP listener.
pub async fn serve_on_own_thread(
    socket: UdpSocket,
    tenant: Arc<Tenant>,
    shutdown: CancellationToken,
) {
    let name = tenant.name().to_owned();
    // Taken out of this runtime's reactor, to join the thread's own.
    let socket = match socket.into_std() {
        Ok(socket) => socket,
        Err(error) => {
            tracing::error!(listener = name, "udp listener not started: {error}");
            return;
        }
    };
    let (done, finished) = tokio::sync::oneshot::channel::<()>();
    let thread = std::thread::Builder::new()
        .name(format!("udp {name}"))
        .spawn(move || {
            let runtime = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(runtime) => runtime,
                Err(error) => {
                    tracing::error!(
                        listener = tenant.name(),
                        "udp listener not started: {error}"
                    );
                    return;
                }
            };
            runtime.block_on(async move {
                match UdpSocket::from_std(socket) {
                    Ok(socket) => serve(socket, tenant, shutdown).await,
                    Err(error) => {
                        tracing::error!(
                            listener = tenant.name(),
                            "udp listener not started: {error}"
                        );
                    }
                }
            });
            let _ = done.send(());
        });
    if let Err(error) = thread {
        tracing::error!(
            listener = name,
            "udp listener not started: no thread: {error}"
        );
        return;
    }
    if finished.await.is_err() {
        tracing::error!(listener = name, "udp listener thread ended abnormally");
    }
}

/// Serves `socket` until the plugin stops the listener or `shutdown` fires.
///
/// Datagrams are read in batches (see [`super::datagrams`]): each batch is
/// handled in order, one plugin call per datagram or one for the batch
/// (see [`batchable`]), and its replies are sent together before the next
/// batch is read (or sooner, see [`FLUSH_AFTER`]).
pub async fn serve(socket: UdpSocket, tenant: Arc<Tenant>, shutdown: CancellationToken) {
    let local = socket.local_addr().ok();
    let mut inbox = Inbox::new();
    let mut outbox = Outbox::default();
    // The datagrams of one batch call, in buffers kept for the listener's
    // life.
    let mut batch = Batch::new();
    let mut unsent = SendFailures::default();
    let mut session: Option<Session> = None;
    // A canary's candidate session, while a rollout runs.
    let mut candidate: Option<Session> = None;
    let mut housekeeping = tokio::time::interval(HOUSEKEEPING);
    let mut swaps = tenant.swaps();
    // Made once: a fresh `cancelled()` per batch would register and
    // unregister a waiter (a lock each) every time round.
    let cancelled = shutdown.cancelled();
    tokio::pin!(cancelled);
    let mut stopped = false;
    while !stopped {
        tokio::select! {
            () = &mut cancelled => break,
            _ = housekeeping.tick() => {
                tenant.forget_quiet_peers();
                continue;
            }
            // Between two batches, so between two datagrams.
            Ok(()) = swaps.changed() => {
                upgrade(&tenant, &mut session).await;
                continue;
            }
            ready = socket.readable() => if let Err(error) = ready {
                tracing::debug!(%error, "udp socket not readable");
                continue;
            },
        }
        match inbox.receive(&socket) {
            Ok(_) => {}
            Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(error) => {
                // ICMP errors from earlier replies surface here on some
                // systems; they concern one peer, not the listener.
                tracing::debug!(%error, "udp receive failed");
                continue;
            }
        }
        let mut waiting_since = Instant::now();
        let mut index = 0;
        while let Some((peer, data)) = inbox.get(index) {
            // Two datagrams or more left, and a session that takes them
            // together: the rest of the read in one call.
            if inbox.get(index + 1).is_some() && batchable(&tenant, &session) {
                // No rollout runs: a candidate's session is over.
                candidate = None;
                batch.clear();
                while let Some((peer, data)) = inbox.get(index) {
                    index += 1;
                    if admit(&tenant, peer, data) {
                        batch.push(peer, data);
                    }
                }
                if batch.is_empty() {
                    continue;
                }
                let call = handle_batch(&tenant, &mut session, &mut outbox, &batch);
                let Some(outcome) = unless_cancelled(cancelled.as_mut(), call).await else {
                    stopped = true;
                    break;
                };
                let Some((handled, Next::StopListener)) = outcome else {
                    continue;
                };
                let peer = batch.get(handled.saturating_sub(1)).map(|(peer, _)| peer);
                if tenant.honor_stop() {
                    if let Some(peer) = peer {
                        tracing::info!(listener = tenant.name(), %peer, "plugin stopped the udp listener");
                    }
                    // The rest of the batch goes unanswered, as datagrams
                    // still queued on the socket would.
                    stopped = true;
                    break;
                }
                stop_ignored(&tenant, peer);
                // What the plugin left of the batch, one by one: as if
                // each had come after the stop it ignored.
                for position in handled..batch.len() {
                    let Some((peer, data)) = batch.get(position) else {
                        break;
                    };
                    let call = route(
                        &tenant,
                        &mut session,
                        &mut candidate,
                        &mut outbox,
                        peer,
                        data,
                    );
                    let Some(next) = unless_cancelled(cancelled.as_mut(), call).await else {
                        stopped = true;
                        break;
                    };
                    if next == Some(Next::StopListener) {
                        stop_ignored(&tenant, Some(peer));
                    }
                }
                if stopped {
                    break;
                }
                continue;
            }
            index += 1;
            if !admit(&tenant, peer, data) {
                continue;
            }
            let call = route(
                &tenant,
                &mut session,
                &mut candidate,
                &mut outbox,
                peer,
                data,
            );
            let Some(next) = unless_cancelled(cancelled.as_mut(), call).await else {
                stopped = true;
                break;
            };
            if next == Some(Next::StopListener) {
                if tenant.honor_stop() {
                    tracing::info!(listener = tenant.name(), %peer, "plugin stopped the udp listener");
                    // The rest of the batch goes unanswered, as datagrams
                    // still queued on the socket would.
                    stopped = true;
                    break;
                }
                stop_ignored(&tenant, Some(peer));
            }
            if !outbox.is_empty() && waiting_since.elapsed() >= FLUSH_AFTER {
                flush(&socket, &tenant, &mut outbox, &mut unsent).await;
                waiting_since = Instant::now();
            }
        }
        flush(&socket, &tenant, &mut outbox, &mut unsent).await;
    }
    if let Some(local) = local {
        tracing::info!(listener = tenant.name(), "udp listener on {local} stopped");
    }
}

/// Counts a datagram in, and whether its peer's rate admits it; one that
/// is not is counted as dropped.
fn admit(tenant: &Tenant, peer: SocketAddr, data: &[u8]) -> bool {
    tenant.metrics().datagram_in(data.len());
    if tenant.admit_message(peer.ip()) {
        return true;
    }
    tenant.metrics().dropped(NoReply::RateLimit);
    tracing::debug!(listener = tenant.name(), %peer, "datagram dropped: rate limit");
    false
}

/// Logs (within the tenant's warning budget) that a plugin's stop was not
/// carried out.
fn stop_ignored(tenant: &Tenant, peer: Option<SocketAddr>) {
    if !tenant.warnings().admit("stop ignored") {
        return;
    }
    let why = "plugin asked to stop the listener; ignored (honor-stop = false)";
    match peer {
        Some(peer) => tracing::warn!(listener = tenant.name(), %peer, "{why}"),
        None => tracing::warn!(listener = tenant.name(), "{why}"),
    }
}

/// Whether the next datagrams go to the plugin in one call: the listener
/// allows it (`udp-batch`), its session is on the current version and its
/// plugin exports `udp-batch`. Not while a rollout runs (a canary routes
/// peer by peer and a shadow copies each datagram) nor while the
/// listener's traffic is recorded (each datagram is sampled on its own):
/// those take one call per datagram, as does the first datagram after a
/// failure, which makes the fresh instance.
fn batchable(tenant: &Tenant, session: &Option<Session>) -> bool {
    tenant.udp_batch()
        && session
            .as_ref()
            .is_some_and(|live| live.offers_batch() && tenant.is_current(live))
        && tenant.recorder().is_none()
        && tenant.rollout_now().is_none()
}

/// Runs a batch through the stable session in one call and queues the
/// replies, each checked as a single datagram's would be. Returns how many
/// datagrams the plugin handled and what it wants next, or `None` when the
/// batch failed (each of its datagrams then failed as its own call would).
async fn handle_batch(
    tenant: &Tenant,
    session: &mut Option<Session>,
    outbox: &mut Outbox,
    batch: &Batch,
) -> Option<(usize, Next)> {
    let live = session.as_mut()?;
    tenant.metrics().batch(batch.len());
    let replies = match live.on_datagrams(batch).await {
        Ok(replies) => replies,
        Err(error) => {
            let version = live.version();
            *session = None;
            tenant.record_failure();
            fail_batch(outbox, tenant, batch, &version, error);
            return None;
        }
    };
    tenant.record_success();
    for (index, reply) in replies.iter().enumerate() {
        let (Some(reply), Some((peer, data))) = (reply, batch.get(index)) else {
            continue;
        };
        if let Err(reason) = tenant.vet_reply(live, reply, Some(data.len())) {
            let version = live.version();
            fail(
                outbox,
                tenant,
                peer,
                data,
                &version,
                NoReply::RefusedReply,
                reason,
            );
            continue;
        }
        outbox.push(peer, reply.to_vec());
    }
    Some((replies.handled(), replies.next()))
}

/// A batch whose call failed: each datagram is counted and, if the tenant
/// fails open, answered with its own bytes; one line says why (within the
/// tenant's warning budget), not one per datagram.
fn fail_batch(
    outbox: &mut Outbox,
    tenant: &Tenant,
    batch: &Batch,
    version: &str,
    reason: impl Display,
) {
    let mut echoed = false;
    for index in 0..batch.len() {
        let Some((peer, data)) = batch.get(index) else {
            break;
        };
        tenant.metrics().dropped(NoReply::Failed);
        if let Some(echo) = tenant.failure_reply(data) {
            outbox.push(peer, echo.to_vec());
            echoed = true;
        }
    }
    let datagrams = batch.len();
    if echoed {
        if tenant.warnings().admit("datagram failed, echoed") {
            tracing::warn!(
                listener = tenant.name(),
                version,
                "batch of {datagrams} datagrams failed, echoed (fail-open): {reason}"
            );
        }
    } else if tenant.warnings().admit("datagram dropped") {
        tracing::warn!(
            listener = tenant.name(),
            version,
            "batch of {datagrams} datagrams dropped: {reason}"
        );
    }
}

/// Runs `call` unless a shutdown comes first; `None` then. A shutdown
/// does not wait for the call in flight: it is abandoned with its
/// instance, and the rest of the batch with it. Biased: a call that
/// finishes at once (nearly all of them) never polls `cancelled`, which
/// would take a lock.
async fn unless_cancelled<T>(
    cancelled: Pin<&mut impl Future<Output = ()>>,
    call: impl Future<Output = T>,
) -> Option<T> {
    tokio::select! {
        biased;
        value = call => Some(value),
        () = cancelled => None,
    }
}

/// How often a listener may log that replies were not sent.
const SEND_WARNING_EVERY: Duration = Duration::from_secs(60);

/// Replies that were not sent, and when that was last logged. Peers that
/// cannot be reached, or a socket that stays full, must not decide how many
/// lines the host writes: every one is counted (`drops_total{reason=
/// "unsent"}`), one in a minute is logged.
#[derive(Default)]
struct SendFailures {
    last_warning: Option<Instant>,
    since_warning: u64,
}

impl SendFailures {
    fn record(&mut self, tenant: &Tenant, unsent: &super::datagrams::Unsent) {
        tenant.metrics().dropped(NoReply::Unsent);
        self.since_warning += 1;
        if self
            .last_warning
            .is_some_and(|last| last.elapsed() < SEND_WARNING_EVERY)
        {
            return;
        }
        let error = match unsent.error.kind() {
            std::io::ErrorKind::TimedOut => format!(
                "the socket stayed full for {}",
                humantime::format_duration(tenant.write_timeout())
            ),
            _ => unsent.error.to_string(),
        };
        tracing::warn!(
            listener = tenant.name(),
            peer = %unsent.peer,
            "reply of {} bytes not sent: {error} ({} not sent since the last such line)",
            unsent.len,
            self.since_warning
        );
        self.last_warning = Some(Instant::now());
        self.since_warning = 0;
    }
}

/// Sends the queued replies, counting them; waits at most the tenant's
/// write timeout for room on the socket.
async fn flush(
    socket: &UdpSocket,
    tenant: &Tenant,
    outbox: &mut Outbox,
    unsent: &mut SendFailures,
) {
    outbox
        .flush(socket, tenant.write_timeout(), |sent| match sent {
            Ok(len) => tenant.metrics().datagram_out(len),
            Err(failed) => unsent.record(tenant, &failed),
        })
        .await;
}

/// Runs one datagram through the session it belongs to: the stable one,
/// or a running canary's candidate when its hash picks `peer`; in shadow
/// mode the stable one, with a copy to the candidate.
async fn route(
    tenant: &Arc<Tenant>,
    session: &mut Option<Session>,
    candidate: &mut Option<Session>,
    outbox: &mut Outbox,
    peer: SocketAddr,
    data: &[u8],
) -> Option<Next> {
    // Without a rollout this is one atomic load; the guard is not held
    // across the call.
    let rollout = tenant.rollout_now().as_ref().cloned();
    let Some(rollout) = rollout else {
        // A rollout ended: its candidate's instance goes (after a
        // promotion the stable session moves to the candidate's version).
        if candidate.is_some() {
            *candidate = None;
        }
        return handle(tenant, session, outbox, peer, data, None, None).await;
    };
    match rollout.mode() {
        Mode::Canary if rollout.picks(peer) => {
            if candidate
                .as_ref()
                .is_some_and(|live| !live.runs(rollout.candidate()))
            {
                *candidate = None;
            }
            handle(tenant, candidate, outbox, peer, data, Some(&rollout), None).await
        }
        Mode::Canary => handle(tenant, session, outbox, peer, data, None, None).await,
        Mode::Shadow => {
            let feed = rollout.udp_shadow(tenant);
            handle(tenant, session, outbox, peer, data, None, Some(feed)).await
        }
    }
}

/// Runs one datagram through the plugin and sends the reply: `session` is
/// the stable one, or `on_candidate`'s when that is `Some`; `shadow` gets
/// a copy of the datagram and the stable reply. Returns what the plugin
/// wants next, or `None` when the message failed.
async fn handle(
    tenant: &Tenant,
    session: &mut Option<Session>,
    outbox: &mut Outbox,
    peer: SocketAddr,
    data: &[u8],
    on_candidate: Option<&Rollout>,
    shadow: Option<&ShadowFeed>,
) -> Option<Next> {
    // After a reload, the next datagram is the new version's (the session
    // has mostly moved already, when the swap was announced).
    if on_candidate.is_none()
        && session
            .as_ref()
            .is_some_and(|live| !tenant.is_current(live))
    {
        upgrade(tenant, session).await;
    }
    // A datagram that meets a backing-off tenant reaches no plugin and is
    // not recorded.
    let recorder = tenant.recorder().filter(|recorder| recorder.sample());
    let live = match session {
        Some(live) => live,
        None if !tenant.may_instantiate() => {
            fail(
                outbox,
                tenant,
                peer,
                data,
                &tenant.version_label(),
                NoReply::Failed,
                "plugin is backing off after repeated failures",
            );
            return None;
        }
        None => match match on_candidate {
            Some(rollout) => tenant.candidate_session(rollout).await,
            None => tenant.session(true).await,
        } {
            Ok(fresh) => session.insert(fresh),
            Err(error) => {
                if let Some(recorder) = recorder {
                    recorder.record(Record {
                        time: SystemTime::now(),
                        event: Event::Datagram,
                        peer,
                        version: tenant.version_label(),
                        input: data.to_vec(),
                        outcome: Outcome::failed(&error),
                    });
                }
                tenant.record_failure();
                fail(
                    outbox,
                    tenant,
                    peer,
                    data,
                    &tenant.version_label(),
                    NoReply::Failed,
                    format!("instantiation failed: {error}"),
                );
                return None;
            }
        },
    };
    // Recording copies the datagram and the reply; only sampled ones.
    let started = recorder.map(|_| SystemTime::now());
    let called = live.on_datagram(peer, data).await;
    if let (Some(recorder), Some(time)) = (recorder, started) {
        recorder.record(Record {
            time,
            event: Event::Datagram,
            peer,
            version: live.version(),
            input: data.to_vec(),
            outcome: Outcome::of(&called),
        });
    }
    let decision = match called {
        Ok(decision) => decision,
        Err(error) => {
            let version = live.version();
            *session = None;
            tenant.record_failure();
            fail(outbox, tenant, peer, data, &version, NoReply::Failed, error);
            return None;
        }
    };
    tenant.record_success();
    if let Some(reply) = decision.reply {
        if let Err(reason) = tenant.vet_reply(live, &reply, Some(data.len())) {
            let version = live.version();
            fail(
                outbox,
                tenant,
                peer,
                data,
                &version,
                NoReply::RefusedReply,
                reason,
            );
            return None;
        }
        if let Some(feed) = shadow {
            feed.offer(Some(peer), data, Some(&reply));
        }
        outbox.push(peer, reply);
    } else if let Some(feed) = shadow {
        feed.offer(Some(peer), data, None);
    }
    Some(decision.next)
}

/// Moves the listener's session to the current version, with its state
/// if it can; without a session there is nothing to move (the next
/// datagram makes one on the current version).
async fn upgrade(tenant: &Tenant, session: &mut Option<Session>) {
    if let Some(live) = session
        && !tenant.upgrade(live, None).await.1
    {
        *session = None;
    }
}

/// A datagram whose plugin reply is not sent (`why`): counted, logged, and
/// answered with its own bytes if the tenant fails open.
fn fail(
    outbox: &mut Outbox,
    tenant: &Tenant,
    peer: SocketAddr,
    data: &[u8],
    version: &str,
    why: NoReply,
    reason: impl Display,
) {
    tenant.metrics().dropped(why);
    match tenant.failure_reply(data) {
        Some(echo) => {
            if tenant.warnings().admit("datagram failed, echoed") {
                tracing::warn!(listener = tenant.name(), version, %peer, "datagram failed, echoed (fail-open): {reason}");
            }
            outbox.push(peer, echo.to_vec());
        }
        None => {
            if tenant.warnings().admit("datagram dropped") {
                tracing::warn!(listener = tenant.name(), version, %peer, "datagram dropped: {reason}");
            }
        }
    }
}
