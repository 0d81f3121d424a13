//! wasm-echo: a UDP and TCP server whose every response is decided by a
//! sandboxed WebAssembly component.
//!
//! The path a message takes names the modules: a [`listener`] owns a socket
//! and reads datagrams or TCP messages (cut from the stream by [`framing`]); it hands each to a [`plugin`] instance
//! and carries out the decision that comes back; the [`server`] starts the
//! listeners, and stops them on a signal or when every one has been told to
//! stop. [`client`] and [`check`] are the CLI's other two verbs, and [`cli`]
//! parses the command line.

pub mod check;
pub mod cli;
pub mod client;
pub mod config;
pub mod framing;
pub mod listener;
pub mod plugin;
pub mod scaffold;
pub mod server;
pub mod tenant;
