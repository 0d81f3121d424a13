//! A replay's report, for people (per listener: the tally, then the first
//! differences with the recorded and the replayed decision side by side,
//! bytes as text where printable and as hex otherwise) and for machines
//! (`--json`: one object, bytes in base64 as in the recording).

use std::fmt::Write as _;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use serde_json::{Value, json};

use super::{Difference, Report, Verdict};
use crate::recording::{Event, Outcome, next_name};

/// How wide a column of the side-by-side view is, in characters.
const COLUMN: usize = 36;

/// The report as text; `max_diff` is the gate it was held to.
pub fn text(report: &Report, max_diff: usize) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "replayed into {}{}",
        report.plugin,
        report
            .baseline
            .as_ref()
            .map(|baseline| format!(", baseline {baseline}"))
            .unwrap_or_default()
    );
    for (name, listener) in &report.listeners {
        let _ = writeln!(
            out,
            "\nlistener `{name}`: {} exchange(s) ({} of them tcp opens), recorded with {}",
            listener.exchanges,
            listener.opens,
            listener.recorded_versions.join(", ")
        );
        for (label, count) in [
            ("same", listener.same),
            ("different reply", listener.different_reply),
            ("different next", listener.different_next),
            ("failure", listener.failure),
            ("noisy", listener.noisy),
        ] {
            let _ = writeln!(out, "  {label:<16}{count:>8}");
        }
        if !listener.differences.is_empty() {
            let _ = writeln!(
                out,
                "  first differences ({} of {}):",
                listener.differences.len(),
                listener.regressions()
            );
            for difference in &listener.differences {
                side_by_side(&mut out, difference);
            }
        }
        if !listener.noise.is_empty() {
            let _ = writeln!(
                out,
                "  first noisy exchanges ({} of {}; the baseline does not reproduce them either):",
                listener.noise.len(),
                listener.noisy
            );
            for difference in &listener.noise {
                side_by_side(&mut out, difference);
            }
        }
    }
    let regressions = report.regressions();
    let verdict = if regressions > max_diff { "FAIL" } else { "ok" };
    let _ = writeln!(
        out,
        "\n{regressions} difference(s), {} noisy; --max-diff {max_diff}: {verdict}",
        report.listeners.values().map(|l| l.noisy).sum::<usize>()
    );
    out
}

/// One difference: where, what came in, then recorded | replayed.
fn side_by_side(out: &mut String, difference: &Difference) {
    let exchange = &difference.exchange;
    let what = match &exchange.event {
        Event::Datagram => format!("datagram from {}", exchange.peer),
        Event::Open { conn, .. } => format!("tcp connection {conn} opened by {}", exchange.peer),
        Event::Message { conn } => format!("tcp connection {conn} message from {}", exchange.peer),
    };
    let verdict = match difference.verdict {
        Verdict::DifferentReply => "different reply",
        Verdict::DifferentNext => "different next",
        Verdict::Failure => "failure",
        Verdict::Noisy => "noisy",
        Verdict::Same => "same",
    };
    let _ = writeln!(
        out,
        "    {}:{}  {what}  [{verdict}]",
        exchange.file.display(),
        exchange.line
    );
    if !matches!(exchange.event, Event::Open { .. }) {
        let _ = writeln!(
            out,
            "      {:<8}{}",
            "in",
            shown(&exchange.input, COLUMN * 2)
        );
    }
    let mut columns = vec![
        ("recorded", &exchange.outcome),
        ("replayed", &difference.replayed),
    ];
    if let Some(baseline) = &difference.baseline {
        columns.push(("baseline", baseline));
    }
    let mut header = format!("      {:<8}", "");
    let mut reply = format!("      {:<8}", "reply");
    let mut next = format!("      {:<8}", "next");
    let cells: Vec<(String, String)> = columns.iter().map(|(_, outcome)| cells(outcome)).collect();
    // Replies that differ only far in show from a little before where
    // they part.
    let common = cells.first().map_or(0, |(first, _)| {
        cells
            .iter()
            .map(|(reply, _)| {
                first
                    .chars()
                    .zip(reply.chars())
                    .take_while(|(a, b)| a == b)
                    .count()
            })
            .min()
            .unwrap_or(0)
    });
    let skip = if common > COLUMN - 12 { common - 8 } else { 0 };
    for ((label, _), (r, n)) in columns.iter().zip(&cells) {
        let r = if skip > 0 {
            format!("…{}", r.chars().skip(skip).collect::<String>())
        } else {
            r.clone()
        };
        let _ = write!(header, "{label:<width$} ", width = COLUMN);
        let _ = write!(reply, "{:<width$} ", cut(&r, COLUMN), width = COLUMN);
        let _ = write!(next, "{:<width$} ", cut(n, COLUMN), width = COLUMN);
    }
    for row in [header, reply, next] {
        let _ = writeln!(out, "{}", row.trim_end());
    }
}

/// The reply and `next` cells of an outcome.
fn cells(outcome: &Outcome) -> (String, String) {
    match outcome {
        Outcome::Decided { reply, next } => (
            reply
                .as_ref()
                .map_or_else(|| "(none)".to_owned(), |reply| shown(reply, usize::MAX)),
            next_name(*next).to_owned(),
        ),
        Outcome::Failed { kind, error } => (format!("failed ({kind}): {error}"), "-".to_owned()),
    }
}

/// Bytes as a quoted string with escapes where they are printable text, as
/// hex otherwise; at most `width` characters.
fn shown(bytes: &[u8], width: usize) -> String {
    let text = match std::str::from_utf8(bytes) {
        Ok(text)
            if text
                .chars()
                .all(|c| !c.is_control() || matches!(c, '\n' | '\r' | '\t')) =>
        {
            format!("\"{}\"", text.escape_debug())
        }
        _ => {
            let hex: Vec<String> = bytes.iter().map(|byte| format!("{byte:02x}")).collect();
            format!("hex {}", hex.join(" "))
        }
    };
    cut(&text, width)
}

/// `text`, cut to `width` characters with `…` where it was cut.
fn cut(text: &str, width: usize) -> String {
    if text.chars().count() <= width {
        return text.to_owned();
    }
    let mut cut: String = text.chars().take(width.saturating_sub(1)).collect();
    cut.push('…');
    cut
}

/// The report as one JSON object.
pub fn json(report: &Report, max_diff: usize) -> Value {
    let listeners: serde_json::Map<String, Value> = report
        .listeners
        .iter()
        .map(|(name, listener)| {
            let examples = |differences: &[Difference]| -> Vec<Value> {
                differences.iter().map(difference_json).collect()
            };
            (
                name.clone(),
                json!({
                    "exchanges": listener.exchanges,
                    "opens": listener.opens,
                    "same": listener.same,
                    "different-reply": listener.different_reply,
                    "different-next": listener.different_next,
                    "failure": listener.failure,
                    "noisy": listener.noisy,
                    "recorded-versions": listener.recorded_versions,
                    "differences": examples(&listener.differences),
                    "noise": examples(&listener.noise),
                }),
            )
        })
        .collect();
    let regressions = report.regressions();
    json!({
        "plugin": report.plugin,
        "baseline": report.baseline,
        "listeners": listeners,
        "differences": regressions,
        "max-diff": max_diff,
        "passed": regressions <= max_diff,
    })
}

fn difference_json(difference: &Difference) -> Value {
    let exchange = &difference.exchange;
    let (kind, conn) = match &exchange.event {
        Event::Datagram => ("datagram", None),
        Event::Open { conn, .. } => ("open", Some(*conn)),
        Event::Message { conn } => ("message", Some(*conn)),
    };
    json!({
        "at": format!("{}:{}", exchange.file.display(), exchange.line),
        "kind": kind,
        "conn": conn,
        "peer": exchange.peer.to_string(),
        "in": BASE64.encode(&exchange.input),
        "verdict": match difference.verdict {
            Verdict::DifferentReply => "different-reply",
            Verdict::DifferentNext => "different-next",
            Verdict::Failure => "failure",
            Verdict::Noisy => "noisy",
            Verdict::Same => "same",
        },
        "recorded": outcome_json(&exchange.outcome),
        "replayed": outcome_json(&difference.replayed),
        "baseline": difference.baseline.as_ref().map(outcome_json),
    })
}

fn outcome_json(outcome: &Outcome) -> Value {
    match outcome {
        Outcome::Decided { reply, next } => json!({
            "reply": reply.as_ref().map(|reply| BASE64.encode(reply)),
            "next": next_name(*next),
        }),
        Outcome::Failed { kind, error } => json!({ "failed": kind, "error": error }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_show_as_text_where_printable_and_hex_otherwise() {
        assert_eq!(shown(b"Hello, client!", 80), "\"Hello, client!\"");
        assert_eq!(shown(b"line\n", 80), "\"line\\n\"");
        assert_eq!(shown(&[0, 1, 0xff], 80), "hex 00 01 ff");
        assert_eq!(shown(b"\x1b[2J", 80), "hex 1b 5b 32 4a");
        assert_eq!(cut("abcdef", 4), "abc…");
    }
}
