//! The library's one error type.
//!
//! Kinds are kept apart on purpose: an [`Error::Io`] means the host failed us
//! (retrying or freeing space may help), an [`Error::Corrupt`] means the image
//! itself is damaged (only `check -r` helps), [`Error::Unsupported`] means a
//! valid image uses a feature oxcow does not implement, and
//! [`Error::InvalidArgument`] means the caller asked for something impossible.

use std::fmt;
use std::io;

/// Result alias used across the crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in oxcow.
#[derive(Debug)]
#[non_exhaustive]
pub enum Error {
    /// The host storage failed (EIO, ENOSPC, ...), with what we were doing.
    Io {
        /// What oxcow was doing when the I/O failed.
        context: String,
        /// The underlying operating-system error.
        source: io::Error,
    },
    /// A header or table field holds a value the format or QEMU's limits
    /// forbid; the image is refused before the value is used.
    InvalidField {
        /// The field's name as the specification spells it.
        field: &'static str,
        /// The value found.
        value: u64,
        /// Why it is refused.
        reason: String,
    },
    /// The image is damaged: a field or structure violates the format.
    Corrupt {
        /// Which structure or field is wrong.
        what: String,
        /// Where it is (byte offset in the image file), when known.
        offset: Option<u64>,
    },
    /// A valid image uses a feature oxcow does not implement.
    Unsupported(String),
    /// The caller's request cannot be carried out as asked.
    InvalidArgument(String),
    /// The image is read-only (opened so, or marked corrupt).
    ReadOnly(String),
    /// An earlier failure left the image's on-disk state unknown (a failed
    /// fsync, or a multi-step metadata operation that failed half way);
    /// the image refuses writes and flushes until it is reopened. Holds
    /// that first failure, whose errno every later refusal reports again.
    Poisoned(Box<Error>),
    /// Another user holds the image in a way that conflicts with ours
    /// (QEMU-compatible image locking); the message reads as qemu-img's.
    Locked(String),
    /// A file name recorded inside the image was not followed: the
    /// [`BackingPolicy`](crate::backing::BackingPolicy) refused a backing
    /// file, or a data file names a protocol.
    RefusedName {
        /// The name as recorded in the image.
        name: String,
        /// What it points to.
        kind: crate::backing::BackingKind,
        /// Whether it was named as a backing file or as a data file.
        role: crate::backing::NameRole,
        /// The whole message.
        reason: String,
    },
}

impl Error {
    /// An I/O error with context.
    pub fn io(context: impl Into<String>, source: io::Error) -> Self {
        Error::Io { context: context.into(), source }
    }
    /// A corruption at a known file offset.
    pub fn corrupt_at(what: impl Into<String>, offset: u64) -> Self {
        Error::Corrupt { what: what.into(), offset: Some(offset) }
    }
    /// A corruption without a precise offset.
    pub fn corrupt(what: impl Into<String>) -> Self {
        Error::Corrupt { what: what.into(), offset: None }
    }
    /// An unsupported feature.
    pub fn unsupported(what: impl Into<String>) -> Self {
        Error::Unsupported(what.into())
    }
    /// An invalid request.
    pub fn invalid(what: impl Into<String>) -> Self {
        Error::InvalidArgument(what.into())
    }
    /// True for host I/O failures.
    pub fn is_io(&self) -> bool {
        matches!(self, Error::Io { .. })
    }
    /// True when the image itself is damaged.
    pub fn is_corrupt(&self) -> bool {
        matches!(self, Error::Corrupt { .. } | Error::InvalidField { .. })
    }
    /// A field refused by validation.
    pub fn field(field: &'static str, value: u64, reason: impl Into<String>) -> Self {
        Error::InvalidField { field, value, reason: reason.into() }
    }
    /// True when the host ran out of space (ENOSPC, a quota, a file size
    /// limit), directly or as the cause of a poisoned image: freeing space
    /// and retrying may help.
    pub fn is_no_space(&self) -> bool {
        matches!(self.errno(), libc::ENOSPC | libc::EDQUOT | libc::EFBIG)
    }
    /// The errno this error maps to, for protocols that speak errno (NBD)
    /// and for messages: a host error keeps its own, also when it arrives
    /// without a raw code (as from an NBD client) and when it poisoned the
    /// image.
    pub fn errno(&self) -> i32 {
        match self {
            Error::Io { source, .. } => io_errno(source),
            Error::Poisoned(cause) => cause.errno(),
            Error::Corrupt { .. } | Error::InvalidField { .. } => libc::EIO,
            Error::Unsupported(_) => libc::ENOTSUP,
            Error::InvalidArgument(_) => libc::EINVAL,
            Error::ReadOnly(_) => libc::EPERM,
            Error::Locked(_) => libc::EAGAIN,
            Error::RefusedName { .. } => libc::EINVAL,
        }
    }
    /// A copy of this error, for returning the same failure again
    /// (poisoned images keep answering with the original error).
    pub fn duplicate(&self) -> Error {
        match self {
            Error::Io { context, source } => Error::Io {
                context: context.clone(),
                source: match source.raw_os_error() {
                    Some(code) => io::Error::from_raw_os_error(code),
                    None => io::Error::new(source.kind(), source.to_string()),
                },
            },
            Error::Corrupt { what, offset } => Error::Corrupt { what: what.clone(), offset: *offset },
            Error::InvalidField { field, value, reason } => {
                Error::InvalidField { field, value: *value, reason: reason.clone() }
            }
            Error::Unsupported(s) => Error::Unsupported(s.clone()),
            Error::InvalidArgument(s) => Error::InvalidArgument(s.clone()),
            Error::ReadOnly(s) => Error::ReadOnly(s.clone()),
            Error::Poisoned(cause) => Error::Poisoned(Box::new(cause.duplicate())),
            Error::Locked(s) => Error::Locked(s.clone()),
            Error::RefusedName { name, kind, role, reason } => {
                Error::RefusedName { name: name.clone(), kind: *kind, role: *role, reason: reason.clone() }
            }
        }
    }
}

/// The errno of a host error: its raw code, or one matching its kind
/// (errors rebuilt from a message, as an NBD client's are, have no code).
pub(crate) fn io_errno(e: &io::Error) -> i32 {
    if let Some(code) = e.raw_os_error() {
        return code;
    }
    use io::ErrorKind as K;
    match e.kind() {
        K::StorageFull => libc::ENOSPC,
        K::QuotaExceeded => libc::EDQUOT,
        K::FileTooLarge => libc::EFBIG,
        K::PermissionDenied => libc::EPERM,
        K::ReadOnlyFilesystem => libc::EROFS,
        K::OutOfMemory => libc::ENOMEM,
        K::InvalidInput => libc::EINVAL,
        K::Unsupported => libc::ENOTSUP,
        _ => libc::EIO,
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Io { context, source } => write!(f, "{context}: {source}"),
            Error::InvalidField { field, value, reason } => {
                write!(f, "invalid image: {field} = {value}: {reason}")
            }
            Error::Corrupt { what, offset: Some(off) } => {
                write!(f, "image is corrupt: {what} (at offset {off:#x})")
            }
            Error::Corrupt { what, offset: None } => write!(f, "image is corrupt: {what}"),
            Error::Unsupported(what) => write!(f, "unsupported: {what}"),
            Error::InvalidArgument(what) => write!(f, "{what}"),
            Error::ReadOnly(what) => write!(f, "read-only: {what}"),
            Error::Poisoned(cause) => write!(f, "image refuses writes after an earlier failure: {cause}"),
            Error::Locked(what) => write!(f, "{what}"),
            Error::RefusedName { reason, .. } => write!(f, "{reason}"),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Io { source, .. } => Some(source),
            Error::Poisoned(cause) => Some(&**cause),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn poisoned_keeps_the_first_failure_and_its_errno() {
        let cause = Error::io("writing L2 table", io::Error::from_raw_os_error(libc::ENOSPC));
        let p = Error::Poisoned(Box::new(cause));
        assert_eq!(p.errno(), libc::ENOSPC);
        assert!(p.is_no_space());
        assert!(p.to_string().contains("writing L2 table"), "{p}");
        let source = std::error::Error::source(&p).expect("the cause is the source");
        assert!(source.to_string().contains("writing L2 table"));
        let again = p.duplicate();
        assert_eq!(again.errno(), libc::ENOSPC);
        assert!(matches!(again, Error::Poisoned(_)));
    }

    #[test]
    fn host_errors_without_a_raw_code_map_by_kind() {
        let e = |k| Error::io("x", io::Error::new(k, "rebuilt"));
        assert_eq!(e(io::ErrorKind::StorageFull).errno(), libc::ENOSPC);
        assert_eq!(e(io::ErrorKind::QuotaExceeded).errno(), libc::EDQUOT);
        assert_eq!(e(io::ErrorKind::FileTooLarge).errno(), libc::EFBIG);
        assert_eq!(e(io::ErrorKind::Other).errno(), libc::EIO);
        assert!(!e(io::ErrorKind::Other).is_no_space());
        assert_eq!(Error::io("x", io::Error::from_raw_os_error(libc::EIO)).errno(), libc::EIO);
    }
}
