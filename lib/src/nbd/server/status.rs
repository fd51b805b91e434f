//! Extent walks over the backing chain: which parts of a read are holes,
//! and the descriptors of `NBD_CMD_BLOCK_STATUS`.

use crate::nbd::proto::{STATE_DIRTY, STATE_HOLE, STATE_ZERO};
use crate::{BlockDevice, BlockStatus, Result};

/// Most extents looked up for one read; past it the rest is read as data
/// (always correct, merely less sparse).
const MAX_READ_EXTENTS: usize = 1024;
/// Most descriptors per context in one block status reply; clients ask
/// again from where the reply stopped.
const MAX_STATUS_EXTENTS: usize = 2048;

/// A stretch of a read reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Segment {
    /// Offset relative to the start of the request.
    pub rel: usize,
    /// Length in bytes.
    pub len: usize,
    /// Reads as zeros: sent as a hole chunk, never read.
    pub zero: bool,
}

/// Status of `[pos, end)` through the backing chain, clamped to it, with
/// its `qemu:allocation-depth` value; `None` when the device gives nothing
/// usable (an empty or misplaced extent that would loop forever).
///
/// This is [`crate::device::chain_status`] plus one distinction it does not
/// make: past the end of a shorter backing image, QEMU counts the zeros as
/// allocated by that backing layer, where a range no layer allocates has
/// depth 0.
fn status_at(dev: &dyn BlockDevice, pos: u64, end: u64) -> Result<Option<(BlockStatus, u32)>> {
    let mut layer = dev;
    let mut depth = 0u32;
    let mut len = end - pos;
    let (mut st, value) = loop {
        let st = layer.block_status(pos, len)?;
        if st.allocated {
            break (st, depth + 1);
        }
        if st.offset != pos || st.length == 0 {
            return Ok(None);
        }
        len = st.length.min(len);
        match layer.backing() {
            Some(b) if pos < b.len() => {
                layer = b;
                len = len.min(b.len() - pos);
                depth += 1;
            }
            Some(_) => break (st, depth + 2),
            None => break (st, 0),
        }
    };
    if st.offset != pos || st.length == 0 {
        return Ok(None);
    }
    st.length = st.length.min(len).min(end - pos);
    st.depth = depth;
    Ok(Some((st, value)))
}

/// Splits a read of `len` bytes at `offset` into data and zero segments.
/// Status lookups that fail only make the read less sparse.
pub(crate) fn read_segments(dev: &dyn BlockDevice, offset: u64, len: usize) -> Vec<Segment> {
    let end = offset + len as u64;
    let mut segs: Vec<Segment> = Vec::new();
    let mut pos = offset;
    while pos < end {
        let st = if segs.len() >= MAX_READ_EXTENTS { None } else { status_at(dev, pos, end).ok().flatten() };
        let (n, zero) = match st {
            Some((st, _)) => (st.length, st.zero),
            None => (end - pos, false),
        };
        let rel = (pos - offset) as usize;
        match segs.last_mut() {
            Some(last) if last.zero == zero => last.len += n as usize,
            _ => segs.push(Segment { rel, len: n as usize, zero }),
        }
        pos += n;
    }
    segs
}

/// Descriptors, as (length, flags), for each selected context.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(crate) struct StatusReply {
    /// `base:allocation` descriptors.
    pub base: Vec<(u32, u32)>,
    /// `qemu:allocation-depth` descriptors.
    pub depth: Vec<(u32, u32)>,
    /// `qemu:dirty-bitmap:NAME` descriptors, by the index of the bitmap
    /// in the export's list.
    pub bitmaps: Vec<(usize, Vec<(u32, u32)>)>,
}

/// One context's descriptor list under construction.
struct Track {
    wanted: bool,
    done: bool,
    out: Vec<(u32, u32)>,
}

impl Track {
    fn push(&mut self, len: u32, flags: u32, req_one: bool) {
        if !self.wanted || self.done {
            return;
        }
        let full = self.out.len() >= MAX_STATUS_EXTENTS || (req_one && !self.out.is_empty());
        match self.out.last_mut() {
            Some(last) if last.1 == flags => last.0 += len,
            _ if full => self.done = true,
            _ => self.out.push((len, flags)),
        }
    }
    fn open(&self) -> bool {
        self.wanted && !self.done
    }
}

/// Walks `[offset, offset + len)` (already checked to lie in the device,
/// `len` nonzero) for the selected contexts. `base:allocation` reports a
/// hole where no layer stores data and zero where the content reads as
/// zeros; `qemu:allocation-depth` reports 0 where no layer of the chain
/// allocates, else the 1-based depth of the layer that does (a range past
/// the end of a shorter backing image counts as allocated by it, as in
/// qemu-nbd).
pub(crate) fn block_status(
    dev: &dyn BlockDevice,
    offset: u64,
    len: u32,
    req_one: bool,
    base: bool,
    depth: bool,
) -> Result<StatusReply> {
    let end = offset + u64::from(len);
    let mut tb = Track { wanted: base, done: false, out: Vec::new() };
    let mut td = Track { wanted: depth, done: false, out: Vec::new() };
    let mut pos = offset;
    while pos < end && (tb.open() || td.open()) {
        let (st, d) = match status_at(dev, pos, end) {
            Ok(Some(found)) => found,
            // Nothing known: status 0 ("allocated, contents unknown") is
            // always a truthful answer for the rest.
            Ok(None) => (
                BlockStatus {
                    offset: pos,
                    length: end - pos,
                    allocated: true,
                    zero: false,
                    data: true,
                    compressed: false,
                    host_offset: None,
                    depth: 0,
                },
                1,
            ),
            Err(e) if pos == offset => return Err(e),
            // What was gathered before the failure is still true.
            Err(_) => break,
        };
        // The walk stays within a u32-long request, so this cannot truncate.
        let n = st.length as u32;
        let flags = (if st.data { 0 } else { STATE_HOLE }) | (if st.zero { STATE_ZERO } else { 0 });
        tb.push(n, flags, req_one);
        td.push(n, d, req_one);
        pos += st.length;
    }
    Ok(StatusReply { base: tb.out, depth: td.out, bitmaps: Vec::new() })
}

/// `qemu:dirty-bitmap:NAME` descriptors of `[offset, offset + len)`:
/// `STATE_DIRTY` where the device's bitmap `name` is set, as qemu-nbd
/// answers (the whole range as clean when the device has no bitmaps).
pub(crate) fn bitmap_status(
    dev: &dyn BlockDevice,
    name: &str,
    offset: u64,
    len: u32,
    req_one: bool,
) -> Result<Vec<(u32, u32)>> {
    let extents = match dev.dirty_bitmap_extents(name, offset, u64::from(len)) {
        Some(r) => r?,
        None => vec![(offset, u64::from(len), false)],
    };
    let mut t = Track { wanted: true, done: false, out: Vec::new() };
    for (_, l, dirty) in extents {
        // Within a u32-long request: cannot truncate.
        t.push(l as u32, if dirty { STATE_DIRTY } else { 0 }, req_one);
        if !t.open() {
            break;
        }
    }
    Ok(t.out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::raw::RawImage;
    use crate::storage::MemoryStorage;
    use std::sync::Arc;

    #[test]
    fn raw_memory_image_is_all_data() {
        let st = Arc::new(MemoryStorage::new());
        crate::storage::Storage::set_len(&*st, 1 << 20).unwrap();
        let dev = RawImage::new(st, false, false).unwrap();
        let segs = read_segments(&dev, 4096, 8192);
        assert_eq!(segs, vec![Segment { rel: 0, len: 8192, zero: false }]);
        let r = block_status(&dev, 0, 1 << 20, false, true, true).unwrap();
        assert_eq!(r.base, vec![(1 << 20, 0)]);
        assert_eq!(r.depth, vec![(1 << 20, 1)]);
        let r = block_status(&dev, 0, 1 << 20, true, true, false).unwrap();
        assert_eq!(r.base.len(), 1);
        assert!(r.depth.is_empty());
    }
}
