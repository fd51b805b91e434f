//! The other disk formats QEMU reads: QED, VDI, VPC (VHD), VMDK and VHDX.
//!
//! Each format has a folder with its on-disk parser (total: any bytes give
//! a value or an error, fields are checked before they size anything) and a
//! [`Layout`] saying where each guest byte lives. [`mapped::MappedImage`]
//! turns a layout into a [`BlockDevice`](crate::BlockDevice), so reading,
//! block status and everything built on them (convert, compare, map,
//! measure, serve) work over every format without special cases.
//!
//! oxcow writes none of these formats yet: [`crate::open`] refuses to
//! open them for writing before a byte changes, so no command can treat
//! one as raw or damage it half way.

pub(crate) mod mapped;
pub mod probe;
pub mod qed;
pub mod vdi;
pub mod vhdx;
pub mod vmdk;
pub mod vpc;

use crate::storage::Storage;
use crate::{Error, Result};
use std::path::Path;
use std::sync::Arc;

pub use mapped::{Layout, Piece};

/// What an opened image in one of these formats says about itself.
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub struct FormatInfo {
    /// The allocation unit qemu-img reports as `cluster_size`.
    pub cluster_size: Option<u64>,
    /// The backing (parent) file name recorded in the image.
    pub backing_name: Option<String>,
    /// The backing file's format as recorded (or implied) by the image.
    pub backing_format: Option<String>,
    /// Fields of qemu-img's `format-specific` block, in its order.
    pub specific: Vec<(&'static str, InfoValue)>,
    /// The image was not closed cleanly, as qemu-img info shows it.
    pub dirty: bool,
    /// Files other than the image's own that hold its data (VMDK
    /// extents), as opened.
    pub extent_files: Vec<std::path::PathBuf>,
}

/// A value of a format-specific information field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InfoValue {
    /// A number.
    U64(u64),
    /// A string.
    Str(String),
    /// A flag.
    Bool(bool),
    /// A list of records (VMDK extents).
    List(Vec<Vec<(&'static str, InfoValue)>>),
}

/// Opens the other files an image names (VMDK extents), with the access
/// the image itself was opened with.
pub type OpenExtra<'a> = dyn Fn(&Path) -> Result<Arc<dyn Storage>> + 'a;

/// An opened image: its layout and what it says about itself.
pub struct Opened {
    /// Where the guest's bytes are.
    pub layout: Arc<dyn Layout>,
    /// What `info` shows.
    pub info: FormatInfo,
}

impl std::fmt::Debug for Opened {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Opened").field("info", &self.info).finish_non_exhaustive()
    }
}

/// Reads exactly `buf.len()` bytes at `offset` of a file, mapping the
/// error to what was being read.
pub(crate) fn read_exact(file: &dyn Storage, buf: &mut [u8], offset: u64, what: &str) -> Result<()> {
    file.read_at(buf, offset).map_err(|e| Error::io(format!("reading {what}"), e))
}

/// Reads `len` bytes at `offset` after checking `len` against a bound, so
/// that no header field sizes an allocation unchecked.
pub(crate) fn read_vec(file: &dyn Storage, offset: u64, len: u64, max: u64, what: &str) -> Result<Vec<u8>> {
    if len > max {
        return Err(Error::invalid(format!("{what} too large ({len} bytes)")));
    }
    let mut v = vec![0u8; len as usize];
    read_exact(file, &mut v, offset, what)?;
    Ok(v)
}

pub(crate) fn le16(b: &[u8], off: usize) -> u16 {
    let mut a = [0u8; 2];
    if let Some(s) = b.get(off..off + 2) {
        a.copy_from_slice(s);
    }
    u16::from_le_bytes(a)
}

pub(crate) fn le32(b: &[u8], off: usize) -> u32 {
    let mut a = [0u8; 4];
    if let Some(s) = b.get(off..off + 4) {
        a.copy_from_slice(s);
    }
    u32::from_le_bytes(a)
}

pub(crate) fn le64(b: &[u8], off: usize) -> u64 {
    let mut a = [0u8; 8];
    if let Some(s) = b.get(off..off + 8) {
        a.copy_from_slice(s);
    }
    u64::from_le_bytes(a)
}

pub(crate) fn be16(b: &[u8], off: usize) -> u16 {
    let mut a = [0u8; 2];
    if let Some(s) = b.get(off..off + 2) {
        a.copy_from_slice(s);
    }
    u16::from_be_bytes(a)
}

pub(crate) fn be32(b: &[u8], off: usize) -> u32 {
    let mut a = [0u8; 4];
    if let Some(s) = b.get(off..off + 4) {
        a.copy_from_slice(s);
    }
    u32::from_be_bytes(a)
}

pub(crate) fn be64(b: &[u8], off: usize) -> u64 {
    let mut a = [0u8; 8];
    if let Some(s) = b.get(off..off + 8) {
        a.copy_from_slice(s);
    }
    u64::from_be_bytes(a)
}

/// The most a table read at open may take (QEMU's own limits are lower
/// for every format; this only bounds what a hostile header can ask).
pub(crate) const MAX_TABLE_BYTES: u64 = 256 << 20;
