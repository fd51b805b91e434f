//! `oxcow compare`: qemu-img compare's messages and exit codes
//! (0 identical, 1 different, 2 error).

use crate::error::{CliError, CliResult};
use crate::util::{open_image, parse_format};
use oxcow::tools::compare::{first_difference, first_nonzero, Difference};
use oxcow::OpenOptions;

#[derive(clap::Args)]
pub struct Args {
    /// Format of the first image.
    #[arg(short = 'f')]
    format_a: Option<String>,
    /// Format of the second image.
    #[arg(short = 'F')]
    format_b: Option<String>,
    /// Strict: sizes and allocation must match too.
    #[arg(short = 's')]
    strict: bool,
    /// Quiet.
    #[arg(short = 'q')]
    quiet: bool,
    /// Progress (accepted; compare is quick).
    #[arg(short = 'p')]
    progress: bool,
    /// Open even if another process has the images open for writing.
    #[arg(short = 'U', long = "force-share")]
    force_share: bool,
    #[command(flatten)]
    objects: crate::image_opts::ObjectArgs,
    /// First image.
    a: String,
    /// Second image.
    b: String,
}

pub fn run(mut a: Args) -> CliResult<i32> {
    let _ = a.progress;
    let e2 = |e: CliError| e.with_code(2);
    a.objects.apply(&mut a.a, &mut a.format_a).map_err(e2)?;
    a.objects.apply(&mut a.b, &mut a.format_b).map_err(e2)?;
    let fa = parse_format(a.format_a.as_deref()).map_err(e2)?;
    let fb = parse_format(a.format_b.as_deref()).map_err(e2)?;
    let share = a.force_share;
    let ia = open_image(&a.a, &OpenOptions::default().format(fa).force_share(share)).map_err(e2)?;
    let ib = open_image(&a.b, &OpenOptions::default().format(fb).force_share(share)).map_err(e2)?;
    // qemu-img's report goes to stdout, which C buffers on a pipe: its
    // lines come after a read error's message. Kept until the end here
    // for the same order.
    let mut out = Vec::new();
    let code = compare(&a, &ia, &ib, &mut out);
    if !a.quiet {
        for m in out {
            println!("{m}");
        }
    }
    code
}

fn compare(a: &Args, ia: &oxcow::Image, ib: &oxcow::Image, out: &mut Vec<String>) -> CliResult<i32> {
    let (da, db) = (ia.device(), ib.device());
    let (la, lb) = (da.len(), db.len());
    if la != lb && a.strict {
        out.push("Strict mode: Image size mismatch!".into());
        return Ok(1);
    }
    let common = la.min(lb);
    let failed = |second: bool, offset: u64, errno: i32| {
        let e = std::io::Error::from_raw_os_error(errno);
        let name = if second { &a.b } else { &a.a };
        eprintln!(
            "{}: Error while reading offset {offset} of {name}: {}",
            crate::dropin::prog(),
            crate::error::os_message(&e)
        );
        Ok(4)
    };
    match first_difference(da, db, common, a.strict).map_err(|e| CliError::from(e).with_code(2))? {
        // qemu-img names the sector, not the byte.
        Some(Difference::Content(off)) => {
            out.push(format!("Content mismatch at offset {}!", off / 512 * 512));
            return Ok(1);
        }
        Some(Difference::Allocation(off)) => {
            out.push(format!("Strict mode: Offset {off} block status mismatch!"));
            return Ok(1);
        }
        Some(Difference::Unreadable { second, offset, errno }) => return failed(second, offset, errno),
        None => {}
    }
    if la == lb {
        out.push("Images are identical.".into());
        return Ok(0);
    }
    // qemu-img warns of the sizes only once the common part matched; the
    // longer image must then read as zeros past the end of the shorter one.
    out.push("Warning: Image size mismatch!".into());
    let (longer, second) = if la > lb { (da, false) } else { (db, true) };
    match first_nonzero(longer, common).map_err(|e| CliError::from(e).with_code(2))? {
        Some(Difference::Unreadable { offset, errno, .. }) => return failed(second, offset, errno),
        Some(Difference::Content(off)) | Some(Difference::Allocation(off)) => {
            out.push(format!("Content mismatch at offset {}!", off / 512 * 512));
            return Ok(1);
        }
        None => {}
    }
    out.push("Images are identical.".into());
    Ok(0)
}
