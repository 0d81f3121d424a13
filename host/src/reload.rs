//! Reloading plugins while serving. A reload compiles and checks the new
//! version off the serving path (Cranelift runs on threads of a low
//! priority, or not at all when the compiled-code cache has the version),
//! starts one instance of it to make sure it comes up, and only then swaps
//! it in atomically. New datagrams and new connections get the new version;
//! the UDP listener's instance moves to it at once (with its state, if both
//! versions offer `state`), and so do open connections of a listener with
//! `upgrade-connections`; other connections keep their version until they
//! close, and a version's code is freed with its last instance. A reload
//! that fails changes nothing.
//!
//! What asks for a reload (the control socket, SIGHUP, the file watcher)
//! lives in [`crate::control`] and [`crate::watch`].

use std::fmt;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::metrics::ReloadOutcome;
use crate::plugin::{CallError, LoadError, PluginSource, Runtime};
use crate::registry::{OciReference, RegistryError};
use crate::tenant::Tenant;

/// The nice value a reload compiles at. Not the lowest (19): that gets
/// only the CPU nothing else wants, and under a load that keeps every core
/// busy (the reload benchmark's, a busy server's) a reload at 19 waited
/// for seconds. At 10 the kernel gives it about a tenth of a core's share
/// beside each busy serving thread: it spreads its work thinly instead of
/// taking whole cores for tens of milliseconds.
const COMPILE_NICE: i32 = 10;

/// Why a reload changed nothing.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    /// `--listener` named no listener.
    #[error("no listener named `{name}` (listeners: {known})")]
    UnknownListener {
        /// What was asked for.
        name: String,
        /// The listeners there are.
        known: String,
    },
    /// A plugin path that is not absolute: the client resolves paths
    /// where its user typed them.
    #[error("plugin path {} is not absolute; `wasm-echo reload` sends absolute paths", .0.display())]
    RelativePath(std::path::PathBuf),
    /// The new version does not load.
    #[error("listener `{listener}`: {error}")]
    Load {
        /// Whose plugin.
        listener: String,
        /// Why (boxed: a load error is large next to the others).
        #[source]
        error: Box<LoadError>,
    },
    /// The new version loads but does not start.
    #[error("listener `{listener}`: {version} fails to start: {error}")]
    Start {
        /// Whose plugin.
        listener: String,
        /// The version that failed.
        version: String,
        /// Why.
        #[source]
        error: CallError,
    },
    /// Compiling the new version did not finish (its thread panicked).
    #[error("listener `{listener}`: compilation did not finish: {error}")]
    Compilation {
        /// Whose plugin.
        listener: String,
        /// What the compiling task said.
        #[source]
        error: tokio::task::JoinError,
    },
    /// A reference by tag for a listener without `allow-tags`.
    #[error("listener `{listener}`: {error}")]
    Registry {
        /// Whose plugin.
        listener: String,
        /// Why.
        #[source]
        error: crate::registry::RegistryError,
    },
    /// The listener runs native code, which cannot be reloaded.
    #[error("listener `{0}` runs no plugin")]
    Native(String),
    /// A rollout decides the listener's version until it ends.
    #[error("listener `{0}` has a rollout running; promote or abort it first (wasm-echo rollout)")]
    RollingOut(String),
}

/// One listener's reload, as logs and `wasm-echo reload` report it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Swap {
    /// The listener.
    pub listener: String,
    /// `name@digest` of the version it ran.
    pub previous: String,
    /// `name@digest` of the version it runs now.
    pub current: String,
    /// When the new version was loaded (RFC 3339).
    pub loaded_at: String,
    /// Instances of the previous version still alive: open connections
    /// finishing on it.
    pub still_on_previous: usize,
    /// Instances that moved to the new version with their state.
    #[serde(default)]
    pub migrated: usize,
    /// Instances that moved to the new version without state.
    #[serde(default)]
    pub fresh: usize,
    /// Instances whose hand-over failed (or was skipped) and that stayed
    /// on the previous version.
    #[serde(default)]
    pub kept: usize,
    /// Whether anything changed (a reload of identical bytes swaps nothing).
    pub swapped: bool,
    /// With `serve --watch`, when the swap changed where the plugin comes
    /// from: what the watcher follows now (`watching PATH`, or no file for
    /// a built-in). The watcher follows the source a listener runs, so a
    /// `reload --plugin` is not undone by a later write to the old file.
    #[serde(default)]
    pub watching: Option<String>,
}

impl fmt::Display for Swap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.swapped {
            write!(
                f,
                "listener `{}`: {} -> {} (loaded {}); {} instance(s) migrated with their state",
                self.listener, self.previous, self.current, self.loaded_at, self.migrated,
            )?;
            if self.fresh > 0 {
                write!(f, ", {} moved without state", self.fresh)?;
            }
            if self.kept > 0 {
                write!(f, ", {} kept on {}", self.kept, self.previous)?;
            }
            write!(
                f,
                "; {} instance(s) still on {}",
                self.still_on_previous, self.previous
            )?;
            match &self.watching {
                Some(watching) => write!(f, "; {watching}"),
                None => Ok(()),
            }
        } else {
            write!(
                f,
                "listener `{}`: {} unchanged",
                self.listener, self.current
            )
        }
    }
}

/// Carries out reloads for a server's tenants, one at a time.
pub struct Reloader {
    runtime: Arc<Runtime>,
    tenants: Vec<Arc<Tenant>>,
    /// Reloads are serialised so two never race on one tenant.
    busy: tokio::sync::Mutex<()>,
    /// Tells the file watcher (`serve --watch`, see [`Reloader::follow`])
    /// that a listener runs from another source now; unset without one.
    sources: std::sync::OnceLock<tokio::sync::watch::Sender<()>>,
}

impl Reloader {
    /// A reloader for `tenants`, compiling with `runtime`.
    pub fn new(runtime: Arc<Runtime>, tenants: Vec<Arc<Tenant>>) -> Self {
        Self {
            runtime,
            tenants,
            busy: tokio::sync::Mutex::new(()),
            sources: std::sync::OnceLock::new(),
        }
    }

    /// For the file watcher: changes whenever a reload points a listener
    /// at another source, so that it watches [`Reloader::watched_files`]
    /// afresh. Once this is called, reload answers say what is watched.
    pub fn follow(&self) -> tokio::sync::watch::Receiver<()> {
        self.sources
            .get_or_init(|| tokio::sync::watch::channel(()).0)
            .subscribe()
    }

    /// The plugin file each tenant runs now (absolute), for the watcher.
    pub fn watched_files(&self) -> Vec<(String, std::path::PathBuf)> {
        self.tenants
            .iter()
            .filter_map(|tenant| match tenant.current()?.source() {
                PluginSource::File(path) => Some((
                    tenant.name().to_owned(),
                    std::path::absolute(path).unwrap_or_else(|_| path.clone()),
                )),
                PluginSource::Builtin(_) | PluginSource::Oci(_) => None,
            })
            .collect()
    }

    /// The tags the tenants follow now, each with its tenant's poll
    /// interval, for [`crate::registry::follow`].
    pub fn followed_tags(&self) -> Vec<(OciReference, std::time::Duration)> {
        self.tenants
            .iter()
            .filter_map(|tenant| match tenant.current()?.source() {
                PluginSource::Oci(reference) if reference.tag().is_some() => {
                    Some((reference.clone(), tenant.tag_poll_interval()))
                }
                _ => None,
            })
            .collect()
    }

    /// The tenants that run `source` (a tag) at another digest than
    /// `digest`: those a tag move concerns.
    pub fn behind(&self, source: &PluginSource, digest: &str) -> Vec<String> {
        self.tenants
            .iter()
            .filter(|tenant| {
                tenant.current().is_some_and(|plugin| {
                    plugin.source() == source && plugin.pinned() != Some(digest)
                })
            })
            .map(|tenant| tenant.name().to_owned())
            .collect()
    }

    /// Reloads `listener` (every listener when `None`) from `plugin` (each
    /// one's current source when `None`). Every new version is loaded and
    /// started before any is swapped in, so a failure changes nothing.
    ///
    /// # Errors
    ///
    /// A [`ReloadError`] saying which listener and why.
    pub async fn reload(
        &self,
        listener: Option<&str>,
        plugin: Option<&PluginSource>,
    ) -> Result<Vec<Swap>, ReloadError> {
        let _busy = self.busy.lock().await;
        let result = self.try_reload(listener, plugin).await;
        let targets = self
            .tenants
            .iter()
            .filter(|tenant| listener.is_none_or(|name| name == tenant.name()));
        for tenant in targets {
            let outcome = match &result {
                Err(_) => ReloadOutcome::Failed,
                Ok(swaps) => match swaps.iter().find(|swap| swap.listener == tenant.name()) {
                    Some(swap) if swap.swapped => ReloadOutcome::Swapped,
                    _ => ReloadOutcome::Unchanged,
                },
            };
            tenant.metrics().reloaded(outcome);
        }
        result
    }

    /// The tenants it reloads.
    pub fn tenants(&self) -> &[Arc<Tenant>] {
        &self.tenants
    }

    /// The tenant named `name`.
    ///
    /// # Errors
    ///
    /// [`ReloadError::UnknownListener`], naming the ones there are.
    pub fn tenant(&self, name: &str) -> Result<&Arc<Tenant>, ReloadError> {
        self.tenants
            .iter()
            .find(|tenant| tenant.name() == name)
            .ok_or_else(|| ReloadError::UnknownListener {
                name: name.to_owned(),
                known: self
                    .tenants
                    .iter()
                    .map(|t| t.name())
                    .collect::<Vec<_>>()
                    .join(", "),
            })
    }

    /// Compiles `source` for `tenant` off the serving path, as a reload
    /// does (a rollout's candidate).
    ///
    /// # Errors
    ///
    /// [`ReloadError::Load`] or [`ReloadError::Compilation`].
    pub async fn load(
        &self,
        tenant: &Tenant,
        source: &PluginSource,
    ) -> Result<Arc<crate::plugin::Plugin>, ReloadError> {
        if let PluginSource::File(path) = source
            && path.is_relative()
        {
            return Err(ReloadError::RelativePath(path.clone()));
        }
        if let PluginSource::Oci(reference) = source
            && reference.tag().is_some()
            && !tenant.allow_tags()
        {
            return Err(ReloadError::Registry {
                listener: tenant.name().to_owned(),
                error: RegistryError::TagNotAllowed {
                    reference: reference.to_string(),
                },
            });
        }
        // The registry is asked here, on this task; compiling, below,
        // never waits on it.
        let fetched = self
            .runtime
            .fetch(source)
            .await
            .map_err(|error| ReloadError::Load {
                listener: tenant.name().to_owned(),
                error: Box::new(error),
            })?;
        let runtime = self.runtime.clone();
        let source = source.clone();
        // Compiled at a low priority, so that serving keeps most of its
        // cores while the new version compiles (start-up compiles at full
        // priority: nothing is served yet).
        let compiled = tokio::task::spawn_blocking(move || {
            crate::background::at_priority("reload-compile", COMPILE_NICE, || {
                runtime.load_fetched(&source, fetched)
            })
        });
        match compiled.await {
            Ok(Ok(plugin)) => Ok(Arc::new(plugin)),
            Ok(Err(error)) => Err(ReloadError::Load {
                listener: tenant.name().to_owned(),
                error: Box::new(error),
            }),
            Err(join) => Err(ReloadError::Compilation {
                listener: tenant.name().to_owned(),
                error: join,
            }),
        }
    }

    /// Makes a rollout's `candidate` the version `tenant` serves, with the
    /// swap a reload makes (serialised with reloads, counted and logged as
    /// one).
    pub async fn promote(&self, tenant: &Tenant, candidate: Arc<crate::tenant::Version>) -> Swap {
        let _busy = self.busy.lock().await;
        let previous = tenant.version_label();
        let still = tenant.current().map_or(0, |plugin| plugin.instances());
        let migrations = tenant.promote(candidate).await;
        let live = tenant.current();
        let swap = Swap {
            listener: tenant.name().to_owned(),
            previous: previous.to_string(),
            current: tenant.version_label().to_string(),
            loaded_at: live.map_or_else(String::new, |plugin| {
                humantime::format_rfc3339_millis(plugin.loaded_at()).to_string()
            }),
            still_on_previous: still,
            migrated: migrations.migrated,
            fresh: migrations.fresh,
            kept: migrations.kept,
            swapped: true,
            watching: None,
        };
        tenant.metrics().reloaded(ReloadOutcome::Swapped);
        tracing::info!(listener = tenant.name(), "promoted: {swap}");
        swap
    }

    async fn try_reload(
        &self,
        listener: Option<&str>,
        requested: Option<&PluginSource>,
    ) -> Result<Vec<Swap>, ReloadError> {
        let tenants: Vec<&Arc<Tenant>> = match listener {
            Some(name) => vec![self.tenant(name)?],
            None => self.tenants.iter().collect(),
        };
        if let Some(PluginSource::File(path)) = requested
            && path.is_relative()
        {
            // Relative to what? The caller's folder is not the server's.
            return Err(ReloadError::RelativePath(path.clone()));
        }

        if let Some(busy) = tenants.iter().find(|tenant| tenant.rollout().is_some()) {
            return Err(ReloadError::RollingOut(busy.name().to_owned()));
        }
        let mut ready = Vec::new();
        for tenant in tenants {
            let current = tenant
                .current()
                .ok_or_else(|| ReloadError::Native(tenant.name().to_owned()))?;
            let source = requested
                .cloned()
                .unwrap_or_else(|| current.source().clone());
            let plugin = self.load(tenant, &source).await?;
            let changed = plugin.digest() != current.digest()
                || plugin.name() != current.name()
                || plugin.pinned() != current.pinned();
            if changed {
                tenant
                    .try_start(&plugin)
                    .await
                    .map_err(|error| ReloadError::Start {
                        listener: tenant.name().to_owned(),
                        version: plugin.version(),
                        error,
                    })?;
            }
            ready.push((tenant, current, plugin, changed));
        }

        let mut swaps = Vec::new();
        let mut moved = false;
        for (tenant, current, plugin, swapped) in ready {
            let migrations = if swapped {
                tenant.swap(plugin.clone()).await
            } else {
                crate::tenant::Migrations::default()
            };
            let watching =
                (swapped && plugin.source() != current.source() && self.sources.get().is_some())
                    .then(|| {
                        moved = true;
                        match plugin.source() {
                            PluginSource::File(path) => format!("now watching {}", path.display()),
                            PluginSource::Builtin(name) => {
                                format!("now watching no file (`{name}` is built in)")
                            }
                            PluginSource::Oci(reference) => {
                                format!("now watching no file ({reference} is in a registry)")
                            }
                        }
                    });
            let live = tenant.current().unwrap_or(plugin);
            let swap = Swap {
                listener: tenant.name().to_owned(),
                previous: current.version(),
                current: live.version(),
                loaded_at: humantime::format_rfc3339_millis(live.loaded_at()).to_string(),
                still_on_previous: if swapped { current.instances() } else { 0 },
                migrated: migrations.migrated,
                fresh: migrations.fresh,
                kept: migrations.kept,
                swapped,
                watching,
            };
            tracing::info!(listener = tenant.name(), "reloaded: {swap}");
            swaps.push(swap);
        }
        if moved && let Some(sources) = self.sources.get() {
            sources.send_replace(());
        }
        Ok(swaps)
    }
}
