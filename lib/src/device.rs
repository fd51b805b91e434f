//! [`BlockDevice`]: the one interface every opened image shows upward.
//!
//! Tools and the NBD server see only this trait; a qcow2 image's backing file
//! is a `Box<dyn BlockDevice>`, so chains of any depth and any mix of formats
//! compose.

use crate::Result;

/// What one extent of an image holds, at one layer of its chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockStatus {
    /// Guest offset of the extent.
    pub offset: u64,
    /// Length of the extent in bytes (at least 1).
    pub length: u64,
    /// This layer decides the extent's content (data or zeros); when
    /// false, reads fall through to the backing image (or read zeros when
    /// there is none).
    pub allocated: bool,
    /// The extent reads as zeros.
    pub zero: bool,
    /// The extent has data stored at this layer.
    pub data: bool,
    /// The data is compressed (no host offset is given then).
    pub compressed: bool,
    /// Host offset of the data in the file that holds it, when known.
    pub host_offset: Option<u64>,
    /// How many backing layers down the extent was resolved (0 = top).
    pub depth: u32,
}

impl BlockStatus {
    /// An extent that falls through to the layer below.
    pub fn unallocated(offset: u64, length: u64) -> Self {
        BlockStatus {
            offset,
            length,
            allocated: false,
            zero: true,
            data: false,
            compressed: false,
            host_offset: None,
            depth: 0,
        }
    }

    /// Whether `next` continues this extent with the same status.
    pub fn mergeable(&self, next: &BlockStatus) -> bool {
        self.offset + self.length == next.offset
            && self.allocated == next.allocated
            && self.zero == next.zero
            && self.data == next.data
            && self.compressed == next.compressed
            && self.depth == next.depth
            && match (self.host_offset, next.host_offset) {
                (None, None) => true,
                (Some(a), Some(b)) => a + self.length == b,
                _ => false,
            }
    }
}

/// A virtual disk: qcow2 image, raw file, network export, ...
///
/// All methods take `&self`; implementations are `Send + Sync` and safe to
/// call from many threads at once.
pub trait BlockDevice: Send + Sync {
    /// Virtual size in bytes.
    fn len(&self) -> u64;
    /// True for a zero-length device.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Reads `buf.len()` bytes at `offset` (must lie within the device).
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()>;
    /// Writes `buf` at `offset` (must lie within the device).
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()>;
    /// Makes a range read as zeros; `may_unmap` allows deallocating it.
    fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> Result<()>;
    /// Tells the device a range is no longer needed (advisory: what it then
    /// reads is format-defined, as in QEMU).
    fn discard(&self, offset: u64, len: u64) -> Result<()>;
    /// Makes every completed write durable.
    fn flush(&self) -> Result<()>;
    /// Status of the extent starting at `offset`, at most `len` long, at
    /// this layer only (`depth` 0).
    fn block_status(&self, offset: u64, len: u64) -> Result<BlockStatus>;
    /// The backing image, if any.
    fn backing(&self) -> Option<&dyn BlockDevice> {
        None
    }
    /// The format name ("qcow2", "raw", "nbd").
    fn format_name(&self) -> &'static str;
    /// Whether writes are refused.
    fn is_read_only(&self) -> bool;
    /// Changes the virtual size.
    fn resize(&self, _new_len: u64) -> Result<()> {
        Err(crate::Error::unsupported(format!("resizing {} images", self.format_name())))
    }
    /// Finishes cleanly: flushes and writes whatever a clean close needs
    /// (e.g. clears the dirty bit). Further use is an error.
    fn close(&self) -> Result<()> {
        self.flush()
    }
    /// The dirty and clean ranges of `[offset, offset + len)` in the
    /// persistent dirty bitmap `name`, as `(start, length, dirty)`, live
    /// (writes through this device included); `None` for devices without
    /// bitmaps. NBD's `qemu:dirty-bitmap:NAME` context reads it.
    fn dirty_bitmap_extents(&self, _name: &str, _offset: u64, _len: u64) -> Option<Result<Vec<(u64, u64, bool)>>> {
        None
    }
}

/// Writes the [`BlockDevice`] methods named after the colon as plain
/// pass-throughs to `self.FIELD` (anything that derefs to a
/// `BlockDevice`), for filters that change only a few methods and forward
/// the rest. Used inside an `impl BlockDevice for ...` block:
///
/// ```
/// use oxcow::{BlockDevice, Result};
/// /// Counts nothing; forwards everything but `format_name`.
/// struct Renamed(Box<dyn BlockDevice>);
/// impl BlockDevice for Renamed {
///     oxcow::forward_block_device!(0: len, read_at, write_at, write_zeroes, discard, flush,
///         block_status, backing, is_read_only, resize, close, dirty_bitmap_extents);
///     fn format_name(&self) -> &'static str {
///         "renamed"
///     }
/// }
/// ```
///
/// Listing every method a filter does not override keeps optional ones
/// (such as `dirty_bitmap_extents`) from silently falling back to the
/// trait's default and hiding what the wrapped device offers.
#[macro_export]
macro_rules! forward_block_device {
    ($field:tt: $($method:ident),+ $(,)?) => {
        $( $crate::forward_block_device!(@one $field $method); )+
    };
    (@one $f:tt len) => {
        fn len(&self) -> u64 { self.$f.len() }
    };
    (@one $f:tt read_at) => {
        fn read_at(&self, buf: &mut [u8], offset: u64) -> $crate::Result<()> { self.$f.read_at(buf, offset) }
    };
    (@one $f:tt write_at) => {
        fn write_at(&self, buf: &[u8], offset: u64) -> $crate::Result<()> { self.$f.write_at(buf, offset) }
    };
    (@one $f:tt write_zeroes) => {
        fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> $crate::Result<()> {
            self.$f.write_zeroes(offset, len, may_unmap)
        }
    };
    (@one $f:tt discard) => {
        fn discard(&self, offset: u64, len: u64) -> $crate::Result<()> { self.$f.discard(offset, len) }
    };
    (@one $f:tt flush) => {
        fn flush(&self) -> $crate::Result<()> { self.$f.flush() }
    };
    (@one $f:tt block_status) => {
        fn block_status(&self, offset: u64, len: u64) -> $crate::Result<$crate::BlockStatus> {
            self.$f.block_status(offset, len)
        }
    };
    (@one $f:tt backing) => {
        fn backing(&self) -> Option<&dyn $crate::BlockDevice> { self.$f.backing() }
    };
    (@one $f:tt format_name) => {
        fn format_name(&self) -> &'static str { self.$f.format_name() }
    };
    (@one $f:tt is_read_only) => {
        fn is_read_only(&self) -> bool { self.$f.is_read_only() }
    };
    (@one $f:tt resize) => {
        fn resize(&self, new_len: u64) -> $crate::Result<()> { self.$f.resize(new_len) }
    };
    (@one $f:tt close) => {
        fn close(&self) -> $crate::Result<()> { self.$f.close() }
    };
    (@one $f:tt dirty_bitmap_extents) => {
        fn dirty_bitmap_extents(
            &self,
            name: &str,
            offset: u64,
            len: u64,
        ) -> Option<$crate::Result<Vec<(u64, u64, bool)>>> {
            self.$f.dirty_bitmap_extents(name, offset, len)
        }
    };
}

/// A shared device is a device (what [`Image::device`](crate::Image::device)
/// hands out can go wherever a `&dyn BlockDevice` is wanted).
impl<D: BlockDevice + ?Sized> BlockDevice for std::sync::Arc<D> {
    fn len(&self) -> u64 {
        (**self).len()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        (**self).read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        (**self).write_at(buf, offset)
    }
    fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> Result<()> {
        (**self).write_zeroes(offset, len, may_unmap)
    }
    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        (**self).discard(offset, len)
    }
    fn flush(&self) -> Result<()> {
        (**self).flush()
    }
    fn block_status(&self, offset: u64, len: u64) -> Result<BlockStatus> {
        (**self).block_status(offset, len)
    }
    fn backing(&self) -> Option<&dyn BlockDevice> {
        (**self).backing()
    }
    fn format_name(&self) -> &'static str {
        (**self).format_name()
    }
    fn is_read_only(&self) -> bool {
        (**self).is_read_only()
    }
    fn resize(&self, new_len: u64) -> Result<()> {
        (**self).resize(new_len)
    }
    fn close(&self) -> Result<()> {
        (**self).close()
    }
    fn dirty_bitmap_extents(&self, name: &str, offset: u64, len: u64) -> Option<Result<Vec<(u64, u64, bool)>>> {
        (**self).dirty_bitmap_extents(name, offset, len)
    }
}

/// Status of the extent at `offset` through the whole backing chain, the way
/// `qemu-img map` reports it: the first layer that decides the content gives
/// the status and its `depth`; a range nobody allocates reports the depth of
/// the bottom layer and `allocated == false`.
pub fn chain_status(dev: &dyn BlockDevice, offset: u64, len: u64) -> Result<BlockStatus> {
    let mut layer = dev;
    let mut depth = 0u32;
    let mut len = len;
    loop {
        let mut st = layer.block_status(offset, len)?;
        st.depth = depth;
        if st.allocated {
            return Ok(st);
        }
        len = st.length;
        match layer.backing() {
            Some(b) if offset < b.len() => {
                layer = b;
                len = len.min(b.len() - offset);
                depth += 1;
            }
            // Past the end of a shorter backing image: zeros, reported at
            // the last layer that covers the offset, as qemu-img map does.
            Some(_) => return Ok(st),
            None => return Ok(st),
        }
    }
}

/// Reads through to a backing device, zero-filling past its end.
pub fn read_backing(backing: Option<&dyn BlockDevice>, buf: &mut [u8], offset: u64) -> Result<()> {
    match backing {
        Some(b) if offset < b.len() => {
            let n = (b.len() - offset).min(buf.len() as u64) as usize;
            b.read_at(&mut buf[..n], offset)?;
            buf[n..].fill(0);
            Ok(())
        }
        _ => {
            buf.fill(0);
            Ok(())
        }
    }
}

/// Checks that `[offset, offset + len)` lies within a device of `size` bytes.
pub fn check_range(offset: u64, len: u64, size: u64) -> Result<()> {
    match offset.checked_add(len) {
        Some(end) if end <= size => Ok(()),
        _ => Err(crate::Error::invalid(format!(
            "request at offset {offset} of {len} bytes is past the end of the device ({size} bytes)"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A device with one dirty bitmap, `b`, dirty everywhere.
    struct Bitmapped;
    impl BlockDevice for Bitmapped {
        fn len(&self) -> u64 {
            4096
        }
        fn read_at(&self, buf: &mut [u8], _offset: u64) -> Result<()> {
            buf.fill(7);
            Ok(())
        }
        fn write_at(&self, _buf: &[u8], _offset: u64) -> Result<()> {
            Ok(())
        }
        fn write_zeroes(&self, _offset: u64, _len: u64, _may_unmap: bool) -> Result<()> {
            Ok(())
        }
        fn discard(&self, _offset: u64, _len: u64) -> Result<()> {
            Ok(())
        }
        fn flush(&self) -> Result<()> {
            Ok(())
        }
        fn block_status(&self, offset: u64, len: u64) -> Result<BlockStatus> {
            Ok(BlockStatus {
                offset,
                length: len,
                allocated: true,
                zero: false,
                data: true,
                compressed: false,
                host_offset: None,
                depth: 0,
            })
        }
        fn format_name(&self) -> &'static str {
            "bitmapped"
        }
        fn is_read_only(&self) -> bool {
            false
        }
        fn dirty_bitmap_extents(&self, name: &str, offset: u64, len: u64) -> Option<Result<Vec<(u64, u64, bool)>>> {
            (name == "b").then(|| Ok(vec![(offset, len, true)]))
        }
    }

    /// Forwards everything but the name.
    struct Renamed(Bitmapped);
    impl BlockDevice for Renamed {
        crate::forward_block_device!(0: len, read_at, write_at, write_zeroes, discard, flush, block_status,
            backing, is_read_only, resize, close, dirty_bitmap_extents);
        fn format_name(&self) -> &'static str {
            "renamed"
        }
    }

    #[test]
    fn a_forwarding_filter_keeps_the_wrapped_devices_dirty_bitmaps() {
        let r = Renamed(Bitmapped);
        assert_eq!(r.format_name(), "renamed");
        assert_eq!(r.len(), 4096);
        let mut buf = [0u8; 8];
        r.read_at(&mut buf, 0).unwrap();
        assert_eq!(buf, [7; 8]);
        assert_eq!(r.dirty_bitmap_extents("b", 512, 1024).unwrap().unwrap(), [(512, 1024, true)]);
        assert!(r.dirty_bitmap_extents("c", 0, 1).is_none());
    }
}
