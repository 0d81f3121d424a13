//! Datagrams in the flat layout of the contract's `udp-batch` interface:
//! building a batch in buffers kept for the listener's life ([`Batch`]),
//! and checking what a plugin answers before anything of it is used
//! ([`BatchReplies`]).
//!
//! Which datagrams go into a batch, and what happens to the replies, is the
//! listener's business; making the call is [`super::Instance`]'s.

use std::net::{IpAddr, SocketAddr};

use super::bindings::{Datagrams, Endpoint, Next, Replies};

/// A batch of datagrams, as the plugin is handed it. Its lists keep their
/// capacity from one batch to the next, and a sender's address text is
/// kept from one batch to the next too: formatting an address costs more
/// than handling a datagram, and a listener's batches mostly come from the
/// same few peers.
pub struct Batch {
    /// What the plugin is handed.
    datagrams: Datagrams,
    /// Each entry of `datagrams.peers` as a socket address, to reply to.
    addresses: Vec<SocketAddr>,
    /// The last batch's peer table, whose texts the next batch reuses.
    spare: Vec<(IpAddr, String)>,
}

impl Default for Batch {
    fn default() -> Self {
        Self::new()
    }
}

impl Batch {
    /// An empty batch.
    pub fn new() -> Self {
        Self {
            datagrams: Datagrams {
                data: Vec::new(),
                ends: Vec::new(),
                peers: Vec::new(),
                senders: Vec::new(),
            },
            addresses: Vec::new(),
            spare: Vec::new(),
        }
    }

    /// Empties it for the next batch.
    pub fn clear(&mut self) {
        self.datagrams.data.clear();
        self.datagrams.ends.clear();
        self.datagrams.senders.clear();
        self.spare.clear();
        self.spare.extend(
            self.datagrams
                .peers
                .drain(..)
                .zip(&self.addresses)
                .map(|(peer, address)| (address.ip(), peer.ip)),
        );
        self.addresses.clear();
    }

    /// Adds a datagram from `peer`.
    ///
    /// # Panics
    ///
    /// If the batch would hold 4 GiB or more, which a listener's batch of
    /// 32 datagrams of at most 64 KiB never does.
    pub fn push(&mut self, peer: SocketAddr, data: &[u8]) {
        let sender = match self.addresses.iter().position(|known| *known == peer) {
            Some(known) => known,
            None => {
                let ip = match self.spare.iter().position(|(ip, _)| *ip == peer.ip()) {
                    Some(kept) => self.spare.swap_remove(kept).1,
                    None => peer.ip().to_string(),
                };
                self.datagrams.peers.push(Endpoint {
                    ip,
                    port: peer.port(),
                });
                self.addresses.push(peer);
                self.addresses.len() - 1
            }
        };
        self.datagrams.data.extend_from_slice(data);
        self.datagrams
            .ends
            .push(u32::try_from(self.datagrams.data.len()).expect("a batch under 4 GiB"));
        self.datagrams
            .senders
            .push(u32::try_from(sender).expect("fewer than 2^32 peers"));
    }

    /// How many datagrams it holds.
    pub fn len(&self) -> usize {
        self.datagrams.ends.len()
    }

    /// Whether it holds none.
    pub fn is_empty(&self) -> bool {
        self.datagrams.ends.is_empty()
    }

    /// The `index`th datagram and its sender.
    pub fn get(&self, index: usize) -> Option<(SocketAddr, &[u8])> {
        let end = *self.datagrams.ends.get(index)? as usize;
        let start = match index {
            0 => 0,
            _ => self.datagrams.ends[index - 1] as usize,
        };
        let sender = self.datagrams.senders[index] as usize;
        Some((self.addresses[sender], &self.datagrams.data[start..end]))
    }

    /// What the plugin is handed.
    pub(super) fn datagrams(&self) -> &Datagrams {
        &self.datagrams
    }
}

/// A plugin's answers to a batch, checked against it: one entry per
/// datagram handled, whose lengths add up to the reply bytes.
#[derive(Debug)]
pub struct BatchReplies {
    replies: Replies,
}

impl BatchReplies {
    /// Checks `replies` against a batch of `batch` datagrams.
    ///
    /// # Errors
    ///
    /// What does not fit, on one line: no entries, the wrong number of
    /// them, or lengths that do not add up to the bytes given.
    pub(super) fn check(replies: Replies, batch: usize) -> Result<Self, String> {
        let answered = replies.lengths.len();
        let fits = match replies.next {
            Next::StopListener => (1..=batch).contains(&answered),
            Next::CarryOn | Next::CloseConnection => answered == batch,
        };
        if !fits {
            return Err(match replies.next {
                Next::StopListener => format!(
                    "it stopped the listener after {answered} datagrams of a batch of {batch}"
                ),
                _ => format!("it answered {answered} datagrams of a batch of {batch}"),
            });
        }
        let total: u64 = replies
            .lengths
            .iter()
            .map(|length| u64::from(length.unwrap_or(0)))
            .sum();
        if total != replies.data.len() as u64 {
            return Err(format!(
                "its reply lengths add up to {total} bytes but it gave {} bytes",
                replies.data.len()
            ));
        }
        Ok(Self { replies })
    }

    /// How many datagrams the plugin handled: all of the batch, or fewer
    /// when it stopped the listener.
    pub fn handled(&self) -> usize {
        self.replies.lengths.len()
    }

    /// What to do once the replies are sent.
    pub fn next(&self) -> Next {
        self.replies.next
    }

    /// Each handled datagram's reply, in order: `None` for no reply.
    pub fn iter(&self) -> impl Iterator<Item = Option<&[u8]>> {
        let mut start = 0;
        self.replies.lengths.iter().map(move |length| {
            let length = (*length)? as usize;
            let reply = &self.replies.data[start..start + length];
            start += length;
            Some(reply)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn replies(data: &[u8], lengths: &[Option<u32>], next: Next) -> Replies {
        Replies {
            data: data.to_vec(),
            lengths: lengths.to_vec(),
            next,
        }
    }

    #[test]
    fn a_batch_keeps_each_sender_once_and_each_datagram_in_place() {
        let one: SocketAddr = ([127, 0, 0, 1], 1000).into();
        let two: SocketAddr = ([127, 0, 0, 1], 2000).into();
        let mut batch = Batch::new();
        batch.push(one, b"ab");
        batch.push(two, b"");
        batch.push(one, b"cde");
        assert_eq!(batch.len(), 3);
        assert_eq!(batch.datagrams().peers.len(), 2);
        assert_eq!(batch.datagrams().senders, [0, 1, 0]);
        assert_eq!(batch.datagrams().ends, [2, 2, 5]);
        assert_eq!(batch.get(0), Some((one, &b"ab"[..])));
        assert_eq!(batch.get(1), Some((two, &b""[..])));
        assert_eq!(batch.get(2), Some((one, &b"cde"[..])));
        assert_eq!(batch.get(3), None);
        batch.clear();
        assert!(batch.is_empty());
        batch.push(two, b"x");
        assert_eq!(batch.datagrams().peers[0].ip, "127.0.0.1");
        assert_eq!(batch.datagrams().peers[0].port, 2000);
        assert_eq!(batch.get(0), Some((two, &b"x"[..])));
    }

    #[test]
    fn replies_that_fit_are_read_back_in_order() {
        let checked =
            BatchReplies::check(replies(b"abc", &[Some(1), None, Some(2)], Next::CarryOn), 3)
                .expect("fits");
        let got: Vec<_> = checked.iter().collect();
        assert_eq!(got, [Some(&b"a"[..]), None, Some(&b"bc"[..])]);
        assert_eq!(checked.handled(), 3);
    }

    /// Guards against a lying plugin's replies being read past the bytes
    /// it gave, or its datagrams being matched with the wrong replies.
    #[test]
    fn replies_that_do_not_fit_are_refused_with_a_reason() {
        let cases = [
            (
                replies(b"abc", &[Some(1), Some(2)], Next::CarryOn),
                3,
                "2 datagrams of a batch of 3",
            ),
            (
                replies(b"", &[None; 4], Next::CarryOn),
                3,
                "4 datagrams of a batch of 3",
            ),
            (
                replies(b"", &[], Next::StopListener),
                3,
                "after 0 datagrams of a batch of 3",
            ),
            (
                replies(b"ab", &[Some(3)], Next::StopListener),
                3,
                "add up to 3 bytes but it gave 2",
            ),
            (
                replies(b"abcd", &[Some(1), Some(2)], Next::CarryOn),
                2,
                "add up to 3 bytes but it gave 4",
            ),
            (
                replies(b"", &[Some(u32::MAX), Some(u32::MAX)], Next::CarryOn),
                2,
                "add up to 8589934590 bytes",
            ),
        ];
        for (replies, batch, reason) in cases {
            let refused = BatchReplies::check(replies, batch).expect_err("does not fit");
            assert!(refused.contains(reason), "{refused}");
            assert!(!refused.contains('\n'));
        }
        let stopped = BatchReplies::check(replies(b"a", &[None, Some(1)], Next::StopListener), 5)
            .expect("a stop may come before the end");
        assert_eq!(stopped.handled(), 2);
    }
}
