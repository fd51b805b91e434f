//! The S3 driver against an in-test S3 endpoint (path-style, presigned
//! requests): multipart upload, reads of the uploaded object, a qcow2
//! overlay on an `s3://` base with copy-on-read, and one-line errors for
//! a wrong access key and a missing object.

use crate::support::s3_server::{S3Server, KEY_ID, SECRET};
use oxcow::qcow2::CreateOptions;
use oxcow::remote::{s3, HttpOptions, RemoteOptions, S3Options};
use oxcow::storage::Storage;
use oxcow::OpenOptions;

fn opts(srv: &S3Server, key_id: &str) -> RemoteOptions {
    RemoteOptions {
        http: HttpOptions { retries: 1, ..HttpOptions::default() },
        s3: S3Options {
            endpoint: Some(srv.endpoint()),
            region: Some("garage".into()),
            access_key_id: Some(key_id.into()),
            secret_access_key: Some(SECRET.into()),
            ..S3Options::default()
        },
    }
}

fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

#[test]
fn multipart_upload_then_ranged_reads() {
    let srv = S3Server::start();
    let o = opts(&srv, KEY_ID);
    // Three full parts and a short last one.
    let data = pattern((15 << 20) + 12345, 7);
    let n = s3::upload("s3://bucket/dir/base.raw", &o.s3, &o.http, &mut &data[..], 5 << 20).unwrap();
    assert_eq!(n, data.len() as u64);
    {
        let st = srv.store.lock().unwrap();
        assert_eq!(st.parts_received, 4);
        assert!(st.objects["bucket/dir/base.raw"] == data, "uploaded object differs");
    }
    let storage = oxcow::remote::open_with("s3://bucket/dir/base.raw", &o).unwrap();
    assert_eq!(storage.len().unwrap(), data.len() as u64);
    for (off, len) in [(0usize, 4096usize), (5 << 20, 9 << 20), (data.len() - 100, 100), (777, 300_000)] {
        let mut buf = vec![0u8; len];
        storage.read_at(&mut buf, off as u64).unwrap();
        assert!(buf == data[off..off + len], "read of {len} at {off}");
    }
}

#[test]
fn overlay_on_s3_base_copy_on_read_fetches_each_cluster_once() {
    let srv = S3Server::start();
    let mut o = opts(&srv, KEY_ID);
    let size = 4usize << 20;
    let data = pattern(size, 9);
    s3::upload("s3://bucket/base.raw", &o.s3, &o.http, &mut &data[..], 5 << 20).unwrap();
    o.http.readahead = 64 << 10;
    oxcow::remote::configure("s3://bucket/base.raw", o);
    let dir = tempfile::tempdir().unwrap();
    let ov = dir.path().join("ov.qcow2");
    let f = oxcow::create_file(&ov).unwrap();
    let c = CreateOptions::new(size as u64)
        .backing_file("s3://bucket/base.raw".to_string())
        .backing_format(Some("raw".into()));
    oxcow::qcow2::create(f, None, &c).unwrap();
    let img =
        oxcow::open(&ov, &OpenOptions::default().write(true).allow_network_backing(true).copy_on_read(true)).unwrap();
    let gets_at_open = srv.store.lock().unwrap().gets;
    let mut rng = crate::support::Rng(5);
    let reads: Vec<(u64, usize)> = (0..200)
        .map(|_| {
            let len = [512usize, 4096, 65536][rng.below(3) as usize];
            (rng.below(size as u64 - len as u64), len)
        })
        .collect();
    for pass in 0..2 {
        for &(off, len) in &reads {
            let mut buf = vec![0u8; len];
            img.device().read_at(&mut buf, off).unwrap();
            assert!(buf == data[off as usize..off as usize + len], "pass {pass}: read of {len} at {off}");
        }
        let gets = srv.store.lock().unwrap().gets - gets_at_open;
        // One-cluster windows, whole clusters copied: at most one GET per
        // base cluster, and none in the second pass.
        assert!(gets <= (size as u64) >> 16, "{gets} GETs for {} clusters", size >> 16);
        if pass == 0 {
            assert!(gets > 0);
        }
    }
}

#[test]
fn wrong_access_key_and_missing_object_fail_in_one_line() {
    let srv = S3Server::start();
    let good = opts(&srv, KEY_ID);
    s3::upload("s3://bucket/x", &good.s3, &good.http, &mut &b"hello"[..], 5 << 20).unwrap();
    let e = oxcow::remote::open_with("s3://bucket/x", &opts(&srv, "GKwrong")).unwrap_err().to_string();
    assert!(e.contains("s3://bucket/x") && e.contains("access denied") && !e.contains('\n'), "{e}");
    assert!(!e.contains("X-Amz"), "error shows a signed URL: {e}");
    let e = oxcow::remote::open_with("s3://bucket/nope", &good).unwrap_err().to_string();
    assert!(e.contains("'s3://bucket/nope': no such object (HTTP 404)"), "{e}");
    // A refused upload is refused at its first request.
    let bad = opts(&srv, "GKwrong");
    let e = s3::upload("s3://bucket/y", &bad.s3, &bad.http, &mut &b"x"[..], 5 << 20).unwrap_err().to_string();
    assert!(e.contains("access denied"), "{e}");
}

#[test]
fn upload_sends_parts_in_parallel_and_assembles_them_in_order() {
    let srv = S3Server::start();
    srv.store.lock().unwrap().part_delay = std::time::Duration::from_millis(150);
    let o = opts(&srv, KEY_ID);
    let data = pattern((40 << 20) + 1, 11);
    let n = s3::upload("s3://bucket/par.raw", &o.s3, &o.http, &mut &data[..], 5 << 20).unwrap();
    assert_eq!(n, data.len() as u64);
    let st = srv.store.lock().unwrap();
    assert_eq!(st.parts_received, 9);
    assert!(st.objects["bucket/par.raw"] == data, "parts assembled out of order");
    assert!(st.max_parts_in_flight >= 2, "parts went one at a time ({})", st.max_parts_in_flight);
    assert!(st.max_parts_in_flight <= o.http.parallel as u64, "{} parts in flight", st.max_parts_in_flight);
}

#[test]
fn a_part_refused_mid_upload_aborts_it_and_leaves_no_object() {
    let srv = S3Server::start();
    srv.store.lock().unwrap().refuse_part = Some(3);
    let o = opts(&srv, KEY_ID);
    let data = pattern(30 << 20, 5);
    let e = s3::upload("s3://bucket/half.raw", &o.s3, &o.http, &mut &data[..], 5 << 20).unwrap_err().to_string();
    assert!(e.contains("access denied") && !e.contains('\n') && !e.contains("X-Amz"), "{e}");
    let st = srv.store.lock().unwrap();
    assert_eq!(st.aborted, 1, "the failed upload was not aborted");
    assert!(!st.objects.contains_key("bucket/half.raw"));
}
