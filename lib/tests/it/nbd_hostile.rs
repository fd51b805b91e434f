//! Clients that break the rules: the server answers with the protocol's
//! errors or drops that client alone, and keeps serving everyone else.

use crate::support::nbd::*;
use oxcow::nbd::proto::*;
use oxcow::nbd::server::{DiscardMode, ExportConfig, ServeOptions};
use std::io::{Read, Write};
use std::time::{Duration, Instant};

const MIB: u64 = 1 << 20;

struct Fixture {
    _dir: tempfile::TempDir,
    path: std::path::PathBuf,
    srv: Running,
}

fn fixture(opts: ServeOptions) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let path = sparse_file(dir.path(), "disk.raw", 4 * MIB);
    write_file_at(&path, 0, &[0x5a; 65536]);
    let cfg = ExportConfig::new("h").discard(DiscardMode::Unmap);
    let srv = start_tcp(raw_device(&path, false), cfg, opts);
    Fixture { _dir: dir, path, srv }
}

/// A well-behaved client still gets correct service.
fn still_serves(f: &Fixture) {
    let mut c = client(&f.srv, "h", true, &["base:allocation"]);
    assert_eq!(c.size, 4 * MIB);
    assert!(c.read(0, 65536).iter().all(|&b| b == 0x5a));
    c.write(MIB, &[0x33; 4096]);
    assert!(c.read(MIB, 4096).iter().all(|&b| b == 0x33));
    c.disconnect();
    qemu_io_ok(&f.srv.uri("h"), &["read -P 0x5a 0 64k", "read -P 0x33 1M 4k"]);
}

#[test]
fn garbage_during_handshake() {
    let f = fixture(opts(true, 2));
    // Unknown client flags: dropped.
    let mut s = f.srv.connect();
    let mut g = [0u8; 18];
    s.read_exact(&mut g).unwrap();
    s.write_all(&[0xff; 4]).unwrap();
    assert!(s.closed_by_peer());
    // Bad option magic: dropped.
    let mut s = f.srv.connect();
    s.read_exact(&mut g).unwrap();
    s.write_all(&FLAG_C_FIXED_NEWSTYLE.to_be_bytes()).unwrap();
    let _ = s.write_all(b"this is not an NBD option header at all");
    assert!(s.closed_by_peer());
    // Option claiming 4 GiB of data: dropped without reading it.
    let mut s = f.srv.connect();
    s.read_exact(&mut g).unwrap();
    s.write_all(&FLAG_C_FIXED_NEWSTYLE.to_be_bytes()).unwrap();
    s.write_all(&OptionHeader { option: OPT_GO, length: u32::MAX }.encode()).unwrap();
    assert!(s.closed_by_peer());
    // Random bytes from the first byte on.
    let mut s = f.srv.connect();
    let noise: Vec<u8> = (0..10_000u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
    let _ = s.write_all(&noise);
    assert!(s.closed_by_peer());
    still_serves(&f);
}

#[test]
fn bad_options_get_errors_and_negotiation_goes_on() {
    let f = fixture(opts(true, 1));
    let mut c = Client::start(f.srv.connect());
    // Unknown option.
    assert_eq!(c.option(0xdead, b"whatever").last().unwrap().0, REP_ERR_UNSUP);
    // TLS is not offered.
    assert_eq!(c.option(OPT_STARTTLS, &[]).last().unwrap().0, REP_ERR_POLICY);
    // Meta contexts before structured replies.
    let q = MetaContextRequest { export: b"h".to_vec(), queries: vec![b"base:allocation".to_vec()] };
    assert_eq!(c.option(OPT_SET_META_CONTEXT, &q.encode()).last().unwrap().0, REP_ERR_INVALID);
    // Malformed INFO: name length past the data.
    assert_eq!(c.option(OPT_INFO, &[0, 0, 1, 0, b'h']).last().unwrap().0, REP_ERR_INVALID);
    // Unknown export.
    let r = c.option(OPT_INFO, &InfoRequest { name: b"nope".to_vec(), requests: vec![] }.encode());
    assert_eq!(r.len(), 1);
    assert_eq!(r[0].0, REP_ERR_UNKNOWN);
    // LIST with data is invalid; without, it names the export.
    assert_eq!(c.option(OPT_LIST, b"x").last().unwrap().0, REP_ERR_INVALID);
    let r = c.option(OPT_LIST, &[]);
    assert_eq!(r[0].0, REP_SERVER);
    assert_eq!(&r[0].1, &[0, 0, 0, 1, b'h']);
    assert_eq!(r[1].0, REP_ACK);
    // Structured replies: data is invalid, twice is invalid.
    assert_eq!(c.option(OPT_STRUCTURED_REPLY, b"x").last().unwrap().0, REP_ERR_INVALID);
    assert_eq!(c.option(OPT_STRUCTURED_REPLY, &[]).last().unwrap().0, REP_ACK);
    assert_eq!(c.option(OPT_STRUCTURED_REPLY, &[]).last().unwrap().0, REP_ERR_INVALID);
    // Too much option data is refused without ending negotiation.
    assert_eq!(c.option(0x1234, &vec![0u8; 100_000]).last().unwrap().0, REP_ERR_TOO_BIG);
    // Listing contexts: everything, and by namespace.
    let empty = MetaContextRequest { export: b"h".to_vec(), queries: vec![] };
    let names: Vec<_> = c
        .option(OPT_LIST_META_CONTEXT, &empty.encode())
        .into_iter()
        .filter(|r| r.0 == REP_META_CONTEXT)
        .map(|r| String::from_utf8(r.1[4..].to_vec()).unwrap())
        .collect();
    assert_eq!(names, ["base:allocation", "qemu:allocation-depth"]);
    let wild = MetaContextRequest { export: b"h".to_vec(), queries: vec![b"qemu:".to_vec(), b"x-y:z".to_vec()] };
    let r = c.option(OPT_LIST_META_CONTEXT, &wild.encode());
    assert_eq!(r.len(), 2);
    assert_eq!(&r[0].1[4..], b"qemu:allocation-depth");
    // A truncated meta context request.
    let mut bad = q.encode();
    bad.truncate(bad.len() - 3);
    assert_eq!(c.option(OPT_SET_META_CONTEXT, &bad).last().unwrap().0, REP_ERR_INVALID);
    // Still able to go.
    c.structured = true;
    let mut c = c.go("h", false, &[]);
    assert_eq!(c.flags & FLAG_SEND_DF, FLAG_SEND_DF);
    assert!(c.read(0, 4096).iter().all(|&b| b == 0x5a));
    c.disconnect();
}

#[test]
fn info_reports_export_and_block_sizes() {
    let dir = tempfile::tempdir().unwrap();
    let path = sparse_file(dir.path(), "i.raw", 3 * MIB);
    let cfg = ExportConfig::new("info").description("a test disk".into());
    let srv = start_tcp(raw_device(&path, false), cfg, opts(true, 1));
    let mut c = Client::start(srv.connect());
    let req = InfoRequest { name: b"".to_vec(), requests: vec![INFO_NAME, INFO_DESCRIPTION, INFO_BLOCK_SIZE] };
    let r = c.option(OPT_INFO, &req.encode());
    assert_eq!(r.last().unwrap().0, REP_ACK);
    let info = |t: u16| r.iter().find(|x| x.0 == REP_INFO && u16::from_be_bytes([x.1[0], x.1[1]]) == t).unwrap();
    let e = &info(INFO_EXPORT).1;
    assert_eq!(u64::from_be_bytes(e[2..10].try_into().unwrap()), 3 * MIB);
    let flags = u16::from_be_bytes([e[10], e[11]]);
    let want = FLAG_HAS_FLAGS
        | FLAG_SEND_FLUSH
        | FLAG_SEND_FUA
        | FLAG_SEND_TRIM
        | FLAG_SEND_WRITE_ZEROES
        | FLAG_SEND_FAST_ZERO
        | FLAG_SEND_CACHE;
    assert_eq!(flags, want, "no DF before structured replies, no multi-conn unless configured");
    assert_eq!(&info(INFO_NAME).1[2..], b"info");
    assert_eq!(&info(INFO_DESCRIPTION).1[2..], b"a test disk");
    let b = &info(INFO_BLOCK_SIZE).1;
    let sizes: Vec<u32> = b[2..].chunks(4).map(|c| u32::from_be_bytes(c.try_into().unwrap())).collect();
    assert_eq!(sizes, [1, 4096, 32 << 20]);
    // The old way in: NBD_OPT_EXPORT_NAME, with NO_ZEROES negotiated.
    c.send_option(OPT_EXPORT_NAME, b"info");
    let mut rep = [0u8; 10];
    c.s.read_exact(&mut rep).unwrap();
    assert_eq!(u64::from_be_bytes(rep[..8].try_into().unwrap()), 3 * MIB);
    assert_eq!(u16::from_be_bytes([rep[8], rep[9]]), want);
    c.size = 3 * MIB;
    assert!(c.read(0, 512).iter().all(|&b| b == 0));
    c.disconnect();
    // An unknown name through NBD_OPT_EXPORT_NAME ends the session.
    let mut c = Client::start(srv.connect());
    c.send_option(OPT_EXPORT_NAME, b"other");
    assert!(c.s.closed_by_peer());
}

#[test]
fn stalled_handshake_times_out() {
    let f = fixture(opts(true, 1).handshake_timeout(Duration::from_millis(500)));
    let mut s = f.srv.connect();
    let start = Instant::now();
    let mut g = [0u8; 18];
    s.read_exact(&mut g).unwrap();
    // Send nothing more: the server must hang up on its own.
    assert!(s.closed_by_peer());
    let took = start.elapsed();
    assert!(took < Duration::from_secs(5), "took {took:?}");
    // The slot is free again for a real client (max_connections is 1).
    still_serves(&f);
}

#[test]
fn bad_requests_get_errors_and_the_connection_survives() {
    let f = fixture(opts(true, 1));
    for structured in [false, true] {
        let mut c = client(&f.srv, "h", structured, &[]);
        let size = c.size;
        // Reads past the end, of 4 GiB, and of more than 32 MiB.
        assert_eq!(c.call(0, CMD_READ, size - 4096, 8192, &[]).error, EINVAL);
        assert_eq!(c.call(0, CMD_READ, u64::MAX - 10, 100, &[]).error, EINVAL);
        assert_eq!(c.call(0, CMD_READ, 0, u32::MAX, &[]).error, EINVAL);
        assert_eq!(c.call(0, CMD_READ, 0, (32 << 20) + 1, &[]).error, EINVAL);
        // Zero-length requests are harmless.
        let r = c.call(0, CMD_READ, 0, 0, &[]);
        assert_eq!(r.error, 0);
        assert_eq!(c.call(0, CMD_WRITE, 0, 0, &[]).error, 0);
        // Writes past the end consume their payload and report ENOSPC.
        assert_eq!(c.call(0, CMD_WRITE, size - 100, 200, &[0xee; 200]).error, ENOSPC);
        assert_eq!(c.call(0, CMD_WRITE_ZEROES, 0, u32::MAX, &[]).error, ENOSPC);
        assert_eq!(c.call(0, CMD_TRIM, size, 1, &[]).error, EINVAL);
        assert_eq!(c.call(0, CMD_CACHE, size - 1, 2, &[]).error, EINVAL);
        assert_eq!(c.call(0, CMD_CACHE, 0, 4096, &[]).error, 0);
        // Unknown commands and flags.
        assert_eq!(c.call(0, 99, 0, 0, &[]).error, EINVAL);
        assert_eq!(c.call(1 << 9, CMD_READ, 0, 512, &[]).error, EINVAL);
        assert_eq!(c.call(CMD_FLAG_NO_HOLE, CMD_WRITE, 0, 4, &[1, 2, 3, 4]).error, EINVAL);
        if !structured {
            // DF without structured replies.
            assert_eq!(c.call(CMD_FLAG_DF, CMD_READ, 0, 512, &[]).error, EINVAL);
        }
        // Block status without a context.
        assert_eq!(c.call(0, CMD_BLOCK_STATUS, 0, 4096, &[]).error, EINVAL);
        // Errors carry messages when structured.
        if structured {
            let r = c.call(0, CMD_READ, size, 1, &[]);
            assert_eq!(r.kinds(), [REPLY_TYPE_ERROR]);
            assert!(r.chunks[0].payload.len() > 6);
        }
        // After all that, the connection still works and nothing changed.
        assert!(c.read(0, 65536).iter().all(|&b| b == 0x5a));
        assert!(c.read(size - 4096, 4096).iter().all(|&b| b == 0));
        c.disconnect();
    }
    still_serves(&f);
}

#[test]
fn oversized_write_is_refused_and_the_client_dropped() {
    let f = fixture(opts(true, 1));
    let mut c = client(&f.srv, "h", true, &[]);
    c.send(0, CMD_WRITE, 7, 0, u32::MAX, &[0xee; 1000]);
    let r = c.wait(7);
    assert_eq!(r.error, EINVAL);
    assert!(c.s.closed_by_peer());
    still_serves(&f);
}

#[test]
fn garbage_after_the_handshake_drops_only_that_client() {
    let f = fixture(opts(true, 2));
    let mut good = client(&f.srv, "h", true, &[]);
    let mut bad = client(&f.srv, "h", false, &[]);
    bad.s.write_all(&[0x42; 28]).unwrap();
    assert!(bad.s.closed_by_peer());
    assert!(good.read(0, 4096).iter().all(|&b| b == 0x5a));
    good.disconnect();
    still_serves(&f);
}

#[test]
fn disconnect_mid_write_leaves_the_image_untouched() {
    let f = fixture(opts(true, 1));
    for cut in [0usize, 1, 32768, 65535] {
        let mut c = client(&f.srv, "h", false, &[]);
        let r = Request { flags: CMD_FLAG_FUA, command: CMD_WRITE, cookie: 1, offset: 0, length: 65536 };
        c.s.write_all(&r.encode()).unwrap();
        c.s.write_all(&vec![0xee; cut]).unwrap();
        drop(c);
        // Half a header too.
        let mut c = client(&f.srv, "h", false, &[]);
        c.s.write_all(&r.encode()[..13]).unwrap();
        drop(c);
    }
    still_serves(&f);
    assert!(read_file_at(&f.path, 0, 65536).iter().all(|&b| b == 0x5a));
}

#[test]
fn abrupt_disconnect_with_requests_in_flight() {
    let f = fixture(opts(true, 1));
    for _ in 0..5 {
        let mut c = client(&f.srv, "h", true, &[]);
        for i in 0..64u64 {
            c.send(0, CMD_READ, i, (i % 8) * 65536, 65536, &[]);
            c.send(0, CMD_WRITE, 1000 + i, 2 * MIB + i * 4096, 4096, &[i as u8; 4096]);
        }
        drop(c);
    }
    still_serves(&f);
}

#[test]
fn many_requests_in_flight_are_all_answered_once() {
    let f = fixture(opts(true, 1));
    let mut c = client(&f.srv, "h", true, &[]);
    let n = 400u64;
    for i in 0..n {
        let off = MIB + (i % 64) * 4096;
        if i < 64 {
            c.send(0, CMD_WRITE, i, off, 4096, &[i as u8; 4096]);
        } else {
            c.send(0, CMD_READ, i, 0, 65536, &[]);
        }
    }
    for i in 0..n {
        let r = c.wait(i);
        assert_eq!(r.error, 0);
        if i >= 64 {
            assert!(r.read_data(0, 65536).iter().all(|&b| b == 0x5a));
        }
    }
    for i in 0..64u64 {
        assert!(c.read(MIB + i * 4096, 4096).iter().all(|&b| b == i as u8));
    }
    c.disconnect();
}

#[test]
fn connections_beyond_the_limit_wait_for_a_slot() {
    let f = fixture(opts(true, 1));
    let first = client(&f.srv, "h", false, &[]);
    let mut second = f.srv.connect();
    second.set_timeout(Some(Duration::from_millis(300)));
    let mut g = [0u8; 18];
    assert!(second.read_exact(&mut g).is_err(), "second client greeted while the first is connected");
    first.disconnect();
    second.set_timeout(Some(Duration::from_secs(10)));
    second.read_exact(&mut g).unwrap();
    assert_eq!(&g[..8], &NBD_MAGIC.to_be_bytes());
}

#[test]
fn shutdown_disconnects_live_clients_and_returns() {
    let f = fixture(opts(true, 2));
    let mut c = client(&f.srv, "h", true, &[]);
    c.write(0, &[0x71; 4096]);
    let mut idle = f.srv.connect();
    let start = Instant::now();
    let Fixture { srv, path, _dir } = f;
    srv.stop().unwrap();
    assert!(start.elapsed() < Duration::from_secs(5));
    assert!(c.s.closed_by_peer());
    assert!(idle.closed_by_peer());
    assert!(read_file_at(&path, 0, 4096).iter().all(|&b| b == 0x71));
}

#[test]
fn client_stalling_mid_request_is_dropped() {
    let f = fixture(opts(true, 1).io_timeout(Duration::from_millis(500)));
    // Stalls inside a write payload, then inside a header.
    let mut c = client(&f.srv, "h", true, &[]);
    let r = Request { flags: 0, command: CMD_WRITE, cookie: 1, offset: 0, length: 65536 };
    c.s.write_all(&r.encode()).unwrap();
    c.s.write_all(&[0xee; 1000]).unwrap();
    let start = Instant::now();
    assert!(c.s.closed_by_peer());
    assert!(start.elapsed() < Duration::from_secs(5));
    let mut c = client(&f.srv, "h", true, &[]);
    c.s.write_all(&r.encode()[..10]).unwrap();
    assert!(c.s.closed_by_peer());
    // An idle client between requests is left alone.
    let mut c = client(&f.srv, "h", true, &[]);
    std::thread::sleep(Duration::from_millis(1200));
    assert!(c.read(0, 4096).iter().all(|&b| b == 0x5a));
    c.disconnect();
    still_serves(&f);
    assert!(read_file_at(&f.path, 0, 65536).iter().all(|&b| b == 0x5a));
}
