use crate::common::{Server, tcp_ask, tcp_client, udp_ask, udp_client};

#[test]
fn each_connection_counts_its_own_messages() {
    let server = Server::start("counter", &[]);
    let mut first = tcp_client(server.tcp());
    let mut second = tcp_client(server.tcp());
    assert_eq!(tcp_ask(&mut first, b"a", 1), b"1");
    assert_eq!(tcp_ask(&mut first, b"b", 1), b"2");
    assert_eq!(
        tcp_ask(&mut second, b"c", 1),
        b"1",
        "a new connection starts from scratch"
    );
    assert_eq!(tcp_ask(&mut first, b"d", 1), b"3");
    assert_eq!(tcp_ask(&mut second, b"e", 1), b"2");
}

#[test]
fn each_udp_peer_has_its_own_count() {
    let server = Server::start("counter", &[]);
    let one = udp_client(server.udp());
    let two = udp_client(server.udp());
    assert_eq!(udp_ask(&one, b"x"), b"1");
    assert_eq!(udp_ask(&one, b"x"), b"2");
    assert_eq!(udp_ask(&two, b"x"), b"1");
    assert_eq!(udp_ask(&one, b"x"), b"3");
}
