//! Drop-in mode: the same binary answers as `qemu-img`, `qemu-io`,
//! `qemu-nbd` and `qemu-storage-daemon` when started under one of those names (a symlink or hard
//! link; argv[0]'s file name decides). Each front here takes that tool's
//! whole command line, parses it the way the tool does (getopt_long, its
//! words for usage errors, its `--help`/`--version` shapes) and hands an
//! equivalent `oxcow SUBCOMMAND` command line to the ordinary parser, so
//! the behaviour lives in one place (`cmd/`) and only the language
//! differs. Messages then carry the tool's name as their prefix
//! ([`prog`]), as QEMU's tools print theirs.

pub mod getopt;
mod img;
mod io;
pub mod links;
mod nbd;
mod nbd_list;

use std::ffi::OsString;
use std::process::ExitCode;
use std::sync::OnceLock;

/// The QEMU release whose command languages oxcow speaks; `--version`
/// names it so that scripts parsing "version X.Y.Z" see what they test for.
pub const QEMU_VERSION: &str = "10.0.2";

/// The names oxcow answers to besides its own.
pub const TOOL_NAMES: [&str; 4] = ["qemu-img", "qemu-io", "qemu-nbd", "qemu-storage-daemon"];

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Tool {
    Img,
    Io,
    Nbd,
    StorageDaemon,
}

impl Tool {
    pub fn name(self) -> &'static str {
        match self {
            Tool::Img => "qemu-img",
            Tool::Io => "qemu-io",
            Tool::Nbd => "qemu-nbd",
            Tool::StorageDaemon => "qemu-storage-daemon",
        }
    }
}

static PROG: OnceLock<&'static str> = OnceLock::new();
static ARGV0: OnceLock<String> = OnceLock::new();

/// argv[0] as given: glibc's getopt and qemu-img's "Try ... --help" hint
/// quote it whole, where message prefixes use the tool's name.
pub fn argv0() -> &'static str {
    ARGV0.get().map_or_else(prog, String::as_str)
}

/// The prefix of every message: the tool's name in drop-in mode, else `oxcow`.
pub fn prog() -> &'static str {
    PROG.get().copied().unwrap_or("oxcow")
}

/// Whether this run answers as one of QEMU's tools (messages that are
/// oxcow's own additions stay quiet then, as the scripts comparing
/// output expect QEMU's lines only).
pub fn active() -> bool {
    PROG.get().is_some()
}

/// The tool named by argv[0]'s file name, if it is one of QEMU's. A name
/// with a suffix after the tool's name (`qemu-img-10`, `qemu-img.exe`) is
/// not taken: packagers name such copies on purpose.
pub fn tool_for(argv0: Option<&OsString>) -> Option<Tool> {
    let name = std::path::Path::new(argv0?).file_name()?.to_str()?;
    match name {
        "qemu-img" => Some(Tool::Img),
        "qemu-io" => Some(Tool::Io),
        "qemu-nbd" => Some(Tool::Nbd),
        "qemu-storage-daemon" => Some(Tool::StorageDaemon),
        _ => None,
    }
}

/// Runs the tool's front over the whole command line (argv[0] included).
pub fn run(tool: Tool, argv: Vec<OsString>) -> ExitCode {
    let _ = PROG.set(tool.name());
    let _ = ARGV0.set(argv.first().map(|a| a.to_string_lossy().into_owned()).unwrap_or_default());
    let args: Vec<String> = argv.iter().skip(1).map(|a| a.to_string_lossy().into_owned()).collect();
    let code = match tool {
        Tool::Img => img::run(&args),
        Tool::Io => io::run(&args),
        Tool::Nbd => nbd::run(&args),
        Tool::StorageDaemon => storage_daemon(&args),
    };
    ExitCode::from(code)
}

/// qemu-storage-daemon's command line is already `oxcow storage-daemon`'s,
/// so only the version option needs its own answer here.
fn storage_daemon(args: &[String]) -> u8 {
    if args.iter().any(|a| a == "-V" || a == "--version") {
        print!("{}", version_text(Tool::StorageDaemon));
        return 0;
    }
    let argv = ["oxcow", "storage-daemon"].into_iter().map(String::from).chain(args.iter().cloned());
    crate::run_args(argv)
}

/// `--version` in the tool's shape; the parenthesis, where distributions
/// put their package version, says what really answers.
fn version_text(tool: Tool) -> String {
    let ours = env!("CARGO_PKG_VERSION");
    match tool {
        Tool::Nbd => format!(
            "qemu-nbd {QEMU_VERSION} (oxcow {ours})\nWritten by the oxcow developers.\n\n\
             oxcow is licensed under MIT OR Apache-2.0; it answers as qemu-nbd.\n"
        ),
        t => {
            format!("{} version {QEMU_VERSION} (oxcow {ours})\noxcow is licensed under MIT OR Apache-2.0.\n", t.name())
        }
    }
}

static SUBCOMMAND: OnceLock<String> = OnceLock::new();

/// A usage error of a qemu-img subcommand's options in the words
/// getopt_long and qemu-img use (`qemu-img info: unrecognized option
/// '--foo'`, then where to find help); None outside drop-in mode or for
/// errors the subcommand words itself.
pub fn usage_error(e: &clap::Error) -> Option<String> {
    use clap::error::{ContextKind, ContextValue, ErrorKind};
    let sub = SUBCOMMAND.get()?;
    let what = match e.kind() {
        ErrorKind::UnknownArgument => match e.get(ContextKind::InvalidArg) {
            Some(ContextValue::String(a)) if a.starts_with("--") => {
                let name = a.split_once('=').map_or(a.as_str(), |(n, _)| n);
                format!("unrecognized option '{name}'")
            }
            Some(ContextValue::String(a)) => {
                format!("invalid option -- '{}'", a.trim_start_matches('-').chars().next().unwrap_or('-'))
            }
            _ => return None,
        },
        ErrorKind::MissingRequiredArgument if matches!(sub.as_str(), "info" | "check" | "map" | "commit") => {
            "Expecting one image file name".to_string()
        }
        _ => return None,
    };
    let a = argv0();
    let head = if what.starts_with("Expecting") { prog().to_string() } else { format!("{a} {sub}") };
    Some(format!("{head}: {what}\nTry '{a} {sub} --help' for more info\n"))
}

/// Runs an `oxcow` command line (program name first) through the normal
/// parser and subcommands.
fn oxcow(args: Vec<String>) -> u8 {
    crate::run_args(args)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tool_names_by_file_name_only() {
        let t = |s: &str| tool_for(Some(&OsString::from(s)));
        assert_eq!(t("/usr/local/bin/qemu-img"), Some(Tool::Img));
        assert_eq!(t("qemu-io"), Some(Tool::Io));
        assert_eq!(t("./qemu-nbd"), Some(Tool::Nbd));
        assert_eq!(t("oxcow"), None);
        assert_eq!(t("/x/qemu-img-10"), None);
        assert_eq!(t("/qemu-img/oxcow"), None);
    }
}
