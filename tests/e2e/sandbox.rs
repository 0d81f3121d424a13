//! The sandbox's bounds that hold whatever the guest does: calls that block
//! instead of running, handles piled up, files that are not what their
//! name says, and the host's own warnings, which no peer may multiply.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use crate::common::{
    PATIENCE, Server, one_line_error, plugins, run, scratch_file, send_signal, tcp_ask, tcp_client,
    tcp_read_to_end, udp_ask, udp_client, udp_expect_silence,
};

/// A tenant whose plugin blocks in WASI for an hour on a message that
/// starts with `sleep` (or, with `sleep-on-close`, in `on-close`).
fn sleepy(name: &str, behaviour: &str, extra: &str) -> String {
    format!(
        "[listeners.{name}]\nplugin = \"{}\"\nudp = \"127.0.0.1:0\"\ntcp = \"127.0.0.1:0\"\n\
         plugin-config = {{ behaviour = \"{behaviour}\" }}\n{extra}\n",
        plugins::HOSTILE
    )
}

/// Regression: a datagram whose call blocked in `pollable.block` stalled
/// its tenant's whole UDP listener for as long as the guest liked; the
/// epoch deadline only stops Wasm code that runs.
#[test]
fn a_datagram_blocked_in_wasi_fails_at_its_deadline_and_the_listener_goes_on() {
    let server = Server::with_config(&sleepy("sleepy", "sleep", "call-timeout = \"100ms\""), 2);
    let socket = udp_client(server.udp_of("sleepy"));
    socket.send(b"sleep").expect("send");
    // Served once the blocked call has been abandoned, not an hour later.
    assert_eq!(udp_ask(&socket, b"after"), b"after");
    let log = server.wait_for_log("ran past its 100ms deadline");
    assert!(log.contains("datagram dropped"), "{log}");
}

/// Regression: a TCP connection whose call blocked in WASI was held open
/// (with its slot under `max-connections`) long past the deadline.
#[test]
fn connections_blocked_in_wasi_are_closed_at_the_deadline_and_free_their_slots() {
    let toml = sleepy(
        "sleepy",
        "sleep",
        "call-timeout = \"100ms\"\nmax-connections = 2\n",
    );
    let server = Server::with_config(&toml, 2);
    let addr = server.tcp_of("sleepy");
    let mut blocked: Vec<TcpStream> = (0..2).map(|_| tcp_client(addr)).collect();
    for stream in &mut blocked {
        stream.write_all(b"sleep").expect("send");
    }
    for stream in &mut blocked {
        assert!(tcp_read_to_end(stream).is_empty(), "closed without a reply");
    }
    // Both slots are free again (a moment after the peers saw the close):
    // a third peer is served.
    served_eventually(addr, b"hello");
    // Regression: this read a snapshot of the log, which failed now and
    // then on a busy machine. The line is written by the log's own thread
    // and may reach the pipe after the peers saw their close: wait for it.
    server.wait_for_log("ran past its 100ms deadline");
}

/// Connects to `addr` until a connection is served (one refused while the
/// tenant is full is closed at once) and checks `message` is echoed.
fn served_eventually(addr: SocketAddr, message: &[u8]) {
    let deadline = std::time::Instant::now() + PATIENCE;
    loop {
        let mut next = tcp_client(addr);
        let mut buf = vec![0u8; message.len()];
        if next.write_all(message).is_ok() && next.read_exact(&mut buf).is_ok() {
            assert_eq!(buf, message);
            return;
        }
        assert!(std::time::Instant::now() < deadline, "no slot was freed");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Regression: `on-close` blocked in WASI kept the connection's slot.
#[test]
fn on_close_blocked_in_wasi_ends_at_the_deadline() {
    let toml = sleepy(
        "closer",
        "sleep-on-close",
        "call-timeout = \"100ms\"\nmax-connections = 1\n",
    );
    let server = Server::with_config(&toml, 2);
    let addr = server.tcp_of("closer");
    let mut first = tcp_client(addr);
    assert_eq!(tcp_ask(&mut first, b"one", 3), b"one");
    drop(first);
    // The only slot frees up once on-close has been stopped.
    served_eventually(addr, b"two");
    server.wait_for_log("on-close failed: plugin ran past its 100ms deadline");
}

/// Regression: with `--grace 1s`, SIGTERM logged "grace period over" but a
/// connection blocked in a long call (and a UDP listener in one) kept the
/// process running for as long as the guest slept.
#[test]
fn shutdown_does_not_wait_for_calls_blocked_in_wasi() {
    let toml = format!(
        "grace = \"1s\"\n{}",
        sleepy("sleepy", "sleep", "call-timeout = \"60s\"")
    );
    let mut server = Server::with_config(&toml, 2);
    let mut stream = tcp_client(server.tcp_of("sleepy"));
    stream.write_all(b"sleep").expect("send");
    let socket = udp_client(server.udp_of("sleepy"));
    socket.send(b"sleep").expect("send");
    // Both calls have started (the UDP one is the listener's only call).
    server.wait_for_log("serving");
    std::thread::sleep(Duration::from_millis(200));
    send_signal(server.pid(), "TERM");
    server.wait_for_log("grace period over");
    assert!(server.wait_exit().success());
    assert!(tcp_read_to_end(&mut stream).is_empty());
}

/// Regression: leaked pollables and stream handles were capped only by
/// wasmtime's 100,000 handles a store (+14 MiB of host memory a
/// connection); the host allows an instance 1,024.
#[test]
fn an_instance_cannot_pile_up_handles() {
    let toml = format!(
        "[listeners.leaky]\nplugin = \"{}\"\nudp = \"127.0.0.1:0\"\ntcp = \"127.0.0.1:0\"\n\
         call-timeout = \"5s\"\nplugin-config = {{ behaviour = \"leak-handles\" }}\n",
        plugins::HOSTILE
    );
    let server = Server::with_config(&toml, 2);
    let mut stream = tcp_client(server.tcp_of("leaky"));
    stream.write_all(b"leak").expect("send");
    assert!(tcp_read_to_end(&mut stream).is_empty(), "the call failed");
    let socket = udp_client(server.udp_of("leaky"));
    socket.send(b"leak").expect("send");
    udp_expect_silence(&socket, Duration::from_millis(500));
    let log = server.wait_for_log("datagram dropped");
    assert!(
        log.lines()
            .filter(|line| line.contains("resource table has no free keys"))
            .count()
            >= 2,
        "both calls failed on the handle limit:\n{log}"
    );
}

/// The one line `wasm-echo ARGS` fails with.
fn refused(args: &[&str]) -> String {
    one_line_error(&run(args), &[])
}

/// Regression: `check /dev/zero` and `plugin = "/dev/zero"` grew the
/// process by gigabytes until it was killed; a FIFO hung `serve`.
#[test]
fn only_regular_files_are_read_as_plugins_or_configurations() {
    let error = refused(&["check", "/dev/zero"]);
    assert!(
        error.contains("/dev/zero is a character device, not a regular file"),
        "{error}"
    );
    let error = refused(&["serve", "--plugin", "/dev/zero", "--udp", "127.0.0.1:0"]);
    assert!(error.contains("is a character device"), "{error}");
    let error = refused(&["serve", "--config", "/dev/zero"]);
    assert!(error.contains("/dev/zero is a character device"), "{error}");
    let dir = scratch_file("placeholder", b"");
    let dir = dir.parent().expect("scratch dir");
    let error = refused(&["check", dir.to_str().expect("utf-8")]);
    assert!(error.contains("is a directory"), "{error}");

    let fifo = dir.join("plugin.wasm");
    let made = std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .expect("mkfifo runs");
    assert!(made.success());
    let toml = format!(
        "[listeners.piped]\nplugin = \"{}\"\nudp = \"127.0.0.1:0\"\n",
        fifo.display()
    );
    let config = scratch_file("fifo.toml", toml.as_bytes());
    let error = refused(&["serve", "--config", config.to_str().expect("utf-8")]);
    assert!(error.contains("is a FIFO, not a regular file"), "{error}");
}

/// A component larger than `max-plugin-size` is refused before it is read.
#[test]
fn plugin_files_are_read_up_to_a_size_limit() {
    let mut big = b"\0asm\x0d\0\x01\0".to_vec();
    big.resize(2 << 20, 0);
    let path = scratch_file("big.wasm", &big);
    let path = path.to_str().expect("utf-8");
    let error = refused(&["check", path, "--max-plugin-size", "1MiB"]);
    assert!(
        error.contains(
            "is 2097152 bytes, more than the limit of 1048576 bytes (raise it with max-plugin-size)"
        ),
        "{error}"
    );
    let toml = format!(
        "max-plugin-size = \"1MiB\"\n[listeners.big]\nplugin = \"{path}\"\nudp = \"127.0.0.1:0\"\n"
    );
    let config = scratch_file("big.toml", toml.as_bytes());
    let error = refused(&["serve", "--config", config.to_str().expect("utf-8")]);
    assert!(
        error.contains("more than the limit of 1048576 bytes"),
        "{error}"
    );
    let output = run(&["check", "echo", "--max-plugin-size", "1KiB"]);
    assert!(!output.status.success());
    let error = String::from_utf8_lossy(&output.stderr);
    assert!(
        error.contains("1KiB is out of range (1MiB to 4GiB)"),
        "{error}"
    );
}

/// Resident memory of process `pid`, in KiB.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|kib| kib.parse().ok())
        .expect("VmRSS")
}

/// Regression: `reload --plugin /dev/zero` made the running server grow by
/// about 1.3 GB/s until the kernel killed it, with every tenant.
#[test]
fn a_reload_from_a_device_changes_nothing_and_costs_nothing() {
    let control = scratch_file("placeholder", b"").with_file_name("control.sock");
    let control = control.to_str().expect("utf-8");
    let server = Server::start("echo", &["--control", control]);
    let before = rss_kib(server.pid());
    for device in ["/dev/zero", "/dev/urandom"] {
        let error = refused(&["reload", "--control", control, "--plugin", device]);
        assert!(error.contains("is a character device"), "{error}");
    }
    assert_eq!(udp_ask(&udp_client(server.udp()), b"still"), b"still");
    let after = rss_kib(server.pid());
    assert!(
        after < before + 64 * 1024,
        "resident memory grew from {before} KiB to {after} KiB"
    );
}

/// Regression: 1,000 datagrams that each made the plugin fail produced
/// 1,037 host log lines ("datagram dropped: plugin is backing off"): a
/// peer decided how much the host wrote.
#[test]
fn a_failing_tenant_cannot_make_the_host_log_per_datagram() {
    let server = Server::start(plugins::TRAP, &[]);
    let socket = udp_client(server.udp());
    for _ in 0..1_000 {
        socket.send(b"panic").expect("send");
    }
    // The held-back warnings are summed up once their window is over.
    let log = server.wait_for_log("more warnings not logged");
    let lines = log.lines().count();
    assert!(lines < 60, "{lines} log lines for 1,000 datagrams:\n{log}");
    let summary = log
        .lines()
        .find(|line| line.contains("more warnings not logged"))
        .expect("summary");
    assert!(summary.contains("datagram dropped"), "{summary}");
    // And the tenant still answers once it has stopped failing.
    let deadline = std::time::Instant::now() + PATIENCE;
    socket
        .set_read_timeout(Some(Duration::from_millis(200)))
        .expect("timeout");
    let mut buf = [0u8; 16];
    loop {
        socket.send(b"fine").expect("send");
        if let Ok(len) = socket.recv(&mut buf)
            && &buf[..len] == b"fine"
        {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "never answered again");
    }
}

/// The same bound on the TCP side: connections that fail one after another
/// log a bounded number of lines.
#[test]
fn failing_connections_cannot_make_the_host_log_per_connection() {
    let server = Server::start(plugins::TRAP, &[]);
    for _ in 0..200 {
        let mut stream = tcp_client(server.tcp());
        let _ = stream.write_all(b"panic");
        let _ = tcp_read_to_end(&mut stream);
    }
    let log = server.wait_for_log("more warnings not logged");
    let closed = log
        .lines()
        .filter(|line| line.contains("connection closed:"))
        .count();
    assert!(
        closed <= 10,
        "{closed} 'connection closed' lines for 200 failing connections:\n{log}"
    );
}

/// A new version over the tenant's `table-elements` or `instances`, or
/// whose start-up runs past the call deadline, fails to start: `reload`
/// says which limit in one line, and the listener goes on with the
/// version it had. Regression guard: limits that held for calls but not
/// for instantiation, or a failed start that left the listener without a
/// plugin.
#[test]
fn a_version_over_the_table_instance_or_start_limits_fails_cleanly() {
    use crate::reload::component_with;

    let control = crate::common::control_path();
    let toml = "[listeners.main]\nplugin = \"echo\"\nudp = \"127.0.0.1:0\"\n\
                table-elements = 100\ninstances = 10\ncall-timeout = \"50ms\"\n";
    let server = Server::with_config_and(
        toml,
        1,
        &["--control", control.to_str().expect("utf-8 path")],
    );
    let socket = udp_client(server.udp());
    assert_eq!(udp_ask(&socket, b"before"), b"before");
    let grow = "(drop (table.grow 0 (ref.null func) (i32.const 200)))";
    let cases: [(Vec<u8>, &[&str]); 4] = [
        // A table born too big does not fit the pool sized for the limit.
        (
            component_with("nop", 101, 0),
            &[
                "does not compile: ",
                "table index 0 has a minimum element size of 101 which exceeds the limit of 100",
            ],
        ),
        (
            component_with(grow, 1, 0),
            &["fails to start: plugin tried to grow its table to 201 (limit 100)"],
        ),
        (
            component_with("nop", 1, 10),
            &[
                "fails to start: plugin trapped: resource limit exceeded: instance count too high at 11",
            ],
        ),
        (
            component_with("(loop br 0)", 1, 0),
            &["fails to start: plugin ran past its 50ms deadline"],
        ),
    ];
    for (bytes, cause) in cases {
        let file = scratch_file("over.wasm", &bytes);
        let mut needles = vec!["reload failed, nothing changed: listener `main`: "];
        needles.extend_from_slice(cause);
        let line = one_line_error(
            &crate::common::control(
                "reload",
                &control,
                &["--plugin", file.to_str().expect("utf-8 path")],
            ),
            &needles,
        );
        assert_eq!(
            udp_ask(&socket, b"still echo"),
            b"still echo",
            "after {line}"
        );
    }
    // Within the limits, the same kind of component starts.
    let fits = scratch_file("fits.wasm", &component_with("nop", 100, 8));
    let output = crate::common::control(
        "reload",
        &control,
        &["--plugin", fits.to_str().expect("utf-8 path")],
    );
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
}
