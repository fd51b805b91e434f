//! A real Linux guest (booted through the shared `guest.sh`) on a disk
//! served by `oxcow storage-daemon`: a filesystem made, written, synced,
//! remounted and read back by the guest's kernel, then the image checked on
//! the host. Skips, saying why, where the guest is not set up (.ci/run sets
//! it up where it can).

use super::storage_daemon_cli::{quit, Daemon};
use super::storage_daemon_fuse::Unmount;
use crate::support::{ok, tmp, OXCOW};
use std::path::{Path, PathBuf};

/// The project's copy of `guest.sh` (or the shared one beside the
/// checkout), with its kernel set up and qemu-system present.
fn guest_script() -> Result<PathBuf, String> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let script = ["scripts/vm/guest.sh", "../shared/vm/guest.sh", "../../shared/vm/guest.sh"]
        .iter()
        .map(|p| root.join(p))
        .find(|p| p.is_file())
        .ok_or("no scripts/vm/guest.sh")?;
    let dir = std::env::var("GUEST_DIR").unwrap_or_else(|_| "/tmp/oxcow-guest".into());
    if !Path::new(&dir).join("vmlinuz").is_file() {
        return Err(format!("no guest kernel in {dir} (run guest.sh setup)"));
    }
    let q = std::process::Command::new("qemu-system-x86_64").arg("--version").output();
    if !q.is_ok_and(|o| o.status.success()) {
        return Err("no qemu-system-x86_64".into());
    }
    Ok(script)
}

/// The guest script, or None (the test then returns) after saying why
/// there is no guest; under CI, where .ci/run sets the guest up, its
/// absence fails the test instead.
pub fn guest() -> Option<PathBuf> {
    match guest_script() {
        Ok(s) => Some(s),
        Err(why) if std::env::var_os("CI").is_some() => panic!("no guest under CI: {why}"),
        Err(why) => {
            eprintln!("skipping the guest test: {why}");
            None
        }
    }
}

/// TCG unless GUEST_ACCEL says otherwise: an openable /dev/kvm is no
/// proof that KVM runs guests (nested, it may hang in the firmware).
pub fn accel() -> String {
    std::env::var("GUEST_ACCEL").unwrap_or_else(|_| "tcg".into())
}

/// The guest's init: busybox makes ext2 (mounted by the ext4 driver),
/// writes files of several sizes, records their sums, syncs, remounts (so
/// the reads come from the disk, not the page cache) and compares.
const WRITE_REMOUNT_READ: &str = r#"
if ! mke2fs -q /dev/vda || ! mount -t ext4 /dev/vda /mnt; then echo "GUEST-FAIL mkfs"; poweroff -f; fi
i=0
while [ $i -lt 60 ]; do dd if=/dev/urandom of=/mnt/f$i bs=4k count=$((i % 9 + 1)) 2>/dev/null; i=$((i + 1)); done
dd if=/dev/urandom of=/mnt/big bs=1M count=8 2>/dev/null
(cd /mnt && md5sum f* big) > /tmp/sums
sync
echo "GUEST-SYNCED $(wc -l < /tmp/sums)"
umount /mnt
if ! mount -t ext4 /dev/vda /mnt; then echo "GUEST-FAIL remount"; poweroff -f; fi
(cd /mnt && md5sum f* big) > /tmp/sums2
if cmp -s /tmp/sums /tmp/sums2; then echo GUEST-READBACK-OK; else echo GUEST-READBACK-DIFFERS; fi
umount /mnt
poweroff -f
"#;

/// The same, then the big file deleted and the free space trimmed
/// (discards reach the export).
pub const WRITE_REMOUNT_READ_TRIM: &str = r#"
if ! mke2fs -q /dev/vda || ! mount -t ext4 /dev/vda /mnt; then echo "GUEST-FAIL mkfs"; poweroff -f; fi
i=0
while [ $i -lt 60 ]; do dd if=/dev/urandom of=/mnt/f$i bs=4k count=$((i % 9 + 1)) 2>/dev/null; i=$((i + 1)); done
dd if=/dev/urandom of=/mnt/big bs=1M count=8 2>/dev/null
(cd /mnt && md5sum f* big) > /tmp/sums
sync
echo "GUEST-SYNCED $(wc -l < /tmp/sums)"
umount /mnt
if ! mount -t ext4 /dev/vda /mnt; then echo "GUEST-FAIL remount"; poweroff -f; fi
(cd /mnt && md5sum f* big) > /tmp/sums2
if cmp -s /tmp/sums /tmp/sums2; then echo GUEST-READBACK-OK; else echo GUEST-READBACK-DIFFERS; fi
rm /mnt/big
sync
if fstrim /mnt; then echo GUEST-TRIMMED; else echo GUEST-FAIL fstrim; fi
umount /mnt
poweroff -f
"#;

/// Boots the guest with `init` and the disk arguments; returns its console.
pub fn boot(script: &Path, dir: &Path, init: &str, disk: &[String]) -> String {
    std::fs::write(dir.join("init.sh"), init).expect("write init");
    ok(dir, "bash", &[&script.display().to_string(), "initrd", "init.sh", "initrd.gz"]);
    let out = std::process::Command::new("bash")
        .arg(script)
        .args(["boot", "initrd.gz"])
        .args(disk)
        .current_dir(dir)
        .env("GUEST_ACCEL", accel())
        .env("GUEST_TIMEOUT", "300")
        .output()
        .expect("run guest.sh boot");
    String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
}

#[test]
fn guest_fs_on_nbd_export_of_qcow2_with_backing_reads_back_and_image_is_clean() {
    let Some(script) = guest() else { return };
    let t = tmp();
    let dir = t.path();
    ok(dir, "qemu-img", &["create", "-q", "-f", "qcow2", "base.qcow2", "64M"]);
    ok(dir, "qemu-io", &["-c", "write -P 0x6b 0 64M", "base.qcow2"]);
    ok(dir, "qemu-img", &["create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", "top.qcow2"]);
    let sock = dir.join("nbd.sock").display().to_string();
    let args: Vec<String> = [
        "--blockdev",
        "driver=file,node-name=f,filename=top.qcow2",
        "--blockdev",
        "driver=qcow2,node-name=q,file=f",
        "--nbd-server",
        &format!("addr.type=unix,addr.path={sock}"),
        "--export",
        "type=nbd,id=e,node-name=q,name=disk,writable=on",
    ]
    .map(String::from)
    .to_vec();
    let d = Daemon::start(dir, &[OXCOW, "storage-daemon"], &args);
    let disk = ["-drive".to_string(), format!("file=nbd+unix:///disk?socket={sock},format=raw,if=virtio,cache=none")];
    let console = boot(&script, dir, WRITE_REMOUNT_READ, &disk);
    quit(dir, &d);
    assert_synced_and_read_back(&console);
    ok(dir, "qemu-img", &["check", "top.qcow2"]);
    // The guest's writes went to the overlay only.
    ok(dir, "qemu-io", &["-c", "read -P 0x6b 0 64M", "base.qcow2"]);
}

/// The FUSE export's file as a VM's raw disk, over another format than
/// qcow2: QEMU's file driver reads, writes, flushes and punches holes
/// (the guest's trim) on the mounted file.
#[test]
fn guest_fs_on_fuse_export_of_vmdk_reads_back_trims_and_image_is_clean() {
    let Some(script) = guest() else { return };
    let t = tmp();
    let dir = t.path();
    ok(dir, "qemu-img", &["create", "-q", "-f", "vmdk", "disk.vmdk", "64M"]);
    std::fs::write(dir.join("disk"), b"").expect("mount point");
    let mnt = dir.join("disk").display().to_string();
    let args: Vec<String> = [
        "--blockdev",
        "driver=file,node-name=f,filename=disk.vmdk",
        "--blockdev",
        "driver=vmdk,node-name=v,file=f",
        "--export",
        &format!("type=fuse,id=e,node-name=v,mountpoint={mnt},writable=on"),
    ]
    .map(String::from)
    .to_vec();
    let _unmount = Unmount(mnt.clone());
    let d = Daemon::start(dir, &[OXCOW, "storage-daemon"], &args);
    let disk = ["-drive".to_string(), format!("file={mnt},format=raw,if=virtio,discard=unmap")];
    let console = boot(&script, dir, WRITE_REMOUNT_READ_TRIM, &disk);
    quit(dir, &d);
    assert_synced_and_read_back(&console);
    assert!(console.contains("GUEST-TRIMMED"), "guest could not trim:\n{console}");
    ok(dir, "qemu-img", &["check", "disk.vmdk"]);
}

/// The guest script's report: every file written and synced, and read
/// back equal after the remount.
pub fn assert_synced_and_read_back(console: &str) {
    assert!(console.contains("GUEST-SYNCED 61"), "guest did not sync its files:\n{console}");
    assert!(console.contains("GUEST-READBACK-OK"), "guest read back something else:\n{console}");
}
