//! Safe rollout: a canary that fails its gates is rolled back, a healthy
//! one is promoted with no reply lost, a shadow never reaches the wire and
//! never slows the stable replies, a UDP peer stays on one version, and
//! other tenants are untouched. Every test drives the real server through
//! `wasm-echo rollout` and reads its `/metrics`.

use std::io::ErrorKind;
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use crate::common::{
    self, PATIENCE, Server, control_path, one_line_error, plugins, poll_until, succeeded, tcp_ask,
    tcp_client, udp_ask, udp_client,
};
use crate::metrics::{scrape, value};

/// How long a request under load may wait for its reply before it counts
/// as lost: far above a reply's real latency.
const REPLY_WAIT: Duration = Duration::from_secs(5);

/// Serves `listeners` (TOML `[listeners.NAME]` tables; `sockets` of them in
/// all) with metrics and a control socket of the test's own.
fn serve(listeners: &str, sockets: usize) -> (Server, PathBuf, SocketAddr) {
    let control = control_path();
    let server = Server::with_config_and(
        listeners,
        sockets + 1,
        &[
            "--metrics",
            "127.0.0.1:0",
            "--control",
            control.to_str().expect("utf-8 path"),
        ],
    );
    let metrics = server.metrics.expect("a metrics address");
    (server, control, metrics)
}

/// `wasm-echo rollout VERB ARGS --control CONTROL`.
fn rollout(control: &std::path::Path, verb: &str, args: &[&str]) -> std::process::Output {
    let control = control.to_str().expect("utf-8 path");
    let mut all = vec!["rollout", verb, "--control", control];
    all.extend_from_slice(args);
    common::run(&all)
}

/// A metric's value, 0 when the series is not (yet) on the page.
fn metric(addr: SocketAddr, name: &str, labels: &[(&str, &str)]) -> f64 {
    value(&scrape(addr), name, labels).unwrap_or(0.0)
}

/// The label (`name@digest`) of the version `listener` serves now.
fn current_version(addr: SocketAddr, listener: &str) -> String {
    scrape(addr)
        .samples
        .iter()
        .find(|sample| {
            sample.metric == "wasm_echo_plugin_info"
                && sample.labels.get("listener") == Some(listener)
                && matches!(sample.value, prometheus_parse::Value::Gauge(v) if v > 0.0)
        })
        .and_then(|sample| sample.labels.get("version").map(str::to_owned))
        .expect("a current version")
}

/// Calls to `version` of `listener` so far.
fn calls(addr: SocketAddr, listener: &str, version: &str) -> f64 {
    metric(
        addr,
        "wasm_echo_plugin_call_seconds",
        &[("listener", listener), ("version", version)],
    )
}

/// Waits until `listener`'s rollout has ended with `outcome`.
fn wait_outcome(addr: SocketAddr, listener: &str, outcome: &str) {
    poll_until(&format!("rollout of `{listener}` {outcome}"), || {
        let ended = metric(
            addr,
            "wasm_echo_rollouts_total",
            &[("listener", listener), ("outcome", outcome)],
        );
        (ended >= 1.0).then_some(())
    });
}

/// A UDP client that sends numbered messages and waits for each reply,
/// skipping late replies to earlier ones; a reply that does not come
/// within its wait is lost.
struct Peer {
    socket: UdpSocket,
    sent: u64,
    wait: Duration,
}

/// How long a peer waits while a trapping candidate may drop its message:
/// those losses are expected, and each must not cost [`REPLY_WAIT`].
const TRAP_WAIT: Duration = Duration::from_millis(100);

impl Peer {
    fn new(server: SocketAddr) -> Self {
        let socket = udp_client(server);
        socket
            .set_read_timeout(Some(Duration::from_millis(50)))
            .expect("read timeout");
        Self {
            socket,
            sent: 0,
            wait: REPLY_WAIT,
        }
    }

    /// The same peer, waiting `wait` for each reply from now on.
    fn waiting(self, wait: Duration) -> Self {
        Self { wait, ..self }
    }

    /// Sends the next message; its reply, if one came. `accept` says
    /// whether a reply is this message's (an echo must be the message).
    fn ask(&mut self, accept: impl Fn(&[u8], &[u8]) -> bool) -> Option<Vec<u8>> {
        self.sent += 1;
        let message = format!("message {} from a peer", self.sent).into_bytes();
        self.socket.send(&message).expect("send datagram");
        let deadline = Instant::now() + self.wait;
        let mut buf = vec![0u8; 2048];
        while Instant::now() < deadline {
            match self.socket.recv(&mut buf) {
                Ok(len) if accept(&message, &buf[..len]) => return Some(buf[..len].to_vec()),
                Ok(_) => {}
                Err(error)
                    if matches!(error.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                Err(error) => panic!("udp receive failed: {error}"),
            }
        }
        None
    }
}

fn echoed(message: &[u8], reply: &[u8]) -> bool {
    message == reply
}

#[test]
fn a_candidate_that_traps_one_message_in_ten_is_rolled_back_and_stable_answers_after() {
    let (server, control, metrics) = serve(
        r#"
[listeners.svc]
plugin = "echo"
udp = "127.0.0.1:0"
tcp = "127.0.0.1:0"
"#,
        2,
    );
    let stable = current_version(metrics, "svc");
    let started = rollout(
        &control,
        "start",
        &[
            "svc",
            "--plugin",
            plugins::HOSTILE,
            "--plugin-config",
            "behaviour=panic-one-in",
            "--plugin-config",
            "one-in=10",
            "--steps",
            "50,100",
            "--interval",
            "1s",
            "--min-calls",
            "20",
            "--max-failure-rate",
            "0.02",
            "--failure-limit",
            "2",
            // The p99 gate is the unit tests' (rollout::tests); here the
            // failure rate alone must decide.
            "--max-p99-ratio",
            "1000",
        ],
    );
    let said = succeeded("rollout start", &started);
    assert!(said.contains("canary"), "{said}");

    // Traffic from many peers (half of them on the candidate) until the
    // gates roll it back; lost replies are the candidate's traps.
    let mut peers: Vec<Peer> = (0..16)
        .map(|_| Peer::new(server.udp_of("svc")).waiting(TRAP_WAIT))
        .collect();
    let deadline = Instant::now() + PATIENCE;
    while metric(
        metrics,
        "wasm_echo_rollouts_total",
        &[("listener", "svc"), ("outcome", "rolled-back")],
    ) < 1.0
    {
        assert!(Instant::now() < deadline, "never rolled back");
        for peer in &mut peers {
            for _ in 0..5 {
                peer.ask(echoed);
            }
        }
    }
    let status = succeeded("rollout status", &rollout(&control, "status", &["svc"]));
    assert!(status.contains("rolled-back"), "{status}");
    // Rolled back after exactly failure-limit failed intervals, at its
    // first step: it never got more traffic.
    assert!(status.contains("(2 intervals in a row)"), "{status}");
    assert!(status.contains("step 1/2"), "{status}");
    assert!(status.contains("failure rate"), "{status}");
    assert_eq!(current_version(metrics, "svc"), stable);
    assert_eq!(
        metric(metrics, "wasm_echo_rollout_state", &[("listener", "svc")]),
        0.0
    );

    // Afterwards every message, from every peer (those the candidate had
    // too) and on new connections, is the stable version's: none is lost
    // and the stable version's calls grow by exactly their number.
    let before = calls(metrics, "svc", &stable);
    let mut peers: Vec<Peer> = peers
        .into_iter()
        .map(|peer| peer.waiting(REPLY_WAIT))
        .collect();
    for peer in &mut peers {
        for _ in 0..50 {
            assert!(
                peer.ask(echoed).is_some(),
                "a reply lost after the rollback"
            );
        }
    }
    for connection in 0..20 {
        let mut stream = tcp_client(server.tcp_of("svc"));
        for n in 0..10 {
            let message = format!("connection {connection} message {n}");
            assert_eq!(
                tcp_ask(&mut stream, message.as_bytes(), message.len()),
                message.as_bytes()
            );
        }
    }
    let expected = before + 16.0 * 50.0 + 20.0 * 10.0;
    poll_until("the stable version counts every message", || {
        (calls(metrics, "svc", &stable) == expected).then_some(())
    });
}

#[test]
fn a_healthy_candidate_is_promoted_through_its_steps_with_no_reply_lost() {
    let (server, control, metrics) = serve(
        r#"
[listeners.svc]
plugin = "echo"
udp = "127.0.0.1:0"
tcp = "127.0.0.1:0"
"#,
        2,
    );
    let stop = Arc::new(AtomicBool::new(false));
    let (lost, answered) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let udp: Vec<_> = (0..6)
        .map(|_| {
            let (stop, lost, answered) = (stop.clone(), lost.clone(), answered.clone());
            let addr = server.udp_of("svc");
            thread::spawn(move || {
                let mut peer = Peer::new(addr);
                while !stop.load(Ordering::SeqCst) && peer.sent < 1_000_000 {
                    match peer.ask(echoed) {
                        Some(_) => answered.fetch_add(1, Ordering::SeqCst),
                        None => lost.fetch_add(1, Ordering::SeqCst),
                    };
                }
            })
        })
        .collect();
    // New connections keep coming, so the canary's weight applies to them.
    let tcp: Vec<_> = (0..3)
        .map(|_| {
            let (stop, answered) = (stop.clone(), answered.clone());
            let addr = server.tcp_of("svc");
            thread::spawn(move || {
                let mut sent = 0u64;
                while !stop.load(Ordering::SeqCst) && sent < 1_000_000 {
                    let mut stream = TcpStream::connect(addr).expect("connect");
                    stream.set_read_timeout(Some(REPLY_WAIT)).expect("timeout");
                    for _ in 0..20 {
                        sent += 1;
                        let message = format!("tcp message {sent}");
                        let reply = tcp_ask(&mut stream, message.as_bytes(), message.len());
                        assert_eq!(reply, message.as_bytes(), "a TCP reply lost or wrong");
                        answered.fetch_add(1, Ordering::SeqCst);
                    }
                }
            })
        })
        .collect();
    let started = rollout(
        &control,
        "start",
        &[
            "svc",
            "--plugin",
            plugins::TRAP,
            "--steps",
            "25,50,100",
            "--interval",
            "300ms",
            "--min-calls",
            "20",
            // Both echo; on a machine shared with builds their p99s may
            // differ by more than any sensible default, and the p99 gate
            // is the unit tests' (rollout::tests).
            "--max-p99-ratio",
            "1000",
        ],
    );
    succeeded("rollout start", &started);
    wait_outcome(metrics, "svc", "promoted");
    // And a while on the promoted version, under the same load.
    let promoted_at = answered.load(Ordering::SeqCst);
    poll_until("traffic after the promotion", || {
        (answered.load(Ordering::SeqCst) > promoted_at + 2000).then_some(())
    });
    stop.store(true, Ordering::SeqCst);
    for client in udp.into_iter().chain(tcp) {
        client.join().expect("a client failed");
    }
    assert_eq!(lost.load(Ordering::SeqCst), 0, "UDP replies lost");
    let status = succeeded("rollout status", &rollout(&control, "status", &["svc"]));
    assert!(status.contains("promoted: passed all 3 steps"), "{status}");
    assert!(
        current_version(metrics, "svc").starts_with("trap@"),
        "{status}"
    );
    assert_eq!(
        metric(metrics, "wasm_echo_rollout_state", &[("listener", "svc")]),
        0.0
    );
    assert_eq!(
        metric(
            metrics,
            "wasm_echo_drops_total",
            &[("listener", "svc"), ("reason", "failed")]
        ),
        0.0
    );
    // The promotion is the reload's swap, counted as one.
    assert_eq!(
        metric(
            metrics,
            "wasm_echo_reloads_total",
            &[("listener", "svc"), ("result", "ok")]
        ),
        1.0
    );
}

#[test]
fn shadow_replies_never_reach_the_wire_and_every_difference_is_counted() {
    let (server, control, metrics) = serve(
        r#"
[listeners.svc]
plugin = "echo"
udp = "127.0.0.1:0"
tcp = "127.0.0.1:0"

[listeners.svc.rollout]
candidate = "hello"
mode = "shadow"
# Judged only once the test is long over: this test counts, the gates wait.
interval = "1h"
"#,
        2,
    );
    poll_until("the rollout from the file", || {
        (metric(metrics, "wasm_echo_rollout_state", &[("listener", "svc")]) == 2.0).then_some(())
    });
    const UDP: usize = 3000;
    const TCP: usize = 1000;
    let socket = udp_client(server.udp_of("svc"));
    for n in 0..UDP {
        let message = format!("datagram {n}");
        assert_eq!(
            udp_ask(&socket, message.as_bytes()),
            message.as_bytes(),
            "not the stable reply"
        );
    }
    let mut stream = tcp_client(server.tcp_of("svc"));
    for n in 0..TCP {
        let message = format!("message {n}");
        assert_eq!(
            tcp_ask(&mut stream, message.as_bytes(), message.len()),
            message.as_bytes()
        );
    }
    // Nothing but the stable replies came: the stream holds no more bytes.
    drop(socket);
    stream
        .shutdown(std::net::Shutdown::Write)
        .expect("shutdown");
    assert!(
        common::tcp_read_to_end(&mut stream).is_empty(),
        "bytes beyond the stable replies"
    );
    let sent = (UDP + TCP) as f64;
    poll_until("every copy compared", || {
        let different = metric(
            metrics,
            "wasm_echo_shadow_comparisons_total",
            &[("listener", "svc"), ("result", "different")],
        );
        (different >= sent).then_some(())
    });
    let scraped = scrape(metrics);
    let of = |name: &str, labels: &[(&str, &str)]| value(&scraped, name, labels).unwrap_or(0.0);
    assert_eq!(
        of(
            "wasm_echo_shadow_comparisons_total",
            &[("listener", "svc"), ("result", "different")]
        ),
        sent
    );
    assert_eq!(
        of(
            "wasm_echo_shadow_comparisons_total",
            &[("listener", "svc"), ("result", "same")]
        ),
        0.0
    );
    assert_eq!(
        of("wasm_echo_shadow_dropped_total", &[("listener", "svc")]),
        0.0
    );
    let status = succeeded("rollout status", &rollout(&control, "status", &[]));
    assert!(
        status.contains(&format!("different {}", UDP + TCP)),
        "{status}"
    );
    let aborted = rollout(&control, "abort", &["svc"]);
    assert!(succeeded("rollout abort", &aborted).contains("aborted"));
}

#[test]
fn a_shadow_candidate_looping_to_its_deadline_does_not_hold_the_stable_replies() {
    let hostile = plugins::HOSTILE;
    let (server, control, metrics) = serve(
        &format!(
            r#"
[listeners.svc]
plugin = "echo"
udp = "127.0.0.1:0"
tcp = "127.0.0.1:0"
call-timeout = "500ms"

[listeners.svc.rollout]
candidate = "{hostile}"
mode = "shadow"
interval = "1h"

[listeners.svc.rollout.plugin-config]
behaviour = "loop"
"#
        ),
        2,
    );
    poll_until("the rollout from the file", || {
        (metric(metrics, "wasm_echo_rollout_state", &[("listener", "svc")]) == 2.0).then_some(())
    });
    const UDP: usize = 2000;
    let socket = udp_client(server.udp_of("svc"));
    let mut stream = tcp_client(server.tcp_of("svc"));
    for n in 0..UDP {
        let message = format!("datagram {n}");
        assert_eq!(udp_ask(&socket, message.as_bytes()), message.as_bytes());
        if n % 4 == 0 {
            assert_eq!(
                tcp_ask(&mut stream, message.as_bytes(), message.len()),
                message.as_bytes()
            );
        }
    }
    // Had a stable reply waited for its copy's call, each would have taken
    // the candidate's deadline and the queue would never fill: instead the
    // candidate fell behind, and copies were dropped, not waited for.
    let scraped = scrape(metrics);
    let dropped = value(
        &scraped,
        "wasm_echo_shadow_dropped_total",
        &[("listener", "svc")],
    )
    .unwrap_or(0.0);
    assert!(dropped > 0.0, "no copy dropped");
    let candidate_calls = scraped
        .samples
        .iter()
        .filter(|sample| {
            sample.metric == "wasm_echo_plugin_failures_total"
                && sample.labels.get("listener") == Some("svc")
                && sample.labels.get("kind") == Some("deadline")
        })
        .map(|sample| match sample.value {
            prometheus_parse::Value::Counter(v) => v,
            _ => 0.0,
        })
        .sum::<f64>();
    assert!(
        candidate_calls < (UDP / 10) as f64,
        "{candidate_calls} candidate calls ended at the deadline while {UDP} stable replies came"
    );
    succeeded("rollout abort", &rollout(&control, "abort", &["svc"]));
}

#[test]
fn a_udp_canary_keeps_each_peer_on_one_version_for_the_step() {
    let (server, control, metrics) = serve(
        r#"
[listeners.svc]
plugin = "echo"
udp = "127.0.0.1:0"
"#,
        1,
    );
    // hello answers every datagram with its greeting, echo with the datagram:
    // each reply says which version answered.
    succeeded(
        "rollout start",
        &rollout(
            &control,
            "start",
            &[
                "svc",
                "--plugin",
                "hello",
                "--steps",
                "50,100",
                "--interval",
                "1h",
            ],
        ),
    );
    let mut on_candidate = 0;
    for _ in 0..32 {
        let socket = udp_client(server.udp_of("svc"));
        let versions: Vec<bool> = (0..20)
            .map(|n| {
                let message = format!("peer message {n}");
                let reply = udp_ask(&socket, message.as_bytes());
                assert!(
                    reply == message.as_bytes() || reply == b"Hello, client!",
                    "{reply:?}"
                );
                reply != message.as_bytes()
            })
            .collect();
        assert!(
            versions.iter().all(|v| *v == versions[0]),
            "a peer changed versions within a step: {versions:?}"
        );
        on_candidate += usize::from(versions[0]);
    }
    // At 50%, 32 peers all on one side would be a one in 2^31 chance.
    assert!(
        (1..32).contains(&on_candidate),
        "{on_candidate} of 32 peers on the candidate"
    );
    assert_eq!(
        metric(metrics, "wasm_echo_rollout_weight", &[("listener", "svc")]),
        50.0
    );
    succeeded("rollout abort", &rollout(&control, "abort", &["svc"]));
}

#[test]
fn a_rollout_on_one_tenant_leaves_the_others_untouched() {
    let (server, control, metrics) = serve(
        r#"
[listeners.rolled]
plugin = "echo"
udp = "127.0.0.1:0"

[listeners.other]
plugin = "echo"
udp = "127.0.0.1:0"
"#,
        2,
    );
    let other_version = current_version(metrics, "other");
    succeeded(
        "rollout start",
        &rollout(
            &control,
            "start",
            &[
                "rolled",
                "--plugin",
                plugins::HOSTILE,
                "--plugin-config",
                "behaviour=panic-one-in",
                "--plugin-config",
                "one-in=2",
                "--steps",
                "100",
                "--interval",
                "1h",
            ],
        ),
    );
    let mut rolled = Peer::new(server.udp_of("rolled")).waiting(TRAP_WAIT);
    let mut lost = 0;
    for _ in 0..20 {
        lost += usize::from(rolled.ask(echoed).is_none());
    }
    assert!(lost > 0, "the candidate took no traffic");
    let other = udp_client(server.udp_of("other"));
    for n in 0..500 {
        let message = format!("other {n}");
        assert_eq!(udp_ask(&other, message.as_bytes()), message.as_bytes());
    }
    let scraped = scrape(metrics);
    let of = |name: &str, labels: &[(&str, &str)]| value(&scraped, name, labels);
    assert_eq!(
        of("wasm_echo_rollout_state", &[("listener", "other")]),
        None
    );
    assert_eq!(
        of(
            "wasm_echo_drops_total",
            &[("listener", "other"), ("reason", "failed")]
        ),
        Some(0.0)
    );
    assert_eq!(
        of(
            "wasm_echo_listener_plugin_failures_total",
            &[("listener", "other"), ("kind", "trap")]
        ),
        Some(0.0)
    );
    assert_eq!(current_version(metrics, "other"), other_version);
    let status = succeeded("rollout status", &rollout(&control, "status", &[]));
    assert!(!status.contains("`other`"), "{status}");
    succeeded("rollout abort", &rollout(&control, "abort", &["rolled"]));
}

#[test]
fn rollout_mistakes_get_one_line_errors() {
    let (_server, control, _metrics) = serve(
        r#"
[listeners.svc]
plugin = "echo"
udp = "127.0.0.1:0"
"#,
        1,
    );
    let unknown = rollout(&control, "start", &["nosuch", "--plugin", "hello"]);
    one_line_error(&unknown, &["no listener named `nosuch`"]);
    let steps = rollout(
        &control,
        "start",
        &["svc", "--plugin", "hello", "--steps", "50,10"],
    );
    one_line_error(&steps, &["steps", "must rise"]);
    let same = rollout(&control, "start", &["svc", "--plugin", "echo"]);
    one_line_error(&same, &["already runs", "must differ"]);
    let none = rollout(&control, "promote", &["svc"]);
    one_line_error(&none, &["has no rollout running"]);
    succeeded(
        "rollout start",
        &rollout(
            &control,
            "start",
            &["svc", "--plugin", "hello", "--interval", "1h"],
        ),
    );
    let twice = rollout(&control, "start", &["svc", "--plugin", "hello"]);
    one_line_error(&twice, &["already has a rollout running"]);
    let reload = common::control("reload", &control, &["--listener", "svc"]);
    one_line_error(&reload, &["rollout running"]);
    let promoted = succeeded("rollout promote", &rollout(&control, "promote", &["svc"]));
    assert!(promoted.contains("promoted by an operator"), "{promoted}");
}
