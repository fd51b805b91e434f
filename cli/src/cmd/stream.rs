//! `oxcow stream`: copy everything the backing chain provides into a qcow2
//! image, then rewrite its header without a backing file so it stands
//! alone. Interrupted runs resume where they stopped (ranges the image
//! already holds are skipped).

use crate::error::{CliError, CliResult};
use crate::progress::Progress;
use crate::util::{open_image, parse_format, parse_num};
use oxcow::tools::stream::{stream, StreamOptions};
use oxcow::{Format, OpenOptions};

#[derive(clap::Args)]
pub struct Args {
    /// Show progress.
    #[arg(short = 'p')]
    progress: bool,
    /// Copy at most this many bytes per second (size suffixes allowed, e.g. 10M).
    #[arg(long = "rate", value_name = "BYTES/S")]
    rate: Option<String>,
    /// Image format (only qcow2 images have a backing file to stream from).
    #[arg(short = 'f')]
    format: Option<String>,
    /// Copy the data but keep the backing file name in the header.
    #[arg(long = "keep-backing")]
    keep_backing: bool,
    /// Do not follow backing file names that point to the network
    /// (nbd://...); followed by default since streaming from a network
    /// base is what this command is for.
    #[arg(long = "no-network-backing")]
    no_network_backing: bool,
    /// Quiet: print nothing but errors.
    #[arg(short = 'q')]
    quiet: bool,
    #[command(flatten)]
    objects: crate::image_opts::ObjectArgs,
    /// Image file.
    file: String,
}

pub fn run(mut a: Args) -> CliResult<i32> {
    a.objects.apply(&mut a.file, &mut a.format)?;
    let format = parse_format(a.format.as_deref())?;
    let rate = match a.rate.as_deref() {
        None => None,
        Some(r) => match parse_num(r) {
            Some(0) | None => return Err(CliError::new(format!("Invalid rate '{r}': expected a positive byte count"))),
            Some(n) => Some(n),
        },
    };
    let opts = OpenOptions::default().format(format).write(true).allow_network_backing(!a.no_network_backing);
    let img = open_image(&a.file, &opts)?;
    if img.format() != Format::Qcow2 {
        return Err(CliError::new(format!("'{}' is not a qcow2 image: there is no backing file to stream", a.file)));
    }
    let q = img.qcow2().ok_or_else(|| CliError::new("not a qcow2 image"))?;
    if q.backing_file().is_none() {
        if !a.quiet {
            println!("Image '{}' has no backing file; nothing to stream.", a.file);
        }
        return Ok(0);
    }
    let sopts = StreamOptions::default().rate(rate).detach(!a.keep_backing);
    let progress = Progress::new(a.progress && !a.quiet);
    let report = stream(q, &sopts, &mut |p| progress.update(p.done, p.total))
        .map_err(|e| CliError::new(format!("Streaming '{}' failed: {}", a.file, crate::error::message(&e))))?;
    progress.finish();
    img.device().close()?;
    if !a.quiet {
        let what = if report.detached { "; the image no longer has a backing file" } else { "" };
        println!("Streamed {} bytes into '{}'{what}.", report.copied, a.file);
    }
    Ok(0)
}
