//! Which version answers: the tenant's current plugin version (or native
//! code), swapped atomically by a reload. A [`Version`] is made once, when
//! it is swapped in, with everything a session on it needs ready: its
//! `name@digest` label and its metric series. Sessions share it, so a new
//! connection formats nothing and looks nothing up; when the last of them
//! (or the tenant) lets go of a replaced version, its series leave
//! `/metrics` with it.
//!
//! Compiling and checking a new version is the reload's business; running
//! one is the session's.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicIsize, Ordering};

use arc_swap::ArcSwap;

use super::migration::Tally;
use super::native::NativeHandler;
use crate::metrics::{ListenerMetrics, PluginInfo, VersionSeries};
use crate::plugin::{Plugin, PluginSource};

/// The code of a version.
pub enum Code {
    /// A compiled plugin.
    Wasm(Arc<Plugin>),
    /// Native code, for benchmarks.
    Native(Arc<dyn NativeHandler>),
}

/// One version as a tenant serves it.
pub struct Version {
    code: Code,
    /// `name@digest`, or `native`, for logs.
    label: Arc<str>,
    /// Its series in `/metrics`, retired with it.
    series: VersionSeries,
    /// Sessions on it that move to the next version after a swap.
    movable: AtomicIsize,
    /// How the moves to it ended.
    tally: Tally,
    /// Set when a rollout rolls this candidate back: its sessions move to
    /// the current version at their next message.
    retired: AtomicBool,
}

impl Version {
    /// The version running `plugin`, current from now on.
    fn wasm(plugin: Arc<Plugin>, metrics: &ListenerMetrics) -> Self {
        let version = Self::candidate(plugin, metrics);
        version.series.set_current(true);
        version
    }

    /// The version running `plugin` beside the current one, for a
    /// rollout: not current until it is promoted.
    pub(crate) fn candidate(plugin: Arc<Plugin>, metrics: &ListenerMetrics) -> Self {
        let label: Arc<str> = plugin.version().into();
        let reference = match plugin.source() {
            PluginSource::Oci(reference) => Some(reference.to_string()),
            _ => None,
        };
        let info = PluginInfo {
            name: plugin.name(),
            digest: plugin.digest(),
            registry: reference.as_deref().zip(plugin.pinned()),
        };
        let series = metrics.version(&label, Some(info));
        Self {
            code: Code::Wasm(plugin),
            label,
            series,
            movable: AtomicIsize::new(0),
            tally: Tally::default(),
            retired: AtomicBool::new(false),
        }
    }

    /// The version running native code.
    fn native(handler: Arc<dyn NativeHandler>, metrics: &ListenerMetrics) -> Self {
        let label: Arc<str> = "native".into();
        let series = metrics.version(&label, None);
        series.set_current(true);
        Self {
            code: Code::Native(handler),
            label,
            series,
            movable: AtomicIsize::new(0),
            tally: Tally::default(),
            retired: AtomicBool::new(false),
        }
    }

    /// Marks a rolled-back candidate: its sessions leave it.
    pub(crate) fn retire(&self) {
        self.retired.store(true, Ordering::Relaxed);
    }

    /// Whether it is a rolled-back candidate.
    pub(crate) fn is_retired(&self) -> bool {
        self.retired.load(Ordering::Relaxed)
    }

    /// What runs.
    pub fn code(&self) -> &Code {
        &self.code
    }

    /// `name@digest`, or `native`.
    pub fn label(&self) -> &Arc<str> {
        &self.label
    }

    /// Its series.
    pub fn series(&self) -> &VersionSeries {
        &self.series
    }

    /// Counts sessions that will move on after a swap (`delta` is 1 or -1).
    pub(super) fn movable_sessions(&self, delta: isize) {
        self.movable.fetch_add(delta, Ordering::Relaxed);
    }

    /// How many sessions on it will move on after a swap.
    pub(super) fn movable(&self) -> usize {
        usize::try_from(self.movable.load(Ordering::Relaxed)).unwrap_or(0)
    }

    /// How the moves to it ended.
    pub fn tally(&self) -> &Tally {
        &self.tally
    }
}

/// What answers a tenant's messages.
pub enum Handler {
    /// The current version of a plugin; reloads swap it.
    Wasm(ArcSwap<Version>),
    /// Native code, for benchmarks: never swapped.
    Native(Arc<Version>),
}

impl Handler {
    /// A handler serving `plugin`.
    pub fn wasm(plugin: Arc<Plugin>, metrics: &ListenerMetrics) -> Self {
        Self::Wasm(ArcSwap::from_pointee(Version::wasm(plugin, metrics)))
    }

    /// A handler running `native`.
    pub fn native(native: Arc<dyn NativeHandler>, metrics: &ListenerMetrics) -> Self {
        Self::Native(Arc::new(Version::native(native, metrics)))
    }

    /// The version new sessions get.
    pub fn current(&self) -> Arc<Version> {
        match self {
            Self::Wasm(current) => current.load_full(),
            Self::Native(version) => version.clone(),
        }
    }

    /// The current plugin, if the handler runs one.
    pub fn current_plugin(&self) -> Option<Arc<Plugin>> {
        match self {
            Self::Wasm(current) => match &current.load().code {
                Code::Wasm(plugin) => Some(plugin.clone()),
                Code::Native(_) => None,
            },
            Self::Native(_) => None,
        }
    }

    /// Whether `version` is the current one.
    pub fn is_current(&self, version: &Arc<Version>) -> bool {
        match self {
            Self::Wasm(current) => Arc::ptr_eq(&current.load(), version),
            Self::Native(current) => Arc::ptr_eq(current, version),
        }
    }

    /// Makes `plugin` the version every new session gets, and returns the
    /// version it replaces and the new one. Sessions already open keep
    /// theirs until they move.
    pub fn swap(
        &self,
        plugin: Arc<Plugin>,
        metrics: &ListenerMetrics,
    ) -> Option<(Arc<Version>, Arc<Version>)> {
        self.install(Arc::new(Version::wasm(plugin, metrics)))
    }

    /// Makes `next` (a new version, or a promoted candidate) the version
    /// every new session gets; as [`Handler::swap`].
    pub fn install(&self, next: Arc<Version>) -> Option<(Arc<Version>, Arc<Version>)> {
        let Self::Wasm(current) = self else {
            return None;
        };
        next.series.set_current(true);
        let previous = current.swap(next.clone());
        previous.series.set_current(false);
        Some((previous, next))
    }
}
