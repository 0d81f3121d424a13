//! wasm-echo: a UDP and TCP server whose every response is decided by a
//! sandboxed WebAssembly component.
//!
//! The path a message takes names the modules: a [`listener`] owns a socket
//! and reads datagrams or TCP messages (cut from the stream by [`framing`]);
//! it hands each to a session of its [`tenant`] (a [`plugin`] instance) and
//! carries out the decision that comes back. The [`server`] builds tenants
//! from a [`config`], binds their sockets and runs until every listener has
//! stopped. [`reload`] swaps a tenant's plugin while it serves, when asked
//! through the [`control`] socket, by SIGHUP, by the file [`watch`]er
//! or when a followed tag moves in a [`registry`], where plugins can also
//! be fetched from, verified by digest.
//! [`client`], [`check`] and [`scaffold`] (`new`) are the CLI's other verbs,
//! and [`cli`] parses the command line. Files an operator names are read
//! through [`input_file`], bounded in kind, size and time, and [`logging`]
//! keeps the server's own log from ever holding it up. A tenant's traffic
//! can be recorded ([`recording`]) and replayed into another plugin
//! version, without sockets, to compare their decisions ([`replay`]).

pub mod admin;
pub mod background;
pub mod cache;
pub mod check;
pub mod cli;
pub mod client;
pub mod config;
pub mod control;
pub mod framing;
pub mod input_file;
pub mod listener;
pub mod logging;
pub mod metrics;
pub mod plugin;
pub mod recording;
pub mod registry;
pub mod reload;
pub mod replay;
pub mod rollout;
pub mod scaffold;
pub mod server;
pub mod status;
pub mod tenant;
pub mod testing;
pub mod warnings;
pub mod watch;
