//! A small LRU cache of metadata tables (L2 tables, refcount blocks),
//! keyed by host offset, with dirty tracking.
//!
//! The cache holds no policy about write ordering: callers decide when a
//! dirty table may reach disk (see `flush.rs`).

use std::collections::HashMap;

struct Slot {
    data: Vec<u8>,
    /// Byte range changed since the table was last written.
    dirty: Option<(usize, usize)>,
    last_use: u64,
}

/// Granularity of partial table write-back: a page, so O_DIRECT needs no
/// read-modify-write and a table update costs 4 KiB, not a whole cluster.
const WRITE_GRAIN: usize = 4096;

/// Tables cached by host offset.
pub(crate) struct TableCache {
    slots: HashMap<u64, Slot>,
    capacity: usize,
    tick: u64,
}

impl TableCache {
    /// A cache holding at most `capacity` tables (at least 4).
    pub fn new(capacity: usize) -> Self {
        TableCache { slots: HashMap::new(), capacity: capacity.max(4), tick: 0 }
    }

    fn touch(&mut self) -> u64 {
        self.tick += 1;
        self.tick
    }

    /// The cached table at `off`, if present.
    pub fn get(&mut self, off: u64) -> Option<&[u8]> {
        let t = self.touch();
        self.slots.get_mut(&off).map(|s| {
            s.last_use = t;
            &s.data[..]
        })
    }

    /// The cached table at `off` for modification; marks it all dirty.
    pub fn get_mut(&mut self, off: u64) -> Option<&mut Vec<u8>> {
        self.get_mut_range(off, 0, usize::MAX)
    }

    /// The cached table at `off` for a change of bytes `[from, to)` only;
    /// marks just that range dirty.
    pub fn get_mut_range(&mut self, off: u64, from: usize, to: usize) -> Option<&mut Vec<u8>> {
        let t = self.touch();
        self.slots.get_mut(&off).map(|s| {
            s.last_use = t;
            let to = to.min(s.data.len());
            s.dirty = Some(match s.dirty {
                Some((a, b)) => (a.min(from), b.max(to)),
                None => (from, to),
            });
            &mut s.data
        })
    }

    /// Whether `off` is cached.
    pub fn contains(&self, off: u64) -> bool {
        self.slots.contains_key(&off)
    }

    /// Inserts a table (replacing any cached one at `off`).
    pub fn insert(&mut self, off: u64, data: Vec<u8>, dirty: bool) {
        let t = self.touch();
        let dirty = dirty.then_some((0, data.len()));
        self.slots.insert(off, Slot { data, dirty, last_use: t });
    }

    /// Whether inserting one more table needs an eviction first.
    pub fn is_full(&self) -> bool {
        self.slots.len() >= self.capacity
    }

    /// The least recently used table: (offset, dirty).
    pub fn lru(&self) -> Option<(u64, bool)> {
        self.slots.iter().min_by_key(|(_, s)| s.last_use).map(|(&o, s)| (o, s.dirty.is_some()))
    }

    /// Drops a table from the cache.
    pub fn remove(&mut self, off: u64) -> Option<Vec<u8>> {
        self.slots.remove(&off).map(|s| s.data)
    }

    /// Offsets of dirty tables, ascending (so writes go out in file order).
    pub fn dirty(&self) -> Vec<u64> {
        let mut v: Vec<u64> = self.slots.iter().filter(|(_, s)| s.dirty.is_some()).map(|(&o, _)| o).collect();
        v.sort_unstable();
        v
    }

    /// Dirty tables with the byte range to write, widened to whole pages:
    /// (offset, start within the table, end), ascending by offset.
    pub fn dirty_ranges(&self) -> Vec<(u64, usize, usize)> {
        let mut v: Vec<(u64, usize, usize)> = self
            .slots
            .iter()
            .filter_map(|(&o, s)| {
                s.dirty.map(|(a, b)| {
                    let a = a / WRITE_GRAIN * WRITE_GRAIN;
                    let b = b.div_ceil(WRITE_GRAIN) * WRITE_GRAIN;
                    (o, a.min(s.data.len()), b.min(s.data.len()))
                })
            })
            .collect();
        v.sort_unstable();
        v
    }

    /// Whether any table is dirty.
    pub fn any_dirty(&self) -> bool {
        self.slots.values().any(|s| s.dirty.is_some())
    }

    /// The table's bytes without touching LRU order or dirtiness.
    pub fn peek(&self, off: u64) -> Option<&[u8]> {
        self.slots.get(&off).map(|s| &s.data[..])
    }

    /// Marks a table clean after it was written.
    pub fn mark_clean(&mut self, off: u64) {
        if let Some(s) = self.slots.get_mut(&off) {
            s.dirty = None;
        }
    }
}
