use std::net::{TcpListener, UdpSocket};
use std::process::Output;

use crate::common::{one_line_error, plugins, run, scratch_file};

fn serve_with(plugin: &str) -> Output {
    run(&["serve", "--plugin", plugin, "--udp", "127.0.0.1:0"])
}

#[test]
fn a_missing_file_is_named() {
    let output = serve_with("/nonexistent/plugin.wasm");
    one_line_error(
        &output,
        &["cannot read /nonexistent/plugin.wasm", "No such file"],
    );
}

#[test]
fn an_unknown_builtin_lists_the_builtins() {
    let output = serve_with("helo");
    one_line_error(
        &output,
        &["no built-in plugin named `helo`", "hello, echo, counter"],
    );
}

#[test]
fn a_file_that_is_not_wasm_is_refused() {
    let path = scratch_file("notes.wasm", b"these are not the bytes you are looking for");
    let output = serve_with(path.to_str().expect("utf-8 path"));
    one_line_error(&output, &["is not a WebAssembly component"]);
}

#[test]
fn a_core_module_is_told_to_become_a_component() {
    // The smallest valid core module: the header and nothing else.
    let path = scratch_file("core.wasm", b"\0asm\x01\0\0\0");
    let output = serve_with(path.to_str().expect("utf-8 path"));
    one_line_error(
        &output,
        &[
            "is a core WebAssembly module, not a component",
            "wasm-tools component new",
        ],
    );
}

#[test]
fn a_component_for_another_world_names_the_missing_export() {
    // The smallest valid component: it exports nothing.
    let path = scratch_file("empty.wasm", b"\0asm\x0d\0\x01\0");
    let output = serve_with(path.to_str().expect("utf-8 path"));
    one_line_error(
        &output,
        &[
            "does not implement the wasm-echo:plugin world",
            "wasm-echo:plugin/udp@0.2.0",
        ],
    );
    let output = run(&["check", path.to_str().expect("utf-8 path")]);
    one_line_error(&output, &["wasm-echo:plugin/udp@0.2.0"]);
}

#[test]
fn a_port_in_use_says_so() {
    let taken = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = taken.local_addr().expect("addr").to_string();
    let output = run(&["serve", "--tcp", &addr]);
    one_line_error(
        &output,
        &[&format!("cannot listen on tcp {addr}"), "in use", "--tcp"],
    );

    let taken = UdpSocket::bind("127.0.0.1:0").expect("bind");
    let addr = taken.local_addr().expect("addr").to_string();
    let output = run(&["serve", "--udp", &addr]);
    one_line_error(&output, &[&format!("cannot listen on udp {addr}"), "--udp"]);
}

#[test]
fn a_bad_address_is_refused_by_the_parser() {
    let output = run(&["serve", "--udp", "localhost"]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(
        stderr.contains("invalid value 'localhost' for '--udp <ADDR>'"),
        "{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn a_bad_limit_is_refused_by_the_parser() {
    let output = run(&["serve", "--memory-limit", "lots"]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(stderr.contains("expected a size like 64MiB"), "{stderr}");
}

/// `check` names the contract version and the optional parts, for plugins
/// of both versions (trap stays at 0.1.0 on purpose).
#[test]
fn check_reports_contract_imports_and_exports() {
    let cases = [
        ("hello", "0.2.0", "(no optional parts)"),
        ("echo", "0.2.0", "(optional parts: udp-batch)"),
        ("counter", "0.2.0", "(optional parts: state, udp-batch)"),
        (plugins::TRAP, "0.1.0", "(no optional parts)"),
    ];
    for (plugin, version, parts) in cases {
        let output = run(&["check", plugin]);
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(
            output.status.success(),
            "{plugin}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        let first = stdout.lines().next().unwrap_or_default();
        assert!(first.starts_with("ok: "), "{stdout}");
        assert!(
            first.ends_with(&format!(
                "is a wasm-echo:plugin@{version} component {parts}"
            )),
            "{plugin}: {first}"
        );
        assert!(
            stdout.contains(&format!("  wasm-echo:plugin/udp@{version}")),
            "{stdout}"
        );
        assert!(
            stdout.contains(&format!("  wasm-echo:plugin/tcp@{version}")),
            "{stdout}"
        );
    }
    let stdout = String::from_utf8_lossy(&run(&["check", "counter"]).stdout).into_owned();
    assert!(
        stdout.contains("  wasm-echo:plugin/state@0.2.0"),
        "{stdout}"
    );
    // `hello` reads its greetings through the host interface.
    let stdout = String::from_utf8_lossy(&run(&["check", "hello"]).stdout).into_owned();
    assert!(stdout.contains("  wasm-echo:plugin/host@0.2.0"), "{stdout}");
}

#[test]
fn the_client_says_when_nothing_answers() {
    // Nothing listens on it: not an ephemeral port another test's client
    // could be given meanwhile.
    let addr = crate::common::free_port().to_string();
    let output = run(&["client", "tcp", &addr]);
    one_line_error(&output, &["nothing listens on tcp", "connection refused"]);

    let silent = UdpSocket::bind("127.0.0.1:0").expect("bind");
    let addr = silent.local_addr().expect("addr").to_string();
    let output = run(&["client", "udp", &addr, "--timeout", "200ms"]);
    one_line_error(&output, &["no reply from udp", "within 200ms"]);

    let output = run(&["client", "udp", "127.0.0.1"]);
    one_line_error(&output, &["bad server address"]);
}
