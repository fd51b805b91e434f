//! qemu-io's `detect-zeroes` open option, against QEMU's qemu-io: zero
//! buffers become zero writes (unmapping only with discard=unmap too).

use crate::dropin::{bare_sides, same_on, Cmp};
use crate::support::ok;

#[test]
fn detect_zeroes_turns_zero_writes_into_zero_clusters_as_qemu_io() {
    let (ours, theirs) = bare_sides();
    for d in [ours.dir.path(), theirs.dir.path()] {
        ok(d, "qemu-img", &["create", "-q", "-f", "qcow2", "x.qcow2", "1M"]);
        ok(d, "qemu-io", &["-f", "qcow2", "-c", "write -P 1 0 256k", "x.qcow2"]);
    }
    for opts in [
        "driver=qcow2,file.filename=x.qcow2,discard=unmap,detect-zeroes=unmap",
        "driver=qcow2,file.filename=x.qcow2,detect-zeroes=unmap",
        "driver=qcow2,file.filename=x.qcow2,detect-zeroes=on",
        "driver=qcow2,file.filename=x.qcow2,detect-zeroes=off",
        "driver=qcow2,file.filename=x.qcow2,detect-zeroes=bad",
    ] {
        let args = [
            "--image-opts",
            "-c",
            "write -P 0 0 64k",
            "-c",
            "write -P 0 128k 64k",
            "-c",
            "write -r -P 0 192k 4k",
            opts,
        ];
        same_on(&ours, &theirs, "qemu-io", &args, None, Cmp::All);
        same_on(&ours, &theirs, "qemu-img", &["map", "--output=json", "x.qcow2"], None, Cmp::All);
    }
}
