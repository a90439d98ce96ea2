"""Process helpers shared by the runtime and the benchmark harnesses."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path


def pid_alive(pid: int) -> bool:
    """True if a process with ``pid`` exists (even if it is not ours to signal)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def terminate(proc: subprocess.Popen[bytes] | subprocess.Popen[str], grace: float = 20.0) -> None:
    """SIGTERM, up to ``grace`` seconds for a clean exit (a server ends its VMs), then SIGKILL."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


def qemu_pids_mentioning(text: str) -> list[int]:
    """Pids of QEMU processes whose command line contains ``text`` (e.g. a data dir).

    Reads /proc rather than tracking children, so it also finds VMs left
    behind by a killed run or started by another process.
    """
    needle = text.encode()
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            cmd = (d / "cmdline").read_bytes()
        except OSError:
            continue
        if b"qemu-system" in cmd.split(b"\0", 1)[0] and needle in cmd:
            out.append(int(d.name))
    return out
