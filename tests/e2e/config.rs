use std::io::Write;
use std::net::{TcpListener, UdpSocket};

use crate::common::{
    Server, free_port, one_line_error, run, scratch_file, succeeded, tcp_ask, tcp_client, udp_ask,
    udp_client,
};

/// Serves `toml` and expects it refused with one line naming `key` and
/// `reason`, and nothing listening. Meanwhile the test holds the good
/// listener's address itself: a server that bound its sockets before
/// checking the whole file would fail on that address ("address in use")
/// instead of naming the bad key.
fn assert_refused(toml: &str, key: &str, reason: &str, good: std::net::SocketAddr) {
    let _held = (
        UdpSocket::bind(good).expect("hold the good listener's udp address"),
        TcpListener::bind(good).expect("hold the good listener's tcp address"),
    );
    let path = scratch_file("bad.toml", toml.as_bytes());
    let output = run(&["serve", "--config", path.to_str().expect("utf-8 path")]);
    let refusal = one_line_error(&output, &[&path.display().to_string(), key, reason]);
    assert!(
        String::from_utf8_lossy(&output.stdout).is_empty(),
        "nothing listened"
    );
    // `check --config` refuses it too, in the same words.
    let checked = run(&["check", "--config", path.to_str().expect("utf-8 path")]);
    assert_eq!(one_line_error(&checked, &[]), refusal);
}

/// `check --config` resolves the file and starts each listener's plugin,
/// but binds nothing: the addresses it names may be taken (or be another
/// machine's, such as a pod's).
#[test]
fn check_config_starts_every_plugin_and_binds_nothing() {
    let addr = free_port();
    let _held = (
        UdpSocket::bind(addr).expect("hold the udp address"),
        TcpListener::bind(addr).expect("hold the tcp address"),
    );
    let other = free_port();
    let toml = format!(
        "{}[listeners.b-counter]\nplugin = \"counter\"\ntcp = \"{other}\"\n",
        good(addr)
    );
    let path = scratch_file("check.toml", toml.as_bytes());
    let output = run(&["check", "--config", path.to_str().expect("utf-8 path")]);
    let stdout = succeeded("check --config", &output);
    assert_eq!(
        stdout,
        format!(
            "ok: {} holds 2 listener(s)\n  a-good: built-in plugin `echo` on udp {addr}, tcp {addr}\n  \
             b-counter: built-in plugin `counter` on tcp {other}\n",
            path.display()
        )
    );
}

/// A valid listener, `a-good`, sorted before the broken one.
fn good(addr: std::net::SocketAddr) -> String {
    format!("[listeners.a-good]\nplugin = \"echo\"\nudp = \"{addr}\"\ntcp = \"{addr}\"\n\n")
}

#[test]
fn an_unknown_key_is_named_with_its_line() {
    let addr = free_port();
    let toml = format!(
        "{}[listeners.b-bad]\nplugin = \"echo\"\nudp = \"127.0.0.1:0\"\nudpp = \"x\"\n",
        good(addr)
    );
    assert_refused(
        &toml,
        ":9: listeners.b-bad.udpp",
        "unknown field `udpp`",
        addr,
    );
}

#[test]
fn a_bad_address_is_named() {
    let addr = free_port();
    let toml = format!(
        "{}[listeners.b-bad]\nplugin = \"echo\"\nudp = \"localhost\"\n",
        good(addr)
    );
    assert_refused(
        &toml,
        "listeners.b-bad.udp",
        "is not an IP address and port",
        addr,
    );
}

#[test]
fn two_listeners_on_one_address_are_refused() {
    let addr = free_port();
    let wildcard = format!("0.0.0.0:{}", addr.port());
    let toml = format!(
        "{}[listeners.b-bad]\nplugin = \"hello\"\ntcp = \"{wildcard}\"\n",
        good(addr)
    );
    assert_refused(
        &toml,
        "listeners.b-bad.tcp",
        "is also listener `a-good`'s address",
        addr,
    );
}

#[test]
fn a_missing_plugin_is_named() {
    let addr = free_port();
    let toml = format!(
        "{}[listeners.b-bad]\nplugin = \"plugins/missing.wasm\"\nudp = \"127.0.0.1:0\"\n",
        good(addr)
    );
    assert_refused(
        &toml,
        "listeners.b-bad.plugin",
        "missing.wasm: No such file",
        addr,
    );
}

#[test]
fn a_plugin_for_another_world_is_refused() {
    let addr = free_port();
    let empty = scratch_file("empty.wasm", b"\0asm\x0d\0\x01\0");
    let toml = format!(
        "{}[listeners.b-bad]\nplugin = \"{}\"\nudp = \"127.0.0.1:0\"\n",
        good(addr),
        empty.display()
    );
    assert_refused(
        &toml,
        "listeners.b-bad.plugin",
        "does not export `wasm-echo:plugin/udp@0.2.0`",
        addr,
    );
}

#[test]
fn a_limit_out_of_range_is_refused() {
    let addr = free_port();
    for (key, value, reason) in [
        ("call-timeout", "\"2m\"", "2m is out of range (1ms to 1m)"),
        // Sizes in the units they are written in.
        (
            "memory-limit",
            "\"1KiB\"",
            "1KiB is out of range (1MiB to 4GiB)",
        ),
        ("udp-amplification", "0", "0 is out of range (1 to 1000)"),
        ("max-connections", "0", "0 is out of range"),
        ("write-timeout", "\"2h\"", "2h is out of range (10ms to 1h)"),
        ("memory-limit", "\"lots\"", "expected a size like 64MiB"),
        // Its burst must hold a whole 4 KiB line.
        (
            "log-bytes-rate",
            "\"1KiB\"",
            "1KiB is out of range (4KiB to 1GiB)",
        ),
    ] {
        let toml = format!(
            "{}[listeners.b-bad]\nplugin = \"echo\"\nudp = \"127.0.0.1:0\"\n{key} = {value}\n",
            good(addr)
        );
        assert_refused(&toml, &format!("listeners.b-bad.{key}"), reason, addr);
    }
}

#[test]
fn a_listener_needs_an_address_and_a_file_needs_a_listener() {
    let addr = free_port();
    let toml = format!("{}[listeners.b-bad]\nplugin = \"echo\"\n", good(addr));
    assert_refused(
        &toml,
        "listeners.b-bad.udp",
        "needs `udp`, `tcp` or both",
        addr,
    );
    // Issue 20: an empty file said `missing field `listeners``.
    for text in ["grace = \"1s\"\n", ""] {
        let path = scratch_file("empty.toml", text.as_bytes());
        let output = run(&["serve", "--config", path.to_str().expect("utf-8 path")]);
        one_line_error(&output, &["no listeners: add a [listeners.NAME] table"]);
    }
}

/// Regression test for issue 20: `udp = "localhost:0"` (and `--udp
/// localhost:0`) was refused as "invalid socket address syntax", without
/// saying that host names are what is not accepted.
#[test]
fn a_host_name_is_refused_with_the_reason() {
    let addr = free_port();
    let toml = format!(
        "{}[listeners.b-bad]\nplugin = \"echo\"\nudp = \"localhost:0\"\n",
        good(addr)
    );
    assert_refused(
        &toml,
        "listeners.b-bad.udp",
        "`localhost:0`: host names are not accepted, give an IP address (e.g. 127.0.0.1:0",
        addr,
    );
    let output = run(&["serve", "--tcp", "localhost:0"]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(stderr.contains("host names are not accepted"), "{stderr}");
}

/// The shipped example serves what it says: `greeter` greets over UDP and
/// TCP, and `mirror` echoes over UDP and frames TCP by lines (a line is
/// answered only once it is whole, `\r\n` ends it too, and the reply gets
/// its `\n`, where raw framing would echo the bytes as they came).
#[test]
fn the_example_configuration_is_valid() {
    let example = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../wasm-echo.example.toml"
    ))
    .expect("the example ships");
    let toml = example
        .replace("127.0.0.1:12345", "127.0.0.1:0")
        .replace("127.0.0.1:12346", "127.0.0.1:0");
    let server = Server::with_config(&toml, 4);
    assert_eq!(
        udp_ask(&udp_client(server.udp_of("greeter")), b"Hello, server!"),
        b"Hello, client!"
    );
    assert_eq!(
        tcp_ask(&mut tcp_client(server.tcp_of("greeter")), b"hi", 18),
        b"hello, tcp client!"
    );
    assert_eq!(
        udp_ask(&udp_client(server.udp_of("mirror")), b"mirror me"),
        b"mirror me"
    );
    let mut mirror = tcp_client(server.tcp_of("mirror"));
    mirror.write_all(b"one\r\ntw").expect("send");
    assert_eq!(
        tcp_ask(&mut mirror, b"o\r\n", 8),
        b"one\ntwo\n",
        "whole lines, each answered with its own line"
    );
}

#[test]
fn one_tenants_exit_stops_only_that_tenant() {
    let toml = "[listeners.alpha]\nplugin = \"hello\"\nudp = \"127.0.0.1:0\"\ntcp = \"127.0.0.1:0\"\n\n\
                [listeners.beta]\nplugin = \"hello\"\nudp = \"127.0.0.1:0\"\n\
                plugin-config = { udp-greeting = \"beta here\" }\n";
    let mut server = Server::with_config(toml, 3);
    let alpha = udp_client(server.udp_of("alpha"));
    let beta = udp_client(server.udp_of("beta"));
    alpha.send(b"exit").expect("send");
    tcp_client(server.tcp_of("alpha"))
        .write_all(b"exit")
        .expect("send exit");
    server.wait_for_log("tcp listener on");
    server.wait_for_log("udp listener on");
    assert_eq!(udp_ask(&beta, b"hi"), b"beta here", "beta is untouched");
    assert!(server.is_running());
    beta.send(b"exit").expect("send");
    assert!(
        server.wait_exit().success(),
        "the process ends with its last listener"
    );
}

#[test]
fn honor_stop_false_ignores_exit() {
    let toml =
        "[listeners.stubborn]\nplugin = \"hello\"\nudp = \"127.0.0.1:0\"\nhonor-stop = false\n";
    let server = Server::with_config(toml, 1);
    let socket = udp_client(server.udp_of("stubborn"));
    socket.send(b"exit").expect("send");
    server.wait_for_log("ignored (honor-stop = false)");
    assert_eq!(udp_ask(&socket, b"still there?"), b"Hello, client!");
}

// Compiled code is loaded from the cache directory, so one that another
// user could write is refused before anything binds, in one line.
#[test]
fn a_cache_dir_others_can_write_is_refused() {
    use std::os::unix::fs::PermissionsExt;
    let dir = scratch_file("placeholder", b"")
        .parent()
        .expect("scratch folder")
        .join("shared-cache");
    std::fs::create_dir_all(&dir).expect("made");
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).expect("chmod");
    let dir_text = dir.display().to_string();
    let output = run(&["serve", "--udp", "127.0.0.1:0", "--cache-dir", &dir_text]);
    one_line_error(
        &output,
        &["--cache-dir", &dir_text, "can be written by others"],
    );
}
