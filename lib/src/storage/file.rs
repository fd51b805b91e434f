//! Host files as storage, optionally with O_DIRECT.

use super::lock::{lock_image, ImageLock, LockMode};
use super::Storage;
use crate::{Error, Result};
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::Path;

/// How to open a host file.
#[derive(Debug, Clone, Copy, Default)]
#[non_exhaustive]
pub struct OpenFlags {
    /// Open for writing too.
    pub write: bool,
    /// Bypass the host page cache (O_DIRECT); buffers are bounced through
    /// aligned memory so callers need not care.
    pub direct: bool,
    /// Create the file (truncating an existing one).
    pub create: bool,
    /// Ignore flushes (QEMU's cache=unsafe: faster, and a crash may lose
    /// anything written).
    pub no_flush: bool,
}

/// A host file.
#[derive(Debug)]
pub struct FileStorage {
    file: File,
    direct: bool,
    no_flush: bool,
    align: usize,
    /// QEMU-compatible image locks, released when the storage is dropped.
    lock: Option<ImageLock>,
}

/// O_DIRECT needs offsets, lengths and buffer addresses aligned; 4 KiB
/// satisfies every device and file system we meet.
const DIRECT_ALIGN: usize = 4096;

impl FileStorage {
    /// Opens `path` as asked.
    pub fn open(path: &Path, flags: OpenFlags) -> io::Result<Self> {
        let file = Self::open_file(path, flags, flags.create)?;
        Ok(FileStorage { file, direct: flags.direct, no_flush: flags.no_flush, align: DIRECT_ALIGN, lock: None })
    }

    fn open_file(path: &Path, flags: OpenFlags, truncate: bool) -> io::Result<File> {
        let mut opts = OpenOptions::new();
        opts.read(true).write(flags.write || flags.create);
        if flags.create {
            opts.create(true).truncate(truncate);
        }
        if flags.direct {
            opts.custom_flags(super::sys::O_DIRECT);
        }
        let file = opts.open(path)?;
        if file.metadata()?.is_dir() {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "is a directory"));
        }
        Ok(file)
    }

    /// Opens `path` as asked and takes QEMU-compatible image locks of
    /// `mode` on it (see [`lock_image`]); a conflict with another user is
    /// an [`Error::Locked`].
    ///
    /// With `flags.create` an existing file is only truncated once the
    /// locks are held, so an image somebody else uses is never clobbered.
    pub fn open_locked(path: &Path, flags: OpenFlags, mode: LockMode) -> Result<Self> {
        let io_err = |e| Error::io(format!("Could not open '{}'", path.display()), e);
        let file = Self::open_file(path, flags, false).map_err(io_err)?;
        let mut st =
            FileStorage { file, direct: flags.direct, no_flush: flags.no_flush, align: DIRECT_ALIGN, lock: None };
        st.lock(path, mode)?;
        if flags.create {
            st.file.set_len(0).map_err(io_err)?;
        }
        Ok(st)
    }

    /// Takes QEMU-compatible image locks of `mode` (see [`lock_image`]),
    /// replacing any held before; `path` names the file in the message of
    /// an [`Error::Locked`].
    pub fn lock(&mut self, path: &Path, mode: LockMode) -> Result<()> {
        // Release first: the new set is checked on its own, not merged.
        self.lock = None;
        self.lock = Some(lock_image(&self.file, path, mode)?);
        Ok(())
    }

    /// The open file (for locking).
    pub fn file(&self) -> &File {
        &self.file
    }

    /// The image locks held, if any.
    pub fn image_lock(&self) -> Option<&ImageLock> {
        self.lock.as_ref()
    }

    fn aligned_span(&self, offset: u64, len: usize) -> (u64, usize) {
        let a = self.align as u64;
        let start = offset / a * a;
        let end = (offset + len as u64).div_ceil(a) * a;
        (start, (end - start) as usize)
    }

    fn read_plain(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let mut done = 0;
        while done < buf.len() {
            match self.file.read_at(&mut buf[done..], offset + done as u64) {
                Ok(0) => {
                    buf[done..].fill(0);
                    return Ok(());
                }
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    fn read_direct(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let (start, len) = self.aligned_span(offset, buf.len());
        let mut bounce = AlignedBuf::new(len, self.align);
        self.read_plain(bounce.as_mut(), start)?;
        let skip = (offset - start) as usize;
        buf.copy_from_slice(&bounce.as_mut()[skip..skip + buf.len()]);
        Ok(())
    }

    fn write_direct(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let (start, len) = self.aligned_span(offset, buf.len());
        let mut bounce = AlignedBuf::new(len, self.align);
        let skip = (offset - start) as usize;
        if skip != 0 || len != buf.len() {
            // Read-modify-write the partial blocks at either end.
            self.read_plain(bounce.as_mut(), start)?;
        }
        bounce.as_mut()[skip..skip + buf.len()].copy_from_slice(buf);
        let file_len = self.file.metadata()?.len();
        self.file.write_all_at(bounce.as_mut(), start)?;
        // The aligned write may have extended the file past the caller's end.
        let end = offset + buf.len() as u64;
        if start + len as u64 > end && end > file_len {
            self.file.set_len(end)?;
        }
        Ok(())
    }
}

/// A heap buffer whose start is aligned, built from safe code only by
/// over-allocating and skipping to the first aligned byte.
struct AlignedBuf {
    raw: Vec<u8>,
    skip: usize,
    len: usize,
}

impl AlignedBuf {
    fn new(len: usize, align: usize) -> Self {
        let raw = vec![0u8; len + align];
        let addr = raw.as_ptr() as usize;
        let skip = (align - addr % align) % align;
        AlignedBuf { raw, skip, len }
    }
    fn as_mut(&mut self) -> &mut [u8] {
        &mut self.raw[self.skip..self.skip + self.len]
    }
}

impl Storage for FileStorage {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        if self.direct {
            self.read_direct(buf, offset)
        } else {
            self.read_plain(buf, offset)
        }
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        if self.direct {
            self.write_direct(buf, offset)
        } else {
            self.file.write_all_at(buf, offset)
        }
    }
    fn flush(&self) -> io::Result<()> {
        if self.no_flush {
            return Ok(());
        }
        self.file.sync_data()
    }
    fn len(&self) -> io::Result<u64> {
        Ok(self.file.metadata()?.len())
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        self.file.set_len(len)
    }
    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        match super::sys::punch_hole(&self.file, offset, len) {
            Ok(()) => Ok(()),
            Err(e) if super::sys::is_unsupported(&e) => {
                let size = self.len()?;
                let end = offset.saturating_add(len).min(size);
                if end > offset {
                    super::write_zeros_chunked(self, offset, end - offset)?;
                }
                Ok(())
            }
            Err(e) => Err(e),
        }
    }
    fn allocate(&self, offset: u64, len: u64) -> io::Result<()> {
        match super::sys::reserve(&self.file, offset, len) {
            Ok(()) => Ok(()),
            // Space reservation is an optimisation; without it writes
            // simply extend the file.
            Err(e) if super::sys::is_unsupported(&e) => Ok(()),
            Err(e) => Err(e),
        }
    }
    fn allocated_size(&self) -> io::Result<u64> {
        Ok(self.file.metadata()?.blocks() * 512)
    }
    fn extent_at(&self, offset: u64) -> Option<(bool, u64)> {
        use super::sys::{seek_data, seek_hole};
        let len = self.len().ok()?;
        if offset >= len {
            return None;
        }
        match seek_data(&self.file, offset) {
            Ok(data) if data > offset => Some((false, data.min(len))),
            Ok(_) => match seek_hole(&self.file, offset) {
                Ok(hole) => Some((true, hole.min(len).max(offset + 1))),
                Err(_) => None,
            },
            Err(e) if e.raw_os_error() == Some(libc::ENXIO) => Some((false, len)),
            Err(_) => None,
        }
    }
}
