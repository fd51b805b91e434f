//! Crash safety, proven by replay: a workload of mixed operations runs on
//! a recording storage; then, for every flush boundary, the disk is
//! rebuilt as a power cut could leave it (the durable prefix, plus random
//! subsets and orders of the writes since, plus a torn last write) and
//! each state must open, check without corruption (leaks allowed; dirty
//! images are repaired on open), and read back every byte that the last
//! completed flush covered.
//!
//! Every configuration runs twice: on the recording storage directly, and
//! with O_DIRECT's rules in between (4 KiB blocks, unaligned writes as
//! read-modify-write cycles of whole blocks), so write ordering and
//! alignment are tested together: with 512-byte clusters, metadata and
//! data share the blocks that such cycles rewrite.
//!
//! The LUKS-encrypted configurations open every state with the key, and
//! a sample of their states (as oxcow leaves them after opening) goes to
//! `qemu-img check` with the secret, which must find no corruption.
//!
//! `OXCOW_LONG=1` runs the long mode (more operations and states).

use crate::support::{apply_model, Op, Rng};
use oxcow::qcow2::{self, CreateOptions, Qcow2, Qcow2Options, Repair};
use oxcow::storage::{apply_event, AlignedStorage, CrashStorage, Event, MemoryStorage, Storage};
use oxcow::{BlockDevice, RawImage};
use std::sync::Arc;

const DISK: u64 = 1 << 20;

struct Config {
    name: &'static str,
    create: CreateOptions,
    backing: bool,
}

/// A guest operation, with where its storage events start.
struct Done {
    op: Op,
    log_start: usize,
}

fn long_mode() -> bool {
    std::env::var("OXCOW_LONG").is_ok_and(|v| v == "1")
}

fn backing_bytes() -> Vec<u8> {
    (0..DISK * 3 / 4).map(|i| (i / 512 % 97) as u8 + 1).collect()
}

fn op_range(op: Op) -> Option<(u64, u64)> {
    match op {
        Op::Write(o, l, _) | Op::Zero(o, l, _) | Op::Discard(o, l) => Some((o, o + l)),
        Op::Flush => None,
    }
}

fn backing_dev(backing: &[u8]) -> Arc<dyn BlockDevice> {
    let st: Arc<dyn Storage> = Arc::new(MemoryStorage::from_bytes(backing.to_vec()));
    Arc::new(RawImage::new(st, true, false).unwrap())
}

/// The block size of the direct I/O runs: the largest O_DIRECT needs.
const DIRECT_ALIGN: usize = 4096;

fn run_config(cfg: &Config, seed: u64, ops_count: usize, subsets: usize, direct: bool) -> usize {
    let cs = cfg.create.cluster_size;
    let v3 = cfg.create.version == 3;
    let name = format!("{}{}", cfg.name, if direct { " (direct I/O)" } else { "" });
    let backing = if cfg.backing { backing_bytes() } else { Vec::new() };
    let mut create = cfg.create.clone();
    create.size = DISK;
    if cfg.backing {
        create.backing_file = Some("base.raw".into());
        create.backing_format = Some("raw".into());
    }
    let fresh = Arc::new(MemoryStorage::new());
    qcow2::create(fresh.clone(), None, &create).unwrap();
    let crash = Arc::new(CrashStorage::new(fresh.to_bytes()));
    let key = cfg.create.encryption.as_ref().map(|(_, k)| k.clone());
    let open = |st: Arc<dyn Storage>| {
        let opts = Qcow2Options::default().backing(cfg.backing.then(|| backing_dev(&backing)));
        let mut opts = opts.cache(crate::support::small_slices());
        opts.key_secret = key.clone();
        Qcow2::open(st, opts)
    };
    let qemu_dir = key.is_some().then(|| qemu_check_dir(&backing));
    let mut qemu_checked = 0usize;

    // The workload.
    let mut rng = Rng(seed);
    let mut done: Vec<Done> = Vec::new();
    {
        let engine_storage: Arc<dyn Storage> =
            if direct { Arc::new(AlignedStorage::new(crash.clone(), DIRECT_ALIGN).unwrap()) } else { crash.clone() };
        let q = open(engine_storage).unwrap();
        for _ in 0..ops_count {
            let mut off = rng.below(DISK);
            let mut len = 1 + rng.below(3 * cs);
            if rng.below(2) == 0 {
                off = off / cs * cs;
                len = (len / cs).max(1) * cs;
            }
            let len = len.min(DISK - off).max(1);
            let op = match rng.below(10) {
                0..=4 => Op::Write(off, len, 1 + rng.below(250) as u8),
                5 => Op::Zero(off, len, rng.below(2) == 0),
                6 | 7 => Op::Discard(off, len),
                _ => Op::Flush,
            };
            let log_start = crash.event_count();
            match op {
                Op::Write(o, l, p) => q.write_at(&vec![p; l as usize], o).unwrap(),
                Op::Zero(o, l, u) => q.write_zeroes(o, l, u).unwrap(),
                Op::Discard(o, l) => q.discard(o, l).unwrap(),
                Op::Flush => q.flush().unwrap(),
            }
            done.push(Done { op, log_start });
        }
        // No clean close: the process "dies" after the workload.
        std::mem::forget(q);
    }
    let log = crash.log();
    if std::env::var("OXCOW_CRASH_VERBOSE").is_ok() {
        let bytes: usize = log.events.iter().map(|e| if let Event::Write(_, d) = e { d.len() } else { 0 }).sum();
        eprintln!(
            "{}: {} events, {} bytes written, image {} bytes",
            cfg.name,
            log.events.len(),
            bytes,
            crash.len().unwrap_or(0)
        );
    }
    let flushes = log.flushes();
    // For each guest flush: index of the op and the storage event after
    // which it had completed (its last storage flush).
    let mut guest_flush_done: Vec<(usize, usize)> = Vec::new();
    for (i, d) in done.iter().enumerate() {
        if matches!(d.op, Op::Flush) {
            let end = done.get(i + 1).map_or(log.events.len(), |n| n.log_start);
            if let Some(&last) = flushes.iter().rev().find(|&&f| f < end) {
                if last >= d.log_start {
                    guest_flush_done.push((i, last));
                }
            }
        }
    }

    let mut durable = log.base.clone();
    let mut applied = 0usize;
    let mut model = vec![0u8; DISK as usize];
    model[..backing.len()].copy_from_slice(&backing);
    let mut model_ops = 0usize; // ops applied to `model`
    let mut states = 0usize;
    let mut from_journal_count = 0usize;
    let mut rng = Rng(seed ^ 0x5555);
    for (fi, &f) in flushes.iter().enumerate() {
        while applied <= f {
            apply_event(&mut durable, &log.events[applied]);
            applied += 1;
        }
        // The last guest flush complete at this point.
        let g = guest_flush_done.iter().rev().find(|(_, at)| *at <= f).map(|(op, _)| *op);
        if let Some(g) = g {
            while model_ops <= g {
                apply_model(&mut model, &backing, done[model_ops].op, cs, v3);
                model_ops += 1;
            }
        }
        let window_end = flushes.get(fi + 1).copied().unwrap_or(log.events.len());
        // Ops whose effects may be partly on disk: after the flush, started
        // before the window closes.
        let first_unstable = g.map_or(0, |g| g + 1);
        let unstable: Vec<(u64, u64)> =
            done[first_unstable..].iter().filter(|d| d.log_start < window_end).filter_map(|d| op_range(d.op)).collect();
        let variants = log.crash_variants(f + 1, window_end, subsets, &mut |n| rng.below(n));
        for variant in variants {
            let mut bytes = durable.clone();
            log.apply_variant(&mut bytes, &variant);
            let mut after = qemu_dir.as_ref().filter(|_| states.is_multiple_of(QEMU_CHECK_EVERY)).map(|_| Vec::new());
            let opened = verify_state(&name, bytes, &model, &unstable, &open, f, states, after.as_mut());
            if let (Some(dir), Some(after)) = (&qemu_dir, &after) {
                qemu_check(dir.path(), after, &format!("{name}: state {states} (after event {f})"));
                qemu_checked += 1;
            }
            if let Some(from_journal) = opened {
                // An image with a journal oxcow keeps is never scanned.
                assert_eq!(from_journal, cfg.create.journal, "{name}: state {states} (after event {f})");
                from_journal_count += usize::from(from_journal);
            }
            states += 1;
        }
    }
    if qemu_dir.is_some() {
        assert!(qemu_checked > 0, "{name}: no state went to qemu-img check");
        eprintln!("{name}: {qemu_checked} states checked by qemu-img");
    }
    if cfg.create.journal {
        assert!(from_journal_count > 0, "{name}: no state was recovered from the journal");
        eprintln!("{name}: {from_journal_count} states recovered from the journal");
    }
    states
}

/// Whether a repair at open came from the recovery journal.
pub fn repaired_from_journal(q: &Qcow2) -> Option<bool> {
    q.repaired_on_open().map(|r| r.messages.iter().any(|m| m.starts_with("Refcounts recovered from the journal")))
}

/// The password of the encrypted configurations.
const SECRET: &str = "crash sweep";
/// Every this many states of an encrypted configuration go to qemu-img.
const QEMU_CHECK_EVERY: usize = 32;

/// A directory for the states qemu-img checks, with the backing file the
/// images name.
fn qemu_check_dir(backing: &[u8]) -> tempfile::TempDir {
    // Under CI the tool must be there; elsewhere too, since encryption
    // support came with it (the LUKS tests need it as well).
    assert!(crate::support::process::have("qemu-img"), "qemu-img is needed to check encrypted crash states");
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("base.raw"), backing).unwrap();
    dir
}

/// `qemu-img check` with the secret finds no corruption (leaks allowed:
/// exit status 3).
fn qemu_check(dir: &std::path::Path, bytes: &[u8], what: &str) {
    let img = dir.join("state.qcow2");
    std::fs::write(&img, bytes).unwrap();
    let spec = format!("driver=qcow2,file.filename={},encrypt.key-secret=s0", img.display());
    let secret = format!("secret,id=s0,data={SECRET}");
    let out = std::process::Command::new("qemu-img")
        .current_dir(dir)
        .args(["check", "--object", &secret, "--image-opts", &spec])
        .output()
        .unwrap();
    let code = out.status.code();
    assert!(
        code == Some(0) || code == Some(3),
        "{what}: qemu-img check exit {code:?}\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Opens, checks and reads back one crash state; with `after`, also
/// returns the image as the open (and its repair of a dirty image) left
/// it.
#[allow(clippy::too_many_arguments)]
fn verify_state(
    name: &str,
    bytes: Vec<u8>,
    model: &[u8],
    unstable: &[(u64, u64)],
    open: &dyn Fn(Arc<dyn Storage>) -> oxcow::Result<Qcow2>,
    at: usize,
    n: usize,
    after: Option<&mut Vec<u8>>,
) -> Option<bool> {
    if let Ok(path) = std::env::var("OXCOW_CRASH_DUMP") {
        // Debugging aid: the last state tried is left for qemu-img to see.
        std::fs::write(path, &bytes).unwrap();
    }
    let mem = Arc::new(MemoryStorage::from_bytes(bytes));
    let st: Arc<dyn Storage> = mem.clone();
    let q = open(st).unwrap_or_else(|e| panic!("{name}: state {n} (after event {at}) does not open: {e}"));
    let from_journal = repaired_from_journal(&q);
    let report = q.check(Repair::None).unwrap();
    assert_eq!(report.corruptions, 0, "{name}: state {n} (after event {at}): {:?}", report.messages);
    let mut got = vec![0u8; DISK as usize];
    q.read_at(&mut got, 0).unwrap();
    let mut ranges = unstable.to_vec();
    ranges.sort_unstable();
    let mut pos = 0u64;
    let cmp = |a: u64, b: u64| {
        if a < b && got[a as usize..b as usize] != model[a as usize..b as usize] {
            let i = (a..b).find(|&i| got[i as usize] != model[i as usize]).unwrap_or(a);
            panic!(
                "{name}: state {n} (after event {at}): flushed byte {i} reads {} expected {}",
                got[i as usize], model[i as usize]
            );
        }
    };
    for (a, b) in ranges {
        cmp(pos, a.max(pos));
        pos = pos.max(b);
    }
    cmp(pos, DISK);
    drop(q);
    if let Some(after) = after {
        *after = mem.to_bytes();
    }
    from_journal
}

fn configs() -> Vec<Config> {
    let base = CreateOptions::default().cluster_size(512);
    vec![
        Config { name: "v3", create: base.clone(), backing: false },
        Config { name: "v3-backing", create: base.clone(), backing: true },
        Config { name: "v3-lazy", create: base.clone().lazy_refcounts(true), backing: false },
        Config { name: "v3-lazy-backing", create: base.clone().lazy_refcounts(true), backing: true },
        Config { name: "v3-lazy-journal", create: base.clone().lazy_refcounts(true).journal(true), backing: false },
        Config {
            name: "v3-lazy-journal-backing",
            create: base.clone().lazy_refcounts(true).journal(true),
            backing: true,
        },
        Config { name: "v2", create: base.clone().version(2), backing: false },
        Config { name: "v2-backing", create: base.clone().version(2), backing: true },
        Config {
            name: "v3-extended-l2",
            create: CreateOptions::default().cluster_size(16384).extended_l2(true),
            backing: true,
        },
        Config { name: "v3-refcount-bits-1", create: base.clone().refcount_bits(1), backing: false },
        Config { name: "v3-luks", create: luks(base.clone()), backing: false },
        Config { name: "v3-lazy-luks-backing", create: luks(base.clone().lazy_refcounts(true)), backing: true },
    ]
}

/// `create` encrypted with LUKS (the fewest PBKDF2 iterations, so every
/// state opens fast).
fn luks(mut create: CreateOptions) -> CreateOptions {
    let params = oxcow::crypto::LuksParams { iter_time_ms: 1, ..Default::default() };
    create.encryption = Some((params, oxcow::crypto::Secret::new(SECRET.as_bytes().to_vec())));
    create
}

#[test]
fn crash_sweep() {
    let (ops, subsets) = if long_mode() { (5000, 8) } else { (1000, 2) };
    let mut total = 0;
    let only = std::env::var("OXCOW_CRASH_ONLY").ok();
    for direct in [false, true] {
        for (i, cfg) in configs().iter().enumerate() {
            if only.as_deref().is_some_and(|o| o != cfg.name) {
                continue;
            }
            // Direct I/O states cost more (block-sized writes, more torn
            // variants): half the operations keep CI time bounded.
            let ops = if direct && !long_mode() { ops / 2 } else { ops };
            // Each encrypted state costs a key slot unlock (PBKDF2, the
            // anti-forensic merge) on open: a fifth of the operations
            // keeps them at a few seconds each.
            let ops = if cfg.create.encryption.is_some() && !long_mode() { ops / 5 } else { ops };
            let n = run_config(cfg, 100 + i as u64, ops, subsets, direct);
            let mode = if direct { " (direct I/O)" } else { "" };
            eprintln!("crash sweep {}{mode}: {n} crash states", cfg.name);
            total += n;
        }
    }
    eprintln!("crash sweep: {total} crash states in all");
}

/// A crash during the repair of a dirty image loses nothing: the repair
/// runs on a recording storage, and every state it could leave behind
/// opens (repairing again), checks clean and holds all the flushed data.
#[test]
fn crash_during_dirty_repair() {
    let cs = 512;
    let fresh = Arc::new(MemoryStorage::new());
    qcow2::create(fresh.clone(), None, &CreateOptions::new(DISK).cluster_size(cs).lazy_refcounts(true)).unwrap();
    // A workload left dirty: flushed, then the process dies.
    let mut model = vec![0u8; DISK as usize];
    let mut rng = Rng(4242);
    {
        let q = Qcow2::open(fresh.clone(), Qcow2Options::default()).unwrap();
        for _ in 0..300 {
            let off = rng.below(DISK);
            let len = (1 + rng.below(3 * cs)).min(DISK - off);
            let p = 1 + rng.below(250) as u8;
            if rng.below(4) == 0 {
                q.discard(off, len).unwrap();
                apply_model(&mut model, &[], Op::Discard(off, len), cs, true);
            } else {
                q.write_at(&vec![p; len as usize], off).unwrap();
                model[off as usize..(off + len) as usize].fill(p);
            }
        }
        q.flush().unwrap();
        std::mem::forget(q);
    }
    let crash = Arc::new(CrashStorage::new(fresh.to_bytes()));
    {
        let q = Qcow2::open(crash.clone(), Qcow2Options::default()).unwrap();
        assert!(q.repaired_on_open().is_some());
        std::mem::forget(q);
    }
    let log = crash.log();
    let flushes = log.flushes();
    let mut rng = Rng(99);
    let mut states = 0;
    let mut points: Vec<usize> = flushes.clone();
    points.push(log.events.len());
    for (i, &f) in points.iter().enumerate() {
        let start = if i == 0 { 0 } else { flushes[i - 1] + 1 };
        let window: Vec<usize> = (start..f).filter(|&e| matches!(log.events[e], Event::Write(..))).collect();
        for _ in 0..4 {
            let pick: Vec<usize> = window.iter().copied().filter(|_| rng.below(2) == 0).collect();
            let bytes = log.state(start, &pick, None);
            let q = Qcow2::open(Arc::new(MemoryStorage::from_bytes(bytes)), Qcow2Options::default())
                .unwrap_or_else(|e| panic!("state after event {f} does not open: {e}"));
            let r = q.check(Repair::None).unwrap();
            assert_eq!(r.corruptions, 0, "after event {f}: {:?}", r.messages);
            let mut got = vec![0u8; DISK as usize];
            q.read_at(&mut got, 0).unwrap();
            assert!(got == model, "data lost by a crash during repair (after event {f})");
            drop(q);
            states += 1;
        }
    }
    eprintln!("crash during repair: {states} crash states");
}
