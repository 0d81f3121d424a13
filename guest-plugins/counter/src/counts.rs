//! The counts a counter keeps, and their hand-over format (schema 1), apart
//! from the bindings so that `counter-next` (its next version in the tests)
//! counts and converts the same way.
//!
//! Schema 1 is text, one count a line: the connection's message count
//! first, then `ip:port count` for each UDP peer.

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;

/// The format [`encode`] writes and [`decode`] reads.
pub const SCHEMA: u32 = 1;

thread_local! {
    /// Messages seen on this instance's TCP connection.
    static MESSAGES: Cell<u64> = const { Cell::new(0) };
    /// Datagrams seen per peer (`ip:port`) on this instance's UDP listener.
    static PEERS: RefCell<BTreeMap<String, u64>> = const { RefCell::new(BTreeMap::new()) };
}

/// Counts one more datagram from `peer` (`ip:port`) and returns its count,
/// making the peer's key only for its first datagram.
pub fn datagram_of(peer: &str) -> u64 {
    PEERS.with_borrow_mut(|peers| {
        if let Some(count) = peers.get_mut(peer) {
            *count += 1;
            return *count;
        }
        peers.insert(peer.to_owned(), 1);
        1
    })
}

/// Counts one more message on the connection and returns the count.
pub fn message() -> u64 {
    let count = MESSAGES.get() + 1;
    MESSAGES.set(count);
    count
}

/// The counts, in schema 1.
pub fn encode() -> Vec<u8> {
    let mut text = format!("{}\n", MESSAGES.get());
    PEERS.with_borrow(|peers| {
        for (peer, count) in peers {
            text.push_str(&format!("{peer} {count}\n"));
        }
    });
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
    let text = std::str::from_utf8(data).map_err(|e| format!("not text: {e}"))?;
    let mut lines = text.lines();
    let messages = lines
        .next()
        .and_then(|line| line.parse().ok())
        .ok_or("no message count")?;
    let mut peers = BTreeMap::new();
    for line in lines {
        let (peer, count) = line
            .rsplit_once(' ')
            .and_then(|(peer, count)| Some((peer, count.parse().ok()?)))
            .ok_or_else(|| format!("not `peer count`: {line:?}"))?;
        peers.insert(peer.to_owned(), count);
    }
    MESSAGES.set(messages);
    PEERS.set(peers);
    Ok(())
}
