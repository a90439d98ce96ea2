"""Choosing the accelerator by a real probe.

On our machines ``/dev/kvm`` opens and QEMU reports KVM as enabled, yet ordinary guest kernels
hang right after decompression under it (the host is itself a nested, paravirtualised guest).
Asking QEMU is therefore not enough: we boot a real kernel under KVM and wait a few seconds for
it to reach the point where it looks for its root filesystem. If it does, KVM works; otherwise
TCG. The answer is cached per (QEMU version, host kernel, probe kernel) and
``CLOUDLET_ACCEL=kvm|tcg`` overrides it.
"""

from __future__ import annotations

import hashlib
import os
import platform
import re
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from cloudlet.config import Paths
from cloudlet.errors import InvalidInputError
from cloudlet.hypervisor.qemu import qemu_binary, qemu_version
from cloudlet.util.fs import atomic_write_json, read_json
from cloudlet.util.hashing import file_sha256

PROBE_TIMEOUT_S = 6.0
# Lines a kernel prints once it has come through early boot and driver initialisation.
_BOOTED = re.compile(rb"VFS: Unable to mount root|Kernel panic - not syncing|Run /init as init")


@dataclass(frozen=True)
class AccelChoice:
    accel: str  # "kvm" | "tcg"
    reason: str
    probed: bool  # a probe VM was actually booted
    seconds: float = 0.0

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def probe_kvm(kernel: Path, timeout: float = PROBE_TIMEOUT_S) -> AccelChoice:
    """Boot ``kernel`` (no disk, no initrd) under KVM; KVM works iff it reaches root mounting."""
    if not os.path.exists("/dev/kvm"):
        return AccelChoice("tcg", "/dev/kvm does not exist", probed=False)
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return AccelChoice("tcg", "/dev/kvm is not accessible to this user", probed=False)
    cmd = [
        qemu_binary(), "-accel", "kvm", "-cpu", "qemu64", "-m", "128", "-smp", "1",
        "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
        "-serial", "stdio", "-kernel", str(kernel), "-append", "console=ttyS0 panic=-1",
    ]  # fmt: skip
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    out = b""
    try:
        assert proc.stdout is not None
        os.set_blocking(proc.stdout.fileno(), False)
        while time.monotonic() - t0 < timeout:
            chunk = proc.stdout.read(65536)
            if chunk:
                out += chunk
                if _BOOTED.search(out):
                    dt = time.monotonic() - t0
                    return AccelChoice(
                        "kvm", f"a probe kernel booted under KVM in {dt:.2f} s", True, dt
                    )
            elif proc.poll() is not None:
                break
            else:
                time.sleep(0.02)
    finally:
        proc.kill()
        proc.wait()
    dt = time.monotonic() - t0
    if proc.returncode not in (None, -9) and not out:
        why = f"QEMU refused KVM (exit {proc.returncode})"
    elif dt >= timeout:
        why = f"a probe kernel did not boot under KVM within {timeout:g} s"
    else:
        tail = out.decode(errors="replace").strip().splitlines()[-1:] or ["no output"]
        why = f"a probe kernel failed under KVM: {tail[0][:200]}"
    return AccelChoice("tcg", why, probed=True, seconds=dt)


def _cache_key(kernel: Path) -> str:
    """Keyed by content, not path: a base VM's copy of a kernel shares the image's probe."""
    h = hashlib.sha256()
    h.update(qemu_version().encode())
    h.update(platform.release().encode())
    h.update(file_sha256(kernel).encode())
    return h.hexdigest()[:32]


def choose_accel(paths: Paths, kernel: Path | None, *, refresh: bool = False) -> AccelChoice:
    """The accelerator to use: ``CLOUDLET_ACCEL`` if set, else the (cached) probe result."""
    forced = os.environ.get("CLOUDLET_ACCEL", "").strip().lower()
    if forced and forced != "auto":
        if forced not in ("kvm", "tcg"):
            raise InvalidInputError(
                f"CLOUDLET_ACCEL={forced!r} is not one of kvm, tcg, auto",
                hint="unset it to let cloudlet probe, or set it to kvm or tcg",
            )
        return AccelChoice(forced, "set by CLOUDLET_ACCEL", probed=False)
    if kernel is None:
        return AccelChoice("tcg", "no kernel to probe KVM with (BIOS-boot image)", probed=False)
    cache = paths.cache / "accel.json"
    key = _cache_key(kernel)
    if not refresh and cache.exists():
        try:
            d = read_json(cache)
            if d.get("key") == key:
                c = d["choice"]
                return AccelChoice(
                    c["accel"], c["reason"] + " (cached)", False, c.get("seconds", 0.0)
                )
        except (ValueError, KeyError, TypeError, OSError):
            pass  # a damaged cache is just re-probed
    choice = probe_kvm(kernel)
    atomic_write_json(cache, {"key": key, "choice": choice.to_dict(), "at": time.time()})
    return choice
