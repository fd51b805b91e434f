//! The engine's mutable metadata state, guarded by one mutex.

use super::cache::TableCache;
use super::overlap::OverlapMap;
use crate::format::extensions::HeaderCluster;
use crate::format::header::CompressionType;
use crate::format::l2::L2Layout;
use crate::format::refcount::RefcountLayout;
use crate::format::SnapshotEntry;
use crate::Error;
use std::collections::HashSet;
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

/// A refcount decrement waiting until no on-disk table points at the
/// cluster any more (crash-safety rule: a freed cluster is not reused, and
/// its refcount does not drop, before the entry that pointed to it is gone
/// from disk).
#[derive(Debug, Clone, Copy)]
pub(crate) struct PendingFree {
    /// Host offset of the cluster.
    pub offset: u64,
    /// Punch a hole there once its refcount reaches zero (guest discards).
    pub punch: bool,
}

/// Everything the metadata mutex protects.
pub(crate) struct Meta {
    /// Header, extensions and backing name as they are (or will be) on disk.
    pub hc: HeaderCluster,
    /// The header on disk differs from `hc`.
    pub header_dirty: bool,
    /// The active L1 table.
    pub l1: Vec<u64>,
    /// Range of L1 indices changed since the last flush.
    pub l1_dirty: Option<(usize, usize)>,
    /// Cached L2 tables.
    pub l2: TableCache,
    /// The refcount table.
    pub reftable: Vec<u64>,
    /// Range of refcount table indices changed since the last flush.
    pub reftable_dirty: Option<(usize, usize)>,
    /// Cached refcount blocks.
    pub rb: TableCache,
    /// Internal snapshots.
    pub snapshots: Vec<SnapshotEntry>,
    /// Cluster index from which the next free-cluster search starts.
    pub free_hint: u64,
    /// End of the space the allocator has handed out (cluster aligned).
    pub file_end: u64,
    /// End of the space reserved in the image file ahead of `file_end`.
    pub prealloc_end: u64,
    /// Largest chunk to try reserving ahead: halved when the file system
    /// has no room for a chunk, doubled back with each reservation that
    /// fits, so a nearly full disk costs few failing reservations.
    pub reserve_cap: u64,
    /// Decrements to apply after the next metadata write-out.
    pub pending_free: Vec<PendingFree>,
    /// Guest clusters whose L2 entry a writer is changing with data I/O in
    /// flight; others wait on the condition variable.
    pub inflight: HashSet<u64>,
    /// Clusters holding metadata, with what they hold (overlap check).
    pub meta_clusters: OverlapMap,
    /// End of the clusters guest data was found mapped to, when past
    /// `file_end` (a damaged or truncated image): the truncation at close
    /// keeps them.
    pub keep_end: u64,
    /// Copy-on-write data (the old content around a write, copied into a
    /// newly mapped cluster) was written since the last sync: it must be
    /// durable before an L2 entry pointing at it is.
    pub cow_unsynced: bool,
    /// A dirty refcount block was written early (evicted from the cache)
    /// since the last sync: like copied data, it must be durable before
    /// an L2 or L1 entry that relies on it, or the refcount table entry
    /// pointing at it, is written.
    pub refblocks_unsynced: bool,
    /// Lazy refcounts in effect: refcount blocks are not written until a
    /// clean close, and the dirty bit is on disk.
    pub lazy_active: bool,
    /// The image was found corrupt while writing; read-only from now on.
    pub corrupt: bool,
    /// End of the last compressed cluster written, where the next one is
    /// packed (0 = start a new host cluster); reset when that host
    /// cluster is freed, so packing never lands in a reused cluster.
    pub compress_cursor: u64,
}

impl Meta {
    pub fn mark_l1_dirty(&mut self, i: usize) {
        self.l1_dirty = Some(match self.l1_dirty {
            Some((a, b)) => (a.min(i), b.max(i)),
            None => (i, i),
        });
    }
    pub fn mark_reftable_dirty(&mut self, i: usize) {
        self.reftable_dirty = Some(match self.reftable_dirty {
            Some((a, b)) => (a.min(i), b.max(i)),
            None => (i, i),
        });
    }
}

/// The first failure after which the image's on-disk state is no longer
/// known (see "Failures: what poisons and why" in docs/DESIGN.md). Kept
/// outside [`Meta`] because a failed fsync is recorded where it happens,
/// with or without the metadata lock held; it is a leaf lock.
#[derive(Default)]
pub(crate) struct Poison(Mutex<Option<Error>>);

impl Poison {
    fn slot(&self) -> std::sync::MutexGuard<'_, Option<Error>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
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
        }
    }
    /// Whether a failure is recorded.
    pub fn is_set(&self) -> bool {
        self.slot().is_some()
    }
    /// Refuses with the recorded failure, if any.
    pub fn check(&self) -> Result<(), Error> {
        match &*self.slot() {
            Some(cause) => Err(Error::Poisoned(Box::new(cause.duplicate()))),
            None => Ok(()),
        }
    }
}
