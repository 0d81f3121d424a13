//! The counter plugin proves that a plugin keeps state: each TCP message is
//! answered with how many messages its connection has sent so far (the host
//! gives every connection its own instance, so the count is per connection),
//! and each datagram with how many datagrams its peer (address and port) has
//! sent to this listener. It says at `debug` who each connection is from,
//! as it sees it: behind a balancer that sends the PROXY protocol, the
//! client rather than the balancer.

mod bindings {
    wit_bindgen::generate!({ path: "../../wit", world: "plugin" });
}

use std::cell::{Cell, RefCell};
use std::collections::HashMap;

use bindings::exports::wasm_echo::plugin::{tcp, udp};
use bindings::wasm_echo::plugin::host;
use bindings::wasm_echo::plugin::types::{Connection, Decision, Endpoint, Next};

thread_local! {
    /// Messages seen on this instance's TCP connection.
    static MESSAGES: Cell<u64> = const { Cell::new(0) };
    /// Datagrams seen per peer (`ip:port`) on this instance's UDP listener.
    static PEERS: RefCell<HashMap<String, u64>> = RefCell::new(HashMap::new());
}

struct Counter;

fn reply(count: u64) -> Decision {
    Decision {
        reply: Some(count.to_string().into_bytes()),
        next: Next::CarryOn,
    }
}

impl udp::Guest for Counter {
    fn on_datagram(peer: Endpoint, _data: Vec<u8>) -> Decision {
        let key = format!("{}:{}", peer.ip, peer.port);
        let count = PEERS.with_borrow_mut(|peers| {
            let count = peers.entry(key).or_insert(0);
            *count += 1;
            *count
        });
        reply(count)
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
        let count = MESSAGES.get() + 1;
        MESSAGES.set(count);
        reply(count)
    }

    fn on_close() {}
}

bindings::export!(Counter with_types_in bindings);
