//! The tutorial's clients: send one message, print the reply, then send
//! `exit` so the tutorial's servers (and wasm-echo's `hello` plugin) stop.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context as _, bail};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket, lookup_host};

use crate::framing::{Framed, Framing, MessageReader};

/// The longest reply the TCP client takes in `lines` or `length-prefixed`
/// mode: as long as any listener may send.
const MAX_REPLY: usize = 64 << 20;

/// The message the tutorial's UDP client sends.
pub const UDP_MESSAGE: &str = "Hello, server!";
/// The message the tutorial's TCP client sends.
pub const TCP_MESSAGE: &str = "hello, server";
/// What both clients send last.
pub const EXIT_MESSAGE: &str = "exit";

/// One exchange to make.
#[derive(Clone, Debug)]
pub struct Exchange {
    /// `host:port` of the server.
    pub addr: String,
    /// How TCP messages are cut on the wire: the listener's framing.
    pub framing: Framing,
    /// What to send.
    pub message: Vec<u8>,
    /// Send `exit` after the reply.
    pub send_exit: bool,
    /// How long to wait to connect and for the reply.
    pub timeout: Duration,
}

async fn resolve(addr: &str) -> anyhow::Result<SocketAddr> {
    lookup_host(addr)
        .await
        .with_context(|| format!("bad server address `{addr}` (expected HOST:PORT)"))?
        .next()
        .with_context(|| format!("`{addr}` resolves to no address"))
}

/// Sends the message as a datagram and returns the reply.
///
/// # Errors
///
/// A bad address, a refused or unanswered datagram.
pub async fn udp(exchange: &Exchange) -> anyhow::Result<Vec<u8>> {
    let server = resolve(&exchange.addr).await?;
    let local: SocketAddr = if server.is_ipv4() {
        ([0, 0, 0, 0], 0).into()
    } else {
        ([0u16; 8], 0).into()
    };
    let socket = UdpSocket::bind(local)
        .await
        .context("opening a UDP socket")?;
    // Connecting lets the kernel report "port unreachable" as an error.
    socket
        .connect(server)
        .await
        .with_context(|| format!("cannot reach {server}"))?;
    socket
        .send(&exchange.message)
        .await
        .with_context(|| format!("sending to udp {server}"))?;
    let mut buf = vec![0u8; crate::listener::udp::MAX_DATAGRAM + 1];
    let len = match tokio::time::timeout(exchange.timeout, socket.recv(&mut buf)).await {
        Ok(Ok(len)) => len,
        Ok(Err(error)) if error.kind() == std::io::ErrorKind::ConnectionRefused => {
            bail!(
                "nothing listens on udp {server} (connection refused); is `wasm-echo serve` running?"
            )
        }
        Ok(Err(error)) => bail!("receiving from udp {server}: {error}"),
        Err(_) => bail!(
            "no reply from udp {server} within {}",
            humantime::format_duration(exchange.timeout)
        ),
    };
    buf.truncate(len);
    if exchange.send_exit {
        socket
            .send(EXIT_MESSAGE.as_bytes())
            .await
            .with_context(|| format!("sending exit to udp {server}"))?;
    }
    Ok(buf)
}

/// Connects, sends the message framed as the listener expects, and returns
/// the first message of the reply (in `raw` mode, its first chunk).
///
/// # Errors
///
/// A bad address, a refused connection, no reply in time.
pub async fn tcp(exchange: &Exchange) -> anyhow::Result<Vec<u8>> {
    let server = resolve(&exchange.addr).await?;
    let mut stream = match tokio::time::timeout(exchange.timeout, TcpStream::connect(server)).await
    {
        Ok(Ok(stream)) => stream,
        Ok(Err(error)) if error.kind() == std::io::ErrorKind::ConnectionRefused => {
            bail!(
                "nothing listens on tcp {server} (connection refused); is `wasm-echo serve` running?"
            )
        }
        Ok(Err(error)) => bail!("cannot connect to tcp {server}: {error}"),
        Err(_) => bail!(
            "no answer from tcp {server} within {}",
            humantime::format_duration(exchange.timeout)
        ),
    };
    stream
        .write_all(&frame(exchange.framing, &exchange.message)?)
        .await
        .with_context(|| format!("sending to tcp {server}"))?;
    let reply = tokio::time::timeout(exchange.timeout, read_reply(&mut stream, exchange.framing))
        .await
        .map_err(|_| {
            let hint = match exchange.framing {
                Framing::Raw => "",
                _ => " (does the listener use this --framing?)",
            };
            anyhow::anyhow!(
                "no reply from tcp {server} within {}{hint}",
                humantime::format_duration(exchange.timeout)
            )
        })?
        .with_context(|| format!("receiving from tcp {server}"))?;
    let Some(reply) = reply else {
        bail!("tcp {server} closed the connection without replying");
    };
    if exchange.send_exit {
        stream
            .write_all(&frame(exchange.framing, EXIT_MESSAGE.as_bytes())?)
            .await
            .with_context(|| format!("sending exit to tcp {server}"))?;
    }
    let _ = stream.shutdown().await;
    Ok(reply)
}

/// `message` as it goes on the wire.
fn frame(framing: Framing, message: &[u8]) -> anyhow::Result<Vec<u8>> {
    use tokio_util::bytes::Buf as _;
    let framed = Framed::new(framing, message)?;
    let mut buf = framed.as_buf();
    Ok(buf.copy_to_bytes(buf.remaining()).to_vec())
}

/// Reads until one whole message has come, or the server closes.
async fn read_reply(stream: &mut TcpStream, framing: Framing) -> anyhow::Result<Option<Vec<u8>>> {
    let mut reader = MessageReader::new(framing, MAX_REPLY);
    let mut buf = tokio_util::bytes::BytesMut::with_capacity(64 * 1024);
    loop {
        if let Some(message) = reader.next(&mut buf)? {
            return Ok(Some(message.to_vec()));
        }
        if stream.read_buf(&mut buf).await? == 0 {
            return Ok(reader
                .next_at_eof(&mut buf)?
                .map(|message| message.to_vec()));
        }
    }
}
