use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use crate::common::{
    self, Server, control_path, one_line_error, plugins, scratch_file, send_signal, tcp_ask,
    tcp_client, udp_ask, udp_client,
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

#[test]
fn twenty_swaps_under_load_lose_nothing_and_never_mix_versions() {
    let control = control_path();
    let server = Server::start(
        "echo",
        &["--control", control.to_str().expect("utf-8 path")],
    );
    let done = Arc::new(AtomicBool::new(false));
    let (echo_count, hello_count) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let mut clients = Vec::new();
    for id in 0..3 {
        let (addr, stop, echoed, greeted) = (
            server.udp(),
            done.clone(),
            echo_count.clone(),
            hello_count.clone(),
        );
        clients.push(thread::spawn(move || {
            let socket = udp_client(addr);
            let started = Instant::now();
            let mut sent = 0;
            while !stop.load(Ordering::Relaxed)
                && sent < 500_000
                && started.elapsed() < Duration::from_secs(90)
            {
                let message = format!("udp {id} {sent}");
                let reply = udp_ask(&socket, message.as_bytes());
                match reply.as_slice() {
                    r if r == message.as_bytes() => echoed.fetch_add(1, Ordering::Relaxed),
                    GREETING_UDP => greeted.fetch_add(1, Ordering::Relaxed),
                    other => panic!("{message:?} got {:?}", String::from_utf8_lossy(other)),
                };
                sent += 1;
            }
            sent
        }));
        let (addr, stop, echoed, greeted) = (
            server.tcp(),
            done.clone(),
            echo_count.clone(),
            hello_count.clone(),
        );
        clients.push(thread::spawn(move || {
            let started = Instant::now();
            let mut sent = 0;
            while !stop.load(Ordering::Relaxed)
                && sent < 500_000
                && started.elapsed() < Duration::from_secs(90)
            {
                let mut stream = tcp_client(addr);
                let mut versions = Vec::new();
                for round in 0..5 {
                    let message = format!("tcp {id} {sent} {round}");
                    stream.write_all(message.as_bytes()).expect("send");
                    let mut buf = [0u8; 64];
                    let len = stream.read(&mut buf).expect("a reply");
                    let version = match &buf[..len] {
                        r if r == message.as_bytes() => "echo",
                        GREETING_TCP => "hello",
                        other => panic!("{message:?} got {:?}", String::from_utf8_lossy(other)),
                    };
                    versions.push(version);
                    sent += 1;
                }
                assert!(
                    versions.iter().all(|v| *v == versions[0]),
                    "one connection saw two versions: {versions:?}"
                );
                let counter = if versions[0] == "echo" {
                    &echoed
                } else {
                    &greeted
                };
                counter.fetch_add(5, Ordering::Relaxed);
            }
            sent
        }));
    }

    let mut swaps = 0;
    for round in 0..22 {
        if round == 11 {
            // A failed reload in the middle of the load changes nothing.
            let failed = reload(&control, &["--plugin", "/nonexistent/plugin.wasm"]);
            assert!(!failed.status.success());
            let stderr = String::from_utf8_lossy(&failed.stderr);
            assert!(
                stderr.contains("reload failed, nothing changed"),
                "{stderr}"
            );
        }
        let next = if round % 2 == 0 { "hello" } else { "echo" };
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
        swaps += 1;
        thread::sleep(Duration::from_millis(30));
    }
    done.store(true, Ordering::Relaxed);
    let requests: usize = clients
        .into_iter()
        .map(|client| client.join().expect("no request lost or wrong"))
        .sum();
    let (echoed, greeted) = (
        echo_count.load(Ordering::Relaxed),
        hello_count.load(Ordering::Relaxed),
    );
    eprintln!(
        "{swaps} swaps under load: {requests} requests, {echoed} echoed, {greeted} greeted, 0 lost"
    );
    assert!(swaps >= 20);
    assert_eq!(
        echoed + greeted,
        requests,
        "every request got exactly one reply"
    );
    assert!(echoed > 0 && greeted > 0, "both versions served");
    let log = server.stderr();
    assert_eq!(
        log.matches("reloaded: listener `main`").count(),
        swaps,
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

#[test]
fn sighup_reloads_every_plugin_from_disk() {
    let control = control_path();
    let file = plugin_file(plugins::ECHO);
    let server = Server::start(
        file.to_str().expect("utf-8 path"),
        &["--control", control.to_str().expect("utf-8 path")],
    );
    let socket = udp_client(server.udp());
    assert_eq!(udp_ask(&socket, b"hi"), b"hi");
    std::fs::copy(plugins::HELLO, &file).expect("replace the plugin");
    send_signal(server.pid(), "HUP");
    server.wait_for_log("-> plugin@");
    assert_eq!(udp_ask(&socket, b"hi"), GREETING_UDP);
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
    let output = reload(&control, &["--listener", "nope"]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(
        stderr.contains("no listener named `nope` (listeners: main)"),
        "{stderr}"
    );
    let empty = scratch_file("empty.wasm", b"\0asm\x0d\0\x01\0");
    let output = reload(&control, &["--plugin", empty.to_str().expect("utf-8 path")]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("does not export `wasm-echo:plugin/udp@0.1.0`"),
        "{stderr}"
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
