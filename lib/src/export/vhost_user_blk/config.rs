//! What the device tells the driver before any request: the virtio-blk
//! feature bits and configuration space, built from the export's options
//! and the device size. Pure: no I/O, no rust-vmm types.
//!
//! Configuration space layout (virtio 1.x, 5.2.4, little-endian), the
//! part a driver of the features below reads:
//!
//! ```text
//!  0 capacity (le64, 512-byte sectors)   32 writeback (u8)
//!  8 size_max (le32)                     34 num_queues (le16)
//! 12 seg_max (le32)                      36 max_discard_sectors (le32)
//! 16 geometry (4 bytes)                  40 max_discard_seg (le32)
//! 20 blk_size (le32)                     44 discard_sector_alignment (le32)
//! 24 topology (8 bytes)                  48 max_write_zeroes_sectors (le32)
//!                                        52 max_write_zeroes_seg (le32)
//!                                        56 write_zeroes_may_unmap (u8)
//! ```

use super::VhostUserBlkOptions;
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_MQ, VIRTIO_BLK_F_RO,
    VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_WRITE_ZEROES,
};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};

/// Bytes of configuration space served (up to write_zeroes_may_unmap and
/// its padding; the secure-erase fields that follow are not offered).
pub const CONFIG_LEN: usize = 60;

/// Largest discard or write-zeroes request, in sectors (QEMU's limit too:
/// the byte count then fits an `i32`).
pub const MAX_DISCARD_SECTORS: u32 = 32768;

/// Longest descriptor chain a queue holds (the front end picks the
/// actual size up to this).
pub const MAX_QUEUE_SIZE: u16 = 1024;

/// Data segments per request: a queue of QEMU's default size (128) less
/// the header and status descriptors.
pub const SEG_MAX: u32 = 126;

/// The vhost-user feature bit saying protocol features are negotiated.
const PROTOCOL_FEATURES: u64 = 1 << 30;

/// The virtio feature bits offered.
pub fn features(opts: &VhostUserBlkOptions) -> u64 {
    let mut f = 1u64 << VIRTIO_F_VERSION_1
        | 1 << VIRTIO_RING_F_EVENT_IDX
        | 1 << VIRTIO_RING_F_INDIRECT_DESC
        | PROTOCOL_FEATURES
        | 1 << VIRTIO_BLK_F_SEG_MAX
        | 1 << VIRTIO_BLK_F_BLK_SIZE
        | 1 << VIRTIO_BLK_F_FLUSH
        | 1 << VIRTIO_BLK_F_MQ;
    if opts.writable {
        f |= 1 << VIRTIO_BLK_F_DISCARD | 1 << VIRTIO_BLK_F_WRITE_ZEROES;
    } else {
        f |= 1 << VIRTIO_BLK_F_RO;
    }
    f
}

/// The configuration space of a device of `len` bytes.
pub fn config_space(opts: &VhostUserBlkOptions, len: u64) -> [u8; CONFIG_LEN] {
    let mut c = [0u8; CONFIG_LEN];
    let put32 = |c: &mut [u8; CONFIG_LEN], at: usize, v: u32| c[at..at + 4].copy_from_slice(&v.to_le_bytes());
    c[0..8].copy_from_slice(&(len / 512).to_le_bytes());
    put32(&mut c, 12, SEG_MAX);
    put32(&mut c, 20, opts.logical_block_size);
    c[34..36].copy_from_slice(&opts.num_queues.to_le_bytes());
    put32(&mut c, 36, MAX_DISCARD_SECTORS);
    put32(&mut c, 40, 1);
    put32(&mut c, 44, opts.logical_block_size / 512);
    put32(&mut c, 48, MAX_DISCARD_SECTORS);
    put32(&mut c, 52, 1);
    c[56] = 1;
    c
}

/// `size` bytes of the configuration space from `offset`, zeros past its
/// end (a driver may read fields of features not offered).
pub fn read_config(space: &[u8; CONFIG_LEN], offset: u32, size: u32) -> Vec<u8> {
    let mut out = vec![0u8; size as usize];
    let start = (offset as usize).min(CONFIG_LEN);
    let end = (offset as usize).saturating_add(size as usize).min(CONFIG_LEN);
    out[..end - start].copy_from_slice(&space[start..end]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_space_holds_capacity_block_size_queues_and_limits() {
        let opts = VhostUserBlkOptions::default().logical_block_size(4096).num_queues(2);
        let c = config_space(&opts, (64 << 20) + 100);
        assert_eq!(u64::from_le_bytes(c[0..8].try_into().unwrap()), (64 << 20) / 512);
        assert_eq!(u32::from_le_bytes(c[20..24].try_into().unwrap()), 4096);
        assert_eq!(u16::from_le_bytes(c[34..36].try_into().unwrap()), 2);
        assert_eq!(u32::from_le_bytes(c[44..48].try_into().unwrap()), 8);
        assert_eq!(c[56], 1);
        assert_eq!(read_config(&c, 34, 2), vec![2, 0]);
        assert_eq!(read_config(&c, 58, 8), vec![0; 8]);
        assert_eq!(read_config(&c, 1000, 4), vec![0; 4]);
    }

    #[test]
    fn read_only_offers_ro_and_neither_discard_nor_write_zeroes() {
        let ro = features(&VhostUserBlkOptions::default());
        assert_ne!(ro & 1 << VIRTIO_BLK_F_RO, 0);
        assert_eq!(ro & (1 << VIRTIO_BLK_F_DISCARD | 1 << VIRTIO_BLK_F_WRITE_ZEROES), 0);
        let rw = features(&VhostUserBlkOptions::default().writable(true));
        assert_eq!(rw & 1 << VIRTIO_BLK_F_RO, 0);
        assert_ne!(rw & 1 << VIRTIO_BLK_F_WRITE_ZEROES, 0);
        assert_ne!(rw & 1 << VIRTIO_F_VERSION_1, 0);
    }
}
