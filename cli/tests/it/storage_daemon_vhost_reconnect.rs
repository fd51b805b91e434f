//! A running guest keeps its vhost-user-blk disk across a daemon crash:
//! QEMU's front end (`-chardev socket,...,reconnect-ms=`) reconnects to the
//! daemon restarted on the same socket and image, the requests that were in
//! flight when the daemon died are carried out by the new one, and the
//! guest, which never noticed, finishes its work and reads every file back.

use super::storage_daemon_cli::{quit, Daemon};
use super::storage_daemon_guest::{accel, guest};
use crate::support::{ok, run_in, tmp, OXCOW};
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

/// Files written one at a time, each followed by `sync`; then the page
/// cache is dropped by a remount and every file is compared with the sum
/// taken when it was written.
const FILES: u32 = 60;

fn write_sync_loop_then_read_back() -> String {
    format!(
        r#"
if ! mke2fs -q /dev/vda || ! mount -t ext4 /dev/vda /mnt; then echo "GUEST-FAIL mkfs"; poweroff -f; fi
i=0
while [ $i -lt {FILES} ]; do
    dd if=/dev/urandom of=/mnt/f$i bs=4k count=$((i % 16 + 1)) 2>/dev/null
    md5sum /mnt/f$i >> /tmp/sums
    sync
    echo "GUEST-SYNCED f$i"
    i=$((i + 1))
done
echo GUEST-ALL-WRITTEN
umount /mnt
if ! mount -t ext4 /dev/vda /mnt; then echo "GUEST-FAIL remount"; poweroff -f; fi
if md5sum -c -s /tmp/sums; then echo GUEST-READBACK-OK; else echo GUEST-READBACK-DIFFERS; fi
umount /mnt
poweroff -f
"#
    )
}

#[test]
fn guest_survives_sigkill_and_restart_of_vhost_user_blk_daemon_under_running_vm() {
    let Some(script) = guest() else { return };
    let t = tmp();
    let dir = t.path();
    ok(dir, "qemu-img", &["create", "-q", "-f", "qcow2", "-o", "lazy_refcounts=on", "disk.qcow2", "64M"]);
    let sock = dir.join("vhost.sock").display().to_string();
    let args: Vec<String> = [
        "--blockdev",
        "driver=file,node-name=f,filename=disk.qcow2",
        "--blockdev",
        "driver=qcow2,node-name=q,file=f",
        "--export",
        &format!("type=vhost-user-blk,id=e,node-name=q,addr.type=unix,addr.path={sock},writable=on"),
    ]
    .map(String::from)
    .to_vec();
    let d = Daemon::start(dir, &[OXCOW, "storage-daemon"], &args);

    std::fs::write(dir.join("init.sh"), write_sync_loop_then_read_back()).expect("write init");
    ok(dir, "bash", &[&script.display().to_string(), "initrd", "init.sh", "initrd.gz"]);
    let mut vm = Command::new("bash")
        .arg(&script)
        .args(["boot", "initrd.gz", "-chardev"])
        .arg(format!("socket,id=c0,path={sock},reconnect-ms=100"))
        .args(["-device", "vhost-user-blk-pci,chardev=c0"])
        .current_dir(dir)
        .env("GUEST_ACCEL", accel())
        .env("GUEST_TIMEOUT", "300")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run guest.sh boot");
    let stderr = vm.stderr.take().expect("guest stderr");
    let errors = std::thread::spawn(move || std::io::read_to_string(stderr).unwrap_or_default());
    let mut lines = BufReader::new(vm.stdout.take().expect("guest console")).lines();
    let mut console = String::new();
    let mut synced = 0;
    // Killed while the guest is busy writing and syncing.
    while synced < 8 {
        let Some(Ok(line)) = lines.next() else { break };
        synced += usize::from(line.starts_with("GUEST-SYNCED"));
        console.push_str(&line);
        console.push('\n');
    }
    assert_eq!(synced, 8, "the guest did not get going:\n{console}");
    run_in(dir, "kill", &["-KILL", &d.pid().to_string()]);
    d.wait_exit();
    // The crash left refcount updates unwritten: the restart repairs.
    let info = ok(dir, "qemu-img", &["info", "-U", "--output=json", "disk.qcow2"]).stdout;
    assert!(info.contains("\"dirty-flag\": true"), "image not dirty after the kill:\n{info}");
    let d = Daemon::start(dir, &[OXCOW, "storage-daemon"], &args);
    for line in lines.map_while(Result::ok) {
        synced += usize::from(line.starts_with("GUEST-SYNCED"));
        console.push_str(&line);
        console.push('\n');
    }
    let status = vm.wait().expect("wait for the guest");
    let errors = errors.join().unwrap_or_default();
    quit(dir, &d);
    assert!(console.contains("GUEST-ALL-WRITTEN"), "the guest did not finish ({status}):\n{console}\n{errors}");
    assert_eq!(synced, FILES as usize, "{console}");
    assert!(console.contains("GUEST-READBACK-OK"), "files differ after the remount:\n{console}\n{errors}");
    ok(dir, "qemu-img", &["check", "disk.qcow2"]);
}
