//! Plugin output reaches the host's log bounded and escaped: whatever a
//! plugin writes (`log` calls, stdout, stderr, a panic message), the host
//! writes at most one line of 4 KiB per line, within the tenant's budget of
//! lines and bytes, and never a character that could end the line, move
//! the cursor or start a terminal escape sequence.

use std::time::Instant;

use crate::common::{
    PATIENCE, Server, plugins, scratch_file, tcp_ask, tcp_client, udp_ask, udp_client,
};

/// More log than this from one of these tests means plugin output went
/// unbounded: each writes a few lines of at most 4 KiB.
const LOG_BOUND: usize = 64 << 10;

/// Waits until `done` holds for the server's log, and returns the log. A
/// failure shows the log's size and its end, not megabytes of it.
fn wait_until(server: &Server, what: &str, done: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let log = server.stderr();
        if done(&log) {
            return log;
        }
        assert!(
            Instant::now() < deadline,
            "the log never showed {what}; {} bytes, ending:\n{}",
            log.len(),
            tail(&log)
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// The last 2 KiB or so of `log`, for failure messages.
fn tail(log: &str) -> &str {
    let mut start = log.len().saturating_sub(2048);
    while !log.is_char_boundary(start) {
        start += 1;
    }
    &log[start..]
}

/// A one-tenant configuration of the hostile plugin.
fn hostile(name: &str, socket: &str, extra: &str) -> String {
    format!(
        "[listeners.{name}]\nplugin = \"{}\"\n{socket} = \"127.0.0.1:0\"\ncall-timeout = \"10s\"\n{extra}\n",
        plugins::HOSTILE
    )
}

/// Regression test for issue 12, item 2: the log budget counted lines, not
/// bytes, so one `log` call with a 20 MiB message wrote a 20 MiB line, and
/// three one-byte datagrams made the host write 60 MiB.
#[test]
fn a_huge_log_message_is_one_line_cut_at_4_kib() {
    let toml = hostile(
        "huge",
        "udp",
        "plugin-config = { behaviour = \"huge-log\", log-bytes = \"20971520\" }",
    );
    let server = Server::with_config(&toml, 1);
    let socket = udp_client(server.udp_of("huge"));
    for byte in 0..3u8 {
        assert_eq!(udp_ask(&socket, &[byte]), [byte], "the client is answered");
    }
    let mark = "… [truncated, 20971520 bytes in all]";
    let log = wait_until(&server, "three truncation marks", |log| {
        log.matches(mark).count() >= 3 || log.len() > LOG_BOUND
    });
    assert!(
        log.len() <= LOG_BOUND,
        "three 20 MiB log calls made the host write {} bytes",
        log.len()
    );
    let shown = "x".repeat(4096);
    for line in log.lines().filter(|line| line.contains(mark)) {
        assert!(
            line.contains(&format!(" {shown}{mark}")) && line.contains("listener=\"huge\""),
            "a marked line is the plugin's, with 4 KiB of its message: {}",
            tail(line)
        );
    }
}

/// Regression test for issue 12, item 2, on the guest's stdout: a guest
/// that wrote without newlines had its output cut into 4 KiB lines, each
/// charged as one line, so megabytes reached the log.
#[test]
fn stdout_without_newlines_is_one_line_cut_at_4_kib() {
    let toml = hostile(
        "spew",
        "tcp",
        "plugin-config = { behaviour = \"spew-stdout\", spew-bytes = \"4194304\" }",
    );
    let server = Server::with_config(&toml, 1);
    let mut stream = tcp_client(server.tcp_of("spew"));
    assert_eq!(
        tcp_ask(&mut stream, b"hi", 2),
        b"hi",
        "the client is answered"
    );
    // The line never ends; it is logged when the connection's instance goes.
    drop(stream);
    let mark = "… [truncated, 4194304 bytes in all]";
    let log = wait_until(&server, "a truncation mark", |log| {
        log.contains(mark) || log.len() > LOG_BOUND
    });
    assert!(
        log.len() <= LOG_BOUND,
        "4 MiB of stdout made the host write {} bytes",
        log.len()
    );
    let line = log
        .lines()
        .find(|line| line.contains(mark))
        .expect("a marked line");
    assert!(
        line.contains(&format!(" {}{mark}", "y".repeat(4096)))
            && line.contains("stream=\"stdout\"")
            && line.contains("listener=\"spew\""),
        "the line is the plugin's stdout, with its first 4 KiB: {}",
        tail(line)
    );
}

/// The byte budget (`log-bytes-rate`) holds where the line budget would let
/// long lines through, and what it drops is counted in lines and bytes.
#[test]
fn long_lines_are_held_to_the_byte_budget() {
    let rate = 8 << 10;
    let line_bytes = 4000;
    let toml = hostile(
        "wordy",
        "udp",
        &format!(
            "log-rate = 1000\nlog-bytes-rate = \"8KiB\"\n\
             plugin-config = {{ behaviour = \"huge-log\", log-bytes = \"{line_bytes}\" }}"
        ),
    );
    let server = Server::with_config(&toml, 1);
    // The bucket holds at most its burst by now, however long start-up took.
    let started = Instant::now();
    let socket = udp_client(server.udp_of("wordy"));
    for byte in 0..20u8 {
        assert_eq!(udp_ask(&socket, &[byte]), [byte]);
    }
    // Dropped lines are reported with the next line that gets through.
    let deadline = Instant::now() + PATIENCE;
    let report = loop {
        let log = server.stderr();
        if let Some(line) = log
            .lines()
            .find(|line| line.contains("plugin log lines dropped"))
        {
            break line.to_owned();
        }
        assert!(Instant::now() < deadline, "no drop report:\n{}", tail(&log));
        assert_eq!(udp_ask(&socket, b"more"), b"more");
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    let seconds = started.elapsed().as_secs_f64();
    let log = server.stderr();
    let written = log
        .lines()
        .filter(|line| line.contains(&"x".repeat(line_bytes)))
        .count();
    // The bucket holds twice the rate and refills at the rate.
    let allowed = ((2.0 + seconds) * f64::from(rate) / line_bytes as f64) as usize + 1;
    assert!(
        (1..=allowed).contains(&written),
        "{written} lines of {line_bytes} bytes in {seconds:.1}s under 8KiB/s (at most {allowed})"
    );
    let counts: Vec<u64> = report
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|word| word.parse().ok())
        .collect();
    let (lines, bytes) = match counts[..] {
        [.., lines, bytes] => (lines, bytes),
        _ => panic!("no counts in {report:?}"),
    };
    assert!(
        report.contains(&format!(
            "{lines} plugin log lines dropped ({bytes} bytes; over log-rate or log-bytes-rate)"
        )) && lines > 0
            && bytes == lines * line_bytes as u64,
        "{report}"
    );
}

/// What the forging tenants write: a newline, then a line dressed as the
/// host's own warning about another tenant, then a carriage return, ANSI
/// colour codes, a C1 control sequence introducer and a Unicode line
/// separator, in TOML's escapes.
const FORGED_TOML: &str = r#"ok\n1999-12-31T23:59:59.999999Z  WARN wasm_echo::listener::tcp: connection closed: forged listener=\"good\"\r\u001b[31mred\u001b[0m\u009b2J\u2028end"#;

/// The forged text as the host must log it, on one line.
const FORGED_ESCAPED: &str = r#"1999-12-31T23:59:59.999999Z  WARN wasm_echo::listener::tcp: connection closed: forged listener="good"\r\x1b[31mred\x1b[0m\u{9b}2J\u{2028}end"#;

/// Characters no log line may carry from a plugin.
fn raw_controls(text: &str) -> Vec<char> {
    text.chars()
        .filter(|&c| (c.is_control() && c != '\n') || c == '\u{2028}')
        .collect()
}

/// Regression test for issue 12, item 3: a newline in a `log` message was
/// written as is, so a plugin could print a line indistinguishable from the
/// host's own, naming another tenant. Its stdout, its stderr and its panic
/// message are held to the same rule.
#[test]
fn a_plugin_cannot_forge_a_host_log_line() {
    let toml = format!(
        "[listeners.good]\nplugin = \"echo\"\nudp = \"127.0.0.1:0\"\n\n{}\n{}",
        hostile(
            "evil",
            "udp",
            &format!("plugin-config = {{ behaviour = \"forge-log\", text = \"{FORGED_TOML}\" }}")
        ),
        hostile(
            "evil-panic",
            "udp",
            &format!("plugin-config = {{ behaviour = \"forge-panic\", text = \"{FORGED_TOML}\" }}")
        ),
    );
    let server = Server::with_config(&toml, 3);
    assert_eq!(udp_ask(&udp_client(server.udp_of("evil")), b"hi"), b"hi");
    udp_client(server.udp_of("evil-panic"))
        .send(b"hi")
        .expect("send");
    assert_eq!(udp_ask(&udp_client(server.udp_of("good")), b"hi"), b"hi");
    // The forging call was answered, so its lines came before this one.
    let log = wait_until(&server, "the panic's datagram dropped", |log| {
        log.contains("datagram dropped")
    });

    assert!(
        !log.lines().any(|line| line.starts_with("1999-12-31")),
        "a plugin started a log line of its own:\n{log}"
    );
    assert_eq!(
        raw_controls(&log),
        Vec::<char>::new(),
        "raw control characters:\n{log}"
    );
    for line in log.lines().filter(|line| line.contains("forged")) {
        assert!(
            line.contains(" plugin: ")
                && (line.contains("listener=\"evil\"") || line.contains("listener=\"evil-panic\"")),
            "forged text outside a plugin line of the forging tenant: {line}"
        );
    }
    let forged_by = |tag: &str| {
        log.lines()
            .any(|line| line.contains(FORGED_ESCAPED) && line.contains(tag))
    };
    assert!(
        log.contains(&format!("ok\\n{FORGED_ESCAPED}")),
        "the log call's newline is escaped in place:\n{log}"
    );
    assert!(forged_by("stream=\"stdout\""), "stdout:\n{log}");
    assert!(forged_by("stream=\"stderr\""), "stderr:\n{log}");
    assert!(
        forged_by("listener=\"evil-panic\""),
        "panic message:\n{log}"
    );
}

/// Issue 12, item 3, in JSON logs: JSON escapes a newline inside a string,
/// so the line is the host's either way, but the message a log reader
/// decodes must read the same as in text logs, with no raw control
/// characters for a terminal to obey.
#[test]
fn json_logs_carry_plugin_text_escaped_the_same_way() {
    let toml = hostile(
        "evil",
        "udp",
        &format!("plugin-config = {{ behaviour = \"forge-log\", text = \"{FORGED_TOML}\" }}"),
    );
    let path = scratch_file("forge.toml", toml.as_bytes());
    let path = path.to_str().expect("utf-8 path");
    let server = Server::with_args(&["--config", path, "--log-format", "json"]);
    assert_eq!(udp_ask(&udp_client(server.udp_of("evil")), b"hi"), b"hi");
    let log = wait_until(&server, "three forgeries", |log| {
        log.matches("forged").count() >= 3
    });
    let mut messages = Vec::new();
    for line in log.lines() {
        let event: serde_json::Value = serde_json::from_str(line)
            .unwrap_or_else(|error| panic!("not one JSON object ({error}): {line}"));
        let message = event["fields"]["message"].as_str().unwrap_or_default();
        if message.contains("forged") {
            assert_eq!(event["target"], "plugin", "{line}");
            assert_eq!(event["fields"]["listener"], "evil", "{line}");
            messages.push(message.to_owned());
        }
    }
    assert_eq!(messages.len(), 3, "log, stdout and stderr:\n{log}");
    for message in &messages {
        assert_eq!(raw_controls(message), Vec::<char>::new(), "{message:?}");
        assert!(!message.contains('\n'), "{message:?}");
        assert!(message.ends_with(FORGED_ESCAPED), "{message:?}");
    }
    assert!(
        messages.contains(&format!("ok\\n{FORGED_ESCAPED}")),
        "{messages:?}"
    );
}

/// Regression test for issue 20: `WASM_ECHO_LOG=debug` printed about 9,500
/// lines in its first second, nearly all Cranelift's (`cranelift_codegen::
/// timing`). A bare `debug` is for wasm-echo and its plugins; a library's
/// own lines still come when a directive names it.
#[test]
fn wasm_echo_log_debug_is_for_the_host_not_the_compiler() {
    let args = ["--plugin", "echo", "--udp", "127.0.0.1:0"];
    let server = Server::with_env(&[("WASM_ECHO_LOG", "debug")], &args, 1);
    let log = server.wait_for_log("serving");
    // Compiled, or loaded from the suite's shared compiled-code cache:
    // either way the host says so at debug.
    assert!(
        log.contains(" DEBUG wasm_echo::plugin::runtime: compiled")
            && log.contains("built-in plugin `echo`"),
        "no host debug line:\n{}",
        tail(&log)
    );
    let foreign: Vec<&str> = log
        .lines()
        .filter(|line| line.contains("DEBUG") || line.contains("TRACE"))
        .filter(|line| !line.contains(" wasm_echo::") && !line.contains(" plugin:"))
        .take(3)
        .collect();
    assert!(
        foreign.is_empty(),
        "debug lines of other crates: {foreign:#?}"
    );
    drop(server);

    // A cache of its own, empty, so that Cranelift runs at all.
    let cache = crate::common::scratch_file("placeholder", b"").with_file_name("cache");
    let cache = cache.to_str().expect("utf-8 path");
    let compiling = [
        "--plugin",
        "echo",
        "--udp",
        "127.0.0.1:0",
        "--cache-dir",
        cache,
    ];
    let named = Server::with_env(
        &[("WASM_ECHO_LOG", "debug,cranelift_codegen=debug")],
        &compiling,
        1,
    );
    wait_until(
        &named,
        "Cranelift's debug lines, asked for by name",
        |log| log.contains(" DEBUG cranelift_codegen"),
    );
}

/// Regression test for issue 20: the README's `WASM_ECHO_LOG=plugin=warn`
/// hid every host line, the host's own warnings (`datagram dropped: plugin
/// trapped`) included. It quiets the plugins' info lines, and only them.
#[test]
fn wasm_echo_log_plugin_warn_keeps_the_host_warnings() {
    let toml = format!(
        "{}\n[listeners.trap]\nplugin = \"{}\"\nudp = \"127.0.0.1:0\"\n",
        hostile(
            "chatty",
            "udp",
            "plugin-config = { behaviour = \"forge-log\", text = \"quiet words\" }"
        ),
        plugins::TRAP
    );
    let path = scratch_file("quiet.toml", toml.as_bytes());
    let server = Server::with_env(
        &[("WASM_ECHO_LOG", "plugin=warn")],
        &["--config", path.to_str().expect("utf-8 path")],
        2,
    );
    // Its log call (a warning), stdout and stderr (info) come before its reply.
    assert_eq!(udp_ask(&udp_client(server.udp_of("chatty")), b"hi"), b"hi");
    udp_client(server.udp_of("trap"))
        .send(b"panic")
        .expect("send");
    let log = server.wait_for_log("datagram dropped: plugin trapped");
    let said = |what: &str| log.lines().filter(|line| line.contains(what)).count();
    assert_eq!(
        said("quiet words"),
        1,
        "only the log call's warning:\n{log}"
    );
    assert_eq!(said("WARN plugin: quiet words"), 1, "{log}");
    assert_eq!(said("INFO plugin"), 0, "plugin info lines:\n{log}");
    assert!(
        log.contains(" INFO wasm_echo::server: serving"),
        "host info lines:\n{log}"
    );
}

/// Regression test for issue 20: a Rust plugin's panic became four `info`
/// lines (an empty one, `thread ... panicked at`, the message and the note
/// about `RUST_BACKTRACE`). It is one warning with the message on it.
#[test]
fn a_guest_panic_is_one_warning_line() {
    let server = Server::with_args(&["--plugin", plugins::TRAP, "--udp", "127.0.0.1:0"]);
    udp_client(server.udp()).send(b"panic").expect("send");
    let log = server.wait_for_log("datagram dropped: plugin trapped");
    let plugin: Vec<&str> = log
        .lines()
        .filter(|line| line.contains(" plugin:"))
        .collect();
    assert_eq!(plugin.len(), 1, "{log}");
    assert!(
        plugin[0].contains(" WARN plugin: thread '")
            && plugin[0].contains(" panicked at trap/src/lib.rs:")
            && plugin[0].contains(": asked to panic listener=\"main\""),
        "{log}"
    );
    assert!(!log.contains("RUST_BACKTRACE"), "{log}");
}

/// A plugin's stdout and stderr become host log lines tagged with the
/// listener, the plugin's name and the stream, and its stdin is empty: a
/// read gets end-of-file at once, although the server's own stdin has
/// bytes to read. Regression guard: a stdin inherited from the host (the
/// plugin reading the host's input), and plugin output that reaches
/// stderr untagged.
#[test]
fn plugin_stdout_and_stderr_are_tagged_lines_and_stdin_is_empty() {
    let toml = hostile(
        "reader",
        "udp",
        "plugin-config = { behaviour = \"read-stdin\" }",
    );
    let config = scratch_file("wasm-echo.toml", toml.as_bytes());
    let input = scratch_file("stdin.txt", b"the host's own input\n");
    let mut command = std::process::Command::new(crate::common::BIN);
    command
        .args(["serve", "--config", config.to_str().expect("utf-8 path")])
        .stdin(std::fs::File::open(&input).expect("the server's stdin"));
    let server = Server::from_command(command, 1);
    let socket = udp_client(server.udp());
    assert_eq!(udp_ask(&socket, b"hi"), b"stdin: 0 bytes");
    let log = wait_until(&server, "both streams", |log| {
        log.contains("to stdout") && log.contains("to stderr")
    });
    for stream in ["stdout", "stderr"] {
        let line = log
            .lines()
            .find(|line| line.contains(&format!("to {stream}")))
            .expect("the line");
        for tag in [
            " plugin: ".to_owned(),
            "listener=\"reader\"".to_owned(),
            "plugin=\"hostile\"".to_owned(),
            format!("stream=\"{stream}\""),
        ] {
            assert!(line.contains(&tag), "{stream} line lacks {tag:?}: {line}");
        }
    }
}
