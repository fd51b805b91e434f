//! `oxcow amend`: change options of an existing image (like `qemu-img
//! amend`): compat, lazy_refcounts, refcount_bits, backing_file,
//! backing_fmt, size.

use crate::error::{CliError, CliResult};
use crate::util::parse_format;
use oxcow::qcow2::{amend, AmendOptions};
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
    /// Show progress (accepted for compatibility).
    #[arg(short = 'p')]
    progress: bool,
    /// Quiet.
    #[arg(short = 'q')]
    quiet: bool,
    /// Allow amendments QEMU deems unsafe (accepted for compatibility).
    #[arg(long = "force")]
    force: bool,
    /// Image file.
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

pub fn run(a: Args) -> CliResult<i32> {
    let _ = (a.cache, a.progress, a.quiet, a.force);
    if a.options.is_empty() {
        return Err(CliError::new("Must specify options (-o)\nTry 'oxcow amend --help' for more info"));
    }
    let opts = AmendOptions::parse(&a.options.join(",")).map_err(CliError::from)?;
    let file = open_rw(&a.file, LockMode::writer())?;
    let format = match parse_format(a.format.as_deref())? {
        Some(f) => f,
        None => oxcow::probe_format(&*file)?,
    };
    if format != Format::Qcow2 {
        return Err(CliError::new(format!("Format driver '{}' does not support option amendment", format.name())));
    }
    let hc = oxcow::qcow2::read_header_cluster(&*file)?;
    let data_file = match hc.extensions.data_file.as_deref().filter(|_| hc.header.has_data_file()) {
        // QEMU opens the data file by its name relative to the working
        // directory.
        Some(name) => Some(open_rw(name, LockMode::data_file(true))?),
        None => None,
    };
    amend(file, data_file, &opts)?;
    Ok(0)
}
