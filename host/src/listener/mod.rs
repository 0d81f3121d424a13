//! Listeners own the sockets. Each reads datagrams ([`udp`]) or accepts
//! connections and reads their chunks ([`tcp`]), hands every message to an
//! instance of its tenant's plugin, and carries out the decision: reply,
//! say nothing, close the connection, or stop.
//!
//! Which sockets to bind and when the process ends is the server's business.

pub mod tcp;
pub mod udp;

use std::sync::Arc;

use crate::plugin::{Limits, Plugin, PluginConfig};

/// What a listener runs: a plugin, the settings it reads, and the limits
/// each of its instances runs within.
#[derive(Debug)]
pub struct Tenant {
    /// The compiled, pre-linked plugin.
    pub plugin: Arc<Plugin>,
    /// The plugin's key/value settings (`host.get-config`).
    pub config: Arc<PluginConfig>,
    /// Bounds of every call.
    pub limits: Limits,
}
