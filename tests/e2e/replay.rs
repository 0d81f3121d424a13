use std::io::{Read as _, Write as _};

use base64::Engine as _;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};

use crate::common::{
    Server, one_line_error, plugins, poll_until, run, scratch_file, send_signal, tcp_client,
    udp_ask, udp_client,
};

/// A fresh path for a recording, in a scratch folder of its own.
fn recording_path() -> PathBuf {
    scratch_file("placeholder", b"").with_file_name("traffic.jsonl")
}

fn lines(path: &Path) -> usize {
    std::fs::read_to_string(path).map_or(0, |text| text.lines().count())
}

/// `wasm-echo replay ARGS`, with stdout as text.
fn replay(args: &[&str]) -> (std::process::Output, String) {
    let mut all = vec!["replay"];
    all.extend_from_slice(args);
    let output = run(&all);
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    (output, stdout)
}

fn json(stdout: &str) -> serde_json::Value {
    serde_json::from_str(stdout).unwrap_or_else(|error| panic!("not JSON ({error}): {stdout}"))
}

/// Records `hello` answering the tutorial's clients (`wasm-echo client
/// udp` and `tcp`, each sending its message and then `exit`), until the
/// server exits; returns the recording.
fn record_hello() -> PathBuf {
    let path = recording_path();
    let mut server = Server::start("hello", &["--record", path.to_str().expect("utf-8")]);
    for (protocol, addr) in [("udp", server.udp()), ("tcp", server.tcp())] {
        let client = run(&["client", protocol, &addr.to_string()]);
        assert!(client.status.success(), "{client:?}");
    }
    assert!(server.wait_exit().success(), "{}", server.stderr());
    path
}

#[test]
fn hello_recorded_with_the_tutorials_clients_replays_against_hello_with_no_difference() {
    let path = record_hello();
    let mode = std::fs::metadata(&path)
        .expect("recorded")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "a recording holds what peers sent");
    // The header, two datagrams, a TCP open and two TCP messages.
    assert_eq!(
        lines(&path),
        6,
        "{}",
        std::fs::read_to_string(&path).unwrap_or_default()
    );
    let recording = path.to_str().expect("utf-8");
    let (output, stdout) = replay(&[recording, "--plugin", "hello"]);
    assert!(output.status.success(), "{stdout}{output:?}");
    assert!(stdout.contains("0 difference(s)"), "{stdout}");
    let (output, stdout) = replay(&[recording, "--plugin", "hello", "--json"]);
    assert!(output.status.success(), "{output:?}");
    let report = json(&stdout);
    assert_eq!(report["differences"], 0, "{report}");
    assert_eq!(report["listeners"]["main"]["same"], 5, "{report}");
}

#[test]
fn the_same_recording_against_echo_differs_everywhere_and_fails_the_gate() {
    let path = record_hello();
    let recording = path.to_str().expect("utf-8");
    let (output, stdout) = replay(&[recording, "--plugin", "echo", "--max-diff", "0"]);
    assert_eq!(output.status.code(), Some(1), "{stdout}{output:?}");
    // The examples side by side: hello's replies against echo's.
    for shown in [
        "\"Hello, client!\"",
        "\"Hello, server!\"",
        "\"hello, tcp client!\"",
        "FAIL",
    ] {
        assert!(stdout.contains(shown), "lacks {shown}:\n{stdout}");
    }
    let (output, stdout) = replay(&[recording, "--plugin", "echo", "--json", "--max-diff", "0"]);
    assert_eq!(output.status.code(), Some(1));
    let report = json(&stdout);
    let main = &report["listeners"]["main"];
    // Every datagram and message differs; the TCP open (no greeting from
    // either) is the one exchange that does not.
    assert_eq!(main["exchanges"], 5, "{report}");
    assert_eq!(main["opens"], 1, "{report}");
    assert_eq!(report["differences"], 4, "{report}");
    assert_eq!(report["passed"], false);
    // A gate set above the count passes.
    let (output, _) = replay(&[recording, "--plugin", "echo", "--max-diff", "4"]);
    assert!(output.status.success());
}

#[test]
fn a_reply_with_the_clock_replays_identically_and_is_noise_against_a_baseline() {
    let path = recording_path();
    let mut server = Server::start(
        plugins::HOSTILE,
        &[
            "--plugin-config",
            "behaviour=clock",
            "--record",
            path.to_str().expect("utf-8"),
        ],
    );
    // Long enough that the reply (message, clocks, a random number) stays
    // within the UDP amplification bound.
    let socket = udp_client(server.udp());
    let message = [b'm'; 60];
    for _ in 0..3 {
        let reply = udp_ask(&socket, &message);
        assert!(reply.windows(5).any(|w| w == b"wall="), "{reply:?}");
    }
    let mut stream = tcp_client(server.tcp());
    for _ in 0..2 {
        stream.write_all(b"what time is it").expect("send");
        let mut reply = [0u8; 256];
        let len = stream.read(&mut reply).expect("a reply");
        assert!(len > 0);
    }
    drop(stream);
    stop(&mut server);
    // The header, 3 datagrams, an open and 2 messages.
    assert_eq!(lines(&path), 7);
    let recording = path.to_str().expect("utf-8");
    let hostile = plugins::HOSTILE;
    let settings = ["--plugin-config", "behaviour=clock"];
    let replay_json = || {
        let mut args = vec![recording, "--plugin", hostile, "--json", "--examples", "10"];
        args.extend_from_slice(&settings);
        replay(&args)
    };
    // Two replays: the same replies, clocks and random numbers included
    // (the examples carry the replayed replies).
    let (first, first_out) = replay_json();
    let (_, second_out) = replay_json();
    assert_eq!(first_out, second_out, "two replays differ");
    // Against the recording itself the monotonic clock and the random
    // number cannot be reproduced: every reply differs.
    let report = json(&first_out);
    assert_eq!(first.status.code(), Some(1), "{report}");
    assert_eq!(report["differences"], 5, "{report}");
    // The wall clock, though, reads the recorded time: when the call
    // began, so at most the call's length before what the plugin read when
    // serving (a real clock would read later than both).
    let example = &report["listeners"]["main"]["differences"][0];
    let wall = |outcome: &str| {
        let reply = example[outcome]["reply"].as_str().expect("a reply");
        let reply = base64::engine::general_purpose::STANDARD
            .decode(reply)
            .expect("base64");
        let reply = String::from_utf8(reply).expect("text");
        reply
            .split_whitespace()
            .find_map(|word| word.strip_prefix("wall="))
            .and_then(|ms| ms.parse::<i64>().ok())
            .expect("the wall clock")
    };
    let (served, replayed) = (wall("recorded"), wall("replayed"));
    assert!(
        (0..1000).contains(&(served - replayed)),
        "served at {served}, replayed at {replayed}"
    );
    // With the recorded version as the baseline, the same differences are
    // noise, not regressions, and the gate passes.
    let mut args = vec![
        recording,
        "--plugin",
        hostile,
        "--baseline",
        hostile,
        "--json",
    ];
    args.extend_from_slice(&settings);
    let (output, stdout) = replay(&args);
    let report = json(&stdout);
    assert!(output.status.success(), "{report}");
    assert_eq!(report["differences"], 0, "{report}");
    assert_eq!(report["listeners"]["main"]["noisy"], 5, "{report}");
}

#[test]
fn a_truncated_or_corrupt_recording_is_one_line_naming_file_and_line() {
    let path = record_hello();
    let text = std::fs::read_to_string(&path).expect("recorded");
    // Cut in the middle of the last record.
    let cut = scratch_file("cut.jsonl", &text.as_bytes()[..text.len() - 20]);
    let line = one_line_error(
        &run(&["replay", cut.to_str().expect("utf-8"), "--plugin", "hello"]),
        &["cut.jsonl:6", "truncated"],
    );
    assert!(line.starts_with("error: "), "{line}");
    // A record in the middle that is not JSON.
    let mut broken: Vec<&str> = text.lines().collect();
    broken[2] = "{\"time\": garbage";
    let corrupt = scratch_file("corrupt.jsonl", (broken.join("\n") + "\n").as_bytes());
    one_line_error(
        &run(&[
            "replay",
            corrupt.to_str().expect("utf-8"),
            "--plugin",
            "hello",
        ]),
        &["corrupt.jsonl:3", "corrupt record"],
    );
    // A record that is JSON but lacks what an exchange needs.
    let mut broken: Vec<String> = text.lines().map(str::to_owned).collect();
    broken[4] = broken[4].replace("\"in\"", "\"on\"");
    let missing = scratch_file("missing.jsonl", (broken.join("\n") + "\n").as_bytes());
    one_line_error(
        &run(&[
            "replay",
            missing.to_str().expect("utf-8"),
            "--plugin",
            "hello",
        ]),
        &["missing.jsonl:5", "`in` is missing"],
    );
    // Not a recording at all.
    let other = scratch_file("other.jsonl", b"{\"hello\": 1}\n");
    one_line_error(
        &run(&[
            "replay",
            other.to_str().expect("utf-8"),
            "--plugin",
            "hello",
        ]),
        &["other.jsonl:1", "not a wasm-echo recording"],
    );
    one_line_error(
        &run(&["replay", "/nonexistent/traffic.jsonl", "--plugin", "hello"]),
        &["/nonexistent/traffic.jsonl"],
    );
}

#[test]
fn a_recording_past_its_cap_rotates_and_the_rotated_files_replay() {
    let path = recording_path();
    let toml = format!(
        r#"
        [listeners.main]
        plugin = "echo"
        udp = "127.0.0.1:0"
        record = "{}"
        record-max-size = "4KiB"
        record-keep = 2
        "#,
        path.display()
    );
    let mut server = Server::with_config(&toml, 1);
    let socket = udp_client(server.udp());
    for n in 0..200 {
        let message = format!("datagram {n:03} {}", "x".repeat(80));
        assert_eq!(udp_ask(&socket, message.as_bytes()), message.as_bytes());
    }
    let rotated = |n: usize| PathBuf::from(format!("{}.{n}", path.display()));
    poll_until("two rotated files", || rotated(2).exists().then_some(()));
    stop(&mut server);
    assert!(!rotated(3).exists(), "record-keep = 2 keeps two");
    for file in [rotated(2), rotated(1), path.clone()] {
        let meta = std::fs::metadata(&file).expect("a recording file");
        assert!(
            meta.len() <= 4096,
            "{} is {} bytes",
            file.display(),
            meta.len()
        );
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    }
    // The kept files, oldest first, replay as one.
    let files = [rotated(2), rotated(1), path];
    let mut args: Vec<&str> = files.iter().map(|f| f.to_str().expect("utf-8")).collect();
    args.extend(["--plugin", "echo", "--json"]);
    let (output, stdout) = replay(&args);
    let report = json(&stdout);
    assert!(output.status.success(), "{report}");
    let exchanges = report["listeners"]["main"]["exchanges"]
        .as_u64()
        .expect("a count");
    assert!((20..200).contains(&exchanges), "{report}");
    assert_eq!(report["differences"], 0, "{report}");
}

/// Stops `server` as an operator would (SIGTERM), so that its recordings
/// are finished, and waits for it to exit.
fn stop(server: &mut Server) {
    send_signal(server.pid(), "TERM");
    assert!(server.wait_exit().success(), "{}", server.stderr());
}

#[test]
fn sampling_records_a_share_of_the_datagrams() {
    let path = recording_path();
    let mut server = Server::with_args(&[
        "--plugin",
        "echo",
        "--udp",
        "127.0.0.1:0",
        "--record",
        path.to_str().expect("utf-8"),
        "--record-sample",
        "0.5",
    ]);
    let socket = udp_client(server.udp());
    for n in 0..200 {
        udp_ask(&socket, format!("sample {n}").as_bytes());
    }
    stop(&mut server);
    let recorded = lines(&path) - 1;
    assert!((50..150).contains(&recorded), "{recorded} of 200 recorded");
}

#[test]
fn bad_recording_settings_are_one_line_each() {
    one_line_error(
        &run(&[
            "serve",
            "--plugin",
            "echo",
            "--udp",
            "127.0.0.1:0",
            "--record",
            "x.jsonl",
            "--record-sample",
            "2",
        ]),
        &["--record-sample", "out of range"],
    );
    one_line_error(
        &run(&[
            "serve",
            "--plugin",
            "echo",
            "--udp",
            "127.0.0.1:0",
            "--record",
            "/nonexistent/dir/x.jsonl",
        ]),
        &["--record", "/nonexistent/dir/x.jsonl"],
    );
    let toml = scratch_file(
        "norecord.toml",
        b"[listeners.main]\nplugin = \"echo\"\nudp = \"127.0.0.1:0\"\nrecord-sample = 0.5\n",
    );
    one_line_error(
        &run(&["serve", "--config", toml.to_str().expect("utf-8")]),
        &["listeners.main.record-sample", "without `record`"],
    );
}
