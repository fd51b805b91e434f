//! A storage that fails the Nth I/O, for fault-injection tests.

use super::{MemoryStorage, Storage};
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// Which errno to inject.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// EIO.
    Eio,
    /// ENOSPC.
    Enospc,
}

/// A memory storage failing its Nth operation (reads, writes, flushes,
/// length changes and hole punches all count), once or from then on.
#[derive(Debug)]
pub struct FaultStorage {
    inner: MemoryStorage,
    count: AtomicU64,
    fail_at: u64,
    fault: Fault,
    persistent: bool,
    failed: AtomicBool,
    failed_on_write: AtomicBool,
    failed_on_punch: AtomicBool,
    writes_after_failure: AtomicU64,
}

impl FaultStorage {
    /// Fails operation number `fail_at` (1-based; 0 = never).
    pub fn new(bytes: Vec<u8>, fail_at: u64, fault: Fault, persistent: bool) -> Self {
        FaultStorage {
            inner: MemoryStorage::from_bytes(bytes),
            count: AtomicU64::new(0),
            fail_at,
            fault,
            persistent,
            failed: AtomicBool::new(false),
            failed_on_write: AtomicBool::new(false),
            failed_on_punch: AtomicBool::new(false),
            writes_after_failure: AtomicU64::new(0),
        }
    }
    /// Operations seen so far.
    pub fn ops(&self) -> u64 {
        self.count.load(Ordering::SeqCst)
    }
    /// Whether the fault fired.
    pub fn failed(&self) -> bool {
        self.failed.load(Ordering::SeqCst)
    }
    /// Whether the first injected failure hit a write, flush, punch or
    /// length change (after which the engine must write nothing more).
    pub fn failed_on_write(&self) -> bool {
        self.failed_on_write.load(Ordering::SeqCst)
    }
    /// Whether the first injected failure hit a hole punch (advisory: the
    /// engine may ignore it, the data stays).
    pub fn failed_on_punch(&self) -> bool {
        self.failed_on_punch.load(Ordering::SeqCst)
    }
    /// Writes (including flushes, punches, length changes) that succeeded
    /// after the fault fired.
    pub fn writes_after_failure(&self) -> u64 {
        self.writes_after_failure.load(Ordering::SeqCst)
    }
    /// The current bytes.
    pub fn to_bytes(&self) -> Vec<u8> {
        self.inner.to_bytes()
    }
    fn gate(&self, is_write: bool) -> io::Result<()> {
        let n = self.count.fetch_add(1, Ordering::SeqCst) + 1;
        let fire = self.fail_at != 0 && (n == self.fail_at || (self.persistent && n > self.fail_at));
        if fire {
            if !self.failed.swap(true, Ordering::SeqCst) {
                self.failed_on_write.store(is_write, Ordering::SeqCst);
            }
            return Err(io::Error::from_raw_os_error(match self.fault {
                Fault::Eio => libc::EIO,
                Fault::Enospc => libc::ENOSPC,
            }));
        }
        if is_write && self.failed() {
            self.writes_after_failure.fetch_add(1, Ordering::SeqCst);
        }
        Ok(())
    }
}

impl Storage for FaultStorage {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.gate(false)?;
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.gate(true)?;
        self.inner.write_at(buf, offset)
    }
    fn flush(&self) -> io::Result<()> {
        self.gate(true)
    }
    fn len(&self) -> io::Result<u64> {
        self.inner.len()
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        self.gate(true)?;
        self.inner.set_len(len)
    }
    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        let first = !self.failed();
        let r = self.gate(true);
        if r.is_err() && first {
            self.failed_on_punch.store(true, Ordering::SeqCst);
        }
        r?;
        self.inner.punch_hole(offset, len)
    }
}
