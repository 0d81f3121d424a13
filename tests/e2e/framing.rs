use std::io::{Read, Write};
use std::net::TcpStream;
use std::thread;
use std::time::Duration;

use crate::common::{Server, plugins, tcp_client, tcp_read_to_end};

/// Sends `bytes` one byte per write, with a pause now and then so they
/// really arrive in pieces.
fn trickle(stream: &mut TcpStream, bytes: &[u8]) {
    for (i, byte) in bytes.iter().enumerate() {
        stream.write_all(&[*byte]).expect("send one byte");
        if i % 3 == 0 {
            thread::sleep(Duration::from_millis(2));
        }
    }
}

fn read_exactly(stream: &mut TcpStream, len: usize) -> Vec<u8> {
    let mut buf = vec![0u8; len];
    stream.read_exact(&mut buf).expect("the whole reply");
    buf
}

fn frame(message: &[u8]) -> Vec<u8> {
    let mut framed = u32::try_from(message.len())
        .expect("small")
        .to_be_bytes()
        .to_vec();
    framed.extend_from_slice(message);
    framed
}

#[test]
fn lines_split_into_single_bytes_are_delivered_whole_and_in_order() {
    let server = Server::start("echo", &["--framing", "lines"]);
    let mut stream = tcp_client(server.tcp());
    trickle(&mut stream, b"alpha\nbeta\r\ngamma\n");
    assert_eq!(read_exactly(&mut stream, 17), b"alpha\nbeta\ngamma\n");
}

#[test]
fn several_lines_in_one_write_are_separate_messages() {
    let server = Server::start("counter", &["--framing", "lines"]);
    let mut stream = tcp_client(server.tcp());
    stream.write_all(b"a\nb\nc\n").expect("send");
    // The counter answers each message with its number; `lines` adds `\n`.
    assert_eq!(read_exactly(&mut stream, 6), b"1\n2\n3\n");
}

#[test]
fn length_prefixed_frames_split_and_joined_are_delivered_exactly_once() {
    let server = Server::start("echo", &["--framing", "length-prefixed"]);
    let mut stream = tcp_client(server.tcp());
    let messages: [&[u8]; 4] = [b"first", b"", b"\0binary\xff", &[7u8; 3000]];
    let wire: Vec<u8> = messages.iter().flat_map(|m| frame(m)).collect();
    // Frames split across writes...
    trickle(&mut stream, &wire[..40]);
    // ...and the rest, several frames, in one write.
    stream.write_all(&wire[40..]).expect("send the rest");
    assert_eq!(
        read_exactly(&mut stream, wire.len()),
        wire,
        "each frame echoed once, framed, in order"
    );
}

#[test]
fn the_plugin_is_told_its_framing() {
    for (mode, ask, expect) in [
        ("raw", b"framing".to_vec(), b"raw".to_vec()),
        ("lines", b"framing\n".to_vec(), b"lines\n".to_vec()),
        (
            "length-prefixed",
            frame(b"framing"),
            frame(b"length-prefixed"),
        ),
    ] {
        let server = Server::start(plugins::TRAP, &["--framing", mode]);
        let mut stream = tcp_client(server.tcp());
        stream.write_all(&ask).expect("send");
        assert_eq!(read_exactly(&mut stream, expect.len()), expect, "{mode}");
    }
}

#[test]
fn an_oversized_line_closes_the_connection_with_a_logged_error() {
    let server = Server::start("echo", &["--framing", "lines", "--max-message", "16"]);
    let mut stream = tcp_client(server.tcp());
    stream.write_all(&[b'x'; 100]).expect("send");
    assert!(tcp_read_to_end(&mut stream).is_empty());
    let log = server.wait_for_log("protocol error");
    assert!(
        log.contains("message longer than the 16-byte limit"),
        "{log}"
    );
    // The listener goes on.
    let mut next = tcp_client(server.tcp());
    next.write_all(b"fine\n").expect("send");
    assert_eq!(read_exactly(&mut next, 5), b"fine\n");
}

#[test]
fn an_oversized_length_is_refused_before_it_is_buffered() {
    let server = Server::start(
        "echo",
        &["--framing", "length-prefixed", "--max-message", "1KiB"],
    );
    let mut stream = tcp_client(server.tcp());
    // Announces 1 GiB and sends only the header: refused at once.
    stream.write_all(&(1u32 << 30).to_be_bytes()).expect("send");
    assert!(tcp_read_to_end(&mut stream).is_empty());
    server.wait_for_log("message longer than the 1024-byte limit");
}

#[test]
fn a_truncated_frame_is_a_protocol_error() {
    let server = Server::start("echo", &["--framing", "length-prefixed"]);
    let mut stream = tcp_client(server.tcp());
    stream
        .write_all(&[0, 0, 0, 10, b'a', b'b', b'c'])
        .expect("send");
    stream
        .shutdown(std::net::Shutdown::Write)
        .expect("half-close");
    assert!(tcp_read_to_end(&mut stream).is_empty());
    server.wait_for_log(
        "connection closed in the middle of a frame (3 of its 10 bytes arrived, 7 missing)",
    );
}

#[test]
fn hello_exit_works_in_every_mode() {
    for (mode, exit) in [
        ("raw", b"exit".to_vec()),
        ("lines", b"EXIT\r\n".to_vec()),
        ("length-prefixed", frame(b"exit")),
    ] {
        let mut server = Server::with_args(&["--tcp", "127.0.0.1:0", "--framing", mode]);
        let mut stream = tcp_client(server.tcp());
        stream.write_all(&exit).expect("send exit");
        assert!(
            tcp_read_to_end(&mut stream).is_empty(),
            "{mode}: exit gets no reply"
        );
        assert!(server.wait_exit().success(), "{mode}");
    }
    // A last line without its newline still counts once the peer closes.
    let mut server = Server::with_args(&["--tcp", "127.0.0.1:0", "--framing", "lines"]);
    let mut stream = tcp_client(server.tcp());
    stream.write_all(b"exit").expect("send exit");
    stream
        .shutdown(std::net::Shutdown::Write)
        .expect("half-close");
    assert!(server.wait_exit().success());
}

/// Regression test for issue 20: `wasm-echo client tcp` sent and read raw
/// bytes only, so against a `lines` or `length-prefixed` listener (the
/// example configuration's `mirror`) it waited out its timeout. With the
/// listener's `--framing` it frames its message and its `exit`, and prints
/// the reply without its framing.
#[test]
fn the_client_speaks_each_framing() {
    for mode in ["lines", "length-prefixed"] {
        let mut server = Server::with_args(&["--tcp", "127.0.0.1:0", "--framing", mode]);
        let addr = server.tcp().to_string();
        let output = crate::common::run(&["client", "tcp", &addr, "--framing", mode]);
        assert!(output.status.success(), "{mode}: {output:?}");
        assert_eq!(
            String::from_utf8_lossy(&output.stdout),
            "hello, tcp client!\n",
            "{mode}"
        );
        // Its framed `exit` stopped the listener.
        assert!(server.wait_exit().success(), "{mode}");
    }
}
