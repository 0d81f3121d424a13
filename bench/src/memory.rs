//! Memory per idle connection: a server in a child process of its own
//! ([`crate::child`]), so that its resident set holds the
//! server's memory alone and none of the client sockets, and thousands of
//! connections held open against it, each having exchanged one message.
//! For wasm-echo every connection then holds a live instance of the
//! `counter` plugin with its count in the instance's own memory.
//!
//! The delta of the child's `VmRSS` (from `/proc/PID/status`) between
//! before and after, divided by the number of connections, is the figure.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use anyhow::Context;

use crate::child::ChildServer;
use crate::targets::Kind;

/// The plugin whose instances hold per-connection state.
pub const STATEFUL_PLUGIN: &str = "counter";

/// What one memory run measured.
#[derive(Clone, Debug)]
pub struct Memory {
    /// Connections held open.
    pub connections: usize,
    /// The server's resident set before they opened, in bytes.
    pub before: u64,
    /// And with all of them open.
    pub after: u64,
    /// How long opening them (connect plus one exchange each) took.
    pub open_time: Duration,
    /// Why opening stopped short of the number asked for, if it did.
    pub failure: Option<String>,
}

impl Memory {
    /// Resident bytes per connection.
    pub fn per_connection(&self) -> f64 {
        self.after.saturating_sub(self.before) as f64 / self.connections.max(1) as f64
    }
}

/// Starts `kind` as a child, holds `connections` connections open against
/// it and measures its resident set.
///
/// # Errors
///
/// A child that does not start, or connections that fail.
pub fn idle_connections(kind: Kind, connections: usize) -> anyhow::Result<Memory> {
    let child = ChildServer::target(kind, STATEFUL_PLUGIN, connections + 1000)?;
    let (pid, addr) = (child.pid(), child.addrs.tcp);

    // Warm up: the first connections fault in code, allocator arenas and
    // the runtime's structures, which are not per-connection costs.
    for _ in 0..200 {
        drop(exchange(addr)?);
    }
    std::thread::sleep(Duration::from_millis(300));
    let before = rss(pid)?;
    let start = Instant::now();
    let mut open = Vec::with_capacity(connections);
    let mut failure = None;
    for i in 0..connections {
        match exchange(addr) {
            Ok(stream) => open.push(stream),
            // A server that runs out of something is a result to report,
            // measured with the connections it did take.
            Err(error) => {
                failure = Some(format!("connection {} failed: {error:#}", i + 1));
                break;
            }
        }
    }
    let open_time = start.elapsed();
    std::thread::sleep(Duration::from_millis(300));
    let after = rss(pid)?;
    let connections = open.len();
    drop(open);
    Ok(Memory {
        connections,
        before,
        after,
        open_time,
        failure,
    })
}

/// Opens a connection and exchanges one message on it.
fn exchange(addr: SocketAddr) -> anyhow::Result<TcpStream> {
    let mut stream = TcpStream::connect(addr)?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    stream.write_all(b"x")?;
    let mut reply = [0u8; 32];
    let n = stream.read(&mut reply)?;
    anyhow::ensure!(n > 0, "the server closed the connection");
    Ok(stream)
}

/// `VmRSS` of process `pid`, in bytes.
///
/// # Errors
///
/// No such process, or a kernel without `/proc`.
pub fn rss(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kib = status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|value| value.split_whitespace().next())
        .and_then(|kib| kib.parse::<u64>().ok())
        .context("no VmRSS in /proc/PID/status")?;
    Ok(kib * 1024)
}
