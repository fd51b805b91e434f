//! The S3 driver against a real distributed store: a three-node Garage
//! cluster with replication factor 3 (support/garage.rs). A qcow2 base
//! uploaded in parts, an overlay reading it through copy-on-read with each
//! base cluster fetched at most once, reads that go on while a node dies,
//! and one-line errors for a wrong key and a missing object.

use crate::support::garage::{Garage, BUCKET, KEY_ID};
use crate::support::{qio, Rng};
use oxcow::qcow2::CreateOptions;
use oxcow::remote::{s3, stats_for};
use oxcow::storage::Storage;
use oxcow::OpenOptions;
use std::path::Path;

/// A 16 MiB qcow2 base (64 KiB clusters) with 12 MiB of patterned data in
/// runs, uploaded to `name` in 5 MiB parts; its bytes as a guest sees them.
fn upload_base(g: &Garage, dir: &Path, name: &str) -> Vec<u8> {
    let base = dir.join("base.qcow2");
    crate::support::ok("qemu-img", &["create", "-q", "-f", "qcow2", base.to_str().unwrap(), "16M"]);
    let mut cmds = Vec::new();
    for i in 0..12u64 {
        cmds.push(format!("write -P {} {} 1M", i + 1, i * (1 << 20) + (i % 3) * (1 << 20) / 3));
    }
    qio(&base, &cmds.iter().map(String::as_str).collect::<Vec<_>>());
    let o = g.options_at(0);
    let bytes = std::fs::read(&base).unwrap();
    let n = s3::upload(name, &o.s3, &o.http, &mut &bytes[..], 5 << 20).unwrap();
    assert_eq!(n, bytes.len() as u64);
    let img = oxcow::open(&base, &OpenOptions::default()).unwrap();
    let mut data = vec![0u8; 16 << 20];
    img.device().read_at(&mut data, 0).unwrap();
    data
}

#[test]
fn overlay_on_a_garage_base_reads_through_copy_on_read_fetching_each_cluster_once() {
    let Some(g) = Garage::start() else { return };
    let dir = tempfile::tempdir().unwrap();
    let name = format!("s3://{BUCKET}/cor/base.qcow2");
    let data = upload_base(&g, dir.path(), &name);
    let mut o = g.options_at(0);
    // One cluster per window: the count below is then per base cluster.
    o.http.readahead = 64 << 10;
    oxcow::remote::configure(&name, o);
    let ov = dir.path().join("ov.qcow2");
    let c = CreateOptions::new(16 << 20).backing_file(name.clone()).backing_format(Some("qcow2".into()));
    oxcow::qcow2::create(oxcow::create_file(&ov).unwrap(), None, &c).unwrap();
    let img =
        oxcow::open(&ov, &OpenOptions::default().write(true).allow_network_backing(true).copy_on_read(true)).unwrap();
    let at_open = stats_for(&name).requests;
    assert!(at_open > 0, "the base's header was read from the store");
    let mut rng = Rng::new(11);
    let reads: Vec<(u64, usize)> = (0..300)
        .map(|_| {
            let len = [512usize, 4096, 65536, 300_000][rng.below(4) as usize];
            (rng.below((16 << 20) - len as u64), len)
        })
        .collect();
    let clusters = (16u64 << 20) >> 16;
    for pass in 0..2 {
        let before = stats_for(&name).requests;
        for &(off, len) in &reads {
            let mut buf = vec![0u8; len];
            img.device().read_at(&mut buf, off).unwrap();
            assert!(buf == data[off as usize..off as usize + len], "pass {pass}: read of {len} at {off}");
        }
        let gets = stats_for(&name).requests - before;
        eprintln!("pass {pass}: {gets} GETs, {} bytes so far, {} at open", stats_for(&name).bytes, at_open);
        if pass == 0 {
            // Data clusters and the base's own L2 tables, each at most once.
            assert!(gets > 0 && gets <= clusters, "{gets} GETs for {clusters} base clusters");
        } else {
            assert_eq!(gets, 0, "re-reads went to the store");
        }
    }
    // Everything read is now in the overlay: it reads the same without
    // the store, where it was read.
    img.close().unwrap();
    drop(img);
    let local = oxcow::open(&ov, &OpenOptions::default().no_backing(true)).unwrap();
    for &(off, len) in reads.iter().take(50) {
        let mut buf = vec![0u8; len];
        local.device().read_at(&mut buf, off).unwrap();
        assert!(buf == data[off as usize..off as usize + len], "overlay copy of {len} at {off}");
    }
    // QEMU has no S3 driver: it checks the overlay without its backing.
    let spec =
        format!(r#"json:{{"driver":"qcow2","file":{{"driver":"file","filename":"{}"}},"backing":null}}"#, ov.display());
    crate::support::ok("qemu-img", &["check", &spec]);
}

#[test]
fn reads_go_on_while_a_garage_node_is_killed() {
    let Some(mut g) = Garage::start() else { return };
    let name = format!("s3://{BUCKET}/kill/disk.raw");
    let o = g.options_at(0);
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let data: Vec<u8> = (0..24 << 20)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    s3::upload(&name, &o.s3, &o.http, &mut &data[..], 8 << 20).unwrap();
    let st = oxcow::remote::open_with(&name, &o).unwrap();
    let chunk = 1usize << 20;
    for (i, off) in (0..data.len()).step_by(chunk).enumerate() {
        if i == 6 {
            // Node 2 is not the one the client talks to: two replicas of
            // three remain, a quorum for every read.
            g.kill(2);
        }
        let mut buf = vec![0u8; chunk];
        st.read_at(&mut buf, off as u64).unwrap_or_else(|e| panic!("read at {off} after the kill: {e}"));
        assert!(buf == data[off..off + chunk], "read at {off}");
    }
}

#[test]
fn wrong_key_and_missing_object_fail_in_one_line_against_garage() {
    let Some(g) = Garage::start() else { return };
    let good = g.options_at(0);
    let name = format!("s3://{BUCKET}/err/x");
    s3::upload(&name, &good.s3, &good.http, &mut &b"hello"[..], 5 << 20).unwrap();
    let mut bad = good.clone();
    bad.s3.secret_access_key = Some("f".repeat(64));
    let e = oxcow::remote::open_with(&name, &bad).unwrap_err().to_string();
    assert!(e.contains(&name) && e.contains("access denied") && !e.contains('\n'), "{e}");
    assert!(!e.contains("X-Amz") && !e.contains(KEY_ID), "error shows the signed request: {e}");
    let missing = format!("s3://{BUCKET}/err/nope");
    let e = oxcow::remote::open_with(&missing, &good).unwrap_err().to_string();
    assert!(e.contains(&format!("'{missing}': no such object (HTTP 404)")), "{e}");
    let e = oxcow::remote::open_with("s3://no-such-bucket/x", &good).unwrap_err().to_string();
    assert!(!e.contains('\n') && e.contains("s3://no-such-bucket/x"), "{e}");
}

/// `--prefetch` over `s3://`: the prefetcher copies the whole base into
/// the overlay while nothing else runs; afterwards the served device reads
/// the base's bytes without a request to the store.
#[test]
fn prefetch_copies_a_garage_base_into_the_overlay() {
    let Some(g) = Garage::start() else { return };
    let dir = tempfile::tempdir().unwrap();
    let name = format!("s3://{BUCKET}/prefetch/base.qcow2");
    let data = upload_base(&g, dir.path(), &name);
    oxcow::remote::configure(&name, g.options_at(0));
    let ov = dir.path().join("ov.qcow2");
    let c = CreateOptions::new(16 << 20).backing_file(name.clone()).backing_format(Some("qcow2".into()));
    oxcow::qcow2::create(oxcow::create_file(&ov).unwrap(), None, &c).unwrap();
    let img = oxcow::open(&ov, &OpenOptions::default().write(true).allow_network_backing(true)).unwrap();
    let opts = oxcow::tools::prefetch::PrefetchOptions::default().chunk(1 << 20);
    let (served, pf) = oxcow::tools::prefetch::for_export(&img, opts).unwrap();
    crate::support::process::wait_ready("prefetch to finish", None, || pf.is_done());
    assert_eq!(pf.error(), None);
    let p = pf.stop();
    assert!(p.finished && p.copied > 0, "{p:?}");
    let before = stats_for(&name).requests;
    let mut all = vec![0u8; 16 << 20];
    served.read_at(&mut all, 0).unwrap();
    assert!(all == data, "the prefetched overlay reads differently");
    assert_eq!(stats_for(&name).requests, before, "reads after the prefetch went to the store");
    img.close().unwrap();
}
