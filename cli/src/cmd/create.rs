//! `oxcow create`: qemu-img create for qcow2 and raw images.

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
    /// Image file to create.
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
}

fn num_opt(key: &str, v: &str) -> CliResult<u64> {
    crate::util::parse_num(v).ok_or_else(|| {
        // qemu-img goes on about suffixes on two more lines; one is enough.
        CliError::new(format!("Parameter '{key}' expects a non-negative number below 2^64"))
    })
}

pub fn run(a: Args) -> CliResult<i32> {
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
) -> CliResult<i32> {
    create(Args {
        quiet: true,
        format: format.name().to_string(),
        options,
        backing,
        backing_format,
        unsafe_backing: true,
        file: file.to_string(),
        size: Some(size.to_string()),
    })
}

fn create(a: Args) -> CliResult<i32> {
    let file = a.file.clone();
    let err = |m: String| CliError::new(format!("{file}: {m}"));
    let format = a.format.parse::<Format>().map_err(|_| err(format!("Unknown file format '{}'", a.format)))?;
    let mut g = Given::default();
    for (k, v) in parse_options(&a.options)? {
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
            _ => return Err(err(format!("Invalid parameter '{k}'"))),
        };
        *slot = Some(v);
    }
    if let Some(b) = a.backing {
        if format == Format::Raw {
            return Err(err("Invalid parameter 'backing_file'".into()));
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
    if g.backing_file.is_some() && g.backing_fmt.is_none() {
        return Err(err("Backing file specified without backing format".into()));
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
            let opts = OpenOptions::default().format(bfmt);
            let opts = crate::util::with_network_permission(&opts);
            let bimg = oxcow::open(&bpath, &opts).map_err(|e| {
                let why = match e {
                    oxcow::Error::Io { source, .. } => os_message(&source),
                    other => message(&other),
                };
                err(format!("Could not open '{b}': {why}\nCould not open backing image."))
            })?;
            crate::util::report_dirty_repair(&bpath.display().to_string(), &bimg);
            if size.is_none() {
                size = Some(bimg.device().len());
            }
        }
    }
    let Some(size) = size else {
        return Err(err("Image creation needs a size parameter".into()));
    };

    if format == Format::Luks {
        return Err(err("creating LUKS images is not supported yet (convert from one qemu-img made)".into()));
    }
    let line = formatting_line(&a.file, format, &g, size);
    if !a.quiet {
        println!("{line}");
    }

    match format {
        Format::Raw => create_raw(&a.file, size, &g).map_err(&err)?,
        Format::Qcow2 => create_qcow2(&a.file, size, &g).map_err(&err)?,
        Format::Luks => {}
    }
    Ok(0)
}

fn formatting_line(file: &str, format: Format, g: &Given, size: u64) -> String {
    let mut s = format!("Formatting '{file}', fmt={}", format.name());
    let mut add = |k: &str, v: &str| s.push_str(&format!(" {k}={v}"));
    match format {
        Format::Raw | Format::Luks => {
            add("size", &size.to_string());
            if let Some(p) = &g.preallocation {
                add("preallocation", p);
            }
        }
        Format::Qcow2 => {
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
        }
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

fn create_qcow2(path: &str, size: u64, g: &Given) -> Result<(), String> {
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
        o.refcount_bits =
            r.parse().map_err(|_| "Parameter 'refcount_bits' expects a non-negative number below 2^64".to_string())?;
    }
    o.lazy_refcounts = bool_opt("lazy_refcounts", &g.lazy_refcounts)?;
    o.extended_l2 = bool_opt("extended_l2", &g.extended_l2)?;
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
    o.validate().map_err(|e| message(&e))?;

    let data: Option<Arc<dyn Storage>> = match &g.data_file {
        Some(name) => {
            let dpath = resolve_backing(Path::new(path), name);
            let d: Arc<dyn Storage> = create_file(&dpath).map_err(|e| message(&e))?;
            Some(d)
        }
        None => None,
    };
    let f = create_file(Path::new(path)).map_err(|e| message(&e))?;
    oxcow::qcow2::create(f, data.clone(), &o).map_err(|e| message(&e))?;
    if let Some(d) = data {
        // qemu-img sizes the data file to the disk, so it holds the whole guest.
        if d.len().map_err(|e| os_message(&e))? < o.size {
            d.set_len(o.size).map_err(|e| format!("Could not resize data file: {}", os_message(&e)))?;
        }
    }
    Ok(())
}
