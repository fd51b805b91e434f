#!/usr/bin/env bash
# Copy of the team's shared/vm/guest.sh (kept here so that a clean clone's CI
# can set up and boot the test guest without anything beside the checkout).
# guest.sh - boot a small Linux guest under QEMU whose disk is served by a
# program under test (an NBD export, a vhost-user-blk socket, a file), so a
# real kernel's virtio-blk driver and a real filesystem drive the image.
#
#   guest.sh setup                 install qemu-system-x86 (same version as the
#                                  installed qemu-utils), busybox-static, cpio;
#                                  fetch Debian's kernel package; once per machine
#   guest.sh initrd SCRIPT OUT.gz  initramfs: busybox + virtio/ext4 modules;
#                                  SCRIPT (sh) runs as init after they load, with
#                                  /proc /sys /dev /tmp mounted; it should print
#                                  lines and end with `poweroff -f`
#   guest.sh boot INITRD.gz [QEMU DISK ARGS...]
#                                  boot (TCG; KVM where GUEST_ACCEL=kvm), 512 MiB,
#                                  console on stdout; exits with QEMU's status.
#                                  GUEST_TIMEOUT (default 240 s), GUEST_MEM (512).
#
# Disk arguments, for example:
#   NBD:         -drive file=nbd+unix:///?socket=S,format=raw,if=virtio,cache=none
#   vhost-user:  -chardev socket,id=c0,path=S -device vhost-user-blk-pci,chardev=c0
#                (guest memory is shared automatically for vhost-user)
# Everything lives under $GUEST_DIR (default /tmp/oxcow-guest).
set -euo pipefail
DIR=${GUEST_DIR:-/tmp/oxcow-guest}
MODS="virtio virtio_ring virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci virtio_blk crc16 mbcache jbd2 crc32c_generic ext4"

setup() {
    mkdir -p "$DIR"
    local want; want=$(dpkg-query -W -f='${Version}' qemu-utils 2>/dev/null || true)
    if ! command -v qemu-system-x86_64 >/dev/null || [ "$(dpkg-query -W -f='${Version}' qemu-system-x86 2>/dev/null)" != "$want" ]; then
        # qemu-system-x86 must match qemu-utils' version, or apt removes qemu-utils.
        if [ -n "$want" ] && ! apt-cache policy qemu-system-x86 | grep -qF "$want"; then
            local uri suite
            uri=$(grep -hoE '^URIs: *[^ ]+/debian$' /etc/apt/sources.list.d/*.sources 2>/dev/null | head -n1 | awk '{print $2}')
            [ -n "$uri" ] || uri=$(grep -hoE '^deb +(\[[^]]*\] +)?[^ ]+/debian ' /etc/apt/sources.list 2>/dev/null | head -n1 | awk '{print $NF}')
            suite="$(. /etc/os-release; echo "$VERSION_CODENAME")-backports"
            echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $uri $suite main" > /etc/apt/sources.list.d/guest-backports.list
            apt-get update -qq
        fi
        apt-get install -y -qq --no-install-recommends "qemu-system-x86=$want" "qemu-utils=$want" >/dev/null
    fi
    command -v busybox >/dev/null && command -v cpio >/dev/null || apt-get install -y -qq busybox-static cpio >/dev/null
    if [ ! -f "$DIR/vmlinuz" ]; then
        local pkg
        pkg=$(apt-cache depends linux-image-amd64 | awk '/Depends: linux-image-[0-9]/{print $2}' | head -n1)
        (cd "$DIR" && rm -f linux-image-*.deb && apt-get download "$pkg" >/dev/null && rm -rf kroot && dpkg-deb -x linux-image-*.deb kroot)
        cp "$DIR"/kroot/boot/vmlinuz-* "$DIR/vmlinuz"
        mkdir -p "$DIR/modules"
        for m in $MODS; do
            find "$DIR/kroot/lib/modules" -name "$m.ko*" -exec cp {} "$DIR/modules/" \;
        done
        rm -rf "$DIR/kroot" "$DIR"/linux-image-*.deb
    fi
    echo "guest ready in $DIR: $(ls "$DIR/modules" | wc -l) modules, qemu-system $(qemu-system-x86_64 --version | head -n1 | awk '{print $4}')"
}

initrd() {
    local script=$1 out=$2 t
    t=$(mktemp -d)
    mkdir -p "$t"/{bin,dev,proc,sys,mnt,tmp,lib/modules}
    cp "$(command -v busybox)" "$t/bin/busybox"
    cp "$DIR"/modules/* "$t/lib/modules/"
    {
        echo '#!/bin/busybox sh'
        echo '/bin/busybox --install -s /bin'
        echo 'mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev'
        # Two passes: a module whose dependency loads later in the list loads on the second.
        echo "for pass in 1 2; do for m in $MODS; do f=\$(ls /lib/modules/\$m.ko* 2>/dev/null | head -n1); [ -n \"\$f\" ] && insmod \"\$f\" 2>/dev/null; done; done"
        echo 'i=0; while [ ! -b /dev/vda ] && [ $i -lt 50 ]; do sleep 0.1; i=$((i+1)); done'
        cat "$script"
    } > "$t/init"
    chmod +x "$t/init"
    (cd "$t" && find . | cpio -o -H newc 2>/dev/null | gzip -1) > "$out"
    rm -rf "$t"
}

boot() {
    local rd=$1; shift
    local accel=${GUEST_ACCEL:-tcg} mem=${GUEST_MEM:-512}
    local memargs=()
    case " $* " in *vhost-user*) memargs=(-object "memory-backend-memfd,id=mem,size=${mem}M,share=on" -numa node,memdev=mem);; esac
    timeout "${GUEST_TIMEOUT:-240}" qemu-system-x86_64 -accel "$accel" -m "$mem" "${memargs[@]}" \
        -nographic -no-reboot -nodefaults -serial stdio \
        -kernel "$DIR/vmlinuz" -initrd "$rd" -append "console=ttyS0 panic=-1 quiet" "$@"
}

case "${1:-}" in
    setup) setup ;;
    initrd) shift; initrd "$@" ;;
    boot) shift; boot "$@" ;;
    *) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 2 ;;
esac
