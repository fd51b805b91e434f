//! `oxcow info`: qemu-img info's JSON and human output.

use crate::error::{CliError, CliResult};
use crate::util::{human, open_image, parse_format, qemu_json};
use oxcow::format::{Autoclear, SnapshotEntry};
use oxcow::formats::InfoValue;
use oxcow::nbd::client::NbdUrl;
use oxcow::qcow2::BitmapInfo;
use oxcow::{resolve_backing, ChainFiles, Image, OpenOptions};
use serde_json::{json, Map, Value};

#[derive(clap::Args)]
pub struct Args {
    /// Image format (probed when omitted).
    #[arg(short = 'f')]
    format: Option<String>,
    /// Output format: human or json.
    #[arg(long = "output", default_value = "human")]
    output: String,
    /// Show every image of the backing chain.
    #[arg(long = "backing-chain")]
    backing_chain: bool,
    /// Open even if another process has the image open for writing.
    #[arg(short = 'U', long = "force-share")]
    force_share: bool,
    #[command(flatten)]
    objects: crate::image_opts::ObjectArgs,
    /// Image file.
    file: String,
}

pub fn run(mut a: Args) -> CliResult<i32> {
    // qemu-img info reads no data: it looks no key secret up.
    a.objects.apply_without_secrets(&mut a.file, &mut a.format)?;
    let json_out = match a.output.as_str() {
        "json" => true,
        "human" => false,
        o => return Err(CliError::new(format!("--output expects 'human' or 'json' not '{o}'"))),
    };
    let mut format = parse_format(a.format.as_deref())?;
    let mut path = a.file.clone();
    let mut infos = Vec::new();
    let mut chain = ChainFiles::default();
    chain.enter(path.as_ref()).map_err(|e| CliError::new(e.to_string()))?;
    loop {
        // Backing files are opened one at a time, as qemu-img does, so a
        // missing backing file does not hide the top image's information.
        let opts = OpenOptions::default().format(format).no_backing(true).force_share(a.force_share).no_io(true);
        let img = open_image(&path, &opts)?;
        // A `file:` name is shown as the plain name it stands for.
        // An image whose options name a key secret is shown by them all.
        let shown = match (infos.is_empty(), crate::image_opts::json_name(&path)) {
            (true, Some(json)) => json,
            _ => nbd_display(&path).or_else(|| crate::util::file_protocol_name(&path)).unwrap_or_else(|| path.clone()),
        };
        let info =
            if crate::image_opts::bare_nbd(&path) { bare_nbd_info(&img, &shown) } else { image_info(&img, &shown)? };
        let next = if a.backing_chain {
            img.backing_name().map(|n| {
                let fmt = img.backing_format().map(str::to_string);
                (resolve_backing(img.path(), n).display().to_string(), fmt)
            })
        } else {
            None
        };
        infos.push(info);
        match next {
            Some(_) if infos.len() > oxcow::format::limits::MAX_BACKING_DEPTH => {
                // Only chains through network exports get here: local
                // files are told apart by identity below.
                return Err(CliError::new(format!(
                    "backing chain deeper than {}",
                    oxcow::format::limits::MAX_BACKING_DEPTH
                )));
            }
            Some((p, f)) => {
                // As qemu-img: the loop is named by the backing file that
                // comes back, as resolved, before anything is printed.
                chain.enter(p.as_ref()).map_err(|e| CliError::new(e.to_string()))?;
                path = p;
                format = parse_format(f.as_deref())?;
            }
            None => break,
        }
    }
    if json_out {
        let v = if a.backing_chain { Value::Array(infos) } else { infos.remove(0) };
        println!("{}", qemu_json(&v));
    } else {
        let mut first = true;
        for i in &infos {
            if !first {
                println!();
            }
            first = false;
            print!("{}", human_info(i));
        }
    }
    Ok(0)
}

fn snapshot_json(s: &SnapshotEntry) -> Value {
    let mut m = Map::new();
    if let Some(ic) = s.icount {
        m.insert("icount".into(), json!(ic));
    }
    m.insert("vm-clock-nsec".into(), json!(s.vm_clock_nsec % 1_000_000_000));
    m.insert("name".into(), json!(s.shown_name()));
    m.insert("date-sec".into(), json!(s.date_sec));
    m.insert("date-nsec".into(), json!(s.date_nsec));
    m.insert("vm-clock-sec".into(), json!(s.vm_clock_nsec / 1_000_000_000));
    m.insert("id".into(), json!(s.shown_id()));
    m.insert("vm-state-size".into(), json!(s.vm_state_size));
    Value::Object(m)
}

/// The `bitmaps` key: each bitmap's flags, name and granularity.
fn bitmaps_json(bitmaps: &[BitmapInfo]) -> Value {
    let list = bitmaps.iter().map(|b| {
        let mut flags = Vec::new();
        if b.in_use {
            flags.push(json!("in-use"));
        }
        if b.auto {
            flags.push(json!("auto"));
        }
        let mut m = Map::new();
        m.insert("flags".into(), Value::Array(flags));
        m.insert("name".into(), json!(b.name));
        m.insert("granularity".into(), json!(b.granularity));
        Value::Object(m)
    });
    Value::Array(list.collect())
}

/// QEMU's name for an NBD location in `info` (credentials and options
/// are no part of it); None for any other name.
fn nbd_display(name: &str) -> Option<String> {
    if !NbdUrl::is_nbd(name) {
        return None;
    }
    let mut u = NbdUrl::parse(name).ok()?;
    u.tls = None;
    u.x_dirty_bitmap = None;
    Some(u.qemu_filename())
}

/// The NBD protocol node: QEMU knows its length only (no allocation, no
/// dirty flag, nothing format-specific).
fn nbd_protocol_info(name: &str, len: u64) -> Value {
    let mut m = Map::new();
    m.insert("children".into(), json!([]));
    m.insert("virtual-size".into(), json!(len));
    m.insert("filename".into(), json!(name));
    m.insert("format".into(), json!("nbd"));
    Value::Object(m)
}

/// `info` on a bare `nbd` driver (`--image-opts driver=nbd,...`): the
/// protocol is the top node and its format.
fn bare_nbd_info(img: &Image, shown: &str) -> Value {
    nbd_protocol_info(shown, img.device().len())
}

fn protocol_info(path: &str, len: u64, actual: u64) -> Value {
    // qemu reports the protocol length in whole sectors.
    let flen = len.div_ceil(512) * 512;
    let mut m = Map::new();
    m.insert("children".into(), json!([]));
    m.insert("virtual-size".into(), json!(flen));
    m.insert("filename".into(), json!(path));
    m.insert("format".into(), json!("file"));
    m.insert("actual-size".into(), json!(actual));
    m.insert("format-specific".into(), json!({"type": "file", "data": {}}));
    m.insert("dirty-flag".into(), json!(false));
    Value::Object(m)
}

/// The extent files of a VMDK descriptor: length and allocated bytes.
fn extent_sizes(img: &Image) -> Vec<(String, u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    let files = img.format_info().map(|f| f.extent_files.as_slice()).unwrap_or_default();
    files
        .iter()
        .map(|p| {
            let md = std::fs::metadata(p).ok();
            let len = md.as_ref().map_or(0, |m| m.len());
            let actual = md.as_ref().map_or(0, |m| m.blocks() * 512);
            (p.display().to_string(), len, actual)
        })
        .collect()
}

fn file_child(img: &Image, path: &str) -> Value {
    if let Some(name) = nbd_display(&img.path().display().to_string()) {
        let file = nbd_protocol_info(&name, img.file().len().unwrap_or(0));
        return json!([{"name": "file", "info": file}]);
    }
    // qemu lists a descriptor's extent files last one first.
    let mut children: Vec<Value> = extent_sizes(img)
        .into_iter()
        .enumerate()
        .rev()
        .map(|(i, (p, len, actual))| json!({"name": format!("extents.{i}"), "info": protocol_info(&p, len, actual)}))
        .collect();
    let file = protocol_info(path, img.file().len().unwrap_or(0), img.actual_size());
    children.push(json!({"name": "file", "info": file}));
    Value::Array(children)
}

/// One image's information with qemu-img's keys, in its order.
pub fn image_info(img: &Image, path: &str) -> CliResult<Value> {
    let mut m = Map::new();
    // The file under a `json:{...}` name is the plain file.
    let file_name = crate::util::file_protocol_name(&img.path().display().to_string())
        .unwrap_or_else(|| img.path().display().to_string());
    let child = if path.starts_with("json:{") && crate::image_opts::json_name(&file_name).is_some() {
        &file_name
    } else {
        path
    };
    m.insert("children".into(), file_child(img, child));
    if let Some(f) = img.backing_format() {
        m.insert("backing-filename-format".into(), json!(f));
    }
    let q = img.qcow2();
    if let Some(q) = q {
        let snaps = q.snapshot_list();
        if !snaps.is_empty() {
            m.insert("snapshots".into(), Value::Array(snaps.iter().map(snapshot_json).collect()));
        }
    }
    m.insert("virtual-size".into(), json!(img.device().len()));
    m.insert("filename".into(), json!(path));
    if let Some(q) = q {
        m.insert("cluster-size".into(), json!(q.cluster_size()));
    }
    let other = img.format_info();
    if let Some(cs) = other.and_then(|f| f.cluster_size) {
        m.insert("cluster-size".into(), json!(cs));
    }
    m.insert("format".into(), json!(img.format().name()));
    let extents_actual: u64 = extent_sizes(img).iter().map(|e| e.2).sum();
    // A remote object's or an NBD export's allocation is unknown; QEMU
    // leaves the key out.
    let nbd = NbdUrl::is_nbd(&img.path().display().to_string());
    if !oxcow::remote::is_remote(path) && !nbd {
        m.insert("actual-size".into(), json!(img.actual_size() + extents_actual));
    }
    if let Some(q) = q {
        let h = q.header();
        let ext = q.extensions();
        let v3 = h.version >= 3;
        let mut d = Map::new();
        d.insert("compat".into(), json!(if v3 { "1.1" } else { "0.10" }));
        d.insert("compression-type".into(), json!(h.compression_type.name()));
        if v3 {
            d.insert("lazy-refcounts".into(), json!(h.compatible_features & 1 != 0));
            // Listed only when QEMU would load them (autoclear bit set).
            let bitmaps = if ext.bitmaps.as_ref().is_some_and(|b| b.nb_bitmaps > 0) { q.bitmaps()? } else { vec![] };
            if !bitmaps.is_empty() {
                d.insert("bitmaps".into(), bitmaps_json(&bitmaps));
            }
        }
        d.insert("refcount-bits".into(), json!(h.refcount_bits()));
        if let Some(l) = q.luks_header() {
            d.insert("encrypt".into(), luks_json(l, true));
        } else if h.crypt_method == 1 {
            d.insert("encrypt".into(), json!({"format": "aes"}));
        }
        if let Some(df) = &ext.data_file {
            d.insert("data-file".into(), json!(df));
        }
        // As QEMU: by the feature bit, also when no name is recorded.
        if h.has_data_file() {
            d.insert("data-file-raw".into(), json!(h.autoclear_features & Autoclear::DATA_FILE_RAW != 0));
        }
        if v3 {
            d.insert("corrupt".into(), json!(h.is_corrupt()));
            d.insert("extended-l2".into(), json!(h.extended_l2()));
        }
        m.insert("format-specific".into(), json!({"type": "qcow2", "data": Value::Object(d)}));
    }
    if let Some(f) = other.filter(|f| !f.specific.is_empty()) {
        m.insert("format-specific".into(), json!({"type": img.format().name(), "data": info_fields(&f.specific)}));
    }
    if let Some(l) = img.luks() {
        m.insert("format-specific".into(), json!({"type": "luks", "data": luks_json(l.header(), false)}));
    }
    if let Some(name) = img.backing_name() {
        // Under a quorum node the image has no one directory: QEMU
        // cannot tell where its backing file is and leaves the key out.
        let quorum = oxcow::json_name::parse(path).is_some_and(|j| j.is_ok_and(|j| j.quorum));
        if !quorum {
            m.insert("full-backing-filename".into(), json!(resolve_backing(img.path(), name).display().to_string()));
        }
        m.insert("backing-filename".into(), json!(name));
    }
    if q.is_some_and(|q| q.header().crypt_method != 0) || img.luks().is_some() {
        m.insert("encrypted".into(), json!(true));
    }
    // The flag comes from the format's information, which raw passes on
    // from its file: an NBD export has none to give.
    if !(nbd && img.format().name() == "raw") {
        m.insert("dirty-flag".into(), json!(q.is_some_and(|q| q.is_dirty()) || other.is_some_and(|f| f.dirty)));
    }
    Ok(Value::Object(m))
}

/// The format-specific fields of the other formats, in their order.
fn info_fields(fields: &[(&'static str, InfoValue)]) -> Value {
    let mut m = Map::new();
    for (k, v) in fields {
        let v = match v {
            InfoValue::U64(n) => json!(n),
            InfoValue::Str(s) => json!(s),
            InfoValue::Bool(b) => json!(b),
            InfoValue::List(l) => Value::Array(l.iter().map(|r| info_fields(r)).collect()),
        };
        m.insert((*k).into(), v);
    }
    Value::Object(m)
}

/// A LUKS header as qemu-img shows it (`format: luks` only inside qcow2,
/// where the block says which encryption it describes).
fn luks_json(l: &oxcow::crypto::LuksHeader, in_qcow2: bool) -> Value {
    let mut e = Map::new();
    e.insert("ivgen-alg".into(), json!(l.ivgen.name()));
    e.insert("detached-header".into(), json!(false));
    e.insert("hash-alg".into(), json!(l.hash.name()));
    e.insert("cipher-alg".into(), json!(l.alg.name()));
    e.insert("uuid".into(), json!(l.uuid));
    if let Some(h) = l.ivgen_hash {
        e.insert("ivgen-hash-alg".into(), json!(h.name()));
    }
    if in_qcow2 {
        e.insert("format".into(), json!("luks"));
    }
    e.insert("cipher-mode".into(), json!(l.mode.name()));
    let slots: Vec<Value> = l
        .slots
        .iter()
        .map(|s| {
            let key_offset = u64::from(s.key_offset) * 512;
            if s.active {
                json!({"active": true, "iters": s.iterations, "key-offset": key_offset, "stripes": s.stripes})
            } else {
                json!({"active": false, "key-offset": key_offset})
            }
        })
        .collect();
    e.insert("slots".into(), Value::Array(slots));
    e.insert("payload-offset".into(), json!(u64::from(l.payload_offset) * 512));
    e.insert("master-key-iters".into(), json!(l.mk_iterations));
    Value::Object(e)
}

fn as_u64(v: &Value, k: &str) -> u64 {
    v.get(k).and_then(Value::as_u64).unwrap_or(0)
}

fn as_str<'a>(v: &'a Value, k: &str) -> &'a str {
    v.get(k).and_then(Value::as_str).unwrap_or("")
}

/// qemu-img's human layout, built from the same JSON so both agree.
pub fn human_info(v: &Value) -> String {
    let mut s = String::new();
    let vsize = as_u64(v, "virtual-size");
    s += &format!("image: {}\n", as_str(v, "filename"));
    s += &format!("file format: {}\n", as_str(v, "format"));
    s += &format!("virtual size: {} ({vsize} bytes)\n", human(vsize));
    match v.get("actual-size").and_then(Value::as_u64) {
        Some(a) => s += &format!("disk size: {}\n", human(a)),
        None => s += "disk size: unavailable\n",
    }
    if v.get("encrypted").and_then(Value::as_bool) == Some(true) {
        s += "encrypted: yes\n";
    }
    if let Some(cs) = v.get("cluster-size").and_then(Value::as_u64) {
        s += &format!("cluster_size: {cs}\n");
    }
    if v.get("dirty-flag").and_then(Value::as_bool) == Some(true) {
        s += "cleanly shut down: no\n";
    }
    if let Some(b) = v.get("backing-filename").and_then(Value::as_str) {
        match v.get("full-backing-filename").and_then(Value::as_str) {
            None => s += &format!("backing file: {b} (cannot determine actual path)\n"),
            Some(full) if full != b && !full.is_empty() => s += &format!("backing file: {b} (actual path: {full})\n"),
            Some(_) => s += &format!("backing file: {b}\n"),
        }
    }
    if let Some(f) = v.get("backing-filename-format").and_then(Value::as_str) {
        s += &format!("backing file format: {f}\n");
    }
    if let Some(Value::Array(snaps)) = v.get("snapshots") {
        s += "Snapshot list:\n";
        s += &snapshot_header();
        for sn in snaps {
            s += &snapshot_row(sn);
        }
    }
    if let Some(fs) = v.get("format-specific").and_then(|f| f.get("data")) {
        s += "Format specific information:\n";
        dump_human(&mut s, fs, 1);
    }
    if let Some(Value::Array(children)) = v.get("children") {
        for c in children {
            let info = &c["info"];
            let flen = as_u64(info, "virtual-size");
            s += &format!("Child node '/{}':\n", as_str(c, "name"));
            s += &format!("    filename: {}\n", as_str(info, "filename"));
            s += &format!("    protocol type: {}\n", as_str(info, "format"));
            s += &format!("    file length: {} ({flen} bytes)\n", human(flen));
            match info.get("actual-size").and_then(Value::as_u64) {
                Some(a) => s += &format!("    disk size: {}\n", human(a)),
                None => s += "    disk size: unavailable\n",
            }
        }
    }
    s
}

/// qemu's generic dump of format-specific data: dashes become spaces,
/// lists are numbered.
pub fn dump_human(s: &mut String, v: &Value, indent: usize) {
    let pad = "    ".repeat(indent);
    match v {
        Value::Object(o) => {
            for (k, x) in o {
                let key = k.replace('-', " ");
                match x {
                    Value::Object(_) | Value::Array(_) => {
                        *s += &format!("{pad}{key}:\n");
                        dump_human(s, x, indent + 1);
                    }
                    _ => *s += &format!("{pad}{key}: {}\n", scalar(x)),
                }
            }
        }
        Value::Array(a) => {
            for (i, x) in a.iter().enumerate() {
                match x {
                    Value::Object(_) | Value::Array(_) => {
                        *s += &format!("{pad}[{i}]:\n");
                        dump_human(s, x, indent + 1);
                    }
                    _ => *s += &format!("{pad}[{i}]: {}\n", scalar(x)),
                }
            }
        }
        other => *s += &format!("{pad}{}\n", scalar(other)),
    }
}

fn scalar(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

pub fn snapshot_header() -> String {
    format!("{:<7} {:<16} {:>8} {:>19} {:>15} {:>10}\n", "ID", "TAG", "VM_SIZE", "DATE", "VM_CLOCK", "ICOUNT")
}

pub fn snapshot_row(sn: &Value) -> String {
    let clock_ns = as_u64(sn, "vm-clock-sec") * 1_000_000_000 + as_u64(sn, "vm-clock-nsec");
    let ms = clock_ns / 1_000_000;
    let clock = format!("{:04}:{:02}:{:02}.{:03}", ms / 3_600_000, ms / 60_000 % 60, ms / 1000 % 60, ms % 1000);
    let icount = sn.get("icount").and_then(Value::as_u64).map(|i| i.to_string()).unwrap_or_default();
    format!(
        "{:<7} {:<16} {:>8} {:>19} {:>15} {:>10}\n",
        as_str(sn, "id"),
        as_str(sn, "name"),
        human(as_u64(sn, "vm-state-size")),
        crate::util::local_date(as_u64(sn, "date-sec") as i64),
        clock,
        icount
    )
}
