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
//! The tables' bytes live in a few large blocks allocated for the cache
//! (`Pages`), one page per table, not in an allocation each.
//!
//! The cache holds no policy about write ordering: callers decide when a
//! dirty table may reach disk (see `flush.rs`).

use super::units::HostOffset;
use std::sync::atomic::{AtomicBool, Ordering};

struct Slot {
    off: HostOffset,
    /// Where the table's bytes are, in `Pages`.
    page: u32,
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

/// The tables' bytes: every table of a cache has the same size (an L2
/// slice, or a refcount block), so they live in pages of a few large
/// blocks allocated for the cache, not one heap allocation each.
///
/// One allocation per table put every 4 KiB slice in the malloc arena of
/// whichever thread loaded it, interleaved with that thread's short-lived
/// request buffers, whose freed chunks then stayed resident between the
/// slices (about 70 KiB per arena, eight arenas for eight NBD workers),
/// plus a malloc header per slice. A block is zeroed memory from the
/// allocator (`calloc`, mapped on demand for large blocks): its pages
/// become resident only as tables are written into them, as QEMU's cache
/// is one block touched as it fills.
struct Pages {
    /// Bytes per table; fixed by the first table while the cache holds
    /// no block (callers use one size per cache).
    bytes: usize,
    /// Tables per block.
    per_block: usize,
    /// Most tables the cache holds (sizes the first block when small).
    capacity: usize,
    blocks: Vec<Box<[u8]>>,
    /// Pages given back, to be handed out again before new ones.
    free: Vec<u32>,
    /// Pages handed out so far from the blocks (the rest are untouched).
    used: u32,
}

/// Target size of one block of pages: big enough that the allocator maps
/// it on its own (pages resident only once touched, returned whole when
/// dropped), small enough that a cache far larger than what it holds does
/// not reserve its full size.
const BLOCK_BYTES: usize = 1 << 20;

impl Pages {
    fn new(capacity: usize) -> Self {
        Pages { bytes: 0, per_block: 1, capacity, blocks: Vec::new(), free: Vec::new(), used: 0 }
    }

    /// A page for a table of `bytes` bytes, its content unspecified.
    fn take(&mut self, bytes: usize) -> u32 {
        if self.blocks.is_empty() {
            self.bytes = bytes.max(1);
            self.per_block = (BLOCK_BYTES / self.bytes).clamp(1, self.capacity.max(1));
            self.free.clear();
            self.used = 0;
        }
        debug_assert_eq!(bytes, self.bytes, "one table size per cache");
        if let Some(p) = self.free.pop() {
            return p;
        }
        let p = self.used;
        if p as usize / self.per_block >= self.blocks.len() {
            self.blocks.push(vec![0u8; self.per_block * self.bytes].into_boxed_slice());
        }
        self.used += 1;
        p
    }

    fn give(&mut self, p: u32) {
        self.free.push(p);
    }

    fn get(&self, p: u32) -> &[u8] {
        let (b, i) = (p as usize / self.per_block, p as usize % self.per_block);
        &self.blocks[b][i * self.bytes..(i + 1) * self.bytes]
    }

    fn get_mut(&mut self, p: u32) -> &mut [u8] {
        let (b, i) = (p as usize / self.per_block, p as usize % self.per_block);
        &mut self.blocks[b][i * self.bytes..(i + 1) * self.bytes]
    }

    /// Pages handed out and not given back.
    fn live(&self) -> usize {
        self.used as usize - self.free.len()
    }
}

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
    pages: Pages,
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
        TableCache {
            slots: Vec::with_capacity(reserve),
            pages: Pages::new(capacity),
            index: Index::new(reserve),
            capacity,
            hand: 0,
        }
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
            self.pages.get(s.page)
        })
    }

    /// The cached table at `off` for a change of bytes `[from, to)` only;
    /// marks just that range dirty.
    pub fn get_mut_range(&mut self, off: HostOffset, from: usize, to: usize) -> Option<&mut [u8]> {
        let i = self.index.get(off, &self.slots)?;
        let s = &mut self.slots[i];
        *s.referenced.get_mut() = true;
        *s.idle.get_mut() = false;
        let to = to.min(self.pages.bytes) as u32;
        let from = from as u32;
        s.dirty = Some(match s.dirty {
            Some((a, b)) => (a.min(from), b.max(to)),
            None => (from, to),
        });
        Some(self.pages.get_mut(s.page))
    }

    /// Whether `off` is cached.
    pub fn contains(&self, off: HostOffset) -> bool {
        self.index.get(off, &self.slots).is_some()
    }

    /// Inserts a copy of a table (replacing any cached one at `off`).
    /// Past the capacity (callers evict first) the cache still takes it.
    pub fn insert(&mut self, off: HostOffset, data: &[u8], dirty: bool) {
        let page = match self.index.get(off, &self.slots) {
            Some(i) => self.slots[i].page,
            None => self.pages.take(data.len()),
        };
        let dst = self.pages.get_mut(page);
        // Callers keep one size per cache (`Pages::take` checks it).
        let n = dst.len().min(data.len());
        dst[..n].copy_from_slice(&data[..n]);
        dst[n..].fill(0);
        self.link(off, page, dirty);
    }

    /// Inserts a clean table of `bytes` bytes that `fill` writes in
    /// place (a read from disk); nothing is cached if `fill` fails.
    pub fn insert_with<E>(
        &mut self,
        off: HostOffset,
        bytes: usize,
        fill: impl FnOnce(&mut [u8]) -> Result<(), E>,
    ) -> Result<(), E> {
        let page = self.pages.take(bytes);
        if let Err(e) = fill(self.pages.get_mut(page)) {
            self.pages.give(page);
            return Err(e);
        }
        self.link(off, page, false);
        Ok(())
    }

    /// Inserts an all-zero table (a new one).
    pub fn insert_zeroed(&mut self, off: HostOffset, bytes: usize, dirty: bool) {
        let page = match self.index.get(off, &self.slots) {
            Some(i) => self.slots[i].page,
            None => self.pages.take(bytes),
        };
        self.pages.get_mut(page).fill(0);
        self.link(off, page, dirty);
    }

    /// Puts `page` in the cache as the table at `off`.
    fn link(&mut self, off: HostOffset, page: u32, dirty: bool) {
        let dirty = dirty.then_some((0, self.pages.bytes as u32));
        let slot = Slot { off, page, dirty, referenced: AtomicBool::new(true), idle: AtomicBool::new(false) };
        match self.index.find(off, &self.slots) {
            (_, Some(i)) => {
                let old = std::mem::replace(&mut self.slots[i], slot).page;
                if old != page {
                    self.pages.give(old);
                }
            }
            (b, None) => {
                if self.slots.len() >= self.index.buckets.len() / 2 {
                    // Keep the table at most half full.
                    self.rebuild_index((self.slots.len() + 1) * 2);
                    return self.link(off, page, dirty.is_some());
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

    /// Drops a table from the cache; whether it was there.
    pub fn remove(&mut self, off: HostOffset) -> bool {
        let (b, i) = self.index.find(off, &self.slots);
        let Some(i) = i else { return false };
        self.index.clear(b, &self.slots);
        let last = self.slots.len() - 1;
        if i != last {
            // The last slot moves into the hole: repoint its bucket.
            let (lb, _) = self.index.find(self.slots[last].off, &self.slots);
            self.index.buckets[lb] = i as u32 + 1;
        }
        let page = self.slots.swap_remove(i).page;
        self.pages.give(page);
        true
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
                    (s.off, a.min(self.pages.bytes), b.min(self.pages.bytes))
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
        self.slot(off).map(|s| self.pages.get(s.page))
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
        // The memory goes back too, not just the slots (the index is
        // fixed and small).
        if self.slots.len() < self.slots.capacity() / 2 {
            self.slots.shrink_to_fit();
        }
        // Repacked only when that frees a block and half the pages are
        // unused: a cache that shrank for good.
        let (live, blocks) = (self.pages.live(), self.pages.blocks.len());
        if live * 2 <= blocks * self.pages.per_block && live.div_ceil(self.pages.per_block) < blocks {
            self.repack();
        }
        self.hand = 0;
        before - self.slots.len()
    }

    /// Moves the tables into as few fresh blocks as they need and drops
    /// the old ones, returning their memory.
    fn repack(&mut self) {
        let mut fresh = Pages::new(self.capacity);
        for s in &mut self.slots {
            let p = fresh.take(self.pages.bytes);
            fresh.get_mut(p).copy_from_slice(self.pages.get(s.page));
            s.page = p;
        }
        self.pages = fresh;
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
            c.insert(h(off), &[off as u8], false);
        }
        // All fresh: the sweep clears every bit, then takes the first.
        assert_eq!(c.victim(), Some((h(0), false)));
        c.remove(h(0));
        c.insert(h(4), &[4], true);
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
            c.insert(h(off), &[off as u8; 2], false);
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
                let had = c.peek(off).map(|d| d[0]);
                assert_eq!(c.remove(off), had.is_some(), "step {step}");
                assert_eq!(had, model.remove(&off), "step {step}");
            } else {
                c.insert(off, &[step as u8], false);
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
            c.insert(h(off), &[0; 4], false);
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

    #[test]
    fn tables_live_in_blocks_sized_for_the_cache_and_pages_are_reused() {
        // 4 KiB slices: 256 to a 1 MiB block; a 600-slice cache fills
        // three blocks and no more, however many slices pass through.
        let mut c = TableCache::new(600);
        for k in 0..600u64 {
            c.insert(h(k << 12), &[k as u8; 4096], false);
        }
        assert_eq!(c.pages.blocks.len(), 3);
        assert_eq!(c.pages.blocks[0].len(), 1 << 20);
        for k in 600..5000u64 {
            let (victim, _) = c.victim().expect("full cache has a victim");
            assert!(c.remove(victim));
            c.insert(h(k << 12), &[k as u8; 4096], false);
        }
        assert_eq!(c.pages.blocks.len(), 3);
        assert_eq!(c.pages.live(), 600);
        for k in 0..5000u64 {
            if let Some(t) = c.peek(h(k << 12)) {
                assert!(t.iter().all(|&b| b == k as u8), "slice {k}");
            }
        }
        // A small cache is one block of exactly its size.
        let mut small = TableCache::new(16);
        small.insert(h(0), &[1; 4096], false);
        assert_eq!(small.pages.blocks[0].len(), 16 * 4096);
    }

    #[test]
    fn a_failed_fill_caches_nothing_and_keeps_its_page() {
        let mut c = TableCache::new(4);
        c.insert_with(h(0), 8, |b| {
            b.copy_from_slice(&[7; 8]);
            Ok::<(), ()>(())
        })
        .expect("filled");
        assert_eq!(
            c.insert_with(h(8), 8, |b| {
                b[0] = 9;
                Err(())
            }),
            Err(())
        );
        assert!(!c.contains(h(8)));
        assert_eq!(c.pages.live(), 1);
        c.insert_zeroed(h(16), 8, true);
        assert_eq!(c.peek(h(16)), Some(&[0u8; 8][..]));
        assert_eq!(c.peek(h(0)), Some(&[7u8; 8][..]));
        assert_eq!(c.dirty_ranges(), vec![(h(16), 0, 8)]);
    }

    #[test]
    fn cleaning_a_shrunk_cache_gives_its_blocks_back() {
        let mut c = TableCache::new(1024);
        for k in 0..1024u64 {
            c.insert(h(k << 12), &[k as u8; 4096], false);
        }
        assert_eq!(c.pages.blocks.len(), 4);
        assert_eq!(c.drop_idle(), 0);
        // Ten stay in use; the rest idle through a whole period.
        for k in (0..1000u64).step_by(100) {
            c.get(h(k << 12));
        }
        assert_eq!(c.drop_idle(), 1014);
        assert_eq!(c.pages.blocks.len(), 1);
        for k in (0..1000u64).step_by(100) {
            assert_eq!(c.peek(h(k << 12)), Some(&[k as u8; 4096][..]), "slice {k}");
        }
        // Emptied: nothing kept.
        assert_eq!(c.drop_idle(), 10);
        assert!(c.pages.blocks.is_empty());
    }
}
