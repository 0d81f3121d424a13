//! The counter plugin proves that a plugin keeps state: each TCP message is
//! answered with how many messages its connection has sent so far (the host
//! gives every connection its own instance, so the count is per connection),
//! and each datagram with how many datagrams its peer (address and port) has
//! sent to this listener. It says at `debug` who each connection is from,
//! as it sees it: behind a balancer that sends the PROXY protocol, the
//! client rather than the balancer.
//!
//! It offers both of the contract's optional parts, so it targets a world
//! of its own that includes them: `state` (when a reload swaps in a new
//! version, it hands its counts over, schema 1, see [`counts`], so they go
//! on where they were) and `udp-batch` (a batch is counted datagram by
//! datagram, in order, exactly as one call per datagram would count it).
//!
//! It does without std ([`lean`]): it needs nothing from WASI, and a
//! component that imports nothing from it starts faster and holds less
//! memory for each of its connections.
// The test harness (clippy --all-targets) brings std and its own panic
// handler.
#![cfg_attr(not(test), no_std)]

extern crate alloc;

#[cfg(not(test))]
use lean as _;

mod bindings {
    wit_bindgen::generate!({
        inline: r#"
            package wasm-echo:counter;

            world counter {
                include wasm-echo:plugin/stateful-plugin@0.2.0;
                export wasm-echo:plugin/udp-batch@0.2.0;
            }
        "#,
        path: "../../wit",
        world: "wasm-echo:counter/counter",
        // Its interfaces are another package's, which bindings generate
        // only when asked to.
        generate_all,
    });
}

mod counts;

use alloc::string::String;
use alloc::vec::Vec;

use bindings::exports::wasm_echo::plugin::state::{self, SavedState};
use bindings::exports::wasm_echo::plugin::udp_batch::{self, Datagrams, Replies};
use bindings::exports::wasm_echo::plugin::{tcp, udp};
use bindings::wasm_echo::plugin::host;
use bindings::wasm_echo::plugin::types::{Connection, Decision, Endpoint, Next, VersionInfo};

struct Counter;

fn reply(count: u64) -> Decision {
    Decision {
        reply: Some(itoa::Buffer::new().format(count).as_bytes().to_vec()),
        next: Next::CarryOn,
    }
}

/// `ip:port`, the key a peer's datagrams are counted under. Numbers are
/// written with `itoa` rather than `core::fmt` on every path a message
/// takes: `fmt` writes through a `dyn Write`, whose indirect calls make
/// the runtime fill in a page of the instance's function table, a page
/// that every connection would hold while it stays open.
fn endpoint(peer: &Endpoint) -> String {
    let mut port = itoa::Buffer::new();
    let mut key = String::with_capacity(peer.ip.len() + 6);
    key.push_str(&peer.ip);
    key.push(':');
    key.push_str(port.format(peer.port));
    key
}

impl udp::Guest for Counter {
    fn on_datagram(peer: Endpoint, _data: Vec<u8>) -> Decision {
        reply(counts::datagram_of(&endpoint(&peer)))
    }
}

impl udp_batch::Guest for Counter {
    fn on_datagrams(batch: Datagrams) -> Replies {
        // Each sender's key once per batch, not once per datagram.
        let keys: Vec<String> = batch.peers.iter().map(endpoint).collect();
        let mut data = Vec::with_capacity(batch.senders.len() * 4);
        let lengths = batch
            .senders
            .iter()
            .map(|&sender| {
                let key = keys.get(sender as usize).map_or("?", String::as_str);
                let mut count = itoa::Buffer::new();
                let count = count.format(counts::datagram_of(key));
                data.extend_from_slice(count.as_bytes());
                Some(count.len() as u32)
            })
            .collect();
        Replies {
            data,
            lengths,
            next: Next::CarryOn,
        }
    }
}

impl tcp::Guest for Counter {
    fn on_open(conn: Connection) -> Decision {
        let mut line = String::from("counting for ");
        line.push_str(&endpoint(&conn.peer));
        host::log(host::Level::Debug, &line);
        Decision {
            reply: None,
            next: Next::CarryOn,
        }
    }

    fn on_message(_data: Vec<u8>) -> Decision {
        reply(counts::message())
    }

    fn on_close() {}
}

impl state::Guest for Counter {
    fn snapshot() -> Option<SavedState> {
        Some(SavedState {
            schema: counts::SCHEMA,
            data: counts::encode(),
        })
    }

    fn restore(_previous: VersionInfo, state: SavedState) -> Result<(), String> {
        counts::decode(state.schema, &state.data)
    }
}

bindings::export!(Counter with_types_in bindings);
