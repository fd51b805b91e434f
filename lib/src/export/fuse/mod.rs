//! The FUSE export: a device appears as a regular file mounted over an
//! existing file (qemu-storage-daemon's `--export type=fuse`).
//!
//! The file is the device's guest view, byte for byte: reads and writes
//! go to the device, `fsync` (and `close`) flush it, `fallocate`'s
//! `PUNCH_HOLE` writes zeroes that may deallocate (Linux promises zeros
//! there, a bare discard does not), `ZERO_RANGE` writes zeroes that keep
//! the range allocated, `SEEK_DATA`/`SEEK_HOLE` answer from the chain's
//! block status (a hole is what reads as zeros), and truncation resizes
//! the device. With `growable`, writes and allocations past the end grow
//! it first; without, they stop at the end. Files are opened with direct
//! I/O, so the page cache never holds a stale copy of the device.
//!
//! Mounting uses fuser's pure-Rust path (the mount system call as root,
//! `fusermount3` otherwise); no libfuse is linked.

use crate::{chain_status, BlockDevice, Error, Result};
use fuser::{
    BackgroundSession, Config, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, INodeNo, LockOwner,
    MountOption, OpenFlags, ReplyAttr, ReplyData, ReplyEmpty, ReplyLseek, ReplyOpen, ReplyWrite, Request, SessionACL,
    TimeOrNow, WriteFlags,
};
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

/// How the file is presented.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct FuseOptions {
    /// Writes allowed.
    pub writable: bool,
    /// Writes past the end grow the device (needs `writable`).
    pub growable: bool,
    /// Users other than the daemon's may open the file (FUSE's
    /// `allow_other`; file permissions are then checked by the kernel).
    pub allow_other: bool,
}

setters!(FuseOptions { writable: bool, growable: bool, allow_other: bool });

/// A mounted FUSE export; dropping it unmounts too, without reporting.
pub struct FuseExport {
    session: BackgroundSession,
    mountpoint: std::path::PathBuf,
}

impl std::fmt::Debug for FuseExport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FuseExport").finish_non_exhaustive()
    }
}

impl FuseExport {
    /// Mounts `device` over the regular file `mountpoint`, which keeps
    /// its owner and permission bits (less write permission when the
    /// export is read-only).
    pub fn mount(device: Arc<dyn BlockDevice>, mountpoint: &Path, opts: FuseOptions) -> Result<FuseExport> {
        let meta = std::fs::metadata(mountpoint)
            .map_err(|e| Error::io(format!("reading the mount point {}", mountpoint.display()), e))?;
        if !meta.is_file() {
            return Err(Error::invalid(format!("{} is not a regular file", mountpoint.display())));
        }
        let writable = opts.writable && !device.is_read_only();
        let mut perm = (meta.mode() & 0o7777) as u16;
        if !writable {
            perm &= !0o222;
        }
        let fs = ImageFile {
            device,
            writable,
            growable: writable && opts.growable,
            uid: meta.uid(),
            gid: meta.gid(),
            perm,
            started: SystemTime::now(),
        };
        let mut config = Config::default();
        config.mount_options = vec![
            MountOption::FSName("oxcow".into()),
            MountOption::Subtype("oxcow".into()),
            if writable { MountOption::RW } else { MountOption::RO },
            MountOption::DefaultPermissions,
        ];
        config.acl = if opts.allow_other { SessionACL::All } else { SessionACL::Owner };
        config.n_threads = Some(4);
        let session = fuser::spawn_mount(fs, mountpoint, &config)
            .map_err(|e| Error::io(format!("mounting a FUSE export on {}", mountpoint.display()), e))?;
        Ok(FuseExport { session, mountpoint: mountpoint.to_path_buf() })
    }

    /// Unmounts and waits for the request threads to end.
    pub fn unmount(self) -> Result<()> {
        // The last user's close does not free the mount at once when some
        // process forks meanwhile: the child holds a copy of every open
        // file until it execs, and unmounting fails with EBUSY for that
        // moment (seen under load). Such moments are waited out; a user
        // that keeps the file open still gets the error, from fuser's
        // unmount below. Any other failure (EPERM without root: fuser goes
        // through fusermount3) is left to fuser too; once unmounted here,
        // fuser sees the connection gone and only joins its threads.
        let until = std::time::Instant::now() + BUSY_WAIT;
        while nix::mount::umount(self.mountpoint.as_path()) == Err(nix::errno::Errno::EBUSY)
            && std::time::Instant::now() < until
        {
            std::thread::sleep(Duration::from_millis(10));
        }
        self.session.umount_and_join().map_err(|e| Error::io("unmounting a FUSE export", e))
    }
}

/// How long unmounting waits for a busy mount to be let go.
const BUSY_WAIT: Duration = Duration::from_secs(5);

/// Attributes are cached by the kernel for this long; the size can only
/// change through this export, which answers with fresh attributes.
const TTL: Duration = Duration::from_secs(1);

struct ImageFile {
    device: Arc<dyn BlockDevice>,
    writable: bool,
    growable: bool,
    uid: u32,
    gid: u32,
    perm: u16,
    started: SystemTime,
}

fn errno(e: &Error) -> Errno {
    Errno::from_i32(e.errno())
}

impl ImageFile {
    fn attr(&self) -> FileAttr {
        let size = self.device.len();
        FileAttr {
            ino: INodeNo::ROOT,
            size,
            blocks: size.div_ceil(512),
            atime: self.started,
            mtime: self.started,
            ctime: self.started,
            crtime: self.started,
            kind: FileType::RegularFile,
            perm: self.perm,
            nlink: 1,
            uid: self.uid,
            gid: self.gid,
            rdev: 0,
            blksize: 4096,
            flags: 0,
        }
    }

    /// Makes room for `end` bytes: grows a growable device, otherwise
    /// returns how far an operation may go.
    fn room(&self, end: u64) -> Result<u64> {
        let len = self.device.len();
        if end <= len {
            return Ok(end);
        }
        if self.growable {
            self.device.resize(end)?;
            return Ok(end);
        }
        Ok(len)
    }

    /// The first offset at or after `pos` (before the end) whose content
    /// is data (`want_data`) or a hole.
    fn seek(&self, pos: u64, want_data: bool) -> Result<Option<u64>> {
        let len = self.device.len();
        let mut at = pos;
        while at < len {
            let st = chain_status(&*self.device, at, len - at)?;
            if st.zero != want_data {
                return Ok(Some(at));
            }
            at += st.length.max(1);
        }
        // The end of the file is a hole.
        Ok(if want_data { None } else { Some(len) })
    }
}

impl Filesystem for ImageFile {
    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        if ino != INodeNo::ROOT {
            return reply.error(Errno::ENOENT);
        }
        reply.attr(&TTL, &self.attr());
    }

    fn setattr(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _mode: Option<u32>,
        _uid: Option<u32>,
        _gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<TimeOrNow>,
        _mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        // Owner, mode and times are the mount point's and stay so.
        if let Some(size) = size {
            if size != self.device.len() {
                if !self.writable {
                    return reply.error(Errno::EACCES);
                }
                if let Err(e) = self.device.resize(size) {
                    return reply.error(errno(&e));
                }
            }
        }
        reply.attr(&TTL, &self.attr());
    }

    fn open(&self, _req: &Request, _ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let access = flags.0 & libc::O_ACCMODE;
        if access != libc::O_RDONLY && !self.writable {
            return reply.error(Errno::EACCES);
        }
        reply.opened(FileHandle(0), FopenFlags::FOPEN_DIRECT_IO);
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let len = self.device.len();
        let end = offset.saturating_add(u64::from(size)).min(len);
        if offset >= end {
            return reply.data(&[]);
        }
        let mut buf = vec![0u8; (end - offset) as usize];
        match self.device.read_at(&mut buf, offset) {
            Ok(()) => reply.data(&buf),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn write(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        if !self.writable {
            return reply.error(Errno::EACCES);
        }
        let end = match self.room(offset.saturating_add(data.len() as u64)) {
            Ok(end) => end,
            Err(e) => return reply.error(errno(&e)),
        };
        if offset >= end {
            return reply.written(0);
        }
        let n = (end - offset) as usize;
        match self.device.write_at(&data[..n], offset) {
            Ok(()) => reply.written(n as u32),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn flush(&self, _req: &Request, _ino: INodeNo, _fh: FileHandle, _lock_owner: LockOwner, reply: ReplyEmpty) {
        match self.device.flush() {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn fsync(&self, _req: &Request, _ino: INodeNo, _fh: FileHandle, _datasync: bool, reply: ReplyEmpty) {
        match self.device.flush() {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn fallocate(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        if !self.writable {
            return reply.error(Errno::EACCES);
        }
        let known = libc::FALLOC_FL_KEEP_SIZE | libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_ZERO_RANGE;
        if mode & !known != 0 {
            return reply.error(Errno::EOPNOTSUPP);
        }
        let keep_size = mode & libc::FALLOC_FL_KEEP_SIZE != 0;
        let want_end = offset.saturating_add(length);
        let result = (|| -> Result<()> {
            let punch = mode & libc::FALLOC_FL_PUNCH_HOLE != 0;
            let zero = mode & libc::FALLOC_FL_ZERO_RANGE != 0;
            let end = if keep_size || punch { want_end.min(self.device.len()) } else { self.room(want_end)? };
            if offset >= end {
                return Ok(());
            }
            match (punch, zero) {
                (true, false) => self.device.write_zeroes(offset, end - offset, true),
                (false, true) => self.device.write_zeroes(offset, end - offset, false),
                // Plain allocation: the range reads as before, and room
                // was made above; nothing else to do.
                (false, false) => Ok(()),
                (true, true) => Err(Error::invalid("PUNCH_HOLE with ZERO_RANGE")),
            }
        })();
        match result {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn lseek(&self, _req: &Request, _ino: INodeNo, _fh: FileHandle, offset: i64, whence: i32, reply: ReplyLseek) {
        let Ok(pos) = u64::try_from(offset) else { return reply.error(Errno::EINVAL) };
        let want_data = match whence {
            libc::SEEK_DATA => true,
            libc::SEEK_HOLE => false,
            _ => return reply.error(Errno::EINVAL),
        };
        if pos >= self.device.len() {
            return reply.error(Errno::ENXIO);
        }
        match self.seek(pos, want_data) {
            Ok(Some(at)) => reply.offset(at as i64),
            Ok(None) => reply.error(Errno::ENXIO),
            Err(e) => reply.error(errno(&e)),
        }
    }
}
