//! The host system calls the storage layer needs beyond `std`, in one
//! audited place.
//!
//! `std` offers no hole punching, no space reservation, no data/hole
//! seeking and no open-file-description byte-range locks. They come from
//! `libc`, the crate's one syscall dependency: `rustix`, safe as it is,
//! has no byte-range OFD locks (QEMU's locking protocol needs them), and
//! `nix` would be a second crate for the same calls. This is the only
//! module of the crate where `unsafe` is allowed; every block says why it
//! is sound. One call here serves the exports rather than storage: taking
//! a listening socket inherited by descriptor number (`std` can only take
//! over a raw number unsafely), kept here so that `unsafe` stays in one
//! place.
#![allow(unsafe_code)]

use std::fs::File;
use std::io;

/// Converts a byte offset or length to `off_t`, refusing what it cannot
/// hold (the kernel would refuse it too, with the same errno).
fn off(v: u64) -> io::Result<libc::off_t> {
    libc::off_t::try_from(v).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

pub use imp::O_DIRECT;

#[cfg(any(target_os = "linux", target_os = "android"))]
mod imp {
    use super::off;
    use std::fs::File;
    use std::io;
    use std::os::fd::{FromRawFd, OwnedFd, RawFd};
    use std::os::unix::io::AsRawFd;

    pub const PUNCH_HOLE_KEEP_SIZE: libc::c_int = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
    pub const SEEK_DATA: libc::c_int = libc::SEEK_DATA;
    pub const SEEK_HOLE: libc::c_int = libc::SEEK_HOLE;
    /// `O_DIRECT`, for `OpenOptionsExt::custom_flags`.
    pub const O_DIRECT: libc::c_int = libc::O_DIRECT;

    /// `fallocate(2)` with `mode`; the errno on failure.
    pub fn fallocate(file: &File, mode: libc::c_int, offset: u64, len: u64) -> io::Result<()> {
        let (offset, len) = (off(offset)?, off(len)?);
        // SAFETY: fallocate takes a descriptor and plain integers; the
        // descriptor is open for as long as `file` is borrowed.
        let r = unsafe { libc::fallocate(file.as_raw_fd(), mode, offset, len) };
        if r == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }

    /// `lseek(2)` with `whence`; the resulting offset.
    pub fn lseek(file: &File, offset: u64, whence: libc::c_int) -> io::Result<u64> {
        let offset = off(offset)?;
        // SAFETY: lseek takes a descriptor and plain integers; the
        // descriptor is open for as long as `file` is borrowed. The file
        // position it moves is never used: storage I/O is positional.
        let r = unsafe { libc::lseek(file.as_raw_fd(), offset, whence) };
        if r < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(r as u64)
        }
    }

    fn flock(kind: libc::c_int, start: u64, len: u64) -> io::Result<libc::flock> {
        // SAFETY: `flock` is a plain C struct of integers, for which all
        // zeros is a valid value; the fields that matter are set below.
        let mut fl: libc::flock = unsafe { std::mem::zeroed() };
        fl.l_type = kind as libc::c_short;
        fl.l_whence = libc::SEEK_SET as libc::c_short;
        fl.l_start = off(start)?;
        fl.l_len = off(len)?;
        // OFD lock requests must leave the pid zero (it is, from zeroed()).
        Ok(fl)
    }

    /// `F_OFD_SETLK` of `kind` (`F_RDLCK`, `F_WRLCK`, `F_UNLCK`) over
    /// `[start, start + len)`, not waiting.
    pub fn ofd_setlk(file: &File, kind: libc::c_int, start: u64, len: u64) -> io::Result<()> {
        let fl = flock(kind, start, len)?;
        // SAFETY: F_OFD_SETLK reads the `flock` the pointer refers to,
        // which lives across the call; the descriptor is open.
        let r = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_SETLK, &fl as *const libc::flock) };
        if r == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }

    /// `F_OFD_GETLK` for `kind` over `[start, start + len)`: whether a lock
    /// of another open file description stands in the way.
    pub fn ofd_conflicts(file: &File, kind: libc::c_int, start: u64, len: u64) -> io::Result<bool> {
        let mut fl = flock(kind, start, len)?;
        // SAFETY: F_OFD_GETLK reads and rewrites the `flock` the pointer
        // refers to, which is ours and lives across the call.
        let r = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_GETLK, &mut fl as *mut libc::flock) };
        if r != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(fl.l_type != libc::F_UNLCK as libc::c_short)
    }

    /// `posix_fadvise(2)` with `POSIX_FADV_DONTNEED` over the whole file:
    /// clean cached pages go, dirty ones start their writeback.
    pub fn drop_page_cache(file: &File) -> io::Result<()> {
        // SAFETY: posix_fadvise takes a descriptor and plain integers; the
        // descriptor is open for as long as `file` is borrowed. It only
        // advises the page cache: file contents are unchanged.
        let r = unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
        if r == 0 {
            Ok(())
        } else {
            Err(io::Error::from_raw_os_error(r))
        }
    }

    /// A descriptor of our own for the socket a parent process left open
    /// as descriptor `fd`, listening, with its address family. The
    /// inherited number is duplicated, never taken over: whatever else in
    /// the process may hold that number keeps it.
    pub fn inherited_listener(fd: RawFd) -> io::Result<(OwnedFd, libc::c_int)> {
        let mut domain: libc::c_int = 0;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: getsockopt writes at most `len` bytes into `domain`,
        // which is ours and outlives the call; a number that is not an
        // open socket only makes it fail (EBADF, ENOTSOCK).
        let r = unsafe {
            libc::getsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_DOMAIN,
                &mut domain as *mut libc::c_int as *mut libc::c_void,
                &mut len,
            )
        };
        if r != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fcntl with F_DUPFD_CLOEXEC takes integers and creates a
        // new descriptor; the inherited one is left as it was.
        let dup = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 3) };
        if dup < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `dup` was just created by this call and nothing else in
        // the process knows its number, so the OwnedFd is its only owner.
        let owned = unsafe { OwnedFd::from_raw_fd(dup) };
        // As QEMU does with a passed socket: listen on it (one that
        // already listens keeps its queue).
        // SAFETY: listen takes integers; the descriptor is open (owned).
        if unsafe { libc::listen(owned.as_raw_fd(), 128) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok((owned, domain))
    }
}

#[cfg(not(any(target_os = "linux", target_os = "android")))]
mod imp {
    //! Hosts without these calls: every one reports "not supported", which
    //! callers treat as a file system that lacks the feature.
    use std::fs::File;
    use std::io;

    pub const PUNCH_HOLE_KEEP_SIZE: libc::c_int = 0;
    pub const SEEK_DATA: libc::c_int = 0;
    pub const SEEK_HOLE: libc::c_int = 0;
    pub const O_DIRECT: libc::c_int = 0;

    fn unsupported() -> io::Error {
        io::Error::from_raw_os_error(libc::EOPNOTSUPP)
    }
    pub fn fallocate(_: &File, _: libc::c_int, _: u64, _: u64) -> io::Result<()> {
        Err(unsupported())
    }
    pub fn lseek(_: &File, _: u64, _: libc::c_int) -> io::Result<u64> {
        Err(unsupported())
    }
    pub fn ofd_setlk(_: &File, _: libc::c_int, _: u64, _: u64) -> io::Result<()> {
        Err(unsupported())
    }
    pub fn ofd_conflicts(_: &File, _: libc::c_int, _: u64, _: u64) -> io::Result<bool> {
        Err(unsupported())
    }
    pub fn inherited_listener(_: std::os::fd::RawFd) -> io::Result<(std::os::fd::OwnedFd, libc::c_int)> {
        Err(unsupported())
    }
    pub fn drop_page_cache(_: &File) -> io::Result<()> {
        Err(unsupported())
    }
}

pub use imp::{drop_page_cache, inherited_listener};

/// Whether an error says the host or file system lacks the call.
pub fn is_unsupported(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS))
}

/// Deallocates `[offset, offset + len)`, keeping the file's length.
pub fn punch_hole(file: &File, offset: u64, len: u64) -> io::Result<()> {
    imp::fallocate(file, imp::PUNCH_HOLE_KEEP_SIZE, offset, len)
}

/// Reserves blocks for `[offset, offset + len)`, extending the length if
/// the range ends past it.
pub fn reserve(file: &File, offset: u64, len: u64) -> io::Result<()> {
    imp::fallocate(file, 0, offset, len)
}

/// The first offset at or after `offset` that holds data (`ENXIO` when
/// none does).
pub fn seek_data(file: &File, offset: u64) -> io::Result<u64> {
    imp::lseek(file, offset, imp::SEEK_DATA)
}

/// The first offset at or after `offset` inside a hole (the end of the
/// file counts as one).
pub fn seek_hole(file: &File, offset: u64) -> io::Result<u64> {
    imp::lseek(file, offset, imp::SEEK_HOLE)
}

/// Takes a shared open-file-description lock on one byte, not waiting.
pub fn read_lock(file: &File, byte: u64) -> io::Result<()> {
    imp::ofd_setlk(file, libc::F_RDLCK as libc::c_int, byte, 1)
}

/// Releases our open-file-description locks over `[start, start + len)`.
pub fn unlock(file: &File, start: u64, len: u64) -> io::Result<()> {
    imp::ofd_setlk(file, libc::F_UNLCK as libc::c_int, start, len)
}

/// Whether another open file description holds any lock on `byte`: asking
/// for an exclusive lock is refused by anybody else's shared lock but
/// never by our own.
pub fn locked_by_other(file: &File, byte: u64) -> io::Result<bool> {
    imp::ofd_conflicts(file, libc::F_WRLCK as libc::c_int, byte, 1)
}

/// The (offset, memory) alignments O_DIRECT needs on `file`, as `statx`
/// reports them (Linux 6.1 and later); `None` when it does not.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
pub fn direct_io_alignment(file: &File) -> Option<(u32, u32)> {
    use std::os::unix::io::AsRawFd;
    // SAFETY: `statx` is a plain C struct of integers, for which all
    // zeros is a valid value; the kernel fills it in.
    let mut st: libc::statx = unsafe { std::mem::zeroed() };
    // SAFETY: with AT_EMPTY_PATH and an empty, NUL-terminated path, statx
    // describes the open descriptor; it writes only into `st`, which is
    // ours and lives across the call.
    let r = unsafe { libc::statx(file.as_raw_fd(), c"".as_ptr(), libc::AT_EMPTY_PATH, libc::STATX_DIOALIGN, &mut st) };
    if r != 0 || st.stx_mask & libc::STATX_DIOALIGN == 0 {
        return None;
    }
    Some((st.stx_dio_offset_align, st.stx_dio_mem_align))
}

/// Hosts without `statx`: alignments are probed instead.
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
pub fn direct_io_alignment(_: &File) -> Option<(u32, u32)> {
    None
}
