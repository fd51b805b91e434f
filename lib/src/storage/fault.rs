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

/// Which operations a fault hits (and which count towards its start).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultOps {
    /// Reads, writes, flushes, length changes, hole punches, reservations.
    All,
    /// Only what can run out of space on a real file system: writes,
    /// reservations and length changes. Flushes, reads and hole punches
    /// always succeed (a full disk does not fail an fsync of data already
    /// accepted, nor a read).
    Space,
    /// Only flushes (an fsync that fails, as NFS or a thin volume may).
    Flushes,
}

/// A memory storage failing its Nth operation (reads, writes, flushes,
/// length changes, hole punches and reservations all count, or only those
/// of [`FaultOps::Space`]), once, from then on, or for a while: a disk
/// that fills up and gets space back ([`FaultStorage::clearing_after`],
/// [`FaultStorage::heal`]).
#[derive(Debug)]
pub struct FaultStorage {
    inner: MemoryStorage,
    count: AtomicU64,
    fail_at: u64,
    fault: Fault,
    ops: FaultOps,
    /// Operations the fault hits in all before it clears (u64::MAX: never clears).
    lasts: AtomicU64,
    fired: AtomicU64,
    healed: AtomicBool,
    failed_on_write: AtomicBool,
    failed_on_flush: AtomicBool,
    failed_on_punch: AtomicBool,
    failed_on_reserve: AtomicBool,
    writes_after_failure: AtomicU64,
}

impl FaultStorage {
    /// Fails operation number `fail_at` (1-based; 0 = never), and with
    /// `persistent` every operation after it too.
    pub fn new(bytes: Vec<u8>, fail_at: u64, fault: Fault, persistent: bool) -> Self {
        FaultStorage {
            inner: MemoryStorage::from_bytes(bytes),
            count: AtomicU64::new(0),
            fail_at,
            fault,
            ops: FaultOps::All,
            lasts: AtomicU64::new(if persistent { u64::MAX } else { 1 }),
            fired: AtomicU64::new(0),
            healed: AtomicBool::new(false),
            failed_on_write: AtomicBool::new(false),
            failed_on_flush: AtomicBool::new(false),
            failed_on_punch: AtomicBool::new(false),
            failed_on_reserve: AtomicBool::new(false),
            writes_after_failure: AtomicU64::new(0),
        }
    }
    /// The fault also fails the `more` operations after the first one it
    /// hits, then clears: space that runs out and comes back.
    pub fn clearing_after(self, more: u64) -> Self {
        self.lasts.store(more.saturating_add(1), Ordering::SeqCst);
        self
    }
    /// Restricts the fault (and the count that starts it) to `ops`.
    pub fn only(mut self, ops: FaultOps) -> Self {
        self.ops = ops;
        self
    }
    /// Clears the fault now (space was freed); it does not fire again.
    pub fn heal(&self) {
        self.healed.store(true, Ordering::SeqCst);
    }
    /// Operations counted so far (those the fault may hit).
    pub fn ops(&self) -> u64 {
        self.count.load(Ordering::SeqCst)
    }
    /// Whether the fault fired.
    pub fn failed(&self) -> bool {
        self.failures() > 0
    }
    /// How many operations the fault failed.
    pub fn failures(&self) -> u64 {
        self.fired.load(Ordering::SeqCst)
    }
    /// Whether the fault fired and has cleared since.
    pub fn cleared(&self) -> bool {
        self.failed() && (self.healed.load(Ordering::SeqCst) || self.failures() >= self.lasts.load(Ordering::SeqCst))
    }
    /// Whether the first injected failure hit a write, flush, punch,
    /// reservation or length change.
    pub fn failed_on_write(&self) -> bool {
        self.failed_on_write.load(Ordering::SeqCst)
    }
    /// Whether the first injected failure hit a flush (after which the
    /// engine must write nothing more: what reached the disk is unknown).
    pub fn failed_on_flush(&self) -> bool {
        self.failed_on_flush.load(Ordering::SeqCst)
    }
    /// Whether the first injected failure hit a hole punch (advisory: the
    /// engine may ignore it, the data stays).
    pub fn failed_on_punch(&self) -> bool {
        self.failed_on_punch.load(Ordering::SeqCst)
    }
    /// Whether the first injected failure hit a space reservation (which
    /// the engine may answer by reserving less).
    pub fn failed_on_reserve(&self) -> bool {
        self.failed_on_reserve.load(Ordering::SeqCst)
    }
    /// Writes (including flushes, punches, reservations, length changes)
    /// that succeeded after the fault first fired.
    pub fn writes_after_failure(&self) -> u64 {
        self.writes_after_failure.load(Ordering::SeqCst)
    }
    /// The current bytes.
    pub fn to_bytes(&self) -> Vec<u8> {
        self.inner.to_bytes()
    }
    fn gate(&self, kind: Op) -> io::Result<()> {
        let counted = match self.ops {
            FaultOps::All => true,
            FaultOps::Space => matches!(kind, Op::Write | Op::Allocate | Op::SetLen),
            FaultOps::Flushes => kind == Op::Flush,
        };
        let is_write = kind != Op::Read;
        if counted {
            let n = self.count.fetch_add(1, Ordering::SeqCst) + 1;
            let started = self.fail_at != 0 && n >= self.fail_at;
            if started && !self.healed.load(Ordering::SeqCst) {
                let lasts = self.lasts.load(Ordering::SeqCst);
                // Claim one failure while the fault still lasts.
                let fire =
                    self.fired.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |f| (f < lasts).then_some(f + 1)).ok();
                if let Some(before) = fire {
                    if before == 0 {
                        self.failed_on_write.store(is_write, Ordering::SeqCst);
                        self.failed_on_flush.store(kind == Op::Flush, Ordering::SeqCst);
                        self.failed_on_punch.store(kind == Op::Punch, Ordering::SeqCst);
                        self.failed_on_reserve.store(kind == Op::Allocate, Ordering::SeqCst);
                    }
                    return Err(io::Error::from_raw_os_error(match self.fault {
                        Fault::Eio => libc::EIO,
                        Fault::Enospc => libc::ENOSPC,
                    }));
                }
            }
        }
        if is_write && self.failed() {
            self.writes_after_failure.fetch_add(1, Ordering::SeqCst);
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Read,
    Write,
    Flush,
    SetLen,
    Punch,
    Allocate,
}

impl Storage for FaultStorage {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.gate(Op::Read)?;
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.gate(Op::Write)?;
        self.inner.write_at(buf, offset)
    }
    fn flush(&self) -> io::Result<()> {
        self.gate(Op::Flush)
    }
    fn len(&self) -> io::Result<u64> {
        self.inner.len()
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        self.gate(Op::SetLen)?;
        self.inner.set_len(len)
    }
    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        self.gate(Op::Punch)?;
        self.inner.punch_hole(offset, len)
    }
    fn allocate(&self, offset: u64, len: u64) -> io::Result<()> {
        self.gate(Op::Allocate)?;
        self.inner.allocate(offset, len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn outcomes(st: &FaultStorage, n: usize) -> Vec<bool> {
        (0..n).map(|i| st.write_at(&[1], i as u64).is_ok()).collect()
    }

    #[test]
    fn once_persistent_and_clearing() {
        let once = FaultStorage::new(Vec::new(), 2, Fault::Enospc, false);
        assert_eq!(outcomes(&once, 5), [true, false, true, true, true]);
        let forever = FaultStorage::new(Vec::new(), 2, Fault::Enospc, true);
        assert_eq!(outcomes(&forever, 5), [true, false, false, false, false]);
        assert!(!forever.cleared());
        let clearing = FaultStorage::new(Vec::new(), 2, Fault::Enospc, true).clearing_after(2);
        assert_eq!(outcomes(&clearing, 6), [true, false, false, false, true, true]);
        assert!(clearing.cleared());
        assert_eq!(clearing.failures(), 3);
        assert_eq!(clearing.writes_after_failure(), 2);
    }

    #[test]
    fn space_faults_spare_reads_and_flushes_and_heal_on_demand() {
        let st = FaultStorage::new(Vec::new(), 1, Fault::Enospc, true).only(FaultOps::Space);
        assert!(st.flush().is_ok());
        assert!(st.read_at(&mut [0u8; 4], 0).is_ok());
        let e = st.allocate(0, 4096).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ENOSPC));
        assert!(st.write_at(&[1], 0).is_err());
        st.heal();
        assert!(st.cleared());
        assert!(st.write_at(&[1], 0).is_ok());
        assert!(!st.failed_on_flush());
    }
}
