//! The counter plugin proves that a plugin keeps state: each TCP message is
//! answered with how many messages its connection has sent so far (the host
//! gives every connection its own instance, so the count is per connection),
//! and each datagram with how many datagrams its peer (address and port) has
//! sent to this listener. It says at `debug` who each connection is from,
//! as it sees it: behind a balancer that sends the PROXY protocol, the
//! client rather than the balancer.
//!
//! It targets `stateful-plugin`: when a reload swaps in a new version, it
//! hands its counts over (schema 1, see [`counts`]), so they go on where
//! they were.
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
    wit_bindgen::generate!({ path: "../../wit", world: "stateful-plugin" });
}

mod counts;

use alloc::format;
use alloc::string::{String, ToString};
use alloc::vec::Vec;

use bindings::exports::wasm_echo::plugin::state::{self, SavedState};
use bindings::exports::wasm_echo::plugin::{tcp, udp};
use bindings::wasm_echo::plugin::host;
use bindings::wasm_echo::plugin::types::{Connection, Decision, Endpoint, Next, VersionInfo};

struct Counter;

fn reply(count: u64) -> Decision {
    Decision {
        reply: Some(count.to_string().into_bytes()),
        next: Next::CarryOn,
    }
}

impl udp::Guest for Counter {
    fn on_datagram(peer: Endpoint, _data: Vec<u8>) -> Decision {
        reply(counts::datagram(format!("{}:{}", peer.ip, peer.port)))
    }
}

impl tcp::Guest for Counter {
    fn on_open(conn: Connection) -> Decision {
        host::log(
            host::Level::Debug,
            &format!("counting for {}:{}", conn.peer.ip, conn.peer.port),
        );
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
