//! A test-only plugin that misbehaves on every message, in the way its
//! `behaviour` setting names, so tests can show one tenant's hostile plugin
//! harms no one else:
//!
//! - `loop`: never returns (the deadline stops it);
//! - `bloat`: allocates until the memory cap stops it;
//! - `recurse`: recurses until the wasm stack is exhausted;
//! - `panic`: panics;
//! - `panic-one-in`: echoes, but panics on every `one-in`th message
//!   (default 10) an instance handles: a host that replaces a trapped
//!   instance sees one message in `one-in` fail;
//! - `huge-reply`: answers with 8 MiB (max-reply refuses it);
//! - `huge-greeting`: greets each TCP connection with 8 MiB in `on-open`
//!   (when max-reply allows it), then echoes;
//! - `snoop`: tries to reach files, environment, arguments, sockets and a
//!   fine clock, and answers with what it got;
//! - `flood-log`: writes thousands of log lines per message;
//! - `huge-log`: one `log` call of `log-bytes` bytes (default 20 MiB), then
//!   echoes;
//! - `spew-stdout`: writes `spew-bytes` bytes (default 4 MiB) to stdout
//!   without a newline, then echoes;
//! - `forge-log`: writes its `text` setting (by default a fake host warning
//!   about another tenant, with a newline, a carriage return and ANSI
//!   escapes) with `log`, to stdout and to stderr, then echoes;
//! - `forge-panic`: panics with its `text` setting as the message;
//! - `leak`: every message leaks `leak-bytes` bytes (default 64 KiB) and
//!   is echoed, as a runtime whose heap only grows;
//! - `slow`: busy-waits `slow-ms` milliseconds (default 20), then echoes;
//! - `sleep`: a message that starts with `sleep` (every message, with
//!   `sleep-always = "yes"`) blocks in a WASI pollable
//!   (`std::thread::sleep`) for `sleep-ms` milliseconds (default an hour),
//!   running no Wasm code meanwhile; anything else is echoed;
//! - `sleep-on-close`: echoes, then blocks in `on-close` as `sleep` does;
//! - `leak-handles`: makes WASI pollables and stream handles and never
//!   drops them, far more than the host allows one instance;
//! - `read-stdin`: reads stdin to its end, writes `to stdout` on stdout and
//!   `to stderr` on stderr, and answers `stdin: N bytes` (or the error);
//! - `clock`: answers with the message, the wall clock, the monotonic
//!   clock and a random number, which a replay must make the same every
//!   time (and which no replay reproduces from a live recording).

mod bindings {
    wit_bindgen::generate!({ path: "../../wit/0.1.0", world: "plugin" });
}

use std::io::Write as _;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bindings::exports::wasm_echo::plugin::{tcp, udp};
use bindings::wasm_echo::plugin::host::{self, Level};
use bindings::wasm_echo::plugin::types::{Connection, Decision, Endpoint, Next};

struct Hostile;

thread_local! {
    /// Messages this instance has handled, for `panic-one-in`.
    static HANDLED: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

fn reply(bytes: Vec<u8>) -> Decision {
    Decision {
        reply: Some(bytes),
        next: Next::CarryOn,
    }
}

fn misbehave(data: Vec<u8>) -> Decision {
    let behaviour = host::get_config("behaviour").unwrap_or_default();
    match behaviour.as_str() {
        "loop" => loop {
            std::hint::spin_loop();
        },
        "bloat" => {
            let mut hoard: Vec<Vec<u8>> = Vec::new();
            loop {
                hoard.push(vec![1; 1 << 20]);
            }
        }
        "recurse" => reply(vec![recurse(data.len() as u64 + 1) as u8]),
        "panic" => panic!("hostile plugin panics on purpose"),
        "panic-one-in" => {
            let handled = HANDLED.get() + 1;
            HANDLED.set(handled);
            if handled.is_multiple_of(setting("one-in", 10).max(1)) {
                panic!("hostile plugin panics on message {handled} on purpose");
            }
            reply(data)
        }
        "huge-reply" => reply(vec![b'!'; 8 << 20]),
        "huge-greeting" => reply(data),
        "snoop" => reply(snoop().into_bytes()),
        "flood-log" => {
            for line in 0..5_000 {
                host::log(Level::Error, &format!("flood line {line}"));
                println!("flood stdout line {line}");
            }
            reply(data)
        }
        "huge-log" => {
            let bytes = setting("log-bytes", 20 << 20);
            host::log(Level::Warn, &"x".repeat(bytes));
            reply(data)
        }
        "spew-stdout" => {
            let chunk = [b'y'; 64 << 10];
            let mut stdout = std::io::stdout().lock();
            let mut left = setting("spew-bytes", 4 << 20);
            while left > 0 {
                let n = left.min(chunk.len());
                // A write error is the host's business; the test reads the log.
                let _ = stdout.write_all(&chunk[..n]);
                left -= n;
            }
            let _ = stdout.flush();
            reply(data)
        }
        "forge-log" => {
            let text = forged_text();
            host::log(Level::Warn, &text);
            println!("{text}");
            eprintln!("{text}");
            reply(data)
        }
        "forge-panic" => panic!("{}", forged_text()),
        "leak" => {
            let bytes = host::get_config("leak-bytes")
                .and_then(|n| n.parse().ok())
                .unwrap_or(64 << 10);
            std::mem::forget(vec![1u8; bytes]);
            reply(data)
        }
        "slow" => {
            let millis = host::get_config("slow-ms")
                .and_then(|ms| ms.parse().ok())
                .unwrap_or(20);
            let start = Instant::now();
            while start.elapsed() < Duration::from_millis(millis) {
                std::hint::spin_loop();
            }
            reply(data)
        }
        "sleep" => {
            if data.starts_with(b"sleep")
                || host::get_config("sleep-always").as_deref() == Some("yes")
            {
                sleep();
            }
            reply(data)
        }
        "sleep-on-close" => reply(data),
        "clock" => reply(clock(&data).into_bytes()),
        "leak-handles" => {
            for _ in 0..200_000 {
                std::mem::forget(wasi::clocks::monotonic_clock::subscribe_duration(1 << 40));
                std::mem::forget(wasi::cli::stdout::get_stdout());
            }
            reply(data)
        }
        "read-stdin" => {
            let mut input = Vec::new();
            let read = std::io::Read::read_to_end(&mut std::io::stdin(), &mut input);
            println!("to stdout");
            eprintln!("to stderr");
            reply(match read {
                Ok(len) => format!("stdin: {len} bytes").into_bytes(),
                Err(error) => format!("stdin: {error}").into_bytes(),
            })
        }
        other => panic!("unknown behaviour `{other}`"),
    }
}

/// What `clock` answers: the message, both clocks in milliseconds and a
/// random number.
fn clock(data: &[u8]) -> String {
    let wall = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis();
    let monotonic = wasi::clocks::monotonic_clock::now() / 1_000_000;
    let random = wasi::random::random::get_random_u64();
    format!(
        "{} wall={wall} mono={monotonic} random={random}",
        String::from_utf8_lossy(data)
    )
}

/// Blocks for `sleep-ms` (default an hour) without running Wasm code: the
/// guest waits in `wasi:io/poll`, where no epoch tick can stop it.
fn sleep() {
    let millis = host::get_config("sleep-ms")
        .and_then(|ms| ms.parse().ok())
        .unwrap_or(3_600_000);
    std::thread::sleep(Duration::from_millis(millis));
}

/// A numeric setting, or `default` when it is unset or not a number.
fn setting(key: &str, default: usize) -> usize {
    host::get_config(key)
        .and_then(|value| value.parse().ok())
        .unwrap_or(default)
}

/// What `forge-log` and `forge-panic` write: the `text` setting, or a line
/// made to look like the host's own warning about another tenant.
fn forged_text() -> String {
    host::get_config("text").unwrap_or_else(|| {
        "ok\n1999-12-31T23:59:59.999999Z  WARN wasm_echo::listener::tcp: connection closed: \
         forged listener=\"good\"\r\x1b[31mred\x1b[0m"
            .to_owned()
    })
}

/// Recursion the optimiser cannot turn into a loop; the depth check is one
/// the wasm stack never lets it reach.
#[inline(never)]
fn recurse(depth: u64) -> u64 {
    let frame = [depth; 64];
    std::hint::black_box(&frame);
    if std::hint::black_box(depth) == u64::MAX {
        return 0;
    }
    recurse(depth + 1).wrapping_add(std::hint::black_box(frame[7]))
}

/// Everything a plugin should not be able to reach, and what it got.
fn snoop() -> String {
    let files = match (std::fs::read_dir("/"), std::fs::read("/etc/passwd")) {
        (Err(_), Err(_)) => "denied",
        _ => "READABLE",
    };
    let env = std::env::vars().count();
    let args = std::env::args().count();
    let tcp = match std::net::TcpStream::connect("127.0.0.1:9") {
        Err(_) => "denied",
        Ok(_) => "OPEN",
    };
    let udp = match std::net::UdpSocket::bind("127.0.0.1:0") {
        Err(_) => "denied",
        Ok(_) => "OPEN",
    };
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|since| since.subsec_nanos())
        .unwrap_or(1);
    let clock = if nanos.is_multiple_of(1_000_000) {
        "coarse"
    } else {
        "FINE"
    };
    format!("files={files} env={env} args={args} tcp={tcp} udp={udp} clock={clock}")
}

impl udp::Guest for Hostile {
    fn on_datagram(_peer: Endpoint, data: Vec<u8>) -> Decision {
        misbehave(data)
    }
}

impl tcp::Guest for Hostile {
    fn on_open(_conn: Connection) -> Decision {
        let greeting = host::get_config("behaviour").is_some_and(|b| b == "huge-greeting");
        Decision {
            reply: greeting.then(|| vec![b'!'; 8 << 20]),
            next: Next::CarryOn,
        }
    }

    fn on_message(data: Vec<u8>) -> Decision {
        misbehave(data)
    }

    fn on_close() {
        if host::get_config("behaviour").as_deref() == Some("sleep-on-close") {
            sleep();
        }
    }
}

bindings::export!(Hostile with_types_in bindings);
