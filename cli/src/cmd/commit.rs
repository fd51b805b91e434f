//! `oxcow commit`: write an overlay's data into its backing image (like
//! `qemu-img commit`).

use crate::error::{CliError, CliResult};
use crate::progress::Progress;
use crate::util::parse_format;
use oxcow::tools::commit::{commit, CommitOptions};
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct Args {
    /// Image format.
    #[arg(short = 'f')]
    format: Option<String>,
    /// Cache mode (accepted for compatibility).
    #[arg(short = 't')]
    cache: Option<String>,
    /// Commit down to this image of the backing chain (implies -d).
    #[arg(short = 'b')]
    base: Option<String>,
    /// Keep the overlay's data (do not empty it).
    #[arg(short = 'd')]
    drop: bool,
    /// Show progress.
    #[arg(short = 'p')]
    progress: bool,
    /// Rate limit (accepted for compatibility, ignored).
    #[arg(short = 'r')]
    rate: Option<String>,
    /// Quiet.
    #[arg(short = 'q')]
    quiet: bool,
    #[command(flatten)]
    objects: crate::image_opts::ObjectArgs,
    /// Image file.
    file: String,
}

pub fn run(mut a: Args) -> CliResult<i32> {
    a.objects.apply(&mut a.file, &mut a.format)?;
    let _ = (a.cache, a.rate);
    let mut opts = CommitOptions::default()
        .format(parse_format(a.format.as_deref())?)
        .base(a.base.map(PathBuf::from))
        .keep_overlay(a.drop);
    let keys = crate::object::secret::with_key(&a.file, oxcow::OpenOptions::default());
    (opts.key_secret, opts.backing_keys) = (keys.key_secret, keys.backing_keys);
    let progress = Progress::new(a.progress && !a.quiet);
    commit(std::path::Path::new(&a.file), &opts, &mut |done, total| progress.update(done, total))
        .map_err(CliError::from)?;
    progress.finish();
    if !a.quiet {
        println!("Image committed.");
    }
    Ok(0)
}
