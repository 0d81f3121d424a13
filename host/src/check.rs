//! `wasm-echo check`: loads a plugin the way `serve` would, instantiates it
//! once, and reports what it imports and exports.

use std::fmt::Write as _;
use std::sync::Arc;

use crate::plugin::{
    Clocks, Instance, InstanceSettings, Limits, LogBudget, PluginConfig, PluginSource, Runtime,
};

/// Checks `source` and returns the report to print.
///
/// # Errors
///
/// Whatever keeps the plugin from serving: it does not load, or its
/// start-up code fails within the default limits.
pub async fn check(runtime: &Runtime, source: &PluginSource) -> anyhow::Result<String> {
    let plugin = Arc::new(runtime.load(source)?);
    let tenant: Arc<str> = "check".into();
    let settings = InstanceSettings {
        log_budget: LogBudget::new(
            tenant.clone(),
            LogBudget::DEFAULT_LINES_PER_SECOND,
            LogBudget::DEFAULT_BYTES_PER_SECOND,
        ),
        tenant,
        config: PluginConfig::new(),
        limits: Limits::default(),
        clocks: Clocks::Real,
    };
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
