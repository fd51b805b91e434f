//! The refcount part of the metadata state: the refcount table, the cache
//! of refcount blocks, and what of them still has to reach disk.
//!
//! Invariants kept here rather than at call sites: every change of a
//! table entry widens the table's dirty range; a block written early (by
//! an eviction) is remembered as unsynced until the next fsync between
//! write-back stages.

use super::cache::TableCache;
use super::units::HostOffset;
use crate::format::refcount::REFTABLE_OFFSET_MASK;

/// Refcount table and blocks as they are (or will be) on disk.
pub(crate) struct Refcounts {
    /// The refcount table.
    table: Vec<u64>,
    /// Range of table indices changed since the table was last written.
    table_dirty: Option<(usize, usize)>,
    /// Cached refcount blocks.
    blocks: TableCache,
    /// A dirty refcount block was written early (evicted from the cache)
    /// since the last sync: like copied data, it must be durable before
    /// an L2 or L1 entry that relies on it, or the refcount table entry
    /// pointing at it, is written.
    blocks_unsynced: bool,
    /// Lazy refcounts in effect: refcount blocks are not written until a
    /// clean close, and the dirty bit is on disk.
    lazy_active: bool,
}

impl Refcounts {
    /// The state of a table just read from disk, with a block cache of
    /// `block_cap` blocks.
    pub fn new(table: Vec<u64>, block_cap: usize) -> Self {
        Refcounts {
            table,
            table_dirty: None,
            blocks: TableCache::new(block_cap),
            blocks_unsynced: false,
            lazy_active: false,
        }
    }

    /// The raw table entries.
    pub fn table(&self) -> &[u64] {
        &self.table
    }

    /// Number of table entries.
    pub fn table_len(&self) -> usize {
        self.table.len()
    }

    /// Host offset of the block of table entry `t` (0 when unallocated);
    /// `None` past the end of the table.
    pub fn block_offset(&self, t: usize) -> Option<HostOffset> {
        self.table.get(t).map(|&e| HostOffset(e & REFTABLE_OFFSET_MASK))
    }

    /// Points table entry `t` at a block; the entry is owed to the disk.
    pub fn set_block_offset(&mut self, t: usize, off: HostOffset) {
        self.table[t] = off.0;
        self.table_dirty = Some(match self.table_dirty {
            Some((a, b)) => (a.min(t), b.max(t)),
            None => (t, t),
        });
    }

    /// Grows the table to `entries` entries (the new ones unallocated),
    /// for a table about to be written whole at a new place.
    pub fn grow_table(&mut self, entries: usize) {
        self.table.resize(entries, 0);
    }

    /// Drops every cached block, dirty or not (the repair rebuilt them on
    /// disk).
    pub fn reset_blocks(&mut self, block_cap: usize) {
        self.blocks = TableCache::new(block_cap);
    }

    /// Swaps the table without touching the cache or the dirty range (a
    /// temporary view put back by a second swap, or a table about to be
    /// installed whole).
    pub fn swap_table(&mut self, table: Vec<u64>) -> Vec<u64> {
        std::mem::replace(&mut self.table, table)
    }

    /// The range of entries owed to the disk, if any.
    pub fn table_dirty(&self) -> Option<(usize, usize)> {
        self.table_dirty
    }

    /// Takes the range of entries owed to the disk, to write it.
    pub fn take_table_dirty(&mut self) -> Option<(usize, usize)> {
        self.table_dirty.take()
    }

    /// The whole table reached disk (a new table installed).
    pub fn table_written(&mut self) {
        self.table_dirty = None;
    }

    /// The cached blocks.
    pub fn blocks(&self) -> &TableCache {
        &self.blocks
    }

    /// The cached blocks, for changes.
    pub fn blocks_mut(&mut self) -> &mut TableCache {
        &mut self.blocks
    }

    /// A dirty block was written outside the write-back stages.
    pub fn block_written_early(&mut self) {
        self.blocks_unsynced = true;
    }

    /// Whether a block written early still waits for an fsync.
    pub fn blocks_unsynced(&self) -> bool {
        self.blocks_unsynced
    }

    /// An fsync made everything written so far durable.
    pub fn synced(&mut self) {
        self.blocks_unsynced = false;
    }

    /// Whether lazy refcounts are in effect (dirty bit on disk).
    pub fn lazy_active(&self) -> bool {
        self.lazy_active
    }

    /// Records whether lazy refcounts are in effect.
    pub fn set_lazy_active(&mut self, on: bool) {
        self.lazy_active = on;
    }
}
