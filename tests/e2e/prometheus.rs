//! Debian's `prometheus`, started on 127.0.0.1 with the shipped scrape
//! config (deploy/prometheus/prometheus.yml, only its target and interval
//! replaced), scrapes a server that has served traffic; its HTTP API must
//! then hold the counts sent. The Grafana dashboard
//! (deploy/grafana/wasm-echo.json) is held to what the server exports: every
//! series it names is on `/metrics`, and every panel's query answers.

use std::fs::File;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;

use serde_json::Value;

use crate::admin::http;
use crate::common::{
    PATIENCE, Server, free_port, poll_until, poll_until_ok, repo_file, scratch_file, send_signal,
    tcp_ask, tcp_client, udp_ask, udp_client, watch_lifetime,
};
use crate::metrics::expect;

/// Datagrams and TCP messages each server here is sent.
const DATAGRAMS: usize = 12;
const MESSAGES: usize = 3;

/// A server with one echo listener that records its traffic, has served
/// [`DATAGRAMS`] datagrams and [`MESSAGES`] TCP messages, and has reloaded
/// once (SIGHUP, nothing changed): every series the server has is then on
/// its page, the reload and recording ones included.
fn served() -> Server {
    let recording = scratch_file("placeholder", b"").with_file_name("traffic.jsonl");
    let toml = format!(
        "[listeners.main]\nplugin = \"echo\"\nudp = \"127.0.0.1:0\"\ntcp = \"127.0.0.1:0\"\n\
         record = {:?}\n",
        recording.to_str().expect("utf-8 path")
    );
    let server = Server::with_config_and(&toml, 3, &["--metrics", "127.0.0.1:0"]);
    let socket = udp_client(server.udp());
    for _ in 0..DATAGRAMS {
        assert_eq!(udp_ask(&socket, b"ping"), b"ping");
    }
    let mut stream = tcp_client(server.tcp());
    for _ in 0..MESSAGES {
        assert_eq!(tcp_ask(&mut stream, b"pong", 4), b"pong");
    }
    drop(stream);
    send_signal(server.pid(), "HUP");
    expect(
        server.metrics.expect("serving metrics"),
        &[(
            "wasm_echo_reloads_total",
            &[("listener", "main"), ("result", "unchanged")],
            1.0,
        )],
    );
    server
}

/// A `prometheus` of the test's own on 127.0.0.1, with its data in a
/// scratch folder; killed when dropped.
struct Prometheus {
    child: Child,
    addr: SocketAddr,
    log: PathBuf,
    /// Dropped with it, which stops its watchdog.
    _watchdog: mpsc::Sender<()>,
}

/// `text` with `from`, which must occur exactly once, replaced by `to`: if
/// the shipped file changes shape, the test says so instead of testing
/// something else.
fn replace_once(text: &str, from: &str, to: &str) -> String {
    assert_eq!(
        text.matches(from).count(),
        1,
        "deploy/prometheus/prometheus.yml should hold {from:?} once"
    );
    text.replacen(from, to, 1)
}

impl Prometheus {
    /// Starts Debian's prometheus with the shipped scrape config, pointed
    /// at `target` and scraping every second, and waits until it is ready.
    fn start(target: SocketAddr) -> Self {
        let shipped = std::fs::read_to_string(repo_file("deploy/prometheus/prometheus.yml"))
            .expect("deploy/prometheus/prometheus.yml");
        let config = replace_once(&shipped, "127.0.0.1:9100", &target.to_string());
        let config = replace_once(&config, "scrape_interval: 15s", "scrape_interval: 1s");
        let config_file = scratch_file("prometheus.yml", config.as_bytes());
        let data = config_file.with_file_name("data");
        let log = config_file.with_file_name("prometheus.log");
        let addr = free_port();
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", config_file.display()))
            .arg(format!("--storage.tsdb.path={}", data.display()))
            .arg(format!("--web.listen-address={addr}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(File::create(&log).expect("prometheus log file"))
            .spawn()
            .unwrap_or_else(|error| {
                panic!(
                    "cannot run prometheus ({error}): scripts/bootstrap.sh installs Debian's \
                     package; WASM_ECHO_SKIP_TESTS=prometheus skips this test"
                )
            });
        let watchdog = watch_lifetime(child.id(), "prometheus".to_owned());
        let mut prometheus = Self {
            child,
            addr,
            log,
            _watchdog: watchdog,
        };
        poll_until("prometheus to be ready", || {
            if let Some(status) = prometheus.child.try_wait().expect("try_wait") {
                panic!("prometheus exited ({status}):\n{}", prometheus.log());
            }
            get(addr, "/-/ready").filter(|(status, _)| *status == 200)
        });
        prometheus
    }

    /// What prometheus has logged.
    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The result vector of instant query `promql` (`/api/v1/query`); the
    /// test fails if prometheus refuses the query.
    fn query(&self, promql: &str) -> Vec<Value> {
        let target = format!("/api/v1/query?query={}", percent_encode(promql));
        let (status, body) = get(self.addr, &target).expect("prometheus answers");
        let answer: Value = serde_json::from_str(&body)
            .unwrap_or_else(|error| panic!("not JSON ({error}): {body}"));
        assert!(
            status == 200 && answer["status"] == "success",
            "prometheus refused {promql:?} ({status}): {body}"
        );
        answer["data"]["result"]
            .as_array()
            .unwrap_or_else(|| panic!("no result vector for {promql:?}: {body}"))
            .clone()
    }

    /// The value of `promql`'s only series, once it has one.
    fn value(&self, promql: &str) -> Option<String> {
        match self.query(promql).as_slice() {
            [series] => series["value"][1].as_str().map(str::to_owned),
            _ => None,
        }
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// GET `target` over HTTP/1.0, so that the answer comes whole, without
/// chunks; `None` while nothing answers. A plain socket: no HTTP client is
/// in the dependency tree, and this is all the test needs.
fn get(addr: SocketAddr, target: &str) -> Option<(u16, String)> {
    let mut stream = TcpStream::connect(addr).ok()?;
    stream.set_read_timeout(Some(PATIENCE)).ok()?;
    write!(stream, "GET {target} HTTP/1.0\r\nHost: {addr}\r\n\r\n").ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let (head, body) = response.split_once("\r\n\r\n")?;
    let status = head.split_whitespace().nth(1)?.parse().ok()?;
    Some((status, body.to_owned()))
}

/// `text` as a URL query value: everything but unreserved characters
/// percent-encoded.
fn percent_encode(text: &str) -> String {
    text.bytes()
        .map(|byte| match byte {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                char::from(byte).to_string()
            }
            _ => format!("%{byte:02X}"),
        })
        .collect()
}

#[test]
#[cfg_attr(skip_prometheus, ignore = "WASM_ECHO_SKIP_TESTS names prometheus")]
fn prometheus_with_the_shipped_config_holds_the_traffic_sent() {
    let server = served();
    let metrics = server.metrics.expect("serving metrics");
    let prometheus = Prometheus::start(metrics);
    let series = |name: &str| format!("{name}{{job=\"wasm-echo\",listener=\"main\"}}");
    let want = [
        (series("wasm_echo_datagrams_total"), DATAGRAMS.to_string()),
        (series("wasm_echo_tcp_messages_total"), MESSAGES.to_string()),
        (series("wasm_echo_tcp_connections_total"), "1".to_owned()),
        (
            series("wasm_echo_replies_total").replace('}', ",protocol=\"udp\"}"),
            DATAGRAMS.to_string(),
        ),
        (
            series("wasm_echo_reloads_total").replace('}', ",result=\"unchanged\"}"),
            "1".to_owned(),
        ),
        (
            format!("up{{job=\"wasm-echo\",instance=\"{metrics}\"}}"),
            "1".to_owned(),
        ),
    ];
    poll_until_ok("prometheus to hold the counts sent", || {
        let wrong: Vec<String> = want
            .iter()
            .filter_map(|(promql, value)| {
                let got = prometheus.value(promql);
                (got.as_deref() != Some(value)).then(|| format!("{promql}: {got:?}, want {value}"))
            })
            .collect();
        if wrong.is_empty() {
            Ok(())
        } else {
            Err(wrong.join("; "))
        }
    });
}

/// Every `expr` in the dashboard, and the names in its variables' queries.
fn expressions(node: &Value, found: &mut Vec<String>) {
    match node {
        Value::Object(fields) => {
            for (key, value) in fields {
                match (key.as_str(), value) {
                    ("expr", Value::String(expr)) => found.push(expr.clone()),
                    _ => expressions(value, found),
                }
            }
        }
        Value::Array(items) => items.iter().for_each(|item| expressions(item, found)),
        _ => {}
    }
}

/// The `wasm_echo_*` names `text` mentions.
fn series_names(text: &str) -> std::collections::BTreeSet<String> {
    text.match_indices("wasm_echo_")
        .map(|(at, _)| {
            text[at..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect::<String>()
        })
        .collect()
}

#[test]
#[cfg_attr(skip_prometheus, ignore = "WASM_ECHO_SKIP_TESTS names prometheus")]
fn every_series_the_dashboard_names_is_exported_and_every_panel_answers() {
    let dashboard = std::fs::read_to_string(repo_file("deploy/grafana/wasm-echo.json"))
        .expect("deploy/grafana/wasm-echo.json");
    let server = served();
    let metrics = server.metrics.expect("serving metrics");

    let (status, page) = http(metrics, "GET", "/metrics");
    assert_eq!(status, 200);
    // Each sample's name, and each family's (`# TYPE NAME KIND`: a
    // histogram's samples are NAME_bucket, NAME_sum and NAME_count).
    let exported: std::collections::BTreeSet<String> = page
        .lines()
        .filter_map(|line| match line.strip_prefix("# TYPE ") {
            Some(family) => family.split(' ').next(),
            None if line.starts_with('#') => None,
            None => line.split(['{', ' ']).next(),
        })
        .map(str::to_owned)
        .collect();
    let named = series_names(&dashboard);
    assert!(named.len() >= 15, "the dashboard names {named:?}");
    let missing: Vec<_> = named.difference(&exported).collect();
    assert!(
        missing.is_empty(),
        "the dashboard names series the server does not export: {missing:?}"
    );

    // Each panel's query, with Grafana's variables as a dashboard showing
    // every listener sets them, must answer with at least one series once
    // prometheus has scraped a few times (rates need two samples).
    let dashboard: Value = serde_json::from_str(&dashboard).expect("the dashboard is JSON");
    let mut queries = Vec::new();
    expressions(&dashboard["panels"], &mut queries);
    assert!(queries.len() >= 20, "{queries:?}");
    let queries: Vec<String> = queries
        .iter()
        .map(|expr| {
            let promql = expr
                .replace("$__rate_interval", "1m")
                .replace("$listener", ".*");
            assert!(
                !promql.contains('$'),
                "a variable the test does not set: {expr}"
            );
            promql
        })
        .collect();
    let prometheus = Prometheus::start(metrics);
    poll_until_ok("every panel's query to answer", || {
        let empty: Vec<&String> = queries
            .iter()
            .filter(|promql| prometheus.query(promql).is_empty())
            .collect();
        if empty.is_empty() {
            Ok(())
        } else {
            Err(format!("no series for {empty:?}"))
        }
    });
}
