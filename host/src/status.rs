//! `wasm-echo status`: a one-screen summary of a running server, read from
//! its `/metrics` twice, an interval apart, so that rates can be shown next
//! to totals. It reads the same series an operator's Prometheus does, so
//! what it shows is what the dashboards show. A listener with a rollout
//! running gets a line of its own under the table.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Duration;

use anyhow::{Context as _, bail};
use prometheus_parse::{Sample, Scrape, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Scrapes `addr` twice, `interval` apart, and renders the summary.
///
/// # Errors
///
/// Nothing answers at `addr`, or it does not serve Prometheus text.
pub async fn status(addr: &str, interval: Duration) -> anyhow::Result<String> {
    let before = scrape(addr).await?;
    tokio::time::sleep(interval).await;
    let after = scrape(addr).await?;
    Ok(render(&before, &after, interval))
}

/// Fetches and parses `http://ADDR/metrics`.
///
/// # Errors
///
/// As for [`status`].
pub async fn scrape(addr: &str) -> anyhow::Result<Scrape> {
    let connect = TcpStream::connect(addr);
    let mut stream = tokio::time::timeout(Duration::from_secs(5), connect)
        .await
        .with_context(|| format!("no answer from {addr} within 5s"))?
        .with_context(|| {
            format!(
                "nothing serves metrics on {addr} (is the server running with --metrics {addr}?)"
            )
        })?;
    let request = format!("GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream
        .write_all(request.as_bytes())
        .await
        .context("sending the request")?;
    let mut response = String::new();
    tokio::time::timeout(Duration::from_secs(5), stream.read_to_string(&mut response))
        .await
        .with_context(|| format!("{addr} did not finish answering within 5s"))?
        .with_context(|| format!("reading the answer from {addr}"))?;
    let Some((head, body)) = response.split_once("\r\n\r\n") else {
        bail!("{addr} did not answer with HTTP");
    };
    if !head.starts_with("HTTP/1.1 200") {
        bail!(
            "{addr} answered `{}`",
            head.lines().next().unwrap_or_default()
        );
    }
    Scrape::parse(body.lines().map(|line| Ok(line.to_owned())))
        .with_context(|| format!("{addr} sent no metrics"))
}

/// The value of a counter or gauge sample.
fn number(sample: &Sample) -> f64 {
    match sample.value {
        Value::Counter(value) | Value::Gauge(value) | Value::Untyped(value) => value,
        Value::Histogram(_) | Value::Summary(_) => 0.0,
    }
}

/// Sums `metric` per listener, optionally only samples whose `label` is
/// `value`.
fn per_listener(
    scrape: &Scrape,
    metric: &str,
    filter: Option<(&str, &str)>,
) -> BTreeMap<String, f64> {
    let mut sums = BTreeMap::new();
    for sample in scrape
        .samples
        .iter()
        .filter(|sample| sample.metric == metric)
    {
        if let Some((label, value)) = filter
            && sample.labels.get(label) != Some(value)
        {
            continue;
        }
        if let Some(listener) = sample.labels.get("listener") {
            *sums.entry(listener.to_owned()).or_insert(0.0) += number(sample);
        }
    }
    sums
}

fn render(before: &Scrape, after: &Scrape, interval: Duration) -> String {
    let seconds = interval.as_secs_f64().max(1e-3);
    let rate = |metric: &str| {
        let (then, now) = (
            per_listener(before, metric, None),
            per_listener(after, metric, None),
        );
        now.into_iter()
            .map(|(listener, value)| {
                let delta = value - then.get(&listener).copied().unwrap_or(0.0);
                (listener, delta / seconds)
            })
            .collect::<BTreeMap<_, _>>()
    };
    let datagrams = rate("wasm_echo_datagrams_total");
    let messages = rate("wasm_echo_tcp_messages_total");
    let replies = rate("wasm_echo_replies_total");
    let open = per_listener(after, "wasm_echo_open_connections", None);
    let failures = per_listener(after, "wasm_echo_listener_plugin_failures_total", None);
    let drops = per_listener(after, "wasm_echo_drops_total", None);
    let reloads_ok = per_listener(after, "wasm_echo_reloads_total", Some(("result", "ok")));
    let reloads_failed = per_listener(after, "wasm_echo_reloads_total", Some(("result", "failed")));
    let mut versions: BTreeMap<String, String> = BTreeMap::new();
    // Listeners whose plugin comes from a registry: the reference they were
    // given (a tag, maybe) and the digest they run.
    let mut references: BTreeMap<String, String> = BTreeMap::new();
    for sample in after
        .samples
        .iter()
        .filter(|s| s.metric == "wasm_echo_plugin_info" && number(s) > 0.0)
    {
        if let (Some(listener), Some(version)) =
            (sample.labels.get("listener"), sample.labels.get("version"))
        {
            versions.insert(listener.to_owned(), version.to_owned());
            if let (Some(reference), Some(pinned)) =
                (sample.labels.get("reference"), sample.labels.get("pinned"))
            {
                references.insert(listener.to_owned(), format!("{reference} at {pinned}"));
            }
        }
    }

    let mut out = format!(
        "{:<16} {:<24} {:>10} {:>10} {:>10} {:>6} {:>9} {:>7} {:>9}\n",
        "LISTENER",
        "VERSION",
        "DGRAM/S",
        "MSG/S",
        "REPLY/S",
        "OPEN",
        "FAILURES",
        "DROPS",
        "RELOADS"
    );
    let get =
        |map: &BTreeMap<String, f64>, listener: &str| map.get(listener).copied().unwrap_or(0.0);
    for listener in versions
        .keys()
        .chain(datagrams.keys())
        .collect::<std::collections::BTreeSet<_>>()
    {
        let _ = writeln!(
            out,
            "{:<16} {:<24} {:>10.1} {:>10.1} {:>10.1} {:>6} {:>9} {:>7} {:>9}",
            listener,
            versions.get(listener).map_or("native", String::as_str),
            get(&datagrams, listener),
            get(&messages, listener),
            get(&replies, listener),
            get(&open, listener),
            get(&failures, listener),
            get(&drops, listener),
            format!(
                "{}/{}",
                get(&reloads_ok, listener),
                get(&reloads_failed, listener)
            ),
        );
    }
    for (listener, reference) in &references {
        let _ = writeln!(out, "{listener}: {reference}");
    }
    render_rollouts(after, &mut out);
    out
}

/// A line per running rollout: its mode, step, weight, the last
/// judgement's gate figures and, in shadow mode, the comparisons.
fn render_rollouts(after: &Scrape, out: &mut String) {
    let states = per_listener(after, "wasm_echo_rollout_state", None);
    let gate = |name: &str| per_listener(after, "wasm_echo_rollout_gate", Some(("gate", name)));
    let (failure_rate, p99_ratio, diff_rate) =
        (gate("failure-rate"), gate("p99-ratio"), gate("diff-rate"));
    let weight = per_listener(after, "wasm_echo_rollout_weight", None);
    let step = per_listener(after, "wasm_echo_rollout_step", None);
    let same = per_listener(
        after,
        "wasm_echo_shadow_comparisons_total",
        Some(("result", "same")),
    );
    let different = per_listener(
        after,
        "wasm_echo_shadow_comparisons_total",
        Some(("result", "different")),
    );
    let get =
        |map: &BTreeMap<String, f64>, listener: &str| map.get(listener).copied().unwrap_or(0.0);
    for (listener, state) in states {
        // 0 none, 1 canary, 2 shadow.
        let mode = if state > 1.5 {
            "shadow"
        } else if state > 0.5 {
            "canary"
        } else {
            continue;
        };
        let _ = write!(
            out,
            "rollout {listener}: {mode}, step {}, weight {}%, failure rate {:.2}%, p99 ratio {:.2}",
            get(&step, &listener),
            get(&weight, &listener),
            get(&failure_rate, &listener) * 100.0,
            get(&p99_ratio, &listener),
        );
        if mode == "shadow" {
            let _ = write!(
                out,
                ", replies differing {:.2}% (same {}, different {})",
                get(&diff_rate, &listener) * 100.0,
                get(&same, &listener),
                get(&different, &listener)
            );
        }
        out.push('\n');
    }
}
