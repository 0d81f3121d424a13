use std::time::Duration;

use crate::common::{
    Server, plugins, tcp_ask, tcp_client, tcp_read_to_end, udp_ask, udp_client, udp_expect_silence,
};

#[test]
fn a_panic_fails_only_that_datagram() {
    let server = Server::start(plugins::TRAP, &[]);
    let socket = udp_client(server.udp());
    assert_eq!(udp_ask(&socket, b"before"), b"before");
    socket.send(b"panic").expect("send");
    let log = server.wait_for_log("datagram dropped");
    assert!(log.contains("plugin trapped"), "{log}");
    assert!(
        log.contains("plugin=\"trap\"") || log.contains("plugin=trap"),
        "the log names the plugin: {log}"
    );
    assert!(
        log.contains(&socket.local_addr().expect("addr").to_string()),
        "the log names the peer: {log}"
    );
    assert!(
        log.contains("asked to panic"),
        "the guest's panic message reaches the log: {log}"
    );
    udp_expect_silence(&socket, Duration::from_millis(200));
    assert_eq!(
        udp_ask(&socket, b"after"),
        b"after",
        "a fresh instance serves the next datagram"
    );
}

#[test]
fn a_panic_closes_only_that_connection() {
    let server = Server::start(plugins::TRAP, &[]);
    let mut bystander = tcp_client(server.tcp());
    assert_eq!(tcp_ask(&mut bystander, b"hi", 2), b"hi");
    let mut victim = tcp_client(server.tcp());
    assert_eq!(tcp_ask(&mut victim, b"hi", 2), b"hi");
    std::io::Write::write_all(&mut victim, b"panic").expect("send");
    assert!(
        tcp_read_to_end(&mut victim).is_empty(),
        "the failing connection is closed without a reply"
    );
    let log = server.wait_for_log("connection closed: trap@");
    assert!(log.contains("plugin trapped"), "{log}");
    assert_eq!(tcp_ask(&mut bystander, b"still here", 10), b"still here");
    assert_eq!(tcp_ask(&mut tcp_client(server.tcp()), b"new", 3), b"new");
}

#[test]
fn an_endless_loop_is_stopped_by_the_deadline() {
    let server = Server::start(plugins::TRAP, &["--call-timeout", "50ms"]);
    let socket = udp_client(server.udp());
    socket.send(b"loop").expect("send");
    let log = server.wait_for_log("deadline");
    assert!(log.contains("ran past its 50ms deadline"), "{log}");
    assert_eq!(udp_ask(&socket, b"after"), b"after");
    let mut stream = tcp_client(server.tcp());
    std::io::Write::write_all(&mut stream, b"loop").expect("send");
    assert!(tcp_read_to_end(&mut stream).is_empty());
    assert_eq!(tcp_ask(&mut tcp_client(server.tcp()), b"ok", 2), b"ok");
}

#[test]
fn a_memory_bomb_is_stopped_by_the_memory_limit() {
    let server = Server::start(plugins::TRAP, &["--memory-limit", "8MiB"]);
    let socket = udp_client(server.udp());
    socket.send(b"bloat").expect("send");
    let log = server.wait_for_log("datagram dropped");
    assert!(log.contains("tried to grow its memory"), "{log}");
    assert!(log.contains("limit 8388608"), "{log}");
    assert_eq!(udp_ask(&socket, b"after"), b"after");
}

#[test]
fn a_plugin_can_close_its_connection_after_a_reply() {
    let server = Server::start(plugins::TRAP, &[]);
    let mut stream = tcp_client(server.tcp());
    std::io::Write::write_all(&mut stream, b"close").expect("send");
    assert_eq!(tcp_read_to_end(&mut stream), b"bye");
}
