//! Compressed cluster descriptors and (de)compression.
//!
//! ```text
//!  x = 62 - (cluster_bits - 8)
//!  bits 0..x-1   host byte offset of the compressed data (unaligned)
//!  bits x..61    additional 512-byte sectors beyond the one holding the offset
//! ```
//! Deflate data is raw (no zlib header) with a window QEMU inflates with
//! 12 bits (4 KiB); zstd data is one or more zstd frames.

use super::header::CompressionType;
use crate::{Error, Result};
use std::io::Read;

/// A decoded compressed-cluster descriptor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CompressedDescriptor {
    /// Host byte offset where the compressed data starts.
    pub offset: u64,
    /// Number of 512-byte sectors the data spans (at least one).
    pub sectors: u64,
}

/// Bit position of the sector count for this cluster size.
pub fn sector_shift(cluster_bits: u32) -> u32 {
    62 - (cluster_bits - 8)
}

impl CompressedDescriptor {
    /// Decodes the low 62 bits of an L2 entry.
    pub fn decode(raw: u64, cluster_bits: u32) -> Self {
        let x = sector_shift(cluster_bits);
        let offset = raw & ((1u64 << x) - 1) & super::limits::MAX_HOST_OFFSET;
        let sectors_mask = (1u64 << (62 - x)) - 1;
        let sectors = ((raw >> x) & sectors_mask) + 1;
        CompressedDescriptor { offset, sectors }
    }
    /// Encodes into the low 62 bits of an L2 entry (flag bits not included).
    pub fn encode(self, cluster_bits: u32) -> u64 {
        let x = sector_shift(cluster_bits);
        self.offset | ((self.sectors - 1) << x)
    }
    /// Descriptor for `len` compressed bytes stored at `offset`.
    pub fn for_data(offset: u64, len: u64) -> Self {
        let first = offset & !511;
        let end = offset + len;
        let sectors = (end - first).div_ceil(512);
        CompressedDescriptor { offset, sectors }
    }
    /// Bytes to read: from the offset to the end of the last sector.
    pub fn byte_len(self) -> u64 {
        self.sectors * 512 - (self.offset & 511)
    }
    /// Largest sector count the field can hold for this cluster size.
    pub fn max_sectors(cluster_bits: u32) -> u64 {
        1u64 << (62 - sector_shift(cluster_bits))
    }
}

/// Decompresses one cluster. Trailing bytes after the compressed stream are
/// ignored (descriptors round up to sectors), as QEMU does; output shorter
/// than a cluster is an error.
pub fn decompress(kind: CompressionType, input: &[u8], out: &mut [u8]) -> Result<()> {
    match kind {
        CompressionType::Zlib => {
            let mut d = flate2::Decompress::new(false);
            match d.decompress(input, out, flate2::FlushDecompress::Finish) {
                Ok(_) => {}
                Err(e) => return Err(Error::corrupt(format!("compressed cluster does not inflate: {e}"))),
            }
            if (d.total_out() as usize) < out.len() {
                return Err(Error::corrupt("compressed cluster inflates to less than a cluster"));
            }
            Ok(())
        }
        CompressionType::Zstd => {
            let mut dec = zstd::stream::read::Decoder::with_buffer(input)
                .map_err(|e| Error::corrupt(format!("zstd stream: {e}")))?
                .single_frame();
            let mut filled = 0;
            while filled < out.len() {
                match dec.read(&mut out[filled..]) {
                    Ok(0) => break,
                    Ok(n) => filled += n,
                    Err(e) => return Err(Error::corrupt(format!("compressed cluster does not decompress: {e}"))),
                }
            }
            if filled < out.len() {
                return Err(Error::corrupt("compressed cluster decompresses to less than a cluster"));
            }
            Ok(())
        }
    }
}

/// Compresses one cluster; `None` when the result would not be smaller
/// than the cluster (it is then stored uncompressed).
pub fn compress(kind: CompressionType, input: &[u8]) -> Result<Option<Vec<u8>>> {
    let out = match kind {
        CompressionType::Zlib => {
            // A 4 KiB window (12 bits): QEMU inflates with that window size,
            // so a larger one could produce data QEMU cannot read.
            let mut c = flate2::Compress::new_with_window_bits(flate2::Compression::default(), false, 12);
            let mut out = Vec::with_capacity(input.len() + 64);
            loop {
                let status = c
                    .compress_vec(&input[c.total_in() as usize..], &mut out, flate2::FlushCompress::Finish)
                    .map_err(|e| Error::invalid(format!("deflate failed: {e}")))?;
                if status == flate2::Status::StreamEnd {
                    break;
                }
                if out.len() >= input.len() {
                    return Ok(None);
                }
                out.reserve(input.len());
            }
            out
        }
        CompressionType::Zstd => {
            zstd::bulk::compress(input, 0).map_err(|e| Error::invalid(format!("zstd failed: {e}")))?
        }
    };
    if out.len() >= input.len() {
        return Ok(None);
    }
    Ok(Some(out))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn descriptor_round_trip(bits in 9u32..=21, off in 0u64..(1u64 << 40), extra in 0u64..4) {
            let x = sector_shift(bits);
            let off = off & ((1u64 << x) - 1);
            let sectors = (extra % CompressedDescriptor::max_sectors(bits)) + 1;
            let d = CompressedDescriptor { offset: off, sectors };
            prop_assert_eq!(CompressedDescriptor::decode(d.encode(bits), bits), d);
        }
    }

    #[test]
    fn compress_round_trip_both_kinds() {
        let mut data = vec![0u8; 65536];
        for (i, b) in data.iter_mut().enumerate() {
            *b = (i / 100) as u8;
        }
        for kind in [CompressionType::Zlib, CompressionType::Zstd] {
            let c = compress(kind, &data).unwrap().unwrap();
            let mut padded = c.clone();
            padded.extend_from_slice(&[0xaa; 300]); // trailing sector garbage
            let mut out = vec![0u8; data.len()];
            decompress(kind, &padded, &mut out).unwrap();
            assert_eq!(out, data);
        }
    }

    #[test]
    fn garbage_does_not_decompress() {
        let mut out = vec![0u8; 4096];
        for kind in [CompressionType::Zlib, CompressionType::Zstd] {
            assert!(decompress(kind, &[0xff; 100], &mut out).is_err());
            assert!(decompress(kind, &[], &mut out).is_err());
        }
    }

    #[test]
    fn incompressible_is_none() {
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let data: Vec<u8> = (0..4096)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 24) as u8
            })
            .collect();
        assert!(compress(CompressionType::Zlib, &data).unwrap().is_none());
    }
}
