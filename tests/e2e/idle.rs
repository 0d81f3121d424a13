use std::time::Duration;

use crate::common::{Server, plugins, poll_until, tcp_ask, tcp_client, udp_ask, udp_client};

/// Context switches (voluntary and not) of every thread of process `pid`
/// so far, as (thread id and name, count): each one is a thread that woke.
fn wakeups(pid: u32) -> Vec<(String, u64)> {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).expect("the server's threads");
    let mut threads = Vec::new();
    for task in tasks.flatten() {
        let path = task.path();
        let name = std::fs::read_to_string(path.join("comm")).unwrap_or_default();
        let status = std::fs::read_to_string(path.join("status")).unwrap_or_default();
        let switches = status
            .lines()
            .filter(|line| line.contains("ctxt_switches:"))
            .filter_map(|line| line.split_whitespace().nth(1)?.parse::<u64>().ok())
            .sum();
        let tid = task.file_name().to_string_lossy().into_owned();
        threads.push((format!("{tid} {}", name.trim()), switches));
    }
    threads
}

/// Waits until the server's threads sleep through a whole half second,
/// failing the test if they never do.
fn wait_until_quiet(server: &Server) {
    poll_until("the server's threads to stop waking up", || {
        let before = wakeups(server.pid());
        std::thread::sleep(Duration::from_millis(500));
        let after = wakeups(server.pid());
        let woke: Vec<String> = after
            .iter()
            .filter(|(name, count)| {
                before
                    .iter()
                    .find(|(was, _)| was == name)
                    .is_none_or(|(_, old)| count > old)
            })
            .map(|(name, _)| name.clone())
            .collect();
        if !woke.is_empty() {
            eprintln!("threads that woke in the last 500 ms: {woke:?}");
        }
        woke.is_empty().then_some(())
    });
}

/// Regression: the epoch ticker woke every millisecond whether or not a
/// call was running, so an idle `serve` used 2.5% to 3% of a core (issue
/// 15). After serving, every thread must go back to sleep.
#[test]
fn an_idle_server_wakes_no_thread() {
    let server = Server::start(plugins::ECHO, &[]);
    assert_eq!(udp_ask(&udp_client(server.udp()), b"ping"), b"ping");
    assert_eq!(tcp_ask(&mut tcp_client(server.tcp()), b"ping", 4), b"ping");
    wait_until_quiet(&server);
}

/// The ticker parks when idle; the call that comes next must wake it, or
/// a guest that loops would never be stopped (nothing else interrupts
/// running Wasm code).
#[test]
fn a_loop_after_a_quiet_spell_is_still_stopped_at_its_deadline() {
    let server = Server::start(plugins::TRAP, &["--call-timeout", "50ms"]);
    let socket = udp_client(server.udp());
    assert_eq!(udp_ask(&socket, b"hello"), b"hello");
    wait_until_quiet(&server);
    socket.send(b"loop").expect("send");
    // Answered only once the loop has been stopped: the listener handles
    // its datagrams in order.
    assert_eq!(udp_ask(&socket, b"after"), b"after");
    let log = server.wait_for_log("deadline");
    assert!(log.contains("ran past its 50ms deadline"), "{log}");
}
