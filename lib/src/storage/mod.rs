//! The storage layer: where image bytes live.
//!
//! Every layer above talks to bytes only through [`Storage`], so crash and
//! fault tests can slide a recording or failing implementation underneath
//! the real engine without changing a line of it.
//!
//! The test doubles (counting, crash-recording and fault-injecting
//! storages) exist only with the `testing` feature, which the crate's own
//! tests and the fuzz targets turn on.

mod aligned;
mod blkdebug;
mod blkdebug_break;
mod blkdebug_rules;
mod buffer;
#[cfg(any(test, feature = "testing"))]
mod counting;
#[cfg(any(test, feature = "testing"))]
mod crash;
#[cfg(any(test, feature = "testing"))]
mod fault;
mod file;
pub mod lock;
mod memory;
mod no_flush;
mod null;
mod serialise;
pub(crate) mod sys;

pub use aligned::AlignedStorage;
pub use blkdebug::{parse_name as parse_blkdebug_name, BlkdebugRules, BlkdebugStorage};
pub use blkdebug_break::BlkdebugBreaks;
pub use blkdebug_rules::{
    parse_config as parse_blkdebug_config, parse_options as parse_blkdebug_options, Action as BlkdebugAction,
    BlkdebugEvent, Rule as BlkdebugRule, RuleError as BlkdebugRuleError,
};
pub use buffer::{AlignedBuf, MAX_DIRECT_ALIGN};
#[cfg(any(test, feature = "testing"))]
pub use counting::CountingStorage;
#[cfg(any(test, feature = "testing"))]
pub use crash::{apply_event, CrashLog, CrashStorage, CrashVariant, Event};
#[cfg(any(test, feature = "testing"))]
pub use fault::{Fault, FaultOps, FaultStorage};
pub use file::{host_io_counts, FileStorage, HostIoCounts, OpenFlags};
pub use lock::{lock_image, ImageLock, LockMode, Perms};
pub use memory::MemoryStorage;
pub use no_flush::NoFlushStorage;
pub use null::{NullStorage, DEFAULT_SIZE as NULL_DEFAULT_SIZE};

use std::io;

setters!(OpenFlags { write: bool, direct: bool, create: bool, direct_align: usize });

/// Positional byte storage under an image (a host file, memory, ...).
///
/// Reads past the end return zeros, as reading a sparse file's hole does;
/// writes past the end extend the storage.
pub trait Storage: Send + Sync {
    /// Reads `buf.len()` bytes at `offset`; bytes past the end read as zero.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    /// Writes all of `buf` at `offset`, growing the storage if needed.
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()>;
    /// Makes every completed write durable.
    fn flush(&self) -> io::Result<()>;
    /// Current length in bytes.
    fn len(&self) -> io::Result<u64>;
    /// True when the storage holds no bytes.
    fn is_empty(&self) -> io::Result<bool> {
        Ok(self.len()? == 0)
    }
    /// Truncates or extends (with zeros) to `len` bytes.
    fn set_len(&self, len: u64) -> io::Result<()>;
    /// Deallocates a range so it reads as zeros; the length is unchanged.
    /// Storage that cannot punch holes writes zeros instead.
    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()>;
    /// Reserves space for a range, extending the length if it ends past
    /// it (never shrinking). Writes into the range then overwrite instead
    /// of extending the file, which file systems can run in parallel.
    fn allocate(&self, _offset: u64, _len: u64) -> io::Result<()> {
        Ok(())
    }
    /// Bytes actually allocated on the host (for `actual-size`).
    fn allocated_size(&self) -> io::Result<u64> {
        self.len()
    }
    /// The data-or-hole run that `offset` lies in, as (is_data, run_end),
    /// from the host's sparse-file knowledge; `None` when unknown.
    fn extent_at(&self, _offset: u64) -> Option<(bool, u64)> {
        None
    }
    /// An engine above announces a point of its work (QEMU's blkdebug
    /// events); only a blkdebug layer listens, everything else ignores it
    /// for the cost of an empty call.
    fn debug_event(&self, _event: BlkdebugEvent) {}
}

impl<S: Storage + ?Sized> Storage for std::sync::Arc<S> {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        (**self).read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        (**self).write_at(buf, offset)
    }
    fn flush(&self) -> io::Result<()> {
        (**self).flush()
    }
    fn len(&self) -> io::Result<u64> {
        (**self).len()
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        (**self).set_len(len)
    }
    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        (**self).punch_hole(offset, len)
    }
    fn allocated_size(&self) -> io::Result<u64> {
        (**self).allocated_size()
    }
    fn allocate(&self, offset: u64, len: u64) -> io::Result<()> {
        (**self).allocate(offset, len)
    }
    fn extent_at(&self, offset: u64) -> Option<(bool, u64)> {
        (**self).extent_at(offset)
    }
    fn debug_event(&self, event: BlkdebugEvent) {
        (**self).debug_event(event)
    }
}

/// Writes zeros over a range in bounded chunks (the fallback for hole punching).
pub(crate) fn write_zeros_chunked<S: Storage + ?Sized>(s: &S, mut offset: u64, mut len: u64) -> io::Result<()> {
    const CHUNK: u64 = 1 << 20;
    let zeros = vec![0u8; CHUNK.min(len) as usize];
    while len > 0 {
        let n = CHUNK.min(len);
        s.write_at(&zeros[..n as usize], offset)?;
        offset += n;
        len -= n;
    }
    Ok(())
}
