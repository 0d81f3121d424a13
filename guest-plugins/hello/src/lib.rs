//! The documents' servers as a plugin: every datagram is answered with
//! `Hello, client!`, every TCP message with `hello, tcp client!`, and `exit`
//! (any case, surrounding whitespace ignored) stops the listener without a
//! reply. The greetings can be changed through the plugin's configuration
//! (`udp-greeting`, `tcp-greeting`); everything else is the host's business.
//!
//! It does without std ([`lean`]), as `echo` and `counter` do: it is the
//! plugin `wasm-echo serve` starts with, and without WASI and the C library
//! it compiles in a fraction of the time, starts faster for every
//! connection and holds less memory for each.
// The test harness (clippy --all-targets) brings std and its own panic
// handler.
#![cfg_attr(not(test), no_std)]

extern crate alloc;

#[cfg(not(test))]
use lean as _;

mod bindings {
    wit_bindgen::generate!({ path: "../../wit", world: "plugin" });
}

use alloc::borrow::ToOwned;
use alloc::vec::Vec;

use bindings::exports::wasm_echo::plugin::{tcp, udp};
use bindings::wasm_echo::plugin::host;
use bindings::wasm_echo::plugin::types::{Connection, Decision, Endpoint, Next};

/// The documents' UDP reply.
const UDP_GREETING: &str = "Hello, client!";
/// The documents' TCP reply.
const TCP_GREETING: &str = "hello, tcp client!";

struct Hello;

/// Answers `message` with the greeting, or stops the listener on `exit`.
fn answer(message: &[u8], greeting_key: &str, default: &str) -> Decision {
    if is_exit(message) {
        host::log(host::Level::Info, "exit received: stopping the listener");
        return Decision {
            reply: None,
            next: Next::StopListener,
        };
    }
    let greeting = host::get_config(greeting_key).unwrap_or_else(|| default.to_owned());
    Decision {
        reply: Some(greeting.into_bytes()),
        next: Next::CarryOn,
    }
}

/// The documents' servers compare `data.decode().lower() == "exit"`; this
/// also forgives the newline that `nc` and friends add.
fn is_exit(message: &[u8]) -> bool {
    message.trim_ascii().eq_ignore_ascii_case(b"exit")
}

impl udp::Guest for Hello {
    fn on_datagram(_peer: Endpoint, data: Vec<u8>) -> Decision {
        answer(&data, "udp-greeting", UDP_GREETING)
    }
}

impl tcp::Guest for Hello {
    fn on_open(_conn: Connection) -> Decision {
        Decision {
            reply: None,
            next: Next::CarryOn,
        }
    }

    fn on_message(data: Vec<u8>) -> Decision {
        answer(&data, "tcp-greeting", TCP_GREETING)
    }

    fn on_close() {}
}

bindings::export!(Hello with_types_in bindings);
