//! A test-only plugin that misbehaves on request, so tests can show that
//! one failed message costs only that message: `panic` panics (a trap),
//! `loop` never returns (the deadline stops it), `bloat` allocates until
//! the memory cap stops it, `close` asks the host to close the connection,
//! `framing` answers with the framing the host announced in `on-open`, and
//! anything else is echoed.

mod bindings {
    wit_bindgen::generate!({ path: "../../wit/0.1.0", world: "plugin" });
}

use bindings::exports::wasm_echo::plugin::{tcp, udp};
use std::cell::Cell;

use bindings::wasm_echo::plugin::types::{Connection, Decision, Endpoint, Framing, Next};

thread_local! {
    /// The framing this connection's listener uses, from `on-open`.
    static FRAMING: Cell<Option<Framing>> = const { Cell::new(None) };
}

struct Trap;

fn handle(data: Vec<u8>) -> Decision {
    match data.trim_ascii() {
        b"panic" => panic!("asked to panic"),
        b"loop" => loop {
            std::hint::spin_loop();
        },
        b"bloat" => {
            let mut hoard: Vec<Vec<u8>> = Vec::new();
            loop {
                hoard.push(vec![1; 1 << 20]);
            }
        }
        b"close" => Decision {
            reply: Some(b"bye".to_vec()),
            next: Next::CloseConnection,
        },
        b"framing" => {
            let name = match FRAMING.get() {
                None => "none",
                Some(Framing::Raw) => "raw",
                Some(Framing::Lines) => "lines",
                Some(Framing::LengthPrefixed) => "length-prefixed",
            };
            Decision {
                reply: Some(name.as_bytes().to_vec()),
                next: Next::CarryOn,
            }
        }
        _ => Decision {
            reply: Some(data),
            next: Next::CarryOn,
        },
    }
}

impl udp::Guest for Trap {
    fn on_datagram(_peer: Endpoint, data: Vec<u8>) -> Decision {
        handle(data)
    }
}

impl tcp::Guest for Trap {
    fn on_open(conn: Connection) -> Decision {
        FRAMING.set(Some(conn.framing));
        Decision {
            reply: None,
            next: Next::CarryOn,
        }
    }

    fn on_message(data: Vec<u8>) -> Decision {
        handle(data)
    }

    fn on_close() {}
}

bindings::export!(Trap with_types_in bindings);
