//! The runtime owns what every plugin shares: the wasmtime `Engine` (its
//! configuration decides how code is compiled and how calls are
//! interrupted), the `Linker` holding the host's capabilities, and the one
//! epoch-ticker thread of the process that drives every call's deadline.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread;
use std::time::{Duration, SystemTime};

use sha2::{Digest, Sha256};

use wasmtime::component::{Component, Linker};
use wasmtime::{Config, Engine};

use super::host::{self, HostState};
use super::{LoadError, Plugin, PluginSource, REQUIRED_EXPORTS, bindings};

/// How often the epoch advances: the granularity of deadlines, and how
/// often a long-running call yields its thread to other work.
pub const EPOCH_TICK: Duration = Duration::from_millis(1);

/// The shared wasmtime state. Create one per process.
pub struct Runtime {
    engine: Engine,
    linker: Linker<HostState>,
    ticker_stop: Arc<AtomicBool>,
}

impl Runtime {
    /// Configures the engine, links the capabilities and starts the ticker.
    ///
    /// # Errors
    ///
    /// Fails if wasmtime rejects the configuration on this machine.
    pub fn new() -> anyhow::Result<Self> {
        let mut config = Config::new();
        config.epoch_interruption(true);
        let engine = Engine::new(&config).map_err(|e| anyhow::anyhow!("{e:#}"))?;
        let mut linker = Linker::new(&engine);
        host::capabilities(&mut linker).map_err(|e| anyhow::anyhow!("{e:#}"))?;

        let ticker_stop = Arc::new(AtomicBool::new(false));
        let ticker = {
            let engine = engine.clone();
            let stop = ticker_stop.clone();
            move || {
                while !stop.load(Ordering::Relaxed) {
                    thread::sleep(EPOCH_TICK);
                    engine.increment_epoch();
                }
            }
        };
        thread::Builder::new()
            .name("epoch-ticker".into())
            .spawn(ticker)?;
        Ok(Self {
            engine,
            linker,
            ticker_stop,
        })
    }

    /// Reads, compiles, type-checks and pre-links a plugin. This is the
    /// slow step (Cranelift); instances are then cheap.
    ///
    /// # Errors
    ///
    /// A [`LoadError`] saying what is wrong with the plugin.
    pub fn load(&self, source: &PluginSource) -> Result<Plugin, LoadError> {
        let bytes = source.bytes()?;
        if wasmparser::Parser::is_core_wasm(&bytes) {
            return Err(LoadError::CoreModule {
                plugin: source.clone(),
            });
        }
        if !wasmparser::Parser::is_component(&bytes) {
            return Err(LoadError::NotWasm {
                plugin: source.clone(),
            });
        }
        let component = Component::new(&self.engine, &bytes).map_err(|e| LoadError::Compile {
            plugin: source.clone(),
            reason: one_line(&e),
        })?;

        let ty = component.component_type();
        let exports: Vec<&str> = ty.exports(&self.engine).map(|(name, _)| name).collect();
        if let Some(missing) = REQUIRED_EXPORTS.iter().find(|name| !exports.contains(name)) {
            return Err(LoadError::WrongWorld {
                plugin: source.clone(),
                missing: (*missing).to_owned(),
            });
        }

        let link_error = |e: wasmtime::Error| LoadError::Link {
            plugin: source.clone(),
            reason: one_line(&e),
        };
        let instance_pre = self
            .linker
            .instantiate_pre(&component)
            .map_err(link_error)?;
        let pre = bindings::PluginPre::new(instance_pre).map_err(link_error)?;
        let digest = Sha256::digest(&bytes)
            .iter()
            .take(6)
            .map(|byte| format!("{byte:02x}"))
            .collect();
        Ok(Plugin {
            name: source.name().into(),
            source: source.clone(),
            digest,
            loaded_at: SystemTime::now(),
            component,
            pre,
            instances: AtomicUsize::new(0),
        })
    }
}

impl Drop for Runtime {
    fn drop(&mut self) {
        self.ticker_stop.store(true, Ordering::Relaxed);
    }
}

/// wasmtime's errors chain causes and may carry a multi-line backtrace; a
/// log line or a CLI error wants the chain on one line.
pub(super) fn one_line(error: &wasmtime::Error) -> String {
    let text = format!("{error:#}");
    text.lines()
        .map(str::trim)
        .filter(|line| !line.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
}
