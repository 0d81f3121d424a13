//! Plugins: finding one (a built-in name or a path), checking that it is a
//! component for the `wasm-echo:plugin` world (of either contract version,
//! with whichever optional parts it offers), compiling and pre-linking it
//! once ([`Plugin`]), and running instances of it ([`Instance`]).
//!
//! Sockets and the choice of when to make or drop an instance are the
//! listeners' business; the bounds an instance runs within are [`Limits`].

mod batch;
mod bindings;
mod host;
mod instance;
mod limits;
mod output;
mod runtime;

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::SystemTime;

use wasmtime::component::Component;

use crate::input_file::{self, InputError};
use crate::registry::{OciReference, ReferenceError, RegistryError};

pub use batch::{Batch, BatchReplies};
pub use bindings::{
    Connection, Contract, ContractVersion, Decision, Endpoint, Framing, Next, SavedState,
    VersionInfo,
};
pub use host::{Clocks, InstanceSettings, PluginConfig, RecordedTime};
pub use instance::{CallError, Instance, endpoint};
pub use limits::Limits;
pub use output::{LogBudget, fold_lines};
pub use runtime::{COMPILED, PoolSize, Runtime};

/// The plugins compiled into this binary, by name.
mod builtin {
    include!(concat!(env!("OUT_DIR"), "/builtin_plugins.rs"));
}

/// The names of the built-in plugins.
pub fn builtin_names() -> impl Iterator<Item = &'static str> {
    builtin::BUILTIN_PLUGINS.iter().map(|(name, _)| *name)
}

/// The largest component file loaded unless the operator says otherwise
/// (`max-plugin-size`): seven times a Python component (about 18 MiB), the
/// largest kind the project builds, while a mistaken path to something
/// huge is refused before it costs the process its memory.
pub const DEFAULT_MAX_PLUGIN_SIZE: u64 = 128 << 20;

/// Where a plugin comes from: `--plugin NAME|PATH`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum PluginSource {
    /// One of the plugins embedded in the binary.
    Builtin(&'static str),
    /// A component file.
    File(PathBuf),
    /// A component in an OCI registry (`oci://...`), by digest or by tag.
    Oci(OciReference),
}

impl PluginSource {
    /// Reads `--plugin`: an `oci://` reference, a built-in's name, or else
    /// a path. A name that
    /// looks like neither (no such built-in, no `/`, no `.wasm`) is refused
    /// here rather than reported later as a missing file.
    ///
    /// # Errors
    ///
    /// [`LoadError::UnknownBuiltin`] for a bare word that names no
    /// built-in; [`LoadError::Reference`] for a malformed `oci://` one.
    pub fn parse(text: &str) -> Result<Self, LoadError> {
        if text.starts_with(crate::registry::SCHEME) {
            return Ok(Self::Oci(OciReference::parse(text)?));
        }
        if let Some(name) = builtin_names().find(|name| *name == text) {
            return Ok(Self::Builtin(name));
        }
        let path = PathBuf::from(text);
        let looks_like_path = text.contains(std::path::MAIN_SEPARATOR)
            || text.contains('/')
            || path.extension().is_some()
            || path.exists();
        if looks_like_path {
            Ok(Self::File(path))
        } else {
            Err(LoadError::UnknownBuiltin {
                name: text.to_owned(),
            })
        }
    }

    /// A short name for logs: the built-in's name or the file's stem.
    pub fn name(&self) -> String {
        match self {
            Self::Builtin(name) => (*name).to_owned(),
            Self::File(path) => path
                .file_stem()
                .map(|stem| stem.to_string_lossy().into_owned())
                .unwrap_or_else(|| path.display().to_string()),
            Self::Oci(reference) => reference.short_name().to_owned(),
        }
    }

    /// The component's bytes: the embedded ones for a built-in, the file's
    /// otherwise, read only if it is a regular file of at most `max_bytes`
    /// (the benchmark reports component sizes from these).
    ///
    /// # Errors
    ///
    /// [`LoadError::Read`] when the file cannot be read, is not a regular
    /// file, is larger than `max_bytes` or takes too long to read;
    /// [`LoadError::NotFetched`] for an `oci://` reference, whose bytes
    /// come from [`Runtime::fetch`].
    pub fn bytes(&self, max_bytes: u64) -> Result<std::borrow::Cow<'static, [u8]>, LoadError> {
        match self {
            Self::Builtin(name) => builtin::BUILTIN_PLUGINS
                .iter()
                .find(|(builtin, _)| builtin == name)
                .map(|(_, bytes)| std::borrow::Cow::Borrowed(*bytes))
                .ok_or_else(|| LoadError::UnknownBuiltin {
                    name: (*name).to_owned(),
                }),
            Self::File(path) => input_file::read(
                path,
                max_bytes,
                " (raise it with max-plugin-size)",
                input_file::READ_TIMEOUT,
            )
            .map(std::borrow::Cow::Owned)
            .map_err(LoadError::Read),
            Self::Oci(reference) => Err(LoadError::NotFetched {
                reference: reference.to_string(),
            }),
        }
    }
}

impl fmt::Display for PluginSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Builtin(name) => write!(f, "built-in plugin `{name}`"),
            Self::File(path) => write!(f, "{}", path.display()),
            Self::Oci(reference) => write!(f, "{reference}"),
        }
    }
}

/// Why a plugin could not be loaded. Each says what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// `--plugin` named no built-in and no file.
    #[error("no built-in plugin named `{name}` (built-ins: {}); give a path to a .wasm component for anything else", builtin_names().collect::<Vec<_>>().join(", "))]
    UnknownBuiltin {
        /// What was asked for.
        name: String,
    },
    /// The file could not be read, or was refused unread.
    #[error(transparent)]
    Read(InputError),
    /// An `oci://` reference that does not parse.
    #[error(transparent)]
    Reference(#[from] ReferenceError),
    /// The registry or the blob cache gave nothing usable.
    #[error(transparent)]
    Registry(#[from] RegistryError),
    /// An `oci://` plugin loaded without being fetched first: a caller
    /// that does not support registries.
    #[error("{reference}: plugins from a registry are not supported here; give a file")]
    NotFetched {
        /// The reference.
        reference: String,
    },
    /// The bytes are not WebAssembly at all.
    #[error("{plugin} is not a WebAssembly component (no `\\0asm` header)")]
    NotWasm {
        /// Where the bytes came from.
        plugin: PluginSource,
    },
    /// A core module where a component was expected.
    #[error(
        "{plugin} is a core WebAssembly module, not a component; build it for \
         wasm32-wasip2 or wrap it with `wasm-tools component new`"
    )]
    CoreModule {
        /// Where the bytes came from.
        plugin: PluginSource,
    },
    /// Cranelift or the validator refused it.
    #[error("{plugin} does not compile: {reason}")]
    Compile {
        /// Where the bytes came from.
        plugin: PluginSource,
        /// What the compiler said, on one line.
        reason: String,
        /// The compiler's error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// A component for some other world.
    #[error(
        "{plugin} does not implement the wasm-echo:plugin world: it does not export `{missing}`"
    )]
    WrongWorld {
        /// Where the bytes came from.
        plugin: PluginSource,
        /// The first required export it lacks.
        missing: String,
    },
    /// It imports something the host does not grant, or its exports have
    /// the wrong types.
    #[error("{plugin} does not fit the wasm-echo:plugin world: {reason}")]
    Link {
        /// Where the bytes came from.
        plugin: PluginSource,
        /// What does not fit, on one line.
        reason: String,
        /// The linker's error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

/// A plugin compiled and pre-linked once, ready to be instantiated as often
/// as connections come. Cheap to share: listeners hold it in an `Arc`.
pub struct Plugin {
    name: Arc<str>,
    source: PluginSource,
    digest: String,
    /// For a plugin from a registry, the manifest digest it was fetched
    /// by: what a tag pointed to, and what to pin.
    pinned: Option<String>,
    loaded_at: SystemTime,
    component: Component,
    pre: wasmtime::component::InstancePre<host::HostState>,
    /// Which contract it implements and where its exports are.
    exports: bindings::ExportIndices,
    /// Live instances of this version; see [`Plugin::instances`].
    instances: AtomicUsize,
    /// The epoch ticker (every call's deadline): kept running while this
    /// plugin can run, and told when a call does.
    ticker: Arc<runtime::Ticker>,
}

impl Plugin {
    /// The plugin's short name, as logs show it.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Where it was loaded from.
    pub fn source(&self) -> &PluginSource {
        &self.source
    }

    /// The first 12 hex digits of the SHA-256 of the component's bytes:
    /// what tells two versions of a plugin apart.
    pub fn digest(&self) -> &str {
        &self.digest
    }

    /// For a plugin from a registry, the manifest digest it runs (for a
    /// tag, the one the tag pointed to when it was fetched).
    pub fn pinned(&self) -> Option<&str> {
        self.pinned.as_deref()
    }

    /// When this version was loaded.
    pub fn loaded_at(&self) -> SystemTime {
        self.loaded_at
    }

    /// `name@digest`, as logs show a version.
    pub fn version(&self) -> String {
        format!("{}@{}", self.name, self.digest)
    }

    /// Which contract version it implements and which optional parts it
    /// offers.
    pub fn contract(&self) -> Contract {
        self.exports.contract()
    }

    /// What the `state` interface's `restore` is told about this version.
    pub fn version_info(&self) -> bindings::VersionInfo {
        bindings::VersionInfo {
            name: self.name.to_string(),
            digest: self.digest.clone(),
            contract: self.contract().version.number().to_owned(),
        }
    }

    /// How many instances of this version are alive (connections still
    /// running it, and the UDP listener's instance).
    pub fn instances(&self) -> usize {
        self.instances.load(Ordering::Relaxed)
    }

    /// The interfaces and functions it imports, as the component names them.
    pub fn imports(&self) -> Vec<String> {
        let ty = self.component.component_type();
        ty.imports(self.pre.engine())
            .map(|(name, _)| name.to_owned())
            .collect()
    }

    /// The interfaces and functions it exports.
    pub fn exports(&self) -> Vec<String> {
        let ty = self.component.component_type();
        ty.exports(self.pre.engine())
            .map(|(name, _)| name.to_owned())
            .collect()
    }
}

impl Drop for Plugin {
    fn drop(&mut self) {
        // After a reload the old version lives on in its open connections;
        // this is the moment its code and memory are gone.
        tracing::debug!(version = self.version(), "plugin version released");
    }
}

impl fmt::Debug for Plugin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Plugin")
            .field("name", &self.name)
            .field("source", &self.source)
            .finish()
    }
}
