//! The NBD client against oxcow's own server and qemu-nbd: reads, holes,
//! block status, writes, requests in flight, reconnects and errors.

use crate::support::process::wait_ready;
use crate::support::remote::*;
use oxcow::nbd::client::NbdClient;
use oxcow::storage::{FileStorage, OpenFlags};
use oxcow::{BlockDevice, Format, OpenOptions, RawImage};
use std::sync::Arc;
use std::time::{Duration, Instant};

const SIZE: u64 = 8 << 20;

fn raw_dev(path: &std::path::Path, read_only: bool) -> Arc<dyn BlockDevice> {
    let st = FileStorage::open(path, OpenFlags::default().write(!read_only)).unwrap();
    Arc::new(RawImage::new(Arc::new(st), read_only, false).unwrap())
}

/// Reads at awkward offsets and lengths, including across holes.
fn check_reads(c: &NbdClient, content: &[u8]) {
    assert_eq!(c.len(), content.len() as u64);
    let cases: &[(u64, usize)] =
        &[(0, 4096), (1, 1), (65535, 3), (3 * 65536 - 100, 70000), (0, 1 << 20), (SIZE - 513, 513), (123457, 777777)];
    for &(off, len) in cases {
        let mut buf = vec![0xaau8; len];
        c.read_at(&mut buf, off).unwrap();
        assert!(buf == content[off as usize..off as usize + len], "read at {off} of {len}");
    }
    let mut all = vec![0u8; SIZE as usize];
    c.read_at(&mut all, 0).unwrap();
    assert!(all == content);
}

fn check_status(c: &NbdClient) {
    assert!(c.has_block_status());
    let st = c.block_status(0, SIZE).unwrap();
    assert!(st.data && !st.zero && st.offset == 0 && st.length >= 65536, "{st:?}");
    let st = c.block_status(3 * 65536, SIZE - 3 * 65536).unwrap();
    assert!(!st.data && st.zero, "hole reported as {st:?}");
    assert_eq!(st.length, 65536);
}

#[test]
fn reads_and_status_from_oxcow_server() {
    let dir = tempfile::tempdir().unwrap();
    let (base, content) = patterned_base(dir.path(), "base.raw", SIZE, 1);
    let srv = OxServer::start(raw_dev(&base, true), true);
    let c = NbdClient::connect(&srv.upstream.url()).unwrap();
    assert!(c.is_read_only());
    check_reads(&c, &content);
    check_status(&c);
    let e = c.write_at(&[1], 0).unwrap_err();
    assert!(e.to_string().contains("read-only"), "{e}");
}

#[test]
fn reads_and_status_from_qemu_nbd() {
    if !have("qemu-nbd") {
        eprintln!("qemu-nbd not installed; skipping");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (base, content) = patterned_base(dir.path(), "base.raw", SIZE, 2);
    let q = qemu_nbd(dir.path(), &base);
    let c = NbdClient::connect(&q.upstream.url()).unwrap();
    assert!(c.is_read_only());
    check_reads(&c, &content);
    check_status(&c);
}

#[test]
fn writes_zeroes_trim_flush() {
    let dir = tempfile::tempdir().unwrap();
    let (base, mut content) = patterned_base(dir.path(), "rw.raw", SIZE, 3);
    let srv = OxServer::start(raw_dev(&base, false), false);
    let c = NbdClient::connect(&srv.upstream.url()).unwrap();
    assert!(!c.is_read_only());
    let data: Vec<u8> = (0..100_000u32).map(|i| (i * 7) as u8).collect();
    c.write_at(&data, 12345).unwrap();
    content[12345..12345 + data.len()].copy_from_slice(&data);
    c.write_zeroes(1 << 20, 200_000, false).unwrap();
    content[1 << 20..(1 << 20) + 200_000].fill(0);
    c.write_zeroes(2 << 20, 1 << 20, true).unwrap();
    content[2 << 20..3 << 20].fill(0);
    c.discard(5 << 20, 65536).unwrap(); // advisory: content unspecified there
    let mut d = vec![0u8; 65536];
    c.read_at(&mut d, 5 << 20).unwrap();
    content[5 << 20..(5 << 20) + 65536].copy_from_slice(&d);
    c.flush().unwrap();
    check_reads(&c, &content);
    c.close().unwrap();
    drop(srv);
    assert!(std::fs::read(&base).unwrap() == content);
}

#[test]
fn many_requests_in_flight() {
    let dir = tempfile::tempdir().unwrap();
    let (base, content) = patterned_base(dir.path(), "base.raw", SIZE, 4);
    let srv = OxServer::start(raw_dev(&base, true), true);
    let proxy = Proxy::start(srv.upstream.clone(), Duration::ZERO);
    let c = Arc::new(NbdClient::connect(&proxy.url()).unwrap());
    let content = Arc::new(content);
    // Requests wait in the proxy until every thread has one in flight: a
    // client that sent one request at a time would never get there.
    proxy.hold();
    let threads: Vec<_> = (0..16u64)
        .map(|t| {
            let (c, content) = (Arc::clone(&c), Arc::clone(&content));
            std::thread::spawn(move || {
                for k in 0..4u64 {
                    let off = (t * 4 + k) * 100_003 % (SIZE - 70_000);
                    let mut buf = vec![0u8; 70_000];
                    c.read_at(&mut buf, off).unwrap();
                    assert!(buf == content[off as usize..off as usize + 70_000]);
                }
            })
        })
        .collect();
    wait_ready("16 requests in flight at once", None, || proxy.reads() >= 16);
    proxy.release();
    for t in threads {
        t.join().unwrap();
    }
    assert_eq!(proxy.counts.connections.load(std::sync::atomic::Ordering::Relaxed), 1);
}

#[test]
fn reconnects_after_a_dropped_connection() {
    let dir = tempfile::tempdir().unwrap();
    let (base, content) = patterned_base(dir.path(), "base.raw", SIZE, 5);
    let srv = OxServer::start(raw_dev(&base, true), true);
    let proxy = Proxy::start(srv.upstream.clone(), Duration::ZERO);
    let c = NbdClient::connect(&proxy.url()).unwrap();
    let mut buf = vec![0u8; 4096];
    c.read_at(&mut buf, 0).unwrap();
    proxy.drop_connections();
    // The broken connection is noticed and replaced on the next request.
    let deadline = Instant::now() + Duration::from_secs(5);
    c.read_at(&mut buf, 65536).unwrap();
    assert!(buf == content[65536..65536 + 4096]);
    assert!(Instant::now() < deadline);
    assert_eq!(proxy.counts.connections.load(std::sync::atomic::Ordering::Relaxed), 2);
}

#[test]
fn dead_server_gives_one_clear_line() {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    drop(l);
    let url = format!("nbd://127.0.0.1:{port}/");
    let e = NbdClient::connect(&url).expect_err("connecting to nothing");
    assert_eq!(e.to_string(), format!("Failed to connect to '127.0.0.1:{port}': Connection refused"));
    let e = oxcow::open(&url, &OpenOptions::read_only()).expect_err("opening nothing");
    assert!(e.to_string().starts_with("Failed to connect to"), "{e}");
    assert!(!e.to_string().contains('\n'));
    let dir = tempfile::tempdir().unwrap();
    let url = format!("nbd+unix:///x?socket={}", dir.path().join("none.sock").display());
    let e = NbdClient::connect(&url).expect_err("no socket");
    assert!(e.to_string().ends_with("No such file or directory"), "{e}");
}

#[test]
fn server_going_away_mid_session_fails_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let (base, _) = patterned_base(dir.path(), "base.raw", SIZE, 6);
    let srv = OxServer::start(raw_dev(&base, true), true);
    let c = NbdClient::connect(&srv.upstream.url()).unwrap();
    drop(srv);
    let mut buf = vec![0u8; 512];
    let start = Instant::now();
    let e = c.read_at(&mut buf, 0).unwrap_err();
    assert!(start.elapsed() < Duration::from_secs(15));
    let msg = e.to_string();
    assert!(msg.contains("Connection refused") || msg.contains("lost"), "{msg}");
}

#[test]
fn image_open_recognizes_nbd_names() {
    let dir = tempfile::tempdir().unwrap();
    let (base, content) = patterned_base(dir.path(), "base.raw", SIZE, 7);
    let srv = OxServer::start(raw_dev(&base, true), true);
    let img = oxcow::open(srv.upstream.url(), &OpenOptions::read_only()).unwrap();
    assert_eq!(img.format(), Format::Raw);
    assert_eq!(img.device().format_name(), "nbd");
    let mut buf = vec![0u8; 100];
    img.device().read_at(&mut buf, 1000).unwrap();
    assert!(buf == content[1000..1100]);

    // A qcow2 image exported as bytes is probed as qcow2 through the client.
    let q = dir.path().join("img.qcow2");
    let st = oxcow::create_file(&q).unwrap();
    oxcow::qcow2::create(st, None, &oxcow::qcow2::CreateOptions::new(1 << 20)).unwrap();
    {
        let w = oxcow::open(&q, &OpenOptions::read_write()).unwrap();
        w.device().write_at(&[9u8; 4096], 8192).unwrap();
        w.close().unwrap();
    }
    let srv2 = OxServer::start(raw_dev(&q, true), true);
    let img = oxcow::open(srv2.upstream.url(), &OpenOptions::read_only()).unwrap();
    assert_eq!(img.format(), Format::Qcow2);
    let mut buf = vec![0u8; 4096];
    img.device().read_at(&mut buf, 8192).unwrap();
    assert!(buf.iter().all(|&b| b == 9));
}

#[test]
fn nbdkit_memory_plugin_as_base() {
    if !have("nbdkit") {
        eprintln!("note: nbdkit is not installed; skipping the nbdkit test");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let k = nbdkit(dir.path(), &["memory", "size=4M"]);
    let c = NbdClient::connect(&k.upstream.url()).unwrap();
    assert_eq!(c.len(), 4 << 20);
    let data = vec![0x5au8; 70_000];
    c.write_at(&data, 4097).unwrap();
    c.flush().unwrap();
    let mut back = vec![0u8; 70_002];
    c.read_at(&mut back, 4096).unwrap();
    assert_eq!(back[0], 0);
    assert!(back[1..70_001] == data[..]);
    assert_eq!(back[70_001], 0);
    c.write_zeroes(4096, 8192, true).unwrap();
    c.read_at(&mut back[..8192], 4096).unwrap();
    assert!(back[..8192].iter().all(|&b| b == 0));
}

#[test]
fn request_in_flight_when_the_connection_drops_is_retried() {
    let dir = tempfile::tempdir().unwrap();
    let (base, content) = patterned_base(dir.path(), "base.raw", SIZE, 8);
    let srv = OxServer::start(raw_dev(&base, true), true);
    let proxy = Arc::new(Proxy::start(srv.upstream.clone(), Duration::ZERO));
    let c = Arc::new(NbdClient::connect(&proxy.url()).unwrap());
    // Requests wait in the proxy, so the line is cut under them.
    proxy.hold();
    let readers: Vec<_> = (0..4u64)
        .map(|k| {
            let (c, content) = (Arc::clone(&c), content.clone());
            std::thread::spawn(move || {
                let off = k * 1_000_000;
                let mut buf = vec![0u8; 50_000];
                c.read_at(&mut buf, off).unwrap();
                assert!(buf == content[off as usize..off as usize + 50_000]);
            })
        })
        .collect();
    wait_ready("four reads in flight", None, || proxy.reads() >= 4);
    proxy.drop_connections();
    proxy.release();
    for r in readers {
        r.join().unwrap();
    }
    // Everyone retried on one new connection.
    assert_eq!(proxy.counts.connections.load(std::sync::atomic::Ordering::Relaxed), 2);
}

/// A server asking for 512-byte blocks makes the client read-modify-write
/// unaligned writes. An aligned write of the same block landing between
/// the RMW's read and its write was undone, also in the bytes the unaligned
/// write never touched: whatever order the two writes take, the block
/// outside the small write must hold the aligned write's pattern.
#[test]
fn aligned_write_racing_an_unaligned_read_modify_write_is_never_undone() {
    use crate::support::nbd::{opts, sparse_file, start_tcp};
    use oxcow::nbd::server::ExportConfig;
    let dir = tempfile::tempdir().unwrap();
    let file = sparse_file(dir.path(), "rmw.raw", 1 << 20);
    let srv = start_tcp(raw_dev(&file, false), ExportConfig::new("").min_block_size(512), opts(true, 4));
    let c = Arc::new(NbdClient::connect(&srv.addr.url()).unwrap());
    let barrier = Arc::new(std::sync::Barrier::new(2));
    let rounds = 400u32;
    let small = {
        let (c, b) = (c.clone(), barrier.clone());
        std::thread::spawn(move || {
            for r in 0..rounds {
                let block = u64::from(r % 8) * 512;
                b.wait();
                c.write_at(&[0xee; 100], block + 100).unwrap();
                b.wait();
            }
        })
    };
    for r in 0..rounds {
        let block = u64::from(r % 8) * 512;
        let pattern = (r % 200) as u8 + 1;
        barrier.wait();
        c.write_at(&[pattern; 512], block).unwrap();
        barrier.wait();
        let mut got = [0u8; 512];
        c.read_at(&mut got, block).unwrap();
        let outside = got[..100].iter().chain(&got[200..]).all(|&x| x == pattern);
        assert!(outside, "round {r}: the aligned write of {pattern:#x} was undone: {:?}", &got[..8]);
    }
    small.join().unwrap();
}
