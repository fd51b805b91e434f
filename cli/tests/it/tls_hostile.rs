//! Hostile TLS input to `oxcow serve --tls-creds`: garbage instead of a
//! handshake, a record cut short, a handshake that stalls (the handshake
//! limit ends it), a client that vanishes mid-record after the handshake.
//! The server survives, serves a well-behaved client meanwhile, and ends
//! up with as many threads as before.

use crate::support::process::{s, wait_ready};
use crate::tls_interop::{nbds_url, oxcow_serve, server_creds, setup};
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

const OXCOW: &str = env!("CARGO_BIN_EXE_oxcow");

/// Connects and gets as far as an acknowledged `NBD_OPT_STARTTLS`.
pub fn after_starttls(sock: &Path) -> UnixStream {
    let mut c = UnixStream::connect(sock).unwrap();
    // A safety net against a server that never answers, not a measurement.
    c.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let mut greeting = [0u8; 18];
    c.read_exact(&mut greeting).unwrap();
    c.write_all(&3u32.to_be_bytes()).unwrap();
    let mut m = 0x4948_4156_454f_5054u64.to_be_bytes().to_vec();
    m.extend_from_slice(&5u32.to_be_bytes());
    m.extend_from_slice(&0u32.to_be_bytes());
    c.write_all(&m).unwrap();
    let mut reply = [0u8; 20];
    c.read_exact(&mut reply).unwrap();
    assert_eq!(u32::from_be_bytes(reply[12..16].try_into().unwrap()), 1, "STARTTLS acknowledged");
    c
}

/// Reads until the server closes the connection (a reset is a close
/// too; the safety-net timeout is not).
pub fn closed_by_server(mut c: UnixStream) {
    let mut buf = [0u8; 4096];
    loop {
        match c.read(&mut buf) {
            Ok(0) => return,
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
                panic!("the server never closed the connection")
            }
            Err(_) => return,
            Ok(_) => {}
        }
    }
}

fn threads(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/task")).map(|d| d.count()).unwrap_or(0)
}

/// A rustls client with the test's client certificate.
fn tls_client(creds: &Path) -> rustls::ClientConnection {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(creds.join("ca-cert.pem")).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let chain: Vec<_> =
        CertificateDer::pem_file_iter(creds.join("client-cert.pem")).unwrap().map(|c| c.unwrap()).collect();
    let key = PrivateKeyDer::from_pem_file(creds.join("client-key.pem")).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .unwrap();
    rustls::ClientConnection::new(Arc::new(config), "localhost".try_into().unwrap()).unwrap()
}

#[test]
fn hostile_tls_clients_leave_the_server_serving_and_no_thread_behind() {
    let t = setup();
    let obj = server_creds(&t.creds, true);
    let server = oxcow_serve(&t.img, &t.sock, &["--object", &obj, "--tls-creds", "tls0", "--handshake-limit", "2"]);
    let pid = server.pid();
    let url = nbds_url(&t.creds, &t.sock);
    let good = || {
        let out = std::process::Command::new(OXCOW)
            .args(["io", "-f", "raw", "-r", "-c", "read 0 64k", &url])
            .output()
            .unwrap();
        assert!(out.status.success(), "a good client was refused: {}", String::from_utf8_lossy(&out.stderr));
    };
    good();
    let baseline = threads(pid);

    // Stalls: one before the greeting's reply, one after STARTTLS.
    let stall_plain = UnixStream::connect(&t.sock).unwrap();
    let stall_tls = after_starttls(&t.sock);
    // Garbage where a ClientHello should be.
    let mut garbage = after_starttls(&t.sock);
    let junk: Vec<u8> = (0..65536u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8).collect();
    let _ = garbage.write_all(&junk);
    // A handshake record announced at 512 bytes, cut short, then gone.
    let mut cut = after_starttls(&t.sock);
    cut.write_all(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc, 0x03, 0x03]).unwrap();
    drop(cut);
    // The server keeps serving while they hang around.
    good();
    closed_by_server(garbage);

    // A real handshake, then half a record of an option, then gone.
    let mut raw = after_starttls(&t.sock);
    let mut tls = tls_client(&t.creds);
    while tls.is_handshaking() {
        tls.complete_io(&mut raw).unwrap();
    }
    let mut opt = 0x4948_4156_454f_5054u64.to_be_bytes().to_vec();
    opt.extend_from_slice(&3u32.to_be_bytes());
    opt.extend_from_slice(&0u32.to_be_bytes());
    tls.writer().write_all(&opt).unwrap();
    let mut sealed = Vec::new();
    while tls.wants_write() {
        tls.write_tls(&mut sealed).unwrap();
    }
    raw.write_all(&sealed[..sealed.len() / 2]).unwrap();
    drop(raw);

    // The stalled ones are ended by the handshake limit.
    closed_by_server(stall_tls);
    closed_by_server(stall_plain);
    good();
    wait_ready("server threads back to the baseline", None, || threads(pid) <= baseline);
    server.term();
    assert_eq!(crate::support::process::run("qemu-img", &["check", s(&t.img)]).0, 0);
}
