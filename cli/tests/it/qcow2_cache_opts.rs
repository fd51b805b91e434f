//! qcow2 cache options (`l2-cache-size`, `l2-cache-entry-size`,
//! `refcount-cache-size`, `cache-size`, `cache-clean-interval`) through
//! `--image-opts` and qemu-io's `open -o`: taken where qemu-img and qemu-io
//! take them, refused with QEMU's messages for the values QEMU refuses
//! (each compared with what qemu-img says for the same option string), and
//! a tiny cache of small slices keeps every byte and a clean image.

use crate::support::{assert_patterns, ok, oxcow, qemu_img, qemu_write, tmp};

/// QEMU's message for an option string, without its program prefix and
/// the "Could not open" part, which name the image differently.
fn cause(stderr: &str) -> String {
    let first = stderr.lines().next().unwrap_or_default();
    first.rsplit("': ").next().unwrap_or(first).to_string()
}

#[test]
fn bad_cache_options_are_refused_with_qemus_messages() {
    let d = tmp();
    ok(d.path(), "qemu-img", &["create", "-q", "-f", "qcow2", "a.qcow2", "1G"]);
    for bad in [
        "l2-cache-size=lots",
        "l2-cache-size=-1",
        "cache-size=1M,l2-cache-size=2M",
        "cache-size=1M,refcount-cache-size=2M",
        "cache-size=1M,l2-cache-size=512K,refcount-cache-size=256K",
        "l2-cache-entry-size=3000",
        "l2-cache-entry-size=256",
        "l2-cache-entry-size=128K",
        "cache-clean-interval=abc",
        "cache-clean-interval=-1",
        "cache-clean-interval=4294967296",
    ] {
        let spec = format!("driver=qcow2,file.filename=a.qcow2,{bad}");
        let q = qemu_img(d.path(), &["info", "--image-opts", &spec]);
        assert_ne!(q.code, 0, "qemu-img took {bad}");
        let o = oxcow(d.path(), &["info", "--image-opts", &spec]);
        assert_ne!(o.code, 0, "oxcow took {bad}");
        assert_eq!(cause(&o.stderr), cause(&q.stderr), "{bad}: oxcow said {}", o.stderr);
    }
    // Not a raw image's option, in either tool.
    let spec = "driver=raw,file.filename=a.qcow2,l2-cache-size=1M";
    let o = oxcow(d.path(), &["info", "--image-opts", spec]);
    assert!(o.stderr.contains("Block format 'raw' does not support the option 'l2-cache-size'"), "{}", o.stderr);
}

#[test]
fn a_tiny_cache_of_small_slices_keeps_every_byte() {
    let d = tmp();
    ok(d.path(), "qemu-img", &["create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", "a.qcow2", "64M"]);
    // Data spread over every L2 table (one per 2 MiB of guest).
    let pats: Vec<(u8, u64, u64)> = (0..32u64).map(|i| ((i % 200 + 1) as u8, i * (2 << 20) + i * 4096, 8192)).collect();
    qemu_write(d.path(), "a.qcow2", &pats[..16], &[]);
    // oxcow writes the rest through a cache of two 512-byte slices.
    let spec = "driver=qcow2,file.filename=a.qcow2,l2-cache-size=1024,l2-cache-entry-size=512,refcount-cache-size=0";
    let cmds: Vec<String> = pats[16..].iter().map(|(p, o, l)| format!("write -q -P {p} {o} {l}")).collect();
    let mut args = vec!["io", "--image-opts"];
    for c in &cmds {
        args.push("-c");
        args.push(c);
    }
    args.push(spec);
    ok(d.path(), crate::support::OXCOW, &args);
    ok(d.path(), "qemu-img", &["check", "-q", "a.qcow2"]);
    assert_patterns(d.path(), "a.qcow2", &pats, &[]);
    assert_patterns(d.path(), spec, &pats, &["--image-opts"]);
    // qemu-io's `open -o` takes the same keys.
    let open = "open -o l2-cache-size=1024,l2-cache-entry-size=512,cache-clean-interval=1 a.qcow2";
    let read = format!("read -q -P {} {} {}", pats[31].0, pats[31].1, pats[31].2);
    ok(d.path(), crate::support::OXCOW, &["io", "-c", open, "-c", &read]);
}
