//! Errors as the user sees them: one line in qemu's words, with the exit
//! status to use. Library errors are put into words here and nowhere
//! else, by their kind.

use oxcow::backing::NameRole;
use oxcow::Error;
use std::fmt;

/// A failure reported to the user as one line, with the exit status to use.
#[derive(Debug)]
pub struct CliError {
    pub msg: String,
    pub code: i32,
}

impl CliError {
    pub fn new(msg: impl Into<String>) -> Self {
        CliError { msg: msg.into(), code: 1 }
    }
    pub fn with_code(mut self, code: i32) -> Self {
        self.code = code;
        self
    }
}

impl fmt::Display for CliError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.msg)
    }
}

impl From<Error> for CliError {
    fn from(e: Error) -> Self {
        CliError::new(message(&e))
    }
}

pub type CliResult<T> = Result<T, CliError>;

/// A library error as one line, with a hint where the user can act.
pub fn message(e: &Error) -> String {
    match e {
        // Refused by the default backing policy, which the environment
        // variable replaces (see `util::with_network_permission`).
        Error::RefusedName { role: NameRole::Backing, reason, .. } if !crate::util::network_backing_allowed() => {
            format!("{reason} (set OXCOW_ALLOW_NETWORK_BACKING=1 to allow network backing files)")
        }
        // An NBD server's refusal, worded whole as QEMU's client words it.
        Error::Io { source, .. } if oxcow::nbd::client::negotiation_message(source).is_some() => {
            oxcow::nbd::client::negotiation_message(source).map(str::to_string).unwrap_or_default()
        }
        // QEMU's tools print the reason alone, without the kind's label.
        Error::InvalidField { reason, .. } if crate::dropin::active() => reason.clone(),
        Error::Corrupt { what, .. } if crate::dropin::active() && what == "not a qcow2 image (bad magic)" => {
            "Image is not in qcow2 format".to_string()
        }
        Error::Unsupported(what) if crate::dropin::active() && what.starts_with("Unsupported qcow2 feature(s)") => {
            what.clone()
        }
        // An unknown format name, as qemu's block layer words it.
        Error::Unsupported(what) if crate::dropin::active() && what.contains("Unknown driver '") => what.clone(),
        other => without_os_codes(&other.to_string()),
    }
}

/// How a failed guest request reads: out of space, it is the host's own
/// words, as qemu-io prints them ("write failed: No space left on
/// device"), also when the image refuses writes because of it; anything
/// else as [`message`] words it.
pub fn request_message(e: &Error) -> String {
    // QEMU's block layer hands its callers an errno only; answering as
    // qemu-io, so does oxcow.
    if e.is_no_space() || crate::dropin::active() {
        return os_message(&std::io::Error::from_raw_os_error(e.errno()));
    }
    message(e)
}

/// An OS error in qemu's words.
pub fn os_message(e: &std::io::Error) -> String {
    without_os_codes(&e.to_string())
}

/// qemu's tools print an OS error as strerror says it; Rust's adds
/// " (os error N)", here and wherever a message quotes one.
fn without_os_codes(s: &str) -> String {
    let mut out = s.to_string();
    while let Some(start) = out.find(" (os error ") {
        match out[start..].find(')') {
            Some(end) => out.replace_range(start..start + end + 1, ""),
            None => break,
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn os_error_suffix_dropped() {
        let e = Error::io("x", std::io::Error::from_raw_os_error(libc::ENOENT));
        assert_eq!(message(&e), "x: No such file or directory");
    }

    #[test]
    fn refused_network_backing_says_how_to_allow_it() {
        let e = oxcow::backing::BackingName::new("nbd://h/x")
            .refused("backing file name 'nbd://h/x' names a protocol; refusing to follow it");
        assert!(message(&e).ends_with("(set OXCOW_ALLOW_NETWORK_BACKING=1 to allow network backing files)"));
    }
}
