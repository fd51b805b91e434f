//! The model behind `concurrency_torture.rs`: given the log of operations
//! that ran concurrently on a disk, which values each byte may hold at the
//! end, and which values a read issued during the run may have returned.
//!
//! Time. Every operation takes a tick from one shared counter ([`Clock`])
//! just before it is issued and another just after it returns. Mutation A
//! *precedes* B when `A.end < B.start`: A had returned before B was issued,
//! so wherever both touch a byte, B's value is the one left. Mutations that
//! do not precede one another overlapped in time and may land in either
//! order, byte by byte: neither QEMU nor oxcow promises anything about the
//! interleaving of overlapping requests in flight together, but each byte
//! must end up holding one of their values, never an older one and never a
//! value nobody wrote there.
//!
//! Values. A write fills byte x with [`pattern_byte`]`(id, x)`, a hash of the
//! request's id and of the absolute offset, so a byte left by a lost, stale,
//! misplaced or shifted request is caught (a wrong byte passes with odds of
//! 1 in 256 per allowed value, and a lost request spans many bytes or many
//! requests). Write-zeroes and discards leave zeros over their *effective*
//! range, which the caller derives from what the device promises (see the
//! test); a fill (QEMU's `qemu-img bench --pattern`) leaves one byte value.
//!
//! Final content. Byte x holds the value of one of the mutations covering x
//! that no other mutation covering x follows. With S the latest start among
//! the mutations covering x, those are exactly the ones that end after S. A
//! byte no mutation covers keeps its initial value.
//!
//! Reads. A read issued at tick rs that returned at re saw, at each byte x,
//! the value left there at some instant in between: that of a mutation
//! covering x that started before re and is not followed by another one
//! covering x that had returned by rs; or the initial value when no
//! mutation covering x had returned by rs.
//!
//! The check sweeps the disk once from left to right, keeping the set of
//! mutations covering the current position ordered by start and by end, so
//! its cost is O(n log n) in the number of operations plus one pass over
//! the bytes.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};

/// The one logical clock of a run.
pub struct Clock(AtomicU64);

impl Clock {
    pub fn new() -> Clock {
        Clock(AtomicU64::new(1))
    }
    /// A tick later than every tick taken before this call began (ticks are
    /// unique, so start and end ticks never tie).
    pub fn tick(&self) -> u64 {
        self.0.fetch_add(1, Ordering::SeqCst)
    }
}

fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

fn pattern_word(id: u32, word: u64) -> u64 {
    mix((u64::from(id) << 40) ^ word)
}

/// The byte request `id` writes at absolute offset `x`.
pub fn pattern_byte(id: u32, x: u64) -> u8 {
    pattern_word(id, x >> 3).to_le_bytes()[(x & 7) as usize]
}

/// Fills `buf` with what request `id` writes at absolute offset `off`.
pub fn fill_pattern(id: u32, off: u64, buf: &mut [u8]) {
    let mut i = 0usize;
    while i < buf.len() {
        let x = off + i as u64;
        let w = pattern_word(id, x >> 3).to_le_bytes();
        let from = (x & 7) as usize;
        let n = (8 - from).min(buf.len() - i);
        buf[i..i + n].copy_from_slice(&w[from..from + n]);
        i += n;
    }
}

/// What a mutation leaves in the bytes of its effective range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Effect {
    /// [`pattern_byte`] of the mutation's id.
    Pattern,
    /// Zeros.
    Zero,
    /// One byte value everywhere.
    Fill(u8),
}

/// One request that changed (or may have changed) the disk.
#[derive(Debug, Clone)]
pub struct Mutation {
    pub id: u32,
    /// What it was, for messages ("write", "zero+unmap", ...).
    pub kind: &'static str,
    pub effect: Effect,
    /// Effective range: where the device promises the effect.
    pub off: u64,
    pub len: u64,
    /// The request as issued, for messages (may differ from the effective
    /// range, e.g. a discard of partial clusters).
    pub asked: (u64, u64),
    pub start: u64,
    pub end: u64,
}

impl Mutation {
    pub fn value(&self, x: u64) -> u8 {
        match self.effect {
            Effect::Pattern => pattern_byte(self.id, x),
            Effect::Zero => 0,
            Effect::Fill(b) => b,
        }
    }
    fn describe(&self) -> String {
        let mut s = format!("{} #{:x} [{}, +{})", self.kind, self.id, self.off, self.len);
        if self.asked != (self.off, self.len) {
            let _ = write!(s, " (asked [{}, +{}))", self.asked.0, self.asked.1);
        }
        let _ = write!(s, " ticks {}..{}", self.start, self.end);
        s
    }
}

/// A read issued during the run, with the bytes kept for checking.
#[derive(Debug, Clone)]
pub struct Observation {
    pub id: u32,
    pub off: u64,
    pub len: u64,
    pub start: u64,
    pub end: u64,
    /// (offset relative to `off`, byte read).
    pub samples: Vec<(u32, u8)>,
}

/// Picks the bytes of a read worth keeping: all of a short read; otherwise
/// its first and last bytes, both sides of 512-byte boundaries inside it
/// (where neighbouring requests meet, and where a read-modify-write of a
/// neighbour shows), and bytes at random.
pub fn sample(buf: &[u8], off: u64, budget: usize, salt: u64) -> Vec<(u32, u8)> {
    let len = buf.len();
    if len <= budget {
        return buf.iter().enumerate().map(|(i, &b)| (i as u32, b)).collect();
    }
    let mut pos = vec![0, len - 1];
    let first = (off.div_ceil(512) * 512 - off) as usize;
    let bounds = if first < len { (len - first).div_ceil(512) } else { 0 };
    if bounds > 0 {
        let want = (budget / 4).max(1);
        let stride = bounds.div_ceil(want);
        let phase = (mix(salt) % stride as u64) as usize;
        let mut k = phase;
        while k < bounds {
            let b = first + k * 512;
            if b > 0 {
                pos.push(b - 1);
            }
            pos.push(b);
            k += stride;
        }
    }
    let mut i = 0u64;
    while pos.len() < budget {
        pos.push((mix(salt ^ (i << 32) ^ 0x5a5a) % len as u64) as usize);
        i += 1;
    }
    pos.sort_unstable();
    pos.dedup();
    pos.into_iter().map(|p| (p as u32, buf[p])).collect()
}

/// Bytes that broke the model.
#[derive(Debug, Default)]
pub struct Verdict {
    /// Bytes checked.
    pub checked: u64,
    /// Bytes that hold a value not allowed.
    pub bad: u64,
    /// Descriptions of the first bad runs.
    pub reports: Vec<String>,
}

impl Verdict {
    const MAX_REPORTS: usize = 12;
    fn note(&mut self, msg: impl FnOnce() -> String) {
        if self.reports.len() < Self::MAX_REPORTS {
            self.reports.push(msg());
        }
    }
    pub fn is_clean(&self) -> bool {
        self.bad == 0
    }
}

/// The mutations covering the current position of the sweep.
#[derive(Default)]
struct Active {
    by_start: BTreeMap<u64, usize>,
    by_end: BTreeMap<u64, usize>,
}

/// A complete run: the disk's initial content and every mutation.
pub struct History {
    initial: Vec<u8>,
    muts: Vec<Mutation>,
    /// The longest any mutation took, in ticks (bounds the searches).
    max_ticks: u64,
}

impl History {
    pub fn new(initial: Vec<u8>, muts: Vec<Mutation>) -> History {
        let size = initial.len() as u64;
        for m in &muts {
            assert!(m.len > 0 && m.off + m.len <= size && m.start < m.end, "bad mutation record {m:?}");
        }
        let max_ticks = muts.iter().map(|m| m.end - m.start).max().unwrap_or(0);
        History { initial, muts, max_ticks }
    }

    pub fn size(&self) -> u64 {
        self.initial.len() as u64
    }

    /// Calls `visit(from, to, active)` for each maximal run of positions
    /// covered by the same mutations, left to right over the whole disk.
    fn sweep(&self, mut visit: impl FnMut(u64, u64, &Active)) {
        let mut events: Vec<(u64, bool, usize)> = Vec::with_capacity(self.muts.len() * 2);
        for (i, m) in self.muts.iter().enumerate() {
            events.push((m.off, true, i));
            events.push((m.off + m.len, false, i));
        }
        // Removals before additions at the same position.
        events.sort_unstable_by_key(|&(p, add, _)| (p, add));
        let mut act = Active::default();
        let mut pos = 0u64;
        let mut e = 0usize;
        let size = self.size();
        while pos < size {
            while e < events.len() && events[e].0 <= pos {
                let (_, add, i) = events[e];
                let m = &self.muts[i];
                if add {
                    act.by_start.insert(m.start, i);
                    act.by_end.insert(m.end, i);
                } else {
                    act.by_start.remove(&m.start);
                    act.by_end.remove(&m.end);
                }
                e += 1;
            }
            let next = events.get(e).map_or(size, |ev| ev.0.min(size));
            visit(pos, next, &act);
            pos = next;
        }
    }

    /// Which of the mutations covering `x` (and the initial content)
    /// wrote `got` there, for messages.
    fn origin(&self, act: &Active, x: u64, got: u8) -> String {
        let mut who: Vec<String> = act
            .by_start
            .values()
            .filter(|&&i| self.muts[i].value(x) == got)
            .take(3)
            .map(|&i| self.muts[i].describe())
            .collect();
        if self.initial[x as usize] == got {
            who.push("the initial content".into());
        }
        if who.is_empty() {
            "nobody wrote that value there".into()
        } else {
            format!("that value is from {}", who.join("; "))
        }
    }

    fn allowed_text(&self, allowed: &[usize], initial: bool, x: u64) -> String {
        let mut v: Vec<String> = allowed
            .iter()
            .map(|&i| format!("0x{:02x} from {}", self.muts[i].value(x), self.muts[i].describe()))
            .collect();
        if initial {
            v.push(format!("0x{:02x} initial", self.initial[x as usize]));
        }
        v.join(", ")
    }

    /// Checks the disk's content at the end of the run.
    pub fn check_final(&self, got: &[u8]) -> Verdict {
        let mut v = Verdict::default();
        if got.len() as u64 != self.size() {
            v.bad += 1;
            v.note(|| format!("the disk is {} bytes long instead of {}", got.len(), self.size()));
            if (got.len() as u64) < self.size() {
                return v;
            }
        }
        let got = &got[..self.size() as usize];
        let mut expect = Vec::new();
        self.sweep(|from, to, act| {
            let (a, b) = (from as usize, to as usize);
            v.checked += to - from;
            // The mutations not followed by another one covering this run.
            let allowed: Vec<usize> = match act.by_start.last_key_value() {
                None => Vec::new(),
                Some((&latest, _)) => act.by_end.range(latest + 1..).map(|(_, &i)| i).collect(),
            };
            let seg = &got[a..b];
            let ok_bulk = match allowed.as_slice() {
                [] => seg == &self.initial[a..b],
                [one] => {
                    let m = &self.muts[*one];
                    match m.effect {
                        Effect::Zero => seg.iter().all(|&c| c == 0),
                        Effect::Fill(f) => seg.iter().all(|&c| c == f),
                        Effect::Pattern => {
                            expect.resize(b - a, 0);
                            fill_pattern(m.id, from, &mut expect);
                            seg == &expect[..]
                        }
                    }
                }
                _ => false,
            };
            if ok_bulk {
                return;
            }
            let mut run_start: Option<u64> = None;
            let flush_run = |v: &mut Verdict, start: u64, end: u64| {
                let x = start;
                let g = got[x as usize];
                v.note(|| {
                    format!(
                        "bytes [{start}, {end}) ({} bytes): byte {x} is 0x{g:02x}; allowed: {}; {}",
                        end - start,
                        self.allowed_text(&allowed, allowed.is_empty(), x),
                        self.origin(act, x, g)
                    )
                });
            };
            for x in from..to {
                let g = got[x as usize];
                let ok = if allowed.is_empty() {
                    g == self.initial[x as usize]
                } else {
                    allowed.iter().any(|&i| self.muts[i].value(x) == g)
                };
                if !ok {
                    v.bad += 1;
                    run_start.get_or_insert(x);
                } else if let Some(s) = run_start.take() {
                    flush_run(&mut v, s, x);
                }
            }
            if let Some(s) = run_start.take() {
                flush_run(&mut v, s, to);
            }
        });
        v
    }

    /// Checks the bytes kept from reads issued during the run.
    pub fn check_reads(&self, reads: &[Observation]) -> Verdict {
        let mut samples: Vec<(u64, u32, u8)> = Vec::new();
        for (r, o) in reads.iter().enumerate() {
            samples.extend(o.samples.iter().map(|&(rel, b)| (o.off + u64::from(rel), r as u32, b)));
        }
        samples.sort_unstable_by_key(|s| s.0);
        let mut v = Verdict::default();
        let mut k = 0usize;
        self.sweep(|_from, to, act| {
            while k < samples.len() && samples[k].0 < to {
                let (x, r, got) = samples[k];
                k += 1;
                v.checked += 1;
                let o = &reads[r as usize];
                // The latest start among mutations here that had returned
                // before the read was issued: older ones were overwritten.
                let settled =
                    act.by_start.range(..o.start).rev().find(|(_, &i)| self.muts[i].end < o.start).map(|(&s, _)| s);
                let lo = settled.map_or(0, |s| s.saturating_sub(self.max_ticks));
                let allowed: Vec<usize> = act
                    .by_start
                    .range(lo..o.end)
                    .map(|(_, &i)| i)
                    .filter(|&i| settled.is_none_or(|s| self.muts[i].end > s))
                    .collect();
                let initial_ok = settled.is_none();
                let ok = (initial_ok && self.initial[x as usize] == got)
                    || allowed.iter().any(|&i| self.muts[i].value(x) == got);
                if !ok {
                    v.bad += 1;
                    v.note(|| {
                        format!(
                            "read #{:x} [{}, +{}) ticks {}..{}: byte {x} is 0x{got:02x}; allowed: {}; {}",
                            o.id,
                            o.off,
                            o.len,
                            o.start,
                            o.end,
                            self.allowed_text(&allowed, initial_ok, x),
                            self.origin(act, x, got)
                        )
                    });
                }
            }
        });
        v
    }
}

/// The model must reject what the torture test exists to catch, and
/// accept what concurrent requests may legitimately leave.
#[cfg(test)]
mod model_tests {
    use super::*;

    fn m(id: u32, effect: Effect, off: u64, len: u64, start: u64, end: u64) -> Mutation {
        Mutation { id, kind: "test", effect, off, len, asked: (off, len), start, end }
    }

    fn apply(disk: &mut [u8], m: &Mutation) {
        for x in m.off..m.off + m.len {
            disk[x as usize] = m.value(x);
        }
    }

    #[test]
    fn model_wants_the_later_of_two_sequential_writes() {
        let (a, b) = (m(1, Effect::Pattern, 0, 1000, 1, 2), m(2, Effect::Pattern, 500, 1000, 3, 4));
        let h = History::new(vec![7; 2048], vec![a.clone(), b.clone()]);
        let mut disk = vec![7; 2048];
        apply(&mut disk, &a);
        apply(&mut disk, &b);
        assert!(h.check_final(&disk).is_clean());
        // The earlier write landing last over the overlap is a lost write.
        let mut stale = vec![7; 2048];
        apply(&mut stale, &b);
        apply(&mut stale, &a);
        let v = h.check_final(&stale);
        assert_eq!(v.bad, 500 - (500..1000).filter(|&x| a.value(x) == b.value(x)).count() as u64);
    }

    #[test]
    fn model_allows_any_interleaving_of_overlapping_requests() {
        let (a, b) = (m(1, Effect::Pattern, 0, 1000, 1, 4), m(2, Effect::Zero, 500, 1000, 2, 3));
        let h = History::new(vec![7; 2048], vec![a.clone(), b.clone()]);
        let mut disk = vec![7; 2048];
        apply(&mut disk, &b);
        apply(&mut disk, &a);
        // Torn: the zeros win on every other byte of the overlap.
        for x in (500..1000).step_by(2) {
            disk[x] = 0;
        }
        assert!(h.check_final(&disk).is_clean());
    }

    #[test]
    fn model_catches_a_neighbour_lost_to_a_read_modify_write() {
        // Two concurrent writes that do not overlap: each must survive whole,
        // even though they share a 4 KiB block.
        let (a, b) = (m(1, Effect::Pattern, 0, 512, 1, 4), m(2, Effect::Fill(0xab), 512, 512, 2, 3));
        let h = History::new(vec![0; 4096], vec![a.clone(), b.clone()]);
        let mut disk = vec![0; 4096];
        apply(&mut disk, &b);
        assert_eq!(h.check_final(&disk).bad, (0..512).filter(|&x| a.value(x) != 0).count() as u64);
        apply(&mut disk, &a);
        assert!(h.check_final(&disk).is_clean());
        // And a disk that changed size is reported.
        assert!(!h.check_final(&[disk.clone(), vec![0; 4096]].concat()).is_clean());
    }

    #[test]
    fn model_checks_what_reads_saw() {
        let a = m(1, Effect::Fill(5), 0, 100, 10, 20);
        let h = History::new(vec![9; 100], vec![a]);
        let read = |start, end, byte| Observation { id: 0, off: 0, len: 1, start, end, samples: vec![(0, byte)] };
        // Before the write: only the initial value.
        assert!(h.check_reads(&[read(1, 2, 9)]).is_clean());
        assert!(!h.check_reads(&[read(1, 2, 5)]).is_clean());
        // During it: either.
        assert!(h.check_reads(&[read(15, 16, 9), read(5, 12, 5), read(15, 25, 5)]).is_clean());
        // After it: only the write's value.
        assert!(h.check_reads(&[read(21, 22, 5)]).is_clean());
        assert_eq!(h.check_reads(&[read(21, 22, 9), read(30, 31, 0)]).bad, 2);
    }
}
