//! `oxcow`: a qemu-img / qemu-io compatible command-line tool over the oxcow
//! library. Each subcommand lives in its own module under `cmd/`; started
//! as `qemu-img`, `qemu-io` or `qemu-nbd` it takes that tool's command
//! line instead (`dropin/`).

#![deny(unsafe_code)]

mod broken_pipe;
mod cmd;
mod dropin;
mod encrypt_opts;
mod error;
mod image_opts;
mod keyslot_opts;
mod object;
mod opt_help;
mod progress;
mod qcow2_cache_opts;
mod remote_opts;
mod remote_upload;
mod storage_daemon;
mod util;

use clap::{Parser, Subcommand};
use std::process::ExitCode;

#[derive(Parser)]
// A repeated option overrides the earlier one, as getopt-based qemu-img's do.
#[command(
    name = "oxcow",
    version,
    about = "qcow2 image tool compatible with qemu-img and qemu-io",
    args_override_self = true
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Show information about an image (like `qemu-img info`).
    Info(cmd::info::Args),
    /// Show the allocation map of an image (like `qemu-img map`).
    Map(cmd::map::Args),
    /// Compare the contents of two images (like `qemu-img compare`).
    Compare(cmd::compare::Args),
    /// Convert an image to raw or qcow2 (like `qemu-img convert`).
    Convert(cmd::convert::Args),
    /// Create a new image (like `qemu-img create`).
    Create(cmd::create::Args),
    /// Check an image for consistency (like `qemu-img check`).
    Check(cmd::check::Args),
    /// Run qemu-io commands on an image (like `qemu-io`).
    Io(cmd::io::Args),
    /// Run a simple image benchmark (like `qemu-img bench`).
    Bench(cmd::bench::Args),
    /// Export an image over NBD (like `qemu-nbd`).
    Serve(cmd::serve::Args),
    /// List, create, apply or delete internal snapshots (like `qemu-img snapshot`).
    Snapshot(cmd::snapshot::Args),
    /// Commit an overlay's data into its backing image (like `qemu-img commit`).
    Commit(cmd::commit::Args),
    /// Change an image's backing file (like `qemu-img rebase`).
    Rebase(cmd::rebase::Args),
    /// Change an image's virtual size (like `qemu-img resize`).
    Resize(cmd::resize::Args),
    /// Change format options of an image (like `qemu-img amend`).
    Amend(cmd::amend::Args),
    /// Copy an image block by block, dd-style (like `qemu-img dd`).
    Dd(cmd::dd::Args),
    /// Compute the size a new image needs (like `qemu-img measure`).
    Measure(cmd::measure::Args),
    /// Change persistent dirty bitmaps (like `qemu-img bitmap`).
    Bitmap(cmd::bitmap::Args),
    /// Copy the backing chain into the image and drop the backing file.
    Stream(cmd::stream::Args),
    /// Serve images to VMs and NBD clients (like `qemu-storage-daemon`).
    StorageDaemon(storage_daemon::Args),
    /// Create qemu-img, qemu-io, qemu-nbd and qemu-storage-daemon links to
    /// this binary in DIR.
    InstallLinks(dropin::links::Args),
}

fn main() -> ExitCode {
    broken_pipe::install();
    let argv: Vec<std::ffi::OsString> = std::env::args_os().collect();
    if let Some(tool) = dropin::tool_for(argv.first()) {
        return dropin::run(tool, argv);
    }
    ExitCode::from(run_args(argv))
}

/// Whether oxcow has this subcommand (the drop-in fronts offer QEMU's
/// commands that oxcow implements, whichever those are at build time).
pub(crate) fn has_subcommand(name: &str) -> bool {
    use clap::CommandFactory;
    Cli::command().find_subcommand(name).is_some()
}

/// Parses an `oxcow` command line (program name first) and runs it;
/// returns the exit status.
pub(crate) fn run_args<I, T>(argv: I) -> u8
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    let cli = match Cli::try_parse_from(argv) {
        Ok(c) => c,
        Err(e) => {
            use clap::error::ErrorKind;
            if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) {
                let _ = e.print();
                return 0;
            }
            if e.kind() == ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand {
                let _ = e.print();
                return 1;
            }
            if let Some(msg) = dropin::usage_error(&e) {
                eprint!("{msg}");
                return 1;
            }
            // Usage errors stay on one line, like every other error.
            let text = e.render().to_string();
            let mut lines = text.lines().map(str::trim).filter(|l| !l.is_empty());
            let first = lines.next().unwrap_or("invalid arguments");
            let mut msg = first.strip_prefix("error: ").unwrap_or(first).to_string();
            if msg.ends_with(':') {
                // clap lists what is missing on the next line.
                if let Some(next) = lines.next() {
                    msg = format!("{msg} {next}");
                }
            }
            eprintln!("{}: {msg}", dropin::prog());
            return 1;
        }
    };
    let r = match cli.command {
        Command::Info(a) => cmd::info::run(a),
        Command::Map(a) => cmd::map::run(a),
        Command::Compare(a) => cmd::compare::run(a),
        Command::Convert(a) => cmd::convert::run(a),
        Command::Create(a) => cmd::create::run(a),
        Command::Check(a) => cmd::check::run(a),
        Command::Io(a) => cmd::io::run(a),
        Command::Bench(a) => cmd::bench::run(a),
        Command::Serve(a) => cmd::serve::run(a),
        Command::Snapshot(a) => cmd::snapshot::run(a),
        Command::Commit(a) => cmd::commit::run(a),
        Command::Rebase(a) => cmd::rebase::run(a),
        Command::Resize(a) => cmd::resize::run(a),
        Command::Amend(a) => cmd::amend::run(a),
        Command::Measure(a) => cmd::measure::run(a),
        Command::Dd(a) => cmd::dd::run(a),
        Command::Bitmap(a) => cmd::bitmap::run(a),
        Command::Stream(a) => cmd::stream::run(a),
        Command::StorageDaemon(a) => storage_daemon::run(a),
        Command::InstallLinks(a) => dropin::links::run(a),
    };
    report_host_io();
    match r {
        Ok(code) => code as u8,
        Err(e) => {
            eprintln!("{}: {}", dropin::prog(), e.msg);
            e.code as u8
        }
    }
}

/// With `OXCOW_REPORT_HOST_IO` set, tells on stderr how many write requests
/// and syncs the files of this run sent to the host: how the cache-mode
/// tests see what `-t` really does, without tracing system calls.
fn report_host_io() {
    if std::env::var_os("OXCOW_REPORT_HOST_IO").is_some() {
        let c = oxcow::storage::host_io_counts();
        eprintln!("{}: host I/O: {} writes, {} syncs", dropin::prog(), c.writes, c.syncs);
    }
}
