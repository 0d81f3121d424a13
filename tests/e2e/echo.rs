use std::io::{Read, Write};
use std::thread;

use crate::common::{Server, tcp_ask, tcp_client, udp_ask, udp_client};

#[test]
fn datagrams_of_every_size_come_back_unchanged() {
    let server = Server::start("echo", &[]);
    let socket = udp_client(server.udp());
    let binary: Vec<u8> = (0..=255u8).cycle().take(1400).collect();
    for message in [
        Vec::new(),
        vec![0x42],
        binary.clone(),
        vec![0u8; 64],
        binary.repeat(47)[..65_507].to_vec(),
    ] {
        assert_eq!(
            udp_ask(&socket, &message),
            message,
            "a {}-byte datagram",
            message.len()
        );
    }
}

#[test]
fn a_mebibyte_stream_arrives_intact() {
    let server = Server::start("echo", &[]);
    let stream = tcp_client(server.tcp());
    let data: Vec<u8> = (0..(1 << 20))
        .map(|i: u32| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
        .collect();
    let mut writer = stream.try_clone().expect("clone stream");
    let sent = data.clone();
    let sender = thread::spawn(move || {
        writer.write_all(&sent).expect("send 1 MiB");
        writer
            .shutdown(std::net::Shutdown::Write)
            .expect("half-close");
    });
    let mut received = Vec::new();
    (&stream).read_to_end(&mut received).expect("read the echo");
    sender.join().expect("sender thread");
    assert_eq!(received.len(), data.len());
    assert!(
        received == data,
        "the echoed stream differs from what was sent"
    );
}

#[test]
fn two_hundred_concurrent_clients_each_get_their_own_answers() {
    let server = Server::start("echo", &[]);
    let addr = server.tcp();
    let clients: Vec<_> = (0..200)
        .map(|id| {
            thread::spawn(move || {
                let mut stream = tcp_client(addr);
                for round in 0..5 {
                    let message = format!("client {id:03} round {round}");
                    let reply = tcp_ask(&mut stream, message.as_bytes(), message.len());
                    assert_eq!(reply, message.as_bytes());
                }
            })
        })
        .collect();
    for client in clients {
        client.join().expect("a client failed");
    }
}
