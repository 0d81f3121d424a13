//! The sandbox's bounds that hold whatever the guest does: calls that block
//! instead of running, and handles piled up.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use crate::common::{
    PATIENCE, Server, plugins, send_signal, tcp_ask, tcp_client, tcp_read_to_end, udp_ask,
    udp_client, udp_expect_silence,
};

/// A tenant whose plugin blocks in WASI for an hour on a message that
/// starts with `sleep` (or, with `sleep-on-close`, in `on-close`).
fn sleepy(name: &str, behaviour: &str, extra: &str) -> String {
    format!(
        "[listeners.{name}]\nplugin = \"{}\"\nudp = \"127.0.0.1:0\"\ntcp = \"127.0.0.1:0\"\n\
         plugin-config = {{ behaviour = \"{behaviour}\" }}\n{extra}\n",
        plugins::HOSTILE
    )
}

/// Regression: a datagram whose call blocked in `pollable.block` stalled
/// its tenant's whole UDP listener for as long as the guest liked; the
/// epoch deadline only stops Wasm code that runs.
#[test]
fn a_datagram_blocked_in_wasi_fails_at_its_deadline_and_the_listener_goes_on() {
    let server = Server::with_config(&sleepy("sleepy", "sleep", "call-timeout = \"100ms\""), 2);
    let socket = udp_client(server.udp_of("sleepy"));
    socket.send(b"sleep").expect("send");
    // Served once the blocked call has been abandoned, not an hour later.
    assert_eq!(udp_ask(&socket, b"after"), b"after");
    let log = server.wait_for_log("ran past its 100ms deadline");
    assert!(log.contains("datagram dropped"), "{log}");
}

/// Regression: a TCP connection whose call blocked in WASI was held open
/// (with its slot under `max-connections`) long past the deadline.
#[test]
fn connections_blocked_in_wasi_are_closed_at_the_deadline_and_free_their_slots() {
    let toml = sleepy(
        "sleepy",
        "sleep",
        "call-timeout = \"100ms\"\nmax-connections = 2\n",
    );
    let server = Server::with_config(&toml, 2);
    let addr = server.tcp_of("sleepy");
    let mut blocked: Vec<TcpStream> = (0..2).map(|_| tcp_client(addr)).collect();
    for stream in &mut blocked {
        stream.write_all(b"sleep").expect("send");
    }
    for stream in &mut blocked {
        assert!(tcp_read_to_end(stream).is_empty(), "closed without a reply");
    }
    // Both slots are free again: a third peer is served.
    let mut third = tcp_client(addr);
    assert_eq!(tcp_ask(&mut third, b"hello", 5), b"hello");
    let log = server.stderr();
    assert!(log.contains("ran past its 100ms deadline"), "{log}");
}

/// Regression: `on-close` blocked in WASI kept the connection's slot.
#[test]
fn on_close_blocked_in_wasi_ends_at_the_deadline() {
    let toml = sleepy(
        "closer",
        "sleep-on-close",
        "call-timeout = \"100ms\"\nmax-connections = 1\n",
    );
    let server = Server::with_config(&toml, 2);
    let addr = server.tcp_of("closer");
    let mut first = tcp_client(addr);
    assert_eq!(tcp_ask(&mut first, b"one", 3), b"one");
    drop(first);
    // The only slot frees up once on-close has been stopped. Until then a
    // new connection is refused at once, so retry until one is served.
    let deadline = std::time::Instant::now() + PATIENCE;
    loop {
        let mut next = tcp_client(addr);
        let mut buf = [0u8; 3];
        if next.write_all(b"two").is_ok() && next.read_exact(&mut buf).is_ok() {
            assert_eq!(&buf, b"two");
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the slot was never freed"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    server.wait_for_log("on-close failed: plugin ran past its 100ms deadline");
}

/// Regression: with `--grace 1s`, SIGTERM logged "grace period over" but a
/// connection blocked in a long call (and a UDP listener in one) kept the
/// process running for as long as the guest slept.
#[test]
fn shutdown_does_not_wait_for_calls_blocked_in_wasi() {
    let toml = format!(
        "grace = \"1s\"\n{}",
        sleepy("sleepy", "sleep", "call-timeout = \"60s\"")
    );
    let mut server = Server::with_config(&toml, 2);
    let mut stream = tcp_client(server.tcp_of("sleepy"));
    stream.write_all(b"sleep").expect("send");
    let socket = udp_client(server.udp_of("sleepy"));
    socket.send(b"sleep").expect("send");
    // Both calls have started (the UDP one is the listener's only call).
    server.wait_for_log("serving");
    std::thread::sleep(Duration::from_millis(200));
    send_signal(server.pid(), "TERM");
    server.wait_for_log("grace period over");
    assert!(server.wait_exit().success());
    assert!(tcp_read_to_end(&mut stream).is_empty());
}

/// Regression: leaked pollables and stream handles were capped only by
/// wasmtime's 100,000 handles a store (+14 MiB of host memory a
/// connection); the host allows an instance 1,024.
#[test]
fn an_instance_cannot_pile_up_handles() {
    let toml = format!(
        "[listeners.leaky]\nplugin = \"{}\"\nudp = \"127.0.0.1:0\"\ntcp = \"127.0.0.1:0\"\n\
         call-timeout = \"5s\"\nplugin-config = {{ behaviour = \"leak-handles\" }}\n",
        plugins::HOSTILE
    );
    let server = Server::with_config(&toml, 2);
    let mut stream = tcp_client(server.tcp_of("leaky"));
    stream.write_all(b"leak").expect("send");
    assert!(tcp_read_to_end(&mut stream).is_empty(), "the call failed");
    let socket = udp_client(server.udp_of("leaky"));
    socket.send(b"leak").expect("send");
    udp_expect_silence(&socket, Duration::from_millis(500));
    let log = server.wait_for_log("datagram dropped");
    assert!(
        log.lines()
            .filter(|line| line.contains("resource table has no free keys"))
            .count()
            >= 2,
        "both calls failed on the handle limit:\n{log}"
    );
}
