//! `oxcow measure`: size a new image would need (like `qemu-img measure`).

use crate::error::{CliError, CliResult};
use crate::util::{open_image, parse_format, parse_num, parse_options, qemu_json};
use oxcow::tools::measure::{measure, MeasureOptions};
use oxcow::{Format, OpenOptions};
use serde_json::{Map, Value};

#[derive(clap::Args)]
pub struct Args {
    /// Output format (human or json).
    #[arg(long = "output", default_value = "human")]
    output: String,
    /// Format of the new image (raw or qcow2).
    #[arg(short = 'O', default_value = "raw")]
    out_format: String,
    /// Options of the new image.
    #[arg(short = 'o')]
    options: Vec<String>,
    /// Size of a new empty image, instead of an input file.
    #[arg(long = "size")]
    size: Option<String>,
    /// Format of the input image.
    #[arg(short = 'f')]
    format: Option<String>,
    /// Open the input without conflicting with a writer.
    #[arg(short = 'U', long = "force-share")]
    force_share: bool,
    #[command(flatten)]
    objects: crate::image_opts::ObjectArgs,
    /// Input image.
    file: Option<String>,
}

pub fn run(mut a: Args) -> CliResult<i32> {
    let _ = a.force_share;
    if let Some(f) = a.file.as_mut() {
        a.objects.apply(f, &mut a.format)?;
    }
    let json = match a.output.as_str() {
        "human" => false,
        "json" => true,
        other => return Err(CliError::new(format!("--output must be used with human or json as argument. ({other})"))),
    };
    let fmt =
        a.out_format.parse::<Format>().map_err(|_| CliError::new(format!("Unknown file format '{}'", a.out_format)))?;
    // A raw LUKS image measures as raw plus its header.
    let luks = fmt == Format::Luks;
    let mut opts = MeasureOptions::default().format(if luks { Format::Raw } else { fmt });
    let mut enc = crate::encrypt_opts::EncryptOpts::new(fmt == Format::Qcow2);
    for (k, v) in parse_options(&a.options)? {
        if matches!(fmt, Format::Qcow2 | Format::Luks) && enc.take(&k, &v) {
            continue;
        }
        if let Err(e) = opts.set(&k, &v) {
            eprintln!("{}: {}", crate::dropin::prog(), crate::error::message(&e));
            return Err(CliError::new(format!("Invalid options for file format '{}'", fmt.name())));
        }
    }
    let size = match &a.size {
        Some(s) => Some(parse_num(s).ok_or_else(|| {
            CliError::new("Invalid image size specified. Must be between 0 and 9223372036854775807.")
        })?),
        None => None,
    };
    if size.is_some() && a.file.is_some() {
        return Err(CliError::new("--size N cannot be used together with a filename."));
    }
    let img = match &a.file {
        Some(f) => {
            let format = parse_format(a.format.as_deref())?;
            Some(open_image(f, &OpenOptions::default().format(format))?)
        }
        None => None,
    };
    let mut m = measure(img.as_ref(), size, &opts)?;
    let objects = crate::object::Objects::parse(&a.objects.objects)?;
    let encryption = if luks || fmt == Format::Qcow2 { enc.resolve(&objects)? } else { None };
    if let Some(crate::encrypt_opts::Encryption::Luks(p, _)) = encryption {
        // The header and key material, in whole clusters inside qcow2.
        let unit = if luks { 1 } else { opts.cluster_size };
        let extra = p.volume_len().div_ceil(unit) * unit;
        m.required += extra;
        m.fully_allocated += extra;
    }
    if json {
        let mut o = Map::new();
        if let Some(b) = m.bitmaps {
            o.insert("bitmaps".into(), Value::from(b));
        }
        o.insert("required".into(), Value::from(m.required));
        o.insert("fully-allocated".into(), Value::from(m.fully_allocated));
        println!("{}", qemu_json(&Value::Object(o)));
    } else {
        println!("required size: {}", m.required);
        println!("fully allocated size: {}", m.fully_allocated);
        if let Some(b) = m.bitmaps {
            println!("bitmaps size: {b}");
        }
    }
    Ok(0)
}
