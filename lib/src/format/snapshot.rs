//! The internal snapshot table.
//!
//! ```text
//!  off  size  field
//!    0     8  l1_table_offset
//!    8     4  l1_size
//!   12     2  id_str_size
//!   14     2  name_size
//!   16     4  date_sec
//!   20     4  date_nsec
//!   24     8  vm_clock_nsec
//!   32     4  vm_state_size (32-bit)
//!   36     4  extra_data_size
//!   40     n  extra data:  +0 vm_state_size_large (8)
//!                          +8 disk_size (8)       (v3 requires these 16)
//!                         +16 icount (8, -1 = off)
//!  40+n       id string, then name, then zero padding to a multiple of 8
//! ```

use super::be::{pad8, put_u16, put_u32, put_u64, u16_at, u32_at, u64_at};
use super::limits::{MAX_L1_BYTES, MAX_SNAPSHOTS, MAX_SNAPSHOT_EXTRA_DATA, MAX_SNAPSHOT_TABLE_BYTES, MAX_VIRTUAL_SIZE};
use super::Header;
use crate::{Error, Result};

/// Fixed part of an entry.
pub const FIXED_LEN: usize = 40;
/// Extra data v3 requires (large VM state size and disk size).
pub const V3_MIN_EXTRA: usize = 16;
/// Extra data oxcow writes (with icount).
pub const EXTRA_WITH_ICOUNT: usize = 24;

/// One snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotEntry {
    /// Host offset of the snapshot's L1 table.
    pub l1_table_offset: u64,
    /// Entries in that L1 table.
    pub l1_size: u32,
    /// Unique ID string ("1", "2", ...).
    pub id: String,
    /// The user's name (tag).
    pub name: String,
    /// Creation time, seconds since the epoch.
    pub date_sec: u32,
    /// Sub-second part of the creation time.
    pub date_nsec: u32,
    /// Guest run time at the snapshot, nanoseconds.
    pub vm_clock_nsec: u64,
    /// VM state size in bytes (the large field when present).
    pub vm_state_size: u64,
    /// Virtual disk size when taken, if recorded.
    pub disk_size: Option<u64>,
    /// Record/replay instruction count, if recorded (`u64::MAX` = off).
    pub icount: Option<u64>,
    /// Extra data beyond the fields oxcow knows, preserved.
    pub extra_unknown: Vec<u8>,
    /// The extra_data_size found on disk (0 for new entries).
    pub extra_data_size: u32,
}

impl SnapshotEntry {
    /// The ID as QEMU shows it: a C string, ending at the first NUL byte
    /// (the bytes after it stay in the entry).
    pub fn shown_id(&self) -> &str {
        self.id.split('\0').next().unwrap_or_default()
    }

    /// The name as QEMU shows it (see [`SnapshotEntry::shown_id`]).
    pub fn shown_name(&self) -> &str {
        self.name.split('\0').next().unwrap_or_default()
    }

    /// Parses one entry at the start of `buf`; returns it and its padded
    /// length. `at` is its file offset for error messages.
    pub fn parse(buf: &[u8], at: u64) -> Result<(SnapshotEntry, usize)> {
        if buf.len() < FIXED_LEN {
            return Err(Error::corrupt_at("snapshot table entry truncated", at));
        }
        let id_len = u16_at(buf, 12) as usize;
        let name_len = u16_at(buf, 14) as usize;
        let extra = u32_at(buf, 36);
        if extra > MAX_SNAPSHOT_EXTRA_DATA {
            return Err(Error::field("extra_data_size", extra.into(), "snapshot extra data too large"));
        }
        let extra = extra as usize;
        let total = FIXED_LEN + extra + id_len + name_len;
        if buf.len() < total {
            return Err(Error::corrupt_at("snapshot table entry truncated", at));
        }
        let ex = &buf[FIXED_LEN..FIXED_LEN + extra];
        let mut vm_state_size = u64::from(u32_at(buf, 32));
        let mut disk_size = None;
        let mut icount = None;
        if extra >= 8 {
            vm_state_size = u64_at(ex, 0);
        }
        if extra >= 16 {
            disk_size = Some(u64_at(ex, 8));
        }
        if extra >= 24 {
            icount = Some(u64_at(ex, 16));
        }
        let known = extra.min(EXTRA_WITH_ICOUNT);
        let names = &buf[FIXED_LEN + extra..total];
        let id = String::from_utf8_lossy(&names[..id_len]).into_owned();
        let name = String::from_utf8_lossy(&names[id_len..]).into_owned();
        let e = SnapshotEntry {
            l1_table_offset: u64_at(buf, 0),
            l1_size: u32_at(buf, 8),
            id,
            name,
            date_sec: u32_at(buf, 16),
            date_nsec: u32_at(buf, 20),
            vm_clock_nsec: u64_at(buf, 24),
            vm_state_size,
            disk_size,
            icount,
            extra_unknown: ex[known..].to_vec(),
            extra_data_size: extra as u32,
        };
        // An L1 table too large (or misplaced) is refused when it is used
        // (`Qcow2::check_snapshot_l1_place`), as QEMU does, not here.
        Ok((e, pad8(total).min(buf.len()).max(total)))
    }

    /// The header the image gets when this snapshot becomes the active
    /// state of an image whose header is `current`: its disk size (the
    /// current one when the entry records none) and an L1 table of
    /// `max(l1_size, what that size needs)` entries. Refused, before
    /// anything changes, when that header would not be a valid one, so a
    /// lying entry cannot leave an image nobody can open: a size not a
    /// multiple of 512 (as qemu-img), or too large for an L1 table of
    /// QEMU's maximum (qemu-img: "Failed to grow the L1 table").
    pub fn installed_header(&self, current: &Header) -> Result<Header> {
        let size = self.disk_size.unwrap_or(current.size);
        let bad = |why: &str| {
            Error::field("snapshot disk_size", size, format!("snapshot '{}' (ID {}): {why}", self.name, self.id))
        };
        if !size.is_multiple_of(512) {
            return Err(bad("disk size is not a multiple of 512"));
        }
        if size > MAX_VIRTUAL_SIZE {
            return Err(bad("disk size too large"));
        }
        let need = current.l1_entries_for(size);
        if need * 8 > MAX_L1_BYTES {
            return Err(bad("disk size needs an L1 table larger than 32 MiB"));
        }
        let mut h = current.clone();
        h.size = size;
        h.l1_size = need.max(u64::from(self.l1_size)) as u32;
        h.validate()?;
        Ok(h)
    }

    /// Encodes one entry with padding. As QEMU writes every entry, v2 or
    /// v3: the 24 bytes of extra data it knows (the large VM state size,
    /// the disk size, the icount, `u64::MAX` when none was recorded), then
    /// the extra data it does not know, kept. `_v3` is kept for callers.
    pub fn encode(&self, _v3: bool) -> Vec<u8> {
        let mut extra = Vec::with_capacity(EXTRA_WITH_ICOUNT + self.extra_unknown.len());
        extra.extend_from_slice(&self.vm_state_size.to_be_bytes());
        extra.extend_from_slice(&self.disk_size.unwrap_or(0).to_be_bytes());
        extra.extend_from_slice(&self.icount.unwrap_or(u64::MAX).to_be_bytes());
        extra.extend_from_slice(&self.extra_unknown);
        let mut b = vec![0u8; FIXED_LEN];
        put_u64(&mut b, 0, self.l1_table_offset);
        put_u32(&mut b, 8, self.l1_size);
        put_u16(&mut b, 12, self.id.len() as u16);
        put_u16(&mut b, 14, self.name.len() as u16);
        put_u32(&mut b, 16, self.date_sec);
        put_u32(&mut b, 20, self.date_nsec);
        put_u64(&mut b, 24, self.vm_clock_nsec);
        put_u32(&mut b, 32, u32::try_from(self.vm_state_size).unwrap_or(0));
        put_u32(&mut b, 36, extra.len() as u32);
        b.extend_from_slice(&extra);
        b.extend_from_slice(self.id.as_bytes());
        b.extend_from_slice(self.name.as_bytes());
        b.resize(pad8(b.len()), 0);
        b
    }
}

/// Parses a whole snapshot table of `count` entries, checking QEMU's limits
/// on count and total size before reading more than the buffer holds.
pub fn parse_table(buf: &[u8], count: u32, at: u64, v3: bool) -> Result<Vec<SnapshotEntry>> {
    if count > MAX_SNAPSHOTS {
        return Err(Error::field("nb_snapshots", count.into(), "too many snapshots"));
    }
    let mut out = Vec::with_capacity(count.min(1024) as usize);
    let mut pos = 0usize;
    for _ in 0..count {
        let (e, len) = SnapshotEntry::parse(&buf[pos.min(buf.len())..], at + pos as u64)?;
        if v3 && (e.extra_data_size as usize) < V3_MIN_EXTRA {
            // QEMU accepts such entries (and fixes them on repair).
        }
        pos += len;
        if pos as u64 > MAX_SNAPSHOT_TABLE_BYTES {
            return Err(Error::field("snapshot table size", pos as u64, "snapshot table too large"));
        }
        out.push(e);
    }
    Ok(out)
}

/// Encodes a snapshot table.
pub fn encode_table(entries: &[SnapshotEntry], v3: bool) -> Vec<u8> {
    entries.iter().flat_map(|e| e.encode(v3)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> SnapshotEntry {
        SnapshotEntry {
            l1_table_offset: 0x30000,
            l1_size: 16,
            id: "1".into(),
            name: "before-upgrade".into(),
            date_sec: 1_700_000_000,
            date_nsec: 42,
            vm_clock_nsec: 7,
            vm_state_size: 0,
            disk_size: Some(1 << 30),
            icount: Some(u64::MAX),
            extra_unknown: vec![],
            extra_data_size: 24,
        }
    }

    #[test]
    fn round_trip_table() {
        let mut b = sample();
        b.id = "2".into();
        b.name = "x".repeat(300);
        b.extra_unknown = vec![9; 8];
        b.extra_data_size = 32;
        let t = encode_table(&[sample(), b.clone()], true);
        assert_eq!(t.len() % 8, 0);
        let back = parse_table(&t, 2, 0, true).unwrap();
        assert_eq!(back, vec![sample(), b]);
    }

    #[test]
    fn installed_header_refuses_sizes_qemu_refuses() {
        let cur = crate::format::header::tests::sample(3);
        let mut sn = sample();
        let at = |sn: &SnapshotEntry, size: u64| {
            let mut sn = sn.clone();
            sn.disk_size = Some(size);
            sn.installed_header(&cur)
        };
        // 2 PiB is the most 64 KiB clusters address with a 32 MiB L1.
        let h = at(&sn, 2 << 50).unwrap();
        assert_eq!((h.size, h.l1_size), (2 << 50, 4 << 20));
        for size in [(2 << 50) + 512, 0x1a00_0000_0080_0000, u64::MAX, (1 << 30) + 256] {
            let e = at(&sn, size).unwrap_err();
            assert!(matches!(e, Error::InvalidField { field: "snapshot disk_size", .. }), "{size:#x}: {e}");
        }
        // Zero is a size; an L1 larger than the size needs is kept.
        let h = at(&sn, 0).unwrap();
        assert_eq!((h.size, h.l1_size), (0, 16));
        sn.disk_size = None;
        assert_eq!(sn.installed_header(&cur).unwrap().size, cur.size);
    }

    #[test]
    fn truncated_and_oversized_are_errors() {
        let t = sample().encode(true);
        for n in 0..t.len() - 1 {
            // Only the padding may be missing.
            if n < FIXED_LEN + 24 + 1 + 14 {
                assert!(parse_table(&t[..n], 1, 0, true).is_err(), "len {n}");
            }
        }
        let mut big = t.clone();
        put_u32(&mut big, 36, MAX_SNAPSHOT_EXTRA_DATA + 1);
        assert!(parse_table(&big, 1, 0, true).is_err());
        assert!(parse_table(&t, MAX_SNAPSHOTS + 1, 0, true).is_err());
    }
}
