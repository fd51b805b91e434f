//! `oxcow commit`: write an overlay's data into its backing image (like
//! `qemu-img commit`).

use crate::error::{CliError, CliResult};
use crate::util::parse_format;
use oxcow::tools::commit::{commit, CommitOptions};
use std::io::Write;
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
    /// Image file.
    file: String,
}

/// qemu-img's progress line, rewritten in place.
pub fn progress_printer(enabled: bool) -> impl FnMut(u64, u64) {
    let mut last = -1.0f64;
    move |done, total| {
        if !enabled {
            return;
        }
        let pct = if total == 0 { 100.0 } else { done as f64 * 100.0 / total as f64 };
        if pct - last >= 1.0 || (pct >= 100.0 && last < 100.0) || last < 0.0 {
            print!("    ({pct:.2}/100%)\r");
            let _ = std::io::stdout().flush();
            last = pct;
        }
    }
}

pub fn run(a: Args) -> CliResult<i32> {
    let _ = (a.cache, a.rate);
    let opts = CommitOptions {
        format: parse_format(a.format.as_deref())?,
        base: a.base.map(PathBuf::from),
        keep_overlay: a.drop,
    };
    let show = a.progress && !a.quiet;
    let mut p = progress_printer(show);
    commit(std::path::Path::new(&a.file), &opts, &mut p).map_err(CliError::from)?;
    if show {
        println!();
    }
    if !a.quiet {
        println!("Image committed.");
    }
    Ok(0)
}
