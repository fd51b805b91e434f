//! `oxcow bench`: qemu-img bench's flags and output over the library's
//! bench tool; `-d` requests are truly in flight (one thread each).

use crate::error::{CliError, CliResult};
use crate::util::{open_image, parse_format, parse_num};
use oxcow::tools::bench::{self, BenchOptions};
use oxcow::{CacheMode, OpenOptions};

#[derive(clap::Args)]
pub struct Args {
    /// Number of requests.
    #[arg(short = 'c', long = "count", default_value = "75000")]
    count: String,
    /// Requests in flight.
    #[arg(short = 'd', long = "depth", default_value = "64")]
    depth: String,
    /// Image format.
    #[arg(short = 'f', long = "format")]
    format: Option<String>,
    /// Flush after this many write requests.
    #[arg(long = "flush-interval")]
    flush_interval: Option<String>,
    /// Don't wait for requests in flight before a flush.
    #[arg(long = "no-drain")]
    no_drain: bool,
    /// AIO backend (threads, native, io_uring): oxcow always uses threads.
    #[arg(short = 'i', long = "aio")]
    aio: Option<String>,
    /// Native AIO (accepted; oxcow uses threads).
    #[arg(short = 'n', long = "native")]
    native: bool,
    /// First offset.
    #[arg(short = 'o', long = "offset", default_value = "0")]
    offset: String,
    /// Byte written by write requests.
    #[arg(long = "pattern")]
    pattern: Option<String>,
    /// Quiet.
    #[arg(short = 'q', long = "quiet")]
    quiet: bool,
    /// Bytes per request.
    #[arg(short = 's', long = "buffer-size", default_value = "4096")]
    size: String,
    /// Offset increment between requests (default: the request size).
    #[arg(short = 'S', long = "step-size")]
    step: Option<String>,
    /// Cache mode.
    #[arg(short = 't', long = "cache", default_value = "writeback")]
    cache: String,
    /// Write instead of read.
    #[arg(short = 'w', long = "write")]
    write: bool,
    /// Open without conflicting with a writer (reads only).
    #[arg(short = 'U', long = "force-share")]
    force_share: bool,
    #[command(flatten)]
    objects: crate::image_opts::ObjectArgs,
    /// Image file.
    file: String,
}

fn num(what: &str, s: &str) -> CliResult<u64> {
    parse_num(s).ok_or_else(|| CliError::new(format!("Invalid {what} specified")))
}

pub fn run(mut a: Args) -> CliResult<i32> {
    a.objects.apply(&mut a.file, &mut a.format)?;
    if let Some(aio) = &a.aio {
        if !matches!(aio.as_str(), "threads" | "native" | "io_uring") {
            return Err(CliError::new(format!("Invalid aio option: {aio}")));
        }
    }
    let _ = a.native;
    let count = num("request count", &a.count)?;
    let depth = num("queue depth", &a.depth)?;
    if depth == 0 || depth > 4096 {
        return Err(CliError::new("Invalid queue depth specified"));
    }
    let size = num("buffer size", &a.size)?;
    if size == 0 || size > (1 << 30) {
        return Err(CliError::new("Invalid buffer size specified"));
    }
    let step = match &a.step {
        Some(s) => num("step size", s)?,
        None => size,
    };
    let offset = num("offset", &a.offset)?;
    let pattern = match &a.pattern {
        Some(p) => {
            u8::try_from(num("pattern byte", p)?).map_err(|_| CliError::new("Invalid pattern byte specified"))?
        }
        None => 0,
    };
    let flush_interval = match &a.flush_interval {
        Some(s) => num("flush interval", s)?,
        None => 0,
    };
    if (flush_interval > 0 || a.no_drain || a.pattern.is_some()) && !a.write {
        return Err(CliError::new("--pattern, --flush-interval and --no-drain are only allowed with -w"));
    }
    if a.force_share && a.write {
        return Err(CliError::new("--force-share/-U is not allowed with -w"));
    }
    let cache = a.cache.parse::<CacheMode>().map_err(|e| CliError::new(e.to_string()))?;
    let opts = OpenOptions::default()
        .format(parse_format(a.format.as_deref())?)
        .write(a.write)
        .cache(cache)
        .force_share(a.force_share);
    let img = open_image(&a.file, &opts)?;
    let o = BenchOptions::default()
        .count(count)
        .depth(depth as usize)
        .offset(offset)
        .size(size)
        .step(step)
        .write(a.write)
        .pattern(pattern)
        .flush_interval(flush_interval)
        .drain(!a.no_drain);
    if !a.quiet {
        println!(
            "Sending {} {} requests, {} bytes each, {} in parallel (starting at offset {}, step size {})",
            count,
            if a.write { "write" } else { "read" },
            size,
            depth,
            offset,
            step
        );
    }
    let elapsed = bench::run(img.device(), &o)?;
    if !a.quiet {
        println!("Run completed in {:.3} seconds.", elapsed.as_secs_f64());
    }
    img.close()?;
    Ok(0)
}
