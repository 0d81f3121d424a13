//! The echo plugin: every datagram and every TCP message goes back to its
//! sender unchanged. It never stops a listener or closes a connection.
//!
//! It targets `batching-plugin`: a batch of datagrams goes back as it came,
//! its bytes untouched and each datagram's reply as long as the datagram.
//!
//! It does without std ([`lean`]): it needs nothing from WASI, and a
//! component that imports nothing from it is the cheapest to start for
//! every connection.
// The test harness (clippy --all-targets) brings std and its own panic
// handler.
#![cfg_attr(not(test), no_std)]

extern crate alloc;

#[cfg(not(test))]
use lean as _;

mod bindings {
    wit_bindgen::generate!({ path: "../../wit", world: "batching-plugin" });
}

use alloc::vec::Vec;

use bindings::exports::wasm_echo::plugin::udp_batch::{self, Datagrams, Replies};
use bindings::exports::wasm_echo::plugin::{tcp, udp};
use bindings::wasm_echo::plugin::types::{Connection, Decision, Endpoint, Next};

struct Echo;

impl udp::Guest for Echo {
    fn on_datagram(_peer: Endpoint, data: Vec<u8>) -> Decision {
        Decision {
            reply: Some(data),
            next: Next::CarryOn,
        }
    }
}

impl udp_batch::Guest for Echo {
    fn on_datagrams(batch: Datagrams) -> Replies {
        let mut start = 0;
        let lengths = batch
            .ends
            .iter()
            .map(|&end| {
                let length = end.saturating_sub(start);
                start = end;
                Some(length)
            })
            .collect();
        Replies {
            data: batch.data,
            lengths,
            next: Next::CarryOn,
        }
    }
}

impl tcp::Guest for Echo {
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

bindings::export!(Echo with_types_in bindings);
