//! The allocator part of the metadata state: where the next free cluster
//! is looked for, how far the file is handed out and reserved, the
//! refcount decrements waiting for their write-back, and the packing
//! cursor of compressed clusters.
//!
//! Invariants kept here: the allocation end only grows, except through
//! [`Allocator::truncate_end`]; the free hint never passes a cluster that
//! was freed; a freed cluster that held the compression cursor resets it,
//! so packing never lands in a reused cluster.

use super::units::{HostCluster, HostOffset};

/// A refcount decrement waiting until no on-disk table points at the
/// cluster any more (crash-safety rule: a freed cluster is not reused, and
/// its refcount does not drop, before the entry that pointed to it is gone
/// from disk).
#[derive(Debug, Clone, Copy)]
pub(crate) struct PendingFree {
    /// Start of the cluster.
    pub offset: HostOffset,
    /// Punch a hole there once its refcount reaches zero (guest discards).
    pub punch: bool,
}

/// Clusters allocated together for one write (refcount already 1, no
/// table points at them yet) and handed out one by one as the write's
/// plan reaches them: QEMU places the clusters one write needs as one
/// contiguous run, and so does oxcow.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ReservedRun {
    /// Next cluster to hand out.
    pub next: HostCluster,
    /// End of the run (exclusive).
    pub end: HostCluster,
    /// First cluster that was past the allocation end (reads as zeros).
    pub fresh_from: HostCluster,
}

/// Allocation cursors and deferred frees.
pub(crate) struct Allocator {
    /// Rest of the run allocated for the write being planned.
    run: Option<ReservedRun>,
    /// Where the write being planned last allocated up to: its next
    /// allocation tries to continue there first, as QEMU's does. Cleared
    /// when a write request starts.
    cont: Option<HostCluster>,
    /// Cluster from which the next free-cluster search starts.
    free_hint: HostCluster,
    /// End of the space the allocator has handed out (cluster aligned).
    file_end: HostOffset,
    /// End of the space reserved in the image file ahead of `file_end`.
    prealloc_end: HostOffset,
    /// Largest chunk to try reserving ahead: halved when the file system
    /// has no room for a chunk, doubled back with each reservation that
    /// fits, so a nearly full disk costs few failing reservations.
    reserve_cap: u64,
    /// Decrements to apply after the next metadata write-out.
    pending: Vec<PendingFree>,
    /// End of the clusters guest data was found mapped to, when past
    /// `file_end` (a damaged or truncated image): the truncation at close
    /// keeps them.
    keep_end: HostOffset,
    /// End of the last compressed cluster written, where the next one is
    /// packed (0 = start a new host cluster).
    compress_cursor: HostOffset,
    /// Where the written bytes of the last handed-out cluster end, when
    /// that cluster holds metadata written shorter than a cluster (a
    /// bitmap directory): a clean close ends the file there, as QEMU's
    /// file ends after its last write. Dropped when the end moves.
    short_tail: Option<HostOffset>,
}

impl Allocator {
    /// The state for a file of `file_len` bytes whose space up to
    /// `file_end` (cluster aligned) counts as handed out.
    pub fn new(file_end: HostOffset, file_len: u64) -> Self {
        Allocator {
            run: None,
            cont: None,
            free_hint: HostCluster(0),
            file_end,
            prealloc_end: HostOffset(file_len),
            reserve_cap: u64::MAX,
            pending: Vec::new(),
            keep_end: HostOffset(0),
            compress_cursor: HostOffset(0),
            short_tail: None,
        }
    }

    /// End of the space handed out.
    pub fn file_end(&self) -> HostOffset {
        self.file_end
    }
    /// Hands out the space up to `end`, if that is further than now.
    pub fn extend_end(&mut self, end: HostOffset) {
        if end > self.file_end {
            self.short_tail = None;
        }
        self.file_end = self.file_end.max(end);
    }
    /// Takes back the space from `end` on (a truncation of the file).
    pub fn truncate_end(&mut self, end: HostOffset) {
        self.file_end = end;
        self.short_tail = None;
        // The file is cut there too: nothing past it is reserved any more.
        self.prealloc_end = self.prealloc_end.min(end);
    }

    /// Metadata written up to `end` ends the file's last cluster early
    /// (ignored unless `end` lies in that cluster).
    pub fn note_short_tail(&mut self, end: HostOffset) {
        self.short_tail = Some(end);
    }
    /// Where a clean close may end the file instead of `file_end`.
    pub fn short_tail(&self, cluster_size: u64) -> Option<HostOffset> {
        self.short_tail.filter(|t| t.0 < self.file_end.0 && t.0 + cluster_size > self.file_end.0)
    }

    /// Where the next search for a free cluster starts.
    pub fn free_hint(&self) -> HostCluster {
        self.free_hint
    }
    /// Moves the search start (after a search, or to the end).
    pub fn set_free_hint(&mut self, c: HostCluster) {
        self.free_hint = c;
    }
    /// Cluster `c` became free: the next search must not skip it.
    pub fn note_free(&mut self, c: HostCluster) {
        self.free_hint = self.free_hint.min(c);
    }
    /// Searches from the start again (refcounts were rebuilt).
    pub fn rescan(&mut self) {
        self.free_hint = HostCluster(0);
    }

    /// Keeps the rest of a run allocated for the write being planned.
    pub fn set_run(&mut self, run: ReservedRun) {
        self.run = (run.next < run.end).then_some(run);
    }
    /// The next cluster of the reserved run, and whether it is fresh.
    pub fn take_from_run(&mut self) -> Option<(HostCluster, bool)> {
        let r = self.run.as_mut()?;
        let c = r.next;
        let fresh = c >= r.fresh_from;
        r.next = c.add(1);
        if r.next >= r.end {
            self.run = None;
        }
        Some((c, fresh))
    }
    /// Where the write's next allocation tries to continue.
    pub fn cont(&self) -> Option<HostCluster> {
        self.cont
    }
    /// The write's allocation ended before `c`.
    pub fn set_cont(&mut self, c: HostCluster) {
        self.cont = Some(c);
    }
    /// A new write request: its first allocation searches.
    pub fn clear_cont(&mut self) {
        self.cont = None;
    }
    /// Whether a reserved run has clusters left.
    pub fn has_run(&self) -> bool {
        self.run.is_some()
    }
    /// Ends the reserved run, returning the clusters not handed out.
    pub fn take_run_rest(&mut self) -> Option<(HostCluster, HostCluster)> {
        self.run.take().map(|r| (r.next, r.end))
    }

    /// End of the space reserved in the file.
    pub fn prealloc_end(&self) -> HostOffset {
        self.prealloc_end
    }
    /// Records how far the file is reserved now.
    pub fn set_prealloc_end(&mut self, end: HostOffset) {
        self.prealloc_end = end;
    }
    /// Largest chunk worth trying to reserve ahead.
    pub fn reserve_cap(&self) -> u64 {
        self.reserve_cap
    }
    /// Records a reservation outcome (see the field).
    pub fn set_reserve_cap(&mut self, cap: u64) {
        self.reserve_cap = cap;
    }

    /// Schedules the release of one reference.
    pub fn free_later(&mut self, p: PendingFree) {
        self.pending.push(p);
    }
    /// Whether releases are waiting.
    pub fn has_pending(&self) -> bool {
        !self.pending.is_empty()
    }
    /// Takes the waiting releases, to apply them.
    pub fn take_pending(&mut self) -> Vec<PendingFree> {
        std::mem::take(&mut self.pending)
    }
    /// Puts back releases that could not be applied.
    pub fn requeue(&mut self, rest: &[PendingFree]) {
        self.pending.extend_from_slice(rest);
    }

    /// Keeps the space up to `end` at close (guest data found mapped there).
    pub fn keep(&mut self, end: HostOffset) {
        self.keep_end = self.keep_end.max(end);
    }
    /// What the truncation at close must keep, beyond the handed-out end.
    pub fn keep_end(&self) -> HostOffset {
        self.keep_end
    }

    /// Where the next compressed cluster is packed (0: a new cluster).
    pub fn compress_cursor(&self) -> HostOffset {
        self.compress_cursor
    }
    /// Moves the packing cursor past a compressed cluster just placed.
    pub fn set_compress_cursor(&mut self, at: HostOffset) {
        self.compress_cursor = at;
    }
    /// Starts packing in a new cluster (the current one may be shared by
    /// a snapshot, or gone).
    pub fn reset_compress_cursor(&mut self) {
        self.compress_cursor = HostOffset(0);
    }
    /// Cluster `c` was freed: packing must not continue in it, nor may
    /// the file end early in it.
    pub fn cluster_freed(&mut self, c: HostCluster, cluster_bits: u32) {
        if self.compress_cursor.0 >> cluster_bits == c.0 {
            self.compress_cursor = HostOffset(0);
        }
        // The metadata that ended the file early is gone: whatever reuses
        // the cluster is written whole.
        if self.short_tail.is_some_and(|t| t.0.saturating_sub(1) >> cluster_bits == c.0) {
            self.short_tail = None;
        }
    }
}
