use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread;
use std::time::Duration;

use crate::common::{
    self, GREETING_TCP, GREETING_UDP, Progress, Server, control_path, one_line_error, plugins,
    scratch_file, send_signal, serving_after, tcp_ask, tcp_client, tcp_load, udp_ask, udp_client,
    udp_load,
};

fn reload(control: &Path, args: &[&str]) -> std::process::Output {
    common::control("reload", control, args)
}

/// Serves `plugin` on UDP and TCP with a control socket of the test's own.
fn serve_with_control(plugin: &str) -> (Server, PathBuf) {
    let control = control_path();
    let server = Server::start(
        plugin,
        &["--control", control.to_str().expect("utf-8 path")],
    );
    (server, control)
}

/// Serves `file` on UDP with a control socket of the test's own and
/// `--watch`, once the watcher is on.
fn serve_watched_on_udp(file: &Path) -> (Server, PathBuf) {
    let control = control_path();
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
    (server, control)
}

/// A plugin file in a scratch folder, holding `plugin`'s bytes.
fn plugin_file(plugin: &str) -> PathBuf {
    scratch_file("plugin.wasm", &std::fs::read(plugin).expect("built plugin"))
}

/// Regression guard for hot swaps: under UDP and TCP load, 22 swaps (and a
/// failed one) lose no request (each is answered within
/// [`common::REPLY_WAIT`]),
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
    let (server, control) = serve_with_control("echo");
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
    let file = plugin_file(plugins::ECHO);
    let (server, _control) = serve_watched_on_udp(&file);
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

    let (server, control) = serve_with_control("echo");
    one_line_error(
        &reload(&control, &["--listener", "nope"]),
        &["no listener named `nope` (listeners: main)"],
    );
    let empty = scratch_file("empty.wasm", b"\0asm\x0d\0\x01\0");
    one_line_error(
        &reload(&control, &["--plugin", empty.to_str().expect("utf-8 path")]),
        &["does not export `wasm-echo:plugin/udp@0.2.0`"],
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
    let first = plugin_file(plugins::ECHO);
    let (server, control) = serve_watched_on_udp(&first);
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

/// A component whose core module runs `start` (WAT instructions) while an
/// instance starts, and whose exports fit the world but are never reached:
/// code at start-up, which no Rust guest has.
pub(crate) fn starting_component(start: &str) -> Vec<u8> {
    component_with(start, 1, 0)
}

/// [`starting_component`], whose core module has a table of
/// `table_elements`, and which makes `more_instances` core instances
/// besides its own.
pub(crate) fn component_with(start: &str, table_elements: u32, more_instances: usize) -> Vec<u8> {
    let text = r#"(component
      (type $types-type (instance
        (type $endpoint (record (field "ip" string) (field "port" u16)))
        (export "endpoint" (type $endpoint-export (eq $endpoint)))
        (type $next (enum "carry-on" "close-connection" "stop-listener"))
        (export "next" (type $next-export (eq $next)))
        (type $decision (record (field "reply" (option (list u8))) (field "next" $next-export)))
        (export "decision" (type (eq $decision)))
        (type $framing (enum "raw" "lines" "length-prefixed"))
        (export "framing" (type $framing-export (eq $framing)))
        (type $connection (record (field "peer" $endpoint-export) (field "local" $endpoint-export)
          (field "framing" $framing-export)))
        (export "connection" (type (eq $connection)))))
      (import "wasm-echo:plugin/types@0.1.0" (instance $types (type $types-type)))
      (alias export $types "endpoint" (type $endpoint))
      (alias export $types "decision" (type $decision))
      (alias export $types "connection" (type $connection))
      (core module $main
        (memory (export "memory") 1)
        (table TABLE funcref)
        (func (export "cabi_realloc") (param i32 i32 i32 i32) (result i32) i32.const 16)
        (func (export "on-datagram") (param i32 i32 i32 i32 i32) (result i32) unreachable)
        (func (export "on-open") (param i32 i32 i32 i32 i32 i32 i32) (result i32) unreachable)
        (func (export "on-message") (param i32 i32) (result i32) unreachable)
        (func (export "on-close") unreachable)
        (func $start START)
        (start $start))
      (core instance $main (instantiate $main))
      (core module $empty)
      MORE
      (alias core export $main "memory" (core memory $memory))
      (alias core export $main "cabi_realloc" (core func $realloc))
      (func $on-datagram (param "peer" $endpoint) (param "data" (list u8)) (result $decision)
        (canon lift (core func $main "on-datagram") (memory $memory) (realloc $realloc)))
      (func $on-open (param "conn" $connection) (result $decision)
        (canon lift (core func $main "on-open") (memory $memory) (realloc $realloc)))
      (func $on-message (param "data" (list u8)) (result $decision)
        (canon lift (core func $main "on-message") (memory $memory) (realloc $realloc)))
      (func $on-close (canon lift (core func $main "on-close")))
      (instance $udp (export "endpoint" (type $endpoint)) (export "decision" (type $decision))
        (export "on-datagram" (func $on-datagram)))
      (export "wasm-echo:plugin/udp@0.1.0" (instance $udp))
      (instance $tcp (export "connection" (type $connection)) (export "decision" (type $decision))
        (export "on-open" (func $on-open)) (export "on-message" (func $on-message))
        (export "on-close" (func $on-close)))
      (export "wasm-echo:plugin/tcp@0.1.0" (instance $tcp)))"#;
    let text = text
        .replace("START", start)
        .replace("TABLE", &table_elements.to_string())
        .replace(
            "MORE",
            &"(core instance (instantiate $empty))\n".repeat(more_instances),
        );
    wat::parse_str(text).expect("the test component is valid text")
}

/// Two listeners, `a` and `b`, each serving UDP from a plugin file of its
/// own holding `plugin`'s bytes; returns the server and the two files.
fn two_listeners(plugin: &str, control: &Path) -> (Server, PathBuf, PathBuf) {
    let (a, b) = (plugin_file(plugin), plugin_file(plugin));
    let toml = format!(
        "[listeners.a]\nplugin = {a:?}\nudp = \"127.0.0.1:0\"\n\
         [listeners.b]\nplugin = {b:?}\nudp = \"127.0.0.1:0\"\n"
    );
    let server = Server::with_config_and(
        &toml,
        2,
        &["--control", control.to_str().expect("utf-8 path")],
    );
    (server, a, b)
}

/// `reload` with no arguments reloads every listener from its own file.
/// Regression guard: a reload that only reached the first listener (or
/// only the named one when none was named).
#[test]
fn reload_without_arguments_reloads_every_listener_from_its_file() {
    let control = control_path();
    let (server, a, b) = two_listeners(plugins::ECHO, &control);
    let (to_a, to_b) = (
        udp_client(server.udp_of("a")),
        udp_client(server.udp_of("b")),
    );
    assert_eq!(udp_ask(&to_a, b"hi"), b"hi");
    assert_eq!(udp_ask(&to_b, b"hi"), b"hi");
    std::fs::copy(plugins::HELLO, &a).expect("replace a's plugin");
    std::fs::copy(plugins::COUNTER, &b).expect("replace b's plugin");
    let output = reload(&control, &[]);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(stdout.lines().count(), 2, "one line per listener: {stdout}");
    assert!(stdout.contains("listener `a`: plugin@"), "{stdout}");
    assert!(stdout.contains("listener `b`: plugin@"), "{stdout}");
    assert_eq!(udp_ask(&to_a, b"hi"), GREETING_UDP);
    assert_eq!(udp_ask(&to_b, b"hi"), b"1");
}

/// A successful `reload --listener a` swaps `a` alone: `b` keeps its
/// version and its instance, so its counter goes on where it was.
#[test]
fn reload_of_one_listener_leaves_the_others_alone() {
    let control = control_path();
    let (server, _, b) = two_listeners(plugins::COUNTER, &control);
    let (to_a, to_b) = (
        udp_client(server.udp_of("a")),
        udp_client(server.udp_of("b")),
    );
    assert_eq!(udp_ask(&to_a, b"x"), b"1");
    assert_eq!(udp_ask(&to_b, b"x"), b"1");
    assert_eq!(udp_ask(&to_b, b"x"), b"2");
    // b's file changes too: a reload of `a` must not pick that up.
    std::fs::copy(plugins::ECHO, &b).expect("replace b's plugin");
    let output = reload(&control, &["--listener", "a", "--plugin", "hello"]);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(stdout.contains("listener `a`: plugin@"), "{stdout}");
    assert!(stdout.contains("-> hello@"), "{stdout}");
    assert!(!stdout.contains("listener `b`"), "{stdout}");
    assert_eq!(udp_ask(&to_a, b"x"), GREETING_UDP);
    assert_eq!(
        udp_ask(&to_b, b"x"),
        b"3",
        "b's instance and state are kept"
    );
    assert_eq!(
        server.stderr().matches("reloaded: listener").count(),
        1,
        "one swap logged:\n{}",
        server.stderr()
    );
}

/// Each way a new version can fail (its bytes are not Wasm, its code does
/// not compile, it traps while starting) is one line naming the cause, and
/// changes nothing: the counter's instance, and so its count, goes on.
#[test]
fn failed_reloads_say_why_in_one_line_and_change_nothing() {
    let (server, control) = serve_with_control("counter");
    let socket = udp_client(server.udp());
    assert_eq!(udp_ask(&socket, b"x"), b"1");
    let notes = scratch_file("notes.txt", b"not a plugin\n");
    // Valid text, invalid code: the start function leaves a value behind.
    let broken = scratch_file("broken.wasm", &starting_component("i32.const 1"));
    let trapping = scratch_file("trapping.wasm", &starting_component("unreachable"));
    let cases = [
        (
            &notes,
            "is not a WebAssembly component (no `\\0asm` header)",
        ),
        (&broken, "broken.wasm does not compile: "),
        (
            &trapping,
            "fails to start: plugin trapped: wasm trap: wasm `unreachable` instruction executed",
        ),
    ];
    for (count, (file, cause)) in (2..).zip(cases) {
        let path = file.to_str().expect("utf-8 path");
        let line = one_line_error(
            &reload(&control, &["--plugin", path]),
            &["reload failed, nothing changed: listener `main`: ", cause],
        );
        let stem = file
            .file_stem()
            .and_then(|stem| stem.to_str())
            .expect("a name");
        assert!(line.contains(stem), "the line names the plugin: {line}");
        assert_eq!(
            udp_ask(&socket, b"x"),
            count.to_string().as_bytes(),
            "after {cause:?}, the old instance still counts"
        );
    }
    assert_eq!(
        server
            .stderr()
            .matches("reload failed, nothing changed")
            .count(),
        3,
        "{}",
        server.stderr()
    );
}

/// After a reload an open connection keeps the old version alive, and
/// the old version is retired with that connection: its series (`info`
/// at 0, one live instance) stay while it is open and leave the page once
/// it closes. Regression guard: an old version kept alive by anything but
/// its connections (its code and memory never freed).
#[test]
fn the_old_version_is_retired_with_its_last_connection() {
    use crate::metrics::{expect, scrape, value};

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
    let metrics = server.metrics.expect("serving metrics");
    let mut old = tcp_client(server.tcp());
    assert_eq!(tcp_ask(&mut old, b"before", 6), b"before");
    let output = reload(&control, &["--plugin", "hello"]);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(stdout.contains("1 instance(s) still on echo@"), "{stdout}");
    let page = scrape(metrics);
    let echo = page
        .samples
        .iter()
        .find(|s| s.metric == "wasm_echo_plugin_info" && s.labels.get("plugin") == Some("echo"))
        .and_then(|s| s.labels.get("version"))
        .expect("the old version is still on the page")
        .to_owned();
    expect(
        metrics,
        &[
            ("wasm_echo_plugin_info", &[("version", echo.as_str())], 0.0),
            ("wasm_echo_instances", &[("version", echo.as_str())], 1.0),
            ("wasm_echo_open_connections", &[("listener", "main")], 1.0),
        ],
    );
    assert_eq!(tcp_ask(&mut old, b"after", 5), b"after", "still echo");
    drop(old);
    crate::common::poll_until("the old version to leave the page", || {
        let page = scrape(metrics);
        let gone = value(
            &page,
            "wasm_echo_plugin_info",
            &[("version", echo.as_str())],
        )
        .is_none()
            && value(&page, "wasm_echo_instances", &[("version", echo.as_str())]).is_none();
        gone.then_some(())
    });
    assert_eq!(
        value(
            &scrape(metrics),
            "wasm_echo_plugin_info",
            &[("plugin", "hello")]
        ),
        Some(1.0)
    );
}
