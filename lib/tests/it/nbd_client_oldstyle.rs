//! oxcow's NBD client against an oldstyle server that drops the connection
//! after taking a write (QEMU's iotest 277 with its fault injector): with
//! a reconnect delay the write is sent again once the server is back.

use oxcow::nbd::client::{set_reconnect_delay, ClientOptions, NbdStorage};
use oxcow::nbd::proto::*;
use oxcow::storage::Storage;
use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::time::Duration;

const SIZE: u64 = 8 << 20;

/// Sends the oldstyle greeting (size, no flags) and reads one request
/// with its payload; answers it when `answer`.
fn serve_one(mut s: UnixStream, answer: bool) -> Vec<u8> {
    let mut g = Vec::new();
    g.extend_from_slice(&NBD_MAGIC.to_be_bytes());
    g.extend_from_slice(&CLISERV_MAGIC.to_be_bytes());
    g.extend_from_slice(&SIZE.to_be_bytes());
    g.extend_from_slice(&0u32.to_be_bytes());
    g.extend_from_slice(&[0; 124]);
    s.write_all(&g).unwrap();
    let mut h = [0u8; request::SIZE];
    s.read_exact(&mut h).unwrap();
    let r = Request::decode(&h).unwrap();
    assert_eq!(r.command, CMD_WRITE);
    let mut data = vec![0u8; r.length as usize];
    s.read_exact(&mut data).unwrap();
    if answer {
        s.write_all(&encode_simple_reply(0, r.cookie)).unwrap();
    }
    data
}

fn listen(sock: &Path) -> UnixListener {
    let _ = std::fs::remove_file(sock);
    UnixListener::bind(sock).unwrap()
}

#[test]
fn a_write_lost_with_its_oldstyle_server_is_sent_again_within_the_reconnect_delay() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("o.sock");
    let name = format!("nbd+unix:///?socket={}", sock.display());
    let first = listen(&sock);
    let server_sock = sock.clone();
    let server = std::thread::spawn(move || {
        // First connection: the write is taken, then the server is gone
        // for a while (no socket at all), then back and answering.
        let (s, _) = first.accept().unwrap();
        let lost = serve_one(s, false);
        drop(first);
        std::fs::remove_file(&server_sock).unwrap();
        std::thread::sleep(Duration::from_millis(500));
        let again = listen(&server_sock);
        let (s, _) = again.accept().unwrap();
        (lost, serve_one(s, true))
    });
    set_reconnect_delay(&name, Duration::from_secs(20));
    let st = NbdStorage::open(&name, ClientOptions::default()).expect("oldstyle open");
    assert_eq!(st.len().unwrap(), SIZE);
    st.write_at(&[0x77; 4096], 8192).expect("the write is sent again on the new connection");
    let (lost, again) = server.join().unwrap();
    assert_eq!(lost, again);
    assert_eq!(again, vec![0x77; 4096]);
}

#[test]
fn without_a_reconnect_delay_a_lost_server_fails_the_write() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("o.sock");
    let name = format!("nbd+unix:///?socket={}", sock.display());
    let first = listen(&sock);
    let server_sock = sock.clone();
    let server = std::thread::spawn(move || {
        let (s, _) = first.accept().unwrap();
        serve_one(s, false);
        drop(first);
        std::fs::remove_file(&server_sock).unwrap();
    });
    let st = NbdStorage::open(&name, ClientOptions::default()).expect("oldstyle open");
    assert!(st.write_at(&[0x77; 4096], 0).is_err());
    server.join().unwrap();
}
