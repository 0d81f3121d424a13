use std::time::{Duration, Instant};

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

/// A plugin that never returns is stopped at its deadline: not before it
/// (the call really was given its time) and well within a generous bound
/// after it (it was not left running).
#[test]
fn an_endless_loop_is_stopped_by_the_deadline() {
    const DEADLINE: Duration = Duration::from_millis(50);
    // Generous: the kill is due at the deadline, the epoch ticks every ms.
    const AT_MOST: Duration = Duration::from_millis(50 + 1_000);
    let server = Server::start(plugins::TRAP, &["--call-timeout", "50ms"]);
    let socket = udp_client(server.udp());
    let sent = Instant::now();
    socket.send(b"loop").expect("send");
    // The listener handles its datagrams in order: this one is answered
    // only once the loop has been stopped.
    assert_eq!(udp_ask(&socket, b"after"), b"after");
    let answered_after = sent.elapsed();
    let log = server.wait_for_log("deadline");
    assert!(log.contains("ran past its 50ms deadline"), "{log}");
    assert!(
        (DEADLINE..AT_MOST).contains(&answered_after),
        "udp: the next datagram was answered {answered_after:?} after the loop began \
         (deadline {DEADLINE:?})"
    );

    let mut stream = tcp_client(server.tcp());
    let sent = Instant::now();
    std::io::Write::write_all(&mut stream, b"loop").expect("send");
    assert!(tcp_read_to_end(&mut stream).is_empty());
    let closed_after = sent.elapsed();
    assert!(
        (DEADLINE..AT_MOST).contains(&closed_after),
        "tcp: closed {closed_after:?} after the loop began (deadline {DEADLINE:?})"
    );
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

/// The README's "re-instantiated with exponential backoff ... not in a hot
/// loop": a plugin that fails on every datagram is retried, with waits
/// that grow. Over 1.5 s of a failing datagram every 5 ms (some 300), the
/// plugin is run (and traps) a few times at once, then 10, 20, 40 ... ms
/// apart: some 10 attempts in the first half, at most a couple in the
/// second. A hot loop would run all 300; a constant wait would spread its
/// attempts evenly over both halves.
#[test]
fn a_plugin_failing_on_every_datagram_is_retried_with_growing_waits() {
    use crate::metrics::{scrape, value};
    const PACE: Duration = Duration::from_millis(5);
    const HALF: Duration = Duration::from_millis(750);
    let server = Server::start(plugins::TRAP, &["--metrics", "127.0.0.1:0"]);
    let metrics = server.metrics.expect("serving metrics");
    let attempts = || {
        value(
            &scrape(metrics),
            "wasm_echo_plugin_failures_total",
            &[("listener", "main"), ("kind", "trap")],
        )
        .unwrap_or(0.0) as usize
    };
    let socket = udp_client(server.udp());
    let mut sent = 0;
    let mut send_for = |window: Duration| {
        let started = Instant::now();
        while started.elapsed() < window {
            socket.send(b"panic").expect("send");
            sent += 1;
            // Pacing the traffic, not waiting for anything.
            std::thread::sleep(PACE);
        }
    };
    send_for(HALF);
    let first = attempts();
    send_for(HALF);
    let second = attempts() - first;
    assert!(
        (7..=12).contains(&first),
        "{first} attempts in the first {HALF:?} of failing datagrams (expected some 10: \
         3 free retries, then waits of 10 ms doubling)"
    );
    assert!(
        second <= 2,
        "{second} attempts in the second {HALF:?} (after {first} in the first): \
         the waits did not grow"
    );
    // Every datagram is accounted for: run and failed, or held back.
    crate::metrics::expect(
        metrics,
        &[(
            "wasm_echo_drops_total",
            &[("listener", "main"), ("reason", "failed")],
            f64::from(sent),
        )],
    );
}
