//! Zero writes that cover part of a (sub)cluster, by oxcow and by qemu-io
//! on copies of the same overlay: the same content and the same map.

use crate::support::*;
use std::path::Path;

/// `qemu-img map --output=json` without host offsets.
fn map_shape(p: &Path) -> Vec<String> {
    let out = ok("qemu-img", &["map", "--output=json", s(p)]);
    out.lines()
        .map(|l| l.split(", \"offset\"").next().unwrap_or(l).trim_end_matches(['}', ',', ']']).to_string())
        .collect()
}

/// iotests 154, 179, 271: `write -z` into part of an unallocated cluster
/// of an overlay whose backing file reads as zeros around it makes the
/// whole (sub)cluster a zero one, as QEMU does; where the rest of it
/// shows data (here or below) the zeros are written as data. A range
/// ending at an unaligned end of disk counts as aligned there. One that
/// covers part of a compressed cluster is written as data (iotest 271).
#[test]
fn partial_zero_write_on_overlay_makes_zero_clusters_as_qemu() {
    let size = (1 << 20) - 4096;
    let ops: &[(u64, u64)] = &[
        (0, 2 << 10),
        (130 << 10, 2 << 10),
        (200 << 10, 2 << 10),
        (250 << 10, 70 << 10),
        (514 << 10, 2 << 10),
        (700 << 10, 1 << 10),
        (701 << 10, 1 << 10),
        (800 << 10, 96 << 10),
        (1000 << 10, size - (1000 << 10)),
    ];
    for extended in [false, true] {
        let d = Dir::new();
        let (base, ox, qm) = (d.p("b.qcow2"), d.p("ox.qcow2"), d.p("qm.qcow2"));
        ok("qemu-img", &["create", "-q", "-f", "qcow2", "-o", "cluster_size=512", s(&base), "1M"]);
        qio(&base, &["write -P 0x11 128k 4k", "write -P 0x11 322k 1k"]);
        let o = format!("extended_l2={},backing_file=b.qcow2,backing_fmt=qcow2", if extended { "on" } else { "off" });
        ok("qemu-img", &["create", "-q", "-f", "qcow2", "-o", &o, s(&ox), &size.to_string()]);
        qio(&ox, &["write -P 0x22 512k 8k", "write -c -P 0x33 768k 64k", "write -c -P 0x33 832k 64k"]);
        copy(&ox, &qm);
        {
            let img = open_rw(&ox);
            for &(off, len) in ops {
                img.device().write_zeroes(off, len, false).unwrap();
            }
            img.close().unwrap();
        }
        let cmds: Vec<String> = ops.iter().map(|(o, l)| format!("write -z {o} {l}")).collect();
        qio(&qm, &cmds.iter().map(String::as_str).collect::<Vec<_>>());
        check_clean(&ox);
        same(&ox, &qm);
        assert_eq!(map_shape(&ox), map_shape(&qm), "extended_l2={extended}");
    }
}

/// The torture test's failure with the first version of the above: on a
/// v2 image (no zero flag) over a raw backing file, a zero write ending
/// at an unaligned end of disk was rounded up to the cluster boundary and
/// its zero-data fallback then wrote past the disk's end and failed. It
/// must zero up to the end, as qemu-io does, and nothing past it. The
/// same on v3 and with a raw data file, where the rounded end marks zero
/// clusters instead.
#[test]
fn zero_write_to_unaligned_end_of_disk_stays_inside_the_disk() {
    let size: u64 = (1 << 20) - 4096 + 512;
    for (compat, extra) in [("0.10", ""), ("1.1", ""), ("1.1", ",extended_l2=on")] {
        let d = Dir::new();
        let (base, ox, qm) = (d.p("b.raw"), d.p("ox.qcow2"), d.p("qm.qcow2"));
        std::fs::write(&base, vec![0x11u8; 1 << 20]).unwrap();
        let o = format!("compat={compat},backing_file=b.raw,backing_fmt=raw{extra}");
        ok("qemu-img", &["create", "-q", "-f", "qcow2", "-o", &o, s(&ox), &size.to_string()]);
        copy(&ox, &qm);
        let ops = [(size - 700, 700), (900 << 10, size - (900 << 10))];
        {
            let img = open_rw(&ox);
            for &(off, len) in &ops {
                img.device().write_zeroes(off, len, false).unwrap_or_else(|e| panic!("compat={compat}{extra}: {e}"));
            }
            img.close().unwrap();
        }
        let cmds: Vec<String> = ops.iter().map(|(o, l)| format!("write -z {o} {l}")).collect();
        qio(&qm, &cmds.iter().map(String::as_str).collect::<Vec<_>>());
        check_clean(&ox);
        same(&ox, &qm);
        let info = ok("qemu-img", &["info", "--output=json", s(&ox)]);
        assert!(info.contains(&format!("\"virtual-size\": {size}")), "compat={compat}{extra}: {info}");
    }
}
