//! `wasm-echo check`: loads a plugin the way `serve` would, instantiates it
//! once, and reports which contract version it implements, which optional
//! parts it offers, and what it imports and exports; with `--config`, does
//! the same for every listener of a configuration file, which it resolves
//! as `serve` does, without binding anything (a configuration meant for
//! other addresses, a pod's, can be checked anywhere).

use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::Path;
use std::sync::Arc;

use crate::config::ServerConfig;
use crate::plugin::{
    Clocks, Instance, InstanceSettings, Plugin, PluginConfig, PluginSource, Runtime,
};

/// Checks `source` and returns the report to print.
///
/// # Errors
///
/// Whatever keeps the plugin from serving: it does not load, or its
/// start-up code fails within the default limits.
pub async fn check(runtime: &Runtime, source: &PluginSource) -> anyhow::Result<String> {
    let plugin = Arc::new(runtime.fetch_and_load(source).await?);
    let settings = InstanceSettings::with_defaults("check", PluginConfig::new(), Clocks::Real);
    Instance::new(&plugin, Arc::new(settings))
        .await
        .map_err(|error| anyhow::anyhow!("{source} fails to start: {error}"))?;
    let contract = plugin.contract();
    let optional = contract.optional_parts();
    let offers = if optional.is_empty() {
        "no optional parts".to_owned()
    } else {
        format!("optional parts: {}", optional.join(", "))
    };
    let mut report = format!(
        "ok: {source} is a wasm-echo:plugin@{} component ({offers})\nimports:\n",
        contract.version.number()
    );
    for name in plugin.imports() {
        let _ = writeln!(report, "  {name}");
    }
    report.push_str("exports:\n");
    for name in plugin.exports() {
        let _ = writeln!(report, "  {name}");
    }
    Ok(report)
}

/// Checks configuration file `path`: every key as `serve --config` checks
/// it, then each listener's plugin loaded (once per plugin, in an instance
/// pool sized as `serve` sizes it) and started once with that listener's
/// settings and limits. Returns the report to print: one line per listener.
///
/// # Errors
///
/// The first mistake, in the one line `serve` would give: the file, the
/// key and the reason.
pub async fn check_config(path: &Path) -> anyhow::Result<String> {
    let config = ServerConfig::from_file(path)?;
    let cache = crate::server::open_cache(&config)?;
    let mut runtime = Runtime::with_cache(config.pool_size(), cache)?;
    runtime.set_max_plugin_size(config.max_plugin_size);
    let cache = match &config.cache_dir {
        Some(dir) => Some(crate::cache::CacheDir::open(dir)?),
        None => crate::cache::CacheDir::default_path()
            .and_then(|dir| crate::cache::CacheDir::open(&dir).ok()),
    };
    runtime.set_registry(crate::registry::access(
        &config.insecure_registries,
        config.registry_auth.as_deref(),
        cache.as_ref(),
    )?);
    let mut loaded: HashMap<&PluginSource, Arc<Plugin>> = HashMap::new();
    let mut report = format!(
        "ok: {} holds {} listener(s)\n",
        path.display(),
        config.listeners.len()
    );
    for listener in &config.listeners {
        let name = Some(listener.name.as_str());
        let plugin = match loaded.get(&listener.plugin) {
            Some(plugin) => plugin.clone(),
            None => {
                let plugin = runtime
                    .fetch_and_load(&listener.plugin)
                    .await
                    .map_err(|error| config.origin.caused_by(name, "plugin", error))?;
                loaded
                    .entry(&listener.plugin)
                    .or_insert(Arc::new(plugin))
                    .clone()
            }
        };
        let settings = crate::tenant::instance_settings(listener);
        Instance::new(&plugin, Arc::new(settings))
            .await
            .map_err(|error| {
                let reason = format!("{} fails to start: {error}", listener.plugin);
                config.origin.error(name, "plugin", reason)
            })?;
        let sockets: Vec<String> = listener
            .sockets()
            .map(|(protocol, addr)| format!("{} {addr}", protocol.key()))
            .collect();
        let _ = writeln!(
            report,
            "  {}: {} on {}",
            listener.name,
            listener.plugin,
            sockets.join(", ")
        );
    }
    Ok(report)
}
