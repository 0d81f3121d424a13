//! The PROXY protocol (v1 text, v2 binary) on a TCP listener behind a load
//! balancer: the header that opens each connection names the real client,
//! which then becomes the connection's peer for the plugin, the rate limit
//! and the log. Parsing is the `ppp` crate's; this module reads the header
//! off the stream, bounded, and decides what a connection without a valid
//! one gets: closed, counted by [`Refusal`], never handed to the plugin.
//!
//! What the listener does with the connection afterwards, and the policy
//! itself (`proxy-protocol`, `proxy-from`), are [`super::tcp`]'s and
//! [`crate::config`]'s.

use std::net::SocketAddr;
use std::time::Duration;

use ppp::PartialResult as _;
use ppp::v2;
use tokio::io::AsyncReadExt as _;
use tokio::net::TcpStream;
use tokio_util::bytes::BytesMut;

use crate::config::ProxyPolicy;

/// The longest header read: a v1 header is at most 107 bytes; a v2 one is
/// 16 plus its addresses and TLVs, which balancers keep to some hundreds.
pub const MAX_HEADER: usize = 4096;

/// Why a connection was closed before its plugin saw it, as
/// `wasm_echo_proxy_refused_total`'s `reason` label says.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// The connection closed, or went quiet for the header timeout, before
    /// a whole header arrived (`truncated`).
    #[error("the PROXY header was cut short")]
    Truncated,
    /// It opened with neither a v1 (`PROXY `) nor a v2 signature
    /// (`signature`): not from a balancer speaking the protocol.
    #[error("no PROXY protocol signature")]
    Signature,
    /// A v2 header with an address family other than IPv4, IPv6 or
    /// unspecified (`family`).
    #[error("a PROXY v2 header with an unknown or unsupported address family")]
    Family,
    /// The connection came from an address outside `proxy-from`
    /// (`source`); nothing of it was read.
    #[error("the connection's source may not send PROXY headers (proxy-from)")]
    Source,
    /// A header with the right signature that does not parse, or is longer
    /// than [`MAX_HEADER`] (`invalid`).
    #[error("an invalid PROXY header")]
    Invalid,
}

impl Refusal {
    /// Every reason, in the order of their discriminants.
    pub const ALL: [Self; 5] = [
        Self::Truncated,
        Self::Signature,
        Self::Family,
        Self::Source,
        Self::Invalid,
    ];

    /// The `reason` label.
    pub fn label(self) -> &'static str {
        match self {
            Self::Truncated => "truncated",
            Self::Signature => "signature",
            Self::Family => "family",
            Self::Source => "source",
            Self::Invalid => "invalid",
        }
    }
}

/// What a valid header said.
#[derive(Debug)]
pub struct Accepted {
    /// The real client: the header's source address, or the socket's peer
    /// when the header names none (v1 `UNKNOWN`, v2 `LOCAL` or an
    /// unspecified family: the balancer's own health checks).
    pub peer: SocketAddr,
    /// Whatever arrived after the header: the start of the client's data.
    pub rest: BytesMut,
}

/// Reads the PROXY header that opens `stream`, from `socket_peer`, within
/// `timeout`.
///
/// # Errors
///
/// Why the connection is refused.
pub async fn read_header(
    stream: &mut TcpStream,
    socket_peer: SocketAddr,
    policy: &ProxyPolicy,
    timeout: Duration,
) -> Result<Accepted, Refusal> {
    if !policy.allows(socket_peer.ip()) {
        return Err(Refusal::Source);
    }
    let mut buf = BytesMut::with_capacity(512);
    let read = async {
        loop {
            if let Some(outcome) = parse(&buf, socket_peer) {
                return outcome;
            }
            if buf.len() >= MAX_HEADER {
                return Err(Refusal::Invalid);
            }
            buf.reserve(MAX_HEADER - buf.len());
            // Never more than the longest header: past it, the rest is
            // read by the connection as usual.
            let mut limited = (&mut *stream).take((MAX_HEADER - buf.len()) as u64);
            match limited.read_buf(&mut buf).await {
                Ok(0) | Err(_) => return Err(Refusal::Truncated),
                Ok(_) => {}
            }
        }
    };
    let len = tokio::time::timeout(timeout, read)
        .await
        .map_err(|_| Refusal::Truncated)?;
    len.map(|(peer, len)| Accepted {
        peer,
        rest: buf.split_off(len),
    })
}

/// The outcome of parsing `buf`: `None` while the header is incomplete,
/// else the peer and the header's length, or the refusal.
///
/// The version is told by the signature here rather than by
/// `ppp::HeaderResult::parse`, which retries any bad v2 header as v1 and
/// so would report a v2 header's real fault as a wrong signature.
fn parse(buf: &[u8], socket_peer: SocketAddr) -> Option<Result<(SocketAddr, usize), Refusal>> {
    let signature = v2::PROTOCOL_PREFIX;
    if buf.len() < signature.len() && signature.starts_with(buf) {
        return None;
    }
    if buf.starts_with(signature) {
        let parsed = v2::Header::try_from(buf);
        if parsed.is_incomplete() {
            return None;
        }
        return Some(match parsed {
            Ok(header) => {
                let peer = match (header.command, header.addresses) {
                    (v2::Command::Local, _) | (_, v2::Addresses::Unspecified) => Ok(socket_peer),
                    (_, v2::Addresses::IPv4(ip)) => {
                        Ok(SocketAddr::from((ip.source_address, ip.source_port)))
                    }
                    (_, v2::Addresses::IPv6(ip)) => {
                        Ok(SocketAddr::from((ip.source_address, ip.source_port)))
                    }
                    // A Unix socket path is no peer a plugin could be told of.
                    (_, v2::Addresses::Unix(_)) => Err(Refusal::Family),
                };
                peer.map(|peer| (peer, header.len()))
            }
            Err(v2::ParseError::AddressFamily(_)) => Err(Refusal::Family),
            Err(_) => Err(Refusal::Invalid),
        });
    }
    // Told here too: binary that is not UTF-8 is no v1 header, whatever
    // `ppp` makes of it.
    const V1_SIGNATURE: &[u8] = b"PROXY ";
    if !buf.starts_with(V1_SIGNATURE) {
        return if V1_SIGNATURE.starts_with(buf) {
            None
        } else {
            Some(Err(Refusal::Signature))
        };
    }
    let parsed = ppp::v1::Header::try_from(buf);
    if parsed.is_incomplete() {
        return None;
    }
    Some(match parsed {
        Ok(header) => {
            let peer = match header.addresses {
                ppp::v1::Addresses::Tcp4(ip) => {
                    SocketAddr::from((ip.source_address, ip.source_port))
                }
                ppp::v1::Addresses::Tcp6(ip) => {
                    SocketAddr::from((ip.source_address, ip.source_port))
                }
                ppp::v1::Addresses::Unknown => socket_peer,
            };
            Ok((peer, header.header.len()))
        }
        Err(ppp::v1::BinaryParseError::Parse(ppp::v1::ParseError::InvalidPrefix)) => {
            Err(Refusal::Signature)
        }
        Err(_) => Err(Refusal::Invalid),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const SOCKET: SocketAddr =
        SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 9);

    fn v2(family: u8, addresses: &[u8]) -> Vec<u8> {
        let mut header = v2::PROTOCOL_PREFIX.to_vec();
        header.extend([0x21, family]);
        header.extend(u16::try_from(addresses.len()).expect("short").to_be_bytes());
        header.extend(addresses);
        header
    }

    #[test]
    fn v1_names_the_client_and_keeps_what_follows_apart() {
        let header = b"PROXY TCP4 192.0.2.7 198.51.100.1 4000 80\r\nhello";
        let (peer, len) = parse(header, SOCKET).expect("complete").expect("valid");
        assert_eq!(peer, "192.0.2.7:4000".parse().expect("address"));
        assert_eq!(&header[len..], b"hello");
    }

    #[test]
    fn v2_names_the_client() {
        let header = v2(0x11, &[192, 0, 2, 7, 198, 51, 100, 1, 0x0f, 0xa0, 0, 80]);
        let (peer, len) = parse(&header, SOCKET).expect("complete").expect("valid");
        assert_eq!(peer, "192.0.2.7:4000".parse().expect("address"));
        assert_eq!(len, header.len());
    }

    #[test]
    fn bad_headers_are_refused_by_reason() {
        assert_eq!(parse(b"PROXY TCP4 192.0.2", SOCKET), None);
        assert_eq!(
            parse(b"GET / HTTP/1.1\r\n", SOCKET),
            Some(Err(Refusal::Signature))
        );
        assert_eq!(parse(b"\xff\xfe", SOCKET), Some(Err(Refusal::Signature)));
        assert_eq!(parse(b"PROX", SOCKET), None);
        assert_eq!(
            parse(&v2(0x41, &[0; 12]), SOCKET),
            Some(Err(Refusal::Family))
        );
        assert_eq!(
            parse(
                b"PROXY TCP4 not-an-address 198.51.100.1 4000 80\r\n",
                SOCKET
            ),
            Some(Err(Refusal::Invalid))
        );
    }
}
