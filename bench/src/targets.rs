//! The three servers every workload runs against, side by side: wasm-echo
//! with a plugin (the product), wasm-echo's own I/O path with native code in
//! place of the plugin (what the sandbox costs), and the plain tokio echo
//! server anyone would write (the bar to beat).
//!
//! Driving them is the load generator's business; this module only starts
//! them on 127.0.0.1 with ephemeral ports.

use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, UdpSocket};
use wasm_echo::config::{
    FailurePolicy, ListenerConfig, Origin, Protocol, ServerConfig, TrafficLimits,
};
use wasm_echo::framing::{DEFAULT_MAX_MESSAGE, Framing};
use wasm_echo::plugin::{Limits, PluginSource};
use wasm_echo::server::{Operations, Server};
use wasm_echo::tenant::NativeEcho;

/// Which server a measurement ran against.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, clap::ValueEnum)]
pub enum Kind {
    /// wasm-echo with a plugin.
    Wasm,
    /// wasm-echo's I/O path with [`NativeEcho`].
    Native,
    /// The plain tokio echo server below.
    Tokio,
}

impl Kind {
    /// Every kind, in the table's column order.
    pub const ALL: [Self; 3] = [Self::Wasm, Self::Native, Self::Tokio];

    /// Its name on a child's command line.
    pub fn arg(self) -> &'static str {
        match self {
            Self::Wasm => "wasm",
            Self::Native => "native",
            Self::Tokio => "tokio",
        }
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Wasm => "wasm-echo",
            Self::Native => "native handler",
            Self::Tokio => "plain tokio",
        })
    }
}

/// Where a started server listens.
#[derive(Clone, Copy, Debug)]
pub struct Addrs {
    /// Its UDP socket.
    pub udp: SocketAddr,
    /// Its TCP listener.
    pub tcp: SocketAddr,
}

/// The listener configuration the benchmark gives wasm-echo: both
/// protocols on ephemeral loopback ports, raw framing, default limits
/// (deadline and memory cap on), and room for the memory workload's
/// connections.
pub fn listener_config(plugin: &str, connections: usize) -> anyhow::Result<ServerConfig> {
    let loopback: SocketAddr = ([127, 0, 0, 1], 0).into();
    let listener = ListenerConfig {
        name: "bench".to_owned(),
        plugin: PluginSource::parse(plugin)?,
        plugin_config: Default::default(),
        udp: Some(loopback),
        tcp: Some(loopback),
        framing: Framing::Raw,
        max_message: DEFAULT_MAX_MESSAGE,
        limits: Limits::default(),
        traffic: TrafficLimits {
            max_connections: connections,
            ..TrafficLimits::default()
        },
        honor_stop: false,
        udp_batch: true,
        on_failure: FailurePolicy::default(),
        upgrade_connections: false,
        on_migration_failure: Default::default(),
        max_state: wasm_echo::config::DEFAULT_MAX_STATE,
        record: None,
        proxy: None,
        reuse_port: false,
        rollout: None,
        allow_tags: false,
        tag_poll_interval: wasm_echo::config::DEFAULT_TAG_POLL_INTERVAL,
    };
    Ok(ServerConfig {
        origin: Origin::Flags,
        listeners: vec![listener],
        grace: Duration::from_millis(100),
        drain_delay: Duration::ZERO,
        max_plugin_size: wasm_echo::plugin::DEFAULT_MAX_PLUGIN_SIZE,
        cache_dir: None,
        insecure_registries: Vec::new(),
        registry_auth: None,
    })
}

/// Starts `kind` on the current tokio runtime and returns its addresses.
/// The server runs until the runtime is dropped.
pub async fn start(kind: Kind, plugin: &str, connections: usize) -> anyhow::Result<Addrs> {
    match kind {
        Kind::Wasm | Kind::Native => {
            let config = listener_config(plugin, connections)?;
            let server = if kind == Kind::Wasm {
                Server::bind(config, Operations::default()).await?
            } else {
                Server::bind_native(config, Arc::new(NativeEcho)).await?
            };
            let addrs = addrs_of(&server)?;
            tokio::spawn(server.run(std::future::pending()));
            Ok(addrs)
        }
        Kind::Tokio => plain_tokio().await,
    }
}

/// Where `server` listens.
pub fn addrs_of(server: &Server) -> anyhow::Result<Addrs> {
    let find = |protocol: Protocol| {
        server
            .local_addrs()
            .into_iter()
            .find(|(_, p, _)| *p == protocol)
            .map(|(_, _, addr)| addr)
            .with_context(|| format!("the server bound no {protocol} socket"))
    };
    Ok(Addrs {
        udp: find(Protocol::Udp)?,
        tcp: find(Protocol::Tcp)?,
    })
}

/// The plain tokio echo server: what a user would write instead of
/// wasm-echo: one `read` then one `write_all` per 16 KiB chunk, one
/// `recv_from` then one `send_to` per datagram, with TCP_NODELAY set as
/// wasm-echo sets it. wasm-echo reads up to 64 KiB at a time; with a 64 KiB
/// buffer this server streamed slower than with 16 KiB on this machine
/// (BENCHMARKS.md), so 16 KiB is the stronger baseline.
pub async fn plain_tokio() -> anyhow::Result<Addrs> {
    let tcp = TcpListener::bind("127.0.0.1:0").await?;
    let udp = UdpSocket::bind("127.0.0.1:0").await?;
    let addrs = Addrs {
        udp: udp.local_addr()?,
        tcp: tcp.local_addr()?,
    };
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = tcp.accept().await {
            let _ = stream.set_nodelay(true);
            tokio::spawn(async move {
                let mut buf = vec![0u8; 16 * 1024];
                while let Ok(n @ 1..) = stream.read(&mut buf).await {
                    if stream.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    tokio::spawn(async move {
        let mut buf = vec![0u8; 65_536];
        loop {
            if let Ok((n, peer)) = udp.recv_from(&mut buf).await {
                let _ = udp.send_to(&buf[..n], peer).await;
            }
        }
    });
    Ok(addrs)
}

/// Binds a wasm-echo server from `config` with `operations`, starts it on
/// the current runtime (until the runtime is dropped) and returns its UDP
/// address.
///
/// # Errors
///
/// A server that does not bind, or binds no UDP socket.
pub async fn serve_udp(config: ServerConfig, operations: Operations) -> anyhow::Result<SocketAddr> {
    let server = Server::bind(config, operations).await?;
    let udp = server
        .local_addrs()
        .into_iter()
        .find(|(_, protocol, _)| *protocol == Protocol::Udp)
        .map(|(_, _, addr)| addr)
        .context("the server bound no UDP socket")?;
    tokio::spawn(server.run(std::future::pending()));
    Ok(udp)
}
