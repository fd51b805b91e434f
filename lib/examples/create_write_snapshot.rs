//! Creates a qcow2 image, writes to it, takes an internal snapshot, writes
//! again, and goes back to the snapshot: the life of a disk image through
//! the library alone.
//!
//! ```text
//! cargo run -p oxcow --example create_write_snapshot [IMAGE]
//! ```
//!
//! Without IMAGE the image lives in a temporary directory that is removed
//! at the end. `qemu-img info IMAGE` shows the snapshot afterwards.

use oxcow::qcow2::{self, CreateOptions};
use oxcow::{BlockDevice, OpenOptions};
use std::error::Error;
use std::path::PathBuf;

fn main() -> Result<(), Box<dyn Error>> {
    let dir = tempfile::tempdir()?;
    let path = std::env::args_os().nth(1).map(PathBuf::from).unwrap_or_else(|| dir.path().join("disk.qcow2"));

    // A 64 MiB image with 64 KiB clusters and QEMU's other defaults. The
    // file is held (locked) only until `create` is done with it.
    let file = oxcow::create_file(&path)?;
    qcow2::create(file, None, &CreateOptions::new(64 << 20).cluster_size(64 << 10))?;

    let image = oxcow::open(&path, &OpenOptions::read_write())?;
    let disk = image.device();
    let q = image.qcow2().ok_or("not a qcow2 image")?;

    disk.write_at(&[0xaa; 4096], 1 << 20)?;
    let snap = q.snapshot_create("first")?;
    println!("snapshot '{}' (id {}) taken", snap.name, snap.id);

    disk.write_at(&[0xbb; 4096], 1 << 20)?;
    let mut now = [0u8; 4096];
    disk.read_at(&mut now, 1 << 20)?;

    // The snapshot can be read without applying it ...
    let mut then = [0u8; 4096];
    q.snapshot_device("first")?.read_at(&mut then, 1 << 20)?;
    println!("now {:#04x}, in the snapshot {:#04x}", now[0], then[0]);

    // ... or applied, which makes the disk read as it did then.
    q.snapshot_apply("first")?;
    disk.read_at(&mut now, 1 << 20)?;
    assert_eq!(now, then);
    println!("after applying the snapshot: {:#04x}", now[0]);

    for s in q.snapshot_list() {
        println!("{:>4} {:<10} vm-state {} bytes", s.id, s.name, s.vm_state_size);
    }
    // A clean close writes what a crash-free shutdown leaves on disk.
    image.close()?;
    Ok(())
}
