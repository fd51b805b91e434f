//! The NBD client against a scripted server that breaks the protocol:
//! every bad reply must become an error (promptly), never a panic, a hang
//! or a huge allocation.

use oxcow::nbd::client::{ClientOptions, NbdClient, NbdUrl};
use oxcow::nbd::proto::*;
use oxcow::BlockDevice;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

const SIZE: u64 = 1 << 20;

/// A one-connection server: negotiates (structured replies,
/// base:allocation as context 7, one read-only export), reads one
/// request and hands it to `script`.
fn fake(script: impl FnOnce(&mut TcpStream, Request) + Send + 'static) -> (String, JoinHandle<()>) {
    fake_with(Modern { go: true, structured: true }, script)
}

/// What the fake server supports.
#[derive(Clone, Copy)]
struct Modern {
    /// `NBD_OPT_GO` (else only `NBD_OPT_EXPORT_NAME`).
    go: bool,
    /// Structured replies and metadata contexts.
    structured: bool,
}

fn fake_with(
    modern: Modern,
    script: impl FnOnce(&mut TcpStream, Request) + Send + 'static,
) -> (String, JoinHandle<()>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("nbd://{}/", l.local_addr().unwrap());
    let h = std::thread::spawn(move || {
        let (mut s, _) = l.accept().unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.write_all(&encode_greeting(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES)).unwrap();
        let mut flags = [0u8; 4];
        s.read_exact(&mut flags).unwrap();
        loop {
            let mut h = [0u8; option_header::SIZE];
            s.read_exact(&mut h).unwrap();
            let o = OptionHeader::decode(&h).unwrap();
            let mut data = vec![0u8; o.length as usize];
            s.read_exact(&mut data).unwrap();
            match o.option {
                OPT_EXPORT_NAME => {
                    // The old way in: size and flags, no zero padding
                    // (NO_ZEROES was offered and the client takes it).
                    let mut b = SIZE.to_be_bytes().to_vec();
                    b.extend_from_slice(&(FLAG_HAS_FLAGS | FLAG_READ_ONLY).to_be_bytes());
                    s.write_all(&b).unwrap();
                    break;
                }
                OPT_STRUCTURED_REPLY | OPT_SET_META_CONTEXT | OPT_GO
                    if (o.option == OPT_GO && !modern.go) || (o.option != OPT_GO && !modern.structured) =>
                {
                    s.write_all(&encode_option_reply(o.option, REP_ERR_UNSUP, &[])).unwrap()
                }
                OPT_STRUCTURED_REPLY => s.write_all(&encode_option_reply(o.option, REP_ACK, &[])).unwrap(),
                OPT_SET_META_CONTEXT => {
                    let ctx = encode_meta_context(7, CONTEXT_BASE_ALLOCATION);
                    s.write_all(&encode_option_reply(o.option, REP_META_CONTEXT, &ctx)).unwrap();
                    s.write_all(&encode_option_reply(o.option, REP_ACK, &[])).unwrap();
                }
                OPT_GO => {
                    let info = encode_info_export(SIZE, FLAG_HAS_FLAGS | FLAG_READ_ONLY);
                    s.write_all(&encode_option_reply(o.option, REP_INFO, &info)).unwrap();
                    s.write_all(&encode_option_reply(o.option, REP_ACK, &[])).unwrap();
                    break;
                }
                _ => s.write_all(&encode_option_reply(o.option, REP_ERR_UNSUP, &[])).unwrap(),
            }
        }
        let mut r = [0u8; request::SIZE];
        s.read_exact(&mut r).unwrap();
        let req = Request::decode(&r).unwrap();
        script(&mut s, req);
        // Hold the connection until the client gives up on it.
        let mut sink = [0u8; 64];
        while matches!(s.read(&mut sink), Ok(n) if n > 0) {}
    });
    (url, h)
}

fn client(url: &str) -> NbdClient {
    let opts = ClientOptions::default().reconnect(false).request_timeout(Duration::from_secs(2));
    NbdClient::connect_with(NbdUrl::parse(url).unwrap(), opts).unwrap()
}

fn chunk(s: &mut TcpStream, flags: u16, kind: u16, cookie: u64, payload: &[u8]) {
    let _ = s.write_all(&encode_chunk_header(flags, kind, cookie, payload.len() as u32));
    let _ = s.write_all(payload);
}

/// Reads 4 KiB at 4096 against `script`; returns the error text.
fn read_fails(script: impl FnOnce(&mut TcpStream, Request) + Send + 'static) -> String {
    let (url, h) = fake(script);
    let c = client(&url);
    let start = Instant::now();
    let mut buf = vec![0u8; 4096];
    let e = c.read_at(&mut buf, 4096).expect_err("bad reply accepted");
    assert!(start.elapsed() < Duration::from_secs(5), "took {:?}", start.elapsed());
    drop(c);
    h.join().unwrap();
    e.to_string()
}

fn data_payload(offset: u64, data: &[u8]) -> Vec<u8> {
    let mut p = offset.to_be_bytes().to_vec();
    p.extend_from_slice(data);
    p
}

#[test]
fn data_outside_the_request() {
    let e =
        read_fails(|s, r| chunk(s, REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_DATA, r.cookie, &data_payload(0, &[1; 4096])));
    assert!(e.contains("broke the protocol") || e.contains("lost"), "{e}");
}

#[test]
fn huge_chunk_length_is_not_allocated() {
    let e = read_fails(|s, r| {
        let _ = s.write_all(&encode_chunk_header(REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_DATA, r.cookie, u32::MAX));
    });
    assert!(e.contains("too long"), "{e}");
}

#[test]
fn reply_to_an_unknown_cookie() {
    let e = read_fails(|s, r| {
        let _ = s.write_all(&encode_simple_reply(0, r.cookie ^ 0xffff));
    });
    assert!(e.contains("unknown cookie"), "{e}");
}

#[test]
fn error_chunk_is_reported_with_its_message() {
    let e = read_fails(|s, r| {
        chunk(s, REPLY_FLAG_DONE, REPLY_TYPE_ERROR, r.cookie, &encode_error_payload(EIO, "disk on fire"));
    });
    assert!(e.contains("disk on fire") && e.contains("Input/output error"), "{e}");
}

#[test]
fn simple_error_reply() {
    let e = read_fails(|s, r| {
        let _ = s.write_all(&encode_simple_reply(EPERM, r.cookie));
    });
    assert!(e.contains("Operation not permitted"), "{e}");
}

#[test]
fn partial_coverage() {
    let e = read_fails(|s, r| {
        chunk(s, REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_DATA, r.cookie, &data_payload(r.offset, &[1; 2048]));
    });
    assert!(e.contains("covered 2048 of 4096"), "{e}");
}

#[test]
fn silent_server_times_out() {
    let e = read_fails(|_, _| {});
    assert!(e.contains("did not answer in time"), "{e}");
}

#[test]
fn garbage_instead_of_a_reply() {
    let e = read_fails(|s, _| {
        let _ = s.write_all(&[0x55; 64]);
    });
    assert!(e.contains("bad reply magic"), "{e}");
}

#[test]
fn zero_length_extent() {
    let (url, h) = fake(|s, r| {
        chunk(s, REPLY_FLAG_DONE, REPLY_TYPE_BLOCK_STATUS, r.cookie, &encode_block_status(7, &[(0, 0)]));
    });
    let c = client(&url);
    let e = c.block_status(0, SIZE).expect_err("zero-length extent accepted");
    assert!(e.to_string().contains("length 0"), "{e}");
    drop(c);
    h.join().unwrap();
}

#[test]
fn holes_are_zeros_and_data_lands_in_place() {
    let (url, h) = fake(|s, r| {
        chunk(s, 0, REPLY_TYPE_OFFSET_HOLE, r.cookie, &encode_hole(r.offset, 1024));
        chunk(s, 0, REPLY_TYPE_OFFSET_DATA, r.cookie, &data_payload(r.offset + 3072, &[7; 1024]));
        chunk(s, REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_DATA, r.cookie, &data_payload(r.offset + 1024, &[9; 2048]));
    });
    let c = client(&url);
    let mut buf = vec![0xffu8; 4096];
    c.read_at(&mut buf, 8192).unwrap();
    assert!(buf[..1024].iter().all(|&b| b == 0));
    assert!(buf[1024..3072].iter().all(|&b| b == 9));
    assert!(buf[3072..].iter().all(|&b| b == 7));
    drop(c);
    h.join().unwrap();
}

#[test]
fn old_server_without_go_or_structured_replies() {
    let (url, h) = fake_with(Modern { go: false, structured: false }, |s, r| {
        assert_eq!(r.command, CMD_READ);
        let _ = s.write_all(&encode_simple_reply(0, r.cookie));
        let _ = s.write_all(&vec![3u8; r.length as usize]);
    });
    let c = client(&url);
    assert_eq!(c.len(), SIZE);
    assert!(c.is_read_only() && !c.has_block_status());
    // Without base:allocation everything is data.
    let st = c.block_status(0, SIZE).unwrap();
    assert!(st.data && !st.zero && st.length == SIZE);
    let mut buf = vec![0u8; 1000];
    c.read_at(&mut buf, 77).unwrap();
    assert!(buf.iter().all(|&b| b == 3));
    drop(c);
    h.join().unwrap();
}

#[test]
fn go_refused_with_unknown_export() {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("nbd://{}/nope", l.local_addr().unwrap());
    let h = std::thread::spawn(move || {
        let (mut s, _) = l.accept().unwrap();
        s.write_all(&encode_greeting(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES)).unwrap();
        let mut flags = [0u8; 4];
        s.read_exact(&mut flags).unwrap();
        loop {
            let mut h = [0u8; option_header::SIZE];
            if s.read_exact(&mut h).is_err() {
                return;
            }
            let o = OptionHeader::decode(&h).unwrap();
            let mut data = vec![0u8; o.length as usize];
            s.read_exact(&mut data).unwrap();
            let reply = if o.option == OPT_GO {
                encode_option_reply(o.option, REP_ERR_UNKNOWN, b"no such export")
            } else {
                encode_option_reply(o.option, REP_ACK, &[])
            };
            s.write_all(&reply).unwrap();
        }
    });
    let e = NbdClient::connect(&url).expect_err("unknown export accepted");
    let msg = e.to_string();
    assert!(msg.starts_with("Failed to connect to") && msg.contains("export unknown: no such export"), "{msg}");
    h.join().unwrap();
}

/// A strict in-memory server: 4 KiB minimum block size, 64 KiB maximum
/// payload; records any request that breaks them.
struct Strict {
    url: String,
    disk: Arc<Mutex<Vec<u8>>>,
    /// Set when a request broke the block size rules.
    bad: Arc<AtomicBool>,
    handle: JoinHandle<()>,
}

fn strict_server(size: usize) -> Strict {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("nbd://{}/", l.local_addr().unwrap());
    let disk = Arc::new(Mutex::new((0..size).map(|i| (i % 253) as u8).collect::<Vec<u8>>()));
    let bad = Arc::new(AtomicBool::new(false));
    let (d, b) = (Arc::clone(&disk), Arc::clone(&bad));
    let h = std::thread::spawn(move || {
        let (mut s, _) = l.accept().unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.write_all(&encode_greeting(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES)).unwrap();
        let mut flags = [0u8; 4];
        s.read_exact(&mut flags).unwrap();
        loop {
            let mut h = [0u8; option_header::SIZE];
            s.read_exact(&mut h).unwrap();
            let o = OptionHeader::decode(&h).unwrap();
            let mut data = vec![0u8; o.length as usize];
            s.read_exact(&mut data).unwrap();
            match o.option {
                OPT_STRUCTURED_REPLY => s.write_all(&encode_option_reply(o.option, REP_ACK, &[])).unwrap(),
                OPT_GO => {
                    let f = FLAG_HAS_FLAGS | FLAG_SEND_FLUSH | FLAG_SEND_TRIM;
                    let info = encode_info_export(size as u64, f);
                    s.write_all(&encode_option_reply(o.option, REP_INFO, &info)).unwrap();
                    let bs = encode_info_block_size(4096, 4096, 65536);
                    s.write_all(&encode_option_reply(o.option, REP_INFO, &bs)).unwrap();
                    s.write_all(&encode_option_reply(o.option, REP_ACK, &[])).unwrap();
                    break;
                }
                _ => s.write_all(&encode_option_reply(o.option, REP_ERR_UNSUP, &[])).unwrap(),
            }
        }
        loop {
            let mut r = [0u8; request::SIZE];
            if s.read_exact(&mut r).is_err() {
                return;
            }
            let req = Request::decode(&r).unwrap();
            if req.command == CMD_DISC {
                return;
            }
            let (off, len) = (req.offset as usize, req.length as usize);
            let aligned = off % 4096 == 0 && len % 4096 == 0 && off + len <= size;
            let payload_ok = len <= 65536 || !matches!(req.command, CMD_READ | CMD_WRITE);
            if !aligned || !payload_ok {
                b.store(true, Ordering::Release);
            }
            match req.command {
                CMD_READ => {
                    let data = d.lock().unwrap()[off..(off + len).min(size)].to_vec();
                    chunk(
                        &mut s,
                        REPLY_FLAG_DONE,
                        REPLY_TYPE_OFFSET_DATA,
                        req.cookie,
                        &data_payload(req.offset, &data),
                    );
                }
                CMD_WRITE => {
                    let mut data = vec![0u8; len];
                    s.read_exact(&mut data).unwrap();
                    d.lock().unwrap()[off..off + len].copy_from_slice(&data);
                    chunk(&mut s, REPLY_FLAG_DONE, REPLY_TYPE_NONE, req.cookie, &[]);
                }
                _ => chunk(&mut s, REPLY_FLAG_DONE, REPLY_TYPE_NONE, req.cookie, &[]),
            }
        }
    });
    Strict { url, disk, bad, handle: h }
}

#[test]
fn requests_respect_the_servers_block_sizes() {
    let size = 1 << 20;
    let Strict { url, disk, bad, handle: h } = strict_server(size);
    let c = client(&url);
    let mut model: Vec<u8> = disk.lock().unwrap().clone();
    // Unaligned and oversized reads are widened and split.
    let mut buf = vec![0u8; 200_001];
    c.read_at(&mut buf, 12_345).unwrap();
    assert!(buf[..] == model[12_345..212_346]);
    // Unaligned writes become read-modify-write of whole blocks.
    let data: Vec<u8> = (0..70_000u32).map(|i| (i * 3) as u8).collect();
    c.write_at(&data, 5_000).unwrap();
    model[5_000..75_000].copy_from_slice(&data);
    // No write-zeroes support: zeros are written (aligned, via the same path).
    c.write_zeroes(100_001, 9_000, true).unwrap();
    model[100_001..109_001].fill(0);
    // Trims shrink to whole blocks; flush goes through.
    c.discard(1, 3 * 4096).unwrap();
    c.flush().unwrap();
    let mut all = vec![0u8; size];
    c.read_at(&mut all, 0).unwrap();
    assert!(all == model);
    assert!(!bad.load(Ordering::Acquire), "the client sent a request the server's block sizes forbid");
    drop(c);
    h.join().unwrap();
    assert!(*disk.lock().unwrap() == model);
}
