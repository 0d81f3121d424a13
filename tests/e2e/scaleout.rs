//! Behind a load balancer: PROXY protocol headers on TCP listeners (the
//! real client becomes the peer; bad headers are refused and counted) and
//! `reuse-port` (several processes share one port).

use std::io::Write;
use std::net::{Shutdown, SocketAddr};
use std::path::Path;

use crate::common::{
    Server, expect_closed_by_server, free_port, one_line_error, poll_until, run, scratch_file,
    tcp_ask, tcp_client, udp_ask, udp_client,
};
use crate::metrics::expect;

/// The v2 signature, then version 2 with `command`, `family`, and the
/// address block's length and bytes.
fn v2_header(command: u8, family: u8, addresses: &[u8]) -> Vec<u8> {
    let mut header = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    header.extend([0x20 | command, family]);
    header.extend(
        u16::try_from(addresses.len())
            .expect("a short block")
            .to_be_bytes(),
    );
    header.extend(addresses);
    header
}

/// An echo tenant `lb` speaking the PROXY protocol and recorded to
/// `recording`, a tenant `picky` that takes headers only from
/// 192.0.2.0/24 (so never from this test), and `hasty`, whose idle timeout
/// bounds the wait for a header; with the admin endpoint.
fn behind_a_balancer(recording: &Path) -> Server {
    let toml = format!(
        r#"
[listeners.lb]
plugin = "echo"
tcp = "127.0.0.1:0"
proxy-protocol = true
record = "{}"

[listeners.picky]
plugin = "echo"
tcp = "127.0.0.1:0"
proxy-protocol = true
proxy-from = ["192.0.2.0/24", "2001:db8::1"]

[listeners.hasty]
plugin = "echo"
tcp = "127.0.0.1:0"
proxy-protocol = true
idle-timeout = "200ms"
"#,
        recording.display()
    );
    Server::with_config_and(&toml, 4, &["--metrics", "127.0.0.1:0"])
}

/// A fresh path for a recording.
fn recording_path() -> std::path::PathBuf {
    scratch_file("placeholder", b"").with_file_name("lb.jsonl")
}

/// A v1 header and a v2 one (IPv4 and IPv6) each make their client the
/// connection's peer, as the recording of what the plugin saw says; the
/// bytes after a header, sent with it or after it, are the client's first
/// message. A balancer's own health check (v2 LOCAL) is served as from the
/// balancer.
#[test]
fn v1_and_v2_headers_make_the_real_client_the_peer() {
    let recording = recording_path();
    let server = behind_a_balancer(&recording);
    let lb = server.tcp_of("lb");

    let mut v1 = tcp_client(lb);
    let mut first = b"PROXY TCP4 192.0.2.7 198.51.100.1 4000 80\r\n".to_vec();
    first.extend(b"hello");
    assert_eq!(tcp_ask(&mut v1, &first, 5), b"hello");
    assert_eq!(tcp_ask(&mut v1, b"again", 5), b"again");

    let mut v2 = tcp_client(lb);
    let header = v2_header(
        1,
        0x11,
        &[203, 0, 113, 9, 198, 51, 100, 1, 0x13, 0x88, 0, 80],
    );
    // The header in two writes, then the data on its own.
    v2.write_all(&header[..10]).expect("send");
    v2.write_all(&header[10..]).expect("send");
    assert_eq!(tcp_ask(&mut v2, b"v2", 2), b"v2");

    let mut v6 = tcp_client(lb);
    let mut block = Vec::new();
    block.extend(std::net::Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x42).octets());
    block.extend(std::net::Ipv6Addr::LOCALHOST.octets());
    block.extend([0x17, 0x70, 0, 80]);
    let mut six = v2_header(1, 0x21, &block);
    six.extend(b"six");
    assert_eq!(tcp_ask(&mut v6, &six, 3), b"six");

    let mut check = tcp_client(lb);
    let mut local = v2_header(0, 0x00, &[]);
    local.extend(b"ok?");
    assert_eq!(tcp_ask(&mut check, &local, 3), b"ok?");

    let me = check.local_addr().expect("local address").to_string();
    for peer in [
        "192.0.2.7:4000",
        "203.0.113.9:5000",
        "[2001:db8::42]:6000",
        &me,
    ] {
        let needle = format!("\"peer\":\"{peer}\"");
        poll_until(&format!("a record from {peer}"), || {
            std::fs::read_to_string(&recording)
                .ok()
                .filter(|records| records.contains(&needle))
        });
    }
    let records = std::fs::read_to_string(&recording).expect("recording");
    let balancer = v1.local_addr().expect("local address").to_string();
    assert!(
        !records.contains(&format!("\"peer\":\"{balancer}\"")),
        "the balancer's address reached the plugin:\n{records}"
    );
}

/// Sends `bytes` (then, with `close`, shuts down its side) and expects
/// the server to close the connection without a reply.
fn refused(addr: SocketAddr, bytes: &[u8], close: bool) {
    let mut stream = tcp_client(addr);
    stream.write_all(bytes).expect("send");
    if close {
        stream.shutdown(Shutdown::Write).expect("half-close");
    }
    expect_closed_by_server(&mut stream);
}

/// Each bad header closes its connection before the plugin sees it, and is
/// counted by its reason: truncated (cut off, or left unfinished past the
/// header timeout), wrong signature, a v2 address family that does not
/// exist, a source outside `proxy-from`, garbled addresses.
#[test]
fn bad_proxy_headers_are_refused_and_counted_by_reason() {
    let server = behind_a_balancer(&recording_path());
    let (lb, picky) = (server.tcp_of("lb"), server.tcp_of("picky"));
    refused(lb, b"PROXY TCP4 192.0.2.7 19", true);
    refused(
        lb,
        &v2_header(1, 0x11, &[192, 0, 2, 7, 0, 0, 0, 0, 0, 0, 0, 0])[..20],
        true,
    );
    refused(lb, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", false);
    refused(lb, b"hello\n", false);
    refused(lb, &v2_header(1, 0x41, &[0; 12]), false);
    refused(
        lb,
        b"PROXY TCP4 192.0.2.777 198.51.100.1 4000 80\r\n",
        false,
    );
    refused(
        picky,
        b"PROXY TCP4 192.0.2.7 198.51.100.1 4000 80\r\nhi",
        false,
    );
    // Half a header, and the connection left open.
    let mut unfinished = tcp_client(server.tcp_of("hasty"));
    unfinished.write_all(b"PROXY TCP4 192.0.2.7").expect("send");
    expect_closed_by_server(&mut unfinished);
    let admin = server.metrics.expect("admin address");
    let reason = |listener: &'static str, reason: &'static str| {
        (
            "wasm_echo_proxy_refused_total",
            [("listener", listener), ("reason", reason)],
        )
    };
    let lb_truncated = reason("lb", "truncated");
    let lb_signature = reason("lb", "signature");
    let lb_family = reason("lb", "family");
    let lb_invalid = reason("lb", "invalid");
    let lb_source = reason("lb", "source");
    let picky_source = reason("picky", "source");
    let hasty_truncated = reason("hasty", "truncated");
    expect(
        admin,
        &[
            (lb_truncated.0, &lb_truncated.1, 2.0),
            (lb_signature.0, &lb_signature.1, 2.0),
            (lb_family.0, &lb_family.1, 1.0),
            (lb_invalid.0, &lb_invalid.1, 1.0),
            (lb_source.0, &lb_source.1, 0.0),
            (picky_source.0, &picky_source.1, 1.0),
            (hasty_truncated.0, &hasty_truncated.1, 1.0),
            (
                "wasm_echo_tcp_connections_total",
                &[("listener", "lb")],
                0.0,
            ),
            (
                "wasm_echo_tcp_connections_total",
                &[("listener", "picky")],
                0.0,
            ),
        ],
    );
}

/// The PROXY keys' mistakes are refused in one line naming the key.
#[test]
fn proxy_settings_are_checked() {
    for (body, key, words) in [
        (
            "tcp = \"127.0.0.1:0\"\nproxy-from = [\"10.0.0.0/8\"]",
            "proxy-from",
            "without `proxy-protocol = true`",
        ),
        (
            "udp = \"127.0.0.1:0\"\nproxy-protocol = true",
            "proxy-protocol",
            "needs a `tcp` address",
        ),
        (
            "tcp = \"127.0.0.1:0\"\nproxy-protocol = true\nproxy-from = [\"10.0.0.0/33\"]",
            "proxy-from",
            "not an IP address or a CIDR block",
        ),
    ] {
        let toml = format!("[listeners.a]\nplugin = \"echo\"\n{body}\n");
        let path = scratch_file("proxy.toml", toml.as_bytes());
        let output = run(&["serve", "--config", path.to_str().expect("utf-8")]);
        one_line_error(&output, &[key, words]);
    }
}

/// Two servers with `reuse-port` share one UDP and TCP port, and either
/// serves it alone once the other is gone; without it the second is
/// refused, as ever.
#[test]
fn reuse_port_lets_two_servers_share_a_port() {
    let addr = free_port();
    let toml = |reuse: bool| {
        format!(
            "[listeners.shared]\nplugin = \"echo\"\nudp = \"{addr}\"\ntcp = \"{addr}\"\nreuse-port = {reuse}\n"
        )
    };
    let first = Server::with_config(&toml(true), 2);
    let path = scratch_file("plain.toml", toml(false).as_bytes());
    let output = run(&["serve", "--config", path.to_str().expect("utf-8")]);
    one_line_error(&output, &["cannot listen on", "in use"]);
    let second = Server::with_config(&toml(true), 2);
    assert_eq!(second.tcp(), first.tcp());
    for server in [first, second] {
        let mut stream = tcp_client(addr);
        assert_eq!(tcp_ask(&mut stream, b"shared", 6), b"shared");
        assert_eq!(udp_ask(&udp_client(addr), b"shared"), b"shared");
        // The other one serves the port alone from here on.
        drop(server);
    }
}
