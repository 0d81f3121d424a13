//! Peers and log readers that stop reading cannot hold the server: a TCP
//! peer that sends but never reads is reset after the write timeout (and a
//! slow one that reads is not), and a log pipe that is closed or never read
//! holds up neither serving nor SIGTERM.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use crate::common::{
    BIN, PATIENCE, Server, plugins, scratch_file, send_signal, tcp_ask, tcp_client,
};
use crate::metrics::{expect, scrape, value};

/// How long a server may take to exit after SIGTERM in these tests: the
/// grace period (none of them keeps a connection open), the exit's bounded
/// waits, and room for a busy machine. Today's bugs never exit at all.
const EXIT_WITHIN: Duration = Duration::from_secs(15);

/// Waits up to [`EXIT_WITHIN`] for `child` to exit; kills it and fails the
/// test if it does not.
fn exits_in_time(child: &mut Child, what: &str) -> std::process::ExitStatus {
    let deadline = Instant::now() + EXIT_WITHIN;
    loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            return status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{what}: the server did not exit within {EXIT_WITHIN:?} of SIGTERM");
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// Writes `total` bytes to `stream` in 64 KiB pieces without ever reading,
/// on a thread of its own; the thread returns how many bytes went out and
/// the error that stopped it, if any.
fn flood(
    mut stream: TcpStream,
    total: usize,
) -> thread::JoinHandle<(usize, Option<std::io::Error>)> {
    stream
        .set_write_timeout(Some(PATIENCE))
        .expect("write timeout");
    thread::spawn(move || {
        let chunk = vec![b'x'; 64 << 10];
        let mut sent = 0;
        while sent < total {
            match stream.write(&chunk) {
                Ok(written) => sent += written,
                Err(error) => return (sent, Some(error)),
            }
        }
        (sent, None)
    })
}

/// The `wasm_echo_closes_total` series of `listener` for `reason`.
fn closes<'a>(listener: &'a str, reason: &'a str) -> [(&'a str, &'a str); 2] {
    [("listener", listener), ("reason", reason)]
}

/// Issue 12, item 5: a client sent megabytes to `echo` and stopped
/// reading; the server stayed blocked writing the reply, the idle timer did
/// not run during the write, and the connection (its slot and its plugin
/// instance) stayed open long after `idle-timeout`. Now a write that makes
/// no progress for the write timeout (by default the idle timeout, at most
/// 10 s) resets the connection and counts it; the tenant's other clients
/// are served meanwhile.
#[test]
fn a_peer_that_sends_but_never_reads_is_reset_after_the_write_timeout() {
    let server = Server::with_config_and(
        r#"
        [listeners.deaf]
        plugin = "echo"
        tcp = "127.0.0.1:0"
        idle-timeout = "2s"
        "#,
        2,
        &["--metrics", "127.0.0.1:0"],
    );
    let metrics = server.metrics.expect("metrics address");
    let flooding = flood(tcp_client(server.tcp_of("deaf")), 256 << 20);
    // The deaf peer's echo is under way (and its connection still open)
    // when another client of the same tenant asks.
    expect(
        metrics,
        &[("wasm_echo_open_connections", &[("listener", "deaf")], 1.0)],
    );
    let mut good = tcp_client(server.tcp_of("deaf"));
    assert_eq!(tcp_ask(&mut good, b"still served", 12), b"still served");
    drop(good);
    expect(
        metrics,
        &[
            (
                "wasm_echo_closes_total",
                &closes("deaf", "write-timeout"),
                1.0,
            ),
            ("wasm_echo_open_connections", &[("listener", "deaf")], 0.0),
        ],
    );
    let (sent, error) = flooding.join().expect("flood thread");
    assert!(
        error.is_some(),
        "the deaf peer sent all {sent} bytes: it should have been reset"
    );
    let mut after = tcp_client(server.tcp_of("deaf"));
    assert_eq!(tcp_ask(&mut after, b"and after", 9), b"and after");
}

/// Per-write progress, not the whole reply: a peer that reads slowly, with
/// a receive buffer far smaller than the reply, takes an 8 MiB echo over
/// several write timeouts and keeps its connection.
#[test]
fn a_slow_reader_keeps_its_connection_through_a_long_reply() {
    let server = Server::with_config_and(
        r#"
        [listeners.slow]
        plugin = "echo"
        tcp = "127.0.0.1:0"
        framing = "lines"
        max-message = "9MiB"
        max-reply = "9MiB"
        write-timeout = "300ms"
        "#,
        2,
        &["--metrics", "127.0.0.1:0"],
    );
    let metrics = server.metrics.expect("metrics address");
    let socket =
        socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).expect("socket");
    // A small window: the reply must trickle out write by write.
    socket.set_recv_buffer_size(64 << 10).expect("SO_RCVBUF");
    socket
        .connect(&server.tcp_of("slow").into())
        .expect("connect");
    let mut stream = TcpStream::from(socket);
    stream.set_read_timeout(Some(PATIENCE)).expect("timeout");
    let mut line = vec![b'y'; 8 << 20];
    line.push(b'\n');
    let writer = {
        let mut stream = stream.try_clone().expect("clone");
        let line = line.clone();
        thread::spawn(move || stream.write_all(&line))
    };
    let started = Instant::now();
    let mut echoed = Vec::with_capacity(line.len());
    let mut piece = vec![0u8; 64 << 10];
    while echoed.len() < line.len() {
        let read = stream.read(&mut piece).expect("the echo keeps coming");
        assert!(read > 0, "closed after {} bytes", echoed.len());
        echoed.extend_from_slice(&piece[..read]);
        // A slow reader, but one that reads well within the write timeout.
        thread::sleep(Duration::from_millis(10));
    }
    writer.join().expect("writer").expect("the line went out");
    assert!(echoed == line, "the echo came back changed");
    assert!(
        started.elapsed() > Duration::from_millis(300),
        "the reply took less than one write timeout: this test proves nothing"
    );
    let scrape = scrape(metrics);
    assert_eq!(
        value(
            &scrape,
            "wasm_echo_closes_total",
            &closes("slow", "write-timeout")
        ),
        Some(0.0)
    );
}

/// The same hole in `on-open`: a greeting bigger than the socket buffers,
/// to a peer that connects and reads nothing, held the connection forever
/// (the idle timer only starts after the greeting).
#[test]
fn a_greeting_nobody_reads_is_reset_after_the_write_timeout() {
    let server = Server::with_config_and(
        &format!(
            r#"
            [listeners.greeter]
            plugin = "{}"
            tcp = "127.0.0.1:0"
            max-reply = "16MiB"
            idle-timeout = "500ms"
            plugin-config = {{ behaviour = "huge-greeting" }}
            "#,
            plugins::HOSTILE
        ),
        2,
        &["--metrics", "127.0.0.1:0"],
    );
    let metrics = server.metrics.expect("metrics address");
    let deaf = tcp_client(server.tcp_of("greeter"));
    expect(
        metrics,
        &[
            (
                "wasm_echo_closes_total",
                &closes("greeter", "write-timeout"),
                1.0,
            ),
            (
                "wasm_echo_open_connections",
                &[("listener", "greeter")],
                0.0,
            ),
        ],
    );
    drop(deaf);
}

/// The same hole in a fail-open tenant's echo of failed messages: the
/// host's own writes, not the plugin's, to a peer that never reads.
#[test]
fn a_fail_open_echo_nobody_reads_is_reset_after_the_write_timeout() {
    let server = Server::with_config_and(
        &format!(
            r#"
            [listeners.open]
            plugin = "{}"
            tcp = "127.0.0.1:0"
            on-failure = "fail-open"
            idle-timeout = "500ms"
            plugin-config = {{ behaviour = "panic" }}
            "#,
            plugins::HOSTILE
        ),
        2,
        &["--metrics", "127.0.0.1:0"],
    );
    let metrics = server.metrics.expect("metrics address");
    let flooding = flood(tcp_client(server.tcp_of("open")), 256 << 20);
    expect(
        metrics,
        &[(
            "wasm_echo_closes_total",
            &closes("open", "write-timeout"),
            1.0,
        )],
    );
    let (sent, error) = flooding.join().expect("flood thread");
    assert!(error.is_some(), "all {sent} bytes went out: no reset");
}

/// A control socket path of this test's own, so that its server neither
/// fails to bind the shared default nor removes another server's socket.
fn control_path() -> std::path::PathBuf {
    scratch_file("unused", b"").with_file_name("control.sock")
}

/// A server started with stdout and stderr on one pipe, as `serve 2>&1 |
/// head` or a log collector would have it.
struct Piped {
    child: Child,
    /// The pipe's read end, until the test closes it.
    output: Option<BufReader<std::io::PipeReader>>,
}

impl Piped {
    fn start(args: &[&str]) -> Self {
        let (reader, writer) = std::io::pipe().expect("a pipe");
        let child = Command::new(BIN)
            .arg("serve")
            .args(args)
            .stdin(Stdio::null())
            .stdout(writer.try_clone().expect("clone the pipe"))
            .stderr(writer)
            .spawn()
            .expect("wasm-echo serve starts");
        Self {
            child,
            output: Some(BufReader::new(reader)),
        }
    }

    /// Reads lines until one says `listening tcp ADDR`; returns ADDR.
    fn tcp_addr(&mut self) -> SocketAddr {
        let output = self.output.as_mut().expect("the pipe is open");
        let mut line = String::new();
        loop {
            line.clear();
            let read = output.read_line(&mut line).expect("server output");
            assert!(read > 0, "the server exited without listening on tcp");
            if let Some(rest) = line.strip_prefix("listening tcp ") {
                let addr = rest.split_whitespace().next().expect("an address");
                return addr.parse().expect("a socket address");
            }
        }
    }
}

impl Drop for Piped {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Issue 12, item 6: `wasm-echo serve 2>&1 | head -2`, then SIGTERM: the
/// process never exited (nor after a second SIGTERM); it took SIGKILL. A
/// log line written to the closed pipe failed, tracing reported the failure
/// with an `eprintln!`, which panicked on the closed stderr, and the task
/// that had just received SIGTERM died before it could shut anything down.
/// Any other task that logged died the same way. Shutdown (and serving)
/// must not depend on the log being writable.
#[test]
fn sigterm_stops_a_server_whose_log_pipe_was_closed() {
    let mut server = Piped::start(&[
        "--plugin",
        plugins::HOSTILE,
        "--plugin-config",
        "behaviour=flood-log",
        "--tcp",
        "127.0.0.1:0",
        "--control",
        control_path().to_str().expect("utf-8"),
    ]);
    let addr = server.tcp_addr();
    let mut client = tcp_client(addr);
    // Served once: every start-up line has been written.
    assert_eq!(tcp_ask(&mut client, b"before", 6), b"before");
    // `head` has read its lines and gone.
    server.output = None;
    // Every message logs, and every line now fails.
    for round in 0..3 {
        let message = format!("after {round}");
        assert_eq!(
            tcp_ask(&mut client, message.as_bytes(), message.len()),
            message.as_bytes(),
            "no reply once the log pipe was closed"
        );
    }
    send_signal(server.child.id(), "TERM");
    let status = exits_in_time(&mut server.child, "closed log pipe");
    assert!(status.success(), "exit status {status:?}");
}

/// Issue 12, item 6, its worse twin: a log collector that stops reading but
/// keeps its pipe open. Once the pipe is full every write to it blocks, and
/// so did every thread that logged: replies stopped, and so did SIGTERM.
/// Now lines are dropped (and counted) instead, and the server answers and
/// stops as usual.
#[test]
fn a_stalled_log_reader_holds_up_neither_replies_nor_sigterm() {
    let config = scratch_file(
        "stalled-log.toml",
        format!(
            r#"
            [listeners.chatty]
            plugin = "{}"
            tcp = "127.0.0.1:0"
            log-rate = 1000000
            call-timeout = "5s"
            plugin-config = {{ behaviour = "flood-log" }}
            "#,
            plugins::HOSTILE
        )
        .as_bytes(),
    );
    let mut server = Piped::start(&[
        "--config",
        config.to_str().expect("utf-8"),
        "--control",
        control_path().to_str().expect("utf-8"),
    ]);
    let addr = server.tcp_addr();
    // From here on nobody reads the pipe; each message logs some 10,000
    // lines, about a megabyte, and the pipe holds 64 KiB.
    let mut client = tcp_client(addr);
    client
        .set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    for round in 0..10 {
        let message = format!("round {round}");
        assert_eq!(
            tcp_ask(&mut client, message.as_bytes(), message.len()),
            message.as_bytes(),
            "no reply while the log is stalled"
        );
    }
    send_signal(server.child.id(), "TERM");
    let status = exits_in_time(&mut server.child, "stalled log pipe");
    assert!(status.success(), "exit status {status:?}");
}

/// A second Ctrl-C or SIGTERM during the grace period closes the open
/// connections at once instead of waiting the grace out.
#[test]
fn a_second_sigterm_ends_the_grace_period() {
    let mut server = Server::start("echo", &["--grace", "10m"]);
    let mut lingering = tcp_client(server.tcp());
    assert_eq!(tcp_ask(&mut lingering, b"hi", 2), b"hi");
    send_signal(server.pid(), "TERM");
    server.wait_for_log("1 connection(s) have 10m to finish");
    send_signal(server.pid(), "TERM");
    let deadline = Instant::now() + EXIT_WITHIN;
    while server.is_running() {
        assert!(
            Instant::now() < deadline,
            "a second SIGTERM did not cut the grace period short:\n{}",
            server.stderr()
        );
        thread::sleep(Duration::from_millis(20));
    }
    assert!(server.wait_exit().success());
    let mut rest = Vec::new();
    let _ = lingering.read_to_end(&mut rest);
    assert!(rest.is_empty());
}
