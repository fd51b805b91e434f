//! Damaged images must never swallow an acknowledged write: for each
//! class of damage (offsets past the end of the file, refcounts too low,
//! tables overlapping each other or the header, lying snapshot entries)
//! oxcow either refuses (corrupt bit set, typed error) or every write it
//! acknowledged and flushed reads back through QEMU. The same mutated
//! image goes through qemu-io too; what QEMU does is printed next to it.

use crate::support::{self, run};
use oxcow::{Format, OpenOptions};
use std::path::{Path, PathBuf};

const K: u64 = 1024;
const CS: u64 = 64 * K;

/// The base image: QEMU's own layout, four data clusters written.
///
/// ```text
///  0x00000 header   0x10000 refcount table   0x20000 refcount block
///  0x30000 L1       0x40000 L2               0x50000.. guest clusters 0-3
///  0x90000 end of file
/// ```
struct Layout {
    rt: u64,
    rb: u64,
    l1: u64,
    l2: u64,
    data: [u64; 4],
    end: u64,
}

fn get64(b: &[u8], at: u64) -> u64 {
    u64::from_be_bytes(b[at as usize..at as usize + 8].try_into().unwrap())
}
fn put64(b: &mut [u8], at: u64, v: u64) {
    b[at as usize..at as usize + 8].copy_from_slice(&v.to_be_bytes());
}
fn put16(b: &mut [u8], at: u64, v: u16) {
    b[at as usize..at as usize + 2].copy_from_slice(&v.to_be_bytes());
}

const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
const COPIED: u64 = 1 << 63;

fn base_image(dir: &Path) -> (Vec<u8>, Layout) {
    let p = dir.join("base.qcow2");
    let s = p.to_str().unwrap();
    support::ok("qemu-img", &["create", "-q", "-f", "qcow2", s, "4M"]);
    let mut args = vec!["-f", "qcow2"];
    let cmds: Vec<String> = (0..4).map(|i| format!("write -P {} {} 64k", 0x10 + i, i * CS)).collect();
    for c in &cmds {
        args.extend(["-c", c.as_str()]);
    }
    args.push(s);
    support::ok("qemu-io", &args);
    let b = std::fs::read(&p).unwrap();
    let l1 = get64(&b, 40);
    let rt = get64(&b, 48);
    let l2 = get64(&b, l1) & OFFSET_MASK;
    let data = [0, 1, 2, 3].map(|i| get64(&b, l2 + 8 * i) & OFFSET_MASK);
    let layout = Layout { rt, rb: get64(&b, rt), l1, l2, data, end: b.len() as u64 };
    assert_eq!(layout.end % CS, 0);
    (b, layout)
}

/// Sets the 16-bit refcount of the cluster at host offset `host`.
fn set_refcount(b: &mut [u8], l: &Layout, host: u64, v: u16) {
    put16(b, l.rb + host / CS * 2, v);
}

/// The workload: each write is flushed before the next; acknowledged
/// means the write and its flush both succeeded.
const WORKLOAD: [(u64, u64, u8); 6] = [
    (0, CS, 0x21),             // in place, guest cluster 0
    (1 << 20, CS, 0x23),       // a new cluster
    (CS + 4 * K, 4 * K, 0x22), // in place, part of guest cluster 1
    (2 << 20, 8 * K, 0x24),    // part of a new cluster
    (3 * CS, CS, 0x25),        // in place, guest cluster 3
    (3 << 20, 2 * CS, 0x26),   // two new clusters
];

/// Guest cluster 2 is never written and no mutation touches its mapping:
/// what QEMU wrote there before must survive the session.
const KEPT: (u64, u64, u8) = (2 * CS, CS, 0x12);

struct Outcome {
    acked: Vec<(u64, u64, u8)>,
    refusals: Vec<String>,
}

fn oxcow_session(p: &Path) -> Outcome {
    let opts = OpenOptions::default().format(Some(Format::Qcow2)).write(true);
    let img = match oxcow::open(p, &opts) {
        Ok(i) => i,
        Err(e) => {
            assert!(e.is_corrupt(), "open refused {p:?} with an error that is not corruption: {e}");
            return Outcome { acked: Vec::new(), refusals: vec![format!("open: {e}")] };
        }
    };
    let mut out = Outcome { acked: Vec::new(), refusals: Vec::new() };
    for (off, len, pat) in WORKLOAD {
        let dev = img.device();
        match dev.write_at(&vec![pat; len as usize], off).and_then(|()| dev.flush()) {
            Ok(()) => out.acked.push((off, len, pat)),
            Err(e) => {
                // Refusals are corruption (the corrupt bit), or the
                // refusal of every write that follows one.
                let s = e.to_string();
                assert!(e.is_corrupt() || s.contains("marked corrupt"), "{p:?}: write refused with {s}");
                out.refusals.push(s);
            }
        }
    }
    let _ = img.close();
    out
}

/// Runs the workload through qemu-io: which writes it acknowledged.
fn qemu_session(p: &Path) -> Vec<(u64, u64, u8)> {
    let cmds: Vec<String> =
        WORKLOAD.iter().flat_map(|(o, l, pat)| [format!("write -P {pat} {o} {l}"), "flush".to_string()]).collect();
    let mut args = vec!["-f", "qcow2"];
    for c in &cmds {
        args.extend(["-c", c.as_str()]);
    }
    args.push(p.to_str().unwrap());
    let (_, out, err) = run("qemu-io", &args);
    // After a failed flush nothing later counts as acknowledged.
    let text = format!("{out}{err}");
    let cut = text.find("flush failed").unwrap_or(text.len());
    WORKLOAD
        .iter()
        .copied()
        .filter(|(o, l, _)| text[..cut].contains(&format!("wrote {l}/{l} bytes at offset {o}\n")))
        .collect()
}

/// Which of `writes` do not read back through qemu-io (later writes in
/// the list win where they overlap; the workload's do not).
fn lost(p: &Path, writes: &[(u64, u64, u8)]) -> Vec<(u64, u64, u8)> {
    writes
        .iter()
        .copied()
        .filter(|(o, l, pat)| {
            let cmd = format!("read -P {pat} {o} {l}");
            let (code, out, err) = run("qemu-io", &["-r", "-U", "-f", "qcow2", "-c", &cmd, p.to_str().unwrap()]);
            code != 0 || out.contains("Pattern verification failed") || !err.is_empty()
        })
        .collect()
}

/// Corruptions `qemu-img check` finds.
fn qemu_corruptions(p: &Path) -> u64 {
    let (_, out, err) = run("qemu-img", &["check", "-U", "--output=json", p.to_str().unwrap()]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}{err}"));
    v["corruptions"].as_u64().unwrap_or(0)
}

fn qemu_says_corrupt(p: &Path) -> bool {
    let (_, out, _) = run("qemu-img", &["info", "-U", "--output=json", p.to_str().unwrap()]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap_or_default();
    v["format-specific"]["data"]["corrupt"].as_bool().unwrap_or(false)
}

/// What oxcow must do with a mutated image.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Expect {
    /// Some write is refused, with the corrupt bit.
    Refuses,
    /// Every write is acknowledged (the damage is stepped around).
    Accepts,
}

struct Case {
    name: &'static str,
    mutate: fn(&mut Vec<u8>, &Layout),
    expect: Expect,
    /// The mutation leaves guest cluster 2 mapped (not so when it moves
    /// the L1 or L2 table), so its old content must read back.
    keeps_cluster2: bool,
}

fn cases() -> Vec<Case> {
    vec![
        // --- offsets past the end of the file
        Case {
            name: "l2_entry_past_eof",
            mutate: |b, l| put64(b, l.l2 + 8, COPIED | 0x100000),
            keeps_cluster2: true,
            expect: Expect::Refuses,
        },
        Case {
            // Where the next allocation goes: QEMU hands the cluster to
            // the new data, then overwrites it through the old entry.
            name: "l2_entry_at_eof",
            mutate: |b, l| put64(b, l.l2 + 8, COPIED | l.end),
            keeps_cluster2: true,
            expect: Expect::Refuses,
        },
        Case {
            // The issue's case: clean close truncated the data away.
            name: "l1_table_past_eof",
            mutate: |b, _| put64(b, 40, 0x100000),
            keeps_cluster2: false,
            expect: Expect::Accepts,
        },
        Case {
            name: "l2_table_past_eof",
            mutate: |b, l| {
                let e = get64(b, l.l1);
                put64(b, l.l1, (e & !OFFSET_MASK) | 0x100000)
            },
            keeps_cluster2: false,
            expect: Expect::Accepts,
        },
        Case {
            name: "refcount_block_past_eof",
            mutate: |b, l| put64(b, l.rt, 0x100000),
            keeps_cluster2: true,
            expect: Expect::Refuses,
        },
        // --- refcounts too low
        Case {
            name: "data_refcount_zero",
            mutate: |b, l| set_refcount(b, l, l.data[0], 0),
            keeps_cluster2: true,
            expect: Expect::Refuses,
        },
        Case {
            // Nothing writes guest cluster 2: QEMU's allocator hands its
            // cluster to new data; oxcow's steps over it.
            name: "untouched_data_refcount_zero",
            mutate: |b, l| set_refcount(b, l, l.data[2], 0),
            keeps_cluster2: true,
            expect: Expect::Accepts,
        },
        Case {
            name: "l2_table_refcount_zero",
            mutate: |b, l| set_refcount(b, l, l.l2, 0),
            keeps_cluster2: true,
            expect: Expect::Accepts,
        },
        Case {
            name: "l1_table_refcount_zero",
            mutate: |b, l| set_refcount(b, l, l.l1, 0),
            keeps_cluster2: true,
            expect: Expect::Accepts,
        },
        Case {
            name: "refcount_table_refcount_zero",
            mutate: |b, l| set_refcount(b, l, l.rt, 0),
            keeps_cluster2: true,
            expect: Expect::Accepts,
        },
        Case {
            name: "refcount_block_refcount_zero",
            mutate: |b, l| set_refcount(b, l, l.rb, 0),
            keeps_cluster2: true,
            expect: Expect::Accepts,
        },
        // --- tables overlapping each other or the header
        Case {
            // The issue's case: a refcount block on the L1 table.
            name: "refcount_block_on_l1_table",
            mutate: |b, l| put64(b, l.rt, l.l1),
            keeps_cluster2: true,
            expect: Expect::Refuses,
        },
        Case {
            name: "refcount_block_on_header",
            mutate: |b, l| put64(b, l.rt, 0),
            keeps_cluster2: true,
            expect: Expect::Refuses,
        },
        Case {
            name: "l2_table_on_refcount_table",
            mutate: |b, l| {
                let e = get64(b, l.l1);
                put64(b, l.l1, (e & !OFFSET_MASK) | l.rt)
            },
            keeps_cluster2: false,
            expect: Expect::Refuses,
        },
        Case {
            name: "l1_table_on_refcount_block",
            mutate: |b, l| put64(b, 40, l.rb),
            keeps_cluster2: false,
            expect: Expect::Refuses,
        },
        Case {
            name: "data_cluster_on_l1_table",
            mutate: |b, l| put64(b, l.l2, COPIED | l.l1),
            keeps_cluster2: true,
            expect: Expect::Refuses,
        },
        Case {
            name: "data_cluster_on_refcount_block",
            mutate: |b, l| put64(b, l.l2 + 3 * 8, COPIED | l.rb),
            keeps_cluster2: true,
            expect: Expect::Refuses,
        },
    ]
}

#[test]
fn damaged_images_refuse_or_keep_every_acknowledged_write() {
    let dir = tempfile::tempdir().unwrap();
    let (base, layout) = base_image(dir.path());
    for case in cases() {
        let mut bytes = base.clone();
        (case.mutate)(&mut bytes, &layout);
        let ox: PathBuf = dir.path().join(format!("{}.ox.qcow2", case.name));
        let qe: PathBuf = dir.path().join(format!("{}.qemu.qcow2", case.name));
        std::fs::write(&ox, &bytes).unwrap();
        std::fs::write(&qe, &bytes).unwrap();

        let o = oxcow_session(&ox);
        let mut must_read = o.acked.clone();
        if case.keeps_cluster2 {
            must_read.push(KEPT);
        }
        let o_lost = lost(&ox, &must_read);
        let q_acked = qemu_session(&qe);
        let mut q_read = q_acked.clone();
        if case.keeps_cluster2 {
            q_read.push(KEPT);
        }
        let q_lost = lost(&qe, &q_read);
        eprintln!(
            "{:32} oxcow: {} of {} writes acknowledged, {} lost, corrupt bit {}; qemu-io: {} acknowledged, {} lost, corrupt bit {}",
            case.name,
            o.acked.len(),
            WORKLOAD.len(),
            o_lost.len(),
            qemu_says_corrupt(&ox),
            q_acked.len(),
            q_lost.len(),
            qemu_says_corrupt(&qe),
        );
        assert!(o_lost.is_empty(), "{}: acknowledged writes lost: {o_lost:x?} ({:?})", case.name, o.refusals);
        match case.expect {
            Expect::Refuses => {
                assert!(!o.refusals.is_empty(), "{}: every write was accepted", case.name);
                assert!(qemu_says_corrupt(&ox), "{}: refused without the corrupt bit: {:?}", case.name, o.refusals);
            }
            Expect::Accepts => {
                assert!(o.refusals.is_empty(), "{}: refused: {:?}", case.name, o.refusals);
            }
        }
        // Whatever happened, QEMU still opens what oxcow left.
        let (code, out, err) = run("qemu-img", &["info", "-U", ox.to_str().unwrap()]);
        assert_eq!(code, 0, "{}: {out}{err}", case.name);
    }
}

/// A base image with one snapshot: guest cluster 0 holds 0x11 in snapshot
/// "s1" and 0x22 in the active state.
fn snapshot_image(dir: &Path) -> Vec<u8> {
    let p = dir.join("snap-base.qcow2");
    let s = p.to_str().unwrap();
    support::ok("qemu-img", &["create", "-q", "-f", "qcow2", s, "4M"]);
    support::ok("qemu-io", &["-f", "qcow2", "-c", "write -P 0x11 0 64k", s]);
    support::ok("qemu-img", &["snapshot", "-c", "s1", s]);
    support::ok("qemu-io", &["-f", "qcow2", "-c", "write -P 0x22 0 64k", s]);
    std::fs::read(&p).unwrap()
}

/// Field offsets of the first snapshot table entry.
fn snapshot_entry(b: &[u8]) -> u64 {
    get64(b, 64)
}
const SN_L1_OFFSET: u64 = 0;
const SN_L1_SIZE: u64 = 8;
const SN_DISK_SIZE: u64 = 40 + 8;

#[derive(Debug, Clone, Copy, PartialEq)]
enum SnapOp {
    Apply,
    Delete,
    Create,
}

struct SnapCase {
    name: &'static str,
    mutate: fn(&mut Vec<u8>),
    /// Operations oxcow must refuse (the others must succeed).
    refused: &'static [SnapOp],
    /// Read-only views of the snapshot (`io -l`, `convert -l`) are
    /// refused too: what they follow (the L1 table, the disk size) lies.
    view_refused: bool,
}

const ALL_OPS: &[SnapOp] = &[SnapOp::Apply, SnapOp::Delete, SnapOp::Create];

fn set_sn64(b: &mut [u8], field: u64, v: u64) {
    let e = snapshot_entry(b);
    put64(b, e + field, v);
}

fn snap_cases() -> Vec<SnapCase> {
    vec![
        SnapCase {
            name: "snapshot_l1_unaligned",
            view_refused: true,
            mutate: |b| {
                let v = get64(b, snapshot_entry(b)) + 0x200;
                set_sn64(b, SN_L1_OFFSET, v)
            },
            refused: ALL_OPS,
        },
        SnapCase {
            name: "snapshot_l1_past_eof",
            view_refused: true,
            mutate: |b| set_sn64(b, SN_L1_OFFSET, 0x1000_0000),
            refused: ALL_OPS,
        },
        SnapCase {
            name: "snapshot_l1_on_header",
            view_refused: true,
            mutate: |b| set_sn64(b, SN_L1_OFFSET, 0),
            refused: ALL_OPS,
        },
        SnapCase {
            name: "snapshot_l1_on_active_l1",
            view_refused: true,
            mutate: |b| {
                let l1 = get64(b, 40);
                set_sn64(b, SN_L1_OFFSET, l1)
            },
            refused: ALL_OPS,
        },
        SnapCase {
            name: "snapshot_l1_on_refcount_table",
            view_refused: true,
            mutate: |b| {
                let rt = get64(b, 48);
                set_sn64(b, SN_L1_OFFSET, rt)
            },
            refused: ALL_OPS,
        },
        SnapCase {
            name: "snapshot_l1_size_past_eof",
            view_refused: true,
            mutate: |b| {
                let e = snapshot_entry(b);
                b[(e + SN_L1_SIZE) as usize..(e + SN_L1_SIZE + 4) as usize]
                    .copy_from_slice(&0x10_0000u32.to_be_bytes());
            },
            refused: ALL_OPS,
        },
        SnapCase {
            name: "snapshot_l2_past_eof",
            view_refused: false,
            mutate: |b| {
                let l1 = get64(b, snapshot_entry(b));
                put64(b, l1, 0x1_0000_0000);
            },
            refused: &[SnapOp::Apply, SnapOp::Delete],
        },
        SnapCase {
            name: "snapshot_l2_on_refcount_block",
            view_refused: false,
            mutate: |b| {
                let l1 = get64(b, snapshot_entry(b));
                let rb = get64(b, get64(b, 48));
                put64(b, l1, rb);
            },
            refused: &[SnapOp::Apply, SnapOp::Delete],
        },
        // The three disk sizes of the issue: above 2 PiB, absurd, odd.
        SnapCase {
            name: "snapshot_disk_size_above_2pib",
            view_refused: true,
            mutate: |b| set_sn64(b, SN_DISK_SIZE, (2 << 50) + 512),
            refused: &[SnapOp::Apply],
        },
        SnapCase {
            name: "snapshot_disk_size_absurd",
            view_refused: true,
            mutate: |b| set_sn64(b, SN_DISK_SIZE, 0x1a00_0000_0080_0000),
            refused: &[SnapOp::Apply],
        },
        SnapCase {
            name: "snapshot_disk_size_odd",
            view_refused: true,
            mutate: |b| set_sn64(b, SN_DISK_SIZE, (4 << 20) + 256),
            refused: &[SnapOp::Apply],
        },
        // At the limit is a size (QEMU applies it too).
        SnapCase {
            name: "snapshot_disk_size_2pib",
            view_refused: false,
            mutate: |b| set_sn64(b, SN_DISK_SIZE, 2 << 50),
            refused: &[],
        },
    ]
}

fn oxcow_snapshot_op(p: &Path, op: SnapOp) -> oxcow::Result<()> {
    let opts = OpenOptions::default().format(Some(Format::Qcow2)).write(true).no_backing(true);
    let img = oxcow::open(p, &opts)?;
    let q = img.qcow2().unwrap();
    let r = match op {
        SnapOp::Apply => q.snapshot_apply("s1"),
        SnapOp::Delete => q.snapshot_delete("1"),
        SnapOp::Create => q.snapshot_create("s2").map(|_| ()),
    };
    img.close()?;
    r
}

fn qemu_snapshot_op(p: &Path, op: SnapOp) -> i32 {
    let flag = match op {
        SnapOp::Apply => ["-a", "s1"],
        SnapOp::Delete => ["-d", "s1"],
        SnapOp::Create => ["-c", "s2"],
    };
    run("qemu-img", &["snapshot", flag[0], flag[1], p.to_str().unwrap()]).0
}

#[test]
fn lying_snapshot_entries_are_refused_before_anything_changes() {
    let dir = tempfile::tempdir().unwrap();
    let base = snapshot_image(dir.path());
    for case in snap_cases() {
        let mut bytes = base.clone();
        (case.mutate)(&mut bytes);
        let view = dir.path().join(format!("{}.view.qcow2", case.name));
        std::fs::write(&view, &bytes).unwrap();
        let img = oxcow::open(&view, &OpenOptions::read_only().no_backing(true)).unwrap();
        let v = img.qcow2().unwrap().snapshot_device("s1");
        assert_eq!(v.is_err(), case.view_refused, "{}: snapshot view: {:?}", case.name, v.err());
        for &op in ALL_OPS {
            let ox = dir.path().join(format!("{}-{op:?}.ox.qcow2", case.name));
            let qe = dir.path().join(format!("{}-{op:?}.qemu.qcow2", case.name));
            let qe_before = dir.path().join(format!("{}-{op:?}.before.qcow2", case.name));
            std::fs::write(&ox, &bytes).unwrap();
            std::fs::write(&qe, &bytes).unwrap();
            std::fs::write(&qe_before, &bytes).unwrap();
            let r = oxcow_snapshot_op(&ox, op);
            let q_code = qemu_snapshot_op(&qe, op);
            let after = std::fs::read(&ox).unwrap();
            let q_after = std::fs::read(&qe).unwrap();
            eprintln!(
                "{:32} {op:?}: oxcow {} ({}); qemu-img exit {q_code} ({})",
                case.name,
                match &r {
                    Ok(()) => "done".to_string(),
                    Err(e) => format!("refused: {e}"),
                },
                if after == bytes { "unchanged" } else { "changed" },
                if q_after == bytes { "unchanged" } else { "changed" },
            );
            if case.refused.contains(&op) {
                let e = r.expect_err(case.name);
                assert!(!e.to_string().is_empty());
                assert!(after == bytes, "{} {op:?}: refused but the image changed", case.name);
            } else {
                r.unwrap_or_else(|e| panic!("{} {op:?}: {e}", case.name));
                // No corruption beyond what the mutation made.
                assert!(
                    qemu_corruptions(&ox) <= qemu_corruptions(&qe_before),
                    "{} {op:?}: the operation added corruption",
                    case.name
                );
                if op == SnapOp::Apply {
                    assert!(lost(&ox, &[(0, CS, 0x11)]).is_empty(), "{}: snapshot data", case.name);
                }
            }
        }
    }
}

#[test]
fn repair_rebuilds_a_refcount_block_lying_on_the_l1_table() {
    use oxcow::qcow2::Repair;
    let dir = tempfile::tempdir().unwrap();
    let (mut bytes, l) = base_image(dir.path());
    put64(&mut bytes, l.rt, l.l1);
    let p = dir.path().join("rb-on-l1.qcow2");
    std::fs::write(&p, &bytes).unwrap();
    // The same count of corruptions as qemu-img check (which also names
    // the shared block).
    let img = oxcow::open(&p, &OpenOptions::default().format(Some(Format::Qcow2)).no_backing(true)).unwrap();
    let r = img.qcow2().unwrap().check(Repair::None).unwrap();
    drop(img);
    assert_eq!(r.corruptions, qemu_corruptions(&p), "{:?}", r.messages);
    assert!(r.messages.iter().any(|m| m == "ERROR refcount block 0 refcount=2"), "{:?}", r.messages);
    // Repairing in place would write refcounts over the L1 table; the
    // structures are rebuilt instead and every guest cluster survives.
    let opts = OpenOptions::default().format(Some(Format::Qcow2)).write(true).repair(true).no_backing(true);
    let img = oxcow::open(&p, &opts).unwrap();
    let r = img.qcow2().unwrap().check(Repair::All).unwrap();
    img.close().unwrap();
    drop(img);
    assert_eq!(r.corruptions, 0, "{:?}", r.messages);
    assert_eq!(qemu_corruptions(&p), 0);
    let data: Vec<_> = (0..4).map(|i| (i * CS, CS, 0x10 + i as u8)).collect();
    assert!(lost(&p, &data).is_empty());
}

#[test]
fn discard_through_an_entry_on_metadata_is_refused() {
    // Freeing the "data" would free the L1 table's cluster for the next
    // allocation; zeroing with unmap alike.
    let dir = tempfile::tempdir().unwrap();
    let (mut bytes, l) = base_image(dir.path());
    put64(&mut bytes, l.l2 + 3 * 8, COPIED | l.l1);
    for op in ["discard", "zero"] {
        let p = dir.path().join(format!("{op}.qcow2"));
        std::fs::write(&p, &bytes).unwrap();
        let opts = OpenOptions::default().format(Some(Format::Qcow2)).write(true);
        let img = oxcow::open(&p, &opts).unwrap();
        let dev = img.device();
        let r = match op {
            "discard" => dev.discard(3 * CS, CS),
            _ => dev.write_zeroes(3 * CS, CS, true),
        };
        let e = r.expect_err(op);
        assert!(e.is_corrupt(), "{op}: {e}");
        assert!(dev.write_at(&[7u8; 512], 1 << 20).is_err(), "{op}: writes refused after");
        let _ = img.close();
        drop(img);
        assert!(qemu_says_corrupt(&p), "{op}");
        let data: Vec<_> = (0..3).map(|i| (i * CS, CS, 0x10 + i as u8)).collect();
        assert!(lost(&p, &data).is_empty(), "{op}: the L1 table was damaged");
    }
}

#[test]
fn subcluster_entries_breaking_the_bitmap_rules_are_corrupt_not_data() {
    // Extended L2 entries the spec gives no meaning: a subcluster both
    // allocated and zero, allocated subclusters without a host cluster,
    // a compressed cluster with a bitmap. Reading one used to return the
    // host cluster's bytes (or zeros); QEMU refuses them as corrupt.
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("ext.qcow2");
    let s = p.to_str().unwrap();
    support::ok("qemu-img", &["create", "-q", "-f", "qcow2", "-o", "extended_l2=on", s, "1M"]);
    support::ok("qemu-io", &["-f", "qcow2", "-c", "write -P 0x33 64k 64k", s]);
    let clean = std::fs::read(&p).unwrap();
    let l1 = get64(&clean, 40);
    let l2 = get64(&clean, l1) & OFFSET_MASK;
    let host = get64(&clean, l2 + 16) & OFFSET_MASK;
    let cases: [(&str, u64, u64); 4] = [
        ("allocated and zero", COPIED | host, 0x0000_0001_ffff_ffff),
        ("allocated without a host cluster", 0, 0x0000_0000_0000_0001),
        ("allocated and zero without a host cluster", 0, 0x0000_0001_0000_0001),
        ("compressed with a bitmap", (1 << 62) | host, 0x0000_0000_0000_0001),
    ];
    for (what, word, bitmap) in cases {
        let mut b = clean.clone();
        put64(&mut b, l2 + 16, word);
        put64(&mut b, l2 + 24, bitmap);
        std::fs::write(&p, &b).unwrap();
        let (_, out, _) = run("qemu-io", &["-f", "qcow2", "-r", "-c", "read 64k 4k", s]);
        assert!(out.contains("read failed"), "{what}: QEMU reads it: {out}");
        let opts = OpenOptions::default().format(Some(Format::Qcow2)).write(true);
        let img = oxcow::open(&p, &opts).unwrap();
        let dev = img.device();
        let mut buf = vec![0u8; 4096];
        let e = dev.read_at(&mut buf, 64 * K).expect_err(what);
        assert!(e.is_corrupt(), "{what}: {e}");
        let e = dev.write_at(&[7u8; 4096], 64 * K).expect_err(what);
        assert!(e.is_corrupt(), "{what}: {e}");
        assert!(dev.write_at(&[7u8; 512], 512 * K).is_err(), "{what}: writes refused after");
        let _ = img.close();
        drop(img);
        assert!(qemu_says_corrupt(&p), "{what}: the corrupt bit is not set");
    }
}
