//! The host side of the WIT contract in `wit/`: the one `bindgen!` call.
//! Everything else in the host uses the types re-exported from here (with
//! `self::`, since the generated `wasm_echo` module shares the crate's name).

wasmtime::component::bindgen!({
    path: "../wit",
    world: "plugin",
    exports: { default: async },
});

pub use self::wasm_echo::plugin::host::Level;
pub use self::wasm_echo::plugin::types::{Connection, Decision, Endpoint, Framing, Next};
