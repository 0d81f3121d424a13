use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::thread;
use std::time::{Duration, Instant};

use prometheus_parse::{Scrape, Value};

use crate::common::{
    PATIENCE, Server, control_path, one_line_error, plugins, poll_until, run, scratch_file,
    tcp_ask, tcp_client, udp_ask, udp_client,
};

/// GETs `/metrics` over plain HTTP and parses the Prometheus text.
pub(crate) fn scrape(addr: SocketAddr) -> Scrape {
    let mut stream = TcpStream::connect(addr).expect("metrics endpoint");
    stream.set_read_timeout(Some(PATIENCE)).expect("timeout");
    write!(
        stream,
        "GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .expect("request");
    let mut response = String::new();
    stream.read_to_string(&mut response).expect("response");
    let (head, body) = response.split_once("\r\n\r\n").expect("an HTTP response");
    assert!(head.starts_with("HTTP/1.1 200 OK"), "{head}");
    assert!(
        head.contains("Content-Type: text/plain; version=0.0.4"),
        "{head}"
    );
    Scrape::parse(body.lines().map(|line| Ok(line.to_owned()))).expect("Prometheus text")
}

/// The value of the sample of `metric` whose labels include `labels`.
pub(crate) fn value(scrape: &Scrape, metric: &str, labels: &[(&str, &str)]) -> Option<f64> {
    scrape
        .samples
        .iter()
        .filter(|sample| sample.metric == metric)
        .find(|sample| {
            labels
                .iter()
                .all(|(key, value)| sample.labels.get(key) == Some(value))
        })
        .map(|sample| match &sample.value {
            Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v) => *v,
            Value::Histogram(buckets) => buckets.last().map_or(0.0, |bucket| bucket.count),
            Value::Summary(_) => f64::NAN,
        })
}

/// A series (name and some of its labels) and the value it should have.
pub(crate) type Expectation<'a> = (&'a str, &'a [(&'a str, &'a str)], f64);

/// Waits until every expectation holds (counters are bumped just after a
/// reply leaves, so a scrape may briefly lag the client), then returns the
/// scrape; fails with the last values if they never do.
pub(crate) fn expect(addr: SocketAddr, expected: &[Expectation]) -> Scrape {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let scrape = scrape(addr);
        let wrong: Vec<_> = expected
            .iter()
            .filter_map(|(metric, labels, want)| {
                let got = value(&scrape, metric, labels);
                (got != Some(*want))
                    .then(|| format!("{metric}{labels:?}: want {want}, got {got:?}"))
            })
            .collect();
        if wrong.is_empty() {
            return scrape;
        }
        assert!(
            Instant::now() < deadline,
            "metrics never matched:\n{}",
            wrong.join("\n")
        );
        thread::sleep(Duration::from_millis(20));
    }
}

fn metrics_addr(server: &Server) -> SocketAddr {
    server.metrics.expect("serving metrics")
}

#[test]
fn counters_move_by_exactly_the_traffic_sent() {
    let server = Server::start("echo", &["--metrics", "127.0.0.1:0"]);
    let metrics = metrics_addr(&server);
    let main = [("listener", "main")];
    let socket = udp_client(server.udp());
    for _ in 0..7 {
        assert_eq!(udp_ask(&socket, b"ten bytes!"), b"ten bytes!");
    }
    for _ in 0..2 {
        let mut stream = tcp_client(server.tcp());
        for _ in 0..3 {
            assert_eq!(tcp_ask(&mut stream, b"five!", 5), b"five!");
        }
    }
    let scrape = expect(
        metrics,
        &[
            ("wasm_echo_datagrams_total", &main, 7.0),
            (
                "wasm_echo_bytes_in_total",
                &[("listener", "main"), ("protocol", "udp")],
                70.0,
            ),
            (
                "wasm_echo_bytes_out_total",
                &[("listener", "main"), ("protocol", "udp")],
                70.0,
            ),
            (
                "wasm_echo_replies_total",
                &[("listener", "main"), ("protocol", "udp")],
                7.0,
            ),
            ("wasm_echo_tcp_connections_total", &main, 2.0),
            ("wasm_echo_tcp_messages_total", &main, 6.0),
            (
                "wasm_echo_bytes_in_total",
                &[("listener", "main"), ("protocol", "tcp")],
                30.0,
            ),
            (
                "wasm_echo_replies_total",
                &[("listener", "main"), ("protocol", "tcp")],
                6.0,
            ),
            (
                "wasm_echo_closes_total",
                &[("listener", "main"), ("reason", "peer")],
                2.0,
            ),
            ("wasm_echo_open_connections", &main, 0.0),
            (
                "wasm_echo_drops_total",
                &[("listener", "main"), ("reason", "failed")],
                0.0,
            ),
        ],
    );
    let info = scrape
        .samples
        .iter()
        .find(|s| s.metric == "wasm_echo_plugin_info")
        .expect("an info series");
    let digest = info.labels.get("digest").expect("digest label");
    assert_eq!(digest.len(), 12);
    assert_eq!(
        info.labels.get("version"),
        Some(format!("echo@{digest}").as_str())
    );
    // 7 datagrams and 6 messages went through the plugin, each timed once.
    let calls = scrape
        .samples
        .iter()
        .filter(|s| s.metric == "wasm_echo_plugin_call_seconds_count")
        .map(|s| match s.value {
            Value::Untyped(v) | Value::Counter(v) => v,
            _ => 0.0,
        })
        .sum::<f64>();
    assert_eq!(calls, 13.0);
}

#[test]
fn failures_and_reloads_are_counted_by_kind() {
    let control = control_path();
    let control_arg = control.to_str().expect("utf-8 path");
    let server = Server::start(
        plugins::TRAP,
        &[
            "--metrics",
            "127.0.0.1:0",
            "--call-timeout",
            "50ms",
            "--control",
            control_arg,
        ],
    );
    let metrics = metrics_addr(&server);
    let socket = udp_client(server.udp());
    socket.send(b"panic").expect("send");
    socket.send(b"loop").expect("send");
    assert_eq!(udp_ask(&socket, b"fine"), b"fine");
    assert!(
        !crate::common::control("reload", &control, &["--plugin", "/nonexistent.wasm"])
            .status
            .success()
    );
    assert!(
        crate::common::control("reload", &control, &["--plugin", "echo"])
            .status
            .success()
    );
    let version = value(
        &scrape(metrics),
        "wasm_echo_plugin_info",
        &[("plugin", "trap")],
    );
    // The replaced version no longer serves: its info is 0 while some of
    // its instances live on, and gone once the last is dropped (since state
    // hand-over, a UDP listener's instance moves at the swap itself).
    assert!(
        matches!(version, None | Some(0.0)),
        "the replaced version's info drops to 0 or is retired: {version:?}"
    );
    // The failures were the replaced version's: the listener's totals keep
    // them once that version's own series are retired with it.
    let scrape = expect(
        metrics,
        &[
            (
                "wasm_echo_listener_plugin_failures_total",
                &[("listener", "main"), ("kind", "trap")],
                1.0,
            ),
            (
                "wasm_echo_listener_plugin_failures_total",
                &[("listener", "main"), ("kind", "deadline")],
                1.0,
            ),
            (
                "wasm_echo_drops_total",
                &[("listener", "main"), ("reason", "failed")],
                2.0,
            ),
            (
                "wasm_echo_reloads_total",
                &[("listener", "main"), ("result", "ok")],
                1.0,
            ),
            (
                "wasm_echo_reloads_total",
                &[("listener", "main"), ("result", "failed")],
                1.0,
            ),
            (
                "wasm_echo_plugin_info",
                &[("listener", "main"), ("plugin", "echo")],
                1.0,
            ),
        ],
    );
    assert!(
        value(
            &scrape,
            "wasm_echo_instantiation_seconds",
            &[("listener", "main")]
        )
        .is_some()
    );

    let output = run(&["status", &metrics.to_string(), "--interval", "100ms"]);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let row = stdout
        .lines()
        .find(|line| line.starts_with("main "))
        .expect("a row for main");
    assert!(row.contains("echo@"), "{stdout}");
    assert!(row.contains(" 1/1"), "one reload ok, one failed: {stdout}");
}

#[test]
fn json_logs_are_json_and_name_listener_and_peer() {
    let server = Server::start(plugins::TRAP, &["--log-format", "json"]);
    let socket = udp_client(server.udp());
    socket.send(b"panic").expect("send");
    server.wait_for_log("datagram dropped");
    let peer = socket.local_addr().expect("addr").to_string();
    let mut found = false;
    for line in server.stderr().lines() {
        let entry: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        let fields = &entry["fields"];
        if fields["message"]
            .as_str()
            .is_some_and(|m| m.contains("datagram dropped"))
        {
            assert_eq!(fields["listener"], "main");
            assert_eq!(fields["peer"], peer.as_str());
            assert!(
                fields["version"]
                    .as_str()
                    .is_some_and(|v| v.starts_with("trap@")),
                "{line}"
            );
            found = true;
        }
    }
    assert!(found);
}

#[test]
fn status_says_when_nothing_serves_metrics() {
    let addr = crate::common::free_port().to_string();
    one_line_error(&run(&["status", &addr]), &["nothing serves metrics on"]);
}

#[test]
fn refused_replies_are_counted_as_refused_not_failed() {
    // Regression: a refused UDP reply was counted as `failed`.
    let server = Server::start(
        plugins::HOSTILE,
        &[
            "--plugin-config",
            "behaviour=huge-reply",
            "--metrics",
            "127.0.0.1:0",
        ],
    );
    let metrics = metrics_addr(&server);
    let socket = udp_client(server.udp());
    socket.send(b"hello").expect("send");
    let mut stream = tcp_client(server.tcp());
    stream.write_all(b"hello").expect("send");
    assert!(crate::common::tcp_read_to_end(&mut stream).is_empty());
    expect(
        metrics,
        &[
            (
                "wasm_echo_drops_total",
                &[("listener", "main"), ("reason", "refused-reply")],
                2.0,
            ),
            (
                "wasm_echo_drops_total",
                &[("listener", "main"), ("reason", "failed")],
                0.0,
            ),
            (
                "wasm_echo_closes_total",
                &[("listener", "main"), ("reason", "failed")],
                1.0,
            ),
            (
                "wasm_echo_plugin_failures_total",
                &[("listener", "main"), ("kind", "reply")],
                2.0,
            ),
            (
                "wasm_echo_listener_plugin_failures_total",
                &[("listener", "main"), ("kind", "reply")],
                2.0,
            ),
        ],
    );
}

/// `component` with a custom section appended: the same plugin, with
/// other bytes and so another digest.
pub(crate) fn with_custom_section(component: &[u8], payload: &[u8]) -> Vec<u8> {
    fn leb128(mut value: usize, out: &mut Vec<u8>) {
        loop {
            let byte = (value & 0x7f) as u8;
            value >>= 7;
            if value == 0 {
                out.push(byte);
                return;
            }
            out.push(byte | 0x80);
        }
    }
    let name = b"wasm-echo-test";
    let mut section = Vec::new();
    leb128(name.len(), &mut section);
    section.extend_from_slice(name);
    section.extend_from_slice(payload);
    let mut bytes = component.to_vec();
    bytes.push(0);
    leb128(section.len(), &mut bytes);
    bytes.extend_from_slice(&section);
    bytes
}

/// How many versions have a `wasm_echo_plugin_info` series.
fn info_series(scrape: &Scrape) -> usize {
    scrape
        .samples
        .iter()
        .filter(|s| s.metric == "wasm_echo_plugin_info")
        .count()
}

/// The number of lines of the `/metrics` page.
fn page_lines(addr: SocketAddr) -> usize {
    let mut stream = TcpStream::connect(addr).expect("metrics endpoint");
    stream.set_read_timeout(Some(PATIENCE)).expect("timeout");
    write!(
        stream,
        "GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .expect("request");
    let mut response = String::new();
    stream.read_to_string(&mut response).expect("response");
    let (_, body) = response.split_once("\r\n\r\n").expect("an HTTP response");
    body.lines().count()
}

#[test]
fn retired_versions_leave_the_metrics_and_their_counts_stay_in_the_totals() {
    // Regression: every version ever swapped in kept its ~50 series, so a
    // server reloading every few seconds grew its page without bound.
    let control = control_path();
    let control_arg = control.to_str().expect("utf-8 path");
    let server = Server::start(
        "echo",
        &["--metrics", "127.0.0.1:0", "--control", control_arg],
    );
    let metrics = metrics_addr(&server);
    let echo = std::fs::read(plugins::ECHO).expect("built echo plugin");
    let socket = udp_client(server.udp());
    let mut calls = 0.0;
    // Traffic on the version just swapped in: the datagram moves the UDP
    // listener's instance to it, and the connection opens and closes on it.
    let mut traffic = || {
        assert_eq!(udp_ask(&socket, b"ping"), b"ping");
        let mut stream = tcp_client(server.tcp());
        assert_eq!(tcp_ask(&mut stream, b"pong", 4), b"pong");
        calls += 2.0;
    };
    traffic();
    let mut size_after_first_swap = None;
    for version in 1..=50u32 {
        let plugin = scratch_file(
            "echo.wasm",
            &with_custom_section(&echo, &version.to_le_bytes()),
        );
        let reloaded = crate::common::control(
            "reload",
            &control,
            &["--plugin", plugin.to_str().expect("utf-8 path")],
        );
        assert!(
            reloaded.status.success(),
            "{}",
            String::from_utf8_lossy(&reloaded.stderr)
        );
        traffic();
        if size_after_first_swap.is_none() {
            // Once the replaced version's connection has closed, only the
            // current version is left.
            poll_until("the first version to retire", || {
                (info_series(&scrape(metrics)) <= 1).then_some(())
            });
            size_after_first_swap = Some(page_lines(metrics));
        }
    }
    let size = size_after_first_swap.expect("measured");
    poll_until(
        &format!("the page to shrink back to its {size} lines after one version"),
        || (page_lines(metrics) <= size).then_some(()),
    );
    let scrape = expect(
        metrics,
        &[
            (
                "wasm_echo_listener_plugin_call_seconds_count",
                &[("listener", "main")],
                calls,
            ),
            (
                "wasm_echo_listener_instantiation_seconds_count",
                &[("listener", "main")],
                // A UDP instance and a connection's per version.
                2.0 * 51.0,
            ),
            (
                "wasm_echo_reloads_total",
                &[("listener", "main"), ("result", "ok")],
                50.0,
            ),
        ],
    );
    assert_eq!(info_series(&scrape), 1, "only the current version is left");
    assert_eq!(value(&scrape, "wasm_echo_plugin_info", &[]), Some(1.0));
}

/// The series no other test moves, each by exactly what the test did: a
/// connection rejected over `max-connections`, closes by the plugin, by
/// the idle timeout and by a protocol error, a memory failure, a reply
/// refused for its size, and the bytes sent (UDP and TCP, framing
/// included).
#[test]
fn rejections_closes_failures_and_bytes_out_move_by_exactly_what_happened() {
    let toml = format!(
        "[listeners.main]\nplugin = \"{}\"\nudp = \"127.0.0.1:0\"\ntcp = \"127.0.0.1:0\"\n\
         framing = \"lines\"\nmax-message = \"64B\"\nmax-connections = 1\n\
         idle-timeout = \"500ms\"\ncall-timeout = \"2s\"\nmemory-limit = \"4MiB\"\n\
         max-reply = \"32B\"\n",
        plugins::TRAP
    );
    let server = Server::with_config_and(&toml, 3, &["--metrics", "127.0.0.1:0"]);
    let metrics = metrics_addr(&server);
    let main = [("listener", "main")];
    let closes = |reason| [("listener", "main"), ("reason", reason)];
    let open_none = || {
        expect(metrics, &[("wasm_echo_open_connections", &main, 0.0)]);
    };

    // Closed by the plugin, after its reply: 6 + 4 bytes out.
    let mut stream = tcp_client(server.tcp());
    assert_eq!(tcp_ask(&mut stream, b"hello\n", 6), b"hello\n");
    assert_eq!(tcp_ask(&mut stream, b"close\n", 4), b"bye\n");
    crate::common::expect_closed_by_server(&mut stream);
    open_none();
    // Closed for a line longer than max-message.
    let mut stream = tcp_client(server.tcp());
    stream.write_all(&[b'x'; 100]).expect("send");
    crate::common::expect_closed_by_server(&mut stream);
    open_none();
    // One connection holds the only slot; the next is rejected at once.
    let mut idle = tcp_client(server.tcp());
    expect(metrics, &[("wasm_echo_open_connections", &main, 1.0)]);
    let mut rejected = tcp_client(server.tcp());
    crate::common::expect_closed_by_server(&mut rejected);
    // The first is closed once idle.
    crate::common::expect_closed_by_server(&mut idle);

    let socket = udp_client(server.udp());
    assert_eq!(udp_ask(&socket, b"ten bytes!"), b"ten bytes!");
    socket.send(b"bloat").expect("send");
    socket.send(&[b'y'; 40]).expect("send");
    assert_eq!(udp_ask(&socket, b"ok"), b"ok", "the listener goes on");

    expect(
        metrics,
        &[
            ("wasm_echo_rejected_connections_total", &main, 1.0),
            ("wasm_echo_tcp_connections_total", &main, 3.0),
            ("wasm_echo_closes_total", &closes("plugin"), 1.0),
            ("wasm_echo_closes_total", &closes("protocol"), 1.0),
            ("wasm_echo_closes_total", &closes("idle"), 1.0),
            ("wasm_echo_closes_total", &closes("peer"), 0.0),
            ("wasm_echo_closes_total", &closes("failed"), 0.0),
            (
                "wasm_echo_listener_plugin_failures_total",
                &[("listener", "main"), ("kind", "memory")],
                1.0,
            ),
            (
                "wasm_echo_listener_plugin_failures_total",
                &[("listener", "main"), ("kind", "reply")],
                1.0,
            ),
            (
                "wasm_echo_listener_plugin_failures_total",
                &[("listener", "main"), ("kind", "deadline")],
                0.0,
            ),
            (
                "wasm_echo_drops_total",
                &[("listener", "main"), ("reason", "failed")],
                1.0,
            ),
            (
                "wasm_echo_drops_total",
                &[("listener", "main"), ("reason", "refused-reply")],
                1.0,
            ),
            (
                "wasm_echo_bytes_out_total",
                &[("listener", "main"), ("protocol", "tcp")],
                10.0,
            ),
            (
                "wasm_echo_bytes_out_total",
                &[("listener", "main"), ("protocol", "udp")],
                12.0,
            ),
            (
                "wasm_echo_replies_total",
                &[("listener", "main"), ("protocol", "udp")],
                2.0,
            ),
        ],
    );
}

/// A stand-in for the `/metrics` endpoint at `upstream` that lets the
/// test act between `status`'s two scrapes: the first is answered at once
/// and announced on the returned channel; the second is held until the
/// returned sender is used, then answered. Returns its address.
fn scrape_gate(
    upstream: SocketAddr,
) -> (
    SocketAddr,
    std::sync::mpsc::Receiver<()>,
    std::sync::mpsc::Sender<()>,
) {
    let gate = std::net::TcpListener::bind("127.0.0.1:0").expect("bind gate");
    let addr = gate.local_addr().expect("gate addr");
    let (first_done, first) = std::sync::mpsc::channel();
    let (release, released) = std::sync::mpsc::channel::<()>();
    thread::spawn(move || {
        for scrape in 0..2 {
            let Ok((mut client, _)) = gate.accept() else {
                return;
            };
            if scrape == 1 && released.recv_timeout(PATIENCE).is_err() {
                return;
            }
            client.set_read_timeout(Some(PATIENCE)).expect("timeout");
            let mut request = Vec::new();
            let mut buf = [0u8; 1024];
            while !request.ends_with(b"\r\n\r\n") {
                match client.read(&mut buf) {
                    Ok(0) | Err(_) => return,
                    Ok(len) => request.extend_from_slice(&buf[..len]),
                }
            }
            let mut server = TcpStream::connect(upstream).expect("metrics endpoint");
            server.write_all(&request).expect("forward the request");
            let mut response = Vec::new();
            server.read_to_end(&mut response).expect("the page");
            client.write_all(&response).expect("answer status");
            drop(client);
            if scrape == 0 {
                let _ = first_done.send(());
            }
        }
    });
    (addr, first, release)
}

/// `status`'s columns hold what the test did: rates are what happened
/// between its two scrapes divided by `--interval` (10 datagrams and 4
/// messages in 200 ms: 50, 20 and 70 replies a second), and OPEN,
/// FAILURES and DROPS are the totals (2 connections held open, a datagram
/// that trapped, the one it dropped). Traffic before the first scrape
/// moves no rate.
#[test]
fn status_columns_hold_the_rates_and_totals_of_what_was_done() {
    let server = Server::start(plugins::TRAP, &["--metrics", "127.0.0.1:0"]);
    let metrics = metrics_addr(&server);
    let socket = udp_client(server.udp());
    socket.send(b"panic").expect("send");
    assert_eq!(udp_ask(&socket, b"before"), b"before");
    let mut held = tcp_client(server.tcp());
    assert_eq!(tcp_ask(&mut held, b"before", 6), b"before");
    let _other = tcp_client(server.tcp());
    expect(
        metrics,
        &[
            ("wasm_echo_open_connections", &[("listener", "main")], 2.0),
            ("wasm_echo_datagrams_total", &[("listener", "main")], 2.0),
        ],
    );

    let (gate, first, release) = scrape_gate(metrics);
    let status = thread::spawn(move || run(&["status", &gate.to_string(), "--interval", "200ms"]));
    first.recv_timeout(PATIENCE).expect("status scraped once");
    for i in 0..10 {
        let message = format!("d{i}");
        assert_eq!(udp_ask(&socket, message.as_bytes()), message.as_bytes());
    }
    for i in 0..4 {
        let message = format!("m{i}");
        assert_eq!(
            tcp_ask(&mut held, message.as_bytes(), 2),
            message.as_bytes()
        );
    }
    expect(
        metrics,
        &[
            ("wasm_echo_datagrams_total", &[("listener", "main")], 12.0),
            ("wasm_echo_tcp_messages_total", &[("listener", "main")], 5.0),
            (
                "wasm_echo_replies_total",
                &[("listener", "main"), ("protocol", "tcp")],
                5.0,
            ),
            (
                "wasm_echo_replies_total",
                &[("listener", "main"), ("protocol", "udp")],
                11.0,
            ),
        ],
    );
    release.send(()).expect("release the second scrape");
    let output = status.join().expect("status ran");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let row: Vec<&str> = stdout
        .lines()
        .find(|line| line.starts_with("main "))
        .unwrap_or_else(|| panic!("a row for main: {stdout}"))
        .split_whitespace()
        .collect();
    assert_eq!(
        row[2..],
        ["50.0", "20.0", "70.0", "2", "1", "1", "0/0"],
        "DGRAM/S MSG/S REPLY/S OPEN FAILURES DROPS RELOADS:\n{stdout}"
    );
}
