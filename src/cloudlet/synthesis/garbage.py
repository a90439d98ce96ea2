"""Before a capture: have the guest clear what it no longer uses, so the overlay can leave it out.

A customization leaves garbage behind: blocks of deleted files still hold their bytes in the
VM's qcow2 top layer, and the pages those files (and exited processes) used still hold theirs in
guest RAM. None of it is state the VM needs, but to the delta engine it looks like changed data.
CMU Elijah closed this "semantic gap" with a patched QEMU and guest introspection; we ask the
guest itself, over the agent, using what any Linux guest has:

- ``fstrim`` on each mounted disk filesystem. The drive runs with ``discard=unmap``, so QEMU turns
  each trimmed cluster of the top layer into a v3 "reads as zeros" cluster (it never touches the
  read-only base). The delta engine records those as zero runs: a few bytes each.
- One short-lived process reads ``/dev/zero`` into a buffer as large as the guest's free memory
  minus a reserve, then exits. The kernel hands it nearly every free page and it overwrites them
  with zeros; freed again, they stay zero, which the delta engine drops or records as zero pages.
  Live data is not touched: page cache and process memory stay (the kernel's free-memory
  reserve is lowered meanwhile, so it does not reclaim cache to satisfy the buffer).

Both steps change only what the guest had already let go of: the filesystem's free blocks and
the allocator's free pages. They run while the VM runs, just before it is paused.
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import asdict, dataclass

from cloudlet.hypervisor.errors import VMError
from cloudlet.hypervisor.vm import VMManager

log = logging.getLogger(__name__)

# POSIX sh for busybox ash and Debian's dash alike; every number it prints is a line "key value".
# The kernel keeps min_free_kbytes free (Debian's kernel raises it to ~45 MiB in a 1 GiB guest
# for transparent huge pages): lowered to 1 MiB for the second or so the zeroing process lives,
# so that its buffer can take those pages too without the kernel reclaiming page cache for it,
# then restored. Should the guest's own processes need memory meanwhile, the OOM killer picks
# the zeroing process first.
_SCRIPT = r"""
sync
for m in $(awk '$3 ~ /^(ext[234]|xfs|btrfs|vfat|f2fs)$/ {print $2}' /proc/mounts); do
  if fstrim "$m" 2>/dev/null; then echo "trimmed $m"; else echo "untrimmed $m"; fi
done
min_kb=$(cat /proc/sys/vm/min_free_kbytes)
low_kb=1024
[ "$min_kb" -gt "$low_kb" ] && echo "$low_kb" > /proc/sys/vm/min_free_kbytes || low_kb=$min_kb
free_kb=$(awk '/^MemFree:/ {print $2}' /proc/meminfo)
want_kb=$((free_kb - 3 * low_kb - 8192))
echo "free_kb $free_kb"
if [ "$want_kb" -gt 0 ]; then
  (echo 1000 > /proc/self/oom_score_adj
   exec dd if=/dev/zero of=/dev/null bs=$((want_kb * 1024)) count=1 iflag=fullblock 2>/dev/null) \
    && echo "zeroed_kb $want_kb" || echo "zero_failed $want_kb"
fi
[ "$low_kb" != "$min_kb" ] && echo "$min_kb" > /proc/sys/vm/min_free_kbytes
echo "min_free_kb $min_kb"
echo "min_free_kb_after $(cat /proc/sys/vm/min_free_kbytes)"
"""


class GarbageError(VMError):
    """The guest could not clear its free blocks and pages (the commands failed)."""


@dataclass
class Cleared:
    """What the guest cleared before a capture (reported with the overlay's statistics)."""

    trimmed: list[str]  # mount points trimmed
    untrimmed: list[str]  # disk filesystems the guest could not trim (the drive, or the fs)
    zeroed_bytes: int  # free guest memory overwritten with zeros
    free_bytes: int  # guest MemFree before
    seconds: float

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


async def clear_garbage(mgr: VMManager, vm_id: str, *, timeout: float = 120.0) -> Cleared:
    """Trim the guest's filesystems and zero its free memory (see the module docstring)."""
    t = time.monotonic()
    res = await mgr.exec(vm_id, _SCRIPT, timeout=timeout)
    out = res.stdout.decode(errors="replace")
    if res.exit_code != 0 and "free_kb" not in out:
        err = res.stderr.decode(errors="replace").strip()
        raise GarbageError(
            f"the guest could not clear its free blocks and pages (exit {res.exit_code}): {err}",
            hint="capture without it: `cloudlet overlay create VM -o FILE --keep-garbage`",
        )
    vals: dict[str, int] = {}
    trimmed: list[str] = []
    untrimmed: list[str] = []
    for line in out.splitlines():
        key, _, rest = line.partition(" ")
        if key == "trimmed":
            trimmed.append(rest)
        elif key == "untrimmed":
            untrimmed.append(rest)
        elif re.fullmatch(r"-?\d+", rest.strip()):
            vals[key] = int(rest)
    if "zero_failed" in vals:  # killed, or could not allocate: the capture is merely larger
        log.warning("VM %s: the guest could not zero its free memory", vm_id)
    if vals.get("min_free_kb") != vals.get("min_free_kb_after"):
        log.warning(
            "VM %s: the guest's vm.min_free_kbytes is %s, was %s (not restored)",
            vm_id,
            vals.get("min_free_kb_after"),
            vals.get("min_free_kb"),
        )
    return Cleared(
        trimmed=trimmed,
        untrimmed=untrimmed,
        zeroed_bytes=vals.get("zeroed_kb", 0) * 1024,
        free_bytes=vals.get("free_kb", 0) * 1024,
        seconds=round(time.monotonic() - t, 3),
    )
