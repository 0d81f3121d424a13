//! One configuration path: a flag gets exactly the error a file gets for
//! the same mistake, and a plugin path means what it meant where it was
//! typed. One control socket per server: `reload` never guesses.

use std::path::Path;
use std::process::Command;

use crate::common::{
    BIN, Server, one_line_error, plugins, poll_until, run, scratch_file, udp_ask, udp_client,
};

/// Every key the command line can also set, with a value out of its range
/// written as a flag and as a TOML value.
const OUT_OF_RANGE: &[(&str, &str, &str)] = &[
    ("call-timeout", "0ms", "\"0ms\""),
    ("call-timeout", "2m", "\"2m\""),
    ("memory-limit", "0", "0"),
    ("memory-limit", "8GiB", "\"8GiB\""),
    ("max-message", "0", "0"),
    ("max-message", "65MiB", "\"65MiB\""),
    ("grace", "2h", "\"2h\""),
    ("max-plugin-size", "1KiB", "\"1KiB\""),
];

/// Keys a listener has (the rest are the server's, at the top level).
const LISTENER_KEYS: &[&str] = &["call-timeout", "memory-limit", "max-message"];

/// The one line a refused `wasm-echo ARGS` printed.
fn refusal(args: &[&str]) -> String {
    one_line_error(&run(args), &[])
}

/// Regression: `serve --call-timeout 0ms`, `--memory-limit 0` and
/// `--max-message 0` were accepted; only a file's values were checked.
#[test]
fn an_out_of_range_flag_gets_the_error_a_file_gets() {
    for (key, flag, toml) in OUT_OF_RANGE {
        let from_flag = refusal(&["serve", &format!("--{key}"), flag, "--udp", "127.0.0.1:0"]);
        let file = if LISTENER_KEYS.contains(key) {
            format!("[listeners.main]\nplugin = \"echo\"\nudp = \"127.0.0.1:0\"\n{key} = {toml}\n")
        } else {
            format!("{key} = {toml}\n[listeners.main]\nplugin = \"echo\"\nudp = \"127.0.0.1:0\"\n")
        };
        let path = scratch_file("range.toml", file.as_bytes());
        let from_file = refusal(&["serve", "--config", path.to_str().expect("utf-8")]);
        let flag_reason = from_flag
            .strip_prefix(&format!("error: --{key}: "))
            .unwrap_or_else(|| panic!("{key}: the flag's error names the flag: {from_flag}"));
        let file_key = if LISTENER_KEYS.contains(key) {
            format!("listeners.main.{key}")
        } else {
            (*key).to_owned()
        };
        let file_reason = from_file
            .split_once(&format!("{file_key}: "))
            .map(|(_, reason)| reason)
            .unwrap_or_else(|| panic!("{key}: the file's error names the key: {from_file}"));
        assert_eq!(flag_reason, file_reason, "{key} = {flag}");
        assert!(flag_reason.contains("out of range"), "{key}: {flag_reason}");
    }
}

/// Keys only a file can set are checked the same way.
#[test]
fn every_file_only_key_is_range_checked() {
    for (key, value) in [
        ("table-elements", "0"),
        ("instances", "0"),
        ("max-reply", "0"),
        ("udp-amplification", "0"),
        ("max-connections", "0"),
        ("idle-timeout", "\"1ms\""),
        ("rate-limit", "20000000"),
        ("log-rate", "0"),
    ] {
        let file = format!(
            "[listeners.main]\nplugin = \"echo\"\nudp = \"127.0.0.1:0\"\n{key} = {value}\n"
        );
        let path = scratch_file("range.toml", file.as_bytes());
        let error = refusal(&["serve", "--config", path.to_str().expect("utf-8")]);
        assert!(
            error.contains(&format!("listeners.main.{key}: ")) && error.contains("out of range"),
            "{key}: {error}"
        );
    }
}

/// Regression: `reload --plugin ./x.wasm` was resolved in the server's
/// working directory, not the caller's.
#[test]
fn a_relative_plugin_path_is_the_callers() {
    let control = scratch_file("placeholder", b"").with_file_name("control.sock");
    let control = control.to_str().expect("utf-8");
    let server = Server::start("hello", &["--control", control]);
    let dir = scratch_file(
        "echo.wasm",
        &std::fs::read(plugins::ECHO).expect("built echo"),
    );
    let dir = dir.parent().expect("scratch dir");
    let reloaded = Command::new(BIN)
        .current_dir(dir)
        .args(["reload", "--control", control, "--plugin", "./echo.wasm"])
        .output()
        .expect("reload runs");
    assert!(
        reloaded.status.success(),
        "{}",
        String::from_utf8_lossy(&reloaded.stderr)
    );
    assert_eq!(udp_ask(&udp_client(server.udp()), b"mine"), b"mine");
}

/// Serves `hello` with its default control socket in `runtime`.
fn server_in(runtime: &Path) -> Server {
    Server::with_runtime_dir(runtime, &["--plugin", "hello", "--udp", "127.0.0.1:0"])
}

/// `wasm-echo reload ARGS` run with `XDG_RUNTIME_DIR=runtime`.
fn reload_in(runtime: &Path, args: &[&str]) -> std::process::Output {
    Command::new(BIN)
        .env("XDG_RUNTIME_DIR", runtime)
        .arg("reload")
        .args(args)
        .output()
        .expect("reload runs")
}

/// Regression: two servers shared one default control socket, and a plain
/// `reload` meant for the second reloaded the first and said so as a
/// success.
#[test]
fn with_two_servers_reload_reloads_neither_and_names_both() {
    let runtime = scratch_file("placeholder", b"").with_file_name("runtime");
    std::fs::create_dir_all(&runtime).expect("runtime dir");
    let first = server_in(&runtime);
    let reloaded = reload_in(&runtime, &["--plugin", "echo"]);
    assert!(
        reloaded.status.success(),
        "one server: it is the one meant: {}",
        String::from_utf8_lossy(&reloaded.stderr)
    );
    assert_eq!(udp_ask(&udp_client(first.udp()), b"one"), b"one");

    let second = server_in(&runtime);
    let refused = reload_in(&runtime, &["--plugin", "counter"]);
    let error = one_line_error(&refused, &[]);
    for server in [&first, &second] {
        let socket = format!("serve-{}.sock", server.pid());
        assert!(error.contains(&socket), "names {socket}: {error}");
    }
    // Neither was reloaded: the first still echoes, the second greets.
    assert_eq!(udp_ask(&udp_client(first.udp()), b"two"), b"two");
    assert_eq!(
        udp_ask(&udp_client(second.udp()), b"two"),
        b"Hello, client!"
    );
}

/// The README's default control socket: without `--control`, a server
/// makes `$XDG_RUNTIME_DIR/wasm-echo/serve-PID.sock`, mode 0600, in a
/// folder of mode 0700, and a plain `reload` finds it there.
#[test]
fn the_default_control_socket_is_private_and_found_without_control() {
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    let runtime = scratch_file("placeholder", b"").with_file_name("runtime");
    std::fs::create_dir_all(&runtime).expect("runtime dir");
    let server = server_in(&runtime);
    let folder = runtime.join("wasm-echo");
    let socket = folder.join(format!("serve-{}.sock", server.pid()));
    let metadata = poll_until("the default control socket", || {
        std::fs::symlink_metadata(&socket).ok()
    });
    assert!(metadata.file_type().is_socket(), "{}", socket.display());
    assert_eq!(
        metadata.permissions().mode() & 0o777,
        0o600,
        "{} is private to its user",
        socket.display()
    );
    let folder_mode = std::fs::metadata(&folder).expect("control folder");
    assert_eq!(folder_mode.permissions().mode() & 0o777, 0o700);
    let reloaded = reload_in(&runtime, &["--plugin", "echo"]);
    assert!(
        reloaded.status.success(),
        "{}",
        String::from_utf8_lossy(&reloaded.stderr)
    );
    assert_eq!(udp_ask(&udp_client(server.udp()), b"found"), b"found");
}
