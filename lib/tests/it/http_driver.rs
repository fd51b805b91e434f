//! The HTTP(S) storage driver against an in-test web server: range reads,
//! a qcow2 overlay on an `http://` base with copy-on-read (each base
//! cluster fetched once) and stream, and the failures a web server can
//! cause: no range support, transient errors, missing objects, refusals.

use crate::support::http_server::{HttpServer, Mode};
use crate::support::remote::patterned_base;
use oxcow::qcow2::CreateOptions;
use oxcow::remote::{HttpOptions, HttpStorage, RemoteOptions};
use oxcow::storage::Storage;
use oxcow::tools::stream::{stream, StreamOptions};
use oxcow::OpenOptions;
use std::path::Path;
use std::time::Duration;

const SIZE: u64 = 8 << 20;
const CLUSTER: u64 = 64 << 10;

fn quick(retries: u32) -> HttpOptions {
    HttpOptions { retries, timeout: Duration::from_secs(20), ..HttpOptions::default() }
}

#[test]
fn reads_match_the_served_file() {
    let dir = tempfile::tempdir().unwrap();
    let (base, content) = patterned_base(dir.path(), "base.img", SIZE, 3);
    let srv = HttpServer::start(base, Mode::Ranges);
    let st = HttpStorage::open(&srv.url(), quick(0)).unwrap();
    assert_eq!(st.len().unwrap(), SIZE);
    let mut rng = crate::support::Rng(77);
    for _ in 0..200 {
        let len = [1usize, 512, 4096, 70_000, 300_000, 5 << 20][rng.below(6) as usize];
        let off = rng.below(SIZE - len as u64);
        let mut buf = vec![0xa5u8; len];
        st.read_at(&mut buf, off).unwrap();
        assert!(buf == content[off as usize..off as usize + len], "read of {len} at {off}");
    }
    // Past the end reads as zeros, as a file's would.
    let mut tail = vec![0xa5u8; 8192];
    st.read_at(&mut tail, SIZE - 4096).unwrap();
    assert!(tail[..4096] == content[SIZE as usize - 4096..] && tail[4096..].iter().all(|b| *b == 0));
    assert!(st.write_at(b"x", 0).is_err(), "remote storage took a write");
    let s = st.stats();
    assert_eq!(s.requests, srv.ranges.lock().unwrap().len() as u64, "counted requests differ from the server's");
}

fn create_overlay(path: &Path, backing: &str) {
    let st = oxcow::create_file(path).unwrap();
    let opts = CreateOptions::new(SIZE).backing_file(backing.to_string()).backing_format(Some("raw".into()));
    oxcow::qcow2::create(st, None, &opts).unwrap();
}

#[test]
fn overlay_on_http_base_fetches_each_cluster_once_with_copy_on_read() {
    let dir = tempfile::tempdir().unwrap();
    let (base, content) = patterned_base(dir.path(), "base.img", SIZE, 5);
    let srv = HttpServer::start(base, Mode::Ranges);
    // Windows of one cluster: each fetch is exactly one base cluster.
    oxcow::remote::configure(
        &srv.url(),
        RemoteOptions { http: HttpOptions { readahead: CLUSTER, ..quick(2) }, ..Default::default() },
    );
    let overlay = dir.path().join("o.qcow2");
    create_overlay(&overlay, &srv.url());
    let opts = OpenOptions::default().write(true).allow_network_backing(true).copy_on_read(true);
    let img = oxcow::open(&overlay, &opts).unwrap();
    let mut rng = crate::support::Rng(9);
    let reads: Vec<(u64, usize)> = (0..300)
        .map(|_| {
            let len = [512usize, 4096, 65536, 100_000][rng.below(4) as usize];
            (rng.below(SIZE - len as u64), len)
        })
        .collect();
    for _ in 0..2 {
        for &(off, len) in &reads {
            let mut buf = vec![0u8; len];
            img.device().read_at(&mut buf, off).unwrap();
            assert!(buf == content[off as usize..off as usize + len], "read of {len} at {off}");
        }
    }
    let ranges = srv.ranges.lock().unwrap().clone();
    let mut seen = std::collections::HashSet::new();
    for &(a, b) in &ranges {
        if (a, b) == (0, 0) {
            continue; // the length probe at open
        }
        // Copy-on-read asks for whole clusters, several at once when a
        // read spans them.
        assert!(a % CLUSTER == 0 && (b + 1) % CLUSTER == 0, "fetch {a}-{b} is not whole clusters");
        for c in (a..=b).step_by(CLUSTER as usize) {
            assert!(seen.insert(c), "cluster at {c} fetched twice");
        }
    }
    let fetched = ranges.len();
    // Stream pulls exactly the clusters never read, then needs no base.
    stream(img.qcow2().unwrap(), &StreamOptions::default(), &mut |_| {}).unwrap();
    let after = srv.ranges.lock().unwrap().len();
    assert!(after - fetched <= (SIZE / CLUSTER) as usize - seen.len(), "stream fetched copied clusters again");
    img.close().unwrap();
    drop(img);
    drop(srv);
    let img = oxcow::open(&overlay, &OpenOptions::read_only()).unwrap();
    assert!(img.backing_name().is_none(), "streamed image still names its base");
    let mut all = vec![0u8; SIZE as usize];
    img.device().read_at(&mut all, 0).unwrap();
    assert!(all == content);
}

#[test]
fn http_backing_needs_the_network_permission() {
    let dir = tempfile::tempdir().unwrap();
    let (base, _) = patterned_base(dir.path(), "base.img", SIZE, 1);
    let srv = HttpServer::start(base, Mode::Ranges);
    let overlay = dir.path().join("o.qcow2");
    create_overlay(&overlay, &srv.url());
    let e = oxcow::open(&overlay, &OpenOptions::read_only()).err().unwrap();
    assert!(e.to_string().contains("refusing"), "{e}");
    assert_eq!(srv.requests.load(std::sync::atomic::Ordering::SeqCst), 0, "refused name was contacted");
}

#[test]
fn server_ignoring_ranges_is_refused_in_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let (base, _) = patterned_base(dir.path(), "base.img", 1 << 20, 1);
    let srv = HttpServer::start(base, Mode::IgnoreRanges);
    let e = HttpStorage::open(&srv.url(), quick(3)).unwrap_err().to_string();
    assert!(e.contains("does not support range requests (answered 200 instead of 206)"), "{e}");
    assert!(!e.contains('\n'));
}

#[test]
fn transient_server_errors_are_retried_within_the_bound() {
    let dir = tempfile::tempdir().unwrap();
    let (base, content) = patterned_base(dir.path(), "base.img", 1 << 20, 2);
    let srv = HttpServer::start(base.clone(), Mode::FailFirst(2));
    let st = HttpStorage::open(&srv.url(), quick(2)).unwrap();
    let mut buf = vec![0u8; 4096];
    st.read_at(&mut buf, 8192).unwrap();
    assert!(buf == content[8192..8192 + 4096]);
    assert_eq!(st.stats().retries, 2);
    // Always failing: exactly retries + 1 attempts, then an error.
    let srv = HttpServer::start(base, Mode::Status(503));
    let e = HttpStorage::open(&srv.url(), quick(2)).unwrap_err().to_string();
    assert!(e.contains("HTTP 503") && e.contains("after 3 attempts"), "{e}");
    assert_eq!(srv.requests.load(std::sync::atomic::Ordering::SeqCst), 3);
}

#[test]
fn missing_object_and_refused_access_fail_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let (base, _) = patterned_base(dir.path(), "base.img", 1 << 20, 2);
    for (status, words) in [(404, "no such object"), (403, "access denied"), (401, "access denied")] {
        let srv = HttpServer::start(base.clone(), Mode::Status(status));
        let e = HttpStorage::open(&srv.url(), quick(4)).unwrap_err().to_string();
        assert!(e.contains(words) && e.contains(&format!("HTTP {status}")), "{e}");
        assert_eq!(srv.requests.load(std::sync::atomic::Ordering::SeqCst), 1, "{status} was retried");
    }
}
