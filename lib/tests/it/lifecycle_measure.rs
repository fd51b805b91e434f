//! measure by oxcow equals `qemu-img measure` over sizes, cluster sizes,
//! refcount widths, options and input images.

use crate::support::*;
use oxcow::tools::measure::{measure, MeasureOptions, Measurement};
use oxcow::{Format, OpenOptions};

/// Parses qemu-img's JSON (flat object of numbers).
fn qemu_measure(args: &[&str]) -> Measurement {
    let mut a = vec!["measure", "--output=json"];
    a.extend_from_slice(args);
    let out = ok("qemu-img", &a);
    let num = |k: &str| -> Option<u64> {
        let i = out.find(&format!("\"{k}\":"))?;
        out[i + k.len() + 3..].trim_start().split(|c: char| !c.is_ascii_digit()).next()?.parse().ok()
    };
    Measurement {
        required: num("required").unwrap(),
        fully_allocated: num("fully-allocated").unwrap(),
        bitmaps: num("bitmaps"),
    }
}

fn opts(fmt: Format, o: &str) -> MeasureOptions {
    let mut m = MeasureOptions::default().format(fmt);
    for kv in o.split(',').filter(|s| !s.is_empty()) {
        let (k, v) = kv.split_once('=').unwrap();
        m.set(k, v).unwrap();
    }
    m
}

#[test]
fn size_only() {
    for size in [0u64, 512, 1000, 1 << 20, 1 << 30, 100 << 30, 3 << 40] {
        for o in [
            "",
            "cluster_size=4k",
            "cluster_size=4k,refcount_bits=1",
            "cluster_size=512,refcount_bits=64",
            "cluster_size=2M,extended_l2=on",
            "compat=0.10",
            "preallocation=full",
            "cluster_size=64k,refcount_bits=8",
        ] {
            let sz = size.to_string();
            let mut a = vec!["-O", "qcow2", "--size", &sz];
            if !o.is_empty() {
                a.extend(["-o", o]);
            }
            let mine = measure(None, Some(size), &opts(Format::Qcow2, o));
            let mut full = vec!["measure", "--output=json"];
            full.extend_from_slice(&a);
            let (code, _, err) = run("qemu-img", &full);
            if code != 0 {
                assert_eq!(err.trim_end(), format!("qemu-img: {}", mine.unwrap_err()));
                continue;
            }
            assert_eq!(mine.unwrap(), qemu_measure(&a), "size {size} -o {o}");
        }
        let sz = size.to_string();
        let q = qemu_measure(&["-O", "raw", "--size", &sz]);
        assert_eq!(measure(None, Some(size), &opts(Format::Raw, "")).unwrap(), q, "raw size {size}");
    }
}

#[test]
fn from_images() {
    let d = Dir::new();
    let q = d.p("in.qcow2");
    make(Maker::Qemu, &q, 10 << 20, 65536, 3, 16, None);
    qio(
        &q,
        &["write -P 1 0 100k", "write -z 1M 64k", "write -P 2 3M 1k", "write -P 3 5000k 300k", "write -z -u 9M 1M"],
    );
    let c = d.p("c.qcow2");
    ok("qemu-img", &["convert", "-c", "-O", "qcow2", s(&q), s(&c)]);
    let top = d.p("top.qcow2");
    make(Maker::Oxcow, &top, 12 << 20, 4096, 3, 16, Some(std::path::Path::new("in.qcow2")));
    qio(&top, &["write -P 9 11M 10k", "write -z 0 4k"]);
    let v2 = d.p("v2.qcow2");
    make(Maker::Oxcow, &v2, 7 << 20, 4096, 2, 16, None);
    qio(&v2, &["write -P 4 4096 9000"]);
    let raw = d.p("in.raw");
    ok("qemu-img", &["convert", "-O", "raw", s(&q), s(&raw)]);
    for input in [&q, &c, &top, &v2, &raw] {
        let img = oxcow::open(input, &OpenOptions::read_only()).unwrap();
        for (fmt, o) in [
            (Format::Qcow2, ""),
            (Format::Qcow2, "cluster_size=4k"),
            (Format::Qcow2, "cluster_size=2M,refcount_bits=1"),
            (Format::Qcow2, "compat=0.10"),
            (Format::Qcow2, "backing_file=x"),
            (Format::Qcow2, "preallocation=falloc"),
            (Format::Qcow2, "extended_l2=on,cluster_size=128k"),
            (Format::Raw, ""),
        ] {
            let mut a = vec!["-O", fmt.name()];
            if !o.is_empty() {
                a.extend(["-o", o]);
            }
            a.push(s(input));
            let want = qemu_measure(&a);
            let got = measure(Some(&img), None, &opts(fmt, o)).unwrap();
            assert_eq!(got, want, "{input:?} -O {} -o {o}", fmt.name());
        }
    }
}

#[test]
fn errors() {
    let o = MeasureOptions::default();
    assert_eq!(measure(None, None, &o).unwrap_err().to_string(), "Either --size N or one filename must be specified.");
    let mut q = MeasureOptions::default().format(Format::Qcow2);
    q.set("cluster_size", "1k").unwrap();
    q.set("extended_l2", "on").unwrap();
    assert_eq!(
        measure(None, Some(1 << 20), &q).unwrap_err().to_string(),
        "Extended L2 entries are only supported with cluster sizes of at least 16384 bytes"
    );
    let mut r = MeasureOptions::default();
    assert_eq!(r.set("compat", "1.1").unwrap_err().to_string(), "Invalid parameter 'compat'");
}

#[test]
fn bitmaps() {
    let d = Dir::new();
    let p = d.p("bm.qcow2");
    make(Maker::Qemu, &p, 100 << 20, 65536, 3, 16, None);
    qio(&p, &["write -P 1 0 1M"]);
    ok("qemu-img", &["bitmap", "--add", s(&p), "b0"]);
    ok("qemu-img", &["bitmap", "--add", "-g", "512", s(&p), "a-much-longer-bitmap-name"]);
    let img = oxcow::open(&p, &OpenOptions::read_only()).unwrap();
    for o in ["", "cluster_size=4k", "compat=0.10"] {
        let mut a = vec!["-O", "qcow2"];
        if !o.is_empty() {
            a.extend(["-o", o]);
        }
        a.push(s(&p));
        let want = qemu_measure(&a);
        assert!(o == "compat=0.10" || want.bitmaps.unwrap() > 0);
        assert_eq!(measure(Some(&img), None, &opts(Format::Qcow2, o)).unwrap(), want, "-o {o}");
    }
}
