//! {{name}}: a wasm-echo plugin. It sends every UDP datagram and TCP message
//! back unchanged, and stops the listener when a peer says `exit`. Change
//! `answer` (and the rest) to make it yours; wit/plugin.wit documents every
//! type and function.

mod bindings {
    wit_bindgen::generate!({ path: "wit", world: "plugin" });
}

use bindings::exports::wasm_echo::plugin::{tcp, udp};
use bindings::wasm_echo::plugin::host;
use bindings::wasm_echo::plugin::types::{Connection, Decision, Endpoint, Next};

struct Plugin;

/// Decides what to do with one datagram or one TCP message.
fn answer(data: Vec<u8>) -> Decision {
    if data.trim_ascii().eq_ignore_ascii_case(b"exit") {
        return Decision {
            reply: None,
            next: Next::StopListener,
        };
    }
    Decision {
        reply: Some(data),
        next: Next::CarryOn,
    }
}

impl udp::Guest for Plugin {
    fn on_datagram(_peer: Endpoint, data: Vec<u8>) -> Decision {
        answer(data)
    }
}

/// Every TCP connection gets its own instance: statics here would be that
/// connection's state.
impl tcp::Guest for Plugin {
    fn on_open(conn: Connection) -> Decision {
        let peer = conn.peer;
        host::log(
            host::Level::Debug,
            &format!("connection from {}:{}", peer.ip, peer.port),
        );
        Decision {
            reply: None,
            next: Next::CarryOn,
        }
    }

    fn on_message(data: Vec<u8>) -> Decision {
        answer(data)
    }

    fn on_close() {}
}

bindings::export!(Plugin with_types_in bindings);
