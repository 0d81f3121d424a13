//! A test-only plugin: the next version of `counter`, for the tests of
//! state hand-over. It counts as `counter` does and reads its hand-over
//! format (the same [`counts`] module), but answers `count N` instead of
//! `N`, so a test can tell which version answered and that the count went
//! on. Its `state-fault` setting makes the hand-over fail on purpose:
//!
//! - `restore-trap`: `restore` panics;
//! - `restore-refuse`: `restore` returns an error;
//! - `restore-spin`: `restore` never returns (the deadline stops it);
//! - `snapshot-trap`: `snapshot` panics (when this is the old version);
//! - `huge-snapshot`: `snapshot` returns 2 MiB (over the default cap).
//!
//! Its `leak-bytes` setting makes every message leak that many bytes, as a
//! garbage-collected runtime's heap can, for the tests of instance renewal.

// `counts` names `alloc`, for `counter`'s sake.
extern crate alloc;

mod bindings {
    wit_bindgen::generate!({ path: "../../wit", world: "stateful-plugin" });
}

#[path = "../../counter/src/counts.rs"]
mod counts;

use bindings::exports::wasm_echo::plugin::state::{self, SavedState};
use bindings::exports::wasm_echo::plugin::{tcp, udp};
use bindings::wasm_echo::plugin::host;
use bindings::wasm_echo::plugin::types::{Connection, Decision, Endpoint, Next, VersionInfo};

struct CounterNext;

fn reply(count: u64) -> Decision {
    Decision {
        reply: Some(format!("count {count}").into_bytes()),
        next: Next::CarryOn,
    }
}

/// Leaks `leak-bytes` bytes, touched so that they are really held.
fn leak() {
    if let Some(bytes) = host::get_config("leak-bytes").and_then(|n| n.parse().ok()) {
        std::mem::forget(vec![1u8; bytes]);
    }
}

fn fault() -> String {
    host::get_config("state-fault").unwrap_or_default()
}

impl udp::Guest for CounterNext {
    fn on_datagram(peer: Endpoint, _data: Vec<u8>) -> Decision {
        leak();
        reply(counts::datagram_of(&format!("{}:{}", peer.ip, peer.port)))
    }
}

impl tcp::Guest for CounterNext {
    fn on_open(_conn: Connection) -> Decision {
        Decision {
            reply: None,
            next: Next::CarryOn,
        }
    }

    fn on_message(_data: Vec<u8>) -> Decision {
        leak();
        reply(counts::message())
    }

    fn on_close() {}
}

impl state::Guest for CounterNext {
    fn snapshot() -> Option<SavedState> {
        let data = match fault().as_str() {
            "snapshot-trap" => panic!("counter-next: asked to trap in snapshot"),
            "huge-snapshot" => vec![b'!'; 2 << 20],
            _ => counts::encode(),
        };
        Some(SavedState {
            schema: counts::SCHEMA,
            data,
        })
    }

    fn restore(previous: VersionInfo, state: SavedState) -> Result<(), String> {
        match fault().as_str() {
            "restore-trap" => panic!("counter-next: asked to trap in restore"),
            "restore-refuse" => Err(format!(
                "counter-next refuses the state of {}",
                previous.name
            )),
            "restore-spin" => loop {
                std::hint::spin_loop();
            },
            _ => counts::decode(state.schema, &state.data),
        }
    }
}

bindings::export!(CounterNext with_types_in bindings);
