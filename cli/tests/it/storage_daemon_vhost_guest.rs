//! A real Linux guest (booted through `guest.sh`) whose disk is a
//! vhost-user-blk export of `oxcow storage-daemon`: the guest's virtio-blk
//! driver talks to the daemon through shared memory, no QEMU block layer
//! in between. A filesystem is made, written, synced, remounted, read back
//! and trimmed; the image is checked on the host. And the crash case: the
//! daemon is SIGKILLed while the guest writes and syncs, restarted on the
//! image, and every file the guest saw synced reads back.

use super::storage_daemon_cli::{quit, Daemon};
use super::storage_daemon_guest::{accel, assert_synced_and_read_back, boot, guest, WRITE_REMOUNT_READ_TRIM};
use crate::support::{ok, run_in, tmp, OXCOW};
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

/// The QEMU arguments of a vhost-user-blk disk on `sock` (guest.sh shares
/// the guest memory, which vhost-user needs).
fn vhost_disk(sock: &str, queues: u16) -> Vec<String> {
    let mut a: Vec<String> = vec![
        "-chardev".into(),
        format!("socket,id=c0,path={sock}"),
        "-device".into(),
        format!("vhost-user-blk-pci,chardev=c0,num-queues={queues}"),
    ];
    // The guest's driver uses no more queues than it has CPUs.
    if queues > 1 {
        a.extend(["-smp".into(), queues.to_string()]);
    }
    a
}

fn daemon_args(blockdevs: &[&str], export: &str) -> Vec<String> {
    let mut a = Vec::new();
    for b in blockdevs {
        a.extend(["--blockdev".to_string(), b.to_string()]);
    }
    a.extend(["--export".to_string(), export.to_string()]);
    a
}

/// Prints the number of queues the guest's driver set up, then the
/// shared write / remount / read back / trim script.
fn queues_then(script: &str) -> String {
    format!("echo \"GUEST-QUEUES $(ls /sys/block/vda/mq | wc -l)\"\n{script}")
}

#[test]
fn guest_fs_on_vhost_user_blk_export_of_qcow2_with_backing_on_two_queues_reads_back_trims_and_image_is_clean() {
    let Some(script) = guest() else { return };
    let t = tmp();
    let dir = t.path();
    ok(dir, "qemu-img", &["create", "-q", "-f", "qcow2", "base.qcow2", "64M"]);
    ok(dir, "qemu-io", &["-c", "write -P 0x6b 0 64M", "base.qcow2"]);
    ok(dir, "qemu-img", &["create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", "top.qcow2"]);
    let sock = dir.join("vhost.sock").display().to_string();
    let args = daemon_args(
        &[
            "driver=file,node-name=f,filename=top.qcow2",
            "driver=qcow2,node-name=q,file=f,discard=unmap,detect-zeroes=unmap",
        ],
        &format!("type=vhost-user-blk,id=e,node-name=q,addr.type=unix,addr.path={sock},writable=on,num-queues=2"),
    );
    let d = Daemon::start(dir, &[OXCOW, "storage-daemon"], &args);
    // Once the filesystem is done with: zeros written over the last 4 MiB
    // of the disk, which detect-zeroes turns into write-zeroes.
    let init = WRITE_REMOUNT_READ_TRIM.strip_suffix("poweroff -f\n").expect("script ends with poweroff");
    let init = format!(
        "{init}dd if=/dev/zero of=/dev/vda bs=64k seek=960 count=64 oflag=direct conv=fsync 2>/dev/null && echo GUEST-ZEROED\npoweroff -f\n"
    );
    let console = boot(&script, dir, &queues_then(&init), &vhost_disk(&sock, 2));
    quit(dir, &d);
    assert!(console.contains("GUEST-QUEUES 2"), "guest did not use both queues:\n{console}");
    assert_synced_and_read_back(&console);
    assert!(console.contains("GUEST-TRIMMED"), "guest could not trim:\n{console}");
    assert!(console.contains("GUEST-ZEROED"), "guest could not write zeros:\n{console}");
    ok(dir, "qemu-img", &["check", "top.qcow2"]);
    // The guest's writes went to the overlay only.
    ok(dir, "qemu-io", &["-c", "read -P 0x6b 0 64M", "base.qcow2"]);
    // The zeros hide the backing file without being stored as data.
    ok(dir, "qemu-io", &["-c", "read -P 0 60M 4M", "top.qcow2"]);
    let map = ok(dir, "qemu-img", &["map", "--output=json", "top.qcow2"]).stdout;
    let map: serde_json::Value = serde_json::from_str(&map).expect("map JSON");
    let tail = (60u64 << 20)..(64u64 << 20);
    for e in map.as_array().expect("map entries") {
        let (start, len) = (e["start"].as_u64().unwrap_or(0), e["length"].as_u64().unwrap_or(0));
        if start < tail.end && start + len > tail.start {
            assert_eq!((e["zero"].as_bool(), e["data"].as_bool()), (Some(true), Some(false)), "{e} in {map}");
        }
    }
}

/// Another format, and 4 KiB logical blocks (the filesystem's too).
#[test]
fn guest_fs_on_vhost_user_blk_export_of_qed_with_4k_blocks_reads_back_and_image_is_clean() {
    let Some(script) = guest() else { return };
    let t = tmp();
    let dir = t.path();
    ok(dir, "qemu-img", &["create", "-q", "-f", "qed", "disk.qed", "64M"]);
    let sock = dir.join("vhost.sock").display().to_string();
    let args = daemon_args(
        &["driver=file,node-name=f,filename=disk.qed", "driver=qed,node-name=d,file=f"],
        &format!(
            "type=vhost-user-blk,id=e,node-name=d,addr.type=unix,addr.path={sock},writable=on,logical-block-size=4096"
        ),
    );
    let d = Daemon::start(dir, &[OXCOW, "storage-daemon"], &args);
    let init = format!(
        "echo \"GUEST-BLOCK $(cat /sys/block/vda/queue/logical_block_size)\"\n{}",
        WRITE_REMOUNT_READ_TRIM.replace("mke2fs -q /dev/vda", "mke2fs -q -b 4096 /dev/vda")
    );
    let console = boot(&script, dir, &init, &vhost_disk(&sock, 1));
    quit(dir, &d);
    assert!(console.contains("GUEST-BLOCK 4096"), "guest did not see 4 KiB blocks:\n{console}");
    assert_synced_and_read_back(&console);
    ok(dir, "qemu-img", &["check", "disk.qed"]);
}

/// The guest writes files one at a time, each followed by `sync`, and
/// prints each one's name and checksum once `sync` returned.
const WRITE_SYNC_LOOP: &str = r#"
if ! mke2fs -q /dev/vda || ! mount -t ext4 /dev/vda /mnt; then echo "GUEST-FAIL mkfs"; poweroff -f; fi
i=0
while [ $i -lt 500 ]; do
    dd if=/dev/urandom of=/mnt/f$i bs=4k count=$((i % 16 + 1)) 2>/dev/null
    sync
    echo "GUEST-SYNCED f$i $(md5sum < /mnt/f$i | cut -d' ' -f1)"
    i=$((i + 1))
done
echo GUEST-ALL-WRITTEN
poweroff -f
"#;

/// Files the guest reported synced, with their checksums.
fn synced(line: &str) -> Option<(String, String)> {
    let mut w = line.trim().strip_prefix("GUEST-SYNCED ")?.split_whitespace();
    Some((w.next()?.to_string(), w.next()?.to_string()))
}

#[test]
fn guest_synced_files_survive_sigkill_of_vhost_user_blk_daemon_on_lazy_refcount_qcow2() {
    let Some(script) = guest() else { return };
    let t = tmp();
    let dir = t.path();
    ok(dir, "qemu-img", &["create", "-q", "-f", "qcow2", "-o", "lazy_refcounts=on", "disk.qcow2", "64M"]);
    let sock = dir.join("vhost.sock").display().to_string();
    let blockdevs = ["driver=file,node-name=f,filename=disk.qcow2", "driver=qcow2,node-name=q,file=f"];
    let args = daemon_args(
        &blockdevs,
        &format!("type=vhost-user-blk,id=e,node-name=q,addr.type=unix,addr.path={sock},writable=on"),
    );
    let d = Daemon::start(dir, &[OXCOW, "storage-daemon"], &args);

    std::fs::write(dir.join("init.sh"), WRITE_SYNC_LOOP).expect("write init");
    ok(dir, "bash", &[&script.display().to_string(), "initrd", "init.sh", "initrd.gz"]);
    let pidfile = dir.join("qemu.pid");
    let mut vm = Command::new("bash")
        .arg(&script)
        .args(["boot", "initrd.gz"])
        .args(vhost_disk(&sock, 1))
        .args(["-pidfile".to_string(), pidfile.display().to_string()])
        .current_dir(dir)
        .env("GUEST_ACCEL", accel())
        .env("GUEST_TIMEOUT", "300")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("run guest.sh boot");
    let mut lines = BufReader::new(vm.stdout.take().expect("guest console")).lines();
    let mut files = Vec::new();
    let mut console = String::new();
    // Killed mid-run: after a few files, while the guest goes on writing.
    while files.len() < 8 {
        let Some(Ok(line)) = lines.next() else { break };
        console.push_str(&line);
        console.push('\n');
        files.extend(synced(&line));
    }
    assert!(files.len() >= 8, "the guest did not get going:\n{console}");
    run_in(dir, "kill", &["-KILL", &d.pid().to_string()]);
    d.wait_exit();
    // With its disk gone the guest's I/O hangs: QEMU (ours, by its own
    // pid) is stopped too, after what it printed meanwhile is read.
    let qemu_pid = std::fs::read_to_string(&pidfile).expect("QEMU pid file").trim().to_string();
    run_in(dir, "kill", &["-KILL", &qemu_pid]);
    for line in lines.map_while(Result::ok) {
        files.extend(synced(&line));
        console.push_str(&line);
        console.push('\n');
    }
    let _ = vm.wait();
    assert!(!console.contains("GUEST-ALL-WRITTEN"), "the daemon was killed after the guest had finished");
    // Killed with refcount updates pending: the restart has to repair.
    let info = ok(dir, "qemu-img", &["info", "-U", "--output=json", "disk.qcow2"]).stdout;
    assert!(info.contains("\"dirty-flag\": true"), "image not dirty after the kill:\n{info}");

    // Restarted on the same image: the open repairs the lazy refcounts.
    let nbd = dir.join("nbd.sock").display().to_string();
    let mut args = daemon_args(&blockdevs, "type=nbd,id=e,node-name=q,name=disk");
    args.extend(["--nbd-server".to_string(), format!("addr.type=unix,addr.path={nbd}")]);
    let d = Daemon::start(dir, &[OXCOW, "storage-daemon"], &args);
    ok(dir, "qemu-img", &["convert", "-O", "raw", &format!("nbd+unix:///disk?socket={nbd}"), "disk.raw"]);
    quit(dir, &d);
    ok(dir, "qemu-img", &["check", "disk.qcow2"]);

    // Every synced file reads back, from the filesystem on the host.
    for (name, sum) in &files {
        let out = dir.join("out");
        let _ = std::fs::remove_file(&out);
        let dump = format!("dump /{name} {}", out.display());
        run_in(dir, "debugfs", &["-R", &dump, "disk.raw"]);
        let got = run_in(dir, "md5sum", &[&out.display().to_string()]);
        assert_eq!(
            got.stdout.split_whitespace().next(),
            Some(sum.as_str()),
            "synced file {name} does not read back ({} files synced):\n{}",
            files.len(),
            got.stderr
        );
    }
    std::fs::remove_file(dir.join("disk.raw")).ok();
}
