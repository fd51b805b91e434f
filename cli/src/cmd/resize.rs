//! `oxcow resize`: change an image's virtual size (like `qemu-img resize`).

use crate::error::{CliError, CliResult};
use crate::util::{open_image, parse_format, parse_num};
use oxcow::qcow2::Preallocation;
use oxcow::{Format, OpenOptions};

#[derive(clap::Args)]
pub struct Args {
    /// Image format.
    #[arg(short = 'f')]
    format: Option<String>,
    /// Allow making the image smaller.
    #[arg(long = "shrink")]
    shrink: bool,
    /// Preallocation of the new area: off, metadata (qcow2), falloc, full.
    #[arg(long = "preallocation")]
    preallocation: Option<String>,
    /// Quiet.
    #[arg(short = 'q')]
    quiet: bool,
    #[command(flatten)]
    objects: crate::image_opts::ObjectArgs,
    /// Image file.
    file: String,
    /// New size, or +SIZE / -SIZE relative to the current one.
    #[arg(allow_hyphen_values = true)]
    size: String,
}

pub fn run(mut a: Args) -> CliResult<i32> {
    a.objects.apply(&mut a.file, &mut a.format)?;
    let prealloc = match a.preallocation.as_deref() {
        None => Preallocation::Off,
        Some(p) => {
            p.parse::<Preallocation>().map_err(|_| CliError::new(format!("Invalid preallocation mode '{p}'")))?
        }
    };
    let (sign, num) = match a.size.as_bytes().first() {
        Some(b'+') => (1i8, &a.size[1..]),
        Some(b'-') => (-1, &a.size[1..]),
        _ => (0, a.size.as_str()),
    };
    let n = parse_num(num).ok_or_else(|| {
        CliError::new(
            "Parameter 'size' expects a non-negative number below 2^64\n\
             Optional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, peta-\n\
             and exabytes, respectively.",
        )
    })?;
    let format = parse_format(a.format.as_deref())?;
    let img = open_image(&a.file, &OpenOptions::default().format(format).write(true))?;
    let cur = img.device().len();
    let new = match sign {
        0 => n,
        1 => cur.checked_add(n).ok_or_else(|| CliError::new("Image size must be less than 8 EiB!"))?,
        _ => match cur.checked_sub(n) {
            Some(v) if v > 0 => v,
            _ => return Err(CliError::new("New image size must be positive")),
        },
    };
    if new > i64::MAX as u64 {
        return Err(CliError::new("Image size must be less than 8 EiB!"));
    }
    // qemu-img refuses this before it looks at --shrink.
    if prealloc != Preallocation::Off && new <= cur {
        return Err(CliError::new("Preallocation can only be used for growing images"));
    }
    if new < cur && !a.shrink {
        return Err(CliError::new(
            "Use the --shrink option to perform a shrink operation.\n\
             oxcow: warning: Shrinking an image will delete all data beyond the shrunken image's end. \
             Before performing such an operation, make sure there is no important data there.",
        ));
    }
    match (img.format(), img.qcow2()) {
        (Format::Qcow2, Some(q)) if prealloc != Preallocation::Off => q.grow_preallocated(new, prealloc)?,
        (Format::Qcow2, Some(q)) => q.resize_to(new, true)?,
        _ => {
            // The other formats judge sizes themselves, in qemu's words.
            if img.format() == Format::Raw && new % 512 != 0 {
                return Err(CliError::new("The new size must be a multiple of 512"));
            }
            match (img.format(), prealloc) {
                (_, Preallocation::Off) => {}
                (Format::Raw, Preallocation::Metadata) => {
                    return Err(CliError::new("Unsupported preallocation mode: metadata"))
                }
                (Format::Raw, _) => {}
                (f, _) => {
                    return Err(CliError::new(format!(
                        "Preallocation mode '{}' is not supported by oxcow resize for {}",
                        a.preallocation.as_deref().unwrap_or_default(),
                        f.name()
                    )))
                }
            }
            img.device().resize(new)?;
            oxcow::qcow2::preallocate_file_range(img.file().as_ref(), cur, new, prealloc)?;
        }
    }
    img.close()?;
    if !a.quiet {
        println!("Image resized.");
    }
    Ok(0)
}
