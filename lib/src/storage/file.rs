//! Host files as storage, optionally with O_DIRECT (through
//! [`AlignedStorage`], which owns the alignment, the serialisation of
//! read-modify-write cycles and the file length).

use super::aligned::AlignedStorage;
use super::buffer::{AlignedBuf, MAX_DIRECT_ALIGN};
use super::lock::{lock_image, ImageLock, LockMode};
use super::Storage;
use crate::{Error, Result};
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

/// How to open a host file.
#[derive(Debug, Clone, Copy, Default)]
#[non_exhaustive]
pub struct OpenFlags {
    /// Open for writing too.
    pub write: bool,
    /// Bypass the host page cache (O_DIRECT); requests are aligned for it
    /// (see [`AlignedStorage`]) so callers need not care.
    pub direct: bool,
    /// Create the file (truncating an existing one).
    pub create: bool,
    /// With `direct`: the request alignment to use instead of probing the
    /// file's (0 = probe). A power of two.
    pub direct_align: usize,
}

/// A host file.
#[derive(Debug)]
pub struct FileStorage {
    io: FileIo,
    /// QEMU-compatible image locks, released when the storage is dropped.
    lock: Option<ImageLock>,
    /// Modifications completed so far (writes, hole punches, length
    /// changes, space reservations)...
    modified: AtomicU64,
    /// ... and one more than how many of them had completed when the last
    /// successful sync began (0: no sync yet, so the first flush always
    /// syncs, covering whatever earlier users of the file left). A flush
    /// with nothing new to cover costs no sync: a writethrough image's
    /// close, a server's exit after its client's last flush.
    synced: AtomicU64,
}

#[derive(Debug)]
enum FileIo {
    Buffered(HostFile),
    Direct(AlignedStorage<HostFile>),
}

/// Host writes and syncs of all file storages of this process, for the
/// cache-mode tests (`OXCOW_REPORT_HOST_IO` in the CLI): the one place where
/// what really reaches the host can be counted without tracing syscalls.
static HOST_WRITES: AtomicU64 = AtomicU64::new(0);
static HOST_SYNCS: AtomicU64 = AtomicU64::new(0);

/// Counts of what all [`FileStorage`]s of this process sent to the host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct HostIoCounts {
    /// Write requests (each one or more `pwrite`s).
    pub writes: u64,
    /// `fdatasync` calls.
    pub syncs: u64,
}

/// What all [`FileStorage`]s of this process have sent to the host so far.
pub fn host_io_counts() -> HostIoCounts {
    HostIoCounts { writes: HOST_WRITES.load(Ordering::Relaxed), syncs: HOST_SYNCS.load(Ordering::Relaxed) }
}

impl FileStorage {
    fn new(io: FileIo) -> Self {
        FileStorage { io, lock: None, modified: AtomicU64::new(0), synced: AtomicU64::new(0) }
    }

    /// Counts a completed modification (or a failed one: it may have
    /// changed something).
    fn modified<T>(&self, r: io::Result<T>) -> io::Result<T> {
        self.modified.fetch_add(1, Ordering::AcqRel);
        r
    }

    /// Opens `path` as asked.
    pub fn open(path: &Path, flags: OpenFlags) -> io::Result<Self> {
        let file = Self::open_file(path, flags, flags.create)?;
        Ok(FileStorage::new(FileIo::new(file, flags)?))
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
        let mut st = FileStorage::new(FileIo::new(file, flags).map_err(io_err)?);
        st.lock(path, mode)?;
        if flags.create {
            st.set_len(0).map_err(io_err)?;
        }
        Ok(st)
    }

    /// Takes QEMU-compatible image locks of `mode` (see [`lock_image`]),
    /// replacing any held before; `path` names the file in the message of
    /// an [`Error::Locked`].
    pub fn lock(&mut self, path: &Path, mode: LockMode) -> Result<()> {
        // Release first: the new set is checked on its own, not merged.
        self.lock = None;
        self.lock = Some(lock_image(self.file(), path, mode)?);
        Ok(())
    }

    /// The open file (for locking).
    pub fn file(&self) -> &File {
        &self.host().file
    }

    /// The image locks held, if any.
    pub fn image_lock(&self) -> Option<&ImageLock> {
        self.lock.as_ref()
    }

    /// The O_DIRECT request alignment, when opened for direct I/O.
    pub fn direct_alignment(&self) -> Option<usize> {
        match &self.io {
            FileIo::Buffered(_) => None,
            FileIo::Direct(d) => Some(d.alignment()),
        }
    }

    fn host(&self) -> &HostFile {
        match &self.io {
            FileIo::Buffered(h) => h,
            FileIo::Direct(d) => d.inner(),
        }
    }

    fn io(&self) -> &dyn Storage {
        match &self.io {
            FileIo::Buffered(h) => h,
            FileIo::Direct(d) => d,
        }
    }
}

impl FileIo {
    fn new(file: File, flags: OpenFlags) -> io::Result<Self> {
        if !flags.direct {
            return Ok(FileIo::Buffered(HostFile { file, direct_align: None }));
        }
        // Pages of the file left in the page cache by buffered users (the
        // qemu-img that created it, say) make the kernel look for pages to
        // invalidate around every direct write: 6% of 4 KiB rewrites at
        // depth 32 (issue 19). Direct I/O never brings them back. Advice
        // only: where it fails, nothing is lost but that time.
        let _ = super::sys::drop_page_cache(&file);
        let (align, mem_align) = match flags.direct_align {
            0 => probe_direct_alignment(&file),
            n => (n, n),
        };
        let host = HostFile { file, direct_align: Some(align as u64) };
        Ok(FileIo::Direct(AlignedStorage::with_memory_alignment(host, align, mem_align)?))
    }
}

/// The smallest (offset, memory) alignments O_DIRECT accepts on `file`.
///
/// The kernel says so through statx (Linux 6.1 and later); otherwise, as
/// QEMU probes, the smallest block size an aligned read at offset 0
/// accepts, when an unaligned read is refused (when it is not, the file is
/// empty or ignores alignment, which tells nothing). Falls back to 4 KiB,
/// which every device and file system accepts.
fn probe_direct_alignment(file: &File) -> (usize, usize) {
    let sane = |n: u32| n.is_power_of_two() && n as usize <= MAX_PROBED_ALIGN;
    if let Some((off, mem)) = super::sys::direct_io_alignment(file) {
        if sane(off) && sane(mem) {
            return (off as usize, mem as usize);
        }
    }
    let mut buf = AlignedBuf::for_direct_io(MAX_DIRECT_ALIGN);
    let refused = |n: usize, buf: &mut AlignedBuf| matches!(file.read_at(&mut buf[..n], 0), Err(e) if e.raw_os_error() == Some(libc::EINVAL));
    if refused(1, &mut buf) {
        for n in [512, 1024, 2048, 4096] {
            if !refused(n, &mut buf) {
                return (n, n);
            }
        }
    }
    (MAX_DIRECT_ALIGN, MAX_DIRECT_ALIGN)
}

/// Probed alignments above this are not believed.
const MAX_PROBED_ALIGN: usize = 1 << 16;

/// The host file under a [`FileStorage`]: plain positional I/O. Opened
/// with O_DIRECT it is only ever given aligned requests (by
/// [`AlignedStorage`]).
#[derive(Debug)]
struct HostFile {
    file: File,
    /// The request alignment when opened with O_DIRECT.
    direct_align: Option<u64>,
}

impl HostFile {
    fn is_char_device(&self) -> bool {
        use std::os::unix::fs::FileTypeExt;
        self.file.metadata().is_ok_and(|m| m.file_type().is_char_device())
    }
}

impl Storage for HostFile {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let mut done = 0;
        while done < buf.len() {
            match self.file.read_at(&mut buf[done..], offset + done as u64) {
                Ok(0) => break,
                Ok(n) => {
                    done += n;
                    // A short direct read that leaves the next offset
                    // unaligned ended at the end of the file.
                    if self.direct_align.is_some_and(|a| !(offset + done as u64).is_multiple_of(a)) {
                        break;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        buf[done..].fill(0);
        Ok(())
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.file.write_all_at(buf, offset)
    }
    fn flush(&self) -> io::Result<()> {
        match self.file.sync_data() {
            // A character device (/dev/null) keeps nothing to make
            // durable; fdatasync refuses such files with EINVAL.
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) && self.is_char_device() => Ok(()),
            r => r,
        }
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
                Err(io::Error::new(io::ErrorKind::Unsupported, "hole punching not supported"))
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

impl Storage for FileStorage {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.io().read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        HOST_WRITES.fetch_add(1, Ordering::Relaxed);
        self.modified(self.io().write_at(buf, offset))
    }
    fn flush(&self) -> io::Result<()> {
        let covers = self.modified.load(Ordering::Acquire) + 1;
        if covers == self.synced.load(Ordering::Acquire) {
            return Ok(());
        }
        HOST_SYNCS.fetch_add(1, Ordering::Relaxed);
        self.io().flush()?;
        self.synced.fetch_max(covers, Ordering::AcqRel);
        Ok(())
    }
    fn len(&self) -> io::Result<u64> {
        self.io().len()
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        self.modified(self.io().set_len(len))
    }
    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        match self.modified(self.io().punch_hole(offset, len)) {
            Err(e) if e.kind() == io::ErrorKind::Unsupported => {
                let size = self.len()?;
                let end = offset.saturating_add(len).min(size);
                if end > offset {
                    super::write_zeros_chunked(self, offset, end - offset)?;
                }
                Ok(())
            }
            r => r,
        }
    }
    fn allocate(&self, offset: u64, len: u64) -> io::Result<()> {
        self.modified(self.io().allocate(offset, len))
    }
    fn allocated_size(&self) -> io::Result<u64> {
        self.io().allocated_size()
    }
    fn extent_at(&self, offset: u64) -> Option<(bool, u64)> {
        self.io().extent_at(offset)
    }
}
