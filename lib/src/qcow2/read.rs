//! The read path and block status.

use super::units::{GuestCluster, GuestOffset};
use super::Qcow2;
use crate::device::{check_range, read_backing, BlockDevice, BlockStatus};
use crate::format::compressed::{decompress, CompressedDescriptor};
use crate::format::l2::{ClusterKind, L2Entry};
use crate::{Error, Result};

/// One piece of a read, planned under the metadata lock and carried out
/// without it.
#[derive(Debug, Clone, Copy)]
enum Piece {
    /// Bytes at a host offset of the data file.
    Host(u64),
    /// Zeros.
    Zero,
    /// Bytes from the backing chain at the same guest offset.
    Backing,
    /// Part of a compressed cluster, starting `skip` bytes into it.
    Compressed(CompressedDescriptor, u64),
}

impl Qcow2 {
    /// Splits `[offset, offset + len)` into pieces of uniform kind, with
    /// `entry` giving each guest cluster's L2 entry; `None` when `entry`
    /// has none (a lookup in the cache only, whose table is not cached).
    fn plan_read(
        &self,
        offset: u64,
        len: u64,
        mut entry: impl FnMut(GuestCluster) -> Result<Option<L2Entry>>,
    ) -> Result<Option<Vec<(u64, u64, Piece)>>> {
        let cs = self.g.cluster_size;
        let mut plan: Vec<(u64, u64, Piece)> = Vec::new();
        let mut pos = offset;
        let end = offset + len;
        while pos < end {
            let gc = pos / cs;
            let in_off = pos % cs;
            let Some(e) = entry(GuestCluster(gc))? else { return Ok(None) };
            // Without extended L2 (or for compressed clusters) one kind
            // covers the whole cluster; otherwise it changes per subcluster.
            let step = if self.g.extended && !e.is_compressed() { self.g.sub_size } else { cs };
            let sub = (in_off / self.g.sub_size) as u32;
            let sub = if self.g.extended { sub } else { 0 };
            let kind = self.classify(e, sub, GuestCluster(gc))?;
            let piece_end = ((pos / step + 1) * step).min(end);
            let n = piece_end - pos;
            let piece = match kind {
                ClusterKind::Unallocated => Piece::Backing,
                ClusterKind::Zero(_) => Piece::Zero,
                ClusterKind::Normal(host) => Piece::Host(host + in_off),
                ClusterKind::Compressed(d) => Piece::Compressed(d, in_off),
            };
            match (plan.last_mut(), piece) {
                (Some((_, l, Piece::Host(h))), Piece::Host(h2)) if *h + *l == h2 => *l += n,
                (Some((_, l, Piece::Zero)), Piece::Zero) => *l += n,
                (Some((_, l, Piece::Backing)), Piece::Backing) => *l += n,
                _ => plan.push((pos, n, piece)),
            }
            pos = piece_end;
        }
        Ok(Some(plan))
    }

    pub(crate) fn read(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        check_range(offset, buf.len() as u64, self.len())?;
        self.read_unchecked(buf, offset)
    }

    /// A read at any guest offset, past the disk's end too (the VM state
    /// area, `vmstate.rs`): what no L1 entry covers reads as unallocated.
    pub(crate) fn read_unchecked(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        // Fast path: a read inside one (sub)cluster, the common small
        // random read, needs no plan to be built.
        let step = self.g.sub_size;
        if !buf.is_empty() && offset / step == (offset + buf.len() as u64 - 1) / step {
            let gc = GuestOffset(offset).cluster(&self.g);
            let in_off = GuestOffset(offset).in_cluster(&self.g);
            let sub = if self.g.extended { (in_off / self.g.sub_size) as u32 } else { 0 };
            let piece = |e: L2Entry| -> Result<Piece> {
                Ok(match self.classify(e, sub, gc)? {
                    ClusterKind::Unallocated => Piece::Backing,
                    ClusterKind::Zero(_) => Piece::Zero,
                    ClusterKind::Normal(host) => Piece::Host(host + in_off),
                    ClusterKind::Compressed(d) => Piece::Compressed(d, in_off),
                })
            };
            // A cached table is read under the shared lock; only a miss
            // takes it exclusively, to load the table.
            let (piece, _gate) = {
                let m = self.lock_shared();
                match self.cached_l2_entry(&m, gc) {
                    Some(e) => (piece(e)?, self.io_gate.read().unwrap_or_else(|e| e.into_inner())),
                    None => {
                        drop(m);
                        let mut m = self.lock();
                        let e = self.l2_entry(&mut m, gc)?;
                        (piece(e)?, self.io_gate.read().unwrap_or_else(|e| e.into_inner()))
                    }
                }
            };
            return self.read_piece(buf, offset, piece);
        }
        // Plan in bounded batches so the lock is not held across a huge
        // planning loop.
        const BATCH: u64 = 32 << 20;
        let mut done = 0u64;
        let total = buf.len() as u64;
        while done < total {
            let n = BATCH.min(total - done);
            // Take the gate before releasing the metadata lock, so no
            // cluster in the plan can be freed and reused before it is read.
            let (plan, _gate) = {
                let m = self.lock_shared();
                match self.plan_read(offset + done, n, |gc| Ok(self.cached_l2_entry(&m, gc)))? {
                    Some(plan) => (plan, self.io_gate.read().unwrap_or_else(|e| e.into_inner())),
                    None => {
                        drop(m);
                        let mut m = self.lock();
                        let plan = self
                            .plan_read(offset + done, n, |gc| self.l2_entry(&mut m, gc).map(Some))?
                            .ok_or_else(|| Error::corrupt("L2 table vanished from cache"))?;
                        (plan, self.io_gate.read().unwrap_or_else(|e| e.into_inner()))
                    }
                }
            };
            for (pos, len, piece) in plan {
                let at = (pos - offset) as usize;
                let dst = &mut buf[at..at + len as usize];
                self.read_piece(dst, pos, piece)?;
            }
            done += n;
        }
        Ok(())
    }

    fn read_piece(&self, dst: &mut [u8], guest: u64, piece: Piece) -> Result<()> {
        match piece {
            Piece::Host(h) => {
                self.data.debug_event(crate::storage::BlkdebugEvent::ReadAio);
                self.read_guest_data(dst, h, guest).map_err(|e| Error::io("reading guest data", e))
            }
            Piece::Zero => {
                dst.fill(0);
                Ok(())
            }
            Piece::Backing => read_backing(self.backing.as_deref(), dst, guest),
            Piece::Compressed(d, skip) => {
                let cluster = self.read_compressed(d)?;
                dst.copy_from_slice(&cluster[skip as usize..skip as usize + dst.len()]);
                Ok(())
            }
        }
    }

    /// Reads and decompresses one compressed cluster.
    pub(crate) fn read_compressed(&self, d: CompressedDescriptor) -> Result<Vec<u8>> {
        let mut raw = vec![0u8; d.byte_len() as usize];
        self.file.read_at(&mut raw, d.offset).map_err(|e| Error::io("reading compressed cluster", e))?;
        let mut out = vec![0u8; self.g.cluster_size as usize];
        decompress(self.g.compression, &raw, &mut out)
            .map_err(|e| Error::corrupt_at(format!("compressed cluster: {e}"), d.offset))?;
        Ok(out)
    }

    /// Reads guest bytes as they are now (the old content during
    /// copy-on-write): the caller owns the cluster (in flight).
    pub(crate) fn read_current(&self, dst: &mut [u8], guest: u64, kind: ClusterKind, in_off: u64) -> Result<()> {
        match kind {
            ClusterKind::Unallocated => read_backing(self.backing.as_deref(), dst, guest),
            ClusterKind::Zero(_) => {
                dst.fill(0);
                Ok(())
            }
            ClusterKind::Normal(h) => {
                self.read_guest_data(dst, h + in_off, guest).map_err(|e| Error::io("reading data for copy-on-write", e))
            }
            ClusterKind::Compressed(d) => {
                let c = self.read_compressed(d)?;
                dst.copy_from_slice(&c[in_off as usize..in_off as usize + dst.len()]);
                Ok(())
            }
        }
    }

    pub(crate) fn status(&self, offset: u64, len: u64) -> Result<BlockStatus> {
        let size = self.len();
        if offset >= size || len == 0 {
            return Err(Error::invalid("block status request past the end of the image"));
        }
        let end = offset + len.min(size - offset);
        let cs = self.g.cluster_size;
        let mut m = self.lock();
        let mut acc: Option<BlockStatus> = None;
        let mut pos = offset;
        // Bound the work done under the lock; callers ask again for the rest.
        let mut budget = 1u32 << 16;
        while pos < end && budget > 0 {
            budget -= 1;
            let gc = pos / cs;
            let (l1i, _) = GuestCluster(gc).split(&self.g);
            let l2_unallocated = m.map.l1().get(l1i).is_none_or(|&e| e & crate::format::l1::OFFSET_MASK == 0);
            let (n, st) = if l1i >= m.map.l1().len() {
                // Past the L1 table (a snapshot view whose disk is larger
                // than its table covers): unallocated to the end at once.
                (end - pos, BlockStatus::unallocated(pos, end - pos))
            } else if l2_unallocated {
                // A whole L2 table's range at once: fast on huge sparse disks.
                let span = self.g.l2_entries * cs;
                let n = ((pos / span + 1) * span).min(end) - pos;
                (n, BlockStatus::unallocated(pos, n))
            } else {
                let e = self.l2_entry(&mut m, GuestCluster(gc))?;
                let in_off = pos % cs;
                let step = if self.g.extended && !e.is_compressed() { self.g.sub_size } else { cs };
                let sub = if self.g.extended { (in_off / self.g.sub_size) as u32 } else { 0 };
                let n = ((pos / step + 1) * step).min(end) - pos;
                let kind = self.classify(e, sub, GuestCluster(gc))?;
                let mut st = BlockStatus::unallocated(pos, n);
                match kind {
                    ClusterKind::Unallocated => {
                        // A subcluster not allocated in an allocated
                        // cluster: falls through, but qemu-img map still
                        // shows where it would live.
                        let host = e.host_offset();
                        if self.g.extended && host != 0 {
                            st.host_offset = Some(host + in_off);
                        }
                    }
                    ClusterKind::Zero(h) => {
                        st.allocated = true;
                        st.host_offset = h.map(|h| h + in_off);
                    }
                    ClusterKind::Normal(h) => {
                        st.allocated = true;
                        st.zero = false;
                        st.data = true;
                        st.host_offset = Some(h + in_off);
                    }
                    ClusterKind::Compressed(_) => {
                        st.allocated = true;
                        st.zero = false;
                        st.data = true;
                        st.compressed = true;
                    }
                }
                (n, st)
            };
            match &mut acc {
                None => acc = Some(st),
                Some(a) if a.mergeable(&st) => a.length += n,
                Some(_) => break,
            }
            pos += n;
        }
        acc.ok_or_else(|| Error::invalid("empty block status request"))
    }
}
