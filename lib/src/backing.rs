//! Which backing files named inside an image are followed.
//!
//! A backing file name is data from the image, and images come from
//! anywhere: a name may point at a host file the user never meant to
//! expose, at a network service, or (QEMU's `json:`) at a whole block-layer
//! configuration. [`open`](crate::open) classifies every backing name
//! ([`BackingName`]) and asks the [`BackingPolicy`] of its
//! [`OpenOptions`](crate::OpenOptions) before opening anything. The
//! default, [`LocalBacking`], follows host files only; [`NetworkBacking`]
//! also follows NBD exports, HTTP(S) URLs and S3 objects. Names of external data files are never
//! followed to a protocol, whatever the policy.

use crate::nbd::client::NbdUrl;
use crate::{Error, Result};
use std::fmt;

/// What a name recorded inside an image points to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum BackingKind {
    /// A host file (relative names are relative to the image's directory).
    File,
    /// An NBD export: `nbd://HOST[:PORT]/NAME`, `nbd+tcp://`,
    /// `nbd+unix:///NAME?socket=PATH` or QEMU's legacy `nbd:HOST:PORT`.
    Nbd,
    /// An HTTP(S) URL (`http://`, `https://`), read through
    /// [`crate::remote`].
    Http,
    /// An S3 object, `s3://BUCKET/KEY`.
    S3,
    /// QEMU's `json:{...}` pseudo-protocol, a whole block-layer
    /// configuration; oxcow never follows it.
    Json,
    /// Any other protocol (`ssh://`, `ftp://`, ...); oxcow opens none.
    OtherProtocol,
}

/// In which role an image names a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum NameRole {
    /// A backing file, followed as the [`BackingPolicy`] decides.
    Backing,
    /// An external data file, never followed to a protocol.
    DataFile,
}

/// A backing file name as recorded in an image, classified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackingName {
    name: String,
    kind: BackingKind,
}

impl BackingName {
    /// Classifies `name`.
    pub fn new(name: impl Into<String>) -> BackingName {
        let name = name.into();
        let kind = if name.starts_with("json:") {
            BackingKind::Json
        } else if NbdUrl::is_nbd(&name) {
            BackingKind::Nbd
        } else if crate::remote::is_http(&name) {
            BackingKind::Http
        } else if crate::remote::s3::parse_name(&name).is_some() {
            BackingKind::S3
        } else if name.contains("://") {
            BackingKind::OtherProtocol
        } else {
            BackingKind::File
        };
        BackingName { name, kind }
    }
    /// The name as recorded.
    pub fn as_str(&self) -> &str {
        &self.name
    }
    /// What it points to.
    pub fn kind(&self) -> BackingKind {
        self.kind
    }
    /// Whether it names a protocol (anything but a host file).
    pub fn is_protocol(&self) -> bool {
        self.kind != BackingKind::File
    }
    /// Whether this is a `json:` name that comes down to one host file
    /// (see [`crate::json_name`]): followed as a host file is.
    pub fn is_local_json(&self) -> bool {
        self.kind == BackingKind::Json && crate::json_name::parse(&self.name).is_some_and(|r| r.is_ok())
    }
    /// The error refusing to follow this name as a backing file, saying
    /// `reason`.
    pub fn refused(&self, reason: impl Into<String>) -> Error {
        self.refused_as(NameRole::Backing, reason)
    }
    /// The error refusing to follow this name in `role`, saying `reason`.
    pub fn refused_as(&self, role: NameRole, reason: impl Into<String>) -> Error {
        Error::RefusedName { name: self.name.clone(), kind: self.kind, role, reason: reason.into() }
    }
}

impl fmt::Display for BackingName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name)
    }
}

/// Decides which backing files named inside images are followed.
pub trait BackingPolicy: fmt::Debug + Send + Sync {
    /// `Ok` to follow `name`, or the error that refuses it (which
    /// [`open`](crate::open) returns as is).
    fn check(&self, name: &BackingName) -> Result<()>;
}

/// The default policy: backing files on the host only (a `json:` name
/// whose tree comes down to one host file is one); every protocol, NBD
/// included, is refused.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LocalBacking;

impl BackingPolicy for LocalBacking {
    fn check(&self, name: &BackingName) -> Result<()> {
        if name.is_protocol() && !name.is_local_json() {
            return Err(name.refused(format!("backing file name '{name}' names a protocol; refusing to follow it")));
        }
        Ok(())
    }
}

/// Host files, NBD exports, HTTP(S) URLs and S3 objects are followed
/// (the CLI selects this with `OXCOW_ALLOW_NETWORK_BACKING=1`); `json:` and other protocols are
/// still refused.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NetworkBacking;

impl BackingPolicy for NetworkBacking {
    fn check(&self, name: &BackingName) -> Result<()> {
        match name.kind() {
            BackingKind::File | BackingKind::Nbd | BackingKind::Http | BackingKind::S3 => Ok(()),
            BackingKind::Json if name.is_local_json() => Ok(()),
            _ => Err(name.refused(format!(
                "backing file name '{name}' uses a protocol oxcow does not open; refusing to follow it"
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_classified() {
        for (name, kind) in [
            ("base.qcow2", BackingKind::File),
            ("/abs/base", BackingKind::File),
            ("dir/nbd:x", BackingKind::File),
            ("json:{\"driver\":\"file\"}", BackingKind::Json),
            ("nbd://h:1/e", BackingKind::Nbd),
            ("nbd+unix:///e?socket=/s", BackingKind::Nbd),
            ("nbd:localhost:10809", BackingKind::Nbd),
            ("http://example.invalid/x", BackingKind::Http),
            ("https://example.invalid/x", BackingKind::Http),
            ("s3://bucket/base.qcow2", BackingKind::S3),
            ("ssh://example.invalid/x", BackingKind::OtherProtocol),
        ] {
            assert_eq!(BackingName::new(name).kind(), kind, "{name}");
        }
    }

    #[test]
    fn policies_refuse_what_they_must() {
        let (file, nbd, json) =
            (BackingName::new("b.qcow2"), BackingName::new("nbd://h/e"), BackingName::new("json:{}"));
        assert!(LocalBacking.check(&file).is_ok());
        assert!(LocalBacking.check(&nbd).is_err());
        assert!(LocalBacking.check(&json).is_err());
        assert!(NetworkBacking.check(&file).is_ok());
        assert!(NetworkBacking.check(&nbd).is_ok());
        assert!(NetworkBacking.check(&json).is_err());
        assert!(NetworkBacking.check(&BackingName::new("ssh://h/x")).is_err());
        match LocalBacking.check(&nbd) {
            Err(Error::RefusedName { name, kind: BackingKind::Nbd, .. }) => assert_eq!(name, "nbd://h/e"),
            other => panic!("{other:?}"),
        }
    }
}
