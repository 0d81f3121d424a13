use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use wasm_echo::testing::{HOSTILE, Scenario, hostile_config};

use crate::common::{
    PATIENCE, Server, expect_closed_by_server, plugins, tcp_ask, tcp_client, udp_ask, udp_client,
};

/// One datagram; the reply, or `None` if none came within `wait`.
fn udp_probe(addr: SocketAddr, wait: Duration) -> Option<Vec<u8>> {
    let socket = udp_client(addr);
    socket.set_read_timeout(Some(wait)).expect("timeout");
    socket.send(b"probe").expect("send");
    let mut buf = vec![0u8; 70_000];
    socket.recv(&mut buf).ok().map(|len| buf[..len].to_vec())
}

/// One TCP message; what came back before the server closed or went quiet.
fn tcp_probe(addr: SocketAddr) -> Option<Vec<u8>> {
    let mut stream = tcp_client(addr);
    stream.write_all(b"probe").expect("send");
    let mut buf = vec![0u8; 70_000];
    match stream.read(&mut buf) {
        Ok(0) | Err(_) => None,
        Ok(len) => Some(buf[..len].to_vec()),
    }
}

/// Serves the good tenant over UDP and TCP until `stop`, checking every
/// answer; returns how many exchanges were made and the slowest one.
fn good_traffic(
    server_udp: SocketAddr,
    server_tcp: SocketAddr,
    stop: Arc<AtomicBool>,
) -> (usize, Duration) {
    let socket = udp_client(server_udp);
    let mut stream = tcp_client(server_tcp);
    let (mut count, mut slowest) = (0, Duration::ZERO);
    let started = Instant::now();
    while !stop.load(Ordering::Relaxed)
        && count < 5_000
        && started.elapsed() < Duration::from_secs(60)
    {
        let message = format!("good {count}");
        let sent = Instant::now();
        assert_eq!(udp_ask(&socket, message.as_bytes()), message.as_bytes());
        assert_eq!(
            tcp_ask(&mut stream, message.as_bytes(), message.len()),
            message.as_bytes()
        );
        slowest = slowest.max(sent.elapsed());
        count += 1;
    }
    (count, slowest)
}

#[test]
fn hostile_plugins_are_contained_while_a_good_tenant_is_served() {
    let server = Server::with_config(&hostile_config(""), 2 * (1 + HOSTILE.len()));
    let stop = Arc::new(AtomicBool::new(false));
    let good = {
        let (udp, tcp, stop) = (server.udp_of("good"), server.tcp_of("good"), stop.clone());
        thread::spawn(move || good_traffic(udp, tcp, stop))
    };
    let probes: Vec<_> = HOSTILE
        .iter()
        .map(|Scenario { behaviour, .. }| {
            let (udp, tcp) = (server.udp_of(behaviour), server.tcp_of(behaviour));
            thread::spawn(move || {
                let rounds: Vec<_> = (0..3)
                    .map(|_| (udp_probe(udp, Duration::from_millis(1500)), tcp_probe(tcp)))
                    .collect();
                rounds
            })
        })
        .collect();
    for (
        Scenario {
            behaviour,
            reply: expected,
            ..
        },
        probe,
    ) in HOSTILE.iter().zip(probes)
    {
        for (udp, tcp) in probe.join().expect("probe thread") {
            let expected = expected.map(|text| text.as_bytes().to_vec());
            assert_eq!(udp, expected, "{behaviour}: udp");
            assert_eq!(tcp, expected, "{behaviour}: tcp");
        }
    }
    stop.store(true, Ordering::Relaxed);
    let (exchanges, slowest) = good.join().expect("the good tenant was served throughout");
    assert!(exchanges > 0);
    // A generous bound: the benchmark records the real figures.
    assert!(
        slowest < Duration::from_secs(2),
        "good tenant's slowest exchange took {slowest:?}"
    );

    let log = server.stderr();
    for Scenario {
        behaviour, logged, ..
    } in HOSTILE
    {
        let Some(needle) = logged else { continue };
        let tag = format!("listener=\"{behaviour}\"");
        assert!(
            log.lines()
                .any(|line| line.contains(&tag) && line.contains(needle)),
            "{behaviour}: no log line with {needle:?}"
        );
    }
    let flood = log.lines().filter(|line| line.contains("flood")).count();
    assert!(
        flood < 2_000,
        "{flood} flood lines reached the log: the log budget did not hold"
    );
}

#[test]
fn a_failing_open_tenant_echoes_what_its_plugin_failed_on() {
    let toml = format!(
        "[listeners.open]\nplugin = \"{}\"\nudp = \"127.0.0.1:0\"\ntcp = \"127.0.0.1:0\"\non-failure = \"fail-open\"\n",
        plugins::TRAP
    );
    let server = Server::with_config(&toml, 2);
    let socket = udp_client(server.udp_of("open"));
    assert_eq!(udp_ask(&socket, b"panic"), b"panic");
    assert_eq!(udp_ask(&socket, b"after"), b"after");
    let mut stream = tcp_client(server.tcp_of("open"));
    assert_eq!(
        tcp_ask(&mut stream, b"panic", 5),
        b"panic",
        "echoed by the host"
    );
    assert_eq!(
        tcp_ask(&mut stream, b"still open", 10),
        b"still open",
        "a fresh instance took over"
    );
    server.wait_for_log("echoed (fail-open)");
}

#[test]
fn a_peer_over_its_rate_limit_loses_datagrams() {
    let toml = "[listeners.paced]\nplugin = \"echo\"\nudp = \"127.0.0.1:0\"\nrate-limit = 5\nrate-burst = 5\n";
    let server = Server::with_config(toml, 1);
    let socket = udp_client(server.udp_of("paced"));
    for i in 0..40u8 {
        socket.send(&[i]).expect("send");
    }
    socket
        .set_read_timeout(Some(Duration::from_millis(500)))
        .expect("timeout");
    let mut replies = 0;
    let mut buf = [0u8; 16];
    while socket.recv(&mut buf).is_ok() {
        replies += 1;
    }
    assert!(
        (5..40).contains(&replies),
        "{replies} of 40 datagrams answered under a 5/s limit"
    );
}

#[test]
fn connections_beyond_the_limit_are_refused_at_once() {
    // An hour's idle timeout: a close can only be the refusal.
    let toml = "[listeners.small]\nplugin = \"echo\"\ntcp = \"127.0.0.1:0\"\nmax-connections = 2\n\
                idle-timeout = \"1h\"\n";
    let server = Server::with_config(toml, 1);
    let addr = server.tcp_of("small");
    let mut first = tcp_client(addr);
    let mut second = tcp_client(addr);
    assert_eq!(tcp_ask(&mut first, b"1", 1), b"1");
    assert_eq!(tcp_ask(&mut second, b"2", 1), b"2");
    let mut third = TcpStream::connect(addr).expect("the kernel accepts");
    let _ = third.write_all(b"3");
    // Closed unanswered, long before any timeout could have closed it.
    expect_closed_by_server(&mut third);
    let mut buf = [0u8; 4];
    drop(first);
    // A slot frees up when a connection ends.
    let deadline = Instant::now() + PATIENCE;
    loop {
        let mut next = tcp_client(addr);
        if next.write_all(b"4").is_ok() && matches!(next.read(&mut buf), Ok(1)) {
            break;
        }
        assert!(Instant::now() < deadline, "no slot freed");
        thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn an_idle_connection_is_closed() {
    let toml =
        "[listeners.brisk]\nplugin = \"echo\"\ntcp = \"127.0.0.1:0\"\nidle-timeout = \"200ms\"\n";
    let server = Server::with_config(toml, 1);
    let mut stream = tcp_client(server.tcp_of("brisk"));
    assert_eq!(tcp_ask(&mut stream, b"hi", 2), b"hi");
    let quiet_since = Instant::now();
    // Closed (a read that times out fails), and not before the timeout.
    expect_closed_by_server(&mut stream);
    let quiet = quiet_since.elapsed();
    assert!(
        quiet >= Duration::from_millis(200),
        "closed after {quiet:?} of quiet, before its 200ms idle timeout"
    );
}

#[test]
fn udp_replies_cannot_amplify() {
    let toml = format!(
        "[listeners.loud]\nplugin = \"{}\"\nudp = \"127.0.0.1:0\"\nudp-amplification = 2\n\
         plugin-config = {{ behaviour = \"huge-reply\" }}\n",
        plugins::HOSTILE
    );
    let server = Server::with_config(&toml, 1);
    assert_eq!(
        udp_probe(server.udp_of("loud"), Duration::from_millis(500)),
        None
    );
    server.wait_for_log(
        "reply of 8388608 bytes to a 5-byte datagram refused (udp-amplification 2 allows 64)",
    );
}
