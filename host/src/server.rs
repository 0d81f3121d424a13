//! The server: loads every listener's plugin, binds every socket, runs one
//! listener task per socket (a UDP listener on a thread of its own), and ends when all of them have stopped, either
//! because their plugins said so (the documents' `exit`) or because the
//! process was asked to shut down.
//!
//! Nothing binds until every plugin has loaded: a bad configuration leaves
//! no half-started server behind.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, UdpSocket};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::config::{ConfigError, ServerConfig};
use crate::listener;
use crate::plugin::{Plugin, PluginSource, Runtime};
use crate::tenant::{NativeHandler, Tenant};

/// The documents' port.
pub const DEFAULT_PORT: u16 = 12345;

/// One bound socket and the tenant it serves.
struct Socket {
    tenant: Arc<Tenant>,
    kind: SocketKind,
}

enum SocketKind {
    Udp(UdpSocket),
    Tcp(TcpListener),
}

/// A server whose sockets are bound, not yet serving.
pub struct Server {
    tenants: Vec<Arc<Tenant>>,
    sockets: Vec<Socket>,
    grace: Duration,
    shutdown: CancellationToken,
}

impl Server {
    /// Loads every plugin (each distinct one once), then binds every socket.
    /// `origin` is the configuration file, named in errors.
    ///
    /// # Errors
    ///
    /// A plugin that does not load, or an address that cannot be bound.
    pub async fn bind(
        runtime: &Runtime,
        config: ServerConfig,
        origin: Option<PathBuf>,
    ) -> anyhow::Result<Self> {
        let mut loaded: HashMap<PluginSource, Arc<Plugin>> = HashMap::new();
        let mut tenants = Vec::new();
        for listener in config.listeners {
            let plugin = match loaded.get(&listener.plugin) {
                Some(plugin) => plugin.clone(),
                None => {
                    let plugin = runtime
                        .load(&listener.plugin)
                        .map_err(|error| match &origin {
                            Some(path) => ConfigError::at(
                                path,
                                &format!("listeners.{}.plugin", listener.name),
                                error,
                            )
                            .into(),
                            None => anyhow::Error::from(error),
                        })?;
                    let plugin = Arc::new(plugin);
                    loaded.insert(listener.plugin.clone(), plugin.clone());
                    plugin
                }
            };
            tenants.push(Arc::new(Tenant::wasm(listener, plugin)));
        }
        Self::bind_tenants(tenants, config.grace).await
    }

    /// Like [`Server::bind`], with native code in place of every plugin:
    /// the benchmark's measure of the host without WebAssembly.
    ///
    /// # Errors
    ///
    /// An address that cannot be bound.
    pub async fn bind_native(
        config: ServerConfig,
        handler: Arc<dyn NativeHandler>,
    ) -> anyhow::Result<Self> {
        let tenants = config
            .listeners
            .into_iter()
            .map(|listener| Arc::new(Tenant::native(listener, handler.clone())))
            .collect();
        Self::bind_tenants(tenants, config.grace).await
    }

    async fn bind_tenants(tenants: Vec<Arc<Tenant>>, grace: Duration) -> anyhow::Result<Self> {
        let mut sockets = Vec::new();
        for tenant in &tenants {
            if let Some(addr) = tenant.udp_addr() {
                let socket = UdpSocket::bind(addr)
                    .await
                    .map_err(|e| bind_error("udp", addr, &e))?;
                sockets.push(Socket {
                    tenant: tenant.clone(),
                    kind: SocketKind::Udp(socket),
                });
            }
            if let Some(addr) = tenant.tcp_addr() {
                let socket = TcpListener::bind(addr)
                    .await
                    .map_err(|e| bind_error("tcp", addr, &e))?;
                sockets.push(Socket {
                    tenant: tenant.clone(),
                    kind: SocketKind::Tcp(socket),
                });
            }
        }
        Ok(Self {
            tenants,
            sockets,
            grace,
            shutdown: CancellationToken::new(),
        })
    }

    /// The bound sockets as (listener name, protocol, address), with the
    /// real port where port 0 was asked for.
    pub fn local_addrs(&self) -> Vec<(&str, &'static str, SocketAddr)> {
        let addr = |socket: &Socket| match &socket.kind {
            SocketKind::Udp(udp) => udp.local_addr().map(|addr| ("udp", addr)),
            SocketKind::Tcp(tcp) => tcp.local_addr().map(|addr| ("tcp", addr)),
        };
        self.sockets
            .iter()
            .filter_map(|socket| {
                addr(socket)
                    .ok()
                    .map(|(protocol, addr)| (socket.tenant.name(), protocol, addr))
            })
            .collect()
    }

    /// The tenants, for reloads.
    pub fn tenants(&self) -> &[Arc<Tenant>] {
        &self.tenants
    }

    /// Cancel this to shut the server down gracefully.
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    /// Serves until every listener has stopped.
    pub async fn run(self) {
        for tenant in &self.tenants {
            tracing::info!(
                listener = tenant.name(),
                version = &*tenant.version_label(),
                "serving"
            );
        }
        let mut listeners = JoinSet::new();
        for socket in self.sockets {
            match socket.kind {
                SocketKind::Udp(udp) => {
                    listeners.spawn(listener::udp::serve_on_own_thread(
                        udp,
                        socket.tenant,
                        self.shutdown.clone(),
                    ));
                }
                SocketKind::Tcp(tcp) => {
                    listeners.spawn(listener::tcp::serve(
                        tcp,
                        socket.tenant,
                        self.shutdown.clone(),
                        self.grace,
                    ));
                }
            }
        }
        // Sums up each tenant's held-back warnings once their window is
        // over, even when nothing new comes to trigger it.
        let summaries = {
            let tenants = self.tenants.clone();
            tokio::spawn(async move {
                let mut every = tokio::time::interval(crate::warnings::WINDOW);
                loop {
                    every.tick().await;
                    for tenant in &tenants {
                        tenant.warnings().flush();
                    }
                }
            })
        };
        while let Some(ended) = listeners.join_next().await {
            if let Err(error) = ended {
                tracing::error!("a listener failed: {error}");
            }
        }
        summaries.abort();
        for tenant in &self.tenants {
            tenant.warnings().finish();
        }
        tracing::info!("every listener has stopped");
    }
}

/// A bind error that says what to do about it.
fn bind_error(protocol: &str, addr: SocketAddr, error: &std::io::Error) -> anyhow::Error {
    let hint = match error.kind() {
        std::io::ErrorKind::AddrInUse => {
            format!(
                "; another program is using it (another wasm-echo?): pick another port with --{protocol}"
            )
        }
        std::io::ErrorKind::AddrNotAvailable => {
            "; that address is not one of this machine's".to_owned()
        }
        std::io::ErrorKind::PermissionDenied => "; ports below 1024 need privileges".to_owned(),
        _ => String::new(),
    };
    anyhow::anyhow!("cannot listen on {protocol} {addr}: {error}{hint}")
}
