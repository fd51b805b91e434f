//! `oxcow rebase`: change an image's backing file (like `qemu-img
//! rebase`): safe mode keeps the guest content, `-u` rewrites the name only.

use crate::error::{CliError, CliResult};
use crate::progress::Progress;
use crate::util::parse_format;
use oxcow::tools::rebase::{rebase, RebaseOptions};

#[derive(clap::Args)]
pub struct Args {
    /// Image format.
    #[arg(short = 'f')]
    format: Option<String>,
    /// Cache mode (accepted for compatibility).
    #[arg(short = 't')]
    cache: Option<String>,
    /// Source cache mode (accepted for compatibility).
    #[arg(short = 'T')]
    src_cache: Option<String>,
    /// New backing file ("" makes the image standalone).
    #[arg(short = 'b')]
    backing: Option<String>,
    /// Format of the new backing file.
    #[arg(short = 'F')]
    backing_format: Option<String>,
    /// Unsafe: rewrite the backing file name only.
    #[arg(short = 'u')]
    unsafe_mode: bool,
    /// Compress the clusters copied into the image (qcow2).
    #[arg(short = 'c')]
    compress: bool,
    /// Show progress.
    #[arg(short = 'p')]
    progress: bool,
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
    let _ = (a.cache, a.src_cache);
    if a.backing.is_none() && !a.unsafe_mode {
        return Err(CliError::new(
            "Must specify backing file (-b) or use unsafe mode (-u)\nTry 'oxcow rebase --help' for more info",
        ));
    }
    let mut opts = RebaseOptions::default()
        .format(parse_format(a.format.as_deref())?)
        .backing(a.backing)
        .backing_format(a.backing_format)
        .unsafe_mode(a.unsafe_mode)
        .compress(a.compress);
    let keys = crate::object::secret::with_key(&a.file, oxcow::OpenOptions::default());
    (opts.key_secret, opts.backing_keys) = (keys.key_secret, keys.backing_keys);
    let progress = Progress::new(a.progress && !a.quiet);
    rebase(std::path::Path::new(&a.file), &opts, &mut |done, total| progress.update(done, total))
        .map_err(CliError::from)?;
    progress.finish();
    Ok(0)
}
