//! The counts a counter keeps, and their hand-over format (schema 1), apart
//! from the bindings so that `counter-next` (its next version in the tests)
//! counts and converts the same way.
//!
//! Schema 1 is text, one count a line: the connection's message count
//! first, then `ip:port count` for each UDP peer.
//!
//! It uses `core` and `alloc` only: `counter` does without std (see
//! `lean`), `counter-next` does not. An instance runs one call at a time
//! on one thread, so the locks below are never contended; they are there
//! because a `static` must be `Sync`.

use alloc::borrow::ToOwned;
use alloc::collections::BTreeMap;
use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicU64, Ordering};

/// The format [`encode`] writes and [`decode`] reads.
pub const SCHEMA: u32 = 1;

/// Messages seen on this instance's TCP connection.
static MESSAGES: AtomicU64 = AtomicU64::new(0);
/// Datagrams seen per peer (`ip:port`) on this instance's UDP listener.
static PEERS: spin::Mutex<BTreeMap<String, u64>> = spin::Mutex::new(BTreeMap::new());

/// Counts one more datagram from `peer` (`ip:port`) and returns its count,
/// making the peer's key only for its first datagram.
pub fn datagram_of(peer: &str) -> u64 {
    let mut peers = PEERS.lock();
    if let Some(count) = peers.get_mut(peer) {
        *count += 1;
        return *count;
    }
    peers.insert(peer.to_owned(), 1);
    1
}

/// Counts one more message on the connection and returns the count.
pub fn message() -> u64 {
    MESSAGES.fetch_add(1, Ordering::Relaxed) + 1
}

/// The counts, in schema 1.
pub fn encode() -> Vec<u8> {
    let mut text = format!("{}\n", MESSAGES.load(Ordering::Relaxed));
    for (peer, count) in PEERS.lock().iter() {
        text.push_str(&format!("{peer} {count}\n"));
    }
    text.into_bytes()
}

/// Takes in counts written by [`encode`] under `schema`.
///
/// # Errors
///
/// An unknown schema, or data that is not schema 1.
pub fn decode(schema: u32, data: &[u8]) -> Result<(), String> {
    if schema != SCHEMA {
        return Err(format!(
            "unknown schema {schema} (this version reads {SCHEMA})"
        ));
    }
    let text = core::str::from_utf8(data).map_err(|e| format!("not text: {e}"))?;
    let mut lines = text.lines();
    let messages = lines
        .next()
        .and_then(|line| line.parse().ok())
        .ok_or("no message count")?;
    let mut peers = BTreeMap::new();
    // The line is named by its number, not quoted: quoting it escaped
    // (`{:?}`) would bring in core's Unicode tables, 2.4 KiB of static
    // data that push the plugin's heap onto a page of its own in every
    // instance.
    for (number, line) in lines.enumerate() {
        let (peer, count) = line
            .rsplit_once(' ')
            .and_then(|(peer, count)| Some((peer, count.parse().ok()?)))
            .ok_or_else(|| format!("line {}: not `peer count`", number + 2))?;
        peers.insert(peer.to_owned(), count);
    }
    MESSAGES.store(messages, Ordering::Relaxed);
    *PEERS.lock() = peers;
    Ok(())
}
