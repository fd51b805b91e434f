//! The guest's view of a disk under randomized workloads, with QEMU's
//! semantics, against which images are checked.

/// A guest operation of the randomized workloads.
#[derive(Debug, Clone, Copy)]
pub enum Op {
    /// Write a pattern byte: (offset, length, byte).
    Write(u64, u64, u8),
    /// Write zeroes: (offset, length, may unmap).
    Zero(u64, u64, bool),
    /// Discard: (offset, length).
    Discard(u64, u64),
    /// Flush.
    Flush,
}

/// Applies `op` to `model`, the guest's view, with QEMU's semantics:
/// discard acts on whole clusters only (the partial cluster at the very end
/// of the disk included) and reads zeros afterwards, except on v2 images
/// with a backing file, where QEMU leaves the data.
pub fn apply_model(model: &mut [u8], backing: &[u8], op: Op, cs: u64, v3: bool) {
    let size = model.len() as u64;
    match op {
        Op::Write(off, len, p) => model[off as usize..(off + len) as usize].fill(p),
        Op::Zero(off, len, _) => model[off as usize..(off + len) as usize].fill(0),
        Op::Discard(off, len) => {
            let first = off.div_ceil(cs) * cs;
            let end = off + len;
            let last = if end == size { size } else { end / cs * cs };
            if (v3 || backing.is_empty()) && last > first {
                model[first as usize..last as usize].fill(0);
            }
        }
        Op::Flush => {}
    }
}
