use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use crate::common::{
    self, PATIENCE, Server, control_path, one_line_error, plugins, scratch_file, send_signal,
    tcp_ask, tcp_client, udp_ask, udp_client,
};

const GREETING_UDP: &[u8] = b"Hello, client!";
const GREETING_TCP: &[u8] = b"hello, tcp client!";

fn reload(control: &Path, args: &[&str]) -> std::process::Output {
    common::control("reload", control, args)
}

/// A plugin file in a scratch folder, holding `plugin`'s bytes.
fn plugin_file(plugin: &str) -> PathBuf {
    scratch_file("plugin.wasm", &std::fs::read(plugin).expect("built plugin"))
}

/// How long a request under load may wait for its reply before it counts
/// as lost: short, so a lost datagram fails at once with its count instead
/// of a minute's hang, and far above a reply's real latency.
const REPLY_WAIT: Duration = Duration::from_secs(5);

/// Swap progress shared with the clients: `2 * k` once `k` swaps are done,
/// `2 * k + 1` while swap `k + 1` is being made.
type Progress = Arc<AtomicUsize>;

/// Which plugin serves after `swaps` successful swaps (they alternate,
/// starting from echo).
fn serving_after(swaps: usize) -> &'static str {
    if swaps.is_multiple_of(2) {
        "echo"
    } else {
        "hello"
    }
}

/// Checks a reply that came back between two reads of `progress`: if no
/// swap was made or begun meanwhile, it must be the version the last swap
/// put in place; an older one would mean versions went back.
fn check_version(progress: &Progress, before: usize, version: &str, what: &str) {
    let after = progress.load(Ordering::SeqCst);
    if before == after && before.is_multiple_of(2) {
        let swaps = before / 2;
        assert_eq!(
            version,
            serving_after(swaps),
            "{what}: answered by a replaced version after swap {swaps}"
        );
    }
}

/// One UDP client: asks until `stop`, each reply within [`REPLY_WAIT`];
/// returns how many requests it made.
fn udp_load(addr: SocketAddr, id: usize, stop: Arc<AtomicBool>, progress: Progress) -> usize {
    let socket = udp_client(addr);
    socket.set_read_timeout(Some(REPLY_WAIT)).expect("timeout");
    let started = Instant::now();
    let mut sent = 0;
    let mut buf = [0u8; 64];
    while !stop.load(Ordering::Relaxed) && sent < 500_000 && started.elapsed() < PATIENCE {
        let message = format!("udp {id} {sent}");
        let before = progress.load(Ordering::SeqCst);
        socket.send(message.as_bytes()).expect("send");
        let len = socket.recv(&mut buf).unwrap_or_else(|error| {
            panic!(
                "udp client {id}: request {sent} lost ({error} within {REPLY_WAIT:?}; \
                 {sent} answered before it)"
            )
        });
        let version = match &buf[..len] {
            r if r == message.as_bytes() => "echo",
            GREETING_UDP => "hello",
            other => panic!("{message:?} got {:?}", String::from_utf8_lossy(other)),
        };
        check_version(&progress, before, version, &message);
        sent += 1;
    }
    sent
}

/// One TCP client: connections of five exchanges each until `stop`, each
/// reply within [`REPLY_WAIT`], each connection on one version; returns
/// how many requests it made.
fn tcp_load(addr: SocketAddr, id: usize, stop: Arc<AtomicBool>, progress: Progress) -> usize {
    let started = Instant::now();
    let mut sent = 0;
    while !stop.load(Ordering::Relaxed) && sent < 500_000 && started.elapsed() < PATIENCE {
        let before = progress.load(Ordering::SeqCst);
        let mut stream = tcp_client(addr);
        stream.set_read_timeout(Some(REPLY_WAIT)).expect("timeout");
        let mut versions = Vec::new();
        for round in 0..5 {
            let message = format!("tcp {id} {sent} {round}");
            stream.write_all(message.as_bytes()).expect("send");
            let mut buf = [0u8; 64];
            let len = stream.read(&mut buf).unwrap_or_else(|error| {
                panic!("tcp client {id}: {message:?} lost ({error} within {REPLY_WAIT:?})")
            });
            let version = match &buf[..len] {
                r if r == message.as_bytes() => "echo",
                GREETING_TCP => "hello",
                other => panic!("{message:?} got {:?}", String::from_utf8_lossy(other)),
            };
            if round == 0 {
                check_version(&progress, before, version, &message);
            }
            versions.push(version);
            sent += 1;
        }
        assert!(
            versions.iter().all(|v| *v == versions[0]),
            "one connection saw two versions: {versions:?}"
        );
    }
    sent
}

/// Regression guard for hot swaps: under UDP and TCP load, 22 swaps (and a
/// failed one) lose no request (each is answered within [`REPLY_WAIT`]),
/// answer none twice (the server's own counts match the clients'), never
/// answer from a version already replaced, and never mix versions on one
/// connection; the server itself says it made every swap.
#[test]
fn twenty_swaps_under_load_lose_nothing_and_never_mix_versions() {
    const SWAPS: usize = 22;
    let control = control_path();
    let server = Server::start(
        "echo",
        &[
            "--control",
            control.to_str().expect("utf-8 path"),
            "--metrics",
            "127.0.0.1:0",
        ],
    );
    let done = Arc::new(AtomicBool::new(false));
    let progress: Progress = Arc::new(AtomicUsize::new(0));
    let mut udp_clients = Vec::new();
    let mut tcp_clients = Vec::new();
    for id in 0..3 {
        let (addr, stop, progress_) = (server.udp(), done.clone(), progress.clone());
        udp_clients.push(thread::spawn(move || udp_load(addr, id, stop, progress_)));
        let (addr, stop, progress_) = (server.tcp(), done.clone(), progress.clone());
        tcp_clients.push(thread::spawn(move || tcp_load(addr, id, stop, progress_)));
    }

    for swap in 1..=SWAPS {
        if swap == 12 {
            // A failed reload in the middle of the load changes nothing.
            let failed = reload(&control, &["--plugin", "/nonexistent/plugin.wasm"]);
            one_line_error(&failed, &["reload failed, nothing changed"]);
        }
        let next = serving_after(swap);
        progress.store(2 * swap - 1, Ordering::SeqCst);
        let output = reload(&control, &["--plugin", next]);
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        assert!(
            stdout.contains(&format!("-> {next}@")),
            "reload to {next}: {stdout}"
        );
        progress.store(2 * swap, Ordering::SeqCst);
        thread::sleep(Duration::from_millis(30));
    }
    done.store(true, Ordering::Relaxed);
    let total = |clients: Vec<thread::JoinHandle<usize>>| -> usize {
        clients
            .into_iter()
            .map(|client| client.join().expect("no request lost or wrong"))
            .sum()
    };
    let (udp_requests, tcp_requests) = (total(udp_clients), total(tcp_clients));
    eprintln!("{SWAPS} swaps under load: {udp_requests} datagrams, {tcp_requests} tcp messages");
    assert!(
        udp_requests > 0 && tcp_requests > 0,
        "both kinds of traffic ran"
    );
    let (udp, tcp) = (udp_requests as f64, tcp_requests as f64);
    crate::metrics::expect(
        server.metrics.expect("serving metrics"),
        &[
            ("wasm_echo_datagrams_total", &[("listener", "main")], udp),
            (
                "wasm_echo_replies_total",
                &[("listener", "main"), ("protocol", "udp")],
                udp,
            ),
            ("wasm_echo_tcp_messages_total", &[("listener", "main")], tcp),
            (
                "wasm_echo_replies_total",
                &[("listener", "main"), ("protocol", "tcp")],
                tcp,
            ),
            (
                "wasm_echo_reloads_total",
                &[("listener", "main"), ("result", "ok")],
                SWAPS as f64,
            ),
            (
                "wasm_echo_reloads_total",
                &[("listener", "main"), ("result", "failed")],
                1.0,
            ),
        ],
    );
    let log = server.stderr();
    assert_eq!(
        log.matches("reloaded: listener `main`").count(),
        SWAPS,
        "every swap logged once"
    );
}

#[test]
fn open_connections_finish_on_the_version_they_started_with() {
    let control = control_path();
    let server = Server::start(
        "echo",
        &["--control", control.to_str().expect("utf-8 path")],
    );
    let mut old = tcp_client(server.tcp());
    assert_eq!(tcp_ask(&mut old, b"before", 6), b"before");
    let output = reload(&control, &["--plugin", "hello"]);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(stdout.contains("1 instance(s) still on echo@"), "{stdout}");
    assert_eq!(
        tcp_ask(&mut old, b"after", 5),
        b"after",
        "the open connection keeps echo"
    );
    let mut new = tcp_client(server.tcp());
    assert_eq!(
        tcp_ask(&mut new, b"hi", GREETING_TCP.len()),
        GREETING_TCP,
        "a new connection gets hello"
    );
    assert_eq!(udp_ask(&udp_client(server.udp()), b"hi"), GREETING_UDP);
}

#[test]
fn a_file_written_slowly_is_loaded_once_and_whole() {
    let control = control_path();
    let file = plugin_file(plugins::ECHO);
    let server = Server::with_args(&[
        "--plugin",
        file.to_str().expect("utf-8 path"),
        "--udp",
        "127.0.0.1:0",
        "--control",
        control.to_str().expect("utf-8 path"),
        "--watch",
    ]);
    server.wait_for_log("watching");
    let socket = udp_client(server.udp());
    assert_eq!(udp_ask(&socket, b"hi"), b"hi");
    // Written in place, in four pieces with pauses between them.
    let bytes = std::fs::read(plugins::HELLO).expect("hello plugin");
    let mut out = std::fs::File::create(&file).expect("rewrite the plugin");
    for piece in bytes.chunks(bytes.len() / 4 + 1) {
        out.write_all(piece).expect("write a piece");
        out.flush().expect("flush");
        thread::sleep(Duration::from_millis(40));
    }
    drop(out);
    server.wait_for_log("-> plugin@");
    assert_eq!(udp_ask(&socket, b"hi"), GREETING_UDP);
    // Let any late event settle, then count: one swap, no failed attempt.
    thread::sleep(Duration::from_millis(600));
    let log = server.stderr();
    assert_eq!(log.matches("-> plugin@").count(), 1, "loaded once:\n{log}");
    assert!(
        !log.contains("reload after a file change failed"),
        "a partial file was tried:\n{log}"
    );
}

#[test]
fn a_file_renamed_over_the_plugin_is_picked_up() {
    let control = control_path();
    let file = plugin_file(plugins::ECHO);
    let server = Server::start(
        file.to_str().expect("utf-8 path"),
        &[
            "--control",
            control.to_str().expect("utf-8 path"),
            "--watch",
        ],
    );
    server.wait_for_log("watching");
    assert_eq!(tcp_ask(&mut tcp_client(server.tcp()), b"hi", 2), b"hi");
    let staged = file.with_file_name("plugin.wasm.tmp");
    std::fs::copy(plugins::COUNTER, &staged).expect("stage the new version");
    std::fs::rename(&staged, &file).expect("rename over");
    server.wait_for_log("-> plugin@");
    let mut stream = tcp_client(server.tcp());
    assert_eq!(tcp_ask(&mut stream, b"a", 1), b"1");
    assert_eq!(tcp_ask(&mut stream, b"b", 1), b"2");
}

/// SIGHUP reloads every listener from its own file, not only the first:
/// three listeners, three files, all changed on disk, all swapped.
#[test]
fn sighup_reloads_every_plugin_from_disk() {
    let file = |name: &str, plugin: &str| {
        scratch_file(name, &std::fs::read(plugin).expect("built plugin"))
    };
    let (a, b, c) = (
        file("a.wasm", plugins::ECHO),
        file("b.wasm", plugins::ECHO),
        file("c.wasm", plugins::COUNTER),
    );
    let toml = format!(
        "[listeners.a]\nplugin = \"{}\"\nudp = \"127.0.0.1:0\"\n\n\
         [listeners.b]\nplugin = \"{}\"\ntcp = \"127.0.0.1:0\"\n\n\
         [listeners.c]\nplugin = \"{}\"\nudp = \"127.0.0.1:0\"\n",
        a.display(),
        b.display(),
        c.display()
    );
    let server = Server::with_config(&toml, 3);
    let (udp_a, udp_c) = (
        udp_client(server.udp_of("a")),
        udp_client(server.udp_of("c")),
    );
    assert_eq!(udp_ask(&udp_a, b"hi"), b"hi");
    assert_eq!(
        tcp_ask(&mut tcp_client(server.tcp_of("b")), b"hi", 2),
        b"hi"
    );
    assert_eq!(udp_ask(&udp_c, b"hi"), b"1");
    std::fs::copy(plugins::HELLO, &a).expect("replace a's plugin");
    std::fs::copy(plugins::COUNTER, &b).expect("replace b's plugin");
    std::fs::copy(plugins::ECHO, &c).expect("replace c's plugin");
    send_signal(server.pid(), "HUP");
    for (listener, plugin) in [("a", "a"), ("b", "b"), ("c", "c")] {
        server.wait_for_log(&format!("reloaded: listener `{listener}`: {plugin}@"));
    }
    let log = server.stderr();
    assert_eq!(
        log.matches(" instance(s) still on ").count(),
        3,
        "three swaps:\n{log}"
    );
    assert_eq!(udp_ask(&udp_a, b"hi"), GREETING_UDP, "a now greets");
    let mut stream = tcp_client(server.tcp_of("b"));
    assert_eq!(tcp_ask(&mut stream, b"x", 1), b"1", "b now counts");
    assert_eq!(udp_ask(&udp_c, b"same"), b"same", "c now echoes");
}

#[test]
fn reload_errors_are_one_line() {
    let nobody = control_path();
    one_line_error(&reload(&nobody, &[]), &["no wasm-echo server answers on"]);

    let control = control_path();
    let server = Server::start(
        "echo",
        &["--control", control.to_str().expect("utf-8 path")],
    );
    one_line_error(
        &reload(&control, &["--listener", "nope"]),
        &["no listener named `nope` (listeners: main)"],
    );
    let empty = scratch_file("empty.wasm", b"\0asm\x0d\0\x01\0");
    one_line_error(
        &reload(&control, &["--plugin", empty.to_str().expect("utf-8 path")]),
        &["does not export `wasm-echo:plugin/udp@0.1.0`"],
    );
    // Nothing changed.
    assert_eq!(udp_ask(&udp_client(server.udp()), b"same"), b"same");
    server.wait_for_log("reload failed, nothing changed");
}

/// Regression test for issue 20: on a server started with `--watch`, a
/// `reload --plugin` was silently undone by the next write to the file the
/// server started with, which the watcher kept watching. The watcher
/// follows what a listener runs: the answer says so, a write to the old
/// file changes nothing, and a write to the new one is picked up.
#[test]
fn a_manual_reload_moves_what_is_watched() {
    let control = control_path();
    let first = plugin_file(plugins::ECHO);
    let server = Server::with_args(&[
        "--plugin",
        first.to_str().expect("utf-8 path"),
        "--udp",
        "127.0.0.1:0",
        "--control",
        control.to_str().expect("utf-8 path"),
        "--watch",
    ]);
    server.wait_for_log("watching");
    let output = reload(&control, &["--plugin", "counter"]);
    assert!(output.status.success(), "{output:?}");
    let answer = String::from_utf8_lossy(&output.stdout);
    assert!(
        answer.contains("-> counter@")
            && answer.contains("; now watching no file (`counter` is built in)"),
        "{answer}"
    );
    // The old file changes: nothing is reloaded from it.
    let staged = first.with_file_name("staged.wasm");
    std::fs::copy(plugins::HELLO, &staged).expect("stage");
    std::fs::rename(&staged, &first).expect("rename over the old file");

    let second = scratch_file("second.wasm", &std::fs::read(plugins::ECHO).expect("echo"));
    let output = reload(
        &control,
        &["--plugin", second.to_str().expect("utf-8 path")],
    );
    let answer = String::from_utf8_lossy(&output.stdout);
    assert!(
        answer.contains("counter@")
            && answer.contains("-> second@")
            && answer.contains(&format!("; now watching {}", second.display())),
        "{answer}"
    );
    let socket = udp_client(server.udp());
    assert_eq!(udp_ask(&socket, b"hi"), b"hi");
    // The new file changes: it is reloaded.
    let staged = second.with_file_name("staged.wasm");
    std::fs::copy(plugins::HELLO, &staged).expect("stage");
    std::fs::rename(&staged, &second).expect("rename over the new file");
    common::poll_until("the new file's change to be served", || {
        (udp_ask(&socket, b"hi") == GREETING_UDP).then_some(())
    });
    // The old file's change came first, so it would have been seen by now.
    let log = server.stderr();
    let swaps: Vec<&str> = log
        .lines()
        .filter(|line| line.contains("reloaded: listener `main`"))
        .collect();
    assert_eq!(swaps.len(), 3, "counter, second, second again:\n{log}");
    assert!(
        !log.contains("-> plugin@"),
        "the old file was reloaded:\n{log}"
    );
    assert!(
        log.contains(&format!("watching {} for plugin changes", second.display())),
        "{log}"
    );
}

/// Regression test for issue 20: a SIGHUP that found every file unchanged
/// was counted as a successful reload (`result="ok"`, and `status`'s
/// RELOADS column), as if a new version had come. It counts as
/// `unchanged`, and `status` counts only swaps and failures.
#[test]
fn an_unchanged_reload_is_counted_as_unchanged() {
    let control = control_path();
    let file = plugin_file(plugins::ECHO);
    let server = Server::with_args(&[
        "--plugin",
        file.to_str().expect("utf-8 path"),
        "--udp",
        "127.0.0.1:0",
        "--control",
        control.to_str().expect("utf-8 path"),
        "--metrics",
        "127.0.0.1:0",
    ]);
    let metrics = server.metrics.expect("serving metrics");
    send_signal(server.pid(), "HUP");
    let reloads = |result: &str| {
        crate::metrics::value(
            &crate::metrics::scrape(metrics),
            "wasm_echo_reloads_total",
            &[("listener", "main"), ("result", result)],
        )
        .unwrap_or(0.0)
    };
    common::poll_until("the SIGHUP's reload to be counted", || {
        (reloads("unchanged") > 0.0).then_some(())
    });
    assert_eq!(reloads("unchanged"), 1.0);
    assert_eq!(reloads("ok"), 0.0);
    server.wait_for_log(" unchanged");
    // A real swap still counts as ok.
    std::fs::copy(plugins::HELLO, &file).expect("replace the plugin");
    let output = reload(&control, &[]);
    assert!(output.status.success(), "{output:?}");
    assert_eq!(reloads("ok"), 1.0);
    assert_eq!(reloads("unchanged"), 1.0);
    let status = common::run(&["status", &metrics.to_string(), "--interval", "10ms"]);
    let table = String::from_utf8_lossy(&status.stdout);
    let row = table
        .lines()
        .find(|line| line.starts_with("main "))
        .unwrap_or_else(|| panic!("no row for main:\n{table}"));
    assert!(row.ends_with(" 1/0"), "RELOADS is swaps/failures:\n{table}");
}
