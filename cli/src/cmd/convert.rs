//! `oxcow convert`: copies an image's contents into a new (or, with `-n`,
//! an existing) raw or qcow2 image, leaving zero ranges as holes.

use crate::error::{CliError, CliResult};
use crate::progress::Progress;
use crate::util::{open_image, parse_format, parse_num};
use oxcow::tools::convert::{copy, copy_compressed_over, data_len, CopyOptions};
use oxcow::{Format, OpenOptions};

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
    /// Show progress.
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
    /// Source cache mode (default writeback).
    #[arg(short = 'T', long = "source-cache")]
    src_cache: Option<String>,
    /// Target cache mode (default unsafe, as qemu-img: no flush at the end).
    #[arg(short = 't', long = "target-cache")]
    cache: Option<String>,
    /// Open the source even if another process has it open for writing.
    #[arg(short = 'U', long = "force-share")]
    force_share: bool,
    /// Out-of-order writes: chunks are written as soon as they are read
    /// (by default they are written in guest order).
    #[arg(short = 'W')]
    unordered: bool,
    /// Convert an internal snapshot of the source: `snapshot.name=NAME`,
    /// `snapshot.id=ID`, or a bare name or id.
    #[arg(short = 'l')]
    snapshot_param: Option<String>,
    #[command(flatten)]
    objects: crate::image_opts::ObjectArgs,
    /// Copy the source's persistent bitmaps (qcow2 to qcow2).
    #[arg(long = "bitmaps")]
    bitmaps: bool,
    /// With --bitmaps: skip bitmaps left inconsistent instead of failing.
    #[arg(long = "skip-broken-bitmaps")]
    skip_broken_bitmaps: bool,
    /// Source image, then target. One value per occurrence, so options
    /// may come between them as getopt allows.
    files: Vec<String>,
    /// Copy offloading (accepted: the copy is the same either way).
    #[arg(short = 'C')]
    copy_offload: bool,
    /// Go on past read errors (only QEMU's refusal beside -C is given).
    #[arg(long = "salvage")]
    salvage: bool,
}

pub fn run(mut a: Args) -> CliResult<i32> {
    crate::opt_help::check_lists(&a.options)?;
    if crate::opt_help::wants_help(&a.options) {
        let target = a.files.last().filter(|_| a.files.len() > 1).map(String::as_str);
        print!("{}", crate::opt_help::create_help(&a.out_format, target)?);
        return Ok(0);
    }
    if a.copy_offload {
        if a.sparse.is_some() {
            return Err(CliError::new("Cannot enable copy offloading when -S is used"));
        }
        if a.compress {
            return Err(CliError::new("Cannot enable copy offloading when -c is used"));
        }
        if a.salvage {
            return Err(CliError::new("Cannot use copy offloading in salvaging mode"));
        }
    }
    if a.salvage {
        return Err(CliError::new("--salvage is not supported by oxcow"));
    }
    if a.files.is_empty() {
        return Err(CliError::new("Must specify image file name"));
    }
    if let Some(target) = a.files.get(1).filter(|d| d.starts_with("s3://")).cloned() {
        if a.no_create {
            return Err(CliError::new("-n cannot write into an existing S3 object"));
        }
        return crate::remote_upload::convert_to_s3(&target, |tmp| {
            a.files[1] = tmp;
            run(a)
        });
    }
    a.objects.apply(&mut a.files[0], &mut a.format)?;
    let _ = a.quiet;
    let cache_mode = |v: &Option<String>, default: &str| {
        v.as_deref().unwrap_or(default).parse::<oxcow::CacheMode>().map_err(|e| CliError::new(e.to_string()))
    };
    let src_cache = cache_mode(&a.src_cache, "writeback")?;
    let dst_cache = cache_mode(&a.cache, "unsafe")?;
    let (src_paths, dst_path) = match a.files.as_slice() {
        [_] => return Err(CliError::new("Must specify image file name")),
        [s @ .., d] => (s, d),
        [] => return Err(CliError::new("Must specify image file name")),
    };
    if a.no_create && !a.options.is_empty() {
        return Err(CliError::new("-o has no effect when skipping image creation"));
    }
    if src_paths.len() > 1 && a.backing.is_some() {
        return Err(CliError::new(
            "Having a backing file for the target makes no sense when concatenating multiple input images",
        ));
    }
    if src_paths.len() > 1 && a.bitmaps {
        return Err(CliError::new("Copying bitmaps only possible with single source"));
    }
    let out_fmt =
        a.out_format.parse::<Format>().map_err(|_| CliError::new(format!("Unknown file format '{}'", a.out_format)))?;
    if a.backing.is_some() && !matches!(out_fmt, Format::Qcow2 | Format::Qed) {
        return Err(CliError::new(format!("Backing file not supported for file format '{}'", out_fmt.name())));
    }
    let min_sparse = match &a.sparse {
        Some(s) => parse_num(s).ok_or_else(|| CliError::new("Invalid buffer size for sparse output specified"))?,
        None => 4096,
    };
    let src_fmt = parse_format(a.format.as_deref())?;
    let mut srcs = Vec::with_capacity(src_paths.len());
    for p in src_paths {
        srcs.push(open_image(p, &OpenOptions::default().format(src_fmt).force_share(a.force_share).cache(src_cache))?);
    }
    let src = &srcs[0];
    let devs: Vec<&dyn oxcow::BlockDevice> = srcs.iter().map(|s| &**s.device()).collect();
    let concat = crate::cmd::convert_concat::Concat::new(&devs);
    let snap_name = a.snapshot_param.as_deref().map(snapshot_name).transpose()?;
    let snap_dev = match &snap_name {
        Some(n) => {
            let q = src.qcow2().ok_or_else(|| CliError::new("This image format does not support snapshots"))?;
            Some(
                q.snapshot_device(n)
                    .map_err(|e| CliError::new(format!("Failed to load snapshot: {}", crate::error::message(&e))))?,
            )
        }
        None => None,
    };
    if snap_dev.is_some() && devs.len() > 1 {
        return Err(CliError::new("No support for concatenating multiple snapshot"));
    }
    let sdev: &dyn oxcow::BlockDevice = match &snap_dev {
        Some(d) => &**d,
        None if devs.len() > 1 => &concat,
        None => src.device(),
    };
    let size = sdev.len();
    if a.skip_broken_bitmaps && !a.bitmaps {
        return Err(CliError::new("--skip-broken-bitmaps requires --bitmaps"));
    }
    if a.bitmaps {
        check_bitmaps(src, out_fmt, a.skip_broken_bitmaps)?;
    }

    if !a.no_create {
        let bfmt = a.backing_format.clone();
        // qemu-img no longer probes a -B file's format: it must
        // be given, by -F or -o backing_fmt.
        let fmt_in_options = crate::util::parse_options(&a.options)?.iter().any(|(k, _)| k == "backing_fmt");
        if a.backing.is_some() && bfmt.is_none() && !fmt_in_options {
            return Err(CliError::new("Use of backing file requires explicit backing format"));
        }
        crate::cmd::create::create_target(
            dst_path,
            out_fmt,
            a.options.clone(),
            a.backing.clone(),
            bfmt,
            size,
            a.objects.objects.clone(),
        )?;
    }
    let dst = open_image(dst_path, &OpenOptions::default().format(Some(out_fmt)).write(true).cache(dst_cache))?;
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
    // `-o backing_file=` names the target's backing file as -B does, and
    // qemu-img then copies only what differs from it just the same.
    let backing_opt = crate::util::parse_options(&a.options)?.iter().any(|(k, _)| k == "backing_file");
    let base = if (a.backing.is_some() || backing_opt) && !a.no_create { ddev.backing() } else { None };

    let progress = Progress::new(a.progress);
    if a.compress {
        let q = dst.qcow2().ok_or_else(|| CliError::new("Compression not supported for this file format"))?;
        // With -B, what the source leaves to its backing file is left to
        // the target's, and zeros over it are kept (iotest 122); an
        // existing target (-n) gets its zeros written too; -S 0 compresses
        // clusters of zeros as well (other -S values are ignored, as by
        // qemu-img: zeros are found by whole clusters).
        let o = CopyOptions::default().zero_granularity(min_sparse).existing_target(a.no_create).base(base);
        copy_compressed_over(sdev, q, &o, &mut |pos| progress.update(pos, size))
            .map_err(|e| CliError::new(format!("error while compressing: {}", crate::error::message(&e))))?;
        progress.finish();
        dst.close()?;
        return Ok(0);
    }
    let werr = |e: oxcow::Error| CliError::new(format!("error while converting: {}", crate::error::message(&e)));
    // A new raw LUKS payload reads as noise, not zeros (QEMU's luks has
    // no zero init either): its zero ranges are written like an existing
    // target's.
    // Nor does a preallocated encrypted qcow2 (iotest 188): its allocated
    // clusters decrypt to noise.
    let prealloc = crate::util::parse_options(&a.options)?.iter().any(|(k, v)| k == "preallocation" && v != "off");
    let encrypted = crate::util::parse_options(&a.options)?.iter().any(|(k, _)| k == "encrypt.format");
    let no_zero_init = a.no_create || out_fmt == Format::Luks || (prealloc && encrypted);
    // qemu-img's percentages are of the data to copy, counted first.
    if a.progress {
        progress.set_total(data_len(sdev).map_err(werr)?);
    }
    let chunk_done = |n| progress.add(n);
    let o = CopyOptions::default()
        .zero_granularity(gran)
        .existing_target(no_zero_init)
        .base(base)
        .unordered(a.unordered)
        .chunk_done(Some(&chunk_done as &(dyn Fn(u64) + Sync)));
    copy(sdev, ddev, &o, &mut |_| {}).map_err(werr)?;
    progress.finish();
    if a.bitmaps {
        if let (Some(s), Some(d)) = (src.qcow2(), dst.qcow2()) {
            for name in d.copy_bitmaps_from(s, a.skip_broken_bitmaps)? {
                eprintln!("{}: warning: Skipping inconsistent bitmap '{name}'", crate::dropin::prog());
            }
        }
    }
    dst.close().map_err(werr)?;
    Ok(0)
}

/// `--bitmaps` refusals, before the target is created: a target format
/// without bitmaps, a source bitmap left in use (unless skipped).
fn check_bitmaps(src: &oxcow::Image, out: Format, skip: bool) -> CliResult<()> {
    if out != Format::Qcow2 {
        return Err(CliError::new(format!("Format driver '{}' does not support bitmaps", out.name())));
    }
    let Some(q) = src.qcow2() else { return Ok(()) };
    // QEMU goes through the bitmaps last in the directory first.
    if let Some(b) = q.bitmaps()?.into_iter().rev().find(|b| b.in_use) {
        if !skip {
            return Err(CliError::new(format!(
                "Cannot copy inconsistent bitmap '{}'\nTry --skip-broken-bitmaps, or use 'qemu-img bitmap --remove' to delete it",
                b.name
            )));
        }
    }
    Ok(())
}

/// The snapshot named by a `-l` parameter list.
fn snapshot_name(p: &str) -> CliResult<String> {
    if !p.contains('=') {
        return Ok(p.to_string());
    }
    let mut name = None;
    for (k, v) in crate::util::parse_options(&[p.to_string()])? {
        match k.as_str() {
            "snapshot.name" | "snapshot.id" => name = Some(v),
            _ => return Err(CliError::new(format!("Invalid parameter '{k}'"))),
        }
    }
    name.ok_or_else(|| CliError::new("Failed to load snapshot: no snapshot given"))
}
