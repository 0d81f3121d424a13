//! State hand-over across a reload (contract 0.2.0's `state`): counter's
//! counts move to counter-next (which answers `count N`), over UDP at
//! once and over TCP on the same socket with `upgrade-connections`; a
//! failed hand-over keeps (or, as configured, resets) the state, and the
//! log says why.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use crate::common::{
    self, PATIENCE, Server, control_path, plugins, tcp_ask, tcp_client, udp_ask, udp_client,
};

/// Serves `plugin` as listener `main` on UDP and TCP with `keys` added to
/// its table, and a control socket of the test's own.
fn serve(plugin: &str, keys: &str) -> (Server, PathBuf) {
    let control = control_path();
    let toml = format!(
        "[listeners.main]\nplugin = \"{plugin}\"\nudp = \"127.0.0.1:0\"\ntcp = \"127.0.0.1:0\"\n{keys}"
    );
    let server = Server::with_config_and(
        &toml,
        2,
        &["--control", control.to_str().expect("utf-8 path")],
    );
    (server, control)
}

/// Reloads `main` with `plugin`; returns what `wasm-echo reload` printed.
fn reload(control: &Path, plugin: &str) -> String {
    let output = common::control("reload", control, &["--plugin", plugin]);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

#[test]
fn udp_counts_go_on_in_the_new_versions_format() {
    let (server, control) = serve("counter", "");
    let socket = udp_client(server.udp());
    for count in [b"1", b"2", b"3"] {
        assert_eq!(udp_ask(&socket, b"x"), count);
    }
    let swap = reload(&control, plugins::COUNTER_NEXT);
    assert!(
        swap.contains("-> counter_next@")
            && swap.contains("; 1 instance(s) migrated with their state"),
        "{swap}"
    );
    assert_eq!(
        udp_ask(&socket, b"x"),
        b"count 4",
        "v2's format, v1's count"
    );
    assert_eq!(udp_ask(&socket, b"x"), b"count 5");
}

#[test]
fn an_upgraded_connection_goes_on_on_its_socket_with_its_state() {
    let (server, control) = serve("counter", "upgrade-connections = true\n");
    let mut stream = tcp_client(server.tcp());
    let port = stream.local_addr().expect("local address").port();
    assert_eq!(tcp_ask(&mut stream, b"a", 1), b"1");
    assert_eq!(tcp_ask(&mut stream, b"b", 1), b"2");
    let swap = reload(&control, plugins::COUNTER_NEXT);
    // The UDP listener has no instance yet: only the connection moves.
    assert!(
        swap.contains("; 1 instance(s) migrated with their state"),
        "{swap}"
    );
    assert!(swap.contains("0 instance(s) still on counter@"), "{swap}");
    assert_eq!(
        tcp_ask(&mut stream, b"c", 7),
        b"count 3",
        "answered by v2 on the same connection, its count continued"
    );
    assert_eq!(stream.local_addr().expect("local address").port(), port);
    let mut fresh = tcp_client(server.tcp());
    assert_eq!(
        tcp_ask(&mut fresh, b"x", 7),
        b"count 1",
        "a new connection starts at 1"
    );
}

#[test]
fn without_upgrade_connections_a_connection_finishes_on_its_version() {
    let (server, control) = serve("counter", "");
    let mut stream = tcp_client(server.tcp());
    assert_eq!(tcp_ask(&mut stream, b"a", 1), b"1");
    let swap = reload(&control, plugins::COUNTER_NEXT);
    assert!(swap.contains("1 instance(s) still on counter@"), "{swap}");
    assert_eq!(tcp_ask(&mut stream, b"b", 1), b"2", "still v1");
}

/// The old version's state goes nowhere when the new one cannot take it:
/// by default the conversation stays on the old version, state and all.
#[test]
fn a_restore_that_traps_keeps_the_old_version_and_its_state() {
    let (server, control) = serve(
        "counter",
        "upgrade-connections = true\nplugin-config = { state-fault = \"restore-trap\" }\n",
    );
    let socket = udp_client(server.udp());
    let mut stream = tcp_client(server.tcp());
    for count in [b"1", b"2"] {
        assert_eq!(udp_ask(&socket, b"x"), count);
        assert_eq!(tcp_ask(&mut stream, b"x", 1), count);
    }
    let swap = reload(&control, plugins::COUNTER_NEXT);
    assert!(
        swap.contains("; 0 instance(s) migrated with their state, 2 kept on counter@"),
        "{swap}"
    );
    assert_eq!(
        tcp_ask(&mut stream, b"x", 1),
        b"3",
        "v1 goes on with its count"
    );
    assert_eq!(udp_ask(&socket, b"x"), b"3");
    let line = server.wait_for_log("state hand-over counter@");
    assert!(
        line.contains("-> counter_next@")
            && line.contains("failed: restore failed: plugin trapped")
            && line.contains("kept on the old version with its state"),
        "{line}"
    );
    let mut new = tcp_client(server.tcp());
    assert_eq!(
        tcp_ask(&mut new, b"x", 7),
        b"count 1",
        "new connections get v2"
    );
}

#[test]
fn a_failed_restore_starts_afresh_when_so_configured() {
    let (server, control) = serve(
        "counter",
        "upgrade-connections = true\non-migration-failure = \"fresh\"\n\
         plugin-config = { state-fault = \"restore-refuse\" }\n",
    );
    let socket = udp_client(server.udp());
    let mut stream = tcp_client(server.tcp());
    for count in [b"1", b"2"] {
        assert_eq!(udp_ask(&socket, b"x"), count);
        assert_eq!(tcp_ask(&mut stream, b"x", 1), count);
    }
    let swap = reload(&control, plugins::COUNTER_NEXT);
    assert!(swap.contains("2 moved without state"), "{swap}");
    assert_eq!(
        tcp_ask(&mut stream, b"x", 7),
        b"count 1",
        "v2, from scratch, same socket"
    );
    assert_eq!(udp_ask(&socket, b"x"), b"count 1");
    let line = server.wait_for_log("state hand-over counter@");
    assert!(
        line.contains("restore refused the state: counter-next refuses the state of counter")
            && line.contains("starting afresh (on-migration-failure = \"fresh\")"),
        "{line}"
    );
}

/// `max-state` bounds what a plugin may hand over: counter-next's 2 MiB
/// snapshot is refused and counter-next goes on.
#[test]
fn a_snapshot_over_max_state_is_not_handed_over() {
    let (server, control) = serve(
        plugins::COUNTER_NEXT,
        "plugin-config = { state-fault = \"huge-snapshot\" }\n",
    );
    let socket = udp_client(server.udp());
    assert_eq!(udp_ask(&socket, b"x"), b"count 1");
    let swap = reload(&control, "counter");
    assert!(swap.contains("1 kept on counter_next@"), "{swap}");
    assert_eq!(udp_ask(&socket, b"x"), b"count 2");
    let line = server.wait_for_log("state hand-over counter_next@");
    assert!(
        line.contains("snapshot of 2097152 bytes is over max-state (1048576 bytes)"),
        "{line}"
    );
}

/// A plugin without `state` (echo) hands nothing over: the UDP listener's next instance starts
/// from nothing, as before 0.2.0, and a connection stays where it is.
#[test]
fn from_a_plugin_without_state_the_new_version_starts_afresh() {
    let (server, control) = serve("echo", "upgrade-connections = true\n");
    let socket = udp_client(server.udp());
    let mut stream = tcp_client(server.tcp());
    assert_eq!(udp_ask(&socket, b"x"), b"x");
    assert_eq!(tcp_ask(&mut stream, b"hi", 2), b"hi");
    let swap = reload(&control, "counter");
    assert!(
        swap.contains("1 moved without state, 1 kept on echo@"),
        "{swap}"
    );
    assert_eq!(udp_ask(&socket, b"x"), b"1");
    assert_eq!(
        tcp_ask(&mut stream, b"ho", 2),
        b"ho",
        "the connection stays on echo"
    );
}

/// The count in a reply of either version.
fn count_of(reply: &[u8]) -> u64 {
    let text = String::from_utf8_lossy(reply);
    text.strip_prefix("count ")
        .unwrap_or(&text)
        .parse()
        .unwrap_or_else(|_| panic!("not a count: {text:?}"))
}

/// Regression guard for swaps with hand-over: under UDP and TCP load, with
/// connections upgraded, swaps back and forth between counter and
/// counter-next lose no request, answer none twice and lose no count:
/// every reply is its peer's (or connection's) previous count plus one,
/// whichever version gives it.
#[test]
fn swaps_under_load_with_migration_lose_nothing() {
    const SWAPS: usize = 10;
    let wait = Duration::from_secs(5);
    let (server, control) = serve("counter", "upgrade-connections = true\n");
    let done = Arc::new(AtomicBool::new(false));
    let mut clients = Vec::new();
    for _ in 0..2 {
        let (addr, stop) = (server.udp(), done.clone());
        clients.push(thread::spawn(move || {
            let socket = udp_client(addr);
            socket.set_read_timeout(Some(wait)).expect("timeout");
            let (started, mut sent, mut buf) = (Instant::now(), 0u64, [0u8; 64]);
            while !stop.load(Ordering::Relaxed) && sent < 200_000 && started.elapsed() < PATIENCE {
                socket.send(b"x").expect("send");
                let len = socket
                    .recv(&mut buf)
                    .unwrap_or_else(|e| panic!("datagram {} lost: {e}", sent + 1));
                assert_eq!(count_of(&buf[..len]), sent + 1, "udp count");
                sent += 1;
            }
            sent
        }));
        let (addr, stop) = (server.tcp(), done.clone());
        clients.push(thread::spawn(move || {
            let (started, mut sent) = (Instant::now(), 0u64);
            while !stop.load(Ordering::Relaxed) && sent < 200_000 && started.elapsed() < PATIENCE {
                let mut stream = tcp_client(addr);
                stream.set_read_timeout(Some(wait)).expect("timeout");
                for round in 1..=20 {
                    stream.write_all(b"x").expect("send");
                    let mut buf = [0u8; 64];
                    let len = stream
                        .read(&mut buf)
                        .unwrap_or_else(|e| panic!("message {round} lost: {e}"));
                    assert_eq!(count_of(&buf[..len]), round, "tcp count");
                    sent += 1;
                }
            }
            sent
        }));
    }
    for swap in 1..=SWAPS {
        let next = if swap % 2 == 1 {
            plugins::COUNTER_NEXT
        } else {
            "counter"
        };
        reload(&control, next);
        thread::sleep(Duration::from_millis(30));
    }
    done.store(true, Ordering::Relaxed);
    let total: u64 = clients
        .into_iter()
        .map(|client| client.join().expect("no request lost, no count lost"))
        .sum();
    assert!(total > 0, "traffic ran");
    let log = server.stderr();
    assert_eq!(
        log.matches("reloaded: listener `main`").count(),
        SWAPS,
        "{log}"
    );
    assert!(
        !log.contains("state hand-over"),
        "no hand-over failed:\n{log}"
    );
}
