//! An image's guest content as another image's file: QEMU's
//! format-over-format nodes (`driver=qcow2,file.driver=qcow2,...`), where
//! the outer format reads and writes the inner image's virtual disk as
//! if it were a host file.
//!
//! The inner image's disk has a fixed size: writes past its end fail
//! (QEMU's format nodes do not grow either), and "holes" are zero writes
//! that may unmap, so the inner image frees what it can.

use crate::image::Image;
use crate::storage::Storage;
use crate::{BlockDevice, Error};
use std::io;

/// A [`Storage`] over an open image's virtual disk.
pub(crate) struct NestedStorage {
    /// The inner image; kept whole so its backing chain and data file
    /// stay open as long as the outer image uses it.
    inner: Image,
}

impl NestedStorage {
    pub(crate) fn new(inner: Image) -> Self {
        NestedStorage { inner }
    }

    fn dev(&self) -> &dyn BlockDevice {
        &**self.inner.device()
    }

    /// Bytes of `[offset, offset + want)` inside the inner disk.
    fn inside(&self, offset: u64, want: u64) -> u64 {
        self.dev().len().saturating_sub(offset).min(want)
    }
}

/// An engine error as the I/O error a file would have given, its errno
/// kept so the outer image reports what the inner one hit.
fn as_io(e: Error) -> io::Error {
    match e {
        Error::Io { source, .. } => source,
        other => io::Error::other(other.to_string()),
    }
}

impl Storage for NestedStorage {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let n = self.inside(offset, buf.len() as u64) as usize;
        if n > 0 {
            self.dev().read_at(&mut buf[..n], offset).map_err(as_io)?;
        }
        buf[n..].fill(0);
        Ok(())
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        if self.inside(offset, buf.len() as u64) < buf.len() as u64 {
            return Err(io::Error::from_raw_os_error(libc::EIO));
        }
        self.dev().write_at(buf, offset).map_err(as_io)
    }
    fn flush(&self) -> io::Result<()> {
        self.dev().flush().map_err(as_io)
    }
    fn len(&self) -> io::Result<u64> {
        Ok(self.dev().len())
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        if len <= self.dev().len() {
            // Shrinking a host file is how engines give back their tail;
            // the inner disk keeps its size and the tail reads as zeros.
            let n = self.dev().len() - len;
            return if n == 0 { Ok(()) } else { self.dev().write_zeroes(len, n, true).map_err(as_io) };
        }
        Err(io::Error::from_raw_os_error(libc::EIO))
    }
    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        let n = self.inside(offset, len);
        if n == 0 {
            return Ok(());
        }
        self.dev().write_zeroes(offset, n, true).map_err(as_io)
    }
    fn extent_at(&self, offset: u64) -> Option<(bool, u64)> {
        let size = self.dev().len();
        if offset >= size {
            return None;
        }
        let st = self.dev().block_status(offset, size - offset).ok()?;
        Some((st.data || !st.zero, st.offset + st.length))
    }
}

impl Drop for NestedStorage {
    fn drop(&mut self) {
        // What the outer image wrote reaches the inner image's file.
        let _ = self.inner.close();
    }
}
