//! The server: loads the plugin, binds the sockets, runs one listener per
//! socket, and ends when every listener has stopped, either because its
//! plugin said so (the documents' `exit`) or because the process was asked
//! to shut down.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context as _;
use tokio::net::{TcpListener, UdpSocket};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::listener::tcp::TcpSettings;
use crate::listener::{self, Tenant};
use crate::plugin::{Limits, PluginConfig, PluginSource, Runtime};

/// The documents' port.
pub const DEFAULT_PORT: u16 = 12345;

/// What to serve.
#[derive(Clone, Debug)]
pub struct ServeOptions {
    /// The plugin every message goes to.
    pub plugin: PluginSource,
    /// The plugin's settings.
    pub config: PluginConfig,
    /// Where to listen for datagrams, if at all.
    pub udp: Option<SocketAddr>,
    /// Where to accept connections, if at all.
    pub tcp: Option<SocketAddr>,
    /// Bounds of every plugin call.
    pub limits: Limits,
    /// How the TCP listener frames messages and ends connections.
    pub tcp_settings: TcpSettings,
}

/// A server whose sockets are bound, not yet serving.
pub struct Server {
    tenant: Arc<Tenant>,
    udp: Option<UdpSocket>,
    tcp: Option<TcpListener>,
    tcp_settings: TcpSettings,
    shutdown: CancellationToken,
}

impl Server {
    /// Loads the plugin, then binds the sockets: a plugin that does not load
    /// binds nothing.
    ///
    /// # Errors
    ///
    /// A plugin that does not load, or an address that cannot be bound.
    pub async fn bind(runtime: &Runtime, options: ServeOptions) -> anyhow::Result<Self> {
        anyhow::ensure!(
            options.udp.is_some() || options.tcp.is_some(),
            "nothing to serve: give --udp, --tcp or both"
        );
        let plugin = runtime.load(&options.plugin)?;
        let tenant = Arc::new(Tenant {
            plugin: Arc::new(plugin),
            config: Arc::new(options.config),
            limits: options.limits,
        });
        let udp = match options.udp {
            Some(addr) => Some(
                UdpSocket::bind(addr)
                    .await
                    .map_err(|e| bind_error("udp", addr, &e))?,
            ),
            None => None,
        };
        let tcp = match options.tcp {
            Some(addr) => Some(
                TcpListener::bind(addr)
                    .await
                    .map_err(|e| bind_error("tcp", addr, &e))?,
            ),
            None => None,
        };
        Ok(Self {
            tenant,
            udp,
            tcp,
            tcp_settings: options.tcp_settings,
            shutdown: CancellationToken::new(),
        })
    }

    /// The bound addresses, with the real port when port 0 was asked for.
    ///
    /// # Errors
    ///
    /// If the operating system cannot say (it always can for a bound socket).
    pub fn local_addrs(&self) -> anyhow::Result<Vec<(&'static str, SocketAddr)>> {
        let mut addrs = Vec::new();
        if let Some(udp) = &self.udp {
            addrs.push((
                "udp",
                udp.local_addr()
                    .context("reading the udp socket's address")?,
            ));
        }
        if let Some(tcp) = &self.tcp {
            addrs.push((
                "tcp",
                tcp.local_addr()
                    .context("reading the tcp socket's address")?,
            ));
        }
        Ok(addrs)
    }

    /// Cancel this to shut the server down gracefully.
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    /// Serves until every listener has stopped.
    pub async fn run(self) {
        tracing::info!(
            plugin = self.tenant.plugin.name(),
            "serving with {}",
            self.tenant.plugin.source()
        );
        let mut listeners = JoinSet::new();
        if let Some(udp) = self.udp {
            listeners.spawn(listener::udp::serve(
                udp,
                self.tenant.clone(),
                self.shutdown.clone(),
            ));
        }
        if let Some(tcp) = self.tcp {
            listeners.spawn(listener::tcp::serve(
                tcp,
                self.tenant.clone(),
                self.shutdown.clone(),
                self.tcp_settings,
            ));
        }
        while let Some(ended) = listeners.join_next().await {
            if let Err(error) = ended {
                tracing::error!("a listener failed: {error}");
            }
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
