#!/bin/sh
# /etc/acpi/PWRF/00000080: busybox acpid runs this on an ACPI power-button press (QMP
# system_powerdown). busybox poweroff signals PID 1 (cloudlet-init) with SIGUSR2.
exec /sbin/poweroff
