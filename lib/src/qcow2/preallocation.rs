//! QEMU's test for metadata preallocation, and what follows from it: the
//! data clusters of a preallocated image may be holes in the host file,
//! which read as zeros, so block status asks the file about them (QEMU's
//! qcow2 driver then lets the file layer refine the answer).

use super::units::HostCluster;
use super::{Preallocation, Qcow2};
use crate::storage::Storage;
use crate::{Error, Result};

/// Preallocates `[from, to)` of a plain (raw) file as QEMU's file driver
/// does when it grows one: falloc reserves the blocks, full writes zeros;
/// metadata and off do nothing here.
pub fn preallocate_file_range(file: &dyn Storage, from: u64, to: u64, mode: Preallocation) -> Result<()> {
    let err = |e| Error::io("Could not preallocate new data", e);
    match mode {
        Preallocation::Falloc => file.allocate(from, to.saturating_sub(from)).map_err(err)?,
        Preallocation::Full => crate::storage::write_zeros_chunked(file, from, to.saturating_sub(from)).map_err(err)?,
        _ => return Ok(()),
    }
    file.flush().map_err(err)
}

/// How the host file stores a run of data clusters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct HostExtent {
    /// Bytes the answer covers, from the start of the run asked about.
    pub length: u64,
    /// A hole in the file (or past its end): the data reads as zeros.
    pub hole: bool,
}

impl Qcow2 {
    /// Whether the image looks metadata-preallocated by QEMU's test: far
    /// more clusters carry a refcount than the image file has blocks for
    /// (at least 10/9 as many, and two more). Scans refcounts until the
    /// answer is known, so a caller that asks often keeps the answer.
    pub fn metadata_preallocated(&self) -> Result<bool> {
        let cs = self.g.cluster_size;
        let len = self.file.len().map_err(|e| Error::io("reading image size", e))?;
        let allocated = self.file.allocated_size().map_err(|e| Error::io("reading image allocation", e))?;
        let real = allocated / cs;
        let threshold = (real * 10 / 9).max(real + 2);
        let end = len.div_ceil(cs);
        let per_block = 1u64 << self.g.rc.block_entries_bits();
        let mut counted = 0;
        let mut first = 0;
        // One refcount block per lock, so other users are not held up.
        while first < end && counted < threshold {
            let last = (first + per_block).min(end);
            let mut m = self.lock();
            for idx in first..last {
                if self.refcount(&mut m, HostCluster(idx))? != 0 {
                    counted += 1;
                    if counted >= threshold {
                        break;
                    }
                }
            }
            drop(m);
            first = last;
        }
        Ok(counted >= threshold)
    }

    /// How the host file stores `length` bytes of data clusters starting
    /// at host offset `host` (as block status reports them), from the
    /// host's sparse-file knowledge. Meaningful for images that
    /// [look preallocated](Self::metadata_preallocated); elsewhere every
    /// data cluster was written.
    pub fn host_extent(&self, host: u64, length: u64) -> HostExtent {
        let file_len = self.data.len().unwrap_or(u64::MAX);
        if host >= file_len {
            return HostExtent { length, hole: true };
        }
        let mut out = HostExtent { length, hole: false };
        if let Some((is_data, end)) = self.data.extent_at(host) {
            if end > host {
                out.length = out.length.min(end - host);
            }
            out.hole = !is_data;
        }
        out.length = out.length.min(file_len - host);
        out
    }
}
