//! A small cache of metadata tables (L2 tables, refcount blocks), keyed
//! by host offset, with dirty tracking and clock (second-chance)
//! eviction.
//!
//! A lookup takes `&self`: it only sets the slot's reference bit, an
//! atomic, so lookups can run under a shared lock (the read path's L2
//! lookups do). Eviction sweeps a hand over the slots, clearing reference
//! bits, and picks the first slot not used since the hand last passed:
//! constant work per eviction on average, where a least-recently-used
//! stamp needed a scan of every slot and a write per lookup.
//!
//! Memory: the slots are reserved for the whole capacity up front and the
//! index is a fixed open-addressing table of `u32`s, so filling the cache
//! never reallocates. Growing a `Vec` and a `HashMap` by doubling left
//! every outgrown copy in the allocator's free lists, resident: with 4096
//! slices cached that was about a third of a MiB over the slices
//! themselves, which is what kept `oxcow serve` above qemu-nbd's peak.
//!
//! The cache holds no policy about write ordering: callers decide when a
//! dirty table may reach disk (see `flush.rs`).

use super::units::HostOffset;
use std::sync::atomic::{AtomicBool, Ordering};

struct Slot {
    off: HostOffset,
    data: Vec<u8>,
    /// Byte range changed since the table was last written (a table is at
    /// most a cluster, 2 MiB: `u32` is enough and keeps the slot small).
    dirty: Option<(u32, u32)>,
    /// Used since the clock hand last passed.
    referenced: AtomicBool,
    /// Not used since the last cleaning (`cache-clean-interval`).
    idle: AtomicBool,
}

impl Slot {
    fn touch(&self) {
        // A load first: a hot slot's cache line stays shared between the
        // cores reading it instead of bouncing with every lookup.
        if !self.referenced.load(Ordering::Relaxed) {
            self.referenced.store(true, Ordering::Relaxed);
        }
        if self.idle.load(Ordering::Relaxed) {
            self.idle.store(false, Ordering::Relaxed);
        }
    }
}

/// Granularity of partial table write-back: a page, so O_DIRECT needs no
/// read-modify-write and a table update costs 4 KiB, not a whole cluster.
const WRITE_GRAIN: usize = 4096;

/// Most slots reserved up front (1.5 MiB of slots, 256 KiB of index).
const RESERVE_MAX: usize = 1 << 15;

/// Slot numbers by host offset: linear probing in a power-of-two table at
/// most half full, 0 for an empty bucket, `slot + 1` otherwise.
struct Index {
    buckets: Vec<u32>,
}

impl Index {
    fn new(capacity: usize) -> Self {
        Index { buckets: vec![0; (capacity * 2).next_power_of_two().max(8)] }
    }

    fn home(&self, off: HostOffset) -> usize {
        // Fibonacci hashing of the offset's page number: tables sit at
        // multiples of their size, so the low bits carry nothing.
        let h = (off.0 >> 9).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        (h >> 32) as usize & (self.buckets.len() - 1)
    }

    /// The bucket holding `off`, or the empty bucket that ends its probe.
    fn find(&self, off: HostOffset, slots: &[Slot]) -> (usize, Option<usize>) {
        let mask = self.buckets.len() - 1;
        let mut b = self.home(off);
        loop {
            match self.buckets[b] {
                0 => return (b, None),
                v if slots[v as usize - 1].off == off => return (b, Some(v as usize - 1)),
                _ => b = (b + 1) & mask,
            }
        }
    }

    fn get(&self, off: HostOffset, slots: &[Slot]) -> Option<usize> {
        self.find(off, slots).1
    }

    /// Empties bucket `b`, moving later entries of the probe run back so
    /// that every entry stays reachable from its home bucket.
    fn clear(&mut self, mut b: usize, slots: &[Slot]) {
        let mask = self.buckets.len() - 1;
        let mut next = (b + 1) & mask;
        loop {
            let v = self.buckets[next];
            if v == 0 {
                break;
            }
            let home = self.home(slots[v as usize - 1].off);
            // Moves back only if its home is not in (b, next].
            if (next.wrapping_sub(home) & mask) >= (next.wrapping_sub(b) & mask) {
                self.buckets[b] = v;
                b = next;
            }
            next = (next + 1) & mask;
        }
        self.buckets[b] = 0;
    }
}

/// Tables cached by host offset.
pub(crate) struct TableCache {
    slots: Vec<Slot>,
    index: Index,
    capacity: usize,
    /// Next slot the eviction sweep looks at.
    hand: usize,
}

impl TableCache {
    /// A cache holding at most `capacity` tables (at least 4).
    pub fn new(capacity: usize) -> Self {
        let capacity = capacity.max(4);
        // Reserved, not touched: the pages become resident as slots fill.
        // A huge cache (the options allow 2^31 slices) grows past this by
        // doubling instead of reserving gigabytes it may never use.
        let reserve = capacity.min(RESERVE_MAX);
        TableCache { slots: Vec::with_capacity(reserve), index: Index::new(reserve), capacity, hand: 0 }
    }

    fn slot(&self, off: HostOffset) -> Option<&Slot> {
        self.index.get(off, &self.slots).map(|i| &self.slots[i])
    }

    fn slot_mut(&mut self, off: HostOffset) -> Option<&mut Slot> {
        self.index.get(off, &self.slots).map(|i| &mut self.slots[i])
    }

    /// The cached table at `off`, if present.
    pub fn get(&self, off: HostOffset) -> Option<&[u8]> {
        self.slot(off).map(|s| {
            s.touch();
            &s.data[..]
        })
    }

    /// The cached table at `off` for a change of bytes `[from, to)` only;
    /// marks just that range dirty.
    pub fn get_mut_range(&mut self, off: HostOffset, from: usize, to: usize) -> Option<&mut Vec<u8>> {
        self.slot_mut(off).map(|s| {
            *s.referenced.get_mut() = true;
            *s.idle.get_mut() = false;
            let to = to.min(s.data.len()) as u32;
            let from = from as u32;
            s.dirty = Some(match s.dirty {
                Some((a, b)) => (a.min(from), b.max(to)),
                None => (from, to),
            });
            &mut s.data
        })
    }

    /// Whether `off` is cached.
    pub fn contains(&self, off: HostOffset) -> bool {
        self.index.get(off, &self.slots).is_some()
    }

    /// Inserts a table (replacing any cached one at `off`). Past the
    /// capacity (callers evict first) the cache still takes it.
    pub fn insert(&mut self, off: HostOffset, data: Vec<u8>, dirty: bool) {
        let dirty = dirty.then_some((0, data.len() as u32));
        let slot = Slot { off, data, dirty, referenced: AtomicBool::new(true), idle: AtomicBool::new(false) };
        match self.index.find(off, &self.slots) {
            (_, Some(i)) => self.slots[i] = slot,
            (b, None) => {
                if self.slots.len() >= self.index.buckets.len() / 2 {
                    // Keep the table at most half full.
                    self.rebuild_index((self.slots.len() + 1) * 2);
                    return self.insert(off, slot.data, slot.dirty.is_some());
                }
                self.index.buckets[b] = self.slots.len() as u32 + 1;
                self.slots.push(slot);
            }
        }
    }

    fn rebuild_index(&mut self, entries: usize) {
        self.index = Index::new(entries);
        for (i, s) in self.slots.iter().enumerate() {
            let (b, _) = self.index.find(s.off, &self.slots[..i]);
            self.index.buckets[b] = i as u32 + 1;
        }
    }

    /// Whether inserting one more table needs an eviction first.
    pub fn is_full(&self) -> bool {
        self.slots.len() >= self.capacity
    }

    /// The table to evict: (offset, dirty). Moves the clock hand, giving
    /// every table used since the last sweep a second chance.
    pub fn victim(&mut self) -> Option<(HostOffset, bool)> {
        let n = self.slots.len();
        if n == 0 {
            return None;
        }
        // Two turns at most: the first clears every bit it passes.
        for _ in 0..2 * n {
            let i = self.hand % n;
            let s = &mut self.slots[i];
            if std::mem::take(s.referenced.get_mut()) {
                self.hand = i + 1;
                continue;
            }
            self.hand = i;
            return Some((s.off, s.dirty.is_some()));
        }
        None
    }

    /// Drops a table from the cache.
    pub fn remove(&mut self, off: HostOffset) -> Option<Vec<u8>> {
        let (b, i) = self.index.find(off, &self.slots);
        let i = i?;
        self.index.clear(b, &self.slots);
        let last = self.slots.len() - 1;
        if i != last {
            // The last slot moves into the hole: repoint its bucket.
            let (lb, _) = self.index.find(self.slots[last].off, &self.slots);
            self.index.buckets[lb] = i as u32 + 1;
        }
        Some(self.slots.swap_remove(i).data)
    }

    /// Offsets of every cached table.
    pub fn offsets(&self) -> Vec<HostOffset> {
        self.slots.iter().map(|s| s.off).collect()
    }

    /// Offsets of dirty tables, ascending (so writes go out in file order).
    pub fn dirty(&self) -> Vec<HostOffset> {
        let mut v: Vec<HostOffset> = self.slots.iter().filter(|s| s.dirty.is_some()).map(|s| s.off).collect();
        v.sort_unstable();
        v
    }

    /// Dirty tables with the byte range to write, widened to whole pages:
    /// (offset, start within the table, end), ascending by offset.
    pub fn dirty_ranges(&self) -> Vec<(HostOffset, usize, usize)> {
        let mut v: Vec<(HostOffset, usize, usize)> = self
            .slots
            .iter()
            .filter_map(|s| {
                s.dirty.map(|(a, b)| {
                    let a = a as usize / WRITE_GRAIN * WRITE_GRAIN;
                    let b = (b as usize).div_ceil(WRITE_GRAIN) * WRITE_GRAIN;
                    (s.off, a.min(s.data.len()), b.min(s.data.len()))
                })
            })
            .collect();
        v.sort_unstable();
        v
    }

    /// Whether any table is dirty.
    pub fn any_dirty(&self) -> bool {
        self.slots.iter().any(|s| s.dirty.is_some())
    }

    /// The table's bytes without touching its reference bit or dirtiness.
    pub fn peek(&self, off: HostOffset) -> Option<&[u8]> {
        self.slot(off).map(|s| &s.data[..])
    }

    /// Drops the clean tables not used since the last call, and starts a
    /// new period for the rest; returns how many went. Dirty ones stay:
    /// they leave through the write-back, not here.
    pub fn drop_idle(&mut self) -> usize {
        let before = self.slots.len();
        let mut i = 0;
        while i < self.slots.len() {
            let s = &mut self.slots[i];
            if *s.idle.get_mut() && s.dirty.is_none() {
                let off = s.off;
                self.remove(off);
                continue;
            }
            *s.idle.get_mut() = true;
            i += 1;
        }
        // The memory goes back too, not just the slots (the tables' own
        // buffers went with them; the index is fixed and small).
        if self.slots.len() < self.slots.capacity() / 2 {
            self.slots.shrink_to_fit();
        }
        self.hand = 0;
        before - self.slots.len()
    }

    /// Marks a table clean after it was written.
    pub fn mark_clean(&mut self, off: HostOffset) {
        if let Some(s) = self.slot_mut(off) {
            s.dirty = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(off: u64) -> HostOffset {
        HostOffset(off)
    }

    #[test]
    fn eviction_spares_tables_used_since_the_last_sweep() {
        let mut c = TableCache::new(4);
        for off in 0..4u64 {
            c.insert(h(off), vec![off as u8], false);
        }
        // All fresh: the sweep clears every bit, then takes the first.
        assert_eq!(c.victim(), Some((h(0), false)));
        c.remove(h(0));
        c.insert(h(4), vec![4], true);
        c.get(h(1));
        c.get(h(3));
        // 3 and 1 were used since the sweep, 2 was not.
        assert_eq!(c.victim(), Some((h(2), false)));
        c.remove(h(2));
        assert_eq!(c.peek(h(1)), Some(&[1u8][..]));
        assert_eq!(c.peek(h(4)), Some(&[4u8][..]));
        assert_eq!(c.peek(h(3)), Some(&[3u8][..]));
        assert!(!c.contains(h(2)));
        assert_eq!(c.dirty(), vec![h(4)]);
    }

    #[test]
    fn remove_keeps_the_index_right() {
        let mut c = TableCache::new(8);
        for off in [10u64, 20, 30, 40] {
            c.insert(h(off), vec![off as u8; 2], false);
        }
        c.remove(h(20));
        c.get_mut_range(h(40), 1, 2).expect("cached")[1] = 7;
        assert_eq!(c.peek(h(40)), Some(&[40u8, 7][..]));
        assert_eq!(c.peek(h(30)), Some(&[30u8, 30][..]));
        assert_eq!(c.dirty_ranges(), vec![(h(40), 0, 2)]);
        let mut offs = c.offsets();
        offs.sort_unstable();
        assert_eq!(offs, vec![h(10), h(30), h(40)]);
    }

    #[test]
    fn index_agrees_with_a_map_through_inserts_removals_and_growth() {
        // Offsets that collide in the index (multiples of a large power of
        // two), removals from the middle of probe runs, and a cache past
        // its reservation, checked against a plain map after every step.
        let mut c = TableCache::new(4);
        let mut model = std::collections::HashMap::new();
        let mut x = 0x2545_f491_4f6c_dd1du64;
        for step in 0..20_000u64 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let off = h((x % 97) << if x & 1 == 0 { 12 } else { 30 });
            if x.is_multiple_of(3) {
                assert_eq!(c.remove(off).map(|d| d[0]), model.remove(&off), "step {step}");
            } else {
                c.insert(off, vec![step as u8], false);
                model.insert(off, step as u8);
            }
            if step.is_multiple_of(64) {
                for (&o, &v) in &model {
                    assert_eq!(c.peek(o), Some(&[v][..]), "step {step}");
                }
                assert_eq!(c.offsets().len(), model.len());
            }
        }
        for (&o, &v) in &model {
            assert_eq!(c.peek(o), Some(&[v][..]));
        }
    }

    #[test]
    fn cleaning_drops_only_clean_tables_unused_for_a_whole_period() {
        let mut c = TableCache::new(8);
        for off in [1u64, 2, 3] {
            c.insert(h(off), vec![0; 4], false);
        }
        // Everything was used in the first period.
        assert_eq!(c.drop_idle(), 0);
        c.get(h(1));
        c.get_mut_range(h(2), 0, 1);
        assert_eq!(c.drop_idle(), 1);
        assert!(!c.contains(h(3)));
        // 2 is dirty: unused, yet kept until written.
        assert_eq!(c.drop_idle(), 1);
        assert!(c.contains(h(2)) && !c.contains(h(1)));
        c.mark_clean(h(2));
        assert_eq!(c.drop_idle(), 1);
        assert!(c.offsets().is_empty());
    }
}
