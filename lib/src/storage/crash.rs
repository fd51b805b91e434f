//! A storage that records every write and flush, for crash tests.
//!
//! It behaves like [`MemoryStorage`](super::MemoryStorage) for the engine
//! on top, and keeps a log from which [`CrashLog::state`] rebuilds what a
//! disk could hold after a power cut at any point: everything before the
//! last completed flush, plus any subset (in any order) of the writes
//! since, possibly with the last write torn at a 512-byte boundary.

use super::{MemoryStorage, Storage};
use std::io;
use std::sync::Mutex;

/// One recorded operation.
#[derive(Debug, Clone)]
pub enum Event {
    /// Bytes written at an offset.
    Write(u64, Vec<u8>),
    /// Length changed.
    SetLen(u64),
    /// Hole punched (reads as zeros).
    Punch(u64, u64),
    /// Everything before is durable.
    Flush,
}

/// A recording storage.
#[derive(Debug)]
pub struct CrashStorage {
    live: MemoryStorage,
    log: Mutex<Vec<Event>>,
    base: Vec<u8>,
}

impl CrashStorage {
    /// Starts from `base` (already durable).
    pub fn new(base: Vec<u8>) -> Self {
        CrashStorage { live: MemoryStorage::from_bytes(base.clone()), log: Mutex::new(Vec::new()), base }
    }
    /// Number of events recorded so far (cheap, unlike [`Self::log`]).
    pub fn event_count(&self) -> usize {
        self.log.lock().unwrap_or_else(|e| e.into_inner()).len()
    }
    /// A copy of the log so far.
    pub fn log(&self) -> CrashLog {
        CrashLog { base: self.base.clone(), events: self.log.lock().unwrap_or_else(|e| e.into_inner()).clone() }
    }
    fn record(&self, e: Event) {
        self.log.lock().unwrap_or_else(|e| e.into_inner()).push(e);
    }
}

impl Storage for CrashStorage {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.live.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.live.write_at(buf, offset)?;
        self.record(Event::Write(offset, buf.to_vec()));
        Ok(())
    }
    fn flush(&self) -> io::Result<()> {
        self.record(Event::Flush);
        Ok(())
    }
    fn len(&self) -> io::Result<u64> {
        self.live.len()
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        self.live.set_len(len)?;
        self.record(Event::SetLen(len));
        Ok(())
    }
    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        self.live.punch_hole(offset, len)?;
        self.record(Event::Punch(offset, len));
        Ok(())
    }
}

/// Writes applied past the durable state, and an optional torn write
/// (event index, sectors that made it).
pub type CrashVariant = (Vec<usize>, Option<(usize, usize)>);

/// A recorded history, from which crash states are built.
#[derive(Debug, Clone)]
pub struct CrashLog {
    /// Durable bytes before the first event.
    pub base: Vec<u8>,
    /// Everything that happened after.
    pub events: Vec<Event>,
}

/// Applies one event to a disk image in memory.
pub fn apply_event(bytes: &mut Vec<u8>, e: &Event) {
    match e {
        Event::Write(off, data) => {
            let end = *off as usize + data.len();
            if bytes.len() < end {
                bytes.resize(end, 0);
            }
            bytes[*off as usize..end].copy_from_slice(data);
        }
        Event::SetLen(n) => bytes.resize(*n as usize, 0),
        Event::Punch(off, len) => {
            let size = bytes.len() as u64;
            let a = (*off).min(size) as usize;
            let b = off.saturating_add(*len).min(size) as usize;
            bytes[a..b].fill(0);
        }
        Event::Flush => {}
    }
}

impl CrashLog {
    /// Indices of the flush events.
    pub fn flushes(&self) -> Vec<usize> {
        self.events.iter().enumerate().filter(|(_, e)| matches!(e, Event::Flush)).map(|(i, _)| i).collect()
    }

    /// Ways a power cut between events `from` and `to` (exclusive, no
    /// flush in between) could leave the disk, on top of the durable state
    /// before `from`: nothing written, `subsets` random subsets of the
    /// writes in random order, and all but the last write with the last one
    /// torn after a random number of sectors. Each is (writes applied, torn
    /// write as (event, sectors)); `rand(n)` returns a number below `n`.
    pub fn crash_variants(
        &self,
        from: usize,
        to: usize,
        subsets: usize,
        rand: &mut dyn FnMut(u64) -> u64,
    ) -> Vec<CrashVariant> {
        let window: Vec<usize> =
            (from..to.min(self.events.len())).filter(|&i| matches!(self.events[i], Event::Write(..))).collect();
        let mut variants: Vec<CrashVariant> = vec![(vec![], None)];
        for _ in 0..subsets {
            let mut pick: Vec<usize> = window.iter().copied().filter(|_| rand(2) == 0).collect();
            // Later writes may land before earlier ones.
            for i in (1..pick.len()).rev() {
                pick.swap(i, rand(i as u64 + 1) as usize);
            }
            variants.push((pick, None));
        }
        if let Some(&last) = window.last() {
            if let Event::Write(_, data) = &self.events[last] {
                let sectors = data.len().div_ceil(512);
                if sectors > 1 {
                    let torn = 1 + rand(sectors as u64 - 1) as usize;
                    variants.push((window[..window.len() - 1].to_vec(), Some((last, torn))));
                }
            }
        }
        variants
    }

    /// Applies a [`CrashVariant`] to `bytes` (the durable state it is
    /// relative to).
    pub fn apply_variant(&self, bytes: &mut Vec<u8>, variant: &CrashVariant) {
        for &i in &variant.0 {
            if let Some(e) = self.events.get(i) {
                apply_event(bytes, e);
            }
        }
        if let Some((i, sectors)) = variant.1 {
            if let Some(Event::Write(off, data)) = self.events.get(i) {
                let n = (sectors * 512).min(data.len());
                apply_event(bytes, &Event::Write(*off, data[..n].to_vec()));
            }
        }
    }

    /// The disk after a crash: every event before `durable` applied in
    /// order, then the events at the indices `extra` (all after `durable`,
    /// applied in the order given), and finally, when `torn` is set, only
    /// the first `torn` 512-byte sectors of the write at that index.
    pub fn state(&self, durable: usize, extra: &[usize], torn: Option<(usize, usize)>) -> Vec<u8> {
        let mut bytes = self.base.clone();
        for e in &self.events[..durable.min(self.events.len())] {
            apply_event(&mut bytes, e);
        }
        self.apply_variant(&mut bytes, &(extra.to_vec(), torn));
        bytes
    }
}
