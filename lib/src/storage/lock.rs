//! Image locking that interoperates with QEMU's.
//!
//! QEMU (block/file-posix.c) marks what each user of an image file does
//! with shared open-file-description byte-range locks on fixed offsets of
//! the file: a lock on byte `100 + bit` says "I hold permission `bit`", a
//! lock on byte `200 + bit` says "I do not let others hold permission
//! `bit`". Every user takes its bytes first and then asks the kernel
//! whether anybody else holds the opposite bytes; doing it in that order
//! means two users racing each other both see the conflict instead of both
//! missing it. Since the locks are all shared (read) locks, users whose
//! wishes are compatible coexist, and the test for a conflict asks whether
//! an exclusive lock could be placed, which any other description's shared
//! lock prevents but our own does not.
//!
//! The locks belong to the open file description, so they vanish when the
//! last descriptor of it is closed, even if the process crashes; and two
//! independent opens of the same file in one process conflict just as two
//! processes do.
//!
//! The bytes lie inside the qcow2 header cluster, but advisory locks have
//! no effect on reads and writes, so the image data is not disturbed.

use super::sys;
use crate::{Error, Result};
use std::fs::File;
use std::io;
use std::ops::BitOr;
use std::path::Path;

/// Offset of the byte standing for "permission held"; plus the bit number.
pub const PERM_BASE: u64 = 100;
/// Offset of the byte standing for "permission not shared"; plus the bit number.
pub const SHARED_BASE: u64 = 200;

/// A set of QEMU block permissions, one bit each in QEMU's order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Perms(u8);

impl Perms {
    /// No permission.
    pub const NONE: Perms = Perms(0);
    /// Reading returns what the image holds (QEMU's "consistent read").
    pub const CONSISTENT_READ: Perms = Perms(1 << 0);
    /// Changing the image's contents ("write").
    pub const WRITE: Perms = Perms(1 << 1);
    /// Writing data that leaves the guest-visible contents unchanged
    /// ("write unchanged").
    pub const WRITE_UNCHANGED: Perms = Perms(1 << 2);
    /// Changing the file's length ("resize").
    pub const RESIZE: Perms = Perms(1 << 3);
    /// Every permission QEMU 10 knows.
    pub const ALL: Perms = Perms(0b1111);

    /// Whether every permission in `other` is in `self`.
    pub fn contains(self, other: Perms) -> bool {
        self.0 & other.0 == other.0
    }

    /// The raw bits (bit `n` stands for lock bytes `100 + n` and `200 + n`).
    pub fn bits(self) -> u8 {
        self.0
    }

    /// The permissions whose bits are set in `bits` (unknown bits dropped).
    pub fn from_bits(bits: u8) -> Perms {
        Perms(bits & Perms::ALL.0)
    }

    fn iter(self) -> impl Iterator<Item = u32> {
        (0..BIT_COUNT).filter(move |b| self.0 & (1 << b) != 0)
    }
}

impl BitOr for Perms {
    type Output = Perms;
    fn bitor(self, rhs: Perms) -> Perms {
        Perms(self.0 | rhs.0)
    }
}

const BIT_COUNT: u32 = 4;

/// The names QEMU prints for each permission bit, in bit order.
const PERM_NAMES: [&str; BIT_COUNT as usize] = ["consistent read", "write", "write unchanged", "resize"];

/// Which lock bytes a user of an image takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LockMode {
    /// Permissions held (bytes `100 + bit`).
    pub held: Perms,
    /// Permissions refused to others (bytes `200 + bit`).
    pub unshared: Perms,
}

impl LockMode {
    /// A read-only user of an image that must not change under it, as
    /// `qemu-img info` or `qemu-io -r` are: holds consistent-read and lets
    /// nobody write or resize (bytes 100, 201, 203).
    pub const fn reader() -> LockMode {
        LockMode { held: Perms::CONSISTENT_READ, unshared: Perms(Perms::WRITE.0 | Perms::RESIZE.0) }
    }

    /// A writer that shares neither writing nor resizing, as `qemu-nbd` or
    /// `qemu-io` on a qcow2 image are (bytes 100, 101, 103, 201, 203).
    pub const fn writer() -> LockMode {
        LockMode {
            held: Perms(Perms::CONSISTENT_READ.0 | Perms::WRITE.0 | Perms::RESIZE.0),
            unshared: Perms(Perms::WRITE.0 | Perms::RESIZE.0),
        }
    }

    /// A read-only user that tolerates writers (`-U`, `force-share=on`):
    /// holds consistent-read only (byte 100), so it never conflicts with a
    /// writer.
    pub const fn force_share() -> LockMode {
        LockMode { held: Perms::CONSISTENT_READ, unshared: Perms::NONE }
    }

    /// What QEMU takes on a qcow2 image's external data file: the guest
    /// data lives there but the metadata does not, so QEMU lets others
    /// write it and only refuses resizing (bytes 100, [101, 103,] 203).
    pub const fn data_file(write: bool) -> LockMode {
        if write {
            LockMode {
                held: Perms(Perms::CONSISTENT_READ.0 | Perms::WRITE.0 | Perms::RESIZE.0),
                unshared: Perms::RESIZE,
            }
        } else {
            LockMode { held: Perms::CONSISTENT_READ, unshared: Perms::RESIZE }
        }
    }

    /// A read-only user of a raw image: QEMU's tools hold consistent-read
    /// only (byte 100) there, since the raw format has no metadata of its
    /// own to protect; the same bytes as [`LockMode::force_share`].
    pub const fn raw_reader() -> LockMode {
        LockMode::force_share()
    }

    /// The mode for opening an image file: writable, read-only, or
    /// read-only sharing with writers. `force_share` only makes sense
    /// read-only; a writer ignores it (callers refuse the combination).
    pub const fn for_open(write: bool, force_share: bool) -> LockMode {
        if write {
            LockMode::writer()
        } else if force_share {
            LockMode::force_share()
        } else {
            LockMode::reader()
        }
    }
}

/// Locks held on an image file; released when dropped.
///
/// Holds its own descriptor of the same open file description, so the
/// locks stay exactly as long as this value does, whatever happens to the
/// descriptor it was made from.
#[derive(Debug)]
pub struct ImageLock {
    fd: Option<File>,
    mode: LockMode,
}

impl ImageLock {
    /// The bytes held.
    pub fn mode(&self) -> LockMode {
        self.mode
    }

    /// Whether locks are really held (false where the host file system
    /// has no open-file-description locks).
    pub fn is_active(&self) -> bool {
        self.fd.is_some()
    }
}

impl Drop for ImageLock {
    fn drop(&mut self) {
        if let Some(fd) = &self.fd {
            // Closing our duplicate alone would not release anything while
            // the image's own descriptor stays open, so unlock explicitly.
            let _ = unlock_all(fd);
        }
    }
}

/// Takes the lock bytes of `mode` on `file` and checks that no other user
/// holds a conflicting one, as QEMU does when it opens an image.
///
/// On a conflict nothing stays locked and the error reads as qemu-img's:
/// `Failed to get "write" lock` (another user refuses a permission we
/// hold) or `Failed to get shared "write" lock` (another user holds a
/// permission we refuse), then `Is another process using the image [PATH]?`.
/// `path` is only used in that message; callers add what they were doing
/// in front (`Could not open 'PATH': `), as QEMU does.
///
/// File systems without open-file-description locks yield an inactive
/// lock rather than an error, as QEMU proceeds there too.
pub fn lock_image(file: &File, path: &Path, mode: LockMode) -> Result<ImageLock> {
    let fd = file.try_clone().map_err(|e| Error::io(format!("Could not lock '{}'", path.display()), e))?;
    match apply_and_check(&fd, mode) {
        Ok(()) => Ok(ImageLock { fd: Some(fd), mode }),
        Err(Failure::Unsupported) => {
            let _ = unlock_all(&fd);
            Ok(ImageLock { fd: None, mode })
        }
        Err(Failure::Io(e)) => {
            let _ = unlock_all(&fd);
            Err(Error::io(format!("Could not lock '{}'", path.display()), e))
        }
        Err(Failure::Conflict { shared, bit }) => {
            let _ = unlock_all(&fd);
            let name = PERM_NAMES[bit as usize];
            let what = if shared { format!("shared \"{name}\"") } else { format!("\"{name}\"") };
            Err(Error::Locked(format!(
                "Failed to get {what} lock\nIs another process using the image [{}]?",
                path.display()
            )))
        }
    }
}

/// The lock bytes other open file descriptions hold on `file`, as
/// (held, unshared) permission sets; for diagnostics and tests.
pub fn others_locks(file: &File) -> io::Result<LockMode> {
    let mut held = 0;
    let mut unshared = 0;
    for bit in 0..BIT_COUNT {
        if sys::locked_by_other(file, PERM_BASE + u64::from(bit))? {
            held |= 1 << bit;
        }
        if sys::locked_by_other(file, SHARED_BASE + u64::from(bit))? {
            unshared |= 1 << bit;
        }
    }
    Ok(LockMode { held: Perms(held), unshared: Perms(unshared) })
}

enum Failure {
    Unsupported,
    Io(io::Error),
    Conflict { shared: bool, bit: u32 },
}

impl From<io::Error> for Failure {
    fn from(e: io::Error) -> Self {
        match e.raw_os_error() {
            Some(libc::EINVAL) | Some(libc::ENOSYS) | Some(libc::EOPNOTSUPP) => Failure::Unsupported,
            _ => Failure::Io(e),
        }
    }
}

fn apply_and_check(fd: &File, mode: LockMode) -> std::result::Result<(), Failure> {
    for bit in mode.held.iter() {
        take(fd, PERM_BASE, bit, false)?;
    }
    for bit in mode.unshared.iter() {
        take(fd, SHARED_BASE, bit, true)?;
    }
    // Permissions we hold clash with others refusing them ...
    for bit in mode.held.iter() {
        if sys::locked_by_other(fd, SHARED_BASE + u64::from(bit))? {
            return Err(Failure::Conflict { shared: false, bit });
        }
    }
    // ... and permissions we refuse clash with others holding them.
    for bit in mode.unshared.iter() {
        if sys::locked_by_other(fd, PERM_BASE + u64::from(bit))? {
            return Err(Failure::Conflict { shared: true, bit });
        }
    }
    Ok(())
}

fn take(fd: &File, base: u64, bit: u32, shared: bool) -> std::result::Result<(), Failure> {
    match sys::read_lock(fd, base + u64::from(bit)) {
        Ok(()) => Ok(()),
        // Somebody holds an exclusive lock on the byte; QEMU never does,
        // but whoever does certainly conflicts with us.
        Err(e) if matches!(e.raw_os_error(), Some(libc::EAGAIN) | Some(libc::EACCES)) => {
            Err(Failure::Conflict { shared, bit })
        }
        Err(e) => Err(e.into()),
    }
}

fn unlock_all(fd: &File) -> io::Result<()> {
    sys::unlock(fd, PERM_BASE, u64::from(BIT_COUNT))?;
    sys::unlock(fd, SHARED_BASE, u64::from(BIT_COUNT))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_match_qemus_bytes() {
        assert_eq!(LockMode::reader().held.bits(), 0b0001);
        assert_eq!(LockMode::reader().unshared.bits(), 0b1010);
        assert_eq!(LockMode::writer().held.bits(), 0b1011);
        assert_eq!(LockMode::writer().unshared.bits(), 0b1010);
        assert_eq!(LockMode::force_share().unshared, Perms::NONE);
        assert_eq!(LockMode::for_open(false, true), LockMode::force_share());
    }
}
