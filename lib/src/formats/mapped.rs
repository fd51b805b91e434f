//! A read-only [`BlockDevice`] over any format's [`Layout`]: the one place
//! reads, block status and write refusals are written for every format.

use crate::device::{check_range, read_backing, BlockDevice, BlockStatus};
use crate::storage::Storage;
use crate::{Error, Result};
use std::sync::Arc;

/// Where a run of guest bytes lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Piece {
    /// Stored as is in file number `file` of the layout at `host`.
    Data {
        /// Index into [`Layout::files`].
        file: usize,
        /// Byte offset in that file.
        host: u64,
    },
    /// Reads as zeros, decided at this layer.
    Zero,
    /// Not allocated here: the backing image decides (zeros without one).
    Unallocated,
    /// Inside a compressed grain: `key` identifies it for
    /// [`Layout::read_compressed`], `skip` is the offset within it.
    Compressed {
        /// The layout's handle on the compressed unit.
        key: u64,
        /// Offset of the run within the unit's uncompressed bytes.
        skip: u64,
    },
}

/// Where each guest byte of an image lives.
pub trait Layout: Send + Sync {
    /// The format's QEMU name.
    fn format_name(&self) -> &'static str;
    /// Virtual size in bytes.
    fn len(&self) -> u64;
    /// True for a zero-length disk.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// The files the layout's [`Piece::Data`] runs point into.
    fn files(&self) -> &[Arc<dyn Storage>];
    /// The run at `offset` (below [`Layout::len`]): its piece and length,
    /// at least 1 and at most `max`.
    fn piece(&self, offset: u64, max: u64) -> Result<(Piece, u64)>;
    /// Whether the format has backing files. QEMU reports the unallocated
    /// parts of formats without them as allocated zeros.
    fn supports_backing(&self) -> bool {
        false
    }
    /// Whether QEMU asks file number `file` for holes under the data it
    /// holds (it does for flat, raw-like data; not under VPC blocks, QED
    /// clusters or VMDK grains).
    fn file_zeroes(&self, _file: usize) -> bool {
        true
    }
    /// Whether the driver reports block status; QEMU's drivers without
    /// it show the whole disk as data.
    fn has_block_status(&self) -> bool {
        true
    }
    /// Writes a prefix of `buf` at guest `offset` (allocating what it
    /// needs, in the order the format's crash safety asks for) and returns
    /// how many bytes it wrote, at least 1. Formats oxcow does not write
    /// keep the default.
    /// `backing` gives what unallocated runs read, for copy-on-write.
    fn write_run(&self, _offset: u64, _buf: &[u8], _backing: Option<&dyn BlockDevice>) -> Result<usize> {
        Err(Error::ReadOnly(format!("oxcow does not write {} images", self.format_name())))
    }
    /// Whether [`Layout::set_backing`] can record a backing file name.
    fn can_set_backing(&self) -> bool {
        false
    }
    /// Records a new backing file name (`None`: standalone) and format
    /// (where the format keeps one) in the header: `rebase`'s last step.
    fn set_backing(&self, _name: Option<&str>, _format: Option<&str>) -> Result<()> {
        Err(Error::unsupported(format!("changing the backing file of {} images", self.format_name())))
    }
    /// Changes the virtual size, where the format allows it.
    fn resize(&self, _new_len: u64) -> Result<()> {
        Err(Error::invalid("Image format driver does not support resize"))
    }
    /// Checks the format's tables as `qemu-img check` does; formats
    /// qemu-img does not check keep the default.
    fn check(&self) -> Result<crate::qcow2::CheckReport> {
        Err(Error::unsupported("This image format does not support checks"))
    }
    /// Repairs what [`Layout::check`] finds and the format can fix, as
    /// `qemu-img check -r` does: leaks and corruptions fixed. Formats whose
    /// QEMU driver repairs nothing keep the default.
    fn repair(&self) -> Result<(u64, u64)> {
        Err(Error::unsupported("This image format does not support checks"))
    }
    /// Finishes a clean close of a writable image, after its files are
    /// flushed (QED clears its need-check bit).
    fn close(&self) -> Result<()> {
        Ok(())
    }
    /// Reads uncompressed bytes of a compressed unit.
    fn read_compressed(&self, _key: u64, _skip: u64, _buf: &mut [u8]) -> Result<()> {
        Err(Error::unsupported(format!("compressed data in {} images", self.format_name())))
    }
}

/// An image over a layout and an optional backing image: read-only
/// unless opened writable and the layout writes.
pub struct MappedImage {
    layout: Arc<dyn Layout>,
    backing: Option<Arc<dyn BlockDevice>>,
    read_only: bool,
    writethrough: bool,
}

impl MappedImage {
    /// The read-only image `layout` describes, reading unallocated runs
    /// from `backing`.
    pub fn new(layout: Arc<dyn Layout>, backing: Option<Arc<dyn BlockDevice>>) -> Self {
        MappedImage { layout, backing, read_only: true, writethrough: false }
    }

    /// Lets writes through to the layout; with `writethrough`, each is
    /// durable before it completes.
    pub fn writable(mut self, writethrough: bool) -> Self {
        self.read_only = false;
        self.writethrough = writethrough;
        self
    }

    fn refuse(&self) -> Error {
        if self.read_only {
            return Error::ReadOnly("image opened read-only".into());
        }
        Error::ReadOnly(format!("oxcow does not write {} images", self.layout.format_name()))
    }

    fn flush_files(&self) -> Result<()> {
        for f in self.layout.files() {
            f.flush().map_err(|e| Error::io(format!("flushing {} image", self.layout.format_name()), e))?;
        }
        Ok(())
    }

    /// Writes `buf` at `offset`, run by run.
    fn write_runs(&self, buf: &[u8], offset: u64) -> Result<()> {
        if self.read_only {
            return Err(self.refuse());
        }
        check_range(offset, buf.len() as u64, self.len())?;
        let mut done = 0;
        while done < buf.len() {
            let n = self.layout.write_run(offset + done as u64, &buf[done..], self.backing.as_deref())?;
            if n == 0 || n > buf.len() - done {
                return Err(Error::invalid("layout wrote a bad run"));
            }
            done += n;
        }
        if self.writethrough {
            self.flush_files()?;
        }
        Ok(())
    }

    /// The next run at `offset`, at most `max` long, checked against what
    /// the layout promised.
    fn next(&self, offset: u64, max: u64) -> Result<(Piece, u64)> {
        let (p, n) = self.layout.piece(offset, max)?;
        if n == 0 || n > max {
            return Err(Error::Corrupt {
                what: format!("{} layout returned a bad run", self.layout.format_name()),
                offset: None,
            });
        }
        Ok((p, n))
    }
}

impl BlockDevice for MappedImage {
    fn len(&self) -> u64 {
        self.layout.len()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        check_range(offset, buf.len() as u64, self.len())?;
        let mut done = 0usize;
        while done < buf.len() {
            let off = offset + done as u64;
            let (piece, n) = self.next(off, (buf.len() - done) as u64)?;
            let chunk = &mut buf[done..done + n as usize];
            match piece {
                Piece::Data { file, host } => {
                    let f = self.layout.files().get(file).ok_or_else(|| Error::invalid("layout names no such file"))?;
                    f.read_at(chunk, host)
                        .map_err(|e| Error::io(format!("reading {} image", self.layout.format_name()), e))?
                }
                Piece::Zero => chunk.fill(0),
                Piece::Unallocated => read_backing(self.backing.as_deref(), chunk, off)?,
                Piece::Compressed { key, skip } => self.layout.read_compressed(key, skip, chunk)?,
            }
            done += n as usize;
        }
        Ok(())
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.write_runs(buf, offset)
    }
    fn write_zeroes(&self, offset: u64, len: u64, _may_unmap: bool) -> Result<()> {
        if self.read_only {
            return Err(self.refuse());
        }
        check_range(offset, len, self.len())?;
        // Runs that already read as zeros stay as they are; others get
        // zeros written, so the format needs no zero flag of its own.
        let zeros = vec![0u8; 1 << 20];
        let mut pos = offset;
        while pos < offset + len {
            let (piece, n) = self.next(pos, offset + len - pos)?;
            let reads_zero = match piece {
                Piece::Zero => true,
                Piece::Unallocated => self.backing.is_none(),
                _ => false,
            };
            if !reads_zero {
                let mut p = pos;
                while p < pos + n {
                    let m = (pos + n - p).min(zeros.len() as u64) as usize;
                    self.write_runs(&zeros[..m], p)?;
                    p += m as u64;
                }
            }
            pos += n;
        }
        Ok(())
    }
    fn discard(&self, _offset: u64, _len: u64) -> Result<()> {
        // Advisory, and these formats have nothing to give back.
        if self.read_only {
            return Err(self.refuse());
        }
        Ok(())
    }
    fn flush(&self) -> Result<()> {
        if self.read_only {
            return Ok(());
        }
        self.flush_files()
    }
    fn block_status(&self, offset: u64, len: u64) -> Result<BlockStatus> {
        let size = self.len();
        if offset >= size || len == 0 {
            return Err(Error::invalid("block status past the end of the image"));
        }
        let len = len.min(size - offset);
        if !self.layout.has_block_status() {
            let mut st = BlockStatus::unallocated(offset, len);
            (st.allocated, st.zero, st.data) = (true, false, true);
            return Ok(st);
        }
        let (piece, n) = self.next(offset, len)?;
        let mut st = BlockStatus::unallocated(offset, n);
        match piece {
            Piece::Data { file, host } => {
                st.allocated = true;
                st.zero = false;
                st.data = true;
                st.host_offset = Some(host);
                // As QEMU, the file's holes read as zeros under the data.
                let holes = if self.layout.file_zeroes(file) { self.layout.files().get(file) } else { None };
                if let Some((is_data, end)) = holes.and_then(|f| f.extent_at(host)) {
                    if end > host {
                        st.length = st.length.min(end - host);
                        st.zero = !is_data;
                    }
                }
            }
            Piece::Zero => st.allocated = true,
            Piece::Unallocated if !self.layout.supports_backing() => st.allocated = true,
            Piece::Compressed { .. } => {
                st.allocated = true;
                st.zero = false;
                st.data = true;
                st.compressed = true;
            }
            Piece::Unallocated => {}
        }
        Ok(st)
    }
    fn backing(&self) -> Option<&dyn BlockDevice> {
        self.backing.as_deref().map(|b| b as &dyn BlockDevice)
    }
    fn format_name(&self) -> &'static str {
        self.layout.format_name()
    }
    fn is_read_only(&self) -> bool {
        self.read_only
    }
    fn resize(&self, new_len: u64) -> Result<()> {
        if self.read_only {
            return Err(self.refuse());
        }
        self.layout.resize(new_len)
    }
    fn close(&self) -> Result<()> {
        if self.read_only {
            return Ok(());
        }
        self.flush_files()?;
        self.layout.close()
    }
}

impl std::fmt::Debug for MappedImage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MappedImage")
            .field("format", &self.layout.format_name())
            .field("len", &self.layout.len())
            .finish_non_exhaustive()
    }
}

/// Walks a layout to its end, checking every run: what the fuzz targets
/// and `check` use.
#[cfg(feature = "testing")]
pub fn read_all(dev: &MappedImage, max: u64) {
    let len = dev.len().min(max);
    let mut buf = vec![0u8; 64 << 10];
    let mut off = 0;
    while off < len {
        let n = (len - off).min(buf.len() as u64) as usize;
        let _ = dev.read_at(&mut buf[..n], off);
        let _ = dev.block_status(off, n as u64);
        off += n as u64;
    }
}
