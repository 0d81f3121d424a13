//! A test-only plugin for the contract's `udp-batch`: it echoes every
//! datagram, on either path, and stops the listener on `exit` (after
//! answering it `bye`), so tests can tell a batch from single calls by
//! nothing but the replies. Its `lie` setting makes its batch answers break
//! the contract, in the way it names, so tests can show that a plugin that
//! lies fails only its own batch:
//!
//! - `none` (the default): honest;
//! - `short`: answers one datagram fewer than the batch holds;
//! - `long`: answers one datagram more than the batch holds;
//! - `overrun`: claims a last reply 1,000 bytes longer than the bytes it
//!   gives;
//! - `trap`: panics in the batch call.
//!
//! `on-datagram` never lies: a datagram handled alone is always echoed.

mod bindings {
    wit_bindgen::generate!({ path: "../../wit", world: "batching-plugin" });
}

use bindings::exports::wasm_echo::plugin::udp_batch::{self, Datagrams, Replies};
use bindings::exports::wasm_echo::plugin::{tcp, udp};
use bindings::wasm_echo::plugin::host;
use bindings::wasm_echo::plugin::types::{Connection, Decision, Endpoint, Next};

struct Batcher;

/// Whether `data` asks the listener to stop.
fn is_exit(data: &[u8]) -> bool {
    data == b"exit"
}

impl udp::Guest for Batcher {
    fn on_datagram(_peer: Endpoint, data: Vec<u8>) -> Decision {
        if is_exit(&data) {
            return Decision {
                reply: Some(b"bye".to_vec()),
                next: Next::StopListener,
            };
        }
        Decision {
            reply: Some(data),
            next: Next::CarryOn,
        }
    }
}

impl udp_batch::Guest for Batcher {
    fn on_datagrams(batch: Datagrams) -> Replies {
        let mut replies = Replies {
            data: Vec::with_capacity(batch.data.len()),
            lengths: Vec::with_capacity(batch.ends.len()),
            next: Next::CarryOn,
        };
        let mut start = 0;
        for &end in &batch.ends {
            let datagram = &batch.data[start as usize..end as usize];
            start = end;
            if is_exit(datagram) {
                replies.data.extend_from_slice(b"bye");
                replies.lengths.push(Some(3));
                replies.next = Next::StopListener;
                break;
            }
            replies.data.extend_from_slice(datagram);
            replies.lengths.push(Some(datagram.len() as u32));
        }
        match host::get_config("lie").as_deref() {
            Some("short") => {
                let dropped = replies.lengths.pop().flatten().unwrap_or(0);
                replies.data.truncate(replies.data.len() - dropped as usize);
            }
            Some("long") => replies.lengths.push(None),
            Some("overrun") => {
                if let Some(Some(last)) = replies.lengths.last_mut() {
                    *last += 1000;
                }
            }
            Some("trap") => panic!("batcher panics in a batch on purpose"),
            _ => {}
        }
        replies
    }
}

impl tcp::Guest for Batcher {
    fn on_open(_conn: Connection) -> Decision {
        Decision {
            reply: None,
            next: Next::CarryOn,
        }
    }

    fn on_message(data: Vec<u8>) -> Decision {
        Decision {
            reply: Some(data),
            next: Next::CarryOn,
        }
    }

    fn on_close() {}
}

bindings::export!(Batcher with_types_in bindings);
