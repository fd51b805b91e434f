//! `oxcow convert`: copies an image's contents into a new (or, with `-n`,
//! an existing) raw or qcow2 image, leaving zero ranges as holes.

use crate::util::{open_image, parse_format, parse_num, CliError, CliResult};
use oxcow::device::chain_status;
use oxcow::image::{resolve_backing, OpenOptions};
use oxcow::BlockDevice;
use std::path::Path;

#[derive(clap::Args)]
pub struct Args {
    /// Source format (probed when omitted).
    #[arg(short = 'f')]
    format: Option<String>,
    /// Output format (raw or qcow2).
    #[arg(short = 'O', default_value = "raw")]
    out_format: String,
    /// Output format options, `key=value,...` (repeatable).
    #[arg(short = 'o')]
    options: Vec<String>,
    /// Show a progress bar on stderr.
    #[arg(short = 'p')]
    progress: bool,
    /// Quiet.
    #[arg(short = 'q')]
    quiet: bool,
    /// Minimum run of zeros that is left sparse (default 4k; 0 writes everything).
    #[arg(short = 'S')]
    sparse: Option<String>,
    /// Write into an existing target instead of creating it.
    #[arg(short = 'n')]
    no_create: bool,
    /// Backing file of the output: only what differs from it is written.
    #[arg(short = 'B')]
    backing: Option<String>,
    /// Format of the backing file given with -B.
    #[arg(short = 'F')]
    backing_format: Option<String>,
    /// Compress the output (qcow2).
    #[arg(short = 'c')]
    compress: bool,
    /// Source cache mode (accepted for compatibility).
    #[arg(short = 'T')]
    src_cache: Option<String>,
    /// Target cache mode (accepted for compatibility).
    #[arg(short = 't')]
    cache: Option<String>,
    /// Force sharing (accepted for compatibility).
    #[arg(short = 'U', long = "force-share")]
    force_share: bool,
    /// Out-of-order writes (accepted for compatibility).
    #[arg(short = 'W')]
    unordered: bool,
    /// Source image, then target.
    #[arg(required = true, num_args = 2)]
    files: Vec<String>,
}

const CHUNK: u64 = 2 << 20;

pub fn run(a: Args) -> CliResult<i32> {
    let _ = (a.src_cache, a.cache, a.force_share, a.unordered, a.quiet);
    let [src_path, dst_path] = [&a.files[0], &a.files[1]];
    if a.compress {
        return Err(CliError::new("Compression is not supported by oxcow yet"));
    }
    let out_fmt = match a.out_format.as_str() {
        f @ ("raw" | "qcow2") => f,
        other => return Err(CliError::new(format!("Unknown file format '{other}'"))),
    };
    if a.backing.is_some() && out_fmt != "qcow2" {
        return Err(CliError::new(format!("Backing file not supported for file format '{out_fmt}'")));
    }
    if a.backing.is_some() && a.no_create {
        return Err(CliError::new("-B makes no sense when -n is used"));
    }
    let min_sparse = match &a.sparse {
        Some(s) => parse_num(s).ok_or_else(|| CliError::new("Invalid buffer size for sparse output specified"))?,
        None => 4096,
    };
    let src_fmt = parse_format(a.format.as_deref())?;
    let src = open_image(src_path, &OpenOptions { format: src_fmt, ..Default::default() })?;
    let sdev = src.device();
    let size = sdev.len();

    if !a.no_create {
        let mut bfmt = a.backing_format.clone();
        if let (Some(b), None) = (&a.backing, &bfmt) {
            // qemu-img convert probes the backing format when not given.
            let bp = resolve_backing(Path::new(dst_path), b);
            let bi = open_image(&bp.display().to_string(), &OpenOptions::default())?;
            bfmt = Some(bi.format().name().to_string());
        }
        crate::cmd::create::create_target(dst_path, out_fmt, a.options.clone(), a.backing.clone(), bfmt, size)?;
    }
    let out_format = parse_format(Some(out_fmt))?;
    let dst = open_image(dst_path, &OpenOptions { format: out_format, write: true, ..Default::default() })?;
    let ddev = dst.device();
    if a.no_create && ddev.len() < size {
        return Err(CliError::new("Error while writing to target: the target is smaller than the source"));
    }
    // Zero-detection granularity: whole clusters for qcow2, so the target
    // never holds half-written clusters.
    let gran = match dst.qcow2() {
        Some(q) if min_sparse > 0 => min_sparse.max(q.cluster_size()),
        _ => min_sparse,
    };
    let base = if a.backing.is_some() { ddev.backing() } else { None };

    let bar = if a.progress {
        let b = indicatif::ProgressBar::with_draw_target(Some(size), indicatif::ProgressDrawTarget::stderr());
        b.set_style(
            indicatif::ProgressStyle::with_template("    ({percent}.00/100%) [{bar:40}] {bytes}/{total_bytes}")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        Some(b)
    } else {
        None
    };
    let werr = |e: oxcow::Error| CliError::new(format!("error while writing at byte: {e}"));
    let rerr = |e: oxcow::Error| CliError::new(format!("error while reading: {e}"));
    let mut buf = vec![0u8; CHUNK as usize];
    let mut bbuf = vec![0u8; if base.is_some() { CHUNK as usize } else { 0 }];
    let mut pos = 0;
    while pos < size {
        let st = chain_status(sdev, pos, (size - pos).min(CHUNK)).map_err(rerr)?;
        let n = st.length.max(1).min(size - pos);
        let data = &mut buf[..n as usize];
        if st.zero {
            data.fill(0);
        } else {
            sdev.read_at(data, pos).map_err(rerr)?;
        }
        if let Some(b) = base {
            // Only what differs from the backing file goes into the target.
            let bd = &mut bbuf[..n as usize];
            oxcow::device::read_backing(Some(b), bd, pos).map_err(rerr)?;
            let step = gran.max(512) as usize;
            for (i, (x, y)) in data.chunks(step).zip(bd.chunks(step)).enumerate() {
                if x != y {
                    let at = pos + (i * step) as u64;
                    if x.iter().all(|&v| v == 0) {
                        ddev.write_zeroes(at, x.len() as u64, false).map_err(werr)?;
                    } else {
                        ddev.write_at(x, at).map_err(werr)?;
                    }
                }
            }
        } else if st.zero && min_sparse > 0 {
            if a.no_create {
                ddev.write_zeroes(pos, n, true).map_err(werr)?;
            }
        } else if gran == 0 {
            ddev.write_at(data, pos).map_err(werr)?;
        } else {
            write_sparse(ddev, data, pos, gran as usize, a.no_create).map_err(werr)?;
        }
        pos += n;
        if let Some(b) = &bar {
            b.set_position(pos);
        }
    }
    if let Some(b) = bar {
        b.finish();
    }
    dst.close().map_err(werr)?;
    Ok(0)
}

/// Writes `data` at `pos`, skipping blocks of zeros (which a new target
/// already reads as zeros); runs of non-zero blocks are written together.
fn write_sparse(dev: &dyn BlockDevice, data: &[u8], pos: u64, gran: usize, existing: bool) -> oxcow::Result<()> {
    // Blocks are aligned to the device, not to the chunk.
    let mut i = 0usize;
    let mut run_start: Option<usize> = None;
    let flush_run = |s: usize, e: usize| dev.write_at(&data[s..e], pos + s as u64);
    while i < data.len() {
        let abs = pos + i as u64;
        let end = (((abs / gran as u64) + 1) * gran as u64 - pos).min(data.len() as u64) as usize;
        let blk = &data[i..end];
        if blk.iter().all(|&v| v == 0) {
            if let Some(s) = run_start.take() {
                flush_run(s, i)?;
            }
            if existing {
                dev.write_zeroes(abs, blk.len() as u64, true)?;
            }
        } else if run_start.is_none() {
            run_start = Some(i);
        }
        i = end;
    }
    if let Some(s) = run_start {
        flush_run(s, data.len())?;
    }
    Ok(())
}
