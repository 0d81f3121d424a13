//! Instance renewal (`recycle-at`): an instance whose memory keeps growing,
//! as the JavaScript and Python runtimes' heaps do a little every call, is
//! replaced by a fresh one of the same version before it meets its memory
//! cap, with its state when the plugin offers `state`, so that no message
//! fails for it.

use std::io::Write;

use crate::common::{Server, plugins, tcp_ask, tcp_client, udp_ask, udp_client};

/// Serves `plugin` on UDP and TCP with a 4 MiB memory cap, renewed past
/// 2 MiB, leaking 64 KiB a message (hostile's `leak`, counter-next's
/// `leak-bytes`): the cap is met after about 40 messages.
fn leaking(plugin: &str, behaviour: &str) -> Server {
    Server::with_config(
        &format!(
            "[listeners.main]\nplugin = \"{plugin}\"\nudp = \"127.0.0.1:0\"\ntcp = \"127.0.0.1:0\"\n\
             memory-limit = \"4MiB\"\nrecycle-at = \"2MiB\"\n\
             plugin-config = {{ behaviour = \"{behaviour}\", leak-bytes = \"65536\" }}\n"
        ),
        2,
    )
}

// Without renewal the 40-somethingth datagram met the memory cap and got
// no reply.
#[test]
fn a_leaking_udp_instance_is_renewed_and_no_datagram_fails() {
    let server = leaking(plugins::HOSTILE, "leak");
    let socket = udp_client(server.udp());
    for i in 0..200 {
        let message = format!("datagram {i}");
        assert_eq!(
            udp_ask(&socket, message.as_bytes()),
            message.as_bytes(),
            "datagram {i} is answered"
        );
    }
    server.wait_for_log("past recycle-at (2 MiB): renewed afresh");
    let log = server.stderr();
    assert!(
        !log.contains("tried to grow its memory"),
        "no call met the memory cap:\n{log}"
    );
}

#[test]
fn a_stateful_udp_instance_is_renewed_with_its_counts() {
    let server = leaking(plugins::COUNTER_NEXT, "");
    let socket = udp_client(server.udp());
    for count in 1..=200 {
        assert_eq!(
            udp_ask(&socket, b"x"),
            format!("count {count}").as_bytes(),
            "the count goes on across renewals"
        );
    }
    server.wait_for_log("renewed, with its state");
}

#[test]
fn a_tcp_connection_is_renewed_on_its_socket_with_its_state() {
    let server = leaking(plugins::COUNTER_NEXT, "");
    let mut stream = tcp_client(server.tcp());
    for count in 1..=200 {
        let expected = format!("count {count}");
        assert_eq!(
            tcp_ask(&mut stream, b"x", expected.len()),
            expected.as_bytes(),
            "the connection's count goes on across renewals"
        );
    }
    stream.flush().expect("still open");
    server.wait_for_log("renewed, with its state");
}
