//! The host side of the WIT contract in `wit/`: the `bindgen!` calls, one
//! per contract version the host serves, and the one place that knows
//! which exports each version has. Everything else in the host uses the
//! types re-exported from here (with `self::`, since the generated
//! `wasm_echo` module shares the crate's name).
//!
//! Both versions share one set of Rust types: 0.1.0's `types` interface is
//! mapped onto 0.2.0's, which has the same records (the component model
//! checks them by shape, not by name). Exports are not taken as a whole
//! world: each interface is looked up by name when a plugin is loaded
//! ([`ExportIndices::find`]), so an optional interface is one `Option`
//! here, not one more world per combination of optional parts. The host's
//! main `bindgen!` takes the `stateful-plugin` world; the `udp-batch`
//! interface comes from a second one over `batching-plugin` that shares the
//! first one's types and host imports ([`batching`]).

use wasmtime::component::{Component, InstancePre};

wasmtime::component::bindgen!({
    path: "../wit",
    world: "stateful-plugin",
    exports: { default: async },
});

/// The frozen 0.1.0 contract (`wit/0.1.0`): the same interfaces, without
/// the optional ones.
pub mod v0_1 {
    wasmtime::component::bindgen!({
        path: "../wit/0.1.0",
        world: "plugin",
        exports: { default: async },
        with: { "wasm-echo:plugin/types": super::wasm_echo::plugin::types },
    });
}

/// The `batching-plugin` world, for its `udp-batch` interface: the rest is
/// the main bindings' (`with`), so there is one set of types.
pub mod batching {
    wasmtime::component::bindgen!({
        path: "../wit",
        world: "batching-plugin",
        exports: { default: async },
        with: {
            "wasm-echo:plugin/types": super::wasm_echo::plugin::types,
            "wasm-echo:plugin/host": super::wasm_echo::plugin::host,
        },
    });
}

pub use self::batching::exports::wasm_echo::plugin::udp_batch::{Datagrams, Replies};
pub use self::exports::wasm_echo::plugin::state::SavedState;
pub use self::wasm_echo::plugin::host::Level;
pub use self::wasm_echo::plugin::types::{
    Connection, Decision, Endpoint, Framing, Next, VersionInfo,
};

use self::batching::exports::wasm_echo::plugin::udp_batch;
use self::exports::wasm_echo::plugin::{state, tcp, udp};
use self::v0_1::exports::wasm_echo::plugin::{tcp as tcp_0_1, udp as udp_0_1};

/// The contract versions the host serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ContractVersion {
    /// `wasm-echo:plugin@0.1.0`: `udp` and `tcp`.
    V0_1,
    /// `wasm-echo:plugin@0.2.0`: `udp` and `tcp`, and optionally `state`
    /// and `udp-batch`.
    V0_2,
}

impl ContractVersion {
    /// Newest first: a component exporting both is taken as the newer.
    const ALL: [Self; 2] = [Self::V0_2, Self::V0_1];

    /// The version number, as the package names it.
    pub fn number(self) -> &'static str {
        match self {
            Self::V0_1 => "0.1.0",
            Self::V0_2 => "0.2.0",
        }
    }

    /// The name of one of its interfaces, as a component exports it.
    pub fn interface(self, name: &str) -> String {
        format!("wasm-echo:plugin/{name}@{}", self.number())
    }
}

/// What a component offers of the contract: its version, and which
/// optional parts it exports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Contract {
    /// The contract version it was built for.
    pub version: ContractVersion,
    /// Whether it exports `state` (0.2.0 and later): it can hand its state
    /// to its next version.
    pub state: bool,
    /// Whether it exports `udp-batch` (0.2.0 and later): it answers many
    /// datagrams in one call.
    pub batch: bool,
}

impl Contract {
    /// The optional interfaces it exports, by name.
    pub fn optional_parts(&self) -> Vec<&'static str> {
        [("state", self.state), ("udp-batch", self.batch)]
            .into_iter()
            .filter_map(|(name, offered)| offered.then_some(name))
            .collect()
    }
}

/// Where a plugin's exported functions are, found once when it is loaded.
#[derive(Clone)]
pub(super) enum ExportIndices {
    V0_1 {
        udp: udp_0_1::GuestIndices,
        tcp: tcp_0_1::GuestIndices,
    },
    V0_2 {
        udp: udp::GuestIndices,
        tcp: tcp::GuestIndices,
        state: Option<state::GuestIndices>,
        batch: Option<udp_batch::GuestIndices>,
    },
}

impl ExportIndices {
    /// Finds which contract `pre`'s component implements and where its
    /// exports are.
    ///
    /// # Errors
    ///
    /// The required interface it does not export (of the newest version
    /// it exports anything of), or what is wrong with one it does export.
    pub(super) fn find<T>(pre: &InstancePre<T>) -> Result<Self, FindError> {
        let component = pre.component();
        let version = Self::check_required(component).map_err(FindError::Missing)?;
        Ok(match version {
            ContractVersion::V0_1 => Self::V0_1 {
                udp: udp_0_1::GuestIndices::new(pre)?,
                tcp: tcp_0_1::GuestIndices::new(pre)?,
            },
            ContractVersion::V0_2 => Self::V0_2 {
                udp: udp::GuestIndices::new(pre)?,
                tcp: tcp::GuestIndices::new(pre)?,
                state: match component.get_export_index(None, version.interface("state")) {
                    Some(_) => Some(state::GuestIndices::new(pre)?),
                    None => None,
                },
                batch: match component.get_export_index(None, version.interface("udp-batch")) {
                    Some(_) => Some(udp_batch::GuestIndices::new(pre)?),
                    None => None,
                },
            },
        })
    }

    /// Which contract version `component` implements: the newest it
    /// exports anything of, if it exports all that version requires.
    ///
    /// # Errors
    ///
    /// The first required interface it does not export.
    pub(super) fn check_required(component: &Component) -> Result<ContractVersion, String> {
        let version = ContractVersion::ALL
            .into_iter()
            .find(|version| exports_any(component, *version))
            .unwrap_or(ContractVersion::V0_2);
        for name in ["udp", "tcp"] {
            let interface = version.interface(name);
            if component.get_export_index(None, &interface).is_none() {
                return Err(interface);
            }
        }
        Ok(version)
    }

    /// What the component offers.
    pub(super) fn contract(&self) -> Contract {
        match self {
            Self::V0_1 { .. } => Contract {
                version: ContractVersion::V0_1,
                state: false,
                batch: false,
            },
            Self::V0_2 { state, batch, .. } => Contract {
                version: ContractVersion::V0_2,
                state: state.is_some(),
                batch: batch.is_some(),
            },
        }
    }

    /// The exports of `instance`, typed.
    ///
    /// # Errors
    ///
    /// If an export's type does not fit the contract.
    pub(super) fn load(
        &self,
        mut store: impl wasmtime::AsContextMut,
        instance: &wasmtime::component::Instance,
    ) -> wasmtime::Result<Exports> {
        Ok(match self {
            Self::V0_1 { udp, tcp } => Exports {
                udp: Udp::V0_1(udp.load(&mut store, instance)?),
                tcp: Tcp::V0_1(tcp.load(&mut store, instance)?),
                state: None,
                batch: None,
            },
            Self::V0_2 {
                udp,
                tcp,
                state,
                batch,
            } => Exports {
                udp: Udp::V0_2(udp.load(&mut store, instance)?),
                tcp: Tcp::V0_2(tcp.load(&mut store, instance)?),
                state: match state {
                    Some(state) => Some(state.load(&mut store, instance)?),
                    None => None,
                },
                batch: match batch {
                    Some(batch) => Some(batch.load(&mut store, instance)?),
                    None => None,
                },
            },
        })
    }
}

/// Whether `component` exports any interface of `version`'s package.
fn exports_any(component: &Component, version: ContractVersion) -> bool {
    ["udp", "tcp", "state", "udp-batch"].iter().any(|name| {
        component
            .get_export_index(None, version.interface(name))
            .is_some()
    })
}

/// Why a component's exports do not fit the contract.
#[derive(Debug, thiserror::Error)]
pub(super) enum FindError {
    /// A required interface is missing.
    #[error("it does not export `{0}`")]
    Missing(String),
    /// An interface is there but lacks a function.
    #[error(transparent)]
    Shape(#[from] wasmtime::Error),
}

/// One instance's exports, typed.
pub(super) struct Exports {
    pub udp: Udp,
    pub tcp: Tcp,
    pub state: Option<state::Guest>,
    pub batch: Option<udp_batch::Guest>,
}

/// The `udp` interface of either version.
pub(super) enum Udp {
    V0_1(udp_0_1::Guest),
    V0_2(udp::Guest),
}

/// The `tcp` interface of either version.
pub(super) enum Tcp {
    V0_1(tcp_0_1::Guest),
    V0_2(tcp::Guest),
}

impl Udp {
    pub async fn call_on_datagram<S: wasmtime::AsContextMut<Data: Send>>(
        &self,
        store: S,
        peer: &Endpoint,
        data: &[u8],
    ) -> wasmtime::Result<Decision> {
        match self {
            Self::V0_1(udp) => udp.call_on_datagram(store, peer, data).await,
            Self::V0_2(udp) => udp.call_on_datagram(store, peer, data).await,
        }
    }
}

impl Tcp {
    pub async fn call_on_open<S: wasmtime::AsContextMut<Data: Send>>(
        &self,
        store: S,
        conn: &Connection,
    ) -> wasmtime::Result<Decision> {
        match self {
            Self::V0_1(tcp) => tcp.call_on_open(store, conn).await,
            Self::V0_2(tcp) => tcp.call_on_open(store, conn).await,
        }
    }

    pub async fn call_on_message<S: wasmtime::AsContextMut<Data: Send>>(
        &self,
        store: S,
        data: &[u8],
    ) -> wasmtime::Result<Decision> {
        match self {
            Self::V0_1(tcp) => tcp.call_on_message(store, data).await,
            Self::V0_2(tcp) => tcp.call_on_message(store, data).await,
        }
    }

    pub async fn call_on_close<S: wasmtime::AsContextMut<Data: Send>>(
        &self,
        store: S,
    ) -> wasmtime::Result<()> {
        match self {
            Self::V0_1(tcp) => tcp.call_on_close(store).await,
            Self::V0_2(tcp) => tcp.call_on_close(store).await,
        }
    }
}
