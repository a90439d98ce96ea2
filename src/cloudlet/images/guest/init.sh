#!/bin/sh
# initramfs /init (PID 1 until switch_root): load the virtio drivers, mount the root disk,
# hand over to the real init. Any failure prints one clear line and powers off: never hang.
export PATH=/bin

fail() {
    echo "cloudlet-initramfs: FATAL: $*" >/dev/console
    sleep 1
    poweroff -f
}

mount -t proc proc /proc || fail "cannot mount /proc"
mount -t sysfs sysfs /sys || fail "cannot mount /sys"
mount -t devtmpfs devtmpfs /dev || fail "cannot mount /dev"

for m in $(cat /lib/modules/order); do
    insmod "/lib/modules/$m.ko" || fail "cannot load kernel module $m"
done

init=/sbin/cloudlet-init
for arg in $(cat /proc/cmdline); do
    case "$arg" in
        cloudlet.init=*) init="${arg#cloudlet.init=}" ;;
    esac
done

# virtio_blk probes asynchronously: wait up to 5 s for the disk node.
i=0
while [ ! -b /dev/vda ]; do
    i=$((i + 1))
    [ "$i" -gt 100 ] && fail "no root disk /dev/vda (is the disk attached with if=virtio?)"
    usleep 50000
done

mount -t ext4 -o rw,noatime /dev/vda /newroot || fail "cannot mount /dev/vda (ext4) on /newroot"
[ -x "/newroot$init" ] || fail "$init is missing or not executable on the root disk"

mount --move /proc /newroot/proc || fail "cannot move /proc"
mount --move /sys /newroot/sys || fail "cannot move /sys"
mount --move /dev /newroot/dev || fail "cannot move /dev"

exec switch_root /newroot "$init"
fail "switch_root to $init failed"
