use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use wasm_echo::testing::{HOSTILE, Scenario, hostile_config};

use crate::common::{
    PATIENCE, Server, expect_closed_by_server, plugins, poll_until, tcp_ask, tcp_client, udp_ask,
    udp_client,
};

/// One datagram; the reply, or `None` if none came within `wait`. Only
/// the wait running out is silence: an ICMP error (connection refused, the
/// listener is gone) fails the test.
fn udp_probe(addr: SocketAddr, wait: Duration) -> Option<Vec<u8>> {
    let socket = udp_client(addr);
    socket.set_read_timeout(Some(wait)).expect("timeout");
    socket.send(b"probe").expect("send");
    let mut buf = vec![0u8; 70_000];
    match socket.recv(&mut buf) {
        Ok(len) => Some(buf[..len].to_vec()),
        Err(error) if matches!(error.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => None,
        Err(error) => panic!("udp probe of {addr}: {error} (the listener is gone?)"),
    }
}

/// One TCP message; what came back, or `None` if the server closed the
/// connection without a reply. A connection the server leaves open (the
/// read times out) or refuses fails the test.
fn tcp_probe(addr: SocketAddr) -> Option<Vec<u8>> {
    let mut stream = tcp_client(addr);
    stream.write_all(b"probe").expect("send");
    let mut buf = vec![0u8; 70_000];
    match stream.read(&mut buf) {
        Ok(0) => None,
        Ok(len) => Some(buf[..len].to_vec()),
        Err(error)
            if matches!(
                error.kind(),
                ErrorKind::ConnectionReset | ErrorKind::ConnectionAborted
            ) =>
        {
            None
        }
        Err(error) => panic!("tcp probe of {addr}: neither a reply nor a close: {error}"),
    }
}

/// Serves the good tenant over UDP and TCP until `stop`, checking every
/// answer's bytes; returns how many exchanges (one UDP and one TCP each)
/// were made.
fn good_traffic(server_udp: SocketAddr, server_tcp: SocketAddr, stop: Arc<AtomicBool>) -> usize {
    let socket = udp_client(server_udp);
    let mut stream = tcp_client(server_tcp);
    let mut count = 0;
    let started = Instant::now();
    while !stop.load(Ordering::Relaxed) && count < 5_000 && started.elapsed() < PATIENCE {
        good_exchange(&socket, &mut stream, count);
        count += 1;
    }
    count
}

/// One UDP and one TCP exchange with the good (echo) tenant, checked.
fn good_exchange(socket: &UdpSocket, stream: &mut TcpStream, n: usize) {
    let message = format!("good {n}");
    assert_eq!(udp_ask(socket, message.as_bytes()), message.as_bytes());
    assert_eq!(
        tcp_ask(stream, message.as_bytes(), message.len()),
        message.as_bytes()
    );
}

/// The good tenant must have answered at least this many exchanges while
/// the hostile ones were probed (three rounds, each waiting 1.5 s for UDP
/// silence): a handful a second even on a starved machine.
const GOOD_EXCHANGES_AT_LEAST: usize = 20;

/// A tenant whose plugin spins until a long deadline, so that its calls
/// are provably still running while the good tenant is served.
const SPIN_DEADLINE: &str = "3s";

/// Regression guard: a hostile plugin's misbehaviour must cost only its
/// own messages. Every probe gets the scenario's exact answer (a closed or
/// refused socket is not "no reply"); the good tenant answers every
/// exchange right, at least [`GOOD_EXCHANGES_AT_LEAST`] of them; and it
/// answers while a plugin that spins on every worker thread's worth of
/// connections is still in flight: its deadline line is logged after the
/// good tenant's replies (ordering, not wall-clock).
#[test]
fn hostile_plugins_are_contained_while_a_good_tenant_is_served() {
    let mut toml = hostile_config("");
    toml.push_str(&format!(
        "[listeners.spin]\nplugin = \"{}\"\nudp = \"127.0.0.1:0\"\ntcp = \"127.0.0.1:0\"\n\
         call-timeout = \"{SPIN_DEADLINE}\"\nplugin-config = {{ behaviour = \"loop\" }}\n",
        plugins::HOSTILE
    ));
    let server = Server::with_config(&toml, 2 * (2 + HOSTILE.len()));
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

    // Keep more spinning calls in flight than the server has worker
    // threads, then talk to the good tenant before any of them is killed.
    let spin_udp = udp_client(server.udp_of("spin"));
    spin_udp.send(b"probe").expect("send");
    let spinning: Vec<TcpStream> = (0..4)
        .map(|_| {
            let mut stream = tcp_client(server.tcp_of("spin"));
            stream.write_all(b"probe").expect("send");
            stream
        })
        .collect();
    let killed = format!("ran past its {SPIN_DEADLINE} deadline");
    let spin_killed = |log: &str| {
        log.lines()
            .any(|line| line.contains("listener=\"spin\"") && line.contains(&killed))
    };
    let socket = udp_client(server.udp_of("good"));
    let mut stream = tcp_client(server.tcp_of("good"));
    for n in 0..10 {
        good_exchange(&socket, &mut stream, n);
    }
    assert!(
        !spin_killed(&server.stderr()),
        "the good tenant was answered only after the spinning plugin's calls \
         were killed:\n{}",
        server.stderr()
    );
    for mut stream in spinning {
        expect_closed_by_server(&mut stream);
    }
    server.wait_for_log(&killed);

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
    let exchanges = good.join().expect("the good tenant was served throughout");
    assert!(
        exchanges >= GOOD_EXCHANGES_AT_LEAST,
        "the good tenant answered only {exchanges} exchanges while the hostile ones were probed"
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

/// Regression guard: the per-peer rate limit let through up to 7x its
/// rate unnoticed. Over about a second of datagrams, those answered may be
/// at most the burst plus what the rate refills over the time measured
/// from the first send to the last reply (plus one for rounding), and at
/// least the burst.
#[test]
fn a_peer_over_its_rate_limit_loses_datagrams() {
    const RATE: u32 = 5;
    const BURST: u32 = 5;
    const SENT: u8 = 40;
    let toml = format!(
        "[listeners.paced]\nplugin = \"echo\"\nudp = \"127.0.0.1:0\"\n\
         rate-limit = {RATE}\nrate-burst = {BURST}\n"
    );
    let server = Server::with_config(&toml, 1);
    let socket = udp_client(server.udp_of("paced"));
    // Spread over some 1 s, so that the rate (not only the burst) shows:
    // about BURST + RATE of them are within the limit.
    let first_sent = Instant::now();
    for i in 0..SENT {
        socket.send(&[i]).expect("send");
        // Pacing the traffic, not waiting for anything.
        thread::sleep(Duration::from_millis(25));
    }
    let mut answered = Vec::new();
    let mut last_reply = first_sent;
    let mut buf = [0u8; 16];
    loop {
        // Silence ends the count: a wait running out, nothing else.
        socket
            .set_read_timeout(Some(Duration::from_millis(500)))
            .expect("timeout");
        match socket.recv(&mut buf) {
            Ok(len) => {
                last_reply = Instant::now();
                answered.push(buf[..len].to_vec());
            }
            Err(error) if matches!(error.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                break;
            }
            Err(error) => panic!("{error}"),
        }
        assert!(
            answered.len() <= usize::from(SENT),
            "more replies than datagrams"
        );
    }
    let elapsed = last_reply - first_sent;
    let refilled = (elapsed.as_secs_f64() * f64::from(RATE)).floor() as usize;
    let allowed = BURST as usize + refilled + 1;
    let replies = answered.len();
    assert!(
        (BURST as usize..=allowed).contains(&replies),
        "{replies} of {SENT} datagrams answered in {elapsed:?} under {RATE}/s, burst {BURST} \
         (allowed {BURST} to {allowed})"
    );
    assert_eq!(answered[0], [0], "the burst is the first datagrams");
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
    poll_until("a slot to free up after a connection ended", || {
        let mut next = tcp_client(addr);
        (next.write_all(b"4").is_ok() && matches!(next.read(&mut buf), Ok(1))).then_some(())
    });
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

/// The README's "TCP is read more slowly": a TCP peer over its rate is
/// slowed down to the rate, not disconnected, and every byte it sent is
/// answered, in order. Guards against a rate limit that TCP ignores (the
/// replies would come at once) or enforces by dropping or closing.
#[test]
fn a_tcp_peer_over_its_rate_limit_is_read_more_slowly() {
    const RATE: u32 = 20;
    const BURST: u32 = 2;
    const LINES: u32 = 22;
    let toml = format!(
        "[listeners.paced]\nplugin = \"echo\"\ntcp = \"127.0.0.1:0\"\nframing = \"lines\"\n\
         rate-limit = {RATE}\nrate-burst = {BURST}\n"
    );
    let server = Server::with_config(&toml, 1);
    let mut stream = tcp_client(server.tcp_of("paced"));
    let sent: String = (0..LINES).map(|n| format!("line {n:02}\n")).collect();
    let started = Instant::now();
    let echoed = tcp_ask(&mut stream, sent.as_bytes(), sent.len());
    let elapsed = started.elapsed();
    assert_eq!(
        String::from_utf8_lossy(&echoed),
        sent,
        "every line answered, in order"
    );
    // Beyond the burst, one message per 1/RATE s (less one for rounding).
    let at_least = Duration::from_secs_f64(f64::from(LINES - BURST - 1) / f64::from(RATE));
    assert!(
        elapsed >= at_least,
        "{LINES} lines answered in {elapsed:?}: not slowed to {RATE}/s (at least {at_least:?})"
    );
    assert_eq!(
        tcp_ask(&mut stream, b"still open\n", 11),
        b"still open\n",
        "the paced connection stays open"
    );
}
