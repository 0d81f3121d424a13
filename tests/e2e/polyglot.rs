//! The `hello` and `echo` plugins written in Python, JavaScript and C
//! (guest-plugins/{python,js,c}) against the same contract as the Rust
//! ones, held to the same behaviour: a contract change that breaks one
//! language fails here. The Python `counter` hands its counts over across
//! a reload, to and from the Rust one.
//!
//! They are built by scripts/build-polyglot.sh (scripts/test.sh runs it),
//! not by host/build.rs, since their toolchains are not Rust's; the folder
//! it wrote comes in `WASM_ECHO_POLYGLOT_DIR`.

use std::io::Write;
use std::path::{Path, PathBuf};

use crate::common::{Server, tcp_ask, tcp_client, tcp_read_to_end, udp_ask, udp_client};

/// The variable naming the folder scripts/build-polyglot.sh wrote.
pub const DIR_VARIABLE: &str = "WASM_ECHO_POLYGLOT_DIR";

/// The folder of the polyglot plugins.
///
/// # Panics
///
/// When `WASM_ECHO_POLYGLOT_DIR` is not set, with one line saying how to
/// set it, or how to opt out: with `WASM_ECHO_SKIP_TESTS=polyglot` the
/// tests that call this are reported as ignored instead (see
/// host/build.rs). Regression: without the variable, these tests returned
/// early and reported `ok`, having tested nothing.
pub fn built_dir() -> PathBuf {
    match std::env::var_os(DIR_VARIABLE) {
        Some(dir) => PathBuf::from(dir),
        None => panic!(
            "{DIR_VARIABLE} is not set: build the Python, JavaScript and C plugins with \
             `scripts/build-polyglot.sh target/polyglot/out` and run with \
             {DIR_VARIABLE}=$PWD/target/polyglot/out (scripts/test.sh does both), or set \
             WASM_ECHO_SKIP_TESTS=polyglot to report these tests as ignored"
        ),
    }
}

/// The path of `PLUGIN-LANG.wasm` in `dir`, as a `--plugin` argument.
fn component(dir: &Path, plugin: &str, lang: &str) -> String {
    let path = dir.join(format!("{plugin}-{lang}.wasm"));
    assert!(
        path.is_file(),
        "{} is missing: did scripts/build-polyglot.sh {} finish?",
        path.display(),
        dir.display()
    );
    path.to_str().expect("a UTF-8 path").to_owned()
}

/// The documents' exchange over UDP and TCP, then `exit` on each: the UDP
/// listener stops alone, then the TCP one, and the process exits 0.
fn hello(lang: &str) {
    let dir = built_dir();
    let mut server = Server::start(&component(&dir, "hello", lang), &[]);
    let socket = udp_client(server.udp());
    assert_eq!(udp_ask(&socket, b"Hello, server!"), b"Hello, client!");
    // Bytes that are not UTF-8 are greeted like any others.
    assert_eq!(udp_ask(&socket, b"\xff\xfe\x00hi"), b"Hello, client!");
    let mut stream = tcp_client(server.tcp());
    assert_eq!(
        tcp_ask(&mut stream, b"hello, server", 18),
        b"hello, tcp client!"
    );

    socket.send(b"exit").expect("send exit");
    server.wait_for_log(&format!("udp listener on {} stopped", server.udp()));
    // TCP is a listener of its own and still serves.
    assert_eq!(
        tcp_ask(&mut stream, b"still there?", 18),
        b"hello, tcp client!"
    );
    // Any case, surrounding whitespace ignored, as in the Rust plugin.
    stream.write_all(b" EXIT\r\n").expect("send exit");
    assert!(
        tcp_read_to_end(&mut stream).is_empty(),
        "exit gets no reply"
    );
    let status = server.wait_exit();
    assert!(
        status.success(),
        "exit status {status:?}; stderr:\n{}",
        server.stderr()
    );
}

/// Binary bytes, every value and none of it UTF-8, come back unchanged
/// over UDP and TCP.
fn echo(lang: &str) {
    let dir = built_dir();
    let server = Server::start(&component(&dir, "echo", lang), &[]);
    let every_byte: Vec<u8> = (0..=255).rev().collect();
    let socket = udp_client(server.udp());
    assert_eq!(udp_ask(&socket, &every_byte), every_byte);
    assert_eq!(udp_ask(&socket, b""), b"", "an empty datagram");
    let big: Vec<u8> = (0..60_000u32).map(|i| (i * 7 % 256) as u8).collect();
    assert_eq!(udp_ask(&socket, &big), big);

    let mut stream = tcp_client(server.tcp());
    assert_eq!(tcp_ask(&mut stream, &every_byte, 256), every_byte);
    // Raw framing may cut this into several calls; the echoes add up.
    assert_eq!(tcp_ask(&mut stream, &big, big.len()), big);
}

/// One module per language, each with the same tests.
macro_rules! languages {
    ($($lang:ident),* $(,)?) => {$(
        mod $lang {
            #[test]
            #[cfg_attr(skip_polyglot, ignore = "WASM_ECHO_SKIP_TESTS names polyglot")]
            fn hello_answers_like_the_documents_and_exit_stops_each_listener() {
                super::hello(stringify!($lang));
            }

            #[test]
            #[cfg_attr(skip_polyglot, ignore = "WASM_ECHO_SKIP_TESTS names polyglot")]
            fn echo_returns_binary_bytes_unchanged() {
                super::echo(stringify!($lang));
            }
        }
    )*};
}

languages!(python, js, c);

/// State hand-over across languages: the Rust counter's counts move to
/// the Python counter (UDP, and a TCP connection upgraded on its socket),
/// which goes on counting and hands them back to the Rust one.
#[test]
#[cfg_attr(skip_polyglot, ignore = "WASM_ECHO_SKIP_TESTS names polyglot")]
fn python_counter_takes_over_the_rust_counters_counts_and_hands_them_back() {
    let python = component(&built_dir(), "counter", "python");
    let control = crate::common::control_path();
    let toml = "[listeners.main]\nplugin = \"counter\"\nudp = \"127.0.0.1:0\"\n\
                tcp = \"127.0.0.1:0\"\nupgrade-connections = true\n";
    let server = Server::with_config_and(toml, 2, &["--control", control.to_str().expect("utf-8")]);
    let reload = |plugin: &str| {
        let output = crate::common::control("reload", &control, &["--plugin", plugin]);
        let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
        assert!(
            stdout.contains("; 2 instance(s) migrated with their state"),
            "{stdout}{}",
            String::from_utf8_lossy(&output.stderr)
        );
    };
    let socket = udp_client(server.udp());
    let mut stream = tcp_client(server.tcp());
    for count in [b"1", b"2"] {
        assert_eq!(udp_ask(&socket, b"x"), count);
        assert_eq!(tcp_ask(&mut stream, b"x", 1), count);
    }
    reload(&python);
    for count in [b"3", b"4"] {
        assert_eq!(udp_ask(&socket, b"x"), count, "Python goes on");
        assert_eq!(tcp_ask(&mut stream, b"x", 1), count, "Python goes on");
    }
    reload("counter");
    assert_eq!(udp_ask(&socket, b"x"), b"5", "back in Rust");
    assert_eq!(tcp_ask(&mut stream, b"x", 1), b"5", "back in Rust");
}
