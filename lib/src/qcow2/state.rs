//! The engine's mutable metadata state, guarded by the metadata lock
//! (see "Locks and order" in `mod.rs`).

use super::allocator::Allocator;
use super::mapping::Mapping;
use super::overlap::OverlapMap;
use super::refcounts::Refcounts;
use crate::format::extensions::HeaderCluster;
use crate::format::header::CompressionType;
use crate::format::l2::L2Layout;
use crate::format::refcount::RefcountLayout;
use crate::format::SnapshotEntry;
use crate::Error;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

/// Fixed geometry of an open image.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Geometry {
    pub cluster_bits: u32,
    pub cluster_size: u64,
    pub l2: L2Layout,
    pub rc: RefcountLayout,
    pub l2_entries: u64,
    pub sub_size: u64,
    pub v3: bool,
    pub extended: bool,
    pub compression: CompressionType,
    pub external_data: bool,
    pub data_raw: bool,
}

impl Geometry {
    pub fn from_header(h: &crate::format::Header) -> Self {
        let l2 = L2Layout { cluster_bits: h.cluster_bits, extended: h.extended_l2() };
        Geometry {
            cluster_bits: h.cluster_bits,
            cluster_size: h.cluster_size(),
            l2,
            rc: RefcountLayout { cluster_bits: h.cluster_bits, refcount_order: h.refcount_order },
            l2_entries: l2.entries(),
            sub_size: l2.subcluster_size(),
            v3: h.version >= 3,
            extended: h.extended_l2(),
            compression: h.compression_type,
            external_data: h.has_data_file(),
            data_raw: h.autoclear_features & crate::format::Autoclear::DATA_FILE_RAW != 0,
        }
    }
}

pub(crate) use super::overlap::MetaKind;

/// Everything the metadata lock protects: the header, the snapshot
/// table and a few flags, and the parts that keep their own invariants.
pub(crate) struct Meta {
    /// Header, extensions and backing name as they are (or will be) on disk.
    pub hc: HeaderCluster,
    /// The header on disk differs from `hc`.
    pub header_dirty: bool,
    /// The active L1 table and the L2 table cache.
    pub map: Mapping,
    /// The refcount table and the refcount block cache.
    pub refs: Refcounts,
    /// Allocation cursors and deferred frees.
    pub alloc: Allocator,
    /// Clusters holding metadata, with what they hold (overlap check).
    pub overlap: OverlapMap,
    /// Internal snapshots.
    pub snapshots: Vec<SnapshotEntry>,
    /// Limits of QEMU's the snapshot table on disk breaks, found by an
    /// open for `check` (`snapshot_table.rs`); `snapshots` holds what a
    /// repair keeps.
    pub snapshot_findings: Vec<super::snapshot_table::TableFinding>,
    /// Copy-on-write data (the old content around a write, copied into a
    /// newly mapped cluster) was written since the last sync: it must be
    /// durable before an L2 entry pointing at it is.
    pub cow_unsynced: bool,
    /// The image was found corrupt while writing; read-only from now on.
    pub corrupt: bool,
    /// The recovery journal's state (`journal.rs`).
    pub journal: super::journal::Journal,
}

/// The first failure after which the image's on-disk state is no longer
/// known (see "Failures: what poisons and why" in docs/DESIGN.md). Kept
/// outside [`Meta`] because a failed fsync is recorded where it happens,
/// with or without the metadata lock held; it is a leaf lock.
#[derive(Default)]
pub(crate) struct Poison {
    /// The failure, once there is one.
    cause: Mutex<Option<Error>>,
    /// Whether `cause` is set, readable without the lock: every write
    /// checks, and a mutex taken by every request of every thread was the
    /// one contended lock on the rewrite path (issue 19).
    set: AtomicBool,
}

impl Poison {
    fn slot(&self) -> std::sync::MutexGuard<'_, Option<Error>> {
        self.cause.lock().unwrap_or_else(|e| e.into_inner())
    }
    /// Records `e` unless an earlier failure is recorded already.
    pub fn set(&self, e: &Error) {
        let mut slot = self.slot();
        if slot.is_none() {
            let cause = match e {
                Error::Poisoned(cause) => cause.duplicate(),
                other => other.duplicate(),
            };
            *slot = Some(cause);
            self.set.store(true, Ordering::Release);
        }
    }
    /// Whether a failure is recorded.
    pub fn is_set(&self) -> bool {
        self.set.load(Ordering::Acquire)
    }
    /// Refuses with the recorded failure, if any.
    pub fn check(&self) -> Result<(), Error> {
        if !self.is_set() {
            return Ok(());
        }
        match &*self.slot() {
            Some(cause) => Err(Error::Poisoned(Box::new(cause.duplicate()))),
            None => Ok(()),
        }
    }
}
