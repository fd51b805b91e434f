//! `oxcow amend`: change options of an existing image (like `qemu-img
//! amend`): compat, lazy_refcounts, refcount_bits, backing_file,
//! backing_fmt, size, the data file's name and data_file_raw.

use crate::error::{CliError, CliResult};
use crate::util::parse_format;
use oxcow::qcow2::{AmendEvent, AmendOptions};
use oxcow::storage::{FileStorage, LockMode, OpenFlags, Storage};
use oxcow::Format;
use std::sync::Arc;

#[derive(clap::Args)]
pub struct Args {
    /// Image format.
    #[arg(short = 'f')]
    format: Option<String>,
    /// Options to change (key=value,...; may be repeated).
    #[arg(short = 'o')]
    options: Vec<String>,
    /// Cache mode (accepted for compatibility).
    #[arg(short = 't')]
    cache: Option<String>,
    /// Show progress.
    #[arg(short = 'p')]
    progress: bool,
    /// Quiet.
    #[arg(short = 'q')]
    quiet: bool,
    /// Allow amendments QEMU deems unsafe (accepted for compatibility).
    #[arg(long = "force")]
    force: bool,
    #[command(flatten)]
    objects: crate::image_opts::ObjectArgs,
    /// Image file (none with `-f FMT -o help`).
    #[arg(default_value = "")]
    file: String,
}

/// Opens a file for writing with a writer's QEMU-compatible lock, as
/// qemu-img amend holds it.
fn open_rw(path: &str, mode: LockMode) -> CliResult<Arc<dyn Storage>> {
    let flags = OpenFlags::default().write(true);
    let p = std::path::Path::new(path);
    let could_not_open = |cause: String| CliError::new(format!("Could not open '{path}': {cause}"));
    let mut f = FileStorage::open(p, flags).map_err(|e| could_not_open(crate::error::os_message(&e)))?;
    f.lock(p, mode).map_err(|e| could_not_open(crate::error::message(&e)))?;
    Ok(Arc::new(f))
}

pub fn run(mut a: Args) -> CliResult<i32> {
    let _ = a.cache;
    if a.options.is_empty() {
        return Err(CliError::new(format!(
            "Must specify options (-o)\nTry '{} amend --help' for more info",
            crate::dropin::argv0()
        )));
    }
    crate::opt_help::check_lists(&a.options)?;
    let help = crate::opt_help::wants_help(&a.options);
    if help {
        if let Some(f) = &a.format {
            print!("{}", crate::opt_help::amend_help(f)?);
            return Ok(0);
        }
    }
    if a.file.is_empty() {
        return Err(CliError::new("Expecting one image file name"));
    }
    a.objects.apply(&mut a.file, &mut a.format)?;
    let file = open_rw(&a.file, LockMode::writer())?;
    let format = match parse_format(a.format.as_deref())? {
        Some(f) => f,
        None => oxcow::probe_format(&*file)?,
    };
    if help {
        print!("{}", crate::opt_help::amend_help(format.name())?);
        return Ok(0);
    }
    // Key slot options (`encrypt.*` for qcow2, bare for raw LUKS) go to
    // the LUKS header; the rest to the qcow2 amend.
    let (keys, rest) = crate::keyslot_opts::split(&a.options, format == Format::Qcow2)?;
    if let Some(k) = keys {
        let objects = crate::object::Objects::parse(&a.objects.objects)?;
        let change = k.change(&objects, a.force)?;
        let current = crate::object::secret::with_key(&a.file, oxcow::OpenOptions::default()).key_secret;
        let (base, len) = match format {
            Format::Luks => {
                let mut b = vec![0u8; oxcow::crypto::luks::HEADER_LEN];
                file.read_at(&mut b, 0).map_err(|e| CliError::new(crate::error::os_message(&e)))?;
                let h = oxcow::crypto::LuksHeader::parse(&b)?;
                (0, u64::from(h.payload_offset) * oxcow::crypto::SECTOR)
            }
            Format::Qcow2 => {
                let hc = oxcow::qcow2::read_header_cluster(&*file)?;
                match (hc.header.crypt_method, hc.extensions.fde) {
                    (2, Some(f)) => (f.offset, f.length),
                    _ => return Err(CliError::new("Image is not LUKS-encrypted: no key slots to amend")),
                }
            }
            other => {
                return Err(CliError::new(format!(
                    "Format driver '{}' does not support option amendment",
                    other.name()
                )))
            }
        };
        oxcow::crypto::amend_keyslots(&*file, base, len, current.as_ref(), &change)?;
        if rest.is_empty() {
            return Ok(0);
        }
    }
    let opts = AmendOptions::parse(&rest.join(",")).map_err(CliError::from)?;
    if format != Format::Qcow2 {
        return Err(CliError::new(format!("Format driver '{}' does not support option amendment", format.name())));
    }
    let hc = oxcow::qcow2::read_header_cluster(&*file)?;
    // `data-file.filename` of `--image-opts` first, else the recorded
    // name, which QEMU opens relative to the working directory.
    let given = crate::qcow2_cache_opts::data_file(&a.file);
    let data_file = match given.or(hc.extensions.data_file.clone()).filter(|_| hc.header.has_data_file()) {
        Some(name) => Some(open_rw(&name, LockMode::data_file(true))?),
        None if hc.header.has_data_file() => {
            return Err(CliError::new(format!("Could not open '{}': 'data-file' is required for this image", a.file)))
        }
        None => None,
    };
    let key = crate::object::secret::with_key(&a.file, oxcow::OpenOptions::default()).key_secret;
    // The library names oxcow's own command; under a drop-in name the
    // hint names that tool's.
    // qemu-img prints progress only with -p, and -q silences it.
    let progress = crate::progress::Progress::new(a.progress && !a.quiet);
    let path = a.file.clone();
    let mut on = |ev: AmendEvent<'_>| match ev {
        AmendEvent::Repaired(r) => {
            if crate::dropin::active() {
                // QEMU's open prints its repair's lines.
                r.messages.iter().for_each(|m| eprintln!("{m}"));
            } else {
                eprintln!(
                    "{}: '{path}' was not closed cleanly (dirty bit set): refcounts repaired",
                    crate::dropin::prog()
                );
            }
        }
        AmendEvent::Progress { done, total } => progress.update(done, total),
        _ => {}
    };
    let r = oxcow::qcow2::amend_observed(file, data_file, &opts, key.as_ref(), &mut on);
    progress.finish();
    r.map_err(|e| {
        let hint = format!("'{} rebase'", crate::dropin::prog());
        CliError::new(crate::error::message(&e).replace("'oxcow rebase'", &hint))
    })?;
    Ok(0)
}
