//! Native handlers: replies decided by Rust code in place of a plugin, so
//! the benchmark can measure the host's I/O path without WebAssembly.
//!
//! Which handler a tenant runs is [`super::version`]'s business.

use std::net::SocketAddr;

use crate::plugin::{Decision, Next};

/// Decides replies without WebAssembly. The benchmark runs the host's I/O
/// path with one in place of a plugin, to measure what the sandbox costs.
pub trait NativeHandler: Send + Sync + 'static {
    /// Answers one datagram.
    fn on_datagram(&self, peer: SocketAddr, data: &[u8]) -> Decision;
    /// Answers one TCP message.
    fn on_message(&self, data: &[u8]) -> Decision;
}

/// The native twin of the `echo` plugin.
#[derive(Clone, Copy, Debug, Default)]
pub struct NativeEcho;

impl NativeHandler for NativeEcho {
    fn on_datagram(&self, _peer: SocketAddr, data: &[u8]) -> Decision {
        Decision {
            reply: Some(data.to_vec()),
            next: Next::CarryOn,
        }
    }

    fn on_message(&self, data: &[u8]) -> Decision {
        Decision {
            reply: Some(data.to_vec()),
            next: Next::CarryOn,
        }
    }
}
