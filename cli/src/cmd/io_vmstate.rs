//! qemu-io's `-b` on `read` and `write`: requests to the VM state area
//! (see the library's `qcow2/vmstate.rs`) instead of the disk.
//!
//! The area lies past the disk's end, so these requests skip the disk's
//! range check; only qcow2 has one (QEMU answers ENOTSUP for the rest).

use oxcow::{Error, Image, Result};

fn qcow2(img: &Image) -> Result<&oxcow::qcow2::Qcow2> {
    img.qcow2().map(|q| &**q).ok_or_else(|| Error::unsupported("VM state on formats other than qcow2"))
}

/// Writes `buf` at `pos` of the image's VM state area.
pub fn write(img: &Image, buf: &[u8], pos: u64) -> Result<()> {
    qcow2(img)?.write_vm_state(buf, pos)
}

/// Reads `buf.len()` bytes at `pos` of the image's VM state area.
pub fn read(img: &Image, buf: &mut [u8], pos: u64) -> Result<()> {
    qcow2(img)?.read_vm_state(buf, pos)
}
