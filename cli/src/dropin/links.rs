//! `oxcow install-links DIR`: puts the names oxcow answers to into a
//! directory, as links to this binary.

use crate::error::{os_message, CliError, CliResult};
use std::path::{Path, PathBuf};

#[derive(clap::Args)]
pub struct Args {
    /// Hard links instead of symbolic ones (for a binary that may move).
    #[arg(long)]
    hard: bool,
    /// Replace files of those names already in DIR.
    #[arg(long)]
    force: bool,
    /// Directory to put the links in (created if missing).
    dir: PathBuf,
}

pub fn run(a: Args) -> CliResult<i32> {
    let exe = std::env::current_exe()
        .and_then(|p| p.canonicalize())
        .map_err(|e| CliError::new(format!("finding own executable: {}", os_message(&e))))?;
    std::fs::create_dir_all(&a.dir).map_err(|e| CliError::new(format!("{}: {}", a.dir.display(), os_message(&e))))?;
    for name in super::TOOL_NAMES {
        let link = a.dir.join(name);
        install_one(&exe, &link, a.hard, a.force)?;
        println!("{} -> {}", link.display(), exe.display());
    }
    Ok(0)
}

fn install_one(exe: &Path, link: &Path, hard: bool, force: bool) -> CliResult<()> {
    let fail = |e: std::io::Error| CliError::new(format!("{}: {}", link.display(), os_message(&e)));
    if link.symlink_metadata().is_ok() {
        // Re-running is harmless: a name that already leads here is kept.
        let same = link.canonicalize().is_ok_and(|p| p == exe);
        if same && !force {
            return Ok(());
        }
        if !same && !force {
            return Err(CliError::new(format!(
                "{} exists and is not oxcow (use --force to replace it)",
                link.display()
            )));
        }
        std::fs::remove_file(link).map_err(fail)?;
    }
    if hard {
        std::fs::hard_link(exe, link).map_err(fail)
    } else {
        std::os::unix::fs::symlink(exe, link).map_err(fail)
    }
}
