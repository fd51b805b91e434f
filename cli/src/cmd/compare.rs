//! `oxcow compare`: qemu-img compare's messages and exit codes
//! (0 identical, 1 different, 2 error).

use crate::util::{open_image, parse_format, CliError, CliResult};
use oxcow::device::chain_status;
use oxcow::image::OpenOptions;
use oxcow::BlockDevice;

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
    /// Force sharing (accepted for compatibility).
    #[arg(short = 'U', long = "force-share")]
    force_share: bool,
    /// First image.
    a: String,
    /// Second image.
    b: String,
}

const CHUNK: u64 = 2 << 20;

pub fn run(a: Args) -> CliResult<i32> {
    let _ = (a.progress, a.force_share);
    let e2 = |e: CliError| e.with_code(2);
    let fa = parse_format(a.format_a.as_deref()).map_err(e2)?;
    let fb = parse_format(a.format_b.as_deref()).map_err(e2)?;
    let ia = open_image(&a.a, &OpenOptions { format: fa, ..Default::default() }).map_err(e2)?;
    let ib = open_image(&a.b, &OpenOptions { format: fb, ..Default::default() }).map_err(e2)?;
    let say = |m: String| {
        if !a.quiet {
            println!("{m}");
        }
    };
    let (da, db) = (ia.device(), ib.device());
    let (la, lb) = (da.len(), db.len());
    if la != lb {
        if a.strict {
            say("Strict mode: Image size mismatch!".into());
            return Ok(1);
        }
        say("Warning: Image size mismatch!".into());
    }
    let common = la.min(lb);
    match first_difference(da, db, common, a.strict).map_err(|e| CliError::from(e).with_code(2))? {
        Some(Diff::Content(off)) => {
            say(format!("Content mismatch at offset {off}!"));
            return Ok(1);
        }
        Some(Diff::Status(off)) => {
            say(format!("Strict mode: Offset {off} block status mismatch!"));
            return Ok(1);
        }
        None => {}
    }
    // The longer image must read as zeros past the end of the shorter one.
    let longer = if la > lb { da } else { db };
    if let Some(off) = first_nonzero(longer, common).map_err(|e| CliError::from(e).with_code(2))? {
        say(format!("Content mismatch at offset {off}!"));
        return Ok(1);
    }
    say("Images are identical.".into());
    Ok(0)
}

enum Diff {
    Content(u64),
    Status(u64),
}

/// The first sector (512 bytes, as qemu-img reports) that differs.
fn first_difference(a: &dyn BlockDevice, b: &dyn BlockDevice, len: u64, strict: bool) -> oxcow::Result<Option<Diff>> {
    let mut pos = 0;
    let mut ba = vec![0u8; CHUNK as usize];
    let mut bb = vec![0u8; CHUNK as usize];
    while pos < len {
        let sa = chain_status(a, pos, (len - pos).min(CHUNK))?;
        let sb = chain_status(b, pos, (len - pos).min(CHUNK))?;
        let n = sa.length.min(sb.length).max(1).min(len - pos);
        if strict && sa.allocated != sb.allocated {
            return Ok(Some(Diff::Status(pos)));
        }
        if !(sa.zero && sb.zero) {
            let (xa, xb) = (&mut ba[..n as usize], &mut bb[..n as usize]);
            if sa.zero {
                xa.fill(0);
            } else {
                a.read_at(xa, pos)?;
            }
            if sb.zero {
                xb.fill(0);
            } else {
                b.read_at(xb, pos)?;
            }
            if let Some(i) = xa.iter().zip(xb.iter()).position(|(x, y)| x != y) {
                return Ok(Some(Diff::Content((pos + i as u64) / 512 * 512)));
            }
        }
        pos += n;
    }
    Ok(None)
}

fn first_nonzero(d: &dyn BlockDevice, from: u64) -> oxcow::Result<Option<u64>> {
    let len = d.len();
    let mut pos = from;
    let mut buf = vec![0u8; CHUNK as usize];
    while pos < len {
        let st = chain_status(d, pos, (len - pos).min(CHUNK))?;
        let n = st.length.max(1).min(len - pos);
        if !st.zero {
            let x = &mut buf[..n as usize];
            d.read_at(x, pos)?;
            if let Some(i) = x.iter().position(|&v| v != 0) {
                return Ok(Some((pos + i as u64) / 512 * 512));
            }
        }
        pos += n;
    }
    Ok(None)
}
