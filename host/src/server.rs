//! The server, the one entry point every way of running wasm-echo goes
//! through (the `serve` command, the benchmark, in-process tests), in the
//! shape of mini-redis's `server::run`: [`Server::bind`] loads every
//! listener's plugin, binds every socket, the admin endpoint (`/metrics`,
//! `/healthz`, `/readyz`) and the control socket; [`Server::run`] serves
//! until a shutdown future resolves (after a drain delay, see there) or
//! every listener has stopped by itself (their plugins said `exit`). It
//! is [`Server::start`] (everything spawned, `/readyz` ready) and then
//! [`Serving::serve_until`]; the `serve` command calls the two itself, to
//! print its `listening` lines in between, once the server is ready.
//!
//! Everything it starts (listener tasks, one thread per UDP listener, the
//! control socket, the file watcher, SIGHUP reloads, the metrics endpoint,
//! the warning summaries) runs on one task tracker under one cancellation
//! token, and `run` returns only once all of it has stopped.
//!
//! Nothing binds until every plugin has loaded: a bad configuration leaves
//! no half-started server behind. Parsing flags, setting up logging and
//! choosing which signals shut it down are the caller's business.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use tokio::net::{TcpListener, UdpSocket};
use tokio::signal::unix::{SignalKind, signal};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::admin::{Readiness, ReadyState};
use crate::cache::CacheDir;
use crate::config::{Protocol, ServerConfig};
use crate::control::ControlSocket;
use crate::listener;
use crate::metrics::MetricsEndpoint;
use crate::plugin::{Plugin, PluginSource, Runtime};
use crate::recording::Recorder;
use crate::reload::Reloader;
use crate::tenant::{NativeHandler, Tenant};

/// How long a shutdown waits for a recording's last records to be written.
const RECORDING_FINISH: Duration = Duration::from_secs(2);

/// The tutorial's port.
pub const DEFAULT_PORT: u16 = 12345;

/// How operators reach a running server, besides its listeners.
#[derive(Clone, Debug, Default)]
pub struct Operations {
    /// Serve Prometheus metrics here (`serve --metrics`).
    pub metrics: Option<SocketAddr>,
    /// The control socket: this path, or (`None`) the server's default one
    /// in [`crate::control::default_dir`].
    pub control: Option<PathBuf>,
    /// Whether to have a control socket at all.
    pub control_socket: bool,
    /// Reload a listener when its plugin file changes (`serve --watch`).
    pub watch: bool,
    /// Reload every listener's plugin from its file on SIGHUP.
    pub reload_on_sighup: bool,
}

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
    /// Compiles reloads; `None` for native tenants, which have no plugin.
    runtime: Option<Arc<Runtime>>,
    tenants: Vec<Arc<Tenant>>,
    sockets: Vec<Socket>,
    grace: Duration,
    /// How long to go on serving, not ready, once shutdown begins.
    drain_delay: Duration,
    /// The `/metrics` endpoint, if asked for; bound before any tenant was
    /// made, so that their series are recorded.
    metrics: Option<(SocketAddr, MetricsEndpoint)>,
    control: Option<ControlSocket>,
    operations: Operations,
    /// What `/readyz` says; ready once every listener serves, draining
    /// from the moment shutdown begins.
    readiness: Arc<Readiness>,
}

impl Server {
    /// Loads every plugin (each distinct one once), then binds every
    /// socket, the metrics endpoint and the control socket.
    ///
    /// # Errors
    ///
    /// A plugin that does not load (named as the configuration named it),
    /// an address that cannot be bound, or a control socket that cannot be
    /// made.
    pub async fn bind(config: ServerConfig, operations: Operations) -> anyhow::Result<Self> {
        let metrics = bind_metrics(&operations).await?;
        // The instance pool is sized once, for every listener's limits.
        let mut runtime = Runtime::with_cache(config.pool_size(), open_cache(&config)?)?;
        runtime.set_max_plugin_size(config.max_plugin_size);
        runtime.set_registry(crate::registry::access(
            &config.insecure_registries,
            config.registry_auth.as_deref(),
            runtime.cache(),
        )?);
        let runtime = Arc::new(runtime);
        let mut loaded: HashMap<PluginSource, Arc<Plugin>> = HashMap::new();
        let mut tenants = Vec::new();
        for listener in config.listeners {
            let plugin = match loaded.get(&listener.plugin) {
                Some(plugin) => plugin.clone(),
                None => {
                    let plugin = runtime.fetch_and_load(&listener.plugin).await;
                    let plugin = plugin.map_err(|error| {
                        config
                            .origin
                            .caused_by(Some(&listener.name), "plugin", error)
                    })?;
                    let plugin = Arc::new(plugin);
                    loaded.insert(listener.plugin.clone(), plugin.clone());
                    plugin
                }
            };
            let recorder = match &listener.record {
                Some(record) => Some(
                    Recorder::start(record, &listener.name, &listener.plugin_config).map_err(
                        |error| {
                            config.origin.error(
                                Some(&listener.name),
                                "record",
                                format!("{error:#}"),
                            )
                        },
                    )?,
                ),
                None => None,
            };
            let tenant = Tenant::wasm(listener, plugin);
            tenants.push(Arc::new(match recorder {
                Some(recorder) => tenant.recording(recorder),
                None => tenant,
            }));
        }
        let sockets = bind_sockets(&tenants).await?;
        let control = if operations.control_socket {
            let path = operations.control.clone().unwrap_or_else(|| {
                let file = match &config.origin {
                    crate::config::Origin::File(path) => Some(path.as_path()),
                    crate::config::Origin::Flags => None,
                };
                crate::control::default_path(file)
            });
            Some(ControlSocket::bind(&path).with_context(|| {
                format!(
                    "cannot make the control socket {}; pick another with --control",
                    path.display()
                )
            })?)
        } else {
            None
        };
        Ok(Self {
            runtime: Some(runtime),
            tenants,
            sockets,
            grace: config.grace,
            drain_delay: config.drain_delay,
            metrics,
            control,
            operations,
            readiness: Readiness::new(),
        })
    }

    /// Like [`Server::bind`], with native code in place of every plugin:
    /// the benchmark's measure of the host without WebAssembly. No
    /// reloads, so no control socket or watcher.
    ///
    /// # Errors
    ///
    /// An address that cannot be bound.
    pub async fn bind_native(
        config: ServerConfig,
        handler: Arc<dyn NativeHandler>,
    ) -> anyhow::Result<Self> {
        let tenants: Vec<Arc<Tenant>> = config
            .listeners
            .into_iter()
            .map(|listener| Arc::new(Tenant::native(listener, handler.clone())))
            .collect();
        let sockets = bind_sockets(&tenants).await?;
        Ok(Self {
            runtime: None,
            tenants,
            sockets,
            grace: config.grace,
            drain_delay: config.drain_delay,
            metrics: None,
            control: None,
            operations: Operations::default(),
            readiness: Readiness::new(),
        })
    }

    /// The bound sockets as (listener name, protocol, address), with the
    /// real port where port 0 was asked for.
    pub fn local_addrs(&self) -> Vec<(&str, Protocol, SocketAddr)> {
        let addr = |socket: &Socket| match &socket.kind {
            SocketKind::Udp(udp) => udp.local_addr().map(|addr| (Protocol::Udp, addr)),
            SocketKind::Tcp(tcp) => tcp.local_addr().map(|addr| (Protocol::Tcp, addr)),
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

    /// The address `/metrics` is served on, if it is.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics.as_ref().map(|(addr, _)| *addr)
    }

    /// What `/readyz` answers, shared: tests and embedders may watch it.
    pub fn readiness(&self) -> Arc<Readiness> {
        self.readiness.clone()
    }

    /// The control socket's path, if there is one.
    pub fn control_path(&self) -> Option<&Path> {
        self.control.as_ref().map(ControlSocket::path)
    }

    /// The tenants, for tests and the benchmark.
    pub fn tenants(&self) -> &[Arc<Tenant>] {
        &self.tenants
    }

    /// Serves until `shutdown` resolves or every listener has stopped by
    /// itself, then stops everything else it started and returns once all
    /// of it has. When `shutdown` resolves, `/readyz` turns 503 at once,
    /// the listeners serve on for the drain delay, then stop accepting,
    /// and open connections get the grace period.
    ///
    /// # Errors
    ///
    /// The file watcher or the SIGHUP handler cannot be set up; nothing is
    /// served then.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
        self.run_until(shutdown, std::future::pending()).await
    }

    /// Like [`Server::run`]; `abort`, once `shutdown` has resolved, ends
    /// the drain delay and the grace period at once (an operator's second
    /// Ctrl-C).
    ///
    /// # Errors
    ///
    /// As for [`Server::run`].
    pub async fn run_until(
        self,
        shutdown: impl Future<Output = ()>,
        abort: impl Future<Output = ()>,
    ) -> anyhow::Result<()> {
        self.start()?.serve_until(shutdown, abort).await;
        Ok(())
    }

    /// Starts everything: the listeners, the control socket, the file
    /// watcher, SIGHUP reloads and the admin endpoint, and makes `/readyz`
    /// say ready. Must be called within a tokio runtime. Whoever announces
    /// the server (the `listening` lines) does so after this, so that an
    /// announced server is a ready one.
    ///
    /// # Errors
    ///
    /// The file watcher or the SIGHUP handler cannot be set up; nothing is
    /// served then.
    pub fn start(self) -> anyhow::Result<Serving> {
        let stop = CancellationToken::new();
        let tasks = TaskTracker::new();
        let reloader = self
            .runtime
            .clone()
            .map(|runtime| Arc::new(Reloader::new(runtime, self.tenants.clone())));
        // Everything that answers from outside is ready before the first
        // datagram is served.
        if let (Some(reloader), true) = (&reloader, self.operations.watch) {
            crate::watch::spawn(reloader.clone(), &tasks, stop.child_token())?;
        }
        if let (Some(reloader), true) = (&reloader, self.operations.reload_on_sighup) {
            let mut hangups = signal(SignalKind::hangup()).context("listening for SIGHUP")?;
            let (reloader, stop) = (reloader.clone(), stop.child_token());
            tasks.spawn(async move {
                loop {
                    tokio::select! {
                        () = stop.cancelled() => break,
                        hangup = hangups.recv() => if hangup.is_none() { break },
                    }
                    if let Err(error) = reloader.reload(None, None).await {
                        tracing::warn!("reload on SIGHUP failed, nothing changed: {error}");
                    }
                }
            });
        }
        // Rollouts in the configuration start with the server; one whose
        // candidate fails changes nothing, and the others go on.
        if let Some(reloader) = &reloader {
            for tenant in &self.tenants {
                let Some(plan) = tenant.rollout_plan().cloned() else {
                    continue;
                };
                let (reloader, name) = (reloader.clone(), tenant.name().to_owned());
                tasks.spawn(async move {
                    if let Err(error) = crate::rollout::start(&reloader, &name, plan).await {
                        tracing::error!(listener = name, "rollout not started: {error}");
                    }
                });
            }
        }
        if let (Some(reloader), Some(runtime)) = (&reloader, &self.runtime) {
            crate::registry::follow::spawn(runtime.clone(), reloader.clone(), &tasks, &stop);
        }
        if let (Some(reloader), Some(control)) = (&reloader, self.control) {
            tracing::info!("control socket {}", control.path().display());
            tasks.spawn(control.serve(reloader.clone(), stop.child_token()));
        }
        // Sums up each tenant's held-back warnings once their window is
        // over, even when nothing new comes to trigger it.
        {
            let (tenants, stop) = (self.tenants.clone(), stop.child_token());
            tasks.spawn(async move {
                let mut every = tokio::time::interval(crate::warnings::WINDOW);
                loop {
                    tokio::select! {
                        () = stop.cancelled() => break,
                        _ = every.tick() => {}
                    }
                    for tenant in &tenants {
                        tenant.warnings().flush();
                    }
                }
            });
        }

        for tenant in &self.tenants {
            tracing::info!(
                listener = tenant.name(),
                version = &*tenant.version_label(),
                "serving"
            );
        }
        let listeners = TaskTracker::new();
        let stop_listeners = stop.child_token();
        let abort_listeners = CancellationToken::new();
        for socket in self.sockets {
            match socket.kind {
                SocketKind::Udp(udp) => {
                    listeners.spawn(listener::udp::serve_on_own_thread(
                        udp,
                        socket.tenant,
                        stop_listeners.clone(),
                    ));
                }
                SocketKind::Tcp(tcp) => {
                    listeners.spawn(listener::tcp::serve(
                        tcp,
                        socket.tenant,
                        stop_listeners.clone(),
                        abort_listeners.clone(),
                        self.grace,
                    ));
                }
            }
        }
        listeners.close();
        // Ready before the admin endpoint answers its first request, and
        // before `start` returns: nobody can see this server `starting`
        // once it has been announced.
        self.readiness.advance(ReadyState::Ready);
        if let Some((_, endpoint)) = self.metrics {
            tasks.spawn(endpoint.serve(self.readiness.clone(), stop.child_token()));
        }
        Ok(Serving {
            tenants: self.tenants,
            readiness: self.readiness,
            drain_delay: self.drain_delay,
            stop,
            tasks,
            listeners,
            stop_listeners,
            abort_listeners,
        })
    }
}

/// A started server ([`Server::start`]): what it takes to drain it and
/// stop everything it started.
pub struct Serving {
    tenants: Vec<Arc<Tenant>>,
    /// Turned to draining first when shutdown begins.
    readiness: Arc<Readiness>,
    /// How long to go on serving, not ready, once shutdown begins.
    drain_delay: Duration,
    /// Stops everything but the listeners, once they have stopped.
    stop: CancellationToken,
    /// The control socket, watcher, SIGHUP, admin endpoint and warning
    /// summaries.
    tasks: TaskTracker,
    /// One task per socket; all of them stopped means the server is done.
    listeners: TaskTracker,
    /// Tells the listeners to stop accepting (their grace period begins).
    stop_listeners: CancellationToken,
    /// Ends the grace period at once.
    abort_listeners: CancellationToken,
}

impl Serving {
    /// Serves until `shutdown` resolves or every listener has stopped by
    /// itself, then stops everything and returns once all of it has; see
    /// [`Server::run_until`].
    pub async fn serve_until(
        self,
        shutdown: impl Future<Output = ()>,
        abort: impl Future<Output = ()>,
    ) {
        let listeners = &self.listeners;
        tokio::select! {
            () = shutdown => {
                // Balancers learn first; the listeners serve on meanwhile.
                self.readiness.advance(ReadyState::Draining);
                let mut abort = std::pin::pin!(abort);
                let aborted = tokio::select! {
                    () = tokio::time::sleep(self.drain_delay) => {
                        if !self.drain_delay.is_zero() {
                            tracing::info!("drain delay over: no new connections");
                        }
                        false
                    }
                    () = listeners.wait() => false,
                    () = &mut abort => true,
                };
                self.stop_listeners.cancel();
                if aborted {
                    self.abort_listeners.cancel();
                } else {
                    tokio::select! {
                        () = listeners.wait() => {}
                        () = abort => self.abort_listeners.cancel(),
                    }
                }
                listeners.wait().await;
            }
            () = listeners.wait() => {}
        }
        // Listeners that stopped by themselves (`exit`) take no more
        // traffic either.
        self.readiness.advance(ReadyState::Draining);
        tracing::info!("every listener has stopped");
        self.stop.cancel();
        self.tasks.close();
        self.tasks.wait().await;
        for tenant in &self.tenants {
            tenant.warnings().finish();
            if let Some(recorder) = tenant.recorder() {
                recorder.finish(RECORDING_FINISH).await;
            }
        }
    }
}

/// The cache directory the configuration names, or else the user's. One
/// the operator named must be usable; when the default is not (no home, a
/// read-only one), the server says so once and runs without a cache.
///
/// # Errors
///
/// The operator's `cache-dir` cannot be made, or is not private to this
/// user.
pub(crate) fn open_cache(config: &ServerConfig) -> anyhow::Result<Option<CacheDir>> {
    if let Some(dir) = &config.cache_dir {
        let cache =
            CacheDir::open(dir).map_err(|error| config.origin.error(None, "cache-dir", error))?;
        return Ok(Some(cache));
    }
    Ok(CacheDir::open_default())
}

/// Installs the recorder and binds `/metrics`, if asked for.
async fn bind_metrics(
    operations: &Operations,
) -> anyhow::Result<Option<(SocketAddr, MetricsEndpoint)>> {
    let Some(addr) = operations.metrics else {
        return Ok(None);
    };
    let endpoint = crate::metrics::bind(addr).await?;
    let bound = endpoint.addr().context("reading the metrics address")?;
    Ok(Some((bound, endpoint)))
}

/// Binds every tenant's sockets, UDP first, in the configuration's order.
async fn bind_sockets(tenants: &[Arc<Tenant>]) -> anyhow::Result<Vec<Socket>> {
    let mut sockets = Vec::new();
    for tenant in tenants {
        for (protocol, addr) in tenant.sockets() {
            let kind = match (protocol, tenant.reuse_port()) {
                (Protocol::Udp, false) => UdpSocket::bind(addr).await.map(SocketKind::Udp),
                (Protocol::Tcp, false) => TcpListener::bind(addr).await.map(SocketKind::Tcp),
                (protocol, true) => bind_reusing_port(protocol, addr),
            }
            .map_err(|e| bind_error(protocol, addr, &e))?;
            sockets.push(Socket {
                tenant: tenant.clone(),
                kind,
            });
        }
    }
    Ok(sockets)
}

/// How many connections the kernel queues for a listener bound by
/// [`bind_reusing_port`] (tokio's `TcpListener::bind` asks for as many).
const LISTEN_BACKLOG: i32 = 1024;

/// Binds `addr` with `SO_REUSEPORT` (the tenant's `reuse-port`): other
/// processes that set it too, as the same user, may bind the same port,
/// and the kernel spreads connections and datagrams over them by the
/// client's address.
fn bind_reusing_port(protocol: Protocol, addr: SocketAddr) -> std::io::Result<SocketKind> {
    use socket2::{Domain, Socket as RawSocket, Type};
    let (kind, protocol_number) = match protocol {
        Protocol::Udp => (Type::DGRAM, socket2::Protocol::UDP),
        Protocol::Tcp => (Type::STREAM, socket2::Protocol::TCP),
    };
    let socket = RawSocket::new(Domain::for_address(addr), kind, Some(protocol_number))?;
    if protocol == Protocol::Tcp {
        // As tokio's own bind does: a restart need not wait out TIME_WAIT.
        socket.set_reuse_address(true)?;
    }
    socket.set_reuse_port(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    Ok(match protocol {
        Protocol::Udp => SocketKind::Udp(UdpSocket::from_std(socket.into())?),
        Protocol::Tcp => {
            socket.listen(LISTEN_BACKLOG)?;
            SocketKind::Tcp(TcpListener::from_std(socket.into())?)
        }
    })
}

/// A bind error that says what to do about it.
fn bind_error(protocol: Protocol, addr: SocketAddr, error: &std::io::Error) -> anyhow::Error {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Origin, RawConfig, RawListener};

    fn echo_on_loopback() -> ServerConfig {
        tcp_echo(RawListener {
            udp: Some(([127, 0, 0, 1], 0).into()),
            ..RawListener::default()
        })
    }

    /// `echo` on a TCP port of 127.0.0.1, with `listener`'s other settings.
    fn tcp_echo(listener: RawListener) -> ServerConfig {
        let listener = RawListener {
            plugin: "echo".to_owned(),
            tcp: Some(([127, 0, 0, 1], 0).into()),
            ..listener
        };
        RawConfig {
            listeners: [("main".to_owned(), listener)].into(),
            ..RawConfig::default()
        }
        .resolve(Origin::Flags)
        .expect("a valid configuration")
    }

    fn tcp_addr(server: &Server) -> SocketAddr {
        server
            .local_addrs()
            .into_iter()
            .find(|(_, protocol, _)| *protocol == Protocol::Tcp)
            .map(|(_, _, addr)| addr)
            .expect("a TCP socket")
    }

    /// Echoes one message over a fresh connection to `addr`.
    async fn connect_and_echo(addr: SocketAddr) -> tokio::net::TcpStream {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
        stream.write_all(b"hi").await.expect("send");
        let mut reply = [0u8; 2];
        stream.read_exact(&mut reply).await.expect("echo");
        assert_eq!(&reply, b"hi");
        stream
    }

    /// In tokio's paused time: a connection that stays quiet is closed at
    /// its idle timeout (an hour, passed in no time at all), not before.
    #[tokio::test(start_paused = true)]
    async fn a_quiet_connection_is_closed_at_its_idle_timeout() {
        use tokio::io::AsyncReadExt;
        let idle = Duration::from_secs(3600);
        let server = Server::bind(
            tcp_echo(RawListener {
                idle_timeout: Some(idle),
                ..RawListener::default()
            }),
            Operations::default(),
        )
        .await
        .expect("binds");
        let addr = tcp_addr(&server);
        tokio::spawn(server.run(std::future::pending()));
        let mut stream = connect_and_echo(addr).await;
        let quiet_since = tokio::time::Instant::now();
        let mut rest = Vec::new();
        stream
            .read_to_end(&mut rest)
            .await
            .expect("closed, not reset");
        assert!(rest.is_empty());
        let waited = quiet_since.elapsed();
        assert!(
            waited >= idle && waited < idle + Duration::from_secs(60),
            "closed after {waited:?} of quiet, idle-timeout {idle:?}"
        );
    }

    /// In tokio's paused time: after shutdown, an open connection may go on
    /// for the grace period and is closed when it is over.
    #[tokio::test(start_paused = true)]
    async fn open_connections_get_the_grace_period_then_are_closed() {
        use tokio::io::AsyncReadExt;
        let grace = Duration::from_secs(600);
        // Longer than the grace, or the idle timeout would close it first.
        let mut config = tcp_echo(RawListener {
            idle_timeout: Some(Duration::from_secs(7200)),
            ..RawListener::default()
        });
        config.grace = grace;
        let server = Server::bind(config, Operations::default())
            .await
            .expect("binds");
        let addr = tcp_addr(&server);
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let running = tokio::spawn(server.run(async {
            let _ = stopped.await;
        }));
        let mut stream = connect_and_echo(addr).await;
        stop.send(()).expect("running");
        let shutdown_at = tokio::time::Instant::now();
        let mut rest = Vec::new();
        stream.read_to_end(&mut rest).await.expect("closed");
        let waited = shutdown_at.elapsed();
        assert!(
            waited >= grace && waited < grace + Duration::from_secs(60),
            "closed {waited:?} after shutdown, grace {grace:?}"
        );
        running.await.expect("no panic").expect("no error");
    }

    /// The library entry point serves in process, and `run` returns once
    /// its shutdown future resolves, with everything it started stopped.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn run_serves_until_its_shutdown_future_resolves() {
        let server = Server::bind(echo_on_loopback(), Operations::default())
            .await
            .expect("binds");
        let udp = server
            .local_addrs()
            .into_iter()
            .find(|(_, protocol, _)| *protocol == Protocol::Udp)
            .map(|(_, _, addr)| addr)
            .expect("a UDP socket");
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let running = tokio::spawn(server.run(async {
            let _ = stopped.await;
        }));
        let client = UdpSocket::bind("127.0.0.1:0").await.expect("client");
        client.send_to(b"in process", udp).await.expect("send");
        let mut reply = [0u8; 32];
        let (len, _) = tokio::time::timeout(Duration::from_secs(30), client.recv_from(&mut reply))
            .await
            .expect("a reply in time")
            .expect("a reply");
        assert_eq!(&reply[..len], b"in process");
        stop.send(()).expect("the server is running");
        tokio::time::timeout(Duration::from_secs(30), running)
            .await
            .expect("run returns after shutdown")
            .expect("no panic")
            .expect("no error");
    }
}
