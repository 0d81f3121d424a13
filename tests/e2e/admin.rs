//! The admin endpoint on the metrics address: `/healthz`, `/readyz` (and
//! its drain on SIGTERM), `/metrics` and what it refuses.

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};

use crate::common::{
    PATIENCE, Server, poll_until, send_signal, tcp_ask, tcp_client, udp_ask, udp_client,
};

/// `METHOD PATH` over plain HTTP/1.1: the status code and the body.
pub(crate) fn http(addr: SocketAddr, method: &str, path: &str) -> (u16, String) {
    let mut stream = TcpStream::connect(addr).expect("admin endpoint");
    stream.set_read_timeout(Some(PATIENCE)).expect("timeout");
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .expect("request");
    let mut response = String::new();
    stream.read_to_string(&mut response).expect("response");
    let (head, body) = response.split_once("\r\n\r\n").expect("an HTTP response");
    let status = head
        .strip_prefix("HTTP/1.1 ")
        .and_then(|rest| rest.get(..3))
        .and_then(|code| code.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP/1.1 status line: {head}"));
    (status, body.to_owned())
}

/// A serving server is alive and ready; unknown paths and methods are
/// refused with their status, and `/metrics` is still the Prometheus page.
#[test]
fn a_serving_server_is_healthy_and_ready() {
    let server = Server::start("echo", &["--metrics", "127.0.0.1:0"]);
    let admin = server.metrics.expect("admin address");
    assert_eq!(http(admin, "GET", "/healthz"), (200, "ok\n".to_owned()));
    assert_eq!(http(admin, "GET", "/readyz"), (200, "ready\n".to_owned()));
    let (status, page) = http(admin, "GET", "/metrics");
    assert_eq!(status, 200);
    assert!(page.contains("wasm_echo_open_connections"), "{page}");
    assert_eq!(http(admin, "GET", "/nothing-here").0, 404);
    assert_eq!(http(admin, "POST", "/readyz").0, 405);
}

/// Whether a new TCP connection to `addr` is refused (its listener has
/// stopped accepting).
fn refused(addr: SocketAddr) -> bool {
    TcpStream::connect(addr).is_err_and(|error| error.kind() == ErrorKind::ConnectionRefused)
}

/// SIGTERM with a drain delay: `/readyz` turns 503 first while the
/// listeners still serve old connections and new ones alike; a second
/// SIGTERM cuts the drain (and the grace period) short and the server
/// exits.
#[test]
fn sigterm_turns_readyz_503_while_the_listeners_still_serve() {
    let mut server = Server::start(
        "echo",
        &[
            "--metrics",
            "127.0.0.1:0",
            "--drain-delay",
            "10m",
            "--grace",
            "10m",
        ],
    );
    let admin = server.metrics.expect("admin address");
    let mut before = tcp_client(server.tcp());
    assert_eq!(tcp_ask(&mut before, b"before", 6), b"before");
    assert_eq!(http(admin, "GET", "/readyz").0, 200);
    send_signal(server.pid(), "TERM");
    poll_until("/readyz to say draining", || {
        (http(admin, "GET", "/readyz") == (503, "draining\n".to_owned())).then_some(())
    });
    // Still serving: the open connection, a new one, and UDP.
    assert_eq!(tcp_ask(&mut before, b"still", 5), b"still");
    let mut during = tcp_client(server.tcp());
    assert_eq!(tcp_ask(&mut during, b"during", 6), b"during");
    assert_eq!(udp_ask(&udp_client(server.udp()), b"udp too"), b"udp too");
    assert_eq!(http(admin, "GET", "/healthz").0, 200);
    assert!(!server.stderr().contains("drain delay over"));
    send_signal(server.pid(), "TERM");
    assert!(server.wait_exit().success());
    assert!(refused(server.tcp()));
}

/// Once the drain delay is over the listener stops accepting, while open
/// connections go on in their grace period; the log says so in that order.
#[test]
fn after_the_drain_delay_the_listener_stops_and_open_connections_finish() {
    let mut server = Server::start(
        "echo",
        &[
            "--metrics",
            "127.0.0.1:0",
            "--drain-delay",
            "1s",
            "--grace",
            "10m",
        ],
    );
    let admin = server.metrics.expect("admin address");
    let mut before = tcp_client(server.tcp());
    assert_eq!(tcp_ask(&mut before, b"before", 6), b"before");
    send_signal(server.pid(), "TERM");
    poll_until("the listener to stop accepting", || {
        refused(server.tcp()).then_some(())
    });
    assert_eq!(http(admin, "GET", "/readyz").0, 503);
    assert_eq!(tcp_ask(&mut before, b"grace", 5), b"grace");
    let log = server.wait_for_log("connection(s) have 10m to finish");
    let order = [
        "shutting down: draining",
        "drain delay over: no new connections",
        "tcp listener stopped accepting",
    ]
    .map(|line| {
        log.find(line)
            .unwrap_or_else(|| panic!("no {line:?} in:\n{log}"))
    });
    assert!(order.is_sorted(), "out of order: {order:?}\n{log}");
    send_signal(server.pid(), "TERM");
    assert!(server.wait_exit().success());
}
