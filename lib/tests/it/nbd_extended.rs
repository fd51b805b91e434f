//! NBD extended headers (`NBD_OPT_EXTENDED_HEADERS`): 32-byte requests
//! and replies, 64-bit effect lengths, `NBD_REPLY_TYPE_BLOCK_STATUS_EXT`
//! and the block status payload that picks contexts, checked with a raw
//! client. (QEMU's own clients over them: the CLI suite's nbd_extended.)

use crate::support::nbd::*;
use oxcow::nbd::proto::*;
use oxcow::nbd::server::DiscardMode;
use std::io::Write;

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;

#[test]
fn extended_headers_carry_every_command_in_32_byte_messages() {
    let dir = tempfile::tempdir().unwrap();
    // Larger than 4 GiB, so that effect lengths need their 64 bits.
    let size = 6 * GIB;
    let path = sparse_file(dir.path(), "x.raw", size);
    write_file_at(&path, MIB, &[0x44; 65536]);
    write_file_at(&path, 5 * GIB, &[0x55; 65536]);
    let srv = start_tcp(raw_device(&path, false), named("x").discard(DiscardMode::Unmap), opts(true, 1));
    let mut c = Client::start(srv.connect()).go_extended("x", &["base:allocation"]);
    let base = c.contexts["base:allocation"];
    assert_eq!(c.size, size);
    assert_eq!(c.flags & FLAG_BLOCK_STAT_PAYLOAD, FLAG_BLOCK_STAT_PAYLOAD);
    assert_eq!(c.flags & FLAG_SEND_DF, FLAG_SEND_DF, "extended headers carry structured replies");

    // A write: its payload length is flagged; success is a NONE chunk
    // (never a simple reply) repeating the request's offset.
    let r = c.call_ext(CMD_FLAG_PAYLOAD_LEN | CMD_FLAG_FUA, CMD_WRITE, 4096, 4096, &[0x5a; 4096]);
    assert_eq!((r.error, r.kinds(), r.offsets.clone()), (0, vec![REPLY_TYPE_NONE], vec![4096]));
    // Without the flag a write still carries its payload: QEMU's client
    // (10.0) sends writes so.
    let r = c.call_ext(0, CMD_WRITE, 12288, 4096, &[0x5a; 4096]);
    assert_eq!((r.error, r.kinds()), (0, vec![REPLY_TYPE_NONE]));

    // A sparse read: data and hole chunks, each header with the
    // request's offset (the payloads carry their own).
    let r = c.call_ext(0, CMD_READ, 0, 2 * MIB, &[]);
    assert_eq!(r.error, 0);
    assert!(r.kinds().contains(&REPLY_TYPE_OFFSET_HOLE), "{:?}", r.kinds());
    assert!(r.offsets.iter().all(|&o| o == 0), "{:?}", r.offsets);
    let d = r.read_data(0, 2 * MIB as usize);
    assert!(d[4096..8192].iter().all(|&b| b == 0x5a) && d[12288..16384].iter().all(|&b| b == 0x5a));
    assert!(d[MIB as usize..MIB as usize + 65536].iter().all(|&b| b == 0x44));
    assert!(d[..4096].iter().all(|&b| b == 0));

    // Block status over more than 4 GiB: 64-bit descriptors, data at
    // 1 MiB, holes around it.
    let r = c.call_ext(0, CMD_BLOCK_STATUS, 0, size, &[]);
    assert_eq!((r.error, r.kinds()), (0, vec![REPLY_TYPE_BLOCK_STATUS_EXT]));
    let e = r.extents_ext(base);
    assert!(e.len() >= 3, "{e:?}");
    assert_eq!(e[0], (4096, u64::from(STATE_HOLE | STATE_ZERO)));
    assert_eq!(e[1], (4096, 0), "{e:?}");

    // Trim and write zeroes of more than 4 GiB (effect lengths).
    let r = c.call_ext(0, CMD_WRITE_ZEROES, 0, 5 * GIB + 4096, &[]);
    assert_eq!((r.error, r.kinds()), (0, vec![REPLY_TYPE_NONE]));
    assert!(c.call_ext(0, CMD_READ, 5 * GIB, 8192, &[]).read_data(5 * GIB, 8192)[..4096].iter().all(|&b| b == 0));
    assert!(c
        .call_ext(0, CMD_READ, 5 * GIB + 4096, 4096, &[])
        .read_data(5 * GIB + 4096, 4096)
        .iter()
        .all(|&b| b == 0x55));
    assert_eq!(c.call_ext(0, CMD_TRIM, 0, size, &[]).error, 0);
    // (One answer walks less than 4 GiB; the client asks again from there.)
    let r = c.call_ext(0, CMD_BLOCK_STATUS, 0, size, &[]);
    let e = r.extents_ext(base);
    assert_eq!(e.len(), 1, "{e:?}");
    assert!(e[0].0 > 4 * GIB - MIB && e[0].1 == u64::from(STATE_HOLE | STATE_ZERO), "{e:?}");
    // Past the end, still refused.
    assert_eq!(c.call_ext(0, CMD_TRIM, GIB, size, &[]).error, EINVAL);
    assert_eq!(c.call_ext(0, CMD_FLUSH, 0, 0, &[]).error, 0);
    c.disconnect();
    assert!(read_file_at(&path, 4096, 4096).iter().all(|&b| b == 0));
}

#[test]
fn block_status_payload_answers_for_the_contexts_it_names() {
    let dir = tempfile::tempdir().unwrap();
    let path = sparse_file(dir.path(), "p.raw", 4 * MIB);
    write_file_at(&path, MIB, &[0x44; 65536]);
    let srv = start_tcp(raw_device(&path, false), named("p"), opts(true, 1));
    let mut c = Client::start(srv.connect()).go_extended("p", &["base:allocation", "qemu:allocation-depth"]);
    let (base, depth) = (c.contexts["base:allocation"], c.contexts["qemu:allocation-depth"]);
    let ask = |ids: Vec<u32>| StatusPayload { length: 2 * MIB, ids }.encode();

    // No payload: every negotiated context.
    let r = c.call_ext(0, CMD_BLOCK_STATUS, 0, 2 * MIB, &[]);
    assert_eq!(r.chunks.len(), 2);
    // The payload's ids: only those, with the payload's effect length.
    let p = ask(vec![depth]);
    let r = c.call_ext(CMD_FLAG_PAYLOAD_LEN, CMD_BLOCK_STATUS, 0, p.len() as u64, &p);
    assert_eq!(r.error, 0);
    assert_eq!(r.chunks.len(), 1);
    assert_eq!(r.extents_ext(depth).iter().map(|e| e.0).sum::<u64>(), 2 * MIB);
    assert!(r.extents_ext(base).is_empty());
    let p = ask(vec![base]);
    let r = c.call_ext(CMD_FLAG_PAYLOAD_LEN | CMD_FLAG_REQ_ONE, CMD_BLOCK_STATUS, 0, p.len() as u64, &p);
    assert_eq!(r.extents_ext(base), [(MIB, u64::from(STATE_HOLE | STATE_ZERO))]);

    // Unknown and repeated ids, and a malformed payload, are refused after
    // the payload is consumed: the next request is understood.
    for p in [ask(vec![base, base]), ask(vec![999]), vec![0; 10]] {
        let r = c.call_ext(CMD_FLAG_PAYLOAD_LEN, CMD_BLOCK_STATUS, 0, p.len() as u64, &p);
        assert_eq!(r.error, EINVAL);
    }
    // A payload on a command without a payload form is refused too.
    let r = c.call_ext(CMD_FLAG_PAYLOAD_LEN, CMD_FLUSH, 0, 8, &[0; 8]);
    assert_eq!(r.error, EINVAL);
    assert_eq!(c.call_ext(0, CMD_READ, MIB, 512, &[]).read_data(MIB, 512), vec![0x44; 512]);
    c.disconnect();
}

#[test]
fn extended_headers_negotiation_refusals() {
    let dir = tempfile::tempdir().unwrap();
    let path = sparse_file(dir.path(), "n.raw", MIB);
    let srv = start_tcp(raw_device(&path, false), named("n"), opts(true, 4));

    let mut c = Client::start(srv.connect());
    assert_eq!(c.option(OPT_EXTENDED_HEADERS, &[1]).last().unwrap().0, REP_ERR_INVALID);
    assert_eq!(c.option(OPT_EXTENDED_HEADERS, &[]).last().unwrap().0, REP_ACK);
    assert_eq!(c.option(OPT_EXTENDED_HEADERS, &[]).last().unwrap().0, REP_ERR_INVALID);
    // No downgrade to structured replies once extended.
    assert_eq!(c.option(OPT_STRUCTURED_REPLY, &[]).last().unwrap().0, REP_ERR_EXT_HEADER_REQD);
    // NBD_OPT_EXPORT_NAME cannot confirm extended headers: hung up on.
    c.send_option(OPT_EXPORT_NAME, b"n");
    assert!(c.s.closed_by_peer());

    // Structured replies first, then extended headers, is fine.
    let mut c = Client::start(srv.connect());
    assert_eq!(c.option(OPT_STRUCTURED_REPLY, &[]).last().unwrap().0, REP_ACK);
    let mut c = c.go_extended("n", &[]);
    assert_eq!(c.call_ext(0, CMD_FLUSH, 0, 0, &[]).kinds(), [REPLY_TYPE_NONE]);
    // A compact request once extended headers are agreed is out of sync.
    let compact = Request { flags: 0, command: CMD_FLUSH, cookie: 1, offset: 0, length: 0 }.encode();
    c.s.write_all(&compact).unwrap();
    c.s.write_all(&[0; ext_request::SIZE - request::SIZE]).unwrap();
    assert!(c.s.closed_by_peer());

    // Without extended headers the flag is not offered.
    let c = client(&srv, "n", true, &[]);
    assert_eq!(c.flags & FLAG_BLOCK_STAT_PAYLOAD, 0);
    c.disconnect();
}
