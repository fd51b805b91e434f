//! The VHDX metadata log (MS-VHDX 2.3): a circular region of 4 KiB
//! sectors holding entries, each a header, descriptors and data sectors.
//! A data descriptor carries one 4 KiB sector for `file_offset` (its first
//! 8 and last 4 bytes kept in the descriptor, the rest in a data sector
//! stamped with the sequence number); a zero descriptor a run of zeros.
//!
//! The active sequence is the run of valid entries with consecutive
//! sequence numbers that ends at the highest one; its last entry's `tail`
//! says where replay starts. Every entry is validated in full (CRC-32C,
//! GUID, sequence stamps, descriptor bounds) before any of it is used, and
//! lookups are linear in the log's size whatever the bytes say.

use super::{crc32c, Guid};
use crate::formats::{le32, le64};
use crate::storage::Storage;
use crate::{Error, Result};
use std::collections::HashMap;

pub(crate) const SECTOR: u64 = 4096;
const HEADER_LEN: usize = 64;
const DESC_LEN: usize = 32;

/// One change an entry makes to the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// A 4 KiB sector's new contents.
    Sector {
        /// Where it goes in the file.
        file_offset: u64,
        /// Its bytes.
        data: Box<[u8; SECTOR as usize]>,
    },
    /// A run of zeros.
    Zero {
        /// Where it starts in the file.
        file_offset: u64,
        /// Its length.
        len: u64,
    },
}

/// A validated log entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Sequence number.
    pub sequence: u64,
    /// Offset in the log of the oldest entry still to be applied.
    pub tail: u64,
    /// Length in bytes.
    pub len: u64,
    /// The file must be at least this long for the entry to be usable.
    pub flushed_file_offset: u64,
    /// The file's length once the entry is applied.
    pub last_file_offset: u64,
    /// What it changes, in order.
    pub changes: Vec<Change>,
}

/// The sectors of the log `log` from `pos` on, wrapping at its end.
fn wrapped(log: &[u8], pos: u64, len: u64) -> Option<Vec<u8>> {
    let total = log.len() as u64;
    if len > total || pos >= total {
        return None;
    }
    let mut v = Vec::with_capacity(len as usize);
    let first = (total - pos).min(len);
    v.extend_from_slice(&log[pos as usize..(pos + first) as usize]);
    v.extend_from_slice(&log[..(len - first) as usize]);
    Some(v)
}

/// The entry at `pos` of `log` for the log `guid`, when it is valid.
pub fn parse_entry(log: &[u8], pos: u64, guid: &Guid) -> Option<Entry> {
    let head = wrapped(log, pos, SECTOR)?;
    if &head[..4] != b"loge" || &head[32..48] != guid {
        return None;
    }
    let len = u64::from(le32(&head, 8));
    let count = le32(&head, 24) as usize;
    let desc_sectors = (HEADER_LEN as u64 + count as u64 * DESC_LEN as u64).div_ceil(SECTOR);
    if len < SECTOR || !len.is_multiple_of(SECTOR) || len > log.len() as u64 || desc_sectors * SECTOR > len {
        return None;
    }
    let e = wrapped(log, pos, len)?;
    let mut copy = e.clone();
    copy[4..8].fill(0);
    if crc32c(&copy) != le32(&e, 4) {
        return None;
    }
    let sequence = le64(&e, 16);
    let mut changes = Vec::new();
    let mut data_at = (desc_sectors * SECTOR) as usize;
    for i in 0..count {
        let d = &e[HEADER_LEN + i * DESC_LEN..HEADER_LEN + (i + 1) * DESC_LEN];
        if le64(d, 24) != sequence {
            return None;
        }
        let file_offset = le64(d, 16);
        if !file_offset.is_multiple_of(SECTOR) {
            return None;
        }
        match &d[..4] {
            b"desc" => {
                let s = e.get(data_at..data_at + SECTOR as usize)?;
                let stamp = (u64::from(le32(s, 4)) << 32) | u64::from(le32(s, 4092));
                if &s[..4] != b"data" || stamp != sequence {
                    return None;
                }
                let mut data = Box::new([0u8; SECTOR as usize]);
                data[..8].copy_from_slice(&d[8..16]);
                data[8..4092].copy_from_slice(&s[8..4092]);
                data[4092..].copy_from_slice(&d[4..8]);
                changes.push(Change::Sector { file_offset, data });
                data_at += SECTOR as usize;
            }
            b"zero" => {
                let len = le64(d, 8);
                if !len.is_multiple_of(SECTOR) {
                    return None;
                }
                changes.push(Change::Zero { file_offset, len });
            }
            _ => return None,
        }
    }
    if data_at as u64 != len {
        return None;
    }
    Some(Entry {
        sequence,
        tail: u64::from(le32(&e, 12)),
        len,
        flushed_file_offset: le64(&e, 48),
        last_file_offset: le64(&e, 56),
        changes,
    })
}

/// The entries to replay, oldest first: empty when the log holds no
/// valid entry of `guid`.
pub fn active_sequence(log: &[u8], guid: &Guid) -> Result<Vec<Entry>> {
    let total = log.len() as u64;
    let mut valid: HashMap<u64, Entry> = HashMap::new();
    for pos in (0..total / SECTOR).map(|i| i * SECTOR) {
        if let Some(e) = parse_entry(log, pos, guid) {
            valid.insert(pos, e);
        }
    }
    let next = |pos: u64, e: &Entry| (pos + e.len) % total;
    // A chain starts at an entry no valid entry leads to with the
    // sequence number just before its own.
    let mut continued = std::collections::HashSet::new();
    for (&pos, e) in &valid {
        let n = next(pos, e);
        if valid.get(&n).is_some_and(|x| Some(x.sequence) == e.sequence.checked_add(1)) {
            continued.insert(n);
        }
    }
    let mut best: Option<Vec<u64>> = None;
    for &start in valid.keys().filter(|p| !continued.contains(p)) {
        let mut chain = vec![start];
        let mut walked = 0u64;
        let mut pos = start;
        while let Some(e) = valid.get(&pos) {
            walked += e.len;
            let n = next(pos, e);
            match valid.get(&n) {
                Some(x) if Some(x.sequence) == e.sequence.checked_add(1) && walked + x.len <= total => {
                    chain.push(n);
                    pos = n;
                }
                _ => break,
            }
        }
        let last_seq = |c: &Vec<u64>| c.last().and_then(|p| valid.get(p)).map_or(0, |e| e.sequence);
        if best.as_ref().is_none_or(|b| last_seq(&chain) > last_seq(b)) {
            best = Some(chain);
        }
    }
    let Some(chain) = best else { return Ok(Vec::new()) };
    let head = chain.last().and_then(|p| valid.get(p)).ok_or_else(|| Error::invalid("VHDX log chain is empty"))?;
    let from = chain
        .iter()
        .position(|&p| p == head.tail)
        .ok_or_else(|| Error::invalid("VHDX log tail does not point into the active sequence"))?;
    Ok(chain[from..].iter().filter_map(|p| valid.remove(p)).collect())
}

/// Applies `entries` to `file` and flushes it.
pub fn replay(file: &dyn Storage, entries: &[Entry]) -> Result<()> {
    let io = |r: std::io::Result<()>| r.map_err(|e| Error::io("replaying VHDX log", e));
    let len = file.len().map_err(|e| Error::io("replaying VHDX log", e))?;
    for e in entries {
        if len < e.flushed_file_offset {
            return Err(Error::invalid("VHDX image file is shorter than its log says: truncated"));
        }
        // An entry writes inside the file it describes: no hostile offset
        // grows the file past what the entry says its length is.
        let limit = len.max(e.last_file_offset);
        for c in &e.changes {
            let (at, n) = match c {
                Change::Sector { file_offset, .. } => (*file_offset, SECTOR),
                Change::Zero { file_offset, len } => (*file_offset, *len),
            };
            if at.checked_add(n).is_none_or(|end| end > limit) {
                return Err(Error::invalid("VHDX log entry writes past the end of the file"));
            }
        }
        for c in &e.changes {
            match c {
                Change::Sector { file_offset, data } => io(file.write_at(&data[..], *file_offset))?,
                Change::Zero { file_offset, len } => {
                    let zeros = vec![0u8; 1 << 20];
                    let mut done = 0;
                    while done < *len {
                        let n = (len - done).min(zeros.len() as u64);
                        let at = file_offset
                            .checked_add(done)
                            .ok_or_else(|| Error::invalid("VHDX log zero run overflows"))?;
                        io(file.write_at(&zeros[..n as usize], at))?;
                        done += n;
                    }
                }
            }
        }
    }
    if let Some(last) = entries.last() {
        if file.len().map_err(|e| Error::io("replaying VHDX log", e))? < last.last_file_offset {
            io(file.set_len(last.last_file_offset))?;
        }
    }
    io(file.flush())
}

/// Builds the bytes of a log entry carrying whole sectors, as
/// [`parse_entry`] reads them back.
pub fn build_entry(guid: &Guid, sequence: u64, tail: u64, file_len: u64, sectors: &[(u64, &[u8])]) -> Result<Vec<u8>> {
    let desc_sectors = (HEADER_LEN as u64 + sectors.len() as u64 * DESC_LEN as u64).div_ceil(SECTOR);
    let len = (desc_sectors + sectors.len() as u64) * SECTOR;
    let len32 = u32::try_from(len).map_err(|_| Error::invalid("VHDX log entry too large"))?;
    let tail32 = u32::try_from(tail).map_err(|_| Error::invalid("VHDX log tail too large"))?;
    let mut e = vec![0u8; len as usize];
    e[..4].copy_from_slice(b"loge");
    e[8..12].copy_from_slice(&len32.to_le_bytes());
    e[12..16].copy_from_slice(&tail32.to_le_bytes());
    e[16..24].copy_from_slice(&sequence.to_le_bytes());
    e[24..28].copy_from_slice(&(sectors.len() as u32).to_le_bytes());
    e[32..48].copy_from_slice(guid);
    e[48..56].copy_from_slice(&file_len.to_le_bytes());
    e[56..64].copy_from_slice(&file_len.to_le_bytes());
    for (i, (file_offset, data)) in sectors.iter().enumerate() {
        if data.len() != SECTOR as usize || !file_offset.is_multiple_of(SECTOR) {
            return Err(Error::invalid("VHDX log sectors are whole and aligned"));
        }
        let d = HEADER_LEN + i * DESC_LEN;
        e[d..d + 4].copy_from_slice(b"desc");
        e[d + 4..d + 8].copy_from_slice(&data[4092..]);
        e[d + 8..d + 16].copy_from_slice(&data[..8]);
        e[d + 16..d + 24].copy_from_slice(&file_offset.to_le_bytes());
        e[d + 24..d + 32].copy_from_slice(&sequence.to_le_bytes());
        let s = ((desc_sectors + i as u64) * SECTOR) as usize;
        e[s..s + 4].copy_from_slice(b"data");
        e[s + 4..s + 8].copy_from_slice(&((sequence >> 32) as u32).to_le_bytes());
        e[s + 8..s + 4092].copy_from_slice(&data[8..4092]);
        e[s + 4092..s + 4096].copy_from_slice(&(sequence as u32).to_le_bytes());
    }
    let crc = crc32c(&e);
    e[4..8].copy_from_slice(&crc.to_le_bytes());
    Ok(e)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_entry_reads_back_as_built_even_across_the_end_of_the_log() {
        let guid = [7u8; 16];
        let mut sector = vec![0u8; 4096];
        for (i, b) in sector.iter_mut().enumerate() {
            *b = i as u8;
        }
        let e = build_entry(&guid, 5, 12288, 1 << 20, &[(8192, &sector)]).unwrap();
        let mut log = vec![0u8; 16384];
        // Starts in the last sector and wraps to the first.
        log[12288..].copy_from_slice(&e[..4096]);
        log[..4096].copy_from_slice(&e[4096..]);
        let seq = active_sequence(&log, &guid).unwrap();
        assert_eq!(seq.len(), 1);
        assert_eq!(seq[0].changes, vec![Change::Sector { file_offset: 8192, data: sector.try_into().unwrap() }]);
        assert!(active_sequence(&log, &[8u8; 16]).unwrap().is_empty());
        log[100] ^= 1;
        assert!(active_sequence(&log, &guid).unwrap().is_empty());
    }

    #[test]
    fn replay_starts_at_the_newest_entrys_tail_and_ignores_older_runs() {
        let guid = [3u8; 16];
        let sector = |b: u8| vec![b; 4096];
        let mut log = vec![0u8; 8 * 8192];
        let put = |log: &mut [u8], slot: usize, seq: u64, tail: u64, b: u8| {
            let e = build_entry(&guid, seq, tail, 1 << 20, &[(0, &sector(b))]).unwrap();
            log[slot * 8192..slot * 8192 + 8192].copy_from_slice(&e);
        };
        // An old run (1, 2) and the active one (7, 8, 9) whose head says
        // replay starts at 8.
        put(&mut log, 0, 1, 0, 1);
        put(&mut log, 1, 2, 0, 2);
        put(&mut log, 4, 7, 4 * 8192, 7);
        put(&mut log, 5, 8, 5 * 8192, 8);
        put(&mut log, 6, 9, 5 * 8192, 9);
        let seq = active_sequence(&log, &guid).unwrap();
        assert_eq!(seq.iter().map(|e| e.sequence).collect::<Vec<_>>(), vec![8, 9]);
        // A head whose tail points outside its run is an error, not a guess.
        put(&mut log, 6, 9, 2 * 8192, 9);
        assert!(active_sequence(&log, &guid).is_err());
    }
}
