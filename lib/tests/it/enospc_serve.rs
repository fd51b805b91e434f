//! Issue 21, item 1: an NBD export on a disk that fills up with writes in
//! flight, then gets space back (an admin grows the volume, a VM with
//! `werror=enospc` resumes). As with qemu-nbd: every failure reaches the
//! clients as ENOSPC, never EIO; once space returns, writes and flushes
//! succeed again; nothing acknowledged is lost, also what was still only
//! in the cache when the export ends; and QEMU finds the image clean.
//!
//! The image lives on a fault storage that fails every space-consuming
//! operation from some point until it is healed, so the test runs the same
//! everywhere (cli/tests/small_filesystem.rs does it on a real full
//! file system when it may mount one).

use crate::support;
use crate::support::nbd::*;
use oxcow::nbd::client::NbdClient;
use oxcow::nbd::server::ExportConfig;
use oxcow::qcow2::{self, CreateOptions, Qcow2, Qcow2Options};
use oxcow::storage::{Fault, FaultOps, FaultStorage, MemoryStorage};
use oxcow::BlockDevice;
use std::sync::Arc;

const WRITERS: u64 = 16;
const BLOCKS: u64 = 24;
const BLOCK: u64 = 64 << 10;
const DISK: u64 = WRITERS * BLOCKS * BLOCK;

/// The pattern of writer `w`'s block `b` in round `round`.
fn pattern(w: u64, b: u64, round: u64) -> u8 {
    (1 + (w * 31 + b * 7 + round * 101) % 250) as u8
}

fn offset(w: u64, b: u64) -> u64 {
    // Interleaved, so the writers' clusters share L2 tables and refcount
    // blocks, and their allocations race.
    (b * WRITERS + w) * BLOCK
}

/// One writer's view: the pattern each of its blocks holds, `None` after a
/// failed write (old or new data), `Some(0)` never written.
type Blocks = Vec<Option<u8>>;

#[test]
fn serve_on_a_full_disk_reports_enospc_and_recovers_when_space_returns() {
    let base = Arc::new(MemoryStorage::new());
    qcow2::create(base.clone(), None, &CreateOptions::default().size(DISK)).unwrap();
    // Space runs out after a third of the writes' I/O, with every writer
    // busy, and stays out until the admin frees some.
    let st = Arc::new(FaultStorage::new(base.to_bytes(), 150, Fault::Enospc, true).only(FaultOps::Space));
    let q = Arc::new(Qcow2::open(st.clone(), Qcow2Options::default()).unwrap());
    let cfg = ExportConfig::default().name("full".into());
    let srv = start_tcp(q.clone(), cfg, opts(true, WRITERS as usize));
    let uri = srv.uri("full");

    // Round 1: every writer fills its blocks while space runs out.
    let clients: Vec<Arc<NbdClient>> =
        (0..WRITERS).map(|_| Arc::new(NbdClient::connect(&uri).expect("connect"))).collect();
    let results: Vec<(Blocks, usize, Vec<i32>)> = std::thread::scope(|s| {
        let handles: Vec<_> = clients
            .iter()
            .enumerate()
            .map(|(w, c)| {
                let w = w as u64;
                s.spawn(move || {
                    let mut blocks = vec![Some(0u8); BLOCKS as usize];
                    let (mut failed, mut errnos) = (0, Vec::new());
                    for b in 0..BLOCKS {
                        let p = pattern(w, b, 1);
                        match c.write_at(&vec![p; BLOCK as usize], offset(w, b)) {
                            Ok(()) => blocks[b as usize] = Some(p),
                            Err(e) => {
                                blocks[b as usize] = None;
                                failed += 1;
                                errnos.push(e.errno());
                            }
                        }
                        if b % 8 == 7 {
                            if let Err(e) = c.flush() {
                                errnos.push(e.errno());
                            }
                        }
                    }
                    (blocks, failed, errnos)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().expect("writer panicked")).collect()
    });
    let failed: usize = results.iter().map(|r| r.1).sum();
    let errnos: Vec<i32> = results.iter().flat_map(|r| r.2.iter().copied()).collect();
    assert!(st.failed() && failed > 0, "space never ran out during the writes ({} I/Os)", st.ops());
    assert!(errnos.iter().all(|&e| e == libc::ENOSPC), "failures must all be ENOSPC (28), got errnos {errnos:?}");
    eprintln!("round 1: {failed} of {} writes failed with ENOSPC", WRITERS * BLOCKS);

    // The admin frees space: what failed is retried and succeeds.
    st.heal();
    clients[0].flush().expect("flush after space returned");
    let mut model: Vec<Blocks> = results.into_iter().map(|r| r.0).collect();
    std::thread::scope(|s| {
        for ((w, c), blocks) in clients.iter().enumerate().zip(model.iter_mut()) {
            let w = w as u64;
            s.spawn(move || {
                for b in 0..BLOCKS {
                    if blocks[b as usize].is_none() {
                        let p = pattern(w, b, 2);
                        c.write_at(&vec![p; BLOCK as usize], offset(w, b))
                            .unwrap_or_else(|e| panic!("rewrite of {w}/{b} after space returned: {e}"));
                        blocks[b as usize] = Some(p);
                    }
                }
            });
        }
    });
    // Everything acknowledged reads back through the export.
    let mut buf = vec![0u8; BLOCK as usize];
    for (w, blocks) in model.iter().enumerate() {
        for (b, p) in blocks.iter().enumerate() {
            let p = p.expect("every block rewritten");
            clients[w].read_at(&mut buf, offset(w as u64, b as u64)).unwrap();
            assert!(buf.iter().all(|&x| x == p), "block {w}/{b} does not read back as {p:#x} through the export");
        }
    }
    // No final flush: the rewrites are in the cache only, and ending the
    // export must write them (they were acknowledged).
    drop(clients);
    srv.stop().unwrap();
    q.close().expect("close after space returned");
    drop(q);

    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("full.qcow2");
    std::fs::write(&img, st.to_bytes()).unwrap();
    support::check_clean(&img);
    let raw = dir.path().join("full.raw");
    qemu_img_ok(&["convert", "-f", "qcow2", "-O", "raw", img.to_str().unwrap(), raw.to_str().unwrap()]);
    let bytes = std::fs::read(&raw).unwrap();
    for (w, blocks) in model.iter().enumerate() {
        for (b, p) in blocks.iter().enumerate() {
            let p = p.expect("every block rewritten");
            let at = offset(w as u64, b as u64) as usize;
            assert!(
                bytes[at..at + BLOCK as usize].iter().all(|&x| x == p),
                "block {w}/{b} reads back through QEMU as something else than {p:#x}"
            );
        }
    }
}
