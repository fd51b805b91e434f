//! `oxcow check`: placeholder until the library grows a checker.

use crate::util::{CliError, CliResult};

#[derive(clap::Args)]
pub struct Args {
    /// Image format.
    #[arg(short = 'f')]
    format: Option<String>,
    /// Repair mode (leaks or all).
    #[arg(short = 'r')]
    repair: Option<String>,
    /// Output format (human or json).
    #[arg(long = "output", default_value = "human")]
    output: String,
    /// Quiet.
    #[arg(short = 'q')]
    quiet: bool,
    /// Image file.
    file: String,
}

pub fn run(a: Args) -> CliResult<i32> {
    let _ = (a.format, a.repair, a.output, a.quiet, a.file);
    Err(CliError::new("check: not implemented yet"))
}
