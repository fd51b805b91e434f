//! Persistent dirty bitmaps as a user sees them: the bitmap directory's
//! entries (names, granularity, flags), not the bitmaps' contents.

use super::Qcow2;
use crate::format::bitmap::{parse_directory, BitmapDirEntry, FLAG_AUTO, FLAG_IN_USE};
use crate::{Error, Result};

/// One persistent bitmap of an image, as `qemu-img info` lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct BitmapInfo {
    /// The bitmap's name.
    pub name: String,
    /// Bytes of guest data per bit.
    pub granularity: u64,
    /// Not saved cleanly: its contents cannot be trusted (`in-use`).
    pub in_use: bool,
    /// Tracks every write while the image is in use (`auto`).
    pub auto: bool,
}

impl Qcow2 {
    /// The persistent bitmaps listed in the bitmap directory, in its
    /// order (none without a bitmaps extension).
    pub fn bitmaps(&self) -> Result<Vec<BitmapInfo>> {
        Ok(self
            .bitmap_directory()?
            .into_iter()
            .map(|e| BitmapInfo {
                granularity: e.granularity(),
                in_use: e.flags & FLAG_IN_USE != 0,
                auto: e.flags & FLAG_AUTO != 0,
                name: e.name,
            })
            .collect())
    }

    /// Reads and parses the bitmap directory (its size was bounded when
    /// the header extension was parsed).
    pub(crate) fn bitmap_directory(&self) -> Result<Vec<BitmapDirEntry>> {
        let Some(ext) = self.extensions().bitmaps else { return Ok(Vec::new()) };
        let len = usize::try_from(ext.directory_size)
            .map_err(|_| Error::field("bitmap_directory_size", ext.directory_size, "too large"))?;
        let mut dir = vec![0u8; len];
        self.file.read_at(&mut dir, ext.directory_offset).map_err(|e| Error::io("reading bitmap directory", e))?;
        parse_directory(&dir, ext.nb_bitmaps)
    }
}
