//! `wasm-echo check`: loads a plugin the way `serve` would, instantiates it
//! once, and reports what it imports and exports.

use std::fmt::Write as _;
use std::sync::Arc;

use crate::plugin::{Clocks, Instance, InstanceSettings, PluginConfig, PluginSource, Runtime};

/// Checks `source` and returns the report to print.
///
/// # Errors
///
/// Whatever keeps the plugin from serving: it does not load, or its
/// start-up code fails within the default limits.
pub async fn check(runtime: &Runtime, source: &PluginSource) -> anyhow::Result<String> {
    let plugin = Arc::new(runtime.load(source)?);
    let settings = InstanceSettings::with_defaults("check", PluginConfig::new(), Clocks::Real);
    Instance::new(&plugin, Arc::new(settings))
        .await
        .map_err(|error| anyhow::anyhow!("{source} fails to start: {error}"))?;
    let mut report = format!("ok: {source} is a wasm-echo:plugin@0.1.0 component\nimports:\n");
    for name in plugin.imports() {
        let _ = writeln!(report, "  {name}");
    }
    report.push_str("exports:\n");
    for name in plugin.exports() {
        let _ = writeln!(report, "  {name}");
    }
    Ok(report)
}
