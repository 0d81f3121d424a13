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

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    /// A socket on loopback with an ephemeral port.
    async fn loopback() -> UdpSocket {
        UdpSocket::bind("127.0.0.1:0").await.expect("bind")
    }

    /// Reads one batch from `socket`, waiting until something has arrived.
    async fn receive(inbox: &mut Inbox, socket: &UdpSocket) -> usize {
        tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                socket.readable().await.expect("readable");
                match inbox.receive(socket) {
                    Ok(count) => return count,
                    Err(error) if error.kind() == io::ErrorKind::WouldBlock => {}
                    Err(error) => panic!("receive failed: {error}"),
                }
            }
        })
        .await
        .expect("datagrams within 10 s")
    }

    /// Every datagram of the last batch, with its sender.
    fn batch(inbox: &Inbox) -> Vec<(SocketAddr, Vec<u8>)> {
        (0..)
            .map_while(|index| inbox.get(index))
            .map(|(peer, data)| (peer, data.to_vec()))
            .collect()
    }

    #[tokio::test]
    async fn an_inbox_reads_queued_datagrams_in_order_with_their_senders() {
        let server = loopback().await;
        let to = server.local_addr().expect("addr");
        let (one, two) = (loopback().await, loopback().await);
        one.send_to(b"first", to).await.expect("send");
        two.send_to(b"", to).await.expect("send");
        one.send_to(&[7; 1400], to).await.expect("send");
        let mut inbox = Inbox::new();
        let mut got = Vec::new();
        while got.len() < 3 {
            receive(&mut inbox, &server).await;
            got.extend(batch(&inbox));
        }
        let (one, two) = (
            one.local_addr().expect("addr"),
            two.local_addr().expect("addr"),
        );
        assert_eq!(
            got,
            vec![
                (one, b"first".to_vec()),
                (two, Vec::new()),
                (one, vec![7; 1400])
            ]
        );
        assert!(inbox.get(3).is_none());
    }

    #[tokio::test]
    async fn an_inbox_takes_at_most_a_batch_and_the_rest_waits_for_the_next() {
        let server = loopback().await;
        let to = server.local_addr().expect("addr");
        let client = loopback().await;
        let sent = BATCH + 5;
        for n in 0..sent {
            client.send_to(&n.to_be_bytes(), to).await.expect("send");
        }
        let mut inbox = Inbox::new();
        let mut got = Vec::new();
        while got.len() < sent {
            let count = receive(&mut inbox, &server).await;
            assert!((1..=BATCH).contains(&count), "{count}");
            got.extend(batch(&inbox).into_iter().map(|(_, data)| data));
        }
        let expected: Vec<Vec<u8>> = (0..sent).map(|n| n.to_be_bytes().to_vec()).collect();
        assert_eq!(got, expected);
        let empty = inbox.receive(&server).expect_err("nothing is queued");
        assert_eq!(empty.kind(), io::ErrorKind::WouldBlock);
        assert!(inbox.get(0).is_none(), "the last batch is forgotten");
    }

    #[tokio::test]
    async fn an_outbox_sends_every_reply_across_batches_and_reports_each() {
        let server = loopback().await;
        let client = loopback().await;
        let to = client.local_addr().expect("addr");
        let mut outbox = Outbox::default();
        assert!(outbox.is_empty());
        let count = 2 * BATCH + 3;
        for n in 0..count {
            outbox.push(to, vec![u8::try_from(n % 251).expect("small"); n + 1]);
        }
        let mut reports = Vec::new();
        outbox
            .flush(&server, Duration::from_secs(5), |sent| {
                reports.push(sent.map_err(|unsent| unsent.len))
            })
            .await;
        assert!(outbox.is_empty());
        assert_eq!(reports, (1..=count).map(Ok).collect::<Vec<_>>());
        let mut buf = [0; 1024];
        for n in 0..count {
            let (len, from) = client.recv_from(&mut buf).await.expect("reply");
            assert_eq!(from, server.local_addr().expect("addr"));
            assert_eq!(len, n + 1, "replies arrive in order");
        }
    }

    #[tokio::test]
    async fn a_reply_the_kernel_refuses_is_reported_and_the_rest_still_go() {
        let server = loopback().await;
        let client = loopback().await;
        let to = client.local_addr().expect("addr");
        let mut outbox = Outbox::default();
        outbox.push(to, b"before".to_vec());
        // Larger than any datagram: the kernel refuses it (EMSGSIZE).
        outbox.push(to, vec![0; 70_000]);
        outbox.push(to, b"after".to_vec());
        let mut reports = Vec::new();
        outbox
            .flush(&server, Duration::from_secs(5), |sent| {
                reports.push(sent.map_err(|unsent| (unsent.peer, unsent.len)));
            })
            .await;
        assert_eq!(reports, vec![Ok(6), Err((to, 70_000)), Ok(5)]);
        let mut buf = [0; 1024];
        for expected in [&b"before"[..], b"after"] {
            let (len, _) = client.recv_from(&mut buf).await.expect("reply");
            assert_eq!(&buf[..len], expected);
        }
    }
}
