#!/bin/sh
# /sbin/cloudlet-init: PID 1 of a cloudlet tiny image (busybox sh).
# Mounts, network, services from /etc/cloudlet/services.d, the guest agent, then prints the
# ready marker on the console and reaps children forever. SIGUSR1/SIGUSR2 (busybox halt and
# poweroff, also sent by acpid on an ACPI power-button press) power off; SIGTERM (busybox
# reboot) reboots. PID 1 must never exit: the kernel would panic.
export PATH=/sbin:/bin:/usr/sbin:/usr/bin
umask 022
cd /

[ -e /proc/self ] || mount -t proc proc /proc
mounted() { grep -q "^[^ ]* $1 " /proc/mounts; }
mounted /sys || mount -t sysfs sysfs /sys
mounted /dev || mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
mount -t tmpfs -o mode=0755,nosuid,nodev tmpfs /run
mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs /tmp
mkdir -p /run/cloudlet /var/log /var/lib/cloudlet

command exec </dev/null >/dev/console 2>&1

shutdown() {
    echo "cloudlet-init: $1"
    kill -TERM -1 2>/dev/null
    usleep 500000
    kill -KILL -1 2>/dev/null
    sync
    umount -a -r 2>/dev/null
    mount -o remount,ro / 2>/dev/null
    sync
    "$1" -f
}
trap 'shutdown poweroff' USR1 USR2
trap 'shutdown reboot' TERM

hostname -F /etc/hostname 2>/dev/null || hostname cloudlet

# QEMU user-mode networking: fixed addresses, no DHCP round trip.
ip link set lo up
ip link set eth0 up 2>/dev/null &&
    ip addr add 10.0.2.15/24 dev eth0 &&
    ip route add default via 10.0.2.2

# acpid turns the ACPI power button (QMP system_powerdown) into /etc/acpi/PWRF/00000080.
acpid -c /etc/acpi -l /var/log/acpid.log 2>/dev/null

for svc in /etc/cloudlet/services.d/*.sh; do
    [ -f "$svc" ] || continue
    name=${svc##*/}
    name=${name%.sh}
    sh "$svc" >"/var/log/$name.log" 2>&1 &
done

/usr/lib/cloudlet/agent.sh >/var/log/agent.log 2>&1 &

# Ready means the image's TCP ports (/etc/cloudlet/ports) accept connections: wait up to 5 s.
listening() {
    p=$(printf '%04X' "$1")
    grep -q "^ *[0-9]*: [0-9A-F]*:$p [0-9A-F]*:0000 0A " /proc/net/tcp /proc/net/tcp6 2>/dev/null
}
for port in $(cat /etc/cloudlet/ports 2>/dev/null); do
    i=0
    until listening "$port"; do
        i=$((i + 1))
        [ "$i" -gt 250 ] && { echo "cloudlet-init: port $port is not listening"; break; }
        usleep 20000
    done
done

echo CLOUDLET-READY

# Reap every child, including orphans re-parented to us; traps run when wait is interrupted.
while :; do
    sleep 3600 &
    wait $!
done
