//! `oxcow create`: qemu-img create for raw, qcow2, QED, VDI, VPC, VMDK and VHDX images.

use crate::error::{message, os_message, CliError, CliResult};
use crate::util::{parse_bool, parse_options};
use oxcow::format::CompressionType;
use oxcow::qcow2::{CreateOptions, Preallocation};
use oxcow::storage::Storage;
use oxcow::{create_file, resolve_backing, Format, OpenOptions};
use std::path::Path;
use std::sync::Arc;

#[derive(clap::Args)]
pub struct Args {
    /// Quiet: no "Formatting ..." line.
    #[arg(short = 'q')]
    quiet: bool,
    /// Image format (qcow2 or raw; default raw).
    #[arg(short = 'f', default_value = "raw")]
    format: String,
    /// Format options, `key=value,...` (repeatable).
    #[arg(short = 'o')]
    options: Vec<String>,
    /// Backing file.
    #[arg(short = 'b')]
    backing: Option<String>,
    /// Backing file format.
    #[arg(short = 'F')]
    backing_format: Option<String>,
    /// Do not open the backing file (the size must then be given).
    #[arg(short = 'u')]
    unsafe_backing: bool,
    /// Define an object (qemu's TYPE,id=ID,...), e.g. the secret that
    /// `-o encrypt.key-secret=ID` names.
    #[arg(long = "object", value_name = "TYPE,id=ID,...")]
    objects: Vec<String>,
    /// Image file to create (none with `-o help`).
    #[arg(default_value = "")]
    file: String,
    /// Virtual size (512, 4k, 1M, 2G, ...).
    size: Option<String>,
}

/// Options as the user gave them, for the "Formatting" line and for
/// building the library's options.
#[derive(Default)]
struct Given {
    size: Option<String>,
    compat: Option<String>,
    backing_file: Option<String>,
    backing_fmt: Option<String>,
    data_file: Option<String>,
    data_file_raw: Option<String>,
    cluster_size: Option<String>,
    preallocation: Option<String>,
    lazy_refcounts: Option<String>,
    refcount_bits: Option<String>,
    compression_type: Option<String>,
    extended_l2: Option<String>,
    journal: Option<String>,
    vdi_static: Option<String>,
    subformat: Option<String>,
    force_size: Option<String>,
    table_size: Option<String>,
    block_size: Option<String>,
    log_size: Option<String>,
    block_state_zero: Option<String>,
    adapter_type: Option<String>,
    hwversion: Option<String>,
    toolsversion: Option<String>,
    zeroed_grain: Option<String>,
    compat6: Option<String>,
    enc: crate::encrypt_opts::EncryptOpts,
    /// The file protocol's options, only quoted back.
    nocow: Option<String>,
    extent_size_hint: Option<u64>,
}

fn num_opt(key: &str, v: &str) -> CliResult<u64> {
    crate::util::parse_num(v).ok_or_else(|| {
        // qemu-img goes on about suffixes on two more lines; one is enough.
        CliError::new(format!("Parameter '{key}' expects a non-negative number below 2^64"))
    })
}

pub fn run(a: Args) -> CliResult<i32> {
    crate::opt_help::check_lists(&a.options)?;
    if crate::opt_help::wants_help(&a.options) {
        let target = Some(a.file.as_str()).filter(|f| !f.is_empty());
        print!("{}", crate::opt_help::create_help(&a.format, target)?);
        return Ok(0);
    }
    if a.file.is_empty() {
        let hint = format!("Try '{} create --help' for more info", crate::dropin::argv0());
        return Err(CliError::new(format!("Expecting image file name\n{hint}")));
    }
    create(a)
}

/// What `convert` needs to make its target: the same path as `create`.
pub fn create_target(
    file: &str,
    format: Format,
    options: Vec<String>,
    backing: Option<String>,
    backing_format: Option<String>,
    size: u64,
    objects: Vec<String>,
) -> CliResult<i32> {
    create(Args {
        quiet: true,
        format: format.name().to_string(),
        options,
        backing,
        backing_format,
        unsafe_backing: true,
        objects,
        file: file.to_string(),
        size: Some(size.to_string()),
    })
}

fn create(mut a: Args) -> CliResult<i32> {
    let file = a.file.clone();
    // Named as given in messages, created by its plain name.
    if let Some(plain) = crate::util::file_protocol_name(&a.file) {
        a.file = plain;
    }
    let err = |m: String| CliError::new(format!("{file}: {m}"));
    let format = a.format.parse::<Format>().map_err(|_| err(format!("Unknown file format '{}'", a.format)))?;
    if !format.writable() {
        return Err(err(format!("oxcow cannot create {format} images yet")));
    }
    let objects = crate::object::Objects::parse(&a.objects)?;
    let mut g = Given { enc: crate::encrypt_opts::EncryptOpts::new(format == Format::Qcow2), ..Given::default() };
    for (k, v) in parse_options(&a.options)? {
        if matches!(format, Format::Qcow2 | Format::Luks) && g.enc.take(&k, &v) {
            continue;
        }
        // The file protocol's own options: the extent size hint only tunes
        // XFS allocation and nocow only btrfs, neither changes the image.
        match k.as_str() {
            "extent_size_hint" => {
                g.extent_size_hint = Some(num_opt(&k, &v).map_err(|e| err(e.msg))?);
                continue;
            }
            "nocow" => {
                parse_bool(&k, &v).map_err(|e| err(e.msg))?;
                g.nocow = Some(v);
                continue;
            }
            _ => {}
        }
        let slot = match (format, k.as_str()) {
            (_, "size") => &mut g.size,
            (_, "preallocation") => &mut g.preallocation,
            (Format::Qcow2, "compat") => &mut g.compat,
            (Format::Qcow2, "backing_file") => &mut g.backing_file,
            (Format::Qcow2, "backing_fmt") => &mut g.backing_fmt,
            (Format::Qcow2, "data_file") => &mut g.data_file,
            (Format::Qcow2, "data_file_raw") => &mut g.data_file_raw,
            (Format::Qcow2, "cluster_size") => &mut g.cluster_size,
            (Format::Qcow2, "lazy_refcounts") => &mut g.lazy_refcounts,
            (Format::Qcow2, "refcount_bits") => &mut g.refcount_bits,
            (Format::Qcow2, "compression_type") => &mut g.compression_type,
            (Format::Qcow2, "extended_l2") => &mut g.extended_l2,
            (Format::Qcow2, "journal") => &mut g.journal,
            (Format::Vdi, "static") => &mut g.vdi_static,
            (Format::Qed, "backing_file") => &mut g.backing_file,
            (Format::Qed, "backing_fmt") => &mut g.backing_fmt,
            (Format::Qed, "cluster_size") => &mut g.cluster_size,
            (Format::Qed, "table_size") => &mut g.table_size,
            (Format::Vpc, "subformat") | (Format::Vmdk, "subformat") => &mut g.subformat,
            (Format::Vpc, "force_size") => &mut g.force_size,
            (Format::Vmdk, "adapter_type") => &mut g.adapter_type,
            (Format::Vmdk, "hwversion") => &mut g.hwversion,
            (Format::Vmdk, "toolsversion") => &mut g.toolsversion,
            (Format::Vmdk, "zeroed_grain") => &mut g.zeroed_grain,
            (Format::Vmdk, "compat6") => &mut g.compat6,
            (Format::Vmdk, "backing_file") => &mut g.backing_file,
            (Format::Vmdk, "backing_fmt") => &mut g.backing_fmt,
            (Format::Vhdx, "subformat") => &mut g.subformat,
            (Format::Vhdx, "block_size") => &mut g.block_size,
            (Format::Vhdx, "log_size") => &mut g.log_size,
            (Format::Vhdx, "block_state_zero") => &mut g.block_state_zero,
            _ => return Err(err(format!("Invalid parameter '{k}'"))),
        };
        *slot = Some(v);
    }
    if let Some(b) = a.backing {
        if format == Format::Raw {
            return Err(err("Invalid parameter 'backing_file'".into()));
        }
        if !matches!(format, Format::Qcow2 | Format::Qed | Format::Vmdk) {
            return Err(err(format!("Backing file not supported for file format '{format}'")));
        }
        g.backing_file = Some(b);
    }
    if let Some(f) = a.backing_format {
        g.backing_fmt = Some(f);
    }
    if let Some(s) = a.size {
        // qemu-img refuses sizes with junk after the suffix or negative ones.
        crate::util::parse_num(&s).ok_or_else(|| CliError::new(format!("Invalid image size specified: '{s}'.")))?;
        g.size = Some(s);
    }
    let mut size = match &g.size {
        Some(s) => Some(num_opt("size", s)?),
        None => None,
    };
    if let Some(b) = &g.backing_file {
        if size.is_none() || !a.unsafe_backing {
            let bpath = resolve_backing(Path::new(&a.file), b);
            let bfmt = crate::util::parse_format(g.backing_fmt.as_deref())
                .map_err(|e| err(format!("{}\nCould not open backing image.", e.msg)))?;
            let opts = OpenOptions::default().format(bfmt).no_io(true);
            let opts = crate::util::with_network_permission(&opts);
            let bimg = oxcow::open(&bpath, &opts).map_err(|e| {
                let why = match e {
                    oxcow::Error::Io { source, .. } => os_message(&source),
                    other => message(&other),
                };
                err(format!("Could not open '{b}': {why}\nCould not open backing image."))
            })?;
            crate::util::report_dirty_repair(&bpath.display().to_string(), &bimg);
            // As qemu-img: the backing file is opened first, so a missing
            // one is reported before a missing format.
            if g.backing_fmt.is_none() {
                return Err(err(format!(
                    "Backing file specified without backing format\nDetected format of {}.",
                    bimg.format().name()
                )));
            }
            if size.is_none() {
                size = Some(bimg.device().len());
            }
        }
    }
    if g.backing_file.is_some() && g.backing_fmt.is_none() {
        return Err(err("Backing file specified without backing format".into()));
    }
    let Some(size) = size else {
        return Err(err("Image creation needs a size parameter".into()));
    };

    let encrypts = matches!(format, Format::Qcow2 | Format::Luks);
    if encrypts {
        g.enc.precheck().map_err(|e| err(e.msg))?;
    }
    let line = formatting_line(&file, format, &g, size);
    if !a.quiet {
        println!("{line}");
    }
    let resolved = if encrypts { g.enc.resolve(&objects).map_err(|e| err(e.msg))? } else { None };
    let mut legacy_aes = false;
    let encryption = match resolved {
        Some(crate::encrypt_opts::Encryption::Aes(key)) => {
            crate::object::secret::register(&a.file, key);
            legacy_aes = true;
            None
        }
        Some(crate::encrypt_opts::Encryption::Luks(p, key)) => {
            // `convert` opens the image it creates with the same key.
            crate::object::secret::register(&a.file, key.clone());
            Some((p, key))
        }
        None => None,
    };

    match format {
        Format::Raw => create_raw(&a.file, size, &g).map_err(&err)?,
        Format::Qcow2 => create_qcow2(&a.file, size, &g, encryption, legacy_aes).map_err(&err)?,
        Format::Luks => {
            let (p, key) = encryption.ok_or_else(|| err("Parameter 'key-secret' is required for cipher".into()))?;
            create_luks(&a.file, size, &g, &p, &key).map_err(&err)?
        }
        Format::Vdi => create_vdi(&a.file, size, &g).map_err(&err)?,
        Format::Vpc => create_vpc(&a.file, size, &g).map_err(&err)?,
        Format::Qed => create_qed(&a.file, size, &g).map_err(&err)?,
        Format::Vmdk => create_vmdk(&a.file, size, &g).map_err(&err)?,
        Format::Vhdx => create_vhdx(&a.file, size, &g).map_err(&err)?,
    }
    Ok(0)
}

fn formatting_line(file: &str, format: Format, g: &Given, size: u64) -> String {
    let mut s = format!("Formatting '{file}', fmt={}", format.name());
    // Values are printed as an option list takes them: commas doubled.
    let mut add = |k: &str, v: &str| s.push_str(&format!(" {k}={}", v.replace(',', ",,")));
    let enc = g.enc.formatting();
    match format {
        Format::Raw | Format::Luks => {
            add("size", &size.to_string());
            for (k, v) in &enc {
                add(k, v);
            }
            if let Some(p) = &g.preallocation {
                add("preallocation", p);
            }
        }
        Format::Qcow2 => {
            for (k, v) in &enc {
                add(k, v);
            }
            let cs = g.cluster_size.as_deref().and_then(crate::util::parse_num).unwrap_or(65536);
            add("cluster_size", &cs.to_string());
            add("extended_l2", g.extended_l2.as_deref().unwrap_or("off"));
            if let Some(p) = &g.preallocation {
                add("preallocation", p);
            }
            add("compression_type", g.compression_type.as_deref().unwrap_or("zlib"));
            add("size", &size.to_string());
            for (k, v) in [
                ("compat", &g.compat),
                ("backing_file", &g.backing_file),
                ("backing_fmt", &g.backing_fmt),
                ("data_file", &g.data_file),
                ("data_file_raw", &g.data_file_raw),
            ] {
                if let Some(v) = v {
                    add(k, v);
                }
            }
            add("lazy_refcounts", g.lazy_refcounts.as_deref().unwrap_or("off"));
            add("refcount_bits", g.refcount_bits.as_deref().unwrap_or("16"));
            // oxcow's own option, named only when given (qemu-img's line
            // otherwise).
            if let Some(j) = &g.journal {
                add("journal", j);
            }
        }
        Format::Qed => {
            add("size", &size.to_string());
            for (k, v) in [("backing_file", &g.backing_file), ("backing_fmt", &g.backing_fmt)] {
                if let Some(v) = v {
                    add(k, v);
                }
            }
            let cs = g.cluster_size.as_deref().and_then(crate::util::parse_num).unwrap_or(65536);
            add("cluster_size", &cs.to_string());
            if let Some(t) = &g.table_size {
                add("table_size", t);
            }
            if let Some(p) = &g.preallocation {
                add("preallocation", p);
            }
        }
        Format::Vmdk => {
            add("size", &size.to_string());
            for (k, v) in
                [("adapter_type", &g.adapter_type), ("backing_file", &g.backing_file), ("backing_fmt", &g.backing_fmt)]
            {
                if let Some(v) = v {
                    add(k, v);
                }
            }
            add("compat6", g.compat6.as_deref().unwrap_or("off"));
            add("hwversion", g.hwversion.as_deref().unwrap_or("undefined"));
            for (k, v) in [
                ("toolsversion", &g.toolsversion),
                ("subformat", &g.subformat),
                ("zeroed_grain", &g.zeroed_grain),
                ("preallocation", &g.preallocation),
            ] {
                if let Some(v) = v {
                    add(k, v);
                }
            }
        }
        Format::Vpc => {
            add("size", &size.to_string());
            if let Some(v) = &g.subformat {
                add("subformat", v);
            }
            if let Some(v) = &g.force_size {
                add("force_size", v);
            }
            if let Some(p) = &g.preallocation {
                add("preallocation", p);
            }
        }
        Format::Vdi => {
            add("size", &size.to_string());
            add("static", g.vdi_static.as_deref().unwrap_or("off"));
            if let Some(p) = &g.preallocation {
                add("preallocation", p);
            }
        }
        Format::Vhdx => {
            add("size", &size.to_string());
            add("log_size", &g.log_size.as_deref().and_then(crate::util::parse_num).unwrap_or(1 << 20).to_string());
            add("block_size", &g.block_size.as_deref().and_then(crate::util::parse_num).unwrap_or(0).to_string());
            for (k, v) in [
                ("subformat", &g.subformat),
                ("block_state_zero", &g.block_state_zero),
                ("preallocation", &g.preallocation),
            ] {
                if let Some(v) = v {
                    add(k, v);
                }
            }
        }
    }
    // The protocol's options come after the format's.
    if let Some(v) = &g.nocow {
        s.push_str(&format!(" nocow={v}"));
    }
    if let Some(v) = g.extent_size_hint {
        s.push_str(&format!(" extent_size_hint={v}"));
    }
    s
}

fn prealloc(g: &Given) -> CliResult<Preallocation> {
    match &g.preallocation {
        None => Ok(Preallocation::Off),
        Some(p) => p
            .parse::<Preallocation>()
            .map_err(|_| CliError::new(format!("Parameter 'preallocation' does not accept value '{p}'"))),
    }
}

/// `preallocation` for the formats whose QEMU drivers pass it to the
/// file they create empty: checked as qemu-img checks it, and then
/// without effect, as there.
fn file_prealloc(g: &Given) -> Result<(), String> {
    match g.preallocation.as_deref() {
        None | Some("off" | "falloc" | "full") => Ok(()),
        Some("metadata") => Err("Unsupported preallocation mode: metadata".into()),
        Some(p) => Err(format!("invalid parameter value: {p}")),
    }
}

fn create_raw(path: &str, size: u64, g: &Given) -> Result<(), String> {
    let mode = prealloc(g).map_err(|e| e.msg)?;
    let f = create_file(Path::new(path)).map_err(|e| message(&e))?;
    f.set_len(0).map_err(|e| format!("Could not resize file: {}", os_message(&e)))?;
    if mode == Preallocation::Full {
        let chunk = vec![0u8; 1 << 20];
        let mut off = 0;
        while off < size {
            let n = (size - off).min(chunk.len() as u64) as usize;
            f.write_at(&chunk[..n], off)
                .map_err(|e| format!("Could not write zeros for preallocation: {}", os_message(&e)))?;
            off += n as u64;
        }
    }
    f.set_len(size).map_err(|e| format!("Could not resize file: {}", os_message(&e)))?;
    f.flush().map_err(|e| os_message(&e))?;
    Ok(())
}

fn create_luks(
    path: &str,
    size: u64,
    g: &Given,
    p: &oxcow::crypto::LuksParams,
    key: &oxcow::crypto::Secret,
) -> Result<(), String> {
    let mode = prealloc(g).map_err(|e| e.msg)?;
    let f: Arc<dyn Storage> = create_file(Path::new(path)).map_err(|e| message(&e))?;
    oxcow::crypto::LuksImage::create(&f, size, p, key, mode == Preallocation::Full).map_err(|e| message(&e))
}

fn create_vmdk(path: &str, size: u64, g: &Given) -> Result<(), String> {
    file_prealloc(g)?;
    let o = vmdk_options(path, g)?;
    let stream = match g.subformat.as_deref() {
        None | Some("monolithicSparse") => false,
        Some("streamOptimized") => true,
        Some(sub @ ("monolithicFlat" | "twoGbMaxExtentFlat" | "twoGbMaxExtentSparse")) => {
            if o.parent.is_some() && sub.ends_with("Flat") {
                return Err("Flat image can't have backing file".into());
            }
            return create_vmdk_extents(path, size, sub, &o);
        }
        Some(other) => return Err(format!("Unknown subformat '{other}'")),
    };
    let name = Path::new(path).file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let f = create_file(Path::new(path)).map_err(|e| message(&e))?;
    f.set_len(0).map_err(|e| format!("Could not resize file: {}", os_message(&e)))?;
    let r = if stream {
        oxcow::formats::vmdk::create_stream_optimized(&*f, &name, size, &o)
    } else {
        oxcow::formats::vmdk::create_monolithic_sparse(&*f, &name, size, &o)
    };
    r.map_err(|e| message(&e))
}

/// The VMDK options as given, checked as qemu-img checks them; a backing
/// file must be a VMDK, whose CID the new image records.
fn vmdk_options(path: &str, g: &Given) -> Result<oxcow::formats::vmdk::CreateOptions, String> {
    let mut o = oxcow::formats::vmdk::CreateOptions::default();
    let flag = |k: &str, v: &Option<String>| -> Result<bool, String> {
        v.as_deref().map(|v| parse_bool(k, v).map_err(|e| e.msg)).transpose().map(|b| b.unwrap_or(false))
    };
    let compat6 = flag("compat6", &g.compat6)?;
    o.zeroed_grain = flag("zeroed_grain", &g.zeroed_grain)?;
    match (&g.hwversion, compat6) {
        (Some(_), true) => return Err("compat6 cannot be enabled with hwversion set".into()),
        (Some(h), false) if h != "undefined" => o.hw_version = h.clone(),
        (_, true) => o.hw_version = "6".into(),
        _ => {}
    }
    if let Some(a) = &g.adapter_type {
        o.adapter_type = a.clone();
    }
    if let Some(t) = &g.toolsversion {
        o.tools_version = t.clone();
    }
    if let Some(b) = &g.backing_file {
        let bpath = resolve_backing(Path::new(path), b);
        let bimg = oxcow::open(&bpath, &OpenOptions::default())
            .map_err(|e| format!("Could not open '{b}': {}", message(&e)))?;
        if bimg.format() != Format::Vmdk {
            return Err("backing_file must be a vmdk image".into());
        }
        let cid = bimg.format_info().and_then(|i| {
            i.specific.iter().find_map(|(k, v)| match (k, v) {
                (&"cid", oxcow::formats::InfoValue::U64(c)) => u32::try_from(*c).ok(),
                _ => None,
            })
        });
        o.parent = Some((b.clone(), cid.ok_or("backing_file must be a vmdk image")?));
    }
    o.validate().map_err(|e| message(&e))?;
    Ok(o)
}

/// A descriptor and its extent files, named after it as qemu-img names
/// them, next to it.
fn create_vmdk_extents(
    path: &str,
    size: u64,
    sub: &str,
    o: &oxcow::formats::vmdk::CreateOptions,
) -> Result<(), String> {
    let p = Path::new(path);
    let file_name = p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let base = file_name.strip_suffix(".vmdk").unwrap_or(&file_name).to_string();
    let dir = p.parent().map(Path::to_path_buf).unwrap_or_default();
    let desc = create_file(p).map_err(|e| message(&e))?;
    desc.set_len(0).map_err(|e| format!("Could not resize file: {}", os_message(&e)))?;
    let extents = |name: &str| -> oxcow::Result<std::sync::Arc<dyn oxcow::storage::Storage>> {
        let f = create_file(&dir.join(name))?;
        f.set_len(0).map_err(|e| oxcow::Error::io("creating VMDK extent", e))?;
        Ok(f)
    };
    oxcow::formats::vmdk::create_with_extents(&*desc, sub, &base, size, &extents, o).map_err(|e| message(&e))
}

fn create_qed(path: &str, size: u64, g: &Given) -> Result<(), String> {
    file_prealloc(g)?;
    let num = |k: &str, v: &Option<String>, default: u64| -> Result<u32, String> {
        let n = match v {
            Some(v) => num_opt(k, v).map_err(|e| e.msg)?,
            None => default,
        };
        u32::try_from(n).map_err(|_| format!("Parameter '{k}' is too large"))
    };
    let cs = num("cluster_size", &g.cluster_size, 65536)?;
    let ts = num("table_size", &g.table_size, 4)?;
    if !cs.is_power_of_two() || !(4096..=64 << 20).contains(&cs) {
        return Err(format!("QED cluster size must be within range [{}, {}] and power of 2", 4096, 64 << 20));
    }
    if !ts.is_power_of_two() || !(1..=16).contains(&ts) {
        return Err("QED table size must be within range [1, 16] and power of 2".into());
    }
    let backing = g.backing_file.as_deref().map(|b| (b, g.backing_fmt.as_deref() == Some("raw")));
    let f = create_file(Path::new(path)).map_err(|e| message(&e))?;
    f.set_len(0).map_err(|e| format!("Could not resize file: {}", os_message(&e)))?;
    oxcow::formats::qed::create(&*f, size, cs, ts, backing).map_err(|e| message(&e))
}

fn create_vpc(path: &str, size: u64, g: &Given) -> Result<(), String> {
    file_prealloc(g)?;
    let fixed = match g.subformat.as_deref() {
        None | Some("dynamic") => false,
        Some("fixed") => true,
        Some(other) => return Err(format!("Invalid subformat '{other}'")),
    };
    let force = match &g.force_size {
        Some(v) => parse_bool("force_size", v).map_err(|e| e.msg)?,
        None => false,
    };
    let f = create_file(Path::new(path)).map_err(|e| message(&e))?;
    f.set_len(0).map_err(|e| format!("Could not resize file: {}", os_message(&e)))?;
    oxcow::formats::vpc::create(&*f, size, fixed, force).map(|_| ()).map_err(|e| message(&e))
}

fn create_vdi(path: &str, size: u64, g: &Given) -> Result<(), String> {
    file_prealloc(g)?;
    let r#static = match &g.vdi_static {
        Some(v) => parse_bool("static", v).map_err(|e| e.msg)?,
        None => false,
    };
    let f = create_file(Path::new(path)).map_err(|e| message(&e))?;
    f.set_len(0).map_err(|e| format!("Could not resize file: {}", os_message(&e)))?;
    oxcow::formats::vdi::create(&*f, size, r#static).map_err(|e| message(&e))
}

fn create_vhdx(path: &str, size: u64, g: &Given) -> Result<(), String> {
    let mut o = oxcow::formats::vhdx::CreateOptions::new(size);
    o.fixed = match g.subformat.as_deref() {
        None | Some("dynamic") => false,
        Some("fixed") => true,
        Some(other) => return Err(format!("Parameter 'subformat' does not accept value '{other}'")),
    };
    if let Some(v) = &g.block_size {
        o.block_size = num_opt("block_size", v).map_err(|e| e.msg)?;
    }
    if let Some(v) = &g.log_size {
        o.log_size = num_opt("log_size", v).map_err(|e| e.msg)?;
    }
    if let Some(v) = &g.block_state_zero {
        o.zero_blocks = parse_bool("block_state_zero", v).map_err(|e| e.msg)?;
    }
    file_prealloc(g)?;
    let f = create_file(Path::new(path)).map_err(|e| message(&e))?;
    f.set_len(0).map_err(|e| format!("Could not resize file: {}", os_message(&e)))?;
    oxcow::formats::vhdx::create(&*f, &o).map_err(|e| message(&e))
}

/// Where a new image is written: a new file, or an existing NBD export
/// (which cannot be created, only written over from its start, as
/// qemu-img does).
fn new_image_storage(path: &str) -> Result<Arc<dyn Storage>, String> {
    if oxcow::nbd::client::NbdUrl::is_nbd(path) {
        let opts = oxcow::nbd::client::ClientOptions::default();
        let s = oxcow::nbd::client::NbdStorage::open(path, opts).map_err(|e| message(&e))?;
        return Ok(Arc::new(s.for_new_image()));
    }
    Ok(create_file(Path::new(path)).map_err(|e| message(&e))?)
}

fn create_qcow2(
    path: &str,
    size: u64,
    g: &Given,
    encryption: Option<(oxcow::crypto::LuksParams, oxcow::crypto::Secret)>,
    legacy_aes: bool,
) -> Result<(), String> {
    let bool_opt = |k: &str, v: &Option<String>| -> Result<bool, String> {
        v.as_deref().map(|v| parse_bool(k, v).map_err(|e| e.msg)).transpose().map(|b| b.unwrap_or(false))
    };
    // qemu rounds the virtual size up to whole sectors.
    let mut o = CreateOptions::new(size.div_ceil(512) * 512);
    if let Some(cs) = &g.cluster_size {
        o.cluster_size = num_opt("cluster_size", cs).map_err(|e| e.msg)?;
    }
    if let Some(c) = &g.compat {
        o.version = match c.as_str() {
            "0.10" | "v2" => 2,
            "1.1" | "v3" => 3,
            other => return Err(format!("Parameter 'version' does not accept value '{other}'")),
        };
    }
    if let Some(r) = &g.refcount_bits {
        o.refcount_bits = oxcow::qcow2::parse_refcount_bits(r)
            .ok_or_else(|| "Parameter 'refcount_bits' expects a non-negative number below 2^64".to_string())?;
    }
    o.lazy_refcounts = bool_opt("lazy_refcounts", &g.lazy_refcounts)?;
    o.extended_l2 = bool_opt("extended_l2", &g.extended_l2)?;
    o.journal = bool_opt("journal", &g.journal)?;
    o.data_file_raw = bool_opt("data_file_raw", &g.data_file_raw)?;
    if let Some(c) = &g.compression_type {
        o.compression = c
            .parse::<CompressionType>()
            .map_err(|_| format!("Parameter 'compression-type' does not accept value '{c}'"))?;
    }
    o.backing_file = g.backing_file.clone();
    o.backing_format = g.backing_fmt.clone();
    o.data_file = g.data_file.clone();
    o.preallocation = prealloc(g).map_err(|e| e.msg)?;
    o.encryption = encryption;
    o.legacy_aes = legacy_aes;
    o.validate().map_err(|e| message(&e))?;

    let data: Option<Arc<dyn Storage>> = match &g.data_file {
        Some(name) => {
            let dpath = resolve_backing(Path::new(path), name);
            let d: Arc<dyn Storage> = create_file(&dpath).map_err(|e| message(&e))?;
            Some(d)
        }
        None => None,
    };
    let f = new_image_storage(path)?;
    oxcow::qcow2::create(f, data.clone(), &o).map_err(|e| message(&e))?;
    if let Some(d) = data {
        // qemu-img sizes the data file to the disk, so it holds the whole guest.
        if d.len().map_err(|e| os_message(&e))? < o.size {
            d.set_len(o.size).map_err(|e| format!("Could not resize data file: {}", os_message(&e)))?;
        }
    }
    Ok(())
}
