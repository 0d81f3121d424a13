//! Datagrams in batches: the UDP listener reads what has queued up on its
//! socket with one `recvmmsg` and sends the replies with one `sendmmsg`, so
//! a busy listener pays two system calls per batch instead of two per
//! datagram. Elsewhere than Linux it falls back to one call per datagram.
//!
//! What to answer is the listener's business; this module only moves bytes.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::Interest;
use tokio::net::UdpSocket;

/// The most datagrams moved by one system call.
pub const BATCH: usize = 32;

/// Room for the largest UDP payload (IPv6 allows a few bytes more than IPv4).
const BUFFER: usize = 1 << 16;

/// Received datagrams, in buffers kept for the listener's life.
pub struct Inbox {
    buffers: [Vec<u8>; BATCH],
    /// Length and sender of each datagram of the last batch, in order.
    received: Vec<(usize, SocketAddr)>,
}

impl Inbox {
    /// An empty inbox with its buffers.
    pub fn new() -> Self {
        Self {
            buffers: std::array::from_fn(|_| vec![0; BUFFER]),
            received: Vec::with_capacity(BATCH),
        }
    }

    /// Reads the datagrams queued on `socket`, up to [`BATCH`], without
    /// waiting; the last batch is forgotten.
    ///
    /// # Errors
    ///
    /// `WouldBlock` when nothing is queued (the socket's readiness is then
    /// cleared, so `readable()` waits again), or the error the first
    /// datagram's read met.
    pub fn receive(&mut self, socket: &UdpSocket) -> io::Result<usize> {
        self.received.clear();
        socket.try_io(Interest::READABLE, || {
            sys::receive(socket, &mut self.buffers, &mut self.received)
        })?;
        Ok(self.received.len())
    }

    /// The `index`th datagram of the last batch and its sender.
    pub fn get(&self, index: usize) -> Option<(SocketAddr, &[u8])> {
        let (len, peer) = *self.received.get(index)?;
        Some((peer, &self.buffers[index][..len]))
    }
}

/// Replies waiting to be sent together.
#[derive(Default)]
pub struct Outbox {
    queue: Vec<(SocketAddr, Vec<u8>)>,
}

/// A reply the kernel refused to send.
pub struct Unsent {
    /// Where it was going.
    pub peer: SocketAddr,
    /// Its size.
    pub len: usize,
    /// Why it was refused.
    pub error: io::Error,
}

impl Outbox {
    /// Whether no reply is waiting.
    pub fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    /// Queues `reply` to `peer`.
    pub fn push(&mut self, peer: SocketAddr, reply: Vec<u8>) {
        self.queue.push((peer, reply));
    }

    /// Sends every queued reply, waiting while the socket's send buffer is
    /// full, and reports each one: `Ok(len)` when sent, or why not. A reply
    /// the kernel refuses (an unreachable peer) is reported and skipped; the
    /// rest are still sent. When the buffer stays full for `patience`, the
    /// replies left are reported (`TimedOut`) and dropped: the listener
    /// goes back to reading (and to noticing a shutdown) rather than waiting
    /// on the network for ever.
    pub async fn flush(
        &mut self,
        socket: &UdpSocket,
        patience: Duration,
        mut report: impl FnMut(Result<usize, Unsent>),
    ) {
        let mut start = 0;
        while start < self.queue.len() {
            let end = self.queue.len().min(start + BATCH);
            let batch = &self.queue[start..end];
            // The send is polled first; the timer only starts when the
            // socket is full.
            let outcome = tokio::time::timeout(
                patience,
                socket.async_io(Interest::WRITABLE, || sys::send(socket, batch)),
            )
            .await;
            match outcome {
                Ok(Ok(sent)) if sent > 0 => {
                    for (_, reply) in &batch[..sent] {
                        report(Ok(reply.len()));
                    }
                    start += sent;
                }
                Err(_) => {
                    for (peer, reply) in &self.queue[start..] {
                        report(Err(Unsent {
                            peer: *peer,
                            len: reply.len(),
                            error: io::ErrorKind::TimedOut.into(),
                        }));
                    }
                    break;
                }
                // The kernel reports an error only when the first message of
                // the call fails; the rest are tried again after it.
                Ok(outcome) => {
                    let (peer, reply) = &batch[0];
                    let error = outcome
                        .err()
                        .unwrap_or_else(|| io::ErrorKind::WriteZero.into());
                    report(Err(Unsent {
                        peer: *peer,
                        len: reply.len(),
                        error,
                    }));
                    start += 1;
                }
            }
        }
        self.queue.clear();
    }
}

#[cfg(target_os = "linux")]
mod sys {
    use std::io::{self, IoSlice, IoSliceMut};
    use std::net::{SocketAddr, SocketAddrV4, SocketAddrV6};
    use std::os::fd::AsRawFd;

    use nix::sys::socket::{MsgFlags, MultiHeaders, SockaddrLike, SockaddrStorage, recvmmsg};
    use rustix::net::addr::SocketAddrArg;
    use rustix::net::{MMsgHdr, SendAncillaryBuffer, SendFlags, SocketAddrAny};
    use tokio::net::UdpSocket;

    use super::BATCH;

    /// One `recvmmsg` into `buffers`. The headers are made per call (a few
    /// hundred bytes, one allocation per batch): they hold raw pointers, so
    /// they cannot live across the listener's awaits.
    pub fn receive(
        socket: &UdpSocket,
        buffers: &mut [Vec<u8>; BATCH],
        received: &mut Vec<(usize, SocketAddr)>,
    ) -> io::Result<()> {
        let mut headers = MultiHeaders::<SockaddrStorage>::preallocate(BATCH, None);
        let mut slices = buffers.each_mut().map(|buffer| [IoSliceMut::new(buffer)]);
        let messages = recvmmsg(
            socket.as_raw_fd(),
            &mut headers,
            slices.iter_mut(),
            MsgFlags::MSG_DONTWAIT,
            None,
        )
        .map_err(io::Error::from)?;
        for message in messages {
            // A datagram always has a sender; the placeholder keeps the
            // indices of the buffers and of `received` in step.
            let peer = message
                .address
                .as_ref()
                .and_then(socket_addr)
                .unwrap_or(SocketAddr::from(([0, 0, 0, 0], 0)));
            received.push((message.bytes, peer));
        }
        Ok(())
    }

    fn socket_addr(address: &SockaddrStorage) -> Option<SocketAddr> {
        match address.family()? {
            nix::sys::socket::AddressFamily::Inet => address
                .as_sockaddr_in()
                .map(|v4| SocketAddrV4::from(*v4).into()),
            nix::sys::socket::AddressFamily::Inet6 => address
                .as_sockaddr_in6()
                .map(|v6| SocketAddrV6::from(*v6).into()),
            _ => None,
        }
    }

    /// One `sendmmsg` of `batch`; returns how many were sent.
    pub fn send(socket: &UdpSocket, batch: &[(SocketAddr, Vec<u8>)]) -> io::Result<usize> {
        let addresses: Vec<SocketAddrAny> = batch.iter().map(|(peer, _)| peer.as_any()).collect();
        let slices: Vec<[IoSlice; 1]> = batch
            .iter()
            .map(|(_, reply)| [IoSlice::new(reply)])
            .collect();
        let mut controls: Vec<SendAncillaryBuffer> = batch
            .iter()
            .map(|_| SendAncillaryBuffer::default())
            .collect();
        let mut messages: Vec<MMsgHdr> = addresses
            .iter()
            .zip(&slices)
            .zip(&mut controls)
            .map(|((address, slice), control)| MMsgHdr::new_with_addr(address, slice, control))
            .collect();
        Ok(rustix::net::sendmmsg(
            socket,
            &mut messages,
            SendFlags::DONTWAIT,
        )?)
    }
}

#[cfg(not(target_os = "linux"))]
mod sys {
    use std::io;
    use std::net::SocketAddr;

    use tokio::net::UdpSocket;

    use super::BATCH;

    /// One datagram at a time: the first read's error (`WouldBlock`
    /// included) is returned, later ones end the batch.
    pub fn receive(
        socket: &UdpSocket,
        buffers: &mut [Vec<u8>; BATCH],
        received: &mut Vec<(usize, SocketAddr)>,
    ) -> io::Result<()> {
        for buffer in buffers.iter_mut() {
            match socket.try_recv_from(buffer) {
                Ok(datagram) => received.push(datagram),
                Err(error) if received.is_empty() => return Err(error),
                Err(_) => break,
            }
        }
        Ok(())
    }

    /// The first reply of `batch`.
    pub fn send(socket: &UdpSocket, batch: &[(SocketAddr, Vec<u8>)]) -> io::Result<usize> {
        let (peer, reply) = &batch[0];
        socket.try_send_to(reply, *peer).map(|_| 1)
    }
}
