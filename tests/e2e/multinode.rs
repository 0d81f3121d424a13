//! Three nodes behind Debian's nginx, started by `deploy/multinode.sh` on
//! loopback: traffic spreads over the nodes, each node's plugin sees the
//! real client (PROXY protocol), UDP clients stick to a node, one node
//! drains on SIGTERM without losing a reply, and a plugin swap node by node
//! under load loses nothing.
//!
//! Clients bind to addresses of their own in 127.0.0.0/8 (127.0.0.21 and
//! up), so that nginx sees many client addresses, as it would in front of
//! real users.

use std::collections::HashSet;
use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread;
use std::time::Instant;

use crate::admin::http;
use crate::common::{BIN, PATIENCE, SERVER_LIFETIME, poll_until, run_command, scratch_file};
use crate::metrics::{scrape, value};

/// The script under test.
const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/multinode.sh");

/// Where the script puts its nodes.
const NODE_IPS: [Ipv4Addr; 3] = [
    Ipv4Addr::new(127, 0, 0, 11),
    Ipv4Addr::new(127, 0, 0, 12),
    Ipv4Addr::new(127, 0, 0, 13),
];

/// The `n`th client address (0-based): 127.0.0.21 and up.
fn client_ip(n: u8) -> Ipv4Addr {
    Ipv4Addr::new(127, 0, 0, 21 + n)
}

/// One node, as the script started it.
struct Node {
    /// What the script's pid file names: the process to signal.
    pid: u32,
    /// Its admin endpoint (`/metrics`, `/readyz`).
    admin: SocketAddr,
    /// Its own TCP address (behind nginx).
    tcp: SocketAddr,
    /// Its control socket, for `wasm-echo reload`.
    control: PathBuf,
    /// Its log (stderr).
    log: PathBuf,
}

impl Node {
    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// A counter of this node's `main` listener, 0 before its first count.
    fn count(&self, metric: &str) -> f64 {
        value(&scrape(self.admin), metric, &[("listener", "main")]).unwrap_or(0.0)
    }

    /// Whether the node's process runs. It is not this process's child
    /// (the script started it and is gone), so once it exits it may stay a
    /// zombie nobody reaps: that counts as gone.
    fn running(&self) -> bool {
        std::fs::read_to_string(format!("/proc/{}/stat", self.pid)).is_ok_and(|stat| {
            // The state follows the command name, which is in parentheses.
            stat.rsplit_once(") ")
                .is_some_and(|(_, rest)| !rest.starts_with('Z'))
        })
    }
}

/// Three nodes and nginx, started by `deploy/multinode.sh start` in a
/// scratch folder; stopped by `stop` when dropped.
struct Cluster {
    dir: PathBuf,
    /// nginx, UDP and TCP.
    balancer: SocketAddr,
    nodes: Vec<Node>,
}

impl Cluster {
    /// Starts the setup, every node serving `plugin` with `drain_delay`
    /// and `grace`, and with the plugins' debug lines in the nodes' logs.
    fn start(plugin: &str, drain_delay: &str, grace: &str) -> Self {
        let dir = scratch_file("placeholder", b"").with_file_name("multinode");
        let balancer = crate::common::free_port();
        let node_port = port_free_on_every_node(true);
        let admin_port = port_free_on_every_node(false);
        let output = script("start", &dir, |command| {
            command
                .env("WASM_ECHO", BIN)
                .env("PLUGIN", plugin)
                .env("PORT", balancer.port().to_string())
                .env("NODE_PORT", node_port.to_string())
                .env("ADMIN_PORT", admin_port.to_string())
                .env("DRAIN_DELAY", drain_delay)
                .env("GRACE", grace)
                .env("LIFETIME", SERVER_LIFETIME.as_secs().to_string())
                .env("WASM_ECHO_LOG", "info,plugin=debug");
        });
        assert!(
            output.status.success(),
            "deploy/multinode.sh start failed:\n{}",
            String::from_utf8_lossy(&output.stderr)
        );
        let nodes = (1..=3)
            .zip(NODE_IPS)
            .map(|(n, ip)| Node {
                pid: std::fs::read_to_string(dir.join(format!("node{n}.pid")))
                    .expect("a pid file")
                    .trim()
                    .parse()
                    .expect("a pid"),
                admin: SocketAddr::new(IpAddr::V4(ip), admin_port),
                tcp: SocketAddr::new(IpAddr::V4(ip), node_port),
                control: dir.join(format!("node{n}.sock")),
                log: dir.join(format!("node{n}.log")),
            })
            .collect();
        Self {
            dir,
            balancer,
            nodes,
        }
    }

    /// `deploy/multinode.sh stop`: drains every node and stops nginx.
    fn stop(&self) -> Output {
        script("stop", &self.dir, |_| {})
    }

    /// Every node's count of `metric`, in node order.
    fn counts(&self, metric: &str) -> Vec<f64> {
        self.nodes.iter().map(|node| node.count(metric)).collect()
    }
}

impl Drop for Cluster {
    /// Stops everything even when a test failed; the script bounds its own
    /// wait, and nothing here may panic (a panic while unwinding aborts).
    fn drop(&mut self) {
        let _ = Command::new(SCRIPT)
            .arg("stop")
            .arg(&self.dir)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status();
    }
}

/// Runs `deploy/multinode.sh COMMAND DIR`, bounded in time like every
/// command a test runs.
fn script(command: &str, dir: &Path, setup: impl FnOnce(&mut Command)) -> Output {
    let mut script = Command::new(SCRIPT);
    script.arg(command).arg(dir);
    setup(&mut script);
    run_command(script)
}

/// A port free for TCP (and UDP, with `udp`) on all three node addresses a
/// moment ago.
fn port_free_on_every_node(udp: bool) -> u16 {
    for _ in 0..100 {
        let first = std::net::TcpListener::bind((NODE_IPS[0], 0)).unwrap_or_else(|error| {
            panic!("cannot bind {}: {error}", NODE_IPS[0]);
        });
        let port = first.local_addr().expect("addr").port();
        let free = NODE_IPS.iter().all(|ip| {
            (*ip == NODE_IPS[0] || std::net::TcpListener::bind((*ip, port)).is_ok())
                && (!udp || UdpSocket::bind((*ip, port)).is_ok())
        });
        if free {
            return port;
        }
    }
    panic!("no port free on 127.0.0.11-13 in 100 tries");
}

/// A TCP connection to `to` from address `from` (any port).
fn connect_from(from: Ipv4Addr, to: SocketAddr) -> TcpStream {
    let socket =
        socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).expect("a socket");
    socket
        .bind(&SocketAddr::new(IpAddr::V4(from), 0).into())
        .expect("bind the client address");
    socket.connect(&to.into()).expect("connect");
    let stream: TcpStream = socket.into();
    stream.set_read_timeout(Some(PATIENCE)).expect("timeout");
    stream.set_nodelay(true).expect("nodelay");
    stream
}

/// A UDP socket on address `from` (any port), connected to `to`.
fn udp_from(from: Ipv4Addr, to: SocketAddr) -> UdpSocket {
    let socket = UdpSocket::bind((from, 0)).expect("bind the client address");
    socket.connect(to).expect("connect");
    socket.set_read_timeout(Some(PATIENCE)).expect("timeout");
    socket
}

/// Sends `message` and reads one reply of at most 64 bytes; `None` if the
/// connection ended or failed first (a lost reply).
fn ask(stream: &mut TcpStream, message: &[u8]) -> Option<Vec<u8>> {
    stream.write_all(message).ok()?;
    let mut reply = [0u8; 64];
    match stream.read(&mut reply) {
        Ok(0) | Err(_) => None,
        Ok(len) => Some(reply[..len].to_vec()),
    }
}

/// Sends one datagram and waits for its reply; `None` if none came.
fn ask_udp(socket: &UdpSocket, message: &[u8]) -> Option<Vec<u8>> {
    socket.send(message).ok()?;
    let mut reply = [0u8; 64];
    let len = socket.recv(&mut reply).ok()?;
    Some(reply[..len].to_vec())
}

/// Fails with how to get it when this machine has no nginx with its
/// stream module.
fn require_nginx() {
    if !Path::new("/usr/sbin/nginx").exists()
        || !Path::new("/usr/lib/nginx/modules/ngx_stream_module.so").exists()
    {
        panic!(
            "no nginx with its stream module: run scripts/install-debian.sh (Debian's nginx and \
             libnginx-mod-stream), or set WASM_ECHO_SKIP_TESTS=nginx to report this test as ignored"
        );
    }
}

/// Forty clients, each from an address of its own, spread over all three
/// nodes over TCP and UDP; each node's plugin sees each client's own
/// address, not nginx's; a client address sticks to one node over UDP
/// whichever port it sends from; and `stop` stops everything it started.
#[test]
#[cfg_attr(skip_nginx, ignore = "WASM_ECHO_SKIP_TESTS names nginx")]
fn clients_spread_over_the_nodes_and_each_node_sees_the_real_client() {
    require_nginx();
    let cluster = Cluster::start("counter", "0s", "5s");
    let clients = 40;
    let mut expected_peers = Vec::new();
    for n in 0..clients {
        let mut stream = connect_from(client_ip(n), cluster.balancer);
        expected_peers.push(stream.local_addr().expect("addr"));
        // The counter counts each connection's messages.
        assert_eq!(ask(&mut stream, b"a").as_deref(), Some(&b"1"[..]));
        assert_eq!(ask(&mut stream, b"b").as_deref(), Some(&b"2"[..]));
        // Each datagram's peer is nginx's socket for this client: one
        // socket per client, so the count goes on.
        let socket = udp_from(client_ip(n), cluster.balancer);
        assert_eq!(ask_udp(&socket, b"a").as_deref(), Some(&b"1"[..]));
        assert_eq!(ask_udp(&socket, b"b").as_deref(), Some(&b"2"[..]));
    }
    let connections = cluster.counts("wasm_echo_tcp_connections_total");
    let datagrams = cluster.counts("wasm_echo_datagrams_total");
    assert!(
        connections.iter().all(|&count| count > 0.0),
        "TCP connections per node: {connections:?}"
    );
    assert!(
        datagrams.iter().all(|&count| count > 0.0),
        "datagrams per node: {datagrams:?}"
    );
    assert_eq!(connections.iter().sum::<f64>(), f64::from(clients));
    assert_eq!(datagrams.iter().sum::<f64>(), f64::from(clients) * 2.0);
    for node in &cluster.nodes {
        assert_eq!(node.count("wasm_echo_proxy_refused_total"), 0.0);
    }
    // The plugin names each client (its debug line), on some node.
    let logs = poll_until("every client named in a node's log", || {
        let logs: String = cluster.nodes.iter().map(Node::log).collect();
        expected_peers
            .iter()
            .all(|peer| logs.contains(&format!("counting for {peer}")))
            .then_some(logs)
    });
    assert!(
        !logs.contains("counting for 127.0.0.1:"),
        "a plugin saw nginx's address:\n{logs}"
    );
    // UDP affinity: datagrams from one client address, from any port, go
    // to one node.
    for n in 0..5 {
        let before = cluster.counts("wasm_echo_datagrams_total");
        for _ in 0..3 {
            let socket = udp_from(client_ip(n), cluster.balancer);
            assert_eq!(ask_udp(&socket, b"c").as_deref(), Some(&b"1"[..]));
        }
        let after = cluster.counts("wasm_echo_datagrams_total");
        let grew: Vec<f64> = after.iter().zip(&before).map(|(a, b)| a - b).collect();
        let mut sorted = grew.clone();
        sorted.sort_by(f64::total_cmp);
        assert_eq!(sorted, [0.0, 0.0, 3.0], "{} went to {grew:?}", client_ip(n));
    }
    // `stop` leaves nothing running.
    let stopped = cluster.stop();
    assert!(stopped.status.success(), "{stopped:?}");
    for node in &cluster.nodes {
        assert!(!node.running(), "node {} still runs", node.pid);
        assert!(node.log().contains("every listener has stopped"));
    }
    assert!(
        TcpStream::connect(cluster.balancer).is_err(),
        "nginx still listens"
    );
}

/// SIGTERM to one node: its `/readyz` turns 503 while it serves on; then
/// it stops accepting, and the connections that were open before the drain
/// finish in its grace period with every reply; then it is gone, and
/// nginx sends new connections to the other two.
///
/// nginx (open source) never reads `/readyz`: it learns that a node is
/// gone when a connect is refused, and then tries the next node
/// (`proxy_next_upstream`). So connections made after the drain delay are
/// never lost either.
#[test]
#[cfg_attr(skip_nginx, ignore = "WASM_ECHO_SKIP_TESTS names nginx")]
fn sigterm_drains_one_node_without_losing_a_reply() {
    require_nginx();
    let cluster = Cluster::start("counter", "2s", "60s");
    let draining = &cluster.nodes[0];
    // Round-robin: some of these are on the node that will drain.
    let mut open: Vec<(TcpStream, u64)> = (0..12)
        .map(|n| {
            let mut stream = connect_from(client_ip(n), cluster.balancer);
            assert_eq!(ask(&mut stream, b"x").as_deref(), Some(&b"1"[..]));
            (stream, 1)
        })
        .collect();
    let on_draining = value(
        &scrape(draining.admin),
        "wasm_echo_open_connections",
        &[("listener", "main")],
    );
    assert!(
        on_draining.is_some_and(|open| open >= 1.0),
        "open connections on node 1: {on_draining:?}"
    );
    // Each phase's requests and right answers, for the message if any is
    // lost.
    let mut phases: Vec<(&str, u64, u64)> = Vec::new();
    // One more message on each open connection; the counter answers with
    // that connection's count.
    let exchange_all = |open: &mut Vec<(TcpStream, u64)>| {
        let mut answered = 0;
        for (stream, count) in open.iter_mut() {
            *count += 1;
            if ask(stream, b"x") == Some(count.to_string().into_bytes()) {
                answered += 1;
            }
        }
        (open.len() as u64, answered)
    };
    crate::common::send_signal(draining.pid, "TERM");
    poll_until("node 1's /readyz to say draining", || {
        (http(draining.admin, "GET", "/readyz") == (503, "draining\n".to_owned())).then_some(())
    });
    for other in &cluster.nodes[1..] {
        assert_eq!(http(other.admin, "GET", "/readyz").0, 200);
    }
    // In the drain delay: served as before.
    let (sent, answered) = exchange_all(&mut open);
    phases.push(("open, in the drain delay", sent, answered));
    poll_until("node 1 to stop accepting", || {
        TcpStream::connect(draining.tcp).is_err().then_some(())
    });
    // In the grace period: the open connections go on...
    let (sent, answered) = exchange_all(&mut open);
    phases.push(("open, in the grace period", sent, answered));
    // ...and new connections go to the other nodes.
    let new = (12..24).filter(|&n| {
        let mut stream = connect_from(client_ip(n), cluster.balancer);
        ask(&mut stream, b"x").as_deref() == Some(&b"1"[..])
    });
    phases.push(("new, in the grace period", 12, new.count() as u64));
    let (sent, answered) = exchange_all(&mut open);
    phases.push(("open, later in the grace period", sent, answered));
    drop(open);
    poll_until("node 1 to exit once its connections closed", || {
        (!draining.running()).then_some(())
    });
    assert!(
        phases.iter().all(|(_, sent, answered)| sent == answered),
        "replies lost (phase, sent, answered): {phases:?}\nnode 1's log:\n{}",
        draining.log()
    );
    let log = draining.log();
    let order = [
        "shutting down: draining",
        "drain delay over: no new connections",
        "every listener has stopped",
    ]
    .map(|line| {
        log.find(line)
            .unwrap_or_else(|| panic!("node 1's log lacks {line:?}:\n{log}"))
    });
    assert!(order.is_sorted(), "out of order:\n{log}");
    assert!(!log.contains("grace period over"), "{log}");
    // Gone, and nginx goes on with the other two.
    for n in 24..30 {
        let mut stream = connect_from(client_ip(n), cluster.balancer);
        assert_eq!(ask(&mut stream, b"x").as_deref(), Some(&b"1"[..]));
    }
}

/// How many requests each load thread sends at most, whether or not it is
/// told to stop.
const MAX_ROUNDS: usize = 2_000;

/// What the load threads share: when to stop, and how many requests they
/// sent and got a right answer to.
#[derive(Clone)]
struct Tally {
    stop: Arc<AtomicBool>,
    sent: Arc<AtomicU64>,
    answered: Arc<AtomicU64>,
    /// Stop by then in any case.
    deadline: Instant,
}

impl Tally {
    fn going(&self) -> bool {
        !self.stop.load(Ordering::Relaxed) && Instant::now() < self.deadline
    }

    fn record(&self, answered: bool) {
        self.sent.fetch_add(1, Ordering::Relaxed);
        if answered {
            self.answered.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Swapping `counter` for `echo` one node at a time (`wasm-echo reload
/// --plugin` through each node's control socket) while TCP and UDP
/// clients keep asking: every request is answered, each TCP connection by
/// one version only, and afterwards every node answers with `echo`.
#[test]
#[cfg_attr(skip_nginx, ignore = "WASM_ECHO_SKIP_TESTS names nginx")]
fn a_plugin_swap_node_by_node_under_load_loses_no_reply() {
    require_nginx();
    let cluster = Cluster::start("counter", "0s", "5s");
    let tally = Tally {
        stop: Arc::new(AtomicBool::new(false)),
        sent: Arc::new(AtomicU64::new(0)),
        answered: Arc::new(AtomicU64::new(0)),
        deadline: Instant::now() + PATIENCE,
    };
    let balancer = cluster.balancer;
    let tcp_load = |n: u8| {
        let tally = tally.clone();
        thread::spawn(move || {
            let mut mixed = Vec::new();
            for _ in 0..MAX_ROUNDS {
                if !tally.going() {
                    break;
                }
                let mut stream = connect_from(client_ip(n), balancer);
                let mut versions = HashSet::new();
                for count in 1..=3u32 {
                    let version = match ask(&mut stream, b"m").as_deref() {
                        Some(b"m") => Some("echo"),
                        Some(reply) if reply == count.to_string().as_bytes() => Some("counter"),
                        _ => None,
                    };
                    tally.record(version.is_some());
                    versions.extend(version);
                }
                if versions.len() > 1 {
                    mixed.push(versions);
                }
            }
            mixed
        })
    };
    let udp_load = |n: u8| {
        let tally = tally.clone();
        thread::spawn(move || {
            let socket = udp_from(client_ip(n), balancer);
            for _ in 0..MAX_ROUNDS {
                if !tally.going() {
                    break;
                }
                // `echo` echoes, `counter` counts (from 1 again on the new
                // instance).
                let reply = ask_udp(&socket, b"m");
                tally.record(reply.is_some_and(|reply| {
                    reply == b"m"
                        || std::str::from_utf8(&reply).is_ok_and(|r| r.parse::<u64>().is_ok())
                }));
            }
            Vec::new()
        })
    };
    let mut load: Vec<_> = (0..6).map(tcp_load).collect();
    load.extend((6..9).map(udp_load));
    // Some traffic on the old version first, then between each swap.
    let progressed = |by: u64| {
        let from = tally.answered.load(Ordering::Relaxed);
        poll_until("the load to go on", || {
            (tally.answered.load(Ordering::Relaxed) >= from + by).then_some(())
        });
    };
    progressed(50);
    for node in &cluster.nodes {
        let control = node.control.to_str().expect("utf-8 path");
        let output = crate::common::run(&["reload", "--control", control, "--plugin", "echo"]);
        let said = String::from_utf8_lossy(&output.stdout);
        assert!(
            output.status.success() && said.contains("counter@") && said.contains("-> echo@"),
            "reload on {}: {said}{}",
            node.tcp,
            String::from_utf8_lossy(&output.stderr)
        );
        progressed(50);
    }
    tally.stop.store(true, Ordering::Relaxed);
    let mixed: Vec<_> = load
        .into_iter()
        .flat_map(|thread| thread.join().expect("no panic"))
        .collect();
    let (sent, answered) = (
        tally.sent.load(Ordering::Relaxed),
        tally.answered.load(Ordering::Relaxed),
    );
    assert_eq!(answered, sent, "replies lost or wrong");
    assert!(
        mixed.is_empty(),
        "connections that saw two versions: {mixed:?}"
    );
    // Every node now echoes (round-robin: three connections, three nodes).
    for n in 0..3 {
        let mut stream = connect_from(client_ip(n), cluster.balancer);
        assert_eq!(
            ask(&mut stream, b"swapped").as_deref(),
            Some(&b"swapped"[..])
        );
    }
    for node in &cluster.nodes {
        assert_eq!(
            value(
                &scrape(node.admin),
                "wasm_echo_reloads_total",
                &[("listener", "main"), ("result", "ok")]
            ),
            Some(1.0)
        );
    }
}
